"""``scan_levels`` (the byte scanner of depth level arrays) and ``L2Book`` (the tick-grid book).

The scanner is checked against the plain reading of the same bytes (``orjson`` + ``float()``)
on every diff of the recorded Binance excerpt, on hand-made edge cases, and on inputs it must
decline. What it may never do is return ``SCAN_OK`` with values that differ from the reference
when the caller's own check (blank the arrays, parse the rest, find ``[]``) passes: that is
the one outcome the feed cannot catch.

The book is checked against a plain dict per side over random operation sequences.
"""

from __future__ import annotations

import functools
import heapq
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shm import schema
from stages.venues.book import SCAN_BAD, SCAN_OK, SCAN_SLOW, L2Book, scan_levels, top_view
from stages.venues.replay import read_recording

DATA = Path(__file__).resolve().parent.parent / "data"
BINANCE = DATA / "binance-usdm-btcusdt-20240808-excerpt.jsonl.gz"
DEPTH = schema.BOOK_DEPTH
MAX_PX = 1e9  # scan_levels' default bounds (BinanceFeed's too)
MAX_SZ = 1e12

FUZZ = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


@functools.cache
def _lines() -> tuple[bytes, ...]:
    return tuple(raw for ts, raw in read_recording(BINANCE) if ts >= 0)


@functools.cache
def _diffs() -> tuple[bytes, ...]:
    return tuple(raw for raw in _lines() if b'"depthUpdate"' in raw)


# ---------------------------------------------------------------------- scanner helpers
def _scan(raw: bytes, depth: int = 2, cap: int = 20_000) -> tuple[int, np.ndarray, np.ndarray]:
    out = np.full(cap, -7.0)
    pos = np.full(6, -1, np.int64)
    status = scan_levels(raw, depth, out, pos)
    assert status in (SCAN_OK, SCAN_SLOW, SCAN_BAD)
    return status, out, pos


def _target(doc: Any, depth: int) -> Any:
    """The object the scanner reads at ``depth``: the message itself or its ``data``."""
    return doc if depth == 1 else doc["data"]


def _reference(raw: bytes, depth: int) -> tuple[list[float], int, int] | None:
    """(px/qty floats bids first, n_b, n_a) by orjson + float(); None if not such a message."""
    try:
        obj = _target(orjson.loads(raw), depth)
        vals: list[float] = []
        counts = []
        for key in ("b", "a"):
            levels = obj[key]
            if type(levels) is not list:
                return None
            for lv in levels:
                if type(lv) is not list or len(lv) != 2:
                    return None
                if not all(type(s) is str for s in lv):
                    return None
                vals += [float(lv[0]), float(lv[1])]
            counts.append(len(levels))
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, IndexError):
        return None
    return vals, counts[0], counts[1]


def _caller_check_passes(raw: bytes, pos: np.ndarray, depth: int) -> bool:
    """The feed's proof step: blank both arrays, parse the rest, find [] under b and a."""
    b0, b1, a0, a1 = (int(x) for x in pos[:4])
    blanked = raw[:b0] + b"[]" + raw[b1:a0] + b"[]" + raw[a1:]
    try:
        obj = _target(orjson.loads(blanked), depth)
        return bool(obj["b"] == [] and obj["a"] == [])
    except (orjson.JSONDecodeError, KeyError, TypeError, IndexError):
        return False


def _bits(vals: Any) -> bytes:
    return np.asarray(vals, dtype=np.float64).tobytes()


def _assert_in_range(out: np.ndarray, pos: np.ndarray) -> None:
    """SCAN_OK promises 0 < price < max_px and 0 <= size < max_sz (the defaults here)."""
    v = out[: 2 * int(pos[4] + pos[5])]
    assert np.all((v[0::2] > 0.0) & (v[0::2] < MAX_PX))
    assert np.all((v[1::2] >= 0.0) & (v[1::2] < MAX_SZ))


def _assert_no_wrong_ok(raw: bytes, depth: int = 2) -> int:
    """Scan; if SCAN_OK passes the caller's check, the values must be the reference's."""
    status, out, pos = _scan(raw, depth)
    if status == SCAN_OK:
        _assert_in_range(out, pos)
    if status == SCAN_OK and _caller_check_passes(raw, pos, depth):
        ref = _reference(raw, depth)
        assert ref is not None, raw
        vals, n_b, n_a = ref
        assert (int(pos[4]), int(pos[5])) == (n_b, n_a), raw
        assert _bits(out[: 2 * (n_b + n_a)]) == _bits(vals), raw
    return status


def _assert_ok(raw: bytes, depth: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """The scanner must take this message, and agree with the reference bit for bit."""
    status, out, pos = _scan(raw, depth)
    assert status == SCAN_OK, raw
    _assert_in_range(out, pos)
    assert _caller_check_passes(raw, pos, depth), raw
    ref = _reference(raw, depth)
    assert ref is not None
    vals, n_b, n_a = ref
    assert (int(pos[4]), int(pos[5])) == (n_b, n_a)
    assert _bits(out[: 2 * (n_b + n_a)]) == _bits(vals)
    obj = _target(orjson.loads(raw), depth)
    # the reported spans are exactly the two arrays
    assert orjson.loads(raw[pos[0] : pos[1]]) == obj["b"]
    assert orjson.loads(raw[pos[2] : pos[3]]) == obj["a"]
    return out, pos


def _msg(body: str) -> bytes:
    """A combined-stream message around a data object given as text."""
    return ('{"stream":"btcusdt@depth@0ms","data":' + body + "}").encode()


# ---------------------------------------------------------------------- scanner: recorded data
def test_excerpt_is_what_the_readme_says() -> None:
    assert len(_lines()) == 6000
    assert len(_diffs()) == 489


def test_scanner_agrees_with_orjson_on_every_recorded_diff() -> None:
    total = 0
    for raw in _diffs():
        _, pos = _assert_ok(raw)
        total += int(pos[4] + pos[5])
    assert total > 489 * 20  # real diffs, not empty ones


def test_scanner_declines_the_other_recorded_messages() -> None:
    for raw in _lines():
        if b'"depthUpdate"' in raw:
            continue
        # bookTicker has string "b"/"a", trades have neither, the snapshot has bids/asks
        assert _scan(raw, 2)[0] == SCAN_SLOW, raw
        assert _scan(raw, 1)[0] == SCAN_SLOW, raw


# ---------------------------------------------------------------------- scanner: edge cases
ACCEPT = {
    "whitespace": _msg(
        ' {\n\t"e" : "depthUpdate" ,\r\n "b" :\t[ [ "1.5" ,\n"2" ] ,[\t"1.4","0.000"\r] ] ,'
        ' "a" : [ ]\n} '
    ),
    "both_empty": _msg('{"e":"depthUpdate","u":1,"b":[],"a":[]}'),
    "empty_with_spaces": _msg('{"b":[ \n ],"a":[\t]}'),
    "string_values_b_and_a": _msg('{"k":"b","l":"a","b":[["1","1"]],"m":["a","b"],"a":[]}'),
    "keys_in_other_orders": (
        b'{"data":{"b":[["61800.10","0.5"]],"a":[["61800.20","0.25"]],"e":"depthUpdate",'
        b'"s":"BTCUSDT","U":1,"u":2,"pu":0},"stream":"btcusdt@depth"}'
    ),
    "nested_objects_with_their_own_b": _msg(
        '{"x":{"b":[["7","7"]],"a":[["8","8"]]},"b":[["1.25","3"]],'
        '"y":[{"b":[["9","9"]]},{"a":"zz"}],"a":[["2","0.5"]],"z":{"a":{"b":[]}}}'
    ),
    "outer_keys_named_b_and_a": (
        b'{"b":[["5","5"]],"data":{"b":[["1","2"]],"a":[["3","4"]]},"a":{"x":{"b":1}}}'
    ),
    "number_shapes": _msg(
        '{"b":[["0.001","000.5"],[".5","0"],["123456789.012345","0.000000000000000000001"],'
        '["12345678.1234567","99999999999.9999"],["61800.20","0.000"]],'
        '"a":[["0.1","0.2"],["0.3","1000000"],["999999999","900719925474.099"]]}'
    ),
    "unicode_elsewhere": _msg('{"s":"ü€😀","b":[["1","1"]],"a":[["2","2"]]}'),
}


@pytest.mark.parametrize("raw", ACCEPT.values(), ids=ACCEPT.keys())
def test_scanner_takes_well_formed_edge_cases(raw: bytes) -> None:
    _assert_ok(raw)


# strings with escapes: the scanner may read these or decline them (it declines any escape:
# one can spell a key), but a `"b":[` inside a string must never be taken for the key
ACCEPT_OR_DECLINE = {
    "escaped_quotes_and_fake_key_in_string": _msg(
        '{"e":"depthUpdate","note":"he said \\"b\\":[[\\"9\\",\\"9\\"]] and \\\\",'
        '"b":[["100.5","1"]],"x":"\\"a\\":[","a":[["100.6","2.25"]]}'
    ),
    "escaped_backslash_before_quote": _msg('{"s":"BTC\\\\","b":[["1","1"]],"t":"\\\\","a":[]}'),
    "escaped_unicode_in_value": _msg('{"s":"\\u0042TC","b":[["1","1"]],"a":[["2","2"]]}'),
}


@pytest.mark.parametrize("raw", ACCEPT_OR_DECLINE.values(), ids=ACCEPT_OR_DECLINE.keys())
def test_scanner_is_not_fooled_by_escaped_strings(raw: bytes) -> None:
    orjson.loads(raw)  # valid JSON
    assert _assert_no_wrong_ok(raw) in (SCAN_OK, SCAN_SLOW)


def test_scanner_reads_a_raw_message_at_depth_one() -> None:
    raw = b'{"e":"depthUpdate","U":1,"u":2,"b":[["1.5","2"]],"a":[["1.6","3"],["1.7","0"]]}'
    out, _ = _assert_ok(raw, depth=1)
    assert out[:6].tolist() == [1.5, 2.0, 1.6, 3.0, 1.7, 0.0]
    assert _scan(raw, 2)[0] == SCAN_SLOW  # nothing at depth 2
    wrapped = _msg(raw.decode())
    assert _scan(wrapped, 1)[0] == SCAN_SLOW  # nothing named b/a at depth 1
    _assert_ok(wrapped, depth=2)


def test_scanner_reports_the_array_spans() -> None:
    raw = _msg('{"e":"x","b":[["1","2"]], "a" : [["3","4"],["5","6"]]}')
    _, pos = _assert_ok(raw)
    assert raw[pos[0] : pos[1]] == b'[["1","2"]]'
    assert raw[pos[2] : pos[3]] == b'[["3","4"],["5","6"]]'
    assert pos[4:].tolist() == [1, 2]


def test_many_levels_and_exact_capacity() -> None:
    bids = ",".join(f'["{60000 - i / 10:.2f}","{i / 1000:.3f}"]' for i in range(1000))
    asks = ",".join(f'["{60001 + i / 10:.2f}","{(i + 1) / 7:.6f}"]' for i in range(1000))
    raw = _msg(f'{{"b":[{bids}],"a":[{asks}]}}')
    _assert_ok(raw)
    # exactly enough room: fine; one pair short: declined without writing past the end
    for cap, expect in ((4000, SCAN_OK), (3998, SCAN_SLOW), (0, SCAN_SLOW)):
        big = np.full(cap + 16, -3.0)
        out = big[:cap]
        pos = np.zeros(6, np.int64)
        assert scan_levels(raw, 2, out, pos) == expect
        assert (big[cap:] == -3.0).all()


def test_scanner_declines_levels_out_of_range() -> None:
    ok = _msg('{"b":[["999999999.9","999999999999.9"]],"a":[["0.00001","0"]]}')
    _assert_ok(ok)
    for b, a in (
        ('["0","1"]', '["1","1"]'),  # a price must be > 0
        ('["0.000","1"]', '["1","1"]'),
        ('["1000000000","1"]', '["1","1"]'),  # price >= max_px
        ('["1","1"]', '["1","1000000000000"]'),  # size >= max_sz
    ):
        raw = _msg(f'{{"b":[{b}],"a":[{a}]}}')
        assert _assert_no_wrong_ok(raw) == SCAN_SLOW, raw
    # explicit bounds are honoured
    raw = _msg('{"b":[["100.5","2"]],"a":[["100.6","3"]]}')
    out, pos = np.zeros(8), np.zeros(6, np.int64)
    assert scan_levels(raw, 2, out, pos, 200.0, 10.0) == SCAN_OK
    assert scan_levels(raw, 2, out, pos, 100.6, 10.0) == SCAN_SLOW
    assert scan_levels(raw, 2, out, pos, 200.0, 3.0) == SCAN_SLOW


def test_scanner_reads_bytearray_and_memoryview_alike() -> None:
    raw = _diffs()[3]
    status, out, pos = _scan(raw)
    for other in (bytearray(raw), memoryview(raw)):
        out2, pos2 = np.full(20_000, -7.0), np.full(6, -1, np.int64)
        assert scan_levels(other, 2, out2, pos2) == status == SCAN_OK  # type: ignore[arg-type]
        assert pos2.tolist() == pos.tolist()
        assert _bits(out2) == _bits(out)


DECLINE = {
    "minus": _msg('{"b":[["-1.0","1"]],"a":[]}'),
    "plus": _msg('{"b":[["+1.0","1"]],"a":[]}'),
    "minus_zero_size": _msg('{"b":[["1.0","-0"]],"a":[]}'),
    "exponent": _msg('{"b":[["1e5","1"]],"a":[]}'),
    "exponent_upper": _msg('{"b":[["1.0","2E-3"]],"a":[]}'),
    "sixteen_digits": _msg('{"b":[["1234567890123456","1"]],"a":[]}'),
    "sixteen_digits_frac": _msg('{"b":[["1","0.1234567890123456"]],"a":[]}'),
    "sixteen_digits_trailing_zero": _msg('{"b":[["1","1.000000000000000"]],"a":[]}'),
    "too_many_decimals": _msg('{"b":[["1","0.00000000000000000000001"]],"a":[]}'),
    "trailing_dot": _msg('{"b":[["1.","1"]],"a":[]}'),
    "lone_dot": _msg('{"b":[[".","1"]],"a":[]}'),
    "two_dots": _msg('{"b":[["1.2.3","1"]],"a":[]}'),
    "empty_string": _msg('{"b":[["","1"]],"a":[]}'),
    "space_in_string": _msg('{"b":[[" 1","1"]],"a":[]}'),
    "underscore": _msg('{"b":[["1_0","1"]],"a":[]}'),
    "nan": _msg('{"b":[["NaN","1"]],"a":[]}'),
    "infinity": _msg('{"b":[["1","Infinity"]],"a":[]}'),
    "hex": _msg('{"b":[["0x10","1"]],"a":[]}'),
    "escaped_digit": _msg('{"b":[["\\u0031","1"]],"a":[]}'),
    "arabic_digit": _msg('{"b":[["١","1"]],"a":[]}'),
    "number_not_string": _msg('{"b":[[1.5,"1"]],"a":[]}'),
    "null": _msg('{"b":[[null,"1"]],"a":[]}'),
    "bool": _msg('{"b":[["1",true]],"a":[]}'),
    "nested_list": _msg('{"b":[[["1"],"1"]],"a":[]}'),
    "three_items": _msg('{"b":[["1","1","1"]],"a":[]}'),
    "one_item": _msg('{"b":[["1"]],"a":[]}'),
    "empty_level": _msg('{"b":[[]],"a":[]}'),
    "level_is_object": _msg('{"b":[{"p":"1"}],"a":[]}'),
    "levels_not_a_list": _msg('{"b":"1","a":[]}'),
    "levels_null": _msg('{"b":null,"a":[]}'),
    "trailing_comma": _msg('{"b":[["1","1"],],"a":[]}'),
    "duplicate_b": _msg('{"b":[["1","1"]],"a":[],"b":[["2","2"]]}'),
    "duplicate_a": _msg('{"b":[],"a":[["1","1"]],"a":[]}'),
    "a_before_b": _msg('{"a":[["2","2"]],"b":[["1","1"]]}'),
    "missing_a": _msg('{"b":[["1","1"]]}'),
    "missing_b": _msg('{"a":[["1","1"]]}'),
    "unbalanced_close": _msg('{"b":[],"a":[]}}'),
    "unbalanced_open": _msg('{"b":[],"a":[]'),
    "unterminated_string": b'{"data":{"b":[],"a":[],"s":"abc}}',
    "empty": b"",
    "not_json": b"depthUpdate",
}


@pytest.mark.parametrize("raw", DECLINE.values(), ids=DECLINE.keys())
def test_scanner_declines_what_it_does_not_parse_exactly(raw: bytes) -> None:
    status = _assert_no_wrong_ok(raw)
    assert status in (SCAN_SLOW, SCAN_BAD)
    try:
        orjson.loads(raw)
    except orjson.JSONDecodeError:
        return
    assert status == SCAN_SLOW  # valid JSON is never called "cannot be a message"


def test_truncations_at_every_byte_never_ok() -> None:
    diffs = _diffs()
    samples = [min(diffs, key=len), diffs[100], max(diffs, key=len)]
    for raw in samples:
        assert _scan(raw)[0] == SCAN_OK
        for cut in range(len(raw)):
            status = _assert_no_wrong_ok(raw[:cut])
            # a strict prefix of an object is unbalanced: the scanner must notice
            assert status != SCAN_OK, (cut, raw[:cut][-40:])


def test_truncated_then_closed_is_never_a_wrong_ok() -> None:
    raw = _diffs()[7]
    for cut in range(0, len(raw), 3):
        for tail in (b"]]}}", b'"]]}}', b'"]],"a":[]}}', b"}}", b"]}}"):
            _assert_no_wrong_ok(raw[:cut] + tail)


@FUZZ
@given(
    st.sampled_from(range(489)),
    st.lists(
        st.tuples(st.integers(0, 10**6), st.sampled_from(b'0123456789."[],:{} \\ae-+\x00\xff')),
        min_size=1,
        max_size=4,
    ),
)
def test_byte_substitutions_never_give_a_wrong_ok(idx: int, edits: list[tuple[int, int]]) -> None:
    buf = bytearray(_diffs()[idx])
    for at, byte in edits:
        buf[at % len(buf)] = byte
    _assert_no_wrong_ok(bytes(buf))


def test_escaped_duplicate_key_is_not_a_wrong_ok() -> None:
    """Regression: keys compared as raw bytes missed '"\\u0062"', a second "b" to orjson (the
    last one wins), so SCAN_OK passed the blank-and-parse check with levels the message did
    not have."""
    raw = _msg('{"e":"depthUpdate","b":[["100.0","9.0"]],"\\u0062":[],"a":[]}')
    assert orjson.loads(raw)["data"]["b"] == []  # what the message says
    _assert_no_wrong_ok(raw)


# ---------------------------------------------------------------------- L2Book helpers
Levels = list[tuple[float, float]]


class RefBook:
    """A plain dict per side: the reference for L2Book."""

    def __init__(self) -> None:
        self.bids: dict[float, float] = {}
        self.asks: dict[float, float] = {}

    def apply(self, bids: Levels, asks: Levels) -> None:
        for side, levels in ((self.bids, bids), (self.asks, asks)):
            for px, sz in levels:
                if sz > 0.0:
                    side[px] = sz
                else:
                    side.pop(px, None)

    def levels(self) -> tuple[Levels, Levels]:
        return sorted(self.bids.items(), reverse=True), sorted(self.asks.items())

    def top(self) -> np.ndarray:
        out = np.zeros((4, DEPTH))
        bids = heapq.nlargest(DEPTH, self.bids.items())
        asks = heapq.nsmallest(DEPTH, self.asks.items())
        for i, (px, sz) in enumerate(bids):
            out[0, i], out[1, i] = px, sz
        for i, (px, sz) in enumerate(asks):
            out[2, i], out[3, i] = px, sz
        return out


def _vals(bids: Levels, asks: Levels) -> np.ndarray:
    return np.array([x for lv in [*bids, *asks] for x in lv] or [0.0], dtype=np.float64)


def _apply(book: L2Book, bids: Levels, asks: Levels) -> np.ndarray:
    top = np.full((4, DEPTH), -1.0)
    book.apply(_vals(bids, asks), len(bids), len(asks), top)
    return top


def _assert_same(book: L2Book, ref: RefBook, top: np.ndarray) -> None:
    np.testing.assert_array_equal(top, ref.top())
    bids, asks = book.levels()
    rb, ra = ref.levels()
    assert bids == rb
    assert asks == ra
    assert (book.n_bid, book.n_ask) == (len(rb), len(ra))
    best = book.best()
    assert best[:2] == (rb[0] if rb else (0.0, 0.0))
    assert best[2:] == (ra[0] if ra else (0.0, 0.0))


def _px(n: int, tick: str) -> float:
    """The venue's float of tick number ``n``: float() of its decimal string."""
    return float(Decimal(n) * Decimal(tick))


TICKS = ["0.1", "0.01", "0.5", "0.25", "0.00001", "1", "5"]
WINDOW = 1024  # edge = 128: prices within +-190 ticks of any first price never re-centre
BAND = 190
SIZES = st.one_of(
    st.just(0.0),
    st.integers(1, 10**7).map(lambda k: float(Decimal(k) / 1000)),
)
OP = st.tuples(st.integers(-BAND, BAND), SIZES)
MESSAGE = st.tuples(
    st.lists(OP, max_size=8),
    st.lists(OP, max_size=8),
    st.lists(st.tuples(st.integers(2_000, 10**6), st.booleans(), SIZES), max_size=2),
)


# ---------------------------------------------------------------------- L2Book vs the reference
@FUZZ
@given(
    st.sampled_from(TICKS),
    st.integers(2 * 10**6, 10**8),
    st.lists(MESSAGE, min_size=1, max_size=40),
)
def test_book_matches_reference_over_random_operations(
    tick: str, center: int, messages: list[tuple[Any, Any, Any]]
) -> None:
    book = L2Book(float(tick), window=WINDOW)
    ref = RefBook()
    expect_dropped = 0
    for bid_ops, ask_ops, far in messages:
        bids = [(_px(center + off, tick), sz) for off, sz in bid_ops]
        asks = [(_px(center + off, tick), sz) for off, sz in ask_ops]
        ref.apply(bids, asks)
        # levels far outside the window: dropped, counted if they carry size. They go after
        # an in-window level, since an empty book centres itself on the first price it sees.
        for off, up, sz in far:
            px = _px(center + off if up else center - off, tick)
            if bids:
                bids.append((px, sz))
            elif asks:
                asks.append((px, sz))
            else:
                continue
            expect_dropped += sz > 0.0
        top = _apply(book, bids, asks)
        _assert_same(book, ref, top)
        assert book.dropped == expect_dropped
        assert book.off_tick == 0


def test_deleting_absent_levels_is_harmless() -> None:
    book = L2Book(0.1)
    ref = RefBook()
    start = [(100.0, 1.0), (99.9, 2.0)], [(100.1, 3.0)]
    ref.apply(*start)
    _apply(book, *start)
    for _ in range(3):
        ops = [(99.8, 0.0), (100.0, 0.0), (100.0, 0.0)], [(100.2, 0.0), (100.3, 0.0)]
        ref.apply(*ops)
        top = _apply(book, *ops)
        _assert_same(book, ref, top)
    assert (book.n_bid, book.n_ask, book.dropped) == (1, 1, 0)
    top = _apply(book, [(99.9, 0.0)], [(100.1, 0.0)])  # now empty
    assert not top.any() and book.best() == (0.0, 0.0, 0.0, 0.0)
    top = _apply(book, [(99.9, 0.0)], [])  # deleting from an empty book
    assert not top.any() and (book.n_bid, book.n_ask) == (0, 0)


def test_prices_far_outside_the_window_are_dropped_and_counted() -> None:
    book = L2Book(0.1, window=1 << 12)  # +-204.8 around the first price
    ref = RefBook()
    near = [(1000.0, 1.0), (999.9, 2.0)], [(1000.1, 1.5)]
    ref.apply(*near)
    _apply(book, *near)
    far = [(1000.0, 3.0), (1.0, 5.0), (500.0, 0.0)], [(5000.0, 2.0), (1000.2, 4.0)]
    ref.apply([(1000.0, 3.0)], [(1000.2, 4.0)])
    top = _apply(book, *far)
    _assert_same(book, ref, top)
    assert book.dropped == 2  # 1.0 and 5000.0; the far delete is not counted
    # the far levels never appear, even after the near ones go
    top = _apply(book, [(1000.0, 0.0), (999.9, 0.0)], [(1000.1, 0.0)])
    ref.apply([(1000.0, 0.0), (999.9, 0.0)], [(1000.1, 0.0)])
    _assert_same(book, ref, top)


def test_off_tick_prices_are_counted_and_ignored() -> None:
    book = L2Book(0.1)
    top = _apply(book, [(100.0, 1.0), (100.05, 2.0)], [(100.1, 1.0), (100.12, 1.0)])
    assert book.off_tick == 2
    assert book.levels() == ([(100.0, 1.0)], [(100.1, 1.0)])
    assert top[0, :2].tolist() == [100.0, 0.0]


@settings(max_examples=10, deadline=None, database=None)
@given(
    st.sampled_from([1, -1]),
    st.lists(st.integers(8, 16), min_size=150, max_size=150),
    st.lists(st.integers(1, 5000), min_size=50, max_size=50),
)
def test_recentering_follows_a_drifting_touch(
    direction: int, steps: list[int], sizes: list[int]
) -> None:
    """Both sides near the touch; the touch walks one way across several windows."""
    tick = "0.1"
    book = L2Book(0.1, window=WINDOW)
    ref = RefBook()
    t = 5_000_000
    for k, step in enumerate(steps):
        t += direction * step
        bids = [(_px(t - 1 - i, tick), sizes[(k + i) % 50] / 1000) for i in range(25)]
        asks = [(_px(t + 1 + i, tick), sizes[(k + 2 * i) % 50] / 1000) for i in range(25)]
        # the levels the move crossed go away
        bids = [(px, 0.0) for px in ref.bids if px >= _px(t, tick)] + bids
        asks = [(px, 0.0) for px in ref.asks if px <= _px(t, tick)] + asks
        ref.apply(bids, asks)
        top = _apply(book, bids, asks)
        np.testing.assert_array_equal(top, ref.top())
        # everything the book keeps is right; what it lost, it counted
        rb, ra = ref.bids, ref.asks
        bids_now, asks_now = book.levels()
        assert book.best() == (*max(rb.items()), *min(ra.items()))
        assert all(rb.get(px) == sz for px, sz in bids_now)
        assert all(ra.get(px) == sz for px, sz in asks_now)
        assert len(rb) + len(ra) - len(bids_now) - len(asks_now) == book.dropped
        # the touch region is whole: the 25 levels each side just written are all there
        assert bids_now[:25] == heapq.nlargest(25, rb.items())
        assert asks_now[:25] == heapq.nsmallest(25, ra.items())
    assert abs(t - 5_000_000) > WINDOW  # more than a window away from the start
    assert book.dropped > 0  # the far side of the walk was let go, and counted


@pytest.mark.parametrize(
    ("side", "direction"),
    [
        ("bids", 1),
        ("asks", -1),
        ("bids", -1),
        ("asks", 1),
    ],
)
def test_one_sided_book_follows_its_touch(side: str, direction: int) -> None:
    """Regression for the last two cases: the window re-centred only when the best bid neared
    the top edge or the best ask the bottom one, so a one-sided book whose touch moved the
    other way lost the levels just behind its touch."""
    book = L2Book(1.0, window=256)
    ref = RefBook()
    sign = -1 if side == "bids" else 1  # deeper levels: lower bids, higher asks
    levels = [(1000.0 + sign * i, 1.0) for i in range(5)]
    ref.apply(*((levels, []) if side == "bids" else ([], levels)))
    _apply(book, *((levels, []) if side == "bids" else ([], levels)))
    for _ in range(400):
        book_side = ref.bids if side == "bids" else ref.asks
        touch = max(book_side) if side == "bids" else min(book_side)
        deepest = min(book_side) if side == "bids" else max(book_side)
        if direction == sign:  # the touch moves toward the deep side: remove it, add deeper
            ops = [(touch, 0.0), (deepest + sign, 1.0)]
        else:  # the touch moves away from the deep side: add a better level, remove deepest
            ops = [(touch - sign, 1.0), (deepest, 0.0)]
        pair = (ops, []) if side == "bids" else ([], ops)
        ref.apply(*pair)
        top = _apply(book, *pair)
        _assert_same(book, ref, top)
    assert book.dropped == 0


def test_load_replaces_the_book() -> None:
    book = L2Book(0.1)
    _apply(book, [(100.0, 1.0), (99.0, 2.0)], [(101.0, 3.0)])
    # a snapshot far away: everything old goes, everything new is kept
    snap_b = [((500_000 - i) / 10, 1.0 + i) for i in range(30)]
    snap_a = [((500_001 + i) / 10, 2.0 + i) for i in range(25)]
    top = np.zeros((4, DEPTH))
    book.load(_vals(snap_b, snap_a), len(snap_b), len(snap_a), top)
    ref = RefBook()
    ref.apply(snap_b, snap_a)
    _assert_same(book, ref, top)
    assert book.dropped == 0
    book.load(_vals([], []), 0, 0, top)
    assert not top.any() and book.levels() == ([], []) and (book.n_bid, book.n_ask) == (0, 0)
    top = _apply(book, [(7.5, 1.0)], [])
    assert book.levels() == ([(7.5, 1.0)], []) and top[0, 0] == 7.5


def test_clear_and_constructor_checks() -> None:
    book = L2Book(0.01)
    _apply(book, [(1.0, 1.0)], [(1.01, 1.0)])
    book.clear()
    assert book.levels() == ([], []) and book.best() == (0.0, 0.0, 0.0, 0.0)
    for bad in (0.0, -0.1, float("nan")):
        with pytest.raises(ValueError):
            L2Book(bad)
    with pytest.raises(ValueError):
        L2Book(0.1, window=63)


def test_top_view_is_the_records_level_arrays() -> None:
    books = np.zeros(3, schema.BOOK)
    view = top_view(books, 1)
    assert view.shape == (4, DEPTH) and np.shares_memory(view, books)
    book = L2Book(0.1)
    bids = [((1000 - i) / 10, 1.0 + i) for i in range(25)]
    asks = [((1001 + i) / 10, 2.0 + i) for i in range(3)]
    book.apply(_vals(bids, asks), len(bids), len(asks), view)
    rec = books[1]
    assert rec["bid_px"].tolist() == [px for px, _ in bids[:DEPTH]]
    assert rec["bid_sz"].tolist() == [sz for _, sz in bids[:DEPTH]]
    assert rec["ask_px"].tolist() == [px for px, _ in asks] + [0.0] * (DEPTH - 3)
    assert rec["ask_sz"][:3].tolist() == [2.0, 3.0, 4.0]
    assert not books[0]["bid_px"].any() and not books[2]["ask_sz"].any()
