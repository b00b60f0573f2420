"""The order and fill journal: SQLite in WAL mode, written before the risk stage acts.

Contract: write first, then act
-------------------------------
Every write is one committed SQLite transaction by the time the call returns (a single
statement in autocommit mode: no BEGIN/COMMIT round trips), and the caller acts only after it
returns:

    order_new         -> then hand the order to the venue
    cancel_requested  -> then send the cancel to the venue
    order_acked / order_rejected / order_canceled / order_expired
                      -> then publish the event to route
    fill              -> then, only if it returned True (a new fill_id), apply it to the
                         positions and publish it; False means the fill was journaled before
                         (a venue re-delivery): it has been applied already, skip it
    funding           -> then add it to PnL, only if it returned True (same rule)
    day_rollover      -> then reset the daily PnL base

A crash (kill -9) between a write and the act leaves the journal one step *ahead* of the
world, never behind: an order journaled but never sent is open in the journal and absent at
the venue, and reconciliation closes it; a fill journaled but not yet applied is applied by
``rebuild``. The other order (act, then write) would leave orders at the venue that the
journal does not know about, which nothing on our side can repair.

The write-ahead file: an order without waiting for SQLite
----------------------------------------------------------
``order_new_ahead`` and ``cancel_requested_ahead`` (what the risk stage uses between a tick
and its order) store one 64-byte record in ``<journal>-ahead``, a fixed ring of
``AHEAD_SLOTS`` records in a shared file map (``AheadLog``), and return: the record is in the
kernel's page cache, as durable against a kill as a committed NORMAL transaction, and the
caller acts. The records go into SQLite (``INSERT`` / ``UPDATE`` as ``order_new`` /
``cancel_requested`` would) at ``flush()`` (the stage calls it at the end of every pass,
after acting) or first thing in any other write or read, so SQLite never holds an ack or a
fill of an order it does not have. A kill before the flush leaves them in the file: opening
the journal replays every record above the header's flushed mark into SQLite, in order,
before anything else (``replayed``). Why: on this machine a commit costs ~6 us back to back
but ~140 us when the stage has idled for a few milliseconds (its code and pages are out of
the caches; SQLite's path is long), and a tick-to-order path waits for it; a record costs
~2 us, ~50 us cold. What changes: nothing a reader of SQLite sees once the writer has
flushed or been reopened; a read-only opener (``read_only``) of a journal whose writer was
killed does not see the orders still in the write-ahead file until the writer reopens it.
The file belongs to one journal (its ``created_ns`` is in the header): the file of a deleted
journal is reset, not replayed; a damaged one is refused like a damaged journal.

``batch()`` groups several writes into one transaction (the ack, fills and expiry one taker
order causes): nothing in the block is durable before the block exits, so act after the
``with``. An exception in the block rolls all of it back.

Timestamps (``ts_ns``) are wall-clock ns since the epoch (``time.time_ns()``), not the
monotonic clock the stages time latency with: the day rollover and the audit trail need the
calendar, and the monotonic clock restarts at boot.

Durability and its cost: WAL, ``synchronous=NORMAL`` (default) or ``FULL``
---------------------------------------------------------------------------
A commit appends the changed pages to the ``-wal`` file with ``write()`` and ends with a
commit frame. Under NORMAL that is all: the bytes are in the kernel's page cache, which
outlives the process, so a process killed in any way (kill -9, segfault, OOM killer) loses
nothing it committed, and a transaction the kill cut short has no commit frame and is ignored
when the file is next opened: the journal is always exactly the committed writes. That is the
requirement. NORMAL does not survive a power cut or a kernel crash before writeback reaches
the disk (up to ~30 s of writes): the last transactions may be lost, the file stays
consistent. FULL also fsyncs the WAL at every commit, which survives power loss and costs a
device flush per write. Either way SQLite fsyncs when it checkpoints (copies the WAL back
into the database file, every ``autocheckpoint`` = 1,000 WAL pages by default): on a disk
that is a 1-4 ms stall of the one write that triggers it, about one write in 430. With
``autocheckpoint=0`` no write pays it, and the caller calls ``checkpoint()`` (2.5 ms on disk,
0.2 ms on tmpfs) at a quiet moment, at least every few thousand writes.

The file is held with ``locking_mode=EXCLUSIVE`` (default): no per-transaction file locking
and a WAL index in our heap, which halves the cost of a write (order_new 9.2 -> 4.2 us, fill 14.3 -> 9.2
us on tmpfs), and a second writer (a stray second risk stage) is refused at open. The price: no
other process can read the journal while the stage runs (``exclusive=False`` allows it, for
+5 us per write). Pages are 1 KB (a commit writes whole pages: -1.5 us). Statements
are constant strings, prepared once by the connection's statement cache and reused; a write
only binds and steps one, on one reused cursor.

Measured on this machine (2 vCPUs shared with other work, Python 3.11.7, SQLite 3.40.1),
us per call, median / p99, one write per transaction, 20,000 cycles of
new/ack/fill/cancel-request/cancel (FULL on disk: 2,000), two runs' range:

                          tmpfs (/dev/shm)        disk (/tmp: ext4, virtio disk)
                          NORMAL     FULL         NORMAL      FULL
    order_new             4.6/14     4.8/14       5.2/18      110-150/250-380
    order_acked           4.3/11     4.5/11       4.6/13      100-140/240-350
    cancel_requested      4.3/19     4.6/17       4.6/27      100-140/230-340
    order_canceled        6.7/15     7.0/14       7.1/24      115-160/250-420
    fill                  9.5/40     9.8/40       10.8/54     120-160/280-770
    batch() of 5 writes   29/72      29/70        32/85       170-215/350-950

(tmpfs ignores fsync, so FULL costs nothing there and buys nothing either: tmpfs does not
survive a reboot.) A fill costs twice an order write: it changes three pages (the fills
table, its fill_id index, and the order's ``filled`` through a trigger). The risk stage's
journal lives on disk: NORMAL costs it ~5-11 us per write plus the checkpoint stall above;
FULL would cost 100-160 us per write here (more on a disk without a write cache).

Recovery cost: opening runs ``PRAGMA quick_check`` (~18 ms for a 5 MB journal, ~175 ms for
30 MB: 300,000 orders and fills; ``verify=False`` skips it), and ``rebuild`` replays
~1.5 us per fill through ``Positions.apply_fill`` (0.4-0.5 s for 300,000 fills). Both grow
with the history; a positions snapshot in the day marks would bound them (not done yet).

Schema (version ``SCHEMA_VERSION``, STRICT tables)
--------------------------------------------------
    schema_version(version, created_ns)      one row; version 1 is migrated (adds symbols),
                                             another version is refused
    symbols(symbol_id PK, name)              the instrument each symbol id meant when it was
                                             used (``bind_symbols``)
    ahead_state(flushed)                     one row: the last write-ahead record SQLite holds
    orders(order_id PK, symbol_id, side, qty, px, style, tif, origin 'route'|'risk', state,
           filled, new_ns, acked_ns, cancel_ns, done_ns, reason)
    fills(seq PK = journal order, fill_id UNIQUE, order_id, symbol_id, side, qty, px, fee,
          liquidity 'maker'|'taker', ts_ns)
    funding(seq PK, symbol_id, amount, ts_ns, UNIQUE(symbol_id, ts_ns))
    days(day PK, realized, fees, funding, unrealized, ts_ns)   closing marks of UTC days
    trigger fill_counts                      a new fill adds its qty to orders.filled
    view order_status                        orders with a status name and remaining qty,
                                             for a human with the sqlite3 CLI

Order states (``orders.state``); "open" means the venue may still fill it:

    NEW             journaled, handed (or about to be) to the venue, no answer yet   open
    ACKED           resting at the venue                                              open
    CANCEL_PENDING  cancel sent, not confirmed: the venue may still fill it           open
    REJECTED        refused by the venue                                              closed
    CANCELED        cancel confirmed (or found gone by reconciliation)                closed
    EXPIRED         ended by the venue (the unfilled rest of an IOC)                  closed
    filled          derived, not stored: an open state whose fills reach its qty
                    (remaining <= qty * 1e-9: float dust of partial sums)            closed

Transitions only move forward: ack NEW -> ACKED (a late ack of a CANCEL_PENDING order only
records its time); cancel_requested NEW/ACKED -> CANCEL_PENDING; reject/cancel/expire any
open state -> that closed state. A closed or fully filled order is never changed again: the
write returns False, as it does for an unknown order id. A fill is journaled whatever its
order's state (a fill that raced a cancel is real money), even with no order_new (counted as
an orphan by ``rebuild``).

Recovery algorithm
------------------
1. ``Journal(path)``: SQLite replays the WAL (committed transactions only); the schema
   version is checked and ``PRAGMA quick_check`` run; a damaged or foreign file is refused
   with an exception naming it and saying what to do, never guessed at or overwritten.
2. ``rebuild(apply_fill)``, in one read snapshot: every fill in journal order (``seq``) goes
   to the caller's ``apply_fill(symbol_id, side, px, qty, fee)`` -- the risk stage's own
   ``Positions.apply_fill`` on fresh ``Positions``, so quantities, average prices, realised
   PnL and fees come out of the one implementation that computed them live, bit for bit.
   Fees and funding are summed per symbol. Open orders: state open and remaining
   (qty - filled) above the dust. The day base: the last ``days`` row, the open day being
   the one after it (with no row: the day the journal was created).
3. ``reconcile(rec.open_orders, venue_open)`` against the venue's open orders
   ({order_id: leaves qty}); the caller resolves each difference and journals the outcome
   before acting on it, as always:
   - ``gone``: open in the journal, not at the venue: it filled, was cancelled or expired
     while we were down, or never reached the venue (we died between ``order_new`` and the
     send). Fetch its fills from the venue (a live venue: trade history by order id) and
     journal them with ``fill`` (idempotent: those already journaled return False; apply
     the ones that return True), then ``order_canceled(..., reason)`` unless the fills
     completed it, and publish the outcome to route. The paper exchange dies with the
     process and nothing filled after the crash; the risk stage does not reconcile it but
     puts every open order back into the new exchange (``stages.risk``, "Restart").
   - ``short``: the venue's leaves are below our remaining qty: fills we missed; fetch and
     journal them as for ``gone``.
   - ``long``: the venue's leaves exceed our remaining qty: we journaled fills the venue
     does not know. Should not happen: keep the journal, halt trading, call a human.
   - ``unknown``: open at the venue but not open in the journal: cancel it at the venue
     (``cancel_requested`` first if the journal has the order).
   - ``to_ack``: journaled NEW and resting at the venue: ``order_acked``.
4. Carry on: the order-id high-water mark becomes ``max(rec.last_order_id, the shm
   counter)``; the daily PnL base is the recovered mark, rolled over first if midnight
   passed while the stage was down (below).

Daily rollover at UTC midnight
------------------------------
``utc_day(ts_ns)`` is the UTC day number (days since 1970-01-01), ``next_midnight_ns(ts_ns)``
the next UTC midnight. The caller keeps ``next_midnight_ns(time.time_ns())`` and, on the
first loop at or past it, calls ``day_rollover(utc_day(now) - 1, realized, fees, funding,
unrealized=...)`` with its cumulative totals of that moment (since the journal began:
``sum(Positions.realized)``, which is net of fees, ``sum(Positions.fees)``, total funding,
and unrealised PnL at the current marks), then sets the next midnight. Daily PnL is PnL
since the mark: ``(realized + unrealized + funding) now - the same at the mark``; the day's
fees are ``fees now - fees at the mark``. A second rollover of the same day is ignored (the
first mark stands). After a restart, ``rec.day < utc_day(now)`` means midnight passed while
the stage was down: roll over at once with the rebuilt totals (the PnL between midnight and
the restart then counts in the closed day: the marks of midnight are lost).
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import sqlite3
import struct
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Final, Literal

from shm import schema

SCHEMA_VERSION: Final = 2
_SQL_SYMBOLS: Final = """
CREATE TABLE symbols (
    symbol_id INTEGER PRIMARY KEY,
    name TEXT NOT NULL
) STRICT
"""
_SQL_AHEAD_STATE: Final = (
    "CREATE TABLE ahead_state (flushed INTEGER NOT NULL) STRICT",
    "INSERT INTO ahead_state VALUES (0)",
)
_SQL_AHEAD: Final = "UPDATE ahead_state SET flushed = ?"
NS_PER_DAY: Final = 86_400 * 1_000_000_000

# order states (orders.state)
NEW: Final = 0
ACKED: Final = 1
CANCEL_PENDING: Final = 2
REJECTED: Final = 3
CANCELED: Final = 4
EXPIRED: Final = 5
OPEN_STATES: Final = frozenset({NEW, ACKED, CANCEL_PENDING})
_OPEN: Final = f"{NEW}, {ACKED}, {CANCEL_PENDING}"
STATE_NAMES: Final = {
    NEW: "new",
    ACKED: "acked",
    CANCEL_PENDING: "cancel_pending",
    REJECTED: "rejected",
    CANCELED: "canceled",
    EXPIRED: "expired",
}
FILL_TOL: Final = 1e-9  # remaining <= qty * FILL_TOL: fully filled (float dust of partial sums)
_FULL: Final = f"filled >= qty * (1 - {FILL_TOL})"  # SQL: the fills add up to the order
SYNCHRONOUS: Final = ("NORMAL", "FULL", "EXTRA")
PAGE_SIZE: Final = 1024  # a commit writes whole pages to the WAL: small rows, small pages
BUSY_TIMEOUT_MS: Final = 200

Origin = Literal["route", "risk"]
ApplyFill = Callable[[int, int, float, float, float], None]

_LIQUIDITY: Final[dict[str | int, str]] = {
    "maker": "maker",
    "taker": "taker",
    schema.LIQ_MAKER: "maker",
    schema.LIQ_TAKER: "taker",
}

_DDL: Final = (
    """
CREATE TABLE schema_version (
    version INTEGER NOT NULL,
    created_ns INTEGER NOT NULL
) STRICT
""",
    f"""
CREATE TABLE orders (
    order_id INTEGER PRIMARY KEY,
    symbol_id INTEGER NOT NULL,
    side INTEGER NOT NULL CHECK (side IN (-1, 1)),
    qty REAL NOT NULL,
    px REAL NOT NULL,
    style INTEGER NOT NULL,
    tif INTEGER NOT NULL,
    origin TEXT NOT NULL CHECK (origin IN ('route', 'risk')),
    state INTEGER NOT NULL DEFAULT {NEW},
    filled REAL NOT NULL DEFAULT 0,
    new_ns INTEGER NOT NULL,
    acked_ns INTEGER,
    cancel_ns INTEGER,
    done_ns INTEGER,
    reason TEXT
) STRICT
""",
    """
CREATE TABLE fills (
    seq INTEGER PRIMARY KEY,
    fill_id TEXT NOT NULL UNIQUE,
    order_id INTEGER NOT NULL,
    symbol_id INTEGER NOT NULL,
    side INTEGER NOT NULL CHECK (side IN (-1, 1)),
    qty REAL NOT NULL,
    px REAL NOT NULL,
    fee REAL NOT NULL,
    liquidity TEXT NOT NULL CHECK (liquidity IN ('maker', 'taker')),
    ts_ns INTEGER NOT NULL
) STRICT
""",
    """
CREATE TABLE funding (
    seq INTEGER PRIMARY KEY,
    symbol_id INTEGER NOT NULL,
    amount REAL NOT NULL,
    ts_ns INTEGER NOT NULL,
    UNIQUE (symbol_id, ts_ns)
) STRICT
""",
    """
CREATE TABLE days (
    day INTEGER PRIMARY KEY,
    realized REAL NOT NULL,
    fees REAL NOT NULL,
    funding REAL NOT NULL,
    unrealized REAL NOT NULL,
    ts_ns INTEGER NOT NULL
) STRICT
""",
    """
CREATE TRIGGER fill_counts AFTER INSERT ON fills BEGIN
    UPDATE orders SET filled = filled + NEW.qty WHERE order_id = NEW.order_id;
END
""",
    _SQL_SYMBOLS,
    *_SQL_AHEAD_STATE,
    f"""
CREATE VIEW order_status AS
SELECT CASE
           WHEN state IN ({_OPEN}) AND {_FULL} THEN 'filled'
           ELSE CASE state {" ".join(f"WHEN {k} THEN '{v}'" for k, v in STATE_NAMES.items())} END
       END AS status,
       qty - filled AS remaining,
       *
FROM orders
""",
)

# The write statements: constant strings, so the connection's statement cache prepares each
# once and every call only binds and steps it.
_SQL_NEW: Final = (
    "INSERT INTO orders (order_id, symbol_id, side, qty, px, style, tif, origin, new_ns)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_SQL_ACK: Final = (
    f"UPDATE orders SET state = CASE state WHEN {NEW} THEN {ACKED} ELSE state END,"
    " acked_ns = coalesce(acked_ns, ?)"
    f" WHERE order_id = ? AND state IN ({NEW}, {CANCEL_PENDING}) AND NOT {_FULL}"
)
_SQL_CANCEL_REQ: Final = (
    f"UPDATE orders SET state = {CANCEL_PENDING}, cancel_ns = ?"
    f" WHERE order_id = ? AND state IN ({NEW}, {ACKED}) AND NOT {_FULL}"
)
_SQL_CLOSE: Final = (
    "UPDATE orders SET state = ?, done_ns = ?, reason = ?"
    f" WHERE order_id = ? AND state IN ({_OPEN}) AND NOT {_FULL}"
)
_SQL_FILL: Final = (
    "INSERT INTO fills"
    " (fill_id, order_id, symbol_id, side, qty, px, fee, liquidity, ts_ns)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (fill_id) DO NOTHING"
)
_SQL_FUNDING: Final = (
    "INSERT INTO funding (symbol_id, amount, ts_ns) VALUES (?, ?, ?)"
    " ON CONFLICT (symbol_id, ts_ns) DO NOTHING"
)
_SQL_DAY: Final = (
    "INSERT INTO days (day, realized, fees, funding, unrealized, ts_ns)"
    " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (day) DO NOTHING"
)


class JournalError(Exception):
    """The journal cannot be used as it is."""


class JournalSchemaError(JournalError):
    """The file is an SQLite database, but not a journal of this schema version."""


class JournalCorrupt(JournalError):
    """The file is not a readable SQLite database, or SQLite finds it damaged."""


class JournalSymbolMismatch(JournalError):
    """The journal's symbol ids name other instruments than this engine's (``bind_symbols``)."""


class DuplicateOrder(JournalError):
    """``order_new`` for an order id the journal already has: it was acted on before."""


# ---------------------------------------------------------------------- the write-ahead file
AHEAD_SUFFIX: Final = "-ahead"  # next to the journal's -wal and -shm files
AHEAD_MAGIC: Final = b"HFTAHEAD"
AHEAD_VERSION: Final = 1
AHEAD_SLOTS: Final = 4096  # records in the ring; the stage flushes after every pass
AHEAD_NEW: Final = 1
AHEAD_CANCEL: Final = 2
_ID_END: Final = 1 << 63  # order ids: SQLite's signed 64-bit INTEGER, positive
_FLUSH_AT: Final = AHEAD_SLOTS // 2  # pending records that force a flush before the next
_REC: Final = 64  # bytes per record (and the header)
# header: magic, version, slots, the journal's created_ns, reserved (the last record SQLite
# holds is kept in SQLite, in the transaction that puts the records there)
_HEAD: Final = struct.Struct("<8sIIqQ")
# record: seq (stored last; 0 = empty), then the body, which repeats seq at its end
_SEQ: Final = struct.Struct("<Q")
# kind side style tif origin, symbol, order id, qty, px, ts, seq
_BODY: Final = struct.Struct("<BbBBBxxxIxxxxqddqQ")
_ORIGINS: Final[tuple[Origin, ...]] = ("route", "risk")
_pack_body, _pack_seq = _BODY.pack_into, _SEQ.pack_into


@dataclass(frozen=True, slots=True)
class Ahead:
    """One record of the write-ahead file: an order or cancel request to put into SQLite."""

    seq: int
    kind: int
    order_id: int
    symbol_id: int
    side: int
    qty: float
    px: float
    style: int
    tif: int
    origin: Origin
    ts_ns: int


class AheadLog:
    """The journal's write-ahead file: a fixed ring of 64-byte records in a shared file map.

    A record is durable against a process kill when ``write`` returns: the bytes are in the
    kernel's page cache (the same promise as the journal's ``synchronous=NORMAL``; with
    ``sync=True`` each record's page is also ``msync``-ed, for FULL). The body is stored
    first and the sequence number in front of it last, so a record cut short by a kill
    still shows the number of the record it overwrote (one SQLite holds already: the ring
    never laps an unflushed record) and is ignored; so is one whose body does not end with
    its own number. SQLite keeps the highest sequence number it holds (table
    ``ahead_state``, written in the transaction that puts the records there); records above
    it are replayed into SQLite when the journal is next opened, and a file holding records
    above it with a hole among them (a journal older than its file) is refused. Two stores,
    no checksum: the write sits between a tick and its order.
    """

    def __init__(
        self, path: Path, journal_created_ns: int, flushed: int, *, sync: bool = False
    ) -> None:
        self.path = path
        self.sync = sync
        size = _REC * (AHEAD_SLOTS + 1)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            have = os.fstat(fd).st_size
            fresh = have == 0
            if not fresh and have != size:
                raise JournalCorrupt(
                    f"{path} is {have} bytes, a write-ahead file of this version is {size}: "
                    "it is damaged or from another version; stop, move it aside, and check the "
                    "journal's open orders against the venue"
                )
            if fresh:
                os.ftruncate(fd, size)
            self._mm = mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        magic, version, slots, created, _ = _HEAD.unpack_from(mm, 0)
        self.reset_from: int | None = None
        if magic == bytes(8) and version == slots == created == 0:
            fresh = True  # a kill while the file was being created or reset: start it again
        if not fresh and (magic, version, slots) != (AHEAD_MAGIC, AHEAD_VERSION, AHEAD_SLOTS):
            mm.close()
            raise JournalCorrupt(
                f"{path} is not a write-ahead file of this version (magic {magic!r}, version "
                f"{version}, {slots} slots): move it aside and check the journal's open "
                "orders against the venue"
            )
        if fresh or created != journal_created_ns:
            # a new file, or one left by a journal that was deleted: nothing in it is ours
            if not fresh:
                self.reset_from = created
            mm[:] = bytes(size)  # the header first: a kill in between leaves a fresh file
            _HEAD.pack_into(mm, 0, AHEAD_MAGIC, AHEAD_VERSION, AHEAD_SLOTS, journal_created_ns, 0)
        self.flushed = int(flushed)  # the last record SQLite holds (SQLite says, not this file)
        seqs = [r.seq for r in self.records() if r.seq > self.flushed]
        if seqs and seqs != list(range(self.flushed + 1, seqs[-1] + 1)):
            mm.close()
            raise JournalCorrupt(
                f"{path} holds orders the journal does not ({seqs[0]}..{seqs[-1]}) but not all "
                f"of those after the journal's last ({self.flushed}): the journal is older than "
                "its write-ahead file (restored from a copy?). Do not trade on it: move both "
                "aside and reconcile positions and open orders with the venue by hand"
            )
        self.seq = seqs[-1] if seqs else self.flushed

    def records(self) -> list[Ahead]:
        """Every intact record in the ring, in sequence order (flushed ones included)."""
        mm, out = self._mm, []
        for slot in range(AHEAD_SLOTS):
            off = _REC * (slot + 1)
            (seq,) = _SEQ.unpack_from(mm, off)
            if not seq or seq % AHEAD_SLOTS != slot:
                continue
            kind, side, style, tif, origin, sym, oid, qty, px, ts, check = _BODY.unpack_from(
                mm, off + 8
            )
            if check != seq or kind not in (AHEAD_NEW, AHEAD_CANCEL) or origin >= len(_ORIGINS):
                continue
            out.append(Ahead(seq, kind, oid, sym, side, qty, px, style, tif, _ORIGINS[origin], ts))
        out.sort(key=lambda r: r.seq)
        return out

    def unflushed(self) -> list[Ahead]:
        return [r for r in self.records() if r.seq > self.flushed]

    def write(
        self,
        kind: int,
        order_id: int,
        symbol_id: int = 0,
        side: int = 0,
        qty: float = 0.0,
        px: float = 0.0,
        style: int = 0,
        tif: int = 0,
        origin: int = 0,
        ts_ns: int = 0,
    ) -> int:
        """Store one record; durable (against a kill) on return. Returns its sequence number."""
        seq = self.seq + 1
        if seq - self.flushed >= AHEAD_SLOTS:
            raise JournalError(f"{self.path}: {AHEAD_SLOTS} records not flushed to SQLite")
        off = _REC * (seq % AHEAD_SLOTS + 1)
        mm = self._mm
        _pack_body(
            mm, off + 8, kind, side, style, tif, origin, symbol_id, order_id, qty, px, ts_ns, seq
        )
        _pack_seq(mm, off, seq)  # last: the record exists from here
        self.seq = seq
        if self.sync:
            page = off - off % mmap.ALLOCATIONGRANULARITY
            mm.flush(page, min(mmap.ALLOCATIONGRANULARITY, len(mm) - page))
        return seq

    def close(self) -> None:
        self._mm.close()


def utc_day(ts_ns: int) -> int:
    """The UTC day number (days since 1970-01-01) of a wall-clock time in ns."""
    return ts_ns // NS_PER_DAY


def day_start_ns(day: int) -> int:
    """UTC midnight opening ``day``, in ns since the epoch."""
    return day * NS_PER_DAY


def next_midnight_ns(ts_ns: int) -> int:
    """The first UTC midnight strictly after ``ts_ns``."""
    return (utc_day(ts_ns) + 1) * NS_PER_DAY


@dataclass(frozen=True, slots=True)
class OpenOrder:
    """An order the venue may still fill, as the journal knows it."""

    order_id: int
    symbol_id: int
    side: int
    qty: float
    px: float
    style: int
    tif: int
    origin: str
    state: int  # NEW, ACKED or CANCEL_PENDING
    filled: float
    remaining: float  # qty - filled
    new_ns: int


@dataclass(frozen=True, slots=True)
class Recovered:
    """What ``rebuild`` found; positions themselves went through the caller's ``apply_fill``."""

    open_orders: tuple[OpenOrder, ...]  # by order id
    fees: Mapping[int, float]  # symbol_id -> fees paid since the journal began
    funding: Mapping[int, float]  # symbol_id -> funding received (+) / paid (-)
    day: int  # the UTC day now open: its start point is below
    day_realized: float  # cumulative totals at the start of ``day`` (the last rollover mark)
    day_fees: float
    day_funding: float
    day_unrealized: float
    last_order_id: int  # 0 for an empty journal
    n_orders: int
    n_fills: int
    n_funding: int
    n_orphan_fills: int  # fills of an order id the journal has no order_new for

    @property
    def total_fees(self) -> float:
        return math.fsum(self.fees.values())

    @property
    def total_funding(self) -> float:
        return math.fsum(self.funding.values())


@dataclass(frozen=True, slots=True)
class Reconciliation:
    """How the journal's open orders differ from the venue's; empty when they agree."""

    gone: tuple[OpenOrder, ...]  # open in the journal, not at the venue
    unknown: tuple[int, ...]  # open at the venue, not open in the journal
    short: tuple[tuple[OpenOrder, float], ...]  # (order, venue leaves) leaves < remaining
    long: tuple[tuple[OpenOrder, float], ...]  # (order, venue leaves) leaves > remaining
    to_ack: tuple[OpenOrder, ...]  # journaled NEW, resting at the venue

    @property
    def agrees(self) -> bool:
        return not (self.gone or self.unknown or self.short or self.long)


def reconcile(
    open_orders: Iterable[OpenOrder], venue_open: Mapping[int, float], *, tol: float = FILL_TOL
) -> Reconciliation:
    """Compare the journal's open orders with the venue's ({order_id: leaves qty})."""
    gone: list[OpenOrder] = []
    short: list[tuple[OpenOrder, float]] = []
    long: list[tuple[OpenOrder, float]] = []
    to_ack: list[OpenOrder] = []
    mine: set[int] = set()
    for o in open_orders:
        mine.add(o.order_id)
        leaves = venue_open.get(o.order_id)
        if leaves is None:
            gone.append(o)
            continue
        if o.state == NEW:
            to_ack.append(o)
        slack = o.qty * tol
        if leaves < o.remaining - slack:
            short.append((o, leaves))
        elif leaves > o.remaining + slack:
            long.append((o, leaves))
    unknown = tuple(sorted(oid for oid in venue_open if oid not in mine))
    return Reconciliation(tuple(gone), unknown, tuple(short), tuple(long), tuple(to_ack))


def _refuse_corrupt(path: Path, err: BaseException | str) -> JournalCorrupt:
    return JournalCorrupt(
        f"journal {path} is not a readable SQLite journal or is damaged ({err}). It holds the "
        "record of orders and fills: do not delete it. Stop the engine, move the file (with "
        "its -wal file, if any) aside for inspection, try `sqlite3 FILE .recover | sqlite3 "
        "NEW` to salvage it, and before trading on a fresh journal reconcile positions and "
        "open orders with the venue by hand."
    )


class Journal:
    """One writer's connection to the journal file (see the module docstring)."""

    def __init__(
        self,
        path: str | Path,
        *,
        synchronous: str = "NORMAL",
        exclusive: bool = True,
        autocheckpoint: int = 1000,
        verify: bool = True,
    ) -> None:
        sync = synchronous.upper()
        if sync not in SYNCHRONOUS:
            raise ValueError(f"synchronous must be one of {SYNCHRONOUS}, got {synchronous!r}")
        self.path = Path(path)
        self.synchronous = sync
        self.exclusive = exclusive
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._batch_depth = 0
        # isolation_level=None: no implicit transactions; each write statement commits itself
        conn = sqlite3.connect(self.path, isolation_level=None, cached_statements=64)
        try:
            self.created_ns = self._open(conn, exclusive, autocheckpoint, verify)
        except sqlite3.DatabaseError as e:
            conn.close()
            name = getattr(e, "sqlite_errorname", "")
            if name.startswith(("SQLITE_NOTADB", "SQLITE_CORRUPT")):
                raise _refuse_corrupt(self.path, e) from e
            if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
                raise JournalError(
                    f"journal {self.path} is in use by another process (a second risk stage?): "
                    "it has one writer; stop the other one"
                ) from e
            raise JournalError(f"journal {self.path} cannot be opened: {e} ({name})") from e
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        self._exec = conn.cursor().execute  # one cursor for every write: no allocation per call
        self._pending: list[tuple[int, int, tuple[object, ...]]] = []  # (seq, kind, params)
        self._in_tx: list[tuple[int, int, tuple[object, ...]]] = []  # applied, not committed
        self.ahead_duplicates = 0  # write-ahead orders SQLite already had (counted, skipped)
        try:
            flushed = conn.execute("SELECT flushed FROM ahead_state").fetchone()[0]
            self._ahead: AheadLog | None = AheadLog(
                Path(f"{self.path}{AHEAD_SUFFIX}"),
                self.created_ns,
                int(flushed),
                sync=sync != "NORMAL",
            )
            self.replayed = self._replay()
        except BaseException:
            conn.close()
            raise

    def _open(
        self, conn: sqlite3.Connection, exclusive: bool, autocheckpoint: int, verify: bool
    ) -> int:
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        conn.execute(f"PRAGMA page_size={PAGE_SIZE}")  # takes effect only on a new file
        if exclusive:  # before the first WAL access: the WAL index then lives in our heap
            conn.execute("PRAGMA locking_mode=EXCLUSIVE")
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise JournalError(f"journal {self.path}: SQLite refused WAL mode (got {mode!r})")
        conn.execute(f"PRAGMA synchronous={self.synchronous}")
        conn.execute(f"PRAGMA wal_autocheckpoint={int(autocheckpoint)}")
        conn.execute("BEGIN IMMEDIATE")  # two openers of a new file must not both create it
        try:
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_schema")}
            if not tables:
                created = time.time_ns()
                for stmt in _DDL:
                    conn.execute(stmt)
                conn.execute("INSERT INTO schema_version VALUES (?, ?)", (SCHEMA_VERSION, created))
            elif "schema_version" not in tables:
                raise JournalSchemaError(
                    f"{self.path} is an SQLite database but not a journal (tables: "
                    f"{', '.join(sorted(tables))}): point paper.journal_path elsewhere"
                )
            else:
                row = conn.execute("SELECT version, created_ns FROM schema_version").fetchone()
                version, created = (row[0], row[1]) if row else (None, 0)
                if version in (1, SCHEMA_VERSION):  # 1 -> 2: symbols (bound at the next
                    # start) and ahead_state (also absent from the first files of version 2)
                    if "symbols" not in tables:
                        conn.execute(_SQL_SYMBOLS)
                    if "ahead_state" not in tables:
                        for stmt in _SQL_AHEAD_STATE:
                            conn.execute(stmt)
                    if version == 1:
                        conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))
                else:
                    raise JournalSchemaError(
                        f"journal {self.path} has schema version {version}, this code reads "
                        f"version {SCHEMA_VERSION}: run the engine version that wrote it to "
                        "close its positions, or migrate the file; do not delete it"
                    )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        if verify:
            bad = [r[0] for r in conn.execute("PRAGMA quick_check")]
            if bad != ["ok"]:
                raise _refuse_corrupt(self.path, "; ".join(str(b) for b in bad[:5]))
        return int(created)

    @classmethod
    def read_only(cls, path: str | Path) -> Journal:
        """Open an existing journal for reading only (inspection, tests): ``rebuild`` and the
        other reads work, every write raises. Refused (``JournalError``) while a risk stage
        holds the file (its exclusive lock); fine once that process is gone, even killed."""
        self = cls.__new__(cls)
        self.path = Path(path)
        self.synchronous = ""
        self.exclusive = False
        self._batch_depth = 0
        if not self.path.is_file():
            raise JournalError(f"journal {self.path} does not exist")
        conn = sqlite3.connect(
            f"{self.path.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None
        )
        try:
            conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            row = conn.execute("SELECT version, created_ns FROM schema_version").fetchone()
            if row is None or row[0] not in (1, SCHEMA_VERSION):
                raise JournalSchemaError(f"journal {self.path}: schema version {row and row[0]}")
        except sqlite3.DatabaseError as e:
            conn.close()
            if getattr(e, "sqlite_errorname", "").startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
                raise JournalError(f"journal {self.path} is held by a running risk stage") from e
            raise JournalError(f"journal {self.path} cannot be read: {e}") from e
        except BaseException:
            conn.close()
            raise
        self.created_ns = int(row[1])
        self._conn = conn
        self._exec = conn.cursor().execute
        self._pending = []
        self._in_tx = []
        self.ahead_duplicates = 0
        self._ahead = None
        self.replayed = 0
        return self

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Flush the write-ahead records, close the connection (the last one out checkpoints
        and removes the -wal file)."""
        try:
            if self._pending:
                self.flush()
        finally:
            self._conn.close()
            if self._ahead is not None:
                self._ahead.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Group the writes in the block into one transaction, committed when it exits.

        Nothing written in the block is durable before the exit: act after the ``with``. An
        exception rolls the whole block back. Nested blocks join the outermost one.
        """
        if self._batch_depth:
            self._batch_depth += 1
            try:
                yield
            finally:
                self._batch_depth -= 1
            return
        self._conn.execute("BEGIN IMMEDIATE")
        self._batch_depth = 1
        try:
            if self._pending:  # the write-ahead records first: later writes may refer to them
                self._apply_pending()
            yield
            self._batch_depth = 0
            self._conn.execute("COMMIT")
        except BaseException:
            self._batch_depth = 0
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            # records rolled back are pending again (and still in the write-ahead file)
            self._pending[:0] = self._in_tx
            self._in_tx = []
            raise
        if self._in_tx:
            if self._ahead is not None:
                self._ahead.flushed = self._in_tx[-1][0]
            self._in_tx = []

    def checkpoint(self) -> None:
        """Copy the WAL back into the database file now (off the hot path, when idle)."""
        self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)")

    # ------------------------------------------------------------------ write-ahead
    def order_new_ahead(
        self,
        order_id: int,
        symbol_id: int,
        side: int,
        qty: float,
        px: float,
        style: int,
        tif: int,
        ts_ns: int,
        *,
        origin: Origin = "route",
    ) -> None:
        """``order_new`` through the write-ahead file: journaled (durable against a kill)
        when this returns, in SQLite at the next ``flush`` or other journal call. The caller
        must know the id is new (``has_order``): a duplicate is only found at the flush."""
        ahead = self._writable_ahead()
        if side != 1 and side != -1:
            raise ValueError(f"order {order_id} not journaled: side {side} is not 1 or -1")
        if not (0.0 < qty < math.inf and 0.0 < px < math.inf):
            raise ValueError(f"order {order_id} not journaled: qty {qty} and px {px} must be > 0")
        if not 0 < order_id < _ID_END:
            raise ValueError(f"order {order_id} not journaled: ids are 1 .. 2^63-1")
        try:
            seq = ahead.write(
                AHEAD_NEW, order_id, symbol_id, side, qty, px, style, tif,
                origin == "risk", ts_ns,
            )  # fmt: skip
        except struct.error as e:  # an id or symbol out of range: never acted on
            raise ValueError(f"order {order_id} not journaled: {e}") from e
        params = (order_id, symbol_id, side, qty, px, style, tif, origin, ts_ns)
        self._pending.append((seq, AHEAD_NEW, params))

    def cancel_requested_ahead(self, order_id: int, ts_ns: int) -> None:
        """``cancel_requested`` through the write-ahead file (as ``order_new_ahead``)."""
        ahead = self._writable_ahead()
        if not 0 < order_id < _ID_END:
            raise ValueError(f"cancel of order {order_id} not journaled: ids are 1 .. 2^63-1")
        try:
            seq = ahead.write(AHEAD_CANCEL, order_id, ts_ns=ts_ns)
        except struct.error as e:
            raise ValueError(f"cancel of order {order_id} not journaled: {e}") from e
        self._pending.append((seq, AHEAD_CANCEL, (ts_ns, order_id)))

    @property
    def ahead_reset_from(self) -> int | None:
        """The ``created_ns`` of another journal whose write-ahead file this open reset (its
        journal was deleted or replaced), else None."""
        return None if self._ahead is None else self._ahead.reset_from

    @property
    def pending(self) -> int:
        """Write-ahead records not in SQLite yet."""
        return len(self._pending)

    def flush(self) -> int:
        """Put the write-ahead records into SQLite (one transaction); return how many.
        Order ids SQLite already had are skipped (counted in ``ahead_duplicates``)."""
        n = len(self._pending)
        if not n:
            return 0
        if self._batch_depth:  # inside a batch: part of its transaction
            self._apply_pending()
        else:
            with self.batch():  # batch() applies them and commits
                pass
        return n

    def _writable_ahead(self) -> AheadLog:
        if self._ahead is None:
            raise JournalError(f"journal {self.path} is open read-only")
        if len(self._pending) >= _FLUSH_AT:
            self.flush()
        return self._ahead

    def _apply_pending(self) -> None:
        """Execute the pending records inside the open transaction (``batch`` commits, or
        puts them back to pending if it rolls back), with the last one's number."""
        x = self._exec
        for rec in self._pending:
            _seq, kind, params = rec
            if kind == AHEAD_NEW:
                try:
                    x(_SQL_NEW, params)
                except sqlite3.IntegrityError as e:
                    if e.sqlite_errorname != "SQLITE_CONSTRAINT_PRIMARYKEY":
                        raise
                    self.ahead_duplicates += 1  # the caller acted twice on one id
            else:
                x(_SQL_CANCEL_REQ, params)
            self._in_tx.append(rec)
        x(_SQL_AHEAD, (self._in_tx[-1][0],))
        self._pending.clear()

    def _replay(self) -> int:
        """Put the write-ahead records a killed writer left behind into SQLite (at open)."""
        assert self._ahead is not None
        todo = self._ahead.unflushed()
        for r in todo:
            if r.kind == AHEAD_NEW:
                params: tuple[object, ...] = (
                    r.order_id, r.symbol_id, r.side, r.qty, r.px, r.style, r.tif, r.origin,
                    r.ts_ns,
                )  # fmt: skip
            else:
                params = (r.ts_ns, r.order_id)
            self._pending.append((r.seq, r.kind, params))
        if todo:
            self.flush()
        return len(todo)

    def _x(self, sql: str, params: tuple[object, ...]) -> sqlite3.Cursor:
        """Execute one write; the write-ahead records go first (in their own transaction)."""
        if self._pending:
            self.flush()
        return self._exec(sql, params)

    def _reading(self) -> sqlite3.Connection:
        """The connection, for a read or a statement of its own: pending records first."""
        if self._pending:
            self.flush()
        return self._conn

    def has_order(self, order_id: int) -> bool:
        """The journal has this order id (in SQLite or the write-ahead file)."""
        if any(k == AHEAD_NEW and p[0] == order_id for _, k, p in self._pending):
            return True
        if not 0 <= order_id < 1 << 63:
            return False
        return (
            self._conn.execute("SELECT 1 FROM orders WHERE order_id = ?", (order_id,)).fetchone()
            is not None
        )

    # ------------------------------------------------------------------ writes
    def order_new(
        self,
        order_id: int,
        symbol_id: int,
        side: int,
        qty: float,
        px: float,
        style: int,
        tif: int,
        ts_ns: int,
        *,
        origin: Origin = "route",
    ) -> None:
        """Journal a new order before it goes to the venue; DuplicateOrder if the id exists."""
        try:
            self._x(_SQL_NEW, (order_id, symbol_id, side, qty, px, style, tif, origin, ts_ns))
        except sqlite3.IntegrityError as e:
            if e.sqlite_errorname == "SQLITE_CONSTRAINT_PRIMARYKEY":
                raise DuplicateOrder(f"order {order_id} is already in {self.path}") from e
            raise ValueError(f"order {order_id} not journaled: {e}") from e
        except OverflowError as e:  # an id past SQLite's signed 64 bits
            raise ValueError(f"order {order_id} not journaled: {e}") from e

    def order_acked(self, order_id: int, ts_ns: int) -> bool:
        """The venue accepted (rests) the order. False: unknown or already closed."""
        return self._x(_SQL_ACK, (ts_ns, order_id)).rowcount == 1

    def order_rejected(self, order_id: int, reason: int | str, ts_ns: int) -> bool:
        """The venue refused it; ``reason`` a REJECT_CODE or the venue's text."""
        if isinstance(reason, int) and 0 <= reason < len(schema.REJECT_REASONS):
            reason = schema.REJECT_REASONS[reason]
        return self._close(REJECTED, order_id, str(reason), ts_ns)

    def cancel_requested(self, order_id: int, ts_ns: int) -> bool:
        """About to send a cancel. False: unknown, closed, or a cancel already pending."""
        return self._x(_SQL_CANCEL_REQ, (ts_ns, order_id)).rowcount == 1

    def order_canceled(self, order_id: int, ts_ns: int, reason: str | None = None) -> bool:
        """The venue confirmed the cancel (or reconciliation found it gone)."""
        return self._close(CANCELED, order_id, reason, ts_ns)

    def order_expired(self, order_id: int, ts_ns: int) -> bool:
        """The venue ended the order itself (EV_EXPIRED: the unfilled rest of an IOC)."""
        return self._close(EXPIRED, order_id, None, ts_ns)

    def _close(self, state: int, order_id: int, reason: str | None, ts_ns: int) -> bool:
        return self._x(_SQL_CLOSE, (state, ts_ns, reason, order_id)).rowcount == 1

    def fill(
        self,
        order_id: int,
        fill_id: int | str,
        symbol_id: int,
        side: int,
        qty: float,
        px: float,
        fee: float,
        liquidity: str | int,
        ts_ns: int,
    ) -> bool:
        """Journal a fill; True if new, False if ``fill_id`` was journaled before (skip it).

        ``fill_id`` must be stable across re-deliveries: the venue's trade id, or for the
        paper exchange ``f"{order_id}.{n}"`` with n the order's fill count.
        """
        try:
            liq = _LIQUIDITY[liquidity]
        except KeyError:
            raise ValueError(f"liquidity must be 'maker' or 'taker', got {liquidity!r}") from None
        try:
            cur = self._x(
                _SQL_FILL, (str(fill_id), order_id, symbol_id, side, qty, px, fee, liq, ts_ns)
            )
        except sqlite3.IntegrityError as e:
            raise ValueError(f"fill {fill_id!r} of order {order_id} not journaled: {e}") from e
        return cur.rowcount == 1

    def funding(self, symbol_id: int, amount: float, ts_ns: int) -> bool:
        """A funding payment (+ received, - paid). False: already journaled for that time."""
        return self._x(_SQL_FUNDING, (symbol_id, amount, ts_ns)).rowcount == 1

    def day_rollover(
        self,
        day: int,
        realized: float,
        fees: float,
        funding: float,
        *,
        unrealized: float = 0.0,
        ts_ns: int | None = None,
    ) -> bool:
        """Close UTC ``day`` with the cumulative totals at that moment (the next day's base).

        False if ``day`` was already closed (the first mark stands); ValueError for a day
        before the last one closed.
        """
        last = self._reading().execute("SELECT max(day) FROM days").fetchone()[0]
        if last is not None and day < last:
            raise ValueError(f"day {day} is before the last closed day {last}")
        now = time.time_ns() if ts_ns is None else ts_ns
        cur = self._conn.execute(_SQL_DAY, (day, realized, fees, funding, unrealized, now))
        return cur.rowcount == 1

    def bind_symbols(self, names: Mapping[int, str]) -> list[int]:
        """Tie the journal's symbol ids to instruments: ``names`` is this engine's {symbol id:
        name}. An id the journal knows under another name is refused (``JournalSymbolMismatch``:
        the positions and orders journaled under it are another instrument's); ids it does not
        know yet are recorded. Returns the ids the journal knows that ``names`` lacks."""
        conn = self._reading()
        known = dict(conn.execute("SELECT symbol_id, name FROM symbols"))
        moved = {s: (known[s], n) for s, n in names.items() if s in known and known[s] != n}
        if moved:
            what = ", ".join(f"id {s}: journal {a!r}, engine {b!r}" for s, (a, b) in moved.items())
            raise JournalSymbolMismatch(
                f"journal {self.path} has its positions and orders under other symbols than "
                f"this engine ({what}): journal ids are positions in [feed] symbols, and that "
                "list changed. Put it back in the order the journal was written with, or close "
                "the positions with the old list before changing it; do not delete the journal"
            )
        new = [(s, n) for s, n in names.items() if s not in known]
        if new:
            with self.batch():
                self._conn.executemany("INSERT INTO symbols VALUES (?, ?)", new)
        return sorted(set(known) - set(names))

    # ------------------------------------------------------------------ reads
    def highest_order_id(self, origin: Origin | None = None) -> int:
        """The largest order id journaled (0 if none), of one ``origin`` if given (route's ids
        and the risk stage's own ones come from different ranges)."""
        conn = self._reading()
        if origin is None:
            row = conn.execute("SELECT max(order_id) FROM orders").fetchone()
        else:
            row = conn.execute(
                "SELECT max(order_id) FROM orders WHERE origin = ?", (origin,)
            ).fetchone()
        return int(row[0] or 0)

    def open_fill_counts(self) -> dict[int, int]:
        """{order_id: fills journaled} of the open orders that have fills: where a restarted
        paper exchange's fill numbering (``f"{order_id}.{n}"``) carries on."""
        return {
            int(oid): int(n)
            for oid, n in self._reading().execute(
                "SELECT f.order_id, count(*) FROM fills f JOIN orders o USING (order_id)"
                f" WHERE o.state IN ({_OPEN}) AND o.filled < o.qty * (1 - {FILL_TOL})"
                " GROUP BY f.order_id"
            )
        }

    def rebuild(self, apply_fill: ApplyFill) -> Recovered:
        """Replay every fill through ``apply_fill(symbol_id, side, px, qty, fee)`` in journal
        order and return the open orders, fee and funding totals and the day's base."""
        if self._batch_depth:
            raise JournalError("rebuild inside a batch")
        conn = self._reading()
        conn.execute("BEGIN")  # one snapshot for all the reads
        try:
            fees: dict[int, float] = {}
            n_fills = 0
            for s, side, px, qty, fee in conn.execute(
                "SELECT symbol_id, side, px, qty, fee FROM fills ORDER BY seq"
            ):
                apply_fill(s, side, px, qty, fee)
                fees[s] = fees.get(s, 0.0) + fee
                n_fills += 1
            funding: dict[int, float] = {}
            n_funding = 0
            for s, amount in conn.execute("SELECT symbol_id, amount FROM funding ORDER BY seq"):
                funding[s] = funding.get(s, 0.0) + amount
                n_funding += 1
            open_orders = [
                OpenOrder(oid, s, side, qty, px, style, tif, origin, state, done, qty - done, ts)
                for oid, s, side, qty, px, style, tif, origin, state, done, ts in conn.execute(
                    "SELECT order_id, symbol_id, side, qty, px, style, tif, origin, state,"
                    f" filled, new_ns FROM orders WHERE state IN ({_OPEN}) AND NOT {_FULL}"
                    " ORDER BY order_id"
                )
            ]
            n_orders, last_oid = conn.execute(
                "SELECT count(*), max(order_id) FROM orders"
            ).fetchone()
            n_orphans = conn.execute(
                "SELECT count(*) FROM fills WHERE order_id NOT IN (SELECT order_id FROM orders)"
            ).fetchone()[0]
            mark = conn.execute(
                "SELECT day, realized, fees, funding, unrealized FROM days"
                " ORDER BY day DESC LIMIT 1"
            ).fetchone()
        except sqlite3.DatabaseError as e:  # damage quick_check did not see at open
            raise _refuse_corrupt(self.path, e) from e
        finally:
            conn.execute("COMMIT")
        if mark is None:
            day, base = utc_day(self.created_ns), (0.0, 0.0, 0.0, 0.0)
        else:
            day, base = mark[0] + 1, (mark[1], mark[2], mark[3], mark[4])
        return Recovered(
            open_orders=tuple(open_orders),
            fees=MappingProxyType(fees),
            funding=MappingProxyType(funding),
            day=day,
            day_realized=base[0],
            day_fees=base[1],
            day_funding=base[2],
            day_unrealized=base[3],
            last_order_id=int(last_oid or 0),
            n_orders=int(n_orders),
            n_fills=n_fills,
            n_funding=n_funding,
            n_orphan_fills=int(n_orphans),
        )
