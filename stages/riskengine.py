"""The risk engine's kernel: positions, pre-trade checks, the trading state machine, the
triggers, circuit breakers and per-venue order rate limits. Pure: it reads no clock (callers
pass ``now_ns``, ``time.monotonic_ns()``) and no shared memory; it appends the events it causes
(cancels, fills of its own orders) to ``out`` like the paper exchange does. ``stages.risk``
drives it from the rings and the control block.

Trading state machine (one per engine), with a reason code from ``REASONS``:

    ACTIVE ──leverage──▶ REDUCING ──leverage <= 0.9 x max_leverage──▶ ACTIVE
    ACTIVE / REDUCING ──daily_loss | concentration | adr_loss | manual──▶ HALTED
    HALTED(manual) ──manual reset (``hft kill --reset`` clears the control block's kill)──▶ ACTIVE
    HALTED(trigger) ──manual reset──▶ REDUCING(same reason) ──its cause gone──▶ ACTIVE

- HALTED is the kill switch. The control block's ``kill`` field holds the halt reason's code
  (1 manual: ``hft kill``; 2 daily_loss; 3 concentration; 4 adr_loss), so route stops sending
  and the reason survives a restart of the risk stage. Entering HALTED cancels every resting
  order once; while it holds every new order is rejected: ``kill_switch`` when the halt is
  manual, ``halted`` when a trigger tripped it. Only a manual reset leaves it. After a
  trigger's halt the reset leads to REDUCING with the same reason, not to ACTIVE: while the
  cause holds (a daily loss still below the limit, a position still over the concentration
  cap) only orders that shrink positions pass, so the operator can work the position down,
  which a halt that tripped again at once would forbid; that trigger does not halt again
  while the engine reduces for it (the others do). Once its cause is gone the engine is
  ACTIVE again (or REDUCING for leverage, if that holds). The UTC midnight rollover does not
  clear a daily-loss halt: it only moves ``day_base``, so after a reset the new day's PnL
  starts from zero.
- REDUCING: only orders that shrink an existing position without flipping it are accepted
  (counting resting orders on the same side as if filled); any other is rejected
  ``reduce_only``. Entering it cancels every open order (resting, or still on its way to
  the book) that would grow a position (a flat symbol's orders included). It returns to ACTIVE by itself when leverage has fallen to
  ``LEVERAGE_RESUME`` (0.9) x max_leverage (hysteresis, so a position at the cap does not flap).
- Holding time does not change the engine's state: a symbol whose position is older than
  ``max_holding_s`` becomes reduce-only on its own (reject ``reduce_only``), its open
  orders are cancelled, and once none is open any more (a cancel cannot overtake an order on
  its way: one that reaches the book first may still fill) the engine sends an IOC for the
  whole position against the book itself (limit ``HOLDING_THROUGH_BPS`` through the touch, rounded to the tick away from the
  touch; retried every ``HOLDING_RETRY_NS`` while anything is left). These orders carry ids
  with ``RISK_ORDER_BIT`` set (route's ids never have it) and go out as ordinary events (fills,
  expiry) counted as orders, so route's position follows them; they are not sent while the engine
  is paused, draining or halted, nor into a stale, crossed or breaker-paused book (they wait
  for it). The symbol is released when its position is flat. While any symbol is being
  reduced, the published reason of an ACTIVE engine is ``holding_time``. A position's clock
  starts when it opens or flips; a restarted risk stage restarts the clocks of the positions
  it loads (neither shared memory nor the journal keeps the opening time).

Triggers (``evaluate``, run by the stage on every pass, over positions at the current mids):

    pnl      = sum(realised) + sum(funding) + sum(q_s * (mid_s - avg_s))   (realised is net
               of fees; all of it since the journal began)
    daily    = pnl - day_base        (day_base: pnl at the last UTC midnight, set by the stage)
    equity   = account_equity_usd + pnl
    gross    = sum |q_s| * mid_s                     (average price where there is no mid)
    daily_loss:    daily < -max_loss_per_day                                    -> HALTED
    concentration: max_s |q_s| * mid_s > max_concentration * max(gross, equity)  -> HALTED
    adr_loss:      q_s * (mid_s - avg_s) < -adr_loss_multiple * |q_s| * ADR_s   -> HALTED
    leverage:      gross / equity > max_leverage  (equity <= 0 counts as over)  -> REDUCING

A symbol without a book yet is priced at its last mid (``last_mark``: from its books, or,
after a restart, the mark the dead process saved); a position with no price at all holds the
daily-loss trigger and pre-check back (``unpriced``) rather than judging a PnL it cannot know
(right after an engine start, until the first books: a few milliseconds).

The concentration denominator is the larger of gross notional and equity: with a gross-only
denominator one symbol is always at least 1/n of n symbols' gross (so with the simulator's
four symbols some symbol is always at or over 25%) and a first position is 100% of it; with
equity as the floor a book smaller than the account is held to max_concentration x equity per
symbol (25% x $100k = $25k by default), a leveraged one to that share of its gross. The
pre-trade check keeps a growing order under ``CONCENTRATION_ENTRY`` (0.9) of that cap, so the
halt is for a position that drifted over it (prices, losses, other positions reduced), never
for one just put on. ``max_concentration = 1`` turns both off (no symbol can exceed the whole).

ADR (average daily range, in price) comes from the engine's own 1 s mid bars:
``ADR_s = ATR_s x sqrt(86,400)``, ``ATR_s`` the mean true range of the last ``ATR_BARS`` (60)
closed bars (true range = max(high, previous close) - min(low, previous close)); a random
walk's range grows with the square root of time. It needs ``ATR_MIN_BARS`` (20) bars: before
that the adr_loss trigger and the extreme-move breaker cannot trip. Bars are updated per book
in O(1) (a ring of true ranges and their running sum); a second with no book adds no bar.
Books are timed by the stage's clock when it reads them (one read's books share a time).

Pre-trade checks (``check``), in order; the first that fails names the reject reason:

    draining; halted (kill_switch if manual, else halted); paused (the control block's state)
    malformed order (non-finite or non-positive quantity or limit, bad side, unknown symbol,
                    an id outside 1..2^63-1)
    no book / stale book / crossed book
    circuit_breaker: the symbol is paused
    reduce_only: REDUCING, or the symbol is being reduced for its holding time, and the order
                 (with the resting orders on its side) does not shrink the position
    when the order grows |position| (resting orders on its side counted as filled), at the
    highest price it can fill at, ref = its limit for a buy, max(limit, best bid) for a sell
    (a sell with a low limit fills at the bids):
        symbol_notional: |after| * ref > max_notional_per_symbol
        total_notional:  gross + (|after| - |pos|) * ref > max_total_notional
        leverage:        that gross > max_leverage * equity
        concentration:   |after| * ref > CONCENTRATION_ENTRY * max_concentration
                                            * max(that gross, equity)   (max_concentration < 1)
    daily_loss: daily < -max_loss_per_day (the stage then halts the engine)

and, after them, in the stage: rate_limited (the venue's token bucket is empty). An order
rejected earlier never spends a token.

Circuit breakers (``on_book``, per symbol, from every tradeable book risk reads):

    wide_spread:  (ask - bid) / mid > wide_spread_bps / 10,000
    thin_book:    sum of px * sz over every level of both sides in the record < min_liquidity_usd
    extreme_move: |mid - close of the previous 1 s bar| > extreme_move_atr * ATR (20+ bars)

A trip pauses new orders in that symbol (reject ``circuit_breaker``) until ``breaker_pause_s``
after the last book that showed the condition; other symbols trade on. Resting orders are
left alone (they were placed on a healthy book; the pause keeps new risk out, and cancelling
into a thin or jumping book gains nothing) and no breaker refuses a cancel. Each transition
from trading to paused counts once (``trips``, per kind in ``trips_by``). Stale and crossed
books are skipped: they have their own rejects.

The shipped thresholds against the embedded simulator (``ops.sim``, seed 7, 30 simulated
minutes at 1,000 books/s a symbol, 20 levels a side): book notional never below $4.4M (BTC),
$2.1M (ETH), $0.85M (SOL), $0.72M (DOGE), 1st percentile $0.95M (DOGE), against the $500k
floor; spreads at most 0.7, 2.9, 6.0 and 2.9 bps against 10; extreme moves over 3 ATR trip 2
to 3 times a symbol per 30 minutes (its volatility clusters), pausing it 3-5% of the time.

Rate limits (``VenueLimiter``): per venue (the symbol table's ``venue``), at most
max_orders_per_s sends in any window of one second (a sliding window of send times: what a
venue's "N per second" means; a token bucket of one second's burst lets 2N through a window
that straddles a refill). Below 1/s: one send per 1/rate seconds. Route's new orders and
cancels take a slot; a new order finding none is rejected ``rate_limited``; a cancel finding
none is held by the stage and sent when a slot frees (refusing it would tell route the order
is gone while it still rests). The engine's own cancels when it starts REDUCING and its
holding-time IOCs are never refused but count in the window; the kill switch's and the
drain's mass cancel neither wait nor count.

Cost: a check is a few dict/list reads and one pass over the symbols with a position (no
allocation, no logging); ``on_book`` is O(1) per book; ``evaluate`` is one pass over the
symbols with a position.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
from numba import njit

from shm import schema
from stages.config import RiskConfig
from stages.orders import Order
from stages.paper import EventTuple, PaperExchange

# ---------------------------------------------------------------- trading state and reasons
ACTIVE: Final = 0
REDUCING: Final = 1
HALTED: Final = 2
STATE_NAMES: Final = ("active", "reducing", "halted")  # hft_trading_state's values, in order

REASONS: Final = (
    "none",
    "manual",  # hft kill (the control block's kill = 1)
    "daily_loss",  # realised + unrealised PnL below -max_loss_per_day
    "concentration",  # one symbol over max_concentration of the portfolio
    "adr_loss",  # a position's unrealised loss over adr_loss_multiple x its ADR
    "leverage",  # gross notional over max_leverage x equity
    "holding_time",  # a position older than max_holding_s is being reduced
)
R_NONE: Final = 0
R_MANUAL: Final = 1
R_DAILY_LOSS: Final = 2
R_CONCENTRATION: Final = 3
R_ADR_LOSS: Final = 4
R_LEVERAGE: Final = 5
R_HOLDING_TIME: Final = 6
AUTO_HALT_REASONS: Final = (R_DAILY_LOSS, R_CONCENTRATION, R_ADR_LOSS)

BREAKER_NAMES: Final = ("none", "wide_spread", "thin_book", "extreme_move")
B_WIDE_SPREAD: Final = 1
B_THIN_BOOK: Final = 2
B_EXTREME_MOVE: Final = 3

# float gauges of the risk stage's stats block (shm.schema names slots 0-4; these are ours)
G_TRADING_STATE: Final = 5  # ACTIVE / REDUCING / HALTED
G_TRADING_REASON: Final = 6  # index into REASONS
G_BREAKER_TRIPS: Final = 7  # circuit breaker trips since the positions were created (a counter)
assert schema.G_DAILY_PNL < G_TRADING_STATE and G_BREAKER_TRIPS < schema.N_GAUGES

BAR_NS: Final = 1_000_000_000
ATR_BARS: Final = 60
ATR_MIN_BARS: Final = 20
ADR_PER_ATR: Final = math.sqrt(86_400.0)  # 1 s ATR -> daily range, random-walk scaling
QTY_REL_TOL: Final = 1e-9  # quantities this close (relative) are equal: partial sums' dust
_ID_END: Final = 1 << 63  # order ids are positive signed 64-bit (the journal's INTEGER)
LEVERAGE_RESUME: Final = 0.9  # REDUCING -> ACTIVE at this fraction of max_leverage
CONCENTRATION_ENTRY: Final = 0.9  # a growing order stays under this fraction of the cap
HOLDING_THROUGH_BPS: Final = 20.0  # the holding-time IOC's limit, through the touch
HOLDING_RETRY_NS: Final = 1_000_000_000
RISK_ORDER_BIT: Final = 1 << 62  # set in the ids of orders the risk engine sends itself

_REJ_DRAINING: Final = schema.REJECT_CODE["draining"]
_REJ_KILL: Final = schema.REJECT_CODE["kill_switch"]
_REJ_HALTED: Final = schema.REJECT_CODE["halted"]
_REJ_PAUSED: Final = schema.REJECT_CODE["paused"]
_REJ_BAD: Final = schema.REJECT_CODE["bad_order"]
_REJ_NO_BOOK: Final = schema.REJECT_CODE["no_book"]
_REJ_STALE: Final = schema.REJECT_CODE["stale_book"]
_REJ_CROSSED: Final = schema.REJECT_CODE["crossed_book"]
_REJ_BREAKER: Final = schema.REJECT_CODE["circuit_breaker"]
_REJ_REDUCE: Final = schema.REJECT_CODE["reduce_only"]
_REJ_SYMBOL: Final = schema.REJECT_CODE["symbol_notional"]
_REJ_TOTAL: Final = schema.REJECT_CODE["total_notional"]
_REJ_LEVERAGE: Final = schema.REJECT_CODE["leverage"]
_REJ_CONCENTRATION: Final = schema.REJECT_CODE["concentration"]
_REJ_DAILY_LOSS: Final = schema.REJECT_CODE["daily_loss"]


def halt_reason(kill: int) -> int:
    """The reason code of a control-block kill value (anything not automatic is manual)."""
    return kill if kill in AUTO_HALT_REASONS else R_MANUAL


def reason_name(code: int) -> str:
    return REASONS[code] if 0 <= code < len(REASONS) else REASONS[R_MANUAL]


# ---------------------------------------------------------------- positions
@dataclass
class Positions:
    """Net position, average price, realised PnL, fees and funding per symbol; ``open`` holds
    the symbols whose position is not flat (what the aggregates loop over).

    ``realized`` is the trading PnL net of fees (what the fills made); ``funding`` the funding
    payments received (+) or paid (-), kept apart so that a rebuild from the journal (fills in
    journal order, funding per symbol in journal order) reproduces both bit for bit; realised
    PnL in the money sense is ``realized + funding`` (``realized_total``), which is what the
    shared-memory ``realized`` field holds."""

    n: int = schema.MAX_SYMBOLS

    def __post_init__(self) -> None:
        self.qty = [0.0] * self.n
        self.avg_px = [0.0] * self.n
        self.realized = [0.0] * self.n
        self.fees = [0.0] * self.n
        self.funding = [0.0] * self.n
        self.funding_total = 0.0  # sum(funding), recomputed when a payment is booked (rare)
        self.volume = [0.0] * self.n
        self.fills = [0] * self.n
        self.open: set[int] = set()

    def apply_funding(self, s: int, amount: float) -> None:
        """Book a funding payment: + received, - paid (longs pay when the rate is positive)."""
        self.funding[s] += amount
        self.funding_total = sum(self.funding)

    def set_funding(self, by_symbol: Mapping[int, float]) -> None:
        """Take the per-symbol funding totals a journal rebuild summed."""
        for s, amount in by_symbol.items():
            self.funding[s] = amount
        self.funding_total = sum(self.funding)

    def realized_total(self) -> float:
        """Realised PnL of every symbol: trading net of fees, plus funding."""
        return sum(self.realized) + self.funding_total

    def apply_fill(self, s: int, side: int, px: float, q: float, fee: float) -> None:
        pos, avg = self.qty[s], self.avg_px[s]
        if pos == 0.0 or (pos > 0) == (side > 0):
            new = abs(pos) + q
            self.avg_px[s] = (abs(pos) * avg + q * px) / new
            self.qty[s] = pos + side * q
        else:
            closing = min(q, abs(pos))
            self.realized[s] += closing * (px - avg) * (1.0 if pos > 0 else -1.0)
            self.qty[s] = pos + side * q
            if abs(self.qty[s]) <= QTY_REL_TOL * max(abs(pos), q):  # float dust of the sum
                self.qty[s] = 0.0
                self.avg_px[s] = 0.0
            elif q > closing:
                self.avg_px[s] = px  # flipped: the remainder opened at this price
        self.realized[s] -= fee
        self.fees[s] += fee
        self.volume[s] += px * q
        self.fills[s] += 1
        if self.qty[s]:
            self.open.add(s)
        else:
            self.open.discard(s)

    def row(self, s: int) -> list[float | int]:
        """[symbol_id, qty, avg_px, realized, fees, funding, fills] of one symbol (for logs)."""
        q, avg, real, fees, fund = self.qty, self.avg_px, self.realized, self.fees, self.funding
        return [s, q[s], avg[s], real[s], fees[s], fund[s], self.fills[s]]

    def unrealized(self, s: int, mark: float) -> float:
        if self.qty[s] == 0.0 or not mark > 0:
            return 0.0
        return self.qty[s] * (mark - self.avg_px[s])

    def load(self, table: np.ndarray) -> None:
        """Take the positions a shared-memory table holds (its ``realized`` includes funding,
        which then stays in ``realized``). The risk stage rebuilds from its journal instead."""
        for s, rec in enumerate(table[: self.n].tolist()):
            qty, avg, realized, _unreal, fees, _mark, volume, fills, _open = rec
            self.qty[s], self.avg_px[s], self.realized[s] = qty, avg, realized
            self.fees[s], self.volume[s], self.fills[s] = fees, volume, fills
        self.funding = [0.0] * self.n
        self.funding_total = 0.0
        self.open = {s for s, q in enumerate(self.qty) if q}

    def store(self, table: np.ndarray, s: int, mark: float, open_orders: int) -> None:
        """Write symbol ``s`` into a shared-memory table; ``realized`` there includes funding."""
        table[s] = (
            self.qty[s],
            self.avg_px[s],
            self.realized[s] + self.funding[s],
            self.unrealized(s, mark),
            self.fees[s],
            mark,
            self.volume[s],
            self.fills[s],
            open_orders,
        )


# ---------------------------------------------------------------- 1 s bars and ATR
class Bars:
    """1 s mid bars per symbol and the mean true range of the last ``ATR_BARS`` closed ones."""

    def __init__(self, n: int) -> None:
        self.bar = [-1] * n  # index (ns // BAR_NS) of the bar being built
        self.hi = [0.0] * n
        self.lo = [0.0] * n
        self.close = [math.nan] * n
        self.prev_close = [math.nan] * n  # close of the last closed bar
        self._tr = [[0.0] * ATR_BARS for _ in range(n)]
        self._i = [0] * n
        self.count = [0] * n  # closed bars
        self._sum = [0.0] * n

    def update(self, s: int, mid: float, ts_ns: int) -> None:
        b = ts_ns // BAR_NS
        cur = self.bar[s]
        if b > cur:
            if cur >= 0:  # close the bar being built
                hi, lo, prev = self.hi[s], self.lo[s], self.prev_close[s]
                if prev == prev:
                    hi, lo = max(hi, prev), min(lo, prev)
                ring, i = self._tr[s], self._i[s]
                self._sum[s] += (hi - lo) - ring[i]
                ring[i] = hi - lo
                i += 1
                if i == ATR_BARS:
                    i = 0
                    self._sum[s] = math.fsum(ring)  # no drift from the running sum
                self._i[s] = i
                self.count[s] += 1
                self.prev_close[s] = self.close[s]
            self.bar[s] = b
            self.hi[s] = self.lo[s] = mid
        elif mid > self.hi[s]:
            self.hi[s] = mid
        elif mid < self.lo[s]:
            self.lo[s] = mid
        self.close[s] = mid

    def atr(self, s: int) -> float:
        """Mean true range of the last closed bars, in price; NaN before ``ATR_MIN_BARS``."""
        n = self.count[s]
        if n < ATR_MIN_BARS:
            return math.nan
        return self._sum[s] / (n if n < ATR_BARS else ATR_BARS)


@njit(cache=True, nogil=True)
def _book_notional(
    bid_px: np.ndarray,
    bid_sz: np.ndarray,
    n_bid: np.ndarray,
    ask_px: np.ndarray,
    ask_sz: np.ndarray,
    n_ask: np.ndarray,
    out: np.ndarray,
) -> None:
    """``out[i]``: sum of px * sz over the levels of both sides of book ``i`` (compiled: the
    numpy expression it replaces cost ~10 us a pass in temporaries, this ~1.5)."""
    for i in range(bid_px.shape[0]):
        t = 0.0
        for k in range(min(n_bid[i], bid_px.shape[1])):
            t += bid_px[i, k] * bid_sz[i, k]
        for k in range(min(n_ask[i], ask_px.shape[1])):
            t += ask_px[i, k] * ask_sz[i, k]
        out[i] = t


# ---------------------------------------------------------------- rate limits
class VenueLimiter:
    """At most ``rate_per_s`` sends per venue in any window of one second (below 1/s: one per
    ``1 / rate_per_s`` seconds): a sliding window of the send times."""

    def __init__(self, rate_per_s: float, venue_of: Sequence[int]) -> None:
        self.venue_of = list(venue_of)
        n_venues = max(self.venue_of, default=0) + 1
        rate = float(rate_per_s)
        self.limit = max(int(rate), 1)
        self.window_ns = BAR_NS if rate >= 1.0 else round(BAR_NS / max(rate, 1e-9))
        self.sent: list[collections.deque[int]] = [collections.deque() for _ in range(n_venues)]

    def _window(self, s: int, now_ns: int) -> collections.deque[int]:
        q = self.sent[self.venue_of[s] if 0 <= s < len(self.venue_of) else 0]
        edge = now_ns - self.window_ns
        while q and q[0] < edge:  # a send exactly one window ago still counts
            q.popleft()
        return q

    def used(self, s: int, now_ns: int) -> int:
        """Sends of symbol ``s``'s venue in the window ending now."""
        return len(self._window(s, now_ns))

    def take(self, s: int, now_ns: int) -> bool:
        """Count a send of symbol ``s``'s venue if the window has room; False when it is full."""
        q = self._window(s, now_ns)
        if len(q) < self.limit:
            q.append(now_ns)
            return True
        return False

    def spend(self, s: int, now_ns: int) -> None:
        """Count a send whatever the window holds (the engine's own orders: never refused)."""
        self._window(s, now_ns).append(now_ns)


# ---------------------------------------------------------------- the engine
# before_new(order_id, symbol_id, side, qty, px, style, tif), before_cancel(order_id): called
# right before the engine hands an order or a cancel of its own to the venue (the stage
# journals it there: write first, then act)
BeforeNew = Callable[[int, int, int, float, float, int, int], None]
BeforeCancel = Callable[[int], None]


class RiskChecks:
    """Pre-trade checks, triggers, the trading state, breakers and rate limits of one engine."""

    def __init__(
        self,
        cfg: RiskConfig,
        exchange: PaperExchange,
        positions: Positions,
        *,
        venue_of: Sequence[int] | None = None,
        tick_of: Sequence[float] | None = None,
        first_risk_order_id: int = RISK_ORDER_BIT | 1,
        before_new: BeforeNew | None = None,
        before_cancel: BeforeCancel | None = None,
    ) -> None:
        self.cfg = cfg
        # the stage's journal: told before the engine sends an order or a cancel of its own
        self.before_new = before_new
        self.before_cancel = before_cancel
        self.ex = exchange
        self.pos = positions
        n = exchange.n_symbols
        self.day_base = 0.0  # total PnL at the last UTC midnight: daily PnL = PnL - day_base
        # each symbol's last mid (from its books; a restarted stage seeds it with the marks the
        # dead process saved): prices a position while its book has none yet
        self.last_mark = [math.nan] * n
        self.unpriced = False  # the last exposure() met a position with no price at all
        self.state = ACTIVE
        self.reason = R_NONE
        self.bars = Bars(n)
        self.paused_until = [0] * n  # circuit breaker: no new order before this (ns)
        self.breaker = [0] * n  # the last breaker that tripped, per symbol
        self.trips = 0
        self.trips_by = [0] * len(BREAKER_NAMES)
        self.limiter = VenueLimiter(cfg.max_orders_per_s, venue_of if venue_of else [0] * n)
        self.tick = list(tick_of) if tick_of else [0.0] * n
        self.held_sign = [0] * n  # sign of the position whose clock runs
        self.opened_ns = [0] * n
        self.holding: set[int] = set()  # symbols being reduced for their holding time
        self.retry_ns = [0] * n
        self.next_risk_order_id = first_risk_order_id | RISK_ORDER_BIT
        self.risk_orders = 0
        self._held: set[int] = set()
        self._cancels_sent: set[int] = set()  # open orders the engine has sent a cancel for
        self._liq = np.zeros(64)  # on_books: each book's notional
        self.on_books(np.zeros(0, schema.BOOK), 0)  # compiled (or loaded) now, not on a tick
        self._pause_ns = int(cfg.breaker_pause_s * 1e9)
        self._hold_ns = int(cfg.max_holding_s * 1e9)
        self._spread_frac = cfg.wide_spread_bps * 1e-4

    # ------------------------------------------------------------------ aggregates
    def mark(self, s: int) -> float:
        """The mid, else the last one known (NaN: never priced)."""
        bid, ask = self.ex.best(s)
        return (bid + ask) * 0.5 if bid > 0 and ask > 0 else self.last_mark[s]

    def exposure(self) -> tuple[float, float]:
        """Return (gross notional, total PnL) at the current mids, in one pass; PnL counts
        realised (net of fees), funding and unrealised since the journal began."""
        qty, avg, best = self.pos.qty, self.pos.avg_px, self.ex.best
        gross = unreal = 0.0
        unpriced = False
        for s in self.pos.open:
            q = qty[s]
            bid, ask = best(s)
            if bid > 0 and ask > 0:
                m = (bid + ask) * 0.5
            else:
                m = self.last_mark[s]
                if not m > 0:
                    gross += abs(q) * avg[s]
                    unpriced = True
                    continue
            unreal += q * (m - avg[s])
            gross += abs(q) * m
        self.unpriced = unpriced
        return gross, self.pos.realized_total() + unreal

    def gross_notional(self) -> float:
        return self.exposure()[0]

    def total_pnl(self) -> tuple[float, float]:
        """Return (realised incl. funding, unrealised)."""
        realized = self.pos.realized_total()
        return realized, self.exposure()[1] - realized

    def daily_pnl(self) -> float:
        """PnL since the last UTC midnight (what the daily loss limit applies to)."""
        return self.exposure()[1] - self.day_base

    def published(self) -> tuple[int, int]:
        """The (state, reason) to show: an ACTIVE engine reducing a symbol says holding_time."""
        if self.state == ACTIVE and self.holding:
            return ACTIVE, R_HOLDING_TIME
        return self.state, self.reason

    # ------------------------------------------------------------------ pre-trade
    def check(self, o: Order, *, draining: bool, kill: int, state: int, now_ns: int = 0) -> int:
        """Return 0 if the order may go to the venue, else its REJECT_CODE."""
        if draining:
            return _REJ_DRAINING
        if kill or self.state == HALTED:
            return _REJ_KILL if halt_reason(kill or self.reason) == R_MANUAL else _REJ_HALTED
        if state != schema.CTRL_RUNNING:
            return _REJ_PAUSED
        s = o.symbol_id
        ex = self.ex
        if (
            s >= ex.n_symbols
            or not 0 < o.order_id < _ID_END
            or o.side not in (1, -1)
            or not (o.qty > 0 and math.isfinite(o.qty))
            or not (o.px > 0 and math.isfinite(o.px))  # every order carries a limit
        ):
            return _REJ_BAD
        if not ex.has_book[s]:
            return _REJ_NO_BOOK
        flags = ex.flags[s]
        if flags & schema.BOOK_STALE:
            return _REJ_STALE
        if flags & schema.BOOK_CROSSED:
            return _REJ_CROSSED
        if self.paused_until[s] > now_ns:
            return _REJ_BREAKER
        side, ref = o.side, o.px
        if side < 0 and ex.bid[s] > ref:  # a sell fills at the bids, its limit or better
            ref = ex.bid[s]
        pos = self.pos.qty[s]
        # worst case: this order and every resting order on its side fill
        same_side = o.qty + ex.resting_qty(s, side)
        if (self.state == REDUCING or s in self.holding) and not (
            pos * side < 0 and same_side <= abs(pos) * (1.0 + QTY_REL_TOL)
        ):
            return _REJ_REDUCE
        after = pos + side * same_side
        grows = abs(after) > abs(pos)
        if grows and abs(after) * ref > self.cfg.max_notional_per_symbol:
            return _REJ_SYMBOL
        gross, pnl = self.exposure()
        if grows:
            cfg = self.cfg
            gross_after = gross + (abs(after) - abs(pos)) * ref
            if gross_after > cfg.max_total_notional:
                return _REJ_TOTAL
            equity = cfg.account_equity_usd + pnl
            if gross_after > cfg.max_leverage * equity:  # equity <= 0: always
                return _REJ_LEVERAGE
            conc = cfg.max_concentration
            if conc < 1.0 and abs(after) * ref > CONCENTRATION_ENTRY * conc * max(
                gross_after, equity
            ):
                return _REJ_CONCENTRATION
        if (
            pnl - self.day_base < -self.cfg.max_loss_per_day
            and not self.unpriced
            and self.reason != R_DAILY_LOSS  # reducing after a reset: reduce-only passed above
        ):
            return _REJ_DAILY_LOSS
        return 0

    # ------------------------------------------------------------------ market data
    def on_book(self, s: int, bid: float, ask: float, liquidity_usd: float, now_ns: int) -> int:
        """Update the symbol's bars and breakers from one tradeable book; return the breaker
        it tripped (0: none)."""
        if not (bid > 0 and ask > bid):
            return 0
        mid = (bid + ask) * 0.5
        self.last_mark[s] = mid
        bars = self.bars
        bars.update(s, mid, now_ns)
        cfg = self.cfg
        why = 0
        if ask - bid > self._spread_frac * mid:
            why = B_WIDE_SPREAD
        elif liquidity_usd < cfg.min_liquidity_usd:
            why = B_THIN_BOOK
        else:
            atr = bars.atr(s)
            if atr > 0 and abs(mid - bars.prev_close[s]) > cfg.extreme_move_atr * atr:
                why = B_EXTREME_MOVE
        if why:
            if self.paused_until[s] <= now_ns:
                self.trips += 1
                self.trips_by[why] += 1
            self.paused_until[s] = now_ns + self._pause_ns
            self.breaker[s] = why
        return why

    def on_books(self, books: np.ndarray, now_ns: int) -> None:
        """``on_book`` for each record of a batch (book notional computed for all at once)."""
        n = len(books)
        if n > len(self._liq):
            self._liq = np.zeros(n)
        n_bid, n_ask = books["n_bid"], books["n_ask"]
        _book_notional(
            books["bid_px"],
            books["bid_sz"],
            n_bid,
            books["ask_px"],
            books["ask_sz"],
            n_ask,
            self._liq,
        )
        liquidity = self._liq[:n].tolist()
        n_sym = len(self.paused_until)
        for s, flags, nb, na, bid, ask, liq in zip(
            books["symbol_id"].tolist(),
            books["flags"].tolist(),
            n_bid.tolist(),
            n_ask.tolist(),
            books["bid_px"][:, 0].tolist(),
            books["ask_px"][:, 0].tolist(),
            liquidity,
            strict=True,
        ):
            if s < n_sym and nb and na and not flags & schema.BOOK_UNTRADEABLE:
                self.on_book(s, bid, ask, liq, now_ns)

    # ------------------------------------------------------------------ state machine
    def halt(self, reason: int, out: list[EventTuple]) -> None:
        """Enter HALTED (the kill switch): cancel every resting order once."""
        self.state = HALTED
        self.reason = reason
        self.holding.clear()
        if self.before_cancel is not None:
            for oid in self.ex.open_ids():
                self.before_cancel(oid)
        self.ex.cancel_all(out=out)

    def sync_kill(self, kill: int, out: list[EventTuple]) -> bool:
        """Follow the control block's kill field: a new kill halts (manual unless it carries
        an automatic reason), a cleared one is the manual reset. Return True on a change."""
        if kill:
            if self.state != HALTED:
                self.halt(halt_reason(kill), out)
                return True
            self.reason = halt_reason(kill)  # `hft kill` over an automatic halt: now manual
            return False
        if self.state == HALTED:
            if self.reason in (R_NONE, R_MANUAL):
                self.state, self.reason = ACTIVE, R_NONE
            else:  # a trigger's halt: reduce-only until its cause is gone (evaluate)
                self.state = REDUCING
            return True
        return False

    def _cancel_open(
        self, out: list[EventTuple], now_ns: int, *, symbol: int = -1, growing: bool = False
    ) -> int:
        """Cancel the open orders, resting or on their way, of ``symbol`` (all if < 0; only
        those that would grow their position if ``growing``); an order whose cancel is on its
        way already is not cancelled again. Return how many of them are still open."""
        qty, sent = self.pos.qty, self._cancels_sent
        live = self.ex.open_orders()
        if sent:
            sent.intersection_update([oid for oid, *_ in live])
        n_open = 0
        for oid, s, side in live:
            if (symbol >= 0 and s != symbol) or (growing and side * qty[s] < 0):
                continue
            n_open += 1
            if oid in sent:
                continue
            sent.add(oid)
            self.limiter.spend(s, now_ns)
            if self.before_cancel is not None:
                self.before_cancel(oid)
            self.ex.cancel(oid, recv_ns=now_ns, out=out, now_ns=now_ns)
        return n_open

    def evaluate(self, now_ns: int, out: list[EventTuple], *, may_trade: bool = True) -> int:
        """Run every trigger over the positions at the current mids; act on what trips.

        Return the reason of a halt it caused (the stage writes it into the control block's
        kill field), else 0. ``may_trade`` False (paused, draining) holds back the engine's own
        holding-time orders.
        """
        if self.state == HALTED:
            return 0
        cfg, pos, bars = self.cfg, self.pos, self.bars
        qty, avg, best = pos.qty, pos.avg_px, self.ex.best
        held, sign_of, opened = self._held, self.held_sign, self.opened_ns
        adr_mult = cfg.adr_loss_multiple * ADR_PER_ATR
        gross = unreal = biggest = 0.0
        adr_hit = unpriced = False
        last = self.last_mark
        for s in pos.open:
            q = qty[s]
            sign = 1 if q > 0 else -1
            if sign_of[s] != sign:  # opened or flipped: its clock starts now
                sign_of[s] = sign
                opened[s] = now_ns
                held.add(s)
                self.holding.discard(s)
            bid, ask = best(s)
            if bid > 0 and ask > 0:
                m = (bid + ask) * 0.5
                u = q * (m - avg[s])
                n = abs(q) * m
                if u < 0.0:
                    atr = bars.atr(s)
                    if atr > 0 and u < -adr_mult * abs(q) * atr:
                        adr_hit = True
                unreal += u
            elif last[s] > 0:  # no book yet: its last mid
                n = abs(q) * last[s]
                unreal += q * (last[s] - avg[s])
            else:
                n = abs(q) * avg[s]
                unpriced = True
            gross += n
            if n > biggest:
                biggest = n
        if len(held) > len(pos.open):  # some went flat: stop their clocks, release them
            for s in [s for s in held if not qty[s]]:
                held.discard(s)
                sign_of[s] = 0
                opened[s] = 0
                self.holding.discard(s)
        pnl = pos.realized_total() + unreal
        equity = cfg.account_equity_usd + pnl
        # every trigger that holds, in priority order; the one the engine is reducing for
        # after a reset does not halt it again, any other does
        causes = [
            r
            for r, hit in (
                (R_DAILY_LOSS, pnl - self.day_base < -cfg.max_loss_per_day and not unpriced),
                (R_CONCENTRATION, biggest > cfg.max_concentration * max(gross, equity)),
                (R_ADR_LOSS, adr_hit),
            )
            if hit
        ]
        reducing_for = self.reason if self.state == REDUCING else R_NONE
        reason = next((r for r in causes if r != reducing_for), R_NONE)
        if reason:
            self.halt(reason, out)
            return reason
        reason = reducing_for if reducing_for in causes else R_NONE
        over = gross > cfg.max_leverage * equity
        if self.state == ACTIVE and over:
            self.state, self.reason = REDUCING, R_LEVERAGE
            self._cancel_open(out, now_ns, growing=True)
        elif self.state == REDUCING and not reason:
            if self.reason != R_LEVERAGE and over:  # reset after a halt: leverage holds too
                self.reason = R_LEVERAGE
            elif self.reason != R_LEVERAGE or gross <= LEVERAGE_RESUME * cfg.max_leverage * equity:
                self.state, self.reason = ACTIVE, R_NONE
        if self._hold_ns > 0:
            for s in pos.open:
                if now_ns - opened[s] > self._hold_ns:
                    if s not in self.holding:
                        self.holding.add(s)
                        self.retry_ns[s] = 0
                        self._cancel_open(out, now_ns, symbol=s)
                    if may_trade and now_ns >= self.retry_ns[s]:
                        self._reduce(s, now_ns, out)
        return 0

    def _reduce(self, s: int, now_ns: int, out: list[EventTuple]) -> None:
        """Send an IOC for the whole position of ``s`` against the book (holding time)."""
        ex = self.ex
        if (
            not ex.has_book[s]
            or ex.flags[s] & schema.BOOK_UNTRADEABLE
            or self.paused_until[s] > now_ns
        ):
            return  # wait for a book worth trading into
        q = self.pos.qty[s]
        side = -1 if q > 0 else 1
        bid, ask = ex.best(s)
        touch = bid if side < 0 else ask
        if not touch > 0:
            return
        # every open order of s first, reducing ones route placed meanwhile too: one already
        # on its way may still fill, so the IOC waits until none is open, then takes the rest
        if self._cancel_open(out, now_ns, symbol=s):
            return
        self.retry_ns[s] = now_ns + HOLDING_RETRY_NS
        through = HOLDING_THROUGH_BPS * 1e-4
        px = touch * (1.0 - through) if side < 0 else touch * (1.0 + through)
        tick = self.tick[s]
        if tick > 0:
            px = (math.floor(px / tick + 1e-9) if side < 0 else math.ceil(px / tick - 1e-9)) * tick
        oid = self.next_risk_order_id
        self.next_risk_order_id += 1
        self.risk_orders += 1
        self.limiter.spend(s, now_ns)
        if self.before_new is not None:
            self.before_new(oid, s, side, abs(q), px, schema.STYLE_TAKER_NOW, schema.TIF_IOC)
        ex.submit(
            order_id=oid,
            symbol_id=s,
            side=side,
            tif=schema.TIF_IOC,
            px=px,
            qty=abs(q),
            recv_ns=now_ns,
            out=out,
        )
