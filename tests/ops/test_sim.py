"""The market simulator: the wire protocol over a real socket, and its model offline.

The process tests start ``python -m ops.sim`` on an ephemeral 127.0.0.1 port and talk to it
with websocket-client, as the ingest stage does; timing bounds are deliberately loose. The
offline tests drive ``SymbolSim`` directly: determinism, book invariants, the imbalance range
and trade behaviour, with no clock involved.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import websocket

from ops.sim import DecimalFormatter, SymbolSim, spec_for
from shm import schema
from stages.venues.hyperliquid import PING, HyperliquidParser, subscribe_messages

REPO = Path(__file__).resolve().parents[2]
RATE = 200
TICKS = {"BTC": 1.0, "ETH": 0.1}
SYMBOL_IDS = {"BTC": 0, "ETH": 1}


def _start_sim(tmp: Path, *extra: str) -> tuple[subprocess.Popen[bytes], int, Any]:
    ready = tmp / "port"
    log = open(tmp / "sim.log", "wb")  # noqa: SIM115 - closed by _stop_sim
    cmd = [sys.executable, "-m", "ops.sim", "--port", "0", "--host", "127.0.0.1"]
    cmd += ["--ready-file", str(ready), *extra]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.monotonic() + 20
    while not (ready.exists() and ready.read_text().strip()):
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop_sim(proc, log)
            raise RuntimeError(f"sim did not start: {(tmp / 'sim.log').read_text()}")
        time.sleep(0.02)
    return proc, int(ready.read_text()), log


def _stop_sim(proc: subprocess.Popen[bytes], log: Any) -> int:
    try:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        return proc.returncode
    finally:
        log.close()


@pytest.fixture(scope="module")
def sim_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    tmp = tmp_path_factory.mktemp("sim")
    proc, port, log = _start_sim(tmp, "--rate", str(RATE), "--symbols", "BTC,ETH", "--seed", "7")
    try:
        yield port
    finally:
        rc = _stop_sim(proc, log)
        assert rc == 0, (tmp / "sim.log").read_text()


@pytest.fixture
def ws(sim_port: int) -> Iterator[websocket.WebSocket]:
    conn = websocket.create_connection(
        f"ws://127.0.0.1:{sim_port}/ws", timeout=5, skip_utf8_validation=True
    )
    try:
        yield conn
    finally:
        conn.close()


def _recv(conn: websocket.WebSocket) -> dict[str, Any]:
    msg = orjson.loads(conn.recv())
    assert isinstance(msg, dict)
    return msg


def _recv_until(conn: websocket.WebSocket, channel: str, limit: int = 5000) -> dict[str, Any]:
    for _ in range(limit):
        msg = _recv(conn)
        if msg["channel"] == channel:
            return msg
    raise AssertionError(f"no {channel} frame in {limit} frames")


# ---------------------------------------------------------------------- over the socket
def test_stream_books_and_trades(ws: websocket.WebSocket) -> None:
    for raw in subscribe_messages(["BTC", "ETH"]):
        ws.send(raw)
    parser = HyperliquidParser(symbol_ids=SYMBOL_IDS)
    books = np.zeros(1, schema.BOOK)
    trades = np.zeros(256, schema.TRADE)
    acks: list[dict[str, Any]] = []
    n_books = {"BTC": 0, "ETH": 0}
    n_trades = {"BTC": 0, "ETH": 0}
    last_mid = {"BTC": 0.0, "ETH": 0.0}
    marks = {"BTC": 0, "ETH": 0}
    coin_of = {v: k for k, v in SYMBOL_IDS.items()}
    t0 = time.monotonic()
    while time.monotonic() - t0 < 1.5:
        frame = ws.recv()
        msg = orjson.loads(frame)
        if msg["channel"] == "subscriptionResponse":
            acks.append(msg["data"])
            continue
        nb, nt = parser.parse(frame, time.monotonic_ns(), books, trades)
        if nb:
            rec = books[0]
            coin = coin_of[int(rec["symbol_id"])]
            tick = TICKS[coin]
            assert int(rec["flags"]) == schema.BOOK_SNAPSHOT  # never crossed
            assert int(rec["n_bid"]) == 20 and int(rec["n_ask"]) == 20
            assert rec["bid_px"][0] < rec["ask_px"][0]
            for px in (rec["bid_px"], rec["ask_px"]):
                assert np.abs(px / tick - np.round(px / tick)).max() < 1e-6
            assert (rec["bid_sz"] > 0).all() and (rec["ask_sz"] > 0).all()
            n_books[coin] += 1
            last_mid[coin] = (rec["bid_px"][0] + rec["ask_px"][0]) / 2
        if parser.marks_ready:
            parser.marks_ready = 0
            m = parser.marks[0]
            coin = coin_of[int(m["symbol_id"])]
            marks[coin] += 1
            assert m["mark_px"] > 0 and abs(m["funding_rate"]) < 0.001
            if last_mid[coin]:
                assert abs(m["mark_px"] / last_mid[coin] - 1) < 0.01
        for tr in trades[:nt]:
            coin = coin_of[int(tr["symbol_id"])]
            n_trades[coin] += 1
            assert int(tr["side"]) in (schema.SIDE_BUY, schema.SIDE_SELL) and tr["sz"] > 0
            if last_mid[coin]:
                assert abs(tr["px"] / last_mid[coin] - 1) < 0.01
    elapsed = time.monotonic() - t0
    assert acks == [orjson.loads(m) for m in subscribe_messages(["BTC", "ETH"])]
    assert parser.malformed == 0 and parser.duplicates == 0
    for coin in ("BTC", "ETH"):
        rate = n_books[coin] / elapsed
        assert RATE * 0.5 < rate < RATE * 3, (coin, rate)
        assert n_trades[coin] > 0, n_trades
        assert marks[coin] >= 1, "activeAssetCtx: on subscribe and about once a second"


def test_ping_pong(ws: websocket.WebSocket) -> None:
    ws.send(PING)
    assert _recv(ws) == {"channel": "pong"}


@pytest.mark.parametrize(
    ("request_text", "named"),
    [
        ('{"method":"subscribe","subscription":{"type":"l2Book","coin":"NOPE"}}', "NOPE"),
        ('{"method":"subscribe","subscription":{"type":"candle","coin":"BTC"}}', "candle"),
        ('{"method":"subscribe","subscription":"l2Book"}', "subscription"),
        ('{"method":"fly"}', "fly"),
        ("not json at all", "not json at all"),
        ("[1,2]", "[1,2]"),
    ],
)
def test_bad_request_gets_error_and_connection_stays_usable(
    ws: websocket.WebSocket, request_text: str, named: str
) -> None:
    ws.send(request_text)
    msg = _recv(ws)
    assert msg["channel"] == "error" and named in msg["data"], msg
    ws.send(PING)
    assert _recv(ws) == {"channel": "pong"}
    ws.send(subscribe_messages(["ETH"])[0])
    assert _recv(ws)["channel"] == "subscriptionResponse"
    assert _recv_until(ws, "l2Book")["data"]["coin"] == "ETH"


def test_subscribe_twice_and_unsubscribe(ws: websocket.WebSocket) -> None:
    sub = {"type": "l2Book", "coin": "BTC"}
    ws.send(orjson.dumps({"method": "subscribe", "subscription": sub}))
    assert _recv(ws)["channel"] == "subscriptionResponse"
    ws.send(orjson.dumps({"method": "subscribe", "subscription": sub}))
    assert "Already subscribed" in _recv_until(ws, "error")["data"]
    ws.send(orjson.dumps({"method": "unsubscribe", "subscription": sub}))
    ack = _recv_until(ws, "subscriptionResponse")
    assert ack["data"] == {"method": "unsubscribe", "subscription": sub}
    time.sleep(0.2)  # anything sent after the ack would be a leak
    ws.send(PING)
    after = []
    while (msg := _recv(ws))["channel"] != "pong":
        after.append(msg["channel"])
    assert after == []
    ws.send(orjson.dumps({"method": "unsubscribe", "subscription": sub}))
    assert "Already unsubscribed" in _recv(ws)["data"]


def test_trades_subscription_replays_recent_trades(ws: websocket.WebSocket) -> None:
    time.sleep(0.3)  # the module's sim has been trading for a while by now
    ws.send(subscribe_messages(["BTC"])[1])
    assert _recv(ws)["channel"] == "subscriptionResponse"
    replay = _recv(ws)
    assert replay["channel"] == "trades" and len(replay["data"]) >= 1
    tr = replay["data"][0]
    assert set(tr) == {"coin", "hash", "px", "side", "sz", "tid", "time", "users"}
    assert tr["side"] in ("A", "B") and tr["hash"].startswith("0x") and len(tr["users"]) == 2


def test_duration_and_sigterm_exit_zero(tmp_path: Path) -> None:
    t0 = time.monotonic()
    proc, _, log = _start_sim(tmp_path, "--rate", "50", "--symbols", "SOL", "--duration", "0.5")
    try:
        assert proc.wait(timeout=20) == 0
    finally:
        _stop_sim(proc, log)
    assert time.monotonic() - t0 < 15
    events = [
        orjson.loads(line)["event"] for line in (tmp_path / "sim.log").read_bytes().splitlines()
    ]
    assert events[0] == "start" and "listening" in events and events[-1] == "stop"
    (tmp_path / "port").unlink()
    proc, _, log = _start_sim(tmp_path, "--rate", "50", "--symbols", "SOL")
    proc.send_signal(signal.SIGTERM)
    assert _stop_sim(proc, log) == 0


def test_slow_client_is_bounded_and_does_not_block_others(tmp_path: Path) -> None:
    args = ["--rate", "1000", "--symbols", "BTC,ETH", "--max-buffer-bytes", "200000"]
    proc, port, log = _start_sim(tmp_path, *args, "--slow-client-s", "1")
    conns: list[websocket.WebSocket] = []
    try:
        slow = websocket.WebSocket(skip_utf8_validation=True)
        slow.sock_opt.sockopt = [(socket.SOL_SOCKET, socket.SO_RCVBUF, 32768)]
        slow.connect(f"ws://127.0.0.1:{port}/ws", timeout=5)
        conns.append(slow)
        fast = websocket.create_connection(
            f"ws://127.0.0.1:{port}/ws", timeout=5, skip_utf8_validation=True
        )
        conns.append(fast)
        for conn in conns:
            for raw in subscribe_messages(["BTC", "ETH"]):
                conn.send(raw)
        sim_log = tmp_path / "sim.log"
        t0 = time.monotonic()
        n_books = 0
        while b"slow_client_dropped" not in sim_log.read_bytes():
            assert time.monotonic() - t0 < 30, "the slow client was never dropped"
            for _ in range(200):
                frame = fast.recv()
                assert isinstance(frame, str)  # text frames
                n_books += frame.startswith('{"channel":"l2Book"')
        elapsed = time.monotonic() - t0
        assert n_books / elapsed > 0.5 * 2 * 1000  # the fast client kept (most of) its rate
        fast.send(PING)
        _recv_until(fast, "pong")
    finally:
        for conn in conns:
            conn.close()
        assert _stop_sim(proc, log) == 0


def test_main_rejects_bad_arguments() -> None:
    from ops.sim import main

    with pytest.raises(SystemExit) as exc:
        main(["--rate", "0"])
    assert exc.value.code == 2


# ---------------------------------------------------------------------- the model, offline
def _run(coin: str, *, seed: int, n: int, rate: float = 1000.0) -> tuple[SymbolSim, list[str]]:
    sim = SymbolSim(spec=spec_for(coin), rate_per_s=rate, trade_rate_per_s=30.0, seed=seed)
    frames = []
    for k in range(n):
        trades = sim.step(1_700_000_000_000 + k)
        if trades is not None:
            frames.append(trades)
        frames.append(sim.book_json(1_700_000_000_000 + k))
    return sim, frames


def test_deterministic_given_seed() -> None:
    _, a = _run("ETH", seed=3, n=400)
    _, b = _run("ETH", seed=3, n=400)
    _, c = _run("ETH", seed=4, n=400)
    assert a == b
    assert a != c


@pytest.mark.parametrize("coin", ["BTC", "ETH", "SOL", "DOGE", "NEWCOIN"])
def test_model_books_are_valid_and_imbalance_swings(coin: str) -> None:
    spec = spec_for(coin)
    _, frames = _run(coin, seed=11, n=20_000)
    parser = HyperliquidParser(symbol_ids={coin: 3})
    books = np.zeros(1, schema.BOOK)
    trades = np.zeros(256, schema.TRADE)
    obi: list[float] = []
    depth_imb: list[float] = []
    mids: list[float] = []
    n_trades = 0
    buy_then_up = 0
    sell_then_down = 0
    pending_side = 0
    for raw in frames:
        nb, nt = parser.parse(raw, 0, books, trades)
        if nt:
            n_trades += nt
            pending_side = int(trades["side"][nt - 1])
        if not nb:
            continue
        r = books[0]
        assert int(r["flags"]) == schema.BOOK_SNAPSHOT
        assert r["bid_px"][0] < r["ask_px"][0]
        assert np.abs(r["bid_px"] / spec.tick - np.round(r["bid_px"] / spec.tick)).max() < 1e-6
        b, a = r["bid_sz"], r["ask_sz"]
        obi.append((b[0] - a[0]) / (b[0] + a[0]))
        depth_imb.append((b[:10].sum() - a[:10].sum()) / (b[:10].sum() + a[:10].sum()))
        mid = (r["bid_px"][0] + r["ask_px"][0]) / 2
        if pending_side and mids:
            buy_then_up += pending_side > 0 and mid > mids[-1]
            sell_then_down += pending_side < 0 and mid < mids[-1]
        pending_side = 0
        mids.append(mid)
    assert parser.malformed == 0 and parser.duplicates == 0
    assert 300 < n_trades < 3000  # ~30/s for 20 s, sweeps add fills
    assert buy_then_up + sell_then_down > 0.2 * n_trades / 2  # trades move the mid their way
    for series in (obi, depth_imb):
        lo, hi = np.percentile(series, [2, 98])
        assert lo < -0.6 and hi > 0.6, (lo, hi)
    assert abs(mids[-1] / (spec.start_px) - 1) < 0.05


def test_decimal_formatter_matches_venue_style() -> None:
    assert DecimalFormatter(step=1.0)(105055) == "105055.0"
    assert DecimalFormatter(step=0.1)(35001) == "3500.1"
    assert DecimalFormatter(step=0.1)(35000) == "3500.0"
    assert DecimalFormatter(step=0.00001)(35123) == "0.35123"
    assert DecimalFormatter(step=0.00001)(1) == "0.00001"
    assert DecimalFormatter(step=0.01)(20010) == "200.1"
