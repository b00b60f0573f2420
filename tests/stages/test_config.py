"""Configuration: the shipped file loads with the seed's defaults; bad input names the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from stages import config


def test_shipped_config_has_the_seed_defaults():
    cfg = config.load()
    assert cfg.engine.mode == "paper"
    assert cfg.engine.feature_window_size == 1000
    assert cfg.engine.inference_timeout_ms == 3
    assert (cfg.gate.min_edge_bps, cfg.gate.min_confidence, cfg.gate.max_spread_bps) == (
        5.0,
        0.5,
        10.0,
    )
    assert cfg.risk.max_notional_per_symbol == 100_000.0
    assert cfg.risk.max_total_notional == 500_000.0
    assert cfg.risk.max_loss_per_day == 10_000.0
    assert cfg.idle.default == "block", "the default must not spin on shared cores"
    assert cfg.feed.source == "sim" and len(cfg.feed.symbols) == 4
    assert cfg.ops.metrics_port == 9090 and cfg.ops.api_port == 8081


def test_config_is_frozen():
    cfg = config.load()
    with pytest.raises(AttributeError):
        cfg.gate.min_edge_bps = 1.0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("[gate]\nmin_edgebps = 5\n", r"unknown key gate\.min_edgebps"),
        ("[gates]\n", r"unknown section \[gates\]"),
        ("[gate]\nmin_edge_bps = -1\n", r"gate\.min_edge_bps must be >= 0"),
        ("[gate]\nmin_confidence = 1.5\n", r"gate\.min_confidence must be in \[0, 1\]"),
        ('[gate]\nmax_spread_bps = "wide"\n', r"gate\.max_spread_bps must be a number"),
        ('[engine]\nmode = "yolo"\n', r"engine\.mode must be one of"),
        ("[engine]\nfeature_window_size = 1\n", r"engine\.feature_window_size"),
        ('[idle]\ndefault = "nap"\n', r"idle\.default must be one of"),
        ('[idle]\nroute = "nap"\n', r"idle\.route must be one of"),
        ("[cpu]\ningest = []\n", r"cpu\.ingest must be a non-empty list"),
        ("[cpu]\ningest = [-1]\n", r"cpu\.ingest"),
        ('[feed]\nsource = "ftx"\n', r"feed\.source must be one of"),
        ('[feed]\nsymbols = ["BTC", "BTC"]\n', r"feed\.symbols has duplicates"),
        ("[feed]\nport = 70000\n", r"feed\.port must be 0\.\.65535"),
        ("[rings]\nmd_capacity = 1000\n", r"rings\.md_capacity must be a power of two"),
        ("[risk]\nmax_notional_per_symbol = 9e9\n", r"must not exceed risk\.max_total_notional"),
        ("[ops]\nmetrics_port = true\n", r"ops\.metrics_port must be an integer"),
        ("gate = 3\n", r"\[gate\] must be a table"),
        ("[inference]\nedge_weight = -1\n", r"inference\.edge_weight must be >= 0"),
        (
            "[inference]\ntransformer_weight = nan\n",
            r"inference\.transformer_weight must be a finite",
        ),
        ('[inference]\ngbdt_weight = "high"\n', r"inference\.gbdt_weight must be a number"),
        ("[inference]\nreload_check_ms = 0\n", r"inference\.reload_check_ms must be > 0"),
        ('[inference]\nmodels_dir = ""\n', r"inference\.models_dir must be a directory path"),
        ("[inference]\nmodels_dir = 3\n", r"inference\.models_dir must be a string"),
        ("[inference]\nidec = 1\n", r"unknown key inference\.idec"),
        ("[gate\n", r"not valid TOML"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, toml: str, message: str):
    p = tmp_path / "engine.toml"
    p.write_text(toml)
    with pytest.raises(config.ConfigError, match=message):
        config.load(p)


def test_missing_file_is_a_clear_error(tmp_path: Path):
    with pytest.raises(config.ConfigError, match="cannot read config file"):
        config.load(tmp_path / "nope.toml")


def test_cli_exits_2_and_names_the_key(tmp_path: Path):
    p = tmp_path / "engine.toml"
    p.write_text("[risk]\nmax_loss_per_dya = 5\n")
    proc = subprocess.run(
        [sys.executable, "-m", "ops.cli", "paper", "--config", str(p), "--duration", "1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "risk.max_loss_per_dya" in proc.stderr


def test_stage_exits_2_on_bad_config(tmp_path: Path):
    p = tmp_path / "engine.toml"
    p.write_text('[idle]\nfeature = "sleepy"\n')
    proc = subprocess.run(
        [sys.executable, "-m", "stages", "feature", "--config", str(p)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "idle.feature" in proc.stderr


def test_variant_text_sets_keys_per_section_and_keeps_the_rest(tmp_path: Path):
    text = config.variant_text(
        {"cpu": {"ingest": [1]}, "idle": {"ingest": "backoff"}, "route": {"order_ttl_ms": 60000.0}}
    )
    p = tmp_path / "engine.toml"
    p.write_text(text)
    cfg = config.load(p)
    assert cfg.cpu.ingest == (1,) and cfg.idle.ingest == "backoff"
    assert cfg.route.order_ttl_ms == 60000.0
    assert cfg.cpu.feature == (1,) and cfg.idle.feature == ""  # same key, other section: untouched
    assert cfg.gate == config.load().gate
    assert "# Units are in the names" in text


def test_inference_section_defaults_and_model_directory(tmp_path: Path):
    inf = config.load().inference
    assert (inf.edge_weight, inf.gbdt_weight, inf.idec_weight, inf.transformer_weight) == (
        1.0,
        1.0,
        1.0,
        1.0,
    )
    assert inf.reload_check_ms == 1000 and inf.models_dir == "models"
    assert inf == config.InferenceConfig()
    root = config.DEFAULT_CONFIG.parent.parent
    assert inf.class_dir("crypto") == root / "models" / "crypto"  # relative: the repo root
    assert inf.weight("idec") == 1.0
    p = tmp_path / "engine.toml"
    p.write_text(
        config.variant_text(
            {"inference": {"models_dir": str(tmp_path), "gbdt_weight": 0, "idec_weight": 2}}
        )
    )
    cfg = config.load(p)
    assert cfg.inference.class_dir("equity") == tmp_path / "equity"  # absolute: as given
    assert cfg.inference.weight("gbdt") == 0.0 and cfg.inference.weight("idec") == 2.0
