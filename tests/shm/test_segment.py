"""Segments: header stamping, mode 0600, refusal of a mismatched layout, stale-segment detection."""

from __future__ import annotations

import os
import stat
import struct
import uuid

import pytest

from shm import schema, segment


@pytest.fixture
def ns():
    name = f"t{uuid.uuid4().hex[:10]}"
    yield name
    segment.unlink_all(name)


def test_create_stamps_header_and_mode_0600(ns):
    seg = segment.create(ns, "a", 4096, segment.KIND_STATS)
    path = f"/dev/shm/{seg.name[1:]}"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    h = segment.read_header(seg.name)
    assert h is not None
    assert h.magic == segment.MAGIC
    assert h.version == schema.LAYOUT_VERSION
    assert h.fingerprint == schema.fingerprint()
    assert h.owner_pid == os.getpid()
    assert h.size == 4096
    seg.payload[:4] = b"abcd"
    other = segment.attach(ns, "a", segment.KIND_STATS)
    assert bytes(other.payload[:4]) == b"abcd"


def test_attach_refuses_another_layout_version(ns):
    seg = segment.create(ns, "a", 64, segment.KIND_STATS)
    struct.pack_into(
        "<I", seg._mm, 8, schema.LAYOUT_VERSION + 1
    )  # what an older/newer build would stamp
    theirs, ours = schema.LAYOUT_VERSION + 1, schema.LAYOUT_VERSION
    with pytest.raises(
        segment.LayoutMismatch, match=rf"layout version {theirs} .* this build uses version {ours}"
    ):
        segment.attach(ns, "a", segment.KIND_STATS)


def test_attach_refuses_another_schema_fingerprint(ns):
    seg = segment.create(ns, "a", 64, segment.KIND_STATS)
    struct.pack_into("<I", seg._mm, 12, schema.fingerprint() ^ 1)
    with pytest.raises(segment.LayoutMismatch, match="fingerprint"):
        segment.attach(ns, "a", segment.KIND_STATS)


def test_attach_refuses_wrong_kind_and_foreign_segments(ns):
    seg = segment.create(ns, "a", 64, segment.KIND_STATS)
    with pytest.raises(segment.LayoutMismatch, match="kind"):
        segment.attach(ns, "a", segment.KIND_RING)
    seg._mm[:8] = b"NOTOURS!"
    with pytest.raises(segment.LayoutMismatch, match="not an hft segment"):
        segment.attach(ns, "a", segment.KIND_STATS)


def test_attach_missing_segment_names_it(ns):
    with pytest.raises(segment.SegmentError, match=rf"/hft\.{ns}\.nope does not exist"):
        segment.attach(ns, "nope", segment.KIND_STATS)


def test_create_refuses_a_segment_owned_by_a_live_process(ns):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        segment.create(ns, "a", 64, segment.KIND_STATS)
        os.write(w, b"x")
        import time

        time.sleep(5)
        os._exit(0)
    os.close(w)
    assert os.read(r, 1) == b"x"
    try:
        with pytest.raises(segment.SegmentBusy, match=f"live pid {pid}"):
            segment.create(ns, "a", 64, segment.KIND_STATS)
        assert segment.find_stale(ns) == []
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        os.close(r)


def test_stale_segment_of_a_dead_owner_is_found_and_replaced(ns):
    pid = os.fork()
    if pid == 0:
        segment.create(ns, "a", 64, segment.KIND_STATS)
        os._exit(0)  # "crash": never unlinks
    os.waitpid(pid, 0)
    name = segment.segment_name(ns, "a")
    assert segment.find_stale(ns) == [name]
    seg = segment.create(ns, "a", 128, segment.KIND_STATS)
    assert seg.header.owner_pid == os.getpid()
    assert segment.find_stale(ns) == []
    assert segment.unlink_all(ns) == 1
    assert segment.list_segments(ns) == []


def test_bad_namespace_is_refused():
    with pytest.raises(segment.SegmentError, match="alphanumeric"):
        segment.segment_name("../etc", "x")
