"""Recordings: read them, and feed them through the same adapters the ingest stage runs.

A recording is gzip text, one message a line: ``<receive ns since the epoch> <json>``. Binance
REST depth snapshots sit inline as bare JSON objects (``{"lastUpdateId":..,"bids":..}``); ours
add ``"symbol"`` so that a recording of several symbols is unambiguous, and a snapshot without
it belongs to the symbol that asked for one (the only one in the files we were given).

Replay is the ingest stage minus the sockets: frames go to ``Feed.on_message`` in file order,
a Binance book that asks for a snapshot gets the next inline one, and the sink sees exactly
what the engine's rings would.
"""

from __future__ import annotations

import gzip
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import orjson

from stages.instruments import Instrument
from stages.venues.binance import BinanceFeed
from stages.venues.feed import Counters, Sink
from stages.venues.hyperliquid import HyperliquidFeed


class RecordingError(ValueError):
    pass


def read_recording(path: str | Path) -> Iterator[tuple[int, bytes]]:
    """Yield (receive ns, raw JSON bytes) for every well-formed line.

    A line without a leading integer timestamp is skipped and counted by the caller through
    ``bad_lines``; a file that is not gzip raises ``RecordingError`` naming it.
    """
    p = Path(path)
    try:
        with gzip.open(p, "rb") as f:
            for line in f:
                ts, sep, raw = line.partition(b" ")
                if not sep or not ts.isdigit():
                    yield -1, line
                    continue
                yield int(ts), raw.rstrip(b"\r\n")
    except (OSError, EOFError) as exc:
        raise RecordingError(f"{p}: cannot read the recording ({exc})") from None


def detect_venue(path: str | Path, probe: int = 200) -> str:
    """Return "binance" or "hyperliquid" from the first messages of a recording."""
    for i, (ts, raw) in enumerate(read_recording(path)):
        if ts >= 0:
            if b'"channel"' in raw:
                return "hyperliquid"
            if b'"stream"' in raw or b"lastUpdateId" in raw:
                return "binance"
        if i >= probe:
            break
    raise RecordingError(f"{path}: neither a Binance nor a Hyperliquid recording")


def _decimal_tick(prices: list[str]) -> float:
    """The largest decimal step every price is a multiple of (the venue's tick, or finer)."""
    g = 0
    scale = 0
    fr = []
    for s in prices:
        f = Fraction(s)
        fr.append(f)
        scale = max(scale, len(s.partition(".")[2]))
    for f in fr:
        g = math.gcd(g, int(f * 10**scale))
    return g / 10**scale if g else 10.0**-scale


_PROBE_LINES = 2000


def infer_instruments(path: str | Path, venue: str) -> dict[int, Instrument]:
    """Symbols of a recording with a tick inferred from its prices (offline replay).

    The tick is the largest decimal step that divides every price of the first snapshot
    (Binance) or book (Hyperliquid); the real tick is that or coarser, and the book only
    needs a grid every price sits on.
    """
    found: dict[str, list[str]] = {}
    last_new = 0
    for i, (ts, raw) in enumerate(read_recording(path)):
        if ts < 0:
            continue
        n = len(found)
        try:
            _collect_prices(orjson.loads(raw), venue, found)
        except (orjson.JSONDecodeError, TypeError, ValueError, KeyError, AttributeError):
            continue  # a malformed line: the replay itself counts it
        if len(found) > n:
            last_new = i
        # a recording of several symbols interleaves them: stop only once no new one has
        # shown up for a while and every one has its first book
        if found and all(found.values()) and i - last_new > _PROBE_LINES:
            break
    if not found:
        raise RecordingError(f"{path}: no {venue} symbols found")
    out = {}
    for sid, (name, prices) in enumerate(sorted(found.items())):
        try:
            tick = _decimal_tick(prices) if prices else 0.01
        except (TypeError, ValueError, ZeroDivisionError):
            tick = 0.01  # prices we cannot read: the replay counts those messages
        base = name[:-4] if name.endswith("USDT") else name
        out[sid] = Instrument(base, tick, 0.001, 0.0, venue=venue, venue_symbol=name)
    return out


def _collect_prices(msg: Any, venue: str, found: dict[str, list[str]]) -> None:
    """Note a message's symbol, and the price strings of its first book."""
    if not isinstance(msg, dict):
        return
    if venue == "binance":
        data = msg.get("data")
        if isinstance(data, dict) and isinstance(data.get("s"), str):
            found.setdefault(data["s"], [])
        elif "lastUpdateId" in msg:
            sym = msg.get("symbol") or (next(iter(found)) if len(found) == 1 else None)
            if isinstance(sym, str):
                found[sym] = [str(lv[0]) for lv in list(msg["bids"]) + list(msg["asks"])]
    elif msg.get("channel") == "l2Book":
        data = msg["data"]
        if isinstance(data["coin"], str):
            prices = [str(lv["px"]) for side in data["levels"] for lv in side]
            found.setdefault(data["coin"], prices)


class InlineSnapshots:
    """Snapshot source of a replay: asks are answered by the next inline snapshot line."""

    def __init__(self) -> None:
        self.pending: list[str] = []
        self._ready: list[tuple[str, Any, int]] = []
        self.delivered = 0
        self.unasked = 0  # inline snapshots nobody was waiting for

    def request(self, venue_symbol: str) -> None:
        if venue_symbol not in self.pending:
            self.pending.append(venue_symbol)

    def poll(self) -> list[tuple[str, Any, int]]:
        out, self._ready = self._ready, []
        return out

    def offer(self, doc: Any, recv_ns: int) -> None:
        sym = doc.get("symbol") if isinstance(doc, dict) else None
        if sym is None and self.pending:
            sym = self.pending[0]
        if sym in self.pending:
            self.pending.remove(sym)
            self._ready.append((sym, doc, recv_ns))
            self.delivered += 1
        else:
            self.unasked += 1


@dataclass
class ReplayResult:
    messages: int
    bad_lines: int
    snapshots: int
    seconds: float
    recorded_seconds: float


def make_feed(
    venue: str,
    instruments: dict[int, Instrument],
    sink: Sink,
    counters: Counters,
    snapshots: InlineSnapshots | None = None,
) -> BinanceFeed | HyperliquidFeed:
    if venue == "binance":
        return BinanceFeed(instruments, sink, snapshots or InlineSnapshots(), counters)
    if venue == "hyperliquid":
        return HyperliquidFeed(instruments, sink, counters)
    raise RecordingError(f"unknown venue {venue!r}")


def replay(
    path: str | Path,
    feed: BinanceFeed | HyperliquidFeed,
    snapshots: InlineSnapshots | None,
    *,
    speed: float | None = None,
    limit: int | None = None,
) -> ReplayResult:
    """Feed every message of a recording to ``feed``; pace by receive time unless ``speed`` is None."""
    t0 = time.perf_counter()
    first_ts = last_ts = 0
    n = bad = snaps = 0
    feed.on_connected(0, 0)
    if len(feed.endpoints()) > 1:
        feed.on_connected(1, 0)
    for ts, raw in read_recording(path):
        if ts < 0:
            bad += 1
            continue
        if not first_ts:
            first_ts = ts
        last_ts = ts
        if speed:
            due = t0 + (ts - first_ts) / 1e9 / speed
            wait = due - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
        if snapshots is not None and raw[:1] == b"{" and b"lastUpdateId" in raw[:64]:
            try:
                doc = orjson.loads(raw)
            except orjson.JSONDecodeError:
                bad += 1
                continue
            if isinstance(doc, dict) and "stream" not in doc:
                snapshots.offer(doc, ts)
                feed.poll(ts)
                snaps += 1
                continue
        feed.on_message(0, raw, ts)
        n += 1
        if limit is not None and n >= limit:
            break
    return ReplayResult(n, bad, snaps, time.perf_counter() - t0, (last_ts - first_ts) / 1e9)
