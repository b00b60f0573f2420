"""The ingest stage against fake Binance and Hyperliquid venues replaying real recordings.

Each test runs the real ``IngestAgent`` (sockets, REST snapshots on a worker thread, the
feed adapters) against ``ops.fakevenue.FakeVenue`` on 127.0.0.1, injects a fault, and reads
what the stage published into the engine's rings.
"""

from __future__ import annotations

import gzip
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import orjson
import pytest

from ops.fakevenue import FakeVenue
from shm import schema, segment
from stages import config
from stages.ingest import IngestAgent
from stages.instruments import fill_symbol_table
from stages.venues.symbols import binance_instruments, hyperliquid_instruments
from stages.wiring import Engine

pytestmark = pytest.mark.integration
DATA = Path(__file__).resolve().parents[1] / "data"
BINANCE = DATA / "binance-usdm-btcusdt-20240808-excerpt.jsonl.gz"
HYPERLIQUID = DATA / "hyperliquid-btc-20250126.jsonl.gz"


def venue_tickers() -> dict[int, tuple[float, float, float, float]]:
    """update id -> (bid, bid size, ask, ask size) from the recording's bookTicker messages."""
    out = {}
    with gzip.open(BINANCE, "rb") as f:
        for line in f:
            raw = line.split(b" ", 1)[1]
            if b"bookTicker" in raw:
                d = orjson.loads(raw)["data"]
                out[d["u"]] = (float(d["b"]), float(d["B"]), float(d["a"]), float(d["A"]))
    return out


TICKERS = venue_tickers()


@pytest.fixture
def make_engine() -> Iterator[Callable[[str], tuple[Engine, config.Config]]]:
    made: list[str] = []

    def make(venue: str, **feed: object) -> tuple[Engine, config.Config]:
        ns = f"t{uuid.uuid4().hex[:10]}"
        made.append(ns)
        cfg = config.from_dict(
            {"engine": {"namespace": ns}, "feed": {"source": venue, "symbols": ["BTC"], **feed}}
        )
        eng = Engine.create(cfg)
        if venue == "binance":
            doc = orjson.loads((DATA / "binance-exchangeinfo.json").read_bytes())
            fill_symbol_table(eng.symbols, binance_instruments(doc, ["BTC"]))
        else:
            doc = orjson.loads((DATA / "hyperliquid-meta.json").read_bytes())
            fill_symbol_table(eng.symbols, hyperliquid_instruments(doc, ["BTC"]))
        return eng, cfg

    yield make
    for ns in made:
        segment.unlink_all(ns)


class Run:
    """Drive an agent and collect everything it publishes."""

    def __init__(self, eng: Engine, agent: IngestAgent) -> None:
        self.eng = eng
        self.agent = agent
        self._books = eng.reader("md_book", "feature")
        self._trades = eng.reader("md_trade", "feature")
        self._marks = eng.reader("md_mark", "feature")
        self.books: list[np.ndarray] = []
        self.trades = 0
        self.marks: list[np.ndarray] = []
        self._buf = np.zeros(512, schema.BOOK)
        self._tbuf = np.zeros(512, schema.TRADE)
        self._mbuf = np.zeros(64, schema.MARK)

    def run(self, seconds: float, until: Callable[[], bool] | None = None) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.agent.do_work()
            n = self._books.read_into(self._buf)
            if n:
                self.books.append(self._buf[:n].copy())
            self.trades += self._trades.read_into(self._tbuf)
            m = self._marks.read_into(self._mbuf)
            if m:
                self.marks.append(self._mbuf[:m].copy())
            if until is not None and until():
                return

    def all_books(self) -> np.ndarray:
        return np.concatenate(self.books) if self.books else np.zeros(0, schema.BOOK)

    @property
    def ints(self) -> np.ndarray:
        return self.eng.stats_all[schema.ROLE_INDEX["ingest"]]["ints"]


def compare_with_tickers(books: np.ndarray) -> tuple[int, int]:
    """(books whose update id a bookTicker also carries, of those how many differ)."""
    fresh = books[(books["flags"] & schema.BOOK_STALE) == 0]
    checked = differ = 0
    for b in fresh:
        t = TICKERS.get(int(b["seq"]))
        if t is None:
            continue
        checked += 1
        mine = (
            float(b["bid_px"][0]),
            float(b["bid_sz"][0]),
            float(b["ask_px"][0]),
            float(b["ask_sz"][0]),
        )
        differ += mine != t
    return checked, differ


def binance_run(make_engine, venue: FakeVenue, **feed: object) -> Run:
    eng, cfg = make_engine(
        "binance", ws_url=venue.ws_url, rest_url=venue.rest_url, binance_depth_ms=0, **feed
    )
    return Run(eng, IngestAgent(cfg, eng, eng.stage_stats("ingest")))


def test_binance_book_from_the_fake_venue_matches_the_venues_own_ticker(make_engine) -> None:
    with FakeVenue("binance", BINANCE, speed=None) as venue:
        r = binance_run(make_engine, venue)
        r.run(20.0, until=venue.finished.is_set)
        r.run(0.5)
        subs = venue.subscriptions  # what the connected client holds: before it disconnects
        r.agent.on_close()
        assert venue.rest_requests["/fapi/v1/depth"] >= 1
    books = r.all_books()
    fresh = books[(books["flags"] & schema.BOOK_STALE) == 0]
    assert len(fresh) > 300, "most of the 489 recorded diffs become books"
    assert int(r.ints[schema.C_GAPS]) == 0 and int(r.ints[schema.C_MALFORMED]) == 0
    checked, differ = compare_with_tickers(books)
    assert checked >= 30 and differ == 0
    assert (np.diff(fresh["seq"].astype(np.int64)) > 0).all(), "update ids only move forward"
    assert fresh["flags"][0] & schema.BOOK_RESYNCED, "the first book after a sync says so"
    assert r.trades > 100, "aggTrade from /market"
    assert any(str(s).endswith("@depth@0ms") for s in subs)


def test_binance_gap_is_detected_resynced_and_the_book_matches_again(make_engine) -> None:
    with FakeVenue("binance", BINANCE, speed=4.0) as venue:
        r = binance_run(make_engine, venue)
        r.run(15.0, until=lambda: int(r.ints[schema.C_SNAPSHOTS]) > 40)
        venue.gap(2)
        r.run(15.0, until=lambda: int(r.ints[schema.C_RESYNCS]) >= 1)
        synced_at = len(r.all_books())
        r.run(15.0, until=venue.finished.is_set)
        r.agent.on_close()
    assert int(r.ints[schema.C_GAPS]) >= 1
    assert int(r.ints[schema.C_RESYNCS]) >= 1
    books = r.all_books()
    assert (books["flags"] & schema.BOOK_STALE).any(), "the gap published the book stale at once"
    after = books[synced_at:]
    checked, differ = compare_with_tickers(after)
    assert checked >= 5 and differ == 0, "after the resync the book equals the venue's again"


def test_binance_disconnect_reconnects_and_resubscribes(make_engine) -> None:
    with FakeVenue("binance", BINANCE, speed=4.0) as venue:
        r = binance_run(make_engine, venue)
        r.run(15.0, until=lambda: int(r.ints[schema.C_SNAPSHOTS]) > 20)
        before = venue.connects_total
        venue.disconnect()
        n_books = int(r.ints[schema.C_SNAPSHOTS])
        r.run(15.0, until=lambda: int(r.ints[schema.C_SNAPSHOTS]) > n_books + 20)
        r.agent.on_close()
        assert venue.connects_total >= before + 2, "both routed connections come back"
    assert int(r.ints[schema.C_RECONNECTS]) >= 2
    books = r.all_books()
    assert (books["flags"] & schema.BOOK_STALE).any()
    assert int(r.ints[schema.C_SNAPSHOTS]) > n_books + 20, "books flow again"


def test_binance_silence_flags_the_book_stale(make_engine) -> None:
    with FakeVenue("binance", BINANCE, speed=2.0) as venue:
        r = binance_run(make_engine, venue, stale_after_ms=400)
        r.run(15.0, until=lambda: int(r.ints[schema.C_SNAPSHOTS]) > 10)
        venue.silence(1.5)
        r.run(1.2)
        r.agent.on_close()
    books = r.all_books()
    stale = books[(books["flags"] & schema.BOOK_STALE) != 0]
    assert len(stale) >= 1 and int(r.ints[schema.C_STALE]) >= 1
    assert (stale["bid_px"][:, 0] > 0).all(), "a stale book keeps its last levels, flagged"


def test_binance_rate_limit_backs_off_instead_of_hammering(make_engine) -> None:
    with FakeVenue("binance", BINANCE, speed=2.0) as venue:
        venue.rate_limit(n=1, status=429, retry_after_s=1.0)
        r = binance_run(make_engine, venue)
        t0 = time.monotonic()
        r.run(15.0, until=lambda: int(r.ints[schema.C_SNAPSHOTS]) > 0)
        waited = time.monotonic() - t0
        r.agent.on_close()
        depth_requests = venue.rest_requests["/fapi/v1/depth"]
    assert int(r.ints[schema.C_RATE_LIMITED]) >= 1
    assert waited >= 1.0, "no snapshot before the venue's Retry-After"
    assert depth_requests <= 3, "a 429 is not answered with a burst of retries"


def test_hyperliquid_books_trades_and_asset_context(make_engine) -> None:
    with FakeVenue("hyperliquid", HYPERLIQUID, speed=10.0, mark_interval_s=0.5) as venue:
        eng, cfg = make_engine("hyperliquid", ws_url=venue.ws_url + "/ws", rest_url=venue.rest_url)
        r = Run(eng, IngestAgent(cfg, eng, eng.stage_stats("ingest")))
        r.run(10.0, until=lambda: venue.finished.is_set() and bool(r.marks))
        r.agent.on_close()
    books = r.all_books()
    assert len(books) >= 40
    assert (books["bid_px"][:, 0] < books["ask_px"][:, 0]).all()
    assert r.trades > 0
    marks = np.concatenate(r.marks)
    assert (marks["mark_px"] > 50_000).all() and np.isfinite(marks["funding_rate"]).all()


def test_paper_engine_trades_on_the_binance_feed_and_stops_while_it_is_stale(
    tmp_path: Path,
) -> None:
    """``./run.sh paper`` with ``[feed] source = "binance"``: real processes, fake venue."""
    from tests.integration.test_pipeline import attach, counter, start, wait_for, write_config

    ns = f"it{uuid.uuid4().hex[:8]}"
    with FakeVenue("binance", BINANCE, speed=2.0, loop=True) as venue:
        cfg_path = write_config(
            tmp_path,
            ns,
            feed={
                "source": "binance",
                "symbols": ["BTC"],
                "ws_url": venue.ws_url,
                "rest_url": venue.rest_url,
                "binance_depth_ms": 0,
                "stale_after_ms": 500,
                "cache_dir": str(tmp_path / "cache"),
            },
            gate={"min_edge_bps": 0.5, "min_confidence": 0.1, "max_spread_bps": 50.0},
            route={"min_order_interval_ms": 50},
            # the replay jumps after the silence, which the extreme-move breaker rightly
            # pauses for: keep that pause short, this test is about staleness
            risk={"breaker_pause_s": 1.0},
        )
        (tmp_path / "cache").mkdir()
        proc = start(cfg_path, tmp_path, "--duration", "60")
        try:
            eng = wait_for(lambda: attach(ns), 60, "the engine's segments", proc)
            wait_for(lambda: counter(eng, "risk", schema.C_ORDERS) > 0, 60, "an order", proc)
            assert (tmp_path / "cache" / "symbols-binance.json").exists(), "rules fetched, cached"
            venue.silence(4.0)
            wait_for(lambda: counter(eng, "ingest", schema.C_STALE) > 0, 5, "a stale book", proc)
            stale_orders = counter(eng, "risk", schema.C_ORDERS)
            time.sleep(2.0)
            assert counter(eng, "risk", schema.C_ORDERS) == stale_orders, "no order while stale"
            wait_for(
                lambda: counter(eng, "risk", schema.C_ORDERS) > stale_orders,
                30,
                "trading to resume after the feed comes back",
                proc,
            )
            # the shipped crypto models (trained on this market) made signals: real BTCUSDT
            # ticks are inside their training range (the first books of a run, still warming
            # up, may not be)
            signals = counter(eng, "inference", schema.C_SIGNALS)
            fallbacks = counter(eng, "inference", schema.C_FALLBACKS)
            edge_runs = counter(eng, "inference", schema.MODEL_COUNTERS_BASE + schema.MODEL_RUNS)
            assert edge_runs > 0 and signals > 0
            assert signals - fallbacks > 0, (fallbacks, signals)
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            segment.unlink_all(ns)
    assert proc.returncode == 0, err.decode()[-3000:]


def test_binance_server_pings_are_answered_and_connections_renewed_before_the_limit(
    make_engine,
) -> None:
    with FakeVenue("binance", BINANCE, speed=4.0, ping_interval_s=0.3) as venue:
        r = binance_run(make_engine, venue, max_connection_age_s=1.5)
        r.run(5.0)
        r.agent.on_close()
        pongs = venue.pongs_received
        connects = venue.connects_total
    assert pongs >= 4, "every server ping gets its pong"
    assert connects >= 4, "both connections renewed when they reach max_connection_age_s"
    assert int(r.ints[schema.C_RECONNECTS]) >= 2
    # renewed with an overlap: the books never went stale and never had to be rebuilt
    assert int(r.ints[schema.C_STALE]) == 0 and int(r.ints[schema.C_RESYNCS]) == 0
    assert int(r.ints[schema.C_GAPS]) == 0
    books = r.all_books()
    fresh = books[(books["flags"] & schema.BOOK_STALE) == 0]
    assert len(fresh) > 50 and (np.diff(fresh["seq"].astype(np.int64)) > 0).all()
    checked, differ = compare_with_tickers(books)
    assert checked >= 5 and differ == 0


def test_hyperliquid_pings_keep_an_idle_connection_open(make_engine, monkeypatch) -> None:
    """The venue closes a connection that sent nothing for 60 s (here 1 s); our ping prevents it."""
    from stages.venues import hyperliquid

    monkeypatch.setattr(hyperliquid, "PING_EVERY_NS", 300_000_000)
    with FakeVenue("hyperliquid", HYPERLIQUID, speed=1.0, idle_timeout_s=1.0) as venue:
        eng, cfg = make_engine(
            "hyperliquid", ws_url=venue.ws_url + "/ws", rest_url=venue.rest_url, stale_after_ms=5000
        )
        r = Run(eng, IngestAgent(cfg, eng, eng.stage_stats("ingest")))
        r.run(3.5)
        r.agent.on_close()
        connects = venue.connects_total
    assert connects == 1, "never idle-closed"
    assert int(r.ints[schema.C_RECONNECTS]) == 0
