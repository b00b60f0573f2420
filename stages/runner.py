"""The stage runner: one process, one agent, one duty-cycle loop.

The runner owns everything that is not the stage's logic: attaching to shared memory (with
the layout check), signals, the idle strategy, the heartbeat, freezing the GC after warm-up,
and shutdown. The agent only does work and says how much (``do_work() -> int``), as in
Agrona's ``AgentRunner``.

GC: before the first duty cycle (imports done, kernels compiled) the runner runs one full
collection and ``gc.freeze()``s everything alive, so later collections scan only the few
objects the hot path allocates; after a warm-up it freezes again (an O(1) splice, no scan).
A full collection once the stage trades stalled it for ~80 ms with numba loaded.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import time
from collections.abc import Callable
from types import FrameType
from typing import Protocol

from shm import schema
from shm.idle import make_idle
from shm.ring import RingReader
from shm.segment import SegmentError
from shm.stats import StageStats
from stages import log
from stages.config import Config
from stages.wiring import CTL_PID, Engine, bell_id

logger = logging.getLogger("stages.runner")

HEARTBEAT_EVERY_NS = 50_000_000
WARMUP_NS = 2_000_000_000


class Agent(Protocol):
    role: str
    readers: list[RingReader]  # rings whose doorbell this stage sleeps on (empty: it blocks itself)

    def do_work(self) -> int: ...

    def on_close(self) -> None: ...


AgentFactory = Callable[[Config, Engine, StageStats], Agent]


def agent_factory(role: str, *, feed_url: str | None = None) -> AgentFactory:
    """Return the constructor of a role's agent (imported lazily: each stage loads only its own)."""
    if role == "ingest":
        from stages.ingest import IngestAgent

        return lambda cfg, eng, st: IngestAgent(cfg, eng, st, feed_url=feed_url)
    if role == "feature":
        from stages.feature import FeatureAgent

        return FeatureAgent
    if role == "inference":
        from stages.inference import InferenceAgent

        return InferenceAgent
    if role == "route":
        from stages.route import RouteAgent

        return RouteAgent
    if role == "risk":
        from stages.risk import RiskAgent

        return RiskAgent
    raise ValueError(f"unknown role {role!r}")


class Runner:
    """Drive an agent until a signal or ``stop()``."""

    def __init__(self, agent: Agent, stats: StageStats, cfg: Config, *, namespace: str) -> None:
        self.agent = agent
        self.stats = stats
        self.running = True
        idle_name = cfg.idle.for_role(agent.role)
        self.idle = make_idle(
            idle_name,
            namespace=namespace,
            bell_id=bell_id(agent.role),
            readers=agent.readers,
            stats=stats,
            timeout_ms=min(
                cfg.idle.block_timeout_ms, getattr(agent, "max_sleep_ms", cfg.idle.block_timeout_ms)
            ),
        )
        self.idle_name = idle_name if agent.readers or idle_name != "block" else "self-blocking"

    def stop(self, *_: object) -> None:
        self.running = False

    def run(self) -> None:
        agent, idle, ints = self.agent, self.idle, self.stats.ints
        gc.collect()
        gc.freeze()
        mono = time.monotonic_ns
        started = mono()
        ints[schema.C_STARTED_NS] = started
        ints[schema.C_HEARTBEAT_NS] = started
        next_hb = started + HEARTBEAT_EVERY_NS
        frozen = False
        do_work = agent.do_work
        do_idle = idle.idle if agent.readers else None
        ppid = os.getppid()
        while self.running:
            n = do_work()
            if do_idle is not None:
                do_idle(n)
            now = mono()
            if now >= next_hb:
                ints[schema.C_HEARTBEAT_NS] = now
                next_hb = now + HEARTBEAT_EVERY_NS
                if os.getppid() != ppid:  # the supervisor died: do not trade unsupervised
                    logger.error("parent process is gone; stopping")
                    self.running = False
                if not frozen and now - started >= WARMUP_NS:
                    gc.freeze()  # what warm-up allocated for good (caches, buffers)
                    frozen = True
                    ints[schema.C_GC_FROZEN] = 1


def apply_realtime(cfg: Config, role: str) -> int:
    """Switch to SCHED_FIFO at ``realtime_priority`` + the stage's pipeline position; return it.

    Downstream stages get higher priorities, so a stage woken by its upstream preempts it
    and each tick runs through to its order before the next tick is read. Returns 0 when
    disabled, refused by the OS (no CAP_SYS_NICE) or unsafe (``spin`` would starve the core).
    """
    base = cfg.cpu.realtime_priority
    if not base:
        return 0
    if cfg.idle.for_role(role) == "spin":
        logger.warning(
            "idle 'spin' with a real-time priority would starve the core; staying unprioritised"
        )
        return 0
    prio = base + schema.ROLE_INDEX[role]
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(prio))
    except OSError as exc:
        logger.warning(
            "cannot use real-time priority; running unprioritised",
            extra={"priority": prio, "error": exc.strerror},
        )
        return 0
    return prio


def run_stage(role: str, cfg: Config, *, namespace: str, feed_url: str | None = None) -> int:
    """Attach to the engine's segments and run ``role`` until SIGTERM/SIGINT; return an exit code."""
    log.setup(role)
    try:
        engine = Engine.attach(namespace)
    except SegmentError as exc:
        logger.error("cannot attach to shared memory: %s", exc)
        return 3
    stats = engine.stage_stats(role)
    stats.set(schema.C_PID, os.getpid())
    engine.control[CTL_PID + schema.ROLE_INDEX[role]] = os.getpid()
    try:
        agent = agent_factory(role, feed_url=feed_url)(cfg, engine, stats)
    except Exception:
        logger.exception("stage %s failed to start", role)
        return 1
    runner = Runner(agent, stats, cfg, namespace=namespace)
    # Real-time priority only now: the agent has compiled its kernels at normal priority, so a
    # compiling stage never starves the stages already trading on the same core.
    realtime = apply_realtime(cfg, role)

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        runner.stop()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    logger.info(
        "stage started",
        extra={
            "pid": os.getpid(),
            "cpus": sorted(os.sched_getaffinity(0)),
            "idle": runner.idle_name,
            "realtime_priority": realtime,
        },
    )
    code = 0
    try:
        runner.run()
    except Exception:
        stats.add(schema.C_ERRORS)
        logger.exception("stage %s crashed", role)
        code = 1
    finally:
        try:
            agent.on_close()
        except Exception:
            logger.exception("stage %s failed to close cleanly", role)
    logger.info("stage stopped", extra={"processed": int(stats.ints[schema.C_PROCESSED])})
    return code
