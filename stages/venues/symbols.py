"""Venue symbol rules -> ``Instrument`` rows, fetched at startup and cached for bad days.

Why fetch them: tick size, lot size and minimum notional change (Binance re-ticks symbols,
Hyperliquid changes ``szDecimals``); an order built from stale rules is rejected at best. Why
cache them: a venue's REST API being down or rate-limiting us at startup should not stop an
engine that could stream and trade on yesterday's rules, so the last good document is kept in
``<feed.cache_dir>/symbols-<venue>.json`` and used, with a warning that says how old it is,
when the fetch fails. A document that *was* fetched but does not have what the config asks
for (unknown or halted symbol) is an error, never masked by the cache: the venue is telling
us something.

Binance USD-M (``GET /fapi/v1/exchangeInfo``): engine name "BTC" is the venue's "BTCUSDT";
rules come from the symbol's ``PRICE_FILTER.tickSize``, ``LOT_SIZE.stepSize`` and
``MIN_NOTIONAL.notional`` (decimal strings).

Hyperliquid perps (``POST /info {"type":"meta"}``): ``universe[i]`` is ``{name, szDecimals}``
and ``i`` is the asset id orders use. Sizes have ``szDecimals`` decimals; prices at most 5
significant figures and at most ``6 - szDecimals`` decimals (integers always allowed), which
``stages.instruments.tick_at`` turns into the increment at a given price. Orders below 10 USD
of value are rejected.
"""

from __future__ import annotations

import difflib
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import orjson

from stages import instruments as _instruments
from stages.config import FeedConfig
from stages.instruments import Instrument
from stages.venues.endpoints import endpoints
from stages.venues.rest import RestClient, RestError

logger = logging.getLogger(__name__)

BINANCE_QUOTE: Final = "USDT"
BINANCE_EXCHANGE_INFO: Final = "/fapi/v1/exchangeInfo"
BINANCE_EXCHANGE_INFO_WEIGHT: Final = 1
HYPERLIQUID_INFO: Final = "/info"
HYPERLIQUID_META_WEIGHT: Final = 20
HYPERLIQUID_PX_SIG_FIGS: Final = 5
HYPERLIQUID_MAX_PX_DECIMALS: Final = 6  # perps; minus szDecimals
HYPERLIQUID_MIN_NOTIONAL: Final = 10.0


class SymbolError(ValueError):
    """The symbols the config asks for cannot be resolved; the message names each one."""


@dataclass(frozen=True, slots=True)
class LoadedSymbols:
    instruments: list[Instrument]  # in the order of ``feed.symbols``: row i is symbol id i
    source: str  # "venue" | "cache" | "builtin"
    fetched_at: float  # wall time the rules were fetched (cache: the cached fetch); builtin: 0
    warning: str  # "" unless something degraded (rules from the cache, cache not written)
    asset_ids: Mapping[str, int] = field(default_factory=dict)  # Hyperliquid: name -> asset id


def _suggest(wanted: str, known: Mapping[str, str]) -> str:
    """``"; did you mean X, Y?"`` for close names, case-insensitively, else ``""``.

    ``known`` maps the string compared to the one shown: Binance compares base assets, since
    the shared "USDT" suffix would make every symbol look close to every other.
    """
    by_upper: dict[str, str] = {}
    for k, shown in known.items():
        by_upper.setdefault(k.upper(), shown)
    close = difflib.get_close_matches(wanted.upper(), list(by_upper), n=3, cutoff=0.6)
    return f"; did you mean {', '.join(by_upper[c] for c in close)}?" if close else ""


def _positive_decimal(symbol: str, field_name: str, raw: object, *, allow_zero: bool) -> float:
    """A venue's decimal string (or number) as a float, or SymbolError naming symbol and field."""
    if isinstance(raw, bool) or not isinstance(raw, str | int | float):
        raise SymbolError(f"{symbol}: {field_name} must be a decimal string, got {raw!r}")
    try:
        value = float(raw)
    except ValueError:
        raise SymbolError(f"{symbol}: {field_name} is not a number: {raw!r}") from None
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise SymbolError(f"{symbol}: {field_name} must be {bound}, got {raw!r}")
    return value


# ---- Binance ---------------------------------------------------------------------------


def binance_symbol(name: str) -> str:
    """Engine name -> Binance USD-M symbol: "BTC" -> "BTCUSDT"; "BTCUSDT" stays as it is."""
    if name.endswith(BINANCE_QUOTE) and len(name) > len(BINANCE_QUOTE):
        return name
    return name + BINANCE_QUOTE


def _binance_base(symbol: str) -> str:
    return symbol.removesuffix(BINANCE_QUOTE) or symbol


def _binance_rule(
    symbol: str, filters: Mapping[str, Mapping[str, Any]], kind: str, key: str
) -> Any:
    flt = filters.get(kind)
    if flt is None:
        raise SymbolError(f"{symbol}: filter {kind} is missing")
    if key not in flt:
        raise SymbolError(f"{symbol}: {kind}.{key} is missing")
    return flt[key]


def _binance_instrument(name: str, entry: Mapping[str, Any]) -> Instrument:
    symbol = str(entry.get("symbol", "?"))
    raw_filters = entry.get("filters")
    if not isinstance(raw_filters, list):
        raise SymbolError(f"{symbol}: 'filters' is missing or not a list")
    filters: dict[str, Mapping[str, Any]] = {}
    for f in raw_filters:
        if isinstance(f, dict) and isinstance(f.get("filterType"), str):
            filters.setdefault(f["filterType"], f)
    tick = _binance_rule(symbol, filters, "PRICE_FILTER", "tickSize")
    step = _binance_rule(symbol, filters, "LOT_SIZE", "stepSize")
    notional = _binance_rule(symbol, filters, "MIN_NOTIONAL", "notional")
    return Instrument(
        name=name,
        tick_size=_positive_decimal(symbol, "PRICE_FILTER.tickSize", tick, allow_zero=False),
        lot_size=_positive_decimal(symbol, "LOT_SIZE.stepSize", step, allow_zero=False),
        min_notional=_positive_decimal(symbol, "MIN_NOTIONAL.notional", notional, allow_zero=True),
        venue="binance",
        venue_symbol=symbol,
        px_sig_figs=0,
    )


def binance_instruments(exchange_info: Mapping[str, Any], names: Sequence[str]) -> list[Instrument]:
    """Instruments for ``names`` from a Binance USD-M ``exchangeInfo`` document.

    Every unknown name is reported at once (with close matches), then every symbol that is
    not a trading perpetual: a config with two typos should need one fix, not two restarts.
    """
    raw_symbols = exchange_info.get("symbols") if isinstance(exchange_info, Mapping) else None
    if not isinstance(raw_symbols, list):
        raise SymbolError("binance exchangeInfo: 'symbols' is missing or not a list")
    by_symbol: dict[str, Mapping[str, Any]] = {}
    for entry in raw_symbols:
        if isinstance(entry, dict) and isinstance(entry.get("symbol"), str):
            by_symbol.setdefault(entry["symbol"], entry)

    wanted = [(name, binance_symbol(name)) for name in names]
    bases = {_binance_base(sym): sym for sym in by_symbol}
    missing = [
        f"{name} ({sym}{_suggest(_binance_base(sym), bases)})"
        for name, sym in wanted
        if sym not in by_symbol
    ]
    if missing:
        raise SymbolError(f"unknown binance symbols: {', '.join(missing)}")
    seen: dict[str, str] = {}
    for name, sym in wanted:
        if sym in seen:
            raise SymbolError(f"binance symbols {seen[sym]!r} and {name!r} are both {sym}")
        seen[sym] = name
    halted = [
        f"{sym} (status {e.get('status')!r}, contractType {e.get('contractType')!r})"
        for sym, e in ((sym, by_symbol[sym]) for _, sym in wanted)
        if e.get("status") != "TRADING" or e.get("contractType") != "PERPETUAL"
    ]
    if halted:
        raise SymbolError(f"binance symbols not trading as perpetuals: {', '.join(halted)}")

    out = []
    for name, sym in wanted:
        entry = by_symbol[sym]
        engine_name = name
        if name == sym:  # "BTCUSDT" in the config: the engine calls it by its base asset
            base = entry.get("baseAsset")
            engine_name = base if isinstance(base, str) and base else _binance_base(sym)
        out.append(_binance_instrument(engine_name, entry))
    return out


# ---- Hyperliquid -----------------------------------------------------------------------


def _hyperliquid_lookup(
    meta: Mapping[str, Any], names: Sequence[str]
) -> list[tuple[str, int, Mapping[str, Any]]]:
    """``(name, asset id, universe entry)`` for each name, or SymbolError naming the bad ones."""
    universe = meta.get("universe") if isinstance(meta, Mapping) else None
    if not isinstance(universe, list):
        raise SymbolError("hyperliquid meta: 'universe' is missing or not a list")
    by_name: dict[str, tuple[int, Mapping[str, Any]]] = {}
    for i, entry in enumerate(universe):
        if isinstance(entry, dict) and isinstance(entry.get("name"), str):
            by_name.setdefault(entry["name"], (i, entry))
    missing = [f"{n}{_suggest(n, {k: k for k in by_name})}" for n in names if n not in by_name]
    if missing:
        raise SymbolError(f"unknown hyperliquid coins: {', '.join(missing)}")
    delisted = [n for n in names if by_name[n][1].get("isDelisted") is True]
    if delisted:
        raise SymbolError(f"hyperliquid coins delisted: {', '.join(delisted)}")
    return [(n, *by_name[n]) for n in names]


def _sz_decimals(name: str, entry: Mapping[str, Any]) -> int:
    sz = entry.get("szDecimals")
    if isinstance(sz, bool) or not isinstance(sz, int):
        raise SymbolError(f"{name}: szDecimals must be an integer, got {sz!r}")
    if not 0 <= sz <= HYPERLIQUID_MAX_PX_DECIMALS:
        raise SymbolError(f"{name}: szDecimals must be 0..{HYPERLIQUID_MAX_PX_DECIMALS}, got {sz}")
    return sz


def hyperliquid_instruments(meta: Mapping[str, Any], names: Sequence[str]) -> list[Instrument]:
    """Instruments for ``names`` from a Hyperliquid perps ``meta`` document.

    ``tick_size`` is the finest increment the decimals rule allows; the significant-figure
    rule makes the real increment coarser at higher prices (see ``tick_at``).
    """
    out = []
    for name, _, entry in _hyperliquid_lookup(meta, names):
        sz = _sz_decimals(name, entry)
        max_decimals = HYPERLIQUID_MAX_PX_DECIMALS - sz
        out.append(
            Instrument(
                name=name,
                tick_size=float(f"1e-{max_decimals}"),  # the exact decimal, not 10.0**-n
                lot_size=float(f"1e-{sz}"),
                min_notional=HYPERLIQUID_MIN_NOTIONAL,
                venue="hyperliquid",
                venue_symbol=name,
                px_sig_figs=HYPERLIQUID_PX_SIG_FIGS,
                px_max_decimals=max_decimals,
            )
        )
    return out


def asset_ids(meta: Mapping[str, Any], names: Sequence[str]) -> dict[str, int]:
    """Hyperliquid asset id (index in ``universe``) of each name: orders name coins by it."""
    return {name: i for name, i, _ in _hyperliquid_lookup(meta, names)}


# ---- loading with a cache --------------------------------------------------------------


def cache_path(feed: FeedConfig) -> Path:
    return Path(feed.cache_dir) / f"symbols-{feed.source}.json"


def _build(
    venue: str, document: Any, names: Sequence[str]
) -> tuple[list[Instrument], dict[str, int]]:
    if not isinstance(document, dict):
        raise SymbolError(f"{venue} symbol document is not a JSON object")
    if venue == "binance":
        return binance_instruments(document, names), {}
    return hyperliquid_instruments(document, names), asset_ids(document, names)


def _fetch(feed: FeedConfig, client: RestClient) -> Any:
    if feed.source == "binance":
        return client.get_json(BINANCE_EXCHANGE_INFO, weight=BINANCE_EXCHANGE_INFO_WEIGHT)
    return client.post_json(HYPERLIQUID_INFO, {"type": "meta"}, weight=HYPERLIQUID_META_WEIGHT)


def _write_cache(path: Path, venue: str, rest_url: str, fetched_at: float, document: Any) -> None:
    """Write the cache atomically: a crash mid-write must never leave a half file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = orjson.dumps(
        {"venue": venue, "rest_url": rest_url, "fetched_at": fetched_at, "document": document}
    )
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _read_cache(path: Path, venue: str) -> tuple[float, str, Any]:
    """``(fetched_at, rest_url, document)`` of a cache file; SymbolError naming it if corrupt.

    FileNotFoundError propagates: "no cache" and "a broken cache" need different advice.
    """
    blob = path.read_bytes()
    try:
        doc = orjson.loads(blob)
    except orjson.JSONDecodeError as exc:
        raise SymbolError(f"symbol cache {path} is corrupt (not JSON: {exc.msg})") from None
    if not isinstance(doc, dict):
        raise SymbolError(f"symbol cache {path} is corrupt (not a JSON object)")
    fetched_at = doc.get("fetched_at")
    if isinstance(fetched_at, bool) or not isinstance(fetched_at, int | float):
        raise SymbolError(f"symbol cache {path} is corrupt ('fetched_at' missing or not a number)")
    if not isinstance(doc.get("document"), dict):
        raise SymbolError(f"symbol cache {path} is corrupt ('document' missing or not an object)")
    if doc.get("venue", venue) != venue:
        raise SymbolError(f"symbol cache {path} holds {doc.get('venue')!r} rules, not {venue!r}")
    return float(fetched_at), str(doc.get("rest_url", "")), doc["document"]


def _age(seconds: float) -> str:
    s = max(seconds, 0.0)
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    if s < 172_800:
        return f"{s / 3600:.1f} h"
    return f"{s / 86_400:.1f} d"


def load_instruments(
    feed: FeedConfig,
    *,
    client: RestClient | None = None,
    now: Callable[[], float] = time.time,
) -> LoadedSymbols:
    """Resolve ``feed.symbols`` to instruments: from the venue, else its cache, else fail.

    The simulator's rules are built in. For a venue the fresh document wins and is cached
    (only once it has resolved every symbol, so a bad answer never replaces a good cache); a
    failed fetch (transport, HTTP error, rate limit) falls back to the cache with a warning
    naming the error and the cache's age. With neither, SymbolError says what was tried.
    """
    names = list(feed.symbols)
    if feed.source == "sim":
        return LoadedSymbols([_instruments.instrument(n) for n in names], "builtin", 0.0, "")
    venue = feed.source
    full_url = endpoints(feed).rest_url
    parts = urlsplit(full_url)
    host = f"{parts.hostname}:{parts.port}" if parts.port else (parts.hostname or "?")
    rest_url = f"{parts.scheme}://{host}{parts.path}"  # never a user:password@ in logs or files
    path = cache_path(feed)
    if client is None:
        client = RestClient(full_url, venue=venue, weight_per_min=feed.rest_weight_per_min)

    try:
        document = _fetch(feed, client)
    except RestError as err:
        return _from_cache(venue, names, path, host, rest_url, err, now)

    fetched_at = now()
    instruments, ids = _build(venue, document, names)
    warning = ""
    try:
        _write_cache(path, venue, rest_url, fetched_at, document)
    except OSError as exc:
        warning = f"{venue} symbol rules fetched but the cache {path} was not written: {exc}"
        logger.warning(
            "symbol cache not written",
            extra={"venue": venue, "cache": str(path), "error": str(exc)},
        )
    logger.info(
        "venue symbol rules fetched",
        extra={"venue": venue, "host": host, "symbols": [i.wire_name for i in instruments]},
    )
    return LoadedSymbols(instruments, "venue", fetched_at, warning, ids)


def _from_cache(
    venue: str,
    names: Sequence[str],
    path: Path,
    host: str,
    rest_url: str,
    err: RestError,
    now: Callable[[], float],
) -> LoadedSymbols:
    try:
        fetched_at, cached_url, document = _read_cache(path, venue)
    except FileNotFoundError:
        raise SymbolError(
            f"cannot load {venue} symbol rules: fetch from {host} failed ({err}) "
            f"and there is no cache at {path}"
        ) from err
    except OSError as exc:
        raise SymbolError(
            f"cannot load {venue} symbol rules: fetch from {host} failed ({err}) "
            f"and the cache {path} cannot be read ({exc.strerror or exc})"
        ) from err
    try:
        instruments, ids = _build(venue, document, names)
    except SymbolError as exc:
        raise SymbolError(
            f"symbol cache {path} (used because {host} failed: {err}): {exc}"
        ) from err
    age = _age(now() - fetched_at)
    warning = f"{venue} symbol rules from cache {path}, {age} old: fetch from {host} failed: {err}"
    if cached_url and cached_url != rest_url:
        warning += f" (the cache was fetched from {cached_url})"
    logger.warning(
        "venue symbol rules from cache",
        extra={
            "venue": venue,
            "cache": str(path),
            "age_s": round(now() - fetched_at, 1),
            "error": str(err),
        },
    )
    return LoadedSymbols(instruments, "cache", fetched_at, warning, ids)
