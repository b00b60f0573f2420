"""Prometheus exporter: read the engine's shared-memory stats at scrape time.

Why a custom collector rather than ``Counter``/``Histogram`` objects: every number already
lives in shared memory, written by the stage that owns it (``shm.stats``). Mirroring it into
client-side metric objects would need a polling thread and would lag; a collector reads the
blocks when Prometheus asks, so a scrape costs one copy of about 26 KiB and the hot path pays
nothing. The exporter only *reads* shared memory.

Histograms. Our buckets are log-linear (4 per power of two of ns, ``[lower, upper)``), 168 of
them; exporting all would make every histogram 168 series. We export a subset of *our own*
bucket boundaries, the one nearest each 1-2-5 decade point from 0.5 us to 1 s, so every
cumulative count is exact (no interpolation): the label says the true boundary, e.g.
``le="1.024"`` rather than ``le="1"``. ``histogram_quantile`` works with any ``le``. Our
buckets exclude their upper bound and Prometheus ``le`` includes it: the two differ only for a
value of exactly that many ns. ``_sum`` is estimated from bucket midpoints (within 12.5%).

Rates (``hft_snapshots_per_sec``, ``hft_orders_per_sec``) come from counter deltas over a
sliding window of scrapes (default 10 s, and at least the previous scrape); the exporter
samples once when it starts so that its first scrape already has a rate.

Trading state. ``hft_trading_state`` is the risk engine's state (0 active, 1 reducing, 2
halted; ``stages.riskengine``) and ``hft_trading_state_reason{reason}`` is 1 for its reason and 0
for every other one, so each reason is one stable series. A non-zero kill field in the control
block is HALTED with that reason whatever the risk stage last published (it may be down).

Restarts. A new supervisor recreates the segments; the collector compares the control
segment's header (creation time, owner pid) on every scrape and re-attaches when it changed.
With no live engine it exports ``hft_engine_up 0`` and nothing else, and never raises.

Prior art: the node_exporter textfile/collector model; ``prometheus_client`` custom collectors.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import logging
import signal
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from types import FrameType
from typing import Any, Final

import numpy as np
import posix_ipc
from prometheus_client import start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from shm import ring, schema, segment, stats
from stages import config
from stages import riskengine as rk
from stages.wiring import CTL_KILL, CTL_PID, CTL_RESTARTS, RINGS, Engine

logger = logging.getLogger("ops.exporter")

STAGE_UP_HEARTBEAT_NS: Final = 2_000_000_000
DEFAULT_RATE_WINDOW_S: Final = 10.0
FALLBACK_LABEL: Final = "fallback"  # hft_model_duration_us of the rule-based fallback

# 1-2-5 decade points, 0.5 us .. 1 s; each is replaced by the nearest bucket boundary of ours
_NOMINAL_BOUNDS_US: Final = (
    0.5,
    1,
    2,
    5,
    10,
    20,
    50,
    100,
    200,
    500,
    1_000,
    2_000,
    5_000,
    10_000,
    20_000,
    50_000,
    100_000,
    200_000,
    500_000,
    1_000_000,
)


def _us_label(ns: int) -> str:
    """Return ``ns`` in us as an exact decimal (``1024`` -> ``"1.024"``)."""
    return f"{ns // 1000}.{ns % 1000:03d}".rstrip("0").rstrip(".")


def _exact_bounds() -> tuple[np.ndarray, tuple[str, ...]]:
    """Return (bucket index whose upper bound is the boundary, ``le`` label in us) per boundary."""
    upper_ns = stats.upper_bounds_ns()[:-1]  # the last bucket also holds every overflow
    chosen: list[int] = []
    for nominal_us in _NOMINAL_BOUNDS_US:
        idx = int(np.argmin(np.abs(upper_ns - nominal_us * 1e3)))
        if not chosen or idx > chosen[-1]:
            chosen.append(idx)
    labels = tuple(_us_label(int(upper_ns[i])) for i in chosen)
    return np.array(chosen, dtype=np.intp), labels


BOUNDARY_INDEX, BOUNDARY_LABELS_US = _exact_bounds()
_MID_NS: Final = np.array(
    [sum(stats.bucket_bounds_ns(i)) / 2 for i in range(schema.HIST_BUCKETS)], dtype=np.float64
)


def histogram_buckets(counts: np.ndarray) -> tuple[list[tuple[str, float]], float]:
    """Convert one of our ns histograms to Prometheus cumulative buckets and a ``_sum`` in us."""
    cum = np.cumsum(counts)
    total = float(cum[-1]) if len(cum) else 0.0
    buckets = [
        (le, float(cum[i])) for le, i in zip(BOUNDARY_LABELS_US, BOUNDARY_INDEX, strict=True)
    ]
    buckets.append(("+Inf", total))
    sum_us = float(np.dot(counts.astype(np.float64), _MID_NS)) / 1e3
    return buckets, sum_us


# ---------------------------------------------------------------- attaching to an engine
class EngineWatch:
    """Attach to an engine's segments, and re-attach when a new engine has replaced them.

    ``get()`` returns the attached ``Engine`` or None; then ``status`` says why: ``"absent"``
    (no control segment), ``"stale"`` (its owner process has exited) or ``"error"`` (attach
    failed, e.g. a layout mismatch), and ``reason`` says it in words. ``generation`` counts
    attaches, so callers can reset state derived from an earlier engine.
    """

    def __init__(self, *, namespace: str) -> None:
        self.namespace = namespace
        self.engine: Engine | None = None
        self.rings: dict[str, ring.RingReader] = {}
        self.generation = 0
        self.status = "absent"
        self.reason = ""
        self._key: tuple[int, int] | None = None

    def control_path(self) -> str:
        return f"{segment.SHM_DIR}/{segment.PREFIX}{self.namespace}.control"

    def get(self) -> Engine | None:
        """Return the live engine, attaching or re-attaching as needed; None if there is none."""
        try:
            header = segment.read_header(segment.segment_name(self.namespace, "control"))
        except (segment.SegmentError, posix_ipc.Error, OSError) as exc:
            self._fail("error", str(exc))
            return None
        if header is None:
            self._fail("absent", f"no {self.control_path()}")
            return None
        if not segment.pid_alive(header.owner_pid):
            self._fail(
                "stale",
                f"its segments were left by pid {header.owner_pid}, which has exited; "
                "`hft cleanup` removes them",
            )
            return None
        key = (header.created_ns, header.owner_pid)
        if self.engine is not None and key == self._key:
            return self.engine
        self.close()
        try:
            engine = Engine.attach(self.namespace)
            rings = {name: engine.peek(name) for name in RINGS}
        except (segment.SegmentError, posix_ipc.Error, OSError, ValueError) as exc:
            self._fail("error", str(exc))
            return None
        self.engine, self.rings, self._key = engine, rings, key
        self.generation += 1
        self.status, self.reason = "up", ""
        return engine

    def _fail(self, status: str, reason: str) -> None:
        self.close()
        self.status, self.reason = status, reason

    def close(self) -> None:
        """Drop the mapping (views first, so that the maps can go)."""
        for reader in self.rings.values():
            with contextlib.suppress(BufferError, AttributeError):
                reader.release()
        self.rings = {}
        if self.engine is not None:
            with contextlib.suppress(BufferError):
                self.engine.control.release()
        self.engine = None
        self._key = None


def ring_depths(watch: EngineWatch) -> dict[str, tuple[int, list[int]]]:
    """Return ``ring -> (capacity, depth per reader index)``; a depth is never below 0."""
    out: dict[str, tuple[int, list[int]]] = {}
    for name, reader in watch.rings.items():
        out[name] = (reader.capacity, [max(0, reader.depth(i)) for i in range(reader.n_readers)])
    return out


# ---------------------------------------------------------------- rates
class RateWindow:
    """Per-second rate of a counter over a sliding window of samples."""

    def __init__(self, *, window_ns: int) -> None:
        self._window_ns = window_ns
        self._samples: collections.deque[tuple[int, int]] = collections.deque()

    def reset(self) -> None:
        self._samples.clear()

    def update(self, *, now_ns: int, value: int) -> float:
        """Add a sample; return the rate since the oldest sample still in the window."""
        s = self._samples
        if s and value < s[-1][1]:  # the counter went back: a stage restarted with fresh stats
            s.clear()
        s.append((now_ns, value))
        # keep the newest sample at least a window old as the base, drop the ones before it
        while len(s) > 2 and now_ns - s[1][0] >= self._window_ns:
            s.popleft()
        t0, v0 = s[0]
        dt_ns = now_ns - t0
        return (value - v0) * 1e9 / dt_ns if dt_ns > 0 else 0.0


# ---------------------------------------------------------------- the collector
class ShmCollector(Collector):
    """A ``prometheus_client`` collector that reads an engine's shared memory at scrape time."""

    def __init__(
        self,
        *,
        namespace: str,
        rate_window_s: float = DEFAULT_RATE_WINDOW_S,
        clock_ns: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        self.namespace = namespace
        self.watch = EngineWatch(namespace=namespace)
        self._clock_ns = clock_ns
        window_ns = int(rate_window_s * 1e9)
        self._snapshot_rate = RateWindow(window_ns=window_ns)
        self._order_rate = RateWindow(window_ns=window_ns)
        self._generation = -1
        self._lock = threading.Lock()  # the HTTP server scrapes from one thread per request

    def prime(self) -> None:
        """Attach now and take a first rate sample, so the first scrape already has a rate."""
        with self._lock:
            try:
                engine = self.watch.get()
                if engine is not None:
                    self._rates(np.array(engine.stats_all), self._clock_ns())
            except Exception:
                logger.exception("exporter: priming failed")

    def close(self) -> None:
        with self._lock:
            self.watch.close()

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            try:
                families = self._collect()
            except Exception:
                logger.exception("exporter: reading shared memory failed")
                self.watch.close()
                families = [_engine_up(0)]
        yield from families

    # ------------------------------------------------------------------ internals
    def _rates(self, blocks: np.ndarray, now_ns: int) -> tuple[float, float]:
        if self.watch.generation != self._generation:
            self._generation = self.watch.generation
            self._snapshot_rate.reset()
            self._order_rate.reset()
        ingest = blocks[schema.ROLE_INDEX["ingest"]]["ints"]
        risk = blocks[schema.ROLE_INDEX["risk"]]["ints"]
        return (
            self._snapshot_rate.update(now_ns=now_ns, value=int(ingest[schema.C_SNAPSHOTS])),
            self._order_rate.update(now_ns=now_ns, value=int(risk[schema.C_ORDERS])),
        )

    def _collect(self) -> list[Metric]:
        engine = self.watch.get()
        if engine is None:
            return [_engine_up(0)]
        now_ns = self._clock_ns()
        blocks = np.array(engine.stats_all)  # one copy: every series of a scrape agrees
        control = [int(v) for v in engine.control]
        depths = ring_depths(self.watch)
        snapshots_per_s, orders_per_s = self._rates(blocks, now_ns)

        def ints(role: str) -> np.ndarray:
            out: np.ndarray = blocks[schema.ROLE_INDEX[role]]["ints"]
            return out

        def hist(role: str, which: int) -> np.ndarray:
            out: np.ndarray = blocks[schema.ROLE_INDEX[role]]["hist"][which]
            return out

        ingest, risk = ints("ingest"), ints("risk")
        risk_gauges = blocks[schema.ROLE_INDEX["risk"]]["gauges"]
        fams: list[Metric] = [_engine_up(1)]

        # -- the seed's nine
        fams.append(
            _histogram(
                "hft_ingest_duration_us",
                "Ingest work per record, us.",
                hist("ingest", schema.H_DURATION),
            )
        )
        fams.append(
            _histogram(
                "hft_feature_duration_us",
                "Feature work per record, us.",
                hist("feature", schema.H_DURATION),
            )
        )
        fams += _model_families(ints("inference"), blocks[schema.ROLE_INDEX["inference"]]["hist"])
        fams.append(
            _histogram(
                "hft_route_duration_us",
                "Route work per record, us.",
                hist("route", schema.H_DURATION),
            )
        )
        fams.append(
            GaugeMetricFamily(
                "hft_snapshots_per_sec",
                "Book snapshots published by ingest per second.",
                value=snapshots_per_s,
            )
        )
        fams.append(
            GaugeMetricFamily(
                "hft_orders_per_sec",
                "Orders handed to the venue by risk per second.",
                value=orders_per_s,
            )
        )
        fams.append(
            _per_stage_counter(
                blocks,
                "hft_dropped_frames_total",
                "Records lost to lossy ring overruns.",
                schema.C_DROPPED,
            )
        )
        rejects = CounterMetricFamily(
            "hft_order_rejects_total", "Orders rejected by risk, by reason.", labels=["reason"]
        )
        for code, reason in enumerate(schema.REJECT_REASONS):
            if reason != "none":
                rejects.add_metric([reason], int(risk[schema.REJECT_COUNTERS_BASE + code]))
        fams.append(rejects)

        # -- ours
        fams.append(
            _histogram(
                "hft_risk_duration_us", "Risk work per record, us.", hist("risk", schema.H_DURATION)
            )
        )
        fams.append(
            _histogram(
                "hft_tick_to_order_us",
                "Tick received by ingest to order handed to the venue, us.",
                hist("risk", schema.H_E2E),
            )
        )
        fams.append(
            _per_stage_counter(
                blocks, "hft_stage_processed_total", "Input records handled.", schema.C_PROCESSED
            )
        )
        fams.append(
            _per_stage_counter(
                blocks, "hft_stage_published_total", "Output records written.", schema.C_PUBLISHED
            )
        )
        fams.append(
            _per_stage_counter(
                blocks,
                "hft_malformed_messages_total",
                "Bad input rejected and counted.",
                schema.C_MALFORMED,
            )
        )
        fams.append(
            _per_stage_counter(
                blocks, "hft_stage_errors_total", "Errors caught by a stage.", schema.C_ERRORS
            )
        )

        depth = GaugeMetricFamily(
            "hft_ring_depth",
            "Records waiting for a reader (can exceed capacity on a lossy ring: those are lost).",
            labels=["ring", "reader"],
        )
        capacity = GaugeMetricFamily("hft_ring_capacity", "Slots in a ring.", labels=["ring"])
        for name, (cap, per_reader) in depths.items():
            capacity.add_metric([name], cap)
            for reader_role, d in zip(RINGS[name].readers, per_reader, strict=False):
                depth.add_metric([name, reader_role], d)
        fams += [depth, capacity]

        up = GaugeMetricFamily(
            "hft_stage_up",
            "1 if the stage's heartbeat is fresher than 2 s and its pid is alive.",
            labels=["stage"],
        )
        restarts = CounterMetricFamily(
            "hft_stage_restarts_total", "Times the supervisor restarted a stage.", labels=["stage"]
        )
        for role in schema.STAGE_ROLES:
            idx = schema.ROLE_INDEX[role]
            heartbeat_ns = int(ints(role)[schema.C_HEARTBEAT_NS])
            pid = control[CTL_PID + idx]
            fresh = heartbeat_ns > 0 and now_ns - heartbeat_ns < STAGE_UP_HEARTBEAT_NS
            alive = pid <= 0 or segment.pid_alive(pid)  # no pid recorded: trust the heartbeat
            up.add_metric([role], 1 if fresh and alive else 0)
            restarts.add_metric([role], control[CTL_RESTARTS + idx])
        fams += [up, restarts]

        fams.append(
            CounterMetricFamily(
                "hft_reconnects_total",
                "Venue feed reconnects by ingest.",
                value=int(ingest[schema.C_RECONNECTS]),
            )
        )
        fams.append(
            CounterMetricFamily(
                "hft_fills_total", "Fills received by risk.", value=int(risk[schema.C_FILLS])
            )
        )
        fams.append(
            CounterMetricFamily(
                "hft_venue_errors_total",
                "Venue error frames and messages for symbols not subscribed.",
                value=int(ingest[schema.C_VENUE_ERRORS]),
            )
        )
        fams.append(
            CounterMetricFamily(
                "hft_stale_books_total",
                "Books published flagged stale (disconnect, silence or resync).",
                value=int(ingest[schema.C_STALE]),
            )
        )
        for name, help_, slot in (
            ("hft_book_gaps_total", "Sequence gaps in a venue's diff-depth stream.", schema.C_GAPS),
            (
                "hft_book_resyncs_total",
                "Local books rebuilt from a fresh REST snapshot after a gap or reconnect.",
                schema.C_RESYNCS,
            ),
            (
                "hft_rate_limited_total",
                "Venue REST answers 429/418 and requests held back by our own weight budget.",
                schema.C_RATE_LIMITED,
            ),
        ):
            fams.append(CounterMetricFamily(name, help_, value=int(ingest[slot])))
        fams.append(
            _per_stage_counter(
                blocks,
                "hft_duplicates_total",
                "Records read again after a restart and ignored.",
                schema.C_DUPLICATES,
            )
        )
        fams.append(
            GaugeMetricFamily(
                "hft_pnl_realized",
                "Realised PnL after fees, quote currency.",
                value=float(risk_gauges[schema.G_REALIZED]),
            )
        )
        fams.append(
            GaugeMetricFamily(
                "hft_pnl_unrealized",
                "Unrealised PnL at the mark, quote currency.",
                value=float(risk_gauges[schema.G_UNREALIZED]),
            )
        )
        fams.append(
            CounterMetricFamily(
                "hft_fees_total",
                "Fees paid, quote currency.",
                value=float(risk_gauges[schema.G_FEES]),
            )
        )
        fams += _trading_families(risk_gauges, control[CTL_KILL])
        return fams


def trading_state(gauges: np.ndarray, kill: int) -> tuple[int, int]:
    """The engine's trading state and reason code (``stages.riskengine``).

    The control block's kill field is the HALTED state and its reason, also when the risk
    stage has not seen it yet (down, restarting); otherwise the risk stage's gauges say.
    """
    if kill:
        return rk.HALTED, rk.halt_reason(kill)
    state, reason = int(gauges[rk.G_TRADING_STATE]), int(gauges[rk.G_TRADING_REASON])
    if state == rk.HALTED:  # the kill was reset and risk has not caught up yet
        return rk.ACTIVE, rk.R_NONE
    if not 0 <= state < len(rk.STATE_NAMES) or not 0 <= reason < len(rk.REASONS):
        return rk.ACTIVE, rk.R_NONE
    return state, reason


def _trading_families(gauges: np.ndarray, kill: int) -> list[Metric]:
    """``hft_trading_state`` (0 active, 1 reducing, 2 halted), its reason as a one-hot
    ``hft_trading_state_reason{reason}`` (every reason always present), breaker trips."""
    state, reason = trading_state(gauges, kill)
    fam_state = GaugeMetricFamily(
        "hft_trading_state",
        "Trading state of the risk engine: 0 active, 1 reducing (only orders that shrink a "
        "position), 2 halted (kill switch).",
        value=state,
    )
    fam_reason = GaugeMetricFamily(
        "hft_trading_state_reason",
        "1 for the reason of the current trading state (none while active), 0 for the others.",
        labels=["reason"],
    )
    for code, name in enumerate(rk.REASONS):
        fam_reason.add_metric([name], 1 if code == reason else 0)
    trips = CounterMetricFamily(
        "hft_circuit_breaker_trips_total",
        "Times a circuit breaker paused a symbol (wide spread, thin book, extreme move).",
        value=float(gauges[rk.G_BREAKER_TRIPS]),
    )
    return [fam_state, fam_reason, trips]


def _model_families(ints: np.ndarray, hists: np.ndarray) -> list[Metric]:
    """The inference stage's per-model series, from its per-model counters and histograms.

    ``hft_model_duration_us``: one series per model that has run (a whole ``session.run``, for
    a batch), plus ``model="fallback"``, the stage's work per record, while the fallback has
    produced signals or no model has run yet (with models answering, that histogram is the
    ensemble's work and is not labelled as the fallback's). Timeouts, runs and errors: one
    series per model in ``MODEL_NAMES`` always; the timeouts add up to ``C_MODEL_TIMEOUTS``.
    Out of domain: one series per model always, the ticks left out of the ensemble because an
    input lay outside the model's training range (``MODEL_OUT_OF_DOMAIN``).
    """
    duration = HistogramMetricFamily(
        "hft_model_duration_us",
        "Model run time, us, by model (fallback: the stage's work per record when it falls back).",
        labels=["model"],
    )
    timeouts = CounterMetricFamily(
        "hft_model_timeouts_total",
        "Ticks a model missed the per-tick deadline on (skipped, or its late output discarded).",
        labels=["model"],
    )
    runs = CounterMetricFamily("hft_model_runs_total", "Model runs, by model.", labels=["model"])
    errors = CounterMetricFamily(
        "hft_model_errors_total", "Model runs that raised, by model.", labels=["model"]
    )
    out_of_domain = CounterMetricFamily(
        "hft_model_out_of_domain_total",
        "Ticks a model was left out on: an input outside its training range (mean +- clip std).",
        labels=["model"],
    )
    any_runs = False
    for i, name in enumerate(schema.MODEL_NAMES):
        base = schema.MODEL_COUNTERS_BASE + i * schema.N_MODEL_COUNTERS
        n_runs = int(ints[base + schema.MODEL_RUNS])
        runs.add_metric([name], n_runs)
        timeouts.add_metric([name], int(ints[base + schema.MODEL_TIMEOUTS]))
        errors.add_metric([name], int(ints[base + schema.MODEL_ERRORS]))
        out_of_domain.add_metric([name], int(ints[base + schema.MODEL_OUT_OF_DOMAIN]))
        if n_runs:
            any_runs = True
            buckets, sum_us = histogram_buckets(hists[schema.H_MODEL_BASE + i])
            duration.add_metric([name], buckets, sum_us)
    if int(ints[schema.C_FALLBACKS]) or not any_runs:
        buckets, sum_us = histogram_buckets(hists[schema.H_DURATION])
        duration.add_metric([FALLBACK_LABEL], buckets, sum_us)
    return [duration, timeouts, runs, errors, out_of_domain]


def _engine_up(value: int) -> GaugeMetricFamily:
    return GaugeMetricFamily("hft_engine_up", "1 if an engine runs in this namespace.", value=value)


def _histogram(
    name: str, doc: str, counts: np.ndarray, *, labels: Iterable[tuple[str, str]] = ()
) -> HistogramMetricFamily:
    pairs = list(labels)
    buckets, sum_us = histogram_buckets(counts)
    fam = HistogramMetricFamily(name, doc, labels=[k for k, _ in pairs])
    fam.add_metric([v for _, v in pairs], buckets, sum_us)
    return fam


def _per_stage_counter(
    blocks: np.ndarray, name: str, doc: str, counter: int
) -> CounterMetricFamily:
    fam = CounterMetricFamily(name, doc, labels=["stage"])
    for role in schema.STAGE_ROLES:
        fam.add_metric([role], int(blocks[schema.ROLE_INDEX[role]]["ints"][counter]))
    return fam


# ---------------------------------------------------------------- server
_COLLECTORS: weakref.WeakKeyDictionary[Any, ShmCollector] = weakref.WeakKeyDictionary()


def start_exporter(
    namespace: str, host: str, port: int, *, rate_window_s: float = DEFAULT_RATE_WINDOW_S
) -> tuple[Any, threading.Thread, int]:
    """Serve ``/metrics`` for ``namespace`` on ``host:port`` (0: any free port) from a thread.

    Returns ``(server, thread, bound_port)``; stop with ``stop_exporter(server)``.
    """
    collector = ShmCollector(namespace=namespace, rate_window_s=rate_window_s)
    registry = CollectorRegistry()
    registry.register(collector)
    collector.prime()
    server, thread = start_http_server(port, addr=host, registry=registry)
    _COLLECTORS[server] = collector  # so that stop_exporter can unmap the engine
    return server, thread, int(server.server_port)


def stop_exporter(server: Any) -> None:
    """Stop serving, close the listening socket and drop the shared-memory mapping."""
    server.shutdown()
    server.server_close()
    collector = _COLLECTORS.pop(server, None)
    if collector is not None:
        collector.close()


def main(argv: list[str] | None = None) -> int:
    """``hft exporter --config PATH [--namespace NS] [--host H] [--port N]``: serve until SIGTERM."""
    p = argparse.ArgumentParser(
        prog="hft exporter", description="Prometheus exporter of the engine's shared-memory stats."
    )
    p.add_argument(
        "--config", default=str(config.DEFAULT_CONFIG), help="engine TOML (default: %(default)s)"
    )
    p.add_argument(
        "--namespace", default=None, help="shared-memory namespace (default: engine.namespace)"
    )
    p.add_argument("--host", default=None, help="listen address (default: ops.metrics_host)")
    p.add_argument(
        "--port", type=int, default=None, help="listen port, 0 for any (default: ops.metrics_port)"
    )
    args = p.parse_args(argv)
    try:
        cfg = config.load(args.config)
    except config.ConfigError as exc:
        print(f"hft exporter: config error: {exc}", file=sys.stderr)
        return 2
    from stages import log

    log.setup("exporter")
    namespace = args.namespace or cfg.engine.namespace
    host = args.host or cfg.ops.metrics_host
    port = cfg.ops.metrics_port if args.port is None else args.port
    try:
        server, _thread, bound_port = start_exporter(namespace, host, port)
    except OSError as exc:
        logger.error("cannot listen on %s:%s: %s", host, port, exc)
        return 1
    stop = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    logger.info(
        "exporter listening",
        extra={"url": f"http://{host}:{bound_port}/metrics", "namespace": namespace},
    )
    try:
        while not stop.wait(1.0):
            pass
    finally:
        stop_exporter(server)
    logger.info("exporter stopped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
