"""The ``hft`` command: one entry point for running, watching and maintaining the engine.

    hft paper [--duration S] [--config PATH] [--summary PATH] [--namespace NS]
    hft monitor [--once] [--json] [--interval S]
    hft kill [--reset] | hft pause | hft resume      the control block of a running engine
    hft exporter | hft sim ... | hft cleanup
    hft export-features REC --out F.parquet | hft train F.parquet --asset-class C --out DIR

Exit codes: 0 success, 1 runtime failure, 2 wrong usage or bad configuration.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from stages import config, log


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", default=str(config.DEFAULT_CONFIG), help="engine TOML (default: %(default)s)"
    )
    p.add_argument(
        "--namespace", default=None, help="shared-memory namespace (default: engine.namespace)"
    )


def _load(args: argparse.Namespace, **overrides: dict[str, object]) -> config.Config:
    ov: dict[str, dict[str, object]] = {k: dict(v) for k, v in overrides.items()}
    if getattr(args, "namespace", None):
        ov.setdefault("engine", {})["namespace"] = args.namespace
    return config.load(args.config, overrides=ov)


def cmd_paper(args: argparse.Namespace) -> int:
    from ops.supervisor import Supervisor, is_running
    from stages.venues.symbols import SymbolError, load_instruments

    if args.duration is not None and not args.duration > 0:
        print("hft paper: --duration must be a positive number of seconds", file=sys.stderr)
        return 2
    cfg = _load(args, engine={"mode": "paper"})
    pid = is_running(cfg.engine.namespace)
    if pid:
        print(
            f"hft paper: an engine already runs in namespace {cfg.engine.namespace!r} (supervisor pid {pid}); "
            "stop it or pass --namespace",
            file=sys.stderr,
        )
        return 1
    log.setup("supervisor")
    try:
        loaded = load_instruments(cfg.feed)
    except SymbolError as exc:
        print(f"hft paper: symbols: {exc}", file=sys.stderr)
        return 2
    if loaded.warning:
        logging.getLogger("ops.cli").warning(loaded.warning)
    sup = Supervisor(
        cfg,
        instruments=loaded.instruments,
        config_path=args.config,
        duration_s=args.duration,
        log_dir=Path(args.log_dir) if args.log_dir else None,
        summary_path=Path(args.summary) if args.summary else None,
    )
    return sup.run()


def cmd_not_yet(args: argparse.Namespace) -> int:
    print(
        f"hft {args.cmd}: not available yet: this build trades in paper mode only "
        "(live order entry and backtests come with their own gateways); use ./run.sh paper",
        file=sys.stderr,
    )
    return 2


def cmd_monitor(args: argparse.Namespace) -> int:
    from ops import monitor

    return monitor.main(args.rest)


def cmd_exporter(args: argparse.Namespace) -> int:
    from ops import exporter

    return exporter.main(args.rest)


def cmd_sim(args: argparse.Namespace) -> int:
    from ops import sim

    return sim.main(args.rest)


def cmd_control(args: argparse.Namespace) -> int:
    """Flip the control block of a running engine: kill switch, pause, resume."""
    from shm import schema, segment
    from stages.wiring import CTL_KILL, CTL_STATE, Engine

    ns = args.namespace or config.load(args.config).engine.namespace
    try:
        eng = Engine.attach(ns)
    except segment.SegmentError as exc:
        print(f"hft {args.cmd}: no engine running in namespace {ns!r} ({exc})", file=sys.stderr)
        return 1
    ctl = eng.control
    if args.cmd == "kill":
        ctl[CTL_KILL] = 0 if args.reset else 1
    elif args.cmd == "pause":
        ctl[CTL_STATE] = schema.CTRL_PAUSED
    elif args.cmd == "resume":
        ctl[CTL_STATE] = schema.CTRL_RUNNING
    from shm.idle import wake
    from stages.wiring import bell_id

    for role in ("risk", "route"):  # act now, not at their next timed wake-up
        wake(ns, bell_id(role))
    state = {schema.CTRL_RUNNING: "running", schema.CTRL_PAUSED: "paused"}.get(
        int(ctl[CTL_STATE]), "?"
    )
    from stages.riskengine import halt_reason, reason_name

    k = int(ctl[CTL_KILL])
    kill = f"on ({reason_name(halt_reason(k)).replace('_', ' ')})" if k else "off"
    print(f"namespace {ns}: trading {state}, kill switch {kill}")
    return 0


def cmd_cleanup(args: argparse.Namespace) -> int:
    from shm import segment

    stale = segment.find_stale(args.namespace)
    namespaces = sorted({name.split(".")[1] for name in stale})
    n = sum(segment.unlink_all(ns) for ns in namespaces)
    print(
        f"removed {n} stale segments and semaphores"
        + (f" in {', '.join(namespaces)}" if namespaces else "")
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hft", description="Low-latency trading pipeline")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    pp = sub.add_parser(
        "paper", help="trade on paper against the configured feed (default: the embedded sim)"
    )
    _add_config(pp)
    pp.add_argument(
        "--duration", type=float, default=None, help="stop by itself after this many seconds"
    )
    pp.add_argument("--summary", default=None, help="write the run summary as JSON to this path")
    pp.add_argument(
        "--log-dir", default=None, help="where stage logs go (default: a new temporary directory)"
    )
    pp.set_defaults(func=cmd_paper)

    for name in ("live", "backtest", "terminal"):
        sp = sub.add_parser(name, help=f"{name} (not available in this build)")
        sp.add_argument("rest", nargs=argparse.REMAINDER)
        sp.set_defaults(func=cmd_not_yet)

    for name, func, help_ in (
        (
            "monitor",
            cmd_monitor,
            "per-stage latency, CPU and ring monitor (--once --json for scripts)",
        ),
        ("exporter", cmd_exporter, "serve Prometheus metrics for a running engine"),
        ("sim", cmd_sim, "run the embedded market simulator on its own"),
        ("record", cmd_record, "record a venue's raw public feed: --venue V --symbols A,B --out F"),
        ("replay", cmd_replay, "replay a recording through the real parser and books (--tob CSV)"),
        ("fake-venue", cmd_fake_venue, "serve a recording as a fake Binance/Hyperliquid venue"),
        (
            "export-features",
            cmd_export_features,
            "replay a recording through the feature kernels into Parquet: REC --out F.parquet",
        ),
        ("train", cmd_train, "train the four models on exported features: F.parquet --out DIR"),
    ):
        sp = sub.add_parser(name, help=help_, add_help=False)
        sp.add_argument("rest", nargs=argparse.REMAINDER)
        sp.set_defaults(func=func)

    for name, help_ in (
        (
            "kill",
            "activate the kill switch: cancel every open order, block new ones (--reset to clear)",
        ),
        ("pause", "stop sending new orders; resting orders stay"),
        ("resume", "undo pause (a kill switch stays until kill --reset)"),
    ):
        kp = sub.add_parser(name, help=help_)
        _add_config(kp)
        if name == "kill":
            kp.add_argument("--reset", action="store_true", help="clear the kill switch")
        kp.set_defaults(func=cmd_control)

    cp = sub.add_parser("cleanup", help="remove shared memory left behind by crashed engines")
    cp.add_argument("--namespace", default=None)
    cp.set_defaults(func=cmd_cleanup)
    return p


def cmd_record(args: argparse.Namespace) -> int:
    from ops import record

    return record.main(args.rest)


def cmd_replay(args: argparse.Namespace) -> int:
    from ops import replay

    return replay.main(args.rest)


def cmd_fake_venue(args: argparse.Namespace) -> int:
    from ops import fakevenue

    return fakevenue.main(args.rest)


def cmd_export_features(args: argparse.Namespace) -> int:
    from ops import export

    return export.main(args.rest)


def cmd_train(args: argparse.Namespace) -> int:
    from ops import train

    return train.main(args.rest)


PASSTHROUGH = {
    "monitor": cmd_monitor,
    "exporter": cmd_exporter,
    "sim": cmd_sim,
    "record": cmd_record,
    "replay": cmd_replay,
    "fake-venue": cmd_fake_venue,
    "export-features": cmd_export_features,
    "train": cmd_train,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in PASSTHROUGH:  # these parse their own options
        return PASSTHROUGH[argv[0]](argparse.Namespace(cmd=argv[0], rest=argv[1:]))
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except config.ConfigError as exc:
        print(f"hft {args.cmd}: config error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    raise SystemExit(main())
