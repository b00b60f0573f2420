"""The route kernel: the seed's style tree, sizing, rounding, the gate and order hygiene."""

from __future__ import annotations

import math
from typing import Any

import pytest

from shm import schema
from stages.config import GateConfig, RiskConfig, RouteConfig
from stages.orders import Event
from stages.route import (
    TAKER_THROUGH_BPS,
    Router,
    SymbolSpec,
    choose_style,
    round_down,
    round_up,
    size_notional,
)

MS = 1_000_000
TICK = 0.1
LOT = 0.001
BID, ASK = 2000.0, 2000.1
MID = (BID + ASK) / 2
SPREAD_BPS = (ASK - BID) / MID * 1e4  # about 0.5 bps


def make_router(**route_kw: Any) -> Router:
    return Router(
        gate=GateConfig(),
        route=RouteConfig(**route_kw),
        risk=RiskConfig(),
        specs={
            0: SymbolSpec(tick=TICK, lot=LOT, min_notional=10.0),
            1: SymbolSpec(tick=0.01, lot=0.01, min_notional=10.0),
        },
        next_order_id=1000,
    )


def signal(**kw: Any) -> dict[str, Any]:
    """A tradeable signal (passes the default gate); keyword overrides."""
    sig: dict[str, Any] = {
        "symbol_id": 0,
        "flags": schema.SIG_FALLBACK,
        "edge_bps": 8.0,
        "confidence": 0.8,
        "urgency": 0.3,
        "mid": MID,
        "best_bid": BID,
        "best_ask": ASK,
        "spread_bps": SPREAD_BPS,
        "halted": False,
        "now_ns": 10_000 * MS,
    }
    sig.update(kw)
    return sig


def event(
    order_id: int,
    kind: int,
    *,
    side: int = 1,
    qty: float = 0.0,
    leaves: float = 0.0,
    symbol_id: int = 0,
) -> Event:
    return Event(order_id, symbol_id, kind, 0, 0, side, 0, BID, qty, leaves, 0.0, 0, 0)


def on_grid(x: float, step: float) -> bool:
    k = x / step
    return abs(k - round(k)) < 1e-6


# ---------------------------------------------------------------- style tree
@pytest.mark.parametrize(
    ("urgency", "edge", "spread", "style"),
    [
        (0.81, 10.01, 5.0, schema.STYLE_TAKER_NOW),
        (0.81, -10.01, 5.0, schema.STYLE_TAKER_NOW),  # |edge|
        (1.0, 50.0, 9.0, schema.STYLE_TAKER_NOW),  # spread does not matter for the taker
        (0.8, 50.0, 1.0, schema.STYLE_SNIPER),  # urgency 0.8 is not > 0.8
        (0.9, 10.0, 1.0, schema.STYLE_SNIPER),  # edge 10 is not > 10
        (0.9, -10.0, 1.0, schema.STYLE_SNIPER),
        (0.8, 50.0, 3.0, schema.STYLE_MAKER_PASSIVE),  # spread 3 is not < 3
        (0.51, 5.0, 2.99, schema.STYLE_SNIPER),
        (0.5, 5.0, 1.0, schema.STYLE_MAKER_PASSIVE),  # urgency 0.5 is not > 0.5
        (0.51, 5.0, 3.0, schema.STYLE_MAKER_PASSIVE),
        (0.0, 100.0, 0.1, schema.STYLE_MAKER_PASSIVE),
    ],
)
def test_choose_style_boundaries(urgency: float, edge: float, spread: float, style: int) -> None:
    assert choose_style(urgency, edge, spread) == style


@pytest.mark.parametrize(
    ("urgency", "edge", "spread", "style", "tif"),
    [
        (0.9, 12.0, 1.0, schema.STYLE_TAKER_NOW, schema.TIF_IOC),
        (0.7, 8.0, 1.0, schema.STYLE_SNIPER, schema.TIF_GTC),
        (0.7, 8.0, 4.0, schema.STYLE_MAKER_PASSIVE, schema.TIF_POST_ONLY),
        (0.2, 8.0, 1.0, schema.STYLE_MAKER_PASSIVE, schema.TIF_POST_ONLY),
    ],
)
def test_style_sets_time_in_force(
    urgency: float, edge: float, spread: float, style: int, tif: int
) -> None:
    order = make_router().on_signal(**signal(urgency=urgency, edge_bps=edge, spread_bps=spread))
    assert order is not None
    assert (order.style, order.tif) == (style, tif)


# ---------------------------------------------------------------- sizing and rounding
@pytest.mark.parametrize(
    ("base", "conf", "urg"), [(2000.0, 0.8, 0.3), (1000.0, 0.5, 0.0), (2500.0, 1.0, 1.0)]
)
def test_size_notional_formula(base: float, conf: float, urg: float) -> None:
    assert size_notional(base, conf, urg) == pytest.approx(base * conf**2 * (1 + urg / 2))


def test_round_down_and_up_to_step() -> None:
    assert round_down(1.2345, 0.01) == pytest.approx(1.23)
    assert round_up(1.2301, 0.01) == pytest.approx(1.24)
    # values already on the grid stay put despite binary floating point
    for k in range(1, 2000):
        x = k * 0.1
        assert round_down(x, 0.1) == pytest.approx(x)
        assert round_up(x, 0.1) == pytest.approx(x)
        assert round_down(k * 0.001 + 0.0004, 0.001) == pytest.approx(k * 0.001)
        assert round_up(k * 0.001 + 0.0004, 0.001) == pytest.approx((k + 1) * 0.001)


@pytest.mark.parametrize(
    ("conf", "urg", "mid"), [(0.8, 0.3, MID), (0.55, 0.0, 1234.567), (1.0, 0.45, 77.7)]
)
def test_qty_is_the_sizing_formula_rounded_down_to_the_lot(
    conf: float, urg: float, mid: float
) -> None:
    bid, ask = mid - 0.05, mid + 0.05
    r = make_router()
    order = r.on_signal(
        **signal(confidence=conf, urgency=urg, mid=mid, best_bid=bid, best_ask=ask, spread_bps=1.0)
    )
    assert order is not None
    want_base = 2000.0 * conf * conf * (1 + urg / 2) / mid
    assert on_grid(order.qty, LOT)
    assert order.qty <= want_base + 1e-12
    assert want_base - order.qty < LOT
    assert order.qty > 0


def test_passive_prices_are_one_tick_behind_the_touch() -> None:
    buy = make_router().on_signal(**signal(edge_bps=8.0))
    sell = make_router().on_signal(**signal(edge_bps=-8.0))
    assert buy is not None and sell is not None
    assert buy.style == sell.style == schema.STYLE_MAKER_PASSIVE
    assert buy.side == schema.SIDE_BUY and sell.side == schema.SIDE_SELL
    assert buy.px == pytest.approx(BID - TICK) and on_grid(buy.px, TICK)
    assert sell.px == pytest.approx(ASK + TICK) and on_grid(sell.px, TICK)
    assert buy.edge_bps == 8.0 and sell.edge_bps == -8.0


def test_passive_prices_off_the_grid_round_away_from_crossing() -> None:
    bid, ask = 2000.03, 2000.17  # touch between ticks
    mid = (bid + ask) / 2
    kw = {"best_bid": bid, "best_ask": ask, "mid": mid, "spread_bps": 0.7}
    buy = make_router().on_signal(**signal(edge_bps=8.0, **kw))
    sell = make_router().on_signal(**signal(edge_bps=-8.0, **kw))
    assert buy is not None and sell is not None
    assert on_grid(buy.px, TICK) and on_grid(sell.px, TICK)
    assert bid - 2 * TICK < buy.px <= bid - TICK + 1e-9  # 1999.9
    assert ask + TICK - 1e-9 <= sell.px < ask + 2 * TICK  # 2000.3
    assert buy.px == pytest.approx(1999.9) and sell.px == pytest.approx(2000.3)


def test_sniper_joins_the_touch() -> None:
    kw = {"urgency": 0.7, "spread_bps": 1.0}
    buy = make_router().on_signal(**signal(edge_bps=8.0, **kw))
    sell = make_router().on_signal(**signal(edge_bps=-8.0, **kw))
    assert buy is not None and sell is not None
    assert buy.style == sell.style == schema.STYLE_SNIPER
    assert buy.px == BID and sell.px == ASK


def test_taker_crosses_through_the_touch_rounded_to_the_tick() -> None:
    kw = {"urgency": 0.95, "spread_bps": 1.0}
    buy = make_router().on_signal(**signal(edge_bps=15.0, **kw))
    sell = make_router().on_signal(**signal(edge_bps=-15.0, **kw))
    assert buy is not None and sell is not None
    assert buy.style == sell.style == schema.STYLE_TAKER_NOW
    through = TAKER_THROUGH_BPS * 1e-4
    assert on_grid(buy.px, TICK) and on_grid(sell.px, TICK)
    assert ASK * (1 + through) - 1e-9 <= buy.px < ASK * (1 + through) + TICK
    assert BID * (1 - through) - TICK < sell.px <= BID * (1 - through) + 1e-9
    assert buy.px > ASK and sell.px < BID


# ---------------------------------------------------------------- the gate
@pytest.mark.parametrize(
    ("override", "reason"),
    [
        ({"edge_bps": 4.99}, "gate"),
        ({"edge_bps": -4.99}, "gate"),
        ({"confidence": 0.49}, "gate"),
        ({"spread_bps": 10.01}, "gate"),
        ({"spread_bps": math.nan}, "gate"),
        ({"flags": schema.SIG_FALLBACK | schema.SIG_UNTRADEABLE}, "untradeable"),
        ({"halted": True}, "halted"),
        ({"symbol_id": 7}, "untradeable"),  # no instrument spec
        ({"best_bid": 0.0}, "untradeable"),
        ({"best_bid": ASK, "best_ask": BID}, "untradeable"),  # crossed
    ],
)
def test_gate_rejects_and_counts_why(override: dict[str, Any], reason: str) -> None:
    r = make_router()
    assert r.on_signal(**signal(**override)) is None
    assert r.skipped == {reason: 1}
    assert r.open_orders == {} and r.last_order_ns == {}
    assert r.next_order_id == 1000


@pytest.mark.parametrize(
    "override",
    [{"edge_bps": 5.0}, {"edge_bps": -5.0}, {"confidence": 0.5}, {"spread_bps": 10.0}],
)
def test_gate_thresholds_are_inclusive(override: dict[str, Any]) -> None:
    assert make_router().on_signal(**signal(**override)) is not None


def test_untradeable_and_gate_are_checked_before_halted() -> None:
    r = make_router()
    r.on_signal(**signal(halted=True, edge_bps=1.0))
    r.on_signal(**signal(halted=True, flags=schema.SIG_UNTRADEABLE))
    assert r.skipped == {"gate": 1, "untradeable": 1}


# ---------------------------------------------------------------- hygiene
def test_throttle_by_min_order_interval_per_symbol() -> None:
    r = make_router(min_order_interval_ms=250.0, max_open_orders_per_symbol=10)
    t0 = 10_000 * MS
    first = r.on_signal(**signal(now_ns=t0))
    assert first is not None
    assert r.on_signal(**signal(now_ns=t0 + 250 * MS - 1)) is None
    assert r.skipped == {"throttle": 1}
    # another symbol is not throttled by the first
    other = r.on_signal(
        **signal(
            symbol_id=1, now_ns=t0 + 1, mid=100.0, best_bid=99.99, best_ask=100.01, spread_bps=2.0
        )
    )
    assert other is not None
    second = r.on_signal(**signal(now_ns=t0 + 250 * MS))
    assert second is not None
    assert second.order_id == other.order_id + 1 == first.order_id + 2
    # a skipped signal does not restart the interval
    assert r.on_signal(**signal(now_ns=t0 + 400 * MS)) is None
    assert r.on_signal(**signal(now_ns=t0 + 500 * MS)) is not None


def test_max_open_orders_per_symbol() -> None:
    r = make_router(min_order_interval_ms=0.0, max_open_orders_per_symbol=2)
    a = r.on_signal(**signal(now_ns=1))
    b = r.on_signal(**signal(now_ns=2))
    assert a is not None and b is not None
    assert r.open_count(0) == 2
    assert r.on_signal(**signal(now_ns=3)) is None
    assert r.skipped == {"open_orders": 1}
    r.on_event(event(a.order_id, schema.EV_CANCELED))
    assert r.open_count(0) == 1
    assert r.on_signal(**signal(now_ns=4)) is not None


def test_min_notional_and_zero_lot_are_skipped() -> None:
    # 100 * 0.6^2 = 36 USD < 50 USD minimum
    r = Router(
        gate=GateConfig(),
        route=RouteConfig(base_size_usd=100.0),
        risk=RiskConfig(),
        specs={0: SymbolSpec(tick=TICK, lot=LOT, min_notional=50.0)},
        next_order_id=1,
    )
    assert r.on_signal(**signal(confidence=0.6, urgency=0.0)) is None
    assert r.skipped == {"min_size": 1}
    # 100 * 0.8^2 * 1.15 = 73.6 USD >= 50 USD
    assert r.on_signal(**signal(confidence=0.8, urgency=0.3)) is not None
    # a lot larger than the whole order rounds the quantity down to zero
    r = Router(
        gate=GateConfig(),
        route=RouteConfig(),
        risk=RiskConfig(),
        specs={0: SymbolSpec(tick=TICK, lot=1.0, min_notional=0.0)},
        next_order_id=1,
    )
    assert r.on_signal(**signal()) is None  # 1472 USD at 2000 USD per lot
    assert r.skipped == {"min_size": 1}
    assert r.open_orders == {}


def test_position_limit_stops_adding_on_the_same_side() -> None:
    r = make_router()
    cap = RiskConfig().max_notional_per_symbol
    r.position[0] = cap / MID * 0.999  # long just under the cap
    assert r.on_signal(**signal(edge_bps=8.0)) is None
    assert r.skipped == {"position_limit": 1}
    # reducing is fine
    sell = r.on_signal(**signal(edge_bps=-8.0))
    assert sell is not None and sell.side == schema.SIDE_SELL


def test_cancels_for_after_ttl() -> None:
    r = make_router(order_ttl_ms=3000.0)
    t0 = 10_000 * MS
    o = r.on_signal(**signal(now_ns=t0))
    assert o is not None
    ttl = 3000 * MS
    assert r.cancels_for(0, schema.SIDE_BUY, t0 + ttl) == []  # not older than the TTL yet
    assert r.cancels_for(1, 0, t0 + 2 * ttl) == []  # another symbol
    out = r.cancels_for(0, schema.SIDE_BUY, t0 + ttl + 1)
    assert [c.order_id for c in out] == [o.order_id]
    assert r.cancels_for(0, 0, t0 + 2 * ttl) == []  # a cancel is asked for once
    assert o.order_id in r.open_orders  # it stays open until the venue confirms


def test_cancels_for_when_direction_flips() -> None:
    r = make_router(min_order_interval_ms=0.0, max_open_orders_per_symbol=5)
    buy = r.on_signal(**signal(edge_bps=8.0, now_ns=1))
    sell = r.on_signal(**signal(edge_bps=-8.0, now_ns=2))
    assert buy is not None and sell is not None
    assert r.cancels_for(0, 0, 3) == []  # no direction: nothing against anyone
    assert r.cancels_for(0, schema.SIDE_BUY, 3)[0].order_id == sell.order_id
    assert r.cancels_for(0, schema.SIDE_BUY, 4) == []
    assert [c.order_id for c in r.cancels_for(0, schema.SIDE_SELL, 5)] == [buy.order_id]


def test_taker_orders_are_never_cancelled_by_the_router() -> None:
    r = make_router()
    o = r.on_signal(**signal(urgency=0.95, edge_bps=15.0, now_ns=1))
    assert o is not None and o.style == schema.STYLE_TAKER_NOW
    assert r.cancels_for(0, schema.SIDE_SELL, 10_000_000 * MS) == []


def test_on_event_bookkeeping() -> None:
    r = make_router(min_order_interval_ms=0.0, max_open_orders_per_symbol=10)
    orders = [r.on_signal(**signal(now_ns=k)) for k in range(5)]
    assert all(o is not None for o in orders)
    a, b, c, d, e = (o.order_id for o in orders if o is not None)
    q = orders[0].qty if orders[0] is not None else 0.0

    r.on_event(event(a, schema.EV_ACK, leaves=q))
    assert r.open_orders[a].leaves == q and r.position.get(0, 0.0) == 0.0
    r.on_event(event(a, schema.EV_FILL, qty=0.25 * q, leaves=0.75 * q))
    assert r.open_orders[a].leaves == pytest.approx(0.75 * q)
    assert r.position[0] == pytest.approx(0.25 * q)
    r.on_event(event(a, schema.EV_FILL, qty=0.75 * q, leaves=0.0))
    assert a not in r.open_orders
    assert r.position[0] == pytest.approx(q)

    for oid, kind in ((b, schema.EV_CANCELED), (c, schema.EV_EXPIRED), (d, schema.EV_REJECT)):
        r.on_event(event(oid, kind))
        assert oid not in r.open_orders
    assert list(r.open_orders) == [e]
    assert r.position[0] == pytest.approx(q)

    # a sell fill moves the position down, even of an order the router no longer tracks
    r.on_event(event(999_999, schema.EV_FILL, side=-1, qty=2.5 * q, leaves=0.0))
    assert r.position[0] == pytest.approx(-1.5 * q)
    # unknown order ids for the other kinds are ignored
    r.on_event(event(999_998, schema.EV_CANCELED))
    assert list(r.open_orders) == [e]


def test_cancels_for_when_the_market_moves_away() -> None:
    r = make_router(min_order_interval_ms=0.0, max_open_orders_per_symbol=5)
    buy = r.on_signal(**signal(edge_bps=8.0, now_ns=1))
    sell = r.on_signal(**signal(edge_bps=-8.0, now_ns=2))
    assert buy is not None and sell is not None
    away = r.route.reprice_away_bps * 1e-4
    # the touch still near both orders: nothing to do
    assert r.cancels_for(0, 0, 3, buy.px, sell.px) == []
    assert r.cancels_for(0, 0, 3, buy.px * (1 + away * 0.9), sell.px * (1 - away * 0.9)) == []
    # the bid ran up past reprice_away_bps: the buy sits at the back of a queue that won't trade
    out = r.cancels_for(0, 0, 4, buy.px * (1 + away * 1.1), sell.px)
    assert [c.order_id for c in out] == [buy.order_id]
    # the ask fell away from the sell the same way
    out = r.cancels_for(0, 0, 5, buy.px, sell.px * (1 - away * 1.1))
    assert [c.order_id for c in out] == [sell.order_id]
