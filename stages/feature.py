"""Feature stage: book, trade and mark records in, one feature vector per book snapshot out.

The seed's 13 features, per symbol (b/a best bid/ask price, B/A their sizes, mid = (b + a) / 2,
N = ``feature_window_size``; "the window" is the symbol's last N updates of that kind):

 1. order flow imbalance (Cont, Kukanov & Stoikov 2014). One update's flow at the touch is
    e = e_b - e_a, e_b = B*[b >= b'] - B'*[b <= b'], e_a = A*[a <= a'] - A'*[a >= a'] (primes:
    the symbol's previous book). With D = mean of (B + A) / 2 over the window's updates:
      ofi      = sum(e over the window) / D      (net flow, in top-of-book depths)
      ofi_tick = e / D                            (this update's flow)
    NaN on a symbol's first book (nothing to compare with).
 2. order book imbalance  obi = (B - A) / (B + A), in [-1, 1]
 3. microprice            microprice = (b * A + a * B) / (B + A)  (leans toward the thin side);
                          micro_dev_bps = (microprice - mid) / mid * 1e4
 4. spread                spread_bps = (a - b) / mid * 1e4
 5. depth imbalance       (sum B_1..10 - sum A_1..10) / (sum B_1..10 + sum A_1..10)
 6. realised volatility   rvol_bps = sqrt(mean(r^2)) * 1e4 over the window's mid log returns r
                          (0 before the first return)
 7. ATR                   mids are cut into 1 s bars by receive time; a bar's true range is
                          TR = max(high, prev_close) - min(low, prev_close) (high - low for the
                          first bar); atr_bps = mean(TR / close * 1e4) over the window's
                          completed bars; NaN before the first bar completes
 8. funding rate          funding_bps = rate * (8 h / the venue's funding interval) * 1e4, the
                          latest mark record's; NaN before one arrives (and where there is none)
 9. impact curve          walking one side of the book to level k costs notional
                          Q_k = sum_{j<=k} p_j s_j at average price Q_k / sum_{j<=k} s_j, an
                          impact I_k = |average - mid| / mid * 1e4 bps. Least squares of
                          ln I = ln A + beta * ln(Q / 100,000) over both sides' levels with
                          I > 0 gives impact_log_a = ln A (the impact of a 100k order, as a log)
                          and impact_beta; NaN with fewer than 3 points
10. VWAP ratio            vwap_ratio_bps = (mid / VWAP - 1) * 1e4, VWAP = sum(p s) / sum(s) over
                          the window's trades; NaN before the first trade
11. depth power law       level k lies d_k = |p_k - mid| / mid * 1e4 bps from the mid with
                          cumulative notional Q_k on its side; least squares of
                          ln Q = ln alpha + beta * ln d over both sides' levels with d > 0 gives
                          depth_log_alpha = ln alpha (notional within 1 bp, as a log) and
                          depth_beta; NaN with fewer than 3 points
12. trade intensity       trades per second, an exponentially decayed count (tau = 1 s):
                          sum over the symbol's trades of exp(-(t - t_k) / tau)
13. time                  from the venue's event time (UTC): tod = (t mod 1 day) / 1 day,
                          tod_sin/cos = sin/cos(2 pi tod); Monday = 0 day of week w,
                          dow_sin/cos = sin/cos(2 pi w / 7); NaN when the venue gives no time

Windowed sums are running sums, O(1) per update, re-summed exactly every N updates so float
drift stays bounded. A book with an empty side gives NaN everywhere and leaves the state as it
was, and so does a book whose mid is not a positive price; level counts past the record's
depth are cut to it. Time is the records' own (``recv_ns`` for bars and decay, ``exch_ns`` for time of day):
the kernel reads no clock, so ``hft export-features`` over a recording gives the numbers the
live stage would have given.

The kernels are compiled with numba: a batch of one costs about a microsecond, where the same
maths as numpy array operations cost ~50 us (each numpy call has ~1 us of overhead and a
pipeline that hands every tick on at once runs batches of one). ``cache=True`` keeps the
machine code in ``__pycache__`` so only the first start of a fresh checkout compiles.
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
    F_ATR_BPS,
    F_DEPTH_BETA,
    F_DEPTH_IMB,
    F_DEPTH_LOG_ALPHA,
    F_DOW_COS,
    F_DOW_SIN,
    F_FUNDING_BPS,
    F_IMPACT_BETA,
    F_IMPACT_LOG_A,
    F_MICRO_DEV_BPS,
    F_MICROPRICE,
    F_OBI,
    F_OFI,
    F_OFI_TICK,
    F_RVOL_BPS,
    F_SPREAD_BPS,
    F_TOD_COS,
    F_TOD_SIN,
    F_TRADE_INTENSITY,
    F_VWAP_RATIO_BPS,
    N_FEATURES,
)
from shm.stats import StageStats
from stages.config import Config
from stages.wiring import Engine

DEPTH_LEVELS: Final = 10
INTENSITY_TAU_S: Final = 1.0
BAR_NS: Final = 1_000_000_000
DAY_NS: Final = 86_400_000_000_000
IMPACT_REF_NOTIONAL: Final = 100_000.0
FUNDING_REF_S: Final = 8 * 3600
_FIT_POINTS: Final = 2 * schema.BOOK_DEPTH


class FeatureState:
    """Per-symbol rolling state of the stateful features (numpy arrays the kernels update)."""

    def __init__(self, *, n_symbols: int = schema.MAX_SYMBOLS, window: int = 1000) -> None:
        self.window = window
        n = n_symbols
        # realised volatility: the window's log returns and the sum of their squares
        self.returns = np.zeros((n, window))
        self.ret_idx = np.zeros(n, np.int64)
        self.ret_count = np.zeros(n, np.int64)
        self.since_resum = np.zeros(n, np.int64)
        self.sum_sq = np.zeros(n)
        self.last_mid = np.zeros(n)
        # order flow: the previous touch (b, B, a, A), the window's flows e and depths D
        self.prev_top = np.zeros((n, 4))
        self.ofi_e = _Window(n, window)
        self.ofi_d = _Window(n, window)
        # ATR: the open bar (id, high, low, close), the last close, the window's true ranges
        self.bar_id = np.full(n, -1, np.int64)
        self.bar_hlc = np.zeros((n, 3))
        self.prev_close = np.zeros(n)
        self.tr = _Window(n, window)
        # VWAP: the window's trades' p * s and s
        self.vw_pq = _Window(n, window)
        self.vw_q = _Window(n, window)
        self.intensity = np.zeros(n)
        self.last_trade_ns = np.zeros(n, np.int64)
        self.mark_px = np.full(n, np.nan)  # latest venue mark price
        self.funding_rate = np.zeros(n)  # latest funding rate per interval
        self.funding_bps = np.full(n, np.nan)  # the same per 8 h, in bps
        self.fit = np.zeros((4, _FIT_POINTS))  # scratch for the book fits


class _Window:
    """A ring of the last N values per symbol with their running sum."""

    def __init__(self, n_symbols: int, window: int) -> None:
        self.buf = np.zeros((n_symbols, window))
        self.idx = np.zeros(n_symbols, np.int64)
        self.count = np.zeros(n_symbols, np.int64)
        self.since = np.zeros(n_symbols, np.int64)
        self.total = np.zeros(n_symbols)


@njit(cache=True, nogil=True)
def _push(
    buf: np.ndarray,
    idx: np.ndarray,
    count: np.ndarray,
    since: np.ndarray,
    total: np.ndarray,
    s: int,
    x: float,
) -> None:
    window = buf.shape[1]
    j = idx[s]
    old = buf[s, j]  # 0 until the ring is full
    buf[s, j] = x
    idx[s] = (j + 1) % window
    if count[s] < window:
        count[s] += 1
    since[s] += 1
    if since[s] >= window:  # bound the float drift of the running sum
        acc = 0.0
        for k in range(window):
            acc += buf[s, k]
        total[s] = acc
        since[s] = 0
    else:
        total[s] += x - old


def update_marks(marks: np.ndarray, state: FeatureState) -> None:
    """Keep the latest mark price and funding rate of every symbol (last one wins)."""
    sids = marks["symbol_id"].astype(np.int64)
    ok = sids < len(state.mark_px)
    interval = marks["funding_interval_s"][ok].astype(np.float64)
    interval[interval <= 0] = FUNDING_REF_S
    rate = marks["funding_rate"][ok]
    state.mark_px[sids[ok]] = marks["mark_px"][ok]
    state.funding_rate[sids[ok]] = rate
    state.funding_bps[sids[ok]] = rate * (FUNDING_REF_S / interval) * 1e4


@njit(cache=True, nogil=True)
def _update_trades(
    trades: np.ndarray,
    intensity: np.ndarray,
    last_trade_ns: np.ndarray,
    pq_buf: np.ndarray,
    pq_idx: np.ndarray,
    pq_count: np.ndarray,
    pq_since: np.ndarray,
    pq_total: np.ndarray,
    q_buf: np.ndarray,
    q_idx: np.ndarray,
    q_count: np.ndarray,
    q_since: np.ndarray,
    q_total: np.ndarray,
) -> None:
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
        px = trades[i]["px"]
        sz = trades[i]["sz"]
        if px > 0.0 and sz > 0.0:
            _push(pq_buf, pq_idx, pq_count, pq_since, pq_total, s, px * sz)
            _push(q_buf, q_idx, q_count, q_since, q_total, s, sz)


def update_trades(trades: np.ndarray, state: FeatureState) -> None:
    """Fold trades into the per-symbol intensity and the VWAP window."""
    pq, q = state.vw_pq, state.vw_q
    _update_trades(
        trades,
        state.intensity,
        state.last_trade_ns,
        pq.buf,
        pq.idx,
        pq.count,
        pq.since,
        pq.total,
        q.buf,
        q.idx,
        q.count,
        q.since,
        q.total,
    )


@njit(cache=True, nogil=True)
def _fit(xs: np.ndarray, ys: np.ndarray, n: int) -> tuple[float, float]:
    """Least-squares intercept and slope of y on x over the first n points (two passes)."""
    if n < 3:
        return math.nan, math.nan
    mx = 0.0
    my = 0.0
    for k in range(n):
        mx += xs[k]
        my += ys[k]
    mx /= n
    my /= n
    sxx = 0.0
    sxy = 0.0
    for k in range(n):
        dx = xs[k] - mx
        sxx += dx * dx
        sxy += dx * (ys[k] - my)
    if sxx <= 0.0:
        return math.nan, math.nan
    slope = sxy / sxx
    return my - slope * mx, slope


@njit(cache=True, nogil=True)
def _book_fits(bk: np.void, mid: float, fit: np.ndarray, v: np.ndarray) -> None:
    """Impact curve and depth power law of one book (see the module docstring), in one pass
    over each side: ``fit`` rows 0-1 collect the impact points, rows 2-3 the depth points."""
    n_imp = 0
    n_dep = 0
    for side in range(2):
        if side == 0:
            px = bk["bid_px"]
            sz = bk["bid_sz"]
            n = min(bk["n_bid"], px.shape[0])  # a count past the record's depth is not trusted
        else:
            px = bk["ask_px"]
            sz = bk["ask_sz"]
            n = min(bk["n_ask"], px.shape[0])
        q = 0.0
        s_sum = 0.0
        for k in range(n):
            p = px[k]
            s = sz[k]
            if not (s > 0.0 and p > 0.0):
                continue
            q += p * s
            s_sum += s
            imp = abs(q / s_sum - mid) / mid * 1e4
            if imp > 0.0:
                fit[0, n_imp] = math.log(q / IMPACT_REF_NOTIONAL)
                fit[1, n_imp] = math.log(imp)
                n_imp += 1
            d = abs(p - mid) / mid * 1e4
            if d > 0.0:
                fit[2, n_dep] = math.log(d)
                fit[3, n_dep] = math.log(q)
                n_dep += 1
    a, b = _fit(fit[0], fit[1], n_imp)
    v[F_IMPACT_LOG_A] = a
    v[F_IMPACT_BETA] = b
    a, b = _fit(fit[2], fit[3], n_dep)
    v[F_DEPTH_LOG_ALPHA] = a
    v[F_DEPTH_BETA] = b


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
    e_buf: np.ndarray,
    e_idx: np.ndarray,
    e_count: np.ndarray,
    e_since: np.ndarray,
    e_total: np.ndarray,
    d_buf: np.ndarray,
    d_idx: np.ndarray,
    d_count: np.ndarray,
    d_since: np.ndarray,
    d_total: np.ndarray,
    bar_id: np.ndarray,
    bar_hlc: np.ndarray,
    prev_close: np.ndarray,
    tr_buf: np.ndarray,
    tr_idx: np.ndarray,
    tr_count: np.ndarray,
    tr_since: np.ndarray,
    tr_total: np.ndarray,
    vw_pq_total: np.ndarray,
    vw_q_total: np.ndarray,
    intensity: np.ndarray,
    last_trade_ns: np.ndarray,
    funding_bps: np.ndarray,
    fit: np.ndarray,
) -> None:
    n_sym = last_mid.shape[0]
    window = returns.shape[1]
    nan = math.nan
    two_pi = 2.0 * math.pi
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
        mid = (b + a) * 0.5
        if bk["n_bid"] == 0 or bk["n_ask"] == 0 or s >= n_sym or not mid > 0.0:
            o["mid"] = nan
            for k in range(N_FEATURES):
                v[k] = nan
            continue
        o["mid"] = mid
        top = bq + aq
        micro = (b * aq + a * bq) / top if top > 0 else nan
        v[F_SPREAD_BPS] = (a - b) / mid * 1e4
        v[F_MICROPRICE] = micro
        v[F_MICRO_DEV_BPS] = (micro - mid) / mid * 1e4
        v[F_OBI] = (bq - aq) / top if top > 0 else nan
        db = 0.0
        da = 0.0
        for j in range(min(bk["n_bid"], DEPTH_LEVELS)):
            db += bk["bid_sz"][j]
        for j in range(min(bk["n_ask"], DEPTH_LEVELS)):
            da += bk["ask_sz"][j]
        v[F_DEPTH_IMB] = (db - da) / (db + da) if db + da > 0 else nan

        # realised volatility
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

        # order flow imbalance
        pb = prev_top[s, 0]
        if pb > 0.0:
            pbq = prev_top[s, 1]
            pa = prev_top[s, 2]
            paq = prev_top[s, 3]
            e_b = (bq if b >= pb else 0.0) - (pbq if b <= pb else 0.0)
            e_a = (aq if a <= pa else 0.0) - (paq if a >= pa else 0.0)
            e = e_b - e_a
            _push(e_buf, e_idx, e_count, e_since, e_total, s, e)
            _push(d_buf, d_idx, d_count, d_since, d_total, s, top * 0.5)
            depth = d_total[s] / d_count[s]
            if depth > 0.0:
                v[F_OFI] = e_total[s] / depth
                v[F_OFI_TICK] = e / depth
            else:
                v[F_OFI] = nan
                v[F_OFI_TICK] = nan
        else:
            v[F_OFI] = nan
            v[F_OFI_TICK] = nan
        prev_top[s, 0] = b
        prev_top[s, 1] = bq
        prev_top[s, 2] = a
        prev_top[s, 3] = aq

        # ATR over 1 s bars of the mid
        t = bk["recv_ns"]
        bar = t // BAR_NS
        if bar_id[s] < 0:
            bar_id[s] = bar
            bar_hlc[s, 0] = mid
            bar_hlc[s, 1] = mid
            bar_hlc[s, 2] = mid
        elif bar != bar_id[s]:
            hi = bar_hlc[s, 0]
            lo = bar_hlc[s, 1]
            close = bar_hlc[s, 2]
            pc = prev_close[s]
            if pc > 0.0:
                hi = max(hi, pc)
                lo = min(lo, pc)
            _push(tr_buf, tr_idx, tr_count, tr_since, tr_total, s, (hi - lo) / close * 1e4)
            prev_close[s] = close
            bar_id[s] = bar
            bar_hlc[s, 0] = mid
            bar_hlc[s, 1] = mid
            bar_hlc[s, 2] = mid
        else:
            bar_hlc[s, 0] = max(bar_hlc[s, 0], mid)
            bar_hlc[s, 1] = min(bar_hlc[s, 1], mid)
            bar_hlc[s, 2] = mid
        v[F_ATR_BPS] = tr_total[s] / tr_count[s] if tr_count[s] else nan

        v[F_FUNDING_BPS] = funding_bps[s]

        vq = vw_q_total[s]
        v[F_VWAP_RATIO_BPS] = (mid * vq / vw_pq_total[s] - 1.0) * 1e4 if vq > 0.0 else nan

        _book_fits(bk, mid, fit, v)

        lt = last_trade_ns[s]
        if lt:
            dt_s = max(t - lt, 0) / 1e9
            v[F_TRADE_INTENSITY] = intensity[s] * math.exp(-dt_s / INTENSITY_TAU_S)

        et = bk["exch_ns"]
        if et > 0:
            tod = (et % DAY_NS) / DAY_NS
            dow = ((et // DAY_NS) + 3) % 7  # 1970-01-01 was a Thursday
            v[F_TOD_SIN] = math.sin(two_pi * tod)
            v[F_TOD_COS] = math.cos(two_pi * tod)
            v[F_DOW_SIN] = math.sin(two_pi * dow / 7.0)
            v[F_DOW_COS] = math.cos(two_pi * dow / 7.0)
        else:
            v[F_TOD_SIN] = nan
            v[F_TOD_COS] = nan
            v[F_DOW_SIN] = nan
            v[F_DOW_COS] = nan


def compute_features(books: np.ndarray, state: FeatureState, out: np.ndarray) -> None:
    """Fill ``out[i]`` with the features of ``books[i]`` and advance ``state``."""
    e, d, tr = state.ofi_e, state.ofi_d, state.tr
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
        e.buf,
        e.idx,
        e.count,
        e.since,
        e.total,
        d.buf,
        d.idx,
        d.count,
        d.since,
        d.total,
        state.bar_id,
        state.bar_hlc,
        state.prev_close,
        tr.buf,
        tr.idx,
        tr.count,
        tr.since,
        tr.total,
        state.vw_pq.total,
        state.vw_q.total,
        state.intensity,
        state.last_trade_ns,
        state.funding_bps,
        state.fit,
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
        # books first: every trade published before the last of these books is in its ring
        # by now, so one read of each gives a prefix of ingest's publish order
        n = self._md.read_into(self._books)
        nt = self._tr.read_into(self._trades)
        if n:
            t0 = time.monotonic_ns()
            fv = self._fv[:n]
            if nt:
                self._interleave(n, nt, fv)
            else:
                compute_features(self._books[:n], self.state, fv)
            t1 = time.monotonic_ns()
            fv["feature_ns"] = t1
            self._out.offer_array(fv)
            self._stats.record_batch(n, t0, t1, self._books["recv_ns"][:n].tolist())
        elif nt:
            update_trades(self._trades[:nt], self.state)
        if nt:
            self._stats.ints[schema.C_TRADES] += nt
        if nt or n:
            self._stats.ints[schema.C_DROPPED] = self._md.dropped + self._tr.dropped
        return n + nt + nm

    def _interleave(self, n: int, nt: int, fv: np.ndarray) -> None:
        """Fold each trade in before the first book ingest published after it.

        The order ``hft export-features`` replays in, so a live vector equals the exported
        one: folding a poll's trades in before all of its books would give a book the trades
        that came after it (trade intensity and VWAP).
        """
        books, trades, st = self._books, self._trades, self.state
        cut = np.searchsorted(trades["ingest_ns"][:nt], books["ingest_ns"][:n], side="left")
        start = done = 0
        for i in range(n):
            c = int(cut[i])
            if c > done:
                if i > start:
                    compute_features(books[start:i], st, fv[start:i])
                update_trades(trades[done:c], st)
                done, start = c, i
        compute_features(books[start:n], st, fv[start:n])
        if nt > done:
            update_trades(trades[done:nt], st)

    def on_close(self) -> None:
        pass
