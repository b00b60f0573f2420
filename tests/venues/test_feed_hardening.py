"""Failure handling found in review: nothing wrong is ever published live, nothing loops hot."""

from __future__ import annotations

import socket
import threading
import time
import uuid
import zlib
from typing import Any

import pytest

from shm import schema, segment
from stages import config
from stages.ingest import IngestAgent, _safe
from stages.instruments import Instrument, fill_symbol_table
from stages.venues.binance import RestSnapshots
from stages.venues.rest import RestClient
from stages.wiring import Engine
from tests.venues.test_binance_feed import SYM, diff, live, rig, snapshot, ticker


def test_a_ticker_that_disagrees_stops_the_book_before_it_is_published_live() -> None:
    r, _ = live(diff(95, 101, 90, bids=[("1000.0", "5.000")]))
    n = len(r.sink.books)
    r.send(ticker(102, "1000.1", "1.000", "1000.2", "2.500"))  # the venue says bid 1000.1
    r.send(diff(102, 102, 101, bids=[("999.9", "7.000")]))  # our book would say 1000.0
    out = r.sink.books[n:]
    assert r.feed.tob_mismatches == 1
    assert all(int(b["flags"][0]) & schema.BOOK_STALE for b in out), "only the stale copy"
    assert r.snaps.requests[-1] == SYM, "and a rebuild is asked for"


def test_prices_off_the_tick_grid_hold_the_book_stale_and_count() -> None:
    r, _ = live(diff(95, 101, 90, bids=[("1000.0", "5.000")]))
    n = len(r.sink.books)
    r.send(diff(102, 102, 101, bids=[("1000.05", "1.000")]))  # tick is 0.1
    assert r.count(schema.C_MALFORMED) == 1
    assert all(int(b["flags"][0]) & schema.BOOK_STALE for b in r.sink.books[n:])


def test_repeated_gaps_back_off_instead_of_hammering_snapshots() -> None:
    r = rig()
    r.feed.on_connected(0, 0)
    now = 1_000_000_000
    for i in range(6):  # every snapshot is followed at once by a gap
        last = 100 + 10 * i
        r.feed.on_snapshot(SYM, snapshot(last), now)
        r.send(diff(last, last + 1, last - 1), now)
        r.send(diff(last + 5, last + 6, last + 4), now)  # gap
        now += 100_000_000
        r.feed.poll(now)
    assert r.count(schema.C_GAPS) >= 5
    assert len(r.snaps.requests) <= 3, "quick repeats wait for their backoff"
    r.feed.poll(now + 60_000_000_000)
    assert r.snaps.requests[-1] == SYM, "and then ask again"


def test_resyncs_count_books_rebuilt_not_snapshots_loaded() -> None:
    r, _ = live(diff(95, 101, 90))
    r.send(diff(105, 106, 104), 2_000_000_000)  # gap
    r.feed.on_snapshot(SYM, snapshot(120), 2_100_000_000)  # the stream is past it: thrown away
    assert r.count(schema.C_RESYNCS) == 0
    r.feed.on_snapshot(SYM, snapshot(100), 50_000_000_000)
    r.send(diff(99, 107, 98), 50_000_000_001)
    assert r.count(schema.C_RESYNCS) == 1


class _Boom:
    """A REST client whose call fails in ways other than RestError."""

    rate_limited = 0

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc
        self.calls = 0

    def get_json(self, *a: Any, **kw: Any) -> Any:
        self.calls += 1
        raise self.exc


@pytest.mark.parametrize("exc", [zlib.error("bad gzip"), ValueError("weight"), KeyError("x")])
def test_any_snapshot_worker_failure_is_retried_not_fatal(exc: BaseException) -> None:
    clock = [0]
    snaps = RestSnapshots(_Boom(exc), clock=lambda: clock[0])  # type: ignore[arg-type]
    try:
        snaps.request(SYM)
        deadline = time.monotonic() + 5
        while snaps.failures == 0 and time.monotonic() < deadline:
            snaps.poll()
            time.sleep(0.01)
        assert snaps.failures == 1 and snaps.poll() == []
        clock[0] = 10**12  # long after any backoff
        snaps.poll()
        assert SYM in snaps._inflight or snaps.failures >= 1
    finally:
        snaps.close()


def test_rest_client_turns_a_corrupt_gzip_body_into_a_rest_error() -> None:
    from stages.venues.rest import RestError

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]

    def serve() -> None:
        conn, _ = srv.accept()
        conn.recv(65536)
        body = b"\x1f\x8b\x08\x00garbage-not-deflate"
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
        )
        conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    client = RestClient(f"http://127.0.0.1:{port}", venue="binance", weight_per_min=100)
    with pytest.raises(RestError):
        client.get_json("/fapi/v1/depth", {"symbol": SYM})
    t.join(5)
    srv.close()


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("ws_url", "http://127.0.0.1:1"),
        ("ws_url", "ws://:443"),
        ("ws_url", "ws://127.0.0.1:99999"),
        ("rest_url", "ws://127.0.0.1:1"),
        ("rest_url", "nohost"),
        ("rest_weight_per_min", 10),
    ],
)
def test_feed_urls_and_budget_are_checked_at_load(key: str, value: object) -> None:
    with pytest.raises(config.ConfigError, match=f"feed.{key}"):
        config.from_dict({"feed": {"source": "binance", key: value}})


def test_log_urls_carry_no_credentials_or_query() -> None:
    assert _safe("wss://user:s3cret@relay.example:443/ws?key=abc") == "wss://relay.example:443/ws"


def test_a_venue_that_accepts_and_hangs_up_is_not_reconnected_in_a_hot_loop() -> None:
    from websockets.sync.server import serve

    connects = []

    def handler(ws: Any) -> None:
        connects.append(time.monotonic())
        ws.close()

    ns = f"t{uuid.uuid4().hex[:10]}"
    with serve(handler, "127.0.0.1", 0) as server:
        port = server.socket.getsockname()[1]
        t = threading.Thread(target=server.serve_forever, daemon=True)
        t.start()
        cfg = config.from_dict(
            {
                "engine": {"namespace": ns},
                "feed": {
                    "source": "hyperliquid",
                    "symbols": ["BTC"],
                    "ws_url": f"ws://127.0.0.1:{port}/ws",
                },
            }
        )
        eng = Engine.create(cfg)
        try:
            fill_symbol_table(
                eng.symbols, [Instrument("BTC", 1.0, 1e-5, 10.0, venue="hyperliquid")]
            )
            agent = IngestAgent(cfg, eng, eng.stage_stats("ingest"))
            end = time.monotonic() + 3.0
            while time.monotonic() < end:
                agent.do_work()
            agent.on_close()
        finally:
            server.shutdown()
            segment.unlink_all(ns)
    assert 3 <= len(connects) <= 8, f"{len(connects)} connections in 3 s: the backoff must grow"
