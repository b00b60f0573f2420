"""The supervisor: creates the shared memory, spawns and pins the stages, restarts the dead,
and drains on SIGTERM or Ctrl+C.

Start order is consumers first (risk, route, inference, feature, ingest) so that no stage
publishes into a ring nobody reads yet. Each stage runs in its own session, so a Ctrl+C at
the terminal reaches only the supervisor, which then shuts down in order:

1. set ``draining`` in the control block: route sends nothing new, risk cancels every resting
   paper order and acknowledges with ``drained``;
2. stop the stages upstream first (ingest ... risk), waiting for the order and event rings to
   empty before risk goes, so no order or fill is left unprocessed;
3. stop the simulator and the exporter, print the summary (and write it as JSON), unlink
   every segment and semaphore, exit 0.

A stage that exits while the engine runs (a crash, ``kill -9``) is logged and restarted after
``restart_backoff_ms``; its ring cursors live in shared memory, so it resumes where it was.
A stage that stops heart-beating for ``HUNG_AFTER_S`` is killed and restarted the same way.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import psutil

from shm import schema, segment, stats
from stages.config import ROLES, Config
from stages.instruments import Instrument, fill_symbol_table, instrument
from stages.wiring import (
    CTL_DRAINED,
    CTL_DRAINING,
    CTL_EPOCH,
    CTL_MODE,
    CTL_PID,
    CTL_RESTARTS,
    Engine,
)

logger = logging.getLogger("ops.supervisor")

START_ORDER = ("risk", "route", "inference", "feature", "ingest")
STOP_ORDER = ("ingest", "feature", "inference", "route", "risk")
HUNG_AFTER_S = 5.0
STATUS_EVERY_S = 5.0
EXIT_ATTACH_FAILED = 3


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def clamp_cpus(cpus: tuple[int, ...]) -> list[int]:
    available = set(range(os.cpu_count() or 1))
    chosen = sorted(c for c in cpus if c in available)
    return chosen or sorted(available)


@dataclass
class Child:
    role: str
    argv: list[str]
    cpus: list[int]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    restart_times: deque[float] = field(default_factory=lambda: deque(maxlen=64))
    restart_at: float = 0.0
    last_pid: int = 0


class Supervisor:
    def __init__(
        self,
        cfg: Config,
        *,
        config_path: str,
        duration_s: float | None = None,
        log_dir: Path | None = None,
        summary_path: Path | None = None,
        quiet: bool = False,
        instruments: list[Instrument] | None = None,
    ) -> None:
        self.cfg = cfg
        # the venue's symbol rules (fetched or cached by the caller); the sim's own by default
        self.instruments = instruments or [instrument(n) for n in cfg.feed.symbols]
        self.ns = cfg.engine.namespace
        self.config_path = config_path
        self.duration_s = duration_s
        self.log_dir = log_dir or Path(tempfile.mkdtemp(prefix=f"hft-{self.ns}-"))
        self.summary_path = summary_path
        self.quiet = quiet
        self.engine: Engine | None = None
        self.children: dict[str, Child] = {}
        self.sim: Child | None = None
        self.feed_url = ""
        self.stopping = False
        self.exit_code = 0
        self.started_s = 0.0
        self.exporter: Any = None
        self.metrics_port = 0
        self._stop_requested = False

    # ------------------------------------------------------------------ start
    def _request_stop(self, signum: int, frame: FrameType | None) -> None:
        if not self._stop_requested:
            logger.info("stop requested", extra={"signal": signal.Signals(signum).name})
        self._stop_requested = True

    def start(self) -> None:
        cfg = self.cfg
        self.log_dir.mkdir(parents=True, exist_ok=True)
        os.sched_setaffinity(0, clamp_cpus(cfg.cpu.supervisor))
        stale = segment.find_stale(self.ns)
        if stale:
            logger.warning("removing segments left by a crashed run", extra={"segments": stale})
            segment.unlink_all(self.ns)
        self.engine = eng = Engine.create(cfg)
        eng.control[CTL_MODE] = schema.MODE_CODES[cfg.engine.mode]
        eng.control[CTL_EPOCH] = time.time_ns()
        fill_symbol_table(eng.symbols, self.instruments)
        sup_stats = eng.block_stats(stats.SUPERVISOR_BLOCK)
        sup_stats.set(schema.C_PID, os.getpid())
        sup_stats.set(schema.C_STARTED_NS, time.monotonic_ns())
        sup_stats.release()
        if cfg.feed.source == "sim":
            self._start_sim()
        else:
            self.feed_url = ""  # ingest uses the venue's public endpoint
        self._start_exporter()
        for role in START_ORDER:
            if role == "ingest":  # the feed starts only when every consumer is ready to trade
                self._wait_ready([r for r in START_ORDER if r != "ingest"])
                if self._stop_requested:
                    break
            argv = [
                sys.executable,
                "-m",
                "stages",
                role,
                "--config",
                self.config_path,
                "--namespace",
                self.ns,
            ]
            if role == "ingest" and self.feed_url:
                argv += ["--feed-url", self.feed_url]
            child = Child(
                role, argv, clamp_cpus(cfg.cpu.for_role(role)), self.log_dir / f"{role}.log"
            )
            self.children[role] = child
            self._spawn(child)
        self.started_s = time.monotonic()
        logger.info(
            "engine started",
            extra={
                "namespace": self.ns,
                "mode": cfg.engine.mode,
                "feed": cfg.feed.source,
                "symbols": list(cfg.feed.symbols),
                "logs": str(self.log_dir),
                "metrics_port": self.metrics_port,
                "pids": {r: c.last_pid for r, c in self.children.items()},
            },
        )

    def _wait_ready(self, roles: list[str], timeout_s: float = 120.0) -> None:
        """Wait until each stage runs its duty cycle (kernels compiled, rings attached)."""
        eng = self.engine
        assert eng is not None
        deadline = time.monotonic() + timeout_s
        pending = list(roles)
        while pending:
            for role in list(pending):
                child = self.children[role]
                ints = eng.stats_all[schema.ROLE_INDEX[role]]["ints"]
                if int(ints[schema.C_PID]) == child.last_pid and int(ints[schema.C_STARTED_NS]) > 0:
                    pending.remove(role)
                elif child.proc is not None and child.proc.poll() is not None:
                    raise RuntimeError(
                        f"stage {role} exited at start (code {child.proc.returncode}); see {child.log_path}"
                    )
            if self._stop_requested:
                return  # Ctrl+C while starting: run() drains what started
            if pending and time.monotonic() > deadline:
                raise RuntimeError(f"stages {pending} not ready after {timeout_s:.0f} s")
            if pending:
                time.sleep(0.02)

    def _start_sim(self) -> None:
        cfg = self.cfg.feed
        port = cfg.port or free_port(cfg.host)
        ready = self.log_dir / "sim.port"
        ready.unlink(missing_ok=True)
        argv = [
            sys.executable,
            "-m",
            "ops.sim",
            "--symbols",
            ",".join(cfg.symbols),
            "--rate",
            str(cfg.updates_per_sec),
            "--host",
            cfg.host,
            "--port",
            str(port),
            "--seed",
            str(cfg.seed),
            "--ready-file",
            str(ready),
            "--exit-with-parent",
        ]
        self.sim = Child("sim", argv, clamp_cpus(self.cfg.cpu.sim), self.log_dir / "sim.log")
        self._spawn(self.sim)
        deadline = time.monotonic() + 15
        while not ready.exists():
            if self.sim.proc is not None and self.sim.proc.poll() is not None:
                raise RuntimeError(
                    f"the market simulator exited at start (code {self.sim.proc.returncode}); "
                    f"see {self.sim.log_path}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the market simulator did not start within 15 s; see {self.sim.log_path}"
                )
            time.sleep(0.02)
        self.feed_url = f"ws://{cfg.host}:{port}/ws"

    def _start_exporter(self) -> None:
        ops = self.cfg.ops
        try:
            from ops.exporter import start_exporter
        except ImportError as exc:  # pragma: no cover - the exporter ships with the package
            logger.error("exporter unavailable", extra={"error": str(exc)})
            return
        try:
            server, _thread, port = start_exporter(self.ns, ops.metrics_host, ops.metrics_port)
        except OSError as exc:
            logger.error(
                "cannot serve Prometheus metrics; continuing without them",
                extra={"host": ops.metrics_host, "port": ops.metrics_port, "error": str(exc)},
            )
            return
        self.exporter = server
        self.metrics_port = port

    def _spawn(self, child: Child) -> None:
        log = open(child.log_path, "ab")  # noqa: SIM115 - handed to the child
        try:
            child.proc = subprocess.Popen(
                child.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        finally:
            log.close()
        child.last_pid = child.proc.pid
        if child.role == "sim":
            try:
                os.sched_setaffinity(child.proc.pid, child.cpus)
            except OSError:
                pass
        elif self.engine is not None:
            self.engine.control[CTL_PID + schema.ROLE_INDEX[child.role]] = child.proc.pid

    # ------------------------------------------------------------------ run
    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._request_stop)
        signal.signal(signal.SIGINT, self._request_stop)
        signal.signal(signal.SIGHUP, self._request_stop)  # terminal closed: drain, do not vanish
        try:
            self.start()
        except Exception as exc:  # whatever it was, stop what started and remove the segments
            logger.error(
                "engine failed to start: %s",
                exc,
                exc_info=not isinstance(exc, segment.SegmentError | RuntimeError),
            )
            self._shutdown(summary=False)
            return 1
        if self._stop_requested:
            self._shutdown(summary=True)
            return self.exit_code
        next_status = time.monotonic() + STATUS_EVERY_S
        try:
            while not self._stop_requested:
                now = time.monotonic()
                if self.duration_s is not None and now - self.started_s >= self.duration_s:
                    break
                self._watch(now)
                if self.exit_code:
                    break
                if now >= next_status and not self.quiet:
                    next_status = now + STATUS_EVERY_S
                    self._status_line(now)
                time.sleep(0.05)
        finally:
            self._shutdown(summary=True)
        return self.exit_code

    def _watch(self, now: float) -> None:
        eng = self.engine
        assert eng is not None
        for child in [*self.children.values(), *([self.sim] if self.sim else [])]:
            proc = child.proc
            if proc is None:
                if now >= child.restart_at:
                    self._spawn(child)
                    logger.info(
                        "stage restarted",
                        extra={
                            "role": child.role,
                            "pid": child.last_pid,
                            "restarts": child.restarts,
                        },
                    )
                continue
            code = proc.poll()
            if code is None:
                if child.role != "sim":
                    self._check_heartbeat(child, now)
                continue
            if code == EXIT_ATTACH_FAILED or code == 2:
                logger.error(
                    "stage cannot run (bad config or shared-memory layout); stopping the engine",
                    extra={"role": child.role, "code": code, "log": str(child.log_path)},
                )
                self.exit_code = 1
                return
            child.proc = None
            child.restarts += 1
            child.restart_times.append(now)
            recent = sum(1 for t in child.restart_times if now - t < 60)
            how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
            logger.error(
                "stage died; restarting",
                extra={
                    "role": child.role,
                    "pid": proc.pid,
                    "how": how,
                    "restarts": child.restarts,
                    "log": str(child.log_path),
                },
            )
            if child.role != "sim":
                eng.control[CTL_RESTARTS + schema.ROLE_INDEX[child.role]] = child.restarts
            if recent > self.cfg.ops.max_restarts_per_minute:
                logger.error(
                    "stage keeps dying; stopping the engine",
                    extra={"role": child.role, "recent": recent},
                )
                self.exit_code = 1
                return
            child.restart_at = now + self.cfg.ops.restart_backoff_ms / 1e3

    def _check_heartbeat(self, child: Child, now: float) -> None:
        eng = self.engine
        assert eng is not None
        ints = eng.stats_all[schema.ROLE_INDEX[child.role]]["ints"]
        started, hb = int(ints[schema.C_STARTED_NS]), int(ints[schema.C_HEARTBEAT_NS])
        if not started or int(ints[schema.C_PID]) != child.last_pid:
            return
        age_s = (time.monotonic_ns() - hb) / 1e9
        if age_s > HUNG_AFTER_S and child.proc is not None:
            logger.error(
                "stage stopped heart-beating; killing it",
                extra={"role": child.role, "age_s": round(age_s, 1)},
            )
            child.proc.kill()

    def _status_line(self, now: float) -> None:
        s = self.collect_summary()
        t2o = s["tick_to_order_us"]
        print(
            f"[{now - self.started_s:5.0f}s] snapshots {s['snapshots']:>8}  orders {s['orders']:>5}  "
            f"fills {s['fills']:>5}  rejects {s['rejects']:>4}  dropped {s['dropped_frames']:>3}  "
            f"pnl {s['pnl']['realized'] + s['pnl']['unrealized']:+10.2f}  "
            f"tick-to-order p50/p99 {_fmt(t2o['p50'])}/{_fmt(t2o['p99'])} us",
            file=sys.stderr,
            flush=True,
        )

    # ------------------------------------------------------------------ stop
    def _shutdown(self, *, summary: bool) -> None:
        self.stopping = True
        eng = self.engine
        try:
            if eng is not None and "risk" in self.children:
                self._drain(eng)
            for role in STOP_ORDER:
                child = self.children.get(role)
                if child is None:
                    continue
                if (
                    role == "risk"
                    and eng is not None
                    and not self._wait_empty(eng, "orders", "risk")
                ):
                    logger.error("orders were still queued for risk at shutdown")
                    self.exit_code = self.exit_code or 1
                self._terminate(child)
            if self.sim is not None:
                self._terminate(self.sim)
            if self.exporter is not None:
                try:
                    from ops.exporter import stop_exporter

                    stop_exporter(self.exporter)
                except Exception:  # best effort at exit
                    logger.exception("exporter did not stop cleanly")
            if eng is not None and summary:
                self._report()
        finally:
            if eng is not None:
                eng.unlink()  # whatever happened above, leave nothing in /dev/shm
            logger.info("engine stopped", extra={"namespace": self.ns, "exit_code": self.exit_code})

    def _drain(self, eng: Engine, timeout_s: float = 5.0) -> None:
        """Stop new orders and have risk cancel every resting one; restart risk if it is dead."""
        eng.control[CTL_DRAINING] = 1
        deadline = time.monotonic() + timeout_s
        while not eng.control[CTL_DRAINED]:
            now = time.monotonic()
            if now > deadline:
                logger.error(
                    "risk did not confirm the drain: resting orders may remain",
                    extra={"timeout_s": timeout_s},
                )
                self.exit_code = self.exit_code or 1
                return
            risk = self.children["risk"]
            if risk.proc is None or risk.proc.poll() is not None:
                self._watch(now)  # a dead risk stage is restarted to carry out the drain
            time.sleep(0.01)

    def _report(self) -> None:
        doc = self.collect_summary()
        print(format_summary(doc), file=sys.stderr if self.quiet else sys.stdout, flush=True)
        if self.summary_path is not None:
            import orjson

            try:
                self.summary_path.write_bytes(
                    orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY)
                )
            except OSError as exc:
                logger.error(
                    "cannot write the summary",
                    extra={"path": str(self.summary_path), "error": exc.strerror},
                )
                self.exit_code = self.exit_code or 1

    def _wait_empty(
        self, eng: Engine, ring_name: str, reader_role: str, timeout_s: float = 2.0
    ) -> bool:
        """Wait until a reader has consumed its ring; return whether it did."""
        r = eng.reader(ring_name, reader_role)
        deadline = time.monotonic() + timeout_s
        while r.depth(r.reader) > 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        empty = r.depth(r.reader) <= 0
        r.release()
        return empty

    def _terminate(self, child: Child) -> None:
        proc = child.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=3.0)
        except subprocess.TimeoutExpired:
            logger.warning("stage ignored SIGTERM; killing it", extra={"role": child.role})
            proc.kill()
            proc.wait(timeout=3.0)

    # ------------------------------------------------------------------ summary
    def collect_summary(self) -> dict[str, Any]:
        eng = self.engine
        assert eng is not None
        blocks = eng.stats_all.copy()
        ints = {r: blocks[schema.ROLE_INDEX[r]]["ints"] for r in ROLES}
        risk_g = blocks[schema.ROLE_INDEX["risk"]]["gauges"]
        t2o = stats.LatencySummary.of(blocks[schema.ROLE_INDEX["risk"]]["hist"][schema.H_E2E])
        stage_docs = {}
        for r in ROLES:
            lat = stats.LatencySummary.of(blocks[schema.ROLE_INDEX[r]]["hist"][schema.H_DURATION])
            child = self.children.get(r)
            stage_docs[r] = {
                "pid": child.last_pid if child else 0,
                "cpus": child.cpus if child else [],
                "processed": int(ints[r][schema.C_PROCESSED]),
                "p50_us": _num(lat.p50_us),
                "p99_us": _num(lat.p99_us),
                "restarts": child.restarts if child else 0,
            }
        return {
            "mode": self.cfg.engine.mode,
            "duration_s": round(time.monotonic() - self.started_s, 3) if self.started_s else 0.0,
            "symbols": list(self.cfg.feed.symbols),
            "snapshots": int(ints["ingest"][schema.C_SNAPSHOTS]),
            "features": int(ints["feature"][schema.C_PUBLISHED]),
            "signals": int(ints["inference"][schema.C_SIGNALS]),
            "orders": int(ints["risk"][schema.C_ORDERS]),
            "fills": int(ints["risk"][schema.C_FILLS]),
            "rejects": int(ints["risk"][schema.C_REJECTS]),
            "dropped_frames": int(sum(int(ints[r][schema.C_DROPPED]) for r in ROLES)),
            "pnl": {
                "realized": round(float(risk_g[schema.G_REALIZED]), 6),
                "unrealized": round(float(risk_g[schema.G_UNREALIZED]), 6),
            },
            "tick_to_order_us": {
                "p50": _num(t2o.p50_us),
                "p99": _num(t2o.p99_us),
                "p999": _num(t2o.p999_us),
            },
            "stages": stage_docs,
        }


def _num(x: float) -> float | None:
    return None if math.isnan(x) else round(x, 2)


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}"


def format_summary(doc: dict[str, Any]) -> str:
    """Render the run summary as a table for the terminal."""
    lines = [
        "",
        f"run summary ({doc['mode']}, {doc['duration_s']:.1f} s, symbols {', '.join(doc['symbols'])})",
        f"  snapshots {doc['snapshots']}   features {doc['features']}   signals {doc['signals']}",
        f"  orders {doc['orders']}   fills {doc['fills']}   rejects {doc['rejects']}   "
        f"dropped frames {doc['dropped_frames']}",
        f"  pnl realised {doc['pnl']['realized']:+.2f}   unrealised {doc['pnl']['unrealized']:+.2f}",
        f"  tick-to-order us  p50 {_fmt(doc['tick_to_order_us']['p50'])}   p99 {_fmt(doc['tick_to_order_us']['p99'])}"
        f"   p99.9 {_fmt(doc['tick_to_order_us']['p999'])}",
        "",
        f"  {'stage':<10} {'pid':>8} {'cpus':>6} {'processed':>10} {'p50 us':>8} {'p99 us':>8} {'restarts':>8}",
    ]
    for role, s in doc["stages"].items():
        cpus = ",".join(str(c) for c in s["cpus"])
        lines.append(
            f"  {role:<10} {s['pid']:>8} {cpus:>6} {s['processed']:>10} {_fmt(s['p50_us']):>8} "
            f"{_fmt(s['p99_us']):>8} {s['restarts']:>8}"
        )
    return "\n".join(lines)


def is_running(namespace: str) -> int:
    """Return the pid of a live supervisor of ``namespace``, or 0."""
    header = segment.read_header(segment.segment_name(namespace, "control"))
    if header is None or not segment.pid_alive(header.owner_pid):
        return 0
    try:
        psutil.Process(header.owner_pid)
    except psutil.Error:
        return 0
    return header.owner_pid
