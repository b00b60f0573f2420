"""Full-depth price-level books kept from venue diffs, and a fast scanner for level arrays.

Two compiled kernels carry the hot path of a diff-depth feed (Binance sends ~70 levels per
diff; 50,000 diffs/s leaves 20 us for everything):

``scan_levels`` reads the two level arrays (``"b":[["px","qty"],..]`` and ``"a":[..]``) of a
raw JSON message straight from its bytes into floats. ``orjson.loads`` of the whole message
costs about 7 us, most of it building 140 Python strings; converting those strings costs as
much again. The scanner instead walks the bytes once (strings with their escapes, nesting
depth), finds the keys ``b`` and ``a`` of the object at ``depth``, and parses each level with
a strict grammar: a quoted decimal, digits with at most one dot, no sign, no exponent, at most
15 significant digits. Such a decimal is ``mantissa / 10**k`` with both operands exact
doubles, so one IEEE division gives the correctly rounded value, bit for bit what ``float()``
returns (Clinger's fast path). Anything else -- a sign, an exponent, more digits, a duplicate
key, a stray byte -- is not guessed at: the scanner returns ``SCAN_SLOW`` and the caller uses
the plain ``orjson`` path. It reports where the arrays were, so the caller can blank them and
let ``orjson`` parse and check the rest of the message; finding ``[]`` under ``data.b`` and
``data.a`` there proves the scanner read exactly those two arrays.

``L2Book`` keeps each side on a tick grid: ``q[side, tick - base]`` is the size at a price,
over a window of ``DEFAULT_WINDOW`` ticks centred on the market, with the best index and the
outermost index of each side tracked, so setting a level is O(1) wherever it is (a sorted
array pays a shift proportional to the levels between the update and the touch: 100 us per
diff on the recorded BTCUSDT data, where diffs touch levels 5% away). When the touch drifts
into the outer eighth of the window the window is re-centred; levels that fall outside are
dropped and counted (a 1000-level REST snapshot is already a truncated view of the venue's
book). ``apply`` applies a whole diff and writes the top ``BOOK_DEPTH`` levels of both sides
into the output record in the same call: one dispatch per message. Prices come back as
``n / (1 / tick)``, one correctly rounded division, so they equal the venue's decimals.

Bounds: numba does not check indices, so every loop below checks its own.
"""

from __future__ import annotations

from typing import Final

import numpy as np
from numba import njit

from shm import schema

SCAN_OK: Final = 0
SCAN_SLOW: Final = 1  # valid JSON may still be there: use the plain path
SCAN_BAD: Final = 2  # the bytes cannot be a message (unbalanced, unterminated): malformed

DEFAULT_WINDOW: Final = 1 << 17  # ticks per side: BTCUSDT at 0.1 spans +-6,500 USD
MAX_EXACT_MANTISSA: Final = 1 << 53

Buf = np.ndarray | bytes  # what the scanner reads: bytes as they come, or a uint8 array
_POW10 = np.array([10.0**k for k in range(23)])  # exact doubles up to 1e22
_DEPTH: Final = schema.BOOK_DEPTH
_NO_LEVELS = np.zeros(2)

# byte constants (numba folds module globals into the compiled code)
_QUOTE: Final = 34
_BACKSLASH: Final = 92
_COLON: Final = 58
_COMMA: Final = 44
_LBRACKET: Final = 91
_RBRACKET: Final = 93
_LBRACE: Final = 123
_RBRACE: Final = 125
_DOT: Final = 46
_ZERO: Final = 48
_NINE: Final = 57
_KEY_B: Final = 98
_KEY_A: Final = 97


@njit(cache=True, nogil=True)
def _skip_ws(buf: Buf, i: int, n: int) -> int:
    while i < n:
        c = buf[i]
        if c != 32 and c != 10 and c != 13 and c != 9:
            return i
        i += 1
    return i


@njit(cache=True, nogil=True)
def _parse_quoted_decimal(buf: Buf, i: int, n: int, pow10: np.ndarray) -> tuple[int, float]:
    """Parse ``"123.45"`` at ``buf[i]``; return (index after the closing quote, value) or (-1, 0)."""
    if i >= n or buf[i] != _QUOTE:
        return -1, 0.0
    i += 1
    mant = 0
    digits = 0  # significant digits taken into the mantissa
    frac = 0  # digits after the dot
    seen_dot = False
    any_digit = False
    while i < n:
        c = buf[i]
        if _ZERO <= c <= _NINE:
            any_digit = True
            if mant == 0 and c == _ZERO:
                if seen_dot:
                    frac += 1
            else:
                mant = mant * 10 + (c - _ZERO)
                digits += 1
                if seen_dot:
                    frac += 1
                if digits > 15:
                    return -1, 0.0
        elif c == _DOT:
            if seen_dot:
                return -1, 0.0
            seen_dot = True
        elif c == _QUOTE:
            break
        else:
            return -1, 0.0
        i += 1
    if i >= n or not any_digit or frac > 22:
        return -1, 0.0
    if seen_dot and (i == 0 or buf[i - 1] == _DOT):
        return -1, 0.0  # "1." is not a number we accept
    return i + 1, mant / pow10[frac]


@njit(cache=True, nogil=True)
def _parse_level_array(
    buf: Buf, i: int, n: int, out: np.ndarray, k: int, pow10: np.ndarray
) -> tuple[int, int]:
    """Parse ``[["px","qty"],...]`` at ``buf[i]`` into ``out[k:]``; return (end, new k) or (-1, k)."""
    if i >= n or buf[i] != _LBRACKET:
        return -1, k
    i = _skip_ws(buf, i + 1, n)
    if i < n and buf[i] == _RBRACKET:
        return i + 1, k
    cap = out.shape[0]
    while i < n:
        if buf[i] != _LBRACKET or k + 2 > cap:
            return -1, k
        i = _skip_ws(buf, i + 1, n)
        i, px = _parse_quoted_decimal(buf, i, n, pow10)
        if i < 0:
            return -1, k
        i = _skip_ws(buf, i, n)
        if i >= n or buf[i] != _COMMA:
            return -1, k
        i = _skip_ws(buf, i + 1, n)
        i, sz = _parse_quoted_decimal(buf, i, n, pow10)
        if i < 0:
            return -1, k
        i = _skip_ws(buf, i, n)
        if i >= n or buf[i] != _RBRACKET:
            return -1, k
        out[k] = px
        out[k + 1] = sz
        k += 2
        i = _skip_ws(buf, i + 1, n)
        if i >= n:
            return -1, k
        if buf[i] == _RBRACKET:
            return i + 1, k
        if buf[i] != _COMMA:
            return -1, k
        i = _skip_ws(buf, i + 1, n)
    return -1, k


@njit(cache=True, nogil=True)
def _scan(
    buf: Buf,
    depth: int,
    out: np.ndarray,
    pos: np.ndarray,
    pow10: np.ndarray,
    max_px: float,
    max_sz: float,
) -> int:
    n = len(buf)
    level = 0
    i = 0
    found_b = False
    found_a = False
    n_b = 0
    k = 0
    while i < n:
        c = buf[i]
        if c == _QUOTE:
            j = i + 1
            while j < n:
                cj = buf[j]
                if cj == _BACKSLASH:
                    # an escape can spell a key ("\u0062" is "b") that the byte compare
                    # below would miss; venues never send one in a depth message
                    return SCAN_SLOW
                if cj == _QUOTE:
                    break
                j += 1
            if j >= n:
                return SCAN_BAD  # unterminated string
            if level == depth and j == i + 2 and (buf[i + 1] == _KEY_B or buf[i + 1] == _KEY_A):
                m = _skip_ws(buf, j + 1, n)
                if m < n and buf[m] == _COLON:
                    m = _skip_ws(buf, m + 1, n)
                    is_bid = buf[i + 1] == _KEY_B
                    if (is_bid and found_b) or (not is_bid and found_a):
                        return SCAN_SLOW  # duplicate key: let orjson decide
                    if is_bid and found_a:
                        return SCAN_SLOW  # "a" before "b": keep the simple output order
                    start = m
                    end, k2 = _parse_level_array(buf, m, n, out, k, pow10)
                    if end < 0:
                        return SCAN_SLOW
                    if is_bid:
                        found_b = True
                        n_b = (k2 - k) // 2
                        pos[0] = start
                        pos[1] = end
                    else:
                        found_a = True
                        pos[2] = start
                        pos[3] = end
                    k = k2
                    i = end
                    continue
            i = j + 1
            continue
        if c in (_LBRACE, _LBRACKET):
            level += 1
        elif c in (_RBRACE, _RBRACKET):
            level -= 1
            if level < 0:
                return SCAN_BAD
        i += 1
    if level != 0:
        return SCAN_BAD
    if not (found_b and found_a):
        return SCAN_SLOW
    pos[4] = n_b
    pos[5] = (k - 2 * n_b) // 2
    for j in range(0, k, 2):  # 0 < price < max_px, 0 <= size < max_sz, else the plain path
        if not (0.0 < out[j] < max_px and out[j + 1] < max_sz):
            return SCAN_SLOW
    return SCAN_OK


def scan_levels(
    raw: bytes,
    depth: int,
    out: np.ndarray,
    pos: np.ndarray,
    max_px: float = 1e9,
    max_sz: float = 1e12,
) -> int:
    """Scan the ``b`` and ``a`` level arrays of the object at nesting ``depth`` of ``raw``.

    On ``SCAN_OK``: ``out[: 2 * (n_b + n_a)]`` holds px, qty pairs, bids first, every price
    in (0, max_px) and every size in [0, max_sz) (sizes cannot be negative: no sign is
    accepted); ``pos = [b_start, b_end, a_start, a_end, n_b, n_a]`` (byte offsets, end
    exclusive).
    """
    buf = raw if type(raw) is bytes else np.frombuffer(raw, np.uint8)  # bytes: no wrapper
    return int(_scan(buf, depth, out, pos, _POW10, max_px, max_sz))


# ---------------------------------------------------------------- the book
# state slots of an L2Book (int64)
_BASE: Final = 0  # tick number of index 0
_BEST_BID: Final = 1  # index of the best bid, -1 when there is none
_BEST_ASK: Final = 2  # index of the best ask, R when there is none
_N_BID: Final = 3
_N_ASK: Final = 4
_LO_BID: Final = 5  # lowest bid index ever set since the last clear (bounds the scans)
_HI_ASK: Final = 6
_DROPPED: Final = 7  # levels outside the window, dropped
_OFF_TICK: Final = 8  # prices that were not a multiple of the tick
_N_STATE: Final = 9


@njit(cache=True, nogil=True)
def _clear(q: np.ndarray, st: np.ndarray) -> None:
    r = q.shape[1]
    lo = max(st[_LO_BID], 0)
    hi = min(st[_HI_ASK], r - 1)
    if st[_N_BID] > 0:
        for i in range(lo, r):
            q[0, i] = 0.0
    if st[_N_ASK] > 0:
        for i in range(0, hi + 1):
            q[1, i] = 0.0
    st[_BEST_BID] = -1
    st[_BEST_ASK] = r
    st[_N_BID] = 0
    st[_N_ASK] = 0
    st[_LO_BID] = r
    st[_HI_ASK] = -1


@njit(cache=True, nogil=True)
def _set_bid(q: np.ndarray, st: np.ndarray, i: int, sz: float) -> None:
    old = q[0, i]
    q[0, i] = sz
    if sz > 0.0:
        if old == 0.0:
            st[_N_BID] += 1
            if i > st[_BEST_BID]:
                st[_BEST_BID] = i
            if i < st[_LO_BID]:
                st[_LO_BID] = i
    elif old > 0.0:
        st[_N_BID] -= 1
        if i == st[_BEST_BID]:
            j = i - 1
            lo = st[_LO_BID]
            while j >= lo and q[0, j] == 0.0:
                j -= 1
            st[_BEST_BID] = j if j >= lo else -1


@njit(cache=True, nogil=True)
def _set_ask(q: np.ndarray, st: np.ndarray, i: int, sz: float) -> None:
    old = q[1, i]
    q[1, i] = sz
    r = q.shape[1]
    if sz > 0.0:
        if old == 0.0:
            st[_N_ASK] += 1
            if i < st[_BEST_ASK]:
                st[_BEST_ASK] = i
            if i > st[_HI_ASK]:
                st[_HI_ASK] = i
    elif old > 0.0:
        st[_N_ASK] -= 1
        if i == st[_BEST_ASK]:
            j = i + 1
            hi = st[_HI_ASK]
            while j <= hi and q[1, j] == 0.0:
                j += 1
            st[_BEST_ASK] = j if j <= hi else r


@njit(cache=True, nogil=True)
def _recenter(q: np.ndarray, st: np.ndarray, center_tick: int) -> None:
    """Move the window so that ``center_tick`` sits in its middle; levels outside are dropped."""
    r = q.shape[1]
    new_base = center_tick - r // 2
    shift = new_base - st[_BASE]
    if shift == 0:
        return
    old = q.copy()
    n_bid = st[_N_BID]
    n_ask = st[_N_ASK]
    _clear(q, st)
    st[_BASE] = new_base
    kept = 0
    for side in range(2):
        for i in range(r):
            sz = old[side, i]
            if sz > 0.0:
                j = i - shift
                if 0 <= j < r:
                    if side == 0:
                        _set_bid(q, st, j, sz)
                    else:
                        _set_ask(q, st, j, sz)
                    kept += 1
    st[_DROPPED] += n_bid + n_ask - kept


@njit(cache=True, nogil=True)
def _apply(
    q: np.ndarray,
    st: np.ndarray,
    vals: np.ndarray,
    n_bid: int,
    n_ask: int,
    inv_tick: float,
    tick: float,
    exact_div: bool,
    top: np.ndarray,
) -> None:
    """Apply px/qty pairs (bids then asks), then write the top levels into ``top``.

    ``q`` rows: bid sizes, ask sizes, indexed by ``tick number - base``. ``top`` rows (the
    output record's level arrays): bid px, bid sz, ask px, ask sz, best first, zero-padded.
    With ``exact_div`` (``1 / tick`` is an integer, as for every decimal tick) a price is
    ``n / inv_tick``: one correctly rounded division, so it is bit for bit the venue's decimal.
    """
    r = q.shape[1]
    if st[_N_BID] == 0 and st[_N_ASK] == 0 and n_bid + n_ask > 0:
        # empty book: centre the window on the first price we see
        st[_BASE] = int(np.floor(vals[0] * inv_tick + 0.5)) - r // 2
    for k in range(n_bid + n_ask):
        px = vals[2 * k]
        sz = vals[2 * k + 1]
        t = px * inv_tick
        tn = int(np.floor(t + 0.5))
        if abs(t - tn) > 1e-6 * max(1.0, abs(t)) * 1e-3:
            st[_OFF_TICK] += 1
            continue
        i = tn - st[_BASE]
        if i < 0 or i >= r:
            if sz > 0.0:
                st[_DROPPED] += 1
            continue
        if k < n_bid:
            _set_bid(q, st, i, sz)
        else:
            _set_ask(q, st, i, sz)
    # keep the touch well inside the window, on both edges (a one-sided or wide book can
    # drift either way)
    bb = st[_BEST_BID]
    ba = st[_BEST_ASK]
    edge = r // 8
    if (bb >= 0 and (bb > r - edge or bb < edge)) or (ba < r and (ba < edge or ba > r - edge)):
        mid = bb if ba >= r else (ba if bb < 0 else (bb + ba) // 2)
        _recenter(q, st, st[_BASE] + mid)
    # the top of both sides, best first
    base = st[_BASE]
    depth = top.shape[1]
    lv = 0
    i = st[_BEST_BID]
    lo = st[_LO_BID]
    while lv < depth and i >= lo and i >= 0:
        sz = q[0, i]
        if sz > 0.0:
            top[0, lv] = (base + i) / inv_tick if exact_div else (base + i) * tick
            top[1, lv] = sz
            lv += 1
        i -= 1
    for j in range(lv, depth):
        top[0, j] = 0.0
        top[1, j] = 0.0
    lv = 0
    i = st[_BEST_ASK]
    hi = st[_HI_ASK]
    while lv < depth and i <= hi and i < r:
        sz = q[1, i]
        if sz > 0.0:
            top[2, lv] = (base + i) / inv_tick if exact_div else (base + i) * tick
            top[3, lv] = sz
            lv += 1
        i += 1
    for j in range(lv, depth):
        top[2, j] = 0.0
        top[3, j] = 0.0


def top_view(books: np.ndarray, i: int = 0) -> np.ndarray:
    """The (4, BOOK_DEPTH) float64 view of record ``i``'s level arrays (bid px/sz, ask px/sz)."""
    f = schema.BOOK.fields
    assert f is not None
    off = f["bid_px"][1]
    assert f["bid_sz"][1] == off + 8 * _DEPTH and f["ask_sz"][1] == off + 24 * _DEPTH
    row = books[i : i + 1].view(np.uint8)
    return row[off : off + 32 * _DEPTH].view(np.float64).reshape(4, _DEPTH)


class L2Book:
    """The full-depth book of one symbol on a tick grid (see the module docstring)."""

    __slots__ = ("_exact", "_inv_tick", "q", "st", "tick")

    def __init__(self, tick: float, window: int = DEFAULT_WINDOW) -> None:
        if not tick > 0.0:
            raise ValueError(f"tick must be > 0, got {tick!r}")
        if window < 64:
            raise ValueError("window must be >= 64 ticks")
        self.tick = float(tick)
        inv = 1.0 / self.tick
        self._exact = abs(inv - round(inv)) < 1e-9 * inv
        self._inv_tick = float(round(inv)) if self._exact else inv
        self.q = np.zeros((2, window))
        self.st = np.zeros(_N_STATE, np.int64)
        _clear(self.q, self.st)

    def clear(self) -> None:
        _clear(self.q, self.st)

    @property
    def n_bid(self) -> int:
        return int(self.st[_N_BID])

    def counts(self) -> tuple[int, int]:
        """(levels on the bid side, levels on the ask side)."""
        c = self.st[_N_BID : _N_ASK + 1].tolist()
        return c[0], c[1]

    @property
    def n_ask(self) -> int:
        return int(self.st[_N_ASK])

    @property
    def dropped(self) -> int:
        """Levels that fell outside the window and were dropped."""
        return int(self.st[_DROPPED])

    @property
    def off_tick(self) -> int:
        """Levels whose price was not a multiple of the tick (ignored)."""
        return int(self.st[_OFF_TICK])

    def apply(self, vals: np.ndarray, n_bid: int, n_ask: int, top: np.ndarray) -> None:
        """Apply ``n_bid`` then ``n_ask`` px/qty pairs from ``vals``; write the top into ``top``."""
        _apply(self.q, self.st, vals, n_bid, n_ask, self._inv_tick, self.tick, self._exact, top)

    def write_top(self, top: np.ndarray) -> None:
        """Write the current top levels into ``top`` without changing the book."""
        self.apply(_NO_LEVELS, 0, 0, top)

    def load(self, vals: np.ndarray, n_bid: int, n_ask: int, top: np.ndarray) -> None:
        """Replace the book with a snapshot's levels."""
        _clear(self.q, self.st)
        self.apply(vals, n_bid, n_ask, top)

    def _px(self, n: int) -> float:
        return n / self._inv_tick if self._exact else n * self.tick

    def best(self) -> tuple[float, float, float, float]:
        """(bid px, bid size, ask px, ask size); zeros for an empty side."""
        st, q = self.st, self.q
        bb, ba, base = int(st[_BEST_BID]), int(st[_BEST_ASK]), int(st[_BASE])
        bid = (self._px(base + bb), float(q[0, bb])) if bb >= 0 else (0.0, 0.0)
        ask = (self._px(base + ba), float(q[1, ba])) if ba < q.shape[1] else (0.0, 0.0)
        return bid[0], bid[1], ask[0], ask[1]

    def levels(self) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
        """Every level, best first: (bids, asks). For tests and snapshots, not the hot path."""
        base = int(self.st[_BASE])
        bi = np.nonzero(self.q[0])[0][::-1]
        ai = np.nonzero(self.q[1])[0]
        bids = [(self._px(base + int(i)), float(self.q[0, i])) for i in bi]
        asks = [(self._px(base + int(i)), float(self.q[1, i])) for i in ai]
        return bids, asks
