"""``hft export-features``: rows are the feature kernels' output, labels are forward returns."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import numpy as np
import pytest

from ops import export, sim
from shm import schema
from stages.feature import FeatureState, compute_features, update_marks, update_trades
from tests.stages.feature_reference import RefFeatures, assert_features, levels_of

pq = pytest.importorskip("pyarrow.parquet")
DATA = Path(__file__).resolve().parents[1] / "data"
BINANCE = DATA / "binance-usdm-btcusdt-20240808-excerpt.jsonl.gz"


def _read(path: Path) -> tuple[dict[str, np.ndarray], dict[str, object]]:
    t = pq.read_table(path)
    meta = json.loads(t.schema.metadata[b"hft"])
    return {n: t.column(n).to_numpy(zero_copy_only=False) for n in t.schema.names}, meta


def _brute_labels(ts: list[int], mid: list[float], flags: list[int], h_ns: int) -> list[float]:
    out = []
    for i, t in enumerate(ts):
        later = next((j for j in range(i, len(ts)) if ts[j] >= t + h_ns), None)
        if later is None or flags[later] & schema.BOOK_UNTRADEABLE:
            out.append(math.nan)
        else:
            out.append((mid[later] / mid[i] - 1) * 1e4)
    return out


def test_binance_excerpt_rows_match_the_reference_and_labels_are_forward_returns(
    tmp_path: Path,
) -> None:
    out = tmp_path / "f.parquet"
    rc = export.main(
        [str(BINANCE), "--out", str(out), "--window", "40", "--horizons-ms", "500,2000"]
    )
    assert rc == 0
    cols, meta = _read(out)
    n = len(cols["mid"])
    assert n == 484  # every book the adapter published (hft replay counts the same)
    assert meta["venue"] == "binance" and meta["symbols"] == ["BTC"]
    assert meta["feature_window_size"] == 40 and meta["horizons_ms"] == [500, 2000]
    assert meta["data"] == "recorded" and meta["layout_version"] == schema.LAYOUT_VERSION
    assert set(cols["symbol"]) == {"BTC"}
    # every feature column equals the plain reference replayed over the same books
    events = _ordered(BINANCE)
    ref = RefFeatures(window=40)
    k = 0
    row = np.zeros(1, schema.FEATURES)
    for kind, arr in events:
        if kind == "trades":
            for tr in arr:
                ref.trade(0, int(tr["recv_ns"]), float(tr["px"]), float(tr["sz"]))
        elif kind == "book":
            rec = arr[0]
            vals, mid = ref.book(
                0, *levels_of(rec), int(rec["recv_ns"]), exch_ns=int(rec["exch_ns"])
            )
            row["values"][0, : schema.N_FEATURES] = [cols[name][k] for name in schema.FEATURE_NAMES]
            row["mid"] = cols["mid"][k]
            assert_features(row[0], vals, mid, ctx=k)
            assert cols["ts_ns"][k] == int(rec["exch_ns"])
            assert cols["seq"][k] == int(rec["seq"])
            k += 1
    assert k == n
    for h in (500, 2000):
        want = _brute_labels(
            cols["ts_ns"].tolist(), cols["mid"].tolist(), cols["flags"].tolist(), h * 1_000_000
        )
        got = cols[f"ret_bps_{h}ms"]
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12, equal_nan=True)
        assert np.isnan(got[-1]) and np.isfinite(got[0])
    assert np.nanstd(cols["ret_bps_2000ms"]) > 0


def _ordered(path: Path) -> list[tuple[str, np.ndarray]]:
    from tests.stages.test_feature import _ordered_replay

    return _ordered_replay(path, "binance")


def test_the_kernels_see_events_in_the_adapters_order(tmp_path: Path) -> None:
    """The exported rows are what the feature stage's own functions give on the same events."""
    out = tmp_path / "f.parquet"
    assert export.main([str(BINANCE), "--out", str(out), "--window", "64"]) == 0
    cols, _ = _read(out)
    st = FeatureState(n_symbols=1, window=64)
    fv = np.zeros(1, schema.FEATURES)
    k = 0
    for kind, arr in _ordered(BINANCE):
        if kind == "trades":
            update_trades(arr, st)
        elif kind == "mark":
            update_marks(arr, st)
        else:
            compute_features(arr, st, fv)
            got = np.array([cols[name][k] for name in schema.FEATURE_NAMES])
            assert got.tobytes() == fv["values"][0, : schema.N_FEATURES].tobytes(), k
            k += 1
    assert k == len(cols["mid"])


def test_simulator_recording_of_several_symbols(tmp_path: Path) -> None:
    rec = tmp_path / "sim.jsonl.gz"
    counts = sim.write_recording(
        str(rec),
        coins=["AAPL", "MSFT"],
        rate_per_s=20.0,
        trade_rate_per_s=3.0,
        seconds=30.0,
        seed=3,
        start_ns=1_767_623_400 * 1_000_000_000,
    )
    assert counts["books"] == 2 * 600 and counts["contexts"] == 2 * 30
    out = tmp_path / "s.parquet"
    assert export.main([str(rec), "--out", str(out), "--data", "simulator"]) == 0
    cols, meta = _read(out)
    assert meta["data"] == "simulator" and sorted(meta["symbols"]) == ["AAPL", "MSFT"]
    assert meta["marks"] == 60
    assert len(cols["mid"]) == 1200
    # the sim's funding (hourly on the Hyperliquid wire) arrives per 8 h, in bps
    assert np.nanmin(np.abs(cols["funding_bps"])) >= 0 and np.isfinite(cols["funding_bps"][-1])
    # labels never look across symbols
    for name in ("AAPL", "MSFT"):
        idx = np.flatnonzero(cols["symbol"] == name)
        want = _brute_labels(
            cols["ts_ns"][idx].tolist(),
            cols["mid"][idx].tolist(),
            cols["flags"][idx].tolist(),
            5_000_000_000,
        )
        np.testing.assert_allclose(cols["ret_bps_5000ms"][idx], want, equal_nan=True)
    # the same seed writes the same file
    again = tmp_path / "again.jsonl.gz"
    sim.write_recording(
        str(again),
        coins=["AAPL", "MSFT"],
        rate_per_s=20.0,
        trade_rate_per_s=3.0,
        seconds=30.0,
        seed=3,
        start_ns=1_767_623_400 * 1_000_000_000,
    )
    assert gzip.decompress(again.read_bytes()) == gzip.decompress(rec.read_bytes())


def test_forward_returns_skip_untradeable_targets_and_clock_steps() -> None:
    ts = np.array([0, 10, 20, 15, 40], np.int64)  # the venue clock stepped back once
    mid = np.array([100.0, 101.0, 102.0, 103.0, 104.0])
    flags = np.array([0, 0, schema.BOOK_STALE, 0, 0], np.uint32)
    got = export.forward_returns(ts, mid, flags, 10)
    # row 0 -> row 1; row 1 -> row 2 (stale: NaN); row 2 -> row 4 (15 counts as 20)
    assert got[0] == pytest.approx(100.0)
    assert math.isnan(got[1])
    assert got[2] == pytest.approx((104.0 / 102.0 - 1) * 1e4)
    assert got[3] == pytest.approx((104.0 / 103.0 - 1) * 1e4)
    assert math.isnan(got[4])


def test_bad_usage_exits_2_naming_the_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = str(tmp_path / "x.parquet")
    assert export.main([str(tmp_path / "missing.jsonl.gz"), "--out", out]) == 2
    assert "missing.jsonl.gz: no such file" in capsys.readouterr().err
    assert export.main([str(BINANCE), "--out", out, "--window", "1"]) == 2
    assert "--window must be >= 2" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # argparse's own usage error
        export.main([str(BINANCE), "--out", out, "--horizons-ms", "5s"])
    assert exc.value.code == 2
    assert "--horizons-ms must be comma-separated integers" in capsys.readouterr().err
    assert not Path(out).exists()


def test_a_file_that_is_not_a_recording(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.jsonl.gz"
    bad.write_bytes(b"not gzip at all")
    assert export.main([str(bad), "--out", str(tmp_path / "o.parquet")]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl.gz" in err and "Traceback" not in err
    assert not (tmp_path / "o.parquet").exists()
