"""The paper exchange: simulated fills against the live book and prints, with a queue model.

Orders
------
- A taker (IOC) order walks the book from the touch up to its limit price, one fill per
  level, paying the symbol's taker fee; each fill reports ``leaves_qty``. What the book
  cannot fill is cancelled with one ``EV_EXPIRED`` event (the schema's "IOC remainder
  cancelled": qty 0, leaves 0). The liquidity it took is removed from our copy of the book
  until the next snapshot replaces it, so two orders in a row do not both take the same level.
- A post-only order that would cross (a buy at or above the best ask, a sell at or below the
  best bid) is rejected (``post_only_would_cross``); otherwise it rests (``EV_ACK``).
- A GTC limit that crosses takes liquidity like a taker up to its price (taker fee); the rest
  rests at its price with queue_ahead 0 (its price is better than the best on its side).
- A resting order fills only as maker (the symbol's maker fee, at its own price), by the queue
  model below. Partial fills are reported as ``EV_FILL`` with the ``leaves_qty`` left.

Fees are per symbol: ``taker_fee_bps``/``maker_fee_bps`` of the constructor are every
symbol's default, ``set_fees(symbol_id, taker_bps=, maker_bps=)`` overrides one (the risk
stage sets each symbol's venue fees from ``[paper]``). A fee is ``px * qty * bps * 1e-4``.

Order-entry latency
-------------------
``latency_ns`` (constructor, default 0). With 0 every action acts at once, exactly as the
first version did. With ``latency_ns > 0``, ``submit`` and ``cancel`` only schedule: the
action reaches the book at ``now + latency_ns`` (``now`` is the ``now_ns`` argument, default
the ``recv_ns`` the caller passes), and is applied by ``advance(t, out)`` once ``t`` reaches
that time, in arrival order (ties: submission order). ``on_book``, ``on_books`` and
``on_trade`` (when given ``recv_ns``) first call ``advance`` with the record's ``recv_ns``,
so an order that arrives at ``t`` sees the book as it stood at ``t`` (the last record before
it) and is touched by the records at or after ``t`` only, never by earlier ones. The ``EV_ACK``
(or the reject, or the taker fills) go out when the order reaches the book. A cancel that
reaches the book after the order has filled is answered with an ``unknown_order`` reject: the
fill wins. ``cancel`` returns True when the order is resting or still on its way (the cancel
is scheduled), False when it is unknown (as before). ``cancel_all`` (kill switch, drain) acts
at once, latency or not: it cancels resting orders and orders still on their way and drops
every scheduled action, so nothing fills after it. Callers feed records in time order.

Queue model (resting orders)
----------------------------
Notation for one resting order ``o`` on side ``S`` (+1 bid, -1 ask) at price ``p``: ``Q`` is
the queue ahead of it (base units of *market* orders ahead of ``o`` at ``p``), ``L`` the
visible size at ``p`` in the last tradeable book ``o`` has seen (or "not visible"), and
``P`` the prints at ``p`` against ``S`` since that book, as (recv_ns, size). Prices are equal
within a relative 1e-9 (far below any tick).

"Visible size at ``p``" in a book: the size of the level at ``p`` on side ``S``; 0 when ``p``
lies within the displayed levels (between the best and the deepest shown, or better than the
best) without a level there; *not visible* when ``p`` lies beyond the deepest displayed level
or the side is empty (the book does not tell).

1. Arrival. ``Q = L =`` the visible size at ``p`` in the book at the moment ``o`` reaches it
   (our copy: minus what our own takers took from it). 0 if the level is empty or ``p`` is
   better than the best: ``o`` is alone at the front. Not visible: ``Q = +inf`` (no print at
   ``p`` fills it) until a book shows the level, then rule 3 caps ``Q`` at its size.
2. A print (price ``x``, size ``q``, aggressor ``a`` = +1 buy / -1 sell / 0 unknown) at or
   after ``o``'s arrival:
   a. ``x`` strictly through ``p`` (below a bid, above an ask), any aggressor: the level was
      swept (price-time priority trades ``p`` out before a worse price), ``o`` fills in full.
   b. ``x == p`` and the aggressor hits ``S`` (a sell for a bid, a buy for an ask, or unknown):
      ``q`` first trades the queue ahead, then ``o``: ``o`` fills
      ``min(leaves, max(0, q - Q - A))``, where ``A`` is the leaves (before this print) of our
      own orders at ``p`` on ``S`` that arrived earlier (they are ahead of ``o``); then
      ``Q = max(0, Q - q)`` and ``(recv_ns, q)`` is appended to ``P`` (a print given without
      a time counts as older than any book).
   c. otherwise nothing (a buy print at our bid price says the ask reached it: rule 3's
      through check decides on the next book).
3. A tradeable book (not stale, not crossed) at ``t`` at or after ``o``'s arrival:
   a. its opposite touch at or through ``p`` (best ask <= a bid's price, best bid >= an
      ask's): ``o`` fills in full.
   b. otherwise, with ``V`` the visible size at ``p`` and ``X`` the total size of the prints in
      ``P`` up to ``t`` (they leave ``P``; later ones wait for the next book):
      - ``V`` not visible (the best moved away beyond the displayed depth): ``Q`` keeps its
        value, ``L`` becomes not visible.
      - else if ``L`` is visible: ``B = L - X`` is the level after the prints, and
        ``C = B - V`` the decrease the prints do not explain: cancellations. If ``C > 0``
        (and ``B > 0``) they are spread uniformly over the level (the proportional model):
        ``Q -= C * Q / B``. ``C <= 0`` (net additions) joins behind ``o``: ``Q`` unchanged.
      - then ``Q = min(Q, V)`` (all that is ahead of ``o`` is visible in the level) and
        ``L = V``.
   A stale or crossed book changes nothing (no fills, no queue update; ``P`` waits).

No double counting: a print at ``p`` reduces ``Q`` once, when it arrives (2b), and is also
recorded in ``P``; the next book's decrease at ``p`` is first explained by those prints
(``X``), and only the rest counts as cancellations (3b). Since ``Q <= L`` holds after every
book and the prints lower both, ``Q <= B``, so 3b never drives ``Q`` below 0.

Assumptions: price-time (FIFO) priority at each level; the displayed size is the whole level
(no hidden or iceberg size); our orders are phantoms, they do not change the recorded market
(a print that fills us is one that, in reality, traded the market orders behind us); within
the interval between two books the prints come before the cancellations, and only the net
change of a level is known (an interval with additions and cancellations sees the net);
cancellations are uniform over the queue; a print arrives no later than the first book that
shows its effect, as in the recorded Binance USD-M excerpt the tests replay (a print that
comes after such a book is counted twice, once as a cancellation, in our favour; prints
handed over with their ``recv_ns`` are matched with books by time, not by call order). The
book rule 3a also fills a crossing GTC's remainder if the next venue book still shows the
liquidity our taker part took (the venue does not know our phantom take).

Prior art: hftbacktest's queue models (``RiskAverseQueueModel``: only prints advance the
queue; ``ProbQueueModel``: a decrease split between the front and the back, prints at the
level subtracted from the book's change first, as here). Rule 3b is its identity case
(``IdentityProbQueueModel``, Rigtorp's estimator): the share ahead of us is
``front / (front + back)``. Uniform cancellation is on the optimistic side: in real queues
the orders behind us, the newer ones, cancel more often than the old ones ahead.

Restoring orders after a restart
--------------------------------
The exchange lives in the risk stage's process and dies with it. A restarted stage rebuilds
its open orders from the journal and puts each resting one back with ``restore``: same id,
side, price and remaining quantity, no event (the venue acknowledged it long ago), reached
the book at the ``now_ns`` of the restore (records before it do not touch it). Its queue
position is lost (it was never journaled: that would cost a write per book) and is estimated
again exactly as for a new order arriving at that moment (rule 1): from the current book if
the exchange has one, else "not visible" until the first tradeable book, which sets
``Q = L =`` the visible size at its price (rule 3b). That is conservative: the queue an order
has earned is never more than the visible size at its price (``Q <= L`` after every book),
so starting again at the back of the visible level fills it no earlier than the lost
position would have; the price moving through it (rules 2a, 3a) still fills it in full.

Helpers for callers and tests: ``queue_ahead(order_id)`` (``Q`` of a resting order),
``next_arrival_ns()`` (when the next scheduled action reaches the book), ``fees(symbol_id)``,
``open_ids()`` (resting and on their way), ``open_by_symbol()`` (their count per symbol).

The exchange is a kernel: it reads no clock (callers pass times) and returns events as
tuples; the risk stage packs and publishes them.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

import numpy as np

from shm import schema

_ALWAYS = -(1 << 62)  # arrival time of an order placed without latency: every record sees it
_LATEST = 1 << 62  # the time of a print given without one: it touches every resting order
_PX_REL_EPS = 1e-9  # prices within this relative distance are the same price
_DUST = 1e-12


@dataclass(slots=True)
class Resting:
    order_id: int
    symbol_id: int
    side: int
    px: float
    leaves: float
    recv_ns: int
    queue: float = 0.0  # market size ahead of us at px; inf: the level was never visible
    level: float = -1.0  # visible size at px in the last tradeable book; -1: not visible
    arrive_ns: int = _ALWAYS  # reached the book at; records before it do not touch it
    # (recv_ns, size) of the prints at px against our side not yet matched with a book
    prints: list[tuple[int, float]] = field(default_factory=list)
    eps: float = field(init=False, default=0.0)  # price tolerance

    def __post_init__(self) -> None:
        self.eps = abs(self.px) * _PX_REL_EPS


@dataclass(slots=True)
class _Action:
    """A new order or a cancel on its way to the book."""

    arrive_ns: int
    action: int  # schema.ACTION_NEW | ACTION_CANCEL
    order_id: int
    symbol_id: int
    side: int
    tif: int
    px: float
    qty: float
    recv_ns: int


# (order_id, symbol_id, kind, side, px, qty, leaves, fee, liquidity, reason, recv_ns)
EventTuple = tuple[int, int, int, int, float, float, float, float, int, int, int]


def _first_level(px: np.ndarray, sz: np.ndarray, n: int) -> float:
    for i in range(n):
        if sz[i] > 0:
            return float(px[i])
    return math.nan


def _level_size(
    pxs: list[float], szs: list[float], n: int, side: int, p: float, eps: float
) -> float:
    """Visible size at ``p`` on one side (levels best first): 0 if ``p`` is within the shown
    levels (or better than the best) without a level, -1 if beyond the deepest shown one."""
    for k in range(n):
        x = pxs[k]
        if abs(x - p) <= eps:
            sz = szs[k]
            return sz if sz > 0 else 0.0
        if (x < p) if side > 0 else (x > p):
            return 0.0  # passed p: nobody there
    return -1.0


def _level_in_row(
    pxm: np.ndarray, szm: np.ndarray, i: int, n: int, side: int, p: float, eps: float
) -> float:
    """``_level_size`` of row ``i`` of a batch's level arrays, reading only the levels down to
    ``p`` (orders rest at or near the touch: one or two reads)."""
    item = pxm.item
    for k in range(n):
        d = item(i, k) - p
        if -eps <= d <= eps:
            sz: float = szm.item(i, k)
            return sz if sz > 0 else 0.0
        if (d < 0) if side > 0 else (d > 0):
            return 0.0
    return -1.0


def reject_event(
    order_id: int, symbol_id: int, side: int, px: float, reason: int, recv_ns: int
) -> EventTuple:
    """The event that refuses an order with a REJECT_CODE reason."""
    return (order_id, symbol_id, schema.EV_REJECT, side, px, 0.0, 0.0, 0.0, 0, reason, recv_ns)


def end_event(
    order_id: int, symbol_id: int, kind: int, side: int, px: float, recv_ns: int
) -> EventTuple:
    """The event that ends an order without a fill: ``kind`` EV_CANCELED or EV_EXPIRED."""
    return (order_id, symbol_id, kind, side, px, 0.0, 0.0, 0.0, 0, 0, recv_ns)


@dataclass
class PaperExchange:
    taker_fee_bps: float  # every symbol's default; set_fees overrides one symbol
    maker_fee_bps: float
    n_symbols: int = schema.MAX_SYMBOLS
    books: np.ndarray = field(init=False)
    has_book: list[bool] = field(init=False)
    resting: dict[int, Resting] = field(default_factory=dict)
    latency_ns: int = 0  # order entry: submit/cancel reach the book this much later

    def __post_init__(self) -> None:
        if isinstance(self.latency_ns, bool) or not isinstance(self.latency_ns, int):
            raise TypeError(f"latency_ns must be an int, got {self.latency_ns!r}")
        if self.latency_ns < 0:
            raise ValueError(f"latency_ns must be >= 0, got {self.latency_ns}")
        self.books = np.zeros(self.n_symbols, schema.BOOK)
        self.has_book = [False] * self.n_symbols
        # the touch and flags as Python numbers: risk reads them per order, numpy scalars cost us
        self.bid = [math.nan] * self.n_symbols
        self.ask = [math.nan] * self.n_symbols
        self.flags = [0] * self.n_symbols
        self.taker_bps = [float(self.taker_fee_bps)] * self.n_symbols
        self.maker_bps = [float(self.maker_fee_bps)] * self.n_symbols
        self._pending: list[tuple[int, int, _Action]] = []  # heap: (arrive_ns, seq, action)
        self._inflight: dict[int, _Action] = {}  # new orders on their way, by order id
        self._seq = 0

    def set_fees(self, symbol_id: int, *, taker_bps: float, maker_bps: float) -> None:
        """One symbol's fees in bps of notional (its venue's); a negative maker fee is a rebate."""
        if not 0 <= symbol_id < self.n_symbols:
            raise ValueError(f"symbol_id {symbol_id} out of range [0, {self.n_symbols})")
        if not (math.isfinite(taker_bps) and math.isfinite(maker_bps)):
            raise ValueError(f"fees must be finite, got {taker_bps!r}, {maker_bps!r}")
        self.taker_bps[symbol_id] = float(taker_bps)
        self.maker_bps[symbol_id] = float(maker_bps)

    def fees(self, symbol_id: int) -> tuple[float, float]:
        """(taker, maker) bps of one symbol."""
        return self.taker_bps[symbol_id], self.maker_bps[symbol_id]

    def _cache_touch(self, s: int) -> None:
        b = self.books[s]
        self.bid[s] = _first_level(b["bid_px"], b["bid_sz"], int(b["n_bid"]))
        self.ask[s] = _first_level(b["ask_px"], b["ask_sz"], int(b["n_ask"]))
        self.flags[s] = int(b["flags"])

    # ------------------------------------------------------------------ latency
    def advance(self, now_ns: int, out: list[EventTuple]) -> int:
        """Apply, in arrival order, every order and cancel that has reached the book by
        ``now_ns``; return how many."""
        pending = self._pending
        n = 0
        while pending and pending[0][0] <= now_ns:
            arrive, _seq, a = heapq.heappop(pending)
            n += 1
            if a.action == schema.ACTION_NEW:
                self._inflight.pop(a.order_id, None)
                self._new(
                    a.order_id, a.symbol_id, a.side, a.tif, a.px, a.qty, a.recv_ns, arrive, out
                )
            elif not self._cancel_now(a.order_id, a.recv_ns, out):
                # filled (or cancelled) before the cancel got there: the fill won
                code = schema.REJECT_CODE["unknown_order"]
                out.append(reject_event(a.order_id, a.symbol_id, a.side, a.px, code, a.recv_ns))
        return n

    def next_arrival_ns(self) -> int | None:
        """When the next scheduled order or cancel reaches the book (None: nothing on its way)."""
        return self._pending[0][0] if self._pending else None

    def _schedule(self, a: _Action) -> None:
        self._seq += 1
        heapq.heappush(self._pending, (a.arrive_ns, self._seq, a))

    # ------------------------------------------------------------------ market data
    def on_book(self, book: np.void | np.ndarray, out: list[EventTuple]) -> None:
        """Take a new snapshot; fill resting orders the market has moved through and move
        the others' queue positions (rule 3 of the module docstring)."""
        t = int(book["recv_ns"])
        if self._pending:
            self.advance(t, out)
        s = int(book["symbol_id"])
        if s >= self.n_symbols:
            return
        self.books[s] = book
        self.has_book[s] = True
        self._cache_touch(s)
        if not self.resting or self.flags[s] & schema.BOOK_UNTRADEABLE:
            return
        bid, ask = self.bid[s], self.ask[s]
        rec = self.books[s]
        sides: dict[int, tuple[list[float], list[float], int]] = {}
        for o in [o for o in self.resting.values() if o.symbol_id == s]:
            if t < o.arrive_ns:
                continue
            if (o.side > 0 and ask <= o.px + o.eps) or (o.side < 0 and bid >= o.px - o.eps):
                self._fill_resting(o, o.leaves, out)
                continue
            lv = sides.get(o.side)
            if lv is None:
                if o.side > 0:
                    lv = (rec["bid_px"].tolist(), rec["bid_sz"].tolist(), int(rec["n_bid"]))
                else:
                    lv = (rec["ask_px"].tolist(), rec["ask_sz"].tolist(), int(rec["n_ask"]))
                sides[o.side] = lv
            _on_level(o, _level_size(lv[0], lv[1], lv[2], o.side, o.px, o.eps), t)

    def on_books(self, books: np.ndarray, out: list[EventTuple]) -> None:
        """Take a batch of snapshots in order: the touch of each as Python floats (resting
        orders are checked against every one, and their queues move with each), the full record
        only of each symbol's last. A batch inside which a scheduled action reaches the book goes
        one by one."""
        if self._pending and len(books) and self._pending[0][0] <= int(books["recv_ns"].max()):
            for i in range(len(books)):  # an order reaches the book within the batch: one by one
                self.on_book(books[i], out)
            return
        n_sym = self.n_symbols
        bids = books["bid_px"][:, 0].tolist()
        asks = books["ask_px"][:, 0].tolist()
        nb, na = books["n_bid"].tolist(), books["n_ask"].tolist()
        flags = books["flags"].tolist()
        last: dict[int, int] = {}
        nan = math.nan
        recv: list[int] | None = None
        bid_px = bid_sz = ask_px = ask_sz = books["bid_px"]  # views, replaced when needed
        have_bid = have_ask = False
        for i, s in enumerate(books["symbol_id"].tolist()):
            if s >= n_sym:
                continue
            last[s] = i
            bid = bids[i] if nb[i] else nan
            ask = asks[i] if na[i] else nan
            self.bid[s], self.ask[s], self.flags[s] = bid, ask, flags[i]
            if self.resting and not flags[i] & schema.BOOK_UNTRADEABLE:
                for o in [o for o in self.resting.values() if o.symbol_id == s]:
                    if recv is None:
                        recv = books["recv_ns"].tolist()
                    t = recv[i]
                    if t < o.arrive_ns:
                        continue
                    if (o.side > 0 and ask <= o.px + o.eps) or (o.side < 0 and bid >= o.px - o.eps):
                        self._fill_resting(o, o.leaves, out)
                        continue
                    if o.side > 0:
                        if not have_bid:
                            bid_px, bid_sz, have_bid = books["bid_px"], books["bid_sz"], True
                        lv = _level_in_row(bid_px, bid_sz, i, nb[i], 1, o.px, o.eps)
                    else:
                        if not have_ask:
                            ask_px, ask_sz, have_ask = books["ask_px"], books["ask_sz"], True
                        lv = _level_in_row(ask_px, ask_sz, i, na[i], -1, o.px, o.eps)
                    if lv != o.level or o.prints:  # an unchanged level moves nothing
                        _on_level(o, lv, t)
        for s, i in last.items():
            self.books[s] = books[i]
            self.has_book[s] = True

    def on_trade(
        self,
        symbol_id: int,
        px: float,
        sz: float,
        out: list[EventTuple],
        *,
        aggressor: int = 0,
        recv_ns: int | None = None,
    ) -> None:
        """A print (rule 2 of the module docstring). ``aggressor``: the TRADE record's
        ``side`` (+1 buy, -1 sell; 0 unknown: a print at an order's price then counts against
        either side). ``recv_ns``: the print's time (advances latency, orders that reach the
        book later are not touched); None: it touches every resting order."""
        if self._pending and recv_ns is not None:
            self.advance(recv_ns, out)
        if not self.resting or not sz > 0 or not 0.0 < px < math.inf:  # NaN: no print
            return
        gate = _LATEST if recv_ns is None else recv_ns
        stamp = _ALWAYS if recv_ns is None else recv_ns
        own_bid = own_ask = 0.0  # leaves of our earlier orders at the print's price, per side
        for o in [o for o in self.resting.values() if o.symbol_id == symbol_id]:
            if gate < o.arrive_ns:
                continue
            p, e = o.px, o.eps
            if o.side > 0:
                if px < p - e:
                    self._fill_resting(o, o.leaves, out)
                    continue
                if px > p + e or aggressor > 0:
                    continue
                ahead = own_bid
                own_bid += o.leaves
            else:
                if px > p + e:
                    self._fill_resting(o, o.leaves, out)
                    continue
                if px < p - e or aggressor < 0:
                    continue
                ahead = own_ask
                own_ask += o.leaves
            q = sz - o.queue - ahead
            o.queue = o.queue - sz if o.queue > sz else 0.0
            o.prints.append((stamp, sz))
            if q > _DUST:
                self._fill_resting(o, q if q < o.leaves else o.leaves, out)

    def _fill_resting(self, o: Resting, qty: float, out: list[EventTuple]) -> None:
        o.leaves -= qty
        if o.leaves <= _DUST:
            o.leaves = 0.0
            del self.resting[o.order_id]
        fee = o.px * qty * self.maker_bps[o.symbol_id] * 1e-4
        out.append(
            (
                o.order_id,
                o.symbol_id,
                schema.EV_FILL,
                o.side,
                o.px,
                qty,
                o.leaves,
                fee,
                schema.LIQ_MAKER,
                0,
                o.recv_ns,
            )
        )

    # ------------------------------------------------------------------ order entry
    def best(self, symbol_id: int) -> tuple[float, float]:
        return self.bid[symbol_id], self.ask[symbol_id]

    def resting_qty(self, symbol_id: int, side: int) -> float:
        """Open quantity of our orders on one side of a symbol: resting, or on their way."""
        q = sum(
            o.leaves for o in self.resting.values() if o.symbol_id == symbol_id and o.side == side
        )
        if self._inflight:
            q += sum(
                a.qty
                for a in self._inflight.values()
                if a.symbol_id == symbol_id and a.side == side
            )
        return q

    def open_ids(self) -> list[int]:
        """Ids of our open orders: resting, or on their way to the book."""
        return [*self.resting, *self._inflight]

    def open_orders(self) -> list[tuple[int, int, int]]:
        """(order_id, symbol_id, side) of our open orders: resting, or on their way."""
        out = [(o.order_id, o.symbol_id, o.side) for o in self.resting.values()]
        if self._inflight:
            out += [(a.order_id, a.symbol_id, a.side) for a in self._inflight.values()]
        return out

    def open_by_symbol(self) -> dict[int, int]:
        """The number of open orders (resting or on their way) per symbol that has any."""
        out: dict[int, int] = {}
        for o in self.resting.values():
            out[o.symbol_id] = out.get(o.symbol_id, 0) + 1
        for a in self._inflight.values():
            out[a.symbol_id] = out.get(a.symbol_id, 0) + 1
        return out

    def queue_ahead(self, order_id: int) -> float | None:
        """The queue ahead of a resting order (None: not resting)."""
        o = self.resting.get(order_id)
        return None if o is None else o.queue

    def _take(
        self,
        *,
        oid: int,
        s: int,
        side: int,
        limit: float,
        qty: float,
        recv_ns: int,
        out: list[EventTuple],
    ) -> float:
        """Walk the opposite side up to ``limit``; return the quantity left."""
        b = self.books[s]
        px_col = b["ask_px"] if side > 0 else b["bid_px"]
        sz_col = b["ask_sz"] if side > 0 else b["bid_sz"]
        n = int(b["n_ask"] if side > 0 else b["n_bid"])
        bps = self.taker_bps[s]
        left = qty
        for i in range(n):
            if left <= _DUST:
                break
            px = float(px_col[i])
            avail = float(sz_col[i])
            if avail <= 0:
                continue
            if not math.isnan(limit) and ((side > 0 and px > limit) or (side < 0 and px < limit)):
                break
            q = min(left, avail)
            sz_col[i] = avail - q
            left -= q
            if left <= _DUST:  # float dust (0.4 - 0.1 - 0.2 - 0.1 = 2.8e-17): fully filled
                left = 0.0
            fee = px * q * bps * 1e-4
            out.append(
                (
                    oid,
                    s,
                    schema.EV_FILL,
                    side,
                    px,
                    q,
                    max(left, 0.0),
                    fee,
                    schema.LIQ_TAKER,
                    0,
                    recv_ns,
                )
            )
        self._cache_touch(s)  # what we took may have emptied the touch
        return max(left, 0.0)

    def submit(
        self,
        *,
        order_id: int,
        symbol_id: int,
        side: int,
        tif: int,
        px: float,
        qty: float,
        recv_ns: int,
        out: list[EventTuple],
        now_ns: int | None = None,
    ) -> None:
        """Accept a new order that passed risk; append the events it causes to ``out``.

        ``recv_ns`` is the trace of the tick behind the order (echoed in its events);
        ``now_ns`` the time it is handed to the venue (default ``recv_ns``). With latency the
        order reaches the book at ``now_ns + latency_ns`` and its events come from ``advance``.
        """
        if self.latency_ns:
            now = recv_ns if now_ns is None else now_ns
            a = _Action(
                now + self.latency_ns,
                schema.ACTION_NEW,
                order_id,
                symbol_id,
                side,
                tif,
                px,
                qty,
                recv_ns,
            )
            self._inflight[order_id] = a
            self._schedule(a)
            return
        self._new(order_id, symbol_id, side, tif, px, qty, recv_ns, _ALWAYS, out)

    def _new(
        self,
        order_id: int,
        s: int,
        side: int,
        tif: int,
        px: float,
        qty: float,
        recv_ns: int,
        arrive_ns: int,
        out: list[EventTuple],
    ) -> None:
        """The order reaches the book."""
        bid, ask = self.best(s)
        if tif == schema.TIF_IOC:
            left = self._take(
                oid=order_id, s=s, side=side, limit=px, qty=qty, recv_ns=recv_ns, out=out
            )
            if left > 0:  # the remainder is cancelled
                out.append(end_event(order_id, s, schema.EV_EXPIRED, side, px, recv_ns))
            return
        crosses = (side > 0 and px >= ask) or (side < 0 and px <= bid)
        if tif == schema.TIF_POST_ONLY and crosses:
            out.append(
                reject_event(
                    order_id, s, side, px, schema.REJECT_CODE["post_only_would_cross"], recv_ns
                )
            )
            return
        out.append((order_id, s, schema.EV_ACK, side, px, 0.0, qty, 0.0, 0, 0, recv_ns))
        left = qty
        if crosses:
            left = self._take(
                oid=order_id, s=s, side=side, limit=px, qty=qty, recv_ns=recv_ns, out=out
            )
        if left > 0:
            o = Resting(order_id, s, side, px, left, recv_ns, arrive_ns=arrive_ns)
            b = self.books[s]
            if side > 0:
                lv = _level_size(
                    b["bid_px"].tolist(), b["bid_sz"].tolist(), int(b["n_bid"]), side, px, o.eps
                )
            else:
                lv = _level_size(
                    b["ask_px"].tolist(), b["ask_sz"].tolist(), int(b["n_ask"]), side, px, o.eps
                )
            o.level = lv
            o.queue = 0.0 if crosses else (lv if lv >= 0 else math.inf)
            self.resting[order_id] = o

    def restore(
        self,
        *,
        order_id: int,
        symbol_id: int,
        side: int,
        px: float,
        leaves: float,
        recv_ns: int,
        now_ns: int,
    ) -> None:
        """Put back a resting order a restart lost (see "Restoring orders after a restart"):
        no event, the queue estimated again as for an order reaching the book at ``now_ns``."""
        if not 0 <= symbol_id < self.n_symbols:
            raise ValueError(f"symbol_id {symbol_id} out of range [0, {self.n_symbols})")
        if side not in (1, -1) or not (leaves > 0 and px > 0):
            raise ValueError(f"order {order_id}: bad side, price or quantity to restore")
        if order_id in self.resting or order_id in self._inflight:
            raise ValueError(f"order {order_id} is already open")
        o = Resting(order_id, symbol_id, side, px, leaves, recv_ns, arrive_ns=now_ns)
        lv = -1.0
        if self.has_book[symbol_id]:
            b = self.books[symbol_id]
            key = "bid" if side > 0 else "ask"
            lv = _level_size(
                b[f"{key}_px"].tolist(),
                b[f"{key}_sz"].tolist(),
                int(b[f"n_{key}"]),
                side,
                px,
                o.eps,
            )
        o.level = lv
        o.queue = lv if lv >= 0 else math.inf
        self.resting[order_id] = o

    def cancel(
        self, order_id: int, *, recv_ns: int, out: list[EventTuple], now_ns: int | None = None
    ) -> bool:
        """Cancel an order; False if it is unknown (neither resting nor on its way). With
        latency the cancel reaches the book at ``now_ns + latency_ns`` (``now_ns`` default
        ``recv_ns``): ``EV_CANCELED`` then, or an ``unknown_order`` reject if it filled first."""
        if not self.latency_ns:
            return self._cancel_now(order_id, recv_ns, out)
        o = self.resting.get(order_id)
        a = self._inflight.get(order_id)
        if o is not None:
            s, side, px = o.symbol_id, o.side, o.px
        elif a is not None:
            s, side, px = a.symbol_id, a.side, a.px
        else:
            return False
        now = recv_ns if now_ns is None else now_ns
        self._schedule(
            _Action(
                now + self.latency_ns, schema.ACTION_CANCEL, order_id, s, side, 0, px, 0.0, recv_ns
            )
        )
        return True

    def _cancel_now(self, order_id: int, recv_ns: int, out: list[EventTuple]) -> bool:
        o = self.resting.pop(order_id, None)
        if o is None:
            return False
        out.append(end_event(order_id, o.symbol_id, schema.EV_CANCELED, o.side, o.px, recv_ns))
        return True

    def cancel_all(self, *, out: list[EventTuple]) -> int:
        """Cancel every resting order and every order on its way, at once (kill switch,
        drain): nothing fills after this, whatever the latency."""
        ids = list(self.resting)
        for oid in ids:
            self._cancel_now(oid, 0, out)
        inflight = list(self._inflight.values())
        for a in inflight:
            out.append(end_event(a.order_id, a.symbol_id, schema.EV_CANCELED, a.side, a.px, 0))
        self._inflight.clear()
        self._pending.clear()
        return len(ids) + len(inflight)


def _on_level(o: Resting, v: float, t: int) -> None:
    """Rule 3b: a tradeable book at ``t`` shows visible size ``v`` at ``o``'s price (-1: not
    visible). Prints up to ``t`` explain the decrease first; the rest are cancellations."""
    x = 0.0
    prints = o.prints
    if prints:
        later: list[tuple[int, float]] | None = None
        for pt, q in prints:
            if pt <= t:
                x += q
            elif later is None:
                later = [(pt, q)]
            else:
                later.append((pt, q))
        if later is None:
            prints.clear()
        else:
            prints[:] = later
    if v < 0:
        o.level = -1.0
        return
    if o.level >= 0:
        base = o.level - x
        c = base - v
        if c > 0 and base > 0 and o.queue > 0:
            q = o.queue - c * o.queue / base
            o.queue = q if q > _DUST else 0.0
    if o.queue > v:
        o.queue = v
    o.level = v
