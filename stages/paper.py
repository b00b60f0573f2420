"""The paper exchange: simulated fills against the live book, with fees.

Rules (first version; the queue-position model comes with the trading issue):
- A taker (IOC) order walks the book from the touch up to its limit price, one fill per
  level, paying the taker fee; what the book cannot fill is cancelled (``EV_EXPIRED``). The
  liquidity it took is removed from our copy of the book until the next snapshot replaces it,
  so two orders in a row do not both take the same level.
- A post-only order that would cross is rejected; otherwise it rests (``EV_ACK``).
- A GTC limit that crosses takes liquidity like a taker up to its price, the rest rests.
- A resting order fills, as maker, only when the market trades *through* its price: a trade
  strictly beyond it (fill up to the trade's size), or a book whose opposite touch has moved
  onto or past it (fill the remainder). Touching the price is not enough: the queue ahead of
  us would have traded first.

The exchange is a kernel: it reads no clock (callers pass ``now_ns``) and returns events as
tuples; the risk stage packs and publishes them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from shm import schema


@dataclass(slots=True)
class Resting:
    order_id: int
    symbol_id: int
    side: int
    px: float
    leaves: float
    recv_ns: int


# (order_id, symbol_id, kind, side, px, qty, leaves, fee, liquidity, reason, recv_ns)
EventTuple = tuple[int, int, int, int, float, float, float, float, int, int, int]


def _first_level(px: np.ndarray, sz: np.ndarray, n: int) -> float:
    for i in range(n):
        if sz[i] > 0:
            return float(px[i])
    return math.nan


def reject_event(
    order_id: int, symbol_id: int, side: int, px: float, reason: int, recv_ns: int
) -> EventTuple:
    """The event that refuses an order with a REJECT_CODE reason."""
    return (order_id, symbol_id, schema.EV_REJECT, side, px, 0.0, 0.0, 0.0, 0, reason, recv_ns)


@dataclass
class PaperExchange:
    taker_fee_bps: float
    maker_fee_bps: float
    n_symbols: int = schema.MAX_SYMBOLS
    books: np.ndarray = field(init=False)
    has_book: list[bool] = field(init=False)
    resting: dict[int, Resting] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.books = np.zeros(self.n_symbols, schema.BOOK)
        self.has_book = [False] * self.n_symbols
        # the touch and flags as Python numbers: risk reads them per order, numpy scalars cost us
        self.bid = [math.nan] * self.n_symbols
        self.ask = [math.nan] * self.n_symbols
        self.flags = [0] * self.n_symbols

    def _cache_touch(self, s: int) -> None:
        b = self.books[s]
        self.bid[s] = _first_level(b["bid_px"], b["bid_sz"], int(b["n_bid"]))
        self.ask[s] = _first_level(b["ask_px"], b["ask_sz"], int(b["n_ask"]))
        self.flags[s] = int(b["flags"])

    # ------------------------------------------------------------------ market data
    def on_book(self, book: np.void | np.ndarray, out: list[EventTuple]) -> None:
        """Take a new snapshot; fill resting orders the market has moved through."""
        s = int(book["symbol_id"])
        if s >= self.n_symbols:
            return
        self.books[s] = book
        self.has_book[s] = True
        self._cache_touch(s)
        if not self.resting or self.flags[s] & schema.BOOK_UNTRADEABLE:
            return
        bid, ask = self.bid[s], self.ask[s]
        for o in [o for o in self.resting.values() if o.symbol_id == s]:
            if (o.side > 0 and ask <= o.px) or (o.side < 0 and bid >= o.px):
                self._fill_resting(o, o.leaves, out)

    def on_books(self, books: np.ndarray, out: list[EventTuple]) -> None:
        """Take a batch of snapshots in order: the touch of each as Python floats (resting
        orders are checked against every one), the full record only of each symbol's last."""
        n_sym = self.n_symbols
        bids = books["bid_px"][:, 0].tolist()
        asks = books["ask_px"][:, 0].tolist()
        nb, na = books["n_bid"].tolist(), books["n_ask"].tolist()
        flags = books["flags"].tolist()
        last: dict[int, int] = {}
        nan = math.nan
        for i, s in enumerate(books["symbol_id"].tolist()):
            if s >= n_sym:
                continue
            last[s] = i
            bid = bids[i] if nb[i] else nan
            ask = asks[i] if na[i] else nan
            self.bid[s], self.ask[s], self.flags[s] = bid, ask, flags[i]
            if self.resting and not flags[i] & schema.BOOK_UNTRADEABLE:
                for o in [o for o in self.resting.values() if o.symbol_id == s]:
                    if (o.side > 0 and ask <= o.px) or (o.side < 0 and bid >= o.px):
                        self._fill_resting(o, o.leaves, out)
        for s, i in last.items():
            self.books[s] = books[i]
            self.has_book[s] = True

    def on_trade(self, symbol_id: int, px: float, sz: float, out: list[EventTuple]) -> None:
        """A print strictly through a resting order's price fills it up to the print's size."""
        if not self.resting:
            return
        for o in [o for o in self.resting.values() if o.symbol_id == symbol_id]:
            if sz <= 0:
                break
            if (o.side > 0 and px < o.px) or (o.side < 0 and px > o.px):
                q = min(o.leaves, sz)
                sz -= q
                self._fill_resting(o, q, out)

    def _fill_resting(self, o: Resting, qty: float, out: list[EventTuple]) -> None:
        o.leaves -= qty
        if o.leaves <= 1e-12:
            o.leaves = 0.0
            del self.resting[o.order_id]
        fee = o.px * qty * self.maker_fee_bps * 1e-4
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
        """Open quantity of our resting orders on one side of a symbol."""
        return sum(
            o.leaves for o in self.resting.values() if o.symbol_id == symbol_id and o.side == side
        )

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
        left = qty
        for i in range(n):
            if left <= 1e-12:
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
            if left <= 1e-12:  # float dust (0.4 - 0.1 - 0.2 - 0.1 = 2.8e-17): fully filled
                left = 0.0
            fee = px * q * self.taker_fee_bps * 1e-4
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
    ) -> None:
        """Accept a new order that passed risk; append the events it causes to ``out``."""
        s = symbol_id
        bid, ask = self.best(s)
        if tif == schema.TIF_IOC:
            left = self._take(
                oid=order_id, s=s, side=side, limit=px, qty=qty, recv_ns=recv_ns, out=out
            )
            if left > 0:
                out.append((order_id, s, schema.EV_EXPIRED, side, px, 0.0, 0.0, 0.0, 0, 0, recv_ns))
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
            self.resting[order_id] = Resting(order_id, s, side, px, left, recv_ns)

    def cancel(self, order_id: int, *, recv_ns: int, out: list[EventTuple]) -> bool:
        o = self.resting.pop(order_id, None)
        if o is None:
            return False
        out.append(
            (order_id, o.symbol_id, schema.EV_CANCELED, o.side, o.px, 0.0, 0.0, 0.0, 0, 0, recv_ns)
        )
        return True

    def cancel_all(self, *, out: list[EventTuple]) -> int:
        ids = list(self.resting)
        for oid in ids:
            self.cancel(oid, recv_ns=0, out=out)
        return len(ids)
