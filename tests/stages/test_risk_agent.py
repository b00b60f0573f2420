"""The risk stage over real rings: orders in, fills out, and a restart that neither loses nor
repeats an order."""

from __future__ import annotations

import time
import uuid

import numpy as np
import pytest

from shm import ring, schema, segment
from stages import config
from stages import riskengine as rk
from stages.instruments import Instrument
from stages.orders import ORDER_STRUCT, pack_order
from stages.risk import RiskAgent
from stages.wiring import CTL_KILL, Engine

# the test books are 1% wide and hold a few hundred dollars: no circuit breaker in fill tests
QUIET = config.from_dict({"risk": {"min_liquidity_usd": 1.0, "wide_spread_bps": 1000.0}})


@pytest.fixture
def eng():
    ns = f"t{uuid.uuid4().hex[:10]}"
    e = Engine.create(config.from_dict({"engine": {"namespace": ns}}))
    e.symbols[0] = Instrument("BTC", 1.0, 0.00001, 10.0).row()
    yield e
    segment.unlink_all(ns)


def book(bid: float, ask: float, size: float = 1.0) -> np.ndarray:
    b = np.zeros(1, schema.BOOK)
    b["symbol_id"] = 0
    b["n_bid"] = b["n_ask"] = 3
    b["bid_px"][0, :3] = [bid, bid - 1, bid - 2]
    b["ask_px"][0, :3] = [ask, ask + 1, ask + 2]
    b["bid_sz"][0, :3] = size
    b["ask_sz"][0, :3] = size
    return b


def send_order(
    eng: Engine, oid: int, *, side: int, qty: float, px: float, tif: int = schema.TIF_IOC
) -> None:
    buf = bytearray(ORDER_STRUCT.size)
    pack_order(
        buf,
        order_id=oid,
        symbol_id=0,
        action=schema.ACTION_NEW,
        style=schema.STYLE_TAKER_NOW,
        tif=tif,
        side=side,
        px=px,
        qty=qty,
        edge_bps=10.0,
        trace=(0, 1, 2, 3, 4, 5),
    )
    assert eng.writer("orders").offer(buf)


def events(eng: Engine) -> np.ndarray:
    r = eng.reader("events", "route")
    out = np.zeros(64, schema.ORDER_EVENT)
    n = r.read_into(out)
    return out[:n]


def test_taker_order_fills_against_the_published_book(eng):
    cfg = QUIET
    agent = RiskAgent(cfg, eng, eng.stage_stats("risk"))
    eng.writer("md_book").offer_array(book(100.0, 101.0, size=0.5))
    send_order(eng, 10, side=1, qty=0.8, px=102.0)
    assert agent.do_work() > 0
    ev = events(eng)
    fills = ev[ev["kind"] == schema.EV_FILL]
    assert fills["px"].tolist() == [101.0, 102.0]
    assert fills["qty"].tolist() == pytest.approx([0.5, 0.3])
    assert eng.stats_all[schema.ROLE_INDEX["risk"]]["ints"][schema.C_ORDERS] == 1
    agent.on_close()
    assert eng.positions["qty"][0] == pytest.approx(0.8)


def test_an_order_read_again_after_a_restart_is_not_executed_twice(eng):
    cfg = QUIET
    agent = RiskAgent(cfg, eng, eng.stage_stats("risk"))
    eng.writer("md_book").offer_array(book(100.0, 101.0, size=5.0))
    send_order(eng, 10, side=1, qty=1.0, px=102.0)
    agent.do_work()
    agent.on_close()
    first = events(eng)
    assert (first["kind"] == schema.EV_FILL).sum() == 1
    # the stage died after acting on the order but before its read cursor was published
    rewind = eng.reader("orders", "risk")
    rewind._line[ring.R_CURSOR] = 0
    restarted = RiskAgent(cfg, eng, eng.stage_stats("risk"))
    assert restarted.positions.qty[0] == pytest.approx(1.0), (
        "positions come back from shared memory"
    )
    restarted.do_work()
    assert len(events(eng)) == 0, "the order must not be executed a second time"
    ints = eng.stats_all[schema.ROLE_INDEX["risk"]]["ints"]
    assert ints[schema.C_DUPLICATES] == 1
    # and a new order after the restart is executed (against a book it has seen since)
    eng.writer("md_book").offer_array(book(100.0, 101.0, size=5.0))
    send_order(eng, 11, side=-1, qty=1.0, px=99.0)
    restarted.do_work()
    assert (events(eng)["kind"] == schema.EV_FILL).sum() == 1
    restarted.on_close()
    assert eng.positions["qty"][0] == pytest.approx(0.0)


# ---------------------------------------------------------------- the risk engine in the stage
def risk_cfg(**risk: object) -> config.Config:
    return config.from_dict({"risk": {"min_liquidity_usd": 1.0, "wide_spread_bps": 1000.0, **risk}})


def send_cancel(eng: Engine, oid: int) -> None:
    buf = bytearray(ORDER_STRUCT.size)
    pack_order(
        buf,
        order_id=oid,
        symbol_id=0,
        action=schema.ACTION_CANCEL,
        style=schema.STYLE_MAKER_PASSIVE,
        tif=0,
        side=1,
        px=0.0,
        qty=0.0,
        edge_bps=0.0,
        trace=(0, 1, 2, 3, 4, 5),
    )
    assert eng.writer("orders").offer(buf)


def risk_ints(eng: Engine) -> np.ndarray:
    out: np.ndarray = eng.stats_all[schema.ROLE_INDEX["risk"]]["ints"]
    return out


def rejects(eng: Engine, reason: str) -> int:
    return int(risk_ints(eng)[schema.REJECT_COUNTERS_BASE + schema.REJECT_CODE[reason]])


def trading(eng: Engine) -> tuple[str, str]:
    g = eng.stats_all[schema.ROLE_INDEX["risk"]]["gauges"]
    return rk.STATE_NAMES[int(g[rk.G_TRADING_STATE])], rk.REASONS[int(g[rk.G_TRADING_REASON])]


def seed_position(eng: Engine, qty: float, avg_px: float) -> None:
    eng.positions[0] = (qty, avg_px, 0.0, 0.0, 0.0, avg_px, abs(qty) * avg_px, 1, 0)


def by_kind(ev: np.ndarray, kind: int) -> list[int]:
    return ev[ev["kind"] == kind]["order_id"].tolist()


def test_manual_kill_cancels_resting_orders_and_blocks_new_ones_until_reset(eng):
    agent = RiskAgent(risk_cfg(), eng, eng.stage_stats("risk"))
    eng.writer("md_book").offer_array(book(100.0, 101.0, size=5.0))
    send_order(eng, 10, side=1, qty=1.0, px=99.0, tif=schema.TIF_POST_ONLY)
    send_order(eng, 11, side=-1, qty=1.0, px=102.0, tif=schema.TIF_POST_ONLY)
    agent.do_work()
    assert by_kind(events(eng), schema.EV_ACK) == [10, 11]
    assert trading(eng) == ("active", "none")
    eng.control[CTL_KILL] = 1  # hft kill
    agent.do_work()
    assert sorted(by_kind(events(eng), schema.EV_CANCELED)) == [10, 11]
    assert agent.exchange.resting == {}
    assert trading(eng) == ("halted", "manual")
    send_order(eng, 12, side=1, qty=0.1, px=102.0)
    agent.do_work()
    ev = events(eng)
    assert by_kind(ev, schema.EV_REJECT) == [12]
    assert ev["reason"].tolist() == [schema.REJECT_CODE["kill_switch"]]
    assert rejects(eng, "kill_switch") == 1
    agent.do_work()
    assert len(events(eng)) == 0, "cancelled once"
    eng.control[CTL_KILL] = 0  # hft kill --reset
    send_order(eng, 13, side=1, qty=0.1, px=102.0)
    agent.do_work()
    assert by_kind(events(eng), schema.EV_FILL) == [13]
    assert trading(eng) == ("active", "none")


def test_a_daily_loss_halts_the_engine_through_the_control_block(eng):
    seed_position(eng, 10.0, 100.0)
    agent = RiskAgent(risk_cfg(max_loss_per_day=300.0), eng, eng.stage_stats("risk"))
    eng.writer("md_book").offer_array(book(100.0, 101.0, size=5.0))
    send_order(eng, 10, side=-1, qty=1.0, px=102.0, tif=schema.TIF_POST_ONLY)
    agent.do_work()
    assert by_kind(events(eng), schema.EV_ACK) == [10]
    assert eng.control[CTL_KILL] == 0
    eng.writer("md_book").offer_array(book(60.0, 61.0, size=5.0))  # 10 x -39.5
    agent.do_work()
    assert eng.control[CTL_KILL] == rk.R_DAILY_LOSS
    assert by_kind(events(eng), schema.EV_CANCELED) == [10]
    assert trading(eng) == ("halted", "daily_loss")
    send_order(eng, 11, side=-1, qty=1.0, px=59.0)
    agent.do_work()
    ev = events(eng)
    assert ev["reason"].tolist() == [schema.REJECT_CODE["halted"]]
    assert rejects(eng, "halted") == 1
    # a restarted stage finds the halt in the control block
    agent.on_close()
    again = RiskAgent(risk_cfg(max_loss_per_day=300.0), eng, eng.stage_stats("risk"))
    send_order(eng, 12, side=-1, qty=1.0, px=59.0)
    again.do_work()
    assert events(eng)["reason"].tolist() == [schema.REJECT_CODE["halted"]]


def test_leverage_puts_the_stage_in_reducing(eng):
    seed_position(eng, 3_100.0, 100.0)  # 3.1x of 100k
    agent = RiskAgent(risk_cfg(max_concentration=1.0), eng, eng.stage_stats("risk"))
    eng.writer("md_book").offer_array(book(100.0, 100.1, size=5_000.0))
    send_order(eng, 10, side=1, qty=1.0, px=101.0)
    send_order(eng, 11, side=-1, qty=1.0, px=99.0)
    agent.do_work()
    ev = events(eng)
    assert trading(eng) == ("reducing", "leverage")
    assert ev[ev["order_id"] == 10]["reason"].tolist() == [schema.REJECT_CODE["reduce_only"]]
    assert by_kind(ev, schema.EV_FILL) == [11]
    assert rejects(eng, "reduce_only") == 1
    assert eng.control[CTL_KILL] == 0


def test_rate_limit_rejects_new_orders_and_holds_cancels_until_a_token(eng):
    agent = RiskAgent(risk_cfg(max_orders_per_s=3.0), eng, eng.stage_stats("risk"))
    eng.writer("md_book").offer_array(book(100.0, 101.0, size=5.0))
    for oid in (1, 2, 3, 4):
        send_order(eng, oid, side=1, qty=0.1, px=95.0 + oid, tif=schema.TIF_POST_ONLY)
    agent.do_work()
    ev = events(eng)
    assert by_kind(ev, schema.EV_ACK) == [1, 2, 3]
    assert ev[ev["order_id"] == 4]["reason"].tolist() == [schema.REJECT_CODE["rate_limited"]]
    assert rejects(eng, "rate_limited") == 1
    send_cancel(eng, 1)
    agent.do_work()
    assert len(events(eng)) == 0, "held, not refused: route would forget a resting order"
    assert risk_ints(eng)[schema.C_RATE_LIMITED] == 2
    time.sleep(0.4)  # > 1 / 3 s: a token
    agent.do_work()
    assert by_kind(events(eng), schema.EV_CANCELED) == [1]


def test_kill_switch_cancels_are_not_rate_limited(eng):
    agent = RiskAgent(risk_cfg(max_orders_per_s=2.0), eng, eng.stage_stats("risk"))
    eng.writer("md_book").offer_array(book(100.0, 101.0, size=5.0))
    for oid in (1, 2):
        send_order(eng, oid, side=1, qty=0.1, px=95.0 + oid, tif=schema.TIF_POST_ONLY)
    agent.do_work()
    assert by_kind(events(eng), schema.EV_ACK) == [1, 2]
    eng.control[CTL_KILL] = 1
    agent.do_work()
    assert sorted(by_kind(events(eng), schema.EV_CANCELED)) == [1, 2]


def test_a_circuit_breaker_rejects_orders_in_its_symbol_and_counts_trips(eng):
    cfg = config.from_dict({})  # the shipped thresholds: a $600 book is thin
    agent = RiskAgent(cfg, eng, eng.stage_stats("risk"))
    eng.writer("md_book").offer_array(book(100.0, 100.01, size=1.0))
    send_order(eng, 10, side=1, qty=0.1, px=101.0)
    agent.do_work()
    assert events(eng)["reason"].tolist() == [schema.REJECT_CODE["circuit_breaker"]]
    assert rejects(eng, "circuit_breaker") == 1
    assert agent.checks.breaker[0] == rk.B_THIN_BOOK
    assert eng.stats_all[schema.ROLE_INDEX["risk"]]["gauges"][rk.G_BREAKER_TRIPS] == 1


def test_holding_time_the_stage_closes_the_position_itself(eng):
    seed_position(eng, 2.0, 100.0)
    cfg = risk_cfg(max_holding_s=0.05)
    agent = RiskAgent(cfg, eng, eng.stage_stats("risk"))
    eng.writer("md_book").offer_array(book(100.0, 100.1, size=5.0))
    agent.do_work()  # the clock starts
    assert len(events(eng)) == 0
    time.sleep(0.1)
    agent.do_work()
    ev = events(eng)
    fills = ev[ev["kind"] == schema.EV_FILL]
    assert fills["qty"].sum() == pytest.approx(2.0)
    assert (fills["side"] == -1).all()
    assert all(oid & rk.RISK_ORDER_BIT for oid in fills["order_id"].tolist())
    assert risk_ints(eng)[schema.C_ORDERS] == 1
    agent.do_work()
    assert trading(eng) == ("active", "none")
    agent.on_close()
    assert eng.positions["qty"][0] == 0.0
