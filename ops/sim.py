"""Embedded market simulator that speaks Hyperliquid's WebSocket wire format on 127.0.0.1.

Why: the pipeline must be exercised end to end (ingest -> features -> models -> orders) at
rates far above what one recorded file or the public venue gives, deterministically and with
no network. This process serves ``/ws`` exactly like ``wss://api.hyperliquid.xyz/ws`` for the
``l2Book``, ``trades`` and ``activeAssetCtx`` subscriptions (the last once a second: mark at the
fair price, a funding rate leaning with the book imbalance), so the real ingest code path is
what gets tested.

    python -m ops.sim --symbols BTC,ETH,SOL,DOGE --rate 1000 --port 8765 [--seed N]
                      [--duration S] [--ready-file PATH]

Protocol (as the venue): ``{"method":"subscribe","subscription":{"type":"l2Book","coin":"BTC"}}``
is acknowledged by ``{"channel":"subscriptionResponse","data":{"method":"subscribe",
"subscription":{...}}}``, then the current book (and, for trades, the recent trades, as the
venue replays them) and the stream. ``unsubscribe`` mirrors it; ``{"method":"ping"}`` gets
``{"channel":"pong"}``; anything wrong gets ``{"channel":"error","data":"<why>"}`` and the
connection stays up. Every ``l2Book`` frame is a full 20-level snapshot with numbers as
strings, keys in the order of the recorded venue data.

Dynamics, per symbol, deterministic for a given ``--seed`` (each coin has its own generator,
seeded from the seed and the coin name, so adding a coin does not change the others):
- a fair price in ticks follows a random walk whose per-update variance is GARCH(1,1) with a
  persistence of about 20 s, so volatility clusters; the spread (>= 1 tick) widens with it;
- an imbalance state (an Ornstein-Uhlenbeck process, ~2 s time constant) scales bid sizes by
  ``e^x`` and ask sizes by ``e^-x``, so top-of-book and 10-level imbalance swing through most
  of [-1, 1]; the fair price drifts in the direction of the imbalance, so it predicts returns;
- each level's size mean-reverts in log space toward a profile that decays away from the
  touch, with noise and occasional walls; only a few levels change per update, as in a real
  book, which also keeps rendering cheap (each level's JSON fragment is cached until it
  changes);
- trades (``--trade-rate`` per second per symbol) take liquidity at the touch, sometimes
  sweeping several levels, reduce or remove the levels they hit and push the fair price in
  the aggressor's direction, so the aggressor side leads the next mid move.
Books are uncrossed by construction (integer tick prices, bid target + spread = ask target).

Pacing: updates are due on a fixed schedule ``t0 + k / rate`` and sent in small bursts (one
wake-up every ``--burst-ms``), so the achieved rate does not drift; a loop that falls more
than 0.25 s behind skips ahead and logs it. Each update's ``time`` is its scheduled time.

Fan-out: a frame is rendered once and written synchronously to every subscribed connection
(``websockets.asyncio.server.broadcast``, no per-client task). A connection whose kernel
write buffer holds more than ``--max-buffer-bytes`` misses frames (counted; every book is a
full snapshot, so it recovers on the next one) and is dropped after ``--slow-client-s`` of
continuous overflow, so a slow client never blocks the others nor grows memory unbounded.

Logs are JSON lines on stderr: start, listening, client connect/disconnect, the achieved rate
and CPU every 10 s, stop. Exit status 0 on SIGTERM/SIGINT or after ``--duration``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import signal
import sys
import time
import zlib
from collections import deque
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Final

import numpy as np
import orjson
from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.exceptions import ConnectionClosed

DEPTH: Final = 20  # levels a side in every l2Book frame, as the venue sends
_KEEP_LEVELS: Final = DEPTH + 4  # levels kept internally, so sweeps never empty a side
_RAND_BLOCK: Final = 4096
_MAX_LAG_S: Final = 0.25
_STATS_INTERVAL_S: Final = 10.0
_RECENT_TRADES: Final = 50

# model constants (rate-independent: they are per second and converted per update)
_VOL_PERSIST_S: Final = 20.0  # GARCH persistence time constant
_VOL_OF_VOL: Final = 0.5  # stationary var(v) / E[v]^2 of the GARCH variance
_IMB_TAU_S: Final = 2.0  # imbalance state time constant
_IMB_SD: Final = 1.0  # stationary sd of the imbalance state
_IMB_DRIFT: Final = 0.2  # drift per second at full imbalance, in sds of per-second noise
_SPREAD_SMOOTH_S: Final = 0.5
_SIZE_KAPPA: Final = 0.3  # per refresh, log-size mean reversion
_SIZE_NOISE: Final = 0.3  # per refresh, log-size noise
_WALL_PROB: Final = 0.02
_SWEEP_PROB: Final = 0.07
_AGGRESSOR_BIAS: Final = 0.1  # P(buy) = 0.5 + bias * tanh(imbalance)
_IMPACT: Final = 0.08  # fair-price move per trade, in sds of per-second noise, per level taken


@dataclass(frozen=True, slots=True)
class SymbolSpec:
    """Starting point and scale of one simulated coin."""

    coin: str
    start_px: float
    tick: float
    sz_decimals: int
    vol_bps_per_sqrt_s: float  # volatility of the mid, bps per sqrt(second)
    touch_size: float  # typical size at the touch, base units
    calm_spread_ticks: float  # spread when volatility is at its average


KNOWN_SPECS: Final = {
    "BTC": SymbolSpec("BTC", 100_000.0, 1.0, 5, 0.6, 3.0, 1.0),
    "ETH": SymbolSpec("ETH", 3_500.0, 0.1, 4, 0.8, 40.0, 1.2),
    "SOL": SymbolSpec("SOL", 200.0, 0.01, 2, 1.2, 300.0, 1.5),
    "DOGE": SymbolSpec("DOGE", 0.35, 0.00001, 0, 1.5, 150_000.0, 1.2),
}


def spec_for(coin: str) -> SymbolSpec:
    """Return the spec of a known coin, else a generic one (start 100, tick 0.01)."""
    known = KNOWN_SPECS.get(coin)
    return known if known is not None else SymbolSpec(coin, 100.0, 0.01, 2, 1.0, 500.0, 1.2)


class DecimalFormatter:
    """Integer multiples of a step -> venue-style decimal strings ("105055.0", "0.0001").

    Cached: the same few thousand prices and sizes recur, so formatting is a dict hit.
    """

    def __init__(self, *, step: float, max_cache: int = 200_000) -> None:
        self._step = Decimal(repr(step))
        self._cache: dict[int, str] = {}
        self._max_cache = max_cache

    def __call__(self, units: int) -> str:
        text = self._cache.get(units)
        if text is None:
            text = format((self._step * units).normalize(), "f")
            if "." not in text:
                text += ".0"
            if len(self._cache) >= self._max_cache:
                self._cache.clear()
            self._cache[units] = text
        return text


class _Side:
    """One side of the book, best first: parallel lists (faster than objects here)."""

    __slots__ = ("direction", "frag", "n", "px", "sz")

    def __init__(self, *, direction: int) -> None:
        self.direction = direction  # -1 bids (prices fall away from the touch), +1 asks
        self.px: list[int] = []  # ticks
        self.sz: list[int] = []  # lots
        self.n: list[int] = []  # orders at the level
        self.frag: list[str | None] = []  # cached JSON of the level, None when changed

    def pop_top(self) -> None:
        del self.px[0], self.sz[0], self.n[0], self.frag[0]

    def insert_top(self, px: int, sz: int, n: int) -> None:
        self.px.insert(0, px)
        self.sz.insert(0, sz)
        self.n.insert(0, n)
        self.frag.insert(0, None)

    def append(self, px: int, sz: int, n: int) -> None:
        self.px.append(px)
        self.sz.append(sz)
        self.n.append(n)
        self.frag.append(None)

    def truncate(self, keep: int) -> None:
        del self.px[keep:], self.sz[keep:], self.n[keep:], self.frag[keep:]


class SymbolSim:
    """The book and trade process of one coin, advanced one update at a time."""

    def __init__(
        self, *, spec: SymbolSpec, rate_per_s: float, trade_rate_per_s: float, seed: int
    ) -> None:
        self.spec = spec
        self.coin = spec.coin
        self._rng = np.random.Generator(
            np.random.PCG64(np.random.SeedSequence([seed, zlib.crc32(spec.coin.encode())]))
        )
        self._normals: list[float] = []
        self._uniforms: list[float] = []
        self._fmt_px = DecimalFormatter(step=spec.tick)
        lot = 10.0**-spec.sz_decimals
        self._fmt_sz = DecimalFormatter(step=lot)
        # per-update constants derived from per-second ones
        self._rate = rate_per_s
        self._v_bar = (spec.vol_bps_per_sqrt_s * 1e-4) ** 2 / rate_per_s
        persist = math.exp(-1.0 / (_VOL_PERSIST_S * rate_per_s))
        self._alpha = math.sqrt(_VOL_OF_VOL * (1.0 - persist * persist) / 2.0)
        self._beta = persist - self._alpha
        self._omega = self._v_bar * (1.0 - persist)
        self._a_x = math.exp(-1.0 / (_IMB_TAU_S * rate_per_s))
        self._b_x = _IMB_SD * math.sqrt(1.0 - self._a_x * self._a_x)
        self._drift = _IMB_DRIFT / math.sqrt(rate_per_s)
        self._k_spread = 1.0 - math.exp(-1.0 / (_SPREAD_SMOOTH_S * rate_per_s))
        self._trades_per_update = trade_rate_per_s / rate_per_s
        self._refresh_per_update = max(1, min(8, round(2000.0 / rate_per_s)))
        self._touch_lots = max(1.0, spec.touch_size / lot)
        self._log_touch_lots = math.log(self._touch_lots)
        self._order_lots = self._touch_lots / 4.0
        self._profile = [math.log(0.25 + 0.75 * math.exp(-i / 4.0)) for i in range(_KEEP_LEVELS)]
        self._addresses = ["0x" + self._rng.bytes(20).hex() for _ in range(256)]
        # state
        self.fair = spec.start_px / spec.tick  # ticks, fractional
        self.var = self._v_bar
        self.imb = 0.0
        self.spread_c = spec.calm_spread_ticks
        self.bids = _Side(direction=-1)
        self.asks = _Side(direction=+1)
        self.updates = 0
        self.trades = 0
        self._tid_counter = 0
        self._tid_salt = int(self._rng.integers(1 << 40))
        self.recent_trades: deque[str] = deque(maxlen=_RECENT_TRADES)
        spread = max(1, round(self.spread_c))
        tb = math.floor(self.fair - spread / 2 + 0.5)
        self._fill(self.bids, tb)
        self._fill(self.asks, tb + spread)

    # ------------------------------------------------------------------ random numbers
    def _normal(self) -> float:
        buf = self._normals
        if not buf:
            buf.extend(self._rng.standard_normal(_RAND_BLOCK).tolist())
        return buf.pop()

    def _uniform(self) -> float:
        buf = self._uniforms
        if not buf:
            buf.extend(self._rng.random(_RAND_BLOCK).tolist())
        return buf.pop()

    # ------------------------------------------------------------------ levels
    def _new_lots(self, level: int, side: _Side) -> int:
        log_target = self._profile[level] + side.direction * -self.imb  # bids e^x, asks e^-x
        lots = self._touch_lots * math.exp(log_target + 0.45 * self._normal())
        if self._uniform() < _WALL_PROB:
            lots *= 6.0
        return max(1, int(lots))

    def _orders(self, lots: int) -> int:
        return min(200, 1 + int(lots / self._order_lots * self._uniform()))

    def _fill(self, side: _Side, touch: int) -> None:
        """Make sure the side starts at ``touch`` or worse and has _KEEP_LEVELS levels."""
        if not side.px:
            lots = self._new_lots(0, side)
            side.append(touch, lots, self._orders(lots))
        while len(side.px) < _KEEP_LEVELS:
            u = self._uniform()
            gap = 1 if u < 0.65 else 2 + int((u - 0.65) * 8.6)  # 1 tick mostly, up to 4
            lots = self._new_lots(len(side.px), side)
            side.append(side.px[-1] + side.direction * gap, lots, self._orders(lots))

    def _reanchor(self, side: _Side, target: int) -> None:
        """Cancel levels better than ``target``; quote at ``target`` if the touch is worse."""
        d = side.direction
        px = side.px
        while px and (px[0] - target) * d < 0:
            side.pop_top()
        if not px or px[0] != target:
            lots = self._new_lots(0, side)
            side.insert_top(target, lots, self._orders(lots))
            if len(px) > _KEEP_LEVELS:
                side.truncate(_KEEP_LEVELS)
        self._fill(side, target)

    def _refresh(self, side: _Side) -> None:
        """Move one level's size (log mean reversion toward the profile, imbalance-scaled)."""
        n_levels = min(DEPTH, len(side.px))
        u = self._uniform()
        i = int(u * u * n_levels)  # favour the top of the book, where activity is
        log_target = self._log_touch_lots + self._profile[i] + side.direction * -self.imb
        log_sz = math.log(side.sz[i])
        log_sz += _SIZE_KAPPA * (log_target - log_sz) + _SIZE_NOISE * self._normal()
        if self._uniform() < _WALL_PROB:
            log_sz += 1.8
        lots = max(1, int(math.exp(min(log_sz, 60.0))))
        side.sz[i] = lots
        side.n[i] = self._orders(lots)
        side.frag[i] = None

    # ------------------------------------------------------------------ one update
    def step(self, time_ms: int) -> str | None:
        """Advance one update; return the trades frame it produced, if any."""
        self.updates += 1
        sd = math.sqrt(self.var)
        ret = sd * self._normal()
        self.var = min(
            max(self._omega + self._alpha * ret * ret + self._beta * self.var, self._v_bar / 25),
            self._v_bar * 25,
        )
        self.fair *= 1.0 + ret + self._drift * math.tanh(self.imb) * sd
        self.imb = self._a_x * self.imb + self._b_x * self._normal()
        target_spread = self.spec.calm_spread_ticks * math.sqrt(self.var / self._v_bar)
        self.spread_c += self._k_spread * (target_spread - self.spread_c)
        spread = max(1, int(self.spread_c + 0.5))
        bid_target = math.floor(self.fair - spread / 2 + 0.5)
        self._reanchor(self.bids, bid_target)
        self._reanchor(self.asks, bid_target + spread)
        for _ in range(self._refresh_per_update):
            self._refresh(self.bids)
            self._refresh(self.asks)
        n_trades = int(self._trades_per_update)
        if self._uniform() < self._trades_per_update - n_trades:
            n_trades += 1
        if not n_trades:
            return None
        frags: list[str] = []
        for _ in range(n_trades):
            frags.extend(self._trade(time_ms))
        return '{"channel":"trades","data":[' + ",".join(frags) + "]}"

    def _trade(self, time_ms: int) -> list[str]:
        """One aggressive order: consume the touch (maybe more), impact the fair price."""
        buy = self._uniform() < 0.5 + _AGGRESSOR_BIAS * math.tanh(self.imb)
        side = self.asks if buy else self.bids
        touch = side.sz[0]
        if self._uniform() < _SWEEP_PROB:
            extra = sum(side.sz[1 : 1 + 1 + int(3 * self._uniform())])
            want = touch + max(1, int(extra * self._uniform()))
        else:
            want = max(1, int(-math.log(1.0 - self._uniform()) * 0.35 * touch))
        taker = self._addresses[int(self._uniform() * 256)]
        order_hash = "0x" + self._rng.bytes(32).hex()
        side_code = "B" if buy else "A"
        frags: list[str] = []
        consumed = 0
        while want > 0 and consumed < 4:
            take = min(want, side.sz[0])
            maker = self._addresses[int(self._uniform() * 256)]
            buyer, seller = (taker, maker) if buy else (maker, taker)
            self._tid_counter += 1
            # odd multiplier: a bijection on 50 bits, so ids are unique and look random
            tid = ((self._tid_counter + self._tid_salt) * 0x9E3779B97F4A7C15) & ((1 << 50) - 1)
            frags.append(
                f'{{"coin":"{self.coin}","hash":"{order_hash}","px":"{self._fmt_px(side.px[0])}",'
                f'"side":"{side_code}","sz":"{self._fmt_sz(take)}","tid":{tid},'
                f'"time":{time_ms},"users":["{buyer}","{seller}"]}}'
            )
            want -= take
            if take == side.sz[0]:
                side.pop_top()
                consumed += 1
            else:
                side.sz[0] -= take
                side.n[0] = max(1, side.n[0] - 1)
                side.frag[0] = None
        self._fill(side, side.px[0])
        sd_per_s_ticks = math.sqrt(self.var * self._rate) * self.fair
        impact = _IMPACT * sd_per_s_ticks * (1 + consumed)
        self.fair += impact if buy else -impact
        self.trades += len(frags)
        self.recent_trades.extend(frags)
        return frags

    # ------------------------------------------------------------------ rendering
    def _levels_json(self, side: _Side) -> str:
        frag = side.frag
        for i in range(DEPTH):
            if frag[i] is None:
                frag[i] = (
                    f'{{"n":{side.n[i]},"px":"{self._fmt_px(side.px[i])}",'
                    f'"sz":"{self._fmt_sz(side.sz[i])}"}}'
                )
        return ",".join(frag[:DEPTH])  # type: ignore[arg-type]

    def book_json(self, time_ms: int) -> str:
        """Render the current book as an ``l2Book`` frame."""
        return (
            f'{{"channel":"l2Book","data":{{"coin":"{self.coin}","levels":[['
            f"{self._levels_json(self.bids)}],[{self._levels_json(self.asks)}]]"
            f',"time":{time_ms}}}}}'
        )

    def ctx_json(self) -> str:
        """An ``activeAssetCtx`` frame: mark at the fair price, a funding rate that leans with
        the imbalance (longs pay when bids dominate), open interest that wanders slowly."""
        tick = self.spec.tick
        mark = self.fair * tick
        funding = 0.0000125 + 0.00002 * math.tanh(self.imb)
        oi = 1000.0 * self.spec.touch_size * (1.0 + 0.1 * math.sin(self.updates / 50_000.0))
        mid = (
            (self.bids.px[0] + self.asks.px[0]) / 2 * tick
            if self.bids.px and self.asks.px
            else mark
        )
        return (
            f'{{"channel":"activeAssetCtx","data":{{"coin":"{self.coin}","ctx":{{'
            f'"funding":"{funding:.7f}","openInterest":"{oi:.4f}","prevDayPx":"{mark:.6g}",'
            f'"dayNtlVlm":"0.0","premium":"{(mark / mid - 1.0) if mid else 0.0:.6f}",'
            f'"oraclePx":"{mark:.6g}","markPx":"{mark:.6g}","midPx":"{mid:.6g}",'
            f'"impactPxs":["{mid:.6g}","{mid:.6g}"],"dayBaseVlm":"0.0"}}}}}}'
        )

    def recent_trades_json(self) -> str | None:
        """The trades frame replayed to a new ``trades`` subscriber, as the venue does."""
        if not self.recent_trades:
            return None
        return '{"channel":"trades","data":[' + ",".join(self.recent_trades) + "]}"


# ---------------------------------------------------------------------- server side
def log(event: str, **fields: Any) -> None:
    """One JSON line on stderr."""
    record = {"ts": round(time.time(), 3), "src": "sim", "event": event, **fields}
    sys.stderr.write(orjson.dumps(record, default=str).decode() + "\n")
    sys.stderr.flush()


class _JsonLogHandler(logging.Handler):
    """Route the websockets library's warnings into the same JSON lines."""

    def emit(self, record: logging.LogRecord) -> None:
        log("library", logger=record.name, level=record.levelname, message=record.getMessage())


class Client:
    """One connection: its subscriptions and its share of the fan-out."""

    __slots__ = ("dropped", "overflow_since", "peer", "sent", "subs", "ws")

    def __init__(self, ws: ServerConnection) -> None:
        self.ws = ws
        self.peer = str(ws.remote_address)
        self.subs: set[tuple[str, str]] = set()
        self.sent = 0
        self.dropped = 0
        self.overflow_since = 0.0


class Hub:
    """Subscriptions, request handling and bounded fan-out."""

    def __init__(
        self, *, sims: dict[str, SymbolSim], max_buffer_bytes: int, slow_client_s: float
    ) -> None:
        self.sims = sims
        self.clients: set[Client] = set()
        self.subscribers: dict[tuple[str, str], set[Client]] = {}
        for coin in sims:
            self.subscribers[("l2Book", coin)] = set()
            self.subscribers[("trades", coin)] = set()
            self.subscribers[("activeAssetCtx", coin)] = set()
        self._max_buffer = max_buffer_bytes
        self._slow_client_s = slow_client_s
        self.sent = 0
        self.sent_bytes = 0
        self.dropped = 0

    def send(self, client: Client, data: bytes) -> None:
        """Write one text frame now, unless the client's buffer is over its bound."""
        ws = client.ws
        transport = ws.transport
        if transport is None or transport.is_closing():
            return
        if transport.get_write_buffer_size() > self._max_buffer:
            client.dropped += 1
            self.dropped += 1
            now = time.monotonic()
            if not client.overflow_since:
                client.overflow_since = now
            elif now - client.overflow_since > self._slow_client_s:
                log("slow_client_dropped", peer=client.peer, dropped=client.dropped)
                transport.abort()
            return
        client.overflow_since = 0.0
        broadcast((ws,), data, text=True)
        client.sent += 1
        self.sent += 1
        self.sent_bytes += len(data)

    def publish(self, clients: set[Client], text: str) -> None:
        """Render once, write to every subscriber (nothing here removes from ``clients``)."""
        data = text.encode()
        for client in clients:
            self.send(client, data)

    def error(self, client: Client, text: str) -> None:
        self.send(client, orjson.dumps({"channel": "error", "data": text}))

    def handle(self, client: Client, raw: str | bytes) -> None:
        """Answer one request from a client, as the venue would."""
        shown = raw if isinstance(raw, str) else raw.decode("utf-8", "replace")
        shown = shown[:200]
        try:
            msg = orjson.loads(raw)
        except orjson.JSONDecodeError:
            self.error(client, f"Error parsing JSON into valid websocket request: {shown}")
            return
        if not isinstance(msg, dict):
            self.error(client, f"Error parsing JSON into valid websocket request: {shown}")
            return
        method = msg.get("method")
        if method == "ping":
            self.send(client, b'{"channel":"pong"}')
            return
        if method not in ("subscribe", "unsubscribe"):
            self.error(client, f"Unknown method {method!r} in request: {shown}")
            return
        sub = msg.get("subscription")
        if not isinstance(sub, dict):
            self.error(client, f"Invalid subscription (missing or not an object): {shown}")
            return
        kind = sub.get("type")
        coin = sub.get("coin")
        if kind not in ("l2Book", "trades", "activeAssetCtx"):
            self.error(
                client,
                f"Unsupported subscription type {kind!r} (l2Book, trades, activeAssetCtx): {shown}",
            )
            return
        if not isinstance(coin, str) or coin not in self.sims:
            known = ",".join(self.sims)
            self.error(client, f"Unknown coin {coin!r} in subscription (serving {known}): {shown}")
            return
        key = (kind, coin)
        if method == "subscribe":
            if key in client.subs:
                self.error(client, f"Already subscribed: {shown}")
                return
            client.subs.add(key)
            self.subscribers[key].add(client)
        else:
            if key not in client.subs:
                self.error(client, f"Already unsubscribed: {shown}")
                return
            client.subs.discard(key)
            self.subscribers[key].discard(client)
        response = {
            "channel": "subscriptionResponse",
            "data": {"method": method, "subscription": sub},
        }
        self.send(client, orjson.dumps(response))
        if method == "subscribe":
            sim = self.sims[coin]
            if kind == "l2Book":
                self.send(client, sim.book_json(time.time_ns() // 1_000_000).encode())
            elif kind == "activeAssetCtx":
                self.send(client, sim.ctx_json().encode())
            else:
                replay = sim.recent_trades_json()
                if replay is not None:
                    self.send(client, replay.encode())

    def remove(self, client: Client) -> None:
        self.clients.discard(client)
        for key in client.subs:
            self.subscribers[key].discard(client)
        client.subs.clear()


async def _feed(
    *, hub: Hub, rate_per_s: float, burst_s: float, stop: asyncio.Event, parent_pid: int = 0
) -> dict[str, float]:
    """Advance every symbol on a fixed schedule and fan the frames out.

    With ``parent_pid`` the feed stops when that process is gone (its supervisor was killed):
    an orphaned simulator would hold its port and a core for nothing.
    """
    next_parent_check = time.monotonic() + 1.0
    sims = list(hub.sims.values())
    book_subs = [hub.subscribers[("l2Book", s.coin)] for s in sims]
    trade_subs = [hub.subscribers[("trades", s.coin)] for s in sims]
    ctx_subs = [(s, hub.subscribers[("activeAssetCtx", s.coin)]) for s in sims]
    next_ctx = time.monotonic() + 1.0
    pairs = list(zip(sims, book_subs, trade_subs, strict=True))
    t0 = time.monotonic()
    epoch0_ns = time.time_ns()
    done = 0
    skipped = 0
    window_t = t0
    window_cpu = time.process_time()
    window_updates = 0
    window_sent = hub.sent
    window_bytes = hub.sent_bytes
    window_trades = 0
    total_trades = 0
    ns_per_update = 1e9 / rate_per_s
    max_burst = max(1, int(rate_per_s * _MAX_LAG_S))
    while not stop.is_set():
        now = time.monotonic()
        due = int((now - t0) * rate_per_s)
        n = due - done
        if n > max_burst:
            skipped += n - max_burst
            log("behind_schedule", skipped_updates=n - max_burst, total_skipped=skipped)
            done = due - max_burst
            n = max_burst
        for _ in range(n):
            done += 1
            time_ms = (epoch0_ns + int(done * ns_per_update)) // 1_000_000
            for sim, bsubs, tsubs in pairs:
                trades = sim.step(time_ms)
                if trades is not None:
                    total_trades += 1
                    if tsubs:
                        hub.publish(tsubs, trades)
                if bsubs:
                    hub.publish(bsubs, sim.book_json(time_ms))
        window_updates += n
        now = time.monotonic()
        if now >= next_ctx:  # the venue sends asset contexts about once a second
            next_ctx = now + 1.0
            for sim, csubs in ctx_subs:
                if csubs:
                    hub.publish(csubs, sim.ctx_json())
        if now - window_t >= _STATS_INTERVAL_S:
            span = now - window_t
            cpu = time.process_time()
            log(
                "rate",
                updates_per_s_per_symbol=round(window_updates / span, 1),
                asked_per_s_per_symbol=rate_per_s,
                symbols=len(sims),
                frames_sent_per_s=round((hub.sent - window_sent) / span, 1),
                mbytes_sent_per_s=round((hub.sent_bytes - window_bytes) / span / 1e6, 2),
                trade_frames_per_s_per_symbol=round(
                    (total_trades - window_trades) / span / len(sims), 1
                ),
                dropped_frames=hub.dropped,
                skipped_updates=skipped,
                clients=len(hub.clients),
                cpu_pct=round(100.0 * (cpu - window_cpu) / span, 1),
            )
            window_t, window_cpu, window_updates = now, cpu, 0
            window_sent, window_bytes, window_trades = hub.sent, hub.sent_bytes, total_trades
        if parent_pid and now >= next_parent_check:
            next_parent_check = now + 1.0
            if os.getppid() != parent_pid:
                log("parent_gone", parent_pid=parent_pid)
                stop.set()
        next_due = t0 + (done + 1) / rate_per_s
        delay = max(next_due, now + burst_s) - time.monotonic()
        # never more than 0.1 s, so a stop request is seen promptly even at low rates;
        # sleep(0) when late still lets the connections breathe
        await asyncio.sleep(min(max(delay, 0.0), 0.1))
    elapsed = time.monotonic() - t0
    return {"elapsed_s": elapsed, "updates_per_symbol": done, "skipped_updates": skipped}


def write_recording(
    path: str,
    *,
    coins: list[str],
    rate_per_s: float,
    trade_rate_per_s: float,
    seconds: float,
    seed: int,
    start_ns: int,
) -> dict[str, int]:
    """Write what a subscriber to every coin would receive, without a socket, as a recording.

    Lines are ``<receive ns> <json>`` like ``hft record`` writes them (received at the frame's
    own time), so ``hft replay`` and ``hft export-features`` read them; a training set that
    comes out the same for a given seed.
    """
    import gzip

    sims = [
        SymbolSim(
            spec=spec_for(c), rate_per_s=rate_per_s, trade_rate_per_s=trade_rate_per_s, seed=seed
        )
        for c in coins
    ]
    n_updates = int(seconds * rate_per_s)
    ns_per_update = 1e9 / rate_per_s
    next_ctx_ns = start_ns
    counts = {"books": 0, "trades": 0, "contexts": 0}
    with gzip.open(path, "wt", compresslevel=5) as f:
        for k in range(n_updates):
            t_ns = start_ns + int(k * ns_per_update)
            time_ms = t_ns // 1_000_000
            recv = time_ms * 1_000_000 + 150_000  # 150 us after the venue stamped it
            if t_ns >= next_ctx_ns:  # the venue sends asset contexts about once a second
                next_ctx_ns += 1_000_000_000
                for sim in sims:
                    f.write(f"{recv} {sim.ctx_json()}\n")
                    counts["contexts"] += 1
            for sim in sims:
                trades = sim.step(time_ms)
                if trades is not None:
                    f.write(f"{recv} {trades}\n")
                    counts["trades"] += 1
                f.write(f"{recv} {sim.book_json(time_ms)}\n")
                counts["books"] += 1
    return counts


def _write_ready_file(path: str, port: int) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(f"{port}\n")
    os.replace(tmp, path)


async def _amain(args: argparse.Namespace) -> int:
    coins = list(dict.fromkeys(c.strip() for c in args.symbols.split(",") if c.strip()))
    sims = {
        coin: SymbolSim(
            spec=spec_for(coin),
            rate_per_s=args.rate,
            trade_rate_per_s=args.trade_rate,
            seed=args.seed,
        )
        for coin in coins
    }
    hub = Hub(sims=sims, max_buffer_bytes=args.max_buffer_bytes, slow_client_s=args.slow_client_s)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if args.duration is not None:
        loop.call_later(args.duration, stop.set)

    async def handler(ws: ServerConnection) -> None:
        client = Client(ws)
        hub.clients.add(client)
        log("client_connected", peer=client.peer, clients=len(hub.clients))
        try:
            async for raw in ws:
                try:
                    hub.handle(client, raw)
                except Exception as exc:  # a bug here must not kill the connection silently
                    log("handler_error", peer=client.peer, error=repr(exc))
                    hub.error(client, f"Internal simulator error: {exc!r}")
        except ConnectionClosed:
            pass
        finally:
            hub.remove(client)
            log(
                "client_disconnected",
                peer=client.peer,
                sent=client.sent,
                dropped=client.dropped,
                clients=len(hub.clients),
            )

    log(
        "start",
        symbols=coins,
        rate_per_s_per_symbol=args.rate,
        trade_rate_per_s=args.trade_rate,
        seed=args.seed,
        pid=os.getpid(),
    )
    async with serve(
        handler,
        args.host,
        args.port,
        compression=None,  # the venue feed is not deflated for us; deflate would cost CPU
        max_size=1 << 16,
        close_timeout=2,
    ) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        if args.ready_file:
            _write_ready_file(args.ready_file, port)
        log("listening", host=args.host, port=port)
        result = await _feed(
            hub=hub,
            rate_per_s=args.rate,
            burst_s=args.burst_ms / 1000.0,
            stop=stop,
            parent_pid=os.getppid() if args.exit_with_parent else 0,
        )
        server.close()
    elapsed = result["elapsed_s"]
    log(
        "stop",
        achieved_updates_per_s_per_symbol=round(result["updates_per_symbol"] / elapsed, 1)
        if elapsed > 0
        else 0.0,
        frames_sent=hub.sent,
        dropped_frames=hub.dropped,
        **result,
    )
    return 0


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ops.sim", description=__doc__.split("\n")[0])
    p.add_argument("--symbols", default="BTC,ETH,SOL,DOGE", help="comma-separated coins")
    p.add_argument("--rate", type=float, default=1000.0, help="book updates/s per symbol")
    p.add_argument("--trade-rate", type=float, default=30.0, help="trades/s per symbol")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8765, help="0 picks a free port")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--duration", type=float, default=None, help="exit after this many s")
    p.add_argument("--ready-file", default=None, help="write the bound port here when listening")
    p.add_argument("--burst-ms", type=float, default=2.0, help="wake-up period of the feed")
    p.add_argument("--max-buffer-bytes", type=int, default=8 << 20)
    p.add_argument("--slow-client-s", type=float, default=10.0)
    p.add_argument(
        "--exit-with-parent", action="store_true", help="stop when the starting process is gone"
    )
    p.add_argument(
        "--record",
        default=None,
        metavar="PATH",
        help="serve nothing: write --seconds of the feed to this recording (.jsonl.gz) and exit",
    )
    p.add_argument("--seconds", type=float, default=600.0, help="length of a --record file")
    p.add_argument(
        "--start",
        default="2026-01-05T14:30:00+00:00",
        help="venue time of a --record file's first frame (ISO 8601)",
    )
    args = p.parse_args(argv)
    if args.rate <= 0 or args.trade_rate < 0 or args.burst_ms <= 0:
        p.error("--rate and --burst-ms must be > 0, --trade-rate >= 0")
    if not any(c.strip() for c in args.symbols.split(",")):
        p.error("--symbols is empty")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the simulator until SIGTERM/SIGINT or ``--duration``; return the exit status."""
    args = _parse_args(argv)
    if args.record:
        from datetime import datetime

        try:
            start_ns = int(datetime.fromisoformat(args.start).timestamp() * 1e9)
        except ValueError:
            print(f"ops.sim: --start must be an ISO 8601 time, got {args.start!r}", file=sys.stderr)
            return 2
        if args.seconds <= 0:
            print(f"ops.sim: --seconds must be > 0, got {args.seconds}", file=sys.stderr)
            return 2
        coins = list(dict.fromkeys(c.strip() for c in args.symbols.split(",") if c.strip()))
        counts = write_recording(
            args.record,
            coins=coins,
            rate_per_s=args.rate,
            trade_rate_per_s=args.trade_rate,
            seconds=args.seconds,
            seed=args.seed,
            start_ns=start_ns,
        )
        log("recorded", path=args.record, seconds=args.seconds, **counts)
        return 0
    ws_logger = logging.getLogger("websockets")
    ws_logger.addHandler(_JsonLogHandler(level=logging.WARNING))
    ws_logger.propagate = False
    try:
        return asyncio.run(_amain(args))
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
