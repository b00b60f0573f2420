"""Inference benchmark: the shipped ONNX models on real feature vectors, one tick a call.

The feature vectors are the real Binance BTCUSDT recording (``../shared/data``; the test
excerpt when that is absent or with ``--quick``) replayed through the venue adapter and the
feature kernels (``hft export-features``'s path), so the models see the inputs they were
trained on. On one pinned core with the GC off, every tick goes through, as a batch of one
(what the stage does when ticks arrive one by one):

- per model (``edge``, ``gbdt``, ``idec``, ``transformer``): ``p50_us`` / ``p99_us`` of one
  model's gather-and-scale plus its ONNX Runtime ``run``;
- ``ensemble``: the whole ``ModelSet.infer`` of the stage (all four models, the ensemble and
  the signal record), with the default deadline ``engine.inference_timeout_ms`` in force;
- ``fallback``: the rule-based kernel on the same ticks, the peer the ensemble is compared to;
- ``fallback_share``: the share of ticks the ensemble did not answer at the default deadline
  (a model skipped or late, or every model out of its training range on that tick), which
  the stage then gives to the fallback; ``timeouts`` and ``out_of_domain`` break it down.

Targets (issue 4): edge P99 <= 20 us, full ensemble P99 <= 500 us.
"""

from __future__ import annotations

import os
import time
from typing import Any, Final

import numpy as np

from benchmarks.market_data import BINANCE_EXCERPT, BINANCE_FULL
from benchmarks.ring import pinned
from ops.export import FeatureSink
from shm import schema
from stages.config import DEFAULT_CONFIG, load
from stages.inference import fallback_signals
from stages.models import ModelSet
from stages.venues.feed import new_counters
from stages.venues.replay import InlineSnapshots, infer_instruments, make_feed, replay

TARGET_EDGE_P99_US: Final = 20.0
TARGET_ENSEMBLE_P99_US: Final = 500.0


class _Stats:
    """The slice of ``StageStats`` the model set writes: counters, and histograms ignored."""

    def __init__(self) -> None:
        self.ints = [0] * schema.N_INT_SLOTS

    def record_ns(self, hist: int, ns: int, n: int = 1) -> None:
        pass


def _feature_vectors(quick: bool) -> tuple[np.ndarray, str]:
    path = BINANCE_FULL if BINANCE_FULL.exists() and not quick else BINANCE_EXCERPT
    cfg = load(DEFAULT_CONFIG)
    sink = FeatureSink(n_symbols=1, window=cfg.engine.feature_window_size)
    snaps = InlineSnapshots()
    feed = make_feed("binance", infer_instruments(path, "binance"), sink, new_counters(), snaps)
    replay(path, feed, snaps)
    return sink.rows(), path.name


def _pcts(ns: list[int]) -> dict[str, float]:
    a = np.asarray(ns, dtype=np.float64) / 1e3
    return {
        "p50_us": float(np.percentile(a, 50)),
        "p99_us": float(np.percentile(a, 99)),
        "p999_us": float(np.percentile(a, 99.9)),
    }


def run(*, quick: bool) -> dict[str, Any]:
    cfg = load(DEFAULT_CONFIG)
    fv_all, data = _feature_vectors(quick)
    rounds = 1 if quick else 3
    directory = cfg.inference.class_dir(cfg.engine.asset_class)
    stats = _Stats()
    ms = ModelSet.from_config(cfg, stats, max_batch=1)  # type: ignore[arg-type]
    models = ms.models
    res: dict[str, Any] = {
        "data": data,
        "ticks": len(fv_all),
        "models_dir": str(directory.relative_to(directory.parents[1])),
        "inference_timeout_ms": cfg.engine.inference_timeout_ms,
        "loaded": list(models),
        "rounds": rounds,
    }
    one = np.zeros(1, schema.FEATURES)
    sig = np.zeros(1, schema.SIGNAL)
    perf = time.perf_counter_ns
    with pinned(max(os.sched_getaffinity(0))):
        # per model: gather + run, each model on every tick
        for name, m in models.items():
            lat: list[int] = []
            for r in range(rounds + 1):
                for i in range(len(fv_all)):
                    one[0] = fv_all[i]
                    a = perf()
                    m.gather(one["values"], one["symbol_id"], 1)
                    m.run(1)
                    b = perf()
                    if r:  # the first round warms the caches and the arena
                        lat.append(b - a)
            res[name] = _pcts(lat)
        # the stage's whole ensemble call, with the deadline in force
        ens: list[int] = []
        answered = ticks = 0
        before = list(stats.ints)
        for r in range(rounds + 1):
            for i in range(len(fv_all)):
                one[0] = fv_all[i]
                t0 = time.monotonic_ns()
                a = perf()
                ok = ms.infer(one, 1, t0, sig)
                b = perf()
                if r:
                    ens.append(b - a)
                    answered += ok
                    ticks += 1
            if not r:
                before = list(stats.ints)
        res["ensemble"] = _pcts(ens)
        fb: list[int] = []
        for _ in range(rounds):
            for i in range(len(fv_all)):
                one[0] = fv_all[i]
                a = perf()
                fallback_signals(one, cfg.signal, sig)
                fb.append(perf() - a)
        res["fallback"] = _pcts(fb)
    ms.close()
    base = schema.MODEL_COUNTERS_BASE
    res["fallback_share"] = 1.0 - answered / ticks if ticks else None
    res["timeouts"] = {
        name: stats.ints[base + i * schema.N_MODEL_COUNTERS + schema.MODEL_TIMEOUTS]
        - before[base + i * schema.N_MODEL_COUNTERS + schema.MODEL_TIMEOUTS]
        for i, name in enumerate(schema.MODEL_NAMES)
    }
    res["out_of_domain"] = {
        name: stats.ints[base + i * schema.N_MODEL_COUNTERS + schema.MODEL_OUT_OF_DOMAIN]
        - before[base + i * schema.N_MODEL_COUNTERS + schema.MODEL_OUT_OF_DOMAIN]
        for i, name in enumerate(schema.MODEL_NAMES)
    }
    if "edge" in res:
        res["edge_target_met"] = res["edge"]["p99_us"] <= TARGET_EDGE_P99_US
    res["ensemble_target_met"] = res["ensemble"]["p99_us"] <= TARGET_ENSEMBLE_P99_US
    res["ensemble_over_fallback_p50"] = res["ensemble"]["p50_us"] / res["fallback"]["p50_us"]
    return res
