"""RestClient against a scripted HTTP server on 127.0.0.1, and Backoff.

What matters most is that the client never sends a request the venue would count against a
ban: the server records every request it receives, so "held back" is checked on the wire, not
on the client's word. Time is a fake clock, so rate-limit windows take no real time.
"""

from __future__ import annotations

import gzip
import random
import socket
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson
import pytest

from stages.venues.rest import Backoff, RateLimited, RestClient, RestError


@dataclass
class Reply:
    status: int = 200
    body: Any = field(default_factory=dict)  # bytes are sent as they are, anything else as JSON
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0  # sleep before answering (cut short when the server stops)


@dataclass
class Seen:
    method: str
    target: str  # path with the query string
    headers: dict[str, str]  # lower-cased names
    body: bytes


class ScriptedServer:
    """An HTTP server that answers from a script (then ``default``) and records requests."""

    def __init__(self) -> None:
        self.replies: deque[Reply] = deque()
        self.default = Reply()
        self.seen: list[Seen] = []
        self._lock = threading.Lock()
        self._release = threading.Event()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._url = ""

    @property
    def url(self) -> str:
        """The server's base URL; still valid after ``stop()`` (then nothing listens there)."""
        return self._url

    def script(self, *replies: Reply) -> None:
        self.replies.extend(replies)

    def _next(self) -> Reply:
        with self._lock:
            return self.replies.popleft() if self.replies else self.default

    def start(self) -> ScriptedServer:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with owner._lock:
                    owner.seen.append(
                        Seen(
                            self.command,
                            self.path,
                            {k.lower(): v for k, v in self.headers.items()},
                            body,
                        )
                    )
                reply = owner._next()
                if reply.delay_s:
                    owner._release.wait(reply.delay_s)
                data = reply.body if isinstance(reply.body, bytes) else orjson.dumps(reply.body)
                try:
                    self.send_response(reply.status)
                    for k, v in reply.headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass  # the client gave up (timeout test)

            do_GET = _serve
            do_POST = _serve

            def log_message(self, format: str, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = False  # server_close() joins the handler threads
            block_on_close = True
            request_queue_size = 64  # the default 5 drops concurrent connects (1 s SYN retry)

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # a client that hung up mid-answer is expected in the timeout test

        self._httpd = Server(("127.0.0.1", 0), Handler)
        host, port = self._httpd.server_address[:2]
        self._url = f"http://{host!s}:{port}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.02,), daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is None:
            return
        self._release.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        assert self._thread is not None
        self._thread.join(5)
        self._httpd = None


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def server() -> Iterator[ScriptedServer]:
    srv = ScriptedServer().start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def closed_port_url() -> str:
    """A URL nothing listens on: bind a port, then free it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def make(url: str, clock: FakeClock, *, budget: int = 1200, timeout_s: float = 2.0) -> RestClient:
    return RestClient(url, venue="binance", weight_per_min=budget, timeout_s=timeout_s, clock=clock)


# ---- plain requests --------------------------------------------------------------------


def test_get_json_sends_the_query_and_parses_the_answer(
    server: ScriptedServer, clock: FakeClock
) -> None:
    server.script(Reply(body={"lastUpdateId": 7, "bids": [["1.5", "2"]]}))
    client = make(server.url, clock)
    got = client.get_json("/fapi/v1/depth", {"symbol": "BTCUSDT", "limit": 5}, weight=2)
    assert got == {"lastUpdateId": 7, "bids": [["1.5", "2"]]}
    assert [(s.method, s.target) for s in server.seen] == [
        ("GET", "/fapi/v1/depth?symbol=BTCUSDT&limit=5")
    ]
    assert (client.requests, client.errors, client.rate_limited, client.used_weight) == (1, 0, 0, 2)


def test_post_json_sends_a_json_body(server: ScriptedServer, clock: FakeClock) -> None:
    server.script(Reply(body={"universe": []}))
    client = RestClient(server.url + "/api/", venue="hyperliquid", weight_per_min=1200, clock=clock)
    assert client.post_json("/info", {"type": "meta"}, weight=20) == {"universe": []}
    (seen,) = server.seen
    assert (seen.method, seen.target) == ("POST", "/api/info")  # base path kept, no "//"
    assert seen.headers["content-type"] == "application/json"
    assert orjson.loads(seen.body) == {"type": "meta"}
    assert client.used_weight == 20


def test_gzip_answer_is_decoded(server: ScriptedServer, clock: FakeClock) -> None:
    server.script(
        Reply(body=gzip.compress(b'{"symbols":[]}'), headers={"Content-Encoding": "gzip"})
    )
    assert make(server.url, clock).get_json("/fapi/v1/exchangeInfo") == {"symbols": []}


# ---- local budget ----------------------------------------------------------------------


def test_local_budget_holds_a_request_back_without_sending_it(
    server: ScriptedServer, clock: FakeClock
) -> None:
    client = make(server.url, clock, budget=10)
    client.get_json("/a", weight=6)
    clock.t += 15
    with pytest.raises(RateLimited) as info:
        client.get_json("/b", weight=5)
    assert info.value.retry_after_s == pytest.approx(45.0)  # when the first 6 age out
    assert info.value.status is None
    assert "budget" in str(info.value) and "/b" in str(info.value)
    assert [s.target for s in server.seen] == ["/a"]  # the server never saw /b
    assert (client.requests, client.rate_limited, client.used_weight) == (1, 1, 6)

    clock.t += 44.9
    with pytest.raises(RateLimited):
        client.get_json("/b", weight=5)
    clock.t += 0.1
    client.get_json("/b", weight=5)
    assert [s.target for s in server.seen] == ["/a", "/b"]
    assert (client.requests, client.rate_limited, client.used_weight) == (2, 2, 5)


def test_local_budget_waits_only_for_as_much_weight_as_needed(
    server: ScriptedServer, clock: FakeClock
) -> None:
    client = make(server.url, clock, budget=10)
    client.get_json("/a", weight=4)  # t=0
    clock.t += 20
    client.get_json("/b", weight=4)  # t=20
    clock.t += 10
    with pytest.raises(RateLimited) as first:
        client.get_json("/c", weight=5)  # 8 used: needs /a to age out, at t=60
    assert first.value.retry_after_s == pytest.approx(30.0)
    with pytest.raises(RateLimited) as both:
        client.get_json("/c", weight=9)  # needs /a and /b gone, at t=80
    assert both.value.retry_after_s == pytest.approx(50.0)
    client.get_json("/c", weight=2)  # fits now: 10 in total
    assert len(server.seen) == 3


def test_weight_above_the_whole_budget_is_a_bug_not_a_wait(
    server: ScriptedServer, clock: FakeClock
) -> None:
    client = make(server.url, clock, budget=10)
    with pytest.raises(ValueError, match="never fit"):
        client.get_json("/a", weight=11)
    assert server.seen == []


# ---- the server's view -----------------------------------------------------------------


def test_server_reported_used_weight_is_respected(server: ScriptedServer, clock: FakeClock) -> None:
    # another process on the same IP used most of the minute's weight
    server.script(Reply(headers={"x-mbx-USED-weight-1m": "1195"}))
    client = make(server.url, clock, budget=1200)
    client.get_json("/a", weight=1)
    assert client.used_weight == 1195
    clock.t += 1
    client.get_json("/b", weight=4)  # 1195 + 4 fits; no header on this answer
    assert client.used_weight == 1199  # the report plus what we sent since
    with pytest.raises(RateLimited) as info:
        client.get_json("/c", weight=2)
    assert info.value.retry_after_s == pytest.approx(59.0)  # the report ages out at t=60
    assert [s.target for s in server.seen] == ["/a", "/b"]
    clock.t += 59
    client.get_json("/c", weight=2)
    assert len(server.seen) == 3


def test_a_lower_server_count_never_lowers_ours(server: ScriptedServer, clock: FakeClock) -> None:
    server.default = Reply(headers={"X-MBX-USED-WEIGHT-1M": "0"})
    client = make(server.url, clock, budget=10)
    client.get_json("/a", weight=6)
    client.get_json("/b", weight=3)
    assert client.used_weight == 9
    with pytest.raises(RateLimited):
        client.get_json("/c", weight=2)
    assert len(server.seen) == 2


# ---- 429 / 418 -------------------------------------------------------------------------


def test_429_refuses_every_request_until_retry_after_has_passed(
    server: ScriptedServer, clock: FakeClock
) -> None:
    server.script(
        Reply(
            status=429,
            headers={"Retry-After": "7"},
            body={"code": -1003, "msg": "Too many requests; current limit is 2400."},
        )
    )
    client = make(server.url, clock)
    with pytest.raises(RateLimited) as info:
        client.get_json("/fapi/v1/depth", {"symbol": "BTCUSDT"})
    err = info.value
    assert (err.status, err.code, err.retry_after_s) == (429, -1003, 7.0)
    assert "429" in str(err) and "-1003" in str(err) and "Too many requests" in str(err)

    clock.t += 6.9
    with pytest.raises(RateLimited) as held:
        client.get_json("/fapi/v1/depth", {"symbol": "ETHUSDT"})
    assert held.value.retry_after_s == pytest.approx(0.1)
    with pytest.raises(RateLimited):
        client.post_json("/other", {"x": 1})  # every request, not only the same path
    assert len(server.seen) == 1

    clock.t += 0.1
    assert client.get_json("/fapi/v1/depth", {"symbol": "ETHUSDT"}) == {}
    assert len(server.seen) == 2
    assert (client.requests, client.rate_limited, client.errors) == (2, 3, 0)


@pytest.mark.parametrize(("status", "default_s"), [(418, 120.0), (429, 60.0)])
def test_rate_limit_answer_without_retry_after_uses_the_venue_default(
    server: ScriptedServer, clock: FakeClock, status: int, default_s: float
) -> None:
    server.script(Reply(status=status, body={"code": -1003, "msg": "Way too many requests"}))
    client = make(server.url, clock)
    with pytest.raises(RateLimited) as info:
        client.get_json("/a")
    assert (info.value.status, info.value.retry_after_s) == (status, default_s)
    clock.t += default_s - 0.5
    with pytest.raises(RateLimited):
        client.get_json("/a")
    assert len(server.seen) == 1
    clock.t += 0.5
    client.get_json("/a")
    assert len(server.seen) == 2


# ---- errors ----------------------------------------------------------------------------


def test_error_names_status_and_venue_code_but_never_the_query(
    server: ScriptedServer, clock: FakeClock
) -> None:
    server.script(Reply(status=400, body={"code": -1121, "msg": "Invalid symbol."}))
    client = make(server.url, clock)
    with pytest.raises(RestError) as info:
        client.get_json("/fapi/v1/order", {"symbol": "NOPE", "signature": "s3cr3t"})
    err = info.value
    assert not isinstance(err, RateLimited)
    text = str(err)
    for part in ("binance", "GET", "/fapi/v1/order", "400", "-1121", "Invalid symbol."):
        assert part in text
    assert "s3cr3t" not in text and "signature" not in text and "NOPE" not in text
    assert (err.status, err.code, err.venue_msg) == (400, -1121, "Invalid symbol.")
    assert (client.errors, client.rate_limited) == (1, 0)


def test_non_json_error_body_is_truncated(server: ScriptedServer, clock: FakeClock) -> None:
    server.script(Reply(status=502, body=b"<html>" + b"bad gateway " * 500 + b"</html>"))
    with pytest.raises(RestError) as info:
        make(server.url, clock).get_json("/a")
    text = str(info.value)
    assert "502" in text and "bad gateway" in text
    assert len(text) < 300


def test_ok_answer_that_is_not_json_is_an_error(server: ScriptedServer, clock: FakeClock) -> None:
    server.script(Reply(body=b"<html>captive portal</html>"))
    client = make(server.url, clock)
    with pytest.raises(RestError, match="not JSON"):
        client.get_json("/a")
    assert client.errors == 1


def test_timeout_is_a_rest_error(server: ScriptedServer, clock: FakeClock) -> None:
    server.script(Reply(delay_s=3.0))
    client = make(server.url, clock, timeout_s=0.2)
    started = time.monotonic()
    with pytest.raises(RestError, match=r"no answer within 0\.2 s") as info:
        client.get_json("/slow", {"symbol": "BTCUSDT"})
    assert time.monotonic() - started < 2.0
    assert "symbol" not in str(info.value)
    assert (client.requests, client.errors) == (1, 1)


def test_connection_refused_is_a_rest_error(clock: FakeClock) -> None:
    client = make(closed_port_url(), clock)
    with pytest.raises(RestError) as info:
        client.get_json("/a")
    assert not isinstance(info.value, RateLimited)
    assert "binance GET /a" in str(info.value)
    assert client.errors == 1


def test_bad_base_url_is_rejected() -> None:
    with pytest.raises(ValueError):
        RestClient("ftp://example.com", venue="x", weight_per_min=10)
    with pytest.raises(ValueError):
        RestClient("http://example.com/?key=1", venue="x", weight_per_min=10)


def test_counters_are_consistent_across_threads(server: ScriptedServer) -> None:
    client = RestClient(server.url, venue="binance", weight_per_min=1000)
    failures: list[BaseException] = []

    def worker() -> None:
        try:
            for _ in range(5):
                client.get_json("/a", weight=3)
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert failures == []
    assert (client.requests, len(server.seen), client.used_weight) == (40, 40, 120)


# ---- Backoff ---------------------------------------------------------------------------


class FixedRandom(random.Random):
    def __init__(self, value: float) -> None:
        super().__init__(0)
        self.value = value

    def random(self) -> float:
        return self.value


def test_backoff_doubles_up_to_the_cap_and_resets() -> None:
    b = Backoff(0.5, 4.0, rng=FixedRandom(0.5))  # factor 1.0: the bare steps
    assert [b.next_delay() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert b.attempts == 6
    b.reset()
    assert (b.next_delay(), b.attempts) == (0.5, 1)


def test_backoff_jitter_bounds() -> None:
    low = Backoff(1.0, 8.0, rng=FixedRandom(0.0))
    assert [low.next_delay() for _ in range(5)] == [0.5, 1.0, 2.0, 4.0, 4.0]
    b = Backoff(1.0, 8.0, rng=random.Random(42))
    delays = []
    for _ in range(200):
        step = b.step_s
        d = b.next_delay()
        assert 0.5 * step <= d < 1.5 * step
        delays.append(d)
        if b.attempts == 6:
            b.reset()
    assert len({round(d, 6) for d in delays}) > 100  # actually jittered, not constant
    assert max(delays) < 12.0


def test_backoff_rejects_bad_bounds() -> None:
    with pytest.raises(ValueError):
        Backoff(0.0, 1.0)
    with pytest.raises(ValueError):
        Backoff(2.0, 1.0)
