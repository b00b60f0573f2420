"""``hft record``: write a venue's raw public feed to a gzip recording, REST snapshots inline.

Format (that of ``../shared/data/``): one message a line, ``<receive ns since the epoch>
<json>``, the bytes exactly as the venue sent them. For Binance, a depth snapshot is fetched
for every symbol shortly after each (re)connect -- once diffs are already being recorded, so
the recording holds everything the local-book procedure needs -- and written inline as a bare
JSON object with ``"symbol"`` added. ``hft replay`` reads the result.

The recorder keeps going through disconnects (backoff with jitter, then the same
subscriptions and fresh snapshots) until ``--duration`` ends or it is interrupted; the file is
always closed as a valid gzip stream.
"""

from __future__ import annotations

import argparse
import gzip
import select
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import orjson
import websocket

from stages.config import ConfigError, FeedConfig
from stages.venues.binance import binance_endpoints, depth_weight
from stages.venues.endpoints import endpoints
from stages.venues.feed import Endpoint
from stages.venues.hyperliquid import PING, PING_EVERY_NS, subscribe_messages
from stages.venues.rest import Backoff, RestClient, RestError
from stages.venues.symbols import binance_symbol

SNAPSHOT_DELAY_S = 1.0  # after connecting: let diffs arrive first (the procedure's step 1)
SILENT_S = 30.0  # no message for this long on a connection: reconnect


@dataclass
class _Conn:
    ep: Endpoint
    backoff: Backoff
    ws: websocket.WebSocket | None = None
    next_connect_s: float = 0.0
    next_ping_ns: int = 0
    snapshot_at_s: float = 0.0  # > 0: fetch snapshots at this time
    last_msg_s: float = 0.0


class Recorder:
    def __init__(
        self,
        venue: str,
        symbols: list[str],
        out: Path,
        *,
        ws_url: str,
        rest_url: str,
        depth_ms: int = 100,
        snapshot_depth: int = 1000,
    ) -> None:
        self.venue = venue
        self.out = out
        if venue == "binance":
            self.wire = [binance_symbol(s) for s in symbols]
            eps = binance_endpoints(ws_url, self.wire, depth_ms)
        else:
            self.wire = list(symbols)
            eps = [
                Endpoint(
                    "ws",
                    ws_url,
                    subscribe=tuple(subscribe_messages(self.wire)),
                    ping=PING,
                    ping_every_ns=PING_EVERY_NS,
                )
            ]
        self._conns = [_Conn(ep, Backoff(0.1, 10.0)) for ep in eps]
        self._rest = (
            RestClient(rest_url, venue=venue, weight_per_min=1200) if venue == "binance" else None
        )
        self._snapshot_depth = snapshot_depth
        self.messages = 0
        self.snapshots = 0
        self.reconnects = 0
        self.bytes = 0
        self._stop = False

    def stop(self, *_: object) -> None:
        self._stop = True

    def _write(self, f: gzip.GzipFile, raw: bytes) -> None:
        line = b"%d %s\n" % (time.time_ns(), raw)
        f.write(line)
        self.bytes += len(line)

    def _connect(self, c: _Conn) -> None:
        now = time.monotonic()
        try:
            ws = websocket.create_connection(c.ep.url, timeout=5.0, skip_utf8_validation=True)
            for msg in c.ep.subscribe:
                ws.send(msg)
        except (OSError, ValueError, websocket.WebSocketException) as exc:
            delay = c.backoff.next_delay()
            c.next_connect_s = now + delay
            print(
                f"hft record: {c.ep.name}: connect failed ({exc}); retry in {delay:.1f} s",
                file=sys.stderr,
            )
            return
        ws.settimeout(1.0)
        c.ws = ws
        c.last_msg_s = now
        c.backoff.reset()
        c.next_ping_ns = time.monotonic_ns() + c.ep.ping_every_ns if c.ep.ping else 0
        if self._rest is not None and c.ep.name == "public":
            c.snapshot_at_s = now + SNAPSHOT_DELAY_S

    def _drop(self, c: _Conn, why: str) -> None:
        if c.ws is not None:
            try:
                c.ws.close(timeout=0.2)
            except (OSError, websocket.WebSocketException):
                pass
        c.ws = None
        self.reconnects += 1
        delay = c.backoff.next_delay()
        c.next_connect_s = time.monotonic() + delay
        print(f"hft record: {c.ep.name}: {why}; reconnecting in {delay:.1f} s", file=sys.stderr)

    def _snapshots(self, f: gzip.GzipFile, c: _Conn) -> None:
        assert self._rest is not None
        c.snapshot_at_s = 0.0
        for vs in self.wire:
            try:
                doc = self._rest.get_json(
                    "/fapi/v1/depth",
                    {"symbol": vs, "limit": self._snapshot_depth},
                    weight=depth_weight(self._snapshot_depth),
                )
            except RestError as exc:
                print(f"hft record: snapshot {vs}: {exc}; retrying in 2 s", file=sys.stderr)
                c.snapshot_at_s = time.monotonic() + 2.0
                return
            if isinstance(doc, dict):
                doc["symbol"] = vs
            self._write(f, orjson.dumps(doc))
            self.snapshots += 1

    def run(self, duration_s: float | None) -> int:
        end = time.monotonic() + duration_s if duration_s else float("inf")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        with gzip.open(self.out, "wb", compresslevel=6) as f:
            while not self._stop and time.monotonic() < end:
                now_s = time.monotonic()
                for c in self._conns:
                    if c.ws is None and now_s >= c.next_connect_s:
                        self._connect(c)
                    if c.ws is not None and c.snapshot_at_s and now_s >= c.snapshot_at_s:
                        self._snapshots(f, c)
                live = {c.ws.sock: c for c in self._conns if c.ws is not None and c.ws.sock}
                if not live:
                    time.sleep(0.05)
                    continue
                try:
                    ready = select.select(list(live), [], [], 0.1)[0]
                except (OSError, ValueError):
                    ready = []
                for sock in ready:
                    c = live[sock]
                    assert c.ws is not None
                    try:
                        opcode, frame = c.ws.recv_data_frame(True)
                    except websocket.WebSocketTimeoutException:
                        continue
                    except (OSError, websocket.WebSocketException) as exc:
                        self._drop(c, f"{type(exc).__name__}: {exc}")
                        continue
                    if opcode == websocket.ABNF.OPCODE_CLOSE:
                        self._drop(c, "closed by the venue")
                    elif opcode in (websocket.ABNF.OPCODE_TEXT, websocket.ABNF.OPCODE_BINARY):
                        self._write(f, frame.data)
                        self.messages += 1
                        c.last_msg_s = time.monotonic()
                for c in self._conns:  # connected but silent: a half-open connection
                    if c.ws is not None and time.monotonic() - c.last_msg_s > SILENT_S:
                        self._drop(c, f"silent for {SILENT_S:.0f} s")
                now_ns = time.monotonic_ns()
                for c in self._conns:
                    if c.ws is not None and c.ep.ping and now_ns >= c.next_ping_ns:
                        c.next_ping_ns = now_ns + c.ep.ping_every_ns
                        try:
                            c.ws.send(c.ep.ping)
                        except (OSError, websocket.WebSocketException) as exc:
                            self._drop(c, f"ping failed: {exc}")
        for c in self._conns:
            if c.ws is not None:
                try:
                    c.ws.close(timeout=0.2)
                except (OSError, websocket.WebSocketException):
                    pass
        return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="hft record", description=__doc__.splitlines()[0])
    p.add_argument("--venue", required=True, choices=("binance", "hyperliquid"))
    p.add_argument("--symbols", required=True, help="comma-separated engine names, e.g. BTC,ETH")
    p.add_argument("--out", required=True, help="recording to write (.jsonl.gz)")
    p.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    p.add_argument("--ws-url", default="", help="override the venue's WebSocket URL")
    p.add_argument("--rest-url", default="", help="override the venue's REST URL")
    p.add_argument("--testnet", action="store_true", help="the venue's testnet endpoints")
    p.add_argument("--depth-ms", type=int, default=100, choices=(0, 100, 250, 500))
    args = p.parse_args(argv)
    symbols = [s.strip() for s in args.symbols.split(",") if s.strip()]
    if not symbols or not all(s.isalnum() for s in symbols):
        p.error(f"--symbols must be comma-separated alphanumeric names, got {args.symbols!r}")
    if args.duration is not None and not args.duration > 0:
        p.error("--duration must be a positive number of seconds")
    try:
        eps = endpoints(
            FeedConfig(
                source=args.venue,
                symbols=tuple(symbols),
                ws_url=args.ws_url,
                rest_url=args.rest_url,
                testnet=args.testnet,
            )
        )
    except ConfigError as exc:
        p.error(str(exc).replace("feed.ws_url", "--ws-url").replace("feed.rest_url", "--rest-url"))
    out = Path(args.out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "ab"):
            pass
    except OSError as exc:
        print(f"hft record: --out {out}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    rec = Recorder(
        args.venue,
        symbols,
        out,
        ws_url=eps.ws_url,
        rest_url=eps.rest_url,
        depth_ms=args.depth_ms,
    )

    def _stop(signum: int, frame: FrameType | None) -> None:
        rec.stop()

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    print(
        f"hft record: {args.venue} {','.join(rec.wire)} -> {args.out} (Ctrl+C stops)",
        file=sys.stderr,
    )
    code = rec.run(args.duration)
    print(
        f"hft record: {rec.messages} messages, {rec.snapshots} snapshots, "
        f"{rec.reconnects} reconnects, {rec.bytes / 1e6:.1f} MB raw -> {args.out}"
    )
    return code


if __name__ == "__main__":
    raise SystemExit(main())
