"""The engine's shared-memory map: which segments exist, who writes and who reads each.

The supervisor ``create``s every segment; a stage ``attach``es to the ones it needs, by name,
and gets a layout check for free (``shm.segment.attach``). Reader indices are fixed here so
that a restarted stage resumes from its own cursor.

```
 ingest ─md_book/md_trade/md_mark─▶ feature ─features─▶ inference ─signals─▶ route ─orders─▶ risk
    └──────── md_book/md_trade/md_mark (reader 1) ──────────────────────────────────▶ risk
                                                       route ◀─events (fills, acks)── risk
```
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import numpy as np

from shm import ring, schema, segment, stats
from stages.config import Config


@dataclass(frozen=True, slots=True)
class RingSpec:
    dtype: np.dtype
    capacity_key: str
    writer: str
    readers: tuple[str, ...]
    policy: int


RINGS: Final = {
    "md_book": RingSpec(schema.BOOK, "md_capacity", "ingest", ("feature", "risk"), ring.LOSSY),
    "md_trade": RingSpec(schema.TRADE, "md_capacity", "ingest", ("feature", "risk"), ring.LOSSY),
    # risk reads marks for funding payments
    "md_mark": RingSpec(schema.MARK, "mark_capacity", "ingest", ("feature", "risk"), ring.LOSSY),
    "features": RingSpec(
        schema.FEATURES, "features_capacity", "feature", ("inference",), ring.LOSSY
    ),
    "signals": RingSpec(schema.SIGNAL, "signals_capacity", "inference", ("route",), ring.LOSSY),
    "orders": RingSpec(schema.ORDER, "orders_capacity", "route", ("risk",), ring.LOSSLESS),
    "events": RingSpec(schema.ORDER_EVENT, "fills_capacity", "risk", ("route",), ring.LOSSLESS),
}

# int64 slots of the CONTROL record (every field of it is int64)
CTL_STATE: Final = 0
CTL_KILL: Final = 1
CTL_DRAINING: Final = 2
CTL_DRAINED: Final = 3
CTL_MODE: Final = 4
CTL_EPOCH: Final = 5
CTL_RESTARTS: Final = 6
CTL_PID: Final = 6 + schema.MAX_STAGES


def bell_id(role: str) -> int:
    """Return the doorbell (semaphore) id of a stage."""
    return schema.ROLE_INDEX[role] + 1


def inputs_of(role: str) -> list[tuple[str, int]]:
    """Return (ring name, reader index) for every ring a stage reads."""
    return [
        (name, spec.readers.index(role)) for name, spec in RINGS.items() if role in spec.readers
    ]


def outputs_of(role: str) -> list[str]:
    return [name for name, spec in RINGS.items() if spec.writer == role]


class Engine:
    """Handles on an engine's segments, from the supervisor (creator) or a stage (attacher)."""

    def __init__(self, namespace: str, segs: dict[str, segment.Segment]) -> None:
        self.namespace = namespace
        self.segs = segs
        ctl_payload = segs["control"].payload
        self.control = ctl_payload[: schema.CONTROL.itemsize].cast("q")
        self.symbols = np.frombuffer(
            segs["symbols"].payload, dtype=schema.SYMBOL, count=schema.MAX_SYMBOLS
        )
        self.positions = np.frombuffer(
            segs["positions"].payload, dtype=schema.POSITION, count=schema.MAX_SYMBOLS
        )
        self.stats_all = stats.stats_view(segs["stats"])

    # ------------------------------------------------------------------ construction
    @classmethod
    def create(cls, cfg: Config) -> Engine:
        ns = cfg.engine.namespace
        segs: dict[str, segment.Segment] = {}
        try:
            segs["control"] = segment.create(
                ns, "control", schema.CONTROL.itemsize, segment.KIND_CONTROL
            )
            segs["stats"] = stats.create_stats(ns)
            segs["symbols"] = segment.create(
                ns, "symbols", schema.MAX_SYMBOLS * schema.SYMBOL.itemsize, segment.KIND_SYMBOLS
            )
            segs["positions"] = segment.create(
                ns,
                "positions",
                schema.MAX_SYMBOLS * schema.POSITION.itemsize,
                segment.KIND_POSITIONS,
            )
            for name, spec in RINGS.items():
                capacity = getattr(cfg.rings, spec.capacity_key)
                segs[name] = ring.create_ring(
                    ns, name, spec.dtype, capacity, readers=len(spec.readers), policy=spec.policy
                )
        except BaseException:
            for s in segs.values():
                s.unlink()
            raise
        return cls(ns, segs)

    @classmethod
    def attach(cls, namespace: str) -> Engine:
        segs = {
            "control": segment.attach(namespace, "control", segment.KIND_CONTROL),
            "stats": segment.attach(namespace, "stats", segment.KIND_STATS),
            "symbols": segment.attach(namespace, "symbols", segment.KIND_SYMBOLS),
            "positions": segment.attach(namespace, "positions", segment.KIND_POSITIONS),
        }
        for name in RINGS:
            segs[name] = segment.attach(namespace, name, segment.KIND_RING)
        return cls(namespace, segs)

    # ------------------------------------------------------------------ handles
    def writer(self, name: str) -> ring.RingWriter:
        return ring.RingWriter(self.segs[name], RINGS[name].dtype, namespace=self.namespace)

    def reader(self, name: str, role: str, *, pid: int = 0) -> ring.RingReader:
        spec = RINGS[name]
        return ring.RingReader(self.segs[name], spec.dtype, spec.readers.index(role), pid=pid)

    def peek(self, name: str) -> ring.RingReader:
        """A read-only observer (reader 0's geometry) for depth and cursor reporting."""
        return ring.RingReader(self.segs[name], RINGS[name].dtype, 0)

    def stage_stats(self, role: str) -> stats.StageStats:
        return stats.StageStats(self.segs["stats"], schema.ROLE_INDEX[role])

    def block_stats(self, block: int) -> stats.StageStats:
        return stats.StageStats(self.segs["stats"], block)

    def symbol_names(self) -> list[str]:
        return [bytes(s["name"]).decode() for s in self.symbols if s["active"]]

    def unlink(self) -> None:
        for s in self.segs.values():
            s.unlink()
        segment.unlink_all(self.namespace)
