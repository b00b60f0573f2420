"""kill -9 of the risk stage in the real supervised engine: it comes back with the positions
and open orders it had, rebuilt from its journal, and carries on without losing or doubling
anything.

How "identical" is observed from outside the risk process
---------------------------------------------------------
The market keeps moving while the stage dies and comes back, and resting orders may fill at
any moment (that is legitimate, before the kill and after the restart). So the states are
compared at instants where they are fixed, and each comparison uses a different witness:

1. Before the kill. Once the stage holds a position and resting orders, route is frozen
   (SIGSTOP: no new order, no cancel) and the engine paused (``CTL_STATE``: nothing new for
   the restarted stage either); after 0.2 s for what was on its way, the risk process is
   frozen with SIGSTOP, so what it published in shared memory is exactly what it had: its
   POSITION rows (quantity, average price, realised, fees, fills, open orders per symbol).
   Then SIGKILL, and route runs on (its cancels wait in the ring for the new stage).
2. The dead process's journal. The journal is exclusively locked while a risk stage runs;
   the kill releases it, and the supervisor restarts the stage only after
   ``restart_backoff_ms`` (2 s here). In that window the test opens the journal read-only and
   rebuilds positions with the same ``Positions`` class: they must equal the frozen shared
   memory of step 1 bit for bit (the journal holds what the process had acted on), and its
   open orders per symbol the frozen open-order counts.
3. The restart instant. The restarted stage logs its rebuilt state in one line ("state
   rebuilt from the journal") before it reads any market data: every position and every
   open order (id, symbol, side, price, remaining quantity) and what it did with it. Both
   must equal step 2's: same positions, the same open orders, each put back into the new
   paper exchange ("restored"), none lost, none added.
4. After the restart. Trading carries on; then a clean stop drains (cancels every order the
   new paper exchange holds). In the final journal every order that was open at the kill is
   closed, after the restart instant: a cancel is only ever confirmed for an order the new
   exchange actually held (for any other it answers ``unknown_order``, which closes nothing
   in the journal), and a fill only comes from an order it held. So every pre-kill open
   order was live in the restarted stage. Finally the positions the restarted stage left in
   shared memory at its clean stop equal a rebuild of the final journal: nothing was applied
   twice (a stage that had reloaded shared memory *and* replayed the journal would show
   doubled positions) and nothing was lost.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path

import orjson
import pytest
from test_pipeline import attach, counter, start, wait_for, write_config  # tests/integration

from shm import schema, segment
from stages import journal as jr
from stages.journal import Journal
from stages.risk import rebuild_positions
from stages.wiring import CTL_PID, CTL_RESTARTS, CTL_STATE

pytestmark = pytest.mark.integration

RISK = schema.ROLE_INDEX["risk"]


@pytest.fixture
def ns():
    name = f"rc{uuid.uuid4().hex[:8]}"
    yield name
    segment.unlink_all(name)


COLS = ("qty", "avg_px", "realized", "fees", "fills")


def shm_positions(eng) -> dict[int, tuple[float, ...]]:
    """Symbols with fills: (qty, avg_px, realized incl. funding, fees, fills)."""
    rows = eng.positions[list(COLS)].tolist()
    return {s: tuple(r) for s, r in enumerate(rows) if r[4]}


def journal_positions(pos) -> dict[int, tuple[float, ...]]:
    return {
        s: (pos.qty[s], pos.avg_px[s], pos.realized[s] + pos.funding[s], pos.fees[s], pos.fills[s])
        for s in range(pos.n)
        if pos.fills[s]
    }


def rebuilt_lines(log: Path) -> list[dict]:
    return [
        doc
        for doc in (
            orjson.loads(line) for line in log.read_bytes().splitlines() if line[:1] == b"{"
        )
        if doc.get("msg") == "state rebuilt from the journal"
    ]


def trading_state(eng) -> bool:
    """Fills done, a position held and orders resting: the state worth killing."""
    p = eng.positions
    return bool(
        counter(eng, "risk", schema.C_FILLS) > 0
        and (p["qty"] != 0).any()
        and p["open_orders"].sum() > 0
    )


def test_kill_9_risk_comes_back_with_identical_positions_and_open_orders(tmp_path: Path, ns: str):
    journal = tmp_path / "journal" / "risk.sqlite"
    cfg_path = write_config(
        tmp_path,
        ns,
        # trade often, and let maker orders rest: a long life, no repricing
        gate={"min_edge_bps": 1.0, "min_confidence": 0.0},
        route={"order_ttl_ms": 120_000, "reprice_away_bps": 10_000.0},
        paper={"journal_path": str(journal)},
        ops={"restart_backoff_ms": 2_000},  # the window in which the test reads the journal
    )
    proc = start(cfg_path, tmp_path)
    stopped: set[int] = set()
    try:
        eng = wait_for(lambda: attach(ns), 30, "the engine's segments", proc)

        # 1. freeze the order flow (route stopped: no new order, no cancel; the engine
        # paused so the restarted stage gets no new order either), let what is on its way
        # settle, freeze the risk stage, snapshot what it published, kill it
        deadline = time.monotonic() + 150
        while True:  # resting orders live for a second or so: catch a moment with some
            left = deadline - time.monotonic()
            assert left > 0, "never caught the stage with resting orders"
            wait_for(lambda: trading_state(eng), left, "a position and resting orders", proc)
            # read only now: 0 before the stage registered, and os.kill(0, ...) would stop
            # this whole process group (pytest included)
            route = int(eng.control[CTL_PID + schema.ROLE_INDEX["route"]])
            assert route > 0
            os.kill(route, signal.SIGSTOP)
            stopped.add(route)
            eng.control[CTL_STATE] = schema.CTRL_PAUSED
            time.sleep(0.1)  # orders reach the book in 1 ms; the periodic save runs every 50 ms
            if eng.positions["open_orders"].sum() > 0:
                break
            eng.control[CTL_STATE] = schema.CTRL_RUNNING  # they filled meanwhile: again
            os.kill(route, signal.SIGCONT)
            stopped.discard(route)
        victim = int(eng.control[CTL_PID + RISK])
        os.kill(victim, signal.SIGSTOP)
        try:
            frozen = shm_positions(eng)
            frozen_open = {s: n for s, n in enumerate(eng.positions["open_orders"].tolist()) if n}
        finally:
            os.kill(victim, signal.SIGKILL)
            os.kill(route, signal.SIGCONT)  # its cancels queue up for the restarted stage
            stopped.discard(route)
        wait_for(lambda: not segment.pid_alive(victim), 10, "the risk stage gone", proc)
        killed_ns = time.time_ns()

        # 2. the journal the dead process left, read-only, before the supervisor restarts it
        with Journal.read_only(journal) as j:
            pos, rec = rebuild_positions(j)
        assert int(eng.control[CTL_PID + RISK]) == victim, "read before the restart"
        assert frozen, "a position to recover"
        assert journal_positions(pos) == frozen, "the journal holds what the process had"
        open_by_symbol: dict[int, int] = {}
        for o in rec.open_orders:
            open_by_symbol[o.symbol_id] = open_by_symbol.get(o.symbol_id, 0) + 1
        assert open_by_symbol == frozen_open
        assert rec.open_orders, "open orders to recover"
        assert all(o.tif != schema.TIF_IOC for o in rec.open_orders), "nothing in flight"

        # 3. the restart instant: the state the new stage rebuilt before any market data
        new_pid = wait_for(
            lambda: (
                int(eng.control[CTL_PID + RISK]) not in (0, victim)
                and int(eng.control[CTL_PID + RISK])
            ),
            30,
            "risk restarted",
            proc,
        )
        assert int(eng.control[CTL_RESTARTS + RISK]) == 1
        log = tmp_path / "logs" / "risk.log"
        lines = wait_for(lambda: len(rebuilt_lines(log)) == 2 and rebuilt_lines(log), 30, "the log")
        first, restart = lines
        assert first["fills"] == 0 and first["open_orders"] == [], "a fresh journal at start"
        assert restart["fills"] == rec.n_fills and restart["orders"] == rec.n_orders
        assert {row[0]: tuple(row[1:]) for row in restart["positions"]} == {
            s: tuple(pos.row(s)[1:]) for s in range(pos.n) if pos.fills[s] or pos.funding[s]
        }
        assert [row[:5] for row in restart["open_orders"]] == [
            [o.order_id, o.symbol_id, o.side, o.px, o.remaining] for o in rec.open_orders
        ]
        assert {row[6] for row in restart["open_orders"]} <= {
            "restored",
            "restored, cancel sent again",
        }
        assert segment.pid_alive(new_pid)
        wait_for(lambda: counter(eng, "risk", schema.C_STARTED_NS) > 0, 30, "risk running", proc)

        # 4. it carries on: trading again, then a clean stop drains every resting order
        eng.control[CTL_STATE] = schema.CTRL_RUNNING
        orders = counter(eng, "risk", schema.C_ORDERS)
        wait_for(lambda: counter(eng, "risk", schema.C_ORDERS) > orders, 60, "new orders", proc)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        for pid in stopped:  # a stage left stopped would never notice the engine is gone
            os.kill(pid, signal.SIGCONT)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err.decode()[-3000:]
    assert "did not confirm the drain" not in err.decode()

    with Journal.read_only(journal) as j:
        final_pos, final = rebuild_positions(j)
        done = {
            oid: (state, done_ns)
            for oid, state, done_ns in j._conn.execute(
                "SELECT order_id, state, coalesce(done_ns, 0) FROM orders"
            )
        }
        filled = {
            oid
            for (oid,) in j._conn.execute(
                "SELECT order_id FROM order_status WHERE status = 'filled'"
            )
        }
        late_fills = {
            oid
            for (oid,) in j._conn.execute(
                "SELECT DISTINCT order_id FROM fills WHERE ts_ns > ?", (killed_ns,)
            )
        }
    assert final.open_orders == (), "the drain cancelled every order the new stage held"
    for o in rec.open_orders:  # each was live in the restarted stage's exchange
        state, done_ns = done[o.order_id]
        if o.order_id in filled:
            assert o.order_id in late_fills, o
        else:
            assert state == jr.CANCELED and done_ns > killed_ns, (o, state, done_ns)
    # what the restarted stage left in shared memory at its clean stop: the journal, once
    assert shm_positions(eng) == journal_positions(final_pos)
    assert final.n_fills >= rec.n_fills
