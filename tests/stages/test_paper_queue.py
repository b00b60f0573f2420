"""The paper exchange's queue model, order-entry latency and per-symbol fees.

Each queue rule of ``stages/paper.py``'s docstring on hand-made books and prints (through both
``on_book`` and the batched ``on_books``), then a recorded Binance excerpt replayed through the
venue adapter: a post-only order at the touch is not filled until the prints at its price and
the proportional cancellations have used up the queue that was ahead of it when it arrived.
"""

from __future__ import annotations

import functools
import math
import random
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest

from shm import schema
from stages.paper import EventTuple, PaperExchange
from tests.books import make_book
from tests.orders import Ev

TAKER_BPS, MAKER_BPS = 4.5, 1.5
BIDS = [(100.0, 3.0), (99.9, 4.0), (99.8, 5.0)]
ASKS = [(100.1, 2.0), (100.2, 4.0), (100.3, 6.0)]
BUY, SELL = schema.SIDE_BUY, schema.SIDE_SELL
RECORDING = (
    Path(__file__).resolve().parents[1] / "data" / "binance-usdm-btcusdt-20240808-excerpt.jsonl.gz"
)

Levels = list[tuple[float, float]]


class Sim:
    """A PaperExchange fed one record at a time, books through on_book or on_books."""

    def __init__(self, mode: str = "one", *, latency_ns: int = 0, n_symbols: int = 2) -> None:
        self.ex = PaperExchange(
            taker_fee_bps=TAKER_BPS,
            maker_fee_bps=MAKER_BPS,
            n_symbols=n_symbols,
            latency_ns=latency_ns,
        )
        self.mode = mode

    def book(
        self,
        bids: Levels = BIDS,
        asks: Levels = ASKS,
        *,
        t: int = 0,
        symbol_id: int = 0,
        flags: int = schema.BOOK_SNAPSHOT,
    ) -> list[Ev]:
        rec = make_book(bids, asks, symbol_id=symbol_id, recv_ns=t, flags=flags)
        out: list[EventTuple] = []
        if self.mode == "one":
            self.ex.on_book(rec[0], out)
        else:
            self.ex.on_books(rec, out)
        return [Ev(*e) for e in out]

    def trade(
        self, px: float, sz: float, *, aggressor: int = 0, t: int | None = None, symbol_id: int = 0
    ) -> list[Ev]:
        out: list[EventTuple] = []
        self.ex.on_trade(symbol_id, px, sz, out, aggressor=aggressor, recv_ns=t)
        return [Ev(*e) for e in out]

    def submit(
        self,
        oid: int,
        side: int,
        px: float,
        qty: float,
        *,
        tif: int = schema.TIF_POST_ONLY,
        t: int = 0,
        symbol_id: int = 0,
    ) -> list[Ev]:
        out: list[EventTuple] = []
        self.ex.submit(
            order_id=oid,
            symbol_id=symbol_id,
            side=side,
            tif=tif,
            px=px,
            qty=qty,
            recv_ns=t,
            out=out,
        )
        return [Ev(*e) for e in out]

    def cancel(self, oid: int, *, t: int = 0) -> tuple[bool, list[Ev]]:
        out: list[EventTuple] = []
        ok = self.ex.cancel(oid, recv_ns=t, out=out)
        return ok, [Ev(*e) for e in out]

    def advance(self, t: int) -> list[Ev]:
        out: list[EventTuple] = []
        self.ex.advance(t, out)
        return [Ev(*e) for e in out]

    def q(self, oid: int) -> float:
        q = self.ex.queue_ahead(oid)
        assert q is not None, f"order {oid} is not resting"
        return q


def kinds(evs: list[Ev]) -> list[int]:
    return [e.kind for e in evs]


def fills(evs: list[Ev]) -> list[tuple[int, float, float, float]]:
    """(order, px, qty, leaves) of each fill."""
    return [
        (e.order_id, e.px, round(e.qty, 12), round(e.leaves, 12))
        for e in evs
        if e.kind == schema.EV_FILL
    ]


def maker_fee(px: float, q: float, bps: float = MAKER_BPS) -> float:
    return px * q * bps * 1e-4


MODES = pytest.mark.parametrize("mode", ["one", "batch"])


# ---------------------------------------------------------------- queue position at arrival
@MODES
def test_queue_ahead_on_arrival_is_the_visible_size_at_the_price(mode: str) -> None:
    sim = Sim(mode)
    sim.book()
    for oid, side, px in [
        (1, BUY, 100.0),  # the best bid: 3.0 ahead
        (2, BUY, 99.9),  # behind the touch: the level's 4.0
        (3, BUY, 99.85),  # within the shown levels, no level there: nobody ahead
        (4, BUY, 100.05),  # better than the best bid: alone at the front
        (5, BUY, 99.0),  # beyond the deepest shown level: not known yet
        (6, SELL, 100.2),
        (7, SELL, 100.15),
        (8, SELL, 101.0),
    ]:
        assert kinds(sim.submit(oid, side, px, 1.0)) == [schema.EV_ACK]
    assert [sim.q(i) for i in range(1, 9)] == [3.0, 4.0, 0.0, 0.0, math.inf, 4.0, 0.0, math.inf]
    # a book that shows the deep levels: everything visible there is ahead of us
    assert sim.book(bids=[*BIDS, (99.5, 1.0), (99.0, 2.5)], asks=[*ASKS, (101.0, 0.7)]) == []
    assert sim.q(5) == 2.5 and sim.q(8) == 0.7
    assert sim.q(1) == 3.0 and sim.q(2) == 4.0  # unchanged levels


def test_a_print_at_the_price_cannot_fill_an_order_whose_level_was_never_seen() -> None:
    sim = Sim()
    sim.book()
    sim.submit(1, BUY, 99.0, 1.0)
    assert sim.trade(99.0, 50.0, aggressor=SELL) == []
    assert sim.q(1) == math.inf


# ---------------------------------------------------------------- prints at the price
@MODES
def test_prints_trade_the_queue_ahead_then_fill_partially(mode: str) -> None:
    sim = Sim(mode)
    sim.book()
    sim.submit(1, BUY, 100.0, 2.0, t=10)
    assert sim.q(1) == 3.0
    assert sim.trade(100.0, 1.0, aggressor=SELL) == []
    assert sim.trade(100.0, 1.5, aggressor=SELL) == []
    assert sim.q(1) == pytest.approx(0.5)
    evs = sim.trade(100.0, 1.0, aggressor=SELL)  # 0.5 ahead, then 0.5 for us
    assert fills(evs) == [(1, 100.0, 0.5, 1.5)]
    e = evs[0]
    assert e.liquidity == schema.LIQ_MAKER and e.recv_ns == 10
    assert e.fee == pytest.approx(maker_fee(100.0, 0.5), rel=1e-12)
    assert sim.q(1) == 0.0
    assert fills(sim.trade(100.0, 0.4, aggressor=SELL)) == [(1, 100.0, 0.4, 1.1)]
    assert fills(sim.trade(100.0, 3.0, aggressor=SELL)) == [(1, 100.0, 1.1, 0.0)]
    assert sim.ex.resting == {}


def test_only_prints_that_hit_our_side_trade_our_queue() -> None:
    sim = Sim()
    sim.book()
    sim.submit(1, BUY, 100.0, 1.0)
    sim.submit(2, SELL, 100.1, 1.0)
    assert sim.trade(100.0, 9.0, aggressor=BUY) == []  # a buyer at our bid price: not our queue
    assert sim.trade(100.1, 9.0, aggressor=SELL) == []
    assert (sim.q(1), sim.q(2)) == (3.0, 2.0)
    sim.trade(100.0, 1.0, aggressor=SELL)
    sim.trade(100.1, 0.5, aggressor=BUY)
    assert (sim.q(1), sim.q(2)) == (2.0, 1.5)
    sim.trade(100.0, 0.5)  # aggressor unknown (the default): it may have hit either side
    sim.trade(100.1, 0.5)
    assert (sim.q(1), sim.q(2)) == (1.5, 1.0)
    sim.trade(100.05, 9.0)  # inside the spread: neither
    sim.trade(100.0, 9.0, symbol_id=1)  # another symbol
    assert (sim.q(1), sim.q(2)) == (1.5, 1.0)


def test_our_own_earlier_orders_at_the_price_are_ahead_of_a_later_one() -> None:
    sim = Sim()
    sim.book()
    sim.submit(1, BUY, 100.0, 1.0)
    sim.submit(2, BUY, 100.0, 1.0)
    assert sim.q(1) == sim.q(2) == 3.0  # the market ahead; order 1 is ahead of order 2 as well
    assert fills(sim.trade(100.0, 3.5, aggressor=SELL)) == [(1, 100.0, 0.5, 0.5)]
    # 1.0: order 1's last 0.5, then 0.5 for order 2
    assert fills(sim.trade(100.0, 1.0, aggressor=SELL)) == [
        (1, 100.0, 0.5, 0.0),
        (2, 100.0, 0.5, 0.5),
    ]


# ---------------------------------------------------------------- prints through the price
@MODES
@pytest.mark.parametrize("aggressor", [SELL, 0, BUY])
def test_a_print_through_the_price_means_the_level_was_swept(mode: str, aggressor: int) -> None:
    sim = Sim(mode)
    sim.book()
    sim.submit(1, BUY, 100.0, 2.0)
    sim.submit(2, SELL, 100.2, 1.5)
    evs = sim.trade(99.9, 0.01, aggressor=aggressor)  # 0.01 below a bid with 3.0 ahead
    assert fills(evs) == [(1, 100.0, 2.0, 0.0)]
    assert evs[0].liquidity == schema.LIQ_MAKER
    assert evs[0].fee == pytest.approx(maker_fee(100.0, 2.0), rel=1e-12)
    assert fills(sim.trade(100.3, 0.01, aggressor=aggressor)) == [(2, 100.2, 1.5, 0.0)]
    assert sim.ex.resting == {}


@MODES
def test_a_book_through_the_price_fills_the_rest(mode: str) -> None:
    sim = Sim(mode)
    sim.book()
    sim.submit(1, BUY, 100.0, 2.0)
    evs = sim.book(bids=[(99.8, 1.0)], asks=[(100.0, 1.0)])  # the ask came onto our bid
    assert fills(evs) == [(1, 100.0, 2.0, 0.0)]


# ---------------------------------------------------------------- cancellations and additions
@MODES
def test_cancellations_advance_the_queue_in_proportion_and_additions_join_behind(
    mode: str,
) -> None:
    sim = Sim(mode)
    sim.book()
    sim.submit(1, BUY, 100.0, 1.0)
    assert sim.q(1) == 3.0

    def bid_at(sz: float) -> list[Ev]:
        return sim.book(bids=[(100.0, sz), (99.9, 4.0)])

    assert bid_at(8.0) == []  # 5.0 joined, behind us
    assert sim.q(1) == 3.0
    bid_at(6.0)  # 2.0 cancelled, 3/8 of it ahead of us
    assert sim.q(1) == pytest.approx(3.0 - 2.0 * 3.0 / 8.0)  # 2.25
    bid_at(6.0)
    assert sim.q(1) == pytest.approx(2.25)
    bid_at(2.0)
    assert sim.q(1) == pytest.approx(2.25 - 4.0 * 2.25 / 6.0)  # 0.75
    bid_at(0.5)
    assert sim.q(1) == pytest.approx(0.75 - 1.5 * 0.75 / 2.0)  # 0.1875
    assert fills(sim.trade(100.0, 0.2, aggressor=SELL)) == [(1, 100.0, 0.0125, 0.9875)]


@MODES
def test_a_print_is_not_counted_again_as_a_cancellation(mode: str) -> None:
    sim = Sim(mode)
    sim.book()
    sim.submit(1, BUY, 100.0, 1.0)
    sim.book(bids=[(100.0, 8.0)])  # 5.0 behind us
    sim.trade(100.0, 2.0, aggressor=SELL)
    assert sim.q(1) == pytest.approx(1.0)
    # the level fell by 3.0: the 2.0 print explains 2.0, only 1.0 was cancelled (of a level
    # of 6.0 after the print); counting the print again would give 1 - 3 * 1/8 = 0.625
    sim.book(bids=[(100.0, 5.0)])
    assert sim.q(1) == pytest.approx(1.0 - 1.0 * 1.0 / 6.0)
    sim.book(bids=[(100.0, 5.0)])  # the print is spent: nothing more moves
    assert sim.q(1) == pytest.approx(5.0 / 6.0)
    # a decrease the prints explain in full leaves the queue where the prints left it
    sim.trade(100.0, 0.5, aggressor=SELL)
    sim.book(bids=[(100.0, 4.5)])
    assert sim.q(1) == pytest.approx(5.0 / 6.0 - 0.5)


@MODES
def test_a_print_stamped_after_a_book_explains_the_next_book_only(mode: str) -> None:
    """The risk stage reads a poll's prints before its books: the print at 30 ns is handed
    over before the book of 20 ns, and must explain the book of 40 ns, not the one of 20."""
    sim = Sim(mode)
    sim.book(t=0)
    sim.submit(1, BUY, 100.0, 1.0, t=0)
    sim.trade(100.0, 2.0, aggressor=SELL, t=30)
    assert sim.q(1) == 1.0
    sim.book(bids=[(100.0, 3.0)], t=20)  # before the print: unchanged
    assert sim.q(1) == 1.0
    sim.book(bids=[(100.0, 1.0)], t=40)  # the print, nothing cancelled
    assert sim.q(1) == 1.0


# ---------------------------------------------------------------- the level out of view
@MODES
def test_a_level_out_of_view_keeps_its_queue(mode: str) -> None:
    sim = Sim(mode)
    sim.book()
    sim.submit(1, BUY, 100.0, 1.0)
    sim.trade(100.0, 1.0, aggressor=SELL)
    assert sim.q(1) == 2.0
    # the best bid moved up: 100.0 lies below the deepest shown level, the book says nothing
    up = [(100.5, 1.0), (100.4, 1.0), (100.3, 1.0)]
    assert sim.book(bids=up, asks=[(100.6, 1.0)]) == []
    assert sim.q(1) == 2.0
    sim.book(bids=[], asks=[(100.6, 1.0)])  # an empty side says nothing either
    assert sim.q(1) == 2.0
    sim.book(bids=[(100.0, 10.0)])  # back in view, larger: the newcomers are behind us
    assert sim.q(1) == 2.0
    sim.book(bids=[*up, (100.0, 10.0)], asks=[(100.6, 1.0)])
    sim.book(bids=up, asks=[(100.6, 1.0)])
    sim.book(bids=[(100.0, 1.5)])  # back in view, smaller than our queue: it is all ahead
    assert sim.q(1) == 1.5
    # the level empties while in view (the best is now below it): all ahead of us left
    assert sim.book(bids=[(99.9, 4.0)], asks=[(100.1, 1.0)]) == []
    assert sim.q(1) == 0.0
    assert fills(sim.trade(100.0, 0.3, aggressor=SELL)) == [(1, 100.0, 0.3, 0.7)]


@pytest.mark.parametrize("flags", [schema.BOOK_STALE, schema.BOOK_CROSSED])
def test_an_untradeable_book_moves_no_queue(flags: int) -> None:
    sim = Sim()
    sim.book()
    sim.submit(1, BUY, 100.0, 1.0)
    sim.trade(100.0, 1.0, aggressor=SELL)
    sim.book(bids=[(100.0, 0.5)], flags=flags)
    assert sim.q(1) == 2.0
    sim.book(bids=[(100.0, 1.5)])  # the print still explains the next tradeable book
    assert sim.q(1) == pytest.approx(1.5)


def test_on_books_is_on_book_record_by_record() -> None:
    """Random books and prints around two resting orders per side on two symbols: the batched
    path gives the same events and queues as one record at a time."""
    rng = random.Random(7)
    script: list[tuple[str, object]] = []
    t = 0
    for _ in range(300):
        t += rng.randint(1, 5)
        s = rng.randint(0, 1)
        if rng.random() < 0.6:
            lo = 99.7 + rng.choice([0.0, 0.1, 0.2])
            bids = [
                (round(lo + 0.3 - 0.1 * k, 1), round(rng.uniform(0.0, 6.0), 3))
                for k in range(rng.randint(0, 4))
            ]
            asks = [(round(100.2 + 0.1 * k, 1), round(rng.uniform(0.5, 6.0), 3)) for k in range(3)]
            script.append(
                ("book", make_book([b for b in bids if b[1] > 0], asks, symbol_id=s, recv_ns=t))
            )
        else:
            px = rng.choice([99.8, 99.9, 100.0, 100.2, 100.3])
            script.append(
                ("trade", (s, px, round(rng.uniform(0.01, 2.0), 3), rng.choice([-1, 0, 1]), t))
            )

    def run(batched: bool) -> tuple[list[EventTuple], list[float | None]]:
        ex = PaperExchange(taker_fee_bps=TAKER_BPS, maker_fee_bps=MAKER_BPS, n_symbols=2)
        out: list[EventTuple] = []
        for s in (0, 1):
            ex.on_book(make_book(BIDS, ASKS, symbol_id=s)[0], out)
            for oid, side, px in [
                (1, BUY, 100.0),
                (2, BUY, 99.9),
                (3, SELL, 100.2),
                (4, BUY, 100.0),
            ]:
                ex.submit(
                    order_id=10 * s + oid,
                    symbol_id=s,
                    side=side,
                    tif=schema.TIF_POST_ONLY,
                    px=px,
                    qty=3.0,
                    recv_ns=0,
                    out=out,
                )
        pending: list[np.ndarray] = []

        def flush() -> None:
            if pending:
                ex.on_books(np.concatenate(pending), out)
                pending.clear()

        queues: list[float | None] = []
        for kind, item in script:
            if kind == "book":
                assert isinstance(item, np.ndarray)
                if batched:
                    pending.append(item)
                else:
                    ex.on_book(item[0], out)
            else:
                flush()
                s, px, sz, agg, tt = item  # type: ignore[misc]
                ex.on_trade(s, px, sz, out, aggressor=agg, recv_ns=tt)
                queues.extend(ex.queue_ahead(10 * s + k) for k in (1, 2, 3, 4))
        flush()
        return out, queues

    one, batch = run(False), run(True)
    assert sum(1 for e in one[0] if e[2] == schema.EV_FILL) > 5  # the script does fill
    assert batch[0] == one[0]
    assert batch[1] == pytest.approx(one[1])


# ---------------------------------------------------------------- order entry
@MODES
def test_ioc_remainder_is_cancelled_after_partial_fills(mode: str) -> None:
    sim = Sim(mode)
    sim.book(asks=[(100.1, 1.0), (100.2, 2.0), (100.4, 9.0)])
    evs = sim.submit(1, BUY, 100.2, 5.0, tif=schema.TIF_IOC, t=77)
    assert kinds(evs) == [schema.EV_FILL, schema.EV_FILL, schema.EV_EXPIRED]
    assert fills(evs) == [(1, 100.1, 1.0, 4.0), (1, 100.2, 2.0, 2.0)]
    assert all(e.liquidity == schema.LIQ_TAKER for e in evs[:2])
    done = evs[2]  # EV_EXPIRED is the schema's "IOC remainder cancelled"; nothing stays open
    assert (done.order_id, done.qty, done.leaves, done.recv_ns) == (1, 0.0, 0.0, 77)
    assert sim.ex.resting == {}


@MODES
def test_a_crossing_limit_takes_then_rests_at_the_front_of_its_price(mode: str) -> None:
    sim = Sim(mode)
    sim.book(asks=[(100.1, 1.0), (100.2, 4.0)])
    evs = sim.submit(1, BUY, 100.1, 3.0, tif=schema.TIF_GTC)
    assert kinds(evs) == [schema.EV_ACK, schema.EV_FILL]
    assert fills(evs) == [(1, 100.1, 1.0, 2.0)]
    assert evs[1].liquidity == schema.LIQ_TAKER
    assert evs[1].fee == pytest.approx(100.1 * 1.0 * TAKER_BPS * 1e-4, rel=1e-12)
    assert sim.q(1) == 0.0 and sim.ex.resting[1].leaves == pytest.approx(2.0)
    assert sim.book(asks=[(100.2, 4.0)]) == []  # the venue's next book: 100.1 was taken
    assert sim.q(1) == 0.0  # better than the best bid: nobody ahead
    evs = sim.trade(100.1, 0.5, aggressor=SELL)
    assert fills(evs) == [(1, 100.1, 0.5, 1.5)] and evs[0].liquidity == schema.LIQ_MAKER


def test_a_post_only_that_would_cross_is_rejected_and_takes_nothing() -> None:
    sim = Sim()
    sim.book()
    evs = sim.submit(1, BUY, 100.1, 1.0)
    assert kinds(evs) == [schema.EV_REJECT]
    assert evs[0].reason == schema.REJECT_CODE["post_only_would_cross"]
    assert sim.ex.resting == {} and sim.ex.books[0]["ask_sz"][0] == 2.0


# ---------------------------------------------------------------- per-symbol fees
def test_fees_per_symbol() -> None:
    sim = Sim()
    sim.book(symbol_id=0)
    sim.book(symbol_id=1)
    assert sim.ex.fees(1) == (TAKER_BPS, MAKER_BPS)  # the constructor's are the defaults
    sim.ex.set_fees(1, taker_bps=5.0, maker_bps=-0.5)  # a maker rebate
    assert sim.ex.fees(1) == (5.0, -0.5) and sim.ex.fees(0) == (TAKER_BPS, MAKER_BPS)
    for s, taker, maker in [(0, TAKER_BPS, MAKER_BPS), (1, 5.0, -0.5)]:
        take = sim.submit(10 + s, BUY, 100.1, 1.0, tif=schema.TIF_IOC, symbol_id=s)
        assert take[0].fee == pytest.approx(100.1 * 1.0 * taker * 1e-4, rel=1e-12)
        sim.submit(20 + s, SELL, 100.3, 2.0, symbol_id=s)
        make = sim.trade(100.4, 0.1, symbol_id=s)
        assert make[0].fee == pytest.approx(maker_fee(100.3, 2.0, maker), rel=1e-12)
    with pytest.raises(ValueError):
        sim.ex.set_fees(2, taker_bps=1.0, maker_bps=1.0)
    with pytest.raises(ValueError):
        sim.ex.set_fees(0, taker_bps=math.nan, maker_bps=1.0)


def test_latency_must_be_a_non_negative_int() -> None:
    with pytest.raises(ValueError):
        PaperExchange(taker_fee_bps=1.0, maker_fee_bps=1.0, latency_ns=-1)
    with pytest.raises(TypeError):
        PaperExchange(taker_fee_bps=1.0, maker_fee_bps=1.0, latency_ns=1.5)  # type: ignore[arg-type]


# ---------------------------------------------------------------- order-entry latency
LAT = 100


@MODES
def test_an_order_sees_only_the_market_after_it_reaches_the_book(mode: str) -> None:
    sim = Sim(mode, latency_ns=LAT)
    sim.book(t=0)
    assert sim.submit(1, BUY, 100.0, 1.0, t=1000) == []  # on its way until 1100
    assert sim.ex.resting == {} and sim.ex.queue_ahead(1) is None
    assert sim.ex.resting_qty(0, BUY) == 1.0  # open for the risk checks all the same
    assert sim.ex.next_arrival_ns() == 1100
    assert sim.book(bids=[(99.5, 1.0)], asks=[(99.6, 1.0)], t=1060) == []  # through: not there yet
    assert sim.book(bids=[(100.0, 7.0)], t=1070) == []
    assert sim.trade(100.0, 5.0, aggressor=SELL, t=1080) == []  # before it arrives: not counted
    evs = sim.book(bids=[(100.0, 7.0)], t=1100)
    assert kinds(evs) == [schema.EV_ACK] and evs[0].recv_ns == 1000
    assert sim.q(1) == 7.0  # the book at 1070, not the 3.0 seen when it was sent
    assert fills(sim.trade(100.0, 7.5, aggressor=SELL, t=1150)) == [(1, 100.0, 0.5, 0.5)]


def test_a_record_older_than_the_arrival_does_not_touch_the_order_even_if_fed_later() -> None:
    sim = Sim(latency_ns=LAT)
    sim.book(t=0)
    sim.submit(1, BUY, 100.0, 1.0, t=0)
    assert kinds(sim.book(t=150)) == [schema.EV_ACK]  # reached the book at 100
    assert sim.trade(99.0, 5.0, aggressor=SELL, t=90) == []  # a print from before: not ours
    assert sim.trade(100.0, 5.0, aggressor=SELL, t=90) == []
    assert sim.book(bids=[(99.0, 1.0)], asks=[(99.5, 1.0)], t=95) == []
    assert sim.q(1) == 3.0
    assert fills(sim.trade(99.0, 5.0, aggressor=SELL, t=160)) == [(1, 100.0, 1.0, 0.0)]


def test_a_print_without_a_time_touches_only_orders_already_at_the_book() -> None:
    sim = Sim(latency_ns=LAT)
    sim.book(t=0)
    sim.submit(1, BUY, 100.0, 1.0, t=0)
    assert sim.trade(99.0, 1.0) == []  # the risk stage's call today: no time, no advance
    assert kinds(sim.advance(100)) == [schema.EV_ACK]
    assert fills(sim.trade(99.0, 1.0)) == [(1, 100.0, 1.0, 0.0)]


def test_submit_and_cancel_take_now_ns_as_the_send_time() -> None:
    sim = Sim(latency_ns=LAT)
    sim.book(t=0)
    out: list[EventTuple] = []
    sim.ex.submit(
        order_id=1,
        symbol_id=0,
        side=BUY,
        tif=schema.TIF_POST_ONLY,
        px=100.0,
        qty=1.0,
        recv_ns=5,  # the tick behind the order: echoed in its events
        out=out,
        now_ns=500,
    )
    assert sim.ex.next_arrival_ns() == 600
    assert sim.advance(599) == []
    assert [(e.kind, e.recv_ns) for e in sim.advance(600)] == [(schema.EV_ACK, 5)]
    assert sim.ex.cancel(1, recv_ns=7, out=out, now_ns=700) and out == []
    assert [(e.kind, e.recv_ns) for e in sim.advance(800)] == [(schema.EV_CANCELED, 7)]


@MODES
def test_a_cancel_racing_a_fill_loses_if_the_fill_comes_first(mode: str) -> None:
    sim = Sim(mode, latency_ns=LAT)
    sim.book(t=0)
    sim.submit(1, BUY, 100.0, 1.0, t=0)
    assert kinds(sim.advance(100)) == [schema.EV_ACK]
    ok, evs = sim.cancel(1, t=200)  # reaches the book at 300
    assert ok and evs == [] and 1 in sim.ex.resting
    assert fills(sim.trade(99.9, 0.1, aggressor=SELL, t=250)) == [(1, 100.0, 1.0, 0.0)]
    evs = sim.book(t=300)
    assert kinds(evs) == [schema.EV_REJECT]
    assert evs[0].reason == schema.REJECT_CODE["unknown_order"] and evs[0].recv_ns == 200


@MODES
def test_a_cancel_that_arrives_first_wins(mode: str) -> None:
    sim = Sim(mode, latency_ns=LAT)
    sim.book(t=0)
    sim.submit(1, BUY, 100.0, 1.0, t=0)
    sim.cancel(1, t=20)  # queued behind the order itself: reaches the book at 120
    assert kinds(sim.book(t=110)) == [schema.EV_ACK]
    evs = sim.trade(99.9, 0.1, aggressor=SELL, t=150)
    assert kinds(evs) == [schema.EV_CANCELED]  # applied at 120, before the print at 150
    assert sim.ex.resting == {}


def test_post_only_and_ioc_are_decided_against_the_book_at_arrival() -> None:
    sim = Sim(latency_ns=LAT)
    sim.book(t=0)
    sim.submit(1, BUY, 100.0, 1.0, t=0)  # does not cross when sent...
    sim.submit(2, BUY, 100.2, 5.0, tif=schema.TIF_IOC, t=0)
    sim.book(bids=[(99.8, 1.0)], asks=[(100.0, 1.0), (100.2, 0.5)], t=50)  # ...but by 100 it does
    evs = sim.advance(100)
    assert [(e.order_id, e.kind) for e in evs] == [
        (1, schema.EV_REJECT),
        (2, schema.EV_FILL),
        (2, schema.EV_FILL),
        (2, schema.EV_EXPIRED),
    ]
    assert evs[0].reason == schema.REJECT_CODE["post_only_would_cross"]
    assert fills(evs) == [(2, 100.0, 1.0, 4.0), (2, 100.2, 0.5, 3.5)]


def test_cancel_all_acts_at_once_and_drops_what_is_on_its_way() -> None:
    sim = Sim(latency_ns=LAT)
    sim.book(t=0)
    sim.submit(1, BUY, 100.0, 1.0, t=0)
    sim.advance(100)
    sim.submit(2, SELL, 100.3, 1.0, t=150)
    assert sim.cancel(1, t=160)[0] and sim.cancel(2, t=160)[0]
    assert not sim.cancel(99, t=160)[0]  # unknown: the caller rejects it, as before
    out: list[EventTuple] = []
    assert sim.ex.cancel_all(out=out) == 2
    assert sorted((e[0], e[2]) for e in out) == [(1, schema.EV_CANCELED), (2, schema.EV_CANCELED)]
    assert sim.ex.resting == {} and sim.ex.resting_qty(0, SELL) == 0.0
    assert sim.ex.next_arrival_ns() is None and sim.advance(10**9) == []
    assert sim.trade(90.0, 10.0, t=10**9) == []


def test_on_books_with_an_arrival_inside_the_batch_matches_on_book() -> None:
    def run(batched: bool) -> tuple[list[EventTuple], float | None]:
        ex = PaperExchange(taker_fee_bps=1.0, maker_fee_bps=1.0, n_symbols=1, latency_ns=LAT)
        out: list[EventTuple] = []
        ex.on_book(make_book(BIDS, ASKS, recv_ns=0)[0], out)
        ex.submit(
            order_id=1,
            symbol_id=0,
            side=BUY,
            tif=schema.TIF_GTC,
            px=100.0,
            qty=1.0,
            recv_ns=20,
            out=out,
        )
        recs = np.concatenate(
            [
                make_book([(100.0, sz)], ASKS, recv_ns=t)
                for t, sz in [(50, 9.0), (100, 6.0), (119, 5.0), (130, 2.0), (180, 1.0)]
            ]
        )
        if batched:
            ex.on_books(recs, out)
        else:
            for r in recs:
                ex.on_book(r, out)
        return out, ex.queue_ahead(1)

    one, batch = run(False), run(True)
    assert batch == one
    # arrived at 120 behind the 5.0 of the book at 119; then 3 of 5 cancelled, then 1 of 2
    assert one[1] == pytest.approx(5.0 * (2.0 / 5.0) * (1.0 / 2.0))


# ---------------------------------------------------------------- recorded Binance data
@functools.cache
def recorded() -> list[tuple[str, np.ndarray]]:
    """Books and trades of the Binance excerpt in the order the venue adapter publishes them."""
    from stages.venues.feed import new_counters
    from stages.venues.replay import InlineSnapshots, infer_instruments, make_feed, replay

    events: list[tuple[str, np.ndarray]] = []

    class Sink:
        def book(self, books: np.ndarray) -> None:
            events.append(("book", books[:1].copy()))

        def trades(self, trades: np.ndarray) -> None:
            events.append(("trades", trades.copy()))

        def mark(self, marks: np.ndarray) -> None:
            pass

    snaps = InlineSnapshots()
    feed = make_feed(
        "binance", infer_instruments(RECORDING, "binance"), Sink(), new_counters(), snaps
    )
    replay(RECORDING, feed, snaps)
    return events


def visible(rec: np.void, side: int, p: float) -> float | None:
    """The size at ``p`` on one side of a recorded book; 0 inside the shown levels without
    one; None beyond them (written here again, apart from the exchange's own)."""
    n = int(rec["n_bid" if side > 0 else "n_ask"])
    pxs = [float(x) for x in rec["bid_px" if side > 0 else "ask_px"][:n]]
    szs = [float(x) for x in rec["bid_sz" if side > 0 else "ask_sz"][:n]]
    if p in pxs:
        return szs[pxs.index(p)]
    if n and (p > pxs[-1] if side > 0 else p < pxs[-1]):
        return 0.0
    return None


QTY = 0.01
BINANCE_TAKER_BPS, BINANCE_MAKER_BPS = 5.0, 2.0
Pos = tuple[int, int]  # (index of the published record, index of the print within it)


class Expected(NamedTuple):
    price: float
    queue0: float  # ahead of us on arrival
    fill_at: Pos
    fill_qty: float
    fill_print: float  # the size of the print that fills us
    naive_at: Pos  # first print at our price against our side: "filled when touched"
    traded: float  # prints at our price before the fill
    cancelled: float  # queue taken away by cancellations before the fill
    queue_after_book: dict[int, float]  # our queue after each book record


def expected_fill(k: int, side: int, arrive: int) -> Expected:
    """The queue model computed from the recorded books and prints alone."""
    events = recorded()
    place = events[k][1][0]
    p = float(place["bid_px"][0] if side > 0 else place["ask_px"][0])
    seen = place  # the last book before the order reaches the venue
    for kind, arr in events[k + 1 :]:
        if int(arr[0]["recv_ns"]) >= arrive:
            break
        if kind == "book":
            seen = arr[0]
    q0 = visible(seen, side, p)
    assert q0 is not None and q0 > 0
    q = level = q0
    printed = traded = cancelled = 0.0
    naive: Pos | None = None
    after_book: dict[int, float] = {}
    for j in range(k + 1, len(events)):
        kind, arr = events[j]
        if kind == "book":
            rec = arr[0]
            if int(rec["recv_ns"]) < arrive:
                continue
            assert not int(rec["flags"]) & schema.BOOK_UNTRADEABLE
            opposite = float(rec["ask_px"][0] if side > 0 else rec["bid_px"][0])
            assert (opposite > p) if side > 0 else (opposite < p), "the market moved through"
            v = visible(rec, side, p)
            assert v is not None, "the level stays in view in the chosen windows"
            before = q
            rest = level - printed  # the level after the prints since the last book
            if rest - v > 0 and rest > 0:
                q -= (rest - v) * q / rest
            q = min(q, v)
            cancelled += before - q
            level, printed = v, 0.0
            after_book[j] = q
            continue
        for i, tr in enumerate(arr):
            if int(tr["recv_ns"]) < arrive:
                continue
            x, sz = float(tr["px"]), float(tr["sz"])
            assert (x >= p) if side > 0 else (x <= p), "a print through the price"
            if x != p or int(tr["side"]) != -side:
                continue
            if naive is None:
                naive = (j, i)
            if sz - q > 1e-12:  # the exchange's dust: a print that only empties the queue
                return Expected(
                    p, q0, (j, i), min(QTY, sz - q), sz, naive, traded, cancelled, after_book
                )
            q -= sz
            printed += sz
            traded += sz
    raise AssertionError("never filled")


def replay_order(
    k: int, side: int, latency_ns: int, mode: str
) -> tuple[Pos | None, list[Ev], dict[int, float | None]]:
    """Replay the recording into the exchange with a post-only order at the touch of book
    ``k``; return where its first fill came, the fill events, and its queue after each book."""
    events = recorded()
    ex = PaperExchange(
        taker_fee_bps=TAKER_BPS, maker_fee_bps=MAKER_BPS, n_symbols=1, latency_ns=latency_ns
    )
    ex.set_fees(0, taker_bps=BINANCE_TAKER_BPS, maker_bps=BINANCE_MAKER_BPS)
    out: list[EventTuple] = []

    def feed(j: int) -> Pos | None:
        kind, arr = events[j]
        if kind == "book":
            if mode == "one":
                ex.on_book(arr[0], out)
            else:
                ex.on_books(arr, out)
            return (j, 0) if any(e[2] == schema.EV_FILL for e in out) else None
        for i, tr in enumerate(arr.tolist()):
            s, agg, _tid, _exch, recv, _ing, px, sz = tr
            ex.on_trade(s, px, sz, out, aggressor=agg, recv_ns=recv)
            if any(e[2] == schema.EV_FILL for e in out):
                return (j, i)
        return None

    for j in range(k + 1):
        assert feed(j) is None
    place = events[k][1][0]
    p = float(place["bid_px"][0] if side > 0 else place["ask_px"][0])
    ex.submit(
        order_id=1,
        symbol_id=0,
        side=side,
        tif=schema.TIF_POST_ONLY,
        px=p,
        qty=QTY,
        recv_ns=int(place["recv_ns"]),
        out=out,
    )
    queues: dict[int, float | None] = {}
    for j in range(k + 1, len(events)):
        at = feed(j)
        if events[j][0] == "book":
            queues[j] = ex.queue_ahead(1)
        if at is not None:
            return at, [Ev(*e) for e in out], queues
    return None, [Ev(*e) for e in out], queues


# Two windows of the excerpt: a bid at 61808.0 behind 11.1 BTC that a sell burst trades
# through about 0.7 s later, and an ask at 61808.0 behind 2.0 BTC that mostly cancels away.
WINDOWS = {"bid": (5123108304069, BUY), "ask": (5123108026696, SELL)}


@pytest.mark.parametrize("mode", ["one", "batch"])
@pytest.mark.parametrize("latency_ns", [0, 60_000_000])
@pytest.mark.parametrize("window", sorted(WINDOWS))
def test_recorded_binance_maker_order_waits_for_its_queue(
    window: str, latency_ns: int, mode: str
) -> None:
    seq, side = WINDOWS[window]
    events = recorded()
    k = next(
        j for j, (kind, arr) in enumerate(events) if kind == "book" and int(arr[0]["seq"]) == seq
    )
    place = events[k][1][0]
    t0 = int(place["recv_ns"])
    assert all(int(arr[0]["recv_ns"]) >= t0 for _kind, arr in events[k + 1 :])  # publish order
    exp = expected_fill(k, side, t0 + latency_ns)

    at, evs, queues = replay_order(k, side, latency_ns, mode)

    # not filled before the queue ahead at arrival had been traded through (or cancelled)...
    assert at == exp.fill_at
    assert exp.traded + exp.cancelled <= exp.queue0 + 1e-9
    assert exp.traded + exp.cancelled + exp.fill_print > exp.queue0
    fill = [e for e in evs if e.kind == schema.EV_FILL]
    assert len(fill) == 1
    f = fill[0]
    assert (f.order_id, f.side, f.px, f.liquidity) == (1, side, exp.price, schema.LIQ_MAKER)
    assert f.qty == pytest.approx(exp.fill_qty, abs=1e-9)
    assert f.leaves == pytest.approx(QTY - exp.fill_qty, abs=1e-9)
    assert f.fee == pytest.approx(exp.price * f.qty * BINANCE_MAKER_BPS * 1e-4, rel=1e-9)
    assert evs[0].kind == schema.EV_ACK
    # ...and it tracked the same queue, book by book
    assert exp.queue_after_book
    for j, q in exp.queue_after_book.items():
        assert queues[j] == pytest.approx(q, abs=1e-9), j
    assert exp.traded > 0
    # "filled when touched" would have filled it at an earlier print
    assert exp.naive_at < exp.fill_at
    naive_ns = int(events[exp.naive_at[0]][1][exp.naive_at[1]]["recv_ns"])
    fill_ns = int(events[exp.fill_at[0]][1][exp.fill_at[1]]["recv_ns"])
    assert fill_ns - naive_ns > 10_000_000  # tens of milliseconds and more of queue


def test_recorded_windows_differ_in_what_moved_the_queue() -> None:
    """The bid's queue went to prints (the level saw no cancellation at all), the ask's
    mostly to cancellations: both halves of the model decide a recorded fill."""
    events = recorded()
    got = {}
    for name, (seq, side) in WINDOWS.items():
        k = next(
            j
            for j, (kind, arr) in enumerate(events)
            if kind == "book" and int(arr[0]["seq"]) == seq
        )
        got[name] = expected_fill(k, side, int(events[k][1][0]["recv_ns"]))
    bid, ask = got["bid"], got["ask"]
    assert bid.queue0 > 10.0 and bid.traded == pytest.approx(bid.queue0, abs=1e-9)
    assert ask.cancelled > 0.9 * ask.queue0 and 0 < ask.traded < 0.1 * ask.queue0


# ---------------------------------------------------------------- restoring after a restart
@MODES
def test_a_restored_order_rests_silently_and_its_queue_is_estimated_again(mode: str) -> None:
    sim = Sim(mode, latency_ns=LAT)  # a restarted exchange: no book yet
    sim.ex.restore(order_id=7, symbol_id=0, side=BUY, px=99.9, leaves=0.6, recv_ns=5, now_ns=1_000)
    sim.ex.restore(
        order_id=8, symbol_id=0, side=SELL, px=100.15, leaves=1.0, recv_ns=5, now_ns=1_000
    )
    assert sim.ex.open_ids() == [7, 8] and sim.ex.open_by_symbol() == {0: 2}
    assert sim.q(7) == math.inf, "the old queue position is lost: not known until a book"
    assert sim.trade(99.9, 50.0, aggressor=SELL, t=1_100) == []
    assert sim.book(t=900) == [], "a record from before the restore does not touch it"
    assert sim.q(7) == math.inf
    assert sim.book(t=1_200) == []
    assert sim.q(7) == 4.0 and sim.q(8) == 0.0  # the back of the level, as a new arrival
    assert fills(sim.trade(99.9, 4.5, aggressor=SELL, t=1_300)) == [(7, 99.9, 0.5, 0.1)]
    assert sim.ex.resting_qty(0, BUY) == pytest.approx(0.1)


def test_a_restore_onto_a_known_book_takes_its_queue_from_it_and_refuses_a_duplicate() -> None:
    sim = Sim()
    sim.book()
    sim.ex.restore(order_id=1, symbol_id=0, side=BUY, px=100.0, leaves=1.0, recv_ns=0, now_ns=0)
    assert sim.q(1) == 3.0
    with pytest.raises(ValueError, match="already open"):
        sim.ex.restore(order_id=1, symbol_id=0, side=BUY, px=100.0, leaves=1.0, recv_ns=0, now_ns=0)
    with pytest.raises(ValueError):
        sim.ex.restore(order_id=2, symbol_id=0, side=0, px=100.0, leaves=1.0, recv_ns=0, now_ns=0)
    with pytest.raises(ValueError):
        sim.ex.restore(order_id=3, symbol_id=9, side=BUY, px=100.0, leaves=1.0, recv_ns=0, now_ns=0)


def test_open_ids_and_counts_include_orders_on_their_way() -> None:
    sim = Sim(latency_ns=LAT, n_symbols=2)
    sim.book(t=0)
    sim.submit(1, BUY, 99.9, 1.0, t=0)
    sim.advance(LAT)
    sim.submit(2, SELL, 100.2, 1.0, t=LAT, symbol_id=1)
    assert sorted(sim.ex.open_ids()) == [1, 2]
    assert sim.ex.open_by_symbol() == {0: 1, 1: 1}
