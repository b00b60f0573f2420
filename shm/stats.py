"""Per-stage counters, gauges and latency histograms in shared memory.

Each stage owns one ``STAGE_STATS`` block and is its only writer; the exporter, the monitor
and the UI only read. The hot path touches them through ``memoryview`` casts (an indexed
add is a few tens of ns) rather than numpy scalars (microseconds).

Histograms are log-linear: four sub-buckets per power of two of nanoseconds, so a bucket is
at most 25% wide and finding one is a ``bit_length`` and two shifts. Percentiles interpolate
linearly inside the bucket. Prior art: HdrHistogram, with far fewer buckets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import numpy as np

from shm import schema, segment

N_BLOCKS: Final = schema.MAX_STAGES
SUPERVISOR_BLOCK: Final = 5
SIM_BLOCK: Final = 6
_HB: Final = schema.HIST_BUCKETS
_SUB: Final = schema.HIST_SUB_BITS


def bucket_of(ns: int) -> int:
    """Return the histogram bucket of a duration in ns."""
    if ns < 4:
        return ns if ns > 0 else 0
    b = ns.bit_length()
    idx = ((b - _SUB) << _SUB) | ((ns >> (b - _SUB - 1)) & 3)
    return idx if idx < _HB else _HB - 1


def bucket_bounds_ns(idx: int) -> tuple[float, float]:
    """Return the [lower, upper) bounds in ns of a bucket."""
    if idx < 4:
        return float(idx), float(idx + 1)
    b = (idx >> _SUB) + _SUB
    sub = idx & 3
    shift = b - _SUB - 1
    return float((4 + sub) << shift), float((5 + sub) << shift)


_LOWER = np.array([bucket_bounds_ns(i)[0] for i in range(_HB)])
_UPPER = np.array([bucket_bounds_ns(i)[1] for i in range(_HB)])


def percentile_ns(counts: np.ndarray, q: float) -> float:
    """Return the q-quantile (0..1) of a bucket-count vector, NaN when it is empty."""
    total = int(counts.sum())
    if total == 0:
        return float("nan")
    cum = np.cumsum(counts)
    rank = q * total
    idx = int(np.searchsorted(cum, rank, side="left"))
    idx = min(idx, _HB - 1)
    before = float(cum[idx - 1]) if idx else 0.0
    inside = float(counts[idx])
    frac = (rank - before) / inside if inside else 0.0
    return float(_LOWER[idx] + (_UPPER[idx] - _LOWER[idx]) * min(max(frac, 0.0), 1.0))


def upper_bounds_ns() -> np.ndarray:
    """Return the exclusive upper bound of every bucket, in ns."""
    return _UPPER.copy()


def create_stats(namespace: str) -> segment.Segment:
    """Create the stats segment (one block per stage slot)."""
    return segment.create(
        namespace, "stats", N_BLOCKS * schema.STAGE_STATS.itemsize, segment.KIND_STATS
    )


class StageStats:
    """The writer's handle on one stage's block: counters, gauges and histograms."""

    def __init__(self, seg: segment.Segment, block: int) -> None:
        size = schema.STAGE_STATS.itemsize
        raw = seg.payload[block * size : (block + 1) * size]
        f = schema.STAGE_STATS.fields
        assert f is not None
        ints_off, gauges_off, hist_off = f["ints"][1], f["gauges"][1], f["hist"][1]
        self.ints = raw[ints_off : ints_off + schema.N_INT_SLOTS * 8].cast("q")
        self.gauges = raw[gauges_off : gauges_off + schema.N_GAUGES * 8].cast("d")
        self.hist = raw[hist_off : hist_off + schema.N_HISTS * _HB * 8].cast("q")

    def add(self, counter: int, n: int = 1) -> None:
        self.ints[counter] += n

    def set(self, counter: int, value: int) -> None:
        self.ints[counter] = value

    def record_ns(self, hist: int, ns: int, n: int = 1) -> None:
        """Record ``n`` observations of ``ns`` in histogram ``hist``."""
        if ns < 4:
            idx = ns if ns > 0 else 0
        else:
            b = ns.bit_length()
            idx = ((b - 2) << 2) | ((ns >> (b - 3)) & 3)
            if idx >= _HB:
                idx = _HB - 1
        self.hist[hist * _HB + idx] += n

    def record_batch(self, n: int, t0_ns: int, t1_ns: int, recv_ns: list[int]) -> None:
        """Account a batch of ``n`` records worked on from ``t0_ns`` to ``t1_ns`` and published."""
        ints = self.ints
        ints[schema.C_PROCESSED] += n
        ints[schema.C_PUBLISHED] += n
        ints[schema.C_BATCHES] += 1
        self.record_ns(schema.H_DURATION, (t1_ns - t0_ns) // n, n)
        for recv in recv_ns:
            self.record_ns(schema.H_E2E, t1_ns - recv)

    def reject(self, reason: int) -> None:
        self.ints[schema.C_REJECTS] += 1
        self.ints[schema.REJECT_COUNTERS_BASE + reason] += 1

    def release(self) -> None:
        self.ints.release()
        self.gauges.release()
        self.hist.release()


@dataclass(frozen=True, slots=True)
class LatencySummary:
    """Percentiles of one histogram, in microseconds."""

    count: int
    p50_us: float
    p99_us: float
    p999_us: float

    @classmethod
    def of(cls, counts: np.ndarray) -> LatencySummary:
        return cls(
            count=int(counts.sum()),
            p50_us=percentile_ns(counts, 0.50) / 1e3,
            p99_us=percentile_ns(counts, 0.99) / 1e3,
            p999_us=percentile_ns(counts, 0.999) / 1e3,
        )


def stats_view(seg: segment.Segment) -> np.ndarray:
    """Return a structured view of every block (readers copy it before using it)."""
    return np.frombuffer(seg.payload, dtype=schema.STAGE_STATS, count=N_BLOCKS)
