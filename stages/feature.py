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

The vectorisable parts run over the whole batch in numpy; the parts that carry state from one
update to the next (returns, OFI, trade intensity) loop per record over plain floats. Time is
the records' own ``recv_ns``: the kernel reads no clock, so a backtest gives the same numbers.
"""

from __future__ import annotations

import math
import time
from typing import Final

import numpy as np

from shm import schema
from shm.ring import RingReader
from shm.stats import StageStats
from stages.config import Config
from stages.wiring import Engine

DEPTH_LEVELS: Final = 10
INTENSITY_TAU_S: Final = 1.0


class FeatureState:
    """Per-symbol rolling state of the stateful features."""

    def __init__(self, *, n_symbols: int = schema.MAX_SYMBOLS, window: int = 1000) -> None:
        self.window = window
        self.returns = np.zeros((n_symbols, window))
        self.ret_idx = [0] * n_symbols
        self.ret_count = [0] * n_symbols
        self.sum_sq = [0.0] * n_symbols
        self.last_mid = [0.0] * n_symbols
        self.prev_top = [(0.0, 0.0, 0.0, 0.0)] * n_symbols  # b, B, a, A
        self.intensity = [0.0] * n_symbols
        self.last_trade_ns = [0] * n_symbols
        self.updates_since_resum = [0] * n_symbols


def update_trades(trades: np.ndarray, state: FeatureState) -> None:
    """Fold trades into the per-symbol intensity (decayed count, trades per second)."""
    syms = trades["symbol_id"].tolist()
    ts = trades["recv_ns"].tolist()
    inten, last = state.intensity, state.last_trade_ns
    for s, t in zip(syms, ts, strict=True):
        if s >= len(inten):
            continue
        dt_s = (t - last[s]) / 1e9 if last[s] else 0.0
        inten[s] = inten[s] * math.exp(-max(dt_s, 0.0) / INTENSITY_TAU_S) + 1.0 / INTENSITY_TAU_S
        last[s] = t


def compute_features(books: np.ndarray, state: FeatureState, out: np.ndarray) -> None:
    """Fill ``out[i]`` with the features of ``books[i]`` and advance ``state``."""
    n = len(books)
    bid_px, ask_px = books["bid_px"], books["ask_px"]
    bid_sz, ask_sz = books["bid_sz"], books["ask_sz"]
    b, a = bid_px[:, 0], ask_px[:, 0]
    bq, aq = bid_sz[:, 0], ask_sz[:, 0]
    vals = out["values"]
    with np.errstate(divide="ignore", invalid="ignore"):
        mid = (b + a) * 0.5
        top = bq + aq
        micro = (b * aq + a * bq) / top
        vals[:, schema.F_SPREAD_BPS] = (a - b) / mid * 1e4
        vals[:, schema.F_MICROPRICE] = micro
        vals[:, schema.F_MICRO_DEV_BPS] = (micro - mid) / mid * 1e4
        vals[:, schema.F_OBI] = (bq - aq) / top
        db = bid_sz[:, :DEPTH_LEVELS].sum(axis=1)
        da = ask_sz[:, :DEPTH_LEVELS].sum(axis=1)
        vals[:, schema.F_DEPTH_IMB] = (db - da) / (db + da)
    empty = (books["n_bid"] == 0) | (books["n_ask"] == 0)
    if empty.any():
        vals[empty, : schema.N_FEATURES_V1] = np.nan
        mid[empty] = np.nan

    out["symbol_id"] = books["symbol_id"]
    out["flags"] = books["flags"]
    out["seq"] = books["seq"]
    out["exch_ns"] = books["exch_ns"]
    out["recv_ns"] = books["recv_ns"]
    out["ingest_ns"] = books["ingest_ns"]
    out["mid"] = mid
    out["best_bid"] = b
    out["best_ask"] = a
    out["bid_sz"] = bq
    out["ask_sz"] = aq

    # stateful features, record by record
    syms = books["symbol_id"].tolist()
    mids = mid.tolist()
    tops = zip(b.tolist(), bq.tolist(), a.tolist(), aq.tolist(), strict=True)
    recv = books["recv_ns"].tolist()
    rvol = [0.0] * n
    ofi = [0.0] * n
    inten = [0.0] * n
    window = state.window
    rets = state.returns
    for i, (top_now, s, m, t) in enumerate(zip(tops, syms, mids, recv, strict=True)):
        if s >= len(state.last_mid) or m != m:  # NaN mid: empty side
            rvol[i] = ofi[i] = inten[i] = math.nan
            continue
        lm = state.last_mid[s]
        if lm > 0.0 and m > 0.0:
            r = math.log(m / lm)
            j = state.ret_idx[s]
            old = float(rets[s, j])
            rets[s, j] = r
            state.ret_idx[s] = (j + 1) % window
            if state.ret_count[s] < window:
                state.ret_count[s] += 1
            state.updates_since_resum[s] += 1
            if state.updates_since_resum[s] >= window:  # bound float drift of the running sum
                state.sum_sq[s] = float(np.dot(rets[s], rets[s]))
                state.updates_since_resum[s] = 0
            else:
                state.sum_sq[s] += r * r - old * old
        state.last_mid[s] = m
        cnt = state.ret_count[s]
        rvol[i] = math.sqrt(max(state.sum_sq[s], 0.0) / cnt) * 1e4 if cnt else 0.0

        pb, pbq, pa, paq = state.prev_top[s]
        nb, nbq, na, naq = top_now
        if pb > 0.0:
            e_b = (nbq if nb >= pb else 0.0) - (pbq if nb <= pb else 0.0)
            e_a = (naq if na <= pa else 0.0) - (paq if na >= pa else 0.0)
            ofi[i] = e_b - e_a
        state.prev_top[s] = top_now

        lt = state.last_trade_ns[s]
        if lt:
            dt_s = max(t - lt, 0) / 1e9
            inten[i] = state.intensity[s] * math.exp(-dt_s / INTENSITY_TAU_S)
    vals[:, schema.F_RVOL_BPS] = rvol
    vals[:, schema.F_OFI] = ofi
    vals[:, schema.F_TRADE_INTENSITY] = inten


class FeatureAgent:
    """Compute features for every snapshot; the only writer of the features ring."""

    role = "feature"

    def __init__(self, cfg: Config, engine: Engine, stats: StageStats, *, batch: int = 64) -> None:
        self._md = engine.reader("md_book", "feature")
        self._tr = engine.reader("md_trade", "feature")
        self.readers: list[RingReader] = [self._md, self._tr]
        self._out = engine.writer("features")
        self._books = np.zeros(batch, schema.BOOK)
        self._trades = np.zeros(batch * 4, schema.TRADE)
        self._fv = np.zeros(batch, schema.FEATURES)
        self.state = FeatureState(window=cfg.engine.feature_window_size)
        self._stats = stats

    def do_work(self) -> int:
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
            st = self._stats
            ints = st.ints
            ints[schema.C_PROCESSED] += n
            ints[schema.C_PUBLISHED] += n
            ints[schema.C_BATCHES] += 1
            st.record_ns(schema.H_DURATION, (t1 - t0) // n, n)
            for recv in self._books["recv_ns"][:n].tolist():
                st.record_ns(schema.H_E2E, t1 - recv)
        if nt or n:
            self._stats.ints[schema.C_DROPPED] = self._md.dropped + self._tr.dropped
        return n + nt

    def on_close(self) -> None:
        pass
