"""The market-data benchmark on the shipped excerpt: shape of the result, counts, no timing."""

from __future__ import annotations

import os
from pathlib import Path

import orjson
import pytest

from benchmarks import market_data


def test_market_data_runs_on_the_excerpt_and_reports_every_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(market_data, "BINANCE_FULL", Path("/nonexistent"))  # use the excerpt
    out = market_data.run(quick=True)
    b, h = out["binance"], out["hyperliquid"]
    assert b["file"] == market_data.BINANCE_EXCERPT.name
    assert b["depth_diffs"] == 489
    # the benchmark syncs the book first, so every diff from lastUpdateId on is one book
    lines = [raw for ts, raw in market_data.read_recording(market_data.BINANCE_EXCERPT)]
    snap = next(orjson.loads(r) for r in lines if r.startswith(b'{"lastUpdateId"'))
    diffs = [orjson.loads(r)["data"] for r in lines if b"depthUpdate" in r]
    assert b["published"] == sum(d["u"] >= snap["lastUpdateId"] for d in diffs)
    assert b["gaps"] == 0 and b["malformed"] == 0
    assert b["tob_checks"] == 49 and b["tob_mismatches"] == 0
    for section in (b, h):
        for key in ("msgs_per_s", "p99_us", "parse_only_msgs_per_s"):
            assert section[key] > 0, key
        assert section["p50_us"] <= section["p99_us"] <= section["p999_us"]
    assert isinstance(b["meets_target"], bool)
    assert not [p for p in os.listdir("/dev/shm") if f"bench{os.getpid()}m" in p], "ring unlinked"
