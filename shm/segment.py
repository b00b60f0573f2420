"""Named POSIX shared-memory segments with a self-describing header.

Every segment starts with a 128-byte header: magic, layout version, schema fingerprint,
owner pid, creation time, kind and payload size. ``create`` refuses to clobber a segment
whose owner is alive, and replaces one whose owner is gone (a crashed run), logging it.
``attach`` refuses, with a message naming both versions, a segment whose layout differs from
the one this process was built with: silently reading another layout would trade on garbage.

Segments are created with mode 0600 (the data is the firm's book and positions) and live in
``/dev/shm`` as ``hft.<namespace>.<name>``, so several engines (tests, paper and live) can
run side by side without meeting.
"""

from __future__ import annotations

import mmap
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import posix_ipc

from shm import schema

MAGIC: Final = b"HFTSHM\x00\x01"
HEADER_SIZE: Final = 128
_HEADER = struct.Struct("<8sIIqqII Q")  # magic, version, fingerprint, pid, created, kind, _, size
SHM_DIR: Final = Path("/dev/shm")
PREFIX: Final = "hft."

# segment kinds, stamped in the header so a ring is never attached as a stats block
KIND_RING: Final = 1
KIND_CONTROL: Final = 2
KIND_STATS: Final = 3
KIND_SYMBOLS: Final = 4
KIND_POSITIONS: Final = 5


class SegmentError(RuntimeError):
    """A segment cannot be created or attached; the message says why and what to do."""


class LayoutMismatch(SegmentError):
    """The segment was written by a build with another record layout."""


class SegmentBusy(SegmentError):
    """A live process owns a segment of that name."""


def segment_name(namespace: str, name: str) -> str:
    """Return the POSIX name of a segment (``/hft.<namespace>.<name>``)."""
    if not namespace.replace("-", "").replace("_", "").isalnum():
        raise SegmentError(f"namespace {namespace!r} must be alphanumeric (with - or _)")
    return f"/{PREFIX}{namespace}.{name}"


def pid_alive(pid: int) -> bool:
    """Return True if a process with this pid exists (zombies count as gone)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
        return state != b"Z"
    except (OSError, IndexError):
        return True


@dataclass(frozen=True, slots=True)
class Header:
    """The decoded header of a segment."""

    magic: bytes
    version: int
    fingerprint: int
    owner_pid: int
    created_ns: int
    kind: int
    size: int


def _read_header(raw: bytes) -> Header:
    magic, version, fp, pid, created, kind, _unused, size = _HEADER.unpack_from(raw, 0)
    return Header(magic, version, fp, pid, created, kind, size)


class Segment:
    """One mapped segment; ``payload`` is a writable memoryview after the header."""

    def __init__(self, name: str, mm: mmap.mmap, header: Header, *, owner: bool) -> None:
        self.name = name
        self.header = header
        self.owner = owner
        self._mm = mm
        self.payload = memoryview(mm)[HEADER_SIZE : HEADER_SIZE + header.size]

    def close(self) -> None:
        """Unmap; views handed out must be dropped first, else the map stays until they are."""
        try:
            self.payload.release()
            self._mm.close()
        except BufferError:
            pass

    def unlink(self) -> None:
        """Remove the name from /dev/shm (mapped views stay valid until closed)."""
        try:
            posix_ipc.unlink_shared_memory(self.name)
        except posix_ipc.ExistentialError:
            pass


def _map(name: str, size: int) -> mmap.mmap:
    mem = posix_ipc.SharedMemory(name)
    try:
        return mmap.mmap(mem.fd, size)
    finally:
        mem.close_fd()


def read_header(name: str) -> Header | None:
    """Return the header of an existing segment, or None if it is absent or too short."""
    try:
        mem = posix_ipc.SharedMemory(name)
    except posix_ipc.ExistentialError:
        return None
    try:
        if mem.size < HEADER_SIZE:
            return None
        with mmap.mmap(mem.fd, HEADER_SIZE, prot=mmap.PROT_READ) as mm:
            return _read_header(mm[:HEADER_SIZE])
    finally:
        mem.close_fd()


def create(namespace: str, name: str, size: int, kind: int) -> Segment:
    """Create a zeroed segment owned by this process, replacing a stale one left by a crash."""
    full = segment_name(namespace, name)
    old = read_header(full)
    if old is not None:
        if old.magic == MAGIC and old.owner_pid != os.getpid() and pid_alive(old.owner_pid):
            raise SegmentBusy(
                f"segment {full} is owned by live pid {old.owner_pid}: another engine runs in "
                f"namespace {namespace!r}; stop it or choose another namespace"
            )
        posix_ipc.unlink_shared_memory(full)
    total = HEADER_SIZE + size
    try:
        mem = posix_ipc.SharedMemory(full, posix_ipc.O_CREX, mode=0o600, size=total)
    except posix_ipc.ExistentialError as exc:
        raise SegmentBusy(f"segment {full} appeared while creating it: {exc}") from exc
    try:
        mm = mmap.mmap(mem.fd, total)
    finally:
        mem.close_fd()
    header = Header(
        MAGIC, schema.LAYOUT_VERSION, schema.fingerprint(), os.getpid(), time.time_ns(), kind, size
    )
    _HEADER.pack_into(
        mm,
        0,
        header.magic,
        header.version,
        header.fingerprint,
        header.owner_pid,
        header.created_ns,
        kind,
        0,
        size,
    )
    return Segment(full, mm, header, owner=True)


def attach(namespace: str, name: str, kind: int) -> Segment:
    """Map an existing segment after checking that its layout is this build's."""
    full = segment_name(namespace, name)
    header = read_header(full)
    if header is None:
        raise SegmentError(
            f"segment {full} does not exist: is the engine (supervisor) running in namespace {namespace!r}?"
        )
    if header.magic != MAGIC:
        raise LayoutMismatch(f"segment {full} is not an hft segment (magic {header.magic!r})")
    if header.version != schema.LAYOUT_VERSION or header.fingerprint != schema.fingerprint():
        raise LayoutMismatch(
            f"segment {full} has layout version {header.version} (fingerprint {header.fingerprint:#010x}) "
            f"but this build uses version {schema.LAYOUT_VERSION} (fingerprint {schema.fingerprint():#010x}); "
            "restart the whole engine with one build"
        )
    if header.kind != kind:
        raise LayoutMismatch(f"segment {full} is of kind {header.kind}, expected {kind}")
    mm = _map(full, HEADER_SIZE + header.size)
    return Segment(full, mm, header, owner=False)


def list_segments(namespace: str | None = None) -> list[str]:
    """Return the POSIX names of our segments in /dev/shm, optionally for one namespace."""
    if not SHM_DIR.is_dir():
        return []
    prefix = PREFIX + (f"{namespace}." if namespace else "")
    return sorted("/" + p.name for p in SHM_DIR.iterdir() if p.name.startswith(prefix))


def find_stale(namespace: str | None = None) -> list[str]:
    """Return segments whose owner process is gone (left by a crash or kill -9)."""
    stale = []
    for name in list_segments(namespace):
        if name.split(".")[-1].startswith("bell"):
            continue
        header = read_header(name)
        if header is None or header.magic != MAGIC or not pid_alive(header.owner_pid):
            stale.append(name)
    return stale


def unlink_all(namespace: str) -> int:
    """Unlink every segment and doorbell semaphore of a namespace; return how many."""
    n = 0
    for name in list_segments(namespace):
        try:
            posix_ipc.unlink_shared_memory(name)
            n += 1
        except posix_ipc.ExistentialError:
            pass
    for path in SHM_DIR.glob(f"sem.{PREFIX}{namespace}.*"):
        try:
            posix_ipc.unlink_semaphore("/" + path.name[len("sem.") :])
            n += 1
        except posix_ipc.ExistentialError:
            pass
    return n
