"""Risk stage: the last gate before a venue, the owner of the venue session, positions and
the order journal.

The logic lives in ``stages.riskengine`` (pre-trade checks in order, the trading state machine
ACTIVE -> REDUCING -> HALTED and its triggers, circuit breakers, per-venue rate limits, with
their formulas); the journal in ``stages.journal`` (SQLite in WAL mode: schema, ordering
contract, recovery rules, measured costs); the paper exchange in ``stages.paper``. This module
drives them from shared memory.

The venue
---------
A ``PaperExchange`` in this process: order-entry latency ``[paper] latency_ms`` (an order or
a cancel reaches the book that much later), fees per symbol from its venue in the symbol table
(``binance`` and ``hyperliquid`` from ``[paper]``; the simulator's ``sim`` keeps ``[risk]``
``taker_fee_bps``/``maker_fee_bps``). Prints reach it with their aggressor side and
``recv_ns``; on every wake ``advance(time.monotonic_ns())`` applies the orders and cancels
that have reached the book since, and what they cause is published like any other event.
The ``open_orders`` of a POSITION record counts resting orders and orders still on their way.

On every pass, in this order
----------------------------
0. the wall clock (one ``time.time_ns()``): a funding time passed or UTC midnight (below);
1. the control block: the supervisor's drain cancels every open order once; the kill field
   is the HALTED state (``hft kill`` writes 1, the engine writes its automatic reason code):
   a new kill cancels every open order once, a cleared one returns the engine to ACTIVE (or,
   after an automatic halt, to REDUCING until its cause is gone: ``stages.riskengine``);
2. market data: trades, marks (funding), books (the paper exchange fills resting orders; the
   engine updates its 1 s bars and circuit breakers per book), then ``advance`` to now; with
   an order on its way to the book, trades and books go in merged by receive time;
3. cancels held back by the venue's rate limit, as far as the window allows;
4. the triggers (``RiskChecks.evaluate``), when market data, events or the control block
   changed and at least every ``EVALUATE_EVERY_NS``: a halt is written into the control
   block's kill field (so route stops sending and the reason survives a restart), REDUCING
   cancels the orders that would grow a position, holding time sends the engine's own IOCs;
5. the orders from route: a cancel is journaled, then takes a venue slot (or waits for one);
   a new order whose tick is older than ``route.max_signal_age_ms`` is refused
   ``stale_order`` (it waited in the ring while this stage was down or stalled: the market
   it was decided on is gone), else it is checked, takes a slot (else ``rate_limited``), is
   journaled, then goes to the paper exchange;
6. the pass's write-ahead journal records are flushed into SQLite.

Every reject is published as an event and counted by reason (``hft_order_rejects_total``);
rate-limited new orders and held-back cancels also count in ``C_RATE_LIMITED``. The trading
state, its reason and the circuit breaker trips are published in the stage's float gauges
(``riskengine.G_TRADING_STATE``, ``G_TRADING_REASON``, ``G_BREAKER_TRIPS``) for the exporter
(``hft_trading_state``) and ``hft monitor``.

The journal: write first, then act
----------------------------------
``[paper] journal_path`` (``{namespace}`` is the engine's namespace; a relative path is
relative to the repository, like every path in the config), opened at start and held with an
exclusive lock (a second risk stage on the same file is refused). Wall-clock ``time.time_ns()``
timestamps. In the order the journal's contract asks:

- ``order_new_ahead`` before ``submit``: route's orders once they passed every check and
  took a token, and the engine's own holding-time IOCs (``origin="risk"``, through
  ``RiskChecks.before_new``). Orders refused before the venue (pre-trade checks, rate limit)
  are **not** journaled: they never reached a venue, move no money and leave nothing to
  recover; they are counted per reason and published as rejects. An order read again after
  a restart whose id the journal already has is not sent again (``C_DUPLICATES``).
- ``cancel_requested_ahead`` before ``cancel``: route's cancels as they are read (also those
  the rate limit holds back: a restart sends them again), the engine's own (REDUCING,
  holding time, through ``RiskChecks.before_cancel``), and the kill switch's and the drain's
  mass cancel (every open order id, then ``cancel_all``).
- orders and cancel requests go through the journal's write-ahead file (``Journal``
  docstring): one record stored in a shared file map, durable against a kill when the call
  returns (~2 us warm, ~50 us after the stage idled, against ~6 and ~140 us for an SQLite
  commit), so an order reaches the venue without waiting for SQLite. The stage flushes them
  into SQLite at the end of every pass, and any other journal write flushes them first, so
  SQLite has an order before its ack or fills. A restart replays records a kill left
  unflushed before it reads anything.
- every batch of venue events in one ``Journal.batch()`` (one event: a single autocommitted
  write) before anything else happens to it: ``order_acked``, ``fill``, ``order_canceled``,
  ``order_expired``, and ``order_rejected`` for the venue's own rejects (post-only would
  cross; an ``unknown_order`` answer to a cancel changes no order). Only after the commit are
  fills applied to the positions, positions written to shared memory and events published.
  A fill is applied and published only if ``fill`` returned True: paper fill ids are
  ``f"{order_id}.{n}"`` (n: the order's n-th fill, numbering carried on from the journal
  after a restart), a fill id journaled before is a re-delivery and is skipped (counted in
  ``C_DUPLICATES``). A batch whose journal write fails is neither applied nor published: the
  exception stops the stage, and the restart rebuilds from what was committed.

Cost: ~2 us per order and cancel record plus ~5 us for its SQLite row after the act, ~10 us
per fill (the journal's own measurements, warm),
one ``time.time_ns()`` per order and per batch, one fill-id string per fill; no logging.

Restart (``kill -9``, crash): the journal is the source of truth
----------------------------------------------------------------
The supervisor restarts the stage after ``restart_backoff_ms``. Before it reads anything:

1. open the journal (SQLite replays the committed WAL; a damaged file is refused, never
   overwritten) and ``rebuild`` fresh ``Positions`` through ``Positions.apply_fill``: the
   code that built them live, in the same order, so quantities, average prices, realised PnL
   and fees come back bit for bit; funding per symbol likewise. The shared-memory positions
   of the dead process are not read (a stage that reloaded them *and* replayed the journal
   would double them), only their marks, which price the positions until the first books;
   every row is overwritten with the rebuilt state;
2. order ids: route's high-water mark (``C_LAST_ORDER_ID``, restart de-duplication of orders
   read again from the ring) becomes ``max(shared memory, the journal's highest route id)``;
   the engine's own ids continue above the journal's highest risk id;
3. reconcile with the venue. Paper: the exchange died with the process, so every order open
   in the journal is put back into the new one (same id, side, price, remaining quantity),
   without a new journal row and without an event route has had already:
   - ACKED (resting): ``PaperExchange.restore``, no ACK again. Its queue position is lost (it
     lived in the dead process and is not journaled) and is estimated again as for a new
     order arriving now: the back of the visible level at its price on the first tradeable
     book. That is conservative: the queue an order has earned is never more than the
     visible size at its price, so it fills no earlier than the lost position would have;
   - NEW (journaled, never acknowledged: we may have died before or after the send): treated
     as sent, handed to the new exchange as an order arriving now; its ACK (or reject, or
     taker fills) is the first route sees;
   - CANCEL_PENDING: cancelled (``EV_CANCELED``; route waits for that answer): the exchange
     it rested on is gone, and restoring it only to cancel it would leave it a millisecond
     in which a book could fill it (one never acknowledged may even cross the book);
   - any of them while the kill switch (or the drain) is on: not restored but cancelled
     (journaled cancel-requested, then ``EV_CANCELED``): what the switch would have done;
   - IOC (route's taker orders, the engine's holding-time orders): its moment has passed and
     nothing on the dead exchange can fill it any more: journaled expired and ``EV_EXPIRED``
     published, so route forgets it. A new IOC into a later book would be a trade nobody
     decided.
   Fill numbering continues from the journal (``open_fill_counts``). A live venue (not built
   yet) would instead fetch its open orders and call ``journal.reconcile(rec.open_orders,
   venue_open)``, resolving gone/short/unknown/to_ack as the journal's docstring says, in
   ``_reconcile_live`` (the hook raises until then);
4. the rebuilt positions (with the open-order counts) are written to shared memory and logged
   in one line (``state rebuilt from the journal``: positions, every open order and what was
   done with it) before any market data is read: the restart instant's state, identical to
   the journal's, which ``tests/integration/test_recovery.py`` compares with what the killed
   process had;
5. the daily PnL base is recovered (below) and trading carries on. Route keeps its open
   orders across the restart: each gets its final event from the new exchange (fill, cancel,
   expiry). A kill inside the microseconds between a journal commit and the ring write loses
   those events for route (never for the positions): its position estimate, used only for
   its own size guard, misses those fills until route restarts, and an order it then never
   hears about is forgotten after two lives (``forgotten_order``).

Funding
-------
Marks (``md_mark``: mark price, funding rate, next funding time) give each symbol its next
funding time: ``next_funding_ns`` when the venue says it, else the next multiple of
``funding_interval_s`` since the epoch (Hyperliquid and the simulator: hourly, on the hour).
On the first pass at or after it, a symbol with a position books ``-qty * mark_px * rate``
(longs pay when the rate is positive) with the last mark and rate before that time:
``journal.funding(symbol, amount, ts_ns=funding time)`` first (idempotent on symbol and
time: a restart or a stale mark cannot book it twice), then into ``Positions.funding`` and
PnL. The shared-memory ``realized`` includes funding (net of fees too); the per-symbol split
is in the journal. Not handled: a restart within the seconds around a funding time may miss
that one payment (the new process learns the rate from the next mark, after the time).

Daily PnL and the UTC midnight rollover
---------------------------------------
Positions and PnL accumulate from the journal's beginning. Daily PnL (``G_DAILY_PNL``, and
what the daily loss limit applies to) is PnL since the last UTC midnight: ``RiskChecks.day_base``
holds total PnL (realised + funding + unrealised) at that moment. On the first pass at or after
midnight the stage calls ``journal.day_rollover(yesterday, realized, fees, funding,
unrealized)`` with its totals and moves the base to them. At start the base is the journal's
last mark; if midnight passed while the stage was down it rolls over at once, with the
unrealised PnL at the marks the dead process last wrote to shared memory. A daily-loss halt
is not cleared by the rollover: it waits for the manual reset (``hft kill --reset``), as
before; the new day's PnL then starts from zero.
"""

from __future__ import annotations

import collections
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from shm import schema
from shm.ring import RingReader
from shm.stats import StageStats
from stages import journal as jr
from stages import riskengine as rk
from stages.config import REPO_ROOT, Config
from stages.instruments import read_symbol_table
from stages.journal import Journal, Recovered
from stages.orders import EVENT_STRUCT, Order, pack_event
from stages.paper import EventTuple, PaperExchange, end_event, reject_event
from stages.riskengine import Positions, RiskChecks
from stages.wiring import CTL_DRAINED, CTL_DRAINING, CTL_KILL, CTL_STATE, Engine

__all__ = [
    "KILL_DAILY_LOSS",
    "KILL_MANUAL",
    "Positions",
    "RiskAgent",
    "RiskChecks",
    "journal_path",
    "rebuild_positions",
]

logger = logging.getLogger("stages.risk")

GAUGE_EVERY_NS = 50_000_000
EVALUATE_EVERY_NS = 10_000_000  # the triggers at least this often with nothing new (clocks)
MD_POLL_MS = 1.0
KILL_MANUAL = rk.R_MANUAL  # control-block kill values: the halt reason's code
KILL_DAILY_LOSS = rk.R_DAILY_LOSS
_RATE_LIMITED = schema.REJECT_CODE["rate_limited"]
_DAILY_LOSS = schema.REJECT_CODE["daily_loss"]
_UNKNOWN_ORDER = schema.REJECT_CODE["unknown_order"]
_STALE_ORDER = schema.REJECT_CODE["stale_order"]
# rejects that come from the venue and close a journaled order (the others are pre-trade
# rejects of orders never journaled, or an unknown_order answer to a cancel)
_VENUE_REJECTS = frozenset({schema.REJECT_CODE["post_only_would_cross"]})


def journal_path(cfg: Config, namespace: str) -> Path:
    """``[paper] journal_path`` with ``{namespace}`` filled in, relative to the repository."""
    p = Path(cfg.paper.journal_path.replace("{namespace}", namespace))
    return p if p.is_absolute() else REPO_ROOT / p


def rebuild_positions(j: Journal, n: int = schema.MAX_SYMBOLS) -> tuple[Positions, Recovered]:
    """Fresh positions rebuilt from a journal (fills through ``apply_fill``, then funding):
    what a restarted risk stage starts from, and what a test compares it with."""
    pos = Positions(n)
    rec = j.rebuild(pos.apply_fill)
    pos.set_funding(rec.funding)
    return pos, rec


def venue_fees(cfg: Config, venue: str) -> tuple[float, float]:
    """(taker, maker) bps the paper exchange charges on a venue's symbols."""
    p = cfg.paper
    if venue == "binance":
        return p.binance_taker_fee_bps, p.binance_maker_fee_bps
    if venue == "hyperliquid":
        return p.hyperliquid_taker_fee_bps, p.hyperliquid_maker_fee_bps
    return cfg.risk.taker_fee_bps, cfg.risk.maker_fee_bps  # the simulator ("sim")


class RiskAgent:
    """Check orders, journal them, run the paper exchange, keep positions; the only writer of
    events. ``wall_clock`` (default ``time.time_ns``) is the calendar clock of journal
    timestamps, funding times and the UTC day; tests pass their own."""

    role = "risk"

    def __init__(
        self,
        cfg: Config,
        engine: Engine,
        stats: StageStats,
        *,
        batch: int = 64,
        wall_clock: Callable[[], int] = time.time_ns,
    ) -> None:
        self._orders_in = engine.reader("orders", "risk")
        self._books_in = engine.reader("md_book", "risk")
        self._trades_in = engine.reader("md_trade", "risk")
        self._marks_in = engine.reader("md_mark", "risk")
        # Woken only by orders: market data is caught up on every wake (before any order is
        # checked, so taker orders see the current book) and at least every ``max_sleep_ms``
        # for resting-order fills. Waking on each of 4,000 books/s would cost a core's fifth.
        self.readers: list[RingReader] = [self._orders_in]
        self.max_sleep_ms = MD_POLL_MS
        self._out = engine.writer("events")
        self._orders = np.zeros(batch, schema.ORDER)
        self._books = np.zeros(batch, schema.BOOK)
        self._trades = np.zeros(batch * 4, schema.TRADE)
        self._marks = np.zeros(16, schema.MARK)
        self._buf = bytearray(EVENT_STRUCT.size)
        self._engine = engine
        self._ctl = engine.control
        self._stats = stats
        self._wall = wall_clock
        # an order whose tick is older than this is refused (stale_order): route's own limit
        self._max_order_age_ns = round(cfg.route.max_signal_age_ms * 1e6)
        self.exchange = ex = PaperExchange(
            taker_fee_bps=cfg.risk.taker_fee_bps,
            maker_fee_bps=cfg.risk.maker_fee_bps,
            latency_ns=round(cfg.paper.latency_ms * 1e6),
        )
        n = ex.n_symbols
        venues: dict[str, int] = {}
        venue_of = [0] * n
        tick_of = [0.0] * n
        self.names: dict[int, str] = {}  # symbol id -> name, of the symbol table
        for s, ins in read_symbol_table(engine.symbols).items():
            if s < n:
                venue_of[s] = venues.setdefault(ins.venue, len(venues))
                tick_of[s] = ins.tick_size
                taker, maker = venue_fees(cfg, ins.venue)
                ex.set_fees(s, taker_bps=taker, maker_bps=maker)
                self.names[s] = ins.name
        self._events: list[EventTuple] = []
        self._held_cancels: collections.deque[Order] = collections.deque()
        self._drain_handled = False
        self._risk_orders = 0
        self._next_gauges_ns = 0
        self._changed = True  # something the triggers have not seen yet
        self._shown_state = (rk.ACTIVE, rk.R_NONE)  # the last state logged
        self._next_eval_ns = 0
        # funding, per symbol: the next funding time (wall ns, 0: none known), the last one
        # booked, and the mark price and rate of the last mark
        self._fund_due = [0] * n
        self._fund_done = [0] * n
        self._fund_px = [0.0] * n
        self._fund_rate = [0.0] * n
        self._next_midnight = 0
        self._next_clock_ns = 0  # the earlier of the next midnight and funding time

        self.journal = journal = Journal(journal_path(cfg, engine.namespace))
        try:
            journal.bind_symbols(self.names)  # refuses a journal of another symbol order
            self.positions, rec = rebuild_positions(journal, n)
            risk_ids = journal.highest_order_id("risk") & ~rk.RISK_ORDER_BIT
            self.checks = RiskChecks(
                cfg.risk,
                ex,
                self.positions,
                venue_of=venue_of,
                tick_of=tick_of,
                # ids only grow, across restarts too
                first_risk_order_id=max(time.time_ns() // 1000, risk_ids + 1),
                before_new=self._journal_new,
                before_cancel=self._journal_cancel,
            )
            self.checks.trips = int(stats.gauges[rk.G_BREAKER_TRIPS])  # a counter: carry it on
            self._recover(rec)
        except BaseException:
            journal.close()
            raise
        # Orders already in the ring when we start may have been acted on by the process we
        # replace (it died before committing its read cursor): only those are checked against
        # the id high-water mark; an order published later is always new.
        self._reread_end = self._orders_in.write_cursor()

    # ------------------------------------------------------------------ restart
    def _recover(self, rec: Recovered) -> None:
        """Steps 2-5 of the module docstring's restart: ids, the venue, shared memory, the day."""
        ints, ex, j, table = self._stats.ints, self.exchange, self.journal, self._engine.positions
        ints[schema.C_LAST_ORDER_ID] = max(
            int(ints[schema.C_LAST_ORDER_ID]), j.highest_order_id("route")
        )
        self._fill_n: dict[int, int] = j.open_fill_counts()
        now, wall = time.monotonic_ns(), self._wall()
        restored = self._reconcile_paper(rec, now)
        # the marks the dead process last saw price the positions until the first books
        # (and the unrealised PnL of a rollover at start)
        last = self.checks.last_mark
        for s, m in enumerate(table["mark_px"].tolist()[: len(last)]):
            if m > 0 and math.isfinite(m):
                last[s] = m
        pos = self.positions
        strays = sorted(
            ({o.symbol_id for o in rec.open_orders} | {s for s in range(pos.n) if pos.qty[s]})
            - set(self.names)
        )
        if strays:  # the list got shorter: those positions are not traded (nor lost)
            logger.warning(
                "the journal has positions or open orders in symbols this engine does not list",
                extra={"symbol_ids": strays, "symbols": self.names, "journal": str(j.path)},
            )
        today = jr.utc_day(wall)
        if rec.day < today:  # midnight passed while we were down (or the journal is older)
            self._roll_day(wall, unrealized=self.checks.total_pnl()[1])
        else:
            self.checks.day_base = rec.day_realized + rec.day_funding + rec.day_unrealized
            self._next_midnight = jr.next_midnight_ns(wall)
        self._next_clock_ns = self._next_midnight
        open_by = ex.open_by_symbol()
        for s in range(pos.n):  # every row: the journal's state replaces whatever was there
            pos.store(table, s, last[s], open_by.get(s, 0))
        logger.info(
            "state rebuilt from the journal",
            extra={
                "journal": str(j.path),
                # write-ahead records the dead process left unflushed, put into SQLite now
                "write_ahead_replayed": j.replayed,
                # set: the write-ahead file was another (deleted) journal's and was reset
                "write_ahead_reset_from": j.ahead_reset_from,
                "orders": rec.n_orders,
                "fills": rec.n_fills,
                "funding_payments": rec.n_funding,
                "orphan_fills": rec.n_orphan_fills,
                "last_order_id": int(ints[schema.C_LAST_ORDER_ID]),
                "day": rec.day,
                "day_base": self.checks.day_base,
                # [symbol_id, qty, avg_px, realized, fees, funding, fills]
                "positions": [pos.row(s) for s in range(pos.n) if pos.fills[s] or pos.funding[s]],
                # [order_id, symbol_id, side, px, remaining, journal state, what was done]
                "open_orders": restored,
            },
        )
        if self._events:
            self._publish(time.monotonic_ns())
        self._update_gauges()
        self._publish_state()

    def _reconcile_paper(self, rec: Recovered, now: int) -> list[list[object]]:
        """Put the journal's open orders into the new paper exchange (module docstring, step 3)."""
        ex, events, n = self.exchange, self._events, self.exchange.n_symbols
        done: list[list[object]] = []
        killed = bool(self._ctl[CTL_KILL] or self._ctl[CTL_DRAINING])
        for o in rec.open_orders:
            s = o.symbol_id
            if not 0 <= s < n:
                how = "ignored: unknown symbol"
            elif killed or o.state == jr.CANCEL_PENDING:  # the cancel, done here
                if o.state != jr.CANCEL_PENDING:
                    self.journal.cancel_requested_ahead(o.order_id, self._wall())
                events.append(end_event(o.order_id, s, schema.EV_CANCELED, o.side, o.px, now))
                how = "cancelled: kill switch on" if killed else "cancelled: cancel was pending"
            elif o.tif == schema.TIF_IOC:
                events.append(end_event(o.order_id, s, schema.EV_EXPIRED, o.side, o.px, now))
                how = "expired"
            elif o.state == jr.NEW:
                ex.submit(
                    order_id=o.order_id,
                    symbol_id=s,
                    side=o.side,
                    tif=o.tif,
                    px=o.px,
                    qty=o.remaining,
                    recv_ns=now,
                    out=events,
                    now_ns=now,
                )
                how = "sent"
            else:
                ex.restore(
                    order_id=o.order_id,
                    symbol_id=s,
                    side=o.side,
                    px=o.px,
                    leaves=o.remaining,
                    recv_ns=now,
                    now_ns=now,
                )
                how = "restored"
            done.append([o.order_id, s, o.side, o.px, o.remaining, jr.STATE_NAMES[o.state], how])
        return done

    def _reconcile_live(self, rec: Recovered, venue_open: dict[int, float]) -> None:
        """The hook for a live venue (not built yet): ``venue_open`` = {order_id: leaves} from
        the venue; resolve ``jr.reconcile(rec.open_orders, venue_open)`` as the journal's
        docstring says (journal each outcome, then act on it)."""
        raise NotImplementedError("live venues are not built yet; paper reconciles by restoring")

    # ------------------------------------------------------------------ journal hooks
    def _journal_new(
        self, order_id: int, symbol_id: int, side: int, qty: float, px: float, style: int, tif: int
    ) -> None:
        """The engine's own order (holding time), journaled before it is sent."""
        self.journal.order_new_ahead(
            order_id, symbol_id, side, qty, px, style, tif, self._wall(), origin="risk"
        )

    def _journal_cancel(self, order_id: int) -> None:
        """The engine's own cancel (REDUCING, holding time, halt), journaled before it is sent."""
        self.journal.cancel_requested_ahead(order_id, self._wall())

    def _cancel_all(self) -> None:
        """The drain's mass cancel: every open order journaled cancel-requested, then cancelled."""
        wall, ahead = self._wall(), self.journal.cancel_requested_ahead
        for oid in self.exchange.open_ids():
            ahead(oid, wall)
        self.exchange.cancel_all(out=self._events)

    def _journal_events(self, events: list[EventTuple]) -> set[int] | None:
        """Journal one batch of venue events; return the indices of fills journaled before."""
        j, fill_n, wall = self.journal, self._fill_n, self._wall()
        skip: set[int] | None = None
        for i, (oid, s, kind, side, px, qty, leaves, fee, liq, reason, _recv) in enumerate(events):
            if kind == schema.EV_FILL:
                n = fill_n.get(oid, 0) + 1
                if leaves > 0:
                    fill_n[oid] = n
                else:
                    fill_n.pop(oid, None)
                if not j.fill(oid, f"{oid}.{n}", s, side, qty, px, fee, liq, wall):
                    if skip is None:
                        skip = set()
                    skip.add(i)
            elif kind == schema.EV_ACK:
                j.order_acked(oid, wall)
            elif kind == schema.EV_CANCELED:
                j.order_canceled(oid, wall)
                fill_n.pop(oid, None)
            elif kind == schema.EV_EXPIRED:
                j.order_expired(oid, wall)
                fill_n.pop(oid, None)
            elif kind == schema.EV_REJECT and reason in _VENUE_REJECTS:
                j.order_rejected(oid, reason, wall)
        return skip

    # ------------------------------------------------------------------ funding and the day
    def _on_clock(self, wall: int) -> None:
        """A funding time or UTC midnight has come."""
        due = self._fund_due
        for s in range(len(due)):
            if due[s] and wall >= due[s]:
                self._book_funding(s)
        if wall >= self._next_midnight:
            self._roll_day(wall, unrealized=self.checks.total_pnl()[1])
        self._next_clock()

    def _next_clock(self) -> None:
        nxt = self._next_midnight
        for d in self._fund_due:
            if d and d < nxt:
                nxt = d
        self._next_clock_ns = nxt

    def _on_marks(self, n: int, wall: int) -> None:
        """Remember each symbol's mark, funding rate and next funding time."""
        due, done, n_sym = self._fund_due, self._fund_done, len(self._fund_due)
        for rec in self._marks[:n].tolist():
            s, _flags, _exch, _recv, _ing, px, _index, rate, next_ns, _oi, interval, _pad = rec
            if s >= n_sym:
                continue
            if due[s] and wall >= due[s]:
                self._book_funding(s)  # with the rate of the marks before its time
            if not (px > 0 and math.isfinite(px) and math.isfinite(rate)):
                continue
            self._fund_px[s] = px
            self._fund_rate[s] = rate
            if next_ns > 0:
                nxt = next_ns
            elif interval > 0:
                iv = interval * 1_000_000_000
                nxt = (wall // iv + 1) * iv
            else:
                nxt = 0
            if nxt > done[s]:
                due[s] = nxt
        self._next_clock()

    def _book_funding(self, s: int) -> None:
        """Book symbol ``s``'s payment due now: journal first, then positions and PnL."""
        ts = self._fund_due[s]
        self._fund_due[s] = 0
        self._fund_done[s] = ts
        q = self.positions.qty[s]
        amount = -q * self._fund_px[s] * self._fund_rate[s]
        if not amount or not math.isfinite(amount):
            return
        if self.journal.funding(s, amount, ts):
            self.positions.apply_funding(s, amount)
            self._store_positions({s})

    def _roll_day(self, wall: int, *, unrealized: float) -> None:
        """Close yesterday (UTC) in the journal; daily PnL counts from here."""
        pos = self.positions
        realized, funding = sum(pos.realized), pos.funding_total
        day = jr.utc_day(wall) - 1
        try:
            self.journal.day_rollover(
                day, realized, sum(pos.fees), funding, unrealized=unrealized, ts_ns=wall
            )
        except ValueError as exc:  # the wall clock went back past a closed day
            logger.warning("day rollover skipped", extra={"day": day, "error": str(exc)})
        self.checks.day_base = realized + funding + unrealized
        self._next_midnight = jr.next_midnight_ns(wall)
        logger.info("UTC day closed", extra={"day": day, "day_base": self.checks.day_base})

    # ------------------------------------------------------------------ publishing
    def _wait(self) -> None:
        self._stats.ints[schema.C_BACKPRESSURE_NS] += 50_000
        time.sleep(50e-6)

    def _publish(self, now_ns: int) -> None:
        """Journal the events, then apply and save the fills, then hand every event to route.

        The journal commits first (the contract); positions are saved before the events go
        out: a stage killed in between comes back with the journal's positions.
        """
        events = self._events
        if not events:
            return
        self._changed = True  # fills move positions: the triggers look again
        if len(events) > 1:
            with self.journal.batch():
                skip = self._journal_events(events)
        else:
            skip = self._journal_events(events)
        st, ints = self._stats, self._stats.ints
        if skip is not None:  # fills journaled before: applied and published already
            ints[schema.C_DUPLICATES] += len(skip)
            events = [e for i, e in enumerate(events) if i not in skip]
        touched: set[int] = set()
        for _oid, s, kind, side, px, qty, _leaves, fee, _liq, reason, _recv in events:
            if kind == schema.EV_FILL:
                self.positions.apply_fill(s, side, px, qty, fee)
                touched.add(s)
                ints[schema.C_FILLS] += 1
            elif kind == schema.EV_REJECT:
                st.reject(reason)
            elif kind in (schema.EV_CANCELED, schema.EV_EXPIRED):
                ints[schema.C_CANCELS] += 1
            if kind in (schema.EV_ACK, schema.EV_CANCELED, schema.EV_EXPIRED, schema.EV_FILL):
                touched.add(s)
        if touched:
            self._store_positions(touched)
        for oid, s, kind, side, px, qty, leaves, fee, liq, reason, recv in events:
            pack_event(
                self._buf,
                order_id=oid,
                symbol_id=s,
                kind=kind,
                side=side,
                ts_ns=now_ns,
                recv_ns=recv,
                liquidity=liq,
                reason=reason,
                px=px,
                qty=qty,
                leaves_qty=leaves,
                fee=fee,
            )
            self._out.put(self._buf, self._wait)
            ints[schema.C_PUBLISHED] += 1
        self._events.clear()

    def _store_positions(self, symbols: set[int] | None = None) -> None:
        """Save positions and open-order counts (resting and on their way) of ``symbols``
        (default: every active one)."""
        table = self._engine.positions
        open_by_sym = self.exchange.open_by_symbol()
        pos = self.positions
        if symbols is None:
            symbols = {
                s for s in range(pos.n) if pos.fills[s] or pos.funding[s] or table["open_orders"][s]
            }
            symbols |= set(open_by_sym)
        for s in symbols:
            pos.store(table, s, self.checks.mark(s), open_by_sym.get(s, 0))

    def _update_gauges(self) -> None:
        realized, unreal = self.checks.total_pnl()
        g = self._stats.gauges
        g[schema.G_REALIZED] = realized
        g[schema.G_UNREALIZED] = unreal
        g[schema.G_FEES] = sum(self.positions.fees)
        g[schema.G_GROSS_NOTIONAL] = self.checks.gross_notional()
        g[schema.G_DAILY_PNL] = realized + unreal - self.checks.day_base

    def _publish_state(self) -> None:
        """The trading state, its reason and the breaker trips, for the exporter and monitor."""
        state, reason = self.checks.published()
        g = self._stats.gauges
        if (state, reason) != self._shown_state:  # rare: a line for the operator
            was, self._shown_state = self._shown_state, (state, reason)
            (logger.warning if state != rk.ACTIVE else logger.info)(
                "trading state",
                extra={
                    "state": rk.STATE_NAMES[state],
                    "reason": rk.REASONS[reason],
                    "was": f"{rk.STATE_NAMES[was[0]]} ({rk.REASONS[was[1]]})",
                    "kill": int(self._ctl[CTL_KILL]),
                },
            )
        g[rk.G_TRADING_STATE] = state
        g[rk.G_TRADING_REASON] = reason
        g[rk.G_BREAKER_TRIPS] = self.checks.trips

    def _halt(self, reason: int) -> None:
        """An automatic halt: into the control block, unless a kill is already there."""
        if not self._ctl[CTL_KILL]:
            self._ctl[CTL_KILL] = reason
        self._held_cancels.clear()  # every resting order is cancelled already

    def _cancel(self, o: Order) -> None:
        if not self.exchange.cancel(
            o.order_id, recv_ns=o.recv_ns, out=self._events, now_ns=time.monotonic_ns()
        ):
            self._events.append(
                reject_event(o.order_id, o.symbol_id, o.side, o.px, _UNKNOWN_ORDER, o.recv_ns)
            )

    def _release_held_cancels(self, now_ns: int) -> None:
        """Send the cancels the rate limit held back, oldest first, while tokens last."""
        held, take = self._held_cancels, self.checks.limiter.take
        for _ in range(len(held)):
            o = held.popleft()
            if take(o.symbol_id, now_ns):
                self._cancel(o)
            else:
                held.append(o)  # its venue has no token yet; another venue's may

    def _market_in_time_order(self, nt: int, books: np.ndarray) -> None:
        """Trades and books into the paper exchange merged by receive time: an order on its way
        must meet the market of its arrival, not a later print before an earlier book."""
        ex, events = self.exchange, self._events
        brecv = books["recv_ns"].tolist()
        nb, i = len(brecv), 0
        for s, side, _tid, _exch, recv, _ing, px, sz in self._trades[:nt].tolist():
            j = i
            while j < nb and brecv[j] < recv:
                j += 1
            if j > i:
                ex.on_books(books[i:j], events)
                i = j
            ex.on_trade(s, px, sz, events, aggressor=side, recv_ns=recv)
        if i < nb:
            ex.on_books(books[i:], events)

    # ------------------------------------------------------------------ the duty cycle
    def do_work(self) -> int:
        ints = self._stats.ints
        ex, events, checks, j = self.exchange, self._events, self.checks, self.journal
        ctl = self._ctl
        mono = time.monotonic_ns
        wall = self._wall()
        if wall >= self._next_clock_ns:  # a funding time or UTC midnight
            self._on_clock(wall)
        # the control block first: after a kill nothing may fill, not even on the next book
        kill, draining = int(ctl[CTL_KILL]), int(ctl[CTL_DRAINING])
        if draining and not self._drain_handled:
            self._cancel_all()
            self._held_cancels.clear()
            self._drain_handled = True
        elif not draining:
            self._drain_handled = False
        if checks.sync_kill(kill, events):
            self._changed = True
            if kill:
                self._held_cancels.clear()
        if events:
            self._publish(mono())
        nt = self._trades_in.read_into(self._trades)
        nm = self._marks_in.read_into(self._marks)
        if nm:
            self._on_marks(nm, wall)
        nb = self._books_in.read_into(self._books)
        now = mono()
        books = self._books[:nb]
        if nt and nb and ex.next_arrival_ns() is not None:
            self._market_in_time_order(nt, books)
        else:
            if nt:
                on_trade = ex.on_trade
                for s, side, _tid, _exch, recv, _ing, px, sz in self._trades[:nt].tolist():
                    on_trade(s, px, sz, events, aggressor=side, recv_ns=recv)
            if nb:
                ex.on_books(books, events)
        if nb:
            checks.on_books(books, now)
            ints[schema.C_SNAPSHOTS] += nb
        ex.advance(now, events)  # orders and cancels that reached the book since the records
        if events:
            self._publish(mono())
        if self._held_cancels:
            self._release_held_cancels(now)
        state = int(ctl[CTL_STATE])
        may_trade = not (kill or draining) and state == schema.CTRL_RUNNING
        # the triggers see what changed: market data, events (fills), the control block; and
        # the clocks (holding time, retries) every EVALUATE_EVERY_NS; an idle pass skips them
        if nt or nm or nb or self._changed or now >= self._next_eval_ns:
            self._changed = False
            self._next_eval_ns = now + EVALUATE_EVERY_NS
            halt = checks.evaluate(now, events, may_trade=may_trade)
            if halt:
                self._halt(halt)
        if checks.risk_orders != self._risk_orders:  # its own holding-time IOCs: orders too
            ints[schema.C_ORDERS] += checks.risk_orders - self._risk_orders
            self._risk_orders = checks.risk_orders
        if events:
            self._publish(mono())
        self._publish_state()
        first = self._orders_in.read_cursor_local()
        no = self._orders_in.read_into(self._orders, commit=False)
        if no:
            st = self._stats
            take = checks.limiter.take
            wall_clock = self._wall
            max_age = self._max_order_age_ns
            for i, rec in enumerate(self._orders[:no].tolist()):
                o = Order(*rec)
                t0 = mono()
                if o.action == schema.ACTION_CANCEL:
                    # journaled first, held or not: a restart sends a pending cancel again
                    try:
                        j.cancel_requested_ahead(o.order_id, wall_clock())
                    except ValueError:  # an id no order can have: nothing to cancel
                        events.append(
                            reject_event(
                                o.order_id, o.symbol_id, o.side, o.px, _UNKNOWN_ORDER, o.recv_ns
                            )
                        )
                        self._publish(mono())
                        continue
                    if take(o.symbol_id, t0):
                        self._cancel(o)
                        self._publish(mono())
                    else:  # refused, route would forget an order that still rests: held
                        self._held_cancels.append(o)
                        ints[schema.C_RATE_LIMITED] += 1
                    continue
                if first + i < self._reread_end and (
                    o.order_id <= ints[schema.C_LAST_ORDER_ID] or j.has_order(o.order_id)
                ):
                    ints[schema.C_DUPLICATES] += 1  # read again after a restart: already acted on
                    continue
                if 0 < o.recv_ns < t0 - max_age:  # waited in the ring (this stage was down)
                    code = _STALE_ORDER
                else:
                    # the kill field again: `hft kill` during this pass holds the rest back
                    kill = kill or int(ctl[CTL_KILL])
                    code = checks.check(
                        o, draining=bool(draining), kill=kill, state=state, now_ns=t0
                    )
                if not code and not take(o.symbol_id, t0):
                    code = _RATE_LIMITED
                    ints[schema.C_RATE_LIMITED] += 1
                if code:  # refused before the venue: not journaled
                    events.append(
                        reject_event(o.order_id, o.symbol_id, o.side, o.px, code, o.recv_ns)
                    )
                    if code == _DAILY_LOSS:
                        checks.halt(rk.R_DAILY_LOSS, events)
                        self._halt(rk.R_DAILY_LOSS)
                        self._publish_state()
                    st.record_ns(schema.H_DURATION, mono() - t0)
                else:
                    j.order_new_ahead(
                        o.order_id, o.symbol_id, o.side, o.qty, o.px, o.style, o.tif, wall_clock()
                    )
                    t1 = mono()
                    st.record_ns(schema.H_DURATION, t1 - t0)
                    st.record_ns(schema.H_E2E, t1 - o.recv_ns)  # tick-to-order: handed to the venue
                    ints[schema.C_ORDERS] += 1
                    ex.submit(
                        order_id=o.order_id,
                        symbol_id=o.symbol_id,
                        side=o.side,
                        tif=o.tif,
                        px=o.px,
                        qty=o.qty,
                        recv_ns=o.recv_ns,
                        out=events,
                        now_ns=t1,
                    )
                self._publish(mono())
                # acted on and reported: a restart that reads this order again skips it
                ints[schema.C_LAST_ORDER_ID] = max(int(ints[schema.C_LAST_ORDER_ID]), o.order_id)
            ints[schema.C_PROCESSED] += no
            self._orders_in.commit()  # only now: an order is never lost to a crash mid-batch
        if j.pending:  # this pass's orders and cancel requests, into SQLite after the act
            j.flush()
        if draining and not ex.resting and ex.next_arrival_ns() is None and not ctl[CTL_DRAINED]:
            ctl[CTL_DRAINED] = 1
        now = mono()
        if now >= self._next_gauges_ns:
            self._next_gauges_ns = now + GAUGE_EVERY_NS
            self._update_gauges()
            self._store_positions()
            ints[schema.C_DROPPED] = (
                self._books_in.dropped + self._trades_in.dropped + self._marks_in.dropped
            )
        return nt + nm + nb + no

    def on_close(self) -> None:
        try:
            self._update_gauges()
            self._publish_state()
            self._store_positions()
        finally:
            self.journal.close()
