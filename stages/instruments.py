"""Instrument rules (tick, lot, minimum notional, price precision) and the symbol table rows.

The embedded simulator uses the rules in ``SIM_INSTRUMENTS``; venue feeds replace them with the
venue's own (Binance ``exchangeInfo`` filters, Hyperliquid ``szDecimals`` and its
significant-figure rule, see ``stages.venues.symbols``). ``tick_at`` is the one place that
knows a price's increment, so route and the paper exchange round alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

import numpy as np

from shm import schema


@dataclass(frozen=True, slots=True)
class Instrument:
    name: str  # engine name: what config, metrics and logs use ("BTC")
    tick_size: float  # finest price increment
    lot_size: float
    min_notional: float
    start_px: float = 100.0  # the simulator's opening price
    venue: str = "sim"
    venue_symbol: str = ""  # the venue's name ("BTCUSDT"); empty means the same as name
    px_sig_figs: int = 0  # > 0: at most this many significant figures (Hyperliquid: 5)
    px_max_decimals: int = 0  # with px_sig_figs: at most this many decimals

    @property
    def wire_name(self) -> str:
        return self.venue_symbol or self.name

    def row(self) -> tuple[object, ...]:
        """This instrument as a ``schema.SYMBOL`` record (active)."""
        return (
            self.name.encode(),
            self.venue.encode(),
            self.wire_name.encode(),
            self.tick_size,
            self.lot_size,
            self.min_notional,
            self.px_sig_figs,
            self.px_max_decimals,
            1,
            0,
        )

    @classmethod
    def from_row(cls, rec: np.void) -> Instrument:
        return cls(
            name=bytes(rec["name"]).decode(),
            tick_size=float(rec["tick_size"]),
            lot_size=float(rec["lot_size"]),
            min_notional=float(rec["min_notional"]),
            venue=bytes(rec["venue"]).decode(),
            venue_symbol=bytes(rec["venue_symbol"]).decode(),
            px_sig_figs=int(rec["px_sig_figs"]),
            px_max_decimals=int(rec["px_max_decimals"]),
        )


def tick_at(px: float, tick_size: float, sig_figs: int = 0, max_decimals: int = 0) -> float:
    """Return the price increment that applies at ``px``.

    Without a significant-figure rule it is ``tick_size``. With one (Hyperliquid perps: at
    most 5 significant figures and at most ``6 - szDecimals`` decimals, integers always
    allowed) it is ``10**(floor(log10(px)) + 1 - sig_figs)``, no finer than
    ``10**-max_decimals`` and no coarser than 1.
    """
    if sig_figs <= 0 or not px > 0.0 or not math.isfinite(px):
        return tick_size
    step = 10.0 ** (math.floor(math.log10(px)) + 1 - sig_figs)
    return min(max(step, 10.0**-max_decimals, tick_size), 1.0)


SIM_INSTRUMENTS: Final = {
    "BTC": Instrument("BTC", 1.0, 0.00001, 10.0, 100_000.0),
    "ETH": Instrument("ETH", 0.1, 0.0001, 10.0, 3_500.0),
    "SOL": Instrument("SOL", 0.01, 0.01, 10.0, 200.0),
    "DOGE": Instrument("DOGE", 0.00001, 1.0, 10.0, 0.35),
}


def instrument(name: str) -> Instrument:
    """Return the simulator's rules of a symbol, with generic ones for symbols we do not know."""
    return SIM_INSTRUMENTS.get(name) or Instrument(name, 0.01, 0.001, 10.0, 100.0)


def fill_symbol_table(table: np.ndarray, instruments: list[Instrument]) -> None:
    """Write the symbol table: row i is symbol id i; rows past the list are inactive."""
    if len(instruments) > len(table):
        raise ValueError(f"{len(instruments)} symbols, the table holds {len(table)}")
    table[:] = np.zeros(len(table), schema.SYMBOL)
    for i, ins in enumerate(instruments):
        table[i] = ins.row()


def read_symbol_table(table: np.ndarray) -> dict[int, Instrument]:
    """Return symbol id -> instrument for every active row."""
    return {i: Instrument.from_row(rec) for i, rec in enumerate(table) if rec["active"]}
