"""Structured JSON logs, one object a line on stderr, level per module from ``HFT_LOG``.

``HFT_LOG="info,stages.route=debug,ops=warning"``: the first bare word is the root level,
``module=level`` pairs set a logger and its children. Never log on the hot path: stages log
lifecycle events and errors, and count everything else.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

import orjson

_RESERVED = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def __init__(self, role: str) -> None:
        super().__init__()
        self._role = role

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "role": self._role,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for k, v in record.__dict__.items():
            if k not in _RESERVED and not k.startswith("_"):
                doc[k] = v
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(doc, default=str).decode()


def setup(role: str, spec: str | None = None) -> None:
    """Send JSON lines to stderr with levels from ``spec`` (default: ``$HFT_LOG`` or info)."""
    spec = spec if spec is not None else os.environ.get("HFT_LOG", "info")
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(role))
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    for part in filter(None, (p.strip() for p in spec.split(","))):
        if "=" in part:
            name, level = part.split("=", 1)
            logging.getLogger(name.strip()).setLevel(level.strip().upper())
        else:
            root.setLevel(part.upper())
