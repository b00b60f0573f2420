"""The paper exchange: taker walks, post-only, maker fills (queue and through the price), cancels.

The queue model itself, latency and per-symbol fees: test_paper_queue.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from shm import schema
from stages.paper import EventTuple, PaperExchange
from tests import books
from tests.orders import Ev

TAKER_BPS, MAKER_BPS = 4.5, 1.5
BIDS = [(100.0, 1.0), (99.5, 2.0), (99.0, 3.0)]
ASKS = [(100.5, 1.0), (101.0, 2.0), (101.5, 3.0)]

Levels = list[tuple[float, float]]


def make_book(
    bids: Levels = BIDS,
    asks: Levels = ASKS,
    *,
    symbol_id: int = 0,
    flags: int = schema.BOOK_SNAPSHOT,
) -> np.void:
    return books.make_book(bids, asks, symbol_id=symbol_id, flags=flags)[0]


def exchange(*books: np.void) -> PaperExchange:
    ex = PaperExchange(taker_fee_bps=TAKER_BPS, maker_fee_bps=MAKER_BPS, n_symbols=4)
    sink: list[EventTuple] = []
    for b in books or (make_book(),):
        ex.on_book(b, sink)
    assert sink == []
    return ex


def submit(
    ex: PaperExchange, oid: int, side: int, tif: int, px: float, qty: float, symbol_id: int = 0
) -> list[Ev]:
    out: list[EventTuple] = []
    ex.submit(
        order_id=oid,
        symbol_id=symbol_id,
        side=side,
        tif=tif,
        px=px,
        qty=qty,
        recv_ns=oid * 10,
        out=out,
    )
    return [Ev(*e) for e in out]


def taker_fee(px: float, q: float) -> float:
    return px * q * TAKER_BPS / 1e4


def maker_fee(px: float, q: float) -> float:
    return px * q * MAKER_BPS / 1e4


def assert_fill(
    e: Ev, *, oid: int, side: int, px: float, qty: float, leaves: float, liq: int
) -> None:
    assert e.kind == schema.EV_FILL
    assert (e.order_id, e.symbol_id, e.side, e.liquidity, e.reason) == (oid, 0, side, liq, 0)
    assert e.px == px
    assert e.qty == pytest.approx(qty, abs=1e-12)
    assert e.leaves == pytest.approx(leaves, abs=1e-12)
    fee = taker_fee(px, qty) if liq == schema.LIQ_TAKER else maker_fee(px, qty)
    assert e.fee == pytest.approx(fee, rel=1e-12)
    assert e.fee > 0


# ---------------------------------------------------------------- takers
def test_taker_ioc_walks_levels_with_taker_fees_and_expires_the_rest() -> None:
    ex = exchange()
    evs = submit(ex, 1, schema.SIDE_BUY, schema.TIF_IOC, 101.2, 5.0)
    assert [e.kind for e in evs] == [schema.EV_FILL, schema.EV_FILL, schema.EV_EXPIRED]
    assert_fill(evs[0], oid=1, side=1, px=100.5, qty=1.0, leaves=4.0, liq=schema.LIQ_TAKER)
    assert_fill(evs[1], oid=1, side=1, px=101.0, qty=2.0, leaves=2.0, liq=schema.LIQ_TAKER)
    assert evs[2].leaves == 0.0 and evs[2].qty == 0.0 and evs[2].order_id == 1
    assert all(e.recv_ns == 10 for e in evs)
    assert ex.resting == {}  # an IOC never rests


def test_market_ioc_with_nan_limit_walks_the_whole_side() -> None:
    ex = exchange()
    evs = submit(ex, 2, schema.SIDE_SELL, schema.TIF_IOC, math.nan, 10.0)
    fills = [e for e in evs if e.kind == schema.EV_FILL]
    assert [(e.px, e.qty) for e in fills] == [(100.0, 1.0), (99.5, 2.0), (99.0, 3.0)]
    assert [e.leaves for e in fills] == [9.0, 7.0, 4.0]
    assert evs[-1].kind == schema.EV_EXPIRED
    total_fee = sum(e.fee for e in fills)
    assert total_fee == pytest.approx(sum(taker_fee(p, q) for p, q in BIDS), rel=1e-12)


def test_ioc_filled_exactly_does_not_expire() -> None:
    ex = exchange()
    evs = submit(ex, 3, schema.SIDE_BUY, schema.TIF_IOC, 101.0, 3.0)
    assert [e.kind for e in evs] == [schema.EV_FILL, schema.EV_FILL]
    assert evs[-1].leaves == 0.0


def test_ioc_fill_with_float_dust_reports_done_not_expired() -> None:
    # 0.4 - 0.1 - 0.2 - 0.1 leaves 2.8e-17 in binary floating point
    ex = exchange(make_book(asks=[(100.5, 0.1), (101.0, 0.2), (101.5, 0.1), (102.0, 5.0)]))
    evs = submit(ex, 4, schema.SIDE_BUY, schema.TIF_IOC, 101.5, 0.4)
    assert [e.kind for e in evs] == [schema.EV_FILL] * 3
    assert evs[-1].leaves == 0.0
    # a crossing GTC filled exactly must not leave a dust order resting
    ex = exchange(make_book(asks=[(100.5, 0.1), (101.0, 0.2), (101.5, 0.1), (102.0, 5.0)]))
    evs = submit(ex, 5, schema.SIDE_BUY, schema.TIF_GTC, 101.5, 0.4)
    assert [e.kind for e in evs] == [schema.EV_ACK] + [schema.EV_FILL] * 3
    assert evs[-1].leaves == 0.0
    assert ex.resting == {}


def test_taken_liquidity_is_gone_until_the_next_book() -> None:
    ex = exchange()
    first = submit(ex, 1, schema.SIDE_BUY, schema.TIF_IOC, 100.5, 0.6)
    assert [(e.kind, e.qty) for e in first] == [(schema.EV_FILL, 0.6)]
    second = submit(ex, 2, schema.SIDE_BUY, schema.TIF_IOC, 100.5, 0.6)
    assert second[0].kind == schema.EV_FILL and second[0].qty == pytest.approx(0.4)
    assert second[1].kind == schema.EV_EXPIRED
    third = submit(ex, 3, schema.SIDE_BUY, schema.TIF_IOC, 100.5, 0.6)
    assert [e.kind for e in third] == [schema.EV_EXPIRED]
    # the other side is untouched
    sell = submit(ex, 4, schema.SIDE_SELL, schema.TIF_IOC, 100.0, 1.0)
    assert [(e.kind, e.px, e.qty) for e in sell] == [(schema.EV_FILL, 100.0, 1.0)]
    # a fresh snapshot brings the level back
    ex.on_book(make_book(), [])
    again = submit(ex, 5, schema.SIDE_BUY, schema.TIF_IOC, 100.5, 0.6)
    assert [(e.kind, e.qty) for e in again] == [(schema.EV_FILL, 0.6)]


def test_gtc_that_crosses_takes_up_to_its_price_then_rests() -> None:
    ex = exchange()
    evs = submit(ex, 7, schema.SIDE_BUY, schema.TIF_GTC, 101.0, 4.0)
    assert evs[0].kind == schema.EV_ACK and evs[0].leaves == 4.0
    assert_fill(evs[1], oid=7, side=1, px=100.5, qty=1.0, leaves=3.0, liq=schema.LIQ_TAKER)
    assert_fill(evs[2], oid=7, side=1, px=101.0, qty=2.0, leaves=1.0, liq=schema.LIQ_TAKER)
    assert len(evs) == 3
    assert ex.resting[7].leaves == pytest.approx(1.0) and ex.resting[7].px == 101.0


# ---------------------------------------------------------------- post-only and resting orders
@pytest.mark.parametrize(
    ("side", "px"),
    [
        (schema.SIDE_BUY, 100.5),
        (schema.SIDE_BUY, 102.0),
        (schema.SIDE_SELL, 100.0),
        (schema.SIDE_SELL, 98.0),
    ],
)
def test_post_only_that_would_cross_is_rejected(side: int, px: float) -> None:
    ex = exchange()
    evs = submit(ex, 9, side, schema.TIF_POST_ONLY, px, 1.0)
    assert len(evs) == 1
    e = evs[0]
    assert e.kind == schema.EV_REJECT
    assert e.reason == schema.REJECT_CODE["post_only_would_cross"]
    assert schema.REJECT_REASONS[e.reason] == "post_only_would_cross"
    assert ex.resting == {}
    assert ex.books[0]["ask_sz"][0] == 1.0 and ex.books[0]["bid_sz"][0] == 1.0  # nothing taken


def test_post_only_behind_the_touch_rests() -> None:
    ex = exchange()
    evs = submit(ex, 10, schema.SIDE_BUY, schema.TIF_POST_ONLY, 100.4, 2.0)
    assert [(e.kind, e.leaves, e.qty) for e in evs] == [(schema.EV_ACK, 2.0, 0.0)]
    assert ex.resting[10].leaves == 2.0


def test_resting_buy_fills_after_its_queue_or_through_its_price() -> None:
    # Changed with the queue model: a print at the price used never to fill; it now trades
    # the queue ahead (the 1.0 visible at 100.0 when the order arrived) and then the order.
    ex = exchange()
    assert (
        submit(ex, 11, schema.SIDE_BUY, schema.TIF_POST_ONLY, 100.0, 1.0)[0].kind == schema.EV_ACK
    )
    assert ex.queue_ahead(11) == 1.0
    out: list[EventTuple] = []
    ex.on_trade(0, 100.0, 0.6, out, aggressor=schema.SIDE_SELL)  # trades the queue ahead
    ex.on_trade(0, 100.0, 5.0, out, aggressor=schema.SIDE_BUY)  # a buyer: not our side
    ex.on_trade(0, 100.2, 5.0, out)
    ex.on_trade(1, 98.0, 5.0, out)  # another symbol
    ex.on_book(make_book(asks=[(100.1, 1.0)]), out)  # ask comes closer but not onto it
    assert out == []
    assert ex.queue_ahead(11) == pytest.approx(0.4)

    ex.on_trade(0, 100.0, 0.7, out, aggressor=schema.SIDE_SELL)  # 0.4 ahead, then 0.3 for us
    assert len(out) == 1
    assert_fill(Ev(*out[0]), oid=11, side=1, px=100.0, qty=0.3, leaves=0.7, liq=schema.LIQ_MAKER)
    assert Ev(*out[0]).recv_ns == 110
    assert ex.resting[11].leaves == pytest.approx(0.7)

    out.clear()
    ex.on_book(make_book(bids=[(99.5, 1.0)], asks=[(100.0, 1.0)]), out)  # ask onto the price
    assert len(out) == 1
    assert_fill(Ev(*out[0]), oid=11, side=1, px=100.0, qty=0.7, leaves=0.0, liq=schema.LIQ_MAKER)
    assert ex.resting == {}


def test_resting_buy_fills_in_full_on_a_print_through_its_price() -> None:
    # Changed with the queue model: a print below the bid used to fill up to the print's
    # size; price-time priority trades the whole level out first, so the order fills in full.
    ex = exchange()
    submit(ex, 11, schema.SIDE_BUY, schema.TIF_POST_ONLY, 100.0, 1.0)
    out: list[EventTuple] = []
    ex.on_trade(0, 99.9, 0.3, out)
    assert len(out) == 1
    assert_fill(Ev(*out[0]), oid=11, side=1, px=100.0, qty=1.0, leaves=0.0, liq=schema.LIQ_MAKER)
    assert ex.resting == {}


@pytest.mark.parametrize("px", [math.nan, math.inf, -1.0, 0.0])
def test_a_print_without_a_real_price_fills_nothing(px: float) -> None:
    ex = exchange()
    submit(ex, 11, schema.SIDE_BUY, schema.TIF_POST_ONLY, 100.0, 1.0)
    out: list[EventTuple] = []
    ex.on_trade(0, px, 5.0, out, aggressor=schema.SIDE_SELL)
    assert out == [] and ex.queue_ahead(11) == 1.0


def test_resting_buy_filled_at_its_price_when_the_ask_gaps_below() -> None:
    ex = exchange()
    submit(ex, 12, schema.SIDE_BUY, schema.TIF_POST_ONLY, 100.0, 1.5)
    out: list[EventTuple] = []
    ex.on_book(make_book(bids=[(99.0, 1.0)], asks=[(99.8, 1.0)]), out)
    assert len(out) == 1
    assert_fill(Ev(*out[0]), oid=12, side=1, px=100.0, qty=1.5, leaves=0.0, liq=schema.LIQ_MAKER)


def test_resting_sell_fills_only_after_its_queue_or_through_its_price() -> None:
    # Changed with the queue model: the at-price print is now split by aggressor side and
    # trades the queue (2.0 visible at 101.0); the print through the price fills both orders
    # in full (it used to fill 2.5 of the 3.0 and leave the rest to the next book).
    ex = exchange()
    submit(ex, 13, schema.SIDE_SELL, schema.TIF_POST_ONLY, 101.0, 2.0)
    submit(ex, 14, schema.SIDE_SELL, schema.TIF_POST_ONLY, 101.0, 1.0)
    out: list[EventTuple] = []
    ex.on_trade(0, 101.0, 1.5, out, aggressor=schema.SIDE_BUY)  # 1.5 of the 2.0 ahead
    ex.on_trade(0, 101.0, 9.0, out, aggressor=schema.SIDE_SELL)  # a seller: not our side
    ex.on_trade(0, 99.0, 9.0, out)
    assert out == []
    assert ex.queue_ahead(13) == ex.queue_ahead(14) == pytest.approx(0.5)
    ex.on_trade(0, 101.5, 2.5, out)  # through the price: the level was swept
    fills = [Ev(*e) for e in out]
    assert sorted((e.order_id, e.qty, e.leaves) for e in fills) == [(13, 2.0, 0.0), (14, 1.0, 0.0)]
    assert all(e.px == 101.0 and e.liquidity == schema.LIQ_MAKER for e in fills)
    assert ex.resting == {}
    out.clear()
    submit(ex, 15, schema.SIDE_SELL, schema.TIF_POST_ONLY, 101.0, 0.5)
    ex.on_book(make_book(bids=[(101.2, 1.0)], asks=[(101.3, 1.0)]), out)  # bid through the price
    assert [(Ev(*e).order_id, Ev(*e).qty) for e in out] == [(15, 0.5)]
    assert ex.resting == {}


@pytest.mark.parametrize("flags", [schema.BOOK_STALE, schema.BOOK_CROSSED])
def test_untradeable_book_does_not_fill_resting_orders(flags: int) -> None:
    ex = exchange()
    submit(ex, 15, schema.SIDE_BUY, schema.TIF_POST_ONLY, 100.0, 1.0)
    out: list[EventTuple] = []
    ex.on_book(make_book(bids=[(99.0, 1.0)], asks=[(99.5, 1.0)], flags=flags), out)
    assert out == []
    assert ex.resting[15].leaves == 1.0


def test_book_of_another_symbol_does_not_fill() -> None:
    ex = exchange(make_book(), make_book(symbol_id=1))
    submit(ex, 16, schema.SIDE_BUY, schema.TIF_POST_ONLY, 100.0, 1.0)
    out: list[EventTuple] = []
    ex.on_book(make_book(asks=[(99.0, 1.0)], bids=[(98.0, 1.0)], symbol_id=1), out)
    assert out == []


# ---------------------------------------------------------------- cancels
def test_cancel_resting_order() -> None:
    ex = exchange()
    submit(ex, 20, schema.SIDE_BUY, schema.TIF_POST_ONLY, 99.5, 1.0)
    out: list[EventTuple] = []
    assert ex.cancel(20, recv_ns=777, out=out)
    assert len(out) == 1
    e = Ev(*out[0])
    assert (e.order_id, e.kind, e.side, e.px, e.leaves, e.recv_ns) == (
        20,
        schema.EV_CANCELED,
        1,
        99.5,
        0.0,
        777,
    )
    assert ex.resting == {}
    out.clear()
    assert not ex.cancel(20, recv_ns=0, out=out)  # already gone
    assert not ex.cancel(12345, recv_ns=0, out=out)  # never existed
    assert out == []
    # a cancelled order no longer fills
    ex.on_trade(0, 90.0, 10.0, out)
    assert out == []


def test_cancel_all() -> None:
    ex = exchange()
    submit(ex, 21, schema.SIDE_BUY, schema.TIF_POST_ONLY, 99.5, 1.0)
    submit(ex, 22, schema.SIDE_SELL, schema.TIF_POST_ONLY, 101.5, 1.0)
    submit(ex, 23, schema.SIDE_BUY, schema.TIF_GTC, 99.0, 1.0)
    out: list[EventTuple] = []
    assert ex.cancel_all(out=out) == 3
    assert sorted((Ev(*e).order_id, Ev(*e).kind) for e in out) == [
        (21, schema.EV_CANCELED),
        (22, schema.EV_CANCELED),
        (23, schema.EV_CANCELED),
    ]
    assert ex.resting == {}
    out.clear()
    assert ex.cancel_all(out=out) == 0 and out == []
