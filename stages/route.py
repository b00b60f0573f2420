"""Route stage: signals in, orders out. The gate, the style tree and the sizing formula.

Gate (``[gate]``): |edge| >= min_edge_bps, confidence >= min_confidence, spread <=
max_spread_bps, and the book behind the signal neither stale nor crossed.

Style tree (the seed's):
    urgency > 0.8 and |edge| > 10 bps  -> TakerNow      IOC, limit a few bps through the touch
    urgency > 0.5 and spread < 3 bps   -> Sniper        GTC limit joining the best bid/offer
    otherwise                          -> MakerPassive  post-only, one tick behind the touch

Size: ``base_size_usd * confidence^2 * (1 + urgency * 0.5)`` of notional, converted to base
units at the mid, rounded down to the lot; prices rounded to the tick (away from crossing for
passive orders). Below the minimum notional nothing is sent.

Order hygiene: at most one new order per symbol per ``min_order_interval_ms``, at most
``max_open_orders_per_symbol`` open, resting orders cancelled after ``order_ttl_ms``, when
the signal turns against them or when the market moves more than ``reprice_away_bps`` away
from them (amending is cancel-and-replace at the next signal), and nothing new while the control block says killed, paused
or draining. The router tracks its open orders and net position from the risk stage's events.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Final

import numpy as np

from shm import schema
from shm.ring import RingReader, RingWriter
from shm.stats import StageStats
from stages.config import Config, GateConfig, RiskConfig, RouteConfig
from stages.instruments import read_symbol_table, tick_at
from stages.orders import ORDER_STRUCT, Event, pack_order
from stages.wiring import CTL_DRAINING, CTL_KILL, CTL_STATE, Engine

TAKER_THROUGH_BPS: Final = 5.0  # how far an IOC may walk past the touch

# why a signal produced no order (counted, exported later as route gate reasons)
SKIP_UNTRADEABLE: Final = "untradeable"
SKIP_GATE: Final = "gate"
SKIP_HALTED: Final = "halted"
SKIP_THROTTLE: Final = "throttle"
SKIP_OPEN_ORDERS: Final = "open_orders"
SKIP_POSITION: Final = "position_limit"
SKIP_SIZE: Final = "min_size"
SKIP_STALE: Final = "stale_signal"
SKIP_FORGOTTEN: Final = "forgotten_order"  # not a skip: an order whose final event never came


@dataclass(slots=True)
class OpenOrder:
    order_id: int
    symbol_id: int
    side: int
    px: float
    leaves: float
    style: int
    sent_ns: int
    cancel_sent: bool = False


@dataclass(slots=True)
class SymbolSpec:
    tick: float
    lot: float
    min_notional: float
    sig_figs: int = 0
    max_decimals: int = 0

    def tick_near(self, px: float) -> float:
        return tick_at(px, self.tick, self.sig_figs, self.max_decimals)


@dataclass(slots=True)
class NewOrder:
    order_id: int
    symbol_id: int
    side: int
    style: int
    tif: int
    px: float
    qty: float
    edge_bps: float


def choose_style(urgency: float, edge_bps: float, spread_bps: float) -> int:
    """The seed's routing tree."""
    if urgency > 0.8 and abs(edge_bps) > 10.0:
        return schema.STYLE_TAKER_NOW
    if urgency > 0.5 and spread_bps < 3.0:
        return schema.STYLE_SNIPER
    return schema.STYLE_MAKER_PASSIVE


def size_notional(base_size: float, confidence: float, urgency: float) -> float:
    """The seed's sizing: base * confidence^2 * (1 + urgency / 2)."""
    return base_size * confidence * confidence * (1.0 + urgency * 0.5)


def _decimals(step: float) -> int:
    return max(0, -math.floor(math.log10(step) + 1e-9)) + 2


def round_down(x: float, step: float) -> float:
    """Largest multiple of ``step`` <= x, without binary-float tails (0.35002, not 0.35002000000000005)."""
    return round(math.floor(x / step + 1e-9) * step, _decimals(step))


def round_up(x: float, step: float) -> float:
    return round(math.ceil(x / step - 1e-9) * step, _decimals(step))


@dataclass
class Router:
    """The route kernel: pure decisions over signals and order events."""

    gate: GateConfig
    route: RouteConfig
    risk: RiskConfig
    specs: dict[int, SymbolSpec]
    next_order_id: int
    open_orders: dict[int, OpenOrder] = field(default_factory=dict)
    last_order_ns: dict[int, int] = field(default_factory=dict)
    position: dict[int, float] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)

    def _skip(self, why: str) -> None:
        self.skipped[why] = self.skipped.get(why, 0) + 1

    def open_count(self, symbol_id: int) -> int:
        return sum(1 for o in self.open_orders.values() if o.symbol_id == symbol_id)

    def cancels_for(
        self,
        symbol_id: int,
        direction: int,
        now_ns: int,
        best_bid: float = 0.0,
        best_ask: float = 0.0,
    ) -> list[OpenOrder]:
        """Resting orders of a symbol to cancel: too old, the signal turned against them, or
        the market moved away (a bid more than ``reprice_away_bps`` under the best bid, an ask
        as far over the best ask: it would sit at the back of a queue that is not trading).

        Amending is cancel-and-replace: the next signal places a new order at the new touch.

        An order that never got its final event within two lives (an IOC whose events were
        lost with a crashed risk stage, a cancel never answered) is forgotten and counted,
        so that it cannot hold the symbol's open-order slots for ever.
        """
        ttl_ns = int(self.route.order_ttl_ms * 1e6)
        out = []
        for oid in [
            o.order_id for o in self.open_orders.values() if now_ns - o.sent_ns > 2 * ttl_ns
        ]:
            del self.open_orders[oid]
            self._skip(SKIP_FORGOTTEN)
        away = self.route.reprice_away_bps * 1e-4
        for o in self.open_orders.values():
            if o.symbol_id != symbol_id or o.cancel_sent or o.style == schema.STYLE_TAKER_NOW:
                continue
            if o.side > 0:
                moved = best_bid > 0 and o.px < best_bid * (1 - away)
            else:
                moved = best_ask > 0 and o.px > best_ask * (1 + away)
            if now_ns - o.sent_ns > ttl_ns or (direction and direction != o.side) or moved:
                o.cancel_sent = True
                out.append(o)
        return out

    def on_signal(
        self,
        *,
        symbol_id: int,
        flags: int,
        edge_bps: float,
        confidence: float,
        urgency: float,
        mid: float,
        best_bid: float,
        best_ask: float,
        spread_bps: float,
        halted: bool,
        now_ns: int,
        recv_ns: int | None = None,
    ) -> NewOrder | None:
        """Return the order a signal calls for, or None (and count why not)."""
        if flags & schema.SIG_UNTRADEABLE:
            self._skip(SKIP_UNTRADEABLE)
            return None
        if recv_ns is not None and now_ns - recv_ns > self.route.max_signal_age_ms * 1e6:
            self._skip(SKIP_STALE)
            return None
        g = self.gate
        if (
            abs(edge_bps) < g.min_edge_bps
            or confidence < g.min_confidence
            or not spread_bps <= g.max_spread_bps
        ):
            self._skip(SKIP_GATE)
            return None
        if halted:
            self._skip(SKIP_HALTED)
            return None
        spec = self.specs.get(symbol_id)
        if spec is None or not (mid > 0 and best_bid > 0 and best_ask > best_bid):
            self._skip(SKIP_UNTRADEABLE)
            return None
        interval_ns = int(self.route.min_order_interval_ms * 1e6)
        if now_ns - self.last_order_ns.get(symbol_id, -(1 << 62)) < interval_ns:
            self._skip(SKIP_THROTTLE)
            return None
        if self.open_count(symbol_id) >= self.route.max_open_orders_per_symbol:
            self._skip(SKIP_OPEN_ORDERS)
            return None
        side = schema.SIDE_BUY if edge_bps > 0 else schema.SIDE_SELL
        notional = size_notional(self.route.base_size_usd, confidence, urgency)
        pos = self.position.get(symbol_id, 0.0)
        if (
            abs(pos + side * notional / mid) * mid > self.risk.max_notional_per_symbol
            and side * pos > 0
        ):
            self._skip(SKIP_POSITION)
            return None
        qty = round_down(notional / mid, spec.lot)
        style = choose_style(urgency, edge_bps, spread_bps)
        tick = spec.tick_near(mid)
        if style == schema.STYLE_TAKER_NOW:
            tif = schema.TIF_IOC
            through = TAKER_THROUGH_BPS * 1e-4
            px = (
                round_up(best_ask * (1 + through), tick)
                if side > 0
                else round_down(best_bid * (1 - through), tick)
            )
        elif style == schema.STYLE_SNIPER:
            tif = schema.TIF_GTC
            px = best_bid if side > 0 else best_ask
        else:
            tif = schema.TIF_POST_ONLY
            px = round_down(best_bid - tick, tick) if side > 0 else round_up(best_ask + tick, tick)
        if qty <= 0 or qty * px < spec.min_notional or px <= 0:
            self._skip(SKIP_SIZE)
            return None
        oid = self.next_order_id
        self.next_order_id += 1
        self.last_order_ns[symbol_id] = now_ns
        self.open_orders[oid] = OpenOrder(oid, symbol_id, side, px, qty, style, now_ns)
        return NewOrder(oid, symbol_id, side, style, tif, px, qty, edge_bps)

    def on_event(self, ev: Event) -> None:
        """Track order state and the net position from the risk stage's events."""
        o = self.open_orders.get(ev.order_id)
        if ev.kind == schema.EV_FILL:
            self.position[ev.symbol_id] = self.position.get(ev.symbol_id, 0.0) + ev.side * ev.qty
            if o is not None:
                o.leaves = ev.leaves_qty
                if ev.leaves_qty <= 0:
                    del self.open_orders[ev.order_id]
        elif ev.kind in (schema.EV_CANCELED, schema.EV_EXPIRED, schema.EV_REJECT) and o is not None:
            del self.open_orders[ev.order_id]


def load_specs(engine: Engine) -> dict[int, SymbolSpec]:
    specs = {}
    for i, ins in read_symbol_table(engine.symbols).items():
        if ins.tick_size > 0 and ins.lot_size > 0:
            specs[i] = SymbolSpec(
                ins.tick_size,
                ins.lot_size,
                ins.min_notional,
                ins.px_sig_figs,
                ins.px_max_decimals,
            )
    return specs


class RouteAgent:
    """Route signals to orders; the only writer of the orders ring."""

    role = "route"

    def __init__(self, cfg: Config, engine: Engine, stats: StageStats, *, batch: int = 64) -> None:
        self._sig_in = engine.reader("signals", "route")
        self._ev_in = engine.reader("events", "route")
        self.readers: list[RingReader] = [self._sig_in, self._ev_in]
        self._out: RingWriter = engine.writer("orders")
        self._sig = np.zeros(batch, schema.SIGNAL)
        self._ev = np.zeros(batch * 4, schema.ORDER_EVENT)
        self._buf = bytearray(ORDER_STRUCT.size)
        self._ctl = engine.control
        self._stats = stats
        self.router = Router(
            gate=cfg.gate,
            route=cfg.route,
            risk=cfg.risk,
            specs=load_specs(engine),
            # ids only grow, across restarts too (risk recognises re-read orders by them)
            next_order_id=max(time.time_ns() // 1000, int(stats.ints[schema.C_LAST_ORDER_ID]) + 1),
        )
        for s, qty in enumerate(engine.positions["qty"].tolist()):  # the position risk saved
            if qty:
                self.router.position[s] = qty

    def _halted(self) -> bool:
        c = self._ctl
        return bool(c[CTL_KILL] or c[CTL_DRAINING] or c[CTL_STATE] != schema.CTRL_RUNNING)

    def _wait(self) -> None:
        self._stats.ints[schema.C_BACKPRESSURE_NS] += 50_000
        time.sleep(50e-6)

    def _send(
        self,
        *,
        oid: int,
        sym: int,
        action: int,
        style: int,
        tif: int,
        side: int,
        px: float,
        qty: float,
        edge: float,
        trace: tuple[int, int, int, int, int],
        now_ns: int,
    ) -> None:
        pack_order(
            self._buf,
            order_id=oid,
            symbol_id=sym,
            action=action,
            style=style,
            tif=tif,
            side=side,
            px=px,
            qty=qty,
            edge_bps=edge,
            trace=(*trace, now_ns),
        )
        self._out.put(self._buf, self._wait)

    def do_work(self) -> int:
        ne = self._ev_in.read_into(self._ev, commit=False)
        if ne:
            for rec in self._ev[:ne].tolist():
                self.router.on_event(Event(*rec))
            self._ev_in.commit()
        n = self._sig_in.read_into(self._sig)
        if not n:
            return ne
        st, ints, router = self._stats, self._stats.ints, self.router
        halted = self._halted()
        mono = time.monotonic_ns
        for rec in self._sig[:n].tolist():
            t0 = mono()
            (
                sym,
                flags,
                _seq,
                exch,
                recv,
                ingest,
                feature,
                inference,
                edge,
                conf,
                urg,
                direction,
                _bf,
                mid,
                bid,
                ask,
                spread,
            ) = rec
            trace = (exch, recv, ingest, feature, inference)
            if router.open_orders:
                against = direction if conf >= router.gate.min_confidence else 0
                for o in router.cancels_for(sym, against, t0, bid, ask):
                    self._send(
                        oid=o.order_id,
                        sym=sym,
                        action=schema.ACTION_CANCEL,
                        style=o.style,
                        tif=0,
                        side=o.side,
                        px=o.px,
                        qty=o.leaves,
                        edge=edge,
                        trace=trace,
                        now_ns=mono(),
                    )
                    ints[schema.C_CANCELS] += 1
            order = router.on_signal(
                symbol_id=sym,
                flags=flags,
                edge_bps=edge,
                confidence=conf,
                urgency=urg,
                mid=mid,
                best_bid=bid,
                best_ask=ask,
                spread_bps=spread,
                halted=halted,
                now_ns=t0,
                recv_ns=recv,
            )
            if order is not None:
                t1 = mono()
                ints[schema.C_LAST_ORDER_ID] = order.order_id  # before it can exist anywhere
                self._send(
                    oid=order.order_id,
                    sym=sym,
                    action=schema.ACTION_NEW,
                    style=order.style,
                    tif=order.tif,
                    side=order.side,
                    px=order.px,
                    qty=order.qty,
                    edge=edge,
                    trace=trace,
                    now_ns=t1,
                )
                ints[schema.C_ORDERS] += 1
                ints[schema.C_PUBLISHED] += 1
                st.record_ns(schema.H_E2E, t1 - recv)
            st.record_ns(schema.H_DURATION, mono() - t0)
        ints[schema.C_PROCESSED] += n
        ints[schema.C_SIGNALS] += n
        ints[schema.C_BATCHES] += 1
        ints[schema.C_DROPPED] = self._sig_in.dropped
        return n + ne

    def on_close(self) -> None:
        pass
