"""Fuzzing the two venue parsers with real recorded messages, mutated.

Each mutated message gets a verdict from the documented field rules (``verdict`` functions
below): ``MAL`` (the feed must count it in ``C_MALFORMED`` and publish nothing), ``VENUE`` (an
unknown symbol: ``C_VENUE_ERRORS``), ``UNKNOWN_SYM`` (either of those two), ``OK`` (must not be
counted malformed), ``EITHER`` (accepted or not: lenient corners such as ``float("1_0")``, not
held either way) and ``IGNORED``. A field the feed does not read (``stream``, a diff's ``E``,
a ticker's ``T``...) must change nothing at all.

What the feeds must never do, whatever arrives: raise; publish anything for a message they
counted as bad; let garbage corrupt the book (Binance: after garbage interleaved with the real
recording every published record is byte for byte the clean replay's); publish a Hyperliquid
book whose prices are not strictly ordered and positive or whose sizes are not positive.

The last part holds the Binance fast path (``scan_levels``) to the plain path (``orjson`` and
``levels_slow``) on random well-formed depth messages.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from shm import schema
from stages.instruments import Instrument
from stages.venues.binance import BinanceFeed, MalformedMessage, levels_slow
from stages.venues.book import SCAN_BAD, SCAN_OK, scan_levels
from stages.venues.feed import RecordingSink, new_counters
from stages.venues.hyperliquid import HyperliquidFeed
from stages.venues.replay import InlineSnapshots, infer_instruments, make_feed, read_recording

DATA = Path(__file__).resolve().parent.parent / "data"
BINANCE = DATA / "binance-usdm-btcusdt-20240808-excerpt.jsonl.gz"
HYPER = DATA / "hyperliquid-btc-20250126.jsonl.gz"
MAX_PX = 1e9  # both feeds' default bounds
MAX_SZ = 1e12
MAX_ID = (1 << 63) - 1
MAX_MS = 9_000_000_000_000
DEPTH = schema.BOOK_DEPTH

MAL, VENUE, UNKNOWN_SYM, OK, EITHER, IGNORED = (
    "malformed",
    "venue",
    "unknown_symbol",
    "ok",
    "either",
    "ignored",
)
BAD = (MAL, VENUE, UNKNOWN_SYM)

FUZZ = settings(
    max_examples=250,
    deadline=None,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
        HealthCheck.data_too_large,
    ],
)
FEW = settings(FUZZ, max_examples=25)


# ---------------------------------------------------------------------- JSON values
@dataclass(frozen=True)
class Raw:
    """A JSON token written as it is: NaN, Infinity, 1e400, integers past 64 bits."""

    text: bytes


def enc(v: Any) -> bytes:
    if isinstance(v, Raw):
        return v.text
    if isinstance(v, dict):
        return b"{" + b",".join(orjson.dumps(str(k)) + b":" + enc(x) for k, x in v.items()) + b"}"
    if isinstance(v, list):
        return b"[" + b",".join(enc(x) for x in v) + b"]"
    return orjson.dumps(v)


SPECIAL_STRINGS = st.sampled_from(
    [
        "nan",
        "NaN",
        "inf",
        "-inf",
        "Infinity",
        "-Infinity",
        "1e400",
        "-1e400",
        "1e308",
        "1e-400",
        "-1",
        "-0",
        "0",
        "0.0",
        "",
        " ",
        "abc",
        "1,2",
        "[1",
        "2]",
        "1e5",
        "+1",
        "1_000",
        "١٢٣",
        " 1",
        "1 ",
        "0x10",
        "true",
        "null",
        "61800.10",
        "0.001",
        "105055.0",
        "BTCUSDT",
        "ETHUSDT",
        "BTC",
        "DOGE",
        "B",
        "A",
        "😀\u0000",
        "9" * 400,
    ]
)
RAW_TOKENS = st.sampled_from(
    [
        Raw(b"NaN"),
        Raw(b"Infinity"),
        Raw(b"-Infinity"),
        Raw(b"1e400"),
        Raw(b"-1e400"),
        Raw(b"1" + b"0" * 40),
        Raw(b"18446744073709551616"),
        Raw(b"9223372036854775808"),
        Raw(b"-9223372036854775809"),
        Raw(b"1e308"),
        Raw(b"-0"),
        Raw(b"0.0"),
    ]
)
LEAF = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
    SPECIAL_STRINGS,
    RAW_TOKENS,
)
ANY = st.recursive(
    LEAF,
    lambda kids: (
        st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=4), kids, max_size=3)
    ),
    max_leaves=6,
)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


def _edit(msg: Any, path: tuple[Any, ...], value: Any, delete: bool) -> Any:
    node = msg
    for key in path[:-1]:
        node = node[key]
    if delete:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return msg


@dataclass(frozen=True)
class Mutation:
    raw: bytes
    kind: str  # flip, truncate, delete, duplicate, insert, replace, remove
    path: tuple[Any, ...] = ()
    value: Any = None


@st.composite
def byte_mutation(draw: st.DrawFn, raw: bytes) -> Mutation:
    kind = draw(st.sampled_from(["flip", "truncate", "delete", "duplicate", "insert"]))
    n = len(raw)
    i = draw(st.integers(0, n - 1))
    k = draw(st.integers(1, 16))
    if kind == "flip":
        out = raw[:i] + bytes([draw(st.integers(0, 255))]) + raw[i + 1 :]
    elif kind == "truncate":
        out = raw[:i]
    elif kind == "delete":
        out = raw[:i] + raw[i + k :]
    elif kind == "duplicate":
        out = raw[: i + k] + raw[i : i + k] + raw[i + k :]
    else:
        out = raw[:i] + draw(st.binary(min_size=1, max_size=8)) + raw[i:]
    return Mutation(out, kind)


@st.composite
def field_mutation(draw: st.DrawFn, raw: bytes) -> Mutation:
    msg = orjson.loads(raw)
    paths = _paths(msg)
    if draw(st.booleans()):  # the message's own fields, not only its many levels
        paths = [p for p in paths if len(p) <= 2]
    path = draw(st.sampled_from(paths))
    if draw(st.booleans()):
        value = draw(ANY)
        return Mutation(enc(_edit(msg, path, value, False)), "replace", path, value)
    return Mutation(enc(_edit(msg, path, None, True)), "remove", path)


def mutation(raw: bytes) -> st.SearchStrategy[Mutation]:
    return st.one_of(byte_mutation(raw), field_mutation(raw), field_mutation(raw))


# ---------------------------------------------------------------------- verdicts: field rules
STRICT_DECIMAL = re.compile(r"-?[0-9]+(\.[0-9]+)?")


def _combine(*vs: str) -> str:
    for v in (MAL, VENUE, UNKNOWN_SYM, EITHER):
        if v in vs:
            return v
    return OK


def _dec(v: Any, lo: float, hi: float, *, open_lo: bool = False) -> str:
    """A decimal string inside the range; lenient spellings float() takes are EITHER."""
    if type(v) is not str:
        return MAL
    try:
        x = float(v)
    except ValueError:
        return MAL
    if not (lo < x < hi if open_lo else lo <= x < hi):
        return MAL
    return OK if STRICT_DECIMAL.fullmatch(v) else EITHER


def _int(d: dict, key: str, lo: int = 0, hi: int = MAX_ID) -> str:
    if key not in d:
        return MAL
    v = d[key]
    return OK if type(v) is int and lo <= v <= hi else MAL


def _levels(v: Any) -> tuple[str, int]:
    if type(v) is not list:
        return MAL, 0
    worst = OK
    for lv in v:
        if type(lv) is not list or len(lv) != 2:
            return MAL, 0
        worst = _combine(worst, _dec(lv[0], 0.0, MAX_PX, open_lo=True), _dec(lv[1], 0.0, MAX_SZ))
        if worst == MAL:
            return MAL, 0
    return worst, len(v)


def _symbol(d: dict, known: set[str], unknown: str) -> str | None:
    """None if the symbol is known; otherwise the verdict."""
    if "s" not in d or type(d["s"]) is not str:
        return MAL
    return None if d["s"] in known else unknown


BN_KNOWN = {"BTCUSDT"}


def _bn_depth(msg: Any) -> str:
    if type(msg) is not dict or "data" not in msg:
        return MAL
    data = msg["data"]
    if type(data) is not dict or "b" not in data or "a" not in data:
        return MAL
    vb, nb = _levels(data["b"])
    va, na = _levels(data["a"])
    if MAL in (vb, va) or nb + na > 5000:
        return MAL
    if data.get("e") != "depthUpdate":
        return MAL
    sym = _symbol(data, BN_KNOWN, VENUE)
    if sym is not None:
        return sym
    ids = _combine(_int(data, "U"), _int(data, "u"), _int(data, "pu"))
    t = _int(data, "T", 1, MAX_MS) if "T" in data else _int(data, "E", 1, MAX_MS)
    if ids == MAL or t == MAL or data["U"] > data["u"]:
        return MAL
    return _combine(vb, va)


def _bn_ticker(d: dict) -> str:
    sym = _symbol(d, BN_KNOWN, UNKNOWN_SYM)
    if sym is not None:
        return sym
    return _combine(
        _int(d, "u"),
        *(
            _dec(d[k], 0.0, hi) if k in d else MAL
            for k, hi in (("b", MAX_PX), ("B", MAX_SZ), ("a", MAX_PX), ("A", MAX_SZ))
        ),
    )


def _bn_trade(d: dict) -> str:
    sym = _symbol(d, BN_KNOWN, UNKNOWN_SYM)
    if sym is not None:
        return sym
    v = _int(d, "a" if d.get("e") == "aggTrade" else "t")
    for k, hi in (("p", MAX_PX), ("q", MAX_SZ)):
        v = _combine(v, _dec(d[k], 0.0, hi, open_lo=True) if k in d else MAL)
    v = _combine(v, _int(d, "T", 1, MAX_MS))
    if "m" not in d or type(d["m"]) is not bool:
        return MAL
    return v


def _bn_mark(d: dict) -> str:
    sym = _symbol(d, BN_KNOWN, UNKNOWN_SYM)
    if sym is not None:
        return sym
    if "p" not in d:
        return MAL
    v = _dec(d["p"], 0.0, MAX_PX, open_lo=True)
    if "i" in d:
        v = _combine(v, _dec(d["i"], 0.0, MAX_PX))
    if d.get("r") not in (None, ""):
        v = _combine(v, _dec(d["r"], -1.0, 1.0))
    if d.get("T"):
        v = _combine(v, _int(d, "T", 1, MAX_MS))
    elif d.get("T", 0) not in (None, 0):
        v = _combine(v, EITHER)  # a falsy non-integer next funding time ("", [], false)
    return _combine(v, _int(d, "E", 1, MAX_MS))


def binance_verdict(raw: bytes) -> str:
    """What BinanceFeed.on_message must make of ``raw`` (its routing, then the field rules)."""
    try:
        msg = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return MAL
    if b'"depthUpdate"' in raw:  # the feed's routing: the quoted name, as on the wire
        return _bn_depth(msg)
    if type(msg) is not dict:
        return MAL
    data = msg.get("data")
    if type(data) is not dict:
        if "result" in msg and "id" in msg:
            return IGNORED
        return VENUE if "error" in msg else MAL
    kind = data.get("e")
    if kind == "bookTicker":
        return _bn_ticker(data)
    if kind in ("aggTrade", "trade"):
        return _bn_trade(data)
    if kind == "markPriceUpdate":
        return _bn_mark(data)
    if kind == "depthUpdate":
        return _bn_depth(msg)
    return IGNORED


BN_UNUSED = {
    "depthUpdate": {"E"},  # every recorded diff has T
    "bookTicker": {"T", "E"},
    "trade": {"E", "X"},
    "aggTrade": {"E", "f", "l"},
    "markPriceUpdate": {"P"},
}


def _bn_unused(raw: bytes, m: Mutation) -> bool:
    """The mutation only touched a field the feed does not read."""
    if m.kind not in ("replace", "remove"):
        return False
    if m.path == ("stream",):
        return True
    kind = orjson.loads(raw)["data"]["e"]
    return len(m.path) == 2 and m.path[0] == "data" and m.path[1] in BN_UNUSED[kind]


# ---------------------------------------------------------------------- Binance: recording runs
def _is_snapshot(raw: bytes) -> bool:
    return raw[:1] == b"{" and b"lastUpdateId" in raw[:64]


@functools.cache
def _bn_lines() -> tuple[tuple[int, bytes], ...]:
    return tuple((ts, raw) for ts, raw in read_recording(BINANCE) if ts >= 0)


@functools.cache
def _bn_instruments() -> dict[int, Instrument]:
    return infer_instruments(BINANCE, "binance")


SNAPSHOT_AT = next(i for i, (_, raw) in enumerate(_bn_lines()) if _is_snapshot(raw))
WATCH = (
    schema.C_MALFORMED,
    schema.C_VENUE_ERRORS,
    schema.C_GAPS,
    schema.C_RESYNCS,
    schema.C_DUPLICATES,
    schema.C_STALE,
    schema.C_SNAPSHOTS,
    schema.C_TRADES,
    schema.C_CROSSED,
)


@dataclass
class Outcome:
    books: int
    trades: int
    marks: int
    counters: dict[int, int]  # deltas of WATCH


@dataclass
class BnRun:
    feed: BinanceFeed
    sink: RecordingSink
    counters: list[int]
    outcomes: list[Outcome]  # one per extra message, in order
    books_after: list[int]  # books published after each line (clean runs)
    trades_after: list[int]
    counters_after: list[list[int]]


def bn_run(items: Iterable[tuple[int, bytes, bool]], *, track: bool = False) -> BnRun:
    """Feed (recv ns, raw, extra?) in order, as replay does; record what each extra did."""
    sink = RecordingSink()
    counters = new_counters()
    snaps = InlineSnapshots()
    feed = make_feed("binance", _bn_instruments(), sink, counters, snaps)
    assert isinstance(feed, BinanceFeed)
    feed.on_connected(0, 0)
    feed.on_connected(1, 0)
    run = BnRun(feed, sink, counters, [], [], [], [])
    for ts, raw, extra in items:
        if not extra and _is_snapshot(raw):
            snaps.offer(orjson.loads(raw), ts)
            feed.poll(ts)
        elif extra:
            before = (len(sink.books), len(sink.trade_batches), len(sink.marks), list(counters))
            feed.on_message(0, raw, ts)  # must not raise, whatever raw is
            run.outcomes.append(
                Outcome(
                    len(sink.books) - before[0],
                    len(sink.trade_batches) - before[1],
                    len(sink.marks) - before[2],
                    {c: counters[c] - before[3][c] for c in WATCH if counters[c] != before[3][c]},
                )
            )
        else:
            feed.on_message(0, raw, ts)
        if track:
            run.books_after.append(len(sink.books))
            run.trades_after.append(len(sink.trade_batches))
            run.counters_after.append(list(counters))
    return run


@functools.cache
def _bn_clean() -> BnRun:
    run = bn_run(((ts, raw, False) for ts, raw in _bn_lines()), track=True)
    assert run.counters[schema.C_MALFORMED] == 0 and run.counters[schema.C_GAPS] == 0
    assert len(run.sink.books) == 484
    return run


def _bytes(arrs: list[np.ndarray]) -> list[bytes]:
    return [a.tobytes() for a in arrs]


def _assert_bad_outcome(verdict: str, out: Outcome) -> None:
    """A bad message: counted once, in the right place, and nothing published."""
    assert (out.books, out.trades, out.marks) == (0, 0, 0), (verdict, out)
    if verdict == MAL:
        assert out.counters == {schema.C_MALFORMED: 1}, out
    elif verdict == VENUE:
        assert out.counters == {schema.C_VENUE_ERRORS: 1}, out
    else:
        assert out.counters in ({schema.C_MALFORMED: 1}, {schema.C_VENUE_ERRORS: 1}), out


def _assert_same_as_clean(run: BnRun, upto: int, *, exact_counters: bool = True) -> None:
    """Books, trades and marks published are the clean replay's up to line ``upto``."""
    clean = _bn_clean()
    n_books = clean.books_after[upto - 1]
    n_trades = clean.trades_after[upto - 1]
    assert _bytes(run.sink.books) == _bytes(clean.sink.books[:n_books])
    assert _bytes(run.sink.trade_batches) == _bytes(clean.sink.trade_batches[:n_trades])
    assert run.sink.marks == []
    if exact_counters:
        assert run.counters == clean.counters_after[upto - 1]
    else:
        for c in WATCH:
            if c not in (schema.C_MALFORMED, schema.C_VENUE_ERRORS):
                assert run.counters[c] == clean.counters_after[upto - 1][c], c


def _synthetic_binance() -> list[bytes]:
    agg = {"e": "aggTrade", "E": 1723161256400, "s": "BTCUSDT", "a": 9_000_000_000}
    agg |= {"p": "61800.30", "q": "0.010", "f": 1, "l": 2, "T": 1723161256399, "m": True}
    mark = {"e": "markPriceUpdate", "E": 1723161256400, "s": "BTCUSDT", "p": "61800.1"}
    mark |= {"i": "61795.2", "P": "61790.0", "r": "0.0001", "T": 1723190400000}
    return [
        orjson.dumps({"stream": "btcusdt@aggTrade", "data": agg}),
        orjson.dumps({"stream": "btcusdt@markPrice@1s", "data": mark}),
    ]


def _touch_diffs() -> list[bytes]:
    """Diffs at the touch (61800-61830 all the excerpt long) with sizes nobody quotes: if any
    of their levels got into the book, the published top of book would show it."""
    out = []
    for k, (first, last, prev) in enumerate(
        [(5123107856267, 5123107858366, 5123107856210), (7, 9, 6), (1, 1, 0)]
    ):
        bids = [[f"{61790 + i / 10:.2f}", f"{123 + k}.456"] for i in range(0, 400, 9)]
        asks = [[f"{61799 + i / 10:.2f}", f"{654 + k}.321"] for i in range(0, 400, 9)]
        data = {"e": "depthUpdate", "E": 1723161256612, "T": 1723161256605, "s": "BTCUSDT"}
        data |= {"U": first, "u": last, "pu": prev, "b": bids, "a": asks}
        out.append(orjson.dumps({"stream": "btcusdt@depth@0ms", "data": data}))
    return out


@functools.cache
def _bn_samples() -> tuple[bytes, ...]:
    """Messages to make garbage from: real ones of each kind (the smaller diffs: fewer paths
    to pick from), diffs at the touch, and the kinds the excerpt does not have."""
    lines = [raw for _, raw in _bn_lines()[SNAPSHOT_AT + 1 :]]
    diffs = sorted((r for r in lines if b'"depthUpdate"' in r), key=len)[:20]
    tickers = [r for r in lines if b'"bookTicker"' in r][:15]
    trades = [r for r in lines if b'"e":"trade"' in r][:15]
    return (*diffs, *_touch_diffs() * 5, *tickers, *trades, *_synthetic_binance())


# ---------------------------------------------------------------------- Binance: one message
@functools.cache
def _bn_positions() -> dict[str, list[int]]:
    """Line numbers of each message kind in the first few hundred lines after the snapshot."""
    out: dict[str, list[int]] = {"depthUpdate": [], "bookTicker": [], "trade": []}
    for i in range(SNAPSHOT_AT + 1, SNAPSHOT_AT + 450):
        out[orjson.loads(_bn_lines()[i][1])["data"]["e"]].append(i)
    return out


def _check_binance_line(pos: int, m: Mutation, source: bytes) -> str:
    """Send ``m`` (made from ``source``) where line ``pos`` of the recording is; check what
    the feed made of it. A mutation of line ``pos`` itself that only touches a field the feed
    does not read replaces the line; anything else goes in before it."""
    lines = _bn_lines()
    ts, raw = lines[pos]
    verdict = binance_verdict(m.raw)
    upto = pos + 30
    head = [(t, r, False) for t, r in lines[:pos]]
    tail = [(t, r, False) for t, r in lines[pos + 1 : upto]]
    if source == raw and _bn_unused(raw, m) and verdict not in BAD:
        # a field the feed does not read: the mutated message is the real one
        run = bn_run([*head, (ts, m.raw, True), *tail])
        _assert_same_as_clean(run, upto)
        return "same"
    run = bn_run([*head, (ts, m.raw, True), (ts, raw, False), *tail])
    (out,) = run.outcomes
    if verdict in BAD:
        _assert_bad_outcome(verdict, out)
        _assert_same_as_clean(run, upto, exact_counters=False)  # garbage changed nothing
    elif verdict == OK:
        assert schema.C_MALFORMED not in out.counters, out
    elif verdict == IGNORED:
        assert out == Outcome(0, 0, 0, {}), out
    if schema.C_MALFORMED in out.counters:
        assert (out.books, out.trades, out.marks) == (0, 0, 0)
    return verdict


@FUZZ
@given(st.sampled_from(["depthUpdate", "bookTicker", "trade"]), st.data())
def test_binance_mutated_real_message(kind: str, data: st.DataObject) -> None:
    pos = data.draw(st.sampled_from(_bn_positions()[kind]))
    source = _bn_lines()[pos][1]
    if data.draw(st.booleans()):
        source = data.draw(st.sampled_from(_bn_samples()))  # garbage made from another message
    _check_binance_line(pos, data.draw(mutation(source)), source)


def test_an_unknown_event_type_is_ignored_not_routed_by_a_substring() -> None:
    """Found by the fuzzer: ``"e":"ddepthUpdate"`` is no diff (the feed routes on the quoted
    name) but an event type it does not know, ignored like any other."""
    pos = _bn_positions()["depthUpdate"][0]
    source = _bn_lines()[pos][1]
    raw = source.replace(b'"e":"depthUpdate"', b'"e":"ddepthUpdate"', 1)
    assert raw != source
    assert binance_verdict(raw) == IGNORED
    assert _check_binance_line(pos, Mutation(raw=raw, kind="duplicate"), source) == IGNORED


WRONG_VALUES: list[Any] = [
    None,
    True,
    False,
    0,
    -1,
    1.5,
    2**63,
    2**64 - 1,
    Raw(b"1" + b"0" * 30),
    Raw(b"-9223372036854775809"),
    Raw(b"1e308"),
    Raw(b"1e400"),
    Raw(b"NaN"),
    Raw(b"-Infinity"),
    "",
    "x",
    "NaN",
    "Infinity",
    "-1",
    "1e308",
    "1e400",
    "١٢٣",
    "61800.10",
    [],
    [[]],
    [["1", "1", "1"]],
    {},
    {"b": [["1", "1"]], "a": []},
]


def _top_paths(msg: dict) -> list[tuple[Any, ...]]:
    """Every field of the message and of its data, and one level of each array inside."""
    paths: list[tuple[Any, ...]] = [("stream",), ("data",)]
    for k, v in msg["data"].items():
        paths.append(("data", k))
        if isinstance(v, list) and v:
            paths += [("data", k, 0)]
            if isinstance(v[0], list):
                paths += [("data", k, 0, 0), ("data", k, 0, 1)]
    return paths


def test_binance_wrong_value_at_every_field() -> None:
    seen: dict[str, int] = {}
    for kind in ("depthUpdate", "bookTicker", "trade"):
        pos = _bn_positions()[kind][1]
        raw = _bn_lines()[pos][1]
        # the line itself (a field it does not read must change nothing), and for diffs one
        # at the touch from elsewhere (a bad copy of the line would be covered up by the line)
        sources = [raw, _touch_diffs()[0]] if kind == "depthUpdate" else [raw]
        for source in sources:
            for path in _top_paths(orjson.loads(source)):
                for value, delete in [(v, False) for v in WRONG_VALUES] + [(None, True)]:
                    mutated = enc(_edit(orjson.loads(source), path, value, delete))
                    m = Mutation(mutated, "remove" if delete else "replace", path, value)
                    verdict = _check_binance_line(pos, m, source)
                    seen[verdict] = seen.get(verdict, 0) + 1
    assert seen[MAL] > 400 and seen["same"] > 50 and seen[OK] > 5, seen


def _check_synthetic(raw: bytes, m: Mutation) -> None:
    """An aggTrade or markPrice message (none are recorded), mutated, after the snapshot."""
    verdict = binance_verdict(m.raw)
    lines = _bn_lines()[: SNAPSHOT_AT + 5]
    run = bn_run([*((t, r, False) for t, r in lines), (lines[-1][0], m.raw, True)])
    (out,) = run.outcomes
    if verdict in BAD:
        _assert_bad_outcome(verdict, out)
    elif verdict == OK:
        assert schema.C_MALFORMED not in out.counters, out
        # published, or an id at or below the last one: a duplicate
        assert out.trades + out.marks == 1 or out.counters == {schema.C_DUPLICATES: 1}, out
    elif verdict == IGNORED:
        assert out == Outcome(0, 0, 0, {}), out
    if schema.C_MALFORMED in out.counters:
        assert (out.books, out.trades, out.marks) == (0, 0, 0)
    if _bn_unused(raw, m) and verdict not in BAD:
        assert verdict == OK
        ref = bn_run([*((t, r, False) for t, r in lines), (lines[-1][0], raw, True)])
        assert run.outcomes == ref.outcomes
        assert _bytes(run.sink.trade_batches) == _bytes(ref.sink.trade_batches)
        assert _bytes(run.sink.marks) == _bytes(ref.sink.marks)


@FUZZ
@given(st.sampled_from(_synthetic_binance()), st.data())
def test_binance_mutated_trade_and_mark_messages(raw: bytes, data: st.DataObject) -> None:
    _check_synthetic(raw, data.draw(mutation(raw)))


def test_binance_trade_and_mark_wrong_value_at_every_field() -> None:
    for raw in _synthetic_binance():
        for path in _top_paths(orjson.loads(raw)):
            for value, delete in [(v, False) for v in WRONG_VALUES] + [(None, True)]:
                mutated = enc(_edit(orjson.loads(raw), path, value, delete))
                kind = "remove" if delete else "replace"
                _check_synthetic(raw, Mutation(mutated, kind, path, value))


@FUZZ
@given(st.one_of(st.binary(max_size=300), st.text(max_size=100).map(str.encode)))
def test_binance_random_bytes(raw: bytes) -> None:
    run = bn_run([(1, raw, True)])
    (out,) = run.outcomes
    verdict = binance_verdict(raw)
    if verdict in BAD:
        _assert_bad_outcome(verdict, out)
    assert (out.books, out.trades, out.marks) == (0, 0, 0)


@pytest.mark.parametrize(
    ("raw", "verdict"),
    [
        (b"", MAL),
        (b"null", MAL),
        (b"[]", MAL),
        (b"{}", MAL),
        (b'{"result":null,"id":1}', IGNORED),
        (b'{"error":{"code":2,"msg":"Invalid request"}}', VENUE),
        (b'{"stream":"x","data":{"e":"somethingNew"}}', IGNORED),
        (b'{"stream":"x","data":5}', MAL),
        (b'{"stream":"x","data":{"e":"depthUpdate"}}', MAL),
        (b'{"stream":"x","data":{"e":"depth\\u0055pdate","s":"BTCUSDT"}}', MAL),
        (b'{"data":{"e":"depthUpdate","b":[],"a":[],"s":"BTCUSDT","U":1,"u":2,"pu":NaN}}', MAL),
        (b'{"data":{"e":"depthUpdate","b":[["1e400","1"]],"a":[]}}', MAL),
        (b'{"data":{"e":"depthUpdate","b":[["1","1"]],"a":[],"s":"ETHUSDT"}}', VENUE),
    ],
)
def test_binance_hand_written_frames(raw: bytes, verdict: str) -> None:
    assert binance_verdict(raw) == verdict  # the verdicts themselves are right
    run = bn_run([(1, raw, True)])
    (out,) = run.outcomes
    if verdict in BAD:
        _assert_bad_outcome(verdict, out)
    else:
        assert out == Outcome(0, 0, 0, {})


# ---------------------------------------------------------------------- Binance: interleaved
@st.composite
def binance_garbage(draw: st.DrawFn) -> bytes:
    lines = _bn_lines()
    kind = draw(st.sampled_from(["prefix", "bytes", "field", "field", "touch", "random"]))
    if kind == "random":
        return draw(st.binary(max_size=200).filter(lambda r: binance_verdict(r) in BAD))
    if kind == "touch":
        # the most dangerous garbage: it parses and its levels are fine, one header field is not
        msg = orjson.loads(draw(st.sampled_from(_touch_diffs())))
        key = draw(st.sampled_from(["e", "s", "U", "u", "pu", "T", "data"]))
        delete = draw(st.booleans())
        value = None if delete else draw(st.sampled_from(WRONG_VALUES))
        path = ("data",) if key == "data" else ("data", key)
        raw = enc(_edit(msg, path, value, delete))
        assume(binance_verdict(raw) in BAD)
        return raw
    if kind == "prefix":
        raw = lines[draw(st.integers(0, len(lines) - 1))][1]
        return raw[: draw(st.integers(0, len(raw) - 1))]
    raw = draw(st.sampled_from(_bn_samples()))
    strategy = byte_mutation(raw) if kind == "bytes" else field_mutation(raw)
    return draw(strategy.map(lambda m: m.raw).filter(lambda r: binance_verdict(r) in BAD))


@FEW
@given(st.lists(st.tuples(st.integers(0, 5999), binance_garbage()), min_size=1, max_size=30))
def test_binance_garbage_interleaved_with_the_recording_changes_nothing(
    garbage: list[tuple[int, bytes]],
) -> None:
    at: dict[int, list[bytes]] = {}
    for i, g in garbage:
        at.setdefault(i, []).append(g)
    items: list[tuple[int, bytes, bool]] = []
    for i, (ts, raw) in enumerate(_bn_lines()):
        items += [(ts, g, True) for g in at.get(i, [])]
        items.append((ts, raw, False))
    run = bn_run(items)
    assert len(run.outcomes) == len(garbage)
    verdicts = [binance_verdict(g) for i in sorted(at) for g in at[i]]
    for verdict, out in zip(verdicts, run.outcomes, strict=True):
        _assert_bad_outcome(verdict, out)
    clean = _bn_clean()
    # every record the feed published is the clean replay's, byte for byte
    assert _bytes(run.sink.books) == _bytes(clean.sink.books)
    assert _bytes(run.sink.trade_batches) == _bytes(clean.sink.trade_batches)
    bad = run.counters[schema.C_MALFORMED] + run.counters[schema.C_VENUE_ERRORS]
    assert bad == len(garbage)
    for c in WATCH:
        if c not in (schema.C_MALFORMED, schema.C_VENUE_ERRORS):
            assert run.counters[c] == clean.counters[c], c
    assert (run.feed.tob_checks, run.feed.tob_mismatches) == (49, 0)


# ---------------------------------------------------------------------- Hyperliquid
HL_SYMBOLS = {"BTC": 7, "ETH": 9}
HL_INSTRUMENTS = {
    sid: Instrument(coin, 1.0, 0.00001, 10.0, venue="hyperliquid")
    for coin, sid in HL_SYMBOLS.items()
}
CTX_FRAME = orjson.dumps(
    {
        "channel": "activeAssetCtx",
        "data": {
            "coin": "BTC",
            "ctx": {
                "funding": "0.0000125",
                "openInterest": "10543.21",
                "prevDayPx": "104000.0",
                "dayNtlVlm": "1000000.0",
                "premium": "0.0001",
                "oraclePx": "105000.0",
                "markPx": "105010.0",
                "midPx": "105005.5",
                "impactPxs": ["105005.0", "105006.0"],
            },
        },
    }
)


@functools.cache
def _hl_lines() -> tuple[tuple[int, bytes], ...]:
    return tuple((ts, raw) for ts, raw in read_recording(HYPER) if ts >= 0)


@dataclass
class HlRun:
    feed: HyperliquidFeed
    sink: RecordingSink
    counters: list[int]
    outcomes: list[Outcome]


def hl_run(items: Iterable[tuple[int, bytes, bool]]) -> HlRun:
    sink = RecordingSink()
    counters = new_counters()
    feed = HyperliquidFeed(HL_INSTRUMENTS, sink, counters)
    feed.on_connected(0, 0)
    run = HlRun(feed, sink, counters, [])
    for ts, raw, extra in items:
        before = (len(sink.books), len(sink.trade_batches), len(sink.marks), list(counters))
        feed.on_message(0, raw, ts)
        if extra:
            run.outcomes.append(
                Outcome(
                    len(sink.books) - before[0],
                    len(sink.trade_batches) - before[1],
                    len(sink.marks) - before[2],
                    {c: counters[c] - before[3][c] for c in WATCH if counters[c] != before[3][c]},
                )
            )
    for rec in sink.books:
        _assert_sane_hl_book(rec[0])
    return run


def _assert_sane_hl_book(rec: np.void) -> None:
    nb, na = int(rec["n_bid"]), int(rec["n_ask"])
    assert 0 <= nb <= DEPTH and 0 <= na <= DEPTH
    bp, bs, ap, as_ = rec["bid_px"], rec["bid_sz"], rec["ask_px"], rec["ask_sz"]
    assert np.all(np.isfinite(bp)) and np.all(np.isfinite(ap))
    assert np.all(np.isfinite(bs)) and np.all(np.isfinite(as_))
    assert np.all(np.diff(bp[:nb]) < 0) and np.all(np.diff(ap[:na]) > 0)  # strictly ordered
    assert np.all(bp[:nb] > 0) and np.all(ap[:na] > 0)
    assert np.all(bs[:nb] > 0) and np.all(as_[:na] > 0)
    for arr, n in ((bp, nb), (bs, nb), (ap, na), (as_, na)):
        assert np.all(arr[n:] == 0.0)
    crossed = nb > 0 and na > 0 and bp[0] >= ap[0]
    assert bool(int(rec["flags"]) & schema.BOOK_CROSSED) == crossed


@functools.cache
def _hl_clean() -> HlRun:
    run = hl_run((ts, raw, False) for ts, raw in _hl_lines())
    assert run.counters[schema.C_MALFORMED] == 0 and len(run.sink.books) == 46
    return run


def _hl_kind(channel: str, path: tuple[Any, ...]) -> str:
    """What the field at ``path`` of a frame on ``channel`` must hold."""
    if path == ("channel",):
        return "channel"
    if path == ("data",):
        return "list" if channel == "trades" else "dict"
    rest = path[1:]
    if channel == "l2Book":
        if rest in (("coin",), ("time",)):
            return rest[0]
        if len(rest) in (1, 2):
            return "list" if rest[0] == "levels" else "unused"
        if len(rest) == 3:
            return "dict"
        return "decimal" if rest[3] in ("px", "sz") else "unused"
    if channel == "trades":
        if len(rest) == 1:
            return "dict"
        key = rest[1]
        kinds = {"coin": "trade_coin", "side": "side", "px": "decimal", "sz": "decimal"}
        return kinds.get(key) or {"time": "time", "tid": "tid"}.get(key, "unused")
    # activeAssetCtx
    if rest == ("coin",):
        return "coin"
    if rest == ("ctx",):
        return "dict"
    if len(rest) == 2 and rest[1] in ("markPx", "oraclePx", "funding", "openInterest"):
        return "decimal"
    return "unused"


def _hl_value_verdict(kind: str, v: Any) -> str:
    if kind == "unused":
        return OK
    if isinstance(v, Raw):
        v = orjson.loads(v.text)  # the whole message parsed, so this token does too
    if kind == "channel":
        return EITHER if type(v) is str else MAL
    if kind == "dict":
        return EITHER if type(v) is dict else MAL
    if kind == "list":
        return EITHER if type(v) is list else MAL
    if kind == "coin":
        if type(v) is not str:
            return MAL
        return EITHER if v in HL_SYMBOLS else VENUE
    if kind == "trade_coin":
        return EITHER if type(v) is str else MAL
    if kind == "time":
        return EITHER if type(v) is int and 0 < v <= MAX_MS else MAL
    if kind == "tid":
        return EITHER if type(v) is int and 0 <= v < 2**64 else MAL
    if kind == "side":
        return EITHER if v in ("B", "A") else MAL
    # decimal
    if type(v) is not str:
        return MAL
    try:
        x = float(v)
    except ValueError:
        return MAL
    return EITHER if math.isfinite(x) else MAL


def hl_verdict(original: bytes, m: Mutation) -> str:
    try:
        orjson.loads(m.raw)
    except orjson.JSONDecodeError:
        return MAL
    if m.kind not in ("replace", "remove"):
        return EITHER
    channel = orjson.loads(original)["channel"]
    kind = _hl_kind(channel, m.path)
    if m.kind == "replace":
        return _hl_value_verdict(kind, m.value)
    # a key or an element removed
    if kind == "unused":
        return OK
    if isinstance(m.path[-1], int):  # one level, one trade, one side of the book
        return MAL if m.path[1:] in (("levels", 0), ("levels", 1)) else EITHER
    if m.path[-1] in ("oraclePx", "openInterest"):
        return EITHER  # optional
    return MAL


@functools.cache
def _hl_samples() -> tuple[bytes, ...]:
    lines = [raw for _, raw in _hl_lines()]
    books = [r for r in lines if b'"l2Book"' in r][:6]
    trades = sorted((r for r in lines if b'"trades"' in r), key=len)[:4]
    return (*books, *trades, CTX_FRAME)


def _check_hl(raw: bytes, m: Mutation) -> str:
    verdict = hl_verdict(raw, m)
    first = _hl_lines()[0][1]  # a book already published: a bad frame must not touch it
    run = hl_run([(1, first, False), (2, m.raw, True)])
    (out,) = run.outcomes
    if verdict in BAD:
        _assert_bad_outcome(verdict, out)
        assert len(run.sink.books) == 1
    elif verdict == OK:
        assert schema.C_MALFORMED not in out.counters, out
        ref = hl_run([(1, first, False), (2, raw, True)])
        assert ref.outcomes == run.outcomes  # an unused field: the same outcome
        assert _bytes(run.sink.books) == _bytes(ref.sink.books)
        assert _bytes(run.sink.trade_batches) == _bytes(ref.sink.trade_batches)
        assert _bytes(run.sink.marks) == _bytes(ref.sink.marks)
    if schema.C_MALFORMED in out.counters:
        assert (out.books, out.trades, out.marks) == (0, 0, 0)
    return verdict


@FUZZ
@given(st.sampled_from(_hl_samples()), st.data())
def test_hyperliquid_mutated_real_message(raw: bytes, data: st.DataObject) -> None:
    _check_hl(raw, data.draw(mutation(raw)))


def test_hyperliquid_wrong_value_at_every_field() -> None:
    book, trades, ctx = _hl_samples()[0], _hl_samples()[-2], CTX_FRAME
    side = ("data", "levels")
    paths = {
        book: [("channel",), ("data",), ("data", "coin"), ("data", "time"), side]
        + [(*side, s) for s in (0, 1)]
        + [(*side, 0, 0), (*side, 1, 19)]
        + [(*side, s, i, k) for s, i in ((0, 0), (1, 7)) for k in ("px", "sz", "n")],
        trades: [("data",), ("data", 0)]
        + [("data", 0, k) for k in orjson.loads(trades)["data"][0]],
        ctx: [("data",), ("data", "coin"), ("data", "ctx")]
        + [("data", "ctx", k) for k in orjson.loads(ctx)["data"]["ctx"]],
    }
    seen: dict[str, int] = {}
    for raw, raw_paths in paths.items():
        for path in raw_paths:
            for value, delete in [(v, False) for v in WRONG_VALUES] + [(None, True)]:
                mutated = enc(_edit(orjson.loads(raw), path, value, delete))
                m = Mutation(mutated, "remove" if delete else "replace", path, value)
                verdict = _check_hl(raw, m)
                seen[verdict] = seen.get(verdict, 0) + 1
    assert seen[MAL] > 400 and seen[OK] > 50 and seen[VENUE] > 0, seen


@FUZZ
@given(st.one_of(st.binary(max_size=300), st.text(max_size=100).map(str.encode)))
def test_hyperliquid_random_bytes(raw: bytes) -> None:
    run = hl_run([(1, raw, True)])
    (out,) = run.outcomes
    assert (out.books, out.trades, out.marks) == (0, 0, 0)
    try:
        orjson.loads(raw)
    except orjson.JSONDecodeError:
        _assert_bad_outcome(MAL, out)


@st.composite
def hyperliquid_garbage(draw: st.DrawFn) -> bytes:
    raw = draw(st.sampled_from(_hl_samples()))
    kind = draw(st.sampled_from(["prefix", "bytes", "field"]))
    if kind == "prefix":
        return raw[: draw(st.integers(0, len(raw) - 1))]
    if kind == "bytes":
        m = draw(byte_mutation(raw).filter(lambda m: hl_verdict(raw, m) in BAD))
    else:
        m = draw(field_mutation(raw).filter(lambda m: hl_verdict(raw, m) in BAD))
    return m.raw


@settings(FUZZ, max_examples=40)
@given(st.lists(st.tuples(st.integers(0, 54), hyperliquid_garbage()), min_size=1, max_size=20))
def test_hyperliquid_garbage_interleaved_with_the_recording_changes_nothing(
    garbage: list[tuple[int, bytes]],
) -> None:
    at: dict[int, list[bytes]] = {}
    for i, g in garbage:
        at.setdefault(i, []).append(g)
    items: list[tuple[int, bytes, bool]] = []
    for i, (ts, raw) in enumerate(_hl_lines()):
        items += [(ts, g, True) for g in at.get(i, [])]
        items.append((ts, raw, False))
    run = hl_run(items)
    for out in run.outcomes:
        assert (out.books, out.trades, out.marks) == (0, 0, 0)
        assert sum(out.counters.values()) == 1
        assert set(out.counters) <= {schema.C_MALFORMED, schema.C_VENUE_ERRORS}
    clean = _hl_clean()
    assert _bytes(run.sink.books) == _bytes(clean.sink.books)
    assert _bytes(run.sink.trade_batches) == _bytes(clean.sink.trade_batches)


def test_hyperliquid_active_asset_ctx_becomes_a_mark() -> None:
    run = hl_run([(5, CTX_FRAME, True)])
    assert run.outcomes == [Outcome(0, 0, 1, {})]
    m = run.sink.marks[0][0]
    assert int(m["symbol_id"]) == 7 and int(m["flags"]) == 0
    assert int(m["exch_ns"]) == 0 and int(m["recv_ns"]) == 5
    assert float(m["mark_px"]) == 105010.0 and float(m["index_px"]) == 105000.0
    assert float(m["funding_rate"]) == 0.0000125 and int(m["next_funding_ns"]) == 0
    assert float(m["open_interest"]) == 10543.21
    msg = orjson.loads(CTX_FRAME)
    del msg["data"]["ctx"]["oraclePx"], msg["data"]["ctx"]["openInterest"]
    run = hl_run([(5, orjson.dumps(msg), True)])
    m = run.sink.marks[0][0]
    assert math.isnan(float(m["index_px"])) and math.isnan(float(m["open_interest"]))
    for bad in ("0", "-1", "nan", "1e400", 105010.0):
        msg["data"]["ctx"]["markPx"] = bad
        run = hl_run([(5, orjson.dumps(msg), True)])
        assert run.outcomes == [Outcome(0, 0, 0, {schema.C_MALFORMED: 1})], bad
    msg["data"]["ctx"]["markPx"] = "1.0"
    msg["data"]["coin"] = "DOGE"
    run = hl_run([(5, orjson.dumps(msg), True)])
    assert run.outcomes == [Outcome(0, 0, 0, {schema.C_VENUE_ERRORS: 1})]


def test_hyperliquid_recording_books_are_sane() -> None:
    run = _hl_clean()
    assert len(run.sink.books) == 46
    assert int(run.sink.books[0]["flags"][0]) & schema.BOOK_RESYNCED
    assert run.counters[schema.C_TRADES] > 30


# ---------------------------------------------------------------------- fast path vs plain path
WS = st.sampled_from(["", "", "", " ", "\n", "\t", "\r\n", "  "])


@st.composite
def strict_decimal(draw: st.DrawFn) -> str:
    """Inside the scanner's grammar and its ranges: at most 15 significant digits."""
    intpart = draw(st.text("0123456789", min_size=0, max_size=9))
    frac = draw(st.text("0123456789", min_size=0, max_size=15 - len(intpart.lstrip("0"))))
    lead = "0" * draw(st.integers(0, 2))
    if draw(st.booleans()) or not frac:
        return lead + (intpart or "0") + ("." + frac if frac else "")
    return lead + intpart + "." + frac  # ".5" when intpart is empty


@st.composite
def decimal_string(draw: st.DrawFn) -> str:
    """A decimal the plain path takes; some are also inside the scanner's strict grammar."""
    if draw(st.integers(0, 3)) == 0:
        return draw(strict_decimal())
    intpart = draw(st.text("0123456789", min_size=0, max_size=12))
    frac = draw(st.text("0123456789", min_size=0, max_size=12))
    shape = draw(st.sampled_from(["int.frac", "int.frac", "int", "int.", ".frac", "exp"]))
    intpart = intpart or "0"
    if shape == "int":
        return intpart
    if shape == "int.":
        return intpart + "."
    if shape == ".frac":
        return "." + (frac or "5")
    if shape == "exp":
        return f"{intpart}.{frac or '0'}e{draw(st.integers(-12, 8))}"
    return f"{intpart}.{frac or '0'}"


def _strict(s: str) -> bool:
    """Inside the scanner's grammar: digits, one dot not last, <= 15 significant digits."""
    if not re.fullmatch(r"[0-9]*(\.[0-9]+)?", s) or not s.strip("."):
        return False
    digits = s.replace(".", "").lstrip("0")
    frac = len(s.partition(".")[2])
    return len(digits) <= 15 and frac <= 22


def _in_range(px: str, sz: str) -> bool:
    return 0.0 < float(px) < MAX_PX and 0.0 <= float(sz) < MAX_SZ


LEVEL = st.tuples(decimal_string(), decimal_string())
STRICT_LEVEL = st.tuples(strict_decimal().filter(lambda s: float(s) > 0), strict_decimal())
Levels = list[tuple[str, str]]


@st.composite
def depth_message(draw: st.DrawFn) -> tuple[bytes, Levels, Levels, bool]:
    level = draw(st.sampled_from([STRICT_LEVEL, STRICT_LEVEL, LEVEL]))  # mostly fast-path food
    bids = draw(st.lists(level, max_size=12))
    asks = draw(st.lists(level, max_size=12))

    def ws() -> str:
        return draw(WS)

    def levels(lv: list[tuple[str, str]]) -> str:
        inner = ",".join(f'{ws()}[{ws()}"{p}"{ws()},{ws()}"{q}"{ws()}]{ws()}' for p, q in lv)
        return f"[{ws()}{inner}]"

    fields = [
        '"e":"depthUpdate"',
        '"E":1723161256299',
        '"T":1723161256298',
        '"s":"BTCUSDT"',
        '"U":1',
        '"u":2',
        '"pu":0',
        draw(
            st.sampled_from(['"note":"\\"b\\":[[\\"1\\",\\"1\\"]]"', *['"note":"b a [[1]]"'] * 3])
        ),
        '"x":{"b":[["9","9"]],"a":[]}',
        '"y":[{"a":[["8","8"]]}]',
    ]
    fields = draw(st.permutations(fields))
    b_field = f'"b"{ws()}:{ws()}{levels(bids)}'
    fields.insert(draw(st.integers(0, len(fields))), b_field)
    at_b = fields.index(b_field)
    a_at = draw(st.integers(at_b + 1, len(fields)) | st.integers(0, len(fields)))  # b first, mostly
    fields.insert(a_at, f'"a"{ws()}:{ws()}{levels(asks)}')
    b_first = any(f.startswith('"a"') for f in fields[fields.index(b_field) :])
    fields = [f"{ws()}{f}{ws()}" for f in fields]
    data = "{" + ",".join(fields) + "}"
    outer = [f'"stream":{ws()}"btcusdt@depth@0ms"', f'"data":{ws()}{data}']
    if draw(st.booleans()):
        outer.reverse()
    return ("{" + ws() + ",".join(outer) + ws() + "}").encode(), bids, asks, b_first


@FUZZ
@given(depth_message())
def test_fast_path_and_plain_path_give_identical_floats(
    msg: tuple[bytes, Levels, Levels, bool],
) -> None:
    raw, bids, asks, b_first = msg
    doc = orjson.loads(raw)  # the generator writes JSON
    plain = np.zeros(200)
    try:
        k = levels_slow(doc["data"]["b"], plain, 0, MAX_PX, MAX_SZ)
        n_b = k // 2
        k = levels_slow(doc["data"]["a"], plain, k, MAX_PX, MAX_SZ)
        plain_ok = True
    except MalformedMessage:
        plain_ok = False
    fast = np.zeros(200)
    pos = np.zeros(6, np.int64)
    status = scan_levels(raw, 2, fast, pos, MAX_PX, MAX_SZ)
    assert status != SCAN_BAD  # valid JSON is never "cannot be a message"
    b0, b1, a0, a1 = (int(x) for x in pos[:4])
    fast_taken = False
    if status == SCAN_OK:
        blanked = orjson.loads(raw[:b0] + b"[]" + raw[b1:a0] + b"[]" + raw[a1:])
        fast_taken = blanked["data"]["b"] == [] and blanked["data"]["a"] == []
    if fast_taken:
        assert plain_ok
        assert (int(pos[4]), int(pos[5])) == (n_b, k // 2 - n_b)
        assert fast[:k].tobytes() == plain[:k].tobytes()  # bit for bit
    # the fast path is not optional: every level in its grammar and in range means it is taken
    simple = all(_strict(p) and _strict(q) and _in_range(p, q) for p, q in bids + asks)
    if simple and b_first and b"\\" not in raw:  # it declines any escape: one can spell a key
        assert fast_taken, raw


@st.composite
def grid_diff(draw: st.DrawFn) -> tuple[bytes, dict]:
    """A diff on BTCUSDT's 0.1 grid near 1000, its decimals spelled in several legal ways."""

    def spell(n: int, places: int) -> str:
        ip, _, fp = f"{Decimal(n).scaleb(-places):f}".partition(".")
        fp = fp.rstrip("0") if draw(st.booleans()) else fp + "0" * draw(st.integers(0, 4))
        return "0" * draw(st.integers(0, 2)) + ip + ("." + fp if fp else "")

    def level(lo: int, hi: int) -> tuple[str, str]:
        return spell(draw(st.integers(lo, hi)), 1), spell(draw(st.integers(0, 10**6)), 3)

    n_b = draw(st.integers(0, 8))
    n_a = draw(st.integers(0, 8))
    bids = [level(9900, 10000) for _ in range(n_b)]
    asks = [level(10001, 10100) for _ in range(n_a)]
    data = {"e": "depthUpdate", "E": 1723161256299, "T": 1723161256298, "s": "BTCUSDT"}
    data |= {"U": 95, "u": 105, "pu": 90, "b": [list(x) for x in bids]}
    data |= {"a": [list(x) for x in asks]}
    keys = draw(st.permutations(list(data)))
    ws = draw(WS)
    body = ("," + ws).join(f'"{k}":{ws}{orjson.dumps(data[k]).decode()}' for k in keys)
    raw = ('{"stream":"btcusdt@depth@0ms","data":{' + body + "}}").encode()
    return raw, data


def _bn_feed_at_100() -> tuple[BinanceFeed, RecordingSink, list[int]]:
    sink = RecordingSink()
    counters = new_counters()
    snaps = InlineSnapshots()
    ins = {0: Instrument("BTC", 0.1, 0.001, 5.0, venue="binance", venue_symbol="BTCUSDT")}
    feed = BinanceFeed(ins, sink, snaps, counters)
    feed.on_connected(0, 0)
    bids = [[f"{1000 - i / 10:.1f}", "1.000"] for i in range(20)]
    asks = [[f"{1000.1 + i / 10:.1f}", "2.000"] for i in range(20)]
    feed.on_snapshot("BTCUSDT", {"lastUpdateId": 100, "bids": bids, "asks": asks}, 1)
    return feed, sink, counters


def _book_from_plain(data: dict) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    bids = {round(1000 - i / 10, 1): 1.0 for i in range(20)}
    asks = {round(1000.1 + i / 10, 1): 2.0 for i in range(20)}
    for side, key in ((bids, "b"), (asks, "a")):
        for p, q in data[key]:
            if float(q) > 0:
                side[float(p)] = float(q)
            else:
                side.pop(float(p), None)
    return sorted(bids.items(), reverse=True)[:DEPTH], sorted(asks.items())[:DEPTH]


def _published_levels(rec: np.ndarray) -> tuple[list[Any], list[Any]]:
    r = rec[0]
    nb, na = int(r["n_bid"]), int(r["n_ask"])
    bids = list(zip(r["bid_px"][:nb].tolist(), r["bid_sz"][:nb].tolist(), strict=True))
    asks = list(zip(r["ask_px"][:na].tolist(), r["ask_sz"][:na].tolist(), strict=True))
    return bids, asks


@FUZZ
@given(grid_diff())
def test_feed_publishes_what_the_plain_path_reads(diff: tuple[bytes, dict]) -> None:
    raw, _ = diff
    feed, sink, counters = _bn_feed_at_100()
    feed.on_message(0, raw, 5)
    assert counters[schema.C_MALFORMED] == 0
    assert len(sink.books) == 1
    assert _published_levels(sink.books[0]) == _book_from_plain(orjson.loads(raw)["data"])


def test_feed_with_an_escaped_duplicate_key_follows_the_json() -> None:
    """Regression: data with "b" twice, the second spelled "\\u0062". orjson keeps the last
    (no bids); the scanner read the first and the blanked-message check passed, so the feed
    applied bid levels the message does not have."""
    feed, sink, _ = _bn_feed_at_100()
    raw = (
        b'{"stream":"btcusdt@depth@0ms","data":{"e":"depthUpdate","E":1723161256299,'
        b'"T":1723161256298,"s":"BTCUSDT","U":95,"u":105,"pu":90,'
        b'"b":[["1000.0","9.000"]],"\\u0062":[],"a":[]}}'
    )
    data = orjson.loads(raw)["data"]
    assert data["b"] == []  # what the JSON says: no bid changes
    feed.on_message(0, raw, 5)
    assert len(sink.books) == 1
    assert _published_levels(sink.books[0]) == _book_from_plain(data)
