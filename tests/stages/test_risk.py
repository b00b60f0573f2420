"""Positions (average-cost PnL) and the pre-trade risk checks, reject reason by reject reason."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from shm import schema
from stages.config import RiskConfig
from stages.orders import Order
from stages.paper import EventTuple, PaperExchange
from stages.risk import Positions, RiskChecks
from tests import books
from tests.orders import order

Levels = list[tuple[float, float]]
CODE = schema.REJECT_CODE


def make_book(
    bids: Levels, asks: Levels, *, symbol_id: int = 0, flags: int = schema.BOOK_SNAPSHOT
) -> np.void:
    return books.make_book(bids, asks, symbol_id=symbol_id, flags=flags)[0]


# ---------------------------------------------------------------- positions
class CashBook:
    """Independent reference: cash flows and inventory, no average price at all."""

    def __init__(self) -> None:
        self.cash = 0.0
        self.qty = 0.0
        self.fees = 0.0
        self.volume = 0.0

    def fill(self, side: int, px: float, q: float, fee: float) -> None:
        self.cash -= side * px * q
        self.qty += side * q
        self.fees += fee
        self.volume += px * q

    def pnl(self, mark: float) -> float:
        return self.cash + self.qty * mark - self.fees


def test_open_add_partial_close_and_flip() -> None:
    p = Positions(n=2)
    p.apply_fill(0, 1, 100.0, 2.0, 0.0)  # open long 2 @ 100
    assert (p.qty[0], p.avg_px[0], p.realized[0]) == (2.0, 100.0, 0.0)

    p.apply_fill(0, 1, 103.0, 1.0, 0.0)  # add: average price moves
    assert p.qty[0] == 3.0
    assert p.avg_px[0] == pytest.approx((2 * 100.0 + 1 * 103.0) / 3)
    avg = (2 * 100.0 + 1 * 103.0) / 3

    p.apply_fill(0, -1, 110.0, 1.5, 0.0)  # partial close: realise on 1.5, average unchanged
    assert p.qty[0] == pytest.approx(1.5)
    assert p.avg_px[0] == pytest.approx(avg)
    assert p.realized[0] == pytest.approx(1.5 * (110.0 - avg))

    p.apply_fill(0, -1, 105.0, 3.0, 0.0)  # flip: close 1.5, open 1.5 short at the flip price
    assert p.qty[0] == pytest.approx(-1.5)
    assert p.avg_px[0] == 105.0
    assert p.realized[0] == pytest.approx(1.5 * (110.0 - avg) + 1.5 * (105.0 - avg))

    p.apply_fill(0, 1, 100.0, 0.5, 0.0)  # short partially covered lower: a gain
    assert p.realized[0] == pytest.approx(1.5 * (110.0 - avg) + 1.5 * (105.0 - avg) + 0.5 * 5.0)
    assert p.qty[0] == pytest.approx(-1.0) and p.avg_px[0] == 105.0

    p.apply_fill(0, 1, 106.0, 1.0, 0.0)  # back to flat
    assert p.qty[0] == 0.0 and p.avg_px[0] == 0.0
    assert p.fills[0] == 6
    assert p.qty[1] == 0.0 and p.realized[1] == 0.0  # the other symbol untouched


def test_fees_reduce_realised_and_accumulate() -> None:
    p = Positions(n=1)
    p.apply_fill(0, 1, 100.0, 1.0, 0.045)
    assert p.realized[0] == pytest.approx(-0.045)
    p.apply_fill(0, -1, 101.0, 1.0, 0.015)
    assert p.realized[0] == pytest.approx(1.0 - 0.045 - 0.015)
    assert p.fees[0] == pytest.approx(0.06)
    assert p.volume[0] == pytest.approx(201.0)


def test_unrealized() -> None:
    p = Positions(n=2)
    assert p.unrealized(0, 100.0) == 0.0
    p.apply_fill(0, 1, 100.0, 2.0, 0.0)
    assert p.unrealized(0, 101.5) == pytest.approx(3.0)
    assert p.unrealized(0, 99.0) == pytest.approx(-2.0)
    assert p.unrealized(0, math.nan) == 0.0  # no mark: no opinion
    assert p.unrealized(0, 0.0) == 0.0
    p.apply_fill(1, -1, 50.0, 4.0, 0.0)
    assert p.unrealized(1, 49.0) == pytest.approx(4.0)  # short gains when the price falls


def test_realized_plus_unrealized_equals_cash_flows() -> None:
    rng = np.random.default_rng(2024)
    p = Positions(n=1)
    ref = CashBook()
    px = 100.0
    for k in range(400):
        px *= math.exp(float(rng.normal(0, 0.002)))
        side = 1 if rng.random() < 0.5 else -1
        q = float(rng.choice([0.5, 1.0, 1.5, 2.0, 3.0]))
        fee = px * q * 2e-4
        p.apply_fill(0, side, px, q, fee)
        ref.fill(side, px, q, fee)
        mark = px * (1 + float(rng.normal(0, 1e-3)))
        assert p.qty[0] == pytest.approx(ref.qty, abs=1e-9), k
        assert p.realized[0] + p.unrealized(0, mark) == pytest.approx(ref.pnl(mark), abs=1e-6), k
    assert p.fees[0] == pytest.approx(ref.fees)
    assert p.volume[0] == pytest.approx(ref.volume)
    assert p.fills[0] == 400


def test_positions_store_and_load_round_trip() -> None:
    p = Positions(n=3)
    p.apply_fill(1, 1, 10.0, 3.0, 0.01)
    p.apply_fill(1, -1, 11.0, 1.0, 0.01)
    table = np.zeros(3, schema.POSITION)
    p.store(table, 1, 12.0, 2)
    assert table[1]["unrealized"] == pytest.approx(2.0 * (12.0 - 10.0))
    assert table[1]["mark_px"] == 12.0 and table[1]["open_orders"] == 2
    q = Positions(n=3)
    q.load(table)
    for name in ("qty", "avg_px", "realized", "fees", "volume", "fills"):
        assert getattr(q, name) == getattr(p, name), name


# ---------------------------------------------------------------- pre-trade checks
CFG = RiskConfig(
    max_notional_per_symbol=10_000.0, max_total_notional=15_000.0, max_loss_per_day=1_000.0
)
MARK0 = (100.0 + 100.5) / 2
MARK1 = (50.0 + 50.1) / 2


def setup_checks() -> RiskChecks:
    ex = PaperExchange(taker_fee_bps=4.5, maker_fee_bps=1.5, n_symbols=4)
    sink: list[EventTuple] = []
    ex.on_book(make_book([(100.0, 5.0)], [(100.5, 5.0)], symbol_id=0), sink)
    ex.on_book(make_book([(50.0, 5.0)], [(50.1, 5.0)], symbol_id=1), sink)
    ex.on_book(make_book([(20.0, 5.0)], [], symbol_id=3), sink)  # one-sided book
    return RiskChecks(CFG, ex, Positions(n=4))


def check(
    rc: RiskChecks,
    o: Order,
    *,
    draining: bool = False,
    kill: int = 0,
    state: int = schema.CTRL_RUNNING,
) -> str:
    return schema.REJECT_REASONS[rc.check(o, draining=draining, kill=kill, state=state)]


def test_clean_order_passes() -> None:
    assert setup_checks().check(order(), draining=False, kill=0, state=schema.CTRL_RUNNING) == 0


def test_engine_state_rejects_in_precedence_order() -> None:
    rc = setup_checks()
    bad = order(qty=-1.0)
    assert check(rc, bad, draining=True, kill=1, state=schema.CTRL_PAUSED) == "draining"
    assert check(rc, bad, kill=1, state=schema.CTRL_PAUSED) == "kill_switch"
    assert check(rc, order(), kill=2) == "halted"  # an automatic halt (daily loss)
    assert check(rc, bad, state=schema.CTRL_PAUSED) == "paused"
    assert check(rc, order(), state=schema.CTRL_KILLED) == "paused"
    assert check(rc, bad) == "bad_order"


@pytest.mark.parametrize(
    "kw",
    [
        {"qty": 0.0},
        {"qty": -1.0},
        {"qty": math.nan},
        {"qty": math.inf},
        {"side": 0},
        {"side": 2},
        {"symbol_id": 4},
        {"symbol_id": 1000},
        {"px": math.nan},  # every order carries a limit: a NaN one would sweep the book
        {"px": 0.0},
        {"px": -5.0},
        {"px": math.inf},
    ],
)
def test_bad_order(kw: dict[str, Any]) -> None:
    assert check(setup_checks(), order(**kw)) == "bad_order"


def test_no_book() -> None:
    rc = setup_checks()
    assert check(rc, order(symbol_id=2)) == "no_book"  # never had a book
    # a one-sided book is still a book: a limit order on it is checked on its limit price
    assert check(rc, order(symbol_id=3, px=20.0, qty=1.0)) == "none"


@pytest.mark.parametrize(
    ("flags", "reason"),
    [
        (schema.BOOK_STALE, "stale_book"),
        (schema.BOOK_CROSSED, "crossed_book"),
        (schema.BOOK_STALE | schema.BOOK_CROSSED, "stale_book"),
        (schema.BOOK_SNAPSHOT | schema.BOOK_RESYNCED, "none"),
    ],
)
def test_stale_and_crossed_books(flags: int, reason: str) -> None:
    rc = setup_checks()
    rc.ex.on_book(make_book([(100.0, 5.0)], [(100.5, 5.0)], flags=flags), [])
    assert check(rc, order()) == reason
    assert check(rc, order(symbol_id=1, px=50.0)) == "none"  # the other symbol trades on


def test_symbol_notional() -> None:
    rc = setup_checks()
    cap = CFG.max_notional_per_symbol
    assert check(rc, order(px=100.0, qty=cap / 100.0 * 1.001)) == "symbol_notional"
    assert check(rc, order(px=100.0, qty=cap / 100.0 * 0.999)) == "none"
    assert check(rc, order(side=-1, px=100.0, qty=cap / 100.0 * 1.001)) == "symbol_notional"
    # resting orders on the same side count as if filled
    rc.ex.submit(
        order_id=77,
        symbol_id=0,
        side=1,
        tif=schema.TIF_POST_ONLY,
        px=99.0,
        qty=50.0,
        recv_ns=0,
        out=[],
    )
    assert check(rc, order(px=100.0, qty=51.0)) == "symbol_notional"
    rc.ex.cancel(77, recv_ns=0, out=[])
    # the position counts: 60 held + 41 more at 100 is over
    rc.pos.apply_fill(0, 1, 100.0, 60.0, 0.0)
    assert check(rc, order(px=100.0, qty=41.0)) == "symbol_notional"
    assert check(rc, order(px=100.0, qty=39.0)) == "none"


def test_reduce_only_passes_over_the_symbol_cap() -> None:
    rc = setup_checks()
    rc.pos.apply_fill(0, 1, 100.0, 150.0, 0.0)  # 15,000 long: over the 10,000 cap
    assert CFG.max_notional_per_symbol < 150.0 * MARK0
    assert check(rc, order(side=-1, px=100.5, qty=10.0)) == "none"
    assert check(rc, order(side=-1, px=100.5, qty=150.0)) == "none"  # to flat
    assert check(rc, order(side=-1, px=99.0, qty=10.0)) == "none"
    assert check(rc, order(side=1, px=100.0, qty=0.01)) == "symbol_notional"
    assert check(rc, order(side=-1, px=100.0, qty=301.0)) == "symbol_notional"  # flips bigger


def test_total_notional() -> None:
    rc = setup_checks()
    rc.pos.apply_fill(0, 1, 100.0, 90.0, 0.0)
    gross = 90.0 * MARK0  # the reference: gross notional at the marks
    assert rc.gross_notional() == pytest.approx(gross)
    over_q = (CFG.max_total_notional - gross) / 50.1 + 1.0
    under_q = (CFG.max_total_notional - gross) / 50.1 - 1.0
    assert over_q * 50.1 < CFG.max_notional_per_symbol  # under the symbol cap on its own
    assert check(rc, order(symbol_id=1, px=50.1, qty=over_q)) == "total_notional"
    assert check(rc, order(symbol_id=1, px=50.1, qty=under_q)) == "none"
    # a short in another symbol adds to gross notional too
    assert check(rc, order(symbol_id=1, side=-1, px=50.0, qty=over_q)) == "total_notional"
    # reducing is always fine
    assert check(rc, order(symbol_id=0, side=-1, px=100.5, qty=50.0)) == "none"


def test_total_notional_counts_short_positions_at_their_absolute_value() -> None:
    rc = setup_checks()
    rc.pos.apply_fill(0, -1, 100.0, 90.0, 0.0)
    gross = 90.0 * MARK0
    assert rc.gross_notional() == pytest.approx(gross)
    over_q = (CFG.max_total_notional - gross) / 50.1 + 1.0
    assert check(rc, order(symbol_id=1, px=50.1, qty=over_q)) == "total_notional"


def test_daily_loss() -> None:
    rc = setup_checks()
    rc.pos.apply_fill(0, 1, 150.0, 10.0, 5.0)  # bought 10 at 150, marked at 100.25
    realized, unreal = rc.total_pnl()
    assert realized == pytest.approx(-5.0)
    assert unreal == pytest.approx(10.0 * (MARK0 - 150.0))
    assert realized + unreal > -CFG.max_loss_per_day
    assert check(rc, order(side=-1, px=100.5, qty=1.0)) == "none"
    rc.pos.apply_fill(1, 1, 120.0, 8.0, 0.0)  # another 560 under water
    realized, unreal = rc.total_pnl()
    assert realized + unreal < -CFG.max_loss_per_day
    assert check(rc, order(side=-1, px=100.5, qty=1.0)) == "daily_loss"
    assert check(rc, order(symbol_id=1, side=1, px=50.0, qty=1.0)) == "daily_loss"
    # the engine-state rejects still come first
    assert check(rc, order(), kill=1) == "kill_switch"
