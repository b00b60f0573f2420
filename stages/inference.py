"""Inference stage: feature vectors in, trading signals (edge, confidence, urgency) out.

Two sources of signals. The ONNX ensemble (``stages/models.py``: loading and checking the
models of ``models/<engine.asset_class>/``, the scaling of their inputs, the ensemble formulas,
the per-batch deadline ``engine.inference_timeout_ms`` and the live reload of changed files)
answers every batch it can. A tick no model answered (in time, and inside the model's training range), and
every tick when no model is loaded (none shipped, all broken, all weights 0), gets the
rule-based fallback below, flagged ``SIG_FALLBACK`` and counted in ``C_FALLBACKS``; with no model loaded the stage is exactly the
fallback, with two attribute tests more per batch.

The fallback reads the book's pressure (a standard short-horizon predictor of the next mid
move):

    score      = w_obi * obi + w_depth * depth_imbalance + w_micro * tanh(2 * micro_dev / half_spread)
    edge_bps   = edge_scale_bps * score           (signed: > 0 expects the price to rise)
    confidence = min(1, |score| / (w_obi + w_depth + w_micro))
    urgency    = clip(2 * (confidence - 0.5) + 0.25 * min(1, rvol_bps / spread_bps), 0, 1)

All three terms are in [-1, 1] so a unanimous, lopsided book gives |score| near the weights'
sum; a balanced book gives ~0 and nothing passes the gate. The ensemble's signal has the same
meaning and the same urgency formula, with ``p`` the weighted mean of the models' ``p_up``:

    edge_bps   = sum(w_m (2 p_m - 1) move_bps_m) / sum(w_m)
    confidence = max(p, 1 - p),   direction = sign(p - 0.5)

Signals from a stale or crossed book are still emitted (the route stage counts them) but
flagged untradeable; a non-finite score or model output gives edge, confidence and urgency 0,
direction 0 and the untradeable flag. Compiled with numba, like the feature kernel, so that a
fallback batch of one costs about a microsecond. Each model adds its ONNX Runtime ``run``
(~5 us for a small model) and ~4 us of gathering and bookkeeping: three tiny models cost
~28 us a batch here.

Between batches (and when idle) the stage checks the model files every
``inference.reload_check_ms`` and swaps in models rebuilt in the background
(``ModelSet.maintain``).
"""

from __future__ import annotations

import math
import time

import numpy as np
from numba import njit

from shm import schema
from shm.ring import RingReader
from shm.schema import (  # module globals: numba folds them into the compiled kernel
    F_DEPTH_IMB,
    F_MICRO_DEV_BPS,
    F_OBI,
    F_RVOL_BPS,
    F_SPREAD_BPS,
    SIG_FALLBACK,
)
from shm.stats import StageStats
from stages.config import Config, SignalConfig
from stages.models import ModelSet, urgency_of, write_signal
from stages.wiring import Engine


@njit(cache=True, nogil=True)
def _fallback(
    fv: np.ndarray,
    out: np.ndarray,
    edge_scale_bps: float,
    w_obi: float,
    w_depth: float,
    w_micro: float,
) -> None:
    wsum = w_obi + w_depth + w_micro
    for i in range(fv.shape[0]):
        f = fv[i]
        o = out[i]
        v = f["values"]
        spread = v[F_SPREAD_BPS]
        half = max(spread * 0.5, 1e-9)
        micro = math.tanh(2.0 * v[F_MICRO_DEV_BPS] / half)
        score = w_obi * v[F_OBI] + w_depth * v[F_DEPTH_IMB] + w_micro * micro
        bad = not math.isfinite(score)
        if bad:
            score = 0.0
            conf = 0.0
            urgency = 0.0
        else:
            conf = min(abs(score) / wsum, 1.0) if wsum > 0 else 0.0
            urgency = urgency_of(conf, v[F_RVOL_BPS], spread)
        direction = 1 if score > 0 else (-1 if score < 0 else 0)
        write_signal(f, o, edge_scale_bps * score, conf, urgency, direction, SIG_FALLBACK, bad)


def fallback_signals(fv: np.ndarray, cfg: SignalConfig, out: np.ndarray) -> None:
    """Fill ``out[i]`` with the rule-based signal of feature vector ``fv[i]``."""
    _fallback(fv, out, cfg.edge_scale_bps, cfg.obi_weight, cfg.depth_weight, cfg.micro_weight)


class InferenceAgent:
    """Turn feature vectors into signals; the only writer of the signals ring."""

    role = "inference"

    def __init__(self, cfg: Config, engine: Engine, stats: StageStats, *, batch: int = 64) -> None:
        self._in = engine.reader("features", "inference")
        self.readers: list[RingReader] = [self._in]
        self._out = engine.writer("signals")
        self._fv = np.zeros(batch, schema.FEATURES)
        self._sig = np.zeros(batch, schema.SIGNAL)
        self._fb = np.zeros(batch, schema.SIGNAL)  # fallback rows of a partly answered batch
        self._cfg = cfg.signal
        self._stats = stats
        fallback_signals(self._fv[:1], self._cfg, self._sig[:1])  # compile before the first tick
        self.models = ModelSet.from_config(cfg, stats, max_batch=batch)

    def do_work(self) -> int:
        models = self.models
        n = self._in.read_into(self._fv)
        if not n:
            if models.pending or time.monotonic_ns() >= models.next_check_ns:
                models.maintain(time.monotonic_ns())
            return 0
        t0 = time.monotonic_ns()
        sig = self._sig[:n]
        fallbacks = 0
        answered = models.infer(self._fv, n, t0, self._sig) if models.n_active else 0
        if not answered:
            fallback_signals(self._fv[:n], self._cfg, sig)
            fallbacks = n
        elif answered < n:  # rows every model was out of domain on
            fb = self._fb[:n]
            fallback_signals(self._fv[:n], self._cfg, fb)
            miss = models.row_ok[:n] == 0
            sig[miss] = fb[miss]
            fallbacks = n - answered
        t1 = time.monotonic_ns()
        sig["inference_ns"] = t1
        self._out.offer_array(sig)
        st = self._stats
        st.record_batch(n, t0, t1, self._fv["recv_ns"][:n].tolist())
        ints = st.ints
        ints[schema.C_SIGNALS] += n
        ints[schema.C_FALLBACKS] += fallbacks
        ints[schema.C_DROPPED] = self._in.dropped
        if models.pending or t1 >= models.next_check_ns:
            models.maintain(t1)  # between batches: reloaded models are swapped in here
        return n

    def on_close(self) -> None:
        self.models.close()
