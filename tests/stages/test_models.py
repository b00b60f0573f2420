"""ONNX models of the inference stage: checks on load, scaling, history, ensemble, deadline, reload.

The models are built here with ``onnx.helper`` from known weights (a logistic regression, a
sequence model, a deliberately slow chain of matrix products), so every output is checked
against plain numpy.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from shm import schema, stats
from shm.stats import StageStats
from stages.models import Model, ModelError, ModelSet, file_stamp, load_model

FEATS = ("spread_bps", "obi", "depth_imbalance", "rvol_bps")
IDX = np.array([schema.FEATURE_NAMES.index(f) for f in FEATS])
MEAN = np.array([5.0, 0.0, 0.1, 2.0])
STD = np.array([4.0, 0.5, 0.4, 1.5])
CLIP = 3.0
HIGH = MEAN + CLIP * STD  # the training range: a value beyond it puts the tick out of domain


# ---------------------------------------------------------------- building models
def _blob(
    nodes: list[Any],
    inputs: list[Any],
    outputs: list[Any],
    inits: list[np.ndarray],
    names: list[str],
) -> bytes:
    graph = helper.make_graph(
        nodes,
        "g",
        inputs,
        outputs,
        [numpy_helper.from_array(a, n) for a, n in zip(inits, names, strict=True)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def logistic_onnx(
    w: list[float] | np.ndarray,
    b: float,
    *,
    width: int | None = None,
    in_name: str = "x",
    out_name: str = "p_up",
    two_columns: bool = False,
    batch_dim: int | None = None,
    sigmoid: bool = True,
) -> bytes:
    """p_up = sigmoid(x @ w + b); ``two_columns``: output [1 - p, p] (p_up in column 1)."""
    wt = np.asarray(w, np.float32).reshape(-1, 1)
    n = width or len(wt)
    nodes = [
        helper.make_node("MatMul", [in_name, "W"], ["z"]),
        helper.make_node("Add", ["z", "B"], ["logit"]),
    ]
    last = "logit"
    if sigmoid:
        nodes.append(helper.make_node("Sigmoid", ["logit"], ["p"]))
        last = "p"
    if two_columns:
        nodes += [
            helper.make_node("Sub", ["ONE", last], ["q"]),
            helper.make_node("Concat", ["q", last], [out_name], axis=1),
        ]
    else:
        nodes.append(helper.make_node("Identity", [last], [out_name]))
    k = 2 if two_columns else 1
    return _blob(
        nodes,
        [helper.make_tensor_value_info(in_name, TensorProto.FLOAT, [batch_dim, n])],
        [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, [batch_dim, k])],
        [wt, np.array([b], np.float32), np.array([1.0], np.float32)],
        ["W", "B", "ONE"],
    )


def sequence_onnx(w: np.ndarray, b: float, seq_len: int, n: int) -> bytes:
    """p_up = sigmoid(flatten(x) @ w + b) over x [batch, seq_len, n]: each position weighs apart."""
    return _blob(
        [
            helper.make_node("Flatten", ["x"], ["f"], axis=1),
            helper.make_node("MatMul", ["f", "W"], ["z"]),
            helper.make_node("Add", ["z", "B"], ["logit"]),
            helper.make_node("Sigmoid", ["logit"], ["p_up"]),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, seq_len, n])],
        [helper.make_tensor_value_info("p_up", TensorProto.FLOAT, [None, 1])],
        [np.asarray(w, np.float32).reshape(-1, 1), np.array([b], np.float32)],
        ["W", "B"],
    )


def slow_onnx(w: list[float], b: float, *, depth: int = 160, k: int = 1024) -> bytes:
    """A logistic model plus 0 x a chain of ``depth`` [k, k] products: same p_up, milliseconds."""
    n = len(w)
    rng = np.random.default_rng(3)
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["z"]),
        helper.make_node("Add", ["z", "B"], ["logit0"]),
        helper.make_node("MatMul", ["x", "W0"], ["h0"]),
    ]
    for i in range(depth):
        nodes.append(helper.make_node("MatMul", [f"h{i}", "W1"], [f"h{i + 1}"]))
    nodes += [
        helper.make_node("ReduceSum", [f"h{depth}"], ["r"], keepdims=1),
        helper.make_node("Mul", ["r", "ZERO"], ["r0"]),
        helper.make_node("Add", ["logit0", "r0"], ["logit"]),
        helper.make_node("Sigmoid", ["logit"], ["p_up"]),
    ]
    return _blob(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, n])],
        [helper.make_tensor_value_info("p_up", TensorProto.FLOAT, [None, 1])],
        [
            np.asarray(w, np.float32).reshape(-1, 1),
            np.array([b], np.float32),
            (rng.standard_normal((n, k)) * 1e-2).astype(np.float32),
            (rng.standard_normal((k, k)) * 1e-3).astype(np.float32),
            np.array([0.0], np.float32),
        ],
        ["W", "B", "W0", "W1", "ZERO"],
    )


def sidecar(
    name: str,
    *,
    features: tuple[str, ...] = FEATS,
    mean: np.ndarray = MEAN,
    std: np.ndarray = STD,
    clip: float = CLIP,
    seq_len: int = 1,
    column: int = 0,
    move_bps: float = 2.0,
    **over: Any,
) -> dict[str, Any]:
    nf = len(features)
    doc: dict[str, Any] = {
        "format": 1,
        "model": name,
        "asset_class": "crypto",
        "kind": "logistic",
        "features": list(features),
        "scaler": {"mean": list(map(float, mean)), "std": list(map(float, std)), "clip": clip},
        "seq_len": seq_len,
        "input": {"name": "x", "shape": [None, seq_len, nf] if seq_len > 1 else [None, nf]},
        "output": {"name": "p_up", "column": column},
        "horizon_ms": 5000,
        "label": "ret_bps_5000ms",
        "move_bps": move_bps,
        "feature_window_size": 1000,
        "metrics": {"auc": 0.55, "hit_rate": 0.53, "ic": 0.04, "n_test": 1234},
        "created": "2025-01-01T00:00:00Z",
    }
    doc.update(over)
    return doc


def write_model(directory: Path, name: str, blob: bytes, side: dict[str, Any] | None) -> Path:
    """Write like the trainer: the sidecar first, then the model, each by ``os.replace``."""
    directory.mkdir(parents=True, exist_ok=True)
    if side is not None:
        tmp = directory / f".{name}.json.tmp"
        tmp.write_text(json.dumps(side))
        os.replace(tmp, directory / f"{name}.json")
    tmp = directory / f".{name}.onnx.tmp"
    tmp.write_bytes(blob)
    path = directory / f"{name}.onnx"
    os.replace(tmp, path)
    return path


class _Seg:
    payload = memoryview(bytearray(0))

    def __init__(self) -> None:
        self.payload = memoryview(bytearray(stats.N_BLOCKS * schema.STAGE_STATS.itemsize))


def new_stats() -> StageStats:
    return StageStats(_Seg(), 0)  # type: ignore[arg-type]


def hist_counts(st: StageStats, which: int) -> np.ndarray:
    h = np.array(st.hist).reshape(schema.N_HISTS, schema.HIST_BUCKETS)
    counts: np.ndarray = h[which]
    return counts


def model_counter(st: StageStats, name: str, which: int) -> int:
    i = schema.MODEL_NAMES.index(name)
    return int(st.ints[schema.MODEL_COUNTERS_BASE + i * schema.N_MODEL_COUNTERS + which])


def features(
    rng: np.random.Generator, n: int, *, n_symbols: int = 4, in_domain: bool = False
) -> np.ndarray:
    """Random feature vectors; ``in_domain``: every tick inside the test scaler's range (wide
    spreads and high vols otherwise put some ticks out of domain)."""
    fv = np.zeros(n, schema.FEATURES)
    v = fv["values"]
    v[:] = np.nan  # features a model does not read stay NaN: nothing may depend on them
    if in_domain:
        v[:, schema.F_SPREAD_BPS] = rng.uniform(0.05, 0.99 * HIGH[0], n)
    else:
        v[:, schema.F_SPREAD_BPS] = rng.uniform(0.05, 30.0, n)
    v[:, schema.F_OBI] = rng.uniform(-1, 1, n)
    v[:, schema.F_DEPTH_IMB] = rng.uniform(-1, 1, n)
    if in_domain:
        v[:, schema.F_RVOL_BPS] = rng.uniform(0.0, 0.99 * HIGH[3], n)
    else:
        v[:, schema.F_RVOL_BPS] = rng.exponential(3.0, n)
    fv["symbol_id"] = rng.integers(0, n_symbols, n)
    fv["flags"] = rng.choice([schema.BOOK_SNAPSHOT, schema.BOOK_STALE, schema.BOOK_CROSSED, 0], n)
    fv["seq"] = np.arange(n) + 100
    fv["exch_ns"] = rng.integers(0, 1 << 60, n)
    fv["recv_ns"] = rng.integers(0, 1 << 60, n)
    fv["ingest_ns"] = rng.integers(0, 1 << 60, n)
    fv["feature_ns"] = rng.integers(0, 1 << 60, n)
    fv["mid"] = rng.uniform(1, 1e5, n)
    fv["best_bid"] = fv["mid"] * 0.9999
    fv["best_ask"] = fv["mid"] * 1.0001
    assert not (in_domain and ref_ood(v).any())
    return fv


def ref_scale(values: np.ndarray, mean: np.ndarray = MEAN, std: np.ndarray = STD) -> np.ndarray:
    """The README's rule in numpy: clip((v - mean) / std, -clip, clip); NaN or inf -> 0."""
    v = values[:, IDX]
    with np.errstate(invalid="ignore"):
        z = np.clip((v - mean) / std, -CLIP, CLIP)
    z[~np.isfinite(v)] = 0.0
    scaled: np.ndarray = z.astype(np.float32)
    return scaled


def ref_ood(values: np.ndarray, mean: np.ndarray = MEAN, std: np.ndarray = STD) -> np.ndarray:
    """The out-of-domain rule in numpy: some finite input further than clip stds from its mean."""
    v = values[:, IDX]
    with np.errstate(invalid="ignore"):
        out = np.isfinite(v) & (np.abs(v - mean) > CLIP * std)
    result: np.ndarray = out.any(axis=1)
    return result


def sigmoid(z: np.ndarray) -> np.ndarray:
    out: np.ndarray = 1.0 / (1.0 + np.exp(-z))
    return out


def model_set(directory: Path, **kw: Any) -> ModelSet:
    kw.setdefault("timeout_ms", 1000.0)
    kw.setdefault("reload_check_ms", 20.0)
    kw.setdefault("max_batch", 64)
    return ModelSet(directory, stats=kw.pop("stats", None) or new_stats(), **kw)


def run_batch(ms: ModelSet, fv: np.ndarray, n: int | None = None) -> tuple[int, np.ndarray]:
    n = len(fv) if n is None else n
    out = np.zeros(len(fv), schema.SIGNAL)
    answered = ms.infer(fv, n, time.monotonic_ns(), out)
    return answered, out


def pump(ms: ModelSet, until: Callable[[], bool], *, timeout_s: float = 20.0) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        ms.maintain(time.monotonic_ns())
        if until():
            return
        time.sleep(0.005)
    raise AssertionError("condition not reached")


W_EDGE = [0.8, -1.2, 0.5, 0.3]
B_EDGE = 0.1


# ---------------------------------------------------------------- loading and checks
def test_load_reads_the_sidecar_and_answers_like_numpy(tmp_path: Path) -> None:
    path = write_model(tmp_path, "edge", logistic_onnx(W_EDGE, B_EDGE), sidecar("edge"))
    m = load_model(path, max_batch=16)
    assert isinstance(m, Model)
    assert (m.name, m.index, m.seq_len, m.sequence) == ("edge", 0, 1, False)
    assert m.feature_idx.tolist() == IDX.tolist()
    assert m.mean.tolist() == MEAN.tolist() and m.std.tolist() == STD.tolist() and m.clip == CLIP
    assert (m.input_name, m.output_name, m.output_column) == ("x", "p_up", 0)
    assert (m.move_bps, m.horizon_ms, m.feature_window_size) == (2.0, 5000.0, 1000)
    assert m.metrics["auc"] == 0.55
    assert m.inputs.shape == (16, 4) and m.inputs.dtype == np.float32
    assert m.warm_run_ns > 0 and m.load_ns >= m.warm_run_ns
    opts = m.session.get_session_options()
    assert (opts.intra_op_num_threads, opts.inter_op_num_threads) == (1, 1)
    assert m.session.get_providers() == ["CPUExecutionProvider"]

    fv = features(np.random.default_rng(1), 10)
    m.gather(fv["values"], fv["symbol_id"], 10)
    ref = sigmoid(ref_scale(fv["values"]).astype(np.float64) @ np.array(W_EDGE) + B_EDGE)
    assert m.p_up(10) == pytest.approx(ref, abs=1e-6)
    ood = ref_ood(fv["values"])
    assert 0 < ood.sum() < 10  # some random ticks leave the range, some do not
    assert m.ood[:10].tolist() == ood.astype(int).tolist()


def test_two_column_output_takes_the_named_column(tmp_path: Path) -> None:
    blob = logistic_onnx(W_EDGE, B_EDGE, two_columns=True)
    path = write_model(tmp_path, "gbdt", blob, sidecar("gbdt", column=1))
    m = load_model(path, max_batch=4)
    fv = features(np.random.default_rng(2), 4)
    m.gather(fv["values"], fv["symbol_id"], 4)
    ref = sigmoid(ref_scale(fv["values"]).astype(np.float64) @ np.array(W_EDGE) + B_EDGE)
    assert m.p_up(4) == pytest.approx(ref, abs=1e-6)


def _bad_cases() -> list[tuple[str, Callable[[Path], Path], str, str]]:
    """(id, write the bad model -> its .onnx path, the file the message names, the problem)."""
    good = logistic_onnx(W_EDGE, B_EDGE)

    def with_side(**over: Any) -> Callable[[Path], Path]:
        return lambda d: write_model(d, "edge", good, sidecar("edge", **over))

    def missing_sidecar(d: Path) -> Path:
        return write_model(d, "edge", good, None)

    def bad_json(d: Path) -> Path:
        p = write_model(d, "edge", good, None)
        (d / "edge.json").write_text("{not json")
        return p

    def corrupt(d: Path) -> Path:
        return write_model(d, "edge", b"\x08\x07garbage, not a protobuf", sidecar("edge"))

    def wrong_width(d: Path) -> Path:
        return write_model(d, "edge", logistic_onnx([0.1] * 5, 0.0), sidecar("edge"))

    def fixed_batch(d: Path) -> Path:
        return write_model(d, "edge", logistic_onnx(W_EDGE, 0.0, batch_dim=1), sidecar("edge"))

    def logits(d: Path) -> Path:  # no sigmoid: a zero input gives b = 3, not a probability
        return write_model(d, "edge", logistic_onnx(W_EDGE, 3.0, sigmoid=False), sidecar("edge"))

    def bad_column(d: Path) -> Path:
        return write_model(d, "edge", good, sidecar("edge", column=1))

    def foreign(d: Path) -> Path:
        return write_model(d, "lstm", good, sidecar("lstm"))

    side = "json"
    onnx = "onnx"
    return [
        ("missing-sidecar", missing_sidecar, side, "sidecar missing"),
        ("bad-json", bad_json, side, "not valid JSON"),
        ("format", with_side(format=2), side, "format must be 1"),
        ("name-mismatch", with_side(model="gbdt"), side, "model is 'gbdt' but the file is edge.onnx"),
        ("unknown-model", foreign, side, "is not one of"),
        ("unknown-feature", with_side(features=[*FEATS[:3], "alpha"]), side, "unknown features ['alpha']"),
        ("scaler-length", with_side(mean=MEAN[:3]), side, "scaler.mean has 3 values for 4 features"),
        ("scaler-std", with_side(std=np.array([1.0, 0.0, 1.0, 1.0])), side, "scaler.std must be > 0"),
        ("sidecar-shape", with_side(input={"name": "x", "shape": [None, 5]}), side, "does not fit 4 features"),
        ("asset-class", with_side(asset_class="equity"), side, "asset_class is 'equity'"),
        ("move-bps", with_side(move_bps=float("nan")), side, "move_bps must be a finite number"),
        ("input-name", with_side(input={"name": "features", "shape": [None, 4]}), onnx, "the sidecar names one input 'features'"),
        ("output-name", with_side(output={"name": "prob", "column": 0}), onnx, "no output 'prob'"),
        ("corrupt", corrupt, onnx, "ONNX Runtime cannot load it"),
        ("wrong-width", wrong_width, onnx, "has shape [null, 5], the sidecar says [null, 4]"),
        ("fixed-batch", fixed_batch, onnx, "fixed batch dimension 1"),
        ("not-a-probability", logits, onnx, "not a probability in [0, 1]"),
        ("column", bad_column, onnx, "column 1 < k"),
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("make", "which", "problem"),
    [c[1:] for c in _bad_cases()],
    ids=[c[0] for c in _bad_cases()],
)
def test_a_bad_model_raises_naming_the_file_and_the_problem(
    tmp_path: Path, make: Callable[[Path], Path], which: str, problem: str
) -> None:
    path = make(tmp_path)
    named = path if which == "onnx" else path.with_suffix(".json")
    with pytest.raises(ModelError) as err:
        load_model(path, max_batch=8, asset_class="crypto")
    msg = str(err.value)
    assert msg.startswith(f"{named}: "), msg
    assert problem in msg, msg


def test_broken_models_are_logged_and_left_out(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_model(tmp_path, "edge", logistic_onnx(W_EDGE, B_EDGE), sidecar("edge"))
    write_model(tmp_path, "gbdt", b"garbage", sidecar("gbdt"))
    write_model(tmp_path, "idec", logistic_onnx([0.1] * 5, 0.0), sidecar("idec"))
    write_model(tmp_path, "rnn", logistic_onnx(W_EDGE, 0.0), sidecar("rnn"))
    st = new_stats()
    with caplog.at_level(logging.INFO, logger="stages.models"):
        ms = model_set(tmp_path, stats=st)
    assert list(ms.models) == ["edge"]
    # each rejected file is counted as an error of its model (hft_model_errors_total)
    assert [model_counter(st, n, schema.MODEL_ERRORS) for n in schema.MODEL_NAMES] == [0, 1, 1, 0]
    left_out = {r.model: r.error for r in caplog.records if r.msg == "model left out"}  # type: ignore[attr-defined]
    assert set(left_out) == {"gbdt", "idec"}
    assert left_out["gbdt"].startswith(f"{tmp_path / 'gbdt.onnx'}: ONNX Runtime cannot load it")
    assert "has shape [null, 5]" in left_out["idec"]
    assert any(r.msg.startswith("model file ignored") for r in caplog.records)
    loaded = next(r for r in caplog.records if r.msg == "model loaded")
    assert (loaded.model, loaded.features, loaded.horizon_ms, loaded.auc) == (  # type: ignore[attr-defined]
        "edge",
        4,
        5000.0,
        0.55,
    )


def test_no_directory_or_no_models_loads_nothing(tmp_path: Path) -> None:
    assert model_set(tmp_path / "absent").n_active == 0
    ms = model_set(tmp_path)
    assert ms.n_active == 0 and ms.models == {}
    fv = features(np.random.default_rng(0), 3)
    answered, out = run_batch(ms, fv)
    assert answered == 0 and (out["seq"] == 0).all(), "nothing answered: out left to the fallback"


def test_feature_window_mismatch_is_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_model(
        tmp_path, "edge", logistic_onnx(W_EDGE, B_EDGE), sidecar("edge", feature_window_size=500)
    )
    with caplog.at_level(logging.INFO, logger="stages.models"):
        ms = model_set(tmp_path, feature_window_size=1000)
    assert list(ms.models) == ["edge"]
    warn = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warn) == 1 and "feature window" in warn[0].msg
    assert warn[0].trained_feature_window_size == 500  # type: ignore[attr-defined]


# ---------------------------------------------------------------- scaling and history
def test_scaling_clips_and_turns_nan_and_inf_into_zero(tmp_path: Path) -> None:
    path = write_model(tmp_path, "edge", logistic_onnx(W_EDGE, B_EDGE), sidecar("edge"))
    m = load_model(path, max_batch=8)
    fv = np.zeros(6, schema.FEATURES)
    v = fv["values"]
    v[:, IDX] = [
        [5.0, 0.0, 0.1, 2.0],  # the mean: all zeros
        [9.0, 0.25, -0.3, 3.5],  # one std: 1, 0.5, -1, 1
        [1e9, -1e9, 0.1, 2.0],  # far out: clipped to +-3
        [np.nan, 0.5, np.inf, -np.inf],  # NaN and inf: 0 (not clipped)
        [5.0 + 4 * 3.0, 0.0 - 0.5 * 3.0, 0.1, 2.0],  # exactly at the clip
        [-7.0, 2.0, 0.9, 0.5],
    ]
    m.gather(fv["values"], fv["symbol_id"], 6)
    expect = np.array(
        [
            [0, 0, 0, 0],
            [1, 0.5, -1, 1],
            [3, -3, 0, 0],
            [0, 1, 0, 0],
            [3, -3, 0, 0],
            [-3, 3, 2, -1],
        ],
        np.float32,
    )
    assert np.array_equal(m.inputs[:6], expect)
    assert np.array_equal(m.inputs[:6], ref_scale(fv["values"]))
    # out of domain: only past the clip (not at it), and never for NaN or inf; obi 2 > 3 * 0.5
    assert m.ood[:6].tolist() == [0, 0, 1, 0, 0, 1]


def test_sequence_model_sees_each_symbols_history_oldest_first_zero_padded(
    tmp_path: Path,
) -> None:
    seq_len, nf = 3, len(FEATS)
    w = np.random.default_rng(5).normal(0, 0.3, seq_len * nf)
    side = sidecar("transformer", seq_len=seq_len)
    path = write_model(tmp_path, "transformer", sequence_onnx(w, -0.2, seq_len, nf), side)
    m = load_model(path, max_batch=16)
    assert m.sequence and m.inputs.shape == (16, seq_len, nf)
    rng = np.random.default_rng(6)
    history: dict[int, list[np.ndarray]] = {}
    # batches with interleaved symbols, a symbol several times in one batch
    for sids in ([0], [1, 0, 1], [2, 2, 2, 2, 0], [0, 1, 2, 3]):
        n = len(sids)
        fv = features(rng, n)
        fv["symbol_id"] = sids
        fv["values"][0, schema.F_OBI] = np.nan  # a warming-up feature: 0 in the history
        fv["flags"] = schema.BOOK_STALE  # untradeable records go into the history too
        m.gather(fv["values"], fv["symbol_id"], n)
        scaled = ref_scale(fv["values"])
        expect = np.zeros((n, seq_len, nf), np.float32)
        for i, s in enumerate(sids):
            h = history.setdefault(s, [])
            h.append(scaled[i])
            last = h[-seq_len:]
            expect[i, seq_len - len(last) :] = last
        assert np.array_equal(m.inputs[:n], expect), sids
        ref = sigmoid(expect.reshape(n, -1).astype(np.float64) @ w - 0.2)
        assert m.p_up(n) == pytest.approx(ref, abs=1e-6)
    assert m.history_count[:4].tolist() == [4, 3, 5, 1]


# ---------------------------------------------------------------- the ensemble
def test_ensemble_matches_numpy_with_weights_and_a_zero_weight(tmp_path: Path) -> None:
    wide = STD * 2  # gbdt was trained on a wider range: it answers ticks the others leave out
    specs = {  # name: (w, b, move_bps, config weight, scaler std)
        "edge": (W_EDGE, B_EDGE, 2.0, 1.0, STD),
        "gbdt": ([-0.3, 0.9, 0.2, -0.1], -0.2, 3.0, 2.0, wide),
        "idec": ([0.5, 0.5, -0.8, 0.0], 0.05, 1.5, 0.5, STD),
        "transformer": ([1.0, 1.0, 1.0, 1.0], 0.0, 9.0, 0.0, STD),  # weight 0: never loaded
    }
    for name, (w, b, move_bps, _, std) in specs.items():
        write_model(tmp_path, name, logistic_onnx(w, b), sidecar(name, move_bps=move_bps, std=std))
    st = new_stats()
    ms = model_set(tmp_path, stats=st, weights=[s[3] for s in specs.values()])
    assert list(ms.models) == ["edge", "gbdt", "idec"]

    rng = np.random.default_rng(11)
    fv = features(rng, 40)
    fv["values"][3, schema.F_SPREAD_BPS] = np.nan  # no two-sided book: bad, untradeable
    fv["values"][4, schema.F_RVOL_BPS] = np.nan  # a NaN vol term: urgency 0, the rest stands
    fv["values"][5, schema.F_OBI] = np.nan  # a warming-up feature: scaled to 0, still good
    answered, out = run_batch(ms, fv)

    # per model: its own scaling, and the rows it is out of domain on, which it does not answer
    active = [s for s in specs.values() if s[3] > 0]
    p_m = np.array(
        [
            sigmoid(ref_scale(fv["values"], MEAN, sd).astype(np.float64) @ np.array(w) + b)
            for w, b, _, _, sd in active
        ]
    )
    ok_m = np.array([~ref_ood(fv["values"], MEAN, sd) for *_, sd in active])
    wts = np.array([s[3] for s in active])[:, None] * ok_m  # per row: answering models only
    move = np.array([s[2] for s in active])[:, None]
    wsum = wts.sum(0)
    ok = wsum > 0
    # the random ticks give rows every model answers, rows only gbdt answers, rows none does
    assert ok_m.all(0).any() and (ok & ~ok_m[0]).any() and (~ok).any()
    assert answered == ok.sum()
    assert ms.row_ok[:40].tolist() == ok.astype(int).tolist()
    for name, ok_one in zip(("edge", "gbdt", "idec"), ok_m, strict=True):
        assert model_counter(st, name, schema.MODEL_OUT_OF_DOMAIN) == (~ok_one).sum(), name
    with np.errstate(invalid="ignore"):
        p = (wts * p_m).sum(0) / wsum
        edge = (wts * (2 * p_m - 1) * move).sum(0) / wsum
    conf = np.maximum(p, 1 - p)
    spread = fv["values"][:, schema.F_SPREAD_BPS]
    rvol = fv["values"][:, schema.F_RVOL_BPS]
    with np.errstate(invalid="ignore"):
        urg = 2 * (conf - 0.5) + 0.25 * np.minimum(rvol / np.maximum(spread, 1e-9), 1.0)
    urg = np.clip(np.nan_to_num(urg, nan=0.0), 0, 1)
    bad = ~np.isfinite(spread)
    untradeable = bad | ((fv["flags"] & schema.BOOK_UNTRADEABLE) != 0)

    assert ok[3:6].all()  # the rows below are about NaNs, not about the range
    good = ok & ~bad
    assert out["edge_bps"][good] == pytest.approx(edge[good], abs=1e-5)
    assert out["confidence"][good] == pytest.approx(conf[good], abs=1e-6)
    assert out["urgency"][good] == pytest.approx(urg[good], abs=1e-5)
    assert out["direction"][good].tolist() == np.sign(p[good] - 0.5).astype(int).tolist()
    assert out["urgency"][4] == 0.0 and out["confidence"][4] > 0.5  # as the fallback does
    assert (out["edge_bps"][bad], out["confidence"][bad], out["urgency"][bad]) == (0, 0, 0)
    assert out["direction"][bad] == 0
    assert ((out["flags"] & schema.SIG_UNTRADEABLE) != 0)[ok].tolist() == untradeable[ok].tolist()
    assert not (out["flags"] & schema.SIG_FALLBACK).any()
    for name in ("symbol_id", "seq", "exch_ns", "recv_ns", "ingest_ns", "feature_ns", "mid"):
        assert np.array_equal(out[name][ok], fv[name][ok]), name
    assert np.array_equal(out["book_flags"][ok], fv["flags"][ok])
    assert np.array_equal(out["spread_bps"][ok], spread[ok], equal_nan=True)
    for name in ("edge", "gbdt", "idec"):
        assert model_counter(st, name, schema.MODEL_RUNS) == 1
        assert hist_counts(st, schema.H_MODEL_BASE + schema.MODEL_NAMES.index(name)).sum() == 1
    assert model_counter(st, "transformer", schema.MODEL_RUNS) == 0
    assert int(st.ints[schema.C_MODEL_TIMEOUTS]) == 0


def test_a_non_finite_model_output_makes_the_tick_untradeable(tmp_path: Path) -> None:
    write_model(tmp_path, "edge", logistic_onnx(W_EDGE, B_EDGE), sidecar("edge"))
    ms = model_set(tmp_path)
    fv = features(np.random.default_rng(3), 3, in_domain=True)
    fv["flags"] = 0
    m = ms.models["edge"]

    class NanSession:
        def run(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
            out = np.full((len(feeds["x"]), 1), 0.7, np.float32)
            out[1, 0] = np.nan
            return [out]

    m.session = NanSession()
    answered, out = run_batch(ms, fv)
    assert answered == 3 and ms.row_ok[:3].tolist() == [1, 1, 1]  # a NaN answer is an answer
    assert out["flags"].tolist() == [0, schema.SIG_UNTRADEABLE, 0]
    assert out["edge_bps"][1] == 0 and out["confidence"][1] == 0 and out["direction"][1] == 0
    assert out["confidence"][0] == pytest.approx(0.7) and out["direction"][0] == 1
    assert out["edge_bps"][0] == pytest.approx(0.4 * 2.0, rel=1e-6)


def test_a_run_that_raises_is_counted_left_out_and_logged_rarely(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_model(tmp_path, "edge", logistic_onnx(W_EDGE, B_EDGE), sidecar("edge"))
    write_model(tmp_path, "gbdt", logistic_onnx([0.0] * 4, 2.0), sidecar("gbdt"))
    st = new_stats()
    ms = model_set(tmp_path, stats=st)

    class Boom:
        def run(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
            raise RuntimeError("boom")

    ms.models["edge"].session = Boom()
    fv = features(np.random.default_rng(4), 5, in_domain=True)
    with caplog.at_level(logging.WARNING, logger="stages.models"):
        for _ in range(3):
            answered, out = run_batch(ms, fv)
            assert answered == 5 and ms.row_ok[:5].all()  # gbdt answers every row
            assert out["confidence"] == pytest.approx([sigmoid(np.array(2.0))] * 5, abs=1e-6)
    assert model_counter(st, "edge", schema.MODEL_ERRORS) == 3
    assert model_counter(st, "edge", schema.MODEL_RUNS) == 3
    assert model_counter(st, "gbdt", schema.MODEL_ERRORS) == 0
    failures = [r for r in caplog.records if r.msg.startswith("model run failed")]
    assert len(failures) == 1 and "boom" in failures[0].error  # type: ignore[attr-defined]


# ---------------------------------------------------------------- out of domain
W_GBDT = [-0.3, 0.9, 0.2, -0.1]
W_IDEC = [0.5, 0.5, -0.8, 0.0]


def test_a_row_outside_one_models_range_is_left_out_of_that_model_only(tmp_path: Path) -> None:
    idec_mean = np.array([20.0, 0.0, 0.1, 2.0])
    specs = {  # name: (w, b, move_bps, weight, scaler mean, scaler std); ranges at clip 3
        "edge": (W_EDGE, B_EDGE, 2.0, 1.0, MEAN, STD),  # spread [-7, 17], obi [-1.5, 1.5]
        "gbdt": (W_GBDT, -0.2, 3.0, 2.0, MEAN, STD * 4),  # spread [-43, 53], obi [-6, 6]
        "idec": (W_IDEC, 0.05, 1.5, 0.5, idec_mean, STD),  # spread [8, 32], obi [-1.5, 1.5]
    }
    for name, (w, b, move, _, mean, std) in specs.items():
        side = sidecar(name, move_bps=move, mean=mean, std=std)
        write_model(tmp_path, name, logistic_onnx(w, b), side)
    st = new_stats()
    ms = model_set(tmp_path, stats=st, weights=[1.0, 2.0, 0.5, 0.0])
    fv = features(np.random.default_rng(30), 5)
    fv["flags"] = 0
    fv["values"][:, IDX] = [  # spread, obi, depth_imbalance, rvol
        [10.0, 0.2, 0.1, 2.0],  # inside every range
        [25.0, 0.2, 0.1, 2.0],  # spread past edge's range only
        [2.0, -0.3, 0.4, 1.0],  # spread below idec's range only
        [12.0, 4.0, 0.1, 2.0],  # obi past edge's and idec's range: gbdt alone
        [15.0, -1.0, -0.5, 5.0],  # inside every range
    ]
    answering = [
        ("edge", "gbdt", "idec"),
        ("gbdt", "idec"),
        ("edge", "gbdt"),
        ("gbdt",),
        ("edge", "gbdt", "idec"),
    ]
    answered, out = run_batch(ms, fv)
    assert answered == 5 and ms.row_ok[:5].tolist() == [1] * 5

    p_m = {
        name: sigmoid(ref_scale(fv["values"], mean, std).astype(np.float64) @ np.array(w) + b)
        for name, (w, b, _, _, mean, std) in specs.items()
    }
    for i, names in enumerate(answering):
        wsum = sum(specs[m][3] for m in names)
        p = sum(specs[m][3] * p_m[m][i] for m in names) / wsum
        edge = sum(specs[m][3] * (2 * p_m[m][i] - 1) * specs[m][2] for m in names) / wsum
        if len(names) < len(specs):  # leaving the model out changes the answer
            everyone = sum(s[3] * p_m[m][i] for m, s in specs.items()) / 3.5
            assert abs(p - everyone) > 1e-3, i
        assert out["confidence"][i] == pytest.approx(max(p, 1 - p), abs=1e-6), i
        assert out["edge_bps"][i] == pytest.approx(edge, abs=1e-5), i
        assert out["direction"][i] == np.sign(p - 0.5), i
    assert not (out["flags"] & (schema.SIG_FALLBACK | schema.SIG_UNTRADEABLE)).any()
    for name in specs:
        skipped = [i for i, names in enumerate(answering) if name not in names]
        assert np.flatnonzero(ms.models[name].ood[:5]).tolist() == skipped, name
        assert model_counter(st, name, schema.MODEL_OUT_OF_DOMAIN) == len(skipped), name
        assert model_counter(st, name, schema.MODEL_RUNS) == 1, name
    run_batch(ms, fv)  # the counters add up over batches
    assert [model_counter(st, m, schema.MODEL_OUT_OF_DOMAIN) for m in specs] == [4, 0, 4]
    assert int(st.ints[schema.C_MODEL_TIMEOUTS]) == 0  # out of domain is not a timeout


def test_a_row_every_model_finds_out_of_domain_is_left_to_the_caller(tmp_path: Path) -> None:
    write_model(tmp_path, "edge", logistic_onnx(W_EDGE, B_EDGE), sidecar("edge"))
    side = sidecar("gbdt", move_bps=3.0, std=STD * 4)  # spread in [-43, 53]
    write_model(tmp_path, "gbdt", logistic_onnx(W_GBDT, -0.2), side)
    st = new_stats()
    ms = model_set(tmp_path, stats=st, weights=[1.0, 2.0, 0.0, 0.0])
    rng = np.random.default_rng(31)

    def reference(fv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pe = sigmoid(ref_scale(fv["values"]).astype(np.float64) @ np.array(W_EDGE) + B_EDGE)
        zg = ref_scale(fv["values"], MEAN, STD * 4).astype(np.float64)
        pg = sigmoid(zg @ np.array(W_GBDT) - 0.2)
        return pe, pg

    fv = features(rng, 6, in_domain=True)
    fv["values"][2, schema.F_SPREAD_BPS] = 1e4  # outside both ranges
    fv["values"][4, schema.F_SPREAD_BPS] = 25.0  # outside edge's range only
    answered, out = run_batch(ms, fv)
    assert answered == 5
    assert ms.row_ok[:6].tolist() == [1, 1, 0, 1, 1, 1]
    pe, pg = reference(fv)
    p = (pe + 2 * pg) / 3
    p[4] = pg[4]
    rows = [0, 1, 3, 4, 5]
    assert out["confidence"][rows] == pytest.approx(np.maximum(p, 1 - p)[rows], abs=1e-6)
    assert np.array_equal(out["seq"][rows], fv["seq"][rows])
    assert model_counter(st, "edge", schema.MODEL_OUT_OF_DOMAIN) == 2
    assert model_counter(st, "gbdt", schema.MODEL_OUT_OF_DOMAIN) == 1

    # no row answered: 0, and out untouched
    fv2 = features(rng, 3, in_domain=True)
    fv2["values"][:, schema.F_OBI] = [-50.0, 50.0, 1e6]
    out2 = np.zeros(3, schema.SIGNAL)
    assert ms.infer(fv2, 3, time.monotonic_ns(), out2) == 0
    assert ms.row_ok[:3].tolist() == [0, 0, 0]
    assert out2.tobytes() == np.zeros(3, schema.SIGNAL).tobytes()
    assert model_counter(st, "edge", schema.MODEL_OUT_OF_DOMAIN) == 5
    assert model_counter(st, "gbdt", schema.MODEL_OUT_OF_DOMAIN) == 4
    # a model out of domain on the whole batch is not even run
    assert model_counter(st, "edge", schema.MODEL_RUNS) == 1
    assert model_counter(st, "gbdt", schema.MODEL_RUNS) == 1

    # the next batch inside the range is answered whole: nothing of the skipped rows carries over
    fv3 = features(rng, 6, in_domain=True)
    answered, out3 = run_batch(ms, fv3)
    assert answered == 6 and ms.row_ok[:6].all()
    pe, pg = reference(fv3)
    p = (pe + 2 * pg) / 3
    assert out3["confidence"] == pytest.approx(np.maximum(p, 1 - p), abs=1e-6)
    assert out3["edge_bps"] == pytest.approx(((2 * pe - 1) * 2.0 + 2 * (2 * pg - 1) * 3.0) / 3)


def test_nan_and_inf_inputs_are_imputed_not_out_of_domain(tmp_path: Path) -> None:
    seq_len, nf = 2, len(FEATS)
    w_seq = np.linspace(-0.5, 0.5, seq_len * nf)
    write_model(tmp_path, "edge", logistic_onnx(W_EDGE, B_EDGE), sidecar("edge"))
    side = sidecar("transformer", seq_len=seq_len)
    write_model(tmp_path, "transformer", sequence_onnx(w_seq, 0.1, seq_len, nf), side)
    st = new_stats()
    ms = model_set(tmp_path, stats=st, weights=[1.0, 0.0, 0.0, 1.0])
    assert list(ms.models) == ["edge", "transformer"]
    fv = features(np.random.default_rng(32), 4, in_domain=True)
    fv["flags"] = 0
    fv["symbol_id"] = [0, 1, 2, 3]  # one tick per symbol: each history is that tick alone
    fv["values"][:, IDX] = [
        [10.0, np.nan, np.inf, -np.inf],  # warming up or broken: the training mean, answered
        [np.inf, 0.2, np.nan, 2.0],  # answered, but no spread: untradeable
        [1e300, 0.2, 0.1, 2.0],  # finite and far: out of domain for both
        [np.nan, np.nan, np.nan, np.nan],  # answered (the model sees its mean), untradeable
    ]
    answered, out = run_batch(ms, fv)
    assert answered == 3 and ms.row_ok[:4].tolist() == [1, 1, 0, 1]
    for name in ("edge", "transformer"):
        assert ms.models[name].ood[:4].tolist() == [0, 0, 1, 0], name
        assert model_counter(st, name, schema.MODEL_OUT_OF_DOMAIN) == 1, name
    z = ref_scale(fv["values"]).astype(np.float64)
    assert z[0].tolist() == [1.25, 0.0, 0.0, 0.0]
    pe = sigmoid(z[0] @ np.array(W_EDGE) + B_EDGE)
    pt = sigmoid(np.concatenate([np.zeros(nf), z[0]]) @ w_seq + 0.1)
    p = (pe + pt) / 2
    assert out["confidence"][0] == pytest.approx(max(p, 1 - p), abs=1e-6)
    assert out["urgency"][0] == 0.0  # rvol -inf: a non-finite vol term, as the fallback treats it
    assert out["flags"][[0, 1, 3]].tolist() == [0, schema.SIG_UNTRADEABLE, schema.SIG_UNTRADEABLE]
    assert out["confidence"][1] == 0 and out["confidence"][3] == 0


def test_a_sequence_model_is_judged_on_the_current_tick_not_its_history(tmp_path: Path) -> None:
    seq_len, nf = 3, len(FEATS)
    w = np.random.default_rng(7).normal(0, 0.3, seq_len * nf)
    side = sidecar("transformer", seq_len=seq_len)
    write_model(tmp_path, "transformer", sequence_onnx(w, -0.2, seq_len, nf), side)
    st = new_stats()
    ms = model_set(tmp_path, stats=st)
    m = ms.models["transformer"]
    fv = features(np.random.default_rng(33), 5, in_domain=True)
    fv["flags"] = 0
    fv["symbol_id"] = [0, 0, 1, 0, 0]
    fv["values"][1, schema.F_SPREAD_BPS] = 1e3  # symbol 0's second tick: far out of range
    answered, out = run_batch(ms, fv)
    # the far tick alone is out of domain; the two after it carry it in their window, clipped
    assert answered == 4 and ms.row_ok[:5].tolist() == [1, 0, 1, 1, 1]
    assert model_counter(st, "transformer", schema.MODEL_OUT_OF_DOMAIN) == 1
    assert m.inputs[3, 1, 0] == CLIP and m.inputs[4, 0, 0] == CLIP
    assert m.history_count[:2].tolist() == [4, 1]  # the far tick went into the history
    scaled = ref_scale(fv["values"])
    windows = {0: [], 1: [0], 2: [], 3: [0, 1], 4: [0, 1, 3]}  # earlier ticks of the same symbol
    for i in (0, 2, 3, 4):
        x = np.zeros((seq_len, nf), np.float32)
        last = [*windows[i], i][-seq_len:]
        x[seq_len - len(last) :] = scaled[last]
        p = sigmoid(x.reshape(-1).astype(np.float64) @ w - 0.2)
        assert out["confidence"][i] == pytest.approx(max(p, 1 - p), abs=1e-6), i


# ---------------------------------------------------------------- the deadline
def test_slow_model_is_skipped_or_discarded_and_counted_while_the_fast_one_answers(
    tmp_path: Path,
) -> None:
    write_model(tmp_path, "edge", logistic_onnx(W_EDGE, B_EDGE), sidecar("edge"))
    write_model(tmp_path, "idec", slow_onnx([0.0] * 4, 3.0), sidecar("idec"))
    st = new_stats()
    ms = model_set(tmp_path, stats=st, timeout_ms=2.0, max_batch=8)
    assert list(ms.models) == ["edge", "idec"]
    slow = ms.models["idec"]
    print(
        f"\nwarm run, batch of one: edge {ms.models['edge'].warm_run_ns / 1e3:.1f} us, "
        f"slow idec {slow.warm_run_ns / 1e6:.2f} ms"
    )
    # a deadline well under the slow model's run time and far above the fast one's, on any machine
    ms.timeout_ns = min(2_000_000, slow.warm_run_ns // 3)
    assert ms.timeout_ns > 200_000, "the slow model is not slow here"
    fv = features(np.random.default_rng(8), 4, in_domain=True)
    z = ref_scale(fv["values"]).astype(np.float64)
    edge_only = sigmoid(z @ np.array(W_EDGE) + B_EDGE)

    # 1. predicted from its warm-up to miss the deadline: skipped before it runs
    answered, out = run_batch(ms, fv)
    assert answered == 4  # every row, by edge alone
    assert out["confidence"] == pytest.approx(np.maximum(edge_only, 1 - edge_only), abs=1e-6)
    assert model_counter(st, "idec", schema.MODEL_TIMEOUTS) == 4
    assert model_counter(st, "idec", schema.MODEL_RUNS) == 0
    assert int(st.ints[schema.C_MODEL_TIMEOUTS]) == 4
    assert model_counter(st, "edge", schema.MODEL_TIMEOUTS) == 0

    # 2. with no prediction it runs, ends after the deadline, and its output is discarded
    ms._slots[2].reset_timing(0)
    answered, out = run_batch(ms, fv)
    assert answered == 4  # the slow model's p_up (sigmoid(3) = 0.95) did not get in (below)
    assert out["confidence"] == pytest.approx(np.maximum(edge_only, 1 - edge_only), abs=1e-6)
    assert model_counter(st, "idec", schema.MODEL_RUNS) == 1
    assert model_counter(st, "idec", schema.MODEL_TIMEOUTS) == 8
    assert int(st.ints[schema.C_MODEL_TIMEOUTS]) == 8
    h = hist_counts(st, schema.H_MODEL_BASE + 2)
    assert h.sum() == 1 and stats.percentile_ns(h, 0.5) > ms.timeout_ns
    assert ms.estimate_ns("idec") > ms.timeout_ns  # the discarded run set the new prediction
    assert model_counter(st, "edge", schema.MODEL_RUNS) == 2
    assert hist_counts(st, schema.H_MODEL_BASE).sum() == 2


def test_every_skip_decays_the_prediction_by_10_percent_until_a_retry(tmp_path: Path) -> None:
    write_model(tmp_path, "edge", logistic_onnx(W_EDGE, B_EDGE), sidecar("edge"))
    st = new_stats()
    ms = model_set(tmp_path, stats=st, timeout_ms=2.0)
    slot = ms._slots[0]
    slot.recent_ns = [20_000_000, 1_000, 0, 0, 0, 0, 0, 0]  # a 20 ms hiccup among fast runs
    slot.est_ns = 20_000_000
    fv = features(np.random.default_rng(9), 2, in_domain=True)
    skips = 0
    while True:
        before = ms.estimate_ns("edge")
        answered, _ = run_batch(ms, fv)
        if answered:
            break
        skips += 1
        assert ms.estimate_ns("edge") == int(before * 0.9)
        assert skips < 100
    # 20 ms * 0.9^k must fall under the 2 ms budget (less what the batch already used)
    assert skips >= math.ceil(math.log(2 / 20) / math.log(0.9))  # 22
    assert skips <= 30
    assert model_counter(st, "edge", schema.MODEL_TIMEOUTS) == 2 * skips
    assert int(st.ints[schema.C_MODEL_TIMEOUTS]) == 2 * skips
    assert model_counter(st, "edge", schema.MODEL_RUNS) == 1
    assert ms.estimate_ns("edge") < 2_000_000  # the retry was fast: the hiccup has decayed away


# ---------------------------------------------------------------- hot reload
def test_reload_swaps_a_changed_model_rejects_a_broken_one_and_follows_deletes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_model(tmp_path, "edge", logistic_onnx(W_EDGE, B_EDGE), sidecar("edge"))
    ms = model_set(tmp_path)
    fv = features(np.random.default_rng(10), 6, in_domain=True)
    z = ref_scale(fv["values"]).astype(np.float64)

    def confidence() -> np.ndarray:
        answered, out = run_batch(ms, fv)
        assert answered == len(fv) and ms.row_ok[: len(fv)].all()
        return out["confidence"].copy()

    p1 = sigmoid(z @ np.array(W_EDGE) + B_EDGE)
    assert confidence() == pytest.approx(np.maximum(p1, 1 - p1), abs=1e-6)
    first = ms.models["edge"]

    # new weights: swapped in without a new ModelSet
    w2 = [-0.5, 2.0, 0.0, 0.1]
    write_model(tmp_path, "edge", logistic_onnx(w2, -0.4), sidecar("edge"))
    pump(ms, lambda: ms.models["edge"] is not first and ms.settled())
    p2 = sigmoid(z @ np.array(w2) - 0.4)
    assert confidence() == pytest.approx(np.maximum(p2, 1 - p2), abs=1e-6)
    second = ms.models["edge"]

    # a broken replacement: logged, the loaded model stays
    with caplog.at_level(logging.WARNING, logger="stages.models"):
        write_model(tmp_path, "edge", b"truncated", sidecar("edge"))
        pump(ms, ms.settled)
    assert ms.models["edge"] is second
    assert confidence() == pytest.approx(np.maximum(p2, 1 - p2), abs=1e-6)
    rejected = [r for r in caplog.records if r.msg.startswith("new model file rejected")]
    assert len(rejected) == 1 and "ONNX Runtime cannot load it" in rejected[0].error  # type: ignore[attr-defined]

    # a new file adds a model, a deleted one removes it
    write_model(tmp_path, "gbdt", logistic_onnx([0.0] * 4, 1.0), sidecar("gbdt"))
    pump(ms, lambda: "gbdt" in ms.models and ms.settled())
    assert list(ms.models) == ["edge", "gbdt"]
    (tmp_path / "edge.onnx").unlink()
    pump(ms, lambda: "edge" not in ms.models and ms.settled())
    assert list(ms.models) == ["gbdt"]
    assert confidence() == pytest.approx([sigmoid(np.array(1.0))] * 6, abs=1e-6)
    (tmp_path / "gbdt.onnx").unlink()
    pump(ms, lambda: not ms.models and ms.settled())
    assert run_batch(ms, fv)[0] == 0  # no model left: the caller falls back


def test_a_change_waits_one_check_period_to_settle(tmp_path: Path) -> None:
    write_model(tmp_path, "edge", logistic_onnx(W_EDGE, B_EDGE), sidecar("edge"))
    ms = model_set(tmp_path, reload_check_ms=10_000.0)
    first = ms.models["edge"]
    write_model(tmp_path, "edge", logistic_onnx([0.0] * 4, 0.0), sidecar("edge"))
    ms.maintain(ms.next_check_ns)  # first sight of the change: wait
    assert not ms.loading and ms.models["edge"] is first
    ms.maintain(ms.next_check_ns)  # unchanged for a whole period: load it
    assert ms.loading or ms.pending
    end = time.monotonic() + 20
    while not ms.pending:  # built in the background ...
        assert time.monotonic() < end
        time.sleep(0.005)
    assert ms.models["edge"] is first
    ms.maintain(0)  # ... and swapped in by the stage's own thread, between batches
    assert ms.models["edge"] is not first
    assert ms.models["edge"].stamp == file_stamp(tmp_path / "edge.onnx")


def test_reloaded_sequence_model_keeps_its_history_when_inputs_are_unchanged(
    tmp_path: Path,
) -> None:
    seq_len, nf = 4, len(FEATS)
    side = sidecar("transformer", seq_len=seq_len)
    w = np.linspace(-1, 1, seq_len * nf)
    write_model(tmp_path, "transformer", sequence_onnx(w, 0.0, seq_len, nf), side)
    ms = model_set(tmp_path)
    fv = features(np.random.default_rng(12), 5)
    run_batch(ms, fv)
    old = ms.models["transformer"]
    write_model(tmp_path, "transformer", sequence_onnx(-w, 0.0, seq_len, nf), side)
    pump(ms, lambda: ms.models["transformer"] is not old and ms.settled())
    new = ms.models["transformer"]
    assert np.array_equal(new.history, old.history)
    assert np.array_equal(new.history_count, old.history_count)
    assert new.history_count.sum() == 5


def test_a_sidecar_whose_sha256_names_another_model_file_is_refused(tmp_path: Path) -> None:
    import hashlib

    blob = logistic_onnx(W_EDGE, B_EDGE)
    right = sidecar("edge", model_sha256=hashlib.sha256(blob).hexdigest())
    path = write_model(tmp_path, "edge", blob, right)
    assert load_model(path).name == "edge"
    other = logistic_onnx([0.0, 0.0, 0.0, 1.0], 0.5)  # a model trained with another scaler
    write_model(tmp_path, "edge", other, None)  # the old sidecar stays beside it
    with pytest.raises(ModelError, match=r"model_sha256 does not match edge\.onnx"):
        load_model(path)
