"""The feature stage's formulas written the slow and obvious way, for tests to compare against.

Every feature is recomputed from the full history (plain lists, ``math.fsum``,
``statistics.linear_regression``, ``datetime``), never from running sums, so a bug in the
kernel's incremental bookkeeping cannot hide in the reference.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from datetime import UTC, datetime

import numpy as np

from shm import schema

SEC = 1_000_000_000
Levels = list[tuple[float, float]]
NAMES = schema.FEATURE_NAMES


def levels_of(rec: np.void | np.ndarray) -> tuple[Levels, Levels]:
    rec = np.asarray(rec).reshape(())
    nb, na = int(rec["n_bid"]), int(rec["n_ask"])
    bids = [(float(rec["bid_px"][i]), float(rec["bid_sz"][i])) for i in range(nb)]
    asks = [(float(rec["ask_px"][i]), float(rec["ask_sz"][i])) for i in range(na)]
    return bids, asks


def _regression(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(intercept, slope) of the least-squares line, NaN with fewer than 3 points."""
    if len(points) < 3 or len({x for x, _ in points}) < 2:
        return math.nan, math.nan
    fit = statistics.linear_regression([x for x, _ in points], [y for _, y in points])
    return fit.intercept, fit.slope


def impact_fit(bids: Levels, asks: Levels, mid: float) -> tuple[float, float]:
    points = []
    for side in (bids, asks):
        for k in range(1, len(side) + 1):
            lv = side[:k]
            notional = math.fsum(p * s for p, s in lv)
            avg = notional / math.fsum(s for _, s in lv)
            impact = abs(avg - mid) / mid * 1e4
            if impact > 0:
                points.append((math.log(notional / 100_000.0), math.log(impact)))
    return _regression(points)


def depth_fit(bids: Levels, asks: Levels, mid: float) -> tuple[float, float]:
    points = []
    for side in (bids, asks):
        for k in range(1, len(side) + 1):
            p = side[k - 1][0]
            d = abs(p - mid) / mid * 1e4
            if d > 0:
                notional = math.fsum(px * s for px, s in side[:k])
                points.append((math.log(d), math.log(notional)))
    return _regression(points)


class RefFeatures:
    """One symbol-keyed history per feature; ``book`` returns every feature by name."""

    def __init__(self, window: int) -> None:
        self.window = window
        self.mids: dict[int, list[float]] = defaultdict(list)
        self.prev: dict[int, tuple[float, float, float, float]] = {}
        self.flows: dict[int, list[tuple[float, float]]] = defaultdict(list)  # (e, depth)
        self.bar_mids: dict[int, list[tuple[int, float]]] = defaultdict(list)  # (bar, mid)
        self.trades: dict[int, list[tuple[int, float, float]]] = defaultdict(list)
        self.funding_bps: dict[int, float] = {}

    def trade(self, sym: int, t: int, px: float = 100.0, sz: float = 1.0) -> None:
        self.trades[sym].append((t, px, sz))

    def mark(self, sym: int, rate: float, interval_s: int) -> None:
        hours = (interval_s or 8 * 3600) / 3600
        self.funding_bps[sym] = rate * (8 / hours) * 1e4

    def book(
        self, sym: int, bids: Levels, asks: Levels, t: int, exch_ns: int | None = None
    ) -> tuple[dict[str, float], float]:
        """Return ({name: value}, mid) and advance the state."""
        exch_ns = t + 7 if exch_ns is None else exch_ns  # tests.books.make_book's convention
        if not bids or not asks:
            return dict.fromkeys(NAMES, math.nan), math.nan
        (b, bq), (a, aq) = bids[0], asks[0]
        mid = (b + a) / 2
        micro = (b * aq + a * bq) / (bq + aq)
        db = math.fsum(sz for _, sz in bids[:10])
        da = math.fsum(sz for _, sz in asks[:10])
        f: dict[str, float] = {
            "spread_bps": (a - b) / mid * 1e4,
            "microprice": micro,
            "micro_dev_bps": (micro - mid) / mid * 1e4,
            "obi": (bq - aq) / (bq + aq),
            "depth_imbalance": (db - da) / (db + da),
        }

        mids = self.mids[sym]
        mids.append(mid)
        rets = [math.log(mids[k] / mids[k - 1]) for k in range(1, len(mids))][-self.window :]
        f["rvol_bps"] = math.sqrt(math.fsum(r * r for r in rets) / len(rets)) * 1e4 if rets else 0.0

        if sym in self.prev:
            pb, pbq, pa, paq = self.prev[sym]
            # Cont, Kukanov & Stoikov (2014), case by case
            if b > pb:
                e_b = bq
            elif b == pb:
                e_b = bq - pbq
            else:
                e_b = -pbq
            if a < pa:
                e_a = aq
            elif a == pa:
                e_a = aq - paq
            else:
                e_a = -paq
            self.flows[sym].append((e_b - e_a, (bq + aq) / 2))
            last = self.flows[sym][-self.window :]
            depth = math.fsum(d for _, d in last) / len(last)
            f["ofi"] = math.fsum(e for e, _ in last) / depth
            f["ofi_tick"] = last[-1][0] / depth
        else:
            f["ofi"] = f["ofi_tick"] = math.nan
        self.prev[sym] = (b, bq, a, aq)

        # trade intensity: every trade so far, decayed
        f["trade_intensity"] = math.fsum(
            math.exp(-max(t - tk, 0) / SEC) for tk, _, _ in self.trades[sym]
        )

        # ATR: group the mids by second; the open bar is the last group
        self.bar_mids[sym].append((t // SEC, mid))
        bars: list[list[float]] = []
        last_bar = None
        for bar, m in self.bar_mids[sym]:
            if bar != last_bar:
                bars.append([])
                last_bar = bar
            bars[-1].append(m)
        done = bars[:-1]
        trs = []
        for k, bm in enumerate(done):
            hi, lo, close = max(bm), min(bm), bm[-1]
            if k:
                pc = done[k - 1][-1]
                hi, lo = max(hi, pc), min(lo, pc)
            trs.append((hi - lo) / close * 1e4)
        trs = trs[-self.window :]
        f["atr_bps"] = math.fsum(trs) / len(trs) if trs else math.nan

        f["funding_bps"] = self.funding_bps.get(sym, math.nan)

        window_trades = [(p, s) for _, p, s in self.trades[sym] if p > 0 and s > 0]
        window_trades = window_trades[-self.window :]
        if window_trades:
            vwap = math.fsum(p * s for p, s in window_trades) / math.fsum(
                s for _, s in window_trades
            )
            f["vwap_ratio_bps"] = (mid / vwap - 1) * 1e4
        else:
            f["vwap_ratio_bps"] = math.nan

        f["impact_log_a"], f["impact_beta"] = impact_fit(bids, asks, mid)
        f["depth_log_alpha"], f["depth_beta"] = depth_fit(bids, asks, mid)

        if exch_ns > 0:
            dt = datetime.fromtimestamp(exch_ns // SEC, UTC)
            secs = dt.hour * 3600 + dt.minute * 60 + dt.second + (exch_ns % SEC) / SEC
            tod = secs / 86_400
            dow = dt.weekday()
            f["tod_sin"], f["tod_cos"] = math.sin(2 * math.pi * tod), math.cos(2 * math.pi * tod)
            f["dow_sin"] = math.sin(2 * math.pi * dow / 7)
            f["dow_cos"] = math.cos(2 * math.pi * dow / 7)
        else:
            f["tod_sin"] = f["tod_cos"] = f["dow_sin"] = f["dow_cos"] = math.nan
        assert set(f) == set(NAMES)
        return f, mid


# absolute tolerance floors: sums that can cancel to ~0 (flow, returns) and fits on a
# handful of points carry float noise of the inputs' scale, not of the result's
ABS_TOL: dict[str, float] = {
    "ofi": 1e-7,
    "ofi_tick": 1e-9,
    "rvol_bps": 1e-7,
    "atr_bps": 1e-7,
    "vwap_ratio_bps": 1e-6,
    "impact_log_a": 1e-8,
    "impact_beta": 1e-8,
    "depth_log_alpha": 1e-8,
    "depth_beta": 1e-8,
}


def assert_features(
    row: np.void, expected: dict[str, float], mid: float, *, ctx: object = "", rel: float = 1e-9
) -> None:
    got = row["values"]
    for k, name in enumerate(NAMES):
        g, e = float(got[k]), expected[name]
        if math.isnan(e):
            assert math.isnan(g), (ctx, name, g)
        else:
            tol = ABS_TOL.get(name, 1e-9)
            assert math.isclose(g, e, rel_tol=rel, abs_tol=tol), (ctx, name, g, e)
    if math.isnan(mid):
        assert math.isnan(float(row["mid"]))
    else:
        assert math.isclose(float(row["mid"]), mid, rel_tol=1e-15), (ctx, "mid")
