"""``hft export-features``: replay recordings through the live kernels into a Parquet table.

    hft export-features REC.jsonl.gz [MORE ...] --out F.parquet [--horizons-ms 1000,5000,30000]
                        [--window N | --config PATH] [--venue V] [--data recorded|simulator]

Why a replay and not a re-implementation: a model is only as good as the agreement between
the features it was trained on and the ones it sees live. Every frame goes through the venue
adapter the ingest stage runs (``stages.venues``), and every book, trade and mark through the
feature stage's own kernels (``compute_features``, ``update_trades``, ``update_marks``) in
the order the adapter published them, so a row here is byte for byte the vector the live
stage would have sent for that tick (with the same ``feature_window_size``).

Time: ``ts_ns`` is the venue's event time (``exch_ns``), kept on one clock per (recording,
symbol): a book the venue did not stamp (``exch_ns == 0``, e.g. a Binance stale re-publish)
takes the previous book's event time, and only the books before the symbol's first stamped
one use the receive time. Mixing the recorder's clock into the venue's would move labels by
the clock offset (and, through the running maximum below, hold every later book at the
receive clock's lead).

Labels are forward mid returns: for horizon h, ``ret_bps_<h>ms = (mid(t + h) / mid(t) - 1)
* 1e4`` where ``mid(t + h)`` is the mid of the symbol's first book at or after ``t + h`` in
the same recording (by ``ts_ns``, made non-decreasing by a running maximum so a venue clock
that steps back cannot reorder ticks). NaN when the recording ends first, when either book
has no mid, when the later book is stale or crossed (its mid is not a price anyone could
trade), or when the later book is more than ``label_tolerance_ns(h) = max(h / 10, 1 s)``
past ``t + h`` (a data gap would otherwise turn a 5 s label into a 10-minute one).

Several recordings go into one file, each replayed from a fresh feature state; the
``recording`` column (int16) is the index of a row's recording in this export (0-based, the
order of the ``source`` list in the metadata), so a consumer can keep per-symbol histories
(the transformer's sequences) from running across recordings. The table layout and its
metadata are the contract in ``models/README.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from shm import schema
from stages import config
from stages.feature import FeatureState, compute_features, update_marks, update_trades
from stages.venues.feed import new_counters
from stages.venues.replay import (
    InlineSnapshots,
    RecordingError,
    detect_venue,
    infer_instruments,
    make_feed,
    replay,
)

DEFAULT_HORIZONS_MS = (1000, 5000, 30000)
_CHUNK = 8192
_SECOND_NS = 1_000_000_000
MAX_RECORDINGS = np.iinfo(np.int16).max + 1  # the ``recording`` column is int16


class FeatureSink:
    """Run the feature kernels on everything a venue adapter publishes, in its order."""

    def __init__(self, *, n_symbols: int, window: int) -> None:
        self.state = FeatureState(n_symbols=n_symbols, window=window)
        self._buf = np.zeros(_CHUNK, schema.FEATURES)
        self._n = 0
        self._chunks: list[np.ndarray] = []
        self.n_trades = 0
        self.n_marks = 0

    def book(self, books: np.ndarray) -> None:
        compute_features(books[:1], self.state, self._buf[self._n : self._n + 1])
        self._n += 1
        if self._n == _CHUNK:
            self._chunks.append(self._buf.copy())
            self._n = 0

    def trades(self, trades: np.ndarray) -> None:
        update_trades(trades, self.state)
        self.n_trades += len(trades)

    def mark(self, marks: np.ndarray) -> None:
        update_marks(marks[:1], self.state)
        self.n_marks += 1

    def rows(self) -> np.ndarray:
        return np.concatenate([*self._chunks, self._buf[: self._n]])


def label_tolerance_ns(horizon_ns: int) -> int:
    """How far past ``t + h`` the book a label is read from may be: ``max(h / 10, 1 s)``.

    The trainer's embargo uses the same bound (a label may look this far past its horizon).
    """
    return max(int(horizon_ns) // 10, _SECOND_NS)


def event_time_ns(exch_ns: np.ndarray, recv_ns: np.ndarray) -> np.ndarray:
    """One symbol's event times (one recording, arrival order) on the venue's clock.

    A book with ``exch_ns == 0`` (not stamped by the venue) takes the previous book's event
    time; books before the first stamped one use their receive time.
    """
    exch = np.asarray(exch_ns, dtype=np.int64)
    recv = np.asarray(recv_ns, dtype=np.int64)
    stamped = exch > 0
    last = np.maximum.accumulate(np.where(stamped, np.arange(len(exch)), -1))
    return np.where(last >= 0, exch[np.maximum(last, 0)], recv)


def forward_returns(
    ts_ns: np.ndarray, mid: np.ndarray, flags: np.ndarray, horizon_ns: int
) -> np.ndarray:
    """Forward mid return in bps of one symbol's books (in arrival order) over ``horizon_ns``."""
    ts = np.maximum.accumulate(ts_ns)  # a venue clock that steps back must not reorder ticks
    j = np.searchsorted(ts, ts + horizon_ns, side="left")
    out = np.full(len(ts), np.nan)
    ok = j < len(ts)
    jj = j[ok]
    later_ok = (flags[jj] & schema.BOOK_UNTRADEABLE) == 0
    # a gap in the data: the first book after t + h is too far past it to be "the mid at t + h"
    later_ok &= ts[jj] <= ts[ok] + horizon_ns + label_tolerance_ns(horizon_ns)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (mid[jj] / mid[ok] - 1.0) * 1e4
    out[np.flatnonzero(ok)] = np.where(later_ok, r, np.nan)
    return out


def time_and_labels(
    fv: np.ndarray, horizons_ms: tuple[int, ...]
) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """``ts_ns`` and the label per horizon of one recording's rows (``schema.FEATURES``)."""
    sids = fv["symbol_id"].astype(np.int64)
    ts = np.zeros(len(fv), np.int64)
    labels = {h: np.full(len(fv), np.nan) for h in horizons_ms}
    for sid in np.unique(sids):
        idx = np.flatnonzero(sids == sid)
        ts[idx] = event_time_ns(fv["exch_ns"][idx], fv["recv_ns"][idx])
        for h in horizons_ms:
            labels[h][idx] = forward_returns(
                ts[idx], fv["mid"][idx], fv["flags"][idx], h * 1_000_000
            )
    return ts, labels


def export(
    paths: list[Path],
    *,
    window: int,
    horizons_ms: tuple[int, ...],
    venue: str | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Replay each recording; return the table's columns and a summary for its metadata."""
    cols: dict[str, list[np.ndarray]] = {}
    venues: list[str] = []
    symbols: list[str] = []
    n_trades = n_marks = 0
    if len(paths) > MAX_RECORDINGS:
        raise RecordingError(f"{len(paths)} recordings: one export holds at most {MAX_RECORDINGS}")
    for number, path in enumerate(paths):
        v = venue or detect_venue(path)
        instruments = infer_instruments(path, v)
        n_sym = max(instruments) + 1 if instruments else 1
        sink = FeatureSink(n_symbols=n_sym, window=window)
        snaps = InlineSnapshots() if v == "binance" else None
        feed = make_feed(v, instruments, sink, new_counters(), snaps)
        replay(path, feed, snaps)
        fv = sink.rows()
        n_trades += sink.n_trades
        n_marks += sink.n_marks
        venues.append(v)
        names = {sid: ins.name for sid, ins in instruments.items()}
        symbols.extend(n for n in names.values() if n not in symbols)
        ts, labels = time_and_labels(fv, horizons_ms)
        sids = fv["symbol_id"].astype(np.int64)
        part: dict[str, np.ndarray] = {
            "symbol": np.array([names.get(int(s), str(s)) for s in sids], dtype=object),
            "symbol_id": sids.astype(np.int32),
            "recording": np.full(len(fv), number, np.int16),
            "ts_ns": ts,
            "recv_ns": fv["recv_ns"].astype(np.int64),
            "seq": fv["seq"].astype(np.uint64),
            "flags": fv["flags"].astype(np.uint32),
            "mid": fv["mid"],
            "best_bid": fv["best_bid"],
            "best_ask": fv["best_ask"],
        }
        for k, name in enumerate(schema.FEATURE_NAMES):
            part[name] = fv["values"][:, k].copy()
        for h in horizons_ms:
            part[f"ret_bps_{h}ms"] = labels[h]
        for key, arr in part.items():
            cols.setdefault(key, []).append(arr)
    table = {k: np.concatenate(v) for k, v in cols.items()}
    meta = {
        "venue": venues[0] if len(set(venues)) == 1 else ",".join(venues),
        "symbols": symbols,
        "feature_window_size": window,
        "horizons_ms": list(horizons_ms),
        "layout_version": schema.LAYOUT_VERSION,
        "feature_names": list(schema.FEATURE_NAMES),
        "trades": n_trades,
        "marks": n_marks,
    }
    return table, meta


def write_parquet(path: Path, table: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    """Write atomically (a temporary file renamed into place)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrays = {k: pa.array(v) for k, v in table.items()}
    t = pa.table(arrays).replace_schema_metadata({"hft": json.dumps(meta)})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        pq.write_table(t, tmp, compression="zstd")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _horizons(text: str) -> tuple[int, ...]:
    try:
        hs = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--horizons-ms must be comma-separated integers, got {text!r}"
        ) from None
    if not hs or any(h <= 0 for h in hs):
        raise argparse.ArgumentTypeError(f"--horizons-ms must be > 0, got {text!r}")
    return tuple(sorted(set(hs)))


def _span(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, UTC).isoformat(timespec="seconds")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="hft export-features", description=__doc__.splitlines()[0])
    p.add_argument("recordings", nargs="+", help="recordings (.jsonl.gz, lines '<ns> <json>')")
    p.add_argument("--out", required=True, help="Parquet file to write")
    p.add_argument(
        "--horizons-ms",
        type=_horizons,
        default=DEFAULT_HORIZONS_MS,
        help="label horizons in ms (default: %(default)s)",
    )
    p.add_argument("--window", type=int, default=None, help="feature_window_size override")
    p.add_argument(
        "--config", default=str(config.DEFAULT_CONFIG), help="engine TOML for feature_window_size"
    )
    p.add_argument("--venue", choices=("binance", "hyperliquid"), default=None)
    p.add_argument(
        "--data",
        choices=("recorded", "simulator"),
        default="recorded",
        help="what the recordings are, written into the metadata (default: %(default)s)",
    )
    args = p.parse_args(argv)
    prog = "hft export-features"
    paths = [Path(x) for x in args.recordings]
    for path in paths:
        if not path.is_file():
            print(f"{prog}: {path}: no such file", file=sys.stderr)
            return 2
    if args.window is not None:
        if args.window < 2:
            print(f"{prog}: --window must be >= 2, got {args.window}", file=sys.stderr)
            return 2
        window = args.window
    else:
        try:
            window = config.load(args.config).engine.feature_window_size
        except (config.ConfigError, OSError) as exc:
            print(f"{prog}: config error: {exc}", file=sys.stderr)
            return 2
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        print(
            f"{prog}: pyarrow is missing; install the training extra: "
            ".venv/bin/pip install -e '.[train]'",
            file=sys.stderr,
        )
        return 2
    t0 = time.perf_counter()
    try:
        table, meta = export(paths, window=window, horizons_ms=args.horizons_ms, venue=args.venue)
    except RecordingError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    n = len(table["mid"])
    if n == 0:
        print(f"{prog}: no book in {', '.join(map(str, paths))}", file=sys.stderr)
        return 2
    meta["source"] = [str(x) for x in paths]
    meta["data"] = args.data
    out = Path(args.out)
    try:
        write_parquet(out, table, meta)
    except OSError as exc:
        print(f"{prog}: --out {out}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    ts = table["ts_ns"]
    print(
        f"{prog}: {n:,} rows ({len(meta['symbols'])} symbols, {meta['venue']}, "
        f"window {window}) from {_span(int(ts.min()))} to {_span(int(ts.max()))} "
        f"in {time.perf_counter() - t0:.1f} s -> {out}"
    )
    tradeable = (table["flags"] & schema.BOOK_UNTRADEABLE) == 0
    for h in args.horizons_ms:
        lab = table[f"ret_bps_{h}ms"]
        ok = np.isfinite(lab) & tradeable
        moved = ok & (lab != 0)
        up = float((lab[moved] > 0).mean()) if moved.any() else float("nan")
        print(
            f"  ret_bps_{h}ms: {int(ok.sum()):,} labelled, {int(moved.sum()):,} moved "
            f"({up:.1%} up), mean |ret| {np.nanmean(np.abs(lab[ok])) if ok.any() else 0:.2f} bps"
        )
    return 0
