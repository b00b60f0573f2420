"""A small, rate-limited JSON-over-HTTP client for venue REST APIs, and a jittered backoff.

Why hand-rolled on ``http.client``: the engine needs a handful of public reads (Binance
``exchangeInfo`` and depth snapshots, Hyperliquid ``POST /info``) and must never get its IP
banned doing them. A ban (Binance answers 418 after ignored 429s) takes the feed down for
minutes to days, which is far worse than one missed snapshot. So every limit is enforced
*before* a byte is sent:

- a local rolling-60-s weight budget (``weight_per_min``): a request that would exceed it is
  held back and ``RateLimited`` says how many seconds until enough weight has aged out;
- the server's own count (Binance ``X-MBX-USED-WEIGHT-1M``, read on every answer): we never
  assume less used weight than the server reported, plus what we sent since (other processes
  on the same IP share that count);
- a 429 or 418 answer: every request is refused locally until its ``Retry-After`` has passed.

``http.client`` rather than ``urllib.request`` because urllib silently honours proxy variables
from the environment and follows redirects; a venue client should do neither. One connection
per request: these calls are rare (startup, resyncs), and a fresh connection cannot be a stale
keep-alive that fails at the worst moment.

Messages never include query strings or headers: once orders are signed, both carry secrets
(signature, API key), and messages end up in logs and on the ops API.
"""

from __future__ import annotations

import email.utils
import gzip
import http.client
import logging
import math
import random
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, Final
from urllib.parse import urlencode, urlsplit

import orjson

logger = logging.getLogger(__name__)

WINDOW_S: Final = 60.0  # the venues count REST weight per minute
USED_WEIGHT_HEADER: Final = "X-MBX-USED-WEIGHT-1M"  # Binance; http.client reads it in any case
DEFAULT_RETRY_AFTER_S: Final = {429: 60.0, 418: 120.0}
BODY_EXCERPT: Final = 200  # characters of a non-JSON error body kept in a message
USER_AGENT: Final = "hft-engine/0.1"


class RestError(Exception):
    """A REST call failed: transport error, timeout, non-2xx answer or unparseable body.

    The message names the venue, method, path (never the query), the HTTP status and the
    venue's own ``code``/``msg`` when the body was JSON, so an operator can act on it without
    a packet capture.
    """

    def __init__(
        self,
        message: str,
        *,
        venue: str = "",
        method: str = "",
        path: str = "",
        status: int | None = None,
        code: object = None,
        venue_msg: str = "",
    ) -> None:
        super().__init__(message)
        self.venue = venue
        self.method = method
        self.path = path
        self.status = status
        self.code = code
        self.venue_msg = venue_msg


class RateLimited(RestError):
    """The request was refused, by the server (429/418) or by us before sending it.

    ``retry_after_s`` is how long to wait before the same request can go out; retrying sooner
    is refused locally without touching the network.
    """

    def __init__(self, message: str, *, retry_after_s: float, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retry_after_s = retry_after_s


def _excerpt(text: str, limit: int = BODY_EXCERPT) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _venue_detail(body: bytes) -> tuple[object, str, str]:
    """Return ``(code, msg, text for the message)`` of an error body.

    Binance errors are ``{"code": -1121, "msg": "Invalid symbol."}``; Hyperliquid often answers
    plain text. Either way the message keeps at most ``BODY_EXCERPT`` characters.
    """
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        doc = None
    if isinstance(doc, dict) and ("code" in doc or "msg" in doc):
        code = doc.get("code")
        msg = _excerpt(str(doc.get("msg", "")))
        return code, msg, f"code={code} msg={msg!r}"
    text = _excerpt(body.decode("utf-8", "replace"))
    return None, "", f"body={text!r}" if text else "empty body"


def _retry_after(value: str | None, status: int) -> float:
    """Seconds from a ``Retry-After`` header (seconds or an HTTP date), else the default."""
    default = DEFAULT_RETRY_AFTER_S.get(status, 60.0)
    if not value:
        return default
    try:
        seconds = float(value.strip())
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError, IndexError):
            return default
    return max(seconds, 0.0) if math.isfinite(seconds) else default


def _used_weight(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        used = int(value.strip())
    except ValueError:
        return None
    return used if used >= 0 else None


def _query_value(v: object) -> str:
    # Binance wants JSON-style booleans in query strings; str(True) would be "True"
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


class RestClient:
    """JSON REST client of one venue with a local weight budget that mirrors the server's.

    Thread-safe: the lock guards the budget and counters only and is never held during I/O, so
    the main thread can read ``used_weight`` while a worker waits on a slow answer. Counters
    are plain ints (``requests`` sent, ``rate_limited`` answers plus local hold-backs,
    ``errors`` for every other failure of a sent request).
    """

    def __init__(
        self,
        base_url: str,
        *,
        venue: str,
        weight_per_min: int,
        timeout_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                f"REST base URL must be http(s)://host[:port][/path], got {base_url!r}"
            )
        if parts.query or parts.fragment:
            raise ValueError("REST base URL must not carry a query or fragment")
        if weight_per_min <= 0:
            raise ValueError(f"weight_per_min must be > 0, got {weight_per_min!r}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
        self.base_url = base_url.rstrip("/")
        self.venue = venue
        self.weight_per_min = weight_per_min
        self.timeout_s = timeout_s
        self._clock = clock
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port
        self._prefix = parts.path.rstrip("/")
        self._lock = threading.Lock()
        self._sent: deque[tuple[float, int]] = deque()  # (send time, weight), oldest first
        self._report: tuple[float, int] | None = None  # (time, server-reported used weight)
        self._blocked_until = -math.inf  # no request before this clock time (429/418)
        self._blocked_status = 0
        self.requests = 0
        self.rate_limited = 0
        self.errors = 0

    # ---- budget ------------------------------------------------------------------------

    @property
    def used_weight(self) -> int:
        """The weight counted against the budget right now: ours, or the server's if higher."""
        with self._lock:
            now = self._clock()
            self._prune(now)
            return self._used_at(now)

    def _prune(self, now: float) -> None:
        while self._sent and self._sent[0][0] + WINDOW_S <= now:
            self._sent.popleft()
        if self._report is not None and self._report[0] + WINDOW_S <= now:
            self._report = None

    def _used_at(self, t: float) -> int:
        """Used weight at time ``t`` (>= now) if nothing more were sent."""
        local = sum(w for s, w in self._sent if s + WINDOW_S > t)
        if self._report is None or self._report[0] + WINDOW_S <= t:
            return local
        at, reported = self._report
        server = reported + sum(w for s, w in self._sent if s > at and s + WINDOW_S > t)
        return max(local, server)

    def _wait_for(self, weight: int, now: float) -> float:
        """Seconds from ``now`` until ``weight`` more fits in the budget (0: it fits now).

        The used weight only drops when a sent request or the server's report ages out of the
        window, so those instants are the only candidates; one pass over them in time order,
        with running sums, keeps this linear in the number of requests in the window.
        """
        limit = self.weight_per_min
        sent = list(self._sent)
        report = self._report
        total = sum(w for _, w in sent)
        after_report = 0 if report is None else sum(w for s, w in sent if s > report[0])
        candidates = sorted(
            {now, *(s + WINDOW_S for s, _ in sent)}
            | ({report[0] + WINDOW_S} if report is not None else set())
        )
        i = freed = freed_after_report = 0
        for t in candidates:
            while i < len(sent) and sent[i][0] + WINDOW_S <= t:
                freed += sent[i][1]
                if report is not None and sent[i][0] > report[0]:
                    freed_after_report += sent[i][1]
                i += 1
            used = total - freed
            if report is not None and t < report[0] + WINDOW_S:
                used = max(used, report[1] + after_report - freed_after_report)
            if used + weight <= limit:
                return t - now
        return WINDOW_S  # unreachable while weight <= limit: everything has aged out by then

    def _admit(self, method: str, path: str, weight: int) -> None:
        """Reserve ``weight`` for a request about to be sent, or raise ``RateLimited``."""
        if isinstance(weight, bool) or not isinstance(weight, int) or weight < 0:
            raise ValueError(f"weight must be an integer >= 0, got {weight!r}")
        if weight > self.weight_per_min:
            raise ValueError(
                f"weight {weight} can never fit the budget of {self.weight_per_min} per minute"
            )
        where = {"venue": self.venue, "method": method, "path": path}
        with self._lock:
            now = self._clock()
            self._prune(now)
            if now < self._blocked_until:
                wait = self._blocked_until - now
                self.rate_limited += 1
                raise RateLimited(
                    f"{self.venue} {method} {path} not sent: the venue answered "
                    f"{self._blocked_status} (rate limit), requests are held for {wait:.1f} s more",
                    retry_after_s=wait,
                    **where,
                )
            wait = self._wait_for(weight, now)
            if wait > 0:
                self.rate_limited += 1
                raise RateLimited(
                    f"{self.venue} {method} {path} not sent: weight {weight} would exceed the "
                    f"budget of {self.weight_per_min}/min ({self._used_at(now)} used); "
                    f"retry in {wait:.1f} s",
                    retry_after_s=wait,
                    **where,
                )
            self._sent.append((now, weight))
            self.requests += 1

    # ---- requests ----------------------------------------------------------------------

    def get_json(
        self, path: str, params: Mapping[str, object] | None = None, *, weight: int = 1
    ) -> Any:
        """GET ``path`` with ``params`` as the query string; return the parsed JSON body."""
        query = urlencode([(k, _query_value(v)) for k, v in params.items()]) if params else ""
        return self._call("GET", path, query, None, weight)

    def post_json(self, path: str, body: Any, *, weight: int = 1) -> Any:
        """POST ``body`` as JSON to ``path``; return the parsed JSON answer."""
        return self._call("POST", path, "", orjson.dumps(body), weight)

    def _call(self, method: str, path: str, query: str, body: bytes | None, weight: int) -> Any:
        if not path.startswith("/"):
            raise ValueError(f"path must start with '/', got {path!r}")
        self._admit(method, path, weight)
        where: dict[str, Any] = {"venue": self.venue, "method": method, "path": path}
        target = self._prefix + path + ("?" + query if query else "")
        try:
            status, headers, data = self._send(method, target, body)
        except TimeoutError as exc:
            self._count_error()
            raise RestError(
                f"{self.venue} {method} {path}: no answer within {self.timeout_s:g} s", **where
            ) from exc
        except (OSError, http.client.HTTPException) as exc:
            self._count_error()
            reason = str(exc) or type(exc).__name__
            raise RestError(f"{self.venue} {method} {path}: {reason}", **where) from exc

        used = _used_weight(headers.get(USED_WEIGHT_HEADER))
        wait = 0.0
        with self._lock:
            now = self._clock()
            if used is not None:
                self._report = (now, used)
            if status in (429, 418):
                wait = _retry_after(headers.get("Retry-After"), status)
                if now + wait > self._blocked_until:
                    self._blocked_until = now + wait
                    self._blocked_status = status
                self.rate_limited += 1
            elif not 200 <= status < 300:
                self.errors += 1

        if not 200 <= status < 300:
            code, venue_msg, detail = _venue_detail(data)
            message = f"{self.venue} {method} {path}: HTTP {status}, {detail}"
            if status in (429, 418):
                logger.warning(
                    "venue rate limit answer; requests held back",
                    extra={**where, "status": status, "retry_after_s": wait},
                )
                raise RateLimited(
                    f"{message}; requests held for {wait:g} s",
                    retry_after_s=wait,
                    status=status,
                    code=code,
                    venue_msg=venue_msg,
                    **where,
                )
            raise RestError(message, status=status, code=code, venue_msg=venue_msg, **where)
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            self._count_error()
            raise RestError(
                f"{self.venue} {method} {path}: HTTP {status} but the body is not JSON "
                f"({exc.msg}; {len(data)} bytes)",
                status=status,
                **where,
            ) from None

    def _count_error(self) -> None:
        with self._lock:
            self.errors += 1

    def _send(
        self, method: str, target: str, body: bytes | None
    ) -> tuple[int, http.client.HTTPMessage, bytes]:
        """One request on a fresh connection; returns status, headers and the decoded body."""
        conn: http.client.HTTPConnection
        if self._https:
            conn = http.client.HTTPSConnection(self._host, self._port, timeout=self.timeout_s)
        else:
            conn = http.client.HTTPConnection(self._host, self._port, timeout=self.timeout_s)
        headers = {
            "Accept": "application/json",
            "Accept-Encoding": "gzip",  # Binance exchangeInfo is ~1 MB of JSON, ~10x smaller
            "User-Agent": USER_AGENT,
            "Connection": "close",
        }
        if body is not None:
            headers["Content-Type"] = "application/json"
        try:
            conn.request(method, target, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            if resp.getheader("Content-Encoding", "").lower() == "gzip":
                try:
                    data = gzip.decompress(data)
                except (OSError, EOFError, zlib.error) as exc:
                    raise http.client.HTTPException(f"bad gzip body: {exc}") from exc
            return resp.status, resp.headers, data
        finally:
            conn.close()


class Backoff:
    """Exponential backoff with jitter, for reconnects and snapshot retries.

    Each ``next_delay()`` is the current step times a factor drawn from [0.5, 1.5), then the
    step doubles up to ``max_s``. The jitter spreads the retries of many clients (or many
    streams of one engine) so they do not hit the venue in lockstep after an outage; the
    step never exceeds ``max_s``, so a delay is always below ``1.5 * max_s``. ``reset()``
    after a success starts again from ``base_s``.
    """

    def __init__(self, base_s: float, max_s: float, *, rng: random.Random | None = None) -> None:
        if not (math.isfinite(base_s) and base_s > 0):
            raise ValueError(f"base_s must be > 0, got {base_s!r}")
        if not (math.isfinite(max_s) and max_s >= base_s):
            raise ValueError(f"max_s must be >= base_s ({base_s!r}), got {max_s!r}")
        self.base_s = base_s
        self.max_s = max_s
        self._rng = rng if rng is not None else random.Random()
        self._step = base_s
        self.attempts = 0  # delays handed out since the last reset

    @property
    def step_s(self) -> float:
        """The un-jittered step the next delay is drawn around."""
        return self._step

    def next_delay(self) -> float:
        delay = self._step * (0.5 + self._rng.random())
        self._step = min(self._step * 2.0, self.max_s)
        self.attempts += 1
        return delay

    def reset(self) -> None:
        self._step = self.base_s
        self.attempts = 0
