"""Idle strategies: what a stage does when a duty cycle found no work.

Chosen by name per stage in ``[idle]``. The runner calls ``idle(work)`` after every
``do_work``; a strategy resets itself whenever ``work`` is non-zero.

- ``spin``: return at once. Lowest latency, burns its core at 100%: use it only when each
  stage has a core of its own (and no hyper-sibling doing real work).
- ``yield``: ``sched_yield`` each time. Cheap hand-off to another runnable process on the
  same core, still 100% CPU when nothing else runs.
- ``backoff``: spin a little, then yield, then sleep with doubling pauses up to a ceiling.
  Latency after a quiet spell is up to the ceiling plus the kernel's timer slack.
- ``block``: spin a little, then sleep on the stage's POSIX semaphore (its doorbell), which a
  writer posts only when this reader has said it sleeps. Wake-up costs a futex hand-off
  (about 30 us across cores, 2 us on one core) but an idle stage costs nothing, so it is the
  default when stages share cores. Every sleep is bounded by a timeout so that a lost
  wake-up (there should be none: see ``shm.fence``) costs at most that; such wake-ups that
  find work waiting are counted.

On a machine with fewer cores than stages, busy-spinning several processes on one core costs
a scheduler quantum (milliseconds) per hand-off, which is why ``spin`` is never the default.
Prior art: Agrona's ``BusySpinIdleStrategy``, ``BackoffIdleStrategy``, ``SleepingIdleStrategy``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Final, Protocol

import posix_ipc

from shm import schema
from shm.fence import full_fence
from shm.ring import RingReader, doorbell_name
from shm.stats import StageStats

NAMES: Final = ("spin", "yield", "backoff", "block")


class IdleStrategy(Protocol):
    name: str

    def idle(self, work: int) -> None: ...


class SpinIdle:
    """Busy-spin: best used when the stage has a dedicated core."""

    name = "spin"

    def idle(self, work: int) -> None:
        return None


class YieldIdle:
    """Yield the core to any runnable process, then come straight back."""

    name = "yield"

    def idle(self, work: int) -> None:
        if not work:
            os.sched_yield()


class BackoffIdle:
    """Spin, then yield, then sleep with doubling pauses up to ``max_sleep_us``."""

    name = "backoff"

    def __init__(
        self, *, spins: int = 50, yields: int = 20, min_sleep_us: int = 20, max_sleep_us: int = 1000
    ) -> None:
        self._spins = spins
        self._yields = yields
        self._min_s = min_sleep_us / 1e6
        self._max_s = max_sleep_us / 1e6
        self._n = 0
        self._sleep_s = self._min_s

    def idle(self, work: int) -> None:
        if work:
            self._n = 0
            self._sleep_s = self._min_s
            return
        self._n += 1
        if self._n <= self._spins:
            return
        if self._n <= self._spins + self._yields:
            os.sched_yield()
            return
        time.sleep(self._sleep_s)
        self._sleep_s = min(self._sleep_s * 2, self._max_s)


def wake(namespace: str, bell_id: int) -> bool:
    """Post a stage's doorbell so a stage asleep in ``block`` wakes now; False if it has none.

    For the control plane: a flag flipped in the control block (kill switch, pause) is seen at
    once instead of at the stage's next timed wake-up.
    """
    try:
        sem = posix_ipc.Semaphore(doorbell_name(namespace, bell_id))
    except posix_ipc.ExistentialError:
        return False
    try:
        sem.release()
    finally:
        sem.close()
    return True


class BlockIdle:
    """Spin briefly, then sleep on the stage's doorbell semaphore until a writer posts it."""

    name = "block"

    def __init__(
        self,
        *,
        namespace: str,
        bell_id: int,
        readers: Sequence[RingReader],
        stats: StageStats | None = None,
        spins: int = 0,
        timeout_ms: float = 10.0,
    ) -> None:
        if bell_id <= 0:
            raise ValueError("doorbell id must be positive")
        self._readers = list(readers)
        self._sem = posix_ipc.Semaphore(
            doorbell_name(namespace, bell_id), posix_ipc.O_CREAT, mode=0o600, initial_value=0
        )
        for r in self._readers:
            r.enable_doorbell(bell_id)
        self._stats = stats
        self._spins = spins
        self._timeout_s = timeout_ms / 1e3
        self._n = 0

    def _waiting(self) -> bool:
        return any(r.available() > 0 for r in self._readers)

    def idle(self, work: int) -> None:
        if work:
            self._n = 0
            return
        self._n += 1
        if self._n <= self._spins:
            return
        for r in self._readers:
            r.set_sleeping(True)
        # Dekker: our flag store must be visible before we re-read the cursors.
        full_fence()
        if self._waiting():
            for r in self._readers:
                r.set_sleeping(False)
            return
        try:
            self._sem.acquire(self._timeout_s)
            if self._stats is not None:
                self._stats.ints[schema.C_WAKEUPS] += 1
        except posix_ipc.BusyError:
            if self._waiting() and self._stats is not None:
                self._stats.ints[schema.C_TIMEOUT_WAKEUPS] += 1
        except posix_ipc.SignalError:
            pass  # a signal (SIGTERM: the runner's handler has run) ends the sleep early
        for r in self._readers:
            r.set_sleeping(False)
        self._n = 0

    def close(self) -> None:
        self._sem.close()


def make_idle(
    name: str,
    *,
    namespace: str = "",
    bell_id: int = 0,
    readers: Sequence[RingReader] = (),
    stats: StageStats | None = None,
    timeout_ms: float = 10.0,
) -> IdleStrategy:
    """Build a strategy by its config alias."""
    if name == "spin":
        return SpinIdle()
    if name == "yield":
        return YieldIdle()
    if name == "backoff":
        return BackoffIdle()
    if name == "block":
        if not readers:
            return BackoffIdle()
        return BlockIdle(
            namespace=namespace,
            bell_id=bell_id,
            readers=readers,
            stats=stats,
            timeout_ms=timeout_ms,
        )
    raise ValueError(f"unknown idle strategy {name!r}; expected one of {', '.join(NAMES)}")
