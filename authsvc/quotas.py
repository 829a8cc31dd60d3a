"""Per-key quotas (tokens per minute, per UTC day and month; requests per UTC day): the consumption figures the
manager publishes, the window arithmetic, and the loader that keeps the figures in the gate's memory.

After every ingestion of the usage log the manager computes, from the rollups, the consumption of each key that
has a quota (manager/quotas.py) and writes it atomically to `run/quotas.json` when it changed. `QuotaFile.load()`
looks at that file's stat and re-reads it only when it changed; a `Reloader` thread (authsvc/files.py) calls it every
0.25 s, so the request path never touches the disk.

Figures carry the start of the periods they count, so the gate ages them itself: the sliding minute decays as
time passes, and a new UTC day or month counts from zero before the manager has published again.

Windows (UTC; requests count at their END time, as the rollups bucket them):
- tpm: tokens of the requests that ended in the current minute, plus those of the previous minute weighted by
  the part of that minute still inside the last 60 s (a sliding-window counter: the previous minute's tokens
  are taken as spread evenly over it).
- tokens_per_day, requests_per_day: the current UTC calendar day; requests are those the gate let through to a
  pool (its own refusals and model lists do not count).
- tokens_per_month: the current UTC calendar month.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from authsvc.files import WatchedFile

log = logging.getLogger(__name__)

QUOTAS_FILE = "quotas.json"  # in the run dir
CHECK_INTERVAL = 0.25
MINUTE, DAY = 60, 86400
FIELDS = ("tpm", "tokens_per_day", "tokens_per_month", "requests_per_day")


def minute_start(t: float) -> int:
    return int(t // MINUTE) * MINUTE


def day_start(t: float) -> int:
    return int(t // DAY) * DAY


def month_bounds(t: float) -> tuple[int, int]:
    """Start and end (the next month's start) of the UTC calendar month holding `t`."""
    d = datetime.fromtimestamp(t, UTC)
    start = datetime(d.year, d.month, 1, tzinfo=UTC)
    end = datetime(d.year + d.month // 12, d.month % 12 + 1, 1, tzinfo=UTC)
    return int(start.timestamp()), int(end.timestamp())


def minute_weight(bucket: int, now: float) -> float:
    """How much of the minute starting at `bucket` counts in the last 60 s: all of it while it is the current
    minute (its requests all ended before now), then the part of it still inside the window."""
    if now < bucket + MINUTE:
        return 1.0
    return max(0.0, min(1.0, (bucket + 2 * MINUTE - now) / MINUTE))


def iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


@dataclass(frozen=True, slots=True)
class Consumption:
    """One key's counts as the manager last computed them, each with the period it belongs to."""

    minutes: tuple[tuple[int, int], ...] = ()  # (minute start, tokens) of the latest minutes with tokens
    day: int = 0  # start of the UTC day counted
    day_tokens: int = 0
    day_requests: int = 0
    month: int = 0  # start and end of the UTC month counted
    month_end: int = 0
    month_tokens: int = 0

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Consumption:
        day = data.get("day") or (0, 0, 0)
        month = data.get("month") or (0, 0, 0)
        return cls(tuple((int(b), int(n)) for b, n in data.get("minutes") or ()), int(day[0]), int(day[1]),
                   int(day[2]), int(month[0]), int(month[1]), int(month[2]))

    def to_json(self) -> dict[str, Any]:
        return {"minutes": [list(m) for m in self.minutes], "day": [self.day, self.day_tokens, self.day_requests],
                "month": [self.month, self.month_end, self.month_tokens]}

    def empty(self) -> bool:
        return not (self.minutes or self.day_tokens or self.day_requests or self.month_tokens)

    def minute_tokens(self, now: float) -> float:
        """Tokens in the sliding minute ending now."""
        return sum(n * minute_weight(b, now) for b, n in self.minutes)

    def tokens_today(self, now: float) -> int:
        return self.day_tokens if self.day <= now < self.day + DAY else 0

    def requests_today(self, now: float) -> int:
        return self.day_requests if self.day <= now < self.day + DAY else 0

    def tokens_this_month(self, now: float) -> int:
        return self.month_tokens if self.month <= now < self.month_end else 0

    def minute_reset(self, now: float) -> float:
        """Seconds until no counted minute weighs any more (the window is empty), if no tokens are added."""
        return max([0.0, *(b + 2 * MINUTE - now for b, n in self.minutes if n)])

    def tpm_wait(self, limit: int, now: float) -> float:
        """Seconds until the sliding minute holds fewer than `limit` tokens, if no tokens are added. The count
        only falls, linearly between the points where a minute starts or stops weighing."""
        f0 = self.minute_tokens(now)
        if f0 < limit:
            return 0.0
        t0 = now
        for t1 in sorted({p for b, _ in self.minutes for p in (b + MINUTE, b + 2 * MINUTE) if p > now}):
            f1 = self.minute_tokens(t1)
            if f1 < limit:
                return t0 - now + (t1 - t0) * (f0 - limit) / (f0 - f1)
            t0, f0 = t1, f1
        return t0 - now


NOTHING = Consumption()


def parse(data: bytes) -> dict[str, Consumption]:
    return {key: Consumption.from_json(entry) for key, entry in json.loads(data)["keys"].items()}


def render(figures: dict[str, Consumption]) -> bytes:
    """The file's content: the keys that consumed anything in their periods (no entry reads as nothing)."""
    keys = {key: c.to_json() for key, c in sorted(figures.items()) if not c.empty()}
    return json.dumps({"keys": keys}, separators=(",", ":")).encode()


class QuotaFile(WatchedFile):
    """The published figures, re-read only when the file changed (a missing file means nothing consumed yet)."""

    what = "quota figures"

    def __init__(self, path: Path):
        super().__init__(path)
        self.figures: dict[str, Consumption] = {}

    def take(self, data: bytes) -> None:
        self.figures = parse(data)
