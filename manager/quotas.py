"""Quota consumption: computed from the usage rollups, published to the gate, shown in a key's details.

The supervisor calls `Publisher.run()` after every ingestion (every second). It looks only at keys that have a
quota (a partial index of the key store, O(keys with quotas)) and, of those, recomputes only the ones with usage
records added since its last run (the rowid range of the new records), plus every one of them at start and every
`FULL_INTERVAL`. Each computation reads two ranges of the rollups' primary key (span, key, bucket): the minute
rows of the last two minutes, and the day rows of the current UTC month. The result goes to `run/quotas.json`
(authsvc/quotas.py has the format and the windows), written atomically and only when it changed.

Day and month counts come from the day rollups (bucketed by UTC day of the requests' end), so they are exact; a
month quota needs `usage_day_retention_days` 0 (keep) or at least 31.
"""

from __future__ import annotations

import logging
import math
import sqlite3
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from authsvc import quotas as q
from authsvc.files import write_atomic
from manager.keystore import QUOTA_FIELDS

if TYPE_CHECKING:
    from manager.context import Bastion

log = logging.getLogger(__name__)

FULL_INTERVAL = 300.0  # seconds between recomputations of every quota key (a safety net; nothing relies on it)
_MINUTES = "SELECT bucket, TOTAL(total_tokens) FROM rollups WHERE span = 60 AND key = ? AND bucket >= ? GROUP BY 1"
# requests that reached a pool (the gate's own refusals and answers have pool '')
_DAYS = """SELECT bucket, TOTAL(total_tokens), TOTAL(CASE WHEN pool != '' THEN requests END) FROM rollups
WHERE span = 86400 AND key = ? AND bucket >= ? AND bucket < ? GROUP BY 1"""


def consumption(db: sqlite3.Connection, key: str, now: float) -> q.Consumption:
    """One key's tokens in the last two minutes, tokens and requests today, tokens this month (UTC)."""
    minute, today = q.minute_start(now), q.day_start(now)
    month, month_end = q.month_bounds(now)
    minutes = tuple((int(b), int(n)) for b, n in db.execute(_MINUTES, (key, minute - q.MINUTE)) if n)
    day_tokens = day_requests = month_tokens = 0
    for bucket, tokens, requests in db.execute(_DAYS, (key, month, month_end)):
        month_tokens += int(tokens)
        if bucket == today:
            day_tokens, day_requests = int(tokens), int(requests)
    return q.Consumption(minutes, today, day_tokens, day_requests, month, month_end, month_tokens)


class Publisher:
    """Keeps the figures of the keys with quotas and publishes them; one instance, in the supervisor."""

    def __init__(self, bastion: Bastion):
        self.bastion = bastion
        self.path = bastion.dirs.run / q.QUOTAS_FILE
        self.figures: dict[str, q.Consumption] = {}
        self.last_id: int | None = None  # the highest usage record id already reflected in the figures
        self._next_full = 0.0
        self._published: bytes | None = None
        self._stamp: tuple[int, int, int] | None = None

    def run(self, now: float | None = None) -> int:
        """Bring the figures up to date and publish them if they changed; returns how many keys were computed."""
        now = time.time() if now is None else now
        wanted = set(self.bastion.keystore.with_quotas())
        if not wanted:  # nothing to look at: no database read (and the next quota key starts a full run)
            self.figures, self.last_id = {}, None
            self._write(q.render({}))
            return 0
        with self.bastion.usage.reader() as db:
            db.execute("BEGIN")  # one read snapshot: records added meanwhile are picked up next time
            try:
                top = db.execute("SELECT COALESCE(MAX(last_id), 0) FROM segments").fetchone()[0]
                if self.last_id is None or top < self.last_id or time.monotonic() >= self._next_full:
                    todo = wanted  # first run, records deleted down to reused ids, or the periodic full run
                    self._next_full = time.monotonic() + FULL_INTERVAL
                else:
                    todo = wanted - self.figures.keys()  # quotas new since the last run
                    if top > self.last_id and wanted:
                        touched = {r[0] for r in db.execute(
                            "SELECT DISTINCT key FROM segment_keys WHERE segment IN "
                            "(SELECT id FROM segments WHERE last_id > ?)", (self.last_id,))}
                        todo |= wanted & touched
                figures = {k: c for k, c in self.figures.items() if k in wanted}
                for key in todo:
                    figures[key] = consumption(db, key, now)
            finally:
                db.execute("COMMIT")
        self.figures, self.last_id = figures, top
        self._write(q.render(figures))
        return len(todo)

    def _write(self, data: bytes) -> None:
        """Write when the figures changed, or when the file is not the one written last (removed, damaged)."""
        if data != self._published or self._stamp != _stamp(self.path):
            write_atomic(self.path, data, durable=False)  # rebuilt from the usage store at every start
            self._published, self._stamp = data, _stamp(self.path)


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def details(bastion: Bastion, record: dict[str, Any], now: float | None = None) -> dict[str, Any]:
    """Per quota of the key: limit, used, remaining and when it resets (epoch seconds), from the rollups as
    ingested so far. Empty for a key without quotas."""
    limits = {f: record.get(f) for f in QUOTA_FIELDS if record.get(f) is not None}
    if not limits:
        return {}
    now = time.time() if now is None else now
    with bastion.usage.reader() as db:
        c = consumption(db, record["id"], now)
    tomorrow = q.day_start(now) + q.DAY
    windows = {
        "tpm": (lambda: math.ceil(c.minute_tokens(now)), lambda: now + c.minute_reset(now), "sliding minute"),
        "tokens_per_day": (lambda: c.tokens_today(now), lambda: tomorrow, "UTC day"),
        "requests_per_day": (lambda: c.requests_today(now), lambda: tomorrow, "UTC day"),
        "tokens_per_month": (lambda: c.tokens_this_month(now), lambda: q.month_bounds(now)[1], "UTC month"),
    }
    out = {}
    for name, limit in limits.items():
        count, resets, window = windows[name]
        used = count()
        out[name] = {"limit": limit, "used": used, "remaining": max(0, limit - used),
                     "resets_at": round(resets(), 3), "window": window}
    return out
