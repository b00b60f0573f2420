"""``hft monitor``: a psutil latency monitor of the running stages, in the terminal or as JSON.

Why a separate CLI next to Prometheus: on a box without a metrics stack (a laptop, a fresh
server, an incident) an operator wants one command that says, per stage, whether it is alive,
where it is pinned, how much CPU it burns, whether the scheduler preempts it (involuntary
context switches: the latency killer when stages share cores), how full its input rings are,
and its latency percentiles; and for the inference stage's models, their runs, ticks lost to
the deadline, ticks left out as outside their training range (out of domain) and run-time P99,
and how many signals came from the rule-based fallback; and the risk engine's trading state
(ACTIVE / REDUCING / HALTED with its reason) and circuit breaker trips.
Everything comes from shared memory (only read) and /proc.

Two readings ``interval`` apart give the rates (CPU %, records per second, context switches
per second); the latency percentiles are over each histogram since the stage started (the
same numbers the exporter gives Prometheus). ``--once`` samples over 0.5 s. JSON is written
with orjson, which writes NaN (an empty histogram, a vanished process) as ``null``.

Exit codes: 0 (done, or Ctrl+C), 1 (no engine in the namespace), 2 (bad config).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import orjson
import psutil

from ops.exporter import EngineWatch, ring_depths, trading_state
from shm import schema, segment
from shm.stats import LatencySummary
from stages import config
from stages import riskengine as rk
from stages.wiring import CTL_KILL, CTL_PID, CTL_RESTARTS, inputs_of

DEFAULT_INTERVAL_S: Final = 1.0
ONCE_INTERVAL_S: Final = 0.5
_CLEAR_HOME: Final = "\x1b[H\x1b[2J"

_sleep: Callable[[float], None] = time.sleep  # a seam for tests


@dataclass(frozen=True, slots=True, kw_only=True)
class ProcReading:
    """What psutil says about one stage process at one moment (None: unknown or gone)."""

    pid: int
    alive: bool
    create_time: float | None = None
    cpus: list[int] | None = None
    cpu_s: float | None = None
    rss_bytes: int | None = None
    ctx_voluntary: int | None = None
    ctx_involuntary: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Reading:
    """One copy of the engine's stats, control block, ring depths and stage processes."""

    mono_ns: int
    wall_s: float
    blocks: np.ndarray
    control: list[int]
    rings: dict[str, tuple[int, list[int]]]
    procs: dict[str, ProcReading]


def read_process(pid: int) -> ProcReading:
    """Return psutil's view of ``pid``; fields it cannot read are None."""
    if pid <= 0 or not segment.pid_alive(pid):
        return ProcReading(pid=pid, alive=False)
    try:
        proc = psutil.Process(pid)
        with proc.oneshot():
            times = proc.cpu_times()
            ctx = proc.num_ctx_switches()
            rss = proc.memory_info().rss
            created = proc.create_time()
            try:
                cpus: list[int] | None = sorted(proc.cpu_affinity())  # type: ignore[attr-defined]
            except (AttributeError, psutil.AccessDenied):
                cpus = None
    except psutil.NoSuchProcess:
        return ProcReading(pid=pid, alive=False)
    except psutil.AccessDenied:
        return ProcReading(pid=pid, alive=True)
    return ProcReading(
        pid=pid,
        alive=True,
        create_time=created,
        cpus=cpus,
        cpu_s=times.user + times.system,
        rss_bytes=int(rss),
        ctx_voluntary=int(ctx.voluntary),
        ctx_involuntary=int(ctx.involuntary),
    )


def take_reading(watch: EngineWatch) -> Reading:
    """Copy everything the report needs from an attached engine (``watch.engine``)."""
    engine = watch.engine
    assert engine is not None
    control = [int(v) for v in engine.control]
    procs = {
        role: read_process(control[CTL_PID + schema.ROLE_INDEX[role]])
        for role in schema.STAGE_ROLES
    }
    return Reading(
        mono_ns=time.monotonic_ns(),
        wall_s=time.time(),
        blocks=np.array(engine.stats_all),
        control=control,
        rings=ring_depths(watch),
        procs=procs,
    )


def _rate(prev: float | None, cur: float | None, dt_s: float) -> float | None:
    if prev is None or cur is None or dt_s <= 0:
        return None
    return max(cur - prev, 0.0) / dt_s


def _nan_to_none(x: float) -> float | None:
    return None if math.isnan(x) else x


def summarize(prev: Reading, cur: Reading, *, namespace: str) -> dict[str, Any]:
    """Build the report (the ``--json`` document) from two readings of the same engine."""
    dt_s = (cur.mono_ns - prev.mono_ns) / 1e9
    stages: dict[str, Any] = {}
    for role in schema.STAGE_ROLES:
        idx = schema.ROLE_INDEX[role]
        ints = cur.blocks[idx]["ints"]
        p, c = prev.procs[role], cur.procs[role]
        same = p.pid == c.pid and p.create_time is not None and p.create_time == c.create_time
        cpu = _rate(p.cpu_s, c.cpu_s, dt_s) if same else None
        inputs: dict[str, Any] = {}
        for ring_name, reader in inputs_of(role):
            if ring_name not in cur.rings:
                continue
            capacity, depths = cur.rings[ring_name]
            depth = depths[reader]
            inputs[ring_name] = {
                "depth": depth,
                "capacity": capacity,
                "fill_pct": min(100.0, 100.0 * depth / capacity),
            }
        processed, processed_before = (
            int(ints[schema.C_PROCESSED]),
            int(prev.blocks[idx]["ints"][schema.C_PROCESSED]),
        )
        if processed < processed_before:  # the stage restarted with fresh stats
            processed_before = 0
        lat = LatencySummary.of(cur.blocks[idx]["hist"][schema.H_DURATION])
        stages[role] = {
            "pid": c.pid,
            "alive": c.alive,
            "cpus": c.cpus,
            "cpu_percent": None if cpu is None else cpu * 100.0,
            "rss_bytes": c.rss_bytes,
            "ctx_voluntary": c.ctx_voluntary,
            "ctx_involuntary": c.ctx_involuntary,
            "ctx_voluntary_per_s": _rate(p.ctx_voluntary, c.ctx_voluntary, dt_s) if same else None,
            "ctx_involuntary_per_s": _rate(p.ctx_involuntary, c.ctx_involuntary, dt_s)
            if same
            else None,
            "ring_depth": sum(i["depth"] for i in inputs.values()) if inputs else None,
            "ring_fill_pct": max(i["fill_pct"] for i in inputs.values()) if inputs else None,
            "inputs": inputs,
            "processed": processed,
            "throughput_per_s": (processed - processed_before) / dt_s if dt_s > 0 else None,
            "latency_count": lat.count,
            "p50_us": _nan_to_none(lat.p50_us),
            "p99_us": _nan_to_none(lat.p99_us),
            "p999_us": _nan_to_none(lat.p999_us),
            "restarts": cur.control[CTL_RESTARTS + idx],
        }
    risk_idx = schema.ROLE_INDEX["risk"]
    risk = cur.blocks[risk_idx]["ints"]
    inference = cur.blocks[schema.ROLE_INDEX["inference"]]
    gauges = cur.blocks[risk_idx]["gauges"]
    e2e = LatencySummary.of(cur.blocks[risk_idx]["hist"][schema.H_E2E])
    state, reason = trading_state(gauges, cur.control[CTL_KILL])
    return {
        "namespace": namespace,
        "ts": cur.wall_s,
        "interval_s": dt_s,
        "stages": stages,
        "tick_to_order_us": {
            "count": e2e.count,
            "p50": _nan_to_none(e2e.p50_us),
            "p99": _nan_to_none(e2e.p99_us),
            "p999": _nan_to_none(e2e.p999_us),
        },
        "dropped_frames": int(
            sum(
                int(cur.blocks[schema.ROLE_INDEX[r]]["ints"][schema.C_DROPPED])
                for r in schema.STAGE_ROLES
            )
        ),
        "feed": {
            name: int(cur.blocks[schema.ROLE_INDEX["ingest"]]["ints"][slot])
            for name, slot in (
                ("reconnects", schema.C_RECONNECTS),
                ("resyncs", schema.C_RESYNCS),
                ("gaps", schema.C_GAPS),
                ("stale_books", schema.C_STALE),
                ("malformed", schema.C_MALFORMED),
                ("venue_errors", schema.C_VENUE_ERRORS),
                ("rate_limited", schema.C_RATE_LIMITED),
            )
        },
        "orders": int(risk[schema.C_ORDERS]),
        "fills": int(risk[schema.C_FILLS]),
        "rejects": int(risk[schema.C_REJECTS]),
        "rejects_by_reason": {
            reason: int(risk[schema.REJECT_COUNTERS_BASE + code])
            for code, reason in enumerate(schema.REJECT_REASONS)
            if reason != "none" and risk[schema.REJECT_COUNTERS_BASE + code]
        },
        "trading": {
            "state": rk.STATE_NAMES[state],
            "reason": rk.REASONS[reason],
            "breaker_trips": int(gauges[rk.G_BREAKER_TRIPS]),
        },
        "pnl": {
            "realized": float(gauges[schema.G_REALIZED]),
            "unrealized": float(gauges[schema.G_UNREALIZED]),
            "fees": float(gauges[schema.G_FEES]),
        },
        "models": models_report(inference["ints"], inference["hist"]),
    }


def models_report(ints: np.ndarray, hists: np.ndarray) -> dict[str, Any]:
    """The inference stage's models since it started: per model that has run or timed out
    (shared memory does not say which are loaded; one that never ran is not listed), its runs,
    ticks lost to the deadline, ticks it was out of domain on, failed runs and run-time P99; and
    the share of signals that came from the rule-based fallback.

    ``out_of_domain_share`` is the model's out-of-domain ticks over the stage's ticks less those
    the model timed out on (None when that is 0). Shared memory has no count of the ticks each
    model saw, so this assumes the model was loaded all along: one loaded after the stage
    started, removed, or whose runs raised reads low."""
    by_model: dict[str, Any] = {}
    signals, fallbacks = int(ints[schema.C_SIGNALS]), int(ints[schema.C_FALLBACKS])
    for i, name in enumerate(schema.MODEL_NAMES):
        base = schema.MODEL_COUNTERS_BASE + i * schema.N_MODEL_COUNTERS
        runs, timeouts = (
            int(ints[base + schema.MODEL_RUNS]),
            int(ints[base + schema.MODEL_TIMEOUTS]),
        )
        ood = int(ints[base + schema.MODEL_OUT_OF_DOMAIN])
        if not runs and not timeouts and not ood:  # not loaded
            continue
        seen = signals - timeouts  # the ticks the model answered or was out of domain on
        lat = LatencySummary.of(hists[schema.H_MODEL_BASE + i])
        by_model[name] = {
            "runs": runs,
            "timeouts": timeouts,
            "out_of_domain": ood,
            # at most 1: read while the stage writes, C_SIGNALS can lag a batch behind
            "out_of_domain_share": min(ood / seen, 1.0) if seen > 0 else None,
            "errors": int(ints[base + schema.MODEL_ERRORS]),
            "p99_us": _nan_to_none(lat.p99_us),
        }
    return {
        "by_model": by_model,
        "signals": signals,
        "fallbacks": fallbacks,
        "fallback_share": fallbacks / signals if signals else None,
    }


# ---------------------------------------------------------------- rendering
def _num(x: float | int | None, fmt: str = ",.1f") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return format(x, fmt)


def _pct(share: float | None) -> str:
    return "-" if share is None else f"{100 * share:.1f}%"


def _cpus(cpus: list[int] | None) -> str:
    if cpus is None:
        return "-"
    if len(cpus) > 1 and cpus == list(range(cpus[0], cpus[-1] + 1)):
        return f"{cpus[0]}-{cpus[-1]}"
    return ",".join(map(str, cpus))


_COLUMNS: Final = (
    # header, alignment (< or >)
    ("stage", "<"),
    ("pid", ">"),
    ("up", "<"),
    ("cpus", "<"),
    ("cpu %", ">"),
    ("rss MiB", ">"),
    ("vcsw/s", ">"),
    ("ivcsw/s", ">"),
    ("in depth", ">"),
    ("fill %", ">"),
    ("rec/s", ">"),
    ("processed", ">"),
    ("p50 us", ">"),
    ("p99 us", ">"),
    ("p99.9 us", ">"),
    ("restarts", ">"),
)


def render_table(report: dict[str, Any]) -> str:
    """Render the report as an aligned text table with a summary below it."""
    rows: list[tuple[str, ...]] = [tuple(h for h, _ in _COLUMNS)]
    for role, s in report["stages"].items():
        rss = None if s["rss_bytes"] is None else s["rss_bytes"] / 2**20
        rows.append(
            (
                role,
                str(s["pid"]) if s["pid"] > 0 else "-",
                "yes" if s["alive"] else "NO",
                _cpus(s["cpus"]),
                _num(s["cpu_percent"]),
                _num(rss),
                _num(s["ctx_voluntary_per_s"], ",.0f"),
                _num(s["ctx_involuntary_per_s"], ",.0f"),
                _num(s["ring_depth"], ",d"),
                _num(s["ring_fill_pct"]),
                _num(s["throughput_per_s"], ",.0f"),
                _num(s["processed"], ",d"),
                _num(s["p50_us"], ",.1f"),
                _num(s["p99_us"], ",.1f"),
                _num(s["p999_us"], ",.1f"),
                _num(s["restarts"], "d"),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(_COLUMNS))]

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(
            c.ljust(w) if align == "<" else c.rjust(w)
            for c, w, (_, align) in zip(cells, widths, _COLUMNS, strict=True)
        ).rstrip()

    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(report["ts"]))
    t2o = report["tick_to_order_us"]
    pnl = report["pnl"]
    rejects = report["rejects_by_reason"]
    reasons = ", ".join(f"{k} {v:,}" for k, v in sorted(rejects.items(), key=lambda kv: -kv[1]))
    out = [
        f"hft monitor  namespace {report['namespace']!r}  {when}  "
        f"(rates over {report['interval_s']:.2f} s; latency since stage start)",
        "",
        line(rows[0]),
        line(tuple("-" * w for w in widths)),
        *(line(r) for r in rows[1:]),
        "",
        f"tick-to-order us   p50 {_num(t2o['p50'])}   p99 {_num(t2o['p99'])}   "
        f"p99.9 {_num(t2o['p999'])}   ({t2o['count']:,} orders measured)",
        f"dropped frames {report['dropped_frames']:,}   orders {report['orders']:,}   "
        f"fills {report['fills']:,}   rejects {report['rejects']:,}"
        + (f" ({reasons})" if reasons else ""),
        "feed   " + "   ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in report["feed"].items()),
        _trading_line(report["trading"]),
        f"PnL (quote)   realised {_num(pnl['realized'], ',.2f')}   "
        f"unrealised {_num(pnl['unrealized'], ',.2f')}   fees {_num(pnl['fees'], ',.2f')}",
        _models_line(report["models"]),
    ]
    return "\n".join(out) + "\n"


def _trading_line(trading: dict[str, Any]) -> str:
    reason = "" if trading["reason"] == "none" else f" ({trading['reason'].replace('_', ' ')})"
    return (
        f"trading {trading['state'].upper()}{reason}   "
        f"circuit breaker trips {trading['breaker_trips']:,}"
    )


def _models_line(models: dict[str, Any]) -> str:
    parts = [
        f"{name} runs {m['runs']:,} timeouts {m['timeouts']:,} "
        f"out-of-domain {m['out_of_domain']:,} ({_pct(m['out_of_domain_share'])}) "
        f"p99 {_num(m['p99_us'])} us" + (f" errors {m['errors']:,}" if m["errors"] else "")
        for name, m in models["by_model"].items()
    ]
    share = models["fallback_share"]
    fallback = "fallback -" if share is None else f"fallback {100 * share:.1f}% of signals"
    return "models   " + "   ".join([*(parts or ["none ran"]), fallback])


# ---------------------------------------------------------------- CLI
def _namespace(args: argparse.Namespace) -> str | None:
    """Return the namespace to watch, or None after printing a config error."""
    if args.namespace:
        return str(args.namespace)
    try:
        return config.load(args.config).engine.namespace
    except config.ConfigError as exc:
        if args.config is None:  # no engine.toml here: the default namespace
            return config.EngineConfig().namespace
        print(f"hft monitor: config error: {exc}", file=sys.stderr)
        return None


def _no_engine(watch: EngineWatch) -> str:
    ns = watch.namespace
    if watch.status == "error":
        return f"hft monitor: cannot attach to the engine in namespace {ns!r}: {watch.reason}"
    return f"hft monitor: no engine running in namespace {ns!r} ({watch.reason}); start one with ./run.sh paper"


def _emit(report: dict[str, Any], *, as_json: bool, clear: bool) -> None:
    if as_json:
        sys.stdout.write(orjson.dumps(report).decode() + "\n")
    else:
        sys.stdout.write((_CLEAR_HOME if clear else "") + render_table(report))
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    """``hft monitor [--config PATH] [--namespace NS] [--once] [--json] [--interval S]``."""
    p = argparse.ArgumentParser(
        prog="hft monitor", description="Per-stage CPU, context switches, ring fill and latency."
    )
    p.add_argument("--config", default=None, help=f"engine TOML (default: {config.DEFAULT_CONFIG})")
    p.add_argument(
        "--namespace", default=None, help="shared-memory namespace (default: engine.namespace)"
    )
    p.add_argument(
        "--once",
        action="store_true",
        help=f"print one report (sampled over {ONCE_INTERVAL_S} s) and exit",
    )
    p.add_argument("--json", action="store_true", help="print JSON (one document per refresh)")
    p.add_argument(
        "--interval",
        type=float,
        default=None,
        help=f"seconds between refreshes (default: {DEFAULT_INTERVAL_S})",
    )
    args = p.parse_args(argv)
    if args.interval is not None and not (math.isfinite(args.interval) and args.interval > 0):
        p.error("--interval must be a positive number of seconds")
    namespace = _namespace(args)
    if namespace is None:
        return 2
    interval_s = args.interval or (ONCE_INTERVAL_S if args.once else DEFAULT_INTERVAL_S)

    watch = EngineWatch(namespace=namespace)
    if watch.get() is None:
        print(_no_engine(watch), file=sys.stderr)
        return 1
    clear = not args.json and not args.once and sys.stdout.isatty()
    try:
        prev, generation = take_reading(watch), watch.generation
        while True:
            _sleep(interval_s)
            if watch.get() is None:
                if args.once:
                    print(_no_engine(watch), file=sys.stderr)
                    return 1
                sys.stdout.write(
                    (_CLEAR_HOME if clear else "") + _no_engine(watch) + " (waiting)\n"
                )
                sys.stdout.flush()
                continue
            cur = take_reading(watch)
            if watch.generation != generation:  # a new engine: rates need two of its readings
                prev, generation = cur, watch.generation
                continue
            _emit(summarize(prev, cur, namespace=namespace), as_json=args.json, clear=clear)
            if args.once:
                return 0
            prev = cur
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:  # `hft monitor | head`
        return 0
    finally:
        watch.close()


if __name__ == "__main__":
    raise SystemExit(main())
