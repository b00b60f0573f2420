"""Instrument rules (tick, lot, minimum notional) known without asking a venue.

The embedded simulator and the default symbol table use these; venue adapters replace them
with the venue's own rules (Binance ``exchangeInfo`` filters, Hyperliquid ``szDecimals``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final


@dataclass(frozen=True, slots=True)
class Instrument:
    name: str
    tick_size: float
    lot_size: float
    min_notional: float
    start_px: float  # the simulator's opening price


SIM_INSTRUMENTS: Final = {
    "BTC": Instrument("BTC", 1.0, 0.00001, 10.0, 100_000.0),
    "ETH": Instrument("ETH", 0.1, 0.0001, 10.0, 3_500.0),
    "SOL": Instrument("SOL", 0.01, 0.01, 10.0, 200.0),
    "DOGE": Instrument("DOGE", 0.00001, 1.0, 10.0, 0.35),
}


def instrument(name: str) -> Instrument:
    """Return the rules of a symbol, with generic ones for symbols we do not know."""
    return SIM_INSTRUMENTS.get(name) or Instrument(name, 0.01, 0.001, 10.0, 100.0)
