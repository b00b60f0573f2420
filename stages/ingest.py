"""Ingest stage: venue WebSocket bytes in, book snapshots and trades out.

The stage blocks on its socket (``select`` with a short timeout) instead of an idle
strategy: the kernel wakes it when bytes arrive, which is both the lowest-latency and the
cheapest way to wait for a network peer. ``recv_ns`` is taken right after the frame is read;
every later latency in the engine is measured from it.

Connection care: exponential backoff with jitter between connection attempts, resubscribe on
every connect, an application-level ping well inside the venue's idle timeout, and on a
disconnect every known book is re-published with ``BOOK_STALE`` so that nothing downstream
trades on it until fresh data arrives.
"""

from __future__ import annotations

import logging
import random
import select
import time

import numpy as np
import websocket

from shm import schema
from shm.ring import RingReader
from shm.stats import StageStats
from stages.config import Config
from stages.venues.hyperliquid import PING, HyperliquidParser, subscribe_messages
from stages.wiring import Engine

logger = logging.getLogger("stages.ingest")

POLL_TIMEOUT_S = 0.005
CONNECT_TIMEOUT_S = 2.0  # well inside the supervisor's hung-stage limit
RECV_TIMEOUT_S = 0.5  # a frame that trickles in slower is finished on the next cycle
RECONNECT_AFTER_STALE = 5  # silent for this many stale periods: drop the connection
PING_EVERY_NS = 20_000_000_000  # Hyperliquid closes a connection idle for 60 s
BACKOFF_MIN_S = 0.05
BACKOFF_MAX_S = 5.0
MAX_MESSAGES_PER_CYCLE = 64
HYPERLIQUID_URL = "wss://api.hyperliquid.xyz/ws"


class IngestAgent:
    """Read the venue feed; the only writer of the md_book and md_trade rings."""

    role = "ingest"

    def __init__(
        self, cfg: Config, engine: Engine, stats: StageStats, *, feed_url: str | None = None
    ) -> None:
        self.readers: list[RingReader] = []  # blocks on its socket, not on a doorbell
        self._cfg = cfg
        self._stats = stats
        self._books_out = engine.writer("md_book")
        self._trades_out = engine.writer("md_trade")
        names = engine.symbol_names()
        self._symbol_ids = {
            bytes(rec["name"]).decode(): i for i, rec in enumerate(engine.symbols) if rec["active"]
        }
        self._coins = names
        if feed_url:
            self._url = feed_url
        elif cfg.feed.source == "hyperliquid":
            self._url = HYPERLIQUID_URL
        else:
            self._url = f"ws://{cfg.feed.host}:{cfg.feed.port}/ws"
        self._parser = HyperliquidParser(symbol_ids=self._symbol_ids)
        self._books = np.zeros(1, schema.BOOK)
        self._trades = np.zeros(256, schema.TRADE)
        self._book_bytes = self._books.view(np.uint8).data
        self._last_books = np.zeros(schema.MAX_SYMBOLS, schema.BOOK)
        self._have_book = [False] * schema.MAX_SYMBOLS
        self._ws: websocket.WebSocket | None = None
        self._next_connect_s = 0.0
        self._backoff_s = BACKOFF_MIN_S
        self._next_ping_ns = 0
        self._malformed_seen = 0
        self._venue_errors_seen = 0
        self._rng = random.Random()
        self._stale_after_ns = int(cfg.feed.stale_after_ms_for(cfg.feed.source) * 1e6)
        self._last_msg_ns = 0
        self._stale = False

    # ------------------------------------------------------------------ connection
    def _connect(self) -> None:
        now = time.monotonic()
        if now < self._next_connect_s:
            time.sleep(min(self._next_connect_s - now, 0.05))
            return
        try:
            ws = websocket.create_connection(
                self._url,
                timeout=CONNECT_TIMEOUT_S,
                enable_multithread=False,
                skip_utf8_validation=True,
            )
            for msg in subscribe_messages(self._coins):
                ws.send(msg)
        except (OSError, websocket.WebSocketException) as exc:
            delay = self._backoff_s * (0.5 + self._rng.random())
            self._next_connect_s = now + delay
            self._backoff_s = min(self._backoff_s * 2, BACKOFF_MAX_S)
            logger.warning(
                "feed connect failed, retrying",
                extra={"url": self._url, "error": str(exc), "retry_in_s": round(delay, 3)},
            )
            return
        ws.settimeout(RECV_TIMEOUT_S)
        self._ws = ws
        self._last_msg_ns = time.monotonic_ns()
        self._stale = False
        self._backoff_s = BACKOFF_MIN_S
        self._next_ping_ns = time.monotonic_ns() + PING_EVERY_NS
        logger.info("feed connected", extra={"url": self._url, "symbols": self._coins})

    def _disconnect(self, why: str) -> None:
        if self._ws is not None:
            try:
                self._ws.shutdown()  # type: ignore[no-untyped-call]  # no closing handshake: the peer may be the problem
            except (OSError, websocket.WebSocketException):
                pass
        self._ws = None
        self._stats.ints[schema.C_RECONNECTS] += 1
        self._next_connect_s = time.monotonic() + self._backoff_s * (0.5 + self._rng.random())
        logger.warning("feed disconnected", extra={"url": self._url, "reason": why})
        self._publish_stale()

    def _publish_stale(self) -> None:
        """Re-publish every known book flagged stale: nothing may trade on it now."""
        now = time.monotonic_ns()
        for s, have in enumerate(self._have_book):
            if have:
                rec = self._last_books[s : s + 1].copy()
                rec["flags"] |= schema.BOOK_STALE
                rec["recv_ns"] = now
                rec["ingest_ns"] = now
                self._books_out.offer_array(rec)
                self._stats.ints[schema.C_STALE] += 1

    # ------------------------------------------------------------------ duty cycle
    def do_work(self) -> int:
        ws = self._ws
        if ws is None:
            self._connect()
            return 0
        n = 0
        timeout = POLL_TIMEOUT_S
        sock = ws.sock
        if sock is None:
            self._disconnect("socket closed")
            return 0
        while n < MAX_MESSAGES_PER_CYCLE:
            try:
                ready, _, _ = select.select([sock], [], [], timeout)
            except (OSError, ValueError) as exc:
                self._disconnect(f"select failed: {exc}")
                return n
            if not ready:
                break
            try:
                opcode, raw = (
                    ws.recv_data()
                )  # bytes: orjson checks the UTF-8 (a bad frame is counted)
            except websocket.WebSocketTimeoutException:
                break  # part of a frame: the frame buffer keeps it for the next cycle
            except (OSError, websocket.WebSocketException) as exc:
                self._disconnect(f"{type(exc).__name__}: {exc}")
                return n
            recv_ns = time.monotonic_ns()
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                self._disconnect("connection closed by the venue")
                return n
            self._last_msg_ns = recv_ns
            if self._stale:
                self._stale = False
                logger.info("feed alive again", extra={"url": self._url})
            if opcode in (websocket.ABNF.OPCODE_TEXT, websocket.ABNF.OPCODE_BINARY):
                self._on_message(raw, recv_ns)
                n += 1
            timeout = 0.0
        now = time.monotonic_ns()
        silent_ns = now - self._last_msg_ns
        if silent_ns > self._stale_after_ns and self._ws is not None:
            if not self._stale:
                self._stale = True
                logger.warning(
                    "feed silent; books flagged stale",
                    extra={"url": self._url, "silent_ms": silent_ns // 1_000_000},
                )
                self._publish_stale()
            if silent_ns > RECONNECT_AFTER_STALE * self._stale_after_ns:
                self._disconnect(f"silent for {silent_ns / 1e9:.1f} s")
                return n
        if now >= self._next_ping_ns and self._ws is not None:
            self._next_ping_ns = now + PING_EVERY_NS
            try:
                self._ws.send(PING)
            except (OSError, websocket.WebSocketException) as exc:
                self._disconnect(f"ping failed: {exc}")
        return n

    def _on_message(self, raw: str | bytes, recv_ns: int) -> None:
        st, ints = self._stats, self._stats.ints
        nb, nt = self._parser.parse(raw, recv_ns, self._books, self._trades)
        if nb:
            books = self._books
            s = int(books["symbol_id"][0])
            t1 = time.monotonic_ns()
            books["ingest_ns"][0] = t1
            st.record_ns(
                schema.H_DURATION, t1 - recv_ns
            )  # before publishing: downstream may preempt us
            self._books_out.offer(self._book_bytes)
            self._last_books[s] = books[0]
            self._have_book[s] = True
            ints[schema.C_SNAPSHOTS] += 1
            ints[schema.C_PUBLISHED] += 1
            if int(books["flags"][0]) & schema.BOOK_CROSSED:
                ints[schema.C_CROSSED] += 1
        if nt:
            trades = self._trades[:nt]
            t1 = time.monotonic_ns()
            trades["ingest_ns"] = t1
            self._trades_out.offer_array(trades)
            ints[schema.C_TRADES] += nt
            ints[schema.C_PUBLISHED] += nt
        t_end = time.monotonic_ns()
        ints[schema.C_PROCESSED] += 1
        if not nb:
            st.record_ns(schema.H_DURATION, t_end - recv_ns)
        st.record_ns(schema.H_E2E, t_end - recv_ns)
        p = self._parser
        if p.errors_from_venue + p.unknown_symbol != self._venue_errors_seen:
            ints[schema.C_VENUE_ERRORS] += (
                p.errors_from_venue + p.unknown_symbol - self._venue_errors_seen
            )
            self._venue_errors_seen = p.errors_from_venue + p.unknown_symbol
            logger.warning("venue reported an error", extra={"error": p.last_error})
        if self._parser.malformed != self._malformed_seen:
            ints[schema.C_MALFORMED] += self._parser.malformed - self._malformed_seen
            self._malformed_seen = self._parser.malformed

    def on_close(self) -> None:
        if self._ws is not None:
            try:
                self._ws.close()
            except (OSError, websocket.WebSocketException):
                pass
            self._ws = None
