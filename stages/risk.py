"""Risk stage: the last gate before a venue, the owner of the venue session and positions.

The logic lives in ``stages.riskengine`` (pre-trade checks in order, the trading state machine
ACTIVE -> REDUCING -> HALTED and its triggers, circuit breakers, per-venue rate limits, with
their formulas); this module drives it from shared memory. On every pass, in this order:

1. the control block: the supervisor's drain cancels every resting order once; the kill field
   is the HALTED state (``hft kill`` writes 1, the engine writes its automatic reason code):
   a new kill cancels every resting order once, a cleared one returns the engine to ACTIVE;
2. market data (trades, then books: the paper exchange fills resting orders; the engine
   updates its 1 s bars and circuit breakers per book);
3. cancels held back by the venue's rate limit, as far as the bucket allows;
4. the triggers (``RiskChecks.evaluate``): a halt is written into the control block's kill
   field (so route stops sending and the reason survives a restart), REDUCING cancels the
   orders that would grow a position, holding time sends the engine's own IOCs;
5. the orders from route: a cancel takes a venue token (or waits for one); a new order is
   checked, then takes a token (else ``rate_limited``), then goes to the paper exchange.

Every reject is published as an event and counted by reason (``hft_order_rejects_total``);
rate-limited new orders and held-back cancels also count in ``C_RATE_LIMITED``. The trading
state, its reason and the circuit breaker trips are published in the stage's float gauges
(``riskengine.G_TRADING_STATE``, ``G_TRADING_REASON``, ``G_BREAKER_TRIPS``) for the exporter
(``hft_trading_state``) and ``hft monitor``.

Positions live in shared memory (the ``positions`` segment, written only here), so a risk
stage killed and restarted by the supervisor carries on with the same positions; resting
paper orders die with it and are cancelled by the router's time-to-live.
"""

from __future__ import annotations

import collections
import time

import numpy as np

from shm import schema
from shm.ring import RingReader
from shm.stats import StageStats
from stages import riskengine as rk
from stages.config import Config
from stages.instruments import read_symbol_table
from stages.orders import EVENT_STRUCT, Order, pack_event
from stages.paper import EventTuple, PaperExchange, reject_event
from stages.riskengine import Positions, RiskChecks
from stages.wiring import CTL_DRAINED, CTL_DRAINING, CTL_KILL, CTL_STATE, Engine

__all__ = ["KILL_DAILY_LOSS", "KILL_MANUAL", "Positions", "RiskAgent", "RiskChecks"]

GAUGE_EVERY_NS = 50_000_000
MD_POLL_MS = 1.0
KILL_MANUAL = rk.R_MANUAL  # control-block kill values: the halt reason's code
KILL_DAILY_LOSS = rk.R_DAILY_LOSS
_RATE_LIMITED = schema.REJECT_CODE["rate_limited"]
_DAILY_LOSS = schema.REJECT_CODE["daily_loss"]
_UNKNOWN_ORDER = schema.REJECT_CODE["unknown_order"]


class RiskAgent:
    """Check orders, run the paper exchange, keep positions; the only writer of events."""

    role = "risk"

    def __init__(self, cfg: Config, engine: Engine, stats: StageStats, *, batch: int = 64) -> None:
        self._orders_in = engine.reader("orders", "risk")
        self._books_in = engine.reader("md_book", "risk")
        self._trades_in = engine.reader("md_trade", "risk")
        # Woken only by orders: market data is caught up on every wake (before any order is
        # checked, so taker orders see the current book) and at least every ``max_sleep_ms``
        # for resting-order fills. Waking on each of 4,000 books/s would cost a core's fifth.
        self.readers: list[RingReader] = [self._orders_in]
        self.max_sleep_ms = MD_POLL_MS
        self._out = engine.writer("events")
        self._orders = np.zeros(batch, schema.ORDER)
        self._books = np.zeros(batch, schema.BOOK)
        self._trades = np.zeros(batch * 4, schema.TRADE)
        self._buf = bytearray(EVENT_STRUCT.size)
        self._engine = engine
        self._ctl = engine.control
        self._stats = stats
        self.exchange = PaperExchange(
            taker_fee_bps=cfg.risk.taker_fee_bps, maker_fee_bps=cfg.risk.maker_fee_bps
        )
        self.positions = Positions()
        self.positions.load(engine.positions)
        venues: dict[str, int] = {}
        venue_of = [0] * self.exchange.n_symbols
        tick_of = [0.0] * self.exchange.n_symbols
        for s, ins in read_symbol_table(engine.symbols).items():
            if s < len(venue_of):
                venue_of[s] = venues.setdefault(ins.venue, len(venues))
                tick_of[s] = ins.tick_size
        self.checks = RiskChecks(
            cfg.risk,
            self.exchange,
            self.positions,
            venue_of=venue_of,
            tick_of=tick_of,
            first_risk_order_id=time.time_ns() // 1000,  # ids only grow, across restarts too
        )
        self.checks.trips = int(stats.gauges[rk.G_BREAKER_TRIPS])  # a counter: carry it on
        self._events: list[EventTuple] = []
        self._held_cancels: collections.deque[Order] = collections.deque()
        self._drain_handled = False
        self._risk_orders = 0
        self._next_gauges_ns = 0
        # Orders already in the ring when we start may have been acted on by the process we
        # replace (it died before committing its read cursor): only those are checked against
        # the id high-water mark; an order published later is always new.
        self._reread_end = self._orders_in.write_cursor()

    def _wait(self) -> None:
        self._stats.ints[schema.C_BACKPRESSURE_NS] += 50_000
        time.sleep(50e-6)

    def _publish(self, now_ns: int) -> None:
        """Apply and save the fills, then hand every event to route.

        Positions are saved before the events go out: a stage killed in between comes back
        with the positions the venue has, and route learns the rest from its time-to-live.
        """
        st, ints = self._stats, self._stats.ints
        touched: set[int] = set()
        for _oid, s, kind, side, px, qty, _leaves, fee, _liq, reason, _recv in self._events:
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
        self._store_positions(touched)
        for oid, s, kind, side, px, qty, leaves, fee, liq, reason, recv in self._events:
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
        """Save positions and open-order counts of ``symbols`` (default: every active one)."""
        table = self._engine.positions
        open_by_sym: dict[int, int] = {}
        for o in self.exchange.resting.values():
            open_by_sym[o.symbol_id] = open_by_sym.get(o.symbol_id, 0) + 1
        if symbols is None:
            symbols = {
                s
                for s in range(self.positions.n)
                if self.positions.fills[s] or table["open_orders"][s]
            }
            symbols |= set(open_by_sym)
        for s in symbols:
            self.positions.store(table, s, self.checks.mark(s), open_by_sym.get(s, 0))

    def _update_gauges(self) -> None:
        realized, unreal = self.checks.total_pnl()
        g = self._stats.gauges
        g[schema.G_REALIZED] = realized
        g[schema.G_UNREALIZED] = unreal
        g[schema.G_FEES] = sum(self.positions.fees)
        g[schema.G_GROSS_NOTIONAL] = self.checks.gross_notional()
        g[schema.G_DAILY_PNL] = realized + unreal

    def _publish_state(self) -> None:
        """The trading state, its reason and the breaker trips, for the exporter and monitor."""
        state, reason = self.checks.published()
        g = self._stats.gauges
        g[rk.G_TRADING_STATE] = state
        g[rk.G_TRADING_REASON] = reason
        g[rk.G_BREAKER_TRIPS] = self.checks.trips

    def _halt(self, reason: int) -> None:
        """An automatic halt: into the control block, unless a kill is already there."""
        if not self._ctl[CTL_KILL]:
            self._ctl[CTL_KILL] = reason
        self._held_cancels.clear()  # every resting order is cancelled already

    def _cancel(self, o: Order) -> None:
        if not self.exchange.cancel(o.order_id, recv_ns=o.recv_ns, out=self._events):
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

    def do_work(self) -> int:
        ints = self._stats.ints
        ex, events, checks = self.exchange, self._events, self.checks
        ctl = self._ctl
        mono = time.monotonic_ns
        # the control block first: after a kill nothing may fill, not even on the next book
        kill, draining = int(ctl[CTL_KILL]), int(ctl[CTL_DRAINING])
        if draining and not self._drain_handled:
            ex.cancel_all(out=events)
            self._held_cancels.clear()
            self._drain_handled = True
        elif not draining:
            self._drain_handled = False
        if checks.sync_kill(kill, events) and kill:
            self._held_cancels.clear()
        if events:
            self._publish(mono())
        nt = self._trades_in.read_into(self._trades)
        if nt:
            for s, _side, _tid, _exch, _recv, _ing, px, sz in self._trades[:nt].tolist():
                ex.on_trade(s, px, sz, events)
        nb = self._books_in.read_into(self._books)
        now = mono()
        if nb:
            ex.on_books(self._books[:nb], events)
            checks.on_books(self._books[:nb], now)
            ints[schema.C_SNAPSHOTS] += nb
        if events:
            self._publish(mono())
        if self._held_cancels:
            self._release_held_cancels(now)
        state = int(ctl[CTL_STATE])
        may_trade = not (kill or draining) and state == schema.CTRL_RUNNING
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
            for i, rec in enumerate(self._orders[:no].tolist()):
                o = Order(*rec)
                t0 = mono()
                if o.action == schema.ACTION_CANCEL:
                    if take(o.symbol_id, t0):
                        self._cancel(o)
                        self._publish(mono())
                    else:  # refused, route would forget an order that still rests: held
                        self._held_cancels.append(o)
                        ints[schema.C_RATE_LIMITED] += 1
                    continue
                if first + i < self._reread_end and o.order_id <= ints[schema.C_LAST_ORDER_ID]:
                    ints[schema.C_DUPLICATES] += 1  # read again after a restart: already acted on
                    continue
                code = checks.check(o, draining=bool(draining), kill=kill, state=state, now_ns=t0)
                if not code and not take(o.symbol_id, t0):
                    code = _RATE_LIMITED
                    ints[schema.C_RATE_LIMITED] += 1
                if code:
                    events.append(
                        reject_event(o.order_id, o.symbol_id, o.side, o.px, code, o.recv_ns)
                    )
                    if code == _DAILY_LOSS:
                        checks.halt(rk.R_DAILY_LOSS, events)
                        self._halt(rk.R_DAILY_LOSS)
                        self._publish_state()
                    st.record_ns(schema.H_DURATION, mono() - t0)
                else:
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
                    )
                self._publish(mono())
                # acted on and reported: a restart that reads this order again skips it
                ints[schema.C_LAST_ORDER_ID] = max(int(ints[schema.C_LAST_ORDER_ID]), o.order_id)
            ints[schema.C_PROCESSED] += no
            self._orders_in.commit()  # only now: an order is never lost to a crash mid-batch
        if draining and not ex.resting and not ctl[CTL_DRAINED]:
            ctl[CTL_DRAINED] = 1
        now = mono()
        if now >= self._next_gauges_ns:
            self._next_gauges_ns = now + GAUGE_EVERY_NS
            self._update_gauges()
            self._store_positions()
            ints[schema.C_DROPPED] = self._books_in.dropped + self._trades_in.dropped
        return nt + nb + no

    def on_close(self) -> None:
        self._update_gauges()
        self._publish_state()
        self._store_positions()
