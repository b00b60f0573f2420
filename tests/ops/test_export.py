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
    """The contract's label, row by row (``ts`` already non-decreasing)."""
    tolerance = max(h_ns // 10, 1_000_000_000)
    out = []
    for i, t in enumerate(ts):
        later = next((j for j in range(i, len(ts)) if ts[j] >= t + h_ns), None)
        if (
            later is None
            or flags[later] & schema.BOOK_UNTRADEABLE
            or ts[later] > t + h_ns + tolerance  # a gap: not the mid at t + h
        ):
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
    assert meta["source"] == [str(BINANCE)] and not cols["recording"].any()
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


def test_each_recording_is_numbered_and_nothing_runs_across_two(tmp_path: Path) -> None:
    out = tmp_path / "two.parquet"
    rc = export.main([str(BINANCE), str(BINANCE), "--out", str(out), "--window", "40"])
    assert rc == 0
    cols, meta = _read(out)
    assert pq.read_schema(out).field("recording").type == "int16"
    n = len(cols["mid"]) // 2
    assert cols["recording"].tolist() == [0] * n + [1] * n
    assert meta["source"] == [str(BINANCE), str(BINANCE)]
    # the second recording starts from a fresh feature state and its own labels
    for name in [*schema.FEATURE_NAMES, "ts_ns", "ret_bps_5000ms"]:
        np.testing.assert_array_equal(cols[name][n:], cols[name][:n], err_msg=name)
    assert np.isnan(cols["ret_bps_1000ms"][n - 1])  # not read from the next recording

    # and hft train's transformer sequences restart with the second recording
    from ops import train

    frame = train.load([out], 1000)
    idx = train.sequence_index(frame.group, 4)
    assert idx[n].tolist() == [-1, -1, -1, n] and idx[n + 1].tolist() == [-1, -1, n, n + 1]
    assert idx[n - 1].tolist() == [n - 4, n - 3, n - 2, n - 1]


def _books(exch: list[int], recv: list[int], mid: list[float], flags: list[int]) -> np.ndarray:
    fv = np.zeros(len(exch), schema.FEATURES)
    fv["exch_ns"], fv["recv_ns"], fv["mid"], fv["flags"] = exch, recv, mid, flags
    return fv


def test_unstamped_books_stay_on_the_venue_clock() -> None:
    """The recorder's clock runs 2 s ahead of the venue's; a stale re-publish in the middle
    carries no venue time (exch_ns 0). The labels are those of the venue clock."""
    s = 1_000_000_000
    t0 = 1_722_470_400 * s
    venue = [t0 + k * s for k in range(12)]
    venue[6] = venue[5]  # the re-publish of book 5, sent again at the same venue time
    recv = [t + 2 * s + 3_000_000 for t in venue]
    exch = [*venue[:6], 0, *venue[7:]]
    mid = [100.0 + k + 0.25 * (k % 3) for k in range(12)]
    flags = [0] * 12
    flags[6] = schema.BOOK_STALE
    ts, labels = export.time_and_labels(_books(exch, recv, mid, flags), (1000, 2000))
    assert ts.tolist() == venue
    for h in (1000, 2000):
        truth = _brute_labels(venue, mid, flags, h * 1_000_000)
        np.testing.assert_allclose(labels[h], truth, rtol=1e-12, equal_nan=True)
    # on the receive clock the stale book would sit 2 s late and hold the next two back
    assert np.isfinite(labels[1000][:11]).all() and np.isnan(labels[1000][11])
    # per (recording, symbol): a book before the symbol's first venue time keeps its receive
    # time; every unstamped one after takes the previous book's time
    got = export.event_time_ns(np.array([0, 0, 50, 0, 0, 70]), np.array([11, 12, 53, 54, 55, 73]))
    assert got.tolist() == [11, 12, 50, 50, 50, 70]
    two = _books([0, 0, 100, 0], [7, 8, 9, 10], [1.0] * 4, [0] * 4)
    two["symbol_id"] = [0, 1, 1, 0]
    assert export.time_and_labels(two, (1,))[0].tolist() == [7, 8, 100, 10]


def test_labels_are_nan_past_the_tolerance() -> None:
    """A 5 s label may be read from a book at most max(0.5 s, 1 s) past t + 5 s: a gap in the
    data makes it NaN rather than a much longer return."""
    s = 1_000_000_000
    assert export.label_tolerance_ns(5 * s) == s and export.label_tolerance_ns(30 * s) == 3 * s
    assert export.label_tolerance_ns(500_000_000) == s
    ts = np.array([0, 1, 2, 3, 4, 10, 11, 60, 70], np.int64) * s  # gaps after 4 and after 11
    mid = 100.0 + np.arange(len(ts))
    got = export.forward_returns(ts, mid, np.zeros(len(ts), np.uint32), 5 * s)
    # 0 -> 10 (t + 5 s + 5 s: too far); 4 -> 10 (1 s past: kept); 5 (t=10) -> 60: too far
    want = [np.nan, np.nan, np.nan, np.nan, (105 / 104 - 1) * 1e4, np.nan, np.nan, np.nan, np.nan]
    np.testing.assert_allclose(got, want, rtol=1e-12, equal_nan=True)
    np.testing.assert_allclose(
        got, _brute_labels(ts.tolist(), mid.tolist(), [0] * len(ts), 5 * s), equal_nan=True
    )
    # exactly at t + h + tolerance is still the mid at t + h; one ns later is not
    for late, ok in ((6 * s, True), (6 * s + 1, False)):
        r = export.forward_returns(np.array([0, late]), mid[:2], np.zeros(2, np.uint32), 5 * s)
        assert np.isfinite(r[0]) == ok
