"""Benchmark driver: ``python -m benchmarks [--quick] [--json PATH] [--only NAME[,NAME]]``.

Runs each registered section in order (each module exposes ``run(*, quick: bool) -> dict``)
and prints ONE JSON document on stdout (also written to PATH with ``--json``)::

    {"machine": {...}, "quick": bool, "ring": {...}, "pipeline": {...}}

Progress and a short human-readable table go to stderr, so stdout stays machine-readable.
A section whose module does not exist yet is recorded as ``{"error": "not available: ..."}``
and skipped; a section that fails (raises, or its module fails to import) is recorded as
``{"error": "<message>"}``, the others still run, and the exit code is 1.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import math
import os
import platform
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np

# (key in the JSON document, module exposing run(*, quick: bool) -> dict), in run order
REGISTRY: Final[list[tuple[str, str]]] = [
    ("ring", "benchmarks.ring"),
    ("pipeline", "benchmarks.pipeline"),
    ("market_data", "benchmarks.market_data"),
    ("features", "benchmarks.features"),
    ("inference", "benchmarks.inference"),
    ("kill_switch", "benchmarks.kill_switch"),
]

_COLUMNS: Final = (
    ("p50_us", "p50 us", "{:10.2f}"),
    ("p99_us", "p99 us", "{:10.2f}"),
    ("p999_us", "p99.9 us", "{:10.2f}"),
    ("msgs_per_s", "msgs/s", "{:13,.0f}"),
    ("batch_msgs_per_s", "batched/s", "{:13,.0f}"),
)


def _log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (platform's guess elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    return {
        "cpu model": cpu_model(),
        "cores": os.cpu_count(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "kernel": f"{platform.system()} {platform.release()}",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }


def jsonable(obj: Any) -> Any:
    """Plain JSON types only: numpy scalars unwrapped, non-finite floats as null."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if obj is None or isinstance(obj, str | int | float | bool):
        return obj
    return str(obj)


def run_section(key: str, module_name: str, *, quick: bool) -> tuple[dict[str, Any], bool]:
    """Import and run one section; return (its result or {"error": ...}, whether it failed)."""
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name or module_name.startswith(f"{exc.name}."):
            _log(f"{key}: skipped, {module_name} is not available yet")
            return {"error": f"not available: {exc}"}, False
        _log(f"{key}: cannot import {module_name}:\n{traceback.format_exc()}")
        return {"error": f"cannot import {module_name}: {exc!r}"}, True
    except Exception as exc:
        _log(f"{key}: cannot import {module_name}:\n{traceback.format_exc()}")
        return {"error": f"cannot import {module_name}: {exc!r}"}, True
    _log(f"{key}: running ({'quick' if quick else 'full'})")
    t0 = time.monotonic()
    try:
        result = module.run(quick=quick)
    except Exception as exc:
        _log(f"{key}: FAILED after {time.monotonic() - t0:.1f} s:\n{traceback.format_exc()}")
        return {"error": f"{type(exc).__name__}: {exc}"}, True
    _log(f"{key}: done in {time.monotonic() - t0:.1f} s")
    if not isinstance(result, dict):
        return {"error": f"run() returned {type(result).__name__}, not a dict"}, True
    return result, False


def _fmt(value: Any, spec: str) -> str:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return spec.format(value)
    width = len(spec.format(0))
    return f"{'-':>{width}}"


def table(doc: dict[str, Any]) -> str:
    """A short human-readable summary of the document (rows: contenders or sub-results)."""
    lines = []
    for key, _module in REGISTRY:
        section = doc.get(key)
        if not isinstance(section, dict):
            continue
        lines.append(f"== {key}")
        if "error" in section:
            lines.append(f"   error: {str(section['error'])[:300]}")
            continue
        rows = {
            k: v
            for k, v in section.items()
            if isinstance(v, dict) and any(c in v for c, _h, _f in _COLUMNS)
        }
        if rows:
            head = "".join(f"{h:>{len(f.format(0))}}" for _c, h, f in _COLUMNS)
            lines.append(f"   {'':16s}{head}")
            for name, row in rows.items():
                cells = "".join(_fmt(row.get(c), f) for c, _h, f in _COLUMNS)
                lines.append(f"   {name:16s}{cells}")
        for k, v in section.items():
            if k in rows:
                continue
            if isinstance(v, dict):
                lines.append(f"   {k}: {_items(v)}")
            elif isinstance(v, list) and v and all(isinstance(i, dict) for i in v):
                lines.extend(f"   {k}[{i}]: {_items(d)}" for i, d in enumerate(v))
            else:
                lines.append(f"   {k}: {_scalar(v)}")
    return "\n".join(lines)


def _scalar(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    text = str(v)
    return text if len(text) <= 120 else text[:117] + "..."


def _items(d: dict[str, Any]) -> str:
    return ", ".join(f"{k}={_scalar(v)}" for k, v in d.items())


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Run the benchmark sections and print one JSON document on stdout.",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes (well under 2 min)")
    parser.add_argument("--json", metavar="PATH", type=Path, help="also write the JSON here")
    parser.add_argument(
        "--only",
        metavar="NAME[,NAME]",
        help=f"run only these sections (of: {', '.join(k for k, _ in REGISTRY)})",
    )
    args = parser.parse_args(argv)
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = sorted(set(names) - {k for k, _ in REGISTRY})
        if unknown:
            parser.error(f"unknown section(s) {', '.join(unknown)}")
        args.only = set(names)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    doc: dict[str, Any] = {"machine": machine_info(), "quick": bool(args.quick)}
    failed = False
    t0 = time.monotonic()
    for key, module_name in REGISTRY:
        if args.only and key not in args.only:
            continue
        doc[key], section_failed = run_section(key, module_name, quick=args.quick)
        failed |= section_failed
    text = json.dumps(jsonable(doc), indent=2, allow_nan=False)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    print(text, flush=True)
    print(table(doc), file=sys.stderr)
    _log(f"total {time.monotonic() - t0:.1f} s; {'FAILED' if failed else 'ok'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
