"""End-to-end pipeline benchmark: the five supervised stages on the embedded sim feed.

Two measurements, each a real ``hft paper`` engine started as a subprocess with the shipped
configuration (only the namespace, ports and the sim's rate changed):

1. ``tick_to_order_*``: at the default load (4 symbols x 1,000 book updates/s), the
   tick-to-order latency of every order (order handed to the paper venue minus the time
   ingest received the tick's bytes), read from the risk stage's histogram over a steady
   window that starts once the first order has gone out.
2. ``max_snapshots_per_s``: the sim's rate is stepped up; a step is *sustained* when the
   engine processed at least 97% of what the sim sent in the window, no frame was dropped in
   the engine's rings and the sim dropped nothing for a slow reader. The highest sustained
   step is reported, with every step's figures, so a reader can see where it broke and why
   (the sim itself is a Python process on the other core and has a ceiling too).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from ops.supervisor import free_port
from shm import schema, segment, stats
from stages import config
from stages.wiring import Engine

ROOT = Path(__file__).resolve().parent.parent


def _config(tmp: Path, ns: str, rate_per_symbol: float) -> Path:
    overrides: dict[str, dict[str, Any]] = {
        "engine": {"namespace": ns},
        "ops": {"metrics_port": free_port()},
        "feed": {"updates_per_sec": rate_per_symbol},
        "paper": {"journal_path": str(tmp / f"{ns}.sqlite")},  # a fresh book every run
    }
    path = tmp / f"{ns}.toml"
    path.write_text(config.variant_text(overrides))
    return path


def _attach(ns: str, proc: subprocess.Popen[bytes], timeout_s: float = 120.0) -> Engine:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"engine exited with {proc.returncode} at start")
        try:
            eng = Engine.attach(ns)
            ints = eng.stats_all[schema.ROLE_INDEX["ingest"]]["ints"]
            if int(ints[schema.C_SNAPSHOTS]) > 0:
                return eng
        except segment.SegmentError:
            pass
        time.sleep(0.1)
    raise RuntimeError("engine did not start streaming in time")


def _snap(eng: Engine) -> np.ndarray:
    return eng.stats_all.copy()


def _sim_sent(log_dir: Path) -> tuple[int, int]:
    """Frames the sim sent and dropped, from its stop line."""
    sent = dropped = 0
    for line in (log_dir / "sim.log").read_text().splitlines():
        try:
            doc = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if doc.get("event") == "stop":
            sent, dropped = int(doc.get("frames_sent", 0)), int(doc.get("dropped_frames", 0))
    return sent, dropped


def run_engine(*, rate_per_symbol: float, window_s: float, warmup_s: float = 3.0) -> dict[str, Any]:
    """Run one engine, measure a steady window after warm-up, stop it; return the figures."""
    ns = f"bp{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory(prefix="hft-bench-") as tmpdir:
        tmp = Path(tmpdir)
        cfg = _config(tmp, ns, rate_per_symbol)
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ops.cli",
                "paper",
                "--config",
                str(cfg),
                "--log-dir",
                str(tmp / "logs"),
            ],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            eng = _attach(ns, proc)
            time.sleep(warmup_s)
            a, t0 = _snap(eng), time.monotonic()
            time.sleep(window_s)
            b, t1 = _snap(eng), time.monotonic()
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            segment.unlink_all(ns)
        sim_sent, sim_dropped = _sim_sent(tmp / "logs")
    dt = t1 - t0
    ingest, feature, risk = (schema.ROLE_INDEX[r] for r in ("ingest", "feature", "risk"))

    def delta(block: int, c: int) -> int:
        return int(b[block]["ints"][c]) - int(a[block]["ints"][c])

    t2o = stats.LatencySummary.of(b[risk]["hist"][schema.H_E2E] - a[risk]["hist"][schema.H_E2E])
    dropped = sum(delta(schema.ROLE_INDEX[r], schema.C_DROPPED) for r in schema.STAGE_ROLES)
    offered = rate_per_symbol * 4
    processed = delta(feature, schema.C_PROCESSED) / dt
    return {
        "rate_per_symbol": rate_per_symbol,
        "offered_snapshots_per_s": offered,
        "ingested_snapshots_per_s": round(delta(ingest, schema.C_SNAPSHOTS) / dt, 1),
        "processed_snapshots_per_s": round(processed, 1),
        "orders": delta(risk, schema.C_ORDERS),
        "tick_to_order_p50_us": t2o.p50_us,
        "tick_to_order_p99_us": t2o.p99_us,
        "tick_to_order_p999_us": t2o.p999_us,
        "dropped_frames": dropped,
        "sim_dropped_frames": sim_dropped,
        "sim_frames_sent": sim_sent,
        "sustained": bool(processed >= 0.97 * offered and dropped == 0 and sim_dropped == 0),
        "window_s": round(dt, 2),
    }


def run(*, quick: bool) -> dict[str, Any]:
    window = 15.0 if quick else 45.0
    base = run_engine(rate_per_symbol=1000, window_s=window)
    steps = (
        [1000, 1500, 2000, 2500, 3000]
        if quick
        else [1000, 1500, 2000, 2250, 2500, 2750, 3000, 4000]
    )
    ramp = [base]
    best = base["processed_snapshots_per_s"] if base["sustained"] else 0.0
    for rate in steps[1:]:
        r = run_engine(rate_per_symbol=rate, window_s=8.0 if quick else 20.0)
        ramp.append(r)
        print(
            f"[bench] pipeline at {rate * 4:,.0f}/s: processed {r['processed_snapshots_per_s']:,.0f}/s, "
            f"sustained={r['sustained']}",
            file=sys.stderr,
            flush=True,
        )
        if not r["sustained"]:
            break
        best = max(best, r["processed_snapshots_per_s"])
    return {
        "tick_to_order_p50_us": base["tick_to_order_p50_us"],
        "tick_to_order_p99_us": base["tick_to_order_p99_us"],
        "tick_to_order_p999_us": base["tick_to_order_p999_us"],
        "max_snapshots_per_s": best,
        "default_load": base,
        "ramp": ramp,
    }
