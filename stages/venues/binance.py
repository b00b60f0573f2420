"""Binance USD-M futures market data: diff-depth local books, trades, mark price and funding.

Connections (the routed endpoints): ``<base>/public/stream?streams=`` carries
``<sym>@depth@<speed>`` and ``<sym>@bookTicker``; ``<base>/market/stream?streams=`` carries
``<sym>@aggTrade`` and ``<sym>@markPrice@1s``. A stream asked for on the wrong path is
acknowledged and then never delivers, silently, which is why the split lives here and nowhere
else. The server pings every 3 minutes (the runner answers each ping) and ends every
connection at 24 hours (the runner reconnects before that, at ``max_connection_age_s``).

The local book follows the venue's procedure, per symbol:

1. open the stream and buffer its diffs; ask for a REST snapshot (``/fapi/v1/depth``);
2. drop buffered diffs with ``u < lastUpdateId``; the first one applied must have
   ``U <= lastUpdateId <= u`` (if every buffered diff is newer, the snapshot is too old:
   ask again);
3. from then on every diff's ``pu`` must equal the previous diff's ``u``. Anything else is a
   gap: the book is published stale at once, counted, and rebuilt from step 1.

Until step 2 completes, nothing is published for the symbol except a stale copy of its last
book, so nothing downstream can trade on a book that is not known to be whole. The first
book after a (re)sync carries ``BOOK_RESYNCED``.

Cross-check: ``bookTicker`` carries the same update id ``u`` as the diff that produced it.
Whenever a ticker and a diff share an id, the local book's top must equal the ticker's; a
difference means the book is wrong, and it is rebuilt (counted in ``tob_mismatches``).

Hot path: ``stages.venues.book.scan_levels`` reads the level arrays straight from the bytes
and ``orjson`` parses what is left (the header); messages the scanner declines go through the
plain ``orjson`` path, which accepts exactly the same documents (a fuzz test holds the two
paths to the same output).
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import orjson

from shm import schema
from stages.instruments import Instrument
from stages.venues.book import SCAN_BAD, SCAN_OK, L2Book, scan_levels, top_view
from stages.venues.feed import (
    BOOK_COUNTS,
    BOOK_HEAD,
    OFF_N_BID,
    Counters,
    Endpoint,
    Sink,
    SnapshotSource,
)
from stages.venues.rest import Backoff, RateLimited, RestClient

logger = logging.getLogger("stages.venues.binance")

DEFAULT_MAX_PX: Final = 1e9
DEFAULT_MAX_SZ: Final = 1e12
MAX_LEVELS: Final = 5000  # per message; a 1000-level snapshot is 2000 pairs
BUFFER_LIMIT: Final = 2000  # diffs buffered per symbol while waiting for a snapshot
SNAPSHOT_RETRY_NS: Final = 500_000_000  # a too-old snapshot is asked for again after this
RESYNC_CALM_NS: Final = 10_000_000_000  # a resync sooner than this after the last one backs off
TOB_CHECK_WINDOW: Final = 4096  # recent update ids remembered for the ticker cross-check
MAX_ID: Final = (1 << 63) - 1
MAX_TIME_MS: Final = 9_000_000_000_000
_NS_PER_MS: Final = 1_000_000

WAIT_SNAPSHOT: Final = 0  # buffering diffs, a snapshot has been asked for
LIVE: Final = 1  # in sequence: every diff is applied and published
SYNCING: Final = 2  # book loaded from a snapshot, waiting for the diff that straddles it

_loads = orjson.loads
_DEPTH: Final = schema.BOOK_DEPTH
_ASK0: Final = 2 * schema.BOOK_DEPTH  # index of the best ask price in the flat level arrays


def stream_names(venue_symbol: str, depth_ms: int) -> tuple[list[str], list[str]]:
    """(public streams, market streams) of one symbol."""
    s = venue_symbol.lower()
    depth = f"{s}@depth" if depth_ms == 250 else f"{s}@depth@{depth_ms}ms"
    return [depth, f"{s}@bookTicker"], [f"{s}@aggTrade", f"{s}@markPrice@1s"]


def binance_endpoints(
    ws_base: str,
    venue_symbols: list[str],
    depth_ms: int,
    stale_after_ns: int = 3_000_000_000,
    max_age_ns: int = 0,
) -> list[Endpoint]:
    """The two routed connections: /public (depth, bookTicker) and /market (aggTrade, mark)."""
    public: list[str] = []
    market: list[str] = []
    for vs in venue_symbols:
        p, m = stream_names(vs, depth_ms)
        public += p
        market += m
    base = ws_base.rstrip("/")
    return [
        Endpoint(
            name,
            f"{base}/{name}/stream?streams={'/'.join(streams)}",
            stale_after_ns=stale_after_ns,
            max_age_ns=max_age_ns,
        )
        for name, streams in (("public", public), ("market", market))
    ]


class MalformedMessage(ValueError):
    pass


class UnknownSymbol(Exception):
    """A well-formed message for a symbol we did not subscribe to: a venue error, not bad input."""


def levels_slow(levels: Any, out: np.ndarray, k: int, max_px: float, max_sz: float) -> int:
    """Convert ``[["px","qty"],..]`` into ``out[k:]`` with full checks; return the new k.

    The reference path: what ``scan_levels`` does fast, done with ``float()``. Raises
    ``MalformedMessage`` on anything that is not a list of [price string, size string]
    pairs with 0 < price < max_px and 0 <= size < max_sz.
    """
    if type(levels) is not list:
        raise MalformedMessage("levels must be a list")
    if k + 2 * len(levels) > len(out):
        raise MalformedMessage("too many levels")
    for lv in levels:
        if type(lv) is not list or len(lv) != 2:
            raise MalformedMessage("a level must be [price, size]")
        px_s, sz_s = lv
        if type(px_s) is not str or type(sz_s) is not str:
            raise MalformedMessage("price and size must be strings")
        try:
            px = float(px_s)
            sz = float(sz_s)
        except ValueError:
            raise MalformedMessage("price or size is not a number") from None
        if not (0.0 < px < max_px and 0.0 <= sz < max_sz):  # also false for NaN
            raise MalformedMessage("price or size out of range")
        out[k] = px
        out[k + 1] = sz
        k += 2
    return k


def _int_field(d: dict[str, Any], key: str) -> int:
    v = d[key]
    if type(v) is not int or not 0 <= v <= MAX_ID:
        raise MalformedMessage(f"{key} must be a non-negative integer")
    return v


def _ms_field(d: dict[str, Any], key: str) -> int:
    v = d[key]
    if type(v) is not int or not 0 < v <= MAX_TIME_MS:
        raise MalformedMessage(f"{key} must be a time in ms")
    return v


def _num_field(d: dict[str, Any], key: str, lo: float, hi: float) -> float:
    v = d[key]
    if type(v) is not str:
        raise MalformedMessage(f"{key} must be a decimal string")
    try:
        x = float(v)
    except ValueError:
        raise MalformedMessage(f"{key} is not a number") from None
    if not lo <= x < hi:
        raise MalformedMessage(f"{key} out of range")
    return x


@dataclass
class _Diff:
    first: int  # U
    last: int  # u
    prev: int  # pu
    exch_ns: int
    recv_ns: int
    vals: np.ndarray
    n_bid: int
    n_ask: int


@dataclass
class _SymbolState:
    sid: int
    venue_symbol: str
    book: L2Book
    state: int = WAIT_SNAPSHOT
    last_u: int = -1
    buffer: deque[_Diff] = field(default_factory=deque)
    requested_ns: int = 0  # when the pending snapshot was asked for (0: none pending)
    retry_at_ns: int = 0  # > 0: ask for a snapshot again at this time
    synced_once: bool = False
    resynced: bool = False  # the next published book carries BOOK_RESYNCED
    published: bool = False  # a book has been published at least once
    off_tick_seen: int = 0
    last_resync_ns: int = 0
    resync_backoff: Backoff = field(default_factory=lambda: Backoff(0.5, 30.0))
    last_trade_id: int = -1
    tob_by_u: dict[int, tuple[float, float, float, float]] = field(default_factory=dict)
    ticker_by_u: dict[int, tuple[float, float, float, float]] = field(default_factory=dict)
    order: deque[int] = field(default_factory=deque)
    torder: deque[int] = field(default_factory=deque)


class BinanceFeed:
    """Binance USD-M public market data for a set of symbols (see the module docstring)."""

    venue = "binance"

    def __init__(
        self,
        instruments: dict[int, Instrument],
        sink: Sink,
        snapshots: SnapshotSource,
        counters: Counters,
        *,
        ws_base: str = "wss://fstream.binance.com",
        depth_ms: int = 100,
        stale_after_ns: int = 3_000_000_000,
        max_age_ns: int = 82_800 * 1_000_000_000,
        max_px: float = DEFAULT_MAX_PX,
        max_sz: float = DEFAULT_MAX_SZ,
        cross_check: bool = True,
    ) -> None:
        self._sink = sink
        self._snapshots = snapshots
        self.counters = counters
        self._ws_base = ws_base.rstrip("/")
        self._depth_ms = depth_ms
        self._stale_after_ns = stale_after_ns
        self._max_age_ns = max_age_ns
        self._max_px = float(max_px)
        self._max_sz = float(max_sz)
        self._cross_check = cross_check
        self._syms: dict[str, _SymbolState] = {}
        for sid, ins in instruments.items():
            vs = ins.wire_name.upper()
            self._syms[vs] = _SymbolState(sid, vs, L2Book(ins.tick_size))
        self._by_sid = {st.sid: st for st in self._syms.values()}
        self._vals = np.zeros(2 * MAX_LEVELS)
        self._pos = np.zeros(6, np.int64)
        self._books = np.zeros(1, schema.BOOK)
        self._book_mv = self._books.view(np.uint8).data
        self._top = top_view(self._books)
        self._top_d = self._top.reshape(-1).data.cast("B").cast("d")
        self._trades = np.zeros(1, schema.TRADE)
        self._marks = np.zeros(1, schema.MARK)
        # counters the engine does not have a slot for (replay and tests read them)
        self.tob_checks = 0
        self.tob_mismatches = 0
        self.acks = 0
        self.ignored = 0
        self.last_error = ""

    # ------------------------------------------------------------------ connections
    def endpoints(self) -> list[Endpoint]:
        return binance_endpoints(
            self._ws_base, list(self._syms), self._depth_ms, self._stale_after_ns, self._max_age_ns
        )

    def on_connected(self, ep: int, now_ns: int) -> None:
        if ep == 0:
            for st in self._syms.values():
                self._resync(st, now_ns)

    def on_disconnected(self, ep: int, now_ns: int) -> None:
        if ep == 0:
            for st in self._syms.values():
                st.state = WAIT_SNAPSHOT
                st.buffer.clear()
                st.requested_ns = 0
                self._publish_stale(st, now_ns)

    def on_silent(self, ep: int, now_ns: int) -> None:
        if ep == 0:
            for st in self._syms.values():
                self._publish_stale(st, now_ns)

    # ------------------------------------------------------------------ messages
    def on_message(self, ep: int, raw: bytes, recv_ns: int) -> None:
        """Handle one frame. Never raises on venue input: bad frames are counted."""
        try:
            if b'"depthUpdate"' in raw:
                self._on_depth(raw, recv_ns)
                return
            msg = _loads(raw)
            data = msg.get("data") if type(msg) is dict else None
            if type(data) is not dict:
                self._on_control(msg)
                return
            kind = data.get("e")
            if kind == "bookTicker":
                self._on_ticker(data, recv_ns)
            elif kind == "aggTrade" or kind == "trade":
                self._on_trade(data, recv_ns)
            elif kind == "markPriceUpdate":
                self._on_mark(data, recv_ns)
            elif kind == "depthUpdate":  # escaped in the raw bytes: still a diff
                self._on_depth(raw, recv_ns)
            else:
                self.ignored += 1
        except (MalformedMessage, orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            self.counters[schema.C_MALFORMED] += 1
        except UnknownSymbol:
            self.counters[schema.C_VENUE_ERRORS] += 1

    def _symbol(self, d: dict[str, Any]) -> _SymbolState:
        vs = d["s"]
        if type(vs) is not str:
            raise MalformedMessage("s must be a string")
        st = self._syms.get(vs)
        if st is None:
            raise UnknownSymbol(vs)
        return st

    def _on_control(self, msg: Any) -> None:
        if type(msg) is not dict:
            raise MalformedMessage("not an object")
        if "result" in msg and "id" in msg:
            self.acks += 1
        elif "error" in msg:
            self.counters[schema.C_VENUE_ERRORS] += 1
            self.last_error = str(msg.get("error"))[:300]
            logger.warning("venue error", extra={"venue": "binance", "error": self.last_error})
        else:
            raise MalformedMessage("unknown message")

    def _parse_depth(self, raw: bytes) -> tuple[dict[str, Any], int, int]:
        """Return (data object, n_bid, n_ask) with the levels in ``self._vals``."""
        vals, pos = self._vals, self._pos
        status = scan_levels(raw, 2, vals, pos, self._max_px, self._max_sz)
        if status == SCAN_OK:
            b0, b1, a0, a1, n_bid, n_ask = pos.tolist()
            msg = _loads(raw[:b0] + b"[]" + raw[b1:a0] + b"[]" + raw[a1:])
            data = msg["data"]
            if data["b"] == [] and data["a"] == []:
                return data, n_bid, n_ask
        elif status == SCAN_BAD:
            raise MalformedMessage("not JSON")
        msg = _loads(raw)
        data = msg["data"]
        if type(data) is not dict:
            raise MalformedMessage("data must be an object")
        k = levels_slow(data["b"], vals, 0, self._max_px, self._max_sz)
        n_bid = k // 2
        k = levels_slow(data["a"], vals, k, self._max_px, self._max_sz)
        return data, n_bid, k // 2 - n_bid

    def _on_depth(self, raw: bytes, recv_ns: int) -> None:
        data, n_bid, n_ask = self._parse_depth(raw)
        if data.get("e") != "depthUpdate":
            raise MalformedMessage("not a depth update")
        vs = data["s"]
        st = self._syms.get(vs) if type(vs) is str else None
        if st is None:
            if type(vs) is not str:
                raise MalformedMessage("s must be a string")
            self.counters[schema.C_VENUE_ERRORS] += 1  # a symbol we did not ask for
            return
        first = _int_field(data, "U")
        last = _int_field(data, "u")
        prev = _int_field(data, "pu")
        t_ms = _ms_field(data, "T") if "T" in data else _ms_field(data, "E")
        if first > last:
            raise MalformedMessage("U > u")
        exch_ns = t_ms * _NS_PER_MS
        if st.state == LIVE:
            if prev != st.last_u:
                if last <= st.last_u:
                    self.counters[schema.C_DUPLICATES] += 1  # replayed: already applied
                    return
                self.counters[schema.C_GAPS] += 1
                logger.warning(
                    "depth gap: resyncing",
                    extra={"symbol": st.venue_symbol, "expected_pu": st.last_u, "pu": prev},
                )
                self._resync(st, recv_ns)
                self._buffer(st, first, last, prev, exch_ns, recv_ns, n_bid, n_ask)
                return
            self._apply(st, last, exch_ns, recv_ns, self._vals, n_bid, n_ask)
            return
        if st.state == SYNCING:
            if last < st.last_u:
                return  # older than the snapshot: dropped, as the procedure says
            if first <= st.last_u:
                st.state = LIVE
                self._apply(st, last, exch_ns, recv_ns, self._vals, n_bid, n_ask)
                return
            self._resync(st, recv_ns)  # the stream is past the snapshot: it is too old
        self._buffer(st, first, last, prev, exch_ns, recv_ns, n_bid, n_ask)
        if st.requested_ns == 0 and st.retry_at_ns and recv_ns >= st.retry_at_ns:
            self._request(st, recv_ns)

    def _buffer(
        self,
        st: _SymbolState,
        first: int,
        last: int,
        prev: int,
        exch_ns: int,
        recv_ns: int,
        n_bid: int,
        n_ask: int,
    ) -> None:
        n = 2 * (n_bid + n_ask)
        st.buffer.append(
            _Diff(first, last, prev, exch_ns, recv_ns, self._vals[:n].copy(), n_bid, n_ask)
        )
        if len(st.buffer) > BUFFER_LIMIT:
            st.buffer.popleft()

    def _apply(
        self,
        st: _SymbolState,
        last: int,
        exch_ns: int,
        recv_ns: int,
        vals: np.ndarray,
        n_bid: int,
        n_ask: int,
    ) -> None:
        st.book.apply(vals, n_bid, n_ask, self._top)
        st.last_u = last
        self._publish(st, last, exch_ns, recv_ns)

    def _publish(self, st: _SymbolState, seq: int, exch_ns: int, recv_ns: int) -> None:
        top = self._top_d  # the record's level arrays as Python floats on demand
        nb, na = st.book.counts()
        nb = min(nb, schema.BOOK_DEPTH)
        na = min(na, schema.BOOK_DEPTH)
        if st.book.off_tick != st.off_tick_seen:
            self._off_tick(st, recv_ns)
            return
        tob = (top[0], top[_DEPTH], top[_ASK0], top[_ASK0 + _DEPTH]) if nb and na else None
        if self._cross_check and tob is not None:
            ticker = st.ticker_by_u.get(seq)  # the ticker usually arrives before the diff
            if ticker is not None:
                self.tob_checks += 1
                if ticker != tob:
                    self._mismatch(st, seq, tob, ticker, recv_ns)
                    return  # never published as live: the stale copy goes out instead
        flags = 0
        if nb and na and top[0] >= top[_ASK0]:
            flags |= schema.BOOK_CROSSED
            self.counters[schema.C_CROSSED] += 1
        if st.resynced:
            flags |= schema.BOOK_RESYNCED
            st.resynced = False
            if st.synced_once:
                self.counters[schema.C_RESYNCS] += 1
            st.synced_once = True
        mv = self._book_mv
        BOOK_HEAD.pack_into(mv, 0, st.sid, flags, seq, exch_ns, recv_ns)
        BOOK_COUNTS.pack_into(mv, OFF_N_BID, nb, na)
        self._sink.book(self._books)
        st.published = True
        self.counters[schema.C_SNAPSHOTS] += 1
        if self._cross_check and tob is not None and seq not in st.ticker_by_u:
            st.tob_by_u[seq] = tob  # for a ticker that comes later
            st.order.append(seq)
            if len(st.order) > TOB_CHECK_WINDOW:
                st.tob_by_u.pop(st.order.popleft(), None)

    def _publish_stale(self, st: _SymbolState, now_ns: int) -> None:
        """Re-publish the symbol's last book flagged stale (once per episode is enough)."""
        if not st.published:
            return
        books = self._books
        st.book.write_top(self._top)  # the last book's levels, unchanged
        nb, na = st.book.counts()
        BOOK_HEAD.pack_into(
            self._book_mv, 0, st.sid, schema.BOOK_STALE, max(st.last_u, 0), 0, now_ns
        )
        BOOK_COUNTS.pack_into(
            self._book_mv, OFF_N_BID, min(nb, schema.BOOK_DEPTH), min(na, schema.BOOK_DEPTH)
        )
        self._sink.book(books)
        self.counters[schema.C_STALE] += 1

    # ------------------------------------------------------------------ sync
    def _resync(self, st: _SymbolState, now_ns: int) -> None:
        """Forget the book's sequence and ask for a snapshot; publish it stale if it was live.

        Resyncs of one symbol in quick succession (a venue that keeps sending gaps, rules
        that no longer fit its prices) back off exponentially, so they never hammer REST.
        ``C_RESYNCS`` counts when the book is live again, not here.
        """
        was_live = st.state == LIVE
        st.state = WAIT_SNAPSHOT
        st.buffer.clear()
        st.tob_by_u.clear()
        st.order.clear()
        if was_live:
            self._publish_stale(st, now_ns)
        if st.last_resync_ns and now_ns - st.last_resync_ns < RESYNC_CALM_NS:
            st.requested_ns = 0
            st.retry_at_ns = now_ns + int(st.resync_backoff.next_delay() * 1e9)
        else:
            st.resync_backoff.reset()
            self._request(st, now_ns)
        st.last_resync_ns = now_ns

    def _request(self, st: _SymbolState, now_ns: int) -> None:
        st.requested_ns = now_ns
        st.retry_at_ns = 0
        self._snapshots.request(st.venue_symbol)

    def poll(self, now_ns: int) -> None:
        """Take delivered snapshots; ask again where one is overdue for a retry."""
        for vs, doc, recv_ns in self._snapshots.poll():
            st = self._syms.get(vs)
            if st is None:
                continue
            if isinstance(doc, Exception):
                st.requested_ns = 0
                st.retry_at_ns = now_ns + SNAPSHOT_RETRY_NS
                continue
            self.on_snapshot(vs, doc, recv_ns)
        for st in self._syms.values():
            if (
                st.state != LIVE
                and st.requested_ns == 0
                and st.retry_at_ns
                and now_ns >= st.retry_at_ns
            ):
                self._request(st, now_ns)

    def on_snapshot(self, venue_symbol: str, doc: Any, recv_ns: int) -> None:
        """Build the symbol's book from a REST snapshot and the buffered diffs."""
        st = self._syms.get(venue_symbol)
        if st is None or st.state == LIVE:
            return
        st.requested_ns = 0
        try:
            if type(doc) is not dict:
                raise MalformedMessage("snapshot must be an object")
            last_id = _int_field(doc, "lastUpdateId")
            vals = np.zeros(2 * (len(doc["bids"]) + len(doc["asks"])) + 2)
            k = levels_slow(doc["bids"], vals, 0, self._max_px, self._max_sz)
            n_bid = k // 2
            k = levels_slow(doc["asks"], vals, k, self._max_px, self._max_sz)
            n_ask = k // 2 - n_bid
        except (MalformedMessage, KeyError, TypeError):
            self.counters[schema.C_MALFORMED] += 1
            st.retry_at_ns = recv_ns + SNAPSHOT_RETRY_NS
            return
        while st.buffer and st.buffer[0].last < last_id:
            st.buffer.popleft()
        if st.buffer and st.buffer[0].first > last_id:
            # every buffered diff is newer than the snapshot: it is too old, ask again
            st.retry_at_ns = recv_ns + SNAPSHOT_RETRY_NS
            logger.info(
                "snapshot older than the stream; asking again",
                extra={"symbol": venue_symbol, "lastUpdateId": last_id},
            )
            return
        st.book.load(vals, n_bid, n_ask, self._top)
        st.off_tick_seen = st.book.off_tick
        st.last_u = last_id
        st.resynced = True
        buffered = list(st.buffer)
        st.buffer.clear()
        if not buffered:
            st.state = SYNCING  # the next diff must straddle lastUpdateId
            return
        st.state = LIVE
        last = buffered[0]
        for d in buffered:
            if d is not buffered[0] and d.prev != st.last_u:
                if d.last <= st.last_u:
                    self.counters[schema.C_DUPLICATES] += 1  # received twice: already applied
                    continue
                self.counters[schema.C_GAPS] += 1
                self._resync(st, recv_ns)
                return
            st.book.apply(d.vals, d.n_bid, d.n_ask, self._top)  # the top of the last one stays
            st.last_u = d.last
            last = d
        self._publish(st, last.last, last.exch_ns, last.recv_ns)

    # ------------------------------------------------------------------ other streams
    def _on_ticker(self, d: dict[str, Any], recv_ns: int) -> None:
        st = self._symbol(d)
        u = _int_field(d, "u")
        tick = (
            _num_field(d, "b", 0.0, self._max_px),
            _num_field(d, "B", 0.0, self._max_sz),
            _num_field(d, "a", 0.0, self._max_px),
            _num_field(d, "A", 0.0, self._max_sz),
        )
        if self._cross_check:
            book = st.tob_by_u.get(u)
            if book is not None:
                self.tob_checks += 1
                if book != tick:
                    self._mismatch(st, u, book, tick, recv_ns)
                return
            st.ticker_by_u[u] = tick
            st.torder.append(u)
            if len(st.torder) > TOB_CHECK_WINDOW:
                st.ticker_by_u.pop(st.torder.popleft(), None)

    def _mismatch(
        self,
        st: _SymbolState,
        u: int,
        book: tuple[float, float, float, float],
        ticker: tuple[float, float, float, float],
        now_ns: int,
    ) -> None:
        """The local top of book differs from the venue's at the same update id: rebuild."""
        self.tob_mismatches += 1
        logger.warning(
            "local book disagrees with the venue's best bid/offer; resyncing",
            extra={"symbol": st.venue_symbol, "update_id": u, "book": book, "ticker": ticker},
        )
        if st.state == LIVE:
            self._resync(st, now_ns)

    def _off_tick(self, st: _SymbolState, now_ns: int) -> None:
        """Prices off the tick grid were ignored: the book is incomplete, never publish it live."""
        n = st.book.off_tick - st.off_tick_seen
        st.off_tick_seen = st.book.off_tick
        self.counters[schema.C_MALFORMED] += n
        logger.error(
            "prices off the symbol's tick grid: are the symbol rules stale? book held stale",
            extra={"symbol": st.venue_symbol, "tick": st.book.tick, "levels": n},
        )
        self._resync(st, now_ns)

    def _on_trade(self, d: dict[str, Any], recv_ns: int) -> None:
        st = self._symbol(d)
        tid = _int_field(d, "a" if d.get("e") == "aggTrade" else "t")
        px = _num_field(d, "p", 0.0, self._max_px)
        sz = _num_field(d, "q", 0.0, self._max_sz)
        t_ms = _ms_field(d, "T")
        maker = d["m"]
        if type(maker) is not bool or not (px > 0.0 and sz > 0.0):
            raise MalformedMessage("bad trade")
        if tid <= st.last_trade_id:
            self.counters[schema.C_DUPLICATES] += 1
            return
        st.last_trade_id = tid
        tr = self._trades
        tr["symbol_id"][0] = st.sid
        tr["side"][0] = schema.SIDE_SELL if maker else schema.SIDE_BUY  # buyer maker: seller hit
        tr["trade_id"][0] = tid
        tr["exch_ns"][0] = t_ms * _NS_PER_MS
        tr["recv_ns"][0] = recv_ns
        tr["px"][0] = px
        tr["sz"][0] = sz
        self._sink.trades(tr)
        self.counters[schema.C_TRADES] += 1

    def _on_mark(self, d: dict[str, Any], recv_ns: int) -> None:
        st = self._symbol(d)
        mark = _num_field(d, "p", 0.0, self._max_px)
        if not mark > 0.0:
            raise MalformedMessage("mark price must be > 0")
        index = _num_field(d, "i", 0.0, self._max_px) if "i" in d else math.nan
        rate = _num_field(d, "r", -1.0, 1.0) if d.get("r") not in (None, "") else 0.0
        nxt = _ms_field(d, "T") * _NS_PER_MS if d.get("T") else 0
        t_ms = _ms_field(d, "E")
        m = self._marks
        m["symbol_id"][0] = st.sid
        m["flags"][0] = 0
        m["exch_ns"][0] = t_ms * _NS_PER_MS
        m["recv_ns"][0] = recv_ns
        m["mark_px"][0] = mark
        m["index_px"][0] = index
        m["funding_rate"][0] = rate
        m["next_funding_ns"][0] = nxt
        m["open_interest"][0] = math.nan
        m["funding_interval_s"][0] = 8 * 3600  # the stream does not say; 8 h is the default
        self._sink.mark(m)


def depth_weight(limit: int) -> int:
    """REST weight of ``/fapi/v1/depth`` at ``limit`` levels (venue docs)."""
    if limit <= 50:
        return 2
    if limit <= 100:
        return 5
    if limit <= 500:
        return 10
    return 20


class RestSnapshots:
    """Depth snapshots over REST on one worker thread, so the socket loop never waits on HTTP.

    A failed request is retried with exponential backoff and jitter; a rate-limit answer (or
    our own budget saying no) waits at least the ``Retry-After`` the venue asked for, so a
    resync storm never turns into a ban. One request per symbol is in flight at a time.
    """

    def __init__(
        self,
        client: RestClient,
        *,
        limit: int = 1000,
        clock: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        self._client = client
        self._limit = limit
        self._weight = depth_weight(limit)
        self._clock = clock
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rest")
        self._inflight: dict[str, Future[Any]] = {}
        self._retry_at: dict[str, int] = {}
        self._backoff: dict[str, Backoff] = {}
        self.failures = 0
        self.last_error = ""

    def request(self, venue_symbol: str) -> None:
        if venue_symbol in self._inflight or venue_symbol in self._retry_at:
            return
        self._submit(venue_symbol)

    def _submit(self, vs: str) -> None:
        params = {"symbol": vs, "limit": self._limit}
        self._inflight[vs] = self._pool.submit(
            self._client.get_json, "/fapi/v1/depth", params, weight=self._weight
        )

    def poll(self) -> list[tuple[str, Any, int]]:
        out: list[tuple[str, Any, int]] = []
        now = self._clock()
        for vs, fut in list(self._inflight.items()):
            if not fut.done():
                continue
            del self._inflight[vs]
            try:
                doc = fut.result()
            except Exception as exc:  # any failure of the worker: retry later
                self.failures += 1
                self.last_error = str(exc)
                backoff = self._backoff.setdefault(vs, Backoff(0.5, 30.0))
                delay = backoff.next_delay()
                if isinstance(exc, RateLimited):
                    delay = max(delay, exc.retry_after_s)
                self._retry_at[vs] = now + int(delay * 1e9)
                logger.warning(
                    "depth snapshot failed; retrying",
                    extra={"symbol": vs, "error": str(exc), "retry_in_s": round(delay, 3)},
                )
                continue
            self._backoff.pop(vs, None)
            out.append((vs, doc, now))
        for vs, at in list(self._retry_at.items()):
            if now >= at:
                del self._retry_at[vs]
                self._submit(vs)
        return out

    @property
    def rate_limited(self) -> int:
        return self._client.rate_limited

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
