"""Idle strategies, and the doorbell handshake of ``block`` checked for lost wake-ups."""

from __future__ import annotations

import os
import time
import uuid

import pytest

from shm import schema, segment, stats
from shm.idle import BackoffIdle, BlockIdle, SpinIdle, YieldIdle, make_idle
from shm.ring import LOSSLESS, RingReader, RingWriter, create_ring

DT = schema.ORDER


@pytest.fixture
def ns():
    name = f"t{uuid.uuid4().hex[:10]}"
    yield name
    segment.unlink_all(name)


def test_make_idle_by_alias(ns):
    assert isinstance(make_idle("spin"), SpinIdle)
    assert isinstance(make_idle("yield"), YieldIdle)
    assert isinstance(make_idle("backoff"), BackoffIdle)
    seg = create_ring(ns, "r", DT, 8)
    r = RingReader(seg, DT, 0)
    assert isinstance(make_idle("block", namespace=ns, bell_id=1, readers=[r]), BlockIdle)
    with pytest.raises(ValueError, match="unknown idle strategy 'nap'"):
        make_idle("nap")


def test_backoff_sleeps_only_after_spinning_and_resets_on_work():
    idle = BackoffIdle(spins=3, yields=2, min_sleep_us=100, max_sleep_us=400)
    t0 = time.monotonic()
    for _ in range(5):
        idle.idle(0)  # spins and yields: no sleep
    assert idle._sleep_s == pytest.approx(100e-6)
    idle.idle(0)
    idle.idle(0)
    assert idle._sleep_s == pytest.approx(400e-6)
    idle.idle(1)
    assert idle._n == 0 and idle._sleep_s == pytest.approx(100e-6)
    assert time.monotonic() - t0 < 5


def test_block_wakes_when_a_writer_posts(ns):
    seg = create_ring(ns, "r", DT, 8)
    r = RingReader(seg, DT, 0)
    idle = BlockIdle(namespace=ns, bell_id=3, readers=[r], spins=0, timeout_ms=5000)
    pid = os.fork()
    if pid == 0:
        time.sleep(0.2)
        s = segment.attach(ns, "r", segment.KIND_RING)
        RingWriter(s, DT, namespace=ns).offer(bytes(DT.itemsize))
        os._exit(0)
    t0 = time.monotonic()
    idle.idle(0)
    woke_after = time.monotonic() - t0
    os.waitpid(pid, 0)
    assert r.available() == 1
    assert woke_after < 4.0, "woken by the doorbell, not by the 5 s timeout"
    idle.close()


def test_block_ping_pong_loses_no_wake_up(ns):
    """Both ends sleep on doorbells with a 2 s timeout; a lost wake-up would be counted."""
    rounds = 3000
    create_ring(ns, "ping", DT, 64, policy=LOSSLESS)
    create_ring(ns, "pong", DT, 64, policy=LOSSLESS)
    st_seg = stats.create_stats(ns)
    rec = bytes(DT.itemsize)

    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})
            a = segment.attach(ns, "ping", segment.KIND_RING)
            b = segment.attach(ns, "pong", segment.KIND_RING)
            r, w = RingReader(a, DT, 0), RingWriter(b, DT, namespace=ns)
            st = stats.StageStats(segment.attach(ns, "stats", segment.KIND_STATS), 1)
            idle = BlockIdle(
                namespace=ns, bell_id=2, readers=[r], stats=st, spins=0, timeout_ms=2000
            )
            n = 0
            while n < rounds:
                got = r.poll()
                if got is None:
                    idle.idle(0)
                    continue
                w.offer(got)
                n += 1
            code = 0
        finally:
            os._exit(code)

    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    a = segment.attach(ns, "ping", segment.KIND_RING)
    b = segment.attach(ns, "pong", segment.KIND_RING)
    w, r = RingWriter(a, DT, namespace=ns), RingReader(b, DT, 0)
    st = stats.StageStats(st_seg, 0)
    idle = BlockIdle(namespace=ns, bell_id=1, readers=[r], stats=st, spins=0, timeout_ms=2000)
    try:
        for _ in range(rounds):
            w.offer(rec)
            while r.poll() is None:
                idle.idle(0)
    finally:
        _, status = os.waitpid(pid, 0)
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    assert os.waitstatus_to_exitcode(status) == 0
    view = stats.stats_view(st_seg)
    lost = int(
        view[0]["ints"][schema.C_TIMEOUT_WAKEUPS] + view[1]["ints"][schema.C_TIMEOUT_WAKEUPS]
    )
    wakeups = int(view[0]["ints"][schema.C_WAKEUPS] + view[1]["ints"][schema.C_WAKEUPS])
    assert wakeups > rounds // 2, "the test must actually exercise sleeping"
    assert lost == 0, f"{lost} sleeps ended by timeout with work waiting (lost wake-ups)"
