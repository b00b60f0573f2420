"""The fake venues over real sockets: routing, book consistency, faults, keepalive, REST, CLI.

Each test starts its own ``FakeVenue`` on ephemeral 127.0.0.1 ports (the playback position is
shared by all clients of a venue, so tests must not share one) and talks to it with
websocket-client and urllib, as an engine would. Replay runs at 10-50x or flat out, so the
25-second recordings last about a second; timing bounds are loose.
"""

from __future__ import annotations

import gzip
import itertools
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import orjson
import pytest
import websocket

from ops.fakevenue import FakeVenue, main

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "tests" / "data"
BINANCE = DATA / "binance-usdm-btcusdt-20240808-excerpt.jsonl.gz"
HYPERLIQUID = DATA / "hyperliquid-btc-20250126.jsonl.gz"


# ---------------------------------------------------------------------- helpers
@contextmanager
def running(venue: str, recording: Path, **kw: Any) -> Iterator[FakeVenue]:
    fv = FakeVenue(venue, recording, **kw)
    fv.start()
    try:
        yield fv
    finally:
        fv.stop()


@contextmanager
def connect(url: str) -> Iterator[websocket.WebSocket]:
    ws = websocket.create_connection(url, timeout=5)
    try:
        yield ws
    finally:
        with suppress(Exception):
            ws.close(timeout=0.5)
        ws.shutdown()


def recv_frame(ws: websocket.WebSocket, timeout: float = 5.0) -> tuple[int, bytes]:
    """The next data or close frame (pings are answered by websocket-client underneath).

    On a close frame the socket is closed too, as a client does once it has answered the
    close: the server otherwise waits its close timeout for the TCP end.
    """
    ws.settimeout(timeout)
    while True:
        opcode, frame = ws.recv_data_frame(control_frame=True)
        if opcode in (websocket.ABNF.OPCODE_TEXT, websocket.ABNF.OPCODE_BINARY):
            return opcode, frame.data
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            ws.shutdown()
            return opcode, frame.data


def recv_json(ws: websocket.WebSocket, timeout: float = 5.0) -> Any:
    opcode, data = recv_frame(ws, timeout)
    assert opcode == websocket.ABNF.OPCODE_TEXT, (opcode, data[:100])
    return orjson.loads(data)


def recv_until(ws: websocket.WebSocket, pred: Callable[[Any], bool], limit: int = 20000) -> Any:
    for _ in range(limit):
        msg = recv_json(ws)
        if pred(msg):
            return msg
    raise AssertionError("expected message not received")


def frames_for(ws: websocket.WebSocket, seconds: float) -> list[tuple[int, bytes]]:
    """Every data frame that arrives within ``seconds``."""
    out: list[tuple[int, bytes]] = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            out.append(recv_frame(ws, max(left, 0.01)))
        except websocket.WebSocketTimeoutException:
            break
    return out


def until_quiet(ws: websocket.WebSocket, quiet: float = 0.3) -> list[tuple[int, bytes]]:
    """Every data frame until none has come for ``quiet`` seconds."""
    out: list[tuple[int, bytes]] = []
    while True:
        try:
            out.append(recv_frame(ws, quiet))
        except websocket.WebSocketTimeoutException:
            return out


def close_code(data: bytes) -> int:
    return int(struct.unpack("!H", data[:2])[0]) if len(data) >= 2 else 1005


def http(url: str, body: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, data=body, method="POST" if body is not None else "GET")
    if body is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, dict(err.headers), err.read()


def rest_json(url: str, body: bytes | None = None) -> Any:
    status, _, data = http(url, body)
    assert status == 200, (status, data)
    return orjson.loads(data)


def wait_until(pred: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.01)
    return pred()


def recorded_diffs() -> list[dict[str, Any]]:
    out = []
    with gzip.open(BINANCE, "rb") as f:
        for line in f:
            obj = orjson.loads(line.partition(b" ")[2])
            if obj.get("stream", "").startswith("btcusdt@depth"):
                out.append(obj["data"])
    return out


def recorded_hl() -> list[dict[str, Any]]:
    with gzip.open(HYPERLIQUID, "rb") as f:
        return [orjson.loads(line.partition(b" ")[2]) for line in f]


class LocalBook:
    """A client's book, kept with the venue's documented rule."""

    def __init__(self, snap: dict[str, Any]) -> None:
        self.bids = {float(p): q for p, q in snap["bids"]}
        self.asks = {float(p): q for p, q in snap["asks"]}
        self.snapshot_id = snap["lastUpdateId"]
        self.prev_u: int | None = None
        self.applied = 0

    def on_diff(self, d: dict[str, Any]) -> None:
        if d["u"] < self.snapshot_id:
            return  # older than the snapshot
        if self.prev_u is None:
            assert d["U"] <= self.snapshot_id <= d["u"], (d["U"], self.snapshot_id, d["u"])
        else:
            assert d["pu"] == self.prev_u, "sequence gap"
        for levels, side in ((d["b"], self.bids), (d["a"], self.asks)):
            for p, q in levels:
                if float(q) == 0:
                    side.pop(float(p), None)
                else:
                    side[float(p)] = q
        self.prev_u = d["u"]
        self.applied += 1

    def top(self, n: int) -> tuple[list[tuple[float, str]], list[tuple[float, str]]]:
        return sorted(self.bids.items(), reverse=True)[:n], sorted(self.asks.items())[:n]


def snapshot_top(snap: dict[str, Any], n: int) -> tuple[list[Any], list[Any]]:
    return (
        [(float(p), q) for p, q in snap["bids"][:n]],
        [(float(p), q) for p, q in snap["asks"][:n]],
    )


# ---------------------------------------------------------------------- Binance streams
def test_binance_routing_public_and_market() -> None:
    public = "/public/stream?streams=btcusdt@depth@100ms/btcusdt@bookTicker/btcusdt@markPrice"
    market = "/market/stream?streams=btcusdt@aggTrade/btcusdt@markPrice@1s"
    with (
        running("binance", BINANCE, speed=20, mark_interval_s=0.5) as fv,
        connect(fv.ws_url + public) as pub,
        connect(fv.ws_url + market) as mkt,
    ):
        pub_msgs = [orjson.loads(d) for _, d in frames_for(pub, 0.8)]
        mkt_msgs = [orjson.loads(d) for _, d in frames_for(mkt, 0.3)]
        assert fv.subscriptions == {
            "btcusdt@depth@100ms",
            "btcusdt@bookTicker",
            "btcusdt@markPrice",
            "btcusdt@aggTrade",
            "btcusdt@markPrice@1s",
        }
        assert fv.connections == 2
    pub_streams = {m["stream"] for m in pub_msgs}
    assert pub_streams == {"btcusdt@depth@100ms", "btcusdt@bookTicker"}  # markPrice: wrong path
    depth = [m["data"] for m in pub_msgs if m["stream"] == "btcusdt@depth@100ms"]
    assert len(depth) > 20 and all(d["e"] == "depthUpdate" for d in depth)
    assert all(b["pu"] == a["u"] for a, b in itertools.pairwise(depth))
    mkt_streams = {m["stream"] for m in mkt_msgs}
    assert mkt_streams == {"btcusdt@aggTrade", "btcusdt@markPrice@1s"}
    agg = next(m["data"] for m in mkt_msgs if m["stream"] == "btcusdt@aggTrade")
    assert list(agg) == ["e", "E", "a", "s", "p", "q", "f", "l", "T", "m"]
    assert agg["e"] == "aggTrade" and agg["a"] == agg["f"] == agg["l"] and agg["s"] == "BTCUSDT"
    mark = next(m["data"] for m in mkt_msgs if m["stream"] == "btcusdt@markPrice@1s")
    assert mark["e"] == "markPriceUpdate" and mark["s"] == "BTCUSDT" and mark["r"] == "0.00010000"
    assert 61000 < float(mark["p"]) < 63000 and float(mark["i"]) < float(mark["p"])
    assert mark["T"] % (8 * 3600 * 1000) == 0 and mark["T"] > mark["E"]


def test_binance_raw_ws_and_method_frames() -> None:
    with running("binance", BINANCE, speed=20) as fv, connect(fv.ws_url + "/public/ws") as ws:
        ws.send(b'{"method":"SUBSCRIBE","params":["btcusdt@bookTicker"],"id":1}')
        assert recv_json(ws) == {"result": None, "id": 1}
        ticker = recv_json(ws)
        assert ticker["e"] == "bookTicker" and "stream" not in ticker  # raw, unwrapped
        ws.send(b'{"method":"LIST_SUBSCRIPTIONS","id":2}')
        assert recv_until(ws, lambda m: m.get("id") == 2) == {
            "result": ["btcusdt@bookTicker"],
            "id": 2,
        }
        ws.send(b"this is not json")
        err = recv_until(ws, lambda m: "error" in m)
        assert err["error"]["code"] == 3 and err["id"] is None
        ws.send(b'{"method":"FLY","params":[],"id":5}')
        err = recv_until(ws, lambda m: "error" in m)
        assert err["error"]["code"] == 2 and err["id"] == 5 and "FLY" in err["error"]["msg"]
        ws.send(b'{"method":"SUBSCRIBE","params":"btcusdt@trade","id":6}')
        err = recv_until(ws, lambda m: "error" in m)
        assert err["error"]["code"] == 2 and err["id"] == 6
        ws.send(b'{"method":"UNSUBSCRIBE","params":["btcusdt@bookTicker"],"id":7}')
        recv_until(ws, lambda m: m.get("id") == 7)
        after = frames_for(ws, 0.3)
        assert after == []  # nothing after the unsubscribe was acknowledged
        assert fv.subscriptions == set()


def test_binance_unknown_path_is_rejected() -> None:
    with running("binance", BINANCE, speed=20) as fv:
        with pytest.raises(websocket.WebSocketBadStatusException) as exc:
            websocket.create_connection(fv.ws_url + "/futures/stream", timeout=5)
        assert exc.value.status_code == 404
        assert fv.connects_total == 0


def test_snapshot_plus_diffs_matches_later_snapshot() -> None:
    depth_url = "/fapi/v1/depth?symbol=BTCUSDT&limit=1000"
    with (
        running("binance", BINANCE, speed=20) as fv,
        connect(fv.ws_url + "/public/stream?streams=btcusdt@depth@0ms") as ws,
    ):
        first = rest_json(fv.rest_url + depth_url)
        book = LocalBook(first)
        deadline = time.monotonic() + 0.6
        while time.monotonic() < deadline:
            book.on_diff(recv_json(ws)["data"])
        fv.pause()
        later = rest_json(fv.rest_url + depth_url)
        assert later["lastUpdateId"] == fv.last_update_id > first["lastUpdateId"]
        while book.prev_u != later["lastUpdateId"]:
            book.on_diff(recv_json(ws, timeout=2)["data"])
        assert book.applied > 20
        assert book.top(20) == snapshot_top(later, 20)
        assert frames_for(ws, 0.2) == []  # paused: nothing more


def test_gap_shows_as_pu_mismatch_and_resync_works() -> None:
    diffs = recorded_diffs()
    index_of = {d["u"]: i for i, d in enumerate(diffs)}
    depth_url = "/fapi/v1/depth?symbol=BTCUSDT&limit=1000"
    with (
        running("binance", BINANCE, speed=20) as fv,
        connect(fv.ws_url + "/public/ws/btcusdt@depth") as ws,
    ):
        before = recv_json(ws)
        for _ in range(2):
            before = recv_json(ws)
        fv.gap(2)
        while (after := recv_json(ws))["pu"] == before["u"]:
            before = after
        assert index_of[after["u"]] == index_of[before["u"]] + 3  # exactly two withheld
        # resync as documented, keeping the stream (and the diff that showed the gap): the
        # venue's book applied the withheld diffs, so snapshot + diffs continue cleanly
        book = LocalBook(rest_json(fv.rest_url + depth_url))
        book.on_diff(after)
        while book.applied < 10:
            book.on_diff(recv_json(ws))
        fv.pause()
        later = rest_json(fv.rest_url + depth_url)
        while book.prev_u != later["lastUpdateId"]:
            book.on_diff(recv_json(ws, timeout=2))
        assert book.top(20) == snapshot_top(later, 20)


def test_loop_restarts_and_update_ids_jump_back() -> None:
    with (
        running("binance", BINANCE, speed=None, loop=True) as fv,
        connect(fv.ws_url + "/public/ws/btcusdt@depth@0ms") as ws,
    ):
        prev = recv_json(ws)["u"]
        for _ in range(5000):
            u = recv_json(ws)["u"]
            if u < prev:
                break
            prev = u
        else:
            raise AssertionError("update ids never jumped back")
        assert fv.loops >= 1 and not fv.finished.is_set()


def test_finish_without_loop_stays_connected_and_silent() -> None:
    with running("binance", BINANCE, speed=None) as fv, connect(fv.ws_url + "/ws") as ws:
        ws.send(b'{"method":"SUBSCRIBE","params":["btcusdt@trade"],"id":1}')
        assert fv.finished.wait(10)
        assert fv.position == 6000
        msgs = [orjson.loads(d) for _, d in until_quiet(ws)]
        assert msgs[0] == {"result": None, "id": 1}
        assert all(m["e"] == "trade" for m in msgs[1:])
        assert len(msgs) - 1 == fv.sent["trade"] == 912  # every recorded trade, once
        ws.send(b'{"method":"LIST_SUBSCRIPTIONS","id":2}')
        assert recv_json(ws) == {"result": ["btcusdt@trade"], "id": 2}
        assert frames_for(ws, 0.3) == []


def test_pause_and_resume() -> None:
    with (
        running("binance", BINANCE, speed=10) as fv,
        connect(fv.ws_url + "/public/ws/btcusdt@bookTicker") as ws,
    ):
        recv_json(ws)
        fv.pause()
        pos = fv.position
        frames_for(ws, 0.1)  # what was already in flight
        assert frames_for(ws, 0.3) == []
        assert fv.position == pos
        fv.resume()
        assert recv_json(ws, timeout=2)["e"] == "bookTicker"
        assert wait_until(lambda: fv.position > pos)


# ---------------------------------------------------------------------- faults
def test_disconnect_by_path_clean_then_all_unclean() -> None:
    with (
        running("binance", BINANCE, speed=20) as fv,
        connect(fv.ws_url + "/public/ws/btcusdt@bookTicker") as pub,
        connect(fv.ws_url + "/market/ws/btcusdt@aggTrade") as mkt,
    ):
        assert wait_until(lambda: fv.connections == 2)
        assert fv.disconnect("/market", clean=True) == 1
        while True:
            opcode, data = recv_frame(mkt)
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                break
        assert close_code(data) == 1000
        assert wait_until(lambda: fv.connections == 1)
        pub.send(b'{"method":"LIST_SUBSCRIPTIONS","id":3}')
        assert recv_until(pub, lambda m: m.get("id") == 3)["result"] == ["btcusdt@bookTicker"]
        assert fv.disconnect() == 1
        with pytest.raises((websocket.WebSocketConnectionClosedException, OSError)):
            for _ in range(100000):  # drain what was sent before the abort, then the EOF
                opcode, data = recv_frame(pub, timeout=2)
                assert opcode != websocket.ABNF.OPCODE_CLOSE, "aborted: no close frame expected"
        assert wait_until(lambda: fv.connections == 0)
        assert fv.connects_total == 2


def test_silence_keeps_connection_and_control_traffic() -> None:
    with (
        running("binance", BINANCE, speed=10) as fv,
        connect(fv.ws_url + "/public/ws/btcusdt@bookTicker") as ws,
    ):
        recv_json(ws)
        fv.silence(0.8)
        pos = fv.position
        ws.send(b'{"method":"LIST_SUBSCRIPTIONS","id":9}')
        recv_until(ws, lambda m: m.get("id") == 9)  # frames before the marker were in flight
        ws.ping(b"hi")
        ws.settimeout(2)
        opcode, frame = ws.recv_data_frame(control_frame=True)
        assert opcode == websocket.ABNF.OPCODE_PONG and frame.data == b"hi"
        assert frames_for(ws, 0.4) == []
        assert fv.position > pos  # playback moved on meanwhile
        assert fv.connections == 1
        assert recv_json(ws, timeout=2)["e"] == "bookTicker"  # back after the silence


@pytest.mark.parametrize("kind", ["garbage", "truncated", "wrong_types", "binary", "huge"])
def test_malformed_kinds(kind: str) -> None:
    prefix = b'{"stream":"btcusdt@bookTicker","data":{'
    with (
        running("binance", BINANCE, speed=20) as fv,
        connect(fv.ws_url + "/public/stream?streams=btcusdt@bookTicker") as ws,
    ):
        recv_json(ws)
        fv.malformed(1, kind)
        got = [recv_frame(ws, timeout=2) for _ in range(60)]
        assert fv.sent["malformed"] == 1
    bad = []
    for opcode, data in got:
        try:
            assert opcode == websocket.ABNF.OPCODE_TEXT
            msg = orjson.loads(data)
            float(msg["data"]["b"])
            assert float(msg["data"]["a"]) < 1e300 and isinstance(msg["data"]["u"], int)
        except (AssertionError, orjson.JSONDecodeError, TypeError, ValueError):
            bad.append((opcode, data))
    assert len(bad) == 1
    opcode, data = bad[0]
    if kind == "binary":
        assert opcode == websocket.ABNF.OPCODE_BINARY
        return
    assert opcode == websocket.ABNF.OPCODE_TEXT
    if kind in ("garbage", "truncated"):
        with pytest.raises(orjson.JSONDecodeError):
            orjson.loads(data)
        assert data.startswith(prefix) == (kind == "truncated")
    elif kind == "wrong_types":
        event = orjson.loads(data)["data"]
        assert event["e"] == "bookTicker" and event["u"] == "notanumber"
        assert isinstance(event["b"], list)
    else:
        event = orjson.loads(data)["data"]
        assert float(event["b"]) == float(event["A"]) == 1e308


def test_malformed_depth_diff_is_also_a_gap() -> None:
    with (
        running("binance", BINANCE, speed=20) as fv,
        connect(fv.ws_url + "/public/ws/btcusdt@depth@0ms") as ws,
    ):
        prev = recv_json(ws)
        fv.malformed(1, "truncated")
        breaks = 0
        for _ in range(20):
            _, data = recv_frame(ws)
            try:
                diff = orjson.loads(data)
            except orjson.JSONDecodeError:
                continue
            breaks += diff["pu"] != prev["u"]
            prev = diff
        assert breaks == 1 and fv.sent["malformed"] == 1


# ---------------------------------------------------------------------- keepalive, age
def test_server_pings_and_counts_pongs() -> None:
    with running("binance", BINANCE, ping_interval_s=0.1) as fv, connect(fv.ws_url + "/ws") as ws:
        pings = 0
        ws.settimeout(0.05)
        deadline = time.monotonic() + 0.7
        while time.monotonic() < deadline:
            with suppress(websocket.WebSocketTimeoutException):
                opcode, _ = ws.recv_data_frame(control_frame=True)  # answers each ping
                pings += opcode == websocket.ABNF.OPCODE_PING
        assert pings >= 4
        assert wait_until(lambda: fv.pongs_received >= pings)
        assert fv.connections == 1


def test_pong_timeout_closes_a_client_that_never_answers() -> None:
    with (
        running("binance", BINANCE, ping_interval_s=0.1, pong_timeout_s=0.6) as fv,
        connect(fv.ws_url + "/ws") as ws,
    ):
        assert ws.connected
        assert wait_until(lambda: fv.connections == 1)
        time.sleep(0.2)
        assert fv.connections == 1  # not yet
        assert wait_until(lambda: fv.connections == 0, timeout=4)
        assert fv.pongs_received == 0


def test_pong_timeout_closes_a_stuck_client_with_a_full_buffer() -> None:
    """A client that stopped reading has a backlog; the close must not wait for it to drain."""
    streams = "btcusdt@depth/btcusdt@bookTicker/btcusdt@trade"
    with running(
        "binance", BINANCE, speed=None, loop=True, ping_interval_s=0.1, pong_timeout_s=0.5
    ) as fv:
        # a small receive buffer, so the backlog sits in the server's write buffer at once
        ws = websocket.create_connection(
            fv.ws_url + "/public/stream?streams=" + streams,
            timeout=5,
            sockopt=((socket.SOL_SOCKET, socket.SO_RCVBUF, 4096),),
        )
        try:
            assert wait_until(lambda: fv.connects_total == 1)
            t0 = time.monotonic()
            assert wait_until(lambda: fv.connections == 0, timeout=4)
            assert time.monotonic() - t0 >= 0.3
            assert fv.sent["bookTicker"] > 1000
        finally:
            ws.shutdown()


def test_max_connection_age_closes_normally() -> None:
    with (
        running("binance", BINANCE, max_connection_age_s=0.3) as fv,
        connect(fv.ws_url + "/public/ws") as ws,
    ):
        t0 = time.monotonic()
        opcode, data = recv_frame(ws, timeout=3)
        assert opcode == websocket.ABNF.OPCODE_CLOSE and close_code(data) == 1000
        assert 0.25 <= time.monotonic() - t0 < 3
        assert wait_until(lambda: fv.connections == 0)


# ---------------------------------------------------------------------- Binance REST
def test_binance_rest_endpoints(tmp_path: Path) -> None:
    info = tmp_path / "info.json"
    info.write_bytes(b'{"symbols":[{"symbol":"BTCUSDT"}],"marker":1}')
    with running("binance", BINANCE, speed=20, exchange_info=info) as fv:
        status, headers, body = http(fv.rest_url + "/fapi/v1/depth?symbol=BTCUSDT&limit=5")
        snap = orjson.loads(body)
        assert status == 200 and headers["X-MBX-USED-WEIGHT-1M"] == "2"
        assert list(snap) == ["lastUpdateId", "E", "T", "bids", "asks"]
        assert len(snap["bids"]) == len(snap["asks"]) == 5
        bids = [float(p) for p, _ in snap["bids"]]
        asks = [float(p) for p, _ in snap["asks"]]
        assert bids == sorted(bids, reverse=True) and asks == sorted(asks) and bids[0] < asks[0]
        assert all(isinstance(p, str) and isinstance(q, str) for p, q in snap["bids"])
        assert snap["lastUpdateId"] == fv.last_update_id
        status, headers, body = http(fv.rest_url + "/fapi/v1/depth?symbol=btcusdt")
        assert len(orjson.loads(body)["bids"]) == 500
        assert headers["X-MBX-USED-WEIGHT-1M"] == "12"  # 2 + 10 (limit 500)
        for query, code in (
            ("symbol=ETHUSDX", -1121),
            ("symbol=BTCUSDT&limit=7", -1100),
            ("symbol=BTCUSDT&limit=abc", -1100),
            ("limit=5", -1102),
        ):
            status, headers, body = http(fv.rest_url + "/fapi/v1/depth?" + query)
            assert status == 400 and orjson.loads(body)["code"] == code, query
            assert "X-MBX-USED-WEIGHT-1M" in headers
        assert rest_json(fv.rest_url + "/fapi/v1/exchangeInfo")["marker"] == 1
        assert rest_json(fv.rest_url + "/fapi/v1/ping") == {}
        server_ms = rest_json(fv.rest_url + "/fapi/v1/time")["serverTime"]
        assert abs(server_ms - time.time() * 1000) < 5000
        assert http(fv.rest_url + "/fapi/v2/nothing")[0] == 404
        assert fv.rest_requests["/fapi/v1/depth"] == 6 and fv.rest_requests["/fapi/v1/ping"] == 1


def test_binance_default_exchange_info_is_the_fixture() -> None:
    with running("binance", BINANCE) as fv:
        info = rest_json(fv.rest_url + "/fapi/v1/exchangeInfo")
    expected = orjson.loads((DATA / "binance-exchangeinfo.json").read_bytes())
    assert info == expected


def test_injected_rate_limit() -> None:
    with running("binance", BINANCE) as fv:
        fv.rate_limit(2)
        for _ in range(2):
            status, headers, body = http(fv.rest_url + "/fapi/v1/ping")
            assert status == 429 and headers["Retry-After"] == "1"
            assert orjson.loads(body)["code"] == -1003
        assert http(fv.rest_url + "/fapi/v1/ping")[0] == 200
        fv.rate_limit(1, status=503, retry_after_s=3)
        status, headers, _ = http(fv.rest_url + "/fapi/v1/ping")
        assert status == 503 and headers["Retry-After"] == "3"
        assert http(fv.rest_url + "/fapi/v1/ping")[0] == 200
        assert fv.rest_429 == 2 and fv.rest_418 == 0


def test_weight_budget_429_then_418_when_hammering() -> None:
    url = "/fapi/v1/depth?symbol=BTCUSDT&limit=1000"  # weight 20
    with running("binance", BINANCE, weight_limit_per_min=50) as fv:
        used = [http(fv.rest_url + url)[1]["X-MBX-USED-WEIGHT-1M"] for _ in range(2)]
        assert used == ["20", "40"]
        status, headers, body = http(fv.rest_url + url)
        assert status == 429 and orjson.loads(body)["code"] == -1003
        retry_429 = int(headers["Retry-After"])
        assert 1 <= retry_429 <= 60
        status, headers, body = http(fv.rest_url + "/fapi/v1/ping")  # ignores the back-off
        assert status == 418 and "banned" in orjson.loads(body)["msg"]
        assert int(headers["Retry-After"]) > retry_429
        assert http(fv.rest_url + "/fapi/v1/ping")[0] == 418  # still banned
        assert fv.rest_429 == 1 and fv.rest_418 == 2


# ---------------------------------------------------------------------- Hyperliquid
def hl_sub(kind: str, coin: str | None = "BTC", method: str = "subscribe") -> bytes:
    sub: dict[str, Any] = {"type": kind}
    if coin is not None:
        sub["coin"] = coin
    return orjson.dumps({"method": method, "subscription": sub})


def test_hyperliquid_subscribe_ack_pong_and_errors() -> None:
    with running("hyperliquid", HYPERLIQUID, speed=20) as fv, connect(fv.ws_url + "/ws") as ws:
        ws.send(hl_sub("l2Book"))
        assert recv_json(ws) == {
            "channel": "subscriptionResponse",
            "data": {"method": "subscribe", "subscription": {"type": "l2Book", "coin": "BTC"}},
        }
        book = recv_until(ws, lambda m: m["channel"] == "l2Book")
        assert book["data"]["coin"] == "BTC" and len(book["data"]["levels"]) == 2
        ws.send(b'{"method":"ping"}')
        assert recv_until(ws, lambda m: m["channel"] != "l2Book") == {"channel": "pong"}
        for bad in (b"{not json", hl_sub("candles"), hl_sub("trades", None), hl_sub("l2Book")):
            ws.send(bad)
            err = recv_until(ws, lambda m: m["channel"] != "l2Book")
            assert err["channel"] == "error" and isinstance(err["data"], str), bad
        ws.send(hl_sub("trades"))
        ack = recv_until(ws, lambda m: m["channel"] == "subscriptionResponse")
        assert ack["data"]["subscription"] == {"type": "trades", "coin": "BTC"}
        assert fv.subscriptions == {("l2Book", "BTC"), ("trades", "BTC")}
        ws.send(hl_sub("l2Book", method="unsubscribe"))
        ack = recv_until(ws, lambda m: m["channel"] == "subscriptionResponse")
        assert ack["data"]["method"] == "unsubscribe"
        assert fv.subscriptions == {("trades", "BTC")}


def test_hyperliquid_active_asset_ctx() -> None:
    with (
        running("hyperliquid", HYPERLIQUID, speed=20, mark_interval_s=0.5) as fv,
        connect(fv.ws_url + "/ws") as ws,
    ):
        ws.send(hl_sub("l2Book"))
        ws.send(hl_sub("activeAssetCtx"))
        tops = set()
        ctx = None
        while ctx is None:
            msg = recv_json(ws)
            if msg["channel"] == "l2Book":
                bids, asks = msg["data"]["levels"]
                tops.add((bids[0]["px"], asks[0]["px"]))
            elif msg["channel"] == "activeAssetCtx":
                assert msg["data"]["coin"] == "BTC"
                ctx = msg["data"]["ctx"]
        assert fv.sent["activeAssetCtx"] >= 1
    assert list(ctx) == [
        "funding",
        "openInterest",
        "prevDayPx",
        "dayNtlVlm",
        "premium",
        "oraclePx",
        "markPx",
        "midPx",
        "impactPxs",
        "dayBaseVlm",
    ]
    assert all(isinstance(v, str) for k, v in ctx.items() if k != "impactPxs")
    assert tuple(ctx["impactPxs"]) in tops
    mid = (float(ctx["impactPxs"][0]) + float(ctx["impactPxs"][1])) / 2
    assert float(ctx["midPx"]) == pytest.approx(mid) and ctx["markPx"] == ctx["midPx"]
    assert float(ctx["oraclePx"]) < mid and float(ctx["openInterest"]) > 0


def test_hyperliquid_latest_book_on_subscribe_after_finish() -> None:
    last_book = [m for m in recorded_hl() if m["channel"] == "l2Book"][-1]
    with running("hyperliquid", HYPERLIQUID, speed=None, autostart=True) as fv:
        assert fv.finished.wait(5) and fv.position == 55
        with connect(fv.ws_url + "/ws") as ws:
            ws.send(hl_sub("l2Book"))
            assert recv_json(ws)["channel"] == "subscriptionResponse"
            assert recv_json(ws) == last_book
            assert frames_for(ws, 0.3) == []  # finished: silent
            ws.send(b'{"method":"ping"}')
            assert recv_json(ws) == {"channel": "pong"}


def test_hyperliquid_gap_and_malformed() -> None:
    n_books = sum(1 for m in recorded_hl() if m["channel"] == "l2Book")
    with running("hyperliquid", HYPERLIQUID, speed=None) as fv:
        fv.gap(2)  # counts only messages someone would have received
        fv.malformed(1, "wrong_types")
        with connect(fv.ws_url + "/ws") as ws:
            ws.send(hl_sub("l2Book"))
            assert fv.finished.wait(5)
            msgs = [orjson.loads(d) for _, d in until_quiet(ws)]
    books = [m for m in msgs if m["channel"] == "l2Book"]
    assert len(books) == n_books - 2
    broken = [b for b in books if not isinstance(b["data"]["levels"][0][0]["n"], int)]
    assert len(broken) == 1
    level = broken[0]["data"]["levels"][0][0]
    assert level["n"] == "notanumber" and isinstance(level["px"], list)
    assert fv.sent["l2Book"] == n_books - 3 and fv.sent["malformed"] == 1


def test_hyperliquid_idle_close() -> None:
    with (
        running("hyperliquid", HYPERLIQUID, idle_timeout_s=0.4) as fv,
        connect(fv.ws_url + "/ws") as quiet,
        connect(fv.ws_url + "/ws") as chatty,
    ):
        t0 = time.monotonic()
        closed_after = None
        while time.monotonic() - t0 < 1.0:  # 2.5 idle timeouts
            chatty.send(b'{"method":"ping"}')
            assert recv_json(chatty) == {"channel": "pong"}
            if closed_after is None:
                with suppress(websocket.WebSocketTimeoutException):
                    opcode, data = recv_frame(quiet, timeout=0.1)
                    assert opcode == websocket.ABNF.OPCODE_CLOSE and close_code(data) == 1000
                    closed_after = time.monotonic() - t0
            else:
                time.sleep(0.1)
        assert closed_after is not None and 0.35 <= closed_after < 1.0
        assert wait_until(lambda: fv.connections == 1)
        chatty.send(b'{"method":"ping"}')
        assert recv_json(chatty) == {"channel": "pong"}


def test_hyperliquid_info() -> None:
    meta = orjson.loads((DATA / "hyperliquid-meta.json").read_bytes())
    with running("hyperliquid", HYPERLIQUID, speed=50, weight_limit_per_min=110) as fv:
        info = fv.rest_url + "/info"
        assert rest_json(info, b'{"type":"meta"}') == meta
        assert rest_json(info, b'{"type":"l2Book","coin":"BTC"}') is None  # nothing played
        with connect(fv.ws_url + "/ws") as ws:
            ws.send(hl_sub("l2Book"))
            streamed = recv_until(ws, lambda m: m["channel"] == "l2Book")
            fv.pause()
            frames_for(ws, 0.1)
            book = rest_json(info, b'{"type":"l2Book","coin":"BTC"}')
            assert book["coin"] == "BTC" and book["time"] >= streamed["data"]["time"]
        universe, ctxs = rest_json(info, b'{"type":"metaAndAssetCtxs"}')
        assert universe == meta and len(ctxs) == len(meta["universe"])
        assert ctxs[0]["midPx"] is not None and ctxs[1]["midPx"] is None  # BTC only recorded
        for bad in (b'{"type":"allMids"}', b"not json", b'{"type":"l2Book"}'):
            status, _, _ = http(info, bad)
            assert status == 422, bad
        assert http(fv.rest_url + "/other", b"{}")[0] == 404
        # weight so far: meta 20, l2Book 2 + 2, metaAndAssetCtxs 20, 422s 20 + 20 + 2 = 86
        assert http(info, b'{"type":"meta"}')[0] == 200  # 106
        assert http(info, b'{"type":"meta"}')[0] == 429  # 126 > 110
        assert http(info, b'{"type":"l2Book","coin":"BTC"}')[0] == 200  # 108
        assert fv.rest_429 == 1


# ---------------------------------------------------------------------- CLI
@pytest.mark.parametrize(
    "argv",
    [
        ["--venue", "kraken", "--file", str(BINANCE)],
        ["--venue", "binance"],
        ["--venue", "binance", "--file", str(BINANCE), "--speed", "0"],
        ["--venue", "binance", "--file", str(BINANCE), "--speed", "fast"],
        ["--venue", "binance", "--file", str(BINANCE), "--ws-port", "70000"],
    ],
)
def test_cli_bad_arguments_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err


def test_cli_missing_and_corrupt_files_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nope.jsonl.gz"
    not_gzip = tmp_path / "plain.jsonl.gz"
    not_gzip.write_bytes(b"1 {}\n")
    bad_line = tmp_path / "bad.jsonl.gz"
    bad_line.write_bytes(gzip.compress(b'1723 {"stream":"x","data":{}}\nhello world\n'))
    truncated = tmp_path / "trunc.jsonl.gz"
    truncated.write_bytes(BINANCE.read_bytes()[:5000])
    for path, venue, needle in (
        (missing, "binance", "no such file"),
        (not_gzip, "binance", "gzip"),
        (bad_line, "binance", ":2:"),
        (truncated, "binance", "gzip"),
        (HYPERLIQUID, "binance", "no Binance"),
        (BINANCE, "hyperliquid", "no Hyperliquid"),
    ):
        assert main(["--venue", venue, "--file", str(path)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(path) in err and needle in err, err


def test_cli_serves_until_sigterm() -> None:
    cmd = [sys.executable, "-m", "ops.fakevenue", "--venue", "hyperliquid"]
    cmd += ["--file", str(HYPERLIQUID), "--speed", "max"]
    with subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as proc:
        assert proc.stdout is not None
        lines = []
        while not lines or not lines[-1].startswith("rest_url = "):
            line = proc.stdout.readline()
            assert line, f"exited early: {proc.stderr.read() if proc.stderr else ''}"
            lines.append(line.strip())
        assert "[feed]" in lines and 'source = "hyperliquid"' in lines
        assert proc.stdout.readline().strip() == "# recorded symbols: BTC"
        ws_url = next(x for x in lines if x.startswith("ws_url = ")).split('"')[1]
        assert ws_url.startswith("ws://127.0.0.1:") and ws_url.endswith("/ws")
        with connect(ws_url) as ws:
            ws.send(b'{"method":"ping"}')
            assert recv_json(ws) == {"channel": "pong"}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
