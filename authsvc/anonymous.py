"""A per-address rate limit for requests that carry no valid API key (`unauthenticated_rpm`).

Brute-force protection (authsvc/bruteforce.py) blocks an address for a while after many failures; this shapes
the rest: each client (the same client key: an IPv4 address or an IPv6 /64) gets a token bucket of `rpm`
refusals a minute, and beyond it a 429 with Retry-After, whether or not its address is exempt from brute-force
blocks (an exemption says "never lock this shared address out", not "let it flood the gate"). Memory is
bounded: at most `MAX_CLIENTS` buckets, the least recently used dropped first (a dropped bucket was refilling).
Each run of refusals is logged once (like a brute-force block): the gate marks the others `X-Bastion-Log: 0`,
and the decision counters (/metrics) count them all.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from authsvc.bruteforce import client_key

MAX_CLIENTS = 50_000
DEFAULT_RPM = 60


class AnonymousLimiter:
    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        # client -> (tokens, last, refusals in a row)
        self._buckets: OrderedDict[str, tuple[float, float, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def hit(self, address: str, rpm: int) -> tuple[float, int]:
        """Take one token for a request without a valid key: (0, 0) when allowed, else (seconds until one is,
        refusals in a row including this one)."""
        if rpm <= 0:
            return 0.0, 0
        now = self._clock()
        key = client_key(address)
        rate = rpm / 60.0
        tokens, last, refused = self._buckets.pop(key, (float(rpm), now, 0))
        tokens = min(float(rpm), tokens + (now - last) * rate)
        wait = 0.0
        if tokens >= 1.0:
            tokens, refused = tokens - 1.0, 0
        else:
            wait, refused = (1.0 - tokens) / rate, refused + 1
        self._buckets[key] = (tokens, now, refused)  # most recently used last
        if len(self._buckets) > MAX_CLIENTS:
            self._buckets.popitem(last=False)
        return wait, refused
