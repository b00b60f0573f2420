"""``hft replay``: feed a recording through the real parser and book code, offline.

Prints what the engine's ingest stage would have counted (books, trades, gaps, resyncs,
malformed frames, the Binance top-of-book cross-check) and, with ``--tob CSV``, writes the top
of book after every book update: ``recv_ns,symbol,update_id,bid_px,bid_sz,ask_px,ask_sz``,
where ``update_id`` is the venue's own final id of the message (Binance ``u``, Hyperliquid
``time``) and ``symbol`` the venue's name. Stale re-publications are not book updates and
are not written.

Symbol rules come from the recording itself (the tick is the largest decimal step every
price of the first book sits on), so a replay needs no network.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np

from shm import schema
from stages.venues.feed import new_counters
from stages.venues.replay import (
    InlineSnapshots,
    RecordingError,
    detect_venue,
    infer_instruments,
    make_feed,
    replay,
)


class TobSink:
    """Write one CSV row per published (non-stale) book; count trades and marks."""

    def __init__(self, out: io.TextIOBase | None, names: dict[int, str]) -> None:
        self._out = out
        self._names = names
        self.n_books = 0
        self.n_trades = 0
        self.n_marks = 0
        if out is not None:
            out.write("recv_ns,symbol,update_id,bid_px,bid_sz,ask_px,ask_sz\n")

    def book(self, books: np.ndarray) -> None:
        b = books[0]
        if int(b["flags"]) & schema.BOOK_STALE:
            return
        self.n_books += 1
        if self._out is None:
            return
        nb, na = int(b["n_bid"]), int(b["n_ask"])
        bid = (repr(float(b["bid_px"][0])), repr(float(b["bid_sz"][0]))) if nb else ("", "")
        ask = (repr(float(b["ask_px"][0])), repr(float(b["ask_sz"][0]))) if na else ("", "")
        self._out.write(
            f"{int(b['recv_ns'])},{self._names[int(b['symbol_id'])]},{int(b['seq'])},"
            f"{bid[0]},{bid[1]},{ask[0]},{ask[1]}\n"
        )

    def trades(self, trades: np.ndarray) -> None:
        self.n_trades += len(trades)

    def mark(self, marks: np.ndarray) -> None:
        self.n_marks += 1


def _speed(text: str) -> float | None:
    if text == "max":
        return None
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--speed must be a number or 'max', got {text!r}"
        ) from None
    if not x > 0:
        raise argparse.ArgumentTypeError(f"--speed must be > 0, got {text!r}")
    return x


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="hft replay", description=__doc__.splitlines()[0])
    p.add_argument("file", help="recording (.jsonl.gz, lines '<ns> <json>')")
    p.add_argument(
        "--venue",
        choices=("binance", "hyperliquid"),
        default=None,
        help="default: detected from the file",
    )
    p.add_argument(
        "--speed",
        type=_speed,
        default=None,
        metavar="X|max",
        help="X times the recorded pace, or max (default)",
    )
    p.add_argument("--tob", default=None, metavar="CSV", help="write the top of book to this CSV")
    args = p.parse_args(argv)
    path = Path(args.file)
    if not path.is_file():
        print(f"hft replay: {path}: no such file", file=sys.stderr)
        return 2
    try:
        venue = args.venue or detect_venue(path)
        instruments = infer_instruments(path, venue)
    except RecordingError as exc:
        print(f"hft replay: {exc}", file=sys.stderr)
        return 2
    names = {sid: ins.wire_name for sid, ins in instruments.items()}
    counters = new_counters()
    try:
        out = open(args.tob, "w", newline="") if args.tob else None  # noqa: SIM115
    except OSError as exc:
        print(f"hft replay: --tob {args.tob}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    try:
        sink = TobSink(out, names)
        snaps = InlineSnapshots() if venue == "binance" else None
        feed = make_feed(venue, instruments, sink, counters, snaps)
        try:
            res = replay(path, feed, snaps, speed=args.speed)
        except RecordingError as exc:
            print(f"hft replay: {exc}", file=sys.stderr)
            return 2
    finally:
        if out is not None:
            out.close()
    rate = res.messages / res.seconds if res.seconds > 0 else 0.0
    print(
        f"replay {path.name} ({venue}, {', '.join(names.values())}): "
        f"{res.messages} messages in {res.seconds:.2f} s ({rate:,.0f}/s), "
        f"recorded span {res.recorded_seconds:.1f} s"
    )
    print(
        f"  books {sink.n_books}  trades {sink.n_trades}  marks {sink.n_marks}  snapshots {res.snapshots}"
    )
    print(
        f"  gaps {counters[schema.C_GAPS]}  resyncs {counters[schema.C_RESYNCS]}  "
        f"malformed {counters[schema.C_MALFORMED] + res.bad_lines}  "
        f"duplicates {counters[schema.C_DUPLICATES]}  crossed {counters[schema.C_CROSSED]}"
    )
    if venue == "binance":
        print(
            f"  top of book vs bookTicker: {feed.tob_checks} checked, "  # type: ignore[union-attr]
            f"{feed.tob_mismatches} different"
        )  # type: ignore[union-attr]
    if args.tob:
        print(f"  top of book -> {args.tob}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
