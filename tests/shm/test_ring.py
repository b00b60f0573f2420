"""Ring correctness: wrap-around, full and empty, batches across the wrap, both loss policies,
several readers, and a cross-process run of 1M records checked for order and content."""

from __future__ import annotations

import os
import uuid

import numpy as np
import pytest

from shm import schema, segment
from shm.ring import LOSSLESS, LOSSY, RingReader, RingWriter, create_ring

DT = schema.ORDER


@pytest.fixture
def ns():
    name = f"t{uuid.uuid4().hex[:10]}"
    yield name
    segment.unlink_all(name)


def recs(start: int, n: int) -> np.ndarray:
    a = np.zeros(n, DT)
    seq = np.arange(start, start + n)
    a["order_id"] = seq
    a["px"] = seq * 1.5
    a["qty"] = seq % 977
    a["recv_ns"] = seq * 7
    return a


def one(seq: int) -> bytes:
    return recs(seq, 1).tobytes()


def check(a: np.ndarray, start: int) -> None:
    seq = np.arange(start, start + len(a))
    assert (a["order_id"] == seq).all()
    assert (a["px"] == seq * 1.5).all()
    assert (a["qty"] == seq % 977).all()
    assert (a["recv_ns"] == seq * 7).all()


def make(ns: str, *, capacity: int = 8, policy: int = LOSSLESS, readers: int = 1):
    seg = create_ring(ns, "r", DT, capacity, readers=readers, policy=policy)
    w = RingWriter(seg, DT, namespace=ns)
    rs = [RingReader(seg, DT, i) for i in range(readers)]
    return seg, w, rs


def test_capacity_must_be_power_of_two(ns):
    with pytest.raises(ValueError, match="power of two"):
        create_ring(ns, "bad", DT, 12)


def test_empty_ring_reads_nothing(ns):
    _, _, (r,) = make(ns)
    out = np.zeros(4, DT)
    assert r.poll() is None
    assert r.read_into(out) == 0
    assert r.available() == 0


def test_single_records_wrap_around_many_times(ns):
    _, w, (r,) = make(ns, capacity=8)
    for i in range(100):
        assert w.offer(one(i))
        got = r.poll()
        assert got is not None
        check(np.frombuffer(got, DT), i)
    assert r.poll() is None


def test_lossless_full_refuses_then_accepts_after_read(ns):
    _, w, (r,) = make(ns, capacity=8, policy=LOSSLESS)
    for i in range(8):
        assert w.offer(one(i))
    assert not w.offer(one(8)), "a full lossless ring must refuse"
    assert w.offer_array(recs(8, 3)) == 0
    assert r.poll() is not None
    assert w.offer(one(8))
    out = np.zeros(16, DT)
    assert r.read_into(out) == 8
    check(out[:8], 1)


def test_batch_write_and_read_across_the_wrap(ns):
    _, w, (r,) = make(ns, capacity=8)
    out = np.zeros(8, DT)
    assert w.offer_array(recs(0, 5)) == 5
    assert r.read_into(out[:5]) == 5
    # now the cursor sits at slot 5: a batch of 7 wraps (slots 5,6,7,0,1,2,3)
    assert w.offer_array(recs(5, 7)) == 7
    assert r.read_into(out) == 7
    check(out[:7], 5)
    # a lossless batch larger than the room is cut to the room
    assert w.offer_array(recs(12, 20)) == 8
    assert r.read_into(out) == 8
    check(out, 12)


def test_lossless_put_waits_for_the_reader(ns):
    _, w, (r,) = make(ns, capacity=4, policy=LOSSLESS)
    waits = []
    out = np.zeros(4, DT)

    def wait() -> None:
        waits.append(1)
        assert r.read_into(out) > 0

    w.put_array(recs(0, 10), wait)
    assert waits, "put_array must have waited on a full ring"
    rest = np.zeros(4, DT)
    assert r.read_into(rest) == 2
    check(rest[:2], 8)


def test_lossy_overrun_counts_dropped_and_keeps_the_newest(ns):
    _, w, (r,) = make(ns, capacity=8, policy=LOSSY)
    for i in range(20):
        assert w.offer(one(i)), "a lossy writer never waits"
    out = np.zeros(8, DT)
    n = r.read_into(out)
    assert r.dropped == 12
    assert n == 8
    check(out[:n], 12)
    # poll path too
    for i in range(20, 31):
        w.offer(one(i))
    got = r.poll()
    assert got is not None
    check(np.frombuffer(got, DT), 23)
    assert r.dropped == 12 + 3


def test_lossy_batch_larger_than_capacity_keeps_the_tail(ns):
    _, w, (r,) = make(ns, capacity=8, policy=LOSSY)
    assert w.offer_array(recs(0, 20)) == 8
    out = np.zeros(8, DT)
    assert r.read_into(out) == 8
    check(out, 12)


def test_two_readers_each_see_everything(ns):
    _, w, (r0, r1) = make(ns, capacity=16, policy=LOSSY, readers=2)
    w.offer_array(recs(0, 10))
    a, b = np.zeros(16, DT), np.zeros(16, DT)
    assert r0.read_into(a) == 10
    check(a[:10], 0)
    w.offer_array(recs(10, 3))
    assert r1.read_into(b) == 13
    check(b[:13], 0)
    assert r0.read_into(a) == 3
    check(a[:3], 10)


def test_lossless_writer_waits_for_the_slowest_reader(ns):
    _, w, (r0, r1) = make(ns, capacity=4, policy=LOSSLESS, readers=2)
    assert w.offer_array(recs(0, 4)) == 4
    out = np.zeros(4, DT)
    r0.read_into(out)
    assert w.free() == 0, "reader 1 has not read yet"
    assert not w.offer(one(4))
    r1.read_into(out)
    assert w.offer(one(4))


def test_cursors_survive_a_restarted_reader_and_writer(ns):
    seg, w, (r,) = make(ns, capacity=8)
    w.offer_array(recs(0, 5))
    out = np.zeros(8, DT)
    assert r.read_into(out[:2]) == 2
    w2 = RingWriter(seg, DT, namespace=ns)  # a restarted writer continues from the published cursor
    w2.offer_array(recs(5, 2))
    r2 = RingReader(seg, DT, 0)  # a restarted reader resumes from its stored cursor
    assert r2.read_into(out) == 5
    check(out[:5], 2)


def test_wrong_record_type_is_refused(ns):
    seg, _, _ = make(ns)
    with pytest.raises(segment.LayoutMismatch, match="bytes"):
        RingReader(seg, schema.BOOK, 0)


def _child(fn) -> int:
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fn()
            code = 0
        finally:
            os._exit(code)
    return pid


def test_cross_process_one_million_records_lossless(ns):
    total = 1_000_000
    seg = create_ring(ns, "x", DT, 1024, policy=LOSSLESS)
    del seg

    def produce() -> None:
        s = segment.attach(ns, "x", segment.KIND_RING)
        w = RingWriter(s, DT, namespace=ns)
        sent = 0
        batch = recs(0, 1)
        while sent < total:
            if sent % 3 == 0:  # mix single records and batches of varied size
                batch = recs(sent, 1)
                ok = w.offer(batch.tobytes())
                sent += ok
            else:
                k = min(1 + sent % 200, total - sent)
                batch = recs(sent, k)
                sent += w.offer_array(batch)

    pid = _child(produce)
    s = segment.attach(ns, "x", segment.KIND_RING)
    r = RingReader(s, DT, 0)
    out = np.zeros(256, DT)
    got = 0
    while got < total:
        if got % 5 == 0:
            raw = r.poll()
            if raw is not None:
                check(np.frombuffer(raw, DT), got)
                got += 1
            continue
        n = r.read_into(out)
        if n:
            check(out[:n], got)
            got += n
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert r.poll() is None
    assert got == total


def test_cross_process_lossy_reader_never_sees_a_torn_record(ns):
    total = 300_000
    seg = create_ring(ns, "y", DT, 64, policy=LOSSY)
    del seg

    def produce() -> None:
        s = segment.attach(ns, "y", segment.KIND_RING)
        w = RingWriter(s, DT, namespace=ns)
        for start in range(0, total, 50):
            w.offer_array(recs(start, 50))

    pid = _child(produce)
    s = segment.attach(ns, "y", segment.KIND_RING)
    r = RingReader(s, DT, 0)
    out = np.zeros(16, DT)  # a slow, small-batch reader so that it is overrun often
    seen = 0
    last = -1
    done = False
    while not done:
        n = r.read_into(out)
        for rec in out[:n]:
            seq = int(rec["order_id"])
            assert seq > last
            assert (
                rec["px"] == seq * 1.5 and rec["qty"] == seq % 977 and rec["recv_ns"] == seq * 7
            ), "torn record"
            last = seq
        seen += n
        if n == 0:
            done = os.waitpid(pid, os.WNOHANG)[0] != 0 and r.available() == 0
    assert r.dropped > 0, "the writer should have lapped this slow reader"
    assert seen + r.dropped == total
    assert last == total - 1


def test_uncommitted_reads_are_read_again_by_a_restarted_reader(ns):
    seg, w, (r,) = make(ns, capacity=8, policy=LOSSLESS)
    w.offer_array(recs(0, 4))
    out = np.zeros(8, DT)
    assert r.read_into(out, commit=False) == 4
    assert w.free() == 4, "the writer may not reuse slots that were read but not acted on"
    restarted = RingReader(seg, DT, 0)  # the reader died before acting on them
    assert restarted.read_into(out, commit=False) == 4
    check(out[:4], 0)
    restarted.commit()
    assert w.free() == 8
    assert RingReader(seg, DT, 0).read_into(out) == 0


def test_dropped_count_survives_a_reader_restart(ns):
    seg, w, (r,) = make(ns, capacity=8, policy=LOSSY)
    w.offer_array(recs(0, 8))
    w.offer_array(recs(8, 8))
    out = np.zeros(8, DT)
    r.read_into(out)
    assert r.dropped == 8
    assert RingReader(seg, DT, 0).dropped == 8


def test_a_restarted_writer_never_lowers_the_claim(ns):
    seg, w, (r,) = make(ns, capacity=8, policy=LOSSY)
    w.offer_array(recs(0, 8))  # positions 0..7; the reader has read none
    # a writer claims positions 8..11 (they overwrite 0..3), writes half a record, and dies
    w._wc[1] = 12
    w._u8[: DT.itemsize // 2] = 0xFF
    restarted = RingWriter(seg, DT, namespace=ns)
    assert restarted.offer(one(8))  # resumes at the published cursor 8
    out = np.zeros(8, DT)
    n = r.read_into(out)
    # positions 0..3 may be torn (the dead writer claimed them): they are dropped, never delivered
    assert r.dropped >= 4
    check(out[:n], 8 - n + 1)
