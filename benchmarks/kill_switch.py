"""Kill-switch benchmark: from the trigger to every order cancelled and new ones refused.

The real risk stage runs as its own process (``python -m stages risk``, pinned, default idle
strategy) on an engine this benchmark creates: one symbol with a deep book, ``N`` post-only
bids resting behind the touch (each acknowledged). Then, per round:

- the kill switch is thrown the way ``hft kill`` throws it (the control block's kill field,
  then the risk stage's doorbell), at ``t0``;
- ``kill_switch_us``: ``t0`` until the ``N``-th ``EV_CANCELED`` is read from the events ring
  (as the route stage reads it), i.e. every resting order is cancelled at the venue;
- ``blocked_us``: a new order sent right after is answered ``EV_REJECT`` (``kill_switch``):
  from its send to the reject, the proof that new orders are refused;
- the switch is reset and the bids placed again.

Peers in the same run: ``order_ack_us``, one new order's round trip to its ``EV_ACK`` through
the same stage (the cost of any request to the risk stage), and ``check_us``, the risk stage's
pre-trade check of one order in process (``RiskChecks.check``), its per-order check cost.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Final

import numpy as np

from shm import schema, segment
from shm.idle import wake
from stages import config
from stages.instruments import Instrument
from stages.orders import ORDER_STRUCT, Order, pack_order
from stages.wiring import CTL_KILL, Engine, bell_id

ROOT: Final = Path(__file__).resolve().parents[1]
N_RESTING: Final = 20
BID: Final = 100_000.0


def _book() -> np.ndarray:
    b = np.zeros(1, schema.BOOK)
    b["symbol_id"] = 0
    b["n_bid"] = b["n_ask"] = schema.BOOK_DEPTH
    b["bid_px"][0] = BID - np.arange(schema.BOOK_DEPTH)
    b["ask_px"][0] = BID + 1 + np.arange(schema.BOOK_DEPTH)
    b["bid_sz"][0] = 5.0
    b["ask_sz"][0] = 5.0
    b["exch_ns"] = time.time_ns()
    b["recv_ns"] = b["ingest_ns"] = time.monotonic_ns()
    return b


class _Rejected(RuntimeError):
    def __init__(self, order_id: int, reason: str) -> None:
        super().__init__(f"order {order_id} rejected: {reason}")
        self.reason = reason


class _Client:
    """What the route stage does, by hand: orders in, events out."""

    def __init__(self, eng: Engine) -> None:
        self.eng = eng
        self.orders = eng.writer("orders")
        self.events = eng.reader("events", "route")
        self.buf = bytearray(ORDER_STRUCT.size)
        self.ev = np.zeros(256, schema.ORDER_EVENT)
        self.next_id = 1

    def send(self, *, px: float, action: int = schema.ACTION_NEW, oid: int = 0) -> int:
        oid = oid or self.next_id
        self.next_id = max(self.next_id, oid + 1)
        t = time.monotonic_ns()
        pack_order(
            self.buf,
            order_id=oid,
            symbol_id=0,
            action=action,
            style=schema.STYLE_MAKER_PASSIVE,
            tif=schema.TIF_POST_ONLY,
            side=schema.SIDE_BUY,
            px=px,
            qty=0.001,
            edge_bps=10.0,
            trace=(0, t, t, t, t, t),
        )
        while not self.orders.offer(self.buf):
            time.sleep(1e-4)
        return oid

    def wait(self, kind: int, ids: set[int], timeout_s: float = 10.0) -> int:
        """Busy-read events until every id in ``ids`` got ``kind``; return the time (ns)."""
        left = set(ids)
        deadline = time.monotonic() + timeout_s
        while left:
            n = self.events.read_into(self.ev)
            for e in self.ev[:n]:
                if int(e["kind"]) == kind:
                    left.discard(int(e["order_id"]))
                elif int(e["kind"]) == schema.EV_REJECT and int(e["order_id"]) in left:
                    code = int(e["reason"])
                    raise _Rejected(int(e["order_id"]), schema.REJECT_REASONS[code])
            if left and time.monotonic() > deadline:
                raise RuntimeError(f"timed out waiting for {len(left)} events of kind {kind}")
        return time.monotonic_ns()


def _pcts(ns: list[int]) -> dict[str, float]:
    a = np.asarray(ns, dtype=np.float64) / 1e3
    return {"p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99))}


def _check_cost(rounds: int) -> dict[str, float]:
    """The pre-trade check of one order, in process, on a state like the benchmark's."""
    from stages.paper import PaperExchange
    from stages.riskengine import Positions, RiskChecks

    cfg = config.from_dict({}).risk
    ex = PaperExchange(taker_fee_bps=cfg.taker_fee_bps, maker_fee_bps=cfg.maker_fee_bps)
    ex.on_book(_book()[0], [])
    checks = RiskChecks(cfg, ex, Positions())
    o = Order(
        order_id=1,
        symbol_id=0,
        action=schema.ACTION_NEW,
        style=schema.STYLE_MAKER_PASSIVE,
        tif=schema.TIF_POST_ONLY,
        pad0=0,
        side=schema.SIDE_BUY,
        pad1=0,
        px=BID - 5,
        qty=0.001,
        edge_bps=10.0,
        exch_ns=0,
        recv_ns=0,
        ingest_ns=0,
        feature_ns=0,
        inference_ns=0,
        route_ns=0,
    )
    perf = time.perf_counter_ns
    ns = []
    for _ in range(rounds):
        a = perf()
        code = checks.check(o, draining=False, kill=0, state=schema.CTRL_RUNNING)
        ns.append(perf() - a)
    if code != 0:
        raise RuntimeError(f"the benchmark's order is rejected by the check: {code}")
    return _pcts(ns)


def run(*, quick: bool) -> dict[str, Any]:
    rounds = 20 if quick else 200
    ns = f"bk{uuid.uuid4().hex[:8]}"
    tmp = Path(tempfile.mkdtemp(prefix="hft-kill-"))
    cfg_path = tmp / "engine.toml"
    cfg_path.write_text(
        f'[engine]\nnamespace = "{ns}"\n'
        "[risk]\nmax_orders_per_s = 1000000\n"  # the rate limiter is not what is measured
        f'[paper]\njournal_path = "{tmp}/journal.sqlite"\n'
    )
    eng = Engine.create(config.load(cfg_path))
    proc = None
    log = open(tmp / "risk.log", "w")  # noqa: SIM115
    try:
        eng.symbols[0] = Instrument("BTC", 1.0, 0.001, 10.0).row()
        eng.writer("md_book").offer_array(_book())
        proc = subprocess.Popen(
            [sys.executable, "-m", "stages", "risk", "--config", str(cfg_path)],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
        client = _Client(eng)
        # warm up: the stage is up when it answers (an order that waited for its start is
        # refused as stale: send another)
        for _ in range(100):
            try:
                client.wait(schema.EV_ACK, {client.send(px=BID - 50)}, timeout_s=60)
                break
            except _Rejected as e:
                if e.reason != "stale_order":
                    raise
        else:
            raise RuntimeError("the risk stage refused every warm-up order as stale")
        ack: list[int] = []
        for _ in range(rounds):
            t = time.monotonic_ns()
            oid = client.send(px=BID - 50)
            done = client.wait(schema.EV_ACK, {oid})
            ack.append(done - t)
            # take it away again: resting orders count toward the notional limits
            client.send(px=BID - 50, action=schema.ACTION_CANCEL, oid=oid)
            client.wait(schema.EV_CANCELED, {oid})
        kill: list[int] = []
        blocked: list[int] = []
        ctl = eng.control
        bell = bell_id("risk")
        for _ in range(rounds):
            ids = {client.send(px=BID - 10 - i) for i in range(N_RESTING)}
            client.wait(schema.EV_ACK, ids)
            t0 = time.monotonic_ns()
            ctl[CTL_KILL] = 1
            wake(ns, bell)
            kill.append(client.wait(schema.EV_CANCELED, ids) - t0)
            t1 = time.monotonic_ns()
            oid = client.send(px=BID - 10)
            blocked.append(_wait_reject(client, oid) - t1)
            ctl[CTL_KILL] = 0
            wake(ns, bell)
            time.sleep(0.002)  # let the stage see the reset before the next round
        res: dict[str, Any] = {
            "resting_orders": N_RESTING,
            "rounds": rounds,
            "kill_switch_us": _pcts(kill),
            "blocked_us": _pcts(blocked),
            "order_ack_us": _pcts(ack),
            "check_us": _check_cost(20_000 if quick else 200_000),
        }
        res["kill_over_ack_p50"] = res["kill_switch_us"]["p50"] / res["order_ack_us"]["p50"]
        return res
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()
        segment.unlink_all(ns)
        shutil.rmtree(tmp, ignore_errors=True)


def _wait_reject(client: _Client, oid: int, timeout_s: float = 10.0) -> int:
    deadline = time.monotonic() + timeout_s
    while True:
        n = client.events.read_into(client.ev)
        for e in client.ev[:n]:
            if int(e["order_id"]) == oid:
                if int(e["kind"]) != schema.EV_REJECT:
                    raise RuntimeError(f"order {oid} sent while killed got event {int(e['kind'])}")
                return time.monotonic_ns()
        if time.monotonic() > deadline:
            raise RuntimeError(f"no answer to order {oid} while killed")


if __name__ == "__main__":
    import json

    print(json.dumps(run(quick="--quick" in sys.argv), indent=1))
    os._exit(0)
