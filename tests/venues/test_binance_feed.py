"""BinanceFeed: the venue's local-book procedure step by step, and a replay of the real excerpt.

The synthetic tests drive the feed with diffs built around a hand-made snapshot and check every
published record against a plain dict book; the replay checks the recorded BTCUSDT excerpt
end to end, including the venue's own best bid/offer at every update id a diff and a
``bookTicker`` share (computed here from the recording, not taken from the feed's counters).
"""

from __future__ import annotations

import functools
import heapq
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np
import orjson
import pytest

from shm import schema
from stages.instruments import Instrument
from stages.venues.binance import SNAPSHOT_RETRY_NS, BinanceFeed
from stages.venues.feed import RecordingSink, new_counters
from stages.venues.replay import (
    InlineSnapshots,
    detect_venue,
    infer_instruments,
    make_feed,
    read_recording,
    replay,
)

DATA = Path(__file__).resolve().parent.parent / "data"
EXCERPT = DATA / "binance-usdm-btcusdt-20240808-excerpt.jsonl.gz"
DEPTH = schema.BOOK_DEPTH
SYM = "BTCUSDT"
SID = 3
T_MS = 1_723_161_256_000
BTC = Instrument("BTC", 0.1, 0.001, 5.0, venue="binance", venue_symbol=SYM)
ETH = Instrument("ETH", 0.01, 0.001, 5.0, venue="binance", venue_symbol="ETHUSDT")

Level = tuple[str, str]


# ---------------------------------------------------------------------- rig
@dataclass
class FakeSnapshots:
    requests: list[str] = field(default_factory=list)
    ready: list[tuple[str, Any, int]] = field(default_factory=list)

    def request(self, venue_symbol: str) -> None:
        self.requests.append(venue_symbol)

    def poll(self) -> list[tuple[str, Any, int]]:
        out, self.ready = self.ready, []
        return out


@dataclass
class Rig:
    feed: BinanceFeed
    sink: RecordingSink
    counters: list[int]
    snaps: FakeSnapshots

    def send(self, raw: bytes, recv_ns: int = 1_000) -> None:
        self.feed.on_message(0, raw, recv_ns)

    def count(self, slot: int) -> int:
        return self.counters[slot]

    def others_zero(self, *allowed: int) -> None:
        """Every counter the feed may touch is zero except ``allowed`` (and books/trades)."""
        for slot in (
            schema.C_MALFORMED,
            schema.C_GAPS,
            schema.C_RESYNCS,
            schema.C_DUPLICATES,
            schema.C_VENUE_ERRORS,
            schema.C_STALE,
            schema.C_CROSSED,
        ):
            if slot not in allowed:
                assert self.counters[slot] == 0, slot


def rig(instruments: dict[int, Instrument] | None = None, **kw: Any) -> Rig:
    sink = RecordingSink()
    counters = new_counters()
    snaps = FakeSnapshots()
    feed = BinanceFeed(instruments or {SID: BTC}, sink, snaps, counters, **kw)
    return Rig(feed, sink, counters, snaps)


def diff(
    first: int,
    last: int,
    prev: int,
    bids: list[Level] | None = None,
    asks: list[Level] | None = None,
    *,
    sym: str = SYM,
    t_ms: int | None = None,
) -> bytes:
    data = {
        "e": "depthUpdate",
        "E": (t_ms or T_MS + last) + 1,
        "T": t_ms or T_MS + last,
        "s": sym,
        "U": first,
        "u": last,
        "pu": prev,
        "b": [list(lv) for lv in bids or []],
        "a": [list(lv) for lv in asks or []],
    }
    return orjson.dumps({"stream": f"{sym.lower()}@depth@0ms", "data": data})


def ticker(u: int, b: str, bq: str, a: str, aq: str, sym: str = SYM) -> bytes:
    data = {"e": "bookTicker", "u": u, "s": sym, "b": b, "B": bq, "a": a, "A": aq}
    data |= {"T": T_MS, "E": T_MS}
    return orjson.dumps({"stream": f"{sym.lower()}@bookTicker", "data": data})


SNAP_BIDS = [(f"{1000 - i / 10:.1f}", f"{1 + i}.000") for i in range(25)]
SNAP_ASKS = [(f"{1000.1 + i / 10:.1f}", f"{2 + i}.500") for i in range(25)]


def snapshot(last_id: int, bids: list[Level] = SNAP_BIDS, asks: list[Level] = SNAP_ASKS) -> dict:
    return {
        "lastUpdateId": last_id,
        "E": T_MS,
        "T": T_MS,
        "bids": [list(lv) for lv in bids],
        "asks": [list(lv) for lv in asks],
    }


class Ref:
    """The book as plain dicts: what every published record must show."""

    def __init__(self, doc: dict) -> None:
        self.bids = {float(p): float(q) for p, q in doc["bids"] if float(q) > 0}
        self.asks = {float(p): float(q) for p, q in doc["asks"] if float(q) > 0}

    def apply(self, raw: bytes) -> Ref:
        return self.apply_data(orjson.loads(raw)["data"])

    def apply_data(self, data: dict) -> Ref:
        for side, levels in ((self.bids, data["b"]), (self.asks, data["a"])):
            for p, q in levels:
                if float(q) > 0:
                    side[float(p)] = float(q)
                else:
                    side.pop(float(p), None)
        return self

    def tob(self) -> tuple[float, float, float, float]:
        (bp, bq), (ap, aq) = max(self.bids.items()), min(self.asks.items())
        return bp, bq, ap, aq

    def check(self, rec: np.ndarray) -> None:
        rec = rec[0] if rec.shape else rec
        bids = heapq.nlargest(DEPTH, self.bids.items())
        asks = heapq.nsmallest(DEPTH, self.asks.items())
        assert int(rec["n_bid"]) == len(bids) and int(rec["n_ask"]) == len(asks)
        for px, sz, levels in (("bid_px", "bid_sz", bids), ("ask_px", "ask_sz", asks)):
            want_px = [p for p, _ in levels] + [0.0] * (DEPTH - len(levels))
            want_sz = [q for _, q in levels] + [0.0] * (DEPTH - len(levels))
            assert rec[px].tolist() == want_px
            assert rec[sz].tolist() == want_sz


def _flags(rec: np.ndarray) -> int:
    return int(rec["flags"][0])


def _seq(rec: np.ndarray) -> int:
    return int(rec["seq"][0])


def live(first_diff: bytes, last_id: int = 100) -> tuple[Rig, Ref]:
    """A rig that is LIVE: snapshot ``last_id``, then ``first_diff`` (which must straddle it)."""
    r = rig()
    r.feed.on_connected(0, 0)
    r.feed.on_connected(1, 0)
    doc = snapshot(last_id)
    r.feed.on_snapshot(SYM, doc, 500)
    r.send(first_diff)
    assert len(r.sink.books) == 1
    ref = Ref(doc).apply(first_diff)
    ref.check(r.sink.books[-1])
    return r, ref


# ---------------------------------------------------------------------- the procedure
def test_diffs_before_the_snapshot_are_buffered_and_nothing_is_published() -> None:
    r = rig()
    r.feed.on_connected(1, 0)
    assert r.snaps.requests == []  # the market connection has no books
    r.feed.on_connected(0, 0)
    assert r.snaps.requests == [SYM]
    for k in range(5):
        r.send(diff(10 * k + 1, 10 * k + 10, 10 * k, [("1000.0", "9.0")]))
    assert r.sink.books == [] and r.sink.trade_batches == [] and r.sink.marks == []
    assert r.snaps.requests == [SYM]  # one request, not one per diff
    assert r.count(schema.C_SNAPSHOTS) == 0
    r.others_zero()


def test_snapshot_drops_older_diffs_and_starts_at_the_straddling_one() -> None:
    r = rig()
    r.feed.on_connected(0, 0)
    d1 = diff(81, 90, 80, [("1000.0", "55.000")], [("1000.1", "0")])  # u < lastUpdateId
    d2 = diff(91, 101, 90, [("999.9", "66.000")])  # u < lastUpdateId, just
    d3 = diff(102, 104, 101, [("1000.0", "7.000"), ("999.5", "0")], [("1000.2", "0.001")])
    d4 = diff(105, 110, 104, [("1000.1", "1.500")], [("1000.1", "0")])  # moves the touch
    for k, d in enumerate((d1, d2, d3, d4)):
        r.send(d, 100 + k)
    doc = snapshot(102)
    r.feed.on_snapshot(SYM, doc, 200)
    assert len(r.sink.books) == 1  # the buffered diffs make one book: the latest
    rec = r.sink.books[0]
    Ref(doc).apply(d3).apply(d4).check(rec)
    assert _seq(rec) == 110 and _flags(rec) == schema.BOOK_RESYNCED  # first book after a sync
    assert int(rec["exch_ns"][0]) == (T_MS + 110) * 1_000_000 and int(rec["recv_ns"][0]) == 103
    assert r.count(schema.C_SNAPSHOTS) == 1
    r.others_zero()
    d5 = diff(111, 115, 110, [("1000.1", "0.5")], [("1000.5", "3")])
    r.send(d5, 300)
    assert len(r.sink.books) == 2
    Ref(doc).apply(d3).apply(d4).apply(d5).check(r.sink.books[1])
    assert _flags(r.sink.books[1]) == 0 and _seq(r.sink.books[1]) == 115
    r.others_zero()


@pytest.mark.parametrize("first", [95, 100])
def test_a_diff_ending_at_last_update_id_straddles_it(first: int) -> None:
    r = rig()
    r.feed.on_connected(0, 0)
    old = diff(first - 10, first - 1, first - 11, [("1000.0", "42")])
    edge = diff(first, 100, first - 1, [("999.9", "3.25")])
    r.send(old)
    r.send(edge)
    doc = snapshot(100)
    r.feed.on_snapshot(SYM, doc, 200)
    assert [_seq(b) for b in r.sink.books] == [100]
    Ref(doc).apply(edge).check(r.sink.books[0])


def test_snapshot_older_than_every_buffered_diff_is_asked_for_again() -> None:
    r = rig()
    r.feed.on_connected(0, 0)
    d1 = diff(200, 210, 199, [("1000.0", "5")])
    d2 = diff(211, 220, 210, [("999.9", "6")])
    r.send(d1, 10)
    r.send(d2, 20)
    r.snaps.ready.append((SYM, snapshot(150), 1_000))
    r.feed.poll(1_000)
    assert r.sink.books == []  # nothing is published from a snapshot older than the stream
    assert r.snaps.requests == [SYM]  # not at once: after the retry delay
    r.feed.poll(1_000 + SNAPSHOT_RETRY_NS - 1)
    assert r.snaps.requests == [SYM]
    r.feed.poll(1_000 + SNAPSHOT_RETRY_NS)
    assert r.snaps.requests == [SYM, SYM]
    r.feed.poll(1_000 + 2 * SNAPSHOT_RETRY_NS)
    assert r.snaps.requests == [SYM, SYM]  # one pending request at a time
    # the new snapshot straddles the first buffered diff: both diffs apply
    doc = snapshot(205)
    r.snaps.ready.append((SYM, doc, 2_000_000_000))
    r.feed.poll(2_000_000_000)
    assert [_seq(b) for b in r.sink.books] == [220]
    Ref(doc).apply(d1).apply(d2).check(r.sink.books[0])
    assert r.count(schema.C_RESYNCS) == 0  # the first sync is not a resync
    r.others_zero()


def test_after_a_too_old_snapshot_a_later_diff_also_asks_again() -> None:
    r = rig()
    r.feed.on_connected(0, 0)
    r.send(diff(200, 210, 199), 10)
    r.feed.on_snapshot(SYM, snapshot(150), 1_000)
    r.send(diff(211, 220, 210), 1_000 + SNAPSHOT_RETRY_NS - 1)
    assert r.snaps.requests == [SYM]
    r.send(diff(221, 230, 220), 1_000 + SNAPSHOT_RETRY_NS)
    assert r.snaps.requests == [SYM, SYM]
    assert r.sink.books == []


def test_snapshot_with_nothing_buffered_waits_for_a_straddling_diff() -> None:
    r = rig()
    r.feed.on_connected(0, 0)
    doc = snapshot(100)
    r.snaps.ready.append((SYM, doc, 50))
    r.feed.poll(60)
    assert r.sink.books == []
    r.send(diff(90, 98, 89, [("1000.0", "77")]))  # older than the snapshot: dropped
    r.send(diff(90, 99, 98, [("1000.0", "78")]))
    assert r.sink.books == []
    straddle = diff(99, 105, 99, [("999.8", "0")], [("1000.1", "9")])
    r.send(straddle)
    assert [_seq(b) for b in r.sink.books] == [105]
    assert _flags(r.sink.books[0]) == schema.BOOK_RESYNCED
    ref = Ref(doc).apply(straddle)
    ref.check(r.sink.books[0])
    nxt = diff(106, 107, 105, [("1000.0", "0")])
    r.send(nxt)
    ref.apply(nxt).check(r.sink.books[1])
    assert _flags(r.sink.books[1]) == 0
    assert r.snaps.requests == [SYM]
    r.others_zero()


def test_a_waiting_snapshot_that_the_stream_has_passed_is_asked_for_again() -> None:
    r = rig()
    r.feed.on_connected(0, 0)
    r.feed.on_snapshot(SYM, snapshot(100), 50)
    r.send(diff(150, 160, 149, [("1000.0", "77")]), 70)
    assert r.sink.books == []
    assert r.snaps.requests == [SYM, SYM]
    doc = snapshot(155)
    r.feed.on_snapshot(SYM, doc, 80)  # the diff that showed the gap was kept
    assert [_seq(b) for b in r.sink.books] == [160]
    Ref(doc).apply(diff(150, 160, 149, [("1000.0", "77")])).check(r.sink.books[0])


def test_gap_publishes_stale_asks_again_and_resyncs() -> None:
    r, ref = live(diff(95, 105, 90, [("1000.0", "3")]))
    good = diff(106, 110, 105, [("999.9", "0")], [("1000.1", "1.25")])
    r.send(good, 2_000)
    ref.apply(good).check(r.sink.books[-1])
    assert _flags(r.sink.books[-1]) == 0
    # pu 115 != 110: updates 111..115 were lost
    gapped = diff(116, 120, 115, [("999.7", "4")], [("1000.3", "0")])
    r.send(gapped, 3_000)
    assert r.count(schema.C_GAPS) == 1
    assert r.snaps.requests == [SYM, SYM]
    stale = r.sink.books[-1]
    assert len(r.sink.books) == 3
    assert _flags(stale) & schema.BOOK_STALE
    assert _seq(stale) == 110 and int(stale["recv_ns"][0]) == 3_000
    ref.check(stale)  # the last good book, as it was: the gapped diff is not in it
    assert r.count(schema.C_STALE) == 1
    # the stream goes on while the snapshot is fetched: nothing is published
    after = diff(121, 125, 120, [("1000.0", "0")], [("1000.2", "8")])
    r.send(after, 4_000)
    assert len(r.sink.books) == 3
    assert r.count(schema.C_RESYNCS) == 0  # counted when the new snapshot lands
    bids2 = [(f"{1000 - i / 10:.1f}", "2.000") for i in range(22)]
    asks2 = [(f"{1000.1 + i / 10:.1f}", "3.000") for i in range(22)]
    doc2 = snapshot(118, bids2, asks2)
    r.feed.on_snapshot(SYM, doc2, 5_000)
    assert r.count(schema.C_RESYNCS) == 1
    rec = r.sink.books[-1]
    assert len(r.sink.books) == 4 and _seq(rec) == 125
    assert _flags(rec) == schema.BOOK_RESYNCED
    ref2 = Ref(doc2).apply(gapped).apply(after)
    ref2.check(rec)
    more = diff(126, 126, 125, [("999.0", "1")])
    r.send(more, 6_000)
    ref2.apply(more).check(r.sink.books[-1])
    assert _flags(r.sink.books[-1]) == 0
    assert r.count(schema.C_GAPS) == 1 and r.count(schema.C_RESYNCS) == 1
    r.others_zero(schema.C_GAPS, schema.C_RESYNCS, schema.C_STALE)


def test_replayed_old_diffs_are_duplicates_not_gaps() -> None:
    d1 = diff(95, 105, 90, [("1000.0", "3")])
    d2 = diff(106, 110, 105, [("999.9", "0")])
    d3 = diff(111, 112, 110, [("1000.1", "0")], [("1000.1", "0")])
    r, ref = live(d1)
    r.send(d2)
    r.send(d3)
    ref.apply(d2).apply(d3)
    n = len(r.sink.books)
    for old in (d2, d1, d3):
        r.send(old)
    assert len(r.sink.books) == n
    assert r.count(schema.C_DUPLICATES) == 3
    assert r.count(schema.C_GAPS) == 0 and r.snaps.requests == [SYM]
    d4 = diff(113, 120, 112, [("1000.0", "1")])
    r.send(d4)
    ref.apply(d4).check(r.sink.books[-1])
    assert _seq(r.sink.books[-1]) == 120
    r.others_zero(schema.C_DUPLICATES)


def test_a_diff_received_twice_while_buffering_is_a_duplicate_not_a_gap() -> None:
    """Regression: on_snapshot checked the buffered pu chain without the LIVE duplicate rule,
    so a diff received twice while waiting for the snapshot was a gap and a resync."""
    r = rig()
    r.feed.on_connected(0, 0)
    d1 = diff(95, 105, 90, [("1000.0", "7")])
    d2 = diff(106, 110, 105, [("1000.0", "8")])
    for d in (d1, d1, d2):
        r.send(d)
    doc = snapshot(100)
    r.feed.on_snapshot(SYM, doc, 200)
    assert r.count(schema.C_GAPS) == 0 and r.count(schema.C_DUPLICATES) == 1
    assert [_seq(b) for b in r.sink.books] == [110]
    Ref(doc).apply(d1).apply(d2).check(r.sink.books[0])
    assert r.snaps.requests == [SYM]


def test_book_ticker_that_agrees_is_counted() -> None:
    d = diff(95, 105, 90, [("1000.0", "3")])
    r, ref = live(d)
    bp, bq, ap, aq = ref.tob()
    r.send(ticker(105, f"{bp:.1f}", f"{bq}", f"{ap:.1f}", f"{aq}"))
    assert (r.feed.tob_checks, r.feed.tob_mismatches) == (1, 0)
    # ticker first, then the diff with the same id
    d2 = diff(106, 107, 105, [], [("1000.1", "0.75")])
    ref.apply(d2)
    bp, bq, ap, aq = ref.tob()
    r.send(ticker(107, f"{bp:.1f}", f"{bq}", f"{ap:.1f}", f"{aq}"))
    r.send(d2)
    assert (r.feed.tob_checks, r.feed.tob_mismatches) == (2, 0)
    # a ticker with an id no diff had is not a check
    r.send(ticker(106, "1.0", "1", "2.0", "1"))
    assert r.feed.tob_checks == 2
    assert r.snaps.requests == [SYM]
    r.others_zero()


@pytest.mark.parametrize("ticker_first", [False, True])
def test_book_ticker_that_disagrees_triggers_a_resync(ticker_first: bool) -> None:
    r, ref = live(diff(95, 105, 90, [("1000.0", "3")]))
    d2 = diff(106, 107, 105, [("999.9", "0.5")])
    ref.apply(d2)
    bp, bq, ap, aq = ref.tob()
    wrong = ticker(107, f"{bp:.1f}", f"{bq + 1}", f"{ap:.1f}", f"{aq}")
    for raw in (wrong, d2) if ticker_first else (d2, wrong):
        r.send(raw, 2_000)
    assert (r.feed.tob_checks, r.feed.tob_mismatches) == (1, 1)
    assert r.snaps.requests == [SYM, SYM]
    assert _flags(r.sink.books[-1]) & schema.BOOK_STALE
    ref.check(r.sink.books[-1])
    n = len(r.sink.books)
    r.send(diff(108, 109, 107, [("999.0", "1")]), 3_000)
    assert len(r.sink.books) == n  # not live until the new snapshot
    doc = snapshot(108)
    r.feed.on_snapshot(SYM, doc, 4_000)
    assert r.count(schema.C_RESYNCS) == 1
    assert _flags(r.sink.books[-1]) == schema.BOOK_RESYNCED
    Ref(doc).apply(diff(108, 109, 107, [("999.0", "1")])).check(r.sink.books[-1])


def _trade(
    tid: int, px: str, qty: str, maker: bool, *, agg: bool = False, t_ms: int = T_MS
) -> bytes:
    e = "aggTrade" if agg else "trade"
    data: dict[str, Any] = {"e": e, "E": t_ms + 1, "T": t_ms, "s": SYM, "p": px, "q": qty}
    data["a" if agg else "t"] = tid
    data["m"] = maker
    stream = f"{SYM.lower()}@{e}"
    return orjson.dumps({"stream": stream, "data": data})


def test_trades_become_records_and_are_deduplicated_by_id() -> None:
    r = rig()
    r.send(_trade(10, "61800.30", "0.006", True), 77)
    assert len(r.sink.trade_batches) == 1
    tr = r.sink.trade_batches[0]
    assert len(tr) == 1
    assert int(tr["symbol_id"][0]) == SID
    assert int(tr["side"][0]) == schema.SIDE_SELL  # buyer was the maker: a seller hit the bid
    assert int(tr["trade_id"][0]) == 10
    assert int(tr["exch_ns"][0]) == T_MS * 1_000_000 and int(tr["recv_ns"][0]) == 77
    assert float(tr["px"][0]) == 61800.3 and float(tr["sz"][0]) == 0.006
    r.send(_trade(10, "61800.30", "0.006", True))
    r.send(_trade(9, "61800.30", "0.006", True))
    assert len(r.sink.trade_batches) == 1
    assert r.count(schema.C_DUPLICATES) == 2
    r.send(_trade(11, "61800.40", "1.5", False))
    assert int(r.sink.trade_batches[-1]["side"][0]) == schema.SIDE_BUY
    r.send(_trade(12, "61800.50", "2", False, agg=True))  # aggTrade: the id is "a"
    assert [int(b["trade_id"][0]) for b in r.sink.trade_batches] == [10, 11, 12]
    assert r.count(schema.C_TRADES) == 3
    r.others_zero(schema.C_DUPLICATES)


def _mark(**over: Any) -> bytes:
    data: dict[str, Any] = {
        "e": "markPriceUpdate",
        "E": T_MS,
        "s": SYM,
        "p": "61800.12345678",
        "i": "61795.10000000",
        "P": "61790.0",
        "r": "0.00010000",
        "T": 1_723_190_400_000,
    }
    data.update(over)
    data = {k: v for k, v in data.items() if v is not None}
    return orjson.dumps({"stream": f"{SYM.lower()}@markPrice@1s", "data": data})


def test_mark_price_update_becomes_a_mark_record() -> None:
    r = rig()
    r.send(_mark(), 99)
    assert len(r.sink.marks) == 1
    m = r.sink.marks[0][0]
    assert int(m["symbol_id"]) == SID and int(m["flags"]) == 0
    assert int(m["exch_ns"]) == T_MS * 1_000_000 and int(m["recv_ns"]) == 99
    assert float(m["mark_px"]) == 61800.12345678
    assert float(m["index_px"]) == 61795.1
    assert float(m["funding_rate"]) == 0.0001
    assert int(m["next_funding_ns"]) == 1_723_190_400_000 * 1_000_000
    assert math.isnan(float(m["open_interest"]))
    r.send(_mark(i=None, r="", T=None))
    m = r.sink.marks[1][0]
    assert math.isnan(float(m["index_px"]))
    assert float(m["funding_rate"]) == 0.0 and int(m["next_funding_ns"]) == 0
    r.send(_mark(r="-0.00375"))
    assert float(r.sink.marks[2][0]["funding_rate"]) == -0.00375
    for bad in (_mark(p="abc"), _mark(p="-1"), _mark(r="2"), _mark(E=None), _mark(p=61800.1)):
        r.send(bad)
    assert len(r.sink.marks) == 3
    assert r.count(schema.C_MALFORMED) == 5


def test_a_zero_mark_price_is_malformed() -> None:
    """Regression: _on_mark took the mark price with _num_field(d, "p", 0.0, ...), which
    accepts 0, and published a MARK with mark_px 0.0."""
    r = rig()
    r.send(_mark(p="0"))
    r.send(_mark(p="0.00000000"))
    assert r.sink.marks == []
    assert r.count(schema.C_MALFORMED) == 2


def test_disconnect_publishes_stale_and_reconnect_resyncs() -> None:
    d1 = diff(95, 105, 90, [("1000.0", "3")])
    r, ref = live(d1)
    r.feed.on_disconnected(1, 1_000)  # the market connection: no books on it
    assert len(r.sink.books) == 1
    r.feed.on_disconnected(0, 2_000)
    assert len(r.sink.books) == 2
    stale = r.sink.books[-1]
    assert _flags(stale) == schema.BOOK_STALE
    assert int(stale["recv_ns"][0]) == 2_000 and _seq(stale) == 105
    ref.check(stale)
    assert r.count(schema.C_STALE) == 1
    r.feed.on_connected(0, 3_000)
    assert r.snaps.requests == [SYM, SYM]
    d2 = diff(200, 210, 199, [("999.9", "5")])
    r.send(d2, 3_500)
    assert len(r.sink.books) == 2  # not live: the old sequence is gone
    doc = snapshot(205)
    r.feed.on_snapshot(SYM, doc, 4_000)
    assert r.count(schema.C_RESYNCS) == 1
    assert _flags(r.sink.books[-1]) == schema.BOOK_RESYNCED and _seq(r.sink.books[-1]) == 210
    Ref(doc).apply(d2).check(r.sink.books[-1])
    r.others_zero(schema.C_STALE, schema.C_RESYNCS)


def test_silence_publishes_stale_but_keeps_the_sequence() -> None:
    d1 = diff(95, 105, 90, [("1000.0", "3")])
    r, ref = live(d1)
    r.feed.on_silent(1, 10)
    assert len(r.sink.books) == 1
    r.feed.on_silent(0, 20)
    assert _flags(r.sink.books[-1]) == schema.BOOK_STALE
    ref.check(r.sink.books[-1])
    d2 = diff(106, 106, 105, [("1000.0", "4")])
    r.send(d2)
    ref.apply(d2).check(r.sink.books[-1])
    assert _flags(r.sink.books[-1]) == 0
    assert r.snaps.requests == [SYM]


def test_depth_for_a_symbol_we_did_not_ask_for_is_a_venue_error() -> None:
    r, _ = live(diff(95, 105, 90))
    r.send(diff(106, 107, 105, [("1.0", "1")], sym="ETHUSDT"))
    assert r.count(schema.C_VENUE_ERRORS) == 1
    assert len(r.sink.books) == 1
    r.others_zero(schema.C_VENUE_ERRORS)


def test_other_messages_for_a_symbol_we_did_not_ask_for_are_venue_errors() -> None:
    r = rig()
    eth = {"s": "ETHUSDT", "E": T_MS, "T": T_MS}
    for data in (
        {"e": "bookTicker", "u": 5, "b": "1.0", "B": "1", "a": "1.1", "A": "1"} | eth,
        {"e": "trade", "t": 5, "p": "1.0", "q": "1", "m": False} | eth,
        {"e": "markPriceUpdate", "p": "1.0", "r": "0.0001"} | eth,
    ):
        r.send(orjson.dumps({"stream": "ethusdt@x", "data": data}))
    assert r.sink.trade_batches == [] and r.sink.marks == []
    assert r.count(schema.C_VENUE_ERRORS) == 3
    assert r.count(schema.C_MALFORMED) == 0


def test_a_malformed_snapshot_is_counted_and_asked_for_again() -> None:
    r = rig()
    r.feed.on_connected(0, 0)
    r.send(diff(95, 105, 90))
    for k, bad in enumerate(
        (
            {"lastUpdateId": "100", "bids": [], "asks": []},
            {"lastUpdateId": 100, "bids": [["1000.0"]], "asks": []},
            {"lastUpdateId": 100, "bids": [["-1", "1"]], "asks": []},
            {"lastUpdateId": 100, "bids": 5, "asks": []},
            {"lastUpdateId": 100, "asks": []},
            ["not", "a", "dict"],
        )
    ):
        r.feed.on_snapshot(SYM, bad, 1_000)
        assert r.count(schema.C_MALFORMED) == k + 1
    assert r.sink.books == []
    r.feed.poll(1_000 + SNAPSHOT_RETRY_NS)
    assert r.snaps.requests == [SYM, SYM]
    r.feed.on_snapshot(SYM, snapshot(100), 2_000)
    assert [_seq(b) for b in r.sink.books] == [105]


def test_a_failed_snapshot_request_is_retried_later() -> None:
    r = rig()
    r.feed.on_connected(0, 0)
    r.send(diff(95, 105, 90))
    r.snaps.ready.append((SYM, RuntimeError("HTTP 503"), 1_000))
    r.feed.poll(1_000)
    assert r.sink.books == [] and r.snaps.requests == [SYM]
    r.others_zero()
    r.feed.poll(1_000 + SNAPSHOT_RETRY_NS)
    assert r.snaps.requests == [SYM, SYM]
    r.snaps.ready.append((SYM, snapshot(100), 2_000))
    r.feed.poll(2_000 + SNAPSHOT_RETRY_NS)
    assert [_seq(b) for b in r.sink.books] == [105]


def test_a_snapshot_arriving_while_live_changes_nothing() -> None:
    d1 = diff(95, 105, 90, [("1000.0", "3")])
    r, ref = live(d1)
    r.feed.on_snapshot(SYM, snapshot(500, [("1.0", "1")], [("2.0", "1")]), 2_000)
    r.feed.on_snapshot("XRPUSDT", snapshot(500), 2_000)  # nobody asked for it
    assert len(r.sink.books) == 1
    d2 = diff(106, 107, 105, [("999.9", "0")])
    r.send(d2)
    ref.apply(d2).check(r.sink.books[-1])
    assert _flags(r.sink.books[-1]) == 0
    r.others_zero()


@pytest.mark.parametrize(("depth_ms", "depth_stream"), [(100, "@depth@100ms"), (250, "@depth")])
def test_endpoints_route_books_to_public_and_trades_to_market(
    depth_ms: int, depth_stream: str
) -> None:
    r = rig({0: BTC, 1: ETH}, ws_base="wss://fstream.example.com/", depth_ms=depth_ms)
    eps = r.feed.endpoints()
    assert [ep.name for ep in eps] == ["public", "market"]
    streams = {}
    for ep in eps:
        url = urlsplit(ep.url)
        assert (url.scheme, url.netloc) == ("wss", "fstream.example.com")
        assert url.path == f"/{ep.name}/stream"
        streams[ep.name] = set(parse_qs(url.query)["streams"][0].split("/"))
    for s in ("btcusdt", "ethusdt"):
        assert {s + depth_stream, s + "@bookTicker"} <= streams["public"]
        assert s + "@aggTrade" in streams["market"]
        assert any(x.startswith(s + "@markPrice") for x in streams["market"])
    assert all("@depth" in x or "@bookTicker" in x for x in streams["public"])
    assert all("@aggTrade" in x or "@markPrice" in x for x in streams["market"])
    assert len(streams["public"]) == len(streams["market"]) == 4


# ---------------------------------------------------------------------- the recorded excerpt
@dataclass
class Replayed:
    feed: BinanceFeed
    sink: RecordingSink
    counters: list[int]
    snapshots: int
    lines: list[tuple[int, bytes]]


@functools.cache
def _replayed() -> Replayed:
    venue = detect_venue(EXCERPT)
    instruments = infer_instruments(EXCERPT, venue)
    sink = RecordingSink()
    counters = new_counters()
    snaps = InlineSnapshots()
    feed = make_feed(venue, instruments, sink, counters, snaps)
    assert isinstance(feed, BinanceFeed)
    result = replay(EXCERPT, feed, snaps)
    lines = [(ts, raw) for ts, raw in read_recording(EXCERPT) if ts >= 0]
    return Replayed(feed, sink, counters, result.snapshots, lines)


def _recorded_diffs_and_snapshot() -> tuple[dict, list[tuple[bool, dict]]]:
    """(snapshot, [(after the snapshot?, diff data)]) in file order."""
    snap: dict | None = None
    diffs = []
    for _, raw in _replayed().lines:
        msg = orjson.loads(raw)
        if "lastUpdateId" in msg:
            snap = msg
        elif msg["data"]["e"] == "depthUpdate":
            diffs.append((snap is not None, msg["data"]))
    assert snap is not None
    return snap, diffs


def test_replay_detects_the_venue_and_infers_the_instrument() -> None:
    assert detect_venue(EXCERPT) == "binance"
    (ins,) = infer_instruments(EXCERPT, "binance").values()
    assert ins.wire_name == SYM and ins.tick_size == 0.1


def test_replay_of_the_excerpt_is_clean_and_publishes_every_diff() -> None:
    rp = _replayed()
    c = rp.counters
    assert rp.snapshots == 1
    for slot in (
        schema.C_GAPS,
        schema.C_MALFORMED,
        schema.C_RESYNCS,
        schema.C_STALE,
        schema.C_VENUE_ERRORS,
        schema.C_DUPLICATES,
        schema.C_CROSSED,
    ):
        assert c[slot] == 0, slot
    snap, diffs = _recorded_diffs_and_snapshot()
    last_id = snap["lastUpdateId"]
    before = [d for after, d in diffs if not after]
    after = [d for a, d in diffs if a]
    assert len(before) + len(after) == 489
    # the buffered diffs that reach the snapshot make one book; then one book per diff
    assert any(d["U"] <= last_id <= d["u"] for d in before)
    want = [before[-1]["u"]] + [d["u"] for d in after]
    got = [_seq(b) for b in rp.sink.books]
    assert len(got) == 484 == c[schema.C_SNAPSHOTS]
    assert got == want
    assert [_flags(b) for b in rp.sink.books] == [schema.BOOK_RESYNCED] + [0] * 483
    times = [int(b["exch_ns"][0]) for b in rp.sink.books]
    assert times == [before[-1]["T"] * 1_000_000] + [d["T"] * 1_000_000 for d in after]


def test_replay_top_of_book_equals_the_venue_ticker_at_every_shared_update_id() -> None:
    rp = _replayed()
    tickers: dict[int, tuple[float, float, float, float]] = {}
    for _, raw in rp.lines:
        if b'"bookTicker"' in raw:
            d = orjson.loads(raw)["data"]
            tickers[d["u"]] = (float(d["b"]), float(d["B"]), float(d["a"]), float(d["A"]))
    books = {_seq(b): b[0] for b in rp.sink.books}
    shared = sorted(set(books) & set(tickers))
    assert len(shared) == 49
    for u in shared:
        rec = books[u]
        top = (
            float(rec["bid_px"][0]),
            float(rec["bid_sz"][0]),
            float(rec["ask_px"][0]),
            float(rec["ask_sz"][0]),
        )
        assert top == tickers[u], u
    assert (rp.feed.tob_checks, rp.feed.tob_mismatches) == (49, 0)


def test_replay_books_equal_an_independent_dict_book() -> None:
    rp = _replayed()
    snap, diffs = _recorded_diffs_and_snapshot()
    ref = Ref(snap)
    books = rp.sink.books
    # the first book: the snapshot and every buffered diff from the straddling one on
    for after, d in diffs:
        if not after and d["u"] >= snap["lastUpdateId"]:
            ref.apply_data(d)
    ref.check(books[0])
    i = 1
    for after, d in diffs:
        if after:
            ref.apply_data(d).check(books[i])
            i += 1
    assert i == len(books) == 484


def test_replay_trades_are_the_recorded_trades() -> None:
    rp = _replayed()
    want = []
    for ts, raw in rp.lines:
        if b'"e":"trade"' in raw:
            d = orjson.loads(raw)["data"]
            side = schema.SIDE_SELL if d["m"] else schema.SIDE_BUY
            want.append((d["t"], side, float(d["p"]), float(d["q"]), d["T"] * 1_000_000, ts))
    got = [
        (
            int(b["trade_id"][0]),
            int(b["side"][0]),
            float(b["px"][0]),
            float(b["sz"][0]),
            int(b["exch_ns"][0]),
            int(b["recv_ns"][0]),
        )
        for b in rp.sink.trade_batches
    ]
    assert len(want) == 912
    assert got == want
    assert rp.counters[schema.C_TRADES] == 912
