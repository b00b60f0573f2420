"""Ingest stage: venue WebSocket bytes in, book snapshots, trades and marks out.

The stage owns the sockets and the clock; a feed adapter (``stages.venues``) owns the venue's
protocol and sequencing rules. It blocks on its sockets (``select`` with a short timeout)
instead of an idle strategy: the kernel wakes it when bytes arrive, which is both the
lowest-latency and the cheapest way to wait for a network peer. ``recv_ns`` is taken right
after a frame is read; every later latency in the engine is measured from it.

Connection care, per endpoint (Binance has two, Hyperliquid one):

- exponential backoff with jitter between attempts; resubscribe (and, for diff feeds,
  resync) on every connect;
- a watchdog: connected but silent past the venue's threshold flags every book of that
  connection stale at once (nothing trades on it), and 5x the threshold drops the connection;
- the application ping the venue needs (Hyperliquid: every 20 s), and an answer to every
  server ping frame (Binance: every 3 minutes, or it disconnects us);
- a planned reconnect before the venue's connection lifetime ends (Binance: 24 h);
- on a disconnect every book of the connection is re-published stale.
"""

from __future__ import annotations

import logging
import random
import select
import ssl
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import websocket

from shm import schema
from shm.ring import RingReader
from shm.stats import StageStats
from stages.config import Config
from stages.instruments import Instrument, read_symbol_table
from stages.venues.binance import BinanceFeed, RestSnapshots
from stages.venues.endpoints import endpoints
from stages.venues.feed import Endpoint, Feed
from stages.venues.hyperliquid import HyperliquidFeed
from stages.venues.rest import Backoff, RestClient
from stages.wiring import Engine

logger = logging.getLogger("stages.ingest")

POLL_TIMEOUT_S = 0.005
CONNECT_TIMEOUT_S = 2.0  # well inside the supervisor's hung-stage limit
RECV_TIMEOUT_S = 0.5  # a frame that trickles in slower is finished on the next cycle
RECONNECT_AFTER_STALE = 5  # silent for this many stale periods: drop the connection
BACKOFF_MIN_S = 0.05
BACKOFF_MAX_S = 5.0
HANDOVER_NS = 1_000_000_000  # a renewed connection overlaps the old one this long
MAX_HANDOVER_QUEUE = 100_000
STABLE_AFTER_NS = 5_000_000_000  # connected and receiving this long: the backoff starts over
MAX_MESSAGES_PER_CYCLE = 64
_DATA_OPCODES = (websocket.ABNF.OPCODE_TEXT, websocket.ABNF.OPCODE_BINARY)
_BOOK_FIELDS = schema.BOOK.fields
assert _BOOK_FIELDS is not None
_INGEST_OFF = _BOOK_FIELDS["ingest_ns"][1]
_INGEST_SLOT = _INGEST_OFF // 8  # int64 slots of a BOOK record's head
_RECV_SLOT = _BOOK_FIELDS["recv_ns"][1] // 8
assert _INGEST_OFF % 8 == 0 and _BOOK_FIELDS["recv_ns"][1] % 8 == 0


class RingSink:
    """Feed records into the engine's rings, stamping ``ingest_ns`` and the stage's timings."""

    def __init__(self, engine: Engine, stats: StageStats) -> None:
        self._books = engine.writer("md_book")
        self._trades = engine.writer("md_trade")
        self._marks = engine.writer("md_mark")
        self._stats = stats
        self._ints = stats.ints
        self._arr: np.ndarray | None = None
        self._mv = memoryview(b"")
        self._i64 = memoryview(b"").cast("q")

    def book(self, books: np.ndarray) -> None:
        if books is not self._arr:  # feeds hand over the same array every time
            self._arr = books
            self._mv = books[:1].view(np.uint8).data
            self._i64 = self._mv[: _INGEST_OFF + 8].cast("q")
        t1 = time.monotonic_ns()
        i64 = self._i64
        i64[_INGEST_SLOT] = t1
        recv = i64[_RECV_SLOT]
        if recv:
            self._stats.record_ns(schema.H_DURATION, t1 - recv)  # before publishing: we may
        self._books.offer(self._mv)  # be preempted by downstream
        self._ints[schema.C_PUBLISHED] += 1

    def trades(self, trades: np.ndarray) -> None:
        trades["ingest_ns"] = time.monotonic_ns()
        self._trades.offer_array(trades)
        self._ints[schema.C_PUBLISHED] += len(trades)

    def mark(self, marks: np.ndarray) -> None:
        marks["ingest_ns"] = time.monotonic_ns()
        self._marks.offer_array(marks[:1])
        self._ints[schema.C_PUBLISHED] += 1


@dataclass
class _Conn:
    ep: Endpoint
    index: int
    backoff: Backoff
    ws: websocket.WebSocket | None = None
    next_connect_s: float = 0.0
    connected_ns: int = 0
    last_msg_ns: int = 0
    next_ping_ns: int = 0
    stale: bool = False
    stable: bool = False
    # planned renewal: the next connection runs alongside until it has overlapped this one
    successor: websocket.WebSocket | None = None
    successor_ns: int = 0
    queue: list[tuple[bytes, int]] = field(default_factory=list)


def build_feed(
    cfg: Config,
    instruments: dict[int, Instrument],
    sink: RingSink,
    stats: StageStats,
    *,
    feed_url: str | None = None,
) -> tuple[Feed, RestSnapshots | None]:
    """The feed adapter ``[feed] source`` asks for, wired to the engine."""
    feed_cfg = cfg.feed
    source = feed_cfg.source
    stale_ns = int(feed_cfg.stale_after_ms_for(source) * 1e6)
    age_ns = int(feed_cfg.max_connection_age_s * 1e9)
    if source == "sim":
        url = feed_url or f"ws://{feed_cfg.host}:{feed_cfg.port}/ws"
        return HyperliquidFeed(
            instruments, sink, stats.ints, ws_url=url, stale_after_ns=stale_ns
        ), None
    eps = endpoints(feed_cfg)
    if source == "hyperliquid":
        return HyperliquidFeed(
            instruments,
            sink,
            stats.ints,
            ws_url=feed_url or eps.ws_url,
            stale_after_ns=stale_ns,
            max_age_ns=age_ns,
        ), None
    client = RestClient(eps.rest_url, venue="binance", weight_per_min=feed_cfg.rest_weight_per_min)
    snaps = RestSnapshots(client, limit=feed_cfg.snapshot_depth)
    feed = BinanceFeed(
        instruments,
        sink,
        snaps,
        stats.ints,
        ws_base=feed_url or eps.ws_url,
        depth_ms=feed_cfg.binance_depth_ms,
        stale_after_ns=stale_ns,
        max_age_ns=age_ns,
    )
    return feed, snaps


class IngestAgent:
    """Read the venue feed; the only writer of the md_book, md_trade and md_mark rings."""

    role = "ingest"

    def __init__(
        self, cfg: Config, engine: Engine, stats: StageStats, *, feed_url: str | None = None
    ) -> None:
        self.readers: list[RingReader] = []  # blocks on its sockets, not on a doorbell
        self._stats = stats
        self._sink = RingSink(engine, stats)
        self.instruments = read_symbol_table(engine.symbols)
        self.feed, self._snapshots = build_feed(
            cfg, self.instruments, self._sink, stats, feed_url=feed_url
        )
        rng = random.Random()
        self._conns = [
            _Conn(ep, i, Backoff(BACKOFF_MIN_S, BACKOFF_MAX_S, rng=rng))
            for i, ep in enumerate(self.feed.endpoints())
        ]
        self._rate_limited_seen = 0

    # ------------------------------------------------------------------ connection
    def _connect(self, c: _Conn, now_s: float) -> None:
        ep = c.ep
        try:
            ws = websocket.create_connection(
                ep.url,
                timeout=CONNECT_TIMEOUT_S,
                enable_multithread=False,
                skip_utf8_validation=True,
            )
            for msg in ep.subscribe:
                ws.send(msg)
        except (OSError, ValueError, websocket.WebSocketException) as exc:
            delay = c.backoff.next_delay()
            c.next_connect_s = now_s + delay
            logger.warning(
                "feed connect failed, retrying",
                extra={
                    "endpoint": ep.name,
                    "url": _safe(ep.url),
                    "error": str(exc),
                    "retry_in_s": round(delay, 3),
                },
            )
            return
        ws.settimeout(RECV_TIMEOUT_S)
        now = time.monotonic_ns()
        c.ws = ws
        c.connected_ns = c.last_msg_ns = now
        c.stale = False
        c.stable = False  # the backoff resets only once the connection has proved itself
        c.next_ping_ns = now + ep.ping_every_ns if ep.ping else 0
        logger.info("feed connected", extra={"endpoint": ep.name, "url": _safe(ep.url)})
        self.feed.on_connected(c.index, now)

    def _disconnect(self, c: _Conn, why: str, *, planned: bool = False) -> None:
        if c.successor is not None:  # a renewal in progress goes with it
            try:
                c.successor.shutdown()  # type: ignore[no-untyped-call]
            except (OSError, websocket.WebSocketException):
                pass
            c.successor = None
            c.queue = []
        if c.ws is not None:
            try:
                if planned:
                    c.ws.close(timeout=0.2)
                else:
                    c.ws.shutdown()  # type: ignore[no-untyped-call]  # no closing handshake: the peer may be the problem
            except (OSError, websocket.WebSocketException):
                pass
        c.ws = None
        self._stats.ints[schema.C_RECONNECTS] += 1
        delay = 0.0 if planned else c.backoff.next_delay()
        c.next_connect_s = time.monotonic() + delay
        log = logger.info if planned else logger.warning
        log("feed disconnected", extra={"endpoint": c.ep.name, "reason": why})
        self.feed.on_disconnected(c.index, time.monotonic_ns())

    # ------------------------------------------------------------------ duty cycle
    def do_work(self) -> int:
        now_s = time.monotonic()
        live: list[_Conn] = []
        for c in self._conns:
            if c.ws is None and now_s >= c.next_connect_s:
                self._connect(c, now_s)
            if c.ws is not None and c.ws.sock is not None:
                live.append(c)
            elif c.ws is not None:
                self._disconnect(c, "socket closed")
        if not live:
            self.feed.poll(time.monotonic_ns())
            time.sleep(0.02)
            return 0
        n = self._read(live)
        now = time.monotonic_ns()
        for c in live:
            if c.ws is not None:
                self._watch(c, now)
        self.feed.poll(now)
        if self._snapshots is not None:
            rl = self._snapshots.rate_limited
            if rl != self._rate_limited_seen:
                self._stats.ints[schema.C_RATE_LIMITED] += rl - self._rate_limited_seen
                self._rate_limited_seen = rl
        return n

    def _read(self, live: list[_Conn]) -> int:
        socks = {c.ws.sock: c for c in live if c.ws is not None and c.ws.sock is not None}
        renewals = {
            c.successor.sock: c
            for c in live
            if c.successor is not None and c.successor.sock is not None
        }
        if renewals:
            socks.update(renewals)
        tls = [s for s in socks if isinstance(s, ssl.SSLSocket)]
        n = 0
        timeout = POLL_TIMEOUT_S
        while n < MAX_MESSAGES_PER_CYCLE and socks:
            # decrypted bytes a TLS socket already holds are invisible to select
            pending = [s for s in tls if s in socks and s.pending()] if tls else None
            try:
                ready = pending or select.select(list(socks), [], [], timeout)[0]
            except (OSError, ValueError) as exc:
                for c in list(socks.values()):
                    self._disconnect(c, f"select failed: {exc}")
                return n
            if not ready:
                break
            for sock in ready:
                c = socks.get(sock)  # type: ignore[assignment]
                if c is None:
                    continue  # gone earlier in this pass
                if renewals and sock in renewals:
                    alive = c.successor is not None and c.successor.sock is sock
                    if not (alive and self._read_successor(c)):
                        del socks[sock]
                elif c.ws is not None and c.ws.sock is sock and self._read_one(c):
                    n += 1
                else:
                    del socks[sock]
            timeout = 0.0
        return n

    def _read_one(self, c: _Conn) -> bool:
        """Read one frame from ``c``; False when the connection is gone."""
        ws = c.ws
        assert ws is not None
        try:
            opcode, frame = ws.recv_data_frame(True)  # pings are answered inside
        except websocket.WebSocketTimeoutException:
            return True  # part of a frame: the frame buffer keeps it for the next cycle
        except (OSError, websocket.WebSocketException) as exc:
            self._disconnect(c, f"{type(exc).__name__}: {exc}")
            return False
        recv_ns = time.monotonic_ns()
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            self._disconnect(c, "connection closed by the venue")
            return False
        c.last_msg_ns = recv_ns
        if not c.stable and recv_ns - c.connected_ns > STABLE_AFTER_NS:
            c.stable = True  # a venue that accepts and hangs up at once keeps backing off
            c.backoff.reset()
        if c.stale:
            c.stale = False
            logger.info("feed alive again", extra={"endpoint": c.ep.name})
        if opcode in _DATA_OPCODES:
            ints = self._stats.ints
            self.feed.on_message(c.index, frame.data, recv_ns)
            ints[schema.C_PROCESSED] += 1
            self._stats.record_ns(schema.H_E2E, time.monotonic_ns() - recv_ns)
        return True

    def _watch(self, c: _Conn, now: int) -> None:
        ep = c.ep
        silent_ns = now - c.last_msg_ns
        if silent_ns > ep.stale_after_ns:
            if not c.stale:
                c.stale = True
                logger.warning(
                    "feed silent; books flagged stale",
                    extra={"endpoint": ep.name, "silent_ms": silent_ns // 1_000_000},
                )
                self.feed.on_silent(c.index, now)
            if silent_ns > RECONNECT_AFTER_STALE * ep.stale_after_ns:
                self._disconnect(c, f"silent for {silent_ns / 1e9:.1f} s")
                return
        if ep.max_age_ns and now - c.connected_ns > ep.max_age_ns:
            if c.successor is None:
                self._open_successor(c, now)
            elif now - c.successor_ns > HANDOVER_NS or len(c.queue) > MAX_HANDOVER_QUEUE:
                self._hand_over(c, now)
            if c.ws is None:
                return
        if ep.ping and now >= c.next_ping_ns and c.ws is not None:
            c.next_ping_ns = now + ep.ping_every_ns
            try:
                c.ws.send(ep.ping)
            except (OSError, websocket.WebSocketException) as exc:
                self._disconnect(c, f"ping failed: {exc}")

    # ------------------------------------------------------------------ planned renewal
    def _open_successor(self, c: _Conn, now: int) -> None:
        """Open the connection that will replace ``c`` before the venue's lifetime cut-off.

        Both run side by side for ``HANDOVER_NS``: the old one keeps feeding the books, the new
        one's frames are queued. Then the old one is closed and the queue is fed: what the old
        one already delivered comes again and is ignored as a duplicate (diffs by update id,
        trades by id), the rest continues the sequence, so the books never go stale.
        """
        try:
            ws = websocket.create_connection(
                c.ep.url, timeout=CONNECT_TIMEOUT_S, enable_multithread=False,
                skip_utf8_validation=True,
            )  # fmt: skip
            for msg in c.ep.subscribe:
                ws.send(msg)
        except (OSError, ValueError, websocket.WebSocketException) as exc:
            logger.warning(
                "renewing the connection failed; reconnecting instead",
                extra={"endpoint": c.ep.name, "error": str(exc)},
            )
            self._disconnect(c, "connection lifetime reached", planned=True)
            return
        ws.settimeout(RECV_TIMEOUT_S)
        c.successor = ws
        c.successor_ns = now
        c.queue = []

    def _drop_successor(self, c: _Conn, why: str) -> None:
        if c.successor is not None:
            try:
                c.successor.shutdown()  # type: ignore[no-untyped-call]
            except (OSError, websocket.WebSocketException):
                pass
        c.successor = None
        c.queue = []
        logger.warning("renewal connection lost; reconnecting instead", extra={"reason": why})
        self._disconnect(c, "connection lifetime reached", planned=True)

    def _read_successor(self, c: _Conn) -> bool:
        ws = c.successor
        assert ws is not None
        try:
            opcode, frame = ws.recv_data_frame(True)
        except websocket.WebSocketTimeoutException:
            return True
        except (OSError, websocket.WebSocketException) as exc:
            self._drop_successor(c, f"{type(exc).__name__}: {exc}")
            return False
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            self._drop_successor(c, "closed by the venue")
            return False
        if opcode in _DATA_OPCODES:
            c.queue.append((frame.data, time.monotonic_ns()))
        return True

    def _hand_over(self, c: _Conn, now: int) -> None:
        old, new = c.ws, c.successor
        assert new is not None
        if old is not None:
            try:
                old.send_close()
                old.shutdown()  # type: ignore[no-untyped-call]
            except (OSError, websocket.WebSocketException):
                pass
        c.ws, c.successor = new, None
        c.connected_ns = c.successor_ns
        c.last_msg_ns = now
        c.next_ping_ns = now + c.ep.ping_every_ns if c.ep.ping else 0
        queue, c.queue = c.queue, []
        ints = self._stats.ints
        ints[schema.C_RECONNECTS] += 1
        for raw, recv_ns in queue:
            self.feed.on_message(c.index, raw, recv_ns)
        ints[schema.C_PROCESSED] += len(queue)
        logger.info(
            "connection renewed before its lifetime ended",
            extra={"endpoint": c.ep.name, "overlap_frames": len(queue)},
        )

    def on_close(self) -> None:
        for c in self._conns:
            if c.successor is not None:
                try:
                    c.successor.shutdown()  # type: ignore[no-untyped-call]
                except (OSError, websocket.WebSocketException):
                    pass
                c.successor = None
            if c.ws is not None:
                try:
                    c.ws.close(timeout=0.2)
                except (OSError, websocket.WebSocketException):
                    pass
                c.ws = None
        if self._snapshots is not None:
            self._snapshots.close()


def _safe(url: str) -> str:
    """A URL for logs: no query string (stream lists are long; signed ones carry secrets) and
    no user:password@ part."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))
