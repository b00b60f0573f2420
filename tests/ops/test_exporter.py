"""The Prometheus exporter against a real engine in shared memory, scraped over HTTP."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ops import exporter
from shm import schema, stats
from stages import config
from stages import riskengine as rk
from stages.wiring import CTL_KILL, CTL_PID, CTL_RESTARTS, Engine

ROOT = Path(__file__).resolve().parents[2]
_seq = itertools.count()

SEED_HISTOGRAMS = (
    "hft_ingest_duration_us",
    "hft_feature_duration_us",
    "hft_model_duration_us",
    "hft_route_duration_us",
)


def _namespace() -> str:
    return f"t{os.getpid()}xexp{next(_seq)}"


@pytest.fixture
def engine() -> Iterator[Engine]:
    cfg = config.from_dict({"engine": {"namespace": _namespace()}})
    eng = Engine.create(cfg)
    try:
        yield eng
    finally:
        eng.unlink()


@pytest.fixture
def port(engine: Engine) -> Iterator[int]:
    server, thread, bound = exporter.start_exporter(engine.namespace, "127.0.0.1", 0)
    try:
        yield bound
    finally:
        exporter.stop_exporter(server)
        thread.join(timeout=5)


def scrape(port: int) -> dict[str, object]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def sample(fams: dict[str, object], family: str, name: str, **labels: str) -> float:
    fam = fams[family]
    for s in fam.samples:  # type: ignore[attr-defined]
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
            return float(s.value)
    raise AssertionError(f"no sample {name}{labels} in {family}")


def buckets(fams: dict[str, object], family: str) -> dict[str, float]:
    fam = fams[family]
    return {s.labels["le"]: s.value for s in fam.samples if s.name == f"{family}_bucket"}  # type: ignore[attr-defined]


# ---------------------------------------------------------------- the seed's nine
def test_seed_metrics_have_their_names_types_and_values(engine: Engine) -> None:
    ingest, feature = engine.stage_stats("ingest"), engine.stage_stats("feature")
    inference, route, risk = (engine.stage_stats(r) for r in ("inference", "route", "risk"))
    ingest.record_ns(schema.H_DURATION, 700, 5)
    ingest.record_ns(schema.H_DURATION, 3_000, 10)
    ingest.record_ns(schema.H_DURATION, 2_000_000)
    feature.record_ns(schema.H_DURATION, 50_000, 100)
    inference.record_ns(schema.H_DURATION, 1_500_000, 7)
    route.record_ns(schema.H_DURATION, 20_000, 3)
    ingest.add(schema.C_SNAPSHOTS, 1000)
    risk.add(schema.C_ORDERS, 10)
    feature.add(schema.C_DROPPED, 42)
    risk.add(schema.C_DROPPED, 3)
    inference.add(schema.C_MODEL_TIMEOUTS, 9)  # the stage adds each model's timeouts to both
    inference.add(schema.MODEL_COUNTERS_BASE + schema.MODEL_TIMEOUTS, 9)  # edge
    for reason in ("stale_book", "stale_book", "daily_loss"):
        risk.reject(schema.REJECT_CODE[reason])

    server, thread, port = exporter.start_exporter(engine.namespace, "127.0.0.1", 0)
    try:
        assert port > 0
        ingest.add(schema.C_SNAPSHOTS, 500)
        risk.add(schema.C_ORDERS, 4)
        time.sleep(0.2)
        fams = scrape(port)
    finally:
        exporter.stop_exporter(server)
        thread.join(timeout=5)

    for name in SEED_HISTOGRAMS:
        assert fams[name].type == "histogram", name  # type: ignore[attr-defined]
    for name in ("hft_snapshots_per_sec", "hft_orders_per_sec"):
        assert fams[name].type == "gauge", name  # type: ignore[attr-defined]
    # counters: the parser names the family without _total, the sample keeps it
    for name in ("hft_dropped_frames", "hft_model_timeouts", "hft_order_rejects"):
        assert fams[name].type == "counter", name  # type: ignore[attr-defined]

    # ingest: 5 x 0.7 us, 10 x 3 us, 1 x 2 ms; boundaries are exact bucket edges of ours
    b = buckets(fams, "hft_ingest_duration_us")
    assert b["0.512"] == 0
    assert b["1.024"] == 5
    assert b["2.048"] == 5
    assert b["5.12"] == 15
    assert b["1048.576"] == 15
    assert b["2097.152"] == 16
    assert b["+Inf"] == 16
    assert list(b.values()) == sorted(b.values())
    assert sample(fams, "hft_ingest_duration_us", "hft_ingest_duration_us_count") == 16
    true_sum_us = (5 * 700 + 10 * 3_000 + 2_000_000) / 1e3
    got_sum_us = sample(fams, "hft_ingest_duration_us", "hft_ingest_duration_us_sum")
    assert abs(got_sum_us - true_sum_us) / true_sum_us < 0.13

    assert sample(fams, "hft_feature_duration_us", "hft_feature_duration_us_count") == 100
    assert buckets(fams, "hft_feature_duration_us")["49.152"] == 0  # 50 us lies above 49.152
    assert buckets(fams, "hft_feature_duration_us")["98.304"] == 100
    assert (
        sample(fams, "hft_model_duration_us", "hft_model_duration_us_count", model="fallback") == 7
    )
    assert sample(fams, "hft_route_duration_us", "hft_route_duration_us_count") == 3

    snaps = sample(fams, "hft_snapshots_per_sec", "hft_snapshots_per_sec")
    assert 0 < snaps <= 500 / 0.2
    orders = sample(fams, "hft_orders_per_sec", "hft_orders_per_sec")
    assert 0 < orders <= 4 / 0.2

    dropped = "hft_dropped_frames_total"
    assert sample(fams, "hft_dropped_frames", dropped, stage="feature") == 42
    assert sample(fams, "hft_dropped_frames", dropped, stage="risk") == 3
    assert sample(fams, "hft_dropped_frames", dropped, stage="ingest") == 0
    assert sample(fams, "hft_model_timeouts", "hft_model_timeouts_total", model="edge") == 9

    rejects = {
        s.labels["reason"]: s.value
        for s in fams["hft_order_rejects"].samples  # type: ignore[attr-defined]
        if s.name == "hft_order_rejects_total"
    }
    assert set(rejects) == set(schema.REJECT_REASONS) - {"none"}
    assert rejects["stale_book"] == 2
    assert rejects["daily_loss"] == 1
    assert sum(rejects.values()) == 3


def test_engine_level_metrics(engine: Engine, port: int) -> None:
    now = time.monotonic_ns()
    me = os.getpid()
    ingest, feature, route, risk = (
        engine.stage_stats(r) for r in ("ingest", "feature", "route", "risk")
    )
    engine.control[CTL_PID + schema.ROLE_INDEX["ingest"]] = me
    engine.control[CTL_PID + schema.ROLE_INDEX["route"]] = me
    engine.control[CTL_RESTARTS + schema.ROLE_INDEX["route"]] = 2
    ingest.set(schema.C_HEARTBEAT_NS, now)
    route.set(schema.C_HEARTBEAT_NS, now - 5_000_000_000)
    ingest.add(schema.C_PROCESSED, 11)
    ingest.add(schema.C_PUBLISHED, 10)
    ingest.add(schema.C_MALFORMED, 4)
    ingest.add(schema.C_RECONNECTS, 2)
    ingest.add(schema.C_VENUE_ERRORS, 3)
    ingest.add(schema.C_STALE, 7)
    ingest.add(schema.C_GAPS, 5)
    ingest.add(schema.C_RESYNCS, 4)
    ingest.add(schema.C_RATE_LIMITED, 9)
    feature.add(schema.C_PROCESSED, 10)
    risk.record_ns(schema.H_E2E, 40_000, 6)
    risk.add(schema.C_FILLS, 5)
    risk.gauges[schema.G_REALIZED] = 12.5
    risk.gauges[schema.G_UNREALIZED] = -3.25
    risk.gauges[schema.G_FEES] = 0.75
    engine.writer("md_book").offer_array(np.zeros(10, schema.BOOK))

    fams = scrape(port)
    assert sample(fams, "hft_engine_up", "hft_engine_up") == 1
    assert sample(fams, "hft_tick_to_order_us", "hft_tick_to_order_us_count") == 6
    assert buckets(fams, "hft_tick_to_order_us")["49.152"] == 6
    assert buckets(fams, "hft_tick_to_order_us")["20.48"] == 0
    processed = "hft_stage_processed_total"
    assert sample(fams, "hft_stage_processed", processed, stage="ingest") == 11
    assert sample(fams, "hft_stage_processed", processed, stage="feature") == 10
    published = "hft_stage_published_total"
    assert sample(fams, "hft_stage_published", published, stage="ingest") == 10
    malformed = "hft_malformed_messages_total"
    assert sample(fams, "hft_malformed_messages", malformed, stage="ingest") == 4
    assert sample(fams, "hft_ring_depth", "hft_ring_depth", ring="md_book", reader="feature") == 10
    assert sample(fams, "hft_ring_depth", "hft_ring_depth", ring="md_book", reader="risk") == 10
    assert sample(fams, "hft_ring_depth", "hft_ring_depth", ring="orders", reader="risk") == 0
    assert sample(fams, "hft_ring_capacity", "hft_ring_capacity", ring="md_book") == 4096
    assert sample(fams, "hft_ring_capacity", "hft_ring_capacity", ring="orders") == 1024
    assert sample(fams, "hft_stage_up", "hft_stage_up", stage="ingest") == 1
    assert sample(fams, "hft_stage_up", "hft_stage_up", stage="route") == 0  # stale heartbeat
    assert sample(fams, "hft_stage_up", "hft_stage_up", stage="feature") == 0  # never beat
    restarts = "hft_stage_restarts_total"
    assert sample(fams, "hft_stage_restarts", restarts, stage="route") == 2
    assert sample(fams, "hft_stage_restarts", restarts, stage="ingest") == 0
    assert sample(fams, "hft_reconnects", "hft_reconnects_total") == 2
    assert sample(fams, "hft_fills", "hft_fills_total") == 5
    assert sample(fams, "hft_venue_errors", "hft_venue_errors_total") == 3
    assert sample(fams, "hft_stale_books", "hft_stale_books_total") == 7
    assert sample(fams, "hft_book_gaps", "hft_book_gaps_total") == 5
    assert sample(fams, "hft_book_resyncs", "hft_book_resyncs_total") == 4
    assert sample(fams, "hft_rate_limited", "hft_rate_limited_total") == 9
    assert sample(fams, "hft_duplicates", "hft_duplicates_total", stage="risk") == 0
    assert sample(fams, "hft_pnl_realized", "hft_pnl_realized") == 12.5
    assert sample(fams, "hft_pnl_unrealized", "hft_pnl_unrealized") == -3.25
    assert sample(fams, "hft_fees", "hft_fees_total") == 0.75


def _reasons(fams: dict[str, object]) -> dict[str, float]:
    return {
        s.labels["reason"]: s.value
        for s in fams["hft_trading_state_reason"].samples  # type: ignore[attr-defined]
    }


def test_trading_state_reason_and_breaker_trips(engine: Engine, port: int) -> None:
    fams = scrape(port)
    assert sample(fams, "hft_trading_state", "hft_trading_state") == 0
    assert _reasons(fams) == {r: (1.0 if r == "none" else 0.0) for r in rk.REASONS}
    assert sample(fams, "hft_circuit_breaker_trips", "hft_circuit_breaker_trips_total") == 0

    risk = engine.stage_stats("risk")
    risk.gauges[rk.G_TRADING_STATE] = rk.REDUCING
    risk.gauges[rk.G_TRADING_REASON] = rk.R_LEVERAGE
    risk.gauges[rk.G_BREAKER_TRIPS] = 3
    fams = scrape(port)
    assert sample(fams, "hft_trading_state", "hft_trading_state") == 1
    assert _reasons(fams)["leverage"] == 1 and sum(_reasons(fams).values()) == 1
    assert sample(fams, "hft_circuit_breaker_trips", "hft_circuit_breaker_trips_total") == 3

    # the control block's kill is HALTED with its reason, whatever risk last published
    engine.control[CTL_KILL] = rk.R_DAILY_LOSS
    fams = scrape(port)
    assert sample(fams, "hft_trading_state", "hft_trading_state") == 2
    assert _reasons(fams)["daily_loss"] == 1 and sum(_reasons(fams).values()) == 1
    engine.control[CTL_KILL] = 1  # hft kill
    assert _reasons(scrape(port))["manual"] == 1
    # reset, and risk has not caught up with it yet: not halted any more
    engine.control[CTL_KILL] = 0
    risk.gauges[rk.G_TRADING_STATE] = rk.HALTED
    risk.gauges[rk.G_TRADING_REASON] = rk.R_MANUAL
    fams = scrape(port)
    assert sample(fams, "hft_trading_state", "hft_trading_state") == 0
    assert _reasons(fams)["none"] == 1


def _model_samples(fams: dict[str, object], family: str, name: str) -> dict[str, float]:
    return {
        s.labels["model"]: s.value
        for s in fams[family].samples  # type: ignore[attr-defined]
        if s.name == name
    }


def test_model_metrics_per_model_and_the_fallback(engine: Engine, port: int) -> None:
    inference = engine.stage_stats("inference")
    fams = scrape(port)  # a fresh engine: no model has run, the fallback series is there
    assert _model_samples(fams, "hft_model_duration_us", "hft_model_duration_us_count") == {
        "fallback": 0
    }
    assert _model_samples(fams, "hft_model_timeouts", "hft_model_timeouts_total") == dict.fromkeys(
        schema.MODEL_NAMES, 0
    )
    ood_fresh = _model_samples(fams, "hft_model_out_of_domain", "hft_model_out_of_domain_total")
    assert ood_fresh == dict.fromkeys(schema.MODEL_NAMES, 0)

    def model_add(name: str, which: int, n: int) -> None:
        i = schema.MODEL_NAMES.index(name)
        inference.add(schema.MODEL_COUNTERS_BASE + i * schema.N_MODEL_COUNTERS + which, n)

    inference.record_ns(schema.H_MODEL_BASE + 0, 20_000, 30)  # edge: 30 runs of 20 us
    model_add("edge", schema.MODEL_RUNS, 30)
    inference.record_ns(schema.H_MODEL_BASE + 2, 4_000_000, 2)  # idec: 2 runs of 4 ms
    model_add("idec", schema.MODEL_RUNS, 2)
    model_add("idec", schema.MODEL_TIMEOUTS, 7)
    model_add("transformer", schema.MODEL_TIMEOUTS, 5)  # always skipped: no run
    model_add("edge", schema.MODEL_ERRORS, 1)
    model_add("edge", schema.MODEL_OUT_OF_DOMAIN, 11)
    model_add("idec", schema.MODEL_OUT_OF_DOMAIN, 3)
    inference.add(schema.C_MODEL_TIMEOUTS, 12)
    inference.record_ns(schema.H_DURATION, 30_000, 40)
    fams = scrape(port)
    counts = _model_samples(fams, "hft_model_duration_us", "hft_model_duration_us_count")
    assert counts == {"edge": 30, "idec": 2}  # models answered and never fell back
    assert buckets(fams, "hft_model_duration_us")  # the parser merges the labels' buckets
    timeouts = _model_samples(fams, "hft_model_timeouts", "hft_model_timeouts_total")
    assert timeouts == {"edge": 0, "gbdt": 0, "idec": 7, "transformer": 5}
    assert sum(timeouts.values()) == inference.ints[schema.C_MODEL_TIMEOUTS]
    runs = _model_samples(fams, "hft_model_runs", "hft_model_runs_total")
    assert runs == {"edge": 30, "gbdt": 0, "idec": 2, "transformer": 0}
    errors = _model_samples(fams, "hft_model_errors", "hft_model_errors_total")
    assert errors == {"edge": 1, "gbdt": 0, "idec": 0, "transformer": 0}
    ood = _model_samples(fams, "hft_model_out_of_domain", "hft_model_out_of_domain_total")
    assert ood == {"edge": 11, "gbdt": 0, "idec": 3, "transformer": 0}
    assert fams["hft_model_out_of_domain"].type == "counter"  # type: ignore[attr-defined]

    inference.add(schema.C_FALLBACKS, 3)  # some batches fell back: the stage's series returns
    counts = _model_samples(scrape(port), "hft_model_duration_us", "hft_model_duration_us_count")
    assert counts == {"edge": 30, "idec": 2, "fallback": 40}


# ---------------------------------------------------------------- no engine, restarts
def test_no_engine_exports_only_engine_up_zero() -> None:
    server, thread, port = exporter.start_exporter(_namespace(), "127.0.0.1", 0)
    try:
        fams = scrape(port)
    finally:
        exporter.stop_exporter(server)
        thread.join(timeout=5)
    assert list(fams) == ["hft_engine_up"]
    assert sample(fams, "hft_engine_up", "hft_engine_up") == 0


def test_bad_namespace_never_raises() -> None:
    collector = exporter.ShmCollector(namespace="no/such")
    fams = list(collector.collect())
    assert [f.name for f in fams] == ["hft_engine_up"]
    assert fams[0].samples[0].value == 0


def test_reattaches_when_the_engine_is_recreated(engine: Engine, port: int) -> None:
    ns = engine.namespace
    engine.stage_stats("ingest").add(schema.C_PROCESSED, 7)
    processed = "hft_stage_processed_total"
    assert sample(scrape(port), "hft_stage_processed", processed, stage="ingest") == 7

    engine.unlink()  # the supervisor stopped
    fams = scrape(port)
    assert list(fams) == ["hft_engine_up"]
    assert sample(fams, "hft_engine_up", "hft_engine_up") == 0

    eng2 = Engine.create(config.from_dict({"engine": {"namespace": ns}}))  # a new run
    try:
        eng2.stage_stats("ingest").add(schema.C_PROCESSED, 3)
        fams = scrape(port)
        assert sample(fams, "hft_engine_up", "hft_engine_up") == 1
        assert sample(fams, "hft_stage_processed", processed, stage="ingest") == 3

        time.sleep(0.002)  # a different creation time even on a coarse clock
        eng2.unlink()
        eng3 = Engine.create(config.from_dict({"engine": {"namespace": ns}}))  # replaced at once
        try:
            eng3.stage_stats("ingest").add(schema.C_PROCESSED, 99)
            fams = scrape(port)
            assert sample(fams, "hft_stage_processed", processed, stage="ingest") == 99
        finally:
            eng3.unlink()
    finally:
        eng2.unlink()


# ---------------------------------------------------------------- rates and buckets
def test_rates_over_a_sliding_window(engine: Engine) -> None:
    clock = [1_000_000_000_000]
    collector = exporter.ShmCollector(
        namespace=engine.namespace, rate_window_s=10.0, clock_ns=lambda: clock[0]
    )
    ingest, risk = engine.stage_stats("ingest"), engine.stage_stats("risk")

    def rates() -> tuple[float, float]:
        fams = {f.name: f for f in collector.collect()}
        return (
            fams["hft_snapshots_per_sec"].samples[0].value,
            fams["hft_orders_per_sec"].samples[0].value,
        )

    try:
        assert rates() == (0.0, 0.0)  # one sample: no rate yet
        ingest.add(schema.C_SNAPSHOTS, 2_000)
        risk.add(schema.C_ORDERS, 30)
        clock[0] += 2_000_000_000
        assert rates() == (1_000.0, 15.0)
        for _ in range(12):  # steady 500/s, sampled every 1 s: the window forgets the start
            ingest.add(schema.C_SNAPSHOTS, 500)
            clock[0] += 1_000_000_000
            snaps, orders = rates()
        assert snaps == pytest.approx(500.0)
        assert orders == 0.0
    finally:
        collector.close()


def test_rate_window_survives_a_counter_reset() -> None:
    w = exporter.RateWindow(window_ns=10_000_000_000)
    assert w.update(now_ns=0, value=100) == 0.0
    assert w.update(now_ns=1_000_000_000, value=200) == 100.0
    assert w.update(now_ns=2_000_000_000, value=5) == 0.0  # restarted: not a negative rate
    assert w.update(now_ns=3_000_000_000, value=105) == 100.0


def test_exported_boundaries_are_exact_bucket_edges() -> None:
    uppers = set(stats.upper_bounds_ns().tolist())
    values = [float(le) for le in exporter.BOUNDARY_LABELS_US]
    assert values == sorted(values)
    assert values[0] < 1 and values[-1] > 500_000
    for us in values:
        assert round(us * 1e3) in uppers
    counts = np.zeros(schema.HIST_BUCKETS, dtype=np.int64)
    for ns in range(1, 2_000_000, 997):
        counts[stats.bucket_of(ns)] += 1
    pairs, _ = exporter.histogram_buckets(counts)
    for le, cum in pairs[:-1]:
        assert cum == sum(1 for ns in range(1, 2_000_000, 997) if ns < float(le) * 1e3)
    assert pairs[-1] == ("+Inf", float(counts.sum()))


# ---------------------------------------------------------------- the CLI
def test_main_serves_until_sigterm(engine: Engine, tmp_path: Path) -> None:
    cfg_path = tmp_path / "engine.toml"
    cfg_path.write_text(
        f'[engine]\nnamespace = "{engine.namespace}"\n[ops]\nmetrics_host = "127.0.0.1"\n'
    )
    engine.stage_stats("ingest").add(schema.C_PROCESSED, 21)
    proc = subprocess.Popen(
        [sys.executable, "-m", "ops.exporter", "--config", str(cfg_path), "--port", "0"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stderr is not None
        url = ""
        for raw in proc.stderr:
            doc = orjson.loads(raw)
            if doc.get("msg") == "exporter listening":
                url = doc["url"]
                break
        assert url.startswith("http://127.0.0.1:")
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        fams = scrape(port)
        processed = "hft_stage_processed_total"
        assert sample(fams, "hft_stage_processed", processed, stage="ingest") == 21
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
