"""The ingest agent against a scripted WebSocket server on 127.0.0.1: books published, bad frames
counted (never a crash), silence flags every book stale, a dropped connection comes back."""

from __future__ import annotations

import asyncio
import gzip
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from websockets.asyncio.server import ServerConnection, serve

from shm import schema, segment
from stages import config
from stages.ingest import IngestAgent
from stages.instruments import Instrument
from stages.wiring import Engine

DATA = Path(__file__).resolve().parents[1] / "data" / "hyperliquid-btc-20250126.jsonl.gz"


def recorded_books(n: int) -> list[bytes]:
    out = []
    with gzip.open(DATA, "rb") as f:
        for line in f:
            raw = line.split(b" ", 1)[1].strip()
            if b'"l2Book"' in raw:
                out.append(raw)
            if len(out) == n:
                break
    return out


class ScriptedVenue:
    """Send a script of frames to each client that subscribes, then stay silent or hang up."""

    def __init__(self, script: list[bytes], *, hang_up: bool = False) -> None:
        self.script = script
        self.hang_up = hang_up
        self.connections = 0
        self.port = 0
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _handler(self, ws: ServerConnection) -> None:
        self.connections += 1
        await ws.recv()  # the first subscribe message
        for frame in self.script:
            await ws.send(frame, text=True)
        if self.hang_up:
            await ws.close()
            return
        await self._stop_wait()

    async def _stop_wait(self) -> None:
        assert self._stop is not None
        await self._stop.wait()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with serve(self._handler, "127.0.0.1", 0) as server:
            self.port = next(iter(server.sockets)).getsockname()[1]
            self._ready.set()
            await self._stop.wait()

    def __enter__(self) -> ScriptedVenue:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


@pytest.fixture
def eng() -> Iterator[Engine]:
    ns = f"t{uuid.uuid4().hex[:10]}"
    e = Engine.create(config.from_dict({"engine": {"namespace": ns}}))
    e.symbols[0] = Instrument("BTC", 1.0, 0.00001, 10.0, venue="hyperliquid").row()
    yield e
    segment.unlink_all(ns)


def run_agent(agent: IngestAgent, seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        agent.do_work()


def books_out(eng: Engine) -> np.ndarray:
    r = eng.reader("md_book", "feature")
    out = np.zeros(256, schema.BOOK)
    return out[: r.read_into(out)]


def test_books_published_bad_frames_counted_and_silence_flags_stale(eng: Engine) -> None:
    good = recorded_books(3)
    script = [
        good[0],
        b'{"channel":"l2Book","data":{"coin":"BTC","levels":[[{"px":"1',  # truncated
        b'{"channel":"l2Book","data":"\xff\xfe not utf-8"}',  # invalid UTF-8 in a text frame
        b'{"channel":"error","data":"Invalid subscription"}',
        good[1],
    ]
    cfg = config.from_dict(
        {"feed": {"source": "hyperliquid", "symbols": ["BTC"], "stale_after_ms": 300.0}}
    )
    with ScriptedVenue(script) as venue:
        agent = IngestAgent(
            cfg, eng, eng.stage_stats("ingest"), feed_url=f"ws://127.0.0.1:{venue.port}/ws"
        )
        run_agent(agent, 1.2)
        agent.on_close()
    books = books_out(eng)
    fresh = books[(books["flags"] & schema.BOOK_STALE) == 0]
    stale = books[(books["flags"] & schema.BOOK_STALE) != 0]
    assert len(fresh) == 2
    assert fresh["bid_px"][0, 0] > 0 and fresh["ask_px"][0, 0] > fresh["bid_px"][0, 0]
    assert len(stale) >= 1, "silence past stale_after_ms must flag the book stale"
    assert stale["recv_ns"][0] > fresh["recv_ns"][-1]
    for field in ("bid_px", "bid_sz", "ask_px", "ask_sz", "seq", "n_bid", "n_ask"):
        assert (stale[field][0] == fresh[field][-1]).all(), f"the stale copy keeps {field}"
    ints = eng.stats_all[schema.ROLE_INDEX["ingest"]]["ints"]
    assert ints[schema.C_MALFORMED] == 2
    assert ints[schema.C_VENUE_ERRORS] == 1
    assert ints[schema.C_SNAPSHOTS] == 2


def test_a_dropped_connection_is_reconnected_and_books_flow_again(eng: Engine) -> None:
    cfg = config.from_dict({"feed": {"source": "hyperliquid", "symbols": ["BTC"]}})
    with ScriptedVenue(recorded_books(2), hang_up=True) as venue:
        agent = IngestAgent(
            cfg, eng, eng.stage_stats("ingest"), feed_url=f"ws://127.0.0.1:{venue.port}/ws"
        )
        run_agent(agent, 1.5)
        agent.on_close()
        assert venue.connections >= 2, "ingest must reconnect after the venue hangs up"
    ints = eng.stats_all[schema.ROLE_INDEX["ingest"]]["ints"]
    assert ints[schema.C_RECONNECTS] >= 1
    assert ints[schema.C_SNAPSHOTS] >= 4
    books = books_out(eng)
    assert ((books["flags"] & schema.BOOK_STALE) != 0).any(), "a disconnect flags the books stale"
