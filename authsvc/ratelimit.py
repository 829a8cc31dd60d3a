"""Per-key requests-per-minute limit as a token bucket held in the gate's memory.

A key with limit N may burst N requests and then gets one more every 60/N seconds. One process (one thread)
serves the gate, so one process holds every counter (DESIGN.md §1).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(slots=True)
class Decision:
    allowed: bool
    limit: int
    remaining: int
    reset_seconds: float  # until the bucket is full again
    retry_after: float  # until one request is allowed (0 when allowed)

    def headers(self) -> list[tuple[str, str]]:
        headers = [
            ("x-ratelimit-limit-requests", str(self.limit)),
            ("x-ratelimit-remaining-requests", str(self.remaining)),
            ("x-ratelimit-reset-requests", f"{self.reset_seconds:.3f}s"),
        ]
        if not self.allowed:
            headers.append(("Retry-After", str(max(1, math.ceil(self.retry_after)))))
        return headers


class RateLimiter:
    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._buckets: dict[str, tuple[float, float, int]] = {}  # key -> (tokens, last, limit)

    def hit(self, key: str, limit: int) -> Decision:
        now = self._clock()
        rate = limit / 60.0
        tokens, last, old_limit = self._buckets.get(key, (float(limit), now, limit))
        if old_limit != limit:  # limit changed: start afresh at the new size
            tokens = float(limit)
        tokens = min(float(limit), tokens + (now - last) * rate)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        self._buckets[key] = (tokens, now, limit)
        return Decision(
            allowed=allowed,
            limit=limit,
            remaining=int(tokens),
            reset_seconds=(limit - tokens) / rate,
            retry_after=0.0 if allowed else (1.0 - tokens) / rate,
        )
