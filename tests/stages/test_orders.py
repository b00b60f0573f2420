"""The struct packers of ORDER and ORDER_EVENT agree with the numpy dtypes, field by field."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from shm import schema
from stages.orders import (
    EVENT_STRUCT,
    ORDER_STRUCT,
    Event,
    Order,
    pack_event,
    pack_order,
    unpack_event,
    unpack_order,
)

U64 = (1 << 64) - 1
U32 = (1 << 32) - 1
I64_MIN, I64_MAX = -(1 << 63), (1 << 63) - 1
TRACE = ("exch_ns", "recv_ns", "ingest_ns", "feature_ns", "inference_ns", "route_ns")


def random_order(rng: random.Random) -> dict[str, object]:
    return {
        "order_id": rng.choice([0, 1, U64, rng.randrange(U64)]),
        "symbol_id": rng.choice([0, U32, rng.randrange(U32)]),
        "action": rng.choice([schema.ACTION_NEW, schema.ACTION_CANCEL, 255]),
        "style": rng.choice([*schema.STYLE_NAMES, 0, 255]),
        "tif": rng.choice([schema.TIF_IOC, schema.TIF_GTC, schema.TIF_POST_ONLY, 0, 255]),
        "side": rng.choice([schema.SIDE_BUY, schema.SIDE_SELL, 0, -(1 << 31), (1 << 31) - 1]),
        "px": rng.choice([rng.uniform(1e-8, 1e9), -1.5, 0.0, math.inf, 5e-324]),
        "qty": rng.uniform(0, 1e6),
        "edge_bps": rng.uniform(-100, 100),
        "trace": tuple(
            rng.choice([I64_MIN, I64_MAX, 0, rng.randrange(I64_MIN, I64_MAX)]) for _ in TRACE
        ),
    }


def random_event(rng: random.Random) -> dict[str, object]:
    return {
        "order_id": rng.choice([0, U64, rng.randrange(U64)]),
        "symbol_id": rng.choice([0, U32, rng.randrange(U32)]),
        "kind": rng.choice(
            [
                schema.EV_ACK,
                schema.EV_REJECT,
                schema.EV_FILL,
                schema.EV_CANCELED,
                schema.EV_EXPIRED,
                255,
            ]
        ),
        "side": rng.choice([1, -1, 0, -(1 << 31), (1 << 31) - 1]),
        "ts_ns": rng.choice([I64_MIN, I64_MAX, rng.randrange(I64_MIN, I64_MAX)]),
        "recv_ns": rng.choice([I64_MIN, I64_MAX, rng.randrange(I64_MIN, I64_MAX)]),
        "liquidity": rng.choice([0, schema.LIQ_MAKER, schema.LIQ_TAKER, 255]),
        "reason": rng.choice([*schema.REJECT_CODE.values(), 65535]),
        "px": rng.uniform(-1e9, 1e9),
        "qty": rng.uniform(0, 1e6),
        "leaves_qty": rng.uniform(0, 1e6),
        "fee": rng.uniform(-10, 10),
    }


def test_struct_sizes_match_dtypes() -> None:
    assert ORDER_STRUCT.size == schema.ORDER.itemsize
    assert EVENT_STRUCT.size == schema.ORDER_EVENT.itemsize


@pytest.mark.parametrize("seed", range(5))
def test_pack_order_equals_numpy_view(seed: int) -> None:
    rng = random.Random(seed)
    buf = bytearray(ORDER_STRUCT.size)
    for _ in range(200):
        f = random_order(rng)
        pack_order(buf, **f)  # type: ignore[arg-type]
        rec = np.frombuffer(bytes(buf), schema.ORDER)[0]
        for name in ("order_id", "symbol_id", "action", "style", "tif", "side"):
            assert int(rec[name]) == f[name], name
        for name in ("px", "qty", "edge_bps"):
            assert float(rec[name]) == f[name], name
        for name, v in zip(TRACE, f["trace"], strict=True):  # type: ignore[call-overload]
            assert int(rec[name]) == v, name
        assert rec["_pad0"] == 0 and rec["_pad1"] == 0
        # and the same record the other way round: numpy bytes -> unpack_order
        arr = np.zeros(1, schema.ORDER)
        arr[0] = rec
        assert unpack_order(arr.tobytes()) == Order(*arr.tolist()[0])
        assert unpack_order(buf) == Order(*rec.tolist())


@pytest.mark.parametrize("seed", range(5))
def test_pack_event_equals_numpy_view(seed: int) -> None:
    rng = random.Random(100 + seed)
    buf = bytearray(EVENT_STRUCT.size)
    for _ in range(200):
        f = random_event(rng)
        pack_event(buf, **f)  # type: ignore[arg-type]
        rec = np.frombuffer(bytes(buf), schema.ORDER_EVENT)[0]
        for name in (
            "order_id",
            "symbol_id",
            "kind",
            "side",
            "ts_ns",
            "recv_ns",
            "liquidity",
            "reason",
        ):
            assert int(rec[name]) == f[name], name
        for name in ("px", "qty", "leaves_qty", "fee"):
            assert float(rec[name]) == f[name], name
        assert rec["_pad"] == 0
        assert unpack_event(buf) == Event(*rec.tolist())
        assert unpack_event(memoryview(buf)) == unpack_event(bytes(buf))


def test_pack_event_defaults_are_zero() -> None:
    buf = bytearray(b"\xff" * EVENT_STRUCT.size)
    pack_event(buf, order_id=7, symbol_id=3, kind=schema.EV_ACK, side=-1, ts_ns=99)
    rec = np.frombuffer(bytes(buf), schema.ORDER_EVENT)[0]
    assert (int(rec["order_id"]), int(rec["symbol_id"]), int(rec["kind"])) == (7, 3, schema.EV_ACK)
    assert (int(rec["side"]), int(rec["ts_ns"])) == (-1, 99)
    for name in ("recv_ns", "liquidity", "reason", "_pad"):
        assert rec[name] == 0, name
    for name in ("px", "qty", "leaves_qty", "fee"):
        assert rec[name] == 0.0, name


def test_nan_price_survives_the_round_trip() -> None:
    buf = bytearray(ORDER_STRUCT.size)
    pack_order(
        buf,
        order_id=1,
        symbol_id=0,
        action=schema.ACTION_NEW,
        style=schema.STYLE_TAKER_NOW,
        tif=schema.TIF_IOC,
        side=1,
        px=math.nan,
        qty=1.0,
        edge_bps=3.0,
        trace=(1, 2, 3, 4, 5, 6),
    )
    rec = np.frombuffer(bytes(buf), schema.ORDER)[0]
    assert math.isnan(rec["px"])
    o = unpack_order(buf)
    assert math.isnan(o.px)
    assert (o.exch_ns, o.recv_ns, o.ingest_ns, o.feature_ns, o.inference_ns, o.route_ns) == (
        1,
        2,
        3,
        4,
        5,
        6,
    )


def test_packed_orders_read_back_from_a_numpy_array() -> None:
    """Several packed records laid end to end read back as an ORDER array (the ring's view)."""
    rng = random.Random(9)
    buf = bytearray(ORDER_STRUCT.size)
    blob = bytearray()
    fields = [random_order(rng) for _ in range(16)]
    for f in fields:
        blob += pack_order(buf, **f)  # type: ignore[arg-type]
    arr = np.frombuffer(bytes(blob), schema.ORDER)
    assert len(arr) == 16
    assert arr["order_id"].tolist() == [f["order_id"] for f in fields]
    assert arr["side"].tolist() == [f["side"] for f in fields]
    assert arr["route_ns"].tolist() == [f["trace"][-1] for f in fields]  # type: ignore[index]
    # Order(*tolist()) — how the risk stage reads a batch — names every field right
    for rec, f in zip(arr.tolist(), fields, strict=True):
        o = Order(*rec)
        assert (o.order_id, o.symbol_id, o.action, o.style, o.tif, o.side) == (
            f["order_id"],
            f["symbol_id"],
            f["action"],
            f["style"],
            f["tif"],
            f["side"],
        )
        assert (o.px, o.qty, o.edge_bps) == (f["px"], f["qty"], f["edge_bps"])
        assert (o.exch_ns, o.recv_ns, o.ingest_ns, o.feature_ns, o.inference_ns, o.route_ns) == f[
            "trace"
        ]
