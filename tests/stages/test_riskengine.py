"""The risk engine kernel: every trigger, every state transition, every circuit breaker and the
venue rate limit, over a paper exchange with books fed by hand and a clock passed in."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from shm import schema
from stages import riskengine as rk
from stages.config import RiskConfig
from stages.orders import Order
from stages.paper import EventTuple, PaperExchange
from stages.riskengine import Bars, Positions, RiskChecks, VenueLimiter
from tests import books
from tests.orders import order

S = 1_000_000_000  # one second in ns
T0 = 1_000 * S
DEPTH_SZ = 1_000.0  # per level: 5 levels a side at ~100 = ~$500k a side, ~$1M a book


def cfg(**kw: Any) -> RiskConfig:
    base: dict[str, Any] = {
        "max_notional_per_symbol": 1_000_000.0,
        "max_total_notional": 2_000_000.0,
        "max_loss_per_day": 10_000.0,
        "max_concentration": 1.0,  # off unless a test is about it
        "max_holding_s": 3_600.0,
    }
    base.update(kw)
    return RiskConfig(**base)


def book(
    bid: float, ask: float, *, symbol_id: int = 0, sz: float = DEPTH_SZ, levels: int = 5
) -> np.ndarray:
    step = (ask - bid) or bid * 1e-4
    return books.make_book(
        [(bid - i * step, sz) for i in range(levels)],
        [(ask + i * step, sz) for i in range(levels)],
        symbol_id=symbol_id,
    )


def feed(rc: RiskChecks, bid: float, ask: float, now_ns: int, **kw: Any) -> None:
    """A book into the exchange (touch, fills) and the engine (bars, breakers), as risk does."""
    rec = book(bid, ask, **kw)
    rc.ex.on_books(rec, [])
    rc.on_books(rec, now_ns)


def setup(**kw: Any) -> RiskChecks:
    ex = PaperExchange(taker_fee_bps=0.0, maker_fee_bps=0.0, n_symbols=4)
    rc = RiskChecks(cfg(**kw), ex, Positions(n=4), venue_of=[0, 0, 1, 1])
    feed(rc, 100.0, 100.01, T0, symbol_id=0)  # 1 bp wide, ~$1M in the book
    feed(rc, 50.0, 50.005, T0, symbol_id=1)
    return rc


def check(rc: RiskChecks, o: Order, *, now_ns: int = T0, kill: int = 0) -> str:
    code = rc.check(o, draining=False, kill=kill, state=schema.CTRL_RUNNING, now_ns=now_ns)
    return schema.REJECT_REASONS[code]


def rest(rc: RiskChecks, oid: int, *, symbol_id: int = 0, side: int = 1, px: float = 99.0) -> None:
    """A resting post-only order, straight into the exchange."""
    rc.ex.submit(
        order_id=oid,
        symbol_id=symbol_id,
        side=side,
        tif=schema.TIF_POST_ONLY,
        px=px,
        qty=1.0,
        recv_ns=0,
        out=[],
    )
    assert oid in rc.ex.resting


def kinds(out: list[EventTuple], kind: int) -> list[int]:
    return [e[0] for e in out if e[2] == kind]


def apply_fills(rc: RiskChecks, out: list[EventTuple]) -> None:
    """What the stage does with the engine's events: fills into the positions."""
    for _oid, s, kind, side, px, qty, *_ in out:
        if kind == schema.EV_FILL:
            rc.pos.apply_fill(s, side, px, qty, 0.0)


# ---------------------------------------------------------------- the state machine
def test_a_new_engine_is_active_and_accepts_a_clean_order() -> None:
    rc = setup()
    assert (rc.state, rc.reason) == (rk.ACTIVE, rk.R_NONE)
    assert rc.published() == (rk.ACTIVE, rk.R_NONE)
    out: list[EventTuple] = []
    assert rc.evaluate(T0, out) == 0 and out == []
    assert check(rc, order()) == "none"


def test_leverage_active_to_reducing_and_back_with_hysteresis() -> None:
    rc = setup(account_equity_usd=100_000.0, max_leverage=3.0)
    rest(rc, 1, side=1, px=99.0)  # would grow the long below
    rest(rc, 2, side=-1, px=101.0)  # would shrink it
    rest(rc, 3, symbol_id=1, side=-1, px=51.0)  # a flat symbol: any order grows
    rc.pos.apply_fill(0, 1, 100.0, 3_100.0, 0.0)  # ~310k gross on 100k equity: 3.1x
    out: list[EventTuple] = []
    assert rc.evaluate(T0, out) == 0  # not a halt
    assert (rc.state, rc.reason) == (rk.REDUCING, rk.R_LEVERAGE)
    assert rc.published() == (rk.REDUCING, rk.R_LEVERAGE)
    assert sorted(kinds(out, schema.EV_CANCELED)) == [1, 3]
    assert set(rc.ex.resting) == {2}
    # only orders that shrink the position without flipping it
    assert check(rc, order(side=1, px=99.0)) == "reduce_only"
    assert check(rc, order(symbol_id=1, side=1, px=50.0)) == "reduce_only"
    assert check(rc, order(side=-1, px=100.01, qty=100.0)) == "none"
    assert check(rc, order(side=-1, px=100.01, qty=3_099.0)) == "none"  # + 1 resting = flat
    assert check(rc, order(side=-1, px=100.01, qty=3_100.0)) == "reduce_only"  # would flip
    # down to 2.8x: still over 0.9 x 3 = 2.7x, stays REDUCING
    rc.pos.apply_fill(0, -1, 100.0, 300.0, 0.0)
    rc.evaluate(T0 + S, out)
    assert rc.state == rk.REDUCING
    # down to 2.6x: back to ACTIVE
    rc.pos.apply_fill(0, -1, 100.0, 200.0, 0.0)
    rc.evaluate(T0 + 2 * S, out)
    assert (rc.state, rc.reason) == (rk.ACTIVE, rk.R_NONE)
    assert check(rc, order(side=1, px=99.0)) == "none"


def test_leverage_counts_losses_against_equity() -> None:
    rc = setup(account_equity_usd=100_000.0, max_leverage=3.0, max_loss_per_day=50_000.0)
    rc.pos.apply_fill(0, 1, 110.0, 2_500.0, 0.0)  # 250k gross, 25k under water: 250/75 = 3.3x
    rc.evaluate(T0, [])
    assert (rc.state, rc.reason) == (rk.REDUCING, rk.R_LEVERAGE)


def test_daily_loss_halts_cancels_everything_and_blocks_every_new_order() -> None:
    rc = setup(max_loss_per_day=1_000.0)
    rest(rc, 1, side=1)
    rest(rc, 2, symbol_id=1, side=-1, px=51.0)
    rc.pos.apply_fill(0, 1, 150.0, 21.0, 0.0)  # marked at ~100: -1,050
    out: list[EventTuple] = []
    assert rc.evaluate(T0, out) == rk.R_DAILY_LOSS
    assert (rc.state, rc.reason) == (rk.HALTED, rk.R_DAILY_LOSS)
    assert sorted(kinds(out, schema.EV_CANCELED)) == [1, 2]
    assert rc.ex.resting == {}
    assert check(rc, order()) == "halted"
    assert check(rc, order(side=-1, px=100.01)) == "halted"  # reducing too: the kill switch
    assert check(rc, order(), kill=rk.R_DAILY_LOSS) == "halted"
    # while halted nothing else is evaluated, and the control block's kill keeps it
    assert rc.evaluate(T0 + S, out) == 0
    assert not rc.sync_kill(rk.R_DAILY_LOSS, out)
    assert rc.state == rk.HALTED


def test_the_daily_loss_precheck_names_the_reason_before_the_state_does() -> None:
    rc = setup(max_loss_per_day=1_000.0)
    rc.pos.apply_fill(0, 1, 150.0, 21.0, 0.0)
    assert check(rc, order(side=-1, px=100.01)) == "daily_loss"


def test_reset_after_a_daily_loss_halt_reduces_until_the_loss_is_back_within_the_limit() -> None:
    rc = setup(max_loss_per_day=1_000.0)
    rc.pos.apply_fill(0, 1, 150.0, 21.0, 0.0)
    out: list[EventTuple] = []
    assert rc.evaluate(T0, out) == rk.R_DAILY_LOSS
    assert rc.sync_kill(0, out)  # hft kill --reset
    assert (rc.state, rc.reason) == (rk.REDUCING, rk.R_DAILY_LOSS)
    # the cause still holds: reduce-only, and the same trigger does not halt again
    assert rc.evaluate(T0 + S, out) == 0
    assert (rc.state, rc.reason) == (rk.REDUCING, rk.R_DAILY_LOSS)
    assert check(rc, order()) == "reduce_only"
    assert check(rc, order(side=-1, px=100.0, qty=21.0)) == "none", "closing it must pass"
    # the loss taken back (flattened at a gain elsewhere): ACTIVE again
    rc.pos.apply_fill(0, -1, 100.0, 21.0, 0.0)
    rc.pos.apply_fill(1, 1, 50.0, 100.0, 0.0)
    rc.pos.apply_fill(1, -1, 70.0, 100.0, 0.0)
    assert rc.evaluate(T0 + 2 * S, out) == 0
    assert (rc.state, rc.reason) == (rk.ACTIVE, rk.R_NONE)
    assert check(rc, order()) == "none"


def test_reset_after_a_concentration_halt_lets_the_position_be_worked_down() -> None:
    """Review finding: a halt whose cause only an order can cure tripped again on every reset."""
    rc = setup(max_concentration=0.25, account_equity_usd=100_000.0)
    rc.pos.apply_fill(0, 1, 100.0, 300.0, 0.0)  # $30k of $100k equity: over 25%
    out: list[EventTuple] = []
    assert rc.evaluate(T0, out) == rk.R_CONCENTRATION
    assert check(rc, order(side=-1, px=100.0, qty=100.0)) == "halted"
    assert rc.sync_kill(0, out)
    assert rc.evaluate(T0 + 1, out) == 0, "the same cause must not halt again at once"
    assert (rc.state, rc.reason) == (rk.REDUCING, rk.R_CONCENTRATION)
    assert check(rc, order(side=1, px=100.0, qty=1.0)) == "reduce_only"
    assert check(rc, order(side=-1, px=100.0, qty=100.0)) == "none"
    rc.pos.apply_fill(0, -1, 100.0, 100.0, 0.0)  # down to $20k: under the cap
    assert rc.evaluate(T0 + 2, out) == 0
    assert (rc.state, rc.reason) == (rk.ACTIVE, rk.R_NONE)


def test_a_manual_halt_resets_to_active_and_an_automatic_one_during_reducing_halts() -> None:
    rc = setup(max_loss_per_day=1_000.0, max_concentration=0.25, account_equity_usd=100_000.0)
    out: list[EventTuple] = []
    rc.sync_kill(rk.R_MANUAL, out)
    assert rc.sync_kill(0, out)
    assert (rc.state, rc.reason) == (rk.ACTIVE, rk.R_NONE)
    rc.pos.apply_fill(0, 1, 100.0, 300.0, 0.0)
    assert rc.evaluate(T0, out) == rk.R_CONCENTRATION
    rc.sync_kill(0, out)
    rc.pos.apply_fill(1, 1, 80.0, 50.0, 0.0)  # marked at 50: -1,500 today, over the limit
    assert rc.evaluate(T0 + 1, out) == rk.R_DAILY_LOSS
    assert (rc.state, rc.reason) == (rk.HALTED, rk.R_DAILY_LOSS)


def test_manual_kill_cancels_every_resting_order_blocks_new_ones_until_reset() -> None:
    rc = setup()
    for oid, sym in ((1, 0), (2, 0), (3, 1)):
        rest(rc, oid, symbol_id=sym, px=99.0 if sym == 0 else 49.0)
    out: list[EventTuple] = []
    assert rc.sync_kill(rk.R_MANUAL, out)
    assert (rc.state, rc.reason) == (rk.HALTED, rk.R_MANUAL)
    assert sorted(kinds(out, schema.EV_CANCELED)) == [1, 2, 3]
    assert rc.ex.resting == {}
    assert check(rc, order(), kill=1) == "kill_switch"
    assert check(rc, order()) == "kill_switch"  # the engine's own state says so too
    out.clear()
    assert not rc.sync_kill(rk.R_MANUAL, out) and out == []  # cancelled once, not again
    assert rc.sync_kill(0, out)
    assert rc.state == rk.ACTIVE
    assert check(rc, order()) == "none"


def test_hft_kill_over_an_automatic_halt_makes_it_manual() -> None:
    rc = setup()
    rc.halt(rk.R_CONCENTRATION, [])
    rc.sync_kill(rk.R_MANUAL, [])
    assert (rc.state, rc.reason) == (rk.HALTED, rk.R_MANUAL)


def test_reducing_to_halted() -> None:
    rc = setup(account_equity_usd=100_000.0, max_leverage=3.0, max_loss_per_day=5_000.0)
    rc.pos.apply_fill(0, 1, 100.0, 3_100.0, 0.0)
    rc.evaluate(T0, [])
    assert rc.state == rk.REDUCING
    feed(rc, 98.0, 98.01, T0 + S)  # -6,184 marked at 98.005
    out: list[EventTuple] = []
    assert rc.evaluate(T0 + S, out) == rk.R_DAILY_LOSS
    assert (rc.state, rc.reason) == (rk.HALTED, rk.R_DAILY_LOSS)


def test_halt_reason_of_kill_values() -> None:
    assert rk.halt_reason(1) == rk.R_MANUAL
    assert rk.halt_reason(2) == rk.R_DAILY_LOSS
    assert rk.halt_reason(3) == rk.R_CONCENTRATION
    assert rk.halt_reason(4) == rk.R_ADR_LOSS
    assert rk.halt_reason(99) == rk.R_MANUAL  # whoever wrote it, it was not us
    assert rk.halt_reason(rk.R_LEVERAGE) == rk.R_MANUAL  # leverage never halts
    assert [rk.REASONS[c] for c in rk.AUTO_HALT_REASONS] == [
        "daily_loss",
        "concentration",
        "adr_loss",
    ]


# ---------------------------------------------------------------- concentration
def test_concentration_halts_over_the_share_of_equity_but_not_a_small_first_position() -> None:
    rc = setup(account_equity_usd=100_000.0, max_concentration=0.25)
    rc.pos.apply_fill(0, 1, 100.0, 50.0, 0.0)  # 5k: all of gross, 5% of equity
    assert rc.evaluate(T0, []) == 0
    rc.pos.apply_fill(0, 1, 100.0, 200.0, 0.0)  # 25k at 100.005: just over 25% of equity
    rest(rc, 7, symbol_id=1, px=49.0)
    out: list[EventTuple] = []
    assert rc.evaluate(T0, out) == rk.R_CONCENTRATION
    assert (rc.state, rc.reason) == (rk.HALTED, rk.R_CONCENTRATION)
    assert kinds(out, schema.EV_CANCELED) == [7]
    assert check(rc, order(symbol_id=1, px=49.0)) == "halted"


def test_concentration_over_the_share_of_gross_when_gross_exceeds_equity() -> None:
    rc = setup(account_equity_usd=100_000.0, max_concentration=0.25, max_leverage=5.0)
    rc.pos.apply_fill(1, 1, 50.0, 1_600.0, 0.0)  # 80k
    rc.pos.apply_fill(0, -1, 100.0, 400.0, 0.0)  # 40k: gross 120k > equity
    # 80k / 120k = 67% of gross
    assert rc.evaluate(T0, []) == rk.R_CONCENTRATION


def test_concentration_pre_trade_keeps_a_margin_under_the_cap() -> None:
    rc = setup(account_equity_usd=100_000.0, max_concentration=0.25)
    cap = rk.CONCENTRATION_ENTRY * 0.25 * 100_000.0  # 22.5k
    assert check(rc, order(px=100.0, qty=cap / 100.0 - 1.0)) == "none"
    assert check(rc, order(px=100.0, qty=cap / 100.0 + 1.0)) == "concentration"
    assert check(rc, order(side=-1, px=100.0, qty=cap / 100.0 + 1.0)) == "concentration"
    rc.pos.apply_fill(0, 1, 100.0, 240.0, 0.0)  # 24k (put on before: under the halt line)
    assert rc.evaluate(T0, []) == 0
    assert check(rc, order(side=-1, px=100.01, qty=10.0)) == "none"  # reducing: fine


# ---------------------------------------------------------------- ADR loss
def warm_bars(rc: RiskChecks, n: int, *, t0: int = T0, mid: float = 100.0, amp: float = 0.1) -> int:
    """``n`` 1 s bars whose mid alternates by ``amp``: an ATR of ``amp``. Return the next time."""
    t = t0
    for i in range(n + 1):
        m = mid + (amp if i % 2 else 0.0)
        feed(rc, m - 0.005, m + 0.005, t)
        t += S
    return t


def test_bars_true_range_and_atr() -> None:
    bars = Bars(1)
    assert math.isnan(bars.atr(0))
    # bar 0: 100 -> 101 -> 99.5, close 100.5; bar 1 gaps up: 103 .. 104, close 103.5
    for t, m in ((0, 100.0), (S // 3, 101.0), (S // 2, 99.5), (S - 1, 100.5)):
        bars.update(0, m, t)
    for t, m in ((S, 103.0), (S + 5, 104.0), (S + 9, 103.5)):
        bars.update(0, m, t)
    bars.update(0, 103.5, 2 * S)  # closes bar 1
    assert bars.count[0] == 2
    assert bars.prev_close[0] == 103.5
    # TRs: 101 - 99.5 = 1.5; max(104, 100.5) - min(103, 100.5) = 3.5
    assert bars._sum[0] == pytest.approx(5.0)
    assert math.isnan(bars.atr(0))  # fewer than ATR_MIN_BARS
    for k in range(3, rk.ATR_BARS + 10):  # flat bars after: the two big ones leave the window
        bars.update(0, 103.5, k * S)
    assert bars.count[0] == rk.ATR_BARS + 9
    assert bars.atr(0) == pytest.approx(0.0, abs=1e-12)


def test_adr_loss_halts_once_the_bars_know_the_range() -> None:
    rc = setup(max_loss_per_day=1e6, account_equity_usd=1e6)
    t = warm_bars(rc, rk.ATR_MIN_BARS - 2, t0=T0 + S)
    rc.pos.apply_fill(0, 1, 200.0, 10.0, 0.0)  # 100 a unit under water: 340 ATRs of 0.1
    assert math.isnan(rc.bars.atr(0))
    assert rc.evaluate(t, []) == 0, "no ADR before ATR_MIN_BARS bars"
    t = warm_bars(rc, 4, t0=t)
    atr = rc.bars.atr(0)
    assert 0.05 < atr <= 0.1
    assert 2.0 * atr * rk.ADR_PER_ATR < 100.0  # ~59
    out: list[EventTuple] = []
    assert rc.evaluate(t, out) == rk.R_ADR_LOSS
    assert (rc.state, rc.reason) == (rk.HALTED, rk.R_ADR_LOSS)


@pytest.mark.parametrize(("multiple", "halts"), [(1.9, False), (2.1, True)])
def test_adr_loss_threshold_for_a_short(multiple: float, halts: bool) -> None:
    rc = setup(max_loss_per_day=1e6, account_equity_usd=1e6)
    t = warm_bars(rc, rk.ATR_MIN_BARS + 5, t0=T0 + S)
    adr = rc.bars.atr(0) * rk.ADR_PER_ATR
    mark = rc.mark(0)
    rc.pos.apply_fill(0, -1, mark - multiple * adr, 10.0, 0.0)  # short, under water
    assert rc.evaluate(t, []) == (rk.R_ADR_LOSS if halts else 0)


# ---------------------------------------------------------------- holding time
def test_holding_time_reduces_the_position_with_an_ioc_of_its_own() -> None:
    rc = setup(max_holding_s=10.0)
    rc.pos.apply_fill(0, 1, 100.0, 5.0, 0.0)
    out: list[EventTuple] = []
    rc.evaluate(T0, out)  # symbol 0's clock starts
    rc.pos.apply_fill(1, -1, 50.0, 4.0, 0.0)
    rc.evaluate(T0 + 5 * S, out)  # symbol 1's
    rest(rc, 11, side=1, px=99.0)
    rest(rc, 12, side=-1, px=101.0)
    rest(rc, 13, symbol_id=1, side=-1, px=51.0)
    rc.pos.apply_fill(0, 1, 100.0, 1.0, 0.0)  # adding does not restart the clock
    rc.evaluate(T0 + 10 * S, out)
    assert out == [] and rc.holding == set()
    assert rc.evaluate(T0 + 11 * S, out) == 0
    assert rc.state == rk.ACTIVE and rc.holding == {0}
    assert rc.published() == (rk.ACTIVE, rk.R_HOLDING_TIME)
    assert sorted(kinds(out, schema.EV_CANCELED)) == [11, 12]  # none may fill after
    fills = [e for e in out if e[2] == schema.EV_FILL]
    assert [(e[1], e[3], e[5]) for e in fills] == [(0, -1, 6.0)]
    assert all(e[0] & rk.RISK_ORDER_BIT for e in fills)
    assert rc.risk_orders == 1 and 13 in rc.ex.resting
    # while it is reduced the symbol is reduce-only; the others trade on
    assert check(rc, order(side=1, px=99.0)) == "reduce_only"
    assert check(rc, order(symbol_id=1, side=-1, px=50.005)) == "none"
    apply_fills(rc, out)
    assert rc.pos.qty[0] == 0.0
    rc.evaluate(T0 + 12 * S, [])
    assert rc.holding == set() and rc.published() == (rk.ACTIVE, rk.R_NONE)
    assert check(rc, order(side=1, px=99.0)) == "none"


def test_holding_time_retries_what_the_book_could_not_take() -> None:
    rc = setup(max_holding_s=10.0, min_liquidity_usd=1.0)
    rc.pos.apply_fill(0, 1, 100.0, 5.0, 0.0)
    rc.evaluate(T0, [])
    feed(rc, 100.0, 100.01, T0 + S, sz=1.0, levels=2)  # 2 units within reach
    out: list[EventTuple] = []
    rc.evaluate(T0 + 11 * S, out)
    assert sum(e[5] for e in out if e[2] == schema.EV_FILL) == pytest.approx(2.0)
    assert kinds(out, schema.EV_EXPIRED)  # the rest of the IOC
    apply_fills(rc, out)
    out.clear()
    rc.evaluate(T0 + 11 * S + S // 2, out)
    assert out == [], "not before HOLDING_RETRY_NS"
    feed(rc, 100.0, 100.01, T0 + 12 * S)
    rc.evaluate(T0 + 12 * S, out)
    assert sum(e[5] for e in out if e[2] == schema.EV_FILL) == pytest.approx(3.0)


def test_holding_time_waits_while_trading_is_held_and_the_limit_stays_near_the_touch() -> None:
    rc = setup(max_holding_s=10.0)
    rc.pos.apply_fill(0, -1, 100.0, 5.0, 0.0)
    rc.evaluate(T0, [])
    out: list[EventTuple] = []
    rc.evaluate(T0 + 11 * S, out, may_trade=False)  # paused or draining
    assert out == [] and rc.holding == {0}
    rc.evaluate(T0 + 11 * S, out)
    fills = [e for e in out if e[2] == schema.EV_FILL]
    assert [(e[3], e[4]) for e in fills] == [(1, 100.01)]
    assert rc.ex.resting == {}


def test_a_flipped_position_restarts_its_clock() -> None:
    rc = setup(max_holding_s=10.0)
    rc.pos.apply_fill(0, 1, 100.0, 1.0, 0.0)
    rc.evaluate(T0, [])
    rc.pos.apply_fill(0, -1, 100.0, 2.0, 0.0)
    rc.evaluate(T0 + 8 * S, [])
    out: list[EventTuple] = []
    rc.evaluate(T0 + 12 * S, out)
    assert out == [] and rc.holding == set()


# ---------------------------------------------------------------- circuit breakers
def test_wide_spread_pauses_only_its_symbol_until_the_pause_ends() -> None:
    rc = setup(wide_spread_bps=10.0, breaker_pause_s=30.0)
    rest(rc, 5, side=1, px=99.0)
    t = T0 + S
    rc.ex.on_books(book(100.0, 100.11), [])
    assert rc.on_book(0, 100.0, 100.11, 1e6, t) == rk.B_WIDE_SPREAD  # 11 bps
    assert rc.trips == 1 and rc.trips_by[rk.B_WIDE_SPREAD] == 1
    assert check(rc, order(), now_ns=t) == "circuit_breaker"
    assert check(rc, order(symbol_id=1, px=50.0), now_ns=t) == "none"
    assert 5 in rc.ex.resting, "resting orders are left alone"
    assert check(rc, order(), now_ns=t + 30 * S - 1) == "circuit_breaker"
    assert check(rc, order(), now_ns=t + 30 * S) == "none"


def test_a_breaker_still_tripping_extends_its_pause_and_counts_once() -> None:
    rc = setup()
    t = T0 + S
    rc.on_book(0, 100.0, 100.2, 1e6, t)
    rc.on_book(0, 100.0, 100.2, 1e6, t + 20 * S)
    assert rc.trips == 1
    assert check(rc, order(), now_ns=t + 40 * S) == "circuit_breaker"
    assert check(rc, order(), now_ns=t + 50 * S) == "none"
    rc.on_book(0, 100.0, 100.2, 1e6, t + 60 * S)  # a new episode
    assert rc.trips == 2


def test_ten_bps_is_not_wide() -> None:
    rc = setup(wide_spread_bps=10.0)
    assert rc.on_book(0, 100.0, 100.099, 1e6, T0) == 0


def test_thin_book_pauses_the_symbol() -> None:
    rc = setup(min_liquidity_usd=500_000.0)
    t = T0 + S
    feed(rc, 100.0, 100.01, t, sz=400.0)  # 5 levels x 400 x ~100 x 2 sides = ~400k
    assert rc.breaker[0] == rk.B_THIN_BOOK and rc.trips_by[rk.B_THIN_BOOK] == 1
    assert check(rc, order(), now_ns=t) == "circuit_breaker"
    assert check(rc, order(symbol_id=1, px=50.0), now_ns=t) == "none"
    feed(rc, 100.0, 100.01, t + S, sz=600.0)  # ~600k: healthy again, but the pause holds
    assert check(rc, order(), now_ns=t + 2 * S) == "circuit_breaker"
    assert check(rc, order(), now_ns=t + 31 * S) == "none"


def test_book_notional_counts_only_the_levels_in_the_record() -> None:
    rc = setup(min_liquidity_usd=500_000.0)
    rec = book(100.0, 100.01, sz=600.0, levels=5)  # ~600k
    rec["n_bid"] = 1  # four bid levels of garbage past the count: ~360k
    rc.on_books(rec, T0 + S)
    assert rc.breaker[0] == rk.B_THIN_BOOK


def test_stale_and_crossed_books_do_not_trip_breakers() -> None:
    rc = setup()
    for flags in (schema.BOOK_STALE, schema.BOOK_CROSSED):
        rec = book(100.0, 101.0)  # 100 bps wide
        rec["flags"] = flags
        rc.on_books(rec, T0 + S)
    assert rc.trips == 0


def test_extreme_move_needs_bars_then_trips_over_the_atr_multiple() -> None:
    rc = setup(extreme_move_atr=3.0)
    t = warm_bars(rc, rk.ATR_MIN_BARS - 3, amp=0.1)
    feed(rc, 105.0, 105.01, t)  # 50 ATRs, but too few bars to know
    assert rc.trips == 0
    rc = setup(extreme_move_atr=3.0)
    t = warm_bars(rc, rk.ATR_MIN_BARS + 5, amp=0.1)  # ATR 0.1; last close 100 or 100.1
    close = rc.bars.close[0]
    feed(rc, close + 0.25, close + 0.26, t)  # 2.55 ATRs from the previous close: fine
    assert rc.trips == 0
    feed(rc, close + 0.35, close + 0.36, t + 1)  # 3.55 ATRs
    assert rc.breaker[0] == rk.B_EXTREME_MOVE and rc.trips == 1
    assert check(rc, order(), now_ns=t + 1) == "circuit_breaker"
    assert check(rc, order(symbol_id=1, px=50.0), now_ns=t + 1) == "none"


def test_circuit_breaker_comes_after_the_book_checks_and_before_the_limits() -> None:
    rc = setup(max_notional_per_symbol=1_000.0)
    rc.on_book(0, 100.0, 100.2, 1e6, T0)
    assert check(rc, order(qty=1e6)) == "circuit_breaker"
    assert check(rc, order(qty=-1.0)) == "bad_order"
    stale = book(100.0, 100.01)
    stale["flags"] = schema.BOOK_STALE
    rc.ex.on_books(stale, [])
    assert check(rc, order(qty=1e6)) == "stale_book"


# ---------------------------------------------------------------- rate limits
def test_venue_rate_limit_is_a_sliding_one_second_window() -> None:
    lim = VenueLimiter(5.0, [0, 0, 1])
    assert all(lim.take(0, T0) for _ in range(5))
    assert not lim.take(1, T0), "symbols 0 and 1 share a venue"
    assert lim.take(2, T0), "another venue has its own window"
    assert not lim.take(0, T0 + S // 2)
    assert not lim.take(0, T0 + S), "a send exactly one second ago still counts"
    assert lim.take(0, T0 + S + 1)
    assert sum(lim.take(0, T0 + 10 * S) for _ in range(10)) == 5
    for _ in range(20):
        lim.spend(0, T0 + 10 * S)  # the engine's own orders: never refused, but they count
    assert lim.used(0, T0 + 10 * S) == 25
    assert not lim.take(0, T0 + 11 * S)
    assert lim.take(0, T0 + 11 * S + 1)
    slow = VenueLimiter(0.5, [0])
    assert slow.take(0, T0) and not slow.take(0, T0 + S + S // 2) and slow.take(0, T0 + 2 * S + 1)


def test_no_one_second_window_holds_more_than_the_rate() -> None:
    """Review finding: a bucket holding one second's burst let 2x the rate through a window."""
    lim = VenueLimiter(20.0, [0])
    sent: list[int] = []
    t = T0
    for _ in range(4_000):  # a greedy sender trying every 7 ms
        if lim.take(0, t):
            sent.append(t)
        t += 7_000_000
    arr = np.array(sent)
    most = max(int(np.searchsorted(arr, x + S, side="right") - i) for i, x in enumerate(arr))
    assert most == 20
    assert len(sent) >= 20 * (t - T0) // S - 20  # and the rate is used, not starved


def test_reducing_cancels_spend_tokens_but_are_never_refused() -> None:
    rc = setup(account_equity_usd=100_000.0, max_leverage=3.0, max_orders_per_s=2.0)
    for oid in (1, 2, 3):
        rest(rc, oid, side=1, px=99.0 - oid)
    assert rc.limiter.take(0, T0) and rc.limiter.take(0, T0)  # the window is full
    rc.pos.apply_fill(0, 1, 100.0, 3_100.0, 0.0)
    out: list[EventTuple] = []
    rc.evaluate(T0, out)
    assert sorted(kinds(out, schema.EV_CANCELED)) == [1, 2, 3]
    assert rc.limiter.used(0, T0) == 5  # counted, not refused


# ---------------------------------------------------------------- funding, the day, the journal
def test_funding_is_kept_apart_and_counts_in_pnl_and_the_shared_memory_realized() -> None:
    pos = Positions(n=4)
    pos.apply_fill(0, 1, 100.0, 2.0, 0.1)
    pos.apply_funding(0, -0.02)
    pos.apply_funding(1, 0.5)
    assert pos.realized[0] == -0.1 and pos.funding[0] == -0.02
    assert pos.funding_total == pytest.approx(0.48)
    assert pos.realized_total() == pytest.approx(-0.1 + 0.48)
    table = np.zeros(4, schema.POSITION)
    pos.store(table, 0, 101.0, 0)
    assert table["realized"][0] == pytest.approx(-0.12)  # trading net of fees, plus funding
    assert table["fees"][0] == 0.1 and table["unrealized"][0] == pytest.approx(2.0)
    rebuilt = Positions(n=4)
    rebuilt.set_funding({0: -0.02, 1: 0.5})
    assert rebuilt.funding == pos.funding and rebuilt.funding_total == pos.funding_total
    rc = setup()
    rc.pos.apply_funding(0, -1_500.0)
    assert rc.total_pnl()[0] == -1_500.0


def test_the_daily_loss_counts_from_the_day_base() -> None:
    rc = setup(max_loss_per_day=1_000.0)
    rc.pos.apply_fill(0, 1, 150.0, 21.0, 0.0)  # marked at ~100: -1,050 since the journal began
    rc.day_base = -500.0  # ... of which -500 before midnight: -550 today
    assert rc.daily_pnl() == pytest.approx(-550.0, abs=1.0)
    assert check(rc, order(side=-1, px=100.01)) == "none"
    assert rc.evaluate(T0, []) == 0 and rc.state == rk.ACTIVE
    rc.day_base = 0.0
    assert rc.evaluate(T0, []) == rk.R_DAILY_LOSS


def test_a_position_without_a_book_is_priced_at_its_last_mark_or_not_judged() -> None:
    rc = setup(max_loss_per_day=1_000.0)
    rc.pos.apply_fill(2, 1, 100.0, 10.0, 0.0)  # symbol 2 has no book
    rc.day_base = 2_000.0  # a day that began 2,000 up (unrealised at midnight's marks)
    assert rc.evaluate(T0, []) == 0, "no price at all: the daily loss is not judged on nothing"
    assert check(rc, order()) == "none" and rc.unpriced
    rc.last_mark[2] = 120.0  # the mark the dead process saved
    assert rc.total_pnl()[1] == pytest.approx(200.0)
    assert rc.mark(2) == 120.0
    assert rc.evaluate(T0, []) == rk.R_DAILY_LOSS  # 200 - 2,000: priced, and a real loss


def test_the_engine_tells_the_journal_before_it_sends_orders_and_cancels() -> None:
    log: list[tuple[str, int]] = []
    ex = PaperExchange(taker_fee_bps=0.0, maker_fee_bps=0.0, n_symbols=4)

    rc = RiskChecks(
        cfg(max_holding_s=1.0),
        ex,
        Positions(n=4),
        before_new=lambda oid, *_: log.append(("new", oid)),
        before_cancel=lambda oid: log.append(("cancel", oid)),
    )
    submit, cancel = ex.submit, ex.cancel

    def logged_submit(**kw: Any) -> None:
        log.append(("sent", kw["order_id"]))
        submit(**kw)

    def logged_cancel(oid: int, **kw: Any) -> bool:
        log.append(("cancelled", oid))
        return cancel(oid, **kw)

    ex.submit = logged_submit  # type: ignore[method-assign]
    ex.cancel = logged_cancel  # type: ignore[method-assign]
    feed(rc, 100.0, 100.01, T0)
    rest(rc, 1, side=1)
    log.clear()
    rc.pos.apply_fill(0, 1, 100.0, 1.0, 0.0)
    rc.evaluate(T0, [])  # the clock starts
    out: list[EventTuple] = []
    rc.evaluate(T0 + 2 * S, out)  # held too long: cancel the symbol's orders, then an IOC
    risk_oid = rc.next_risk_order_id - 1
    assert log[:2] == [("cancel", 1), ("cancelled", 1)]
    assert log[-2:] == [("new", risk_oid), ("sent", risk_oid)]
    rest(rc, 2, side=1)
    log.clear()
    rc.halt(rk.R_MANUAL, out)  # the kill switch: every open id told, then the mass cancel
    assert log == [("cancel", 2)] and rc.ex.resting == {}


# ---------------------------------------------------------------- review findings (latency, edges)
LAT = 1_000_000  # 1 ms order-entry latency, the [paper] default


def setup_latency(**kw: Any) -> RiskChecks:
    ex = PaperExchange(taker_fee_bps=0.0, maker_fee_bps=0.0, n_symbols=4, latency_ns=LAT)
    rc = RiskChecks(cfg(**kw), ex, Positions(n=4), venue_of=[0, 0, 1, 1])
    rec = book(100.0, 100.01)
    rec["recv_ns"] = T0
    ex.on_books(rec, [])
    rc.on_books(rec, T0)
    return rc


def test_a_sell_with_a_low_limit_is_sized_at_the_bids_it_will_take() -> None:
    rc = setup(max_notional_per_symbol=10_000.0)
    assert check(rc, order(side=1, px=100.1, qty=1_000.0)) == "symbol_notional"
    # fills at ~100 (the bids), not at its limit of 1: $100k, ten times the cap
    assert check(rc, order(side=-1, px=1.0, qty=1_000.0)) == "symbol_notional"
    assert check(rc, order(side=-1, px=1.0, qty=99.0)) == "none"


def test_an_order_id_past_signed_64_bits_is_a_bad_order() -> None:
    rc = setup()
    assert check(rc, order(order_id=1 << 63)) == "bad_order"
    assert check(rc, order(order_id=0)) == "bad_order"
    assert check(rc, order(order_id=(1 << 63) - 1)) == "none"


def test_reducing_cancels_growing_orders_still_on_their_way() -> None:
    rc = setup_latency(account_equity_usd=100_000.0, max_leverage=1.0)
    rc.pos.apply_fill(0, 1, 100.0, 900.0, 0.0)
    out: list[EventTuple] = []
    rc.ex.submit(
        order_id=7, symbol_id=0, side=1, tif=schema.TIF_POST_ONLY, px=99.0, qty=50.0,
        recv_ns=T0, out=out, now_ns=T0,
    )  # fmt: skip
    assert rc.ex.resting == {} and rc.ex.open_ids() == [7]
    rc.pos.apply_fill(0, 1, 100.0, 200.0, 0.0)  # over 1x
    rc.evaluate(T0 + 100, out)
    assert rc.state == rk.REDUCING
    rc.ex.advance(T0 + 100 + LAT, out)  # the order rests, then its cancel arrives
    assert kinds(out, schema.EV_CANCELED) == [7] and rc.ex.resting == {}
    out.clear()
    rc.evaluate(T0 + 200, out)  # not cancelled twice
    assert out == []


def test_holding_time_ioc_waits_for_orders_on_their_way_so_the_position_cannot_flip() -> None:
    rc = setup_latency(max_holding_s=10.0)
    rc.pos.apply_fill(0, 1, 100.0, 10.0, 0.0)
    out: list[EventTuple] = []
    rc.evaluate(T0, out)
    # route's own closing IOC is on its way when the holding time runs out
    now = T0 + 11 * S
    rc.ex.submit(
        order_id=5, symbol_id=0, side=-1, tif=schema.TIF_IOC, px=99.0, qty=10.0,
        recv_ns=now, out=out, now_ns=now,
    )  # fmt: skip
    rc.evaluate(now, out)
    assert rc.holding == {0} and rc.risk_orders == 0, "no IOC of its own while one is in flight"
    rc.ex.advance(now + 2 * LAT, out)
    apply_fills(rc, out)
    assert rc.pos.qty[0] == 0.0
    out.clear()
    rc.evaluate(now + 3 * LAT, out)
    assert rc.risk_orders == 0 and rc.pos.qty[0] == 0.0 and rc.holding == set()


def test_partial_fills_of_a_large_position_leave_no_float_dust() -> None:
    pos = Positions(n=1)
    pos.apply_fill(0, 1, 100.0, 100_000.0, 0.0)
    for q in (33_333.3, 33_333.3, 33_333.4):
        pos.apply_fill(0, -1, 100.0, q, 0.0)
    assert pos.qty[0] == 0.0 and pos.open == set()


def test_reduce_only_accepts_the_exact_close_of_a_position_summed_from_partials() -> None:
    rc = setup(account_equity_usd=1e9, max_notional_per_symbol=1e9, max_total_notional=1e9)
    for q in (22_735.6, 16_100.8, 23_688.6):
        rc.pos.apply_fill(0, 1, 100.0, q, 0.0)
    assert rc.pos.qty[0] != 62_525.0  # float sum: 62524.99999999999
    rc.state, rc.reason = rk.REDUCING, rk.R_LEVERAGE
    assert check(rc, order(side=-1, px=100.0, qty=62_525.0)) == "none"
    assert check(rc, order(side=-1, px=100.0, qty=62_526.0)) == "reduce_only"


def test_reducing_for_a_daily_loss_still_halts_on_concentration() -> None:
    """Review finding: the daily loss came first in an if/elif chain and hid the others."""
    rc = setup(max_loss_per_day=1_000.0, max_concentration=0.25, account_equity_usd=100_000.0)
    rc.pos.apply_fill(1, 1, 70.0, 100.0, 0.0)  # marked at 50: -2,000, $5k
    out: list[EventTuple] = []
    assert rc.evaluate(T0, out) == rk.R_DAILY_LOSS
    rc.sync_kill(0, out)
    assert rc.evaluate(T0 + 1, out) == 0 and rc.state == rk.REDUCING
    rc.pos.apply_fill(0, 1, 100.0, 300.0, 0.0)  # $30k in one symbol: over 25%
    assert rc.evaluate(T0 + 2, out) == rk.R_CONCENTRATION
    assert (rc.state, rc.reason) == (rk.HALTED, rk.R_CONCENTRATION)
