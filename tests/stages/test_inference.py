"""The rule-based fallback signal against its docstring formula, on feature vectors and books;
and the inference agent over real rings: no model is the fallback, models give the ensemble,
a deadline missed by every model falls back, a changed model file is picked up live."""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from ops import monitor
from shm import schema, segment
from stages import config
from stages.config import GateConfig, RiskConfig, RouteConfig, SignalConfig
from stages.feature import FeatureState, compute_features
from stages.inference import InferenceAgent, fallback_signals
from stages.route import Router, SymbolSpec
from stages.wiring import Engine
from tests.books import make_book
from tests.stages.test_models import (
    B_EDGE,
    HIGH,
    W_EDGE,
    logistic_onnx,
    ref_scale,
    sidecar,
    sigmoid,
    slow_onnx,
    write_model,
)

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


def random_features(rng: np.random.Generator, n: int, *, in_domain: bool = False) -> np.ndarray:
    """Random feature vectors; ``in_domain``: inside the range of the test models' scaler
    (``tests.stages.test_models``), so no model leaves a tick out."""
    fv = np.zeros(n, schema.FEATURES)
    v = fv["values"]
    v[:, schema.F_SPREAD_BPS] = rng.uniform(0.05, 0.99 * HIGH[0] if in_domain else 30.0, n)
    v[:, schema.F_MICRO_DEV_BPS] = rng.uniform(-1, 1, n) * v[:, schema.F_SPREAD_BPS] / 2
    v[:, schema.F_OBI] = rng.uniform(-1, 1, n)
    v[:, schema.F_DEPTH_IMB] = rng.uniform(-1, 1, n)
    if in_domain:
        v[:, schema.F_RVOL_BPS] = rng.uniform(0.0, 0.99 * HIGH[3], n)
    else:
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
    assert np.isnan(fv[1]["values"][: schema.N_FEATURES]).all()
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


# ---------------------------------------------------------------- the agent over real rings
@pytest.fixture
def eng() -> Iterator[Engine]:
    ns = f"t{uuid.uuid4().hex[:10]}"
    e = Engine.create(config.from_dict({"engine": {"namespace": ns}}))
    yield e
    segment.unlink_all(ns)


def agent_for(eng: Engine, models_dir: Path, *, timeout_ms: float = 1000.0) -> InferenceAgent:
    cfg = config.from_dict(
        {
            "engine": {"namespace": eng.namespace, "inference_timeout_ms": timeout_ms},
            "inference": {"models_dir": str(models_dir), "reload_check_ms": 20.0},
        }
    )
    return InferenceAgent(cfg, eng, eng.stage_stats("inference"), batch=16)


def through(eng: Engine, agent: InferenceAgent, fv: np.ndarray) -> np.ndarray:
    """Publish feature vectors, let the agent work, return the signals it published."""
    assert eng.writer("features").offer_array(fv)
    handled = 0
    while handled < len(fv):
        n = agent.do_work()
        assert n > 0
        handled += n
    reader = eng.reader("signals", "route")
    out = np.zeros(64, schema.SIGNAL)
    got = reader.read_into(out)
    return out[:got]


def counter(eng: Engine, slot: int) -> int:
    return int(eng.stats_all[schema.ROLE_INDEX["inference"]]["ints"][slot])


def test_agent_without_models_is_exactly_the_fallback(eng: Engine, tmp_path: Path) -> None:
    write_model(tmp_path / "equity", "edge", logistic_onnx(W_EDGE, B_EDGE), sidecar("edge"))
    agent = agent_for(eng, tmp_path)  # crypto: models/crypto/ does not exist
    assert agent.models.n_active == 0
    fv = random_features(np.random.default_rng(21), 12)
    sig = through(eng, agent, fv)
    ref = signals(fv)
    assert len(sig) == 12 and (sig["inference_ns"] > 0).all()
    for name in SIGNAL_FIELDS:
        assert np.array_equal(sig[name], ref[name]), name
    assert (sig["flags"] & schema.SIG_FALLBACK).all()
    assert counter(eng, schema.C_FALLBACKS) == counter(eng, schema.C_SIGNALS) == 12
    agent.on_close()


SIGNAL_FIELDS = [n for n in schema.SIGNAL.names or () if n != "inference_ns"]


def test_agent_with_models_publishes_the_ensemble(eng: Engine, tmp_path: Path) -> None:
    write_model(tmp_path / "crypto", "edge", logistic_onnx(W_EDGE, B_EDGE), sidecar("edge"))
    agent = agent_for(eng, tmp_path)
    assert list(agent.models.models) == ["edge"]
    fv = random_features(np.random.default_rng(22), 10, in_domain=True)
    sig = through(eng, agent, fv)
    p = sigmoid(ref_scale(fv["values"]).astype(np.float64) @ np.array(W_EDGE) + B_EDGE)
    assert sig["confidence"] == pytest.approx(np.maximum(p, 1 - p), abs=1e-6)
    assert sig["edge_bps"] == pytest.approx((2 * p - 1) * 2.0, abs=1e-5)
    assert not (sig["flags"] & schema.SIG_FALLBACK).any()
    untradeable = (fv["flags"] & schema.BOOK_UNTRADEABLE) != 0
    assert ((sig["flags"] & schema.SIG_UNTRADEABLE) != 0).tolist() == untradeable.tolist()
    assert counter(eng, schema.C_FALLBACKS) == 0 and counter(eng, schema.C_SIGNALS) == 10
    assert counter(eng, schema.MODEL_COUNTERS_BASE + schema.MODEL_RUNS) >= 1
    assert counter(eng, schema.MODEL_COUNTERS_BASE + schema.MODEL_OUT_OF_DOMAIN) == 0
    agent.on_close()


def test_agent_falls_back_on_the_rows_no_model_can_answer(eng: Engine, tmp_path: Path) -> None:
    write_model(tmp_path / "crypto", "edge", logistic_onnx(W_EDGE, B_EDGE), sidecar("edge"))
    agent = agent_for(eng, tmp_path)
    edge_ood = schema.MODEL_COUNTERS_BASE + schema.MODEL_OUT_OF_DOMAIN
    rng = np.random.default_rng(27)

    def model_signal(fv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        p = sigmoid(ref_scale(fv["values"]).astype(np.float64) @ np.array(W_EDGE) + B_EDGE)
        return np.maximum(p, 1 - p), (2 * p - 1) * 2.0

    # one row far outside the model's range: that row alone falls back
    fv = random_features(rng, 8, in_domain=True)
    fv["values"][3, schema.F_SPREAD_BPS] = 1e4
    sig = through(eng, agent, fv)
    ref = signals(fv)
    assert len(sig) == 8
    for name in SIGNAL_FIELDS:  # the rule-based signal, SIG_FALLBACK included
        assert sig[name][3] == ref[name][3], name
    assert sig["flags"][3] & schema.SIG_FALLBACK
    model_rows = np.arange(8) != 3
    assert not (sig["flags"][model_rows] & schema.SIG_FALLBACK).any()
    conf, edge = model_signal(fv)
    assert sig["confidence"][model_rows] == pytest.approx(conf[model_rows], abs=1e-6)
    assert sig["edge_bps"][model_rows] == pytest.approx(edge[model_rows], abs=1e-5)
    untradeable = (fv["flags"] & schema.BOOK_UNTRADEABLE) != 0
    assert ((sig["flags"] & schema.SIG_UNTRADEABLE) != 0).tolist() == untradeable.tolist()
    for name in ("symbol_id", "seq", "exch_ns", "recv_ns", "ingest_ns", "feature_ns", "mid"):
        assert np.array_equal(sig[name], fv[name]), name
    assert (counter(eng, schema.C_FALLBACKS), counter(eng, schema.C_SIGNALS)) == (1, 8)
    assert counter(eng, edge_ood) == 1

    # every row outside: the whole batch falls back
    fv = random_features(rng, 5, in_domain=True)
    fv["values"][:, schema.F_RVOL_BPS] = 100.0
    sig = through(eng, agent, fv)
    ref = signals(fv)
    for name in SIGNAL_FIELDS:
        assert np.array_equal(sig[name], ref[name]), name
    assert (counter(eng, schema.C_FALLBACKS), counter(eng, schema.C_SIGNALS)) == (6, 13)
    assert counter(eng, edge_ood) == 6

    # back inside the range: the model answers every row again
    fv = random_features(rng, 8, in_domain=True)
    sig = through(eng, agent, fv)
    conf, edge = model_signal(fv)
    assert not (sig["flags"] & schema.SIG_FALLBACK).any()
    assert sig["confidence"] == pytest.approx(conf, abs=1e-6)
    assert sig["edge_bps"] == pytest.approx(edge, abs=1e-5)
    assert (counter(eng, schema.C_FALLBACKS), counter(eng, schema.C_SIGNALS)) == (6, 21)
    assert counter(eng, edge_ood) == 6
    agent.on_close()


def test_agent_falls_back_when_every_model_misses_the_deadline(eng: Engine, tmp_path: Path) -> None:
    write_model(tmp_path / "crypto", "idec", slow_onnx([0.0] * 4, 3.0), sidecar("idec"))
    agent = agent_for(eng, tmp_path, timeout_ms=1.0)
    assert list(agent.models.models) == ["idec"]
    fv = random_features(np.random.default_rng(23), 5)
    sig = through(eng, agent, fv)
    ref = signals(fv)
    for name in SIGNAL_FIELDS:
        assert np.array_equal(sig[name], ref[name]), name
    idec_timeouts = schema.MODEL_COUNTERS_BASE + 2 * schema.N_MODEL_COUNTERS + schema.MODEL_TIMEOUTS
    assert counter(eng, schema.C_FALLBACKS) == 5
    assert counter(eng, schema.C_MODEL_TIMEOUTS) == counter(eng, idec_timeouts) == 5
    agent.on_close()


def test_agent_picks_up_a_changed_model_without_restarting(eng: Engine, tmp_path: Path) -> None:
    d = tmp_path / "crypto"
    write_model(d, "edge", logistic_onnx(W_EDGE, B_EDGE), sidecar("edge"))
    agent = agent_for(eng, tmp_path)
    fv = random_features(np.random.default_rng(24), 6, in_domain=True)
    z = ref_scale(fv["values"]).astype(np.float64)
    p1 = sigmoid(z @ np.array(W_EDGE) + B_EDGE)
    assert through(eng, agent, fv)["confidence"] == pytest.approx(np.maximum(p1, 1 - p1), abs=1e-6)
    first = agent.models.models["edge"]

    w2 = [0.0, 3.0, -1.0, 0.0]
    write_model(d, "edge", logistic_onnx(w2, 0.5), sidecar("edge"))
    wait_idle(agent, lambda: agent.models.models["edge"] is not first)
    p2 = sigmoid(z @ np.array(w2) + 0.5)
    assert through(eng, agent, fv)["confidence"] == pytest.approx(np.maximum(p2, 1 - p2), abs=1e-6)

    (d / "edge.onnx").unlink()
    wait_idle(agent, lambda: agent.models.n_active == 0)
    sig = through(eng, agent, fv)
    assert (sig["flags"] & schema.SIG_FALLBACK).all()
    agent.on_close()


def wait_idle(agent: InferenceAgent, until: Callable[[], bool], *, timeout_s: float = 20.0) -> None:
    """Run the agent's idle duty cycle (no input) until ``until()``."""
    end = time.monotonic() + timeout_s
    while not until():
        assert time.monotonic() < end, "condition not reached"
        assert agent.do_work() == 0
        time.sleep(0.005)


def test_monitor_reports_the_agents_models_and_fallback_share(eng: Engine, tmp_path: Path) -> None:
    d = tmp_path / "crypto"
    write_model(d, "edge", logistic_onnx(W_EDGE, B_EDGE), sidecar("edge"))
    write_model(d, "idec", slow_onnx([0.0] * 4, 3.0), sidecar("idec"))
    agent = agent_for(eng, tmp_path, timeout_ms=1.0)
    fv = random_features(np.random.default_rng(25), 4, in_domain=True)
    fv["values"][1, schema.F_OBI] = 40.0  # outside edge's range: that row falls back
    through(eng, agent, fv)
    (d / "edge.onnx").unlink()
    wait_idle(agent, lambda: list(agent.models.models) == ["idec"])
    fv = random_features(np.random.default_rng(26), 6, in_domain=True)
    through(eng, agent, fv)  # idec misses: fallback
    block = eng.stats_all[schema.ROLE_INDEX["inference"]]
    rep = monitor.models_report(block["ints"], block["hist"])
    assert set(rep["by_model"]) == {"edge", "idec"}
    edge, idec = rep["by_model"]["edge"], rep["by_model"]["idec"]
    assert (edge["runs"], edge["timeouts"], edge["errors"], edge["out_of_domain"]) == (1, 0, 0, 1)
    assert edge["out_of_domain_share"] == pytest.approx(0.1)  # of the stage's 10 ticks
    assert edge["p99_us"] is not None and edge["p99_us"] > 0
    assert (idec["runs"], idec["timeouts"], idec["p99_us"]) == (0, 10, None)
    assert (idec["out_of_domain"], idec["out_of_domain_share"]) == (0, None)  # it saw no tick
    assert (rep["signals"], rep["fallbacks"]) == (10, 7)
    assert rep["fallback_share"] == pytest.approx(0.7)
    line = monitor._models_line(rep)
    assert line.startswith("models   edge runs 1 timeouts 0 out-of-domain 1 (10.0%) p99 ")
    assert "idec runs 0 timeouts 10 out-of-domain 0 (-) p99 - us" in line
    assert line.endswith("fallback 70.0% of signals")
    agent.on_close()
