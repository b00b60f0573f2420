"""``hft train``: fit the four inference models on exported features and write them as ONNX.

    hft train F.parquet [MORE.parquet ...] --asset-class crypto|equity --out DIR
              [--horizon-ms 5000] [--test-fraction 0.3] [--seq-len 16]
              [--models edge,gbdt,idec,transformer] [--seed 0]

Input is what ``hft export-features`` writes; ``models/README.md`` is the contract for both the
Parquet and the sidecar JSON written beside each model. Every model answers one question: the
probability ``p_up`` that the symbol's mid is higher ``horizon_ms`` from now, so each is a binary
classifier of the sign of the label ``ret_bps_<h>ms``, fitted on rows whose return is not zero:

- ``edge``: logistic regression. Its ONNX graph is built by hand (MatMul, Add, Sigmoid) rather
  than converted, because it runs on every tick and must stay a few microseconds.
- ``gbdt``: gradient-boosted trees (``HistGradientBoostingClassifier``, or
  ``GradientBoostingClassifier`` when skl2onnx cannot convert the former), via skl2onnx.
- ``idec``: a multi-layer perceptron, via skl2onnx.
- ``transformer``: one attention-pooling layer over the symbol's last ``seq_len`` feature
  vectors (the current tick is the query), trained with autograd and exported by hand.

Rows: only tradeable books (``flags & BOOK_UNTRADEABLE == 0``) with a finite label are used
(the transformer's sequences still hold every book of the symbol, as the engine sees them).
They are sorted by ``ts_ns`` over all files; the last ``--test-fraction`` is the test split.
A label is read from the first book at or after ``t + horizon``, which may lie up to the
export's ``label_tolerance_ns(horizon) = max(horizon / 10, 1 s)`` past it, so only training rows
with ``ts_ns + horizon + tolerance < first test ts_ns`` are kept: without that embargo the last
training labels would be computed from test-period prices.

A transformer sequence is a symbol's history within one recording: rows are grouped by
(Parquet file, ``recording`` column, symbol), since the export restarts the features with each
recording; a file without the ``recording`` column (an older export) is one recording.

Files must agree with each other on ``feature_window_size``, and with each other and with this
build's ``shm.schema`` on ``layout_version`` and ``feature_names`` (their ``hft`` metadata; a
file without it is accepted): features computed under another layout or window are not the
ones the engine sends.

Features are every ``FEATURE_NAMES`` entry except ``microprice`` (an absolute price), minus those
with no finite value or no variance on the training split. The cyclic time features are kept
only when the training split covers their whole cycle: ``tod_sin``/``tod_cos`` when every one of
the 24 UTC hours (``(ts_ns // 1 h) % 24``) holds a training row, ``dow_sin``/``dow_cos`` when
every weekday (``(ts_ns // 1 day + 3) % 7``, Monday 0) does. A span is not enough: two short
recordings of the same hour on consecutive days span a day yet see one value of the hour, and
any other hour is then hundreds of standard deviations out (the live out-of-domain guard would
drop the model on every tick). Scaling is the contract's, done by
the one function ``scale``: ``clip((x - mean) / std, -8, 8)``, NaN or infinite -> 0, with mean and
std from the training split.

Metrics, on the test split and from the ONNX outputs (each exported model is run in
onnxruntime and must match the Python model within 1e-4): ROC AUC and hit rate of
``sign(p_up - 0.5)`` on rows whose return is not zero, and the information coefficient
(Spearman rank correlation of ``p_up`` and the return) on all test rows.

Output: ``DIR/<model>.onnx`` with its sidecar ``DIR/<model>.json`` (scaler, features, spans,
metrics, hyper-parameters, the ONNX file's sha256), and ``DIR/training.json``, the run's summary
and arguments. The inference stage reloads a model whose file changes, so nothing is written
until every asked-for model has been fitted and checked, and each file is written to a temporary
name and renamed into place, the sidecar before its model.

Exit codes: 0 done, 2 wrong usage or unusable input, 1 an exported model disagrees with its
Python original (or the output cannot be written).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import json
import math
import os
import re
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from ops.export import label_tolerance_ns
from shm import schema

PROG = "hft train"
EXTRA_HINT = "install the training extra: .venv/bin/pip install -e '.[train]'"
TRAINING_MODULES = ("pyarrow", "sklearn", "skl2onnx", "onnx", "autograd", "scipy", "onnxruntime")

ASSET_CLASSES = ("crypto", "equity")
CLIP = 8.0
MIN_TRAIN_ROWS = 200
MAX_ABS_DIFF = 1e-4  # exported model vs its Python original, on probabilities
ONNX_OPSET = 17
ONNX_IR_VERSION = 8  # the oldest IR that carries opset 17: loadable by older onnxruntimes
EVAL_CHUNK = 50_000  # rows per onnxruntime call when checking, to bound memory

NOT_INPUTS = {"microprice": "absolute price, not a model input"}
CANDIDATES = tuple(n for n in schema.FEATURE_NAMES if n not in NOT_INPUTS)
_HOUR_NS = 3_600 * 1_000_000_000
_DAY_NS = 24 * _HOUR_NS
# cyclic features kept only when the training rows fall in every bucket of the cycle
_TOD = "the training split does not cover every hour of the day"
_DOW = "the training split does not cover every day of the week"
CYCLIC_REASONS = {"tod_sin": _TOD, "tod_cos": _TOD, "dow_sin": _DOW, "dow_cos": _DOW}


def covers_day(ts_ns: np.ndarray) -> bool:
    """Every UTC hour of the day, ``(ts // 1 h) % 24``, holds at least one of ``ts_ns``."""
    return len(np.unique((np.asarray(ts_ns, np.int64) // _HOUR_NS) % 24)) == 24


def covers_week(ts_ns: np.ndarray) -> bool:
    """Every weekday, ``(ts // 1 day + 3) % 7`` (Monday 0), holds at least one of ``ts_ns``."""
    return len(np.unique((np.asarray(ts_ns, np.int64) // _DAY_NS + 3) % 7)) == 7


BASE_COLUMNS = (
    "symbol",
    "symbol_id",
    "ts_ns",
    "recv_ns",
    "seq",
    "flags",
    "mid",
    "best_bid",
    "best_ask",
)
LABEL_RE = re.compile(r"^ret_bps_(\d+)ms$")
KINDS = {
    "edge": "logistic",
    "gbdt": "gradient_boosting",
    "idec": "mlp",
    "transformer": "attention",
}


class TrainError(Exception):
    """Unusable input or arguments: exit 2."""


class ExportError(Exception):
    """An exported model disagrees with the model it came from: exit 1."""


def scale(X: np.ndarray, mean: np.ndarray, std: np.ndarray, clip: float) -> np.ndarray:
    """The contract's input rule: ``clip((x - mean) / std, -clip, clip)``; NaN or inf -> 0.

    Used for training, for checking the exports and (by contract) by the inference stage, so a
    model never sees inputs scaled differently from those it learned on.
    """
    x = np.asarray(X, dtype=np.float64)
    finite = np.isfinite(x)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        z = (np.where(finite, x, 0.0) - mean) / std
    z = np.clip(z, -clip, clip)
    return np.where(finite, z, 0.0).astype(np.float32)


def _finite_stats(X: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-column mean, population std and count of the finite values (no empty-slice warnings)."""
    finite = np.isfinite(X)
    n = finite.sum(axis=0)
    denom = np.maximum(n, 1)
    mean = np.where(finite, X, 0.0).sum(axis=0) / denom
    var = (np.where(finite, X - mean, 0.0) ** 2).sum(axis=0) / denom
    return mean, np.sqrt(var), n


def _iso(ns: int) -> str:
    dt = datetime.fromtimestamp(ns // 1_000_000_000, UTC).replace(
        microsecond=(ns % 1_000_000_000) // 1000
    )
    return dt.isoformat().replace("+00:00", "Z")


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _span(ts: np.ndarray) -> dict[str, Any]:
    lo, hi = int(ts.min()), int(ts.max())
    return {"start_ns": lo, "end_ns": hi, "start": _iso(lo), "end": _iso(hi), "rows": len(ts)}


# ---------------------------------------------------------------- loading


@dataclass
class Frame:
    """Every row of every file, in file order (per file, the order the feature stage saw them)."""

    files: list[Path]
    ts: np.ndarray  # int64
    flags: np.ndarray  # int64
    # int64: one id per (file, recording, symbol): a sequence never spans files or recordings
    group: np.ndarray
    label: np.ndarray  # float64
    X: np.ndarray  # float64 [rows, len(CANDIDATES)]
    label_name: str
    horizon_ms: int
    symbols: list[str]
    meta: list[dict[str, Any]]


def _label_horizons(names: list[str]) -> list[int]:
    return [int(m.group(1)) for m in map(LABEL_RE.match, names) if m]


def _read_schema(path: Path) -> Any:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not path.is_file():
        raise TrainError(f"{path}: no such file")
    try:
        return pq.read_schema(path)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise TrainError(f"{path}: not a readable Parquet file ({exc})") from None


def _check_columns(path: Path, sch: Any) -> None:
    import pyarrow as pa

    names = set(sch.names)
    for col in (*BASE_COLUMNS, *schema.FEATURE_NAMES):
        if col not in names:
            raise TrainError(
                f"{path}: missing column {col!r} (not an export of hft export-features?)"
            )
    for col in ("ts_ns", "flags", "recording"):
        if col in names and not pa.types.is_integer(sch.field(col).type):
            raise TrainError(f"{path}: column {col!r} is {sch.field(col).type}, expected integers")
    for col in CANDIDATES:
        t = sch.field(col).type
        if not (pa.types.is_floating(t) or pa.types.is_integer(t)):
            raise TrainError(f"{path}: feature column {col!r} is {t}, expected float64")


def _meta(path: Path, sch: Any) -> dict[str, Any]:
    raw = (sch.metadata or {}).get(b"hft")
    if raw is None:
        return {}  # not from export-features, but its columns passed: the sidecar says unknown
    try:
        meta = json.loads(raw)
    except ValueError:
        raise TrainError(f"{path}: the 'hft' metadata is not JSON") from None
    if not isinstance(meta, dict):
        raise TrainError(f"{path}: the 'hft' metadata is not a JSON object")
    return meta


def choose_horizon(per_file: dict[Path, list[int]], asked: int | None) -> int:
    """``asked`` if every file has its label, else (default) 5000 ms, else the first common one."""
    for path, hs in per_file.items():
        if not hs:
            raise TrainError(f"{path}: no label column ret_bps_<h>ms")
        if asked is not None and asked not in hs:
            have = ", ".join(f"ret_bps_{h}ms" for h in hs)
            raise TrainError(f"{path}: no label ret_bps_{asked}ms for --horizon-ms (has {have})")
    if asked is not None:
        return asked
    first = next(iter(per_file.values()))
    common = [h for h in first if all(h in hs for hs in per_file.values())]
    if not common:
        raise TrainError("the files have no label horizon in common; pass files of one export")
    return 5000 if 5000 in common else common[0]


def check_layout(paths: list[Path], metas: list[dict[str, Any]]) -> None:
    """Refuse files whose ``layout_version`` or ``feature_names`` differ from each other or from
    this build's ``shm.schema``; a file without the key (or without metadata) is accepted."""
    build = {"layout_version": schema.LAYOUT_VERSION, "feature_names": list(schema.FEATURE_NAMES)}
    for key, want in build.items():
        seen: tuple[Path, Any] | None = None
        for path, m in zip(paths, metas, strict=True):
            if key not in m:
                continue
            value = m[key]
            if seen is not None and value != seen[1]:
                raise TrainError(
                    f"{seen[0]} and {path} were exported with different {key} ({seen[1]!r} vs "
                    f"{value!r}); a model must be trained on features of one layout"
                )
            seen = seen or (path, value)
        if seen is not None and seen[1] != want:
            raise TrainError(
                f"{seen[0]}: exported with {key} {seen[1]!r}, this build has {want!r}; "
                "export the recordings again with this build"
            )


def _groups(path: Path, table: Any) -> tuple[np.ndarray, np.ndarray]:
    """The file's symbols (in order of first appearance) and, per row, the index of its
    (recording, symbol) pair in the file; a file without ``recording`` is one recording."""
    sym = np.asarray(table.column("symbol").to_numpy(zero_copy_only=False)).astype(str)
    names, first, inv = np.unique(sym, return_index=True, return_inverse=True)
    if "recording" in table.column_names:
        if table.column("recording").null_count:
            raise TrainError(f"{path}: column 'recording' has nulls")
        rec = np.asarray(table.column("recording").to_numpy(), dtype=np.int64)
    else:  # an export from before the column: one recording
        rec = np.zeros(len(sym), dtype=np.int64)
    key = rec * len(names) + inv.astype(np.int64)
    _, group = np.unique(key, return_inverse=True)
    return names[np.argsort(first)], group.astype(np.int64).reshape(-1)


def load(paths: list[Path], horizon_ms: int | None) -> Frame:
    import pyarrow.parquet as pq

    schemas = {}
    for path in paths:
        sch = _read_schema(path)
        _check_columns(path, sch)
        schemas[path] = sch
    meta = [_meta(path, sch) for path, sch in schemas.items()]
    check_layout(list(schemas), meta)
    horizons = {p: _label_horizons(list(s.names)) for p, s in schemas.items()}
    h = choose_horizon(horizons, horizon_ms)
    label_name = f"ret_bps_{h}ms"
    cols = [*BASE_COLUMNS, *CANDIDATES, label_name]
    ts, flags, group, label, feats = [], [], [], [], []
    symbols: list[str] = []
    n_groups = 0
    for path, sch in schemas.items():
        extra = ["recording"] if "recording" in sch.names else []
        try:
            table = pq.read_table(path, columns=[*cols, *extra])
        except Exception as exc:  # pyarrow raises several types for a damaged file
            raise TrainError(f"{path}: cannot read ({type(exc).__name__}: {exc})") from None
        for col in ("symbol", "ts_ns", "flags"):
            if table.column(col).null_count:
                raise TrainError(f"{path}: column {col!r} has nulls")
        names, grp = _groups(path, table)
        for name in names:
            if name not in symbols:
                symbols.append(str(name))
        group.append(grp + n_groups)
        n_groups += int(grp.max()) + 1 if len(grp) else 0
        ts.append(np.asarray(table.column("ts_ns").to_numpy(), dtype=np.int64))
        flags.append(np.asarray(table.column("flags").to_numpy(), dtype=np.int64))
        label.append(np.asarray(table.column(label_name).to_numpy(), dtype=np.float64))
        feats.append(
            np.column_stack(
                [np.asarray(table.column(c).to_numpy(), dtype=np.float64) for c in CANDIDATES]
            )
        )
    return Frame(
        files=list(paths),
        ts=np.concatenate(ts),
        flags=np.concatenate(flags),
        group=np.concatenate(group),
        label=np.concatenate(label),
        X=np.concatenate(feats),
        label_name=label_name,
        horizon_ms=h,
        symbols=symbols,
        meta=meta,
    )


# ---------------------------------------------------------------- split, features, scaler


@dataclass
class Split:
    train: np.ndarray  # row indices into the Frame, sorted by ts_ns
    test: np.ndarray
    fit: np.ndarray  # the training rows whose return is not zero: what classifiers fit on
    keep: np.ndarray  # indices into CANDIDATES
    features: list[str]
    mean: np.ndarray
    std: np.ndarray
    dropped: list[dict[str, str]]
    counts: dict[str, int] = field(default_factory=dict)


def split(frame: Frame, test_fraction: float) -> Split:
    """Time split with an embargo of one horizon plus the label tolerance, then the features and
    scaler from the training rows."""
    n_all = len(frame.ts)
    tradeable = (frame.flags & schema.BOOK_UNTRADEABLE) == 0
    usable = np.flatnonzero(tradeable & np.isfinite(frame.label))
    usable = usable[np.argsort(frame.ts[usable], kind="stable")]
    n_test = round(len(usable) * test_fraction)
    counts = {"rows": n_all, "tradeable": int(tradeable.sum()), "usable": len(usable)}
    if n_test < 1 or n_test >= len(usable):
        raise TrainError(
            f"too few usable rows to split: {len(usable)} of {n_all} are tradeable with a "
            f"finite {frame.label_name}"
        )
    test = usable[len(usable) - n_test :]
    head = usable[: len(usable) - n_test]
    first_test_ns = int(frame.ts[test[0]])
    horizon_ns = frame.horizon_ms * 1_000_000
    # strict, and with the tolerance: a label's book may lie up to that far past t + horizon
    train = head[frame.ts[head] + horizon_ns + label_tolerance_ns(horizon_ns) < first_test_ns]
    fit = train[frame.label[train] != 0]
    counts |= {"embargoed": len(head) - len(train), "train": len(train), "fit": len(fit)}
    counts["test"] = len(test)
    if len(fit) < MIN_TRAIN_ROWS:
        raise TrainError(
            f"only {len(fit)} usable training rows (need {MIN_TRAIN_ROWS}): of {n_all} rows, "
            f"{counts['tradeable']} tradeable, {len(usable)} with a finite {frame.label_name}, "
            f"{len(train)} in the training split after the embargo, {len(fit)} of those "
            "with a non-zero return"
        )
    up = int((frame.label[fit] > 0).sum())
    if up == 0 or up == len(fit):
        raise TrainError(
            f"the {len(fit)} training rows have one class only ({frame.label_name} always "
            f"{'> 0' if up else '< 0'}): nothing to learn"
        )
    mean, std, n_finite = _finite_stats(frame.X[train])
    dropped = [{"name": k, "reason": v} for k, v in NOT_INPUTS.items()]
    keep = []
    covered = {_TOD: covers_day(frame.ts[train]), _DOW: covers_week(frame.ts[train])}
    for j, name in enumerate(CANDIDATES):
        cyclic = CYCLIC_REASONS.get(name)
        if cyclic is not None and not covered[cyclic]:
            # a cycle seen in part of its buckets is a near-constant that any other hour or
            # day pushes to the scaler's clip: a model would read it as a huge signal
            dropped.append({"name": name, "reason": cyclic})
        elif n_finite[j] == 0:
            dropped.append({"name": name, "reason": "no finite value in the training split"})
        elif not std[j] > 1e-12 * max(1.0, abs(mean[j])):
            dropped.append({"name": name, "reason": "constant in the training split"})
        else:
            keep.append(j)
    if not keep:
        raise TrainError("every feature is constant or missing in the training split")
    k = np.asarray(keep, dtype=np.int64)
    return Split(
        train=train,
        test=test,
        fit=fit,
        keep=k,
        features=[CANDIDATES[j] for j in keep],
        mean=mean[k],
        std=std[k],
        dropped=dropped,
        counts=counts,
    )


def sequence_index(group: np.ndarray, seq_len: int) -> np.ndarray:
    """``idx[r, k]``: the row ``seq_len - 1 - k`` books before row ``r`` in its symbol, else -1.

    Indexing a scaled matrix with one zero row appended by ``idx`` gives the contract's
    transformer input: oldest first, current last, zeros before the symbol's first book.
    """
    idx = np.full((len(group), seq_len), -1, dtype=np.int64)
    order = np.argsort(group, kind="stable")  # stable: keeps each symbol's own order
    bounds = np.flatnonzero(np.diff(group[order])) + 1
    for rows in np.split(order, bounds):
        for lag in range(min(seq_len, len(rows))):
            idx[rows[lag:], seq_len - 1 - lag] = rows[: len(rows) - lag]
    return idx


# ---------------------------------------------------------------- models


@dataclass
class Fitted:
    name: str
    kind: str
    params: dict[str, Any]
    onnx: bytes
    output: str
    column: int
    predict: Callable[[np.ndarray], np.ndarray]  # model input -> p_up (the Python model)
    seconds: float = 0.0


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    # one core, and a BLAS summation order that does not depend on the machine
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        yield


def _f32(name: str, arr: np.ndarray) -> Any:
    from onnx import numpy_helper

    return numpy_helper.from_array(np.ascontiguousarray(arr, dtype=np.float32), name)


def _i64(name: str, values: list[int]) -> Any:
    from onnx import numpy_helper

    return numpy_helper.from_array(np.asarray(values, dtype=np.int64), name)


def _finish_graph(nodes: list[Any], inits: list[Any], x_shape: list[Any], name: str) -> bytes:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("p_up", TensorProto.FLOAT, [None, 1])],
        initializer=inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", ONNX_OPSET)],
        producer_name="hft train",
        ir_version=ONNX_IR_VERSION,
    )
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def fit_edge(X: np.ndarray, y: np.ndarray, *, seed: int) -> Fitted:
    from onnx import helper
    from sklearn.linear_model import LogisticRegression

    params = {"C": 1.0, "solver": "lbfgs", "max_iter": 1000}
    clf = LogisticRegression(**params, random_state=seed)  # type: ignore[arg-type]
    clf.fit(X, y)
    n = X.shape[1]
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["xw"]),
        helper.make_node("Add", ["xw", "b"], ["logit"]),
        helper.make_node("Sigmoid", ["logit"], ["p_up"]),
    ]
    inits = [_f32("W", clf.coef_.reshape(n, 1)), _f32("b", clf.intercept_.reshape(1))]
    return Fitted(
        name="edge",
        kind=KINDS["edge"],
        params=params,
        onnx=_finish_graph(nodes, inits, [None, n], "edge"),
        output="p_up",
        column=0,
        predict=lambda Z: clf.predict_proba(Z)[:, 1],
    )


def _skl2onnx(model: Any, n: int, name: str) -> tuple[bytes, str, int]:
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    try:
        onx = convert_sklearn(
            model,
            initial_types=[("x", FloatTensorType([None, n]))],
            options={id(model): {"zipmap": False}},
            target_opset={"": ONNX_OPSET, "ai.onnx.ml": 3},
        )
    except Exception as exc:  # skl2onnx fails in many ways on what it does not support
        raise ExportError(
            f"{name}: skl2onnx cannot convert {type(model).__name__} ({type(exc).__name__})"
        ) from exc
    onx.graph.name = name  # skl2onnx names it with a random uuid: same data, different bytes
    outs = [o.name for o in onx.graph.output]
    # skl2onnx names a classifier's outputs label and probabilities ([batch, 2], p_up in 1)
    prob = "probabilities" if "probabilities" in outs else outs[-1]
    return bytes(onx.SerializeToString()), prob, 1


def fit_gbdt(X: np.ndarray, y: np.ndarray, *, seed: int, log: Callable[[str], None]) -> Fitted:
    from sklearn.ensemble import GradientBoostingClassifier, HistGradientBoostingClassifier

    hist = {
        "max_iter": 150,
        "learning_rate": 0.05,
        "max_leaf_nodes": 15,
        "min_samples_leaf": 20,
        "l2_regularization": 1.0,
        "early_stopping": False,
    }
    clf: Any = HistGradientBoostingClassifier(**hist, random_state=seed)  # type: ignore[arg-type]
    clf.fit(X, y)
    try:
        blob, out, col = _skl2onnx(clf, X.shape[1], "gbdt")
        params, kind = hist, "hist_gradient_boosting"
    except ExportError as exc:
        log(f"{exc}; using GradientBoostingClassifier")
        params = {
            "n_estimators": 150,
            "learning_rate": 0.05,
            "max_leaf_nodes": 15,
            "min_samples_leaf": 20,
            "subsample": 1.0,
        }
        clf = GradientBoostingClassifier(**params, random_state=seed)  # type: ignore[arg-type]
        clf.fit(X, y)
        blob, out, col = _skl2onnx(clf, X.shape[1], "gbdt")
        kind = "gradient_boosting"
    return Fitted(
        name="gbdt",
        kind=kind,
        params=params,
        onnx=blob,
        output=out,
        column=col,
        predict=lambda Z: clf.predict_proba(Z)[:, 1],
    )


def fit_idec(X: np.ndarray, y: np.ndarray, *, seed: int) -> Fitted:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    params = {
        "hidden_layer_sizes": [64, 32],
        "activation": "relu",
        "solver": "adam",
        "alpha": 1e-3,
        "batch_size": 256,
        "learning_rate_init": 1e-3,
        "max_iter": 200,
        "early_stopping": False,
    }
    clf = MLPClassifier(**{**params, "hidden_layer_sizes": (64, 32)}, random_state=seed)  # type: ignore[arg-type]
    with warnings.catch_warnings():
        # max_iter is a fixed epoch budget, not a convergence target: stopping there is normal
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(X, y)
    params["epochs"] = int(clf.n_iter_)
    blob, out, col = _skl2onnx(clf, X.shape[1], "idec")
    return Fitted(
        name="idec",
        kind=KINDS["idec"],
        params=params,
        onnx=blob,
        output=out,
        column=col,
        predict=lambda Z: clf.predict_proba(Z)[:, 1],
    )


# ---- transformer: attention pooling over the symbol's last seq_len vectors

TF_D = 16  # model width
TF_HIDDEN = 32  # feed-forward width
TF_EPOCHS = 20
TF_MAX_STEPS = 4000  # caps the epochs on large exports so training stays minutes, not hours
TF_BATCH = 256
TF_LR = 2e-3
TF_WEIGHT_DECAY = 1e-4  # decoupled (AdamW), on the matrices only
TF_DECAYED = ("W_in", "P", "Wq", "Wk", "Wv", "Wo", "W1", "W2", "w_out")


def transformer_init(n: int, seq_len: int, *, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    d, hdn = TF_D, TF_HIDDEN

    def w(fan_in: int, *shape: int) -> np.ndarray:
        return rng.normal(0.0, 1.0 / math.sqrt(fan_in), shape)

    return {
        "W_in": w(n, n, d),
        "b_in": np.zeros(d),
        "P": rng.normal(0.0, 0.02, (seq_len, d)),
        "Wq": w(d, d, d),
        "Wk": w(d, d, d),
        "Wv": w(d, d, d),
        "Wo": w(d, d, d),
        "bo": np.zeros(d),
        "W1": w(d, d, hdn),
        "b1": np.zeros(hdn),
        "W2": w(hdn, hdn, d) * 0.5,
        "b2": np.zeros(d),
        "w_out": w(d, d, 1),
        "b_out": np.zeros(1),
    }


def transformer_logit(params: dict[str, Any], X: Any) -> Any:
    """The forward pass, written once for autograd and plain numpy arrays: ``[B, L, n] -> [B]``.

    The current tick (last position) is the query; attention pools the window into a context
    vector added back to it, then a residual ReLU feed-forward and a logistic output.
    """
    import autograd.numpy as anp

    h = anp.matmul(X, params["W_in"]) + params["b_in"] + params["P"]  # [B, L, d]
    last = h[:, -1, :]
    q = anp.matmul(last, params["Wq"]) / math.sqrt(TF_D)
    k = anp.matmul(h, params["Wk"])
    v = anp.matmul(h, params["Wv"])
    s = anp.sum(k * q[:, None, :], axis=2)  # [B, L]
    s = s - anp.max(s, axis=1, keepdims=True)
    a = anp.exp(s)
    a = a / anp.sum(a, axis=1, keepdims=True)
    ctx = anp.sum(a[:, :, None] * v, axis=1)
    z = last + anp.matmul(ctx, params["Wo"]) + params["bo"]
    f = z + anp.matmul(anp.maximum(anp.matmul(z, params["W1"]) + params["b1"], 0.0), params["W2"])
    f = f + params["b2"]
    return (anp.matmul(f, params["w_out"]) + params["b_out"])[:, 0]


def transformer_predict(params: dict[str, np.ndarray], X: np.ndarray) -> np.ndarray:
    logit = np.asarray(transformer_logit(params, np.asarray(X, dtype=np.float64)))
    return np.asarray(1.0 / (1.0 + np.exp(-logit)), dtype=np.float64)


def transformer_onnx(params: dict[str, np.ndarray], n: int, seq_len: int) -> bytes:
    """The forward pass as an opset-17 graph: input ``x [batch, seq_len, n]``, ``p_up [batch, 1]``."""
    from onnx import helper, numpy_helper

    mk = helper.make_node
    nodes = [
        mk("MatMul", ["x", "W_in"], ["h0"]),
        mk("Add", ["h0", "b_in"], ["h1"]),
        mk("Add", ["h1", "P"], ["h"]),
        mk("Gather", ["h", "last_pos"], ["last"], axis=1),  # scalar index: [B, d]
        mk("MatMul", ["last", "Wq"], ["q"]),
        mk("Unsqueeze", ["q", "ax1"], ["q3"]),
        mk("MatMul", ["h", "Wk"], ["k"]),
        mk("MatMul", ["h", "Wv"], ["v"]),
        mk("Mul", ["k", "q3"], ["kq"]),
        mk("ReduceSum", ["kq", "ax2"], ["s"], keepdims=1),  # [B, L, 1]
        mk("Softmax", ["s"], ["a"], axis=1),
        mk("Mul", ["a", "v"], ["av"]),
        mk("ReduceSum", ["av", "ax1"], ["ctx"], keepdims=0),  # [B, d]
        mk("MatMul", ["ctx", "Wo"], ["o0"]),
        mk("Add", ["o0", "bo"], ["o"]),
        mk("Add", ["last", "o"], ["z"]),
        mk("MatMul", ["z", "W1"], ["f0"]),
        mk("Add", ["f0", "b1"], ["f1"]),
        mk("Relu", ["f1"], ["f2"]),
        mk("MatMul", ["f2", "W2"], ["f3"]),
        mk("Add", ["f3", "b2"], ["f4"]),
        mk("Add", ["z", "f4"], ["f"]),
        mk("MatMul", ["f", "w_out"], ["l0"]),
        mk("Add", ["l0", "b_out"], ["logit"]),
        mk("Sigmoid", ["logit"], ["p_up"]),
    ]
    inits = [
        _f32(k, params[k] / math.sqrt(TF_D) if k == "Wq" else params[k])  # 1/sqrt(d) folded in
        for k in ("W_in", "b_in", "P", "Wq", "Wk", "Wv", "Wo", "bo", "W1", "b1", "W2", "b2")
    ]
    inits += [_f32("w_out", params["w_out"]), _f32("b_out", params["b_out"])]
    inits += [numpy_helper.from_array(np.asarray(seq_len - 1, dtype=np.int64), "last_pos")]
    inits += [_i64("ax1", [1]), _i64("ax2", [2])]
    return _finish_graph(nodes, inits, [None, seq_len, n], "transformer")


def pad(S: np.ndarray) -> np.ndarray:
    """``S`` with one zero row appended: indexed by ``sequence_index``, -1 picks the zeros."""
    return np.vstack([S, np.zeros((1, S.shape[1]), dtype=S.dtype)])


def fit_transformer(
    S_pad: np.ndarray, idx: np.ndarray, y: np.ndarray, *, seq_len: int, seed: int
) -> Fitted:
    """Fit on the windows ``S_pad[idx]`` (``S_pad``: every row scaled, see ``pad``)."""
    import autograd.numpy as anp
    from autograd import grad

    n = S_pad.shape[1]
    params = transformer_init(n, seq_len, seed=seed)
    yf = y.astype(np.float64)

    def loss(p: dict[str, Any], Xb: np.ndarray, yb: np.ndarray) -> Any:
        logit = transformer_logit(p, Xb)
        return anp.mean(anp.logaddexp(0.0, logit) - yb * logit)  # binary cross-entropy

    dloss = grad(loss)
    rng = np.random.default_rng(seed + 1)
    m = {k: np.zeros_like(v) for k, v in params.items()}
    v2 = {k: np.zeros_like(v) for k, v in params.items()}
    per_epoch = max(1, math.ceil(len(y) / TF_BATCH))
    epochs = max(1, min(TF_EPOCHS, TF_MAX_STEPS // per_epoch))
    b1, b2, eps = 0.9, 0.999, 1e-8
    step = 0
    for _ in range(epochs):
        perm = rng.permutation(len(y))
        for start in range(0, len(y), TF_BATCH):
            b = perm[start : start + TF_BATCH]
            g = dloss(params, S_pad[idx[b]].astype(np.float64), yf[b])
            step += 1
            for k in params:
                m[k] = b1 * m[k] + (1 - b1) * g[k]
                v2[k] = b2 * v2[k] + (1 - b2) * g[k] ** 2
                mh = m[k] / (1 - b1**step)
                vh = v2[k] / (1 - b2**step)
                if k in TF_DECAYED:
                    params[k] = params[k] * (1 - TF_LR * TF_WEIGHT_DECAY)
                params[k] = params[k] - TF_LR * mh / (np.sqrt(vh) + eps)
    hp = {
        "d_model": TF_D,
        "ffn_hidden": TF_HIDDEN,
        "heads": 1,
        "seq_len": seq_len,
        "epochs": epochs,
        "batch_size": TF_BATCH,
        "learning_rate": TF_LR,
        "weight_decay": TF_WEIGHT_DECAY,
        "optimizer": "adamw",
        "steps": step,
    }
    final = {k: v.copy() for k, v in params.items()}
    return Fitted(
        name="transformer",
        kind=KINDS["transformer"],
        params=hp,
        onnx=transformer_onnx(final, n, seq_len),
        output="p_up",
        column=0,
        predict=lambda Z: transformer_predict(final, Z),
    )


# ---------------------------------------------------------------- checking and metrics


def session(blob: bytes) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    return ort.InferenceSession(blob, so, providers=["CPUExecutionProvider"])


def check_export(
    fitted: Fitted, n_rows: int, inputs: Callable[[np.ndarray], np.ndarray]
) -> np.ndarray:
    """Run the ONNX model on every row ``inputs`` builds; it must match the Python model.

    Returns the ONNX ``p_up``: the metrics are those of what the engine will run.
    """
    sess = session(fitted.onnx)
    names = [o.name for o in sess.get_outputs()]
    if fitted.output not in names:
        raise ExportError(f"{fitted.name}: ONNX has no output {fitted.output!r} (has {names})")
    out: list[np.ndarray] = []
    worst = 0.0
    for start in range(0, n_rows, EVAL_CHUNK):
        Z = inputs(np.arange(start, min(n_rows, start + EVAL_CHUNK)))
        res = np.asarray(sess.run([fitted.output], {"x": Z})[0])
        if res.ndim != 2 or res.shape[0] != len(Z) or res.shape[1] <= fitted.column:
            raise ExportError(f"{fitted.name}: ONNX output {fitted.output} has shape {res.shape}")
        p = res[:, fitted.column].astype(np.float64)
        worst = max(worst, float(np.max(np.abs(p - fitted.predict(Z)), initial=0.0)))
        out.append(p)
    if not worst <= MAX_ABS_DIFF:
        raise ExportError(
            f"{fitted.name}: the ONNX export differs from the trained model by {worst:.3g} "
            f"(allowed {MAX_ABS_DIFF:g}) on the test split; not written"
        )
    return np.concatenate(out) if out else np.zeros(0)


def metrics(p: np.ndarray, ret: np.ndarray) -> dict[str, Any]:
    from scipy.stats import spearmanr
    from sklearn.metrics import roc_auc_score

    moved = ret != 0
    up = ret[moved] > 0
    auc = hit = ic = None
    if up.any() and not up.all():
        auc = float(roc_auc_score(up, p[moved]))
    if moved.any():
        hit = float(np.mean(np.sign(p[moved] - 0.5) == np.sign(ret[moved])))
    if len(p) > 1 and np.ptp(p) > 0 and np.ptp(ret) > 0:  # else rank correlation is undefined
        ic = float(spearmanr(p, ret).statistic)
    return {"auc": auc, "hit_rate": hit, "ic": ic, "n_test": len(p)}


# ---------------------------------------------------------------- writing


def _temp(out: Path, prefix: str) -> tuple[int, str]:
    fd, tmp = tempfile.mkstemp(dir=out, prefix=prefix, suffix=".tmp")
    # mkstemp makes the file private (0600); models are read by the engine's stages, so give
    # them the mode any other file written here would get
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)
    return fd, tmp


def _atomic_pair(out: Path, name: str, blob: bytes, sidecar: dict[str, Any]) -> None:
    """Sidecar first, then the model: the inference stage reloads on a changed ``.onnx``, and by
    then the sidecar that describes it is already in place."""
    text = (json.dumps(sidecar, indent=2, allow_nan=False) + "\n").encode()
    temps: list[str] = []
    try:
        for data in (text, blob):
            fd, tmp = _temp(out, f".{name}.")
            temps.append(tmp)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        os.replace(temps[0], out / f"{name}.json")
        os.replace(temps[1], out / f"{name}.onnx")
    finally:
        for tmp in temps:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


def _atomic_json(path: Path, doc: dict[str, Any]) -> None:
    fd, tmp = _temp(path.parent, f".{path.stem}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write((json.dumps(doc, indent=2, allow_nan=False) + "\n").encode())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _one_or_mixed(values: list[Any]) -> Any:
    distinct = list(dict.fromkeys(v for v in values if v is not None))
    return distinct[0] if len(distinct) == 1 else ("mixed" if distinct else None)


def data_block(frame: Frame) -> tuple[dict[str, Any], int | None]:
    windows: set[int] = set()
    for path, m in zip(frame.files, frame.meta, strict=True):
        w = m.get("feature_window_size")
        if w is not None and not (isinstance(w, int) and w > 0):
            raise TrainError(f"{path}: metadata feature_window_size is {w!r}, not a count")
        if w is not None:
            windows.add(w)
    if len(windows) > 1:
        raise TrainError(
            f"the files were exported with different feature windows ({sorted(windows)}); "
            "a model must be trained on features of one window"
        )
    data = {
        "source": _one_or_mixed([m.get("data") for m in frame.meta]) or "unknown",
        "files": [str(p) for p in frame.files],
        "recordings": [m.get("source") for m in frame.meta],
        "venue": _one_or_mixed([m.get("venue") for m in frame.meta]),
        "symbols": frame.symbols,
    }
    return data, (next(iter(windows)) if windows else None)


# ---------------------------------------------------------------- command


def _fraction(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < x < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text!r}")
    return x


def _positive(text: str) -> int:
    try:
        x = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if x < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text!r}")
    return x


def _models(text: str) -> list[str]:
    asked = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in asked if m not in schema.MODEL_NAMES]
    if bad or not asked:
        raise argparse.ArgumentTypeError(
            f"unknown model {', '.join(bad) or '(none)'}; choose from {','.join(schema.MODEL_NAMES)}"
        )
    return [m for m in schema.MODEL_NAMES if m in asked]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description="fit the inference models on hft export-features Parquet"
    )
    p.add_argument("files", nargs="+", metavar="FILE.parquet", help="from hft export-features")
    p.add_argument("--asset-class", required=True, choices=ASSET_CLASSES)
    p.add_argument("--out", required=True, metavar="DIR", help="e.g. models/crypto")
    p.add_argument(
        "--horizon-ms",
        type=_positive,
        default=None,
        help="label horizon (default: 5000 if exported, else the first)",
    )
    p.add_argument("--test-fraction", type=_fraction, default=0.3, help="default: %(default)s")
    p.add_argument(
        "--seq-len", type=_positive, default=16, help="transformer window (default: %(default)s)"
    )
    p.add_argument(
        "--models",
        type=_models,
        default=list(schema.MODEL_NAMES),
        help=f"comma-separated subset of {','.join(schema.MODEL_NAMES)} (default: all)",
    )
    p.add_argument("--seed", type=int, default=0)
    return p


def _missing_training_module() -> str | None:
    for mod in TRAINING_MODULES:
        try:
            importlib.import_module(mod)
        except ImportError:
            return mod
    return None


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def fit_all(
    frame: Frame,
    sp: Split,
    *,
    models: list[str],
    seq_len: int,
    seed: int,
    log: Callable[[str], None],
) -> list[tuple[Fitted, np.ndarray]]:
    """Fit each asked-for model, check its export; returns it with its ONNX ``p_up`` on test."""
    # every row scaled once: tabular models take rows of S, the transformer windows of it
    S = scale(frame.X[:, sp.keep], sp.mean, sp.std, CLIP)
    S_pad = pad(S)
    y_fit = (frame.label[sp.fit] > 0).astype(np.int64)
    idx = sequence_index(frame.group, seq_len) if "transformer" in models else None

    def tabular(r: np.ndarray) -> np.ndarray:
        return np.asarray(S[sp.test[r]])

    def windows(r: np.ndarray) -> np.ndarray:
        assert idx is not None
        return np.asarray(S_pad[idx[sp.test[r]]])

    done = []
    for name in models:
        t0 = time.perf_counter()
        with _one_thread():
            if name == "edge":
                f = fit_edge(S[sp.fit], y_fit, seed=seed)
            elif name == "gbdt":
                f = fit_gbdt(S[sp.fit], y_fit, seed=seed, log=log)
            elif name == "idec":
                f = fit_idec(S[sp.fit], y_fit, seed=seed)
            else:
                assert idx is not None
                f = fit_transformer(S_pad, idx[sp.fit], y_fit, seq_len=seq_len, seed=seed)
        f.seconds = time.perf_counter() - t0
        p = check_export(f, len(sp.test), windows if name == "transformer" else tabular)
        done.append((f, p))
    return done


def make_sidecar(
    f: Fitted,
    frame: Frame,
    sp: Split,
    *,
    asset_class: str,
    seq_len: int,
    seed: int,
    data: dict[str, Any],
    window: int | None,
    metrics_: dict[str, Any],
) -> dict[str, Any]:
    """The contract's fields in its order, then this trainer's own (kind, params, ...)."""
    n = len(sp.features)
    L = seq_len if f.name == "transformer" else 1
    return {
        "format": 1,
        "model": f.name,
        "asset_class": asset_class,
        "kind": f.kind,
        "features": sp.features,
        "scaler": {"mean": sp.mean.tolist(), "std": sp.std.tolist(), "clip": CLIP},
        "seq_len": L,
        "input": {"name": "x", "shape": [None, L, n] if f.name == "transformer" else [None, n]},
        "output": {"name": f.output, "column": f.column},
        "horizon_ms": frame.horizon_ms,
        "label": frame.label_name,
        "move_bps": float(np.mean(np.abs(frame.label[sp.train]))),
        "feature_window_size": window,
        "train_span": _span(frame.ts[sp.train]),
        "test_span": _span(frame.ts[sp.test]),
        "metrics": metrics_,
        "data": data,
        "created": _now_iso(),
        "dropped_features": sp.dropped,
        "params": {**f.params, "seed": seed, "fit_rows": len(sp.fit)},
        "model_sha256": hashlib.sha256(f.onnx).hexdigest(),
    }


def train(args: argparse.Namespace, argv: list[str]) -> int:
    log = print
    paths = [Path(f) for f in args.files]
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise TrainError(f"--out {out}: exists and is not a directory")
    frame = load(paths, args.horizon_ms)
    sp = split(frame, args.test_fraction)
    data, window = data_block(frame)
    c = sp.counts
    log(
        f"{PROG}: {c['rows']:,} rows from {len(paths)} file(s) ({data['source']}, "
        f"{data['venue'] or '?'}: {', '.join(frame.symbols)}), label {frame.label_name}"
    )
    log(
        f"  usable {c['usable']:,} (tradeable, finite label); train {c['train']:,} "
        f"(embargo dropped {c['embargoed']:,}; {c['fit']:,} with a non-zero return), "
        f"test {c['test']:,}"
    )
    log(
        f"  {len(sp.features)} features; dropped "
        + ", ".join(f"{d['name']} ({d['reason']})" for d in sp.dropped)
    )
    # all models fitted and checked before any is written: a failure leaves the old set intact
    fitted = fit_all(frame, sp, models=args.models, seq_len=args.seq_len, seed=args.seed, log=log)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {}
    for f, p in fitted:
        m = metrics(p, frame.label[sp.test])
        sidecar = make_sidecar(
            f,
            frame,
            sp,
            asset_class=args.asset_class,
            seq_len=args.seq_len,
            seed=args.seed,
            data=data,
            window=window,
            metrics_=m,
        )
        _atomic_pair(out, f.name, f.onnx, sidecar)
        summary[f.name] = {
            "kind": f.kind,
            **m,
            "train_rows": len(sp.train),
            "fit_rows": len(sp.fit),
            "seconds": round(f.seconds, 3),
        }

    log(
        f"{'model':<12} {'kind':<24} {'AUC':>6} {'hit':>6} {'IC':>7} {'n_test':>8} "
        f"{'train':>8} {'secs':>7}"
    )
    for name, s in summary.items():
        log(
            f"{name:<12} {s['kind']:<24} {_fmt(s['auc'], '6.3f')} {_fmt(s['hit_rate'], '6.3f')} "
            f"{_fmt(s['ic'], '7.3f')} {s['n_test']:>8,} {s['train_rows']:>8,} {s['seconds']:>7.2f}"
        )
    _atomic_json(
        out / "training.json",
        {
            "created": _now_iso(),
            "argv": list(argv),
            "args": {
                "files": [str(p) for p in paths],
                "asset_class": args.asset_class,
                "out": str(out),
                "horizon_ms": frame.horizon_ms,
                "test_fraction": args.test_fraction,
                "seq_len": args.seq_len,
                "models": list(args.models),
                "seed": args.seed,
            },
            "label": frame.label_name,
            "rows": sp.counts,
            "features": sp.features,
            "dropped_features": sp.dropped,
            "train_span": _span(frame.ts[sp.train]),
            "test_span": _span(frame.ts[sp.test]),
            "models": summary,
        },
    )
    log(f"wrote {', '.join(f'{n}.onnx' for n in summary)} and sidecars to {out}/")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse has printed the usage and the problem
        return exc.code if isinstance(exc.code, int) else 2
    missing = _missing_training_module()
    if missing:
        print(
            f"{PROG}: the training packages are missing ({missing}); {EXTRA_HINT}", file=sys.stderr
        )
        return 2
    try:
        return train(args, argv)
    except TrainError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    except ExportError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"{PROG}: cannot write the models: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
