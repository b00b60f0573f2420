"""The inference stage's ONNX models: loading and checking them, the ensemble, the deadline, reload.

Why this shape: a model is only worth running if it sees exactly the inputs it was trained on
and answers within the tick's budget. So every model file comes with a sidecar JSON (the
contract is ``models/README.md``) and is checked against it when it loads; a model that fails
a check is logged and left out, never half-used. The stage runs at most four small models per
batch of ticks, one ONNX Runtime session each, single-threaded (the stage owns one pinned CPU;
a thread pool would only fight the other stages for it).

Input, per model and feature vector ``v`` (``FEATURES["values"]``): the sidecar's feature
names are resolved to indices once, at load, and each tick is scaled as in training,

    x_j = clip((v[idx_j] - mean_j) / std_j, -clip, clip)      (float32)

where a NaN or infinite ``v[idx_j]`` (a feature still warming up) gives ``x_j = 0``, the
training mean. A sequence model (sidecar ``input.shape`` ``[null, seq_len, n]``, the
transformer) gets row ``i`` = the symbol's last ``seq_len`` scaled vectors, oldest first, the
current tick last, zeros before the symbol has that many. That history is kept per symbol and
per model and is updated for every record (tradeable or not, and whether or not the model then
runs, so a model skipped for a tick still sees an unbroken history on the next).

Ensemble, per row (tick), over the models ``m`` that answered that row (ran within the
deadline, with the row inside their training range, see "Out of domain" below), with ``w_m``
the ``[inference]`` weight and ``p_m`` the model's ``p_up`` clipped to [0, 1]:

    p          = sum(w_m p_m) / sum(w_m)
    edge_bps   = sum(w_m (2 p_m - 1) move_bps_m) / sum(w_m)
    direction  = sign(p - 0.5)
    confidence = max(p, 1 - p)
    urgency    = clip(2 (confidence - 0.5) + 0.25 min(1, rvol_bps / spread_bps), 0, 1)

``urgency`` has the rule-based fallback's shape (``stages/inference.py``). Models trained on
the same label share ``move_bps`` and then ``edge_bps = (2p - 1) move_bps``, whose sign is the
direction's; with different ``move_bps`` a disagreeing ensemble can give an edge whose sign
differs from ``direction`` (route trades the edge's sign). A non-finite ``p_m`` or a book
without two sides (non-finite ``spread_bps``) gives edge, confidence and urgency 0, direction 0
and ``SIG_UNTRADEABLE``, exactly as the fallback treats a non-finite score; a stale or crossed
book (``BOOK_UNTRADEABLE``) gives ``SIG_UNTRADEABLE`` with the signal still computed. A row
that no model answered is left to the caller, which uses the fallback (``SIG_FALLBACK``).

Out of domain: a model is left out of a row's ensemble when any of that tick's inputs lies
further than ``clip`` standard deviations from its training mean (``|v - mean| > clip *
std``, the same bound the scaler clips at). Past that bound the model is extrapolating on
inputs it never saw, and its answer is not a probability anyone measured: a model trained on
one market and fed another (the shipped crypto models on the simulator, whose spreads are a
hundred times BTCUSDT's) would otherwise answer every tick with the same saturated ``p``.
Each such row counts one ``MODEL_OUT_OF_DOMAIN`` for the model, and a model out of domain on
every row of a batch is not run at all (it could answer nothing, and its run time is better
spent on the next tick); on the data they were
trained on, the shipped models see 0.3-1.3% of ticks out of domain.

Deadline, per batch: ``deadline = t_start + engine.inference_timeout_ms``, ``t_start`` taken
right after the batch is read. Models run once per batch in ``MODEL_NAMES`` order (cheapest
first). Before each run, if ``now + predicted`` passes the deadline the model is skipped;
``predicted`` is the longest of its last 8 run durations (whatever their batch sizes; a newly
loaded model starts from its warm-up run of a batch of one), and every skip multiplies those 8
by 0.9, so a model slowed by a transient hiccup is tried again after a few skipped batches
(``ceil(log(slack / predicted) / log 0.9)``) rather than never. A run that ends after the
deadline has its output discarded. A skip and a discard both count as a timeout of every tick
in the batch: the model's ``MODEL_TIMEOUTS`` and the stage's ``C_MODEL_TIMEOUTS`` go up by
``n``. A run that raises counts one ``MODEL_ERRORS`` and leaves the model out of that batch
(logged at most once per 10 s per model). Every run that happened (finished in time or not,
raised or not) counts one ``MODEL_RUNS`` and records its duration (the whole ``session.run``,
ns) in histogram ``H_MODEL_BASE + index``. A run is never interrupted: a model slower than the
deadline costs one late batch each time it is retried.

Reload: every ``reload_check_ms`` the stage stats ``<model>.onnx`` and ``<model>.json`` of
each model with a weight > 0 (inode, mtime_ns, size). A change is acted on once it has held
for one whole check period, because the trainer replaces the sidecar and then the model file
(each by ``os.replace``) and the pair is only consistent after both. The new model is built
and warmed up in a daemon thread; the stage swaps it in between batches. A broken new file is
logged and the loaded model stays; a deleted ``.onnx`` removes the model; a new one adds it. A
reloaded sequence model keeps the per-symbol history when its features, scaler and
``seq_len`` are unchanged. The loader thread drops the stage's real-time priority and runs
at nice 10, so it only gets the CPU the stage leaves. Caveat, measured: ONNX Runtime holds the
GIL while it builds a session, so the stage's loop can stall for about that long (1.4 ms for a
tiny model, 8 ms for one with 4 MB of weights); the warm-up runs release the GIL.

Allocation: the scaled inputs, the ensemble's accumulators and the ``run`` feed dicts are
preallocated for the largest batch; gathering, scaling and the ensemble are numba kernels. The
only per-batch allocation is each model's output array, which ONNX Runtime creates.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import math
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import onnxruntime as ort
from numba import njit

from shm import schema
from shm.schema import (  # module globals: numba folds them into the compiled kernels
    BOOK_UNTRADEABLE,
    F_RVOL_BPS,
    F_SPREAD_BPS,
    SIG_UNTRADEABLE,
)
from shm.stats import StageStats
from stages.config import Config

logger = logging.getLogger("stages.models")

SIDECAR_FORMAT: Final = 1
RECENT_RUNS: Final = 8  # the predicted duration is the longest of this many recent runs
SKIP_DECAY: Final = 0.9  # each skip shrinks the prediction by 10%
ERROR_LOG_EVERY_NS: Final = 10_000_000_000
FEATURE_INDEX: Final = {name: i for i, name in enumerate(schema.FEATURE_NAMES)}
_ORT_FLOAT_TYPES: Final = ("tensor(float)", "tensor(double)")

# (inode, mtime_ns, size) of <model>.onnx then of <model>.json; None: no .onnx
Stamp = tuple[int, int, int, int, int, int] | None


class ModelError(ValueError):
    """A model file or its sidecar cannot be used; the message names the file and the problem."""


def sidecar_of(onnx_path: Path) -> Path:
    return onnx_path.with_suffix(".json")


def file_stamp(onnx_path: Path) -> Stamp:
    """Return the stamp of a model's two files (None when the .onnx does not exist)."""
    try:
        a = os.stat(onnx_path)
    except OSError:
        return None
    try:
        b = os.stat(sidecar_of(onnx_path))
        side = (b.st_ino, b.st_mtime_ns, b.st_size)
    except OSError:
        side = (0, 0, -1)
    return (a.st_ino, a.st_mtime_ns, a.st_size, *side)


def session_options() -> Any:
    """Single-threaded, sequential, fully optimised: the stage owns one pinned CPU."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3  # errors only; a rejected model is reported by us
    return so


# ---------------------------------------------------------------- kernels
@njit(cache=True, nogil=True, inline="always")
def _outside(v: float, mean: float, std: float, clip: float) -> bool:
    """Is a (finite) value further from the training mean than ``clip`` standard deviations?"""
    return math.isfinite(v) and abs(v - mean) > clip * std


@njit(cache=True, nogil=True, inline="always")
def _scaled(v: float, mean: float, std: float, clip: float) -> float:
    if not math.isfinite(v):
        return 0.0
    z = (v - mean) / std
    if z > clip:
        return clip
    if z < -clip:
        return -clip
    return z


@njit(cache=True, nogil=True)
def _gather_flat(
    values: np.ndarray,
    n: int,
    idx: np.ndarray,
    mean: np.ndarray,
    std: np.ndarray,
    clip: float,
    x: np.ndarray,
    ood: np.ndarray,
) -> int:
    n_ood = 0
    for i in range(n):
        out = 0
        for j in range(idx.shape[0]):
            v = values[i, idx[j]]
            x[i, j] = _scaled(v, mean[j], std[j], clip)
            if _outside(v, mean[j], std[j], clip):
                out = 1
        ood[i] = out
        n_ood += out
    return n_ood


@njit(cache=True, nogil=True)
def _gather_seq(
    values: np.ndarray,
    symbol_ids: np.ndarray,
    n: int,
    idx: np.ndarray,
    mean: np.ndarray,
    std: np.ndarray,
    clip: float,
    history: np.ndarray,
    count: np.ndarray,
    x: np.ndarray,
    ood: np.ndarray,
) -> int:
    n_sym, seq_len, nf = history.shape
    n_ood = 0
    for i in range(n):
        out = 0
        for j in range(nf):
            if _outside(values[i, idx[j]], mean[j], std[j], clip):
                out = 1
        ood[i] = out
        n_ood += out
        s = np.int64(symbol_ids[i])
        if s < n_sym:
            c = count[s]
            slot = c % seq_len
            for j in range(nf):
                history[s, slot, j] = _scaled(values[i, idx[j]], mean[j], std[j], clip)
            c += 1
            count[s] = c
            have = min(c, seq_len)
            pad = seq_len - have
            for t in range(pad):
                for j in range(nf):
                    x[i, t, j] = 0.0
            for t in range(have):
                src = (c - have + t) % seq_len
                for j in range(nf):
                    x[i, pad + t, j] = history[s, src, j]
        else:  # a symbol id past the table: no history, the current vector alone
            for t in range(seq_len - 1):
                for j in range(nf):
                    x[i, t, j] = 0.0
            for j in range(nf):
                x[i, seq_len - 1, j] = _scaled(values[i, idx[j]], mean[j], std[j], clip)
    return n_ood


@njit(cache=True, nogil=True)
def _accumulate(
    out: np.ndarray,
    column: int,
    n: int,
    weight: float,
    move_bps: float,
    ood: np.ndarray,
    acc_p: np.ndarray,
    acc_edge: np.ndarray,
    acc_w: np.ndarray,
) -> int:
    """Add one model's answers to the ensemble sums; return the rows it was out of domain on."""
    n_ood = 0
    for i in range(n):
        if ood[i]:
            n_ood += 1
            continue
        p = float(out[i, column])
        if p < 0.0:  # NaN passes through both tests and poisons the sums: the tick goes bad
            p = 0.0
        elif p > 1.0:
            p = 1.0
        acc_p[i] += weight * p
        acc_edge[i] += weight * (2.0 * p - 1.0) * move_bps
        acc_w[i] += weight
    return n_ood


@njit(cache=True, nogil=True, inline="always")
def urgency_of(conf: float, rvol_bps: float, spread_bps: float) -> float:
    """``clip(2 (conf - 0.5) + 0.25 min(1, rvol / spread), 0, 1)``; 0 when not finite."""
    vol_term = min(rvol_bps / max(spread_bps, 1e-9), 1.0)
    urgency = 2.0 * (conf - 0.5) + 0.25 * vol_term
    if not math.isfinite(urgency):
        return 0.0
    return min(max(urgency, 0.0), 1.0)


@njit(cache=True, nogil=True, inline="always")
def write_signal(
    f: np.void,
    o: np.void,
    edge_bps: float,
    conf: float,
    urgency: float,
    direction: int,
    flags: int,
    bad: bool,
) -> None:
    """Fill SIGNAL ``o`` from feature vector ``f``: the trace, the book and the decision."""
    o["symbol_id"] = f["symbol_id"]
    o["seq"] = f["seq"]
    o["exch_ns"] = f["exch_ns"]
    o["recv_ns"] = f["recv_ns"]
    o["ingest_ns"] = f["ingest_ns"]
    o["feature_ns"] = f["feature_ns"]
    o["edge_bps"] = edge_bps
    o["confidence"] = conf
    o["urgency"] = urgency
    o["direction"] = direction
    o["book_flags"] = f["flags"]
    if (f["flags"] & BOOK_UNTRADEABLE) != 0 or bad:
        flags |= SIG_UNTRADEABLE
    o["flags"] = flags
    o["mid"] = f["mid"]
    o["best_bid"] = f["best_bid"]
    o["best_ask"] = f["best_ask"]
    o["spread_bps"] = f["values"][F_SPREAD_BPS]


@njit(cache=True, nogil=True)
def _finish(
    fv: np.ndarray,
    n: int,
    acc_p: np.ndarray,
    acc_edge: np.ndarray,
    acc_w: np.ndarray,
    row_ok: np.ndarray,
    out: np.ndarray,
) -> int:
    """Write the ensemble's signal of every row some model answered; return how many."""
    answered = 0
    for i in range(n):
        wsum = acc_w[i]
        if wsum <= 0.0:  # every model was out of domain (or late) here: the caller falls back
            row_ok[i] = 0
            acc_p[i] = 0.0
            acc_edge[i] = 0.0
            continue
        row_ok[i] = 1
        answered += 1
        f = fv[i]
        o = out[i]
        v = f["values"]
        p = acc_p[i] / wsum
        edge = acc_edge[i] / wsum
        acc_p[i] = 0.0
        acc_edge[i] = 0.0
        acc_w[i] = 0.0
        spread = v[F_SPREAD_BPS]
        bad = not (math.isfinite(p) and math.isfinite(edge) and math.isfinite(spread))
        if bad:
            edge = 0.0
            conf = 0.0
            urgency = 0.0
            direction = 0
        else:
            conf = max(p, 1.0 - p)
            direction = 1 if p > 0.5 else (-1 if p < 0.5 else 0)
            urgency = urgency_of(conf, v[F_RVOL_BPS], spread)
        write_signal(f, o, edge, conf, urgency, direction, 0, bad)
    return answered


# ---------------------------------------------------------------- one model
@dataclass(slots=True, eq=False, kw_only=True)
class Model:
    """One loaded, checked and warmed-up model with its preallocated input buffers."""

    name: str
    index: int  # in MODEL_NAMES
    path: Path
    sidecar_path: Path
    sidecar: dict[str, Any]
    features: tuple[str, ...]
    feature_idx: np.ndarray  # int64 indices into FEATURES["values"]
    mean: np.ndarray  # float64, per feature
    std: np.ndarray
    clip: float
    seq_len: int
    sequence: bool  # input [batch, seq_len, n] (else [batch, n])
    input_name: str
    output_name: str
    output_column: int
    move_bps: float
    horizon_ms: float
    feature_window_size: int | None
    metrics: dict[str, Any]
    session: Any  # onnxruntime.InferenceSession
    max_batch: int
    inputs: np.ndarray  # float32 [max_batch, n] or [max_batch, seq_len, n]
    ood: np.ndarray  # uint8 [max_batch]: 1 where the row's vector left the training range
    history: np.ndarray  # float32 [MAX_SYMBOLS, seq_len, n] (sequence models; else empty)
    history_count: np.ndarray  # int64 [MAX_SYMBOLS]: vectors ever pushed per symbol
    feeds: list[dict[str, np.ndarray]]  # feeds[n]: the run() input of a batch of n
    output_names: list[str]
    stamp: Stamp
    load_ns: int  # reading, checking, building and warming up
    warm_run_ns: int  # one run of a batch of one, after the warm-up
    n_ood: int = 0  # rows of the last gathered batch outside the training range

    def gather(self, values: np.ndarray, symbol_ids: np.ndarray, n: int) -> int:
        """Scale rows ``0..n-1`` of ``values`` (``FEATURES["values"]``) into ``inputs[:n]``.

        Returns (and keeps in ``n_ood``) how many rows left the model's training range.
        """
        if self.sequence:
            self.n_ood = _gather_seq(
                values,
                symbol_ids,
                n,
                self.feature_idx,
                self.mean,
                self.std,
                self.clip,
                self.history,
                self.history_count,
                self.inputs,
                self.ood,
            )
        else:
            self.n_ood = _gather_flat(
                values, n, self.feature_idx, self.mean, self.std, self.clip, self.inputs, self.ood
            )
        return self.n_ood

    def run(self, n: int) -> np.ndarray:
        """Run the model on ``inputs[:n]``; return its output array (``[n, k]``)."""
        out: np.ndarray = self.session.run(self.output_names, self.feeds[n])[0]
        return out

    def p_up(self, n: int) -> np.ndarray:
        """``p_up`` of ``inputs[:n]`` as float64 (a tool for tests and scripts, it allocates)."""
        return np.asarray(self.run(n)[:, self.output_column], dtype=np.float64)

    def same_input_as(self, other: Model) -> bool:
        """Do both models see identical scaled inputs (so a history can carry over)?"""
        return (
            self.sequence == other.sequence
            and self.seq_len == other.seq_len
            and self.clip == other.clip
            and np.array_equal(self.feature_idx, other.feature_idx)
            and np.array_equal(self.mean, other.mean)
            and np.array_equal(self.std, other.std)
        )

    def describe(self) -> dict[str, Any]:
        """What a log line says about the model."""
        m = self.metrics
        return {
            "model": self.name,
            "path": str(self.path),
            "kind": self.sidecar.get("kind"),
            "features": len(self.features),
            "seq_len": self.seq_len,
            "horizon_ms": self.horizon_ms,
            "move_bps": self.move_bps,
            "auc": m.get("auc"),
            "hit_rate": m.get("hit_rate"),
            "ic": m.get("ic"),
            "n_test": m.get("n_test"),
            "trained": self.sidecar.get("created"),
            "load_ms": round(self.load_ns / 1e6, 1),
            "run_us": round(self.warm_run_ns / 1e3, 1),
        }


def _number(doc: dict[str, Any], key: str, where: Path) -> float:
    v = doc.get(key)
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise ModelError(f"{where}: {key} must be a finite number, got {v!r}")
    return float(v)


def _numbers(v: object, key: str, n: int, where: Path) -> np.ndarray:
    if not isinstance(v, list) or not all(
        isinstance(x, int | float) and not isinstance(x, bool) for x in v
    ):
        raise ModelError(f"{where}: {key} must be a list of numbers")
    if len(v) != n:
        raise ModelError(f"{where}: {key} has {len(v)} values for {n} features")
    arr = np.array(v, dtype=np.float64)
    if not np.isfinite(arr).all():
        raise ModelError(f"{where}: {key} holds a value that is not finite")
    return arr


def _read_sidecar(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ModelError(f"{path}: sidecar missing (every <model>.onnx needs its .json)") from None
    except OSError as exc:
        raise ModelError(f"{path}: cannot read the sidecar: {exc.strerror}") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path}: sidecar is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ModelError(f"{path}: sidecar must be a JSON object")
    return doc


def _dims(shape: Sequence[object]) -> str:
    return (
        "[" + ", ".join("null" if d is None or isinstance(d, str) else str(d) for d in shape) + "]"
    )


def load_model(
    onnx_path: str | Path,
    *,
    max_batch: int = 64,
    asset_class: str | None = None,
) -> Model:
    """Load, check and warm up one model; raise ``ModelError`` naming the file and the problem.

    Checks: the sidecar exists and parses, ``format`` is 1, ``model`` is the file's stem and one
    of ``MODEL_NAMES``, every feature name is known, the scaler matches the features, the
    sidecar's input shape is ``[null, n]`` (or ``[null, seq_len, n]``), the session has that
    one float input (fixed dimensions must match, the batch dimension must be free) and the
    named float output, and a warm-up run of zeros gives ``[batch, k]`` with ``column < k``
    and a probability in [0, 1].
    """
    t_start = time.monotonic_ns()
    path = Path(onnx_path)
    side_path = sidecar_of(path)
    stamp = file_stamp(path)
    if stamp is None:
        raise ModelError(f"{path}: model file missing")
    doc = _read_sidecar(side_path)
    try:
        blob = path.read_bytes()
    except OSError as exc:
        raise ModelError(f"{path}: cannot read the model file: {exc.strerror}") from None
    if file_stamp(path) != stamp:
        raise ModelError(f"{path}: changed while being read; it is read again at the next check")

    # -- the sidecar
    if doc.get("format") != SIDECAR_FORMAT:
        raise ModelError(f"{side_path}: format must be {SIDECAR_FORMAT}, got {doc.get('format')!r}")
    name = doc.get("model")
    if name != path.stem:
        raise ModelError(f"{side_path}: model is {name!r} but the file is {path.name}")
    if name not in schema.MODEL_NAMES:
        raise ModelError(f"{side_path}: model {name!r} is not one of {schema.MODEL_NAMES}")
    want_sha = doc.get("model_sha256")
    if want_sha is not None and want_sha != hashlib.sha256(blob).hexdigest():
        # a sidecar beside another model's file (a copy half done, a trainer killed between
        # its two renames) would scale the inputs with the wrong numbers
        raise ModelError(
            f"{side_path}: model_sha256 does not match {path.name}: the sidecar belongs to "
            "another build of the model"
        )
    if asset_class is not None and doc.get("asset_class", asset_class) != asset_class:
        raise ModelError(
            f"{side_path}: asset_class is {doc.get('asset_class')!r}, "
            f"this engine trades {asset_class!r}"
        )
    features = doc.get("features")
    if (
        not isinstance(features, list)
        or not features
        or not all(isinstance(f, str) for f in features)
    ):
        raise ModelError(f"{side_path}: features must be a non-empty list of feature names")
    unknown = [f for f in features if f not in FEATURE_INDEX]
    if unknown:
        raise ModelError(
            f"{side_path}: unknown features {unknown} (known: shm.schema.FEATURE_NAMES)"
        )
    nf = len(features)
    scaler = doc.get("scaler")
    if not isinstance(scaler, dict):
        raise ModelError(f"{side_path}: scaler must be an object with mean, std and clip")
    mean = _numbers(scaler.get("mean"), "scaler.mean", nf, side_path)
    std = _numbers(scaler.get("std"), "scaler.std", nf, side_path)
    if (std <= 0).any():
        raise ModelError(f"{side_path}: scaler.std must be > 0 for every feature")
    clip = _number(scaler, "clip", side_path)
    if clip <= 0:
        raise ModelError(f"{side_path}: scaler.clip must be > 0, got {clip!r}")
    seq_len = doc.get("seq_len", 1)
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ModelError(f"{side_path}: seq_len must be an integer >= 1, got {seq_len!r}")
    inp = doc.get("input")
    if not isinstance(inp, dict) or not isinstance(inp.get("name"), str):
        raise ModelError(f"{side_path}: input must be an object with a name and a shape")
    input_name: str = inp["name"]
    shape = inp.get("shape")
    flat, seq = [None, nf], [None, seq_len, nf]
    if shape == flat and seq_len == 1:
        sequence = False
    elif shape == seq:
        sequence = True
    else:
        raise ModelError(
            f"{side_path}: input.shape {shape!r} does not fit {nf} features and seq_len "
            f"{seq_len}: expected {_dims(seq) if seq_len > 1 else _dims(flat)}"
        )
    out = doc.get("output")
    if not isinstance(out, dict) or not isinstance(out.get("name"), str):
        raise ModelError(f"{side_path}: output must be an object with a name and a column")
    output_name: str = out["name"]
    column = out.get("column", 0)
    if isinstance(column, bool) or not isinstance(column, int) or column < 0:
        raise ModelError(f"{side_path}: output.column must be an integer >= 0, got {column!r}")
    move_bps = _number(doc, "move_bps", side_path)
    if move_bps < 0:
        raise ModelError(f"{side_path}: move_bps must be >= 0, got {move_bps!r}")
    horizon_ms = _number(doc, "horizon_ms", side_path)
    if horizon_ms <= 0:
        raise ModelError(f"{side_path}: horizon_ms must be > 0, got {horizon_ms!r}")
    fws = doc.get("feature_window_size")
    metrics = doc.get("metrics")

    # -- the session
    try:
        session = ort.InferenceSession(
            blob, sess_options=session_options(), providers=["CPUExecutionProvider"]
        )
    except Exception as exc:  # onnxruntime raises its own exception types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{path}: ONNX Runtime cannot load it: {first[:300]}") from None
    inputs = session.get_inputs()
    if [i.name for i in inputs] != [input_name]:
        raise ModelError(
            f"{path}: the model's inputs are {[i.name for i in inputs]}, "
            f"the sidecar names one input {input_name!r}"
        )
    arg = inputs[0]
    if arg.type != "tensor(float)":
        raise ModelError(f"{path}: input {input_name!r} is {arg.type}, expected tensor(float)")
    want = seq if sequence else flat
    got = list(arg.shape)
    if len(got) != len(want):
        raise ModelError(
            f"{path}: input {input_name!r} has shape {_dims(got)}, the sidecar says {_dims(want)}"
        )
    if isinstance(got[0], int):
        raise ModelError(
            f"{path}: input {input_name!r} has a fixed batch dimension {got[0]}; "
            "the stage runs batches of any size"
        )
    for d_got, d_want in zip(got[1:], want[1:], strict=True):
        if isinstance(d_got, int) and d_got != d_want:
            raise ModelError(
                f"{path}: input {input_name!r} has shape {_dims(got)}, "
                f"the sidecar says {_dims(want)}"
            )
    outputs = {o.name: o for o in session.get_outputs()}
    if output_name not in outputs:
        raise ModelError(
            f"{path}: no output {output_name!r} (the model's outputs: {sorted(outputs)})"
        )
    if outputs[output_name].type not in _ORT_FLOAT_TYPES:
        raise ModelError(
            f"{path}: output {output_name!r} is {outputs[output_name].type}, expected a float tensor"
        )

    # -- buffers, then the warm-up: the largest batch once (sizes ONNX Runtime's arena), then
    # one timed batch of one (the first prediction of this model's run time)
    x = np.zeros((max_batch, seq_len, nf) if sequence else (max_batch, nf), np.float32)
    model = Model(
        name=name,
        index=schema.MODEL_NAMES.index(name),
        path=path,
        sidecar_path=side_path,
        sidecar=doc,
        features=tuple(features),
        feature_idx=np.array([FEATURE_INDEX[f] for f in features], dtype=np.int64),
        mean=mean,
        std=std,
        clip=clip,
        seq_len=seq_len,
        sequence=sequence,
        input_name=input_name,
        output_name=output_name,
        output_column=column,
        move_bps=move_bps,
        horizon_ms=horizon_ms,
        feature_window_size=fws if isinstance(fws, int) and not isinstance(fws, bool) else None,
        metrics=metrics if isinstance(metrics, dict) else {},
        session=session,
        max_batch=max_batch,
        inputs=x,
        ood=np.zeros(max_batch, np.uint8),
        history=np.zeros((schema.MAX_SYMBOLS, seq_len, nf) if sequence else (0, 1, nf), np.float32),
        history_count=np.zeros(schema.MAX_SYMBOLS if sequence else 0, np.int64),
        feeds=[{input_name: x[:k]} for k in range(max_batch + 1)],
        output_names=[output_name],
        stamp=stamp,
        load_ns=0,
        warm_run_ns=0,
    )
    try:
        res = model.run(max_batch)
    except Exception as exc:
        raise ModelError(f"{path}: a warm-up run of zeros failed: {exc}") from None
    if res.ndim != 2 or res.shape[0] != max_batch or res.shape[1] <= column:
        raise ModelError(
            f"{path}: output {output_name!r} has shape {list(res.shape)} for a batch of "
            f"{max_batch}; expected [batch, k] with column {column} < k"
        )
    p0 = float(res[0, column])
    if not 0.0 <= p0 <= 1.0:
        raise ModelError(
            f"{path}: output {output_name!r} column {column} is {p0!r} on a zero input, "
            "not a probability in [0, 1]"
        )
    acc = np.zeros((3, max_batch))
    _accumulate(  # compiled for this output's type
        res, column, 1, 0.0, 0.0, model.ood, acc[0], acc[1], acc[2]
    )
    t0 = time.monotonic_ns()
    model.run(1)
    t1 = time.monotonic_ns()
    model.warm_run_ns = t1 - t0
    model.load_ns = t1 - t_start
    return model


def _demote_this_thread() -> None:
    """Make the calling thread background work: normal scheduling, nice 10.

    A new thread inherits the stage's ``SCHED_FIFO`` priority; at that priority a loader's
    warm-up runs would keep the stage's own thread (same priority, same CPU) off the CPU until
    they finish. On Linux both calls act on the calling thread only.
    """
    try:
        if os.sched_getscheduler(0) != os.SCHED_OTHER:
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (OSError, AttributeError):
        pass


# ---------------------------------------------------------------- the set of models
class _Slot:
    """One entry of ``MODEL_NAMES``: its counters, its timing and the model now loaded."""

    __slots__ = (
        "errors_since_log",
        "errors_slot",
        "est_ns",
        "hist",
        "index",
        "last_error_log_ns",
        "loading",
        "model",
        "name",
        "ood_slot",
        "path",
        "recent_ns",
        "recent_pos",
        "runs_slot",
        "stamp_seen",
        "stamp_tried",
        "timeouts_slot",
        "weight",
    )

    def __init__(self, index: int, name: str, weight: float, path: Path) -> None:
        base = schema.MODEL_COUNTERS_BASE + index * schema.N_MODEL_COUNTERS
        self.index = index
        self.name = name
        self.weight = weight
        self.path = path
        self.runs_slot = base + schema.MODEL_RUNS
        self.timeouts_slot = base + schema.MODEL_TIMEOUTS
        self.errors_slot = base + schema.MODEL_ERRORS
        self.ood_slot = base + schema.MODEL_OUT_OF_DOMAIN
        self.hist = schema.H_MODEL_BASE + index
        self.model: Model | None = None
        self.recent_ns = [0] * RECENT_RUNS
        self.recent_pos = 0
        self.est_ns = 0
        self.stamp_seen: Stamp = None
        self.stamp_tried: Stamp = None
        self.loading = False
        self.last_error_log_ns = 0
        self.errors_since_log = 0

    def observe(self, ns: int) -> None:
        r = self.recent_ns
        r[self.recent_pos] = ns
        self.recent_pos = (self.recent_pos + 1) % RECENT_RUNS
        self.est_ns = max(r)

    def decay(self) -> None:
        r = self.recent_ns
        for k in range(RECENT_RUNS):
            r[k] = int(r[k] * SKIP_DECAY)
        self.est_ns = max(r)

    def reset_timing(self, first_ns: int) -> None:
        self.recent_ns = [first_ns] + [0] * (RECENT_RUNS - 1)
        self.recent_pos = 1
        self.est_ns = first_ns


class ModelSet:
    """The loaded models of one asset class, run as a weighted ensemble under a deadline.

    ``infer`` fills signals for a batch (0 models answering: the caller falls back);
    ``maintain`` checks the files and swaps reloaded models in, between batches.
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        stats: StageStats,
        weights: Sequence[float] = (1.0,) * len(schema.MODEL_NAMES),
        timeout_ms: float = 3.0,
        reload_check_ms: float = 1000.0,
        max_batch: int = 64,
        feature_window_size: int | None = None,
        asset_class: str | None = None,
    ) -> None:
        if len(weights) != len(schema.MODEL_NAMES):
            raise ValueError(f"one weight per model in {schema.MODEL_NAMES}")
        self.directory = Path(directory)
        self.timeout_ns = int(timeout_ms * 1e6)
        self.reload_check_ns = int(reload_check_ms * 1e6)
        self.max_batch = max_batch
        self.feature_window_size = feature_window_size
        self.asset_class = asset_class
        self._stats = stats
        self._ints = stats.ints
        self._slots = [
            _Slot(i, name, float(w), self.directory / f"{name}.onnx")
            for i, (name, w) in enumerate(zip(schema.MODEL_NAMES, weights, strict=True))
        ]
        self._active: list[tuple[_Slot, Model]] = []
        self.n_active = 0
        self._results: collections.deque[tuple[_Slot, Model | Exception]] = collections.deque()
        self._acc_p = np.zeros(max_batch)
        self._acc_edge = np.zeros(max_batch)
        self._acc_w = np.zeros(max_batch)
        self.row_ok = np.zeros(max_batch, np.uint8)  # after infer: 1 where the ensemble answered
        self._bound: np.ndarray | None = None
        self._values = np.zeros((0, schema.MAX_FEATURES))
        self._symbol_ids = np.zeros(0, np.uint32)
        self._closed = False
        self._compile()
        self._load_all()
        self.next_check_ns = time.monotonic_ns() + self.reload_check_ns

    @classmethod
    def from_config(cls, cfg: Config, stats: StageStats, *, max_batch: int = 64) -> ModelSet:
        inf = cfg.inference
        return cls(
            inf.class_dir(cfg.engine.asset_class),
            stats=stats,
            weights=[inf.weight(name) for name in schema.MODEL_NAMES],
            timeout_ms=cfg.engine.inference_timeout_ms,
            reload_check_ms=inf.reload_check_ms,
            max_batch=max_batch,
            feature_window_size=cfg.engine.feature_window_size,
            asset_class=cfg.engine.asset_class,
        )

    # ------------------------------------------------------------------ what is loaded
    @property
    def models(self) -> dict[str, Model]:
        """The loaded models by name, in run order."""
        return {s.name: m for s, m in self._active}

    def estimate_ns(self, name: str) -> int:
        """The predicted run time of a model (the longest of its recent runs, decayed by skips)."""
        est: int = self._slots[schema.MODEL_NAMES.index(name)].est_ns
        return est

    @property
    def pending(self) -> bool:
        """A background load has finished and waits to be swapped in."""
        return bool(self._results)

    @property
    def loading(self) -> bool:
        """A background load is running."""
        return any(s.loading for s in self._slots)

    def settled(self) -> bool:
        """Has every model file's current state been acted on (nothing loading or waiting)?"""
        return not self._results and all(
            s.weight <= 0 or (not s.loading and file_stamp(s.path) == s.stamp_tried)
            for s in self._slots
        )

    # ------------------------------------------------------------------ the hot path
    def _bind(self, fv: np.ndarray) -> None:
        self._bound = fv
        self._values = fv["values"]
        self._symbol_ids = fv["symbol_id"]

    def infer(self, fv: np.ndarray, n: int, t_start_ns: int, out: np.ndarray) -> int:
        """Fill ``out[:n]`` from ``fv[:n]`` (``FEATURES`` to ``SIGNAL``) with the ensemble.

        Returns how many rows the ensemble answered: rows where at least one model answered
        within the deadline with the row inside its training range. ``row_ok[:n]`` says which
        (when the result is 0 ``out`` is untouched); the caller falls back on the others.
        ``fv`` should be the same buffer on every call (its views are cached) and ``n`` at most
        ``max_batch``.
        """
        if fv is not self._bound:
            self._bind(fv)
        values, symbol_ids = self._values, self._symbol_ids
        active = self._active
        for _, m in active:
            m.gather(values, symbol_ids, n)
        deadline = t_start_ns + self.timeout_ns
        ints = self._ints
        record_ns = self._stats.record_ns
        mono = time.monotonic_ns
        acc_p, acc_edge, acc_w = self._acc_p, self._acc_edge, self._acc_w
        answered = 0
        for s, m in active:
            if m.n_ood == n:  # nothing this model could answer: do not spend the time
                ints[s.ood_slot] += n
                continue
            t0 = mono()
            if t0 + s.est_ns > deadline:
                ints[s.timeouts_slot] += n
                ints[schema.C_MODEL_TIMEOUTS] += n
                s.decay()
                continue
            try:
                res = m.session.run(m.output_names, m.feeds[n])[0]
            except Exception as exc:
                t1 = mono()
                record_ns(s.hist, t1 - t0)
                ints[s.runs_slot] += 1
                s.observe(t1 - t0)
                self._failed(s, exc, t1)
                continue
            t1 = mono()
            record_ns(s.hist, t1 - t0)
            ints[s.runs_slot] += 1
            s.observe(t1 - t0)
            if t1 > deadline:
                ints[s.timeouts_slot] += n
                ints[schema.C_MODEL_TIMEOUTS] += n
                continue
            shape = res.shape
            if len(shape) != 2 or shape[0] != n or shape[1] <= m.output_column:
                self._failed(s, ValueError(f"output shape {list(shape)} for a batch of {n}"), t1)
                continue
            n_ood = _accumulate(
                res, m.output_column, n, s.weight, m.move_bps, m.ood, acc_p, acc_edge, acc_w
            )
            if n_ood:
                ints[s.ood_slot] += n_ood
            answered += 1
        if not answered:
            self.row_ok[:n] = 0
            return 0
        return _finish(fv, n, acc_p, acc_edge, acc_w, self.row_ok, out)

    def _failed(self, s: _Slot, exc: Exception, now_ns: int) -> None:
        self._ints[s.errors_slot] += 1
        s.errors_since_log += 1
        if now_ns - s.last_error_log_ns >= ERROR_LOG_EVERY_NS or s.last_error_log_ns == 0:
            logger.warning(
                "model run failed; left out of the batch",
                extra={
                    "model": s.name,
                    "error": f"{type(exc).__name__}: {exc}",
                    "failures_since_last_log": s.errors_since_log,
                },
            )
            s.last_error_log_ns = now_ns
            s.errors_since_log = 0

    # ------------------------------------------------------------------ loading and reload
    def _compile(self) -> None:
        """Compile (or load from cache) every kernel now, not on the first tick.

        Both layouts numba tells apart: a one-record buffer's ``values`` is contiguous ("C"), a
        longer one's is strided ("A"); a signature first met on a tick costs milliseconds.
        """
        for rows in (1, 2):
            fv = np.zeros(rows, schema.FEATURES)
            values, sym = fv["values"], fv["symbol_id"]
            idx = np.zeros(1, np.int64)
            one = np.ones(1)
            ood = np.zeros(1, np.uint8)
            _gather_flat(values, 1, idx, one, one, 1.0, np.zeros((1, 1), np.float32), ood)
            _gather_seq(
                values,
                sym,
                1,
                idx,
                one,
                one,
                1.0,
                np.zeros((1, 2, 1), np.float32),
                np.zeros(1, np.int64),
                np.zeros((1, 2, 1), np.float32),
                ood,
            )
            acc = np.zeros((3, 1))
            _accumulate(np.zeros((1, 1), np.float32), 0, 1, 1.0, 1.0, ood, acc[0], acc[1], acc[2])
            row_ok = np.zeros(1, np.uint8)
            _finish(fv, 1, acc[0], acc[1], acc[2], row_ok, np.zeros(rows, schema.SIGNAL))

    def _load_all(self) -> None:
        d = self.directory
        if not d.is_dir():
            logger.info(
                "no model directory; every signal comes from the rule-based fallback",
                extra={"dir": str(d)},
            )
        else:
            for p in sorted(d.glob("*.onnx")):
                if p.stem not in schema.MODEL_NAMES:
                    logger.warning(
                        "model file ignored: not one of the stage's models",
                        extra={"path": str(p), "models": list(schema.MODEL_NAMES)},
                    )
        for s in self._slots:
            stamp = file_stamp(s.path)
            s.stamp_seen = s.stamp_tried = stamp
            if s.weight <= 0:
                if stamp is not None:
                    logger.info("model not loaded: its weight is 0", extra={"model": s.name})
                continue
            if stamp is None:
                continue
            self._apply(s, self._build(s))
        loaded = [s.name for s, _ in self._active]
        logger.info(
            "inference models" if loaded else "no models loaded; using the rule-based fallback",
            extra={
                "dir": str(d),
                "loaded": loaded,
                "weights": {s.name: s.weight for s, _ in self._active},
                "timeout_ms": self.timeout_ns / 1e6,
            },
        )

    def _build(self, s: _Slot) -> Model | Exception:
        try:
            return load_model(s.path, max_batch=self.max_batch, asset_class=self.asset_class)
        except ModelError as exc:
            return exc
        except Exception as exc:  # never let a bad file take the stage down
            return ModelError(f"{s.path}: {type(exc).__name__}: {exc}")

    def _load_in_background(self, s: _Slot) -> None:
        _demote_this_thread()
        self._results.append((s, self._build(s)))

    def _apply(self, s: _Slot, result: Model | Exception) -> None:
        s.loading = False
        if self._closed:
            return
        old = s.model
        if isinstance(result, Exception):
            self._ints[s.errors_slot] += 1  # a rejected file is a model error too
            if old is None:
                logger.warning("model left out", extra={"model": s.name, "error": str(result)})
            else:
                logger.warning(
                    "new model file rejected; the loaded model stays",
                    extra={"model": s.name, "error": str(result)},
                )
            return
        if old is not None and old.sequence and old.same_input_as(result):
            result.history[...] = old.history
            result.history_count[...] = old.history_count
        s.model = result
        s.reset_timing(result.warm_run_ns)
        self._rebuild()
        logger.info(
            "model reloaded" if old is not None else "model loaded", extra=result.describe()
        )
        fws = self.feature_window_size
        if (
            result.feature_window_size is not None
            and fws is not None
            and result.feature_window_size != fws
        ):
            logger.warning(
                "model trained with another feature window; its inputs may be off",
                extra={
                    "model": s.name,
                    "trained_feature_window_size": result.feature_window_size,
                    "engine_feature_window_size": fws,
                },
            )

    def _rebuild(self) -> None:
        self._active = [(s, s.model) for s in self._slots if s.model is not None]
        self.n_active = len(self._active)

    def maintain(self, now_ns: int) -> None:
        """Swap in finished loads; every ``reload_check_ms``, look for changed model files."""
        while self._results:
            s, result = self._results.popleft()
            self._apply(s, result)
        if now_ns < self.next_check_ns or self._closed:
            return
        self.next_check_ns = now_ns + self.reload_check_ns
        for s in self._slots:
            if s.weight <= 0:
                continue
            stamp = file_stamp(s.path)
            if stamp == s.stamp_tried:
                s.stamp_seen = stamp
                continue
            if stamp != s.stamp_seen:  # changed since the last check: let it settle one period
                s.stamp_seen = stamp
                continue
            if s.loading:
                continue
            s.stamp_tried = stamp
            if stamp is None:
                if s.model is not None:
                    s.model = None
                    self._rebuild()
                    logger.info(
                        "model file deleted; model removed",
                        extra={"model": s.name, "loaded": [a.name for a, _ in self._active]},
                    )
                continue
            s.loading = True
            threading.Thread(
                target=self._load_in_background,
                args=(s,),
                name=f"load-{s.name}",
                daemon=True,
            ).start()

    def close(self) -> None:
        """Drop every model (their sessions go with them); later loads are discarded."""
        self._closed = True
        for s in self._slots:
            s.model = None
        self._rebuild()
        self._results.clear()
