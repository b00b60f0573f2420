"""Venue symbol rules -> instruments, the endpoint table, and loading with a cache fallback.

The fixtures in tests/data are hand-written in the venues' documented formats; the loader runs
against a scripted HTTP server on 127.0.0.1, stopped mid-test to play "the venue is down".
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from stages.config import FeedConfig
from stages.instruments import instrument, tick_at
from stages.venues.endpoints import Endpoints, endpoints
from stages.venues.rest import RestClient
from stages.venues.symbols import (
    SymbolError,
    asset_ids,
    binance_instruments,
    hyperliquid_instruments,
    load_instruments,
)
from tests.venues.test_rest import FakeClock, Reply, ScriptedServer, closed_port_url

DATA = Path(__file__).resolve().parent.parent / "data"
EXCHANGE_INFO: dict[str, Any] = orjson.loads((DATA / "binance-exchangeinfo.json").read_bytes())
META: dict[str, Any] = orjson.loads((DATA / "hyperliquid-meta.json").read_bytes())
T0 = 1_723_161_255.0


@pytest.fixture
def server() -> Iterator[ScriptedServer]:
    srv = ScriptedServer().start()
    try:
        yield srv
    finally:
        srv.stop()


def _symbol(doc: dict[str, Any], symbol: str) -> dict[str, Any]:
    entry: dict[str, Any] = next(s for s in doc["symbols"] if s["symbol"] == symbol)
    return entry


def _filter(doc: dict[str, Any], symbol: str, kind: str) -> dict[str, Any]:
    flt: dict[str, Any] = next(
        f for f in _symbol(doc, symbol)["filters"] if f["filterType"] == kind
    )
    return flt


# ---- endpoints -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "testnet", "ws", "rest"),
    [
        ("binance", False, "wss://fstream.binance.com", "https://fapi.binance.com"),
        ("binance", True, "wss://fstream.binancefuture.com", "https://testnet.binancefuture.com"),
        ("hyperliquid", False, "wss://api.hyperliquid.xyz/ws", "https://api.hyperliquid.xyz"),
        (
            "hyperliquid",
            True,
            "wss://api.hyperliquid-testnet.xyz/ws",
            "https://api.hyperliquid-testnet.xyz",
        ),
    ],
)
def test_public_endpoints(source: str, testnet: bool, ws: str, rest: str) -> None:
    assert endpoints(FeedConfig(source=source, testnet=testnet)) == Endpoints(ws, rest)


def test_endpoint_overrides_win_each_on_its_own_and_lose_a_trailing_slash() -> None:
    feed = FeedConfig(source="binance", testnet=True, rest_url="http://127.0.0.1:8080/")
    assert endpoints(feed) == Endpoints("wss://fstream.binancefuture.com", "http://127.0.0.1:8080")
    feed = FeedConfig(source="hyperliquid", ws_url="ws://127.0.0.1:9000/ws/")
    assert endpoints(feed) == Endpoints("ws://127.0.0.1:9000/ws", "https://api.hyperliquid.xyz")


def test_the_sim_has_no_venue_endpoints() -> None:
    with pytest.raises(ValueError, match="sim"):
        endpoints(FeedConfig(source="sim"))


# ---- Binance ---------------------------------------------------------------------------


def test_binance_rules_from_exchange_info() -> None:
    btc, sol, eth = binance_instruments(EXCHANGE_INFO, ["BTC", "SOL", "ETHUSDT"])
    assert (btc.name, btc.venue, btc.venue_symbol, btc.wire_name) == (
        "BTC",
        "binance",
        "BTCUSDT",
        "BTCUSDT",
    )
    assert (btc.tick_size, btc.lot_size, btc.min_notional, btc.px_sig_figs) == (0.1, 0.001, 100, 0)
    assert (sol.tick_size, sol.lot_size, sol.min_notional) == (0.01, 1.0, 5.0)
    # a name already in venue form maps to itself, and the engine calls it by its base asset
    assert (eth.name, eth.venue_symbol, eth.min_notional) == ("ETH", "ETHUSDT", 20.0)


def test_binance_symbol_not_trading_is_an_error() -> None:
    with pytest.raises(SymbolError, match=r"XRPUSDT.*SETTLING"):
        binance_instruments(EXCHANGE_INFO, ["BTC", "XRP"])


def test_binance_non_perpetual_is_an_error() -> None:
    doc = copy.deepcopy(EXCHANGE_INFO)
    _symbol(doc, "ETHUSDT")["contractType"] = "CURRENT_QUARTER"
    with pytest.raises(SymbolError, match=r"ETHUSDT.*CURRENT_QUARTER"):
        binance_instruments(doc, ["ETH"])


def test_binance_unknown_names_are_all_reported_with_suggestions() -> None:
    with pytest.raises(SymbolError) as info:
        binance_instruments(EXCHANGE_INFO, ["BTC", "FOO", "SOLL"])
    text = str(info.value)
    assert "FOO (FOOUSDT)" in text
    assert "SOLL (SOLLUSDT; did you mean SOLUSDT?)" in text
    assert "BTC (" not in text


def test_binance_duplicate_after_mapping_is_an_error() -> None:
    with pytest.raises(SymbolError, match="BTCUSDT"):
        binance_instruments(EXCHANGE_INFO, ["BTC", "BTCUSDT"])


@pytest.mark.parametrize(
    ("kind", "key", "value", "expect"),
    [
        ("PRICE_FILTER", "tickSize", None, r"BTCUSDT.*PRICE_FILTER\.tickSize is missing"),
        ("PRICE_FILTER", "tickSize", "abc", r"BTCUSDT.*PRICE_FILTER\.tickSize.*not a number"),
        ("PRICE_FILTER", "tickSize", "0", r"BTCUSDT.*PRICE_FILTER\.tickSize must be > 0"),
        ("PRICE_FILTER", "tickSize", "-0.1", r"BTCUSDT.*PRICE_FILTER\.tickSize must be > 0"),
        ("LOT_SIZE", "stepSize", "nan", r"BTCUSDT.*LOT_SIZE\.stepSize"),
        ("MIN_NOTIONAL", "notional", None, r"BTCUSDT.*MIN_NOTIONAL\.notional is missing"),
        ("MIN_NOTIONAL", "notional", [1], r"BTCUSDT.*MIN_NOTIONAL\.notional"),
    ],
)
def test_binance_malformed_filter_names_symbol_and_field(
    kind: str, key: str, value: object, expect: str
) -> None:
    doc = copy.deepcopy(EXCHANGE_INFO)
    flt = _filter(doc, "BTCUSDT", kind)
    if value is None:
        del flt[key]
    else:
        flt[key] = value
    with pytest.raises(SymbolError, match=expect):
        binance_instruments(doc, ["BTC"])


def test_binance_malformed_document() -> None:
    with pytest.raises(SymbolError, match="symbols"):
        binance_instruments({"timezone": "UTC"}, ["BTC"])
    doc = copy.deepcopy(EXCHANGE_INFO)
    del _symbol(doc, "BTCUSDT")["filters"]
    with pytest.raises(SymbolError, match=r"BTCUSDT.*filters"):
        binance_instruments(doc, ["BTC"])
    doc = copy.deepcopy(EXCHANGE_INFO)
    _symbol(doc, "BTCUSDT")["filters"] = [
        f for f in _symbol(doc, "BTCUSDT")["filters"] if f["filterType"] != "LOT_SIZE"
    ]
    with pytest.raises(SymbolError, match=r"BTCUSDT.*LOT_SIZE is missing"):
        binance_instruments(doc, ["BTC"])


# ---- Hyperliquid -----------------------------------------------------------------------


def test_hyperliquid_rules_from_meta() -> None:
    btc, eth, doge = hyperliquid_instruments(META, ["BTC", "ETH", "DOGE"])
    assert (btc.name, btc.venue, btc.venue_symbol) == ("BTC", "hyperliquid", "BTC")
    assert (btc.lot_size, btc.px_sig_figs, btc.px_max_decimals, btc.tick_size) == (
        1e-5,
        5,
        1,
        0.1,
    )
    assert btc.min_notional == 10.0
    assert (eth.lot_size, eth.px_max_decimals, eth.tick_size) == (1e-4, 2, 0.01)
    assert (doge.lot_size, doge.px_max_decimals, doge.tick_size) == (1.0, 6, 1e-6)


def test_hyperliquid_asset_ids_are_universe_indexes() -> None:
    assert asset_ids(META, ["DOGE", "BTC", "SOL"]) == {"DOGE": 3, "BTC": 0, "SOL": 2}


def test_hyperliquid_delisted_coin_is_an_error() -> None:
    with pytest.raises(SymbolError, match="delisted: MATIC"):
        hyperliquid_instruments(META, ["BTC", "MATIC"])
    with pytest.raises(SymbolError, match="MATIC"):
        asset_ids(META, ["MATIC"])


def test_hyperliquid_unknown_coins_are_all_reported() -> None:
    with pytest.raises(SymbolError) as info:
        hyperliquid_instruments(META, ["FOO", "btc", "ETH"])
    text = str(info.value)
    assert "FOO" in text and "btc; did you mean BTC?" in text and "ETH" not in text


@pytest.mark.parametrize("sz", ["5", 7, -1, True, None])
def test_hyperliquid_bad_sz_decimals(sz: object) -> None:
    meta = copy.deepcopy(META)
    meta["universe"][0]["szDecimals"] = sz
    with pytest.raises(SymbolError, match="BTC: szDecimals"):
        hyperliquid_instruments(meta, ["BTC"])


@pytest.mark.parametrize(
    ("coin", "px", "tick"),
    [
        ("BTC", 105055.0, 1.0),
        ("ETH", 3456.7, 0.1),
        ("SOL", 123.456, 0.01),
        ("DOGE", 0.351234, 1e-5),
    ],
)
def test_tick_at_with_hyperliquid_rules(coin: str, px: float, tick: float) -> None:
    (ins,) = hyperliquid_instruments(META, [coin])
    got = tick_at(px, ins.tick_size, ins.px_sig_figs, ins.px_max_decimals)
    assert got == pytest.approx(tick, rel=1e-9)


# ---- load_instruments ------------------------------------------------------------------


def _binance_feed(url: str, cache: Path, symbols: tuple[str, ...] = ("BTC", "SOL")) -> FeedConfig:
    return FeedConfig(source="binance", symbols=symbols, rest_url=url, cache_dir=str(cache))


def test_sim_rules_are_builtin() -> None:
    loaded = load_instruments(FeedConfig(source="sim", symbols=("BTC", "ETH", "XYZ")))
    assert loaded.source == "builtin"
    assert loaded.instruments == [instrument("BTC"), instrument("ETH"), instrument("XYZ")]
    assert loaded.warning == ""


def test_fetch_writes_the_cache_then_the_cache_serves_when_the_venue_is_down(
    server: ScriptedServer, tmp_path: Path
) -> None:
    cache = tmp_path / "var" / "cache"  # does not exist yet
    server.default = Reply(body=EXCHANGE_INFO)
    feed = _binance_feed(server.url, cache)
    loaded = load_instruments(feed, now=lambda: T0)
    assert (loaded.source, loaded.fetched_at, loaded.warning) == ("venue", T0, "")
    assert [(i.name, i.tick_size) for i in loaded.instruments] == [("BTC", 0.1), ("SOL", 0.01)]
    assert [(s.method, s.target) for s in server.seen] == [("GET", "/fapi/v1/exchangeInfo")]
    written = orjson.loads((cache / "symbols-binance.json").read_bytes())
    assert written["fetched_at"] == T0
    assert written["document"] == EXCHANGE_INFO
    assert [p.name for p in cache.iterdir()] == ["symbols-binance.json"]  # no temp file left

    server.stop()
    again = load_instruments(feed, now=lambda: T0 + 7200)
    assert again.source == "cache"
    assert again.fetched_at == T0
    assert again.instruments == loaded.instruments
    assert "2.0 h old" in again.warning
    assert "symbols-binance.json" in again.warning
    assert "binance GET /fapi/v1/exchangeInfo" in again.warning  # names the error


def test_hyperliquid_fetch_posts_meta_and_keeps_asset_ids(
    server: ScriptedServer, tmp_path: Path
) -> None:
    server.default = Reply(body=META)
    feed = FeedConfig(
        source="hyperliquid", symbols=("ETH", "DOGE"), rest_url=server.url, cache_dir=str(tmp_path)
    )
    client = RestClient(server.url, venue="hyperliquid", weight_per_min=1200)
    loaded = load_instruments(feed, client=client, now=lambda: T0)
    assert loaded.source == "venue"
    assert [i.name for i in loaded.instruments] == ["ETH", "DOGE"]
    assert dict(loaded.asset_ids) == {"ETH": 1, "DOGE": 3}
    (seen,) = server.seen
    assert (seen.method, seen.target, orjson.loads(seen.body)) == (
        "POST",
        "/info",
        {"type": "meta"},
    )
    assert client.used_weight == 20
    assert (tmp_path / "symbols-hyperliquid.json").exists()


def test_rate_limited_fetch_also_falls_back_to_the_cache(
    server: ScriptedServer, tmp_path: Path
) -> None:
    server.script(Reply(body=EXCHANGE_INFO))
    feed = _binance_feed(server.url, tmp_path)
    load_instruments(feed, now=lambda: T0)
    server.script(
        Reply(status=429, headers={"Retry-After": "30"}, body={"code": -1003, "msg": "x"})
    )
    loaded = load_instruments(feed, now=lambda: T0 + 30)
    assert loaded.source == "cache"
    assert "429" in loaded.warning and "30 s old" in loaded.warning


def test_no_cache_and_venue_down_names_host_error_and_path(tmp_path: Path) -> None:
    url = closed_port_url()
    feed = _binance_feed(url, tmp_path / "cache")
    with pytest.raises(SymbolError) as info:
        load_instruments(feed)
    text = str(info.value)
    assert str(tmp_path / "cache" / "symbols-binance.json") in text
    assert url.removeprefix("http://") in text
    assert "binance GET /fapi/v1/exchangeInfo" in text


@pytest.mark.parametrize(
    "blob",
    [
        b'{"fetched_at": 1723161255.0, "document": {"symbols": [',  # cut short
        b"[1, 2, 3]",
        b'{"document": {"symbols": []}}',
        b'{"fetched_at": 1.0, "document": "nope"}',
    ],
)
def test_corrupt_cache_names_the_file(tmp_path: Path, blob: bytes) -> None:
    path = tmp_path / "symbols-binance.json"
    path.write_bytes(blob)
    with pytest.raises(SymbolError, match="corrupt") as info:
        load_instruments(_binance_feed(closed_port_url(), tmp_path))
    assert str(path) in str(info.value)


def test_unknown_symbol_in_a_fresh_document_is_not_masked_by_the_cache(
    server: ScriptedServer, tmp_path: Path
) -> None:
    server.script(Reply(body=EXCHANGE_INFO))
    load_instruments(_binance_feed(server.url, tmp_path), now=lambda: T0)
    cached = (tmp_path / "symbols-binance.json").read_bytes()
    # the venue answers, but no longer lists SOL: that is news, not an outage
    doc = copy.deepcopy(EXCHANGE_INFO)
    doc["symbols"] = [s for s in doc["symbols"] if s["symbol"] != "SOLUSDT"]
    server.script(Reply(body=doc))
    with pytest.raises(SymbolError, match="SOLUSDT"):
        load_instruments(_binance_feed(server.url, tmp_path), now=lambda: T0 + 60)
    assert (tmp_path / "symbols-binance.json").read_bytes() == cached  # good cache kept


def test_cache_without_the_configured_symbol_is_an_error(
    server: ScriptedServer, tmp_path: Path
) -> None:
    server.script(Reply(body=EXCHANGE_INFO))
    load_instruments(_binance_feed(server.url, tmp_path), now=lambda: T0)
    server.stop()
    with pytest.raises(SymbolError, match=r"symbols-binance\.json.*FOO"):
        load_instruments(_binance_feed(server.url, tmp_path, ("BTC", "FOO")))


def test_injected_client_clock_is_used(server: ScriptedServer, tmp_path: Path) -> None:
    # a client whose ban is still running: nothing is sent and the cache serves
    server.script(Reply(body=EXCHANGE_INFO), Reply(status=418, body={"code": -1003, "msg": "ban"}))
    clock = FakeClock()
    client = RestClient(server.url, venue="binance", weight_per_min=1200, clock=clock)
    feed = _binance_feed(server.url, tmp_path)
    load_instruments(feed, client=client, now=lambda: T0)
    assert load_instruments(feed, client=client, now=lambda: T0).source == "cache"  # the 418
    clock.t += 100
    assert load_instruments(feed, client=client, now=lambda: T0).source == "cache"  # held back
    assert len(server.seen) == 2
    assert client.rate_limited == 2
