"""Test helper: book records built from (price, size) levels."""

from __future__ import annotations

import numpy as np

from shm import schema

Levels = list[tuple[float, float]]


def make_book(
    bids: Levels,
    asks: Levels,
    *,
    symbol_id: int = 0,
    recv_ns: int = 0,
    flags: int = schema.BOOK_SNAPSHOT,
    seq: int = 0,
) -> np.ndarray:
    """One BOOK record (as a length-1 array) from (px, sz) levels, best first."""
    rec = np.zeros(1, schema.BOOK)
    rec["symbol_id"] = symbol_id
    rec["flags"] = flags
    rec["seq"] = seq
    rec["exch_ns"] = recv_ns + 7
    rec["recv_ns"] = recv_ns
    rec["ingest_ns"] = recv_ns + 11
    rec["n_bid"] = len(bids)
    rec["n_ask"] = len(asks)
    for i, (px, sz) in enumerate(bids):
        rec["bid_px"][0, i] = px
        rec["bid_sz"][0, i] = sz
    for i, (px, sz) in enumerate(asks):
        rec["ask_px"][0, i] = px
        rec["ask_sz"][0, i] = sz
    return rec
