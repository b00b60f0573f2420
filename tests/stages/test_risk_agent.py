"""The risk stage over real rings: orders in, fills out, and a restart that neither loses nor
repeats an order."""

from __future__ import annotations

import uuid

import numpy as np
import pytest

from shm import ring, schema, segment
from stages import config
from stages.instruments import Instrument
from stages.orders import ORDER_STRUCT, pack_order
from stages.risk import RiskAgent
from stages.wiring import Engine


@pytest.fixture
def eng():
    ns = f"t{uuid.uuid4().hex[:10]}"
    e = Engine.create(config.from_dict({"engine": {"namespace": ns}}))
    e.symbols[0] = Instrument("BTC", 1.0, 0.00001, 10.0).row()
    yield e
    segment.unlink_all(ns)


def book(bid: float, ask: float, size: float = 1.0) -> np.ndarray:
    b = np.zeros(1, schema.BOOK)
    b["symbol_id"] = 0
    b["n_bid"] = b["n_ask"] = 3
    b["bid_px"][0, :3] = [bid, bid - 1, bid - 2]
    b["ask_px"][0, :3] = [ask, ask + 1, ask + 2]
    b["bid_sz"][0, :3] = size
    b["ask_sz"][0, :3] = size
    return b


def send_order(
    eng: Engine, oid: int, *, side: int, qty: float, px: float, tif: int = schema.TIF_IOC
) -> None:
    buf = bytearray(ORDER_STRUCT.size)
    pack_order(
        buf,
        order_id=oid,
        symbol_id=0,
        action=schema.ACTION_NEW,
        style=schema.STYLE_TAKER_NOW,
        tif=tif,
        side=side,
        px=px,
        qty=qty,
        edge_bps=10.0,
        trace=(0, 1, 2, 3, 4, 5),
    )
    assert eng.writer("orders").offer(buf)


def events(eng: Engine) -> np.ndarray:
    r = eng.reader("events", "route")
    out = np.zeros(64, schema.ORDER_EVENT)
    n = r.read_into(out)
    return out[:n]


def test_taker_order_fills_against_the_published_book(eng):
    cfg = config.from_dict({})
    agent = RiskAgent(cfg, eng, eng.stage_stats("risk"))
    eng.writer("md_book").offer_array(book(100.0, 101.0, size=0.5))
    send_order(eng, 10, side=1, qty=0.8, px=102.0)
    assert agent.do_work() > 0
    ev = events(eng)
    fills = ev[ev["kind"] == schema.EV_FILL]
    assert fills["px"].tolist() == [101.0, 102.0]
    assert fills["qty"].tolist() == pytest.approx([0.5, 0.3])
    assert eng.stats_all[schema.ROLE_INDEX["risk"]]["ints"][schema.C_ORDERS] == 1
    agent.on_close()
    assert eng.positions["qty"][0] == pytest.approx(0.8)


def test_an_order_read_again_after_a_restart_is_not_executed_twice(eng):
    cfg = config.from_dict({})
    agent = RiskAgent(cfg, eng, eng.stage_stats("risk"))
    eng.writer("md_book").offer_array(book(100.0, 101.0, size=5.0))
    send_order(eng, 10, side=1, qty=1.0, px=102.0)
    agent.do_work()
    agent.on_close()
    first = events(eng)
    assert (first["kind"] == schema.EV_FILL).sum() == 1
    # the stage died after acting on the order but before its read cursor was published
    rewind = eng.reader("orders", "risk")
    rewind._line[ring.R_CURSOR] = 0
    restarted = RiskAgent(cfg, eng, eng.stage_stats("risk"))
    assert restarted.positions.qty[0] == pytest.approx(1.0), (
        "positions come back from shared memory"
    )
    restarted.do_work()
    assert len(events(eng)) == 0, "the order must not be executed a second time"
    ints = eng.stats_all[schema.ROLE_INDEX["risk"]]["ints"]
    assert ints[schema.C_DUPLICATES] == 1
    # and a new order after the restart is executed (against a book it has seen since)
    eng.writer("md_book").offer_array(book(100.0, 101.0, size=5.0))
    send_order(eng, 11, side=-1, qty=1.0, px=99.0)
    restarted.do_work()
    assert (events(eng)["kind"] == schema.EV_FILL).sum() == 1
    restarted.on_close()
    assert eng.positions["qty"][0] == pytest.approx(0.0)
