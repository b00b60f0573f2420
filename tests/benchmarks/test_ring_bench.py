"""The ring benchmark's tests at a tiny size: shapes, content checks and cleanup, no timing."""

from __future__ import annotations

import json
import math
import os
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest

from benchmarks import __main__ as driver
from benchmarks import ring
from shm import schema

N_MSGS = 2_000  # not a multiple of the batch: the last batch is a partial one
N_ROUNDTRIPS = 300


def _leftovers() -> list[str]:
    prefix = f"bench{os.getpid()}x"
    return [p.name for p in Path("/dev/shm").iterdir() if prefix in p.name]


@pytest.fixture(autouse=True)
def _no_leaks() -> Iterator[None]:
    yield
    assert _leftovers() == [], "segments or doorbells left in /dev/shm"
    assert psutil.Process().children() == [], "a benchmark child was not reaped"


def _positive_finite(d: dict[str, object], keys: tuple[str, ...]) -> None:
    for k in keys:
        v = d[k]
        assert isinstance(v, int | float) and math.isfinite(v) and v > 0, (k, v)


@pytest.mark.parametrize("name", ["shm_ring", "shm_ring_block", "os_pipe"])
def test_pingpong(name: str) -> None:
    res = ring.pingpong(name, N_ROUNDTRIPS, budget_s=10.0)
    _positive_finite(res, ("p50_us", "p99_us", "p999_us", "n_roundtrips"))
    assert res["n_roundtrips"] == N_ROUNDTRIPS
    assert res["p50_us"] <= res["p99_us"] <= res["p999_us"]
    assert res["latency_errors"] == 0


@pytest.mark.parametrize("name", ["shm_ring", "os_pipe"])
def test_one_to_one(name: str) -> None:
    res = ring.one_to_one(name, N_MSGS)
    _positive_finite(res, ("msgs_per_s", "n_msgs"))
    assert res["n_msgs"] == N_MSGS
    assert res["errors"] == 0


@pytest.mark.parametrize("name", ["shm_ring", "os_pipe"])
def test_one_to_one_batched(name: str) -> None:
    res = ring.one_to_one_batched(name, N_MSGS, batch=256)
    _positive_finite(res, ("batch_msgs_per_s", "n_batch_msgs", "batch_size"))
    assert res["n_batch_msgs"] == N_MSGS
    assert res["batch_errors"] == 0


def test_checks_catch_wrong_records() -> None:
    """Zero errors above means something only because the checks do see bad records."""
    buf = bytearray(ring.template())
    assert len(buf) == schema.BOOK.itemsize
    ring.stamp(buf, 41)
    assert ring._CHECK(buf) == (41, 41.0)
    rec = np.frombuffer(bytes(buf), schema.BOOK)[0]
    assert rec["seq"] == 41 and rec["ask_sz"][-1] == 41.0 and rec["bid_px"][0] == 65_000.0

    ramp = np.arange(8, dtype=np.uint64)
    arr = np.frombuffer(bytearray(ring.template() * 8), schema.BOOK)
    ring.stamp_array(arr, 100, ramp)
    assert ring.count_bad(arr, 100, ramp) == 0
    assert ring.count_bad(arr, 101, ramp) == 8  # shifted: every record out of order
    arr["ask_sz"][3, -1] = 0.0  # a torn record: head and tail disagree
    assert ring.count_bad(arr, 100, ramp) == 1


def test_driver_records_missing_and_failing_sections(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    ok = types.ModuleType("_bench_fake_ok")
    ok.run = lambda *, quick: {"a": {"p50_us": 1.0, "msgs_per_s": np.float64(2.0)}, "x": math.inf}
    bad = types.ModuleType("_bench_fake_bad")

    def boom(*, quick: bool) -> dict[str, object]:
        raise RuntimeError("boom")

    bad.run = boom
    monkeypatch.setitem(sys.modules, ok.__name__, ok)
    monkeypatch.setitem(sys.modules, bad.__name__, bad)
    registry = [("ok", ok.__name__), ("missing", "_bench_no_such_module"), ("bad", bad.__name__)]
    monkeypatch.setattr(driver, "REGISTRY", registry)

    out = tmp_path / "b.json"
    code = driver.main(["--quick", "--json", str(out)])
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    assert json.loads(out.read_text()) == doc
    assert code == 1
    assert doc["quick"] is True
    assert set(doc["machine"]) >= {"cpu model", "cores", "python", "kernel", "date"}
    assert doc["ok"] == {"a": {"p50_us": 1.0, "msgs_per_s": 2.0}, "x": None}
    assert "not available" in doc["missing"]["error"]
    assert doc["bad"] == {"error": "RuntimeError: boom"}
    assert "boom" in captured.err

    assert driver.main(["--only", "ok,missing"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert set(doc) == {"machine", "quick", "ok", "missing"}
