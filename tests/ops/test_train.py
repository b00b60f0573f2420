"""``hft train`` on synthetic exports built to the contract in ``models/README.md``.

One feature (``obi``) truly predicts the sign of the 5 s label, the others are noise; a few
features are constant or missing, some books are stale or crossed and the last labels of each
symbol run past the data (NaN). The models are trained once per module; the other tests read
what was written, or fit small models directly.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from ops import export, train
from shm import schema

T0_NS = 1_722_470_400 * 10**9  # 2024-08-01 00:00 UTC
STEP_NS = 50_000_000  # one book every 50 ms, alternating symbols
HORIZONS_MS = (1000, 5000)
CONSTANT = {"funding_bps": 0.0, "depth_beta": 0.5}  # constant -> dropped
CYCLIC = ("tod_sin", "tod_cos", "dow_sin", "dow_cos")  # 200 s of data: one hour, one weekday
TOD_REASON = "the training split does not cover every hour of the day"
DOW_REASON = "the training split does not cover every day of the week"
MISSING = ("impact_beta",)  # all NaN -> dropped
WARMUP = ("rvol_bps", "atr_bps")  # NaN for each symbol's first books


def make_export(
    path: Path,
    *,
    rows: int = 4000,
    signal: float = 3.0,
    seed: int = 1,
    t0_ns: int = T0_NS,
    symbols: tuple[str, ...] = ("BTC", "ETH"),
    drop: tuple[str, ...] = (),
    meta: dict[str, Any] | None = None,
    step_ns: int = STEP_NS,
    recording: np.ndarray | None = None,
) -> Path:
    """A Parquet file shaped like ``hft export-features`` output (``recording``: that column,
    one value per row; without it the file has no such column, like an older export)."""
    rng = np.random.default_rng(seed)
    sym_idx = np.arange(rows) % len(symbols)
    ts = t0_ns + np.arange(rows, dtype=np.int64) * step_ns + rng.integers(0, 1000, rows)
    flags = np.where(rng.random(rows) < 0.03, schema.BOOK_STALE, 0)
    flags |= np.where(rng.random(rows) < 0.01, schema.BOOK_CROSSED, 0)
    flags |= np.where(rng.random(rows) < 0.05, schema.BOOK_SNAPSHOT, 0)  # tradeable all the same
    feats = {name: rng.standard_normal(rows) for name in schema.FEATURE_NAMES}
    ret = signal * feats["obi"] + rng.standard_normal(rows)
    ret[rng.random(rows) < 0.05] = 0.0  # books whose mid did not move
    mid = np.empty(rows)
    for s in range(len(symbols)):
        m = sym_idx == s
        mid[m] = 60_000.0 / (s + 1) * np.exp(np.cumsum(rng.normal(0, 1e-4, m.sum())))
        for name in WARMUP:
            feats[name][np.flatnonzero(m)[:40]] = np.nan
    feats["microprice"] = mid + rng.normal(0, 0.1, rows)
    feats["ofi"][rng.random(rows) < 0.02] = np.nan
    feats["ofi_tick"][rng.random(rows) < 0.005] = np.inf
    for name, value in CONSTANT.items():
        feats[name] = np.full(rows, value)
    for name in MISSING:
        feats[name] = np.full(rows, np.nan)
    cols: dict[str, Any] = {
        "symbol": pa.array([symbols[i] for i in sym_idx], pa.string()),
        "symbol_id": pa.array(sym_idx, pa.int32()),
        "ts_ns": pa.array(ts, pa.int64()),
        "recv_ns": pa.array(ts + 1_000_000, pa.int64()),
        "seq": pa.array(np.arange(rows), pa.uint64()),
        "flags": pa.array(flags, pa.uint32()),
        "mid": mid,
        "best_bid": mid - 0.5,
        "best_ask": mid + 0.5,
        **{name: feats[name] for name in schema.FEATURE_NAMES},
    }
    if recording is not None:
        cols["recording"] = pa.array(recording, pa.int16())
    for h in HORIZONS_MS:
        label = ret.copy()
        for s in range(len(symbols)):
            m = sym_idx == s
            label[m & (ts + h * 1_000_000 > ts[m].max())] = np.nan  # runs past the data
        cols[f"ret_bps_{h}ms"] = label
    for name in drop:
        cols.pop(name)
    doc = meta or {
        "source": "rec/sim-20240801.jsonl.gz",
        "data": "simulator",
        "venue": "sim",
        "symbols": list(symbols),
        "feature_window_size": 1000,
        "horizons_ms": list(HORIZONS_MS),
        "layout_version": schema.LAYOUT_VERSION,
        "feature_names": list(schema.FEATURE_NAMES),
    }
    table = pa.table(cols).replace_schema_metadata({"hft": json.dumps(doc)})
    pq.write_table(table, path)
    return path


def read_export(path: Path) -> dict[str, np.ndarray]:
    t = pq.read_table(path)
    return {c: np.asarray(t.column(c).to_numpy(zero_copy_only=False)) for c in t.column_names}


def sidecar(out: Path, model: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((out / f"{model}.json").read_text())
    return doc


def session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("train")
    data = make_export(d / "features.parquet")
    out = d / "models" / "crypto"  # created by hft train
    t0 = time.perf_counter()
    code = train.main([str(data), "--asset-class", "crypto", "--out", str(out), "--seq-len", "8"])
    return {"code": code, "data": data, "out": out, "seconds": time.perf_counter() - t0}


# ---------------------------------------------------------------- the scaling rule


def test_scale_follows_the_contract() -> None:
    X = np.array([[1.0, np.nan, np.inf, -np.inf, 1e6, -1e6, 3.0]])
    mean = np.array([1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0])
    std = np.array([2.0, 1.0, 1.0, 1.0, 1.0, 1.0, 4.0])
    z = train.scale(X, mean, std, 8.0)
    assert z.dtype == np.float32
    # (x - mean) / std, clipped to +-8; NaN and +-inf (a feature warming up) become 0
    assert z.tolist() == [[0.0, 0.0, 0.0, 0.0, 8.0, -8.0, 0.5]]


def test_sequence_index_is_per_symbol_oldest_first_zero_padded() -> None:
    group = np.array([0, 1, 0, 0, 1, 0])
    idx = train.sequence_index(group, 3)
    assert idx.tolist() == [
        [-1, -1, 0],
        [-1, -1, 1],
        [-1, 0, 2],
        [0, 2, 3],
        [-1, 1, 4],
        [2, 3, 5],
    ]
    S = np.arange(12, dtype=np.float32).reshape(6, 2) + 1
    windows = train.pad(S)[idx]
    assert windows[1].tolist() == [[0, 0], [0, 0], [3, 4]]  # -1 picks the zero row


# ---------------------------------------------------------------- the trained set


def test_trains_all_four_and_writes_sidecars_per_contract(trained: dict[str, Any]) -> None:
    assert trained["code"] == 0
    out: Path = trained["out"]
    assert trained["seconds"] < 60
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "temporary files left"
    for model in schema.MODEL_NAMES:
        blob = (out / f"{model}.onnx").read_bytes()
        sc = sidecar(out, model)
        assert sc["format"] == 1 and sc["model"] == model and sc["asset_class"] == "crypto"
        assert sc["kind"] and sc["params"] and sc["created"].endswith("Z")
        assert (
            set(sc["features"]) <= set(schema.FEATURE_NAMES) and "microprice" not in sc["features"]
        )
        n = len(sc["features"])
        assert n == len(sc["scaler"]["mean"]) == len(sc["scaler"]["std"])
        assert all(s > 0 for s in sc["scaler"]["std"]) and sc["scaler"]["clip"] == 8.0
        assert sc["seq_len"] == (8 if model == "transformer" else 1)
        want = [None, 8, n] if model == "transformer" else [None, n]
        assert sc["input"] == {"name": "x", "shape": want}
        assert sc["horizon_ms"] == 5000 and sc["label"] == "ret_bps_5000ms"
        assert sc["move_bps"] > 0 and sc["feature_window_size"] == 1000
        assert sc["data"]["source"] == "simulator" and sc["data"]["venue"] == "sim"
        assert sc["data"]["symbols"] == ["BTC", "ETH"]
        assert sc["data"]["files"] == [str(trained["data"])]
        assert set(sc["metrics"]) == {"auc", "hit_rate", "ic", "n_test"}
        assert sc["metrics"]["n_test"] == sc["test_span"]["rows"] > 500
        assert sc["model_sha256"] == __import__("hashlib").sha256(blob).hexdigest()
        for span in ("train_span", "test_span"):
            s = sc[span]
            assert s["start_ns"] <= s["end_ns"] and s["rows"] > 0
            assert s["start"].startswith("2024-08-01T") and s["end"].endswith("Z")
    summary = json.loads((out / "training.json").read_text())
    assert list(summary["models"]) == list(schema.MODEL_NAMES)
    assert summary["args"]["asset_class"] == "crypto" and summary["args"]["seq_len"] == 8
    assert summary["models"]["edge"]["auc"] == sidecar(out, "edge")["metrics"]["auc"]


def test_output_names_are_what_the_onnx_graphs_have(trained: dict[str, Any]) -> None:
    out: Path = trained["out"]
    for model in schema.MODEL_NAMES:
        sc = sidecar(out, model)
        sess = session(out / f"{model}.onnx")
        (inp,) = sess.get_inputs()
        assert inp.name == "x" and inp.type == "tensor(float)"
        assert [d if isinstance(d, int) else None for d in inp.shape] == sc["input"]["shape"]
        assert sc["output"]["name"] in [o.name for o in sess.get_outputs()]
    assert sidecar(out, "edge")["output"] == {"name": "p_up", "column": 0}
    assert sidecar(out, "transformer")["output"] == {"name": "p_up", "column": 0}
    assert sidecar(out, "gbdt")["output"] == {"name": "probabilities", "column": 1}
    assert sidecar(out, "idec")["output"] == {"name": "probabilities", "column": 1}


def contract_inputs(data: dict[str, np.ndarray], sc: dict[str, Any]) -> np.ndarray:
    """Every row's model input, built from the Parquet and the sidecar alone."""
    X = np.column_stack([data[f] for f in sc["features"]])
    mean, std = np.array(sc["scaler"]["mean"]), np.array(sc["scaler"]["std"])
    clip = sc["scaler"]["clip"]
    with np.errstate(invalid="ignore"):
        Z = np.clip((X - mean) / std, -clip, clip)
    Z[~np.isfinite(X)] = 0.0
    L = sc["seq_len"]
    if L == 1:
        return Z.astype(np.float32)
    seqs = np.zeros((len(Z), L, Z.shape[1]), dtype=np.float32)
    rec = data.get("recording", np.zeros(len(Z), np.int64))  # no column: one recording
    for r_, sym in {(int(a), str(b)) for a, b in zip(rec, data["symbol"], strict=True)}:
        rows = np.flatnonzero((rec == r_) & (data["symbol"] == sym))
        for j, r in enumerate(rows):
            window = Z[rows[max(0, j - L + 1) : j + 1]]
            seqs[r, L - len(window) :] = window
    return seqs


def test_models_rerun_from_the_contract_are_predictive(trained: dict[str, Any]) -> None:
    """Rebuild the test split and inputs from the Parquet and sidecar only: same metrics."""
    data = read_export(trained["data"])
    label = data["ret_bps_5000ms"]
    for model in schema.MODEL_NAMES:
        sc = sidecar(trained["out"], model)
        span = sc["test_span"]
        rows = np.flatnonzero(
            (data["flags"] & schema.BOOK_UNTRADEABLE == 0)
            & np.isfinite(label)
            & (data["ts_ns"] >= span["start_ns"])
            & (data["ts_ns"] <= span["end_ns"])
        )
        assert len(rows) == sc["metrics"]["n_test"]
        res = session(trained["out"] / f"{model}.onnx").run(
            [sc["output"]["name"]], {"x": contract_inputs(data, sc)[rows]}
        )[0]
        p = res[:, sc["output"]["column"]]
        moved = label[rows] != 0
        auc = roc_auc_score(label[rows][moved] > 0, p[moved])
        assert auc == pytest.approx(sc["metrics"]["auc"], abs=1e-6)
        assert auc > 0.65, model
        assert sc["metrics"]["hit_rate"] > 0.6 and sc["metrics"]["ic"] > 0.3, model


def test_embargo_separates_train_and_test_by_one_horizon_and_the_tolerance(
    trained: dict[str, Any],
) -> None:
    sc = sidecar(trained["out"], "edge")
    horizon_ns = sc["horizon_ms"] * 1_000_000
    reach = horizon_ns + export.label_tolerance_ns(horizon_ns)  # 5 s + 1 s
    assert sc["test_span"]["start_ns"] > sc["train_span"]["end_ns"] + reach
    # and the embargo drops no more than it must: the gap is about one horizon and tolerance
    assert sc["test_span"]["start_ns"] - sc["train_span"]["end_ns"] < reach + 2 * STEP_NS


def _frame(ts: np.ndarray, *, horizon_ms: int = 5000, seed: int = 0) -> train.Frame:
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((len(ts), len(train.CANDIDATES)))
    return train.Frame(
        files=[Path("f.parquet")],
        ts=np.asarray(ts, np.int64),
        flags=np.zeros(len(ts), np.int64),
        group=np.zeros(len(ts), np.int64),
        label=X[:, train.CANDIDATES.index("obi")] + 0.1,
        X=X,
        label_name=f"ret_bps_{horizon_ms}ms",
        horizon_ms=horizon_ms,
        symbols=["BTC"],
        meta=[{}],
    )


def test_embargo_is_strict_and_counts_the_label_tolerance() -> None:
    # one row a second; the test split starts at row 700 (t = 700 s); a 5 s label may be read
    # from a book up to 1 s past t + 5 s, so the last training row is 693 (693 + 6 < 700):
    # 694 reaches exactly the first test row and 695 reached it before (ts + h <= first test)
    sp = train.split(_frame(T0_NS + np.arange(1000, dtype=np.int64) * 10**9), 0.3)
    assert sp.test[0] == 700 and sp.train.max() == 693
    assert sp.counts["embargoed"] == 6


def test_constant_and_missing_features_are_dropped_and_listed(trained: dict[str, Any]) -> None:
    sc = sidecar(trained["out"], "gbdt")
    dropped = {d["name"]: d["reason"] for d in sc["dropped_features"]}
    assert set(dropped) == {"microprice", *CONSTANT, *MISSING, *CYCLIC}
    assert all("constant" in dropped[n] for n in CONSTANT)
    assert dropped["tod_sin"] == dropped["tod_cos"] == TOD_REASON
    assert dropped["dow_sin"] == dropped["dow_cos"] == DOW_REASON
    assert "no finite value" in dropped["impact_beta"]
    assert sc["features"] == [n for n in schema.FEATURE_NAMES if n not in dropped], (
        "input column order is FEATURE_NAMES order"
    )
    # warming-up features (NaN at first) are kept: they become 0 after scaling
    assert set(WARMUP) <= set(sc["features"])


def test_noise_gives_an_edge_auc_near_one_half(tmp_path: Path) -> None:
    data = make_export(tmp_path / "noise.parquet", signal=0.0, seed=7)
    out = tmp_path / "m"
    assert (
        train.main([str(data), "--asset-class", "equity", "--out", str(out), "--models", "edge"])
        == 0
    )
    sc = sidecar(out, "edge")
    assert sc["asset_class"] == "equity"
    assert 0.4 < sc["metrics"]["auc"] < 0.6
    assert sorted(p.name for p in out.iterdir()) == ["edge.json", "edge.onnx", "training.json"]


def test_several_files_are_concatenated(tmp_path: Path) -> None:
    a = make_export(tmp_path / "a.parquet", rows=1500, seed=2)
    b = make_export(tmp_path / "b.parquet", rows=1500, seed=3, t0_ns=T0_NS + 86_400 * 10**9)
    out = tmp_path / "m"
    argv = [str(a), str(b), "--asset-class", "crypto", "--out", str(out), "--models", "edge"]
    assert train.main([*argv, "--horizon-ms", "1000"]) == 0
    sc = sidecar(out, "edge")
    assert sc["data"]["files"] == [str(a), str(b)] and sc["label"] == "ret_bps_1000ms"
    # the test split is the last 30% in time: all from the later file
    assert sc["test_span"]["start_ns"] > T0_NS + 86_400 * 10**9
    assert sc["train_span"]["start_ns"] < T0_NS + 86_400 * 10**9


def test_transformer_input_stays_3d_with_seq_len_1(tmp_path: Path) -> None:
    data = make_export(tmp_path / "f.parquet", rows=1500)
    out = tmp_path / "m"
    argv = ["--asset-class", "crypto", "--out", str(out), "--models", "transformer"]
    assert train.main([str(data), *argv, "--seq-len", "1"]) == 0
    sc = sidecar(out, "transformer")
    assert sc["seq_len"] == 1 and sc["input"]["shape"] == [None, 1, len(sc["features"])]
    (inp,) = session(out / "transformer.onnx").get_inputs()
    assert inp.shape[1:] == [1, len(sc["features"])]


# ---------------------------------------------------------------- exports equal the models


def _xy(n: int = 1200, d: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d)).astype(np.float32)
    y = (X[:, 0] + 0.5 * rng.standard_normal(n) > 0).astype(np.int64)
    return X, y


def _onnx(fitted: train.Fitted, X: np.ndarray) -> np.ndarray:
    out = train.session(fitted.onnx).run([fitted.output], {"x": X})[0]
    return np.asarray(out[:, fitted.column], dtype=np.float64)


def test_edge_onnx_equals_logistic_regression_predict_proba() -> None:
    X, y = _xy()
    fitted = train.fit_edge(X, y, seed=0)
    ref = LogisticRegression(C=1.0, max_iter=1000).fit(X, y)
    assert np.max(np.abs(_onnx(fitted, X) - ref.predict_proba(X)[:, 1])) < 1e-5
    assert train.fit_edge(X, y, seed=0).onnx == fitted.onnx, "deterministic"


def test_sklearn_exports_equal_their_models() -> None:
    X, y = _xy()
    gbdt = train.fit_gbdt(X, y, seed=0, log=lambda _msg: None)
    idec = train.fit_idec(X, y, seed=0)
    for fitted in (gbdt, idec):
        assert np.max(np.abs(_onnx(fitted, X) - fitted.predict(X))) <= 1e-4, fitted.name
    # same data and seed, same bytes (the sidecar's model_sha256 identifies a model)
    assert train.fit_idec(X, y, seed=0).onnx == idec.onnx


def test_transformer_onnx_equals_the_numpy_forward_pass() -> None:
    rng = np.random.default_rng(3)
    n, L = 5, 6
    S = rng.standard_normal((900, n)).astype(np.float32)
    group = rng.integers(0, 3, len(S))
    idx = train.sequence_index(group, L)
    y = (S[:, 0] > 0).astype(np.int64)
    fitted = train.fit_transformer(train.pad(S), idx, y, seq_len=L, seed=0)
    X = train.pad(S)[idx]  # includes the zero-padded first windows of each symbol
    p_onnx = _onnx(fitted, X)
    assert np.max(np.abs(p_onnx - fitted.predict(X))) <= 1e-4
    # and the forward pass is the plain numpy one on freshly initialised weights too
    params = train.transformer_init(n, L, seed=5)
    blob = train.transformer_onnx(params, n, L)
    ref = train.transformer_predict(params, X)
    got = train.session(blob).run(["p_up"], {"x": X})[0][:, 0]
    assert np.max(np.abs(got - ref)) <= 1e-4
    assert roc_auc_score(y, p_onnx) > 0.8, "it learned the current tick's feature"


def test_a_disagreeing_export_is_refused_and_nothing_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    data = make_export(tmp_path / "f.parquet", rows=1500)
    monkeypatch.setattr(train, "MAX_ABS_DIFF", -1.0)  # every export now "differs"
    out = tmp_path / "m"
    code = train.main([str(data), "--asset-class", "crypto", "--out", str(out), "--models", "edge"])
    assert code == 1
    assert "edge: the ONNX export differs" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


# ---------------------------------------------------------------- bad input


def _bad_cases(tmp: Path) -> list[tuple[list[str], str]]:
    good = make_export(tmp / "good.parquet", rows=1500)
    text = tmp / "notes.parquet"
    text.write_text("not parquet at all\n")
    truncated = tmp / "truncated.parquet"
    truncated.write_bytes(good.read_bytes()[:2000])
    no_label = make_export(
        tmp / "nolabel.parquet", rows=600, drop=tuple(f"ret_bps_{h}ms" for h in HORIZONS_MS)
    )
    no_obi = make_export(tmp / "noobi.parquet", rows=600, drop=("obi",))
    tiny = make_export(tmp / "tiny.parquet", rows=250)
    out = ["--out", str(tmp / "m")]
    crypto = ["--asset-class", "crypto", *out]
    return [
        ([str(tmp / "absent.parquet"), *crypto], "absent.parquet: no such file"),
        ([str(text), *crypto], "notes.parquet: not a readable Parquet file"),
        ([str(truncated), *crypto], "truncated.parquet: not a readable Parquet file"),
        ([str(no_label), *crypto], "nolabel.parquet: no label column ret_bps_<h>ms"),
        ([str(no_obi), *crypto], "noobi.parquet: missing column 'obi'"),
        ([str(good), "--asset-class", "bonds", *out], "invalid choice: 'bonds'"),
        ([str(good), *out], "--asset-class"),
        ([str(tiny), *crypto], "usable training rows (need 200)"),
        ([str(good), *crypto, "--horizon-ms", "750"], "has ret_bps_1000ms, ret_bps_5000ms"),
        ([str(good), *crypto, "--models", "edge,forest"], "unknown model forest"),
        ([str(good), *crypto, "--test-fraction", "1.5"], "between 0 and 1"),
    ]


def test_bad_input_exits_2_naming_the_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for argv, message in _bad_cases(tmp_path):
        code = train.main(argv)
        err = capsys.readouterr().err
        assert code == 2, (argv, err)
        assert message in err, (message, err)
        assert "Traceback" not in err
    assert not (tmp_path / "m").exists(), "nothing written for bad input"


def test_one_class_only_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = make_export(tmp_path / "up.parquet", rows=1500)
    t = pq.read_table(path)
    i = t.column_names.index("ret_bps_5000ms")
    up = np.abs(np.asarray(t.column(i).to_numpy())) + 1.0
    pq.write_table(t.set_column(i, "ret_bps_5000ms", pa.array(up)), path)
    assert train.main([str(path), "--asset-class", "crypto", "--out", str(tmp_path / "m")]) == 2
    assert "one class only" in capsys.readouterr().err


def test_missing_training_extra_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "skl2onnx", None)  # makes `import skl2onnx` fail
    code = train.main(["x.parquet", "--asset-class", "crypto", "--out", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert "skl2onnx" in err and "pip install -e '.[train]'" in err


def test_hft_cli_routes_train(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ops.cli import main as hft

    assert (
        hft(["train", str(tmp_path / "none.parquet"), "--asset-class", "crypto", "--out", "x"]) == 2
    )
    assert "none.parquet: no such file" in capsys.readouterr().err
    assert not os.path.exists("x")


def test_time_of_day_is_kept_once_the_data_covers_a_day(tmp_path: Path) -> None:
    src = make_export(
        tmp_path / "long.parquet", rows=3000, step_ns=60 * 10**9
    )  # 50 h, 35 of them training
    out = tmp_path / "m"
    rc = train.main([str(src), "--asset-class", "equity", "--out", str(out), "--models", "edge"])
    assert rc == 0
    sc = sidecar(out, "edge")
    dropped = {d["name"]: d["reason"] for d in sc["dropped_features"]}
    assert "tod_sin" in sc["features"] and "tod_cos" in sc["features"]
    assert dropped["dow_sin"] == DOW_REASON


def test_time_features_need_every_hour_not_a_span(tmp_path: Path) -> None:
    """Two short recordings of the same hour on consecutive days span more than a day, yet
    see one hour: tod_* would be a near-constant that any other hour pushes off the scale."""
    a = make_export(tmp_path / "mon.parquet", rows=1000, seed=2)
    b = make_export(tmp_path / "tue.parquet", rows=1000, seed=3, t0_ns=T0_NS + 86_400 * 10**9)
    frame = train.load([a, b], None)
    sp = train.split(frame, 0.3)
    assert int(np.ptp(frame.ts[sp.train])) > 86_400 * 10**9  # the old rule kept tod_*
    dropped = {d["name"]: d["reason"] for d in sp.dropped}
    assert dropped["tod_sin"] == dropped["tod_cos"] == TOD_REASON
    assert dropped["dow_sin"] == dropped["dow_cos"] == DOW_REASON
    assert not {"tod_sin", "tod_cos"} & set(sp.features)


def test_cycle_coverage_buckets() -> None:
    hour = 3_600 * 10**9
    day = 24 * hour
    assert train.covers_day(T0_NS + np.arange(24) * hour)
    assert not train.covers_day(T0_NS + np.arange(24) * day)  # every day at 00:00
    assert not train.covers_day(T0_NS + np.delete(np.arange(24), 13) * hour)
    # 2024-08-01 was a Thursday (weekday 3): seven consecutive days cover the week
    assert int((T0_NS // day + 3) % 7) == 3
    assert train.covers_week(T0_NS + np.arange(7) * day)
    assert not train.covers_week(T0_NS + np.arange(6) * day)


def test_sequences_restart_with_each_recording(tmp_path: Path) -> None:
    """One file, two recordings of BTC and ETH: the second recording's first rows of a symbol
    get zero-padded windows, not the first recording's last vectors."""
    rows, L = 800, 4
    rec = (np.arange(rows) >= rows // 2).astype(np.int16)
    path = make_export(tmp_path / "two.parquet", rows=rows, recording=rec)
    frame = train.load([path], None)
    assert frame.symbols == ["BTC", "ETH"]
    idx = train.sequence_index(frame.group, L)
    first_btc, first_eth = rows // 2, rows // 2 + 1  # symbols alternate
    assert idx[first_btc].tolist() == [-1, -1, -1, first_btc]
    assert idx[first_eth].tolist() == [-1, -1, -1, first_eth]
    assert idx[first_btc + 2].tolist() == [-1, -1, first_btc, first_btc + 2]
    assert idx[first_btc - 2].tolist() == [
        first_btc - 8,
        first_btc - 6,
        first_btc - 4,
        first_btc - 2,
    ]
    assert len(np.unique(frame.group)) == 4  # (recording, symbol)
    S = np.arange(rows * 2, dtype=np.float32).reshape(rows, 2) + 1
    windows = train.pad(S)[idx]
    assert not windows[first_btc, :-1].any() and not windows[first_eth, :-1].any()
    # a file without the column (an older export) is one recording: sequences run through
    old = make_export(tmp_path / "old.parquet", rows=rows)
    idx_old = train.sequence_index(train.load([old], None).group, L)
    assert idx_old[first_btc].tolist() == [first_btc - 6, first_btc - 4, first_btc - 2, first_btc]


def test_files_of_another_layout_are_refused_naming_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = {
        "source": "r.jsonl.gz",
        "data": "simulator",
        "venue": "sim",
        "symbols": ["BTC", "ETH"],
        "feature_window_size": 1000,
        "horizons_ms": list(HORIZONS_MS),
        "layout_version": schema.LAYOUT_VERSION,
        "feature_names": list(schema.FEATURE_NAMES),
    }
    good = make_export(tmp_path / "good.parquet", rows=600, meta=base)
    renamed = [*schema.FEATURE_NAMES[1:], schema.FEATURE_NAMES[0]]
    names = make_export(
        tmp_path / "names.parquet", rows=600, meta={**base, "feature_names": renamed}
    )
    v = schema.LAYOUT_VERSION
    old = make_export(tmp_path / "old.parquet", rows=600, meta={**base, "layout_version": v - 1})
    bare = tmp_path / "bare.parquet"  # no metadata at all: accepted
    pq.write_table(pq.read_table(good).replace_schema_metadata(None), bare)
    crypto = ["--asset-class", "crypto", "--out", str(tmp_path / "m"), "--models", "edge"]
    for files, want in (
        ([good, names], [f"{good} and {names}", "different feature_names"]),
        ([good, old], [f"{good} and {old}", f"different layout_version ({v} vs {v - 1})"]),
        ([names], [f"{names}: exported with feature_names", "this build has"]),
        ([bare, old], [f"{old}: exported with layout_version {v - 1}, this build has {v}"]),
    ):
        assert train.main([*map(str, files), *crypto]) == 2, files
        err = capsys.readouterr().err
        assert all(w in err for w in want), (want, err)
    assert not (tmp_path / "m").exists()
    frame = train.load([bare, good], None)  # a file without metadata goes with any
    assert frame.meta[0] == {} and len(frame.ts) == 1200
