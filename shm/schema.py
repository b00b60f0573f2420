"""Every record that crosses shared memory, defined once, next to its flag bits.

Each dtype is ``align=True`` and its size is asserted at import, so that a layout change
is a deliberate edit here and never an accident somewhere else. ``LAYOUT_VERSION`` and a
fingerprint of every dtype are stamped into each segment header; a process built against
another layout refuses to attach (see ``shm.segment``).

Timestamps are ``time.monotonic_ns()`` (system-wide on Linux, comparable across
processes) unless the name says ``exch`` (venue clock, ns since the epoch). Every record
downstream of ingest carries the trace of the tick that caused it: ``recv_ns`` (ingest got
the bytes) and each stage's publish time, so tick-to-order latency is measured per order.

Prior art: hftbacktest keeps its event dtypes and flag bits in one types module.
"""

from __future__ import annotations

import zlib
from typing import Final

import numpy as np

LAYOUT_VERSION: Final = 3
BOOK_DEPTH: Final = 20
MAX_FEATURES: Final = 24
MAX_SYMBOLS: Final = 64
SYMBOL_NAME_LEN: Final = 16

# ---------------------------------------------------------------- book and trade flags
BOOK_STALE: Final = 1 << 0  # connection silent or resyncing: never trade on it
BOOK_CROSSED: Final = 1 << 1  # best bid >= best ask
BOOK_SNAPSHOT: Final = 1 << 2  # full snapshot (not a diff-applied book)
BOOK_RESYNCED: Final = 1 << 3  # first book after a resync or reconnect
BOOK_UNTRADEABLE: Final = BOOK_STALE | BOOK_CROSSED

SIDE_BUY: Final = 1
SIDE_SELL: Final = -1

# ---------------------------------------------------------------- order styles and kinds
STYLE_TAKER_NOW: Final = 1  # IOC, crosses the spread
STYLE_SNIPER: Final = 2  # joins the best bid/offer
STYLE_MAKER_PASSIVE: Final = 3  # post-only, rests behind the touch
STYLE_NAMES: Final = {
    STYLE_TAKER_NOW: "TakerNow",
    STYLE_SNIPER: "Sniper",
    STYLE_MAKER_PASSIVE: "MakerPassive",
}

TIF_IOC: Final = 1
TIF_GTC: Final = 2
TIF_POST_ONLY: Final = 3

ACTION_NEW: Final = 1
ACTION_CANCEL: Final = 2

# order/fill events (risk -> route)
EV_ACK: Final = 1
EV_REJECT: Final = 2
EV_FILL: Final = 3  # partial or full; leaves_qty says which
EV_CANCELED: Final = 4
EV_EXPIRED: Final = 5  # IOC remainder cancelled

LIQ_MAKER: Final = 1
LIQ_TAKER: Final = 2

# reject reasons: index into REJECT_REASONS; also the label of hft_order_rejects_total
REJECT_REASONS: Final = (
    "none",
    "kill_switch",
    "paused",
    "draining",
    "stale_book",
    "crossed_book",
    "symbol_notional",
    "total_notional",
    "daily_loss",
    "post_only_would_cross",
    "no_liquidity",
    "bad_order",
    "unknown_order",
    "no_book",
    "leverage",  # gross notional over max_leverage x equity
    "concentration",  # one symbol over max_concentration of the portfolio
    "reduce_only",  # trading state REDUCING: only orders that shrink a position
    "halted",  # trading state HALTED
    "circuit_breaker",  # the symbol is paused (wide spread, thin book, extreme move)
    "rate_limited",  # the venue's order rate limit
    "min_notional",  # below the symbol's minimum notional
    "stale_order",  # its tick is older than route.max_signal_age_ms when risk reads it
)
REJECT_CODE: Final = {name: i for i, name in enumerate(REJECT_REASONS)}

# signal flags
SIG_FALLBACK: Final = 1 << 0  # rule-based fallback produced it
SIG_UNTRADEABLE: Final = 1 << 1  # the book behind it was stale or crossed


def _trace_fields() -> list[tuple[str, str]]:
    return [
        ("exch_ns", "<i8"),  # venue timestamp, ns since the epoch
        ("recv_ns", "<i8"),  # ingest received the bytes (monotonic)
        ("ingest_ns", "<i8"),  # ingest published the record
        ("feature_ns", "<i8"),
        ("inference_ns", "<i8"),
        ("route_ns", "<i8"),
    ]


BOOK = np.dtype(
    [
        ("symbol_id", "<u4"),
        ("flags", "<u4"),
        ("seq", "<u8"),  # venue's final update id (Binance u, Hyperliquid time)
        ("exch_ns", "<i8"),
        ("recv_ns", "<i8"),
        ("ingest_ns", "<i8"),
        ("n_bid", "<u2"),
        ("n_ask", "<u2"),
        ("_pad", "<u4"),
        ("bid_px", "<f8", (BOOK_DEPTH,)),
        ("bid_sz", "<f8", (BOOK_DEPTH,)),
        ("ask_px", "<f8", (BOOK_DEPTH,)),
        ("ask_sz", "<f8", (BOOK_DEPTH,)),
    ],
    align=True,
)

TRADE = np.dtype(
    [
        ("symbol_id", "<u4"),
        ("side", "<i4"),  # aggressor: +1 buy, -1 sell
        ("trade_id", "<u8"),
        ("exch_ns", "<i8"),
        ("recv_ns", "<i8"),
        ("ingest_ns", "<i8"),
        ("px", "<f8"),
        ("sz", "<f8"),
    ],
    align=True,
)

# feature indices into FEATURES["values"]; the feature stage writes them, models read them
# by name (a model's sidecar lists the names it was trained on). Formulas: stages/feature.py.
F_SPREAD_BPS: Final = 0
F_MICROPRICE: Final = 1  # a price, not a model input
F_MICRO_DEV_BPS: Final = 2  # (microprice - mid) / mid in bps
F_OBI: Final = 3  # top-of-book imbalance in [-1, 1]
F_DEPTH_IMB: Final = 4  # 10-level depth imbalance in [-1, 1]
F_RVOL_BPS: Final = 5  # realised volatility of mid log returns, bps per update
F_OFI: Final = 6  # order flow imbalance over the window, in mean top-of-book depths
F_TRADE_INTENSITY: Final = 7  # trades per second, exponentially weighted
F_OFI_TICK: Final = 8  # this update's order flow, in mean top-of-book depths
F_ATR_BPS: Final = 9  # average true range of 1 s mid bars over the window, bps of mid
F_FUNDING_BPS: Final = 10  # funding rate per 8 h, bps (0 where the venue has none)
F_VWAP_RATIO_BPS: Final = 11  # (mid / VWAP of the window's trades - 1) in bps
F_IMPACT_LOG_A: Final = 12  # ln A of impact_bps = A * (notional / 100k)^beta, fitted on the book
F_IMPACT_BETA: Final = 13
F_DEPTH_LOG_ALPHA: Final = 14  # ln alpha of depth_usd(d_bps) = alpha * d_bps^beta
F_DEPTH_BETA: Final = 15
F_TOD_SIN: Final = 16  # time of day (UTC), cyclic
F_TOD_COS: Final = 17
F_DOW_SIN: Final = 18  # day of week (UTC, Monday = 0), cyclic
F_DOW_COS: Final = 19
N_FEATURES: Final = 20
FEATURE_NAMES: Final = (
    "spread_bps",
    "microprice",
    "micro_dev_bps",
    "obi",
    "depth_imbalance",
    "rvol_bps",
    "ofi",
    "trade_intensity",
    "ofi_tick",
    "atr_bps",
    "funding_bps",
    "vwap_ratio_bps",
    "impact_log_a",
    "impact_beta",
    "depth_log_alpha",
    "depth_beta",
    "tod_sin",
    "tod_cos",
    "dow_sin",
    "dow_cos",
)
assert len(FEATURE_NAMES) == N_FEATURES <= MAX_FEATURES

# the inference stage's models, in the order it runs them (cheapest first)
MODEL_NAMES: Final = ("edge", "gbdt", "idec", "transformer")

FEATURES = np.dtype(
    [
        ("symbol_id", "<u4"),
        ("flags", "<u4"),  # book flags carried through
        ("seq", "<u8"),
        *_trace_fields()[:4],
        ("mid", "<f8"),
        ("best_bid", "<f8"),
        ("best_ask", "<f8"),
        ("bid_sz", "<f8"),
        ("ask_sz", "<f8"),
        ("values", "<f8", (MAX_FEATURES,)),
    ],
    align=True,
)

SIGNAL = np.dtype(
    [
        ("symbol_id", "<u4"),
        ("flags", "<u4"),  # SIG_* bits
        ("seq", "<u8"),
        *_trace_fields()[:5],
        ("edge_bps", "<f8"),  # signed: > 0 expects the price up
        ("confidence", "<f8"),  # [0, 1]
        ("urgency", "<f8"),  # [0, 1]
        ("direction", "<i4"),  # +1, -1 or 0
        ("book_flags", "<u4"),
        ("mid", "<f8"),
        ("best_bid", "<f8"),
        ("best_ask", "<f8"),
        ("spread_bps", "<f8"),
    ],
    align=True,
)

ORDER = np.dtype(
    [
        ("order_id", "<u8"),  # client order id, unique per engine run (route's epoch << 32 | n)
        ("symbol_id", "<u4"),
        ("action", "<u1"),  # ACTION_*
        ("style", "<u1"),  # STYLE_*
        ("tif", "<u1"),  # TIF_*
        ("_pad0", "<u1"),
        ("side", "<i4"),
        ("_pad1", "<u4"),
        ("px", "<f8"),  # limit price; NaN for a market (walk-the-book) taker
        ("qty", "<f8"),  # base units, > 0
        ("edge_bps", "<f8"),
        *_trace_fields(),
    ],
    align=True,
)

ORDER_EVENT = np.dtype(
    [
        ("order_id", "<u8"),
        ("symbol_id", "<u4"),
        ("kind", "<u1"),  # EV_*
        ("liquidity", "<u1"),  # LIQ_* for fills
        ("reason", "<u2"),  # REJECT_CODE for rejects
        ("side", "<i4"),
        ("_pad", "<u4"),
        ("px", "<f8"),  # fill price
        ("qty", "<f8"),  # fill quantity
        ("leaves_qty", "<f8"),  # still open after this event
        ("fee", "<f8"),  # quote currency, > 0 is paid
        ("ts_ns", "<i8"),
        ("recv_ns", "<i8"),  # trace of the tick behind the order
    ],
    align=True,
)

# ---------------------------------------------------------------- control block
CTRL_RUNNING: Final = 0
CTRL_PAUSED: Final = 1
CTRL_KILLED: Final = 2

MODE_CODES: Final = {"paper": 1, "live": 2, "backtest": 3}

STAGE_ROLES: Final = ("ingest", "feature", "inference", "route", "risk")
ROLE_INDEX: Final = {r: i for i, r in enumerate(STAGE_ROLES)}
MAX_STAGES: Final = 8

CONTROL = np.dtype(
    [
        ("state", "<i8"),  # CTRL_*
        ("kill", "<i8"),  # manual kill switch: non-zero blocks every new order
        ("draining", "<i8"),  # supervisor is shutting down: stop new orders, cancel resting
        ("drained", "<i8"),  # risk acknowledges the drain: every resting order cancelled
        ("mode", "<i8"),
        ("epoch", "<i8"),  # start time of the engine (ns since the epoch)
        ("restarts", "<i8", (MAX_STAGES,)),
        ("stage_pid", "<i8", (MAX_STAGES,)),
    ],
    align=True,
)

SYMBOL = np.dtype(
    [
        ("name", f"S{SYMBOL_NAME_LEN}"),  # engine name ("BTC"), what config and metrics use
        ("venue", "S16"),  # "sim" | "hyperliquid" | "binance"
        ("venue_symbol", "S32"),  # the venue's own name ("BTC", "BTCUSDT")
        ("tick_size", "<f8"),  # finest price increment
        ("lot_size", "<f8"),  # quantity increment
        ("min_notional", "<f8"),  # quote currency
        ("px_sig_figs", "<u4"),  # > 0: prices carry at most this many significant figures
        ("px_max_decimals", "<u4"),  # with px_sig_figs: at most this many decimals
        ("active", "<u4"),
        ("_pad", "<u4"),
    ],
    align=True,
)

# mark price, funding and open interest (Binance markPrice, Hyperliquid activeAssetCtx)
MARK = np.dtype(
    [
        ("symbol_id", "<u4"),
        ("flags", "<u4"),
        ("exch_ns", "<i8"),
        ("recv_ns", "<i8"),
        ("ingest_ns", "<i8"),
        ("mark_px", "<f8"),
        ("index_px", "<f8"),  # Binance index price, Hyperliquid oracle price; NaN if unknown
        ("funding_rate", "<f8"),  # per funding interval (Binance 8 h, Hyperliquid 1 h)
        ("next_funding_ns", "<i8"),  # ns since the epoch; 0 if the venue does not say
        ("open_interest", "<f8"),  # base units; NaN if the venue does not say
        ("funding_interval_s", "<u4"),  # Binance 8 h (a few symbols 4 h), Hyperliquid 1 h
        ("_pad0", "<u4"),
    ],
    align=True,
)

POSITION = np.dtype(
    [
        ("qty", "<f8"),  # signed base units
        ("avg_px", "<f8"),
        ("realized", "<f8"),  # quote, after fees
        ("unrealized", "<f8"),
        ("fees", "<f8"),
        ("mark_px", "<f8"),
        ("volume", "<f8"),  # traded notional
        ("fills", "<i8"),
        ("open_orders", "<i8"),
    ],
    align=True,
)

# ---------------------------------------------------------------- per-stage statistics
# Counters are int64 slots at fixed indices; each stage writes only its own block.
C_PROCESSED: Final = 0  # input records handled
C_PUBLISHED: Final = 1  # output records written
C_BATCHES: Final = 2
C_DROPPED: Final = 3  # input records lost to a lossy ring overrun
C_MALFORMED: Final = 4  # bad input rejected with a counter
C_ERRORS: Final = 5
C_HEARTBEAT_NS: Final = 6
C_PID: Final = 7
C_STARTED_NS: Final = 8
C_BACKPRESSURE_NS: Final = 9  # time a lossless writer waited for room
C_SNAPSHOTS: Final = 10
C_TRADES: Final = 11
C_ORDERS: Final = 12  # orders handed to the venue (risk) or emitted (route)
C_FILLS: Final = 13
C_REJECTS: Final = 14
C_CANCELS: Final = 15
C_MODEL_TIMEOUTS: Final = 16
C_SIGNALS: Final = 17
C_RECONNECTS: Final = 18
C_STALE: Final = 19  # books published with the stale flag
C_CROSSED: Final = 20
C_FALLBACKS: Final = 21
C_WAKEUPS: Final = 22  # doorbell wake-ups
C_TIMEOUT_WAKEUPS: Final = 23  # doorbell sleeps that ended by timeout with work waiting
C_GC_FROZEN: Final = 24
C_DRAINED: Final = 25
C_LAST_ORDER_ID: Final = 26  # risk: highest new-order id acted on (restart de-duplication)
C_DUPLICATES: Final = 27  # records seen again after a restart and ignored
C_VENUE_ERRORS: Final = 28  # venue error frames and messages for symbols we did not ask for
C_RESYNCS: Final = 29  # local books rebuilt from a fresh snapshot
C_GAPS: Final = 30  # sequence gaps detected in a venue's diff stream
C_RATE_LIMITED: Final = 31  # venue REST answers 429/418, and requests held back by our own limiter
N_COUNTERS: Final = 32
REJECT_COUNTERS_BASE: Final = 32  # one counter per REJECT_REASONS entry after the generic ones
MODEL_COUNTERS_BASE: Final = REJECT_COUNTERS_BASE + 32
# inference, per model (index in MODEL_NAMES): runs, deadline misses, failed runs and rejected
# model files, and ticks whose inputs lay outside the model's training range (left out)
MODEL_RUNS: Final = 0
MODEL_TIMEOUTS: Final = 1
MODEL_ERRORS: Final = 2
MODEL_OUT_OF_DOMAIN: Final = 3
N_MODEL_COUNTERS: Final = 4
N_INT_SLOTS: Final = MODEL_COUNTERS_BASE + N_MODEL_COUNTERS * 4

# float gauges
G_REALIZED: Final = 0
G_UNREALIZED: Final = 1
G_FEES: Final = 2
G_GROSS_NOTIONAL: Final = 3
G_DAILY_PNL: Final = 4
N_GAUGES: Final = 8

# latency histograms: H_DURATION is the stage's own work per record; H_E2E is tick-to-publish
# (tick-to-order at risk)
H_DURATION: Final = 0
H_E2E: Final = 1
H_MODEL_BASE: Final = 2  # inference: one duration histogram per model, in MODEL_NAMES order
N_HISTS: Final = H_MODEL_BASE + 4
HIST_SUB_BITS: Final = 2  # 4 sub-buckets per power of two: about 19% worst-case bucket width
HIST_BUCKETS: Final = 168  # covers up to 2**41 ns (36 min)

STAGE_STATS = np.dtype(
    [
        ("ints", "<i8", (N_INT_SLOTS,)),
        ("gauges", "<f8", (N_GAUGES,)),
        ("hist", "<i8", (N_HISTS, HIST_BUCKETS)),
    ],
    align=True,
)

ALL_DTYPES: Final = {
    "BOOK": BOOK,
    "TRADE": TRADE,
    "FEATURES": FEATURES,
    "SIGNAL": SIGNAL,
    "ORDER": ORDER,
    "ORDER_EVENT": ORDER_EVENT,
    "CONTROL": CONTROL,
    "SYMBOL": SYMBOL,
    "MARK": MARK,
    "POSITION": POSITION,
    "STAGE_STATS": STAGE_STATS,
}

_EXPECTED_SIZES: Final = {
    "BOOK": 688,
    "TRADE": 56,
    "FEATURES": 280,
    "SIGNAL": 120,
    "ORDER": 96,
    "ORDER_EVENT": 72,
    "CONTROL": 176,
    "SYMBOL": 104,
    "MARK": 80,
    "POSITION": 72,
    "STAGE_STATS": 8768,
}
for _name, _dt in ALL_DTYPES.items():
    assert _dt.itemsize == _EXPECTED_SIZES[_name], (_name, _dt.itemsize)


def fingerprint() -> int:
    """Return a 32-bit digest of every dtype, stamped into segment headers."""
    text = repr([(n, d.descr, d.itemsize) for n, d in sorted(ALL_DTYPES.items())])
    return zlib.crc32(f"{LAYOUT_VERSION}:{text}".encode())
