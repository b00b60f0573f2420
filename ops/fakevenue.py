"""Fake venues on 127.0.0.1 that replay a recorded real market-data file over the real protocols.

Why: the engine's Binance and Hyperliquid adapters (routing, book sequencing, resync, REST
weights, keepalive, reconnects) must be exercised against the venues' actual wire formats and
failure modes, deterministically and with no network. The simulator (``ops.sim``) invents
books; this replays recorded ones, so the update ids, sizes and timing are the venue's own, and
faults (disconnects, gaps, silence, broken frames, rate limits) are injected on demand.

    python -m ops.fakevenue --venue binance --file rec.jsonl.gz [--speed X|max] [--loop]
                            [--host 127.0.0.1] [--ws-port N] [--rest-port N]

Recording: gzip, one message a line, ``<receive time ns> <json>`` (see tests/data/README.md).

Playback is "live": one shared position for every client. It starts when the first client
subscribes to anything (or at ``start()`` with ``autostart``) and paces the lines by their
recorded receive-time deltas divided by ``speed`` (``None``: as fast as the clients drain). At
the end of the file it either starts over (``loop``; Binance update ids then jump back, which a
client sees as a gap and must resync from) or stays connected and silent, still answering
pings and subscriptions, with ``finished`` set. Event times inside messages are the recorded
ones; only ``/fapi/v1/time`` reads the wall clock.

Binance USD-M futures
- WebSocket paths as the routed endpoints: ``/public/stream?streams=a/b``, ``/market/stream``,
  ``/public/ws/<s1>/<s2>``, ``/market/ws/...``; unrouted ``/stream`` and ``/ws`` behave like
  ``/public``. ``/stream`` wraps each message ``{"stream":name,"data":payload}``, ``/ws`` sends
  the payload. ``SUBSCRIBE`` / ``UNSUBSCRIBE`` / ``LIST_SUBSCRIPTIONS`` (and ``SET_PROPERTY`` /
  ``GET_PROPERTY`` ``combined``) method frames; a bad frame gets ``{"error":{"code":2,...}}``
  (code 3 for text that is not JSON, as the venue documents) and the connection stays.
- Routing: ``<sym>@depth[@0ms|@100ms|@250ms|@500ms]``, ``@bookTicker``, ``@trade`` are
  ``/public``; ``@aggTrade``, ``@markPrice[@1s]`` are ``/market``. A stream subscribed on the
  wrong path (or an unknown stream) is acknowledged and never delivers, as the venue does.
- Recorded depth diffs go to every ``<sym>@depth*`` subscriber, whatever speed the name asks
  (the recording is ``@0ms``). Recorded trades go raw to ``@trade`` and as ``aggTrade`` events
  (``a = f = l = t``) to ``@aggTrade``. ``markPriceUpdate`` events are synthesized every
  ``mark_interval_s / speed`` seconds from the fake's book mid, because the recording has none
  (funding rate fixed at 0.0001, next funding time the next 8 h boundary of the replay clock).
- The fake keeps the venue's book: the recorded REST snapshot (pre-scanned) plus every played
  diff with ``u > lastUpdateId``. ``GET /fapi/v1/depth`` answers it at the current playback
  position (weights 2/5/10/20 by limit); ``/fapi/v1/exchangeInfo``, ``/ping``, ``/time``.
  Every answer carries ``X-MBX-USED-WEIGHT-1M`` (rolling 60 s); over the budget: 429 with
  ``Retry-After``; calling again during that back-off: 418 (banned) for ``BAN_S``.
- A REST snapshot's ``lastUpdateId`` is the ``u`` of the last diff the fake applied (the
  recorded snapshot's own id until then), so the first diff to apply on top of it is the one
  with ``u == lastUpdateId`` (``U <= lastUpdateId <= u`` holds): a client must keep the diffs it
  received from before its request, as the documented procedure buffers them.
- The server pings every ``ping_interval_s`` and closes a connection that has not answered a
  ping for ``pong_timeout_s`` (only solicited pongs count, as on the venue).

Hyperliquid
- ``/ws`` with ``subscribe`` / ``unsubscribe`` of ``l2Book``, ``trades``, ``activeAssetCtx``
  per coin, ``{"method":"ping"}`` -> ``{"channel":"pong"}``, errors as ``{"channel":"error"}``.
  An ``l2Book`` subscriber gets the latest played book at once, as from the venue.
  ``activeAssetCtx`` is synthesized from the current book every ``mark_interval_s / speed``.
- A connection that sends no message for ``idle_timeout_s`` is closed (the venue's 60 s rule,
  which is why clients send ``ping``; protocol-level ping frames do not count).
- ``POST /info``: ``meta``, ``l2Book``, ``metaAndAssetCtxs``; anything else 422. Weight
  ``l2Book`` 2, others 20, 1200 a minute; over it 429.

``max_connection_age_s`` (both venues) closes older connections with a normal close frame, like
Binance's 24 h limit. A client whose unsent backlog passes 64 MB is dropped, as venues drop slow
consumers; at ``speed=None`` playback waits up to 1 s for a backlogged client, then leaves it
behind. Fault injection (``disconnect``, ``gap``, ``silence``, ``malformed``, ``rate_limit``) is
thread-safe and applies from the next message on; ``gap`` and ``malformed`` only count messages
some client would have received. ``sent`` counts frames written, per client.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import gzip
import heapq
import http.server
import logging
import math
import random
import signal
import socket
import string
import sys
import threading
import time
import urllib.parse
import zlib
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from http import HTTPStatus
from pathlib import Path
from types import TracebackType
from typing import Any, Final, TypeVar

import orjson
from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import State

log = logging.getLogger("ops.fakevenue")

DATA_DIR: Final = Path(__file__).resolve().parents[1] / "tests" / "data"
DEFAULT_EXCHANGE_INFO: Final = DATA_DIR / "binance-exchangeinfo.json"
DEFAULT_META: Final = DATA_DIR / "hyperliquid-meta.json"

VENUES: Final = ("binance", "hyperliquid")
MALFORMED_KINDS: Final = ("garbage", "truncated", "wrong_types", "binary", "huge")

BAN_S: Final = 120.0  # 418 ban length; the venue starts at 2 minutes and escalates
HL_WEIGHT_LIMIT: Final = 1200  # Hyperliquid's per-minute REST weight budget per IP
BINANCE_WEIGHT_LIMIT: Final = 2400

_PUBLIC_SUFFIXES: Final = frozenset(
    {"depth", "depth@0ms", "depth@100ms", "depth@250ms", "depth@500ms", "bookTicker", "trade"}
)
_MARKET_SUFFIXES: Final = frozenset({"aggTrade", "markPrice", "markPrice@1s"})
_DEPTH_SUFFIXES: Final = ("depth", "depth@0ms", "depth@100ms", "depth@250ms", "depth@500ms")
_DEPTH_WEIGHT: Final = {5: 2, 10: 2, 20: 2, 50: 2, 100: 5, 500: 10, 1000: 20}
_HL_TYPES: Final = ("l2Book", "trades", "activeAssetCtx")
_FUNDING_PERIOD_MS: Final = 8 * 3600 * 1000
_WINDOW_S: Final = 60.0
_BURST: Final = 256  # records played back to back before yielding to the connections
_HIGH_WATER: Final = 1 << 20  # speed=None waits while a client has this much unsent
_STUCK_S: Final = 1.0  # ... but not longer than this for any one client
_MAX_BUFFER: Final = 64 << 20  # a client with this much unsent is dropped
_CLOSE_TIMEOUT_S: Final = 1.0

_T = TypeVar("_T")
_Key = str | tuple[str, str]  # Binance stream name, or Hyperliquid (type, coin)


class RecordingError(ValueError):
    """The recording is missing, unreadable or not in the ``<ns> <json>`` line format."""


@dataclass(frozen=True, slots=True)
class _Rec:
    """One recorded line, classified once at load so playback does no guessing."""

    ns: int  # local receive time
    kind: str  # binance: depth|bookTicker|trade|snapshot|other; hyperliquid: l2Book|trades|other
    key: str  # binance: lowercase symbol; hyperliquid: coin
    payload: bytes  # binance: the event (unwrapped) or snapshot; hyperliquid: the whole message
    event_ms: int  # the venue's event time, drives the replay clock


@dataclass(frozen=True, slots=True)
class _Route:
    """Where a WebSocket connection landed: its routing class, framing and URL streams."""

    route: str  # "public" | "market" | "hl"
    combined: bool
    streams: tuple[str, ...]


def _load_recording(path: Path, venue: str) -> tuple[list[_Rec], dict[str, bytes]]:
    """Read and classify every line; return the records and the first snapshot per symbol.

    Everything is validated here, so a corrupt file fails at construction with its line number
    instead of mid-replay. Payloads are kept as compact bytes and parsed again when played
    (the full 6-minute file would take hundreds of MB as Python objects).
    """
    recs: list[_Rec] = []
    try:
        with gzip.open(path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                ns_text, _, js = line.partition(b" ")
                try:
                    ns = int(ns_text)
                    obj = orjson.loads(js)
                except (ValueError, orjson.JSONDecodeError) as exc:
                    raise RecordingError(
                        f"{path}:{lineno}: not a '<ns> <json>' line ({exc})"
                    ) from None
                if not isinstance(obj, dict):
                    raise RecordingError(f"{path}:{lineno}: the JSON is not an object")
                recs.append(
                    _classify_binance(obj, ns) if venue == "binance" else _classify_hl(obj, ns)
                )
    except FileNotFoundError:
        raise RecordingError(f"{path}: no such file") from None
    except (OSError, EOFError, zlib.error) as exc:
        raise RecordingError(f"{path}: not a readable gzip recording ({exc})") from None
    if not recs:
        raise RecordingError(f"{path}: the recording has no messages")
    if venue == "binance":
        if not any(r.kind in ("depth", "bookTicker", "trade") for r in recs):
            raise RecordingError(f"{path}: no Binance combined-stream messages in the recording")
        return _assign_snapshots(path, recs)
    if not any(r.kind in ("l2Book", "trades") for r in recs):
        raise RecordingError(f"{path}: no Hyperliquid l2Book/trades messages in the recording")
    return recs, {}


def _classify_binance(obj: dict[str, Any], ns: int) -> _Rec:
    stream = obj.get("stream")
    data = obj.get("data")
    if isinstance(stream, str) and isinstance(data, dict):
        sym = stream.partition("@")[0].lower()
        etype = data.get("e")
        kind = {"depthUpdate": "depth", "bookTicker": "bookTicker", "trade": "trade"}.get(
            etype if isinstance(etype, str) else "", "other"
        )
        event_ms = data.get("E")
        return _Rec(ns, kind, sym, orjson.dumps(data), event_ms if isinstance(event_ms, int) else 0)
    if "lastUpdateId" in obj and "bids" in obj and "asks" in obj:
        event_ms = obj.get("E")
        return _Rec(
            ns, "snapshot", "", orjson.dumps(obj), event_ms if isinstance(event_ms, int) else 0
        )
    return _Rec(ns, "other", "", b"", 0)


def _classify_hl(obj: dict[str, Any], ns: int) -> _Rec:
    channel = obj.get("channel")
    data = obj.get("data")
    if channel == "l2Book" and isinstance(data, dict) and isinstance(data.get("coin"), str):
        t = data.get("time")
        return _Rec(ns, "l2Book", data["coin"], orjson.dumps(obj), t if isinstance(t, int) else 0)
    if channel == "trades" and isinstance(data, list) and data and isinstance(data[0], dict):
        coin = data[0].get("coin")
        t = data[-1].get("time") if isinstance(data[-1], dict) else None
        if isinstance(coin, str):
            return _Rec(ns, "trades", coin, orjson.dumps(obj), t if isinstance(t, int) else 0)
    return _Rec(ns, "other", "", b"", 0)


def _assign_snapshots(path: Path, recs: list[_Rec]) -> tuple[list[_Rec], dict[str, bytes]]:
    """Give each bare REST snapshot line the symbol of the depth diffs around it.

    The snapshot document carries no symbol; the recorder wrote it for the book it was
    maintaining, whose diffs are the nearest ones in the file.
    """
    out: list[_Rec] = []
    first: dict[str, bytes] = {}
    depth_at = [i for i, r in enumerate(recs) if r.kind == "depth"]
    for i, rec in enumerate(recs):
        if rec.kind != "snapshot":
            out.append(rec)
            continue
        after = [j for j in depth_at if j > i]
        before = [j for j in depth_at if j < i]
        near = after[0] if after else (before[-1] if before else None)
        if near is None:
            raise RecordingError(f"{path}: a depth snapshot but no depth diffs to give it a symbol")
        sym = recs[near].key
        try:
            snap = orjson.loads(rec.payload)
            int(snap["lastUpdateId"])
            [(str(p), str(q)) for p, q in snap["bids"] + snap["asks"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise RecordingError(f"{path}: malformed depth snapshot ({exc!r})") from None
        first.setdefault(sym, rec.payload)
        out.append(_Rec(rec.ns, "snapshot", sym, rec.payload, rec.event_ms))
    return out, first


class _Book:
    """One Binance symbol's book as the venue holds it: price -> (price text, qty text).

    The original strings are kept so REST answers show exactly what the venue sent; keys are
    floats so levels order numerically.
    """

    __slots__ = ("asks", "bids", "event_ms", "last_update_id", "trade_ms")

    def __init__(self, snapshot: bytes) -> None:
        self.bids: dict[float, tuple[str, str]] = {}
        self.asks: dict[float, tuple[str, str]] = {}
        self.last_update_id = 0
        self.event_ms = 0
        self.trade_ms = 0
        self.load(snapshot)

    def load(self, snapshot: bytes) -> None:
        snap = orjson.loads(snapshot)
        self.bids = {float(p): (p, q) for p, q in snap["bids"] if float(q) != 0.0}
        self.asks = {float(p): (p, q) for p, q in snap["asks"] if float(q) != 0.0}
        self.last_update_id = int(snap["lastUpdateId"])
        self.event_ms = int(snap.get("E", 0))
        self.trade_ms = int(snap.get("T", 0))

    def apply(self, diff: dict[str, Any]) -> bool:
        """Apply one diff if it is newer than the book; quantities are absolute, 0 removes."""
        u = int(diff["u"])
        if u <= self.last_update_id:
            return False
        for levels, side in ((diff["b"], self.bids), (diff["a"], self.asks)):
            for p, q in levels:
                k = float(p)
                if float(q) == 0.0:
                    side.pop(k, None)
                else:
                    side[k] = (p, q)
        self.last_update_id = u
        self.event_ms = int(diff.get("E", self.event_ms))
        self.trade_ms = int(diff.get("T", self.trade_ms))
        return True

    def depth(self, n: int) -> dict[str, Any]:
        bids = heapq.nlargest(n, self.bids.items())
        asks = heapq.nsmallest(n, self.asks.items())
        return {
            "lastUpdateId": self.last_update_id,
            "E": self.event_ms,
            "T": self.trade_ms,
            "bids": [list(v) for _, v in bids],
            "asks": [list(v) for _, v in asks],
        }

    def mid(self) -> float | None:
        if not self.bids or not self.asks:
            return None
        return (max(self.bids) + min(self.asks)) / 2.0


@dataclass(slots=True)
class _CoinState:
    """The latest played Hyperliquid book of one coin plus the traded volume since start."""

    message: bytes
    data: dict[str, Any]
    first_mid: float
    ntl_volume: float = 0.0
    base_volume: float = 0.0


class _Client:
    """One WebSocket connection: its route, subscriptions and keepalive clocks."""

    __slots__ = (
        "combined",
        "connected_at",
        "last_pong",
        "last_recv",
        "over_since",
        "path",
        "ping_task",
        "route",
        "subs",
        "ws",
    )

    def __init__(self, ws: ServerConnection, path: str, route: _Route, now: float) -> None:
        self.ws = ws
        self.path = path
        self.route = route.route
        self.combined = route.combined
        self.subs: dict[_Key, None] = {}  # ordered set, for LIST_SUBSCRIPTIONS
        self.connected_at = now
        self.last_recv = now
        self.last_pong = now
        self.over_since = 0.0  # since when its write buffer is over the high-water mark
        self.ping_task: asyncio.Task[None] | None = None


def _binance_route(name: str) -> str | None:
    """The path class a stream name belongs to, or None for names the venue does not serve."""
    sym, sep, suffix = name.partition("@")
    if not sep or not sym or sym != sym.lower():
        return None
    if suffix in _PUBLIC_SUFFIXES:
        return "public"
    if suffix in _MARKET_SUFFIXES:
        return "market"
    return None


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _wrong_types(value: Any) -> Any:
    """The same message with its first int made letters and its first numeric string a list."""
    done = {"int": False, "str": False}

    def walk(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: walk(x) for k, x in v.items()}
        if isinstance(v, list):
            return [walk(x) for x in v]
        if isinstance(v, int) and not isinstance(v, bool) and not done["int"]:
            done["int"] = True
            return "notanumber"
        if isinstance(v, str) and not done["str"] and _is_number(v):
            done["str"] = True
            return [v]
        return v

    return walk(value)


def _huge(value: Any) -> Any:
    """The same message with every numeric string (prices, sizes) made ``1e308``."""
    if isinstance(value, dict):
        return {k: _huge(x) for k, x in value.items()}
    if isinstance(value, list):
        return [_huge(x) for x in value]
    if isinstance(value, str) and _is_number(value):
        return "1e308"
    return value


def _fmt(x: float, decimals: int) -> str:
    """Venue-style decimal text: no trailing zeros, but at least one decimal ("105055.0")."""
    text = f"{x:.{decimals}f}".rstrip("0")
    return text + "0" if text.endswith(".") else text


def _decimals(text: str) -> int:
    return len(text.partition(".")[2])


class _RestServer(http.server.ThreadingHTTPServer):
    """Threading HTTP server that can unblock and join its keep-alive handler threads."""

    daemon_threads = False
    block_on_close = True

    def __init__(self, addr: tuple[str, int], venue: FakeVenue) -> None:
        self.venue = venue
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        super().__init__(addr, _RestHandler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._open_lock:
            self._open.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def drop_open_connections(self) -> None:
        """Wake handler threads waiting for a next keep-alive request so they can end."""
        with self._open_lock:
            socks = list(self._open)
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class _RestHandler(http.server.BaseHTTPRequestHandler):
    """Hands each request to the venue; keep-alive like the real APIs."""

    protocol_version = "HTTP/1.1"
    server_version = "fakevenue"
    timeout = 30  # an idle keep-alive connection is dropped after this

    def do_GET(self) -> None:
        self._venue()._handle_rest(self, "GET")

    def do_POST(self) -> None:
        self._venue()._handle_rest(self, "POST")

    def _venue(self) -> FakeVenue:
        server = self.server
        assert isinstance(server, _RestServer)
        return server.venue

    def reply(
        self,
        status: int,
        body: bytes,
        *,
        content_type: str = "application/json",
        headers: Iterable[tuple[str, str]] = (),
    ) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for name, value in headers:
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("rest %s", format % args)


class FakeVenue:
    """A Binance USD-M or Hyperliquid market-data venue on 127.0.0.1 replaying a recording.

    The recording is loaded and validated here (``RecordingError`` names the file and line).
    ``speed=None`` replays as fast as the clients drain. ``ping_interval_s`` /
    ``pong_timeout_s`` apply to Binance (the venue pings), ``idle_timeout_s`` to Hyperliquid
    (the client must talk); ``None`` turns one off. ``weight_limit_per_min`` defaults to the
    venue's own budget (Binance 2400, Hyperliquid 1200). ``exchange_info`` / ``meta`` replace
    the symbol-rule fixtures in tests/data.

    Observability (read from any thread): ``connections``, ``connects_total``,
    ``subscriptions``, ``sent`` (Counter by kind), ``rest_requests`` (Counter by path),
    ``rest_429``, ``rest_418``, ``position`` (next line of the recording), ``loops``,
    ``last_update_id`` (Binance book), ``pongs_received``, ``finished`` (threading.Event).
    """

    def __init__(
        self,
        venue: str,
        recording: str | Path,
        *,
        speed: float | None = 1.0,
        host: str = "127.0.0.1",
        ws_port: int = 0,
        rest_port: int = 0,
        loop: bool = False,
        autostart: bool = False,
        ping_interval_s: float | None = 180.0,
        pong_timeout_s: float = 600.0,
        idle_timeout_s: float | None = 60.0,
        max_connection_age_s: float | None = None,
        mark_interval_s: float = 1.0,
        weight_limit_per_min: int | None = None,
        exchange_info: Path | None = None,
        meta: Path | None = None,
    ) -> None:
        if venue not in VENUES:
            raise ValueError(f"venue must be one of {VENUES}, not {venue!r}")
        if speed is not None and not speed > 0:
            raise ValueError("speed must be > 0, or None for as fast as possible")
        for name, value in (
            ("ping_interval_s", ping_interval_s),
            ("pong_timeout_s", pong_timeout_s),
            ("idle_timeout_s", idle_timeout_s),
            ("max_connection_age_s", max_connection_age_s),
            ("mark_interval_s", mark_interval_s),
        ):
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0")
        self.venue = venue
        self.recording = Path(recording)
        self.speed = speed
        self.host = host
        self._ws_port_cfg = ws_port
        self._rest_port_cfg = rest_port
        self._loop_playback = loop
        self._autostart = autostart
        self._ping_interval = ping_interval_s
        self._pong_timeout = pong_timeout_s
        self._idle_timeout = idle_timeout_s
        self._max_age = max_connection_age_s
        self._mark_interval = mark_interval_s
        default_limit = BINANCE_WEIGHT_LIMIT if venue == "binance" else HL_WEIGHT_LIMIT
        self._weight_limit = weight_limit_per_min or default_limit

        self._recs, self._snapshots = _load_recording(self.recording, venue)
        self._rec_keys = {r.key for r in self._recs if r.key}
        if venue == "binance":
            fixture = exchange_info or DEFAULT_EXCHANGE_INFO
        else:
            fixture = meta or DEFAULT_META
        self._fixture = Path(fixture).read_bytes()
        self._fixture_doc = orjson.loads(self._fixture)

        # book state, shared with the REST threads under _book_lock; a symbol with diffs but
        # no recorded snapshot starts empty
        for rec in self._recs:
            if rec.kind == "depth":
                self._snapshots.setdefault(rec.key, b'{"lastUpdateId":0,"bids":[],"asks":[]}')
        self._book_lock = threading.Lock()
        self._books = {sym: _Book(snap) for sym, snap in self._snapshots.items()}
        self._coins: dict[str, _CoinState] = {}
        self._venue_ms = next((r.event_ms for r in self._recs if r.event_ms), 0)

        # observability
        self.connects_total = 0
        self.sent: Counter[str] = Counter()
        self.rest_requests: Counter[str] = Counter()
        self.rest_429 = 0
        self.rest_418 = 0
        self.pongs_received = 0
        self.loops = 0
        self.bad_records = 0
        self.finished = threading.Event()

        # loop-owned state
        self._clients: set[_Client] = set()
        self._index: dict[_Key, set[_Client]] = {}
        self._pos = 0
        self._paused = False
        self._silent_until = 0.0
        self._gap_left = 0
        self._malformed: deque[str] = deque()
        self._malformed_seq = 0
        self._bg: set[asyncio.Task[Any]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_tid = 0
        self._loop_alive = False
        self._play_evt: asyncio.Event | None = None
        self._unpaused: asyncio.Event | None = None
        self._stop_evt: asyncio.Event | None = None

        # REST state, under _rest_lock
        self._rest_lock = threading.Lock()
        self._window: deque[tuple[float, int]] = deque()
        self._used = 0
        self._backoff_until = 0.0
        self._ban_until = 0.0
        self._forced: deque[tuple[int, float]] = deque()

        self._call_lock = threading.Lock()
        self._life_lock = threading.Lock()
        self._started = False
        self._stopped = False
        self._thread: threading.Thread | None = None
        self._httpd: _RestServer | None = None
        self._http_thread: threading.Thread | None = None
        self._ws_port = 0
        self._ready = threading.Event()
        self._start_error: BaseException | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> FakeVenue:
        """Start the WebSocket loop thread and the REST server; return once both listen."""
        with self._life_lock:
            if self._stopped:
                raise RuntimeError("a stopped FakeVenue cannot be restarted")
            if self._started:
                return self
            self._started = True
        self._thread = threading.Thread(
            target=self._run_loop, name=f"fakevenue-{self.venue}-ws", daemon=True
        )
        self._thread.start()
        if not self._ready.wait(15):
            self.stop()
            raise RuntimeError("fake venue WebSocket server did not start within 15 s")
        if self._start_error is not None:
            self.stop()
            raise RuntimeError(f"fake venue WebSocket server failed: {self._start_error!r}")
        try:
            self._httpd = _RestServer((self.host, self._rest_port_cfg), self)
        except OSError:
            self.stop()
            raise
        self._http_thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"fakevenue-{self.venue}-rest",
            daemon=True,
        )
        self._http_thread.start()
        return self

    def stop(self) -> None:
        """Close every connection and both servers, join the threads. Idempotent."""
        with self._life_lock:
            if self._stopped or not self._started:
                self._stopped = True
                return
            self._stopped = True
        loop, stop_evt = self._loop, self._stop_evt
        if loop is not None and stop_evt is not None:
            with self._call_lock:
                if self._loop_alive:
                    loop.call_soon_threadsafe(stop_evt.set)
        if self._thread is not None:
            self._thread.join(15)
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.drop_open_connections()
            self._httpd.server_close()
        if self._http_thread is not None:
            self._http_thread.join(15)

    def __enter__(self) -> FakeVenue:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def ws_port(self) -> int:
        return self._ws_port or self._ws_port_cfg

    @property
    def rest_port(self) -> int:
        if self._httpd is not None:
            return int(self._httpd.server_address[1])
        return self._rest_port_cfg

    @property
    def ws_url(self) -> str:
        """The server base (Binance adds /public or /market; Hyperliquid listens on /ws)."""
        return f"ws://{self.host}:{self.ws_port}"

    @property
    def rest_url(self) -> str:
        return f"http://{self.host}:{self.rest_port}"

    # ------------------------------------------------------------------ observability
    @property
    def connections(self) -> int:
        return len(self._clients)

    @property
    def subscriptions(self) -> set[_Key]:
        """Every stream name (Binance) or (type, coin) (Hyperliquid) some client holds."""
        return self._call(lambda: {k for c in self._clients for k in c.subs})

    @property
    def position(self) -> int:
        """Index of the next recorded line to play (lines played in the current pass)."""
        return self._pos

    @property
    def symbols(self) -> list[str]:
        """Symbols (Binance, upper case) or coins (Hyperliquid) the recording carries."""
        if self.venue == "binance":
            return sorted(k.upper() for k in self._rec_keys)
        return sorted(self._rec_keys)

    @property
    def last_update_id(self) -> int:
        """The Binance book's update id (the first symbol's, for multi-symbol recordings)."""
        with self._book_lock:
            book = next(iter(self._books.values()), None)
            return book.last_update_id if book is not None else 0

    # ------------------------------------------------------------------ controls
    def pause(self) -> None:
        """Freeze playback (and the synthesized marks) at the next message boundary."""

        def do() -> None:
            self._paused = True
            if self._unpaused is not None:
                self._unpaused.clear()

        self._call(do)

    def resume(self) -> None:
        """Continue playback; the next line plays at once, then the recorded pacing resumes."""

        def do() -> None:
            self._paused = False
            if self._unpaused is not None:
                self._unpaused.set()

        self._call(do)

    def disconnect(self, path: str | None = None, clean: bool = False) -> int:
        """Drop every connection (or those whose path starts with ``path``); return how many.

        ``clean`` sends a normal close frame; otherwise the TCP transport is aborted with no
        close frame, as when a venue's load balancer drops a connection.
        """

        def do() -> int:
            hit = [c for c in self._clients if path is None or c.path.startswith(path)]
            for c in hit:
                if clean:
                    self._close_client(c, 1000, "")
                elif c.ws.transport is not None:
                    c.ws.transport.abort()
            return len(hit)

        return self._call(do)

    def gap(self, n: int = 1) -> None:
        """Withhold the next ``n`` depth diffs (Binance) / l2Book messages (Hyperliquid).

        The fake's own book still applies them: the venue moved on and the client just missed
        them, so a later REST snapshot is consistent and a resync works.
        """
        if n < 1:
            raise ValueError("n must be >= 1")

        def do() -> None:
            self._gap_left += n

        self._call(do)

    def silence(self, seconds: float) -> None:
        """Deliver no data messages for ``seconds``; pings, pongs and requests still answered.

        Playback and the fake's book keep moving, so the client comes back to a later book.
        """
        if seconds <= 0:
            raise ValueError("seconds must be > 0")

        def do() -> None:
            loop = self._loop
            now = loop.time() if loop is not None else time.monotonic()
            self._silent_until = max(self._silent_until, now + seconds)

        self._call(do)

    def malformed(self, n: int = 1, kind: str = "garbage") -> None:
        """Replace the next ``n`` data messages by broken ones; the originals are not sent.

        ``garbage``: non-JSON text; ``truncated``: the first half of the JSON text;
        ``wrong_types``: the first integer made letters and the first numeric string a list;
        ``binary``: a binary frame of garbage; ``huge``: valid JSON with every numeric string
        ``1e308``. A replaced Binance depth diff is also a gap in the sequence.
        """
        if n < 1:
            raise ValueError("n must be >= 1")
        if kind not in MALFORMED_KINDS:
            raise ValueError(f"kind must be one of {MALFORMED_KINDS}, not {kind!r}")

        def do() -> None:
            self._malformed.extend([kind] * n)

        self._call(do)

    def rate_limit(self, n: int = 1, status: int = 429, retry_after_s: float = 1.0) -> None:
        """Answer the next ``n`` REST requests with ``status`` and ``Retry-After``.

        Injected answers do not start the venue's own back-off/ban bookkeeping, so exactly
        ``n`` requests are affected.
        """
        if n < 1:
            raise ValueError("n must be >= 1")
        with self._rest_lock:
            self._forced.extend([(status, retry_after_s)] * n)

    # ------------------------------------------------------------------ loop plumbing
    def _call(self, fn: Callable[[], _T]) -> _T:
        """Run ``fn`` on the event loop thread (all WebSocket state lives there) and wait."""
        fut: concurrent.futures.Future[_T] = concurrent.futures.Future()
        with self._call_lock:
            loop = self._loop
            direct = loop is None or not self._loop_alive or threading.get_ident() == self._loop_tid
            if not direct:
                assert loop is not None
                loop.call_soon_threadsafe(self._run_into, fn, fut)
        if direct:
            return fn()
        return fut.result(timeout=30)

    @staticmethod
    def _run_into(fn: Callable[[], _T], fut: concurrent.futures.Future[_T]) -> None:
        try:
            fut.set_result(fn())
        except BaseException as exc:
            fut.set_exception(exc)

    def _run_loop(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop_tid = threading.get_ident()
        with self._call_lock:
            self._loop = loop
            self._loop_alive = True
        try:
            loop.run_until_complete(self._amain())
        except BaseException as exc:
            self._start_error = exc
            log.exception("fake venue loop failed")
        finally:
            self._ready.set()
            with self._call_lock:
                self._loop_alive = False
            # callbacks scheduled before _loop_alive went False still run (and answer callers)
            loop.run_until_complete(asyncio.sleep(0))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def _spawn(self, coro: Any) -> None:
        loop = self._loop
        if loop is None or not self._loop_alive:
            coro.close()
            return
        task = loop.create_task(coro)
        self._bg.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._bg.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("fake venue task failed: %r", task.exception())

    def _close_client(self, c: _Client, code: int, reason: str) -> None:
        self._spawn(self._close_ws(c.ws, code, reason))

    @staticmethod
    async def _close_ws(ws: ServerConnection, code: int, reason: str) -> None:
        """Close with a close frame, or abort if the peer does not take it in time.

        ``ServerConnection.close`` waits for the write buffer to drain before its own close
        timeout starts, so a client that stopped reading (the very one a pong timeout is
        for) would never be closed.
        """
        try:
            async with asyncio.timeout(_CLOSE_TIMEOUT_S):
                await ws.close(code, reason)
        except TimeoutError:
            if ws.transport is not None:
                ws.transport.abort()

    async def _amain(self) -> None:
        self._play_evt = asyncio.Event()
        self._unpaused = asyncio.Event()
        self._stop_evt = asyncio.Event()
        if not self._paused:
            self._unpaused.set()
        if self._autostart:
            self._play_evt.set()
        async with serve(
            self._handler,
            self.host,
            self._ws_port_cfg,
            process_request=self._process_request,
            compression=None,
            ping_interval=None,  # keepalive is ours: counted pongs, the venue's timings
            ping_timeout=None,
            close_timeout=_CLOSE_TIMEOUT_S,
            max_size=1 << 20,
        ) as server:
            self._ws_port = int(next(iter(server.sockets)).getsockname()[1])
            tasks = [asyncio.create_task(self._playback()), asyncio.create_task(self._marks())]
            self._ready.set()
            await self._stop_evt.wait()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            closing = [self._close_ws(c.ws, 1001, "") for c in list(self._clients)]
            await asyncio.gather(*closing, return_exceptions=True)
            server.close()
            await server.wait_closed()
            if self._bg:
                await asyncio.gather(*list(self._bg), return_exceptions=True)

    # ------------------------------------------------------------------ connections
    def _parse_path(self, raw_path: str) -> _Route | None:
        split = urllib.parse.urlsplit(raw_path)
        parts = [p for p in split.path.split("/") if p]
        if self.venue == "hyperliquid":
            return _Route("hl", False, ()) if parts == ["ws"] else None
        route = "public"
        if parts and parts[0] in ("public", "market"):
            route = parts.pop(0)
        if parts == ["stream"]:
            query = urllib.parse.parse_qs(split.query).get("streams", [""])[0]
            return _Route(route, True, tuple(s for s in query.split("/") if s))
        if parts and parts[0] == "ws":
            return _Route(route, False, tuple(parts[1:]))
        return None

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        if self._parse_path(request.path) is None:
            return connection.respond(HTTPStatus.NOT_FOUND, "Not Found\n")
        return None

    async def _handler(self, ws: ServerConnection) -> None:
        loop = asyncio.get_running_loop()
        assert ws.request is not None
        path = ws.request.path
        route = self._parse_path(path)
        assert route is not None
        c = _Client(ws, path, route, loop.time())
        self._clients.add(c)
        self.connects_total += 1
        for name in route.streams:
            self._subscribe(c, name)
        watchdog = asyncio.create_task(self._watchdog(c))
        try:
            async for raw in ws:
                c.last_recv = loop.time()
                try:
                    if self.venue == "binance":
                        self._binance_request(c, raw)
                    else:
                        self._hl_request(c, raw)
                except Exception:  # a bug here must not kill the connection silently
                    log.exception("fake venue request handling failed")
        except ConnectionClosed:
            pass
        finally:
            pending = [t for t in (watchdog, c.ping_task) if t is not None]
            for t in pending:
                t.cancel()
            await asyncio.wait(pending)
            self._clients.discard(c)
            for key in c.subs:
                subs = self._index.get(key)
                if subs is not None:
                    subs.discard(c)

    async def _watchdog(self, c: _Client) -> None:
        """Server pings and pong timeout (Binance), idle close (Hyperliquid), maximum age."""
        loop = asyncio.get_running_loop()
        ping_every = self._ping_interval if self.venue == "binance" else None
        idle = self._idle_timeout if self.venue == "hyperliquid" else None
        next_ping = c.connected_at + ping_every if ping_every else math.inf
        while True:
            now = loop.time()
            deadlines: list[float] = []
            if self._max_age is not None:
                deadline = c.connected_at + self._max_age
                if now >= deadline:
                    self._close_client(c, 1000, "connection age limit")
                    return
                deadlines.append(deadline)
            if idle is not None:
                deadline = c.last_recv + idle
                if now >= deadline:
                    self._close_client(c, 1000, "idle timeout")
                    return
                deadlines.append(deadline)
            if ping_every:
                deadline = c.last_pong + self._pong_timeout
                if now >= deadline:
                    self._close_client(c, 1011, "pong timeout")
                    return
                deadlines.append(deadline)
                if now >= next_ping:
                    # sent from its own task: ping() waits for the write buffer to drain, which
                    # for a client that stopped reading is never, and the deadlines above must
                    # still be enforced; one ping in flight at a time
                    if c.ping_task is None or c.ping_task.done():
                        c.ping_task = loop.create_task(self._ping(c))
                    next_ping += ping_every
                    if next_ping <= now:
                        next_ping = now + ping_every
                deadlines.append(next_ping)
            if not deadlines:
                return
            await asyncio.sleep(max(0.001, min(deadlines) - loop.time()))

    async def _ping(self, c: _Client) -> None:
        try:
            waiter = await c.ws.ping()
        except ConnectionClosed:
            return
        waiter.add_done_callback(partial(self._on_pong, c))

    def _on_pong(self, c: _Client, fut: asyncio.Future[float]) -> None:
        if fut.cancelled() or fut.exception() is not None:
            return
        c.last_pong = asyncio.get_running_loop().time()
        self.pongs_received += 1

    def _send(self, c: _Client, frame: bytes, *, text: bool = True, kind: str = "") -> bool:
        """Write one frame now (no per-client task); False if the connection is not open.

        ``kind`` is counted in ``sent`` before the write, so a client that has the frame
        always sees it counted.
        """
        ws = c.ws
        transport = ws.transport
        if ws.protocol.state is not State.OPEN or transport is None or transport.is_closing():
            return False  # closing or aborted: writing would only log errors
        if transport.get_write_buffer_size() > _MAX_BUFFER:
            # a consumer this far behind is dropped, as the venues do with slow clients
            log.warning("fake venue dropping a slow client on %s", c.path)
            transport.abort()
            return False
        if kind:
            self.sent[kind] += 1
        broadcast((ws,), frame, text=text)
        return True

    def _start_playback(self) -> None:
        if self._play_evt is not None:
            self._play_evt.set()

    def _subscribe(self, c: _Client, key: _Key) -> None:
        c.subs[key] = None
        if self.venue == "binance":
            assert isinstance(key, str)
            if _binance_route(key) != c.route:
                return  # acknowledged, never delivers: wrong path or unknown stream
        self._index.setdefault(key, set()).add(c)
        self._start_playback()

    def _unsubscribe(self, c: _Client, key: _Key) -> None:
        c.subs.pop(key, None)
        subs = self._index.get(key)
        if subs is not None:
            subs.discard(c)

    # ------------------------------------------------------------------ Binance requests
    def _binance_error(self, c: _Client, code: int, msg: str, req_id: Any) -> None:
        self._send(c, orjson.dumps({"error": {"code": code, "msg": msg}, "id": req_id}))

    def _binance_request(self, c: _Client, raw: str | bytes) -> None:
        try:
            msg = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            self._binance_error(c, 3, f"Invalid JSON: {exc}", None)
            return
        if not isinstance(msg, dict):
            self._binance_error(c, 2, "Invalid request: request must be a JSON object", None)
            return
        req_id = msg.get("id")
        if not (
            req_id is None
            or (isinstance(req_id, int) and not isinstance(req_id, bool) and req_id >= 0)
            or (isinstance(req_id, str) and len(req_id) <= 36)
        ):
            self._binance_error(
                c, 2, "Invalid request: request ID must be an unsigned integer", None
            )
            return
        method = msg.get("method")
        params = msg.get("params")
        if method in ("SUBSCRIBE", "UNSUBSCRIBE"):
            if not isinstance(params, list) or not all(isinstance(p, str) and p for p in params):
                self._binance_error(
                    c, 2, "Invalid request: params must be a list of stream names", req_id
                )
                return
            for name in params:
                if method == "SUBSCRIBE":
                    self._subscribe(c, name)
                else:
                    self._unsubscribe(c, name)
            self._send(c, orjson.dumps({"result": None, "id": req_id}))
        elif method == "LIST_SUBSCRIPTIONS":
            self._send(c, orjson.dumps({"result": list(c.subs), "id": req_id}))
        elif method == "GET_PROPERTY" and params == ["combined"]:
            self._send(c, orjson.dumps({"result": c.combined, "id": req_id}))
        elif (
            method == "SET_PROPERTY"
            and isinstance(params, list)
            and len(params) == 2
            and params[0] == "combined"
            and isinstance(params[1], bool)
        ):
            c.combined = params[1]
            self._send(c, orjson.dumps({"result": None, "id": req_id}))
        elif method in ("GET_PROPERTY", "SET_PROPERTY"):
            self._binance_error(c, 2, "Invalid request: unknown property", req_id)
        else:
            self._binance_error(
                c,
                2,
                f"Invalid request: unknown variant {method!r}, expected one of SUBSCRIBE, "
                "UNSUBSCRIBE, LIST_SUBSCRIPTIONS, SET_PROPERTY, GET_PROPERTY",
                req_id,
            )

    # ------------------------------------------------------------------ Hyperliquid requests
    def _hl_error(self, c: _Client, text: str) -> None:
        self._send(c, orjson.dumps({"channel": "error", "data": text}))

    def _hl_request(self, c: _Client, raw: str | bytes) -> None:
        shown = (raw if isinstance(raw, str) else raw.decode("utf-8", "replace"))[:200]
        try:
            msg = orjson.loads(raw)
        except orjson.JSONDecodeError:
            self._hl_error(c, f"Error parsing JSON into valid websocket request: {shown}")
            return
        if not isinstance(msg, dict):
            self._hl_error(c, f"Error parsing JSON into valid websocket request: {shown}")
            return
        method = msg.get("method")
        if method == "ping":
            self._send(c, b'{"channel":"pong"}')
            return
        if method not in ("subscribe", "unsubscribe"):
            self._hl_error(c, f"Unknown method in websocket request: {shown}")
            return
        sub = msg.get("subscription")
        if not isinstance(sub, dict):
            self._hl_error(c, f"Invalid subscription: {shown}")
            return
        kind = sub.get("type")
        coin = sub.get("coin")
        if kind not in _HL_TYPES:
            self._hl_error(c, f"Invalid subscription type {kind!r}: {shown}")
            return
        if not isinstance(coin, str) or not coin:
            self._hl_error(c, f"Invalid subscription (missing coin): {shown}")
            return
        if not self._hl_known_coin(coin):
            self._hl_error(c, f"Invalid subscription (unknown coin {coin!r}): {shown}")
            return
        key = (kind, coin)
        if method == "subscribe":
            if key in c.subs:
                self._hl_error(c, f"Already subscribed: {shown}")
                return
            self._subscribe(c, key)
        else:
            if key not in c.subs:
                self._hl_error(c, f"Already unsubscribed: {shown}")
                return
            self._unsubscribe(c, key)
        ack = {"channel": "subscriptionResponse", "data": {"method": method, "subscription": sub}}
        self._send(c, orjson.dumps(ack))
        if method == "subscribe" and kind == "l2Book" and not self._silenced():
            state = self._coins.get(coin)
            if state is not None:
                self._send(c, state.message, kind="l2Book")

    def _hl_known_coin(self, coin: str) -> bool:
        if coin in self._rec_keys:
            return True
        universe = self._fixture_doc.get("universe", [])
        return any(isinstance(u, dict) and u.get("name") == coin for u in universe)

    # ------------------------------------------------------------------ playback
    def _silenced(self) -> bool:
        loop = self._loop
        return loop is not None and loop.time() < self._silent_until

    async def _playback(self) -> None:
        """Play the recording once for everyone, paced by recorded receive times / speed."""
        assert self._play_evt is not None and self._unpaused is not None
        loop = asyncio.get_running_loop()
        await self._play_evt.wait()
        recs = self._recs
        speed = self.speed
        anchor: tuple[float, int] | None = None  # (loop time, recorded ns) pacing origin
        burst = 0
        while True:
            if self._paused:
                await self._unpaused.wait()
                anchor = None
                continue
            if self._pos >= len(recs):
                if not self._loop_playback:
                    self.finished.set()
                    return
                self._wrap()
                anchor = None
                continue
            rec = recs[self._pos]
            if speed is not None:
                now = loop.time()
                if anchor is None:
                    anchor = (now, rec.ns)
                due = anchor[0] + max(0, rec.ns - anchor[1]) / 1e9 / speed
                if due > now:
                    burst = 0
                    await asyncio.sleep(due - now)
                    continue  # pause may have come in meanwhile
            self._pos += 1
            try:
                self._play(rec)
            except Exception:  # a bad recorded line must not end the replay
                self.bad_records += 1
                log.exception("fake venue could not play line %d", self._pos - 1)
            burst += 1
            if burst >= _BURST:
                burst = 0
                if speed is None:
                    await self._drain()
                else:
                    await asyncio.sleep(0)

    async def _drain(self) -> None:
        """At speed=None, let clients drain rather than buffer the whole file in memory.

        A client that stays over the high-water mark for ``_STUCK_S`` is no longer waited for
        (one stuck reader must not stall everyone); ``_send`` drops it if it grows too far.
        """
        loop = asyncio.get_running_loop()
        await asyncio.sleep(0)
        while True:
            now = loop.time()
            waiting = False
            for c in self._clients:
                transport = c.ws.transport
                if transport is None or transport.get_write_buffer_size() <= _HIGH_WATER:
                    c.over_since = 0.0
                elif not c.over_since:
                    c.over_since = now
                    waiting = True
                elif now - c.over_since < _STUCK_S:
                    waiting = True
            if not waiting:
                return
            await asyncio.sleep(0.001)

    def _wrap(self) -> None:
        """Start the file over: the Binance books go back to the recorded snapshot."""
        self._pos = 0
        self.loops += 1
        with self._book_lock:
            for sym, snap in self._snapshots.items():
                self._books[sym].load(snap)

    def _play(self, rec: _Rec) -> None:
        if rec.event_ms:
            self._venue_ms = rec.event_ms
        if self.venue == "binance":
            self._play_binance(rec)
        else:
            self._play_hl(rec)

    def _play_binance(self, rec: _Rec) -> None:
        sym = rec.key
        if rec.kind == "snapshot":
            # a later snapshot (the recorder resynced) resets the book if it is newer
            snap = orjson.loads(rec.payload)
            with self._book_lock:
                book = self._books[sym]
                if int(snap["lastUpdateId"]) > book.last_update_id:
                    book.load(rec.payload)
            return
        if rec.kind == "depth":
            with self._book_lock:
                self._books[sym].apply(orjson.loads(rec.payload))
            groups = [("depth", f"{sym}@{s}", rec.payload) for s in _DEPTH_SUFFIXES]
            self._dispatch(groups, gappable=True)
        elif rec.kind == "bookTicker":
            self._dispatch([("bookTicker", f"{sym}@bookTicker", rec.payload)])
        elif rec.kind == "trade":
            self._dispatch(
                [
                    ("trade", f"{sym}@trade", rec.payload),
                    ("aggTrade", f"{sym}@aggTrade", partial(self._agg_trade, rec.payload)),
                ]
            )

    @staticmethod
    def _agg_trade(payload: bytes) -> bytes:
        t = orjson.loads(payload)
        agg = {
            "e": "aggTrade",
            "E": t["E"],
            "a": t["t"],
            "s": t["s"],
            "p": t["p"],
            "q": t["q"],
            "f": t["t"],
            "l": t["t"],
            "T": t["T"],
            "m": t["m"],
        }
        return orjson.dumps(agg)

    def _play_hl(self, rec: _Rec) -> None:
        coin = rec.key
        if rec.kind == "l2Book":
            data = orjson.loads(rec.payload)["data"]
            with self._book_lock:
                state = self._coins.get(coin)
                if state is None:
                    mid = self._hl_mid(data)
                    self._coins[coin] = _CoinState(rec.payload, data, mid or 0.0)
                else:
                    state.message, state.data = rec.payload, data
            self._dispatch([("l2Book", ("l2Book", coin), rec.payload)], gappable=True)
        elif rec.kind == "trades":
            trades = orjson.loads(rec.payload)["data"]
            with self._book_lock:
                state = self._coins.get(coin)
                if state is not None:
                    for t in trades:
                        px, sz = float(t["px"]), float(t["sz"])
                        state.ntl_volume += px * sz
                        state.base_volume += sz
            self._dispatch([("trades", ("trades", coin), rec.payload)])

    def _dispatch(
        self,
        groups: list[tuple[str, _Key, bytes | Callable[[], bytes]]],
        *,
        gappable: bool = False,
    ) -> None:
        """Send one message (in its per-stream variants) to its subscribers, faults applied."""
        live = []
        for kind, key, payload in groups:
            subs = self._index.get(key)
            if subs:
                live.append((kind, key, payload, subs))
        if not live or self._silenced():
            return
        if gappable and self._gap_left > 0:
            self._gap_left -= 1
            return
        fault = self._malformed.popleft() if self._malformed else None
        for kind, key, payload, subs in live:
            body = payload() if callable(payload) else payload
            framed: bytes | None = None
            for c in list(subs):
                if c.combined:
                    if framed is None:
                        assert isinstance(key, str)
                        framed = b'{"stream":"' + key.encode() + b'","data":' + body + b"}"
                    frame = framed
                else:
                    frame = body
                if fault is None:
                    self._send(c, frame, kind=kind)
                else:
                    self._send_malformed(c, fault, key, body, frame)

    def _send_malformed(self, c: _Client, fault: str, key: _Key, body: bytes, frame: bytes) -> None:
        self._malformed_seq += 1
        rng = random.Random(self._malformed_seq)  # deterministic garbage
        if fault == "garbage":
            junk = "".join(rng.choice(string.ascii_letters + "{}[]:,\"'") for _ in range(48))
            self._send(c, ("}{" + junk).encode(), kind="malformed")
        elif fault == "truncated":
            self._send(c, frame[: len(frame) // 2], kind="malformed")
        elif fault == "binary":
            self._send(c, b"\xff\xfe" + rng.randbytes(62), text=False, kind="malformed")
        else:
            mutate = _wrong_types if fault == "wrong_types" else _huge
            bad = orjson.dumps(mutate(orjson.loads(body)))
            if c.combined:
                assert isinstance(key, str)
                bad = b'{"stream":"' + key.encode() + b'","data":' + bad + b"}"
            self._send(c, bad, kind="malformed")

    # ------------------------------------------------------------------ synthesized marks
    async def _marks(self) -> None:
        """markPriceUpdate (Binance) / activeAssetCtx (Hyperliquid) from the current book."""
        assert self._play_evt is not None
        interval = self._mark_interval / (self.speed or 1.0)
        await self._play_evt.wait()
        while True:
            await asyncio.sleep(interval)
            if self._paused or self.finished.is_set():
                continue
            if self.venue == "binance":
                self._emit_mark_prices()
            else:
                self._emit_asset_ctxs()

    def _emit_mark_prices(self) -> None:
        for sym, book in self._books.items():
            with self._book_lock:
                mid = book.mid()
            if mid is None:
                continue
            index = mid / 1.0001
            now_ms = self._venue_ms
            event = {
                "e": "markPriceUpdate",
                "E": now_ms,
                "s": sym.upper(),
                "p": f"{mid:.8f}",
                "i": f"{index:.8f}",
                "P": f"{index:.8f}",
                "r": "0.00010000",
                "T": (now_ms // _FUNDING_PERIOD_MS + 1) * _FUNDING_PERIOD_MS,
            }
            payload = orjson.dumps(event)
            self._dispatch(
                [
                    ("markPrice", f"{sym}@markPrice", payload),
                    ("markPrice", f"{sym}@markPrice@1s", payload),
                ]
            )

    def _emit_asset_ctxs(self) -> None:
        for coin in list(self._coins):
            with self._book_lock:
                ctx = self._hl_ctx(coin)
            if ctx is None:
                continue
            msg = {"channel": "activeAssetCtx", "data": {"coin": coin, "ctx": ctx}}
            self._dispatch([("activeAssetCtx", ("activeAssetCtx", coin), orjson.dumps(msg))])

    @staticmethod
    def _hl_mid(data: dict[str, Any]) -> float | None:
        levels = data.get("levels")
        if not isinstance(levels, list) or len(levels) != 2 or not levels[0] or not levels[1]:
            return None
        return (float(levels[0][0]["px"]) + float(levels[1][0]["px"])) / 2.0

    def _hl_ctx(self, coin: str) -> dict[str, Any] | None:
        """The coin's asset context from its latest book (call under _book_lock)."""
        state = self._coins.get(coin)
        if state is None:
            return None
        mid = self._hl_mid(state.data)
        if mid is None:
            return None
        bids, asks = state.data["levels"]
        dec = _decimals(bids[0]["px"]) + 1
        depth = sum(float(lv["sz"]) for side in (bids, asks) for lv in side)
        return {
            "funding": "0.0000125",
            "openInterest": _fmt(depth * 100.0, 5),  # a placeholder of the right magnitude
            "prevDayPx": _fmt(state.first_mid, dec),
            "dayNtlVlm": _fmt(state.ntl_volume, 2),
            "premium": "0.0001",
            "oraclePx": _fmt(mid / 1.0001, dec),
            "markPx": _fmt(mid, dec),
            "midPx": _fmt(mid, dec),
            "impactPxs": [bids[0]["px"], asks[0]["px"]],
            "dayBaseVlm": _fmt(state.base_volume, 5),
        }

    # ------------------------------------------------------------------ REST
    def _handle_rest(self, h: _RestHandler, method: str) -> None:
        split = urllib.parse.urlsplit(h.path)
        path = split.path
        body = b""
        length = int(h.headers.get("Content-Length") or 0)
        if length > 0:
            body = h.rfile.read(min(length, 1 << 20))
        with self._rest_lock:
            self.rest_requests[path] += 1
            forced = self._forced.popleft() if self._forced else None
            if forced is not None:
                if forced[0] == 429:
                    self.rest_429 += 1
                elif forced[0] == 418:
                    self.rest_418 += 1
        if forced is not None:
            self._forced_reply(h, *forced)
        elif self.venue == "binance":
            self._binance_rest(h, method, path, urllib.parse.parse_qs(split.query))
        else:
            self._hl_rest(h, method, path, body)

    def _prune(self, now: float) -> None:
        while self._window and self._window[0][0] <= now - _WINDOW_S:
            self._used -= self._window.popleft()[1]

    def _used_weight(self) -> int:
        with self._rest_lock:
            self._prune(time.monotonic())
            return self._used

    def _retry_after(self, now: float, weight: int) -> float:
        """Seconds until enough of the window expires for ``weight`` more."""
        excess = self._used + weight - self._weight_limit
        for t, w in self._window:
            excess -= w
            if excess <= 0:
                return max(1.0, t + _WINDOW_S - now)
        return _WINDOW_S

    def _charge(self, weight: int) -> tuple[int, float]:
        """Account ``weight``; return (200, 0) or the refusal (429/418, Retry-After)."""
        with self._rest_lock:
            now = time.monotonic()
            self._prune(now)
            if self.venue == "binance":
                if now < self._ban_until:
                    self.rest_418 += 1
                    return 418, self._ban_until - now
                if now < self._backoff_until:
                    self._ban_until = now + BAN_S
                    self.rest_418 += 1
                    return 418, BAN_S
            if self._used + weight > self._weight_limit:
                retry = self._retry_after(now, weight)
                self._backoff_until = now + retry
                self.rest_429 += 1
                return 429, retry
            self._window.append((now, weight))
            self._used += weight
            return 200, 0.0

    def _forced_reply(self, h: _RestHandler, status: int, retry_after: float) -> None:
        retry = str(max(0, math.ceil(retry_after)))
        if self.venue == "hyperliquid":
            text = b"Too many requests" if status == 429 else HTTPStatus(status).phrase.encode()
            h.reply(status, text, content_type="text/plain", headers=[("Retry-After", retry)])
            return
        self._binance_reply(h, status, self._binance_refusal(status, retry_after), retry=retry)

    def _binance_refusal(self, status: int, retry_after: float) -> dict[str, Any]:
        if status == 429:
            msg = (
                f"Too many requests; current limit of IP(127.0.0.1) is {self._weight_limit} "
                "requests per minute. Please use the websocket for live updates to avoid "
                "polling the API."
            )
            return {"code": -1003, "msg": msg}
        if status == 418:
            until = int((time.time() + retry_after) * 1000)
            msg = (
                f"Way too many requests; IP(127.0.0.1) banned until {until}. Please use the "
                "websocket for live updates to avoid bans."
            )
            return {"code": -1003, "msg": msg}
        return {
            "code": -1001,
            "msg": "Internal error; unable to process your request. Please try again.",
        }

    def _binance_reply(
        self, h: _RestHandler, status: int, doc: Any, *, retry: str | None = None
    ) -> None:
        body = doc if isinstance(doc, bytes) else orjson.dumps(doc)
        headers = [("X-MBX-USED-WEIGHT-1M", str(self._used_weight()))]
        if retry is not None:
            headers.append(("Retry-After", retry))
        h.reply(status, body, headers=headers)

    def _binance_rest(
        self, h: _RestHandler, method: str, path: str, query: dict[str, list[str]]
    ) -> None:
        endpoints = {"/fapi/v1/ping", "/fapi/v1/time", "/fapi/v1/exchangeInfo", "/fapi/v1/depth"}
        if method != "GET" or path not in endpoints:
            h.reply(404, b"Not Found\n", content_type="text/plain")
            return
        limit_text = query.get("limit", ["500"])[0]
        limit = int(limit_text) if limit_text.isdigit() else None
        weight = _DEPTH_WEIGHT.get(limit or 0, 10) if path == "/fapi/v1/depth" else 1
        status, retry_after = self._charge(weight)
        if status != 200:
            refusal = self._binance_refusal(status, retry_after)
            self._binance_reply(h, status, refusal, retry=str(math.ceil(retry_after)))
            return
        if path == "/fapi/v1/ping":
            self._binance_reply(h, 200, {})
        elif path == "/fapi/v1/time":
            self._binance_reply(h, 200, {"serverTime": time.time_ns() // 1_000_000})
        elif path == "/fapi/v1/exchangeInfo":
            self._binance_reply(h, 200, self._fixture)
        else:
            symbol = query.get("symbol", [""])[0].upper()
            if not symbol:
                msg = "Mandatory parameter 'symbol' was not sent, was empty/null, or malformed."
                self._binance_reply(h, 400, {"code": -1102, "msg": msg})
                return
            if limit not in _DEPTH_WEIGHT:
                msg = (
                    "Illegal characters found in parameter 'limit'; legal range is "
                    "'5, 10, 20, 50, 100, 500, 1000'."
                )
                self._binance_reply(h, 400, {"code": -1100, "msg": msg})
                return
            book = self._books.get(symbol.lower())
            if book is None:
                self._binance_reply(h, 400, {"code": -1121, "msg": "Invalid symbol."})
                return
            with self._book_lock:
                doc = book.depth(limit)
            self._binance_reply(h, 200, doc)

    def _hl_rest(self, h: _RestHandler, method: str, path: str, body: bytes) -> None:
        if path != "/info":
            h.reply(404, b"Not Found\n", content_type="text/plain")
            return
        if method != "POST":
            h.reply(405, b"Method Not Allowed\n", content_type="text/plain")
            return
        try:
            req = orjson.loads(body)
        except orjson.JSONDecodeError:
            req = None
        kind = req.get("type") if isinstance(req, dict) else None
        status, _ = self._charge(2 if kind == "l2Book" else 20)
        if status != 200:
            h.reply(429, b"Too many requests", content_type="text/plain")
            return
        bad = b"Failed to deserialize the JSON body into the target type"
        if not isinstance(req, dict):
            h.reply(422, bad, content_type="text/plain")
        elif kind == "meta":
            h.reply(200, self._fixture)
        elif kind == "l2Book":
            coin = req.get("coin")
            if not isinstance(coin, str):
                h.reply(422, bad + b": missing field `coin`", content_type="text/plain")
                return
            with self._book_lock:
                state = self._coins.get(coin)
                doc = orjson.dumps(state.data if state is not None else None)
            h.reply(200, doc)
        elif kind == "metaAndAssetCtxs":
            ctxs = []
            with self._book_lock:
                for u in self._fixture_doc.get("universe", []):
                    name = u.get("name") if isinstance(u, dict) else None
                    ctx = self._hl_ctx(name) if isinstance(name, str) else None
                    ctxs.append(ctx if ctx is not None else _EMPTY_CTX)
            h.reply(200, orjson.dumps([self._fixture_doc, ctxs]))
        else:
            h.reply(422, bad + f": unknown variant `{kind}`".encode(), content_type="text/plain")


_EMPTY_CTX: Final = {
    "funding": "0.0",
    "openInterest": "0.0",
    "prevDayPx": "0.0",
    "dayNtlVlm": "0.0",
    "premium": None,
    "oraclePx": "0.0",
    "markPx": "0.0",
    "midPx": None,
    "impactPxs": None,
    "dayBaseVlm": "0.0",
}


# ---------------------------------------------------------------------- CLI
def _speed_arg(text: str) -> float | None:
    if text == "max":
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number or 'max': {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError("must be > 0")
    return value


def _port_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError("must be 0..65535 (0 picks a free port)")
    return value


def build_parser(prog: str = "python -m ops.fakevenue") -> argparse.ArgumentParser:
    """The CLI's parser (also for ``hft fake-venue``)."""
    p = argparse.ArgumentParser(prog=prog, description=(__doc__ or "").split("\n")[0])
    p.add_argument("--venue", required=True, choices=VENUES)
    p.add_argument("--file", required=True, type=Path, help="recording (.jsonl.gz)")
    p.add_argument(
        "--speed", type=_speed_arg, default=1.0, help="replay speed factor, or 'max' (default 1)"
    )
    p.add_argument("--loop", action="store_true", help="start over at the end of the file")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--ws-port", type=_port_arg, default=0, help="0 picks a free port")
    p.add_argument("--rest-port", type=_port_arg, default=0, help="0 picks a free port")
    return p


def main(argv: list[str] | None = None) -> int:
    """Serve a recording until SIGINT/SIGTERM; 0 on a clean stop, 2 on bad arguments/file."""
    args = build_parser().parse_args(argv)
    try:
        venue = FakeVenue(
            args.venue,
            args.file,
            speed=args.speed,
            host=args.host,
            ws_port=args.ws_port,
            rest_port=args.rest_port,
            loop=args.loop,
        )
    except RecordingError as exc:
        print(f"fake-venue: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"fake-venue: cannot read a fixture: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            venue.start()
        except (OSError, RuntimeError) as exc:
            print(f"fake-venue: cannot listen on {args.host}: {exc}", file=sys.stderr)
            return 2
        ws_feed = venue.ws_url + ("/ws" if args.venue == "hyperliquid" else "")
        speed = "max" if args.speed is None else f"{args.speed:g}x"
        lines = [
            f"fake {args.venue} venue replaying {args.file} at speed {speed}"
            f"{' (looping)' if args.loop else ''}",
            f"websocket: {venue.ws_url}",
            f"rest:      {venue.rest_url}",
            "engine config:",
            "[feed]",
            f'source = "{args.venue}"',
            f'ws_url = "{ws_feed}"',
            f'rest_url = "{venue.rest_url}"',
            f"# recorded symbols: {', '.join(venue.symbols)}",
        ]
        print("\n".join(lines), flush=True)
        while not stop.wait(0.2):
            pass
        return 0
    finally:
        venue.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    raise SystemExit(main())
