"""``hft record`` against the fake venues, ``hft replay`` of what it wrote and of the shipped data."""

from __future__ import annotations

import csv
import gzip
from pathlib import Path

import orjson
import pytest

from ops import record, replay
from ops.cli import main as hft
from ops.fakevenue import FakeVenue

DATA = Path(__file__).resolve().parents[1] / "data"
BINANCE = DATA / "binance-usdm-btcusdt-20240808-excerpt.jsonl.gz"
HYPERLIQUID = DATA / "hyperliquid-btc-20250126.jsonl.gz"


def lines(path: Path) -> list[tuple[int, bytes]]:
    with gzip.open(path, "rb") as f:
        return [(int(a), b.rstrip(b"\n")) for a, _, b in (ln.partition(b" ") for ln in f)]


def test_record_binance_writes_raw_frames_and_an_inline_snapshot(tmp_path: Path) -> None:
    out = tmp_path / "rec.jsonl.gz"
    with FakeVenue("binance", BINANCE, speed=8.0) as venue:
        args = f"--venue binance --symbols BTC --out {out} --depth-ms 0 --duration 3".split()
        code = record.main([*args, "--ws-url", venue.ws_url, "--rest-url", venue.rest_url])
    assert code == 0
    recs = lines(out)
    assert len(recs) > 100
    ts = [t for t, _ in recs]
    assert ts == sorted(ts) and ts[0] > 1_600_000_000 * 10**9, "receive time, ns since epoch"
    docs = [orjson.loads(raw) for _, raw in recs]
    snaps = [d for d in docs if "lastUpdateId" in d]
    assert len(snaps) == 1 and snaps[0]["symbol"] == "BTCUSDT" and len(snaps[0]["bids"]) > 100
    streams = {d["stream"] for d in docs if "stream" in d}
    assert {"btcusdt@depth@0ms", "btcusdt@bookTicker", "btcusdt@aggTrade"} <= streams
    first_snapshot = next(i for i, d in enumerate(docs) if "lastUpdateId" in d)
    assert any("depthUpdate" in str(d) for d in docs[:first_snapshot]), "diffs before the snapshot"

    # and the recording replays through the real book with no gap, equal to the venue's ticker
    tob = tmp_path / "tob.csv"
    assert replay.main([str(out), "--tob", str(tob)]) == 0
    with tob.open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) > 20
    tickers = {
        d["data"]["u"]: (float(d["data"]["b"]), float(d["data"]["a"]))
        for d in docs
        if "stream" in d and d["data"]["e"] == "bookTicker"
    }
    shared = [r for r in rows if int(r["update_id"]) in tickers]
    assert shared, "some update ids are carried by both"
    for r in shared:
        assert (float(r["bid_px"]), float(r["ask_px"])) == tickers[int(r["update_id"])]


def test_record_hyperliquid_then_replay(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "hl.jsonl.gz"
    with FakeVenue("hyperliquid", HYPERLIQUID, speed=20.0) as venue:
        args = f"record --venue hyperliquid --symbols BTC --out {out} --duration 2.5".split()
        args += ["--ws-url", venue.ws_url + "/ws", "--rest-url", venue.rest_url]
        assert hft(args) == 0
    channels = [orjson.loads(raw).get("channel") for _, raw in lines(out)]
    assert channels.count("l2Book") >= 30 and "trades" in channels
    assert "subscriptionResponse" in channels
    capsys.readouterr()
    assert hft(["replay", str(out)]) == 0
    text = capsys.readouterr().out
    assert "hyperliquid" in text and "malformed 0" in text


def test_replay_shipped_binance_excerpt_csv(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tob = tmp_path / "tob.csv"
    assert hft(["replay", str(BINANCE), "--venue", "binance", "--tob", str(tob)]) == 0
    text = capsys.readouterr().out
    assert "gaps 0" in text and "49 checked, 0 different" in text
    with tob.open() as f:
        header = f.readline().strip()
        rows = list(csv.reader(f))
    assert header == "recv_ns,symbol,update_id,bid_px,bid_sz,ask_px,ask_sz"
    assert len(rows) == 484
    ids = [int(r[2]) for r in rows]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert all(r[1] == "BTCUSDT" and float(r[3]) < float(r[5]) for r in rows)


def test_replay_bad_input_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert hft(["replay", str(tmp_path / "missing.gz")]) == 2
    assert "no such file" in capsys.readouterr().err
    junk = tmp_path / "junk.gz"
    junk.write_bytes(b"this is not gzip")
    assert hft(["replay", str(junk)]) == 2
    assert "junk.gz" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        hft(["replay", str(BINANCE), "--speed", "fast"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        hft(["record", "--venue", "binance", "--symbols", "BTC,ETH!", "--out", "x.gz"])
    assert exc.value.code == 2


def test_replay_counts_corrupt_lines_and_keeps_going(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = lines(BINANCE)
    bad = tmp_path / "bad.jsonl.gz"
    with gzip.open(bad, "wb") as f:
        for i, (t, raw) in enumerate(src[:2000]):
            if i == 100:
                f.write(b"garbage without a timestamp\n")
            if i == 200:
                f.write(b'%d {"stream":"btcusdt@depth@0ms","data":{"e":"depthUpd\n' % t)
            f.write(b"%d %s\n" % (t, raw))
    assert hft(["replay", str(bad)]) == 0
    text = capsys.readouterr().out
    assert "malformed 2" in text


def test_record_reconnects_a_silent_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(record, "SILENT_S", 0.5)
    out = tmp_path / "hl.jsonl.gz"
    with FakeVenue("hyperliquid", HYPERLIQUID, speed=20.0) as venue:
        venue.silence(1.2)
        args = f"--venue hyperliquid --symbols BTC --out {out} --duration 2.5".split()
        assert record.main([*args, "--ws-url", venue.ws_url + "/ws"]) == 0
        assert venue.connects_total >= 2, "a silent connection is dropped and made again"
