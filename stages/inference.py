"""Inference stage: feature vectors in, trading signals (edge, confidence, urgency) out.

Until ONNX models ship, every tick uses the rule-based fallback, which reads the book's
pressure (a standard short-horizon predictor of the next mid move):

    score      = w_obi * obi + w_depth * depth_imbalance + w_micro * tanh(2 * micro_dev / half_spread)
    edge_bps   = edge_scale_bps * score           (signed: > 0 expects the price to rise)
    confidence = min(1, |score| / (w_obi + w_depth + w_micro))
    urgency    = clip(2 * (confidence - 0.5) + 0.25 * min(1, rvol_bps / spread_bps), 0, 1)

All three terms are in [-1, 1] so a unanimous, lopsided book gives |score| near the weights'
sum; a balanced book gives ~0 and nothing passes the gate. Signals from a stale or crossed
book are still emitted (the route stage counts them) but flagged untradeable.
"""

from __future__ import annotations

import time

import numpy as np

from shm import schema
from shm.ring import RingReader
from shm.stats import StageStats
from stages.config import Config, SignalConfig
from stages.wiring import Engine


def fallback_signals(fv: np.ndarray, cfg: SignalConfig, out: np.ndarray) -> None:
    """Fill ``out[i]`` with the rule-based signal of feature vector ``fv[i]``."""
    vals = fv["values"]
    spread = vals[:, schema.F_SPREAD_BPS]
    with np.errstate(divide="ignore", invalid="ignore"):
        half = np.maximum(spread * 0.5, 1e-9)
        micro = np.tanh(2.0 * vals[:, schema.F_MICRO_DEV_BPS] / half)
        score = (
            cfg.obi_weight * vals[:, schema.F_OBI]
            + cfg.depth_weight * vals[:, schema.F_DEPTH_IMB]
            + cfg.micro_weight * micro
        )
        wsum = cfg.obi_weight + cfg.depth_weight + cfg.micro_weight
        conf = np.minimum(np.abs(score) / wsum, 1.0) if wsum > 0 else np.zeros(len(fv))
        vol_term = np.minimum(vals[:, schema.F_RVOL_BPS] / np.maximum(spread, 1e-9), 1.0)
        urgency = np.clip(2.0 * (conf - 0.5) + 0.25 * vol_term, 0.0, 1.0)
    bad = ~np.isfinite(score)
    score = np.where(bad, 0.0, score)
    conf = np.where(bad, 0.0, conf)
    urgency = np.where(bad | ~np.isfinite(urgency), 0.0, urgency)

    out["symbol_id"] = fv["symbol_id"]
    out["seq"] = fv["seq"]
    for name in ("exch_ns", "recv_ns", "ingest_ns", "feature_ns"):
        out[name] = fv[name]
    out["edge_bps"] = cfg.edge_scale_bps * score
    out["confidence"] = conf
    out["urgency"] = urgency
    out["direction"] = np.sign(score).astype(np.int32)
    out["book_flags"] = fv["flags"]
    untradeable = ((fv["flags"] & schema.BOOK_UNTRADEABLE) != 0) | bad
    out["flags"] = schema.SIG_FALLBACK | np.where(untradeable, schema.SIG_UNTRADEABLE, 0).astype(
        np.uint32
    )
    out["mid"] = fv["mid"]
    out["best_bid"] = fv["best_bid"]
    out["best_ask"] = fv["best_ask"]
    out["spread_bps"] = spread


class InferenceAgent:
    """Turn feature vectors into signals; the only writer of the signals ring."""

    role = "inference"

    def __init__(self, cfg: Config, engine: Engine, stats: StageStats, *, batch: int = 64) -> None:
        self._in = engine.reader("features", "inference")
        self.readers: list[RingReader] = [self._in]
        self._out = engine.writer("signals")
        self._fv = np.zeros(batch, schema.FEATURES)
        self._sig = np.zeros(batch, schema.SIGNAL)
        self._cfg = cfg.signal
        self._stats = stats

    def do_work(self) -> int:
        n = self._in.read_into(self._fv)
        if not n:
            return 0
        t0 = time.monotonic_ns()
        sig = self._sig[:n]
        fallback_signals(self._fv[:n], self._cfg, sig)
        t1 = time.monotonic_ns()
        sig["inference_ns"] = t1
        self._out.offer_array(sig)
        st = self._stats
        ints = st.ints
        ints[schema.C_PROCESSED] += n
        ints[schema.C_PUBLISHED] += n
        ints[schema.C_SIGNALS] += n
        ints[schema.C_FALLBACKS] += n
        ints[schema.C_BATCHES] += 1
        ints[schema.C_DROPPED] = self._in.dropped
        st.record_ns(schema.H_DURATION, (t1 - t0) // n, n)
        for recv in self._fv["recv_ns"][:n].tolist():
            st.record_ns(schema.H_E2E, t1 - recv)
        return n

    def on_close(self) -> None:
        pass
