"""The inference benchmark on the shipped excerpt and models: shape and counts, no timing."""

from __future__ import annotations

from benchmarks import inference
from shm import schema


def test_inference_bench_runs_the_shipped_models_and_reports_every_key() -> None:
    out = inference.run(quick=True)  # quick always reads the excerpt
    assert out["data"] == inference.BINANCE_EXCERPT.name
    assert out["ticks"] == 484
    assert out["models_dir"] == "models/crypto"
    assert out["loaded"] == list(schema.MODEL_NAMES)  # all four ship and load
    for key in (*schema.MODEL_NAMES, "ensemble", "fallback"):
        assert 0 < out[key]["p50_us"] <= out[key]["p99_us"] <= out[key]["p999_us"], key
    assert 0.0 <= out["fallback_share"] <= 1.0
    # every unanswered tick is explained by a timeout or by every model being out of domain
    assert set(out["timeouts"]) == set(out["out_of_domain"]) == set(schema.MODEL_NAMES)
    unanswered = round(out["fallback_share"] * out["rounds"] * out["ticks"])
    assert unanswered <= sum(out["timeouts"].values()) + max(out["out_of_domain"].values())
    assert isinstance(out["edge_target_met"], bool) and isinstance(out["ensemble_target_met"], bool)
