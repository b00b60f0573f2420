"""``hft monitor`` against a real engine in shared memory, this test process posing as stages."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from ops import monitor
from shm import schema, segment, stats
from stages import config
from stages import riskengine as rk
from stages.wiring import CTL_KILL, CTL_PID, CTL_RESTARTS, Engine

ROOT = Path(__file__).resolve().parents[2]
_seq = itertools.count()


def _namespace() -> str:
    return f"t{os.getpid()}xmon{next(_seq)}"


@pytest.fixture
def engine() -> Iterator[Engine]:
    eng = Engine.create(config.from_dict({"engine": {"namespace": _namespace()}}))
    try:
        yield eng
    finally:
        eng.unlink()


def _bucket_width_us(ns: int) -> float:
    lo, hi = stats.bucket_bounds_ns(stats.bucket_of(ns))
    return (hi - lo) / 1e3


def _pose_as(engine: Engine, *roles: str) -> None:
    for role in roles:
        engine.control[CTL_PID + schema.ROLE_INDEX[role]] = os.getpid()


def _run_json(ns: str, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    assert monitor.main(["--namespace", ns, "--once", "--json"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1  # one document
    doc: dict[str, Any] = orjson.loads(out)
    return doc


def test_once_json_reports_every_stage(
    engine: Engine, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _pose_as(engine, "ingest", "feature", "risk")
    feature, risk = engine.stage_stats("feature"), engine.stage_stats("risk")
    feature.record_ns(schema.H_DURATION, 10_000, 100)
    feature.record_ns(schema.H_DURATION, 200_000, 1)
    feature.add(schema.C_PROCESSED, 12_345)
    engine.stage_stats("ingest").add(schema.C_DROPPED, 4)
    engine.stage_stats("ingest").add(schema.C_GAPS, 3)
    engine.stage_stats("ingest").add(schema.C_RESYNCS, 2)
    feature.add(schema.C_DROPPED, 1)
    engine.control[CTL_RESTARTS + schema.ROLE_INDEX["feature"]] = 3
    engine.writer("md_book").offer_array(np.zeros(10, schema.BOOK))
    risk.record_ns(schema.H_E2E, 80_000, 50)
    risk.add(schema.C_ORDERS, 8)
    risk.add(schema.C_FILLS, 6)
    risk.reject(schema.REJECT_CODE["kill_switch"])
    risk.reject(schema.REJECT_CODE["kill_switch"])
    risk.gauges[schema.G_REALIZED] = 101.5
    risk.gauges[schema.G_UNREALIZED] = -2.0

    slept: list[float] = []

    def sleep_and_work(seconds: float) -> None:
        slept.append(seconds)
        time.sleep(0.1)
        feature.add(schema.C_PROCESSED, 500)

    monkeypatch.setattr(monitor, "_sleep", sleep_and_work)
    doc = _run_json(engine.namespace, capsys)

    assert slept == [monitor.ONCE_INTERVAL_S]
    assert doc["namespace"] == engine.namespace
    assert abs(doc["ts"] - time.time()) < 60
    assert set(doc["stages"]) == set(schema.STAGE_ROLES)
    f = doc["stages"]["feature"]
    assert f["pid"] == os.getpid()
    assert f["alive"] is True
    assert f["cpus"] == sorted(os.sched_getaffinity(0))
    assert f["cpu_percent"] is not None and f["cpu_percent"] >= 0
    assert f["rss_bytes"] > 1_000_000
    assert f["ctx_voluntary"] >= 0 and f["ctx_involuntary"] >= 0
    assert f["processed"] == 12_845
    assert 0 < f["throughput_per_s"] <= 500 / 0.1
    assert abs(f["p50_us"] - 10.0) <= _bucket_width_us(10_000)
    assert abs(f["p99_us"] - 10.0) <= _bucket_width_us(10_000)
    assert abs(f["p999_us"] - 200.0) <= _bucket_width_us(200_000)
    assert f["restarts"] == 3
    # feature reads md_book and md_trade: the depth adds up, the fill is the fullest ring's
    assert f["ring_depth"] == 10
    assert f["ring_fill_pct"] == pytest.approx(100 * 10 / 4096)
    assert f["inputs"]["md_book"] == {"depth": 10, "capacity": 4096, "fill_pct": 100 * 10 / 4096}
    assert doc["stages"]["risk"]["ring_depth"] == 10  # md_book reader 1, plus orders and md_trade

    ingest = doc["stages"]["ingest"]
    assert ingest["ring_depth"] is None and ingest["ring_fill_pct"] is None  # reads no ring
    assert ingest["p50_us"] is None  # empty histogram: NaN written as null

    route = doc["stages"]["route"]  # no pid recorded
    assert route["pid"] == 0 and route["alive"] is False
    assert route["cpus"] is None and route["cpu_percent"] is None and route["rss_bytes"] is None

    t2o = doc["tick_to_order_us"]
    assert abs(t2o["p50"] - 80.0) <= _bucket_width_us(80_000)
    assert abs(t2o["p99"] - 80.0) <= _bucket_width_us(80_000)
    assert t2o["p999"] is not None
    assert doc["dropped_frames"] == 5
    assert doc["orders"] == 8
    assert doc["fills"] == 6
    assert doc["rejects"] == 2
    assert doc["rejects_by_reason"] == {"kill_switch": 2}
    assert doc["feed"]["gaps"] == 3 and doc["feed"]["resyncs"] == 2
    assert doc["feed"]["reconnects"] == 0 and doc["feed"]["rate_limited"] == 0
    assert doc["pnl"]["realized"] == 101.5
    assert doc["pnl"]["unrealized"] == -2.0


def test_once_prints_an_aligned_table(
    engine: Engine, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _pose_as(engine, "route")
    engine.stage_stats("route").record_ns(schema.H_DURATION, 3_000, 10)
    monkeypatch.setattr(monitor, "_sleep", lambda s: None)
    assert monitor.main(["--namespace", engine.namespace, "--once"]) == 0
    out = capsys.readouterr().out
    assert "\x1b[" not in out  # not a terminal: no escape codes
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("stage "))
    for unit in ("cpu %", "rss MiB", "fill %", "rec/s", "p50 us", "p99 us", "p99.9 us"):
        assert unit in lines[header]
    rows = lines[header + 2 : header + 2 + len(schema.STAGE_ROLES)]
    assert [r.split()[0] for r in rows] == list(schema.STAGE_ROLES)
    # numeric columns are right-aligned under their headers ("-" when there is no data)
    for title in ("processed", "p50 us", "restarts"):
        end = lines[header].index(title) + len(title)
        assert all(r[end - 1] != " " and (len(r) == end or r[end] == " ") for r in rows)
    route = rows[schema.ROLE_INDEX["route"]].split()
    assert route[1] == str(os.getpid()) and route[2] == "yes"
    assert "tick-to-order us" in out and "PnL" in out


def test_models_report_out_of_domain_per_model_in_json_and_table(
    engine: Engine, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    inference = engine.stage_stats("inference")

    def model_add(name: str, which: int, n: int) -> None:
        i = schema.MODEL_NAMES.index(name)
        inference.add(schema.MODEL_COUNTERS_BASE + i * schema.N_MODEL_COUNTERS + which, n)

    inference.add(schema.C_SIGNALS, 1_000)
    inference.add(schema.C_FALLBACKS, 30)
    inference.record_ns(schema.H_MODEL_BASE + 0, 20_000, 100)  # edge: 100 runs of 20 us
    model_add("edge", schema.MODEL_RUNS, 100)
    model_add("edge", schema.MODEL_OUT_OF_DOMAIN, 25)  # of 1,000 ticks
    inference.record_ns(schema.H_MODEL_BASE + 3, 900_000, 60)  # transformer: 60 runs of 900 us
    model_add("transformer", schema.MODEL_RUNS, 60)
    model_add("transformer", schema.MODEL_TIMEOUTS, 200)
    model_add("transformer", schema.MODEL_OUT_OF_DOMAIN, 80)  # of the 800 ticks not timed out
    model_add("idec", schema.MODEL_TIMEOUTS, 1_000)  # never ran in time: no share
    monkeypatch.setattr(monitor, "_sleep", lambda s: None)

    doc = _run_json(engine.namespace, capsys)
    by_model = doc["models"]["by_model"]
    assert list(by_model) == ["edge", "idec", "transformer"]  # gbdt never ran: not listed
    edge, idec, tr = by_model["edge"], by_model["idec"], by_model["transformer"]
    assert (edge["out_of_domain"], edge["out_of_domain_share"]) == (25, pytest.approx(0.025))
    assert (tr["out_of_domain"], tr["out_of_domain_share"]) == (80, pytest.approx(0.1))
    assert (idec["out_of_domain"], idec["out_of_domain_share"]) == (0, None)
    assert (edge["runs"], tr["runs"], tr["timeouts"], idec["timeouts"]) == (100, 60, 200, 1_000)
    assert doc["models"]["fallback_share"] == pytest.approx(0.03)

    assert monitor.main(["--namespace", engine.namespace, "--once"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("models "))
    assert "edge runs 100 timeouts 0 out-of-domain 25 (2.5%) p99 " in line
    assert "idec runs 0 timeouts 1,000 out-of-domain 0 (-) p99 - us" in line
    assert "transformer runs 60 timeouts 200 out-of-domain 80 (10.0%) p99 " in line
    assert line.endswith("fallback 3.0% of signals")


def test_trading_state_in_json_and_table(
    engine: Engine, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(monitor, "_sleep", lambda s: None)
    doc = _run_json(engine.namespace, capsys)
    assert doc["trading"] == {"state": "active", "reason": "none", "breaker_trips": 0}
    risk = engine.stage_stats("risk")
    risk.gauges[rk.G_TRADING_STATE] = rk.REDUCING
    risk.gauges[rk.G_TRADING_REASON] = rk.R_LEVERAGE
    risk.gauges[rk.G_BREAKER_TRIPS] = 4
    doc = _run_json(engine.namespace, capsys)
    assert doc["trading"] == {"state": "reducing", "reason": "leverage", "breaker_trips": 4}
    assert monitor.main(["--namespace", engine.namespace, "--once"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("trading "))
    assert line == "trading REDUCING (leverage)   circuit breaker trips 4"
    engine.control[CTL_KILL] = rk.R_ADR_LOSS
    doc = _run_json(engine.namespace, capsys)
    assert doc["trading"]["state"] == "halted" and doc["trading"]["reason"] == "adr_loss"
    assert monitor.main(["--namespace", engine.namespace, "--once"]) == 0
    assert "trading HALTED (adr loss)" in capsys.readouterr().out


def test_interactive_mode_refreshes_until_ctrl_c(
    engine: Engine, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[float] = []

    def sleep(seconds: float) -> None:
        calls.append(seconds)
        if len(calls) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(monitor, "_sleep", sleep)
    assert monitor.main(["--namespace", engine.namespace, "--interval", "0.25"]) == 0
    out = capsys.readouterr().out
    assert calls == [0.25, 0.25, 0.25]
    assert out.count("hft monitor  namespace") == 2  # two refreshes before the interrupt


def test_no_engine_exits_1_with_a_clear_message(capsys: pytest.CaptureFixture[str]) -> None:
    ns = _namespace()
    assert monitor.main(["--namespace", ns, "--once", "--json"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err.strip()
    assert err == (
        f"hft monitor: no engine running in namespace '{ns}' "
        f"(no /dev/shm/hft.{ns}.control); start one with ./run.sh paper"
    )


def test_segments_left_by_a_dead_engine_count_as_no_engine(
    capsys: pytest.CaptureFixture[str],
) -> None:
    ns = _namespace()
    code = (
        "from stages import config; from stages.wiring import Engine; "
        f"Engine.create(config.from_dict({{'engine': {{'namespace': '{ns}'}}}}))"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)
    try:
        assert segment.list_segments(ns)
        assert monitor.main(["--namespace", ns, "--once"]) == 1
        err = capsys.readouterr().err
        assert f"no engine running in namespace '{ns}'" in err
        assert "which has exited" in err
    finally:
        segment.unlink_all(ns)


def test_bad_config_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "engine.toml"
    bad.write_text("[engine]\nnope = 1\n")
    assert monitor.main(["--config", str(bad), "--once"]) == 2
    assert "engine.nope" in capsys.readouterr().err
