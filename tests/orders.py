"""Order and event helpers shared by the risk and paper-exchange tests."""

from __future__ import annotations

from typing import Any, NamedTuple

from shm import schema
from stages.orders import Order


def order(**kw: Any) -> Order:
    """A post-only buy of 1 @ 100 in symbol 0 (id 1), with any field replaced by ``kw``."""
    base: dict[str, Any] = {
        "order_id": 1,
        "symbol_id": 0,
        "action": schema.ACTION_NEW,
        "style": schema.STYLE_MAKER_PASSIVE,
        "tif": schema.TIF_POST_ONLY,
        "pad0": 0,
        "side": schema.SIDE_BUY,
        "pad1": 0,
        "px": 100.0,
        "qty": 1.0,
        "edge_bps": 6.0,
        "exch_ns": 0,
        "recv_ns": 0,
        "ingest_ns": 0,
        "feature_ns": 0,
        "inference_ns": 0,
        "route_ns": 0,
    }
    base.update(kw)
    return Order(**base)


class Ev(NamedTuple):
    """A paper-exchange ``EventTuple`` with names."""

    order_id: int
    symbol_id: int
    kind: int
    side: int
    px: float
    qty: float
    leaves: float
    fee: float
    liquidity: int
    reason: int
    recv_ns: int
