"""``python -m stages <role> --config PATH``: run one pipeline stage in this process.

Pins the process to its CPUs and caps native thread pools *before* numpy or onnxruntime is
imported (their pools start at import and inherit the affinity of the importing thread).
"""

from __future__ import annotations

import argparse
import os
import sys

from stages import config

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ.setdefault(_var, "1")


def pin(cpus: tuple[int, ...], *, who: str) -> set[int]:
    """Pin this process to ``cpus`` that exist here; warn about and drop the others."""
    available = os.sched_getaffinity(0) | set(range(os.cpu_count() or 1))
    chosen = {c for c in cpus if c in available}
    if not chosen:
        chosen = set(available)
        print(
            f"{who}: none of CPUs {list(cpus)} exist here; running on {sorted(chosen)}",
            file=sys.stderr,
        )
    elif chosen != set(cpus):
        print(
            f"{who}: CPUs {sorted(set(cpus) - chosen)} do not exist here; pinned to {sorted(chosen)}",
            file=sys.stderr,
        )
    os.sched_setaffinity(0, chosen)
    return chosen


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m stages", description="Run one pipeline stage.")
    p.add_argument("role", choices=config.ROLES)
    p.add_argument(
        "--config", default=str(config.DEFAULT_CONFIG), help="engine TOML (default: %(default)s)"
    )
    p.add_argument(
        "--namespace", default=None, help="shared-memory namespace (default: engine.namespace)"
    )
    p.add_argument(
        "--feed-url", default=None, help="ingest: WebSocket URL of the feed (default from [feed])"
    )
    args = p.parse_args(argv)
    try:
        cfg = config.load(args.config)
    except config.ConfigError as exc:
        print(f"stage {args.role}: config error: {exc}", file=sys.stderr)
        return 2
    pin(cfg.cpu.for_role(args.role), who=f"stage {args.role}")

    from stages.runner import run_stage  # numpy is imported only now, after pinning

    return run_stage(
        args.role, cfg, namespace=args.namespace or cfg.engine.namespace, feed_url=args.feed_url
    )


if __name__ == "__main__":
    raise SystemExit(main())
