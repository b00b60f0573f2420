"""The rule-based fallback signal against its docstring formula, on feature vectors and books."""

from __future__ import annotations

import math

import numpy as np
import pytest

from shm import schema
from stages.config import GateConfig, RiskConfig, RouteConfig, SignalConfig
from stages.feature import FeatureState, compute_features
from stages.inference import fallback_signals
from stages.route import Router, SymbolSpec
from tests.books import make_book

Levels = list[tuple[float, float]]


def features_of(*books: np.ndarray) -> np.ndarray:
    b = np.concatenate(books)
    fv = np.zeros(len(b), schema.FEATURES)
    compute_features(b, FeatureState(n_symbols=1, window=100), fv)
    return fv


def signals(fv: np.ndarray, cfg: SignalConfig | None = None) -> np.ndarray:
    out = np.zeros(len(fv), schema.SIGNAL)
    fallback_signals(fv, cfg or SignalConfig(), out)
    return out


def ref_signal(vals: list[float], flags: int, cfg: SignalConfig) -> dict[str, float | int]:
    """The docstring's formula over Python floats."""
    spread = vals[schema.F_SPREAD_BPS]
    dev = vals[schema.F_MICRO_DEV_BPS]
    obi = vals[schema.F_OBI]
    depth = vals[schema.F_DEPTH_IMB]
    rvol = vals[schema.F_RVOL_BPS]
    untradeable = bool(flags & (schema.BOOK_STALE | schema.BOOK_CROSSED))
    if any(math.isnan(x) for x in (spread, dev, obi, depth)):
        return {"edge": 0.0, "conf": 0.0, "urg": 0.0, "dir": 0, "untradeable": True}
    half_spread = max(spread / 2, 1e-9)
    score = (
        cfg.obi_weight * obi
        + cfg.depth_weight * depth
        + cfg.micro_weight * math.tanh(2 * dev / half_spread)
    )
    wsum = cfg.obi_weight + cfg.depth_weight + cfg.micro_weight
    conf = min(1.0, abs(score) / wsum) if wsum > 0 else 0.0
    if math.isnan(rvol):
        urg = 0.0
    else:
        vol_term = min(1.0, rvol / max(spread, 1e-9))
        urg = min(1.0, max(0.0, 2 * (conf - 0.5) + 0.25 * vol_term))
    direction = (score > 0) - (score < 0)
    return {
        "edge": cfg.edge_scale_bps * score,
        "conf": conf,
        "urg": urg,
        "dir": direction,
        "untradeable": untradeable,
    }


def gate_passes(sig: np.void) -> bool:
    """Does the route stage's default gate let this signal through to an order?"""
    router = Router(
        gate=GateConfig(),
        route=RouteConfig(),
        risk=RiskConfig(),
        specs={0: SymbolSpec(tick=0.01, lot=1e-6, min_notional=0.0)},
        next_order_id=1,
    )
    order = router.on_signal(
        symbol_id=0,
        flags=int(sig["flags"]),
        edge_bps=float(sig["edge_bps"]),
        confidence=float(sig["confidence"]),
        urgency=float(sig["urgency"]),
        mid=float(sig["mid"]),
        best_bid=float(sig["best_bid"]),
        best_ask=float(sig["best_ask"]),
        spread_bps=float(sig["spread_bps"]),
        halted=False,
        now_ns=0,
    )
    return order is not None


def random_features(rng: np.random.Generator, n: int) -> np.ndarray:
    fv = np.zeros(n, schema.FEATURES)
    v = fv["values"]
    v[:, schema.F_SPREAD_BPS] = rng.uniform(0.05, 30.0, n)
    v[:, schema.F_MICRO_DEV_BPS] = rng.uniform(-1, 1, n) * v[:, schema.F_SPREAD_BPS] / 2
    v[:, schema.F_OBI] = rng.uniform(-1, 1, n)
    v[:, schema.F_DEPTH_IMB] = rng.uniform(-1, 1, n)
    v[:, schema.F_RVOL_BPS] = rng.exponential(3.0, n)
    v[:, schema.F_OFI] = rng.normal(0, 5, n)
    fv["symbol_id"] = rng.integers(0, 8, n)
    fv["flags"] = rng.choice(
        [schema.BOOK_SNAPSHOT, schema.BOOK_STALE, schema.BOOK_CROSSED, schema.BOOK_RESYNCED], n
    )
    fv["seq"] = rng.integers(0, 1 << 40, n)
    fv["exch_ns"] = rng.integers(0, 1 << 60, n)
    fv["recv_ns"] = rng.integers(0, 1 << 60, n)
    fv["ingest_ns"] = rng.integers(0, 1 << 60, n)
    fv["feature_ns"] = rng.integers(0, 1 << 60, n)
    fv["mid"] = rng.uniform(1, 1e5, n)
    fv["best_bid"] = fv["mid"] * 0.9999
    fv["best_ask"] = fv["mid"] * 1.0001
    return fv


@pytest.mark.parametrize(
    "cfg",
    [
        SignalConfig(),
        SignalConfig(edge_scale_bps=20.0, obi_weight=1.0, depth_weight=0.0, micro_weight=0.5),
        SignalConfig(obi_weight=0.0, depth_weight=0.0, micro_weight=0.0),
    ],
    ids=["default", "custom", "zero-weights"],
)
def test_fallback_matches_reference_formula(cfg: SignalConfig) -> None:
    rng = np.random.default_rng(17)
    fv = random_features(rng, 400)
    sig = signals(fv, cfg)
    for i in range(len(fv)):
        ref = ref_signal(fv[i]["values"].tolist(), int(fv[i]["flags"]), cfg)
        s = sig[i]
        assert s["edge_bps"] == pytest.approx(ref["edge"], rel=1e-12, abs=1e-12), i
        assert s["confidence"] == pytest.approx(ref["conf"], rel=1e-12, abs=1e-12), i
        assert s["urgency"] == pytest.approx(ref["urg"], rel=1e-12, abs=1e-12), i
        assert s["direction"] == ref["dir"], i
        assert s["flags"] & schema.SIG_FALLBACK
        assert bool(s["flags"] & schema.SIG_UNTRADEABLE) == ref["untradeable"], i
        assert 0.0 <= s["confidence"] <= 1.0 and 0.0 <= s["urgency"] <= 1.0
    # pass-through fields
    for name in ("symbol_id", "seq", "exch_ns", "recv_ns", "ingest_ns", "feature_ns", "mid"):
        assert np.array_equal(sig[name], fv[name]), name
    assert np.array_equal(sig["best_bid"], fv["best_bid"])
    assert np.array_equal(sig["best_ask"], fv["best_ask"])
    assert np.array_equal(sig["book_flags"], fv["flags"])
    assert np.array_equal(sig["spread_bps"], fv["values"][:, schema.F_SPREAD_BPS])
    assert (sig["inference_ns"] == 0).all()  # the agent stamps it


def test_confidence_saturates_and_urgency_is_clipped() -> None:
    fv = np.zeros(2, schema.FEATURES)
    v = fv["values"]
    v[:, schema.F_SPREAD_BPS] = 2.0
    v[:, schema.F_OBI] = [1.0, -1.0]
    v[:, schema.F_DEPTH_IMB] = [1.0, -1.0]
    v[:, schema.F_MICRO_DEV_BPS] = [1.0, -1.0]  # tanh(2) < 1: score just below the weights' sum
    v[:, schema.F_RVOL_BPS] = 100.0  # vol term capped at 1
    cfg = SignalConfig()
    sig = signals(fv, cfg)
    wsum = cfg.obi_weight + cfg.depth_weight + cfg.micro_weight
    score = cfg.obi_weight + cfg.depth_weight + cfg.micro_weight * math.tanh(2.0)
    assert sig["edge_bps"].tolist() == pytest.approx([12.0 * score, -12.0 * score], rel=1e-12)
    assert sig["confidence"].tolist() == pytest.approx([score / wsum] * 2, rel=1e-12)
    assert sig["urgency"].tolist() == [1.0, 1.0]
    assert sig["direction"].tolist() == [1, -1]


def test_balanced_book_gives_no_edge_and_fails_the_default_gate() -> None:
    bids = [(100.0 - 0.05 * i, 2.0 + i) for i in range(10)]
    asks = [(100.05 + 0.05 * i, 2.0 + i) for i in range(10)]
    sig = signals(features_of(make_book(bids, asks)))[0]
    assert abs(sig["edge_bps"]) < 1e-9
    assert sig["confidence"] < 1e-9
    assert sig["direction"] == 0
    assert not sig["flags"] & schema.SIG_UNTRADEABLE
    gate = GateConfig()
    assert abs(sig["edge_bps"]) < gate.min_edge_bps and sig["confidence"] < gate.min_confidence
    assert not gate_passes(sig)


@pytest.mark.parametrize("side", [1, -1], ids=["bid-heavy", "ask-heavy"])
def test_lopsided_book_gives_edge_of_the_right_sign(side: int) -> None:
    heavy, light = 6.0, 1.0
    bid_sz, ask_sz = (heavy, light) if side > 0 else (light, heavy)
    bids = [(100.0 - 0.05 * i, bid_sz) for i in range(10)]
    asks = [(100.05 + 0.05 * i, ask_sz) for i in range(10)]
    fv = features_of(make_book(bids, asks))
    sig = signals(fv)[0]
    assert np.sign(sig["edge_bps"]) == side
    assert sig["direction"] == side
    ref = ref_signal(fv[0]["values"].tolist(), int(fv[0]["flags"]), SignalConfig())
    assert sig["edge_bps"] == pytest.approx(ref["edge"], rel=1e-12)
    # strong enough to trade through the default gate
    assert abs(sig["edge_bps"]) >= GateConfig().min_edge_bps
    assert sig["confidence"] >= GateConfig().min_confidence
    assert gate_passes(sig)


@pytest.mark.parametrize(
    ("flags", "untradeable"),
    [
        (schema.BOOK_SNAPSHOT, False),
        (schema.BOOK_SNAPSHOT | schema.BOOK_RESYNCED, False),
        (schema.BOOK_STALE, True),
        (schema.BOOK_CROSSED, True),
        (schema.BOOK_STALE | schema.BOOK_CROSSED | schema.BOOK_SNAPSHOT, True),
    ],
)
def test_stale_or_crossed_book_flags_the_signal_untradeable(flags: int, untradeable: bool) -> None:
    bids = [(100.0 - 0.05 * i, 6.0) for i in range(10)]
    asks = [(100.05 + 0.05 * i, 1.0) for i in range(10)]
    sig = signals(features_of(make_book(bids, asks, flags=flags)))[0]
    assert bool(sig["flags"] & schema.SIG_UNTRADEABLE) == untradeable
    assert sig["flags"] & schema.SIG_FALLBACK
    assert sig["book_flags"] == flags
    assert sig["edge_bps"] > 0  # still emitted, with its edge: the route stage counts it
    assert gate_passes(sig) == (not untradeable)


@pytest.mark.parametrize(
    ("bids", "asks"),
    [([(100.0, 1.0)], []), ([], [(100.1, 1.0)]), ([], [])],
    ids=["no-asks", "no-bids", "empty"],
)
def test_nan_features_give_zero_confidence_and_untradeable(bids: Levels, asks: Levels) -> None:
    good = make_book([(100.0, 5.0)], [(100.05, 1.0)])
    fv = features_of(good, make_book(bids, asks))
    assert np.isnan(fv[1]["values"][: schema.N_FEATURES_V1]).all()
    sig = signals(fv)
    s = sig[1]
    assert s["confidence"] == 0.0 and s["urgency"] == 0.0 and s["edge_bps"] == 0.0
    assert s["direction"] == 0
    assert s["flags"] & schema.SIG_UNTRADEABLE and s["flags"] & schema.SIG_FALLBACK
    assert not gate_passes(s)
    # its neighbour in the batch is unaffected
    assert not sig[0]["flags"] & schema.SIG_UNTRADEABLE and sig[0]["edge_bps"] > 0


def test_nan_rvol_alone_zeroes_urgency_only() -> None:
    fv = np.zeros(1, schema.FEATURES)
    v = fv["values"]
    v[0, schema.F_SPREAD_BPS] = 2.0
    v[0, schema.F_OBI] = 0.8
    v[0, schema.F_DEPTH_IMB] = 0.6
    v[0, schema.F_RVOL_BPS] = math.nan
    sig = signals(fv)[0]
    assert sig["urgency"] == 0.0
    assert sig["edge_bps"] == pytest.approx(12.0 * (0.5 * 0.8 + 0.3 * 0.6), rel=1e-12)
    assert not sig["flags"] & schema.SIG_UNTRADEABLE
