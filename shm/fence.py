"""A full memory fence from Python, for the one place x86-64 TSO is not enough.

x86 may let a store be overtaken by a later load of another address (store buffering), so the
doorbell handshake (writer: publish cursor, then read the reader's sleeping flag; reader: set
the flag, then re-read the cursor) can lose a wake-up without a fence between the two. CPython
has no fence instruction, but an uncontended ``threading.Lock`` acquire/release runs a locked
read-modify-write on Linux (glibc semaphores: ``lock cmpxchg`` / ``lock xadd``), and every
locked instruction is a full fence on x86. It costs about 0.1 us; only the ``block`` strategy
pays it. Sleeps are still bounded by a timeout, so a lost wake-up would cost at most that.
"""

from __future__ import annotations

import threading

_lock = threading.Lock()
_acquire = _lock.acquire
_release = _lock.release


def full_fence() -> None:
    """Order every earlier load and store before every later one (a locked instruction)."""
    _acquire()
    _release()
