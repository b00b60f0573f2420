"""HyperliquidParser on every frame of a real recording, on hand-written bad frames, and fuzzed.

The recording (tests/data, copied from a live BTC session on 2025-01-26) pins the wire format;
the malformed cases pin the contract that matters on the hot path: never raise, count it,
and never leave a half-written book behind.
"""

from __future__ import annotations

import gzip
import math
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shm import schema
from stages.venues.hyperliquid import PING, HyperliquidParser, subscribe_messages

DATA = Path(__file__).resolve().parent.parent / "data" / "hyperliquid-btc-20250126.jsonl.gz"
BTC = 7
SYMBOLS = {"BTC": BTC, "ETH": 9}
INGEST_SENTINEL = 123_456_789

FUZZ = settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def _recorded() -> list[tuple[int, bytes]]:
    out = []
    for line in gzip.decompress(DATA.read_bytes()).splitlines():
        recv, _, raw = line.partition(b" ")
        out.append((int(recv), raw))
    return out


RECORDED = _recorded()
BOOK_FRAMES = [raw for _, raw in RECORDED if orjson.loads(raw)["channel"] == "l2Book"]
TRADE_FRAMES = [raw for _, raw in RECORDED if orjson.loads(raw)["channel"] == "trades"]


def _arrays() -> tuple[np.ndarray, np.ndarray]:
    books = np.zeros(1, schema.BOOK)
    books["ingest_ns"] = INGEST_SENTINEL
    trades = np.zeros(256, schema.TRADE)
    return books, trades


def _counters(p: HyperliquidParser) -> dict[str, int]:
    names = ("malformed", "duplicates", "unknown_symbol", "errors_from_venue", "pongs")
    return {n: getattr(p, n) for n in (*names, "subscription_acks", "ignored")}


def _check_book_invariants(rec: np.void) -> None:
    nb, na = int(rec["n_bid"]), int(rec["n_ask"])
    assert 0 <= nb <= schema.BOOK_DEPTH and 0 <= na <= schema.BOOK_DEPTH
    bp, bs, ap, as_ = rec["bid_px"], rec["bid_sz"], rec["ask_px"], rec["ask_sz"]
    assert np.all(np.isfinite(bp)) and np.all(np.isfinite(ap))
    assert np.all(np.diff(bp[:nb]) < 0) and np.all(np.diff(ap[:na]) > 0)
    assert np.all(bp[:nb] > 0) and np.all(bs[:nb] > 0) and np.all(ap[:na] > 0)
    assert np.all(as_[:na] > 0)
    for arr, n in ((bp, nb), (bs, nb), (ap, na), (as_, na)):
        assert np.all(arr[n:] == 0.0)
    assert int(rec["flags"]) & schema.BOOK_SNAPSHOT
    crossed = nb > 0 and na > 0 and bp[0] >= ap[0]
    assert bool(int(rec["flags"]) & schema.BOOK_CROSSED) == crossed
    assert int(rec["ingest_ns"]) == INGEST_SENTINEL


# ---------------------------------------------------------------------- recorded data
def test_recording_is_present_and_mixed() -> None:
    assert len(RECORDED) == 55
    assert len(BOOK_FRAMES) > 40 and len(TRADE_FRAMES) > 5


def test_every_recorded_frame_parses() -> None:
    p = HyperliquidParser(symbol_ids=SYMBOLS)
    books, trades = _arrays()
    seen_keys: set[tuple[int, str, int]] = set()
    n_trades_total = 0
    for recv_ns, raw in RECORDED:
        msg = orjson.loads(raw)
        nb, nt = p.parse(raw, recv_ns, books, trades)
        if msg["channel"] == "l2Book":
            assert (nb, nt) == (1, 0)
            data = msg["data"]
            rec = books[0]
            _check_book_invariants(rec)
            assert int(rec["symbol_id"]) == BTC
            assert int(rec["seq"]) == data["time"]
            assert int(rec["exch_ns"]) == data["time"] * 1_000_000
            assert int(rec["recv_ns"]) == recv_ns
            assert int(rec["flags"]) == schema.BOOK_SNAPSHOT  # the live book is not crossed
            bids, asks = data["levels"]
            assert int(rec["n_bid"]) == len(bids) == 20 and int(rec["n_ask"]) == len(asks) == 20
            assert rec["bid_px"].tolist() == [float(lv["px"]) for lv in bids]
            assert rec["bid_sz"].tolist() == [float(lv["sz"]) for lv in bids]
            assert rec["ask_px"].tolist() == [float(lv["px"]) for lv in asks]
            assert rec["ask_sz"].tolist() == [float(lv["sz"]) for lv in asks]
            assert rec["bid_px"][0] < rec["ask_px"][0]
        else:
            fresh = []
            for tr in msg["data"]:
                key = (tr["time"], tr["coin"], tr["tid"])
                if key not in seen_keys:
                    seen_keys.add(key)
                    fresh.append(tr)
            assert (nb, nt) == (0, len(fresh))
            n_trades_total += nt
            for rec, tr in zip(trades[:nt], fresh, strict=True):
                assert int(rec["symbol_id"]) == BTC
                assert int(rec["side"]) == (schema.SIDE_BUY if tr["side"] == "B" else -1)
                assert int(rec["trade_id"]) == tr["tid"]
                assert float(rec["px"]) == float(tr["px"])
                assert float(rec["sz"]) == float(tr["sz"])
                assert int(rec["exch_ns"]) == tr["time"] * 1_000_000
                assert int(rec["recv_ns"]) == recv_ns
    assert n_trades_total == len(seen_keys) > 30
    assert p.malformed == 0 and p.unknown_symbol == 0


def test_same_trades_frame_twice_counts_duplicates() -> None:
    p = HyperliquidParser(symbol_ids=SYMBOLS)
    books, trades = _arrays()
    raw = max(TRADE_FRAMES, key=len)
    n = len(orjson.loads(raw)["data"])
    assert p.parse(raw, 1, books, trades) == (0, n)
    before = trades.tobytes()
    assert p.parse(raw, 2, books, trades) == (0, 0)
    assert p.duplicates == n
    assert trades.tobytes() == before
    assert p.malformed == 0


def test_duplicate_inside_one_frame_and_bounded_window() -> None:
    p = HyperliquidParser(symbol_ids=SYMBOLS, dedup_window=3)
    books, trades = _arrays()

    def frame(*tids: int) -> bytes:
        data = [
            {"coin": "BTC", "side": "A", "px": "100.5", "sz": "0.1", "time": 1_700_000, "tid": t}
            for t in tids
        ]
        return orjson.dumps({"channel": "trades", "data": data})

    assert p.parse(frame(1, 1, 2), 0, books, trades) == (0, 2)
    assert p.duplicates == 1
    assert p.parse(frame(3, 4), 0, books, trades) == (0, 2)  # window of 3 forgets tid 1
    assert p.parse(frame(1), 0, books, trades) == (0, 1)
    assert p.parse(frame(4), 0, books, trades) == (0, 0)
    assert p.duplicates == 2
    assert trades["side"][0] == schema.SIDE_SELL


def test_trades_that_do_not_fit_are_counted_not_lost_from_dedup() -> None:
    p = HyperliquidParser(symbol_ids=SYMBOLS)
    books = np.zeros(1, schema.BOOK)
    small = np.zeros(2, schema.TRADE)
    data = [
        {"coin": "BTC", "side": "B", "px": "1.5", "sz": "2", "time": 5, "tid": t} for t in range(5)
    ]
    raw = orjson.dumps({"channel": "trades", "data": data})
    assert p.parse(raw, 0, books, small) == (0, 2)
    assert p.trades_overflow == 3
    assert p.parse(raw, 0, books, small) == (0, 2)  # the 3 that did not fit come next time
    assert small["trade_id"].tolist() == [2, 3]


# ---------------------------------------------------------------------- control frames
@pytest.mark.parametrize(
    ("raw", "counter"),
    [
        (
            b'{"channel":"subscriptionResponse","data":{"method":"subscribe",'
            b'"subscription":{"type":"l2Book","coin":"BTC"}}}',
            "subscription_acks",
        ),
        (b'{"channel":"pong"}', "pongs"),
        (b'{"channel":"error","data":"Invalid subscription"}', "errors_from_venue"),
        (
            b'{"channel":"l2Book","data":{"coin":"DOGE","time":1,"levels":[[],[]]}}',
            "unknown_symbol",
        ),
        (
            b'{"channel":"trades","data":[{"coin":"DOGE","side":"B","px":"1","sz":"1",'
            b'"time":1,"tid":1}]}',
            "unknown_symbol",
        ),
        (b'{"channel":"notification","data":{"notification":"hi"}}', "ignored"),
    ],
)
def test_control_frames_are_recognised_not_malformed(raw: bytes, counter: str) -> None:
    p = HyperliquidParser(symbol_ids=SYMBOLS)
    books, trades = _arrays()
    before = books.tobytes()
    assert p.parse(raw, 0, books, trades) == (0, 0)
    assert p.parse(raw.decode(), 0, books, trades) == (0, 0)  # str input works too
    counts = _counters(p)
    assert counts.pop(counter) == 2
    assert all(v == 0 for v in counts.values()), counts
    assert books.tobytes() == before


def test_error_text_is_kept() -> None:
    p = HyperliquidParser(symbol_ids=SYMBOLS)
    books, trades = _arrays()
    p.parse(b'{"channel":"error","data":"Unknown coin XYZ"}', 0, books, trades)
    assert "XYZ" in p.last_error


def test_crossed_and_short_books() -> None:
    p = HyperliquidParser(symbol_ids=SYMBOLS)
    books, trades = _arrays()
    assert p.parse(BOOK_FRAMES[0], 0, books, trades) == (1, 0)
    crossed = {
        "channel": "l2Book",
        "data": {
            "coin": "ETH",
            "time": 1_737_918_843_542,
            "levels": [
                [{"n": 1, "px": "3501.5", "sz": "2.0"}, {"n": 2, "px": "3500.0", "sz": "1"}],
                [{"n": 1, "px": "3501.0", "sz": "0.5"}],
            ],
        },
    }
    assert p.parse(orjson.dumps(crossed), 5, books, trades) == (1, 0)
    rec = books[0]
    _check_book_invariants(rec)
    assert int(rec["flags"]) == schema.BOOK_SNAPSHOT | schema.BOOK_CROSSED
    assert int(rec["symbol_id"]) == 9 and int(rec["n_bid"]) == 2 and int(rec["n_ask"]) == 1
    assert rec["bid_px"][:3].tolist() == [3501.5, 3500.0, 0.0]  # stale levels cleared
    assert rec["ask_sz"][:2].tolist() == [0.5, 0.0]
    empty = {"channel": "l2Book", "data": {"coin": "BTC", "time": 9, "levels": [[], []]}}
    assert p.parse(orjson.dumps(empty), 6, books, trades) == (1, 0)
    assert int(books[0]["n_bid"]) == 0 and not books[0]["bid_px"].any()
    assert int(books[0]["flags"]) == schema.BOOK_SNAPSHOT


def test_more_than_depth_levels_are_truncated() -> None:
    p = HyperliquidParser(symbol_ids=SYMBOLS)
    books, trades = _arrays()
    bids = [{"n": 1, "px": f"{1000 - i}.0", "sz": "1.0"} for i in range(30)]
    asks = [{"n": 1, "px": f"{1001 + i}.0", "sz": "1.0"} for i in range(25)]
    raw = orjson.dumps(
        {"channel": "l2Book", "data": {"coin": "BTC", "time": 1, "levels": [bids, asks]}}
    )
    assert p.parse(raw, 0, books, trades) == (1, 0)
    assert int(books[0]["n_bid"]) == 20 and books[0]["bid_px"][-1] == 981.0


def test_writes_only_row_zero_of_a_view() -> None:
    big = np.zeros(4, schema.BOOK)
    big["ingest_ns"] = INGEST_SENTINEL
    p = HyperliquidParser(symbol_ids=SYMBOLS)
    trades = np.zeros(4, schema.TRADE)
    for target in (1, 2):  # a different output array rebinds the cached view
        assert p.parse(BOOK_FRAMES[0], 42, big[target:], trades) == (1, 0)
    assert [int(r) for r in big["recv_ns"]] == [0, 42, 42, 0]
    assert (big["ingest_ns"] == INGEST_SENTINEL).all()
    with pytest.raises(ValueError):
        p.parse(BOOK_FRAMES[0], 0, np.zeros(1, schema.TRADE), trades)


def test_subscribe_messages_and_ping() -> None:
    msgs = [orjson.loads(m) for m in subscribe_messages(["BTC", "ETH"])]
    assert msgs == [
        {"method": "subscribe", "subscription": {"type": t, "coin": c}}
        for c in ("BTC", "ETH")
        for t in ("l2Book", "trades", "activeAssetCtx")
    ]
    plain = [orjson.loads(m) for m in subscribe_messages(["BTC"], ctx=False)]
    assert [m["subscription"]["type"] for m in plain] == ["l2Book", "trades"]
    assert orjson.loads(PING) == {"method": "ping"}


# ---------------------------------------------------------------------- malformed frames
def _book(**over: Any) -> bytes:
    data: dict[str, Any] = {
        "coin": "BTC",
        "time": 1_737_918_843_542,
        "levels": [
            [{"n": 1, "px": "100.0", "sz": "1.5"}, {"n": 1, "px": "99.0", "sz": "2"}],
            [{"n": 1, "px": "101.0", "sz": "1.5"}, {"n": 1, "px": "102.0", "sz": "2"}],
        ],
    }
    data.update(over)
    return orjson.dumps({"channel": "l2Book", "data": data})


def _book_level(side: int, idx: int, **over: Any) -> bytes:
    msg = orjson.loads(_book())
    msg["data"]["levels"][side][idx].update(over)
    return orjson.dumps(msg)


def _trade(**over: Any) -> bytes:
    tr: dict[str, Any] = {"coin": "BTC", "side": "B", "px": "100.0", "sz": "0.5", "time": 5}
    tr["tid"] = 77
    tr.update(over)
    return orjson.dumps({"channel": "trades", "data": [tr]})


def _without(key: str) -> bytes:
    msg = orjson.loads(_trade())
    del msg["data"][0][key]
    return orjson.dumps(msg)


MALFORMED: list[bytes | str] = [
    b"",
    b"{",
    b"[]",
    b"null",
    b"123",
    b'"l2Book"',
    b"\xff\xfe\x00garbage",
    "{\ud800}",
    b'{"data":{}}',
    b'{"channel":null}',
    b'{"channel":["l2Book"]}',
    b'{"channel":"l2Book"}',
    b'{"channel":"l2Book","data":null}',
    b'{"channel":"l2Book","data":[]}',
    b'{"channel":"l2Book","data":{"coin":"BTC","time":1}}',
    _book(coin=None),
    _book(coin=1),
    _book(coin=["BTC"]),
    _book(time="1737918843542"),
    _book(time=-1),
    _book(time=0),
    _book(time=1.5),
    _book(time=True),
    _book(time=10**16),
    _book(levels=None),
    _book(levels=[[]]),
    _book(levels=[[], [], []]),
    _book(levels={"bids": [], "asks": []}),
    _book(levels="ab"),
    _book(levels=[["x"], []]),
    _book(levels=[[None], []]),
    _book(levels=[[[100, 1]], []]),
    _book(levels=[[{"px": "100.0"}], []]),
    _book_level(0, 0, px=100.0),
    _book_level(0, 0, px=None),
    _book_level(0, 0, px="abc"),
    _book_level(0, 0, px="nan"),
    _book_level(0, 0, px="NaN"),
    _book_level(0, 0, px="inf"),
    _book_level(0, 0, px="Infinity"),
    _book_level(0, 0, px="-100.0"),
    _book_level(0, 1, px="0"),
    _book_level(0, 0, px="1e20"),
    _book_level(0, 0, px="true"),
    _book_level(0, 0, px=""),
    _book_level(0, 0, px="1,2"),
    _book_level(0, 0, px="[1"),
    _book_level(0, 1, px="2]"),
    _book_level(0, 0, px='"100"'),
    _book_level(0, 0, px="0x10"),
    _book_level(0, 0, sz="0"),
    _book_level(0, 1, sz="-0.5"),
    _book_level(1, 0, sz="1e400"),
    _book_level(1, 1, sz="1e300"),
    _book_level(1, 1, sz="null"),
    _book_level(1, 0, sz=1.5),
    _book_level(0, 0, px="98.0"),  # bids not descending
    _book_level(0, 1, px="100.0"),  # duplicate bid price
    _book_level(1, 1, px="100.5"),  # asks not ascending
    b'{"channel":"trades","data":null}',
    b'{"channel":"trades","data":{"coin":"BTC"}}',
    b'{"channel":"trades","data":["x"]}',
    _trade(side="X"),
    _trade(side=1),
    _trade(px=100.0),
    _trade(px="abc"),
    _trade(px="-1"),
    _trade(sz="nan"),
    _trade(sz="0"),
    _trade(sz="1e400"),
    _trade(time="5"),
    _trade(time=-5),
    _trade(tid="77"),
    _trade(tid=-1),
    _trade(tid=1.0),
    _trade(coin=None),
    _without("tid"),
    _without("time"),
    _without("side"),
]


@pytest.mark.parametrize("raw", MALFORMED, ids=[repr(m)[:60] for m in MALFORMED])
def test_malformed_is_counted_and_leaves_records_untouched(raw: bytes | str) -> None:
    p = HyperliquidParser(symbol_ids=SYMBOLS)
    books, trades = _arrays()
    assert p.parse(BOOK_FRAMES[0], 1, books, trades) == (1, 0)
    good_books, good_trades = books.tobytes(), trades.tobytes()
    assert p.parse(raw, 2, books, trades) == (0, 0)
    counts = _counters(p)
    assert counts.pop("malformed") == 1, counts
    assert all(v == 0 for v in counts.values()), counts
    assert books.tobytes() == good_books
    assert trades.tobytes() == good_trades


def test_a_bad_trade_rejects_its_whole_frame() -> None:
    p = HyperliquidParser(symbol_ids=SYMBOLS)
    books, trades = _arrays()
    msg = orjson.loads(_trade())
    msg["data"].append({**msg["data"][0], "tid": 78, "sz": "x"})
    assert p.parse(orjson.dumps(msg), 0, books, trades) == (0, 0)
    assert p.malformed == 1
    assert p.parse(_trade(), 0, books, trades) == (0, 1)  # the good trade was not marked seen


def test_truncations_of_every_recorded_frame() -> None:
    p = HyperliquidParser(symbol_ids=SYMBOLS)
    books, trades = _arrays()
    assert p.parse(BOOK_FRAMES[0], 1, books, trades) == (1, 0)
    good = books.tobytes()
    n = 0
    for _, raw in RECORDED:
        for cut in range(0, len(raw), 97):
            assert p.parse(raw[:cut], 2, books, trades) == (0, 0)
            n += 1
    assert p.malformed == n
    assert books.tobytes() == good


# ---------------------------------------------------------------------- fuzzing
def _assert_sane_outcome(
    p: HyperliquidParser, raw: bytes | str, books: np.ndarray, trades: np.ndarray
) -> int:
    """Parse; check the outcome is all-or-nothing; return how many counters moved."""
    before = books.tobytes()
    before_counts = sum(_counters(p).values())
    nb, nt = p.parse(raw, 3, books, trades)
    assert nb in (0, 1) and 0 <= nt <= len(trades)
    if nb:
        _check_book_invariants(books[0])
    else:
        assert books.tobytes() == before
    if nt:
        assert np.all(np.isin(trades["side"][:nt], [schema.SIDE_BUY, schema.SIDE_SELL]))
        assert np.all(trades["px"][:nt] > 0) and np.all(np.isfinite(trades["sz"][:nt]))
    return sum(_counters(p).values()) - before_counts


@FUZZ
@given(st.binary(max_size=400))
def test_fuzz_random_bytes(raw: bytes) -> None:
    p = HyperliquidParser(symbol_ids=SYMBOLS)
    books, trades = _arrays()
    assert _assert_sane_outcome(p, raw, books, trades) == 1  # random bytes: always counted


@FUZZ
@given(st.sampled_from(RECORDED), st.integers(0, 10**6), st.binary(min_size=1, max_size=8))
def test_fuzz_byte_mutations_of_real_frames(rec: tuple[int, bytes], pos: int, junk: bytes) -> None:
    _, raw = rec
    i = pos % len(raw)
    mutated = raw[:i] + junk + raw[i + len(junk) :]
    p = HyperliquidParser(symbol_ids=SYMBOLS)
    books, trades = _arrays()
    _assert_sane_outcome(p, mutated, books, trades)


JSON_LEAF = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
    st.sampled_from(["nan", "inf", "-1", "0", "1e400", "1,2", "[1", "true", "", "105055.0"]),
)
JSON_ANY = st.recursive(
    JSON_LEAF,
    lambda kids: (
        st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=5), kids, max_size=3)
    ),
    max_leaves=6,
)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


@FUZZ
@given(st.sampled_from(RECORDED[:3] + RECORDED[12:14]), st.data())
def test_fuzz_wrong_types_anywhere(rec: tuple[int, bytes], data: st.DataObject) -> None:
    msg = orjson.loads(rec[1])
    paths = [p for p in _paths(msg) if p]
    path = data.draw(st.sampled_from(paths))
    value = data.draw(JSON_ANY)
    node = msg
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    p = HyperliquidParser(symbol_ids=SYMBOLS)
    books, trades = _arrays()
    _assert_sane_outcome(p, orjson.dumps(msg), books, trades)


def test_values_are_exact_decimal_conversions() -> None:
    # orjson's number parsing and float() must agree on the venue's decimal strings
    p = HyperliquidParser(symbol_ids=SYMBOLS)
    books, trades = _arrays()
    strings = ["0.00001", "0.1", "0.35123", "3500.1", "105055.0", "1e-5", "123456789.123456789"]
    for s in strings:
        raw = _book_level(1, 1, sz=s)
        assert p.parse(raw, 0, books, trades) == (1, 0)
        assert books[0]["ask_sz"][1] == float(s)
        assert not math.isnan(books[0]["ask_sz"][1])
