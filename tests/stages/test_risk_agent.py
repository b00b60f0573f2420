"""The risk stage over real rings: orders in, fills out, every order and fill journaled before
it is acted on, and a restart that rebuilds positions and open orders from the journal and
neither loses nor repeats an order, a fill or a funding payment."""

from __future__ import annotations

import dataclasses
import math
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from shm import ring, schema, segment
from stages import config
from stages import journal as jr
from stages import riskengine as rk
from stages.instruments import Instrument
from stages.journal import Journal
from stages.orders import ORDER_STRUCT, pack_order
from stages.risk import RiskAgent, rebuild_positions
from stages.wiring import CTL_DRAINED, CTL_DRAINING, CTL_KILL, Engine

# the test books are 1% wide and hold a few hundred dollars: no circuit breaker in fill tests
QUIET = config.from_dict({"risk": {"min_liquidity_usd": 1.0, "wide_spread_bps": 1000.0}})


@pytest.fixture
def eng(tmp_path):
    ns = f"t{uuid.uuid4().hex[:10]}"
    e = Engine.create(config.from_dict({"engine": {"namespace": ns}}))
    e.symbols[0] = Instrument("BTC", 1.0, 0.00001, 10.0).row()
    e.jpath = tmp_path / "journal" / "risk.sqlite"  # every agent of a test shares it
    e.agents = []
    yield e
    for a in e.agents:
        a.journal.close()
    segment.unlink_all(ns)


def make_agent(eng: Engine, cfg: config.Config = QUIET, *, latency_ms: float = 0.0, **kw):
    """A RiskAgent on the test's journal; order-entry latency 0 unless asked (the paper
    exchange then acts on submit at once, as the tests below expect)."""
    paper = dataclasses.replace(cfg.paper, journal_path=str(eng.jpath), latency_ms=latency_ms)
    agent = RiskAgent(dataclasses.replace(cfg, paper=paper), eng, eng.stage_stats("risk"), **kw)
    eng.agents.append(agent)
    return agent


def kill(agent: RiskAgent) -> None:
    """What kill -9 leaves: no on_close (nothing more written to shared memory), the journal's
    lock released by the OS (its committed transactions stay), and write-ahead records not
    flushed into SQLite left in the write-ahead file."""
    j = agent.journal
    j._pending.clear()  # the process's memory: gone
    if j._ahead is not None:
        j._ahead.close()
    j._conn.close()


def jrows(j: Journal, sql: str) -> list[tuple]:
    return j._conn.execute(sql).fetchall()


def book(bid: float, ask: float, size: float = 1.0, *, s: int = 0) -> np.ndarray:
    b = np.zeros(1, schema.BOOK)
    b["symbol_id"] = s
    b["recv_ns"] = time.monotonic_ns()  # after any order placed so far: it may touch them all
    b["n_bid"] = b["n_ask"] = 3
    b["bid_px"][0, :3] = [bid, bid - 1, bid - 2]
    b["ask_px"][0, :3] = [ask, ask + 1, ask + 2]
    b["bid_sz"][0, :3] = size
    b["ask_sz"][0, :3] = size
    return b


def send_order(
    eng: Engine,
    oid: int,
    *,
    side: int,
    qty: float,
    px: float,
    tif: int = schema.TIF_IOC,
    s: int = 0,
    age_ms: float = 0.0,
) -> None:
    tick = time.monotonic_ns() - round(age_ms * 1e6)
    buf = bytearray(ORDER_STRUCT.size)
    pack_order(
        buf,
        order_id=oid,
        symbol_id=s,
        action=schema.ACTION_NEW,
        style=schema.STYLE_TAKER_NOW,
        tif=tif,
        side=side,
        px=px,
        qty=qty,
        edge_bps=10.0,
        trace=(0, *[tick] * 5),
    )
    assert eng.writer("orders").offer(buf)


def events(eng: Engine) -> np.ndarray:
    r = eng.reader("events", "route")
    out = np.zeros(64, schema.ORDER_EVENT)
    n = r.read_into(out)
    return out[:n]


def test_taker_order_fills_against_the_published_book(eng):
    cfg = QUIET
    agent = make_agent(eng, cfg)
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
    agent = make_agent(eng, cfg)
    eng.writer("md_book").offer_array(book(100.0, 101.0, size=5.0))
    send_order(eng, 10, side=1, qty=1.0, px=102.0)
    agent.do_work()
    agent.on_close()
    first = events(eng)
    assert (first["kind"] == schema.EV_FILL).sum() == 1
    # the stage died after acting on the order but before its read cursor was published
    rewind = eng.reader("orders", "risk")
    rewind._line[ring.R_CURSOR] = 0
    restarted = make_agent(eng, cfg)
    assert restarted.positions.qty[0] == pytest.approx(1.0), "positions come back from the journal"
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
        trace=(0, *[time.monotonic_ns()] * 5),  # a fresh tick
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


def seed_position(eng: Engine, qty: float, avg_px: float, s: int = 0) -> None:
    """A position as a filled order in the journal (where a starting stage takes it from)."""
    side = 1 if qty > 0 else -1
    with Journal(eng.jpath) as j:
        oid = j.highest_order_id() + 1
        now = time.time_ns()
        j.order_new(oid, s, side, abs(qty), avg_px, schema.STYLE_TAKER_NOW, schema.TIF_IOC, now)
        j.fill(oid, f"seed.{oid}", s, side, abs(qty), avg_px, 0.0, "taker", now)


def by_kind(ev: np.ndarray, kind: int) -> list[int]:
    return ev[ev["kind"] == kind]["order_id"].tolist()


def test_manual_kill_cancels_resting_orders_and_blocks_new_ones_until_reset(eng):
    agent = make_agent(eng, risk_cfg())
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
    # journaled: the cancel request before the mass cancel, then its confirmation
    assert jrows(
        agent.journal, "SELECT order_id, state, cancel_ns > 0 FROM orders ORDER BY order_id"
    ) == [(10, jr.CANCELED, 1), (11, jr.CANCELED, 1)]
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
    agent = make_agent(eng, risk_cfg(max_loss_per_day=300.0))
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
    again = make_agent(eng, risk_cfg(max_loss_per_day=300.0))
    send_order(eng, 12, side=-1, qty=1.0, px=59.0)
    again.do_work()
    assert events(eng)["reason"].tolist() == [schema.REJECT_CODE["halted"]]


def test_leverage_puts_the_stage_in_reducing(eng):
    seed_position(eng, 3_100.0, 100.0)  # 3.1x of 100k
    agent = make_agent(eng, risk_cfg(max_concentration=1.0))
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
    agent = make_agent(eng, risk_cfg(max_orders_per_s=3.0))
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
    time.sleep(1.05)  # the sends left the 1 s window: a slot
    agent.do_work()
    assert by_kind(events(eng), schema.EV_CANCELED) == [1]


def test_kill_switch_cancels_are_not_rate_limited(eng):
    agent = make_agent(eng, risk_cfg(max_orders_per_s=2.0))
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
    agent = make_agent(eng, cfg)
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
    agent = make_agent(eng, cfg)
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
    # the engine's own IOC is journaled like route's orders, with its origin
    assert jrows(agent.journal, "SELECT status, tif FROM order_status WHERE origin = 'risk'") == [
        ("filled", schema.TIF_IOC)
    ]
    agent.do_work()
    assert trading(eng) == ("active", "none")
    agent.on_close()
    assert eng.positions["qty"][0] == 0.0


# ---------------------------------------------------------------- the paper venue's wiring
def trade(px: float, sz: float, aggressor: int, *, s: int = 0) -> np.ndarray:
    t = np.zeros(1, schema.TRADE)
    t["symbol_id"], t["side"], t["px"], t["sz"] = s, aggressor, px, sz
    t["recv_ns"] = time.monotonic_ns()
    return t


def test_paper_venue_latency_fees_per_venue_aggressor_and_orders_in_flight(eng):
    eng.symbols[1] = Instrument("ETH", 0.1, 0.001, 10.0, venue="binance").row()
    eng.symbols[2] = Instrument("SOL", 0.01, 0.01, 10.0, venue="hyperliquid").row()
    cfg = config.from_dict(
        {
            "risk": {"min_liquidity_usd": 1.0, "wide_spread_bps": 1000.0},
            "paper": {"hyperliquid_taker_fee_bps": 3.5, "hyperliquid_maker_fee_bps": 0.5},
        }
    )
    agent = make_agent(eng, cfg, latency_ms=20.0)
    ex = agent.exchange
    assert ex.latency_ns == 20_000_000
    assert ex.fees(0) == (4.5, 1.5)  # sim: [risk]
    assert ex.fees(1) == (5.0, 2.0)  # binance: [paper]
    assert ex.fees(2) == (3.5, 0.5)  # hyperliquid: [paper]
    eng.writer("md_book").offer_array(book(100.0, 102.0, size=5.0))
    eng.writer("md_book").offer_array(book(100.0, 101.0, size=5.0, s=1))
    agent.do_work()
    send_order(eng, 10, side=1, qty=1.0, px=101.0, tif=schema.TIF_POST_ONLY)  # inside the spread
    send_order(eng, 11, side=1, qty=0.5, px=102.0, s=1)  # an IOC on the binance symbol
    agent._next_gauges_ns = 0  # the periodic save of every row
    agent.do_work()
    assert len(events(eng)) == 0, "on their way to the book"
    assert eng.positions["open_orders"][:2].tolist() == [1, 1], "in flight counts as open"
    assert jrows(agent.journal, "SELECT order_id, state FROM orders ORDER BY order_id") == [
        (10, jr.NEW),
        (11, jr.NEW),
    ], "journaled before they were handed to the venue"
    time.sleep(0.025)
    agent.do_work()  # advance(): both reached the book
    ev = events(eng)
    assert by_kind(ev, schema.EV_ACK) == [10]
    fill = ev[ev["kind"] == schema.EV_FILL]
    assert fill["order_id"].tolist() == [11]
    assert fill["fee"][0] == pytest.approx(101.0 * 0.5 * 5.0e-4)  # binance taker
    # a buy print at our bid's price is the ask trading: it does not fill the bid
    eng.writer("md_trade").offer_array(trade(101.0, 5.0, aggressor=1))
    agent.do_work()
    assert len(events(eng)) == 0
    eng.writer("md_trade").offer_array(trade(101.0, 0.4, aggressor=-1))
    agent.do_work()
    fill = events(eng)
    assert fill["order_id"].tolist() == [10] and fill["qty"][0] == pytest.approx(0.4)
    assert fill["fee"][0] == pytest.approx(101.0 * 0.4 * 1.5e-4)  # sim maker
    assert jrows(agent.journal, "SELECT fill_id, liquidity FROM fills ORDER BY seq") == [
        ("11.1", "taker"),
        ("10.1", "maker"),
    ]


def test_orders_acks_fills_rejects_and_cancels_are_journaled(eng):
    agent = make_agent(eng)
    eng.writer("md_book").offer_array(book(100.0, 101.0, size=5.0))
    send_order(eng, 10, side=1, qty=1.0, px=102.0)  # IOC: fills
    send_order(eng, 11, side=1, qty=1.0, px=99.0, tif=schema.TIF_POST_ONLY)  # rests
    send_order(eng, 12, side=1, qty=1.0, px=101.0, tif=schema.TIF_POST_ONLY)  # venue: would cross
    send_order(eng, 13, side=1, qty=-1.0, px=99.0)  # refused before the venue: not journaled
    agent.do_work()
    send_cancel(eng, 11)
    agent.do_work()
    assert jrows(
        agent.journal, "SELECT order_id, status, reason FROM order_status ORDER BY order_id"
    ) == [(10, "filled", None), (11, "canceled", None), (12, "rejected", "post_only_would_cross")]
    assert jrows(agent.journal, "SELECT fill_id, order_id, qty, px FROM fills") == [
        ("10.1", 10, 1.0, 101.0)
    ]


def test_the_drain_journals_its_cancels_and_confirms(eng):
    agent = make_agent(eng, latency_ms=50.0)
    eng.writer("md_book").offer_array(book(100.0, 101.0, size=5.0))
    agent.do_work()
    send_order(eng, 10, side=1, qty=1.0, px=99.0, tif=schema.TIF_POST_ONLY)
    agent.do_work()
    assert agent.exchange.open_ids() == [10]  # still on its way
    eng.control[CTL_DRAINING] = 1
    agent.do_work()
    assert by_kind(events(eng), schema.EV_CANCELED) == [10]
    assert eng.control[CTL_DRAINED] == 1
    assert jrows(agent.journal, "SELECT state, cancel_ns > 0 FROM orders") == [(jr.CANCELED, 1)]


# ---------------------------------------------------------------- write first, then act
def test_an_order_journaled_but_never_sent_is_sent_by_the_restarted_stage(eng):
    agent = make_agent(eng)
    eng.writer("md_book").offer_array(book(100.0, 102.0, size=5.0))
    agent.do_work()

    def killed(**_: object) -> None:
        raise RuntimeError("kill -9 between the journal and the venue")

    agent.exchange.submit = killed
    send_order(eng, 20, side=1, qty=1.0, px=101.0, tif=schema.TIF_POST_ONLY)
    with pytest.raises(RuntimeError):
        agent.do_work()
    kill(agent)
    assert len(events(eng)) == 0, "nothing reported"
    again = make_agent(eng)
    assert again.journal.replayed == 1, "the order was in the write-ahead file only"
    assert list(again.exchange.resting) == [20], "journaled NEW: treated as sent"
    assert by_kind(events(eng), schema.EV_ACK) == [20]
    again.do_work()  # the order is read again from the ring: not sent a second time
    assert len(events(eng)) == 0
    assert risk_ints(eng)[schema.C_DUPLICATES] == 1
    assert jrows(again.journal, "SELECT order_id, state FROM orders") == [(20, jr.ACKED)]


def test_an_event_batch_the_journal_did_not_take_is_neither_applied_nor_published(eng):
    agent = make_agent(eng)
    eng.writer("md_book").offer_array(book(100.0, 102.0, size=5.0))
    send_order(eng, 30, side=1, qty=1.0, px=101.0, tif=schema.TIF_POST_ONLY)
    agent.do_work()
    assert by_kind(events(eng), schema.EV_ACK) == [30]

    def disk_failed(*_: object) -> bool:
        raise OSError("disk I/O error")

    agent.journal.fill = disk_failed
    eng.writer("md_book").offer_array(book(99.0, 100.0, size=5.0))  # through its price
    with pytest.raises(OSError):
        agent.do_work()
    assert len(events(eng)) == 0, "not published"
    assert agent.positions.qty[0] == 0.0 and eng.positions["fills"][0] == 0, "not applied"
    kill(agent)
    again = make_agent(eng)
    assert again.positions.qty[0] == 0.0
    assert list(again.exchange.resting) == [30], "for everybody the fill never happened"
    eng.writer("md_book").offer_array(book(99.0, 100.0, size=5.0))
    again.do_work()
    assert by_kind(events(eng), schema.EV_FILL) == [30]
    assert again.positions.qty[0] == 1.0 and eng.positions["qty"][0] == 1.0


# ---------------------------------------------------------------- restart from the journal
def position_rows(table: np.ndarray) -> list[tuple[float, ...]]:
    cols = ("qty", "avg_px", "realized", "fees", "volume", "fills", "open_orders")
    return [tuple(r) for r in table[list(cols)][:4].tolist()]


def test_a_restart_rebuilds_identical_positions_and_open_orders_from_the_journal(eng):
    eng.symbols[1] = Instrument("ETH", 0.1, 0.001, 10.0).row()
    agent = make_agent(eng)
    eng.writer("md_book").offer_array(book(100.0, 102.0, size=5.0))
    eng.writer("md_book").offer_array(book(50.0, 50.5, size=5.0, s=1))
    send_order(eng, 1, side=1, qty=0.7, px=103.0)  # 0.7 @ 102
    send_order(eng, 2, side=-1, qty=0.3, px=99.0)  # 0.3 @ 100: realised
    send_order(eng, 3, side=1, qty=2.0, px=101.0, tif=schema.TIF_POST_ONLY)  # alone at 101
    send_order(eng, 4, side=-1, qty=1.5, px=104.0, tif=schema.TIF_POST_ONLY)  # behind 5 at 104
    send_order(eng, 5, side=-1, qty=3.0, px=51.0, tif=schema.TIF_POST_ONLY, s=1)
    send_order(eng, 6, side=1, qty=1.0, px=51.0, s=1)  # 1 @ 50.5
    agent.do_work()
    eng.writer("md_trade").offer_array(trade(101.0, 0.5, aggressor=-1))  # 3: 0.5 filled
    agent.do_work()
    agent._next_gauges_ns = 0
    agent.do_work()  # the periodic save: every row current
    ev = events(eng)
    assert (ev["kind"] == schema.EV_FILL).sum() == 4
    pos = agent.positions
    before = [
        (pos.qty[s], pos.avg_px[s], pos.realized[s], pos.fees[s], pos.fills[s]) for s in (0, 1)
    ]
    assert before[0][0] == pytest.approx(0.9) and before[0][2] != 0.0
    open_before = {
        o.order_id: (o.symbol_id, o.side, o.px, o.leaves) for o in agent.exchange.resting.values()
    }
    assert open_before == {3: (0, 1, 101.0, 1.5), 4: (0, -1, 104.0, 1.5), 5: (1, -1, 51.0, 3.0)}
    shm_before = position_rows(eng.positions)
    kill(agent)
    eng.positions[:] = np.zeros(len(eng.positions), schema.POSITION)  # wiped ...
    eng.positions["qty"][0] = 42.0  # ... and garbled: the journal alone decides

    again = make_agent(eng)
    pos = again.positions
    after = [
        (pos.qty[s], pos.avg_px[s], pos.realized[s], pos.fees[s], pos.fills[s]) for s in (0, 1)
    ]
    assert after == before, "bit for bit"
    open_after = {
        o.order_id: (o.symbol_id, o.side, o.px, o.leaves) for o in again.exchange.resting.values()
    }
    assert open_after == open_before
    assert len(events(eng)) == 0, "no ACK again, nothing else either"
    rows = position_rows(eng.positions)
    assert [r[:6] for r in rows] == [r[:6] for r in shm_before]
    assert [r[6] for r in rows] == [2, 1, 0, 0], "open orders per symbol"
    # carrying on: the restored order's queue is estimated again on the first book (alone at
    # 101: nobody ahead), its fills numbered after the journal's
    eng.writer("md_trade").offer_array(trade(101.0, 5.0, aggressor=-1))
    again.do_work()
    assert len(events(eng)) == 0, "queue unknown before a book: a print does not fill it"
    eng.writer("md_book").offer_array(book(100.0, 102.0, size=5.0))
    again.do_work()
    eng.writer("md_trade").offer_array(trade(101.0, 5.0, aggressor=-1))
    again.do_work()
    fill = events(eng)
    assert fill["order_id"].tolist() == [3] and fill["qty"].tolist() == [1.5]
    assert again.positions.qty[0] == pytest.approx(0.9 + 1.5)
    assert jrows(again.journal, "SELECT fill_id FROM fills WHERE order_id = 3 ORDER BY seq") == [
        ("3.1",),
        ("3.2",),
    ]


def test_fills_are_never_doubled_by_a_restart_or_a_re_delivery(eng):
    agent = make_agent(eng)
    eng.writer("md_book").offer_array(book(100.0, 102.0, size=5.0))
    send_order(eng, 7, side=1, qty=2.0, px=101.0, tif=schema.TIF_POST_ONLY)
    agent.do_work()
    events(eng)

    def killed(*_: object) -> None:
        raise RuntimeError("kill -9 after the journal, before shared memory and route")

    agent._store_positions = killed
    eng.writer("md_trade").offer_array(trade(101.0, 0.5, aggressor=-1))
    with pytest.raises(RuntimeError):
        agent.do_work()
    kill(agent)
    assert len(events(eng)) == 0 and eng.positions["qty"][0] == 0.0
    again = make_agent(eng)
    assert again.positions.qty[0] == 0.5, "the journaled fill, applied once by the rebuild"
    assert again.exchange.resting[7].leaves == 1.5
    assert eng.positions["qty"][0] == 0.5
    # the venue delivers the same fill again (same fill id): journaled before, skipped
    again._fill_n[7] = 0
    again._events.append((7, 0, schema.EV_FILL, 1, 101.0, 0.5, 1.5, 0.0, schema.LIQ_MAKER, 0, 0))
    again._publish(time.monotonic_ns())
    assert len(events(eng)) == 0
    assert again.positions.qty[0] == 0.5 and again.positions.fills[0] == 1
    assert risk_ints(eng)[schema.C_DUPLICATES] == 1
    # the rest fills once: the whole order, no more
    again._fill_n[7] = 1
    eng.writer("md_book").offer_array(book(99.0, 100.0, size=5.0))
    again.do_work()
    assert events(eng)["qty"].tolist() == [1.5]
    kill(again)
    third = make_agent(eng)
    assert third.positions.qty[0] == 2.0 and third.positions.fills[0] == 2
    assert third.exchange.resting == {}


def test_a_restart_expires_open_iocs_and_completes_pending_cancels(eng):
    cfg = risk_cfg(max_orders_per_s=2.0)
    agent = make_agent(eng, cfg)
    eng.writer("md_book").offer_array(book(100.0, 102.0, size=5.0))
    send_order(eng, 40, side=1, qty=1.0, px=99.0, tif=schema.TIF_POST_ONLY)
    send_order(eng, 41, side=1, qty=1.0, px=98.0, tif=schema.TIF_POST_ONLY)
    send_cancel(eng, 40)  # no token left: held, but journaled
    agent.do_work()
    assert by_kind(events(eng), schema.EV_ACK) == [40, 41]
    # the process died between journaling an IOC and sending it
    agent.journal.order_new(
        42, 0, 1, 1.0, 103.0, schema.STYLE_TAKER_NOW, schema.TIF_IOC, time.time_ns()
    )
    kill(agent)
    again = make_agent(eng, cfg)
    ev = events(eng)
    assert by_kind(ev, schema.EV_EXPIRED) == [42], "its moment has passed: route forgets it"
    assert by_kind(ev, schema.EV_CANCELED) == [40], "the pending cancel, done: never restored"
    assert list(again.exchange.resting) == [41]
    assert jrows(again.journal, "SELECT order_id, state FROM orders ORDER BY order_id") == [
        (40, jr.CANCELED),
        (41, jr.ACKED),
        (42, jr.EXPIRED),
    ]


def test_restart_order_ids_come_from_the_journal(eng):
    agent = make_agent(eng)
    eng.writer("md_book").offer_array(book(100.0, 102.0, size=5.0))
    send_order(eng, 1_000, side=1, qty=1.0, px=99.0, tif=schema.TIF_POST_ONLY)
    agent.do_work()
    kill(agent)
    risk_ints(eng)[schema.C_LAST_ORDER_ID] = 0  # a stats block that lost the high-water mark
    again = make_agent(eng)
    assert risk_ints(eng)[schema.C_LAST_ORDER_ID] == 1_000
    assert again.checks.next_risk_order_id > rk.RISK_ORDER_BIT


# ---------------------------------------------------------------- funding and the UTC day
def mark(px: float, rate: float, *, next_ns: int = 0, interval_s: int = 3600) -> np.ndarray:
    m = np.zeros(1, schema.MARK)
    m["symbol_id"], m["mark_px"], m["funding_rate"] = 0, px, rate
    m["next_funding_ns"], m["funding_interval_s"] = next_ns, interval_s
    m["index_px"] = m["open_interest"] = math.nan
    return m


def test_funding_is_booked_once_at_its_time_into_the_journal_and_pnl(eng):
    seed_position(eng, 2.0, 100.0)
    clock = [time.time_ns()]
    agent = make_agent(eng, risk_cfg(), wall_clock=lambda: clock[0])
    due = clock[0] + 10_000_000_000
    eng.writer("md_mark").offer_array(mark(101.0, 0.0001, next_ns=due))
    agent.do_work()
    assert agent.positions.funding[0] == 0.0
    clock[0] = due
    agent.do_work()
    paid = -2.0 * 101.0 * 0.0001  # a long pays a positive rate
    assert agent.positions.funding[0] == paid
    assert eng.positions["realized"][0] == pytest.approx(paid), "realised includes funding"
    assert agent.checks.total_pnl()[0] == pytest.approx(paid)
    # a stale mark still announcing that time, more passes: not again
    eng.writer("md_mark").offer_array(mark(102.0, 0.0002, next_ns=due))
    clock[0] = due + 5_000_000_000
    agent.do_work()
    agent.do_work()
    assert jrows(agent.journal, "SELECT symbol_id, amount, ts_ns FROM funding") == [(0, paid, due)]
    kill(agent)
    again = make_agent(eng, risk_cfg(), wall_clock=lambda: clock[0])
    assert again.positions.funding[0] == paid and again.positions.funding_total == paid
    assert eng.positions["realized"][0] == pytest.approx(paid)


def test_funding_times_from_the_interval_when_the_venue_does_not_say(eng):
    seed_position(eng, -3.0, 100.0)
    hour = 3_600_000_000_000
    clock = [(time.time_ns() // hour + 1) * hour - 1_000_000_000]  # a second before the hour
    agent = make_agent(eng, risk_cfg(), wall_clock=lambda: clock[0])
    eng.writer("md_mark").offer_array(mark(100.0, 0.0002, interval_s=3600))
    agent.do_work()
    clock[0] += 1_000_000_000
    agent.do_work()
    received = 3.0 * 100.0 * 0.0002  # a short receives a positive rate
    assert jrows(agent.journal, "SELECT amount, ts_ns FROM funding") == [(received, clock[0])]
    assert agent.positions.funding[0] == received


def test_daily_pnl_rolls_over_at_utc_midnight_and_restarts_keep_the_mark(eng):
    seed_position(eng, 1.0, 100.0)
    midnight = jr.next_midnight_ns(time.time_ns())
    clock = [midnight - 1_000_000_000]
    gauges = eng.stats_all[schema.ROLE_INDEX["risk"]]["gauges"]
    agent = make_agent(eng, risk_cfg(), wall_clock=lambda: clock[0])
    eng.writer("md_book").offer_array(book(110.0, 111.0, size=5.0))
    agent.do_work()
    assert gauges[schema.G_DAILY_PNL] == pytest.approx(10.5)
    clock[0] = midnight
    agent._next_gauges_ns = 0
    agent.do_work()
    day = jr.utc_day(midnight) - 1
    assert jrows(agent.journal, "SELECT day, realized, fees, funding, unrealized FROM days") == [
        (day, 0.0, 0.0, 0.0, 10.5)
    ]
    assert agent.checks.day_base == pytest.approx(10.5)
    assert gauges[schema.G_DAILY_PNL] == pytest.approx(0.0)
    eng.writer("md_book").offer_array(book(120.0, 121.0, size=5.0))
    agent._next_gauges_ns = 0
    agent.do_work()
    assert gauges[schema.G_DAILY_PNL] == pytest.approx(10.0)
    kill(agent)
    again = make_agent(eng, risk_cfg(), wall_clock=lambda: clock[0])
    assert again.checks.day_base == pytest.approx(10.5), "the journal's mark"
    # no book yet: priced at the mark the dead process saved, not at nothing
    assert gauges[schema.G_DAILY_PNL] == pytest.approx(10.0)
    kill(again)
    clock[0] = midnight + jr.NS_PER_DAY + 5_000_000_000  # down over the next midnight
    third = make_agent(eng, risk_cfg(), wall_clock=lambda: clock[0])
    assert jrows(third.journal, "SELECT day, unrealized FROM days ORDER BY day") == [
        (day, 10.5),
        (day + 1, 20.5),  # at the marks the stage last wrote to shared memory
    ]
    assert third.checks.day_base == pytest.approx(20.5)


def test_a_daily_loss_halt_outlives_midnight_until_the_manual_reset(eng):
    seed_position(eng, 10.0, 100.0)
    midnight = jr.next_midnight_ns(time.time_ns())
    clock = [midnight - 1_000_000_000]
    agent = make_agent(eng, risk_cfg(max_loss_per_day=300.0), wall_clock=lambda: clock[0])
    eng.writer("md_book").offer_array(book(60.0, 61.0, size=5.0))  # 10 x -39.5
    agent.do_work()
    assert trading(eng) == ("halted", "daily_loss")
    clock[0] = midnight
    agent.do_work()
    assert agent.checks.day_base == pytest.approx(-395.0)
    assert trading(eng) == ("halted", "daily_loss") and eng.control[CTL_KILL] == rk.R_DAILY_LOSS
    eng.control[CTL_KILL] = 0  # hft kill --reset
    agent.do_work()
    assert trading(eng) == ("active", "none"), "the new day's PnL starts from zero"
    assert eng.control[CTL_KILL] == 0


def test_journal_path_fills_in_the_namespace_relative_to_the_repository():
    from stages.config import REPO_ROOT
    from stages.risk import journal_path

    cfg = config.from_dict({})
    assert journal_path(cfg, "abc") == REPO_ROOT / "var" / "journal" / "abc.sqlite"
    cfg = config.from_dict({"paper": {"journal_path": "/tmp/x/{namespace}.db"}})
    assert journal_path(cfg, "abc") == Path("/tmp/x/abc.db")


def test_rebuild_positions_matches_the_live_ones(eng):
    agent = make_agent(eng)
    eng.writer("md_book").offer_array(book(100.0, 101.0, size=5.0))
    for oid, side, px in ((1, 1, 102.0), (2, -1, 99.0), (3, -1, 99.0), (4, 1, 102.0)):
        send_order(eng, oid, side=side, qty=0.3 * oid, px=px)
    agent.do_work()
    pos, rec = rebuild_positions(agent.journal)
    assert (pos.qty, pos.avg_px, pos.realized, pos.fees) == (
        agent.positions.qty,
        agent.positions.avg_px,
        agent.positions.realized,
        agent.positions.fees,
    )
    assert rec.n_fills == 4 and rec.open_orders == ()


def test_trades_and_books_reach_an_order_on_its_way_in_time_order(eng):
    """Review finding: a pass's trades went in before its books, so an IOC on its way met the
    book of before a later print, not the book of its arrival."""
    agent = make_agent(eng, latency_ms=1.0)
    eng.writer("md_book").offer_array(book(100.0, 101.0, size=5.0))
    agent.do_work()
    send_order(eng, 10, side=1, qty=1.0, px=101.0, tif=schema.TIF_IOC)
    agent.do_work()
    arrive = agent.exchange.next_arrival_ns()
    assert arrive is not None
    moved = book(104.0, 105.0, size=5.0)  # the ask left the limit before the IOC arrived
    moved["recv_ns"] = arrive - 500_000
    late = trade(104.0, 0.1, aggressor=-1)
    late["recv_ns"] = arrive + 10_000
    eng.writer("md_book").offer_array(moved)
    eng.writer("md_trade").offer_array(late)
    while time.monotonic_ns() < arrive + 20_000:
        time.sleep(0.0002)
    agent.do_work()
    ev = events(eng)
    assert by_kind(ev, schema.EV_FILL) == [] and by_kind(ev, schema.EV_EXPIRED) == [10]
    assert agent.positions.qty[0] == 0.0


def test_a_restart_with_the_symbols_in_another_order_is_refused_not_misattributed(eng):
    eng.symbols[1] = Instrument("ETH", 0.1, 0.001, 10.0).row()
    agent = make_agent(eng)
    eng.writer("md_book").offer_array(book(100.0, 101.0, size=5.0))
    send_order(eng, 10, side=1, qty=1.0, px=102.0)
    agent.do_work()
    assert agent.positions.qty[0] == pytest.approx(1.0)
    kill(agent)
    eng.symbols[0], eng.symbols[1] = eng.symbols[1].copy(), eng.symbols[0].copy()  # reordered
    with pytest.raises(jr.JournalSymbolMismatch, match=r"id 0: journal 'BTC', engine 'ETH'"):
        make_agent(eng)


def test_an_order_whose_tick_is_older_than_the_signal_age_limit_is_refused(eng):
    """After a stall or a restart, orders route sent meanwhile wait in the ring: the market
    they were decided on is gone, so they are refused, and the cancels among them still go."""
    agent = make_agent(eng)
    eng.writer("md_book").offer_array(book(100.0, 101.0, size=5.0))
    send_order(eng, 10, side=1, qty=1.0, px=99.0, tif=schema.TIF_POST_ONLY)
    agent.do_work()
    assert by_kind(events(eng), schema.EV_ACK) == [10]
    limit = QUIET.route.max_signal_age_ms
    send_order(eng, 11, side=1, qty=1.0, px=102.0, age_ms=limit + 5)
    send_order(eng, 12, side=1, qty=1.0, px=102.0, age_ms=limit - 20)
    send_cancel(eng, 10)
    agent.do_work()
    ev = events(eng)
    assert ev[ev["order_id"] == 11]["reason"].tolist() == [schema.REJECT_CODE["stale_order"]]
    assert by_kind(ev, schema.EV_FILL) == [12]
    assert by_kind(ev, schema.EV_CANCELED) == [10]
    assert rejects(eng, "stale_order") == 1
    assert jrows(agent.journal, "SELECT order_id FROM orders ORDER BY order_id") == [(10,), (12,)]


def test_a_kill_thrown_during_a_pass_holds_back_the_rest_of_its_orders(eng):
    agent = make_agent(eng)
    eng.writer("md_book").offer_array(book(100.0, 101.0, size=5.0))
    agent.do_work()
    real_check = agent.checks.check

    def check_then_kill(*a: object, **kw: object) -> int:
        code = real_check(*a, **kw)  # type: ignore[arg-type]
        eng.control[CTL_KILL] = 1  # `hft kill` lands right after the first order's check
        return code

    agent.checks.check = check_then_kill  # type: ignore[method-assign]
    send_order(eng, 10, side=1, qty=1.0, px=102.0)
    send_order(eng, 11, side=1, qty=1.0, px=102.0)
    agent.do_work()
    ev = events(eng)
    assert by_kind(ev, schema.EV_FILL) == [10]
    assert ev[ev["order_id"] == 11]["reason"].tolist() == [schema.REJECT_CODE["kill_switch"]]


def test_a_restart_under_the_kill_switch_cancels_the_open_orders_instead_of_sending_them(eng):
    """Review finding: a restarted stage re-sent its NEW orders before it read the kill field;
    with no order-entry latency a crossing one traded under the kill switch."""
    agent = make_agent(eng)
    eng.writer("md_book").offer_array(book(100.0, 102.0, size=5.0))
    send_order(eng, 50, side=1, qty=1.0, px=99.0, tif=schema.TIF_POST_ONLY)
    agent.do_work()
    # the process died between journaling a crossing order and sending it
    agent.journal.order_new(
        51, 0, 1, 1.0, 103.0, schema.STYLE_MAKER_PASSIVE, schema.TIF_GTC, time.time_ns()
    )
    kill(agent)
    eng.control[CTL_KILL] = 1  # `hft kill` while the stage was down
    again = make_agent(eng)
    ev = events(eng)
    assert by_kind(ev, schema.EV_FILL) == []
    assert sorted(by_kind(ev, schema.EV_CANCELED)) == [50, 51]
    assert again.exchange.open_ids() == [] and again.positions.qty[0] == 0.0
    assert jrows(again.journal, "SELECT order_id, state FROM orders ORDER BY order_id") == [
        (50, jr.CANCELED),
        (51, jr.CANCELED),
    ]


def test_every_trading_state_change_is_logged_once(eng, caplog):
    agent = make_agent(eng)
    eng.writer("md_book").offer_array(book(100.0, 101.0, size=5.0))
    with caplog.at_level("INFO", logger="stages.risk"):
        agent.do_work()
        eng.control[CTL_KILL] = 1
        agent.do_work()
        agent.do_work()
        eng.control[CTL_KILL] = 0
        agent.do_work()
    changes = [
        (r.state, r.reason, r.was)  # type: ignore[attr-defined]
        for r in caplog.records
        if r.getMessage() == "trading state"
    ]
    assert changes == [("halted", "manual", "active (none)"), ("active", "none", "halted (manual)")]
