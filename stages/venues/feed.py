"""What a venue feed adapter needs from its runner, and what it hands back.

A feed adapter (``BinanceFeed``, ``HyperliquidFeed``) is a kernel in the engine's sense: it
turns frames into records and owns the venue's sequencing rules, but it opens no socket and
reads no clock it was not given. Three runners drive the same adapters: the ingest stage
(sockets, rings), ``hft replay`` (a recording, a CSV) and the market-data benchmark.

- ``Endpoint``: one WebSocket connection the adapter wants, with its subscribe frames, its
  application ping, its silence threshold and its maximum age.
- ``Sink``: where records go. The adapter fills a record completely (trace fields included,
  except ``ingest_ns``) before handing it over; the sink may not keep the array.
- ``SnapshotSource``: where REST book snapshots come from (HTTP in the engine, inline lines
  in a recording during replay).
- counters: a mutable int sequence indexed by ``schema.C_*`` (the stage's shared-memory stats
  in the engine, a plain list elsewhere).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from shm import schema


def _book_packers() -> tuple[struct.Struct, struct.Struct, int]:
    """Return the two packers that write a BOOK record, after checking the layout they assume.

    ``struct.pack_into`` on the record's bytes writes the whole book in two calls (about
    1 us) where numpy field assignments take several; ``ingest_ns`` (bytes 32-40) is skipped
    because the runner owns it. Every feed adapter writes its records with these.
    """
    f = schema.BOOK.fields
    assert f is not None
    head = [("symbol_id", "I"), ("flags", "I"), ("seq", "Q"), ("exch_ns", "q"), ("recv_ns", "q")]
    off = 0
    for name, code in head:
        assert f[name][1] == off, name
        off += struct.calcsize(code)
    off_n_bid = f["n_bid"][1]
    assert f["n_ask"][1] == off_n_bid + 2 and f["_pad"][1] == off_n_bid + 4
    off = f["_pad"][1] + 4
    for name in ("bid_px", "bid_sz", "ask_px", "ask_sz"):
        assert f[name][1] == off, name
        off += 8 * schema.BOOK_DEPTH
    assert off == schema.BOOK.itemsize
    levels = struct.Struct(f"<HH4x{4 * schema.BOOK_DEPTH}d")  # n_bid, n_ask, _pad = 0, 80 doubles
    return struct.Struct("<" + "".join(c for _, c in head)), levels, off_n_bid


# symbol_id, flags, seq, exch_ns, recv_ns | n_bid, n_ask, _pad, 80 level doubles | n_bid, n_ask
BOOK_HEAD, BOOK_LEVELS, OFF_N_BID = _book_packers()
BOOK_COUNTS = struct.Struct("<HH")


@dataclass(frozen=True, slots=True)
class Endpoint:
    name: str  # "public", "market", "ws": names the connection in logs and metrics
    url: str
    subscribe: tuple[bytes, ...] = ()  # frames sent after connecting, in order
    ping: bytes | None = None  # application-level ping frame (None: the venue pings us)
    ping_every_ns: int = 0
    stale_after_ns: int = 2_000_000_000
    max_age_ns: int = 0  # > 0: reconnect before the venue's connection lifetime ends


class Sink(Protocol):
    def book(self, books: np.ndarray) -> None: ...  # one complete schema.BOOK record

    def trades(self, trades: np.ndarray) -> None: ...  # schema.TRADE records

    def mark(self, marks: np.ndarray) -> None: ...  # one schema.MARK record


class SnapshotSource(Protocol):
    def request(self, venue_symbol: str) -> None: ...

    def poll(self) -> list[tuple[str, Any, int]]: ...  # (venue symbol, document, recv ns)


class Feed(Protocol):
    venue: str

    def endpoints(self) -> list[Endpoint]: ...

    def on_connected(self, ep: int, now_ns: int) -> None: ...

    def on_disconnected(self, ep: int, now_ns: int) -> None: ...

    def on_silent(self, ep: int, now_ns: int) -> None: ...

    def on_message(self, ep: int, raw: bytes, recv_ns: int) -> None: ...

    def poll(self, now_ns: int) -> None: ...


def new_counters() -> list[int]:
    """A plain counter block with the engine's layout, for runners without shared memory."""
    return [0] * schema.N_INT_SLOTS


@dataclass
class RecordingSink:
    """Keep copies of everything published (tests, replay)."""

    books: list[np.ndarray] = field(default_factory=list)
    trade_batches: list[np.ndarray] = field(default_factory=list)
    marks: list[np.ndarray] = field(default_factory=list)

    def book(self, books: np.ndarray) -> None:
        self.books.append(books[:1].copy())

    def trades(self, trades: np.ndarray) -> None:
        self.trade_batches.append(trades.copy())

    def mark(self, marks: np.ndarray) -> None:
        self.marks.append(marks[:1].copy())


class Counters(Protocol):
    """Int slots indexed by ``schema.C_*``: a stage's shared-memory stats, or a plain list."""

    def __getitem__(self, i: int, /) -> int: ...

    def __setitem__(self, i: int, v: int, /) -> None: ...
