"""Engine configuration: frozen, slotted, keyword-only dataclasses loaded from TOML.

Every section is validated when it is built; an unknown key or a bad value raises
``ConfigError`` naming ``section.key`` (the CLI turns that into exit code 2). Dicts never
leave the loader: stages get typed objects.

This module imports nothing heavy (no numpy): a stage loads its config and pins its CPU
*before* importing numpy or onnxruntime, whose thread pools start at import.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

ROLES: Final = ("ingest", "feature", "inference", "route", "risk")
IDLE_NAMES: Final = ("spin", "yield", "backoff", "block")
FEED_SOURCES: Final = ("sim", "hyperliquid", "binance")
MODES: Final = ("paper", "live", "backtest")
DEFAULT_CONFIG: Final = Path(__file__).resolve().parent.parent / "config" / "engine.toml"
REPO_ROOT: Final = DEFAULT_CONFIG.parent.parent  # relative paths in the config resolve against it


class ConfigError(ValueError):
    """A configuration file cannot be used; the message names the key."""


def _positive(section: str, name: str, value: float, *, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{section}.{name} must be a finite number, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(
            f"{section}.{name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}"
        )


def _check_numbers(section: str, obj: object, *, allow_zero: tuple[str, ...] = ()) -> None:
    for f in dataclasses.fields(obj):  # type: ignore[arg-type]
        v = getattr(obj, f.name)
        if isinstance(v, int | float) and not isinstance(v, bool):
            _positive(section, f.name, v, allow_zero=f.name in allow_zero)


@dataclass(frozen=True, slots=True, kw_only=True)
class EngineConfig:
    mode: str = "paper"
    feature_window_size: int = 1000
    inference_timeout_ms: float = 3.0
    namespace: str = "hft"
    asset_class: str = "crypto"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"engine.mode must be one of {MODES}, got {self.mode!r}")
        if self.asset_class not in ("crypto", "equity"):
            raise ConfigError(
                f"engine.asset_class must be 'crypto' or 'equity', got {self.asset_class!r}"
            )
        if not self.namespace.replace("-", "").replace("_", "").isalnum():
            raise ConfigError(
                f"engine.namespace must be alphanumeric (with - or _), got {self.namespace!r}"
            )
        _check_numbers("engine", self)
        if not isinstance(self.feature_window_size, int) or self.feature_window_size < 2:
            raise ConfigError(
                f"engine.feature_window_size must be an integer >= 2, got {self.feature_window_size!r}"
            )


@dataclass(frozen=True, slots=True, kw_only=True)
class GateConfig:
    min_edge_bps: float = 5.0
    min_confidence: float = 0.5
    max_spread_bps: float = 10.0

    def __post_init__(self) -> None:
        _check_numbers("gate", self, allow_zero=("min_edge_bps", "min_confidence"))
        if self.min_confidence > 1:
            raise ConfigError(f"gate.min_confidence must be in [0, 1], got {self.min_confidence!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class RiskConfig:
    max_notional_per_symbol: float = 100_000.0
    max_total_notional: float = 500_000.0
    max_loss_per_day: float = 10_000.0
    taker_fee_bps: float = 4.5  # the simulator's fees (it speaks Hyperliquid); see [paper]
    maker_fee_bps: float = 1.5
    account_equity_usd: float = 100_000.0  # capital the leverage and concentration refer to
    max_leverage: float = 3.0  # gross notional / (equity + PnL)
    max_holding_s: float = 3_600.0  # a position older than this is reduced
    max_concentration: float = 0.25  # one symbol's notional / portfolio gross notional
    adr_loss_multiple: float = 2.0  # unrealised loss over this many average daily ranges
    wide_spread_bps: float = 10.0  # circuit breaker: pause the symbol above this spread
    min_liquidity_usd: float = 500_000.0  # circuit breaker: pause below this book notional
    extreme_move_atr: float = 3.0  # circuit breaker: pause on a move over this many ATRs
    breaker_pause_s: float = 30.0  # how long a circuit breaker pauses its symbol
    max_orders_per_s: float = 20.0  # per venue, new orders and cancels

    def __post_init__(self) -> None:
        _check_numbers("risk", self, allow_zero=("taker_fee_bps", "maker_fee_bps"))
        if self.max_concentration > 1:
            raise ConfigError(
                f"risk.max_concentration must be in (0, 1], got {self.max_concentration!r}"
            )
        if self.max_notional_per_symbol > self.max_total_notional:
            raise ConfigError(
                "risk.max_notional_per_symbol must not exceed risk.max_total_notional"
            )


@dataclass(frozen=True, slots=True, kw_only=True)
class PaperConfig:
    """The paper exchange: fees per venue, order-entry latency, where the journal lives."""

    binance_taker_fee_bps: float = 5.0  # Binance USD-M base tier: 0.05% / 0.02%
    binance_maker_fee_bps: float = 2.0
    hyperliquid_taker_fee_bps: float = 4.5  # Hyperliquid base tier: 0.045% / 0.015%
    hyperliquid_maker_fee_bps: float = 1.5
    latency_ms: float = 1.0  # order entry: an order or cancel reaches the book this much later
    journal_path: str = "var/journal/{namespace}.sqlite"  # {namespace}: engine.namespace

    def __post_init__(self) -> None:
        _check_numbers(
            "paper",
            self,
            allow_zero=(
                "binance_taker_fee_bps",
                "binance_maker_fee_bps",
                "hyperliquid_taker_fee_bps",
                "hyperliquid_maker_fee_bps",
                "latency_ms",
            ),
        )
        if not self.journal_path:
            raise ConfigError("paper.journal_path must not be empty")


@dataclass(frozen=True, slots=True, kw_only=True)
class RouteConfig:
    base_size_usd: float = 2_000.0
    min_order_interval_ms: float = 250.0
    order_ttl_ms: float = 3_000.0
    max_open_orders_per_symbol: int = 2
    max_signal_age_ms: float = 50.0  # never act on a tick older than this (a backlog after a stall)
    reprice_away_bps: float = 3.0  # a resting order this far behind the touch is cancelled

    def __post_init__(self) -> None:
        _check_numbers("route", self, allow_zero=("min_order_interval_ms",))


@dataclass(frozen=True, slots=True, kw_only=True)
class SignalConfig:
    """The rule-based fallback signal (used until models land, and when none load)."""

    edge_scale_bps: float = 12.0
    obi_weight: float = 0.5
    depth_weight: float = 0.3
    micro_weight: float = 0.2

    def __post_init__(self) -> None:
        _check_numbers("signal", self, allow_zero=("obi_weight", "depth_weight", "micro_weight"))


@dataclass(frozen=True, slots=True, kw_only=True)
class InferenceConfig:
    """The ONNX ensemble: where its models live, their weights, how often files are checked.

    The deadline is ``engine.inference_timeout_ms`` and the models' subdirectory is
    ``engine.asset_class``: ``<models_dir>/<asset_class>/<model>.onnx``. A weight of 0 leaves
    that model out (never loaded, never run); with no model loaded every tick uses ``[signal]``.
    """

    models_dir: str = "models"  # relative to the repository root unless absolute
    edge_weight: float = 1.0
    gbdt_weight: float = 1.0
    idec_weight: float = 1.0
    transformer_weight: float = 1.0
    reload_check_ms: float = 1000.0  # how often the stage stats the model files for changes

    def __post_init__(self) -> None:
        if not isinstance(self.models_dir, str) or not self.models_dir.strip():
            raise ConfigError(
                f"inference.models_dir must be a directory path, got {self.models_dir!r}"
            )
        _check_numbers(
            "inference",
            self,
            allow_zero=("edge_weight", "gbdt_weight", "idec_weight", "transformer_weight"),
        )

    def weight(self, model: str) -> float:
        """The ensemble weight of ``model`` (one of ``shm.schema.MODEL_NAMES``)."""
        w: float = getattr(self, f"{model}_weight")
        return w

    def class_dir(self, asset_class: str) -> Path:
        """The directory of one asset class's models, ``models_dir`` resolved against the repo."""
        base = Path(self.models_dir).expanduser()
        return (base if base.is_absolute() else REPO_ROOT / base) / asset_class


@dataclass(frozen=True, slots=True, kw_only=True)
class CpuConfig:
    ingest: tuple[int, ...] = (0,)
    feature: tuple[int, ...] = (1,)
    inference: tuple[int, ...] = (1,)
    route: tuple[int, ...] = (1,)
    risk: tuple[int, ...] = (1,)
    supervisor: tuple[int, ...] = (0,)
    sim: tuple[int, ...] = (0,)
    # SCHED_FIFO priority of the first stage (0: normal scheduling); later stages get +1 each
    realtime_priority: int = 10

    def __post_init__(self) -> None:
        rt = self.realtime_priority
        if isinstance(rt, bool) or not isinstance(rt, int) or not 0 <= rt <= 90:
            raise ConfigError(f"cpu.realtime_priority must be an integer in 0..90, got {rt!r}")
        for f in dataclasses.fields(self):
            if f.name == "realtime_priority":
                continue
            cpus = getattr(self, f.name)
            if not cpus or not all(
                isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in cpus
            ):
                raise ConfigError(
                    f"cpu.{f.name} must be a non-empty list of CPU numbers, got {list(cpus)!r}"
                )

    def for_role(self, role: str) -> tuple[int, ...]:
        cpus: tuple[int, ...] = getattr(self, role)
        return cpus


@dataclass(frozen=True, slots=True, kw_only=True)
class IdleConfig:
    default: str = "block"
    ingest: str = ""
    feature: str = ""
    inference: str = ""
    route: str = ""
    risk: str = ""
    block_timeout_ms: float = 10.0

    def __post_init__(self) -> None:
        for name in ("default", *ROLES):
            v = getattr(self, name)
            if v and v not in IDLE_NAMES:
                raise ConfigError(f"idle.{name} must be one of {IDLE_NAMES}, got {v!r}")
        if self.default not in IDLE_NAMES:
            raise ConfigError(f"idle.default must be one of {IDLE_NAMES}, got {self.default!r}")
        _positive("idle", "block_timeout_ms", self.block_timeout_ms)

    def for_role(self, role: str) -> str:
        v: str = getattr(self, role)
        return v or self.default


MAX_REQUEST_WEIGHT: Final = 20  # our heaviest REST call (Binance depth 1000, Hyperliquid meta)
STALE_AFTER_MS_DEFAULT: Final = {"sim": 2000.0, "hyperliquid": 5000.0, "binance": 3000.0}


@dataclass(frozen=True, slots=True, kw_only=True)
class FeedConfig:
    source: str = "sim"
    symbols: tuple[str, ...] = ("BTC", "ETH", "SOL", "DOGE")
    updates_per_sec: float = 1000.0
    host: str = "127.0.0.1"
    port: int = 0  # 0: the supervisor picks a free port for the sim
    seed: int = 7
    stale_after_ms: float = 0.0  # connected but silent this long: books flagged stale; 0: venue's
    ws_url: str = ""  # "" = the venue's public endpoint (Binance: the base, routed paths added)
    rest_url: str = ""  # "" = the venue's public REST endpoint
    testnet: bool = False  # use the venue's testnet endpoints when the URLs are not given
    binance_depth_ms: int = 100  # Binance diff-depth stream speed: 0 | 100 | 250 | 500
    snapshot_depth: int = 1000  # Binance REST depth snapshot levels (weight 20 at 1000)
    max_connection_age_s: float = 82_800.0  # reconnect before the venue's 24 h cut-off
    rest_weight_per_min: int = 1200  # our REST weight budget (Binance allows 2400 per IP)
    cache_dir: str = "var/cache"  # venue symbol rules cached here, used when a fetch fails

    def stale_after_ms_for(self, venue: str) -> float:
        """The silence threshold of a venue: the configured one, else the venue's default."""
        return self.stale_after_ms or STALE_AFTER_MS_DEFAULT[venue]

    def __post_init__(self) -> None:
        if self.source not in FEED_SOURCES:
            raise ConfigError(f"feed.source must be one of {FEED_SOURCES}, got {self.source!r}")
        if not self.symbols or not all(isinstance(s, str) and s.isalnum() for s in self.symbols):
            raise ConfigError(
                f"feed.symbols must be a non-empty list of alphanumeric names, got {self.symbols!r}"
            )
        if len(set(self.symbols)) != len(self.symbols):
            raise ConfigError("feed.symbols has duplicates")
        if len(self.symbols) > 64:
            raise ConfigError("feed.symbols holds at most 64 symbols")
        _positive("feed", "updates_per_sec", self.updates_per_sec)
        if not isinstance(self.port, int) or not 0 <= self.port < 65536:
            raise ConfigError(f"feed.port must be 0..65535, got {self.port!r}")
        if not isinstance(self.seed, int):
            raise ConfigError(f"feed.seed must be an integer, got {self.seed!r}")
        if not isinstance(self.stale_after_ms, (int, float)) or self.stale_after_ms < 0:
            raise ConfigError(f"feed.stale_after_ms must be >= 0, got {self.stale_after_ms!r}")
        for key, schemes in (("ws_url", ("ws", "wss")), ("rest_url", ("http", "https"))):
            url = getattr(self, key)
            if not isinstance(url, str):
                raise ConfigError(f"feed.{key} must be a string, got {url!r}")
            if url:
                parts = urlsplit(url)
                try:
                    port_ok = parts.port is None or 0 < parts.port < 65536
                except ValueError:
                    port_ok = False
                if parts.scheme not in schemes or not parts.hostname or not port_ok:
                    raise ConfigError(
                        f"feed.{key} must be a {' or '.join(schemes)} URL with a host "
                        f"(like {schemes[0]}://127.0.0.1:8765), got {url!r}"
                    )
        if not isinstance(self.testnet, bool):
            raise ConfigError(f"feed.testnet must be true or false, got {self.testnet!r}")
        if self.binance_depth_ms not in (0, 100, 250, 500):
            raise ConfigError(
                f"feed.binance_depth_ms must be 0, 100, 250 or 500, got {self.binance_depth_ms!r}"
            )
        if self.snapshot_depth not in (5, 10, 20, 50, 100, 500, 1000):
            raise ConfigError(
                "feed.snapshot_depth must be one of 5, 10, 20, 50, 100, 500, 1000, "
                f"got {self.snapshot_depth!r}"
            )
        _positive("feed", "max_connection_age_s", self.max_connection_age_s)
        _positive("feed", "rest_weight_per_min", self.rest_weight_per_min)
        if self.rest_weight_per_min < MAX_REQUEST_WEIGHT:
            raise ConfigError(
                f"feed.rest_weight_per_min must be >= {MAX_REQUEST_WEIGHT} (the weight of one "
                f"1000-level depth snapshot or one info request), got {self.rest_weight_per_min!r}"
            )
        if not isinstance(self.cache_dir, str) or not self.cache_dir:
            raise ConfigError(f"feed.cache_dir must be a directory path, got {self.cache_dir!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class OpsConfig:
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9090
    api_port: int = 8081
    restart_backoff_ms: float = 200.0
    max_restarts_per_minute: int = 10

    def __post_init__(self) -> None:
        for name in ("metrics_port", "api_port"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 65536:
                raise ConfigError(f"ops.{name} must be 0..65535, got {v!r}")
        _positive("ops", "restart_backoff_ms", self.restart_backoff_ms, allow_zero=True)
        _positive("ops", "max_restarts_per_minute", self.max_restarts_per_minute)


@dataclass(frozen=True, slots=True, kw_only=True)
class RingsConfig:
    md_capacity: int = 4096
    mark_capacity: int = 256
    features_capacity: int = 4096
    signals_capacity: int = 4096
    orders_capacity: int = 1024
    fills_capacity: int = 4096

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 2 or v & (v - 1):
                raise ConfigError(f"rings.{f.name} must be a power of two >= 2, got {v!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    engine: EngineConfig = field(default_factory=EngineConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    risk: RiskConfig = field(default_factory=RiskConfig)
    paper: PaperConfig = field(default_factory=PaperConfig)
    route: RouteConfig = field(default_factory=RouteConfig)
    signal: SignalConfig = field(default_factory=SignalConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    cpu: CpuConfig = field(default_factory=CpuConfig)
    idle: IdleConfig = field(default_factory=IdleConfig)
    feed: FeedConfig = field(default_factory=FeedConfig)
    ops: OpsConfig = field(default_factory=OpsConfig)
    rings: RingsConfig = field(default_factory=RingsConfig)
    source: str = ""  # the file it came from


_SECTIONS: Final[dict[str, type[Any]]] = {
    "engine": EngineConfig,
    "gate": GateConfig,
    "risk": RiskConfig,
    "paper": PaperConfig,
    "route": RouteConfig,
    "signal": SignalConfig,
    "inference": InferenceConfig,
    "cpu": CpuConfig,
    "idle": IdleConfig,
    "feed": FeedConfig,
    "ops": OpsConfig,
    "rings": RingsConfig,
}


def _coerce(section: str, key: str, default: object, value: object) -> object:
    """Check a TOML value against the type of the field's default; ints widen to floats."""
    where = f"{section}.{key}"
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    if isinstance(default, tuple):
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return tuple(value)
    raise ConfigError(f"{where}: unsupported value {value!r}")


def from_dict(data: dict[str, Any], *, source: str = "") -> Config:
    """Build a Config from parsed TOML, rejecting unknown sections and keys by name."""
    parts: dict[str, Any] = {}
    for section, values in data.items():
        cls = _SECTIONS.get(section)
        if cls is None:
            raise ConfigError(f"unknown section [{section}] (known: {', '.join(_SECTIONS)})")
        if not isinstance(values, dict):
            raise ConfigError(f"[{section}] must be a table")
        defaults = cls()
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in values.items():
            if key not in known:
                raise ConfigError(
                    f"unknown key {section}.{key} (known: {', '.join(sorted(known))})"
                )
            kwargs[key] = _coerce(section, key, getattr(defaults, key), value)
        try:
            parts[section] = cls(**kwargs)
        except TypeError as exc:
            raise ConfigError(f"[{section}]: {exc}") from exc
    return Config(**parts, source=source)


def load(
    path: str | Path | None = None, *, overrides: dict[str, dict[str, Any]] | None = None
) -> Config:
    """Load a TOML file (default ``config/engine.toml``), with optional section overrides."""
    p = Path(path) if path is not None else DEFAULT_CONFIG
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {p}: {exc.strerror}") from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {p} is not valid TOML: {exc}") from exc
    for section, values in (overrides or {}).items():
        data.setdefault(section, {}).update(values)
    try:
        return from_dict(data, source=str(p))
    except ConfigError as exc:
        raise ConfigError(f"{p}: {exc}") from exc


def _bare(line: str) -> str:
    return line.split("#", 1)[0].strip()


def variant_text(overrides: dict[str, dict[str, Any]], *, base: str | Path | None = None) -> str:
    """Return the TOML of ``base`` (default: the shipped file) with keys set, comments kept.

    For tests, benchmarks and scripts that need "the shipped config, but ...": each value is
    written as JSON, which TOML reads back the same for numbers, strings, lists and booleans.
    """
    lines = Path(base or DEFAULT_CONFIG).read_text().splitlines()
    for section, values in overrides.items():
        header = f"[{section}]"
        if header not in (_bare(ln) for ln in lines):
            lines += ["", header]
        start = next(i for i, ln in enumerate(lines) if _bare(ln) == header)
        end = next(
            (i for i in range(start + 1, len(lines)) if lines[i].lstrip().startswith("[")),
            len(lines),
        )
        for key, value in values.items():
            line = f"{key} = {json.dumps(value)}"
            for i in range(start + 1, end):
                if lines[i].split("=", 1)[0].strip() == key and not lines[i].lstrip().startswith(
                    "#"
                ):
                    lines[i] = line
                    break
            else:
                lines.insert(start + 1, line)
                end += 1
    return "\n".join(lines) + "\n"


def to_dict(cfg: Config) -> dict[str, Any]:
    """Return the configuration as plain data (for logs and the API)."""
    out = dataclasses.asdict(cfg)
    out.pop("source", None)
    return out
