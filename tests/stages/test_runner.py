"""A stage process refuses shared memory of another layout, and one that does not exist."""

from __future__ import annotations

import struct
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from shm import schema, segment
from stages import config
from stages.wiring import Engine

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def ns():
    name = f"t{uuid.uuid4().hex[:10]}"
    yield name
    segment.unlink_all(name)


def run_stage(role: str, ns: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stages", role, "--namespace", ns],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_stage_refuses_a_segment_of_another_layout_version(ns):
    eng = Engine.create(config.from_dict({"engine": {"namespace": ns}}))
    struct.pack_into("<I", eng.segs["features"]._mm, 8, schema.LAYOUT_VERSION + 7)
    proc = run_stage("inference", ns)
    assert proc.returncode == 3
    assert f"layout version {schema.LAYOUT_VERSION + 7}" in proc.stderr
    assert f"this build uses version {schema.LAYOUT_VERSION}" in proc.stderr


def test_stage_without_an_engine_says_so(ns):
    proc = run_stage("route", ns)
    assert proc.returncode == 3
    assert "does not exist" in proc.stderr and "supervisor" in proc.stderr
