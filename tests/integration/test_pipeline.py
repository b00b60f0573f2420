"""The supervised pipeline as real processes: it trades, it survives kill -9, it drains cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ops.supervisor import free_port
from shm import schema, segment
from stages import config
from stages.wiring import CTL_PID, CTL_RESTARTS, Engine

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def write_config(tmp_path: Path, ns: str, **sections: dict[str, object]) -> Path:
    """The shipped config with a private namespace and free ports, plus ``sections``."""
    overrides: dict[str, dict[str, object]] = {
        "engine": {"namespace": ns},
        "ops": {"metrics_port": free_port(), "api_port": free_port()},
        "paper": {"journal_path": str(tmp_path / "journal.sqlite")},  # not the repo's var/
    }
    for section, values in sections.items():
        overrides.setdefault(section, {}).update(values)
    path = tmp_path / "engine.toml"
    path.write_text(config.variant_text(overrides))
    config.load(path)  # fail here, not in the engine, if the test wrote a bad file
    return path


def start(cfg_path: Path, tmp_path: Path, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ops.cli",
            "paper",
            "--config",
            str(cfg_path),
            "--log-dir",
            str(tmp_path / "logs"),
            *extra,
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def wait_for(cond, timeout_s: float, what: str, proc: subprocess.Popen[bytes] | None = None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(
                f"engine exited ({proc.returncode}) while waiting for {what}: "
                f"{proc.stderr.read().decode()[-3000:] if proc.stderr else ''}"
            )
        value = cond()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def attach(ns: str) -> Engine | None:
    try:
        return Engine.attach(ns)
    except segment.SegmentError:
        return None


def counter(eng: Engine, role: str, c: int) -> int:
    return int(eng.stats_all[schema.ROLE_INDEX[role]]["ints"][c])


@pytest.fixture
def ns():
    name = f"it{uuid.uuid4().hex[:8]}"
    yield name
    segment.unlink_all(name)


def test_paper_run_trades_and_writes_the_summary(tmp_path: Path, ns: str):
    cfg_path = write_config(tmp_path, ns)
    summary = tmp_path / "summary.json"
    proc = start(cfg_path, tmp_path, "--duration", "20", "--summary", str(summary))
    try:
        eng = wait_for(lambda: attach(ns), 30, "the engine's segments", proc)
        wait_for(lambda: counter(eng, "risk", schema.C_ORDERS) > 0, 60, "the first order", proc)
        port = config.load(cfg_path).ops.metrics_port
        body = (
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        )
        out, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err.decode()[-3000:]
    doc = orjson.loads(summary.read_bytes())
    assert set(doc) >= {
        "mode",
        "duration_s",
        "symbols",
        "snapshots",
        "features",
        "signals",
        "orders",
        "fills",
        "rejects",
        "dropped_frames",
        "pnl",
        "tick_to_order_us",
        "stages",
    }
    assert doc["mode"] == "paper"
    assert doc["symbols"] == ["BTC", "ETH", "SOL", "DOGE"]
    assert doc["snapshots"] > 1000
    assert doc["features"] > 0 and doc["signals"] > 0
    assert doc["orders"] > 0, "the default configuration must trade"
    assert doc["fills"] > 0
    assert doc["tick_to_order_us"]["p50"] is not None and doc["tick_to_order_us"]["p50"] > 0
    assert set(doc["stages"]) == set(schema.STAGE_ROLES)
    for role, st in doc["stages"].items():
        assert st["pid"] > 0 and st["cpus"], role
        assert st["processed"] > 0, role
    assert "run summary" in out.decode()
    assert segment.list_segments(ns) == [], "a clean stop unlinks every segment"

    families = {f.name: f for f in text_string_to_metric_families(body)}
    for name in (
        "hft_ingest_duration_us",
        "hft_feature_duration_us",
        "hft_model_duration_us",
        "hft_route_duration_us",
    ):
        assert families[name].type == "histogram", name
    for name in ("hft_snapshots_per_sec", "hft_orders_per_sec"):
        assert families[name].type == "gauge", name
    for name in (
        "hft_dropped_frames",
        "hft_model_timeouts",
        "hft_order_rejects",
    ):  # counters lose _total
        assert families[name].type == "counter", name
    ingest = [s for s in families["hft_ingest_duration_us"].samples if s.name.endswith("_count")]
    assert ingest and ingest[0].value > 0


def test_kill_9_stage_is_restarted_and_the_pipeline_flows_again(tmp_path: Path, ns: str):
    cfg_path = write_config(tmp_path, ns)
    proc = start(cfg_path, tmp_path)
    try:
        eng = wait_for(lambda: attach(ns), 30, "the engine's segments", proc)
        wait_for(
            lambda: counter(eng, "inference", schema.C_PROCESSED) > 500,
            60,
            "flowing features",
            proc,
        )
        for role in ("feature", "risk"):
            idx = schema.ROLE_INDEX[role]
            victim = int(eng.control[CTL_PID + idx])
            assert victim > 0
            os.kill(victim, signal.SIGKILL)
            new_pid = wait_for(
                lambda idx=idx, victim=victim: (
                    int(eng.control[CTL_PID + idx]) not in (0, victim)
                    and int(eng.control[CTL_PID + idx])
                ),
                30,
                f"{role} restarted",
                proc,
            )
            assert segment.pid_alive(new_pid)
            assert int(eng.control[CTL_RESTARTS + idx]) == 1
            before = counter(eng, "inference", schema.C_PROCESSED)
            wait_for(
                lambda before=before: counter(eng, "inference", schema.C_PROCESSED) > before + 500,
                30,
                f"the pipeline flowing after {role} restarted",
                proc,
            )
        orders_before = counter(eng, "risk", schema.C_ORDERS)
        wait_for(
            lambda: counter(eng, "risk", schema.C_ORDERS) > orders_before,
            60,
            "orders after the restarts",
            proc,
        )
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    log = err.decode()
    assert '"msg":"stage died; restarting"' in log and '"role":"feature"' in log
    assert "SIGKILL" in log
    assert segment.list_segments(ns) == []


def test_ctrl_c_drains_cancels_resting_orders_and_cleans_up(tmp_path: Path, ns: str):
    # a long order life so that orders are resting when we stop
    cfg_path = write_config(tmp_path, ns, route={"order_ttl_ms": 60000})
    proc = start(cfg_path, tmp_path)
    try:
        eng = wait_for(lambda: attach(ns), 30, "the engine's segments", proc)
        wait_for(lambda: int(eng.positions["open_orders"].sum()) > 0, 90, "a resting order", proc)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err.decode()[-2000:]
    assert "run summary" in out.decode()
    assert '"msg":"stop requested"' in err.decode()
    assert "did not confirm the drain" not in err.decode()
    assert segment.list_segments(ns) == []
    assert not list(Path("/dev/shm").glob(f"sem.hft.{ns}.*"))


def test_a_second_engine_in_the_same_namespace_is_refused(tmp_path: Path, ns: str):
    cfg_path = write_config(tmp_path, ns)
    proc = start(cfg_path, tmp_path)
    try:
        wait_for(lambda: attach(ns), 30, "the engine's segments", proc)
        second = subprocess.run(
            [
                sys.executable,
                "-m",
                "ops.cli",
                "paper",
                "--config",
                str(cfg_path),
                "--duration",
                "5",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode == 1
        assert f"an engine already runs in namespace '{ns}'" in second.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)


def test_monitor_once_json_reads_a_running_engine(tmp_path: Path, ns: str):
    cfg_path = write_config(tmp_path, ns)
    proc = start(cfg_path, tmp_path)
    try:
        eng = wait_for(lambda: attach(ns), 30, "the engine's segments", proc)
        wait_for(lambda: counter(eng, "risk", schema.C_ORDERS) > 0, 60, "the first order", proc)
        mon = subprocess.run(
            [sys.executable, "-m", "ops.cli", "monitor", "--namespace", ns, "--once", "--json"],
            cwd=ROOT,
            capture_output=True,
            timeout=60,
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    assert mon.returncode == 0, mon.stderr.decode()
    doc = orjson.loads(mon.stdout)
    for role in schema.STAGE_ROLES:
        st = doc["stages"][role]
        assert st["alive"] is True and st["pid"] > 0, role
        assert st["cpus"], role
        assert st["processed"] > 0, role
    assert doc["tick_to_order_us"]["p50"] > 0
    after = subprocess.run(
        [sys.executable, "-m", "ops.cli", "monitor", "--namespace", ns, "--once", "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert after.returncode == 1
    assert "no engine running" in after.stderr


def test_manual_kill_switch_cancels_everything_and_blocks_new_orders(tmp_path: Path, ns: str):
    cfg_path = write_config(tmp_path, ns, route={"order_ttl_ms": 60000})
    proc = start(cfg_path, tmp_path)

    def hft(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "ops.cli", *args, "--namespace", ns],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )

    try:
        eng = wait_for(lambda: attach(ns), 30, "the engine's segments", proc)
        wait_for(lambda: int(eng.positions["open_orders"].sum()) > 0, 90, "a resting order", proc)
        killed = hft("kill")
        assert killed.returncode == 0 and "kill switch on (manual)" in killed.stdout
        wait_for(
            lambda: int(eng.positions["open_orders"].sum()) == 0,
            10,
            "every resting order cancelled",
            proc,
        )
        orders = counter(eng, "risk", schema.C_ORDERS)
        time.sleep(3)
        assert counter(eng, "risk", schema.C_ORDERS) == orders, (
            "no order may reach the venue while killed"
        )
        reset = hft("kill", "--reset")
        assert "kill switch off" in reset.stdout
        wait_for(
            lambda: counter(eng, "risk", schema.C_ORDERS) > orders,
            60,
            "trading after the reset",
            proc,
        )
        paused = hft("pause")
        assert "trading paused" in paused.stdout
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    assert proc.returncode == 0
