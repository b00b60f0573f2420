"""The kill-switch benchmark against a real risk stage process: shape, no timing."""

from __future__ import annotations

import os

from benchmarks import kill_switch


def test_kill_switch_bench_cancels_every_round_and_reports_every_key() -> None:
    out = kill_switch.run(quick=True)
    assert out["resting_orders"] == kill_switch.N_RESTING and out["rounds"] == 20
    for key in ("kill_switch_us", "blocked_us", "order_ack_us", "check_us"):
        assert 0 < out[key]["p50"] <= out[key]["p99"], key
    assert out["kill_over_ack_p50"] > 0
    assert not [p for p in os.listdir("/dev/shm") if p.startswith("hft.bk")], "segments unlinked"
