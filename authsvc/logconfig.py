"""One logging set-up for every Bastion process (supervisor, gate, manager): one line per event on stderr,
with the request id when the event belongs to a request.

The level comes from `bastion up --log-level` (passed to the children as BASTION_LOG_LEVEL). Lives in authsvc
because the gate may not import the manager; the manager imports it from here.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
ENV = "BASTION_LOG_LEVEL"
FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]%(request)s: %(message)s"


class _RequestId(logging.Filter):
    """Adds ` [request id]` from `extra={"request_id": ...}` or from the current request, else nothing."""

    def __init__(self, current: Callable[[], str | None] | None):
        super().__init__()
        self.current = current

    def filter(self, record: logging.LogRecord) -> bool:
        rid = getattr(record, "request_id", None) or (self.current() if self.current else None)
        record.request = f" [{rid}]" if rid else ""
        return True


def configure(level: str | None = None, request_id: Callable[[], str | None] | None = None) -> None:
    """Send every logger's records to stderr at `level` (else $BASTION_LOG_LEVEL, else INFO); `request_id` tells
    the id of the request being served, if any."""
    name = (level or os.environ.get(ENV) or "INFO").upper()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(_RequestId(request_id))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(name if name in LEVELS else "INFO")
