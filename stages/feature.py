"""Feature stage: book and trade records in, one feature vector per book snapshot out.

Formulas (per symbol; b/a best bid/ask price, B/A their sizes, mid = (b + a) / 2):
- spread_bps      = (a - b) / mid * 1e4
- microprice      = (b * A + a * B) / (B + A)        (size-weighted toward the thin side)
- micro_dev_bps   = (microprice - mid) / mid * 1e4
- obi             = (B - A) / (B + A)                 top-of-book imbalance, in [-1, 1]
- depth_imbalance = (sum B_1..10 - sum A_1..10) / (sum B_1..10 + sum A_1..10)
- rvol_bps        = sqrt(mean(r^2)) * 1e4 over the last ``feature_window_size`` mid log
                    returns r of the symbol (a running sum of squares: O(1) per update)
- ofi             = e_b - e_a, Cont-Kukanov-Stoikov order flow imbalance of one update:
                    e_b = B*[b >= b'] - B'*[b <= b'], e_a = A*[a <= a'] - A'*[a >= a'] (primes:
                    the previous book of the symbol)
- trade_intensity = exponentially decayed trade count, trades per second (tau = 1 s)

The kernel is compiled with numba: a batch of one costs about a microsecond, where the same
maths as numpy array operations cost ~50 us (each numpy call has ~1 us of overhead and a
pipeline that hands every tick on at once runs batches of one). ``cache=True`` keeps the
machine code in ``__pycache__`` so only the first start of a fresh checkout compiles. Time is
the records' own ``recv_ns``: the kernel reads no clock, so a backtest gives the same numbers.
"""

from __future__ import annotations

import math
import time
from typing import Final

import numpy as np
from numba import njit

from shm import schema
from shm.ring import RingReader
from shm.schema import (  # module globals: numba folds them into the compiled kernel
    F_DEPTH_IMB,
    F_MICRO_DEV_BPS,
    F_MICROPRICE,
    F_OBI,
    F_OFI,
    F_RVOL_BPS,
    F_SPREAD_BPS,
    F_TRADE_INTENSITY,
    N_FEATURES_V1,
)
from shm.stats import StageStats
from stages.config import Config
from stages.wiring import Engine

DEPTH_LEVELS: Final = 10
INTENSITY_TAU_S: Final = 1.0


class FeatureState:
    """Per-symbol rolling state of the stateful features (numpy arrays the kernel updates)."""

    def __init__(self, *, n_symbols: int = schema.MAX_SYMBOLS, window: int = 1000) -> None:
        self.window = window
        self.returns = np.zeros((n_symbols, window))
        self.ret_idx = np.zeros(n_symbols, np.int64)
        self.ret_count = np.zeros(n_symbols, np.int64)
        self.since_resum = np.zeros(n_symbols, np.int64)
        self.sum_sq = np.zeros(n_symbols)
        self.last_mid = np.zeros(n_symbols)
        self.prev_top = np.zeros((n_symbols, 4))  # b, B, a, A of the previous book
        self.intensity = np.zeros(n_symbols)
        self.last_trade_ns = np.zeros(n_symbols, np.int64)
        self.mark_px = np.full(n_symbols, np.nan)  # latest venue mark price
        self.funding_rate = np.zeros(n_symbols)  # latest funding rate per interval


def update_marks(marks: np.ndarray, state: FeatureState) -> None:
    """Keep the latest mark price and funding rate of every symbol (last one wins)."""
    sids = marks["symbol_id"].astype(np.int64)
    ok = sids < len(state.mark_px)
    state.mark_px[sids[ok]] = marks["mark_px"][ok]
    state.funding_rate[sids[ok]] = marks["funding_rate"][ok]


@njit(cache=True, nogil=True)
def _update_trades(trades: np.ndarray, intensity: np.ndarray, last_trade_ns: np.ndarray) -> None:
    n_sym = intensity.shape[0]
    for i in range(trades.shape[0]):
        s = trades[i]["symbol_id"]
        if s >= n_sym:
            continue
        t = trades[i]["recv_ns"]
        dt_s = (t - last_trade_ns[s]) / 1e9 if last_trade_ns[s] else 0.0
        intensity[s] = (
            intensity[s] * math.exp(-max(dt_s, 0.0) / INTENSITY_TAU_S) + 1.0 / INTENSITY_TAU_S
        )
        last_trade_ns[s] = t


def update_trades(trades: np.ndarray, state: FeatureState) -> None:
    """Fold trades into the per-symbol intensity (decayed count, trades per second)."""
    _update_trades(trades, state.intensity, state.last_trade_ns)


@njit(cache=True, nogil=True)
def _compute(
    books: np.ndarray,
    out: np.ndarray,
    returns: np.ndarray,
    ret_idx: np.ndarray,
    ret_count: np.ndarray,
    since_resum: np.ndarray,
    sum_sq: np.ndarray,
    last_mid: np.ndarray,
    prev_top: np.ndarray,
    intensity: np.ndarray,
    last_trade_ns: np.ndarray,
) -> None:
    n_sym = last_mid.shape[0]
    window = returns.shape[1]
    nan = math.nan
    for i in range(books.shape[0]):
        bk = books[i]
        o = out[i]
        v = o["values"]
        s = bk["symbol_id"]
        o["symbol_id"] = s
        o["flags"] = bk["flags"]
        o["seq"] = bk["seq"]
        o["exch_ns"] = bk["exch_ns"]
        o["recv_ns"] = bk["recv_ns"]
        o["ingest_ns"] = bk["ingest_ns"]
        for k in range(v.shape[0]):
            v[k] = 0.0
        b = bk["bid_px"][0]
        a = bk["ask_px"][0]
        bq = bk["bid_sz"][0]
        aq = bk["ask_sz"][0]
        o["best_bid"] = b
        o["best_ask"] = a
        o["bid_sz"] = bq
        o["ask_sz"] = aq
        if bk["n_bid"] == 0 or bk["n_ask"] == 0 or s >= n_sym:
            o["mid"] = nan
            for k in range(N_FEATURES_V1):
                v[k] = nan
            continue
        mid = (b + a) * 0.5
        o["mid"] = mid
        top = bq + aq
        micro = (b * aq + a * bq) / top if top > 0 else nan
        v[F_SPREAD_BPS] = (a - b) / mid * 1e4
        v[F_MICROPRICE] = micro
        v[F_MICRO_DEV_BPS] = (micro - mid) / mid * 1e4
        v[F_OBI] = (bq - aq) / top if top > 0 else nan
        db = 0.0
        da = 0.0
        for j in range(DEPTH_LEVELS):
            db += bk["bid_sz"][j]
            da += bk["ask_sz"][j]
        v[F_DEPTH_IMB] = (db - da) / (db + da) if db + da > 0 else nan

        lm = last_mid[s]
        if lm > 0.0 and mid > 0.0:
            r = math.log(mid / lm)
            j = ret_idx[s]
            old = returns[s, j]
            returns[s, j] = r
            ret_idx[s] = (j + 1) % window
            if ret_count[s] < window:
                ret_count[s] += 1
            since_resum[s] += 1
            if since_resum[s] >= window:  # bound the float drift of the running sum
                acc = 0.0
                for k in range(window):
                    acc += returns[s, k] * returns[s, k]
                sum_sq[s] = acc
                since_resum[s] = 0
            else:
                sum_sq[s] += r * r - old * old
        last_mid[s] = mid
        cnt = ret_count[s]
        v[F_RVOL_BPS] = math.sqrt(max(sum_sq[s], 0.0) / cnt) * 1e4 if cnt else 0.0

        pb = prev_top[s, 0]
        if pb > 0.0:
            pbq = prev_top[s, 1]
            pa = prev_top[s, 2]
            paq = prev_top[s, 3]
            e_b = (bq if b >= pb else 0.0) - (pbq if b <= pb else 0.0)
            e_a = (aq if a <= pa else 0.0) - (paq if a >= pa else 0.0)
            v[F_OFI] = e_b - e_a
        prev_top[s, 0] = b
        prev_top[s, 1] = bq
        prev_top[s, 2] = a
        prev_top[s, 3] = aq

        lt = last_trade_ns[s]
        if lt:
            dt_s = max(bk["recv_ns"] - lt, 0) / 1e9
            v[F_TRADE_INTENSITY] = intensity[s] * math.exp(-dt_s / INTENSITY_TAU_S)


def compute_features(books: np.ndarray, state: FeatureState, out: np.ndarray) -> None:
    """Fill ``out[i]`` with the features of ``books[i]`` and advance ``state``."""
    _compute(
        books,
        out,
        state.returns,
        state.ret_idx,
        state.ret_count,
        state.since_resum,
        state.sum_sq,
        state.last_mid,
        state.prev_top,
        state.intensity,
        state.last_trade_ns,
    )


class FeatureAgent:
    """Compute features for every snapshot; the only writer of the features ring."""

    role = "feature"

    def __init__(self, cfg: Config, engine: Engine, stats: StageStats, *, batch: int = 64) -> None:
        self._md = engine.reader("md_book", "feature")
        self._tr = engine.reader("md_trade", "feature")
        self._mk = engine.reader("md_mark", "feature")
        self.readers: list[RingReader] = [self._md, self._tr, self._mk]
        self._marks = np.zeros(16, schema.MARK)
        self._out = engine.writer("features")
        self._books = np.zeros(batch, schema.BOOK)
        self._trades = np.zeros(batch * 4, schema.TRADE)
        self._fv = np.zeros(batch, schema.FEATURES)
        self.state = FeatureState(window=cfg.engine.feature_window_size)
        self._stats = stats
        warm = FeatureState(
            n_symbols=1, window=2
        )  # compile (or load) the kernels before the first tick
        compute_features(self._books[:1], warm, self._fv[:1])
        update_trades(self._trades[:1], warm)

    def do_work(self) -> int:
        nm = self._mk.read_into(self._marks)
        if nm:
            update_marks(self._marks[:nm], self.state)
        nt = self._tr.read_into(self._trades)
        if nt:
            update_trades(self._trades[:nt], self.state)
            self._stats.ints[schema.C_TRADES] += nt
        n = self._md.read_into(self._books)
        if n:
            t0 = time.monotonic_ns()
            fv = self._fv[:n]
            compute_features(self._books[:n], self.state, fv)
            t1 = time.monotonic_ns()
            fv["feature_ns"] = t1
            self._out.offer_array(fv)
            self._stats.record_batch(n, t0, t1, self._books["recv_ns"][:n].tolist())
        if nt or n:
            self._stats.ints[schema.C_DROPPED] = self._md.dropped + self._tr.dropped
        return n + nt + nm

    def on_close(self) -> None:
        pass
