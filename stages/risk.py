"""Risk stage: the last gate before a venue, the owner of the venue session and positions.

Pre-trade checks, in order (the first that fails names the reject reason):
    draining, kill switch, paused -> no new orders at all
    no book / stale book / crossed book for the symbol
    malformed order (non-finite or non-positive quantity, unknown symbol)
    per-symbol notional: |position after| * price > max_notional_per_symbol (when it grows)
    total notional: gross notional after > max_total_notional (when it grows)
    daily loss: realised + unrealised PnL below -max_loss_per_day -> kill switch (auto)

The kill switch (manual through the control block, or automatic) and the supervisor's drain
cancel every resting order once, and every new order is rejected while they hold.

Positions live in shared memory (the ``positions`` segment, written only here), so a risk
stage killed and restarted by the supervisor carries on with the same positions; resting
paper orders die with it and are cancelled by the router's time-to-live.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from shm import schema
from shm.ring import RingReader
from shm.stats import StageStats
from stages.config import Config, RiskConfig
from stages.orders import EVENT_STRUCT, Order, pack_event
from stages.paper import EventTuple, PaperExchange, reject_event
from stages.wiring import CTL_DRAINED, CTL_DRAINING, CTL_KILL, CTL_STATE, Engine

GAUGE_EVERY_NS = 50_000_000
MD_POLL_MS = 1.0
KILL_MANUAL = 1
KILL_DAILY_LOSS = 2


@dataclass
class Positions:
    """Net position, average price, realised PnL and fees per symbol."""

    n: int = schema.MAX_SYMBOLS

    def __post_init__(self) -> None:
        self.qty = [0.0] * self.n
        self.avg_px = [0.0] * self.n
        self.realized = [0.0] * self.n
        self.fees = [0.0] * self.n
        self.volume = [0.0] * self.n
        self.fills = [0] * self.n

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
            if abs(self.qty[s]) < 1e-12:
                self.qty[s] = 0.0
                self.avg_px[s] = 0.0
            elif q > closing:
                self.avg_px[s] = px  # flipped: the remainder opened at this price
        self.realized[s] -= fee
        self.fees[s] += fee
        self.volume[s] += px * q
        self.fills[s] += 1

    def unrealized(self, s: int, mark: float) -> float:
        if self.qty[s] == 0.0 or not mark > 0:
            return 0.0
        return self.qty[s] * (mark - self.avg_px[s])

    def load(self, table: np.ndarray) -> None:
        for s, rec in enumerate(table[: self.n].tolist()):
            qty, avg, realized, _unreal, fees, _mark, volume, fills, _open = rec
            self.qty[s], self.avg_px[s], self.realized[s] = qty, avg, realized
            self.fees[s], self.volume[s], self.fills[s] = fees, volume, fills

    def store(self, table: np.ndarray, s: int, mark: float, open_orders: int) -> None:
        table[s] = (
            self.qty[s],
            self.avg_px[s],
            self.realized[s],
            self.unrealized(s, mark),
            self.fees[s],
            mark,
            self.volume[s],
            self.fills[s],
            open_orders,
        )


class RiskChecks:
    """The pre-trade checks: pure over the order, the books, the positions and the state."""

    def __init__(self, cfg: RiskConfig, exchange: PaperExchange, positions: Positions) -> None:
        self.cfg = cfg
        self.ex = exchange
        self.pos = positions

    def mark(self, s: int) -> float:
        bid, ask = self.ex.best(s)
        return (bid + ask) * 0.5 if bid > 0 and ask > 0 else math.nan

    def gross_notional(self) -> float:
        total = 0.0
        for s, q in enumerate(self.pos.qty):
            if q:
                m = self.mark(s)
                total += abs(q) * (m if m == m else self.pos.avg_px[s])
        return total

    def total_pnl(self) -> tuple[float, float]:
        realized = sum(self.pos.realized)
        unreal = 0.0
        for s, q in enumerate(self.pos.qty):
            if q:
                unreal += self.pos.unrealized(s, self.mark(s))
        return realized, unreal

    def check(self, o: Order, *, draining: bool, kill: int, state: int) -> int:
        """Return 0 if the order may go to the venue, else its REJECT_CODE."""
        if draining:
            return schema.REJECT_CODE["draining"]
        if kill:
            return schema.REJECT_CODE["kill_switch"]
        if state != schema.CTRL_RUNNING:
            return schema.REJECT_CODE["paused"]
        s = o.symbol_id
        if (
            s >= self.ex.n_symbols
            or o.side not in (1, -1)
            or not (o.qty > 0 and math.isfinite(o.qty))
            or not (o.px > 0 and math.isfinite(o.px))  # every order carries a limit
        ):
            return schema.REJECT_CODE["bad_order"]
        if not self.ex.has_book[s]:
            return schema.REJECT_CODE["no_book"]
        flags = self.ex.flags[s]
        if flags & schema.BOOK_STALE:
            return schema.REJECT_CODE["stale_book"]
        if flags & schema.BOOK_CROSSED:
            return schema.REJECT_CODE["crossed_book"]
        ref = o.px
        pos = self.pos.qty[s]
        # worst case: this order and every resting order on its side fill
        after = pos + o.side * (o.qty + self.ex.resting_qty(s, o.side))
        grows = abs(after) > abs(pos)
        if grows and abs(after) * ref > self.cfg.max_notional_per_symbol:
            return schema.REJECT_CODE["symbol_notional"]
        if (
            grows
            and self.gross_notional() + (abs(after) - abs(pos)) * ref > self.cfg.max_total_notional
        ):
            return schema.REJECT_CODE["total_notional"]
        realized, unreal = self.total_pnl()
        if realized + unreal < -self.cfg.max_loss_per_day:
            return schema.REJECT_CODE["daily_loss"]
        return 0


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
        self.checks = RiskChecks(cfg.risk, self.exchange, self.positions)
        self._events: list[EventTuple] = []
        self._kill_handled = False
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
        if realized + unreal < -self.checks.cfg.max_loss_per_day and not self._ctl[CTL_KILL]:
            self._ctl[CTL_KILL] = KILL_DAILY_LOSS

    def do_work(self) -> int:
        ints = self._stats.ints
        ex, events = self.exchange, self._events
        ctl = self._ctl
        mono = time.monotonic_ns
        # the control block first: after a kill nothing may fill, not even on the next book
        kill, draining = int(ctl[CTL_KILL]), int(ctl[CTL_DRAINING])
        if (kill or draining) and not self._kill_handled:
            ex.cancel_all(out=events)
            self._kill_handled = True
            self._publish(mono())
        elif not (kill or draining):
            self._kill_handled = False
        nt = self._trades_in.read_into(self._trades)
        if nt:
            for s, _side, _tid, _exch, _recv, _ing, px, sz in self._trades[:nt].tolist():
                ex.on_trade(s, px, sz, events)
        nb = self._books_in.read_into(self._books)
        if nb:
            ex.on_books(self._books[:nb], events)
            ints[schema.C_SNAPSHOTS] += nb
        if events:
            self._publish(mono())
        first = self._orders_in.read_cursor_local()
        no = self._orders_in.read_into(self._orders, commit=False)
        if no:
            state = int(ctl[CTL_STATE])
            st = self._stats
            for i, rec in enumerate(self._orders[:no].tolist()):
                o = Order(*rec)
                t0 = mono()
                if o.action == schema.ACTION_CANCEL:
                    if not ex.cancel(o.order_id, recv_ns=o.recv_ns, out=events):
                        code = schema.REJECT_CODE["unknown_order"]
                        events.append(
                            reject_event(o.order_id, o.symbol_id, o.side, o.px, code, o.recv_ns)
                        )
                    self._publish(mono())
                    continue
                if first + i < self._reread_end and o.order_id <= ints[schema.C_LAST_ORDER_ID]:
                    ints[schema.C_DUPLICATES] += 1  # read again after a restart: already acted on
                    continue
                code = self.checks.check(o, draining=bool(draining), kill=kill, state=state)
                if code:
                    events.append(
                        reject_event(o.order_id, o.symbol_id, o.side, o.px, code, o.recv_ns)
                    )
                    if code == schema.REJECT_CODE["daily_loss"] and not ctl[CTL_KILL]:
                        ctl[CTL_KILL] = KILL_DAILY_LOSS
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
        self._store_positions()
