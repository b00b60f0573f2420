"""Single ORDER and ORDER_EVENT records as bytes, for the one-record-at-a-time paths.

Packing a record with ``struct`` costs well under a microsecond; filling a numpy structured
scalar field by field costs several. The struct formats mirror the dtypes in
``shm.schema`` and are checked against them at import.
"""

from __future__ import annotations

import struct
from typing import Final, NamedTuple

from shm import schema

ORDER_STRUCT: Final = struct.Struct("<QIBBBxiIddd6q")
EVENT_STRUCT: Final = struct.Struct("<QIBBHiIddddqq")
assert ORDER_STRUCT.size == schema.ORDER.itemsize
assert EVENT_STRUCT.size == schema.ORDER_EVENT.itemsize


class Order(NamedTuple):
    """One order as the tuple ``ndarray.tolist()`` yields for an ORDER record."""

    order_id: int
    symbol_id: int
    action: int
    style: int
    tif: int
    pad0: int
    side: int
    pad1: int
    px: float
    qty: float
    edge_bps: float
    exch_ns: int
    recv_ns: int
    ingest_ns: int
    feature_ns: int
    inference_ns: int
    route_ns: int


class Event(NamedTuple):
    """One order event as ``ndarray.tolist()`` yields it for an ORDER_EVENT record."""

    order_id: int
    symbol_id: int
    kind: int
    liquidity: int
    reason: int
    side: int
    pad: int
    px: float
    qty: float
    leaves_qty: float
    fee: float
    ts_ns: int
    recv_ns: int


def pack_order(
    buf: bytearray,
    *,
    order_id: int,
    symbol_id: int,
    action: int,
    style: int,
    tif: int,
    side: int,
    px: float,
    qty: float,
    edge_bps: float,
    trace: tuple[int, int, int, int, int, int],
) -> bytearray:
    """Pack an ORDER record into ``buf`` and return it."""
    ORDER_STRUCT.pack_into(
        buf, 0, order_id, symbol_id, action, style, tif, side, 0, px, qty, edge_bps, *trace
    )
    return buf


def pack_event(
    buf: bytearray,
    *,
    order_id: int,
    symbol_id: int,
    kind: int,
    side: int,
    ts_ns: int,
    recv_ns: int = 0,
    liquidity: int = 0,
    reason: int = 0,
    px: float = 0.0,
    qty: float = 0.0,
    leaves_qty: float = 0.0,
    fee: float = 0.0,
) -> bytearray:
    """Pack an ORDER_EVENT record into ``buf`` and return it."""
    EVENT_STRUCT.pack_into(
        buf,
        0,
        order_id,
        symbol_id,
        kind,
        liquidity,
        reason,
        side,
        0,
        px,
        qty,
        leaves_qty,
        fee,
        ts_ns,
        recv_ns,
    )
    return buf


def unpack_event(raw: bytes | bytearray | memoryview) -> Event:
    return Event(*EVENT_STRUCT.unpack_from(raw, 0))


def unpack_order(raw: bytes | bytearray | memoryview) -> Order:
    o = ORDER_STRUCT.unpack_from(raw, 0)
    return Order(o[0], o[1], o[2], o[3], o[4], 0, o[5], o[6], *o[7:])
