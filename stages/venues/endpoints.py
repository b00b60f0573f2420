"""The venues' public endpoints, and the one function that picks them for a feed.

Why one place: the feed (WebSocket), the snapshot fetcher and the symbol loader (REST) must
agree on mainnet vs testnet; a feed streaming testnet books while its snapshots come from
mainnet would resync forever. Config overrides (``feed.ws_url`` / ``feed.rest_url``) win, which
is how tests and the fake venues point the engine at 127.0.0.1.

Binance USD-M futures routes its streams by path (``/public`` for book data, ``/market`` for
trades and marks); the feed appends those to the base URL given here, so an override is a base
too. Hyperliquid serves every stream on one ``/ws`` path and all REST reads on ``POST /info``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from stages.config import FeedConfig

BINANCE_WS_URL: Final = "wss://fstream.binance.com"
BINANCE_REST_URL: Final = "https://fapi.binance.com"
BINANCE_TESTNET_WS_URL: Final = "wss://fstream.binancefuture.com"
BINANCE_TESTNET_REST_URL: Final = "https://testnet.binancefuture.com"

HYPERLIQUID_WS_URL: Final = "wss://api.hyperliquid.xyz/ws"
HYPERLIQUID_REST_URL: Final = "https://api.hyperliquid.xyz"
HYPERLIQUID_TESTNET_WS_URL: Final = "wss://api.hyperliquid-testnet.xyz/ws"
HYPERLIQUID_TESTNET_REST_URL: Final = "https://api.hyperliquid-testnet.xyz"


@dataclass(frozen=True, slots=True)
class Endpoints:
    ws_url: str  # Binance: the base, without the routed /public or /market path
    rest_url: str  # no trailing "/": callers append paths that start with "/"


# (venue, testnet) -> the venue's public endpoints
_PUBLIC: Final[dict[tuple[str, bool], Endpoints]] = {
    ("binance", False): Endpoints(BINANCE_WS_URL, BINANCE_REST_URL),
    ("binance", True): Endpoints(BINANCE_TESTNET_WS_URL, BINANCE_TESTNET_REST_URL),
    ("hyperliquid", False): Endpoints(HYPERLIQUID_WS_URL, HYPERLIQUID_REST_URL),
    ("hyperliquid", True): Endpoints(HYPERLIQUID_TESTNET_WS_URL, HYPERLIQUID_TESTNET_REST_URL),
}


def endpoints(feed: FeedConfig) -> Endpoints:
    """Return the WebSocket and REST URLs of ``feed``: its overrides, else the venue's own.

    Each override replaces one URL on its own (a test may fake the REST side only); a trailing
    "/" is dropped so ``rest_url + "/info"`` never has a double slash. The simulator has no
    venue endpoints, so asking for them is a bug in the caller: ``ValueError``.
    """
    public = _PUBLIC.get((feed.source, bool(feed.testnet)))
    if public is None:
        raise ValueError(f"feed source {feed.source!r} has no venue endpoints")
    return Endpoints(
        ws_url=feed.ws_url.rstrip("/") if feed.ws_url else public.ws_url,
        rest_url=feed.rest_url.rstrip("/") if feed.rest_url else public.rest_url,
    )
