"""The feature benchmark on the shipped excerpt: shape of the result and counts, no timing."""

from __future__ import annotations

from benchmarks import features


def test_features_bench_runs_on_the_excerpt_and_reports_every_key() -> None:
    out = features.run(quick=True)  # quick always reads the excerpt
    assert out["data"] == features.BINANCE_EXCERPT.name
    assert out["books"] == 484  # every book the adapter publishes from the excerpt
    assert out["features"] == 20 and out["window"] == 1000
    assert 0 < out["p50_us"] <= out["p99_us"] <= out["p999_us"]
    assert out["call_floor_p50_us"] > 0 and out["batched_books_per_s"] > 0
    assert out["p50_over_floor"] == out["p50_us"] / out["call_floor_p50_us"]
    assert isinstance(out["target_met"], bool)
