"""Brute-force protection: an address that sends too many invalid API keys is refused for a while.

The gate counts failed authentications (401 `invalid_api_key`) per client in a window that opens at the first
failure. The `max_failures`-th failure starts a block: every request from that client, valid key or not, gets
429 `too_many_failed_attempts` (so a guess can never be confirmed) until the block ends. Each further block of
the same client lasts twice as long as the one before, up to `max_block`; a client quiet for `max_block` after
its last block starts again from `block`.

A client is an IPv4 address, or an IPv6 /64: one host usually owns a whole /64 (SLAAC, privacy addresses), so
counting single IPv6 addresses would let it guess for ever. Memory is bounded: at most `MAX_COUNTING` clients
with failures in their window (least recently failed dropped first) and `MAX_BLOCKED` blocks (oldest dropped).

All state lives in the gate's memory; checking a request costs one truthiness test while nothing is blocked
and one dict lookup otherwise. `BlockBoard`, a daemon thread, publishes the blocks to `run/blocks.json` and
applies the manager's clear requests (`run/blocks-clear/*.json`), never on the request path.
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from authsvc.files import write_atomic
from authsvc.networks import Network, admits

logger = logging.getLogger(__name__)

MAX_COUNTING = 50_000
MAX_BLOCKED = 50_000
MAX_LISTED = 1000
BLOCKS_FILE = "blocks.json"  # in the run dir: the published blocks
CLEAR_DIR = "blocks-clear"  # in the run dir: one file per clear request, deleted once applied
POLL_INTERVAL = 0.25  # how often the board looks for clear requests
PUBLISH_INTERVAL = 1.0  # at most one write of blocks.json a second
LOG_HEADER = "X-Bastion-Log"  # "0" on a refusal nginx need not log (hidden from clients)



_v6_keys: dict[str, str] = {}  # parsing IPv6 costs microseconds: remember recent answers (bounded)


def client_key(address: str) -> str:
    """What failures are counted against: the IPv4 address, or the IPv6 /64 (IPv4-mapped IPv6 as IPv4)."""
    if ":" not in address:
        return address
    key = _v6_keys.get(address)
    if key is None:
        try:
            ip = ipaddress.IPv6Address(address)
        except ValueError:
            return address[:64]
        key = str(ip.ipv4_mapped) if ip.ipv4_mapped else str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))
        if len(_v6_keys) >= 10_000:
            _v6_keys.clear()
        _v6_keys[address] = key
    return key


def parse_client(text: str) -> str:
    """An operator's way of naming a client (an address, or an IPv6 /64) as its key; ValueError otherwise."""
    if "/" in text:
        net = ipaddress.ip_network(text, strict=False)
        if net.prefixlen != net.max_prefixlen and not (net.version == 6 and net.prefixlen == 64):
            raise ValueError("only an address or an IPv6 /64 names one client")
        return client_key(str(net.network_address))
    return client_key(str(ipaddress.ip_address(text)))


@dataclass(frozen=True, slots=True)
class Policy:
    max_failures: int = 20  # 0: no brute-force protection
    window: float = 60.0
    block: float = 60.0
    max_block: float = 3600.0
    exempt: tuple[Network, ...] = ()
    exempt_deny: tuple[Network, ...] = ()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Policy:
        default = cls()
        return cls(
            max_failures=int(data.get("max_failures", default.max_failures)),
            window=float(data.get("window", default.window)),
            block=float(data.get("block", default.block)),
            max_block=float(data.get("max_block", default.max_block)),
            exempt=tuple(ipaddress.ip_network(c) for c in data.get("exempt") or ()),
            exempt_deny=tuple(ipaddress.ip_network(c) for c in data.get("exempt_deny") or ()),
        )

    def period(self, strikes: int) -> float:
        """Length of the `strikes`-th block in a row."""
        return min(self.block * 2 ** min(strikes - 1, 32), max(self.block, self.max_block))

    def exempts(self, address: str) -> bool:
        """In an exempt CIDR group (its allow list, not its deny list)."""
        return bool(self.exempt) and admits(address, self.exempt, self.exempt_deny)


@dataclass(slots=True)
class Entry:
    address: str  # the last address seen (exemption is decided on it)
    window_start: float
    failures: int = 0
    strikes: int = 0  # blocks in a row
    since: float = 0.0
    until: float = 0.0
    refused: int = 0  # requests refused during the current block


class FailureGuard:
    """Failure counters and blocks, owned by the gate's request thread (`BlockBoard` takes the lock too)."""

    def __init__(self, clock: Callable[[], float] = time.time):
        self.clock = clock
        self.policy = Policy()
        self._counting: OrderedDict[str, Entry] = OrderedDict()
        self._blocked: dict[str, Entry] = {}
        self._lock = threading.Lock()

    def check(self, address: str, policy: Policy) -> Entry | None:
        """The block in force for this address (its `refused` counted), or None. Called for every request."""
        if policy is not self.policy:
            self._adopt(policy)
        if not self._blocked:
            return None
        entry = self._blocked.get(client_key(address))
        if entry is None or self.clock() >= entry.until:
            return None
        entry.refused += 1
        return entry

    def failed(self, address: str, policy: Policy) -> Entry | None:
        """Count a failed authentication; return the block it starts, if it starts one."""
        if policy.max_failures <= 0 or policy.exempts(address):
            return None
        key = client_key(address)
        now = self.clock()
        with self._lock:
            entry = self._blocked.pop(key, None)  # a finished block not yet pruned
            if entry is not None:
                entry.failures = 0
            else:
                entry = self._counting.pop(key, None)
            if entry is None:
                entry = Entry(address, now)
            self._counting[key] = entry  # most recently failed last
            if len(self._counting) > MAX_COUNTING:
                self._counting.popitem(last=False)
            entry.address = address
            if entry.strikes and now - entry.until > policy.max_block:
                entry.strikes = 0  # quiet long enough: forgiven
            if now - entry.window_start >= policy.window:
                entry.window_start, entry.failures = now, 0
            entry.failures += 1
            if entry.failures < policy.max_failures:
                return None
            entry.strikes += 1
            entry.since, entry.until, entry.refused = now, now + policy.period(entry.strikes), 0
            entry.window_start = entry.until  # counting starts afresh when the block ends
            del self._counting[key]
            self._blocked[key] = entry
            if len(self._blocked) > MAX_BLOCKED:
                del self._blocked[next(iter(self._blocked))]
            return entry

    def clear(self, keys: Iterable[str] | None = None) -> list[str]:
        """Lift blocks and forget failures: of these clients, or of every client. Returns the blocks lifted."""
        with self._lock:
            now = self.clock()
            if keys is None:
                lifted = [k for k, e in self._blocked.items() if now < e.until]
                self._blocked.clear()
                self._counting.clear()
                return lifted
            lifted = []
            for key in keys:
                entry = self._blocked.pop(key, None)
                if entry is not None and now < entry.until:
                    lifted.append(key)
                self._counting.pop(key, None)
            return lifted

    def rows(self) -> list[dict[str, Any]]:
        """The newest `MAX_LISTED` blocks in force, oldest first (a listing, rewritten every second, stays small);
        finished blocks go back to counting, their strikes remembered."""
        with self._lock:
            now = self.clock()
            for key in [k for k, e in self._blocked.items() if now >= e.until]:
                entry = self._blocked.pop(key)
                entry.failures = 0
                self._counting[key] = entry
                self._counting.move_to_end(key, last=False)  # first to go when space runs out
            if len(self._counting) > MAX_COUNTING:
                for _ in range(len(self._counting) - MAX_COUNTING):
                    self._counting.popitem(last=False)
            newest = list(itertools.islice(reversed(self._blocked.items()), MAX_LISTED))[::-1]
            return [{"address": k, "since": round(e.since, 3), "until": round(e.until, 3), "blocks": e.strikes,
                     "failures": e.failures, "refused": e.refused} for k, e in newest]

    def _adopt(self, policy: Policy) -> None:
        """A new snapshot: lift blocks the new policy no longer wants (protection off, address exempt)."""
        if policy != self.policy:
            with self._lock:
                if policy.max_failures <= 0:
                    self._blocked.clear()
                    self._counting.clear()
                else:
                    for key in [k for k, e in self._blocked.items() if policy.exempts(e.address)]:
                        del self._blocked[key]
        self.policy = policy


class BlockBoard(threading.Thread):
    """Publishes the guard's blocks to `run/blocks.json` and applies clear requests from `run/blocks-clear/`."""

    def __init__(self, guard: FailureGuard, run_dir: Path):
        super().__init__(name="bruteforce-board", daemon=True)
        self.guard = guard
        self.blocks_file = run_dir / BLOCKS_FILE
        self.clear_dir = run_dir / CLEAR_DIR
        self.stopping = threading.Event()
        self._published: bytes | None = None
        self._known: dict[tuple[str, float], dict[str, Any]] = {}
        self._next_publish = 0.0

    def run(self) -> None:
        failure = ""
        try:  # a new gate process holds no blocks: requests left by the previous one are void
            self.clear_dir.mkdir(mode=0o700, exist_ok=True)
            for name in os.listdir(self.clear_dir):
                (self.clear_dir / name).unlink(missing_ok=True)
        except OSError as e:
            logger.error("brute-force board: cannot prepare %s: %s", self.clear_dir, e)
        while not self.stopping.wait(POLL_INTERVAL):
            try:
                self.step()
                failure = ""
            except Exception as e:  # the board outlives any bad file or full disk; one line per new problem
                if str(e) != failure:
                    logger.exception("brute-force board: publishing blocks failed")
                failure = str(e)

    def step(self) -> None:
        if self.apply_clears():
            self._next_publish = 0.0
        if time.monotonic() >= self._next_publish:
            self._next_publish = time.monotonic() + PUBLISH_INTERVAL
            self.publish()

    def apply_clears(self) -> bool:
        try:
            names = [n for n in os.listdir(self.clear_dir) if n.endswith(".json") and not n.startswith(".")]
        except FileNotFoundError:
            return False
        for name in sorted(names):
            path = self.clear_dir / name
            try:
                request = json.loads(path.read_bytes())
                everything = request.get("all") is True
                clients = None if everything else [parse_client(str(a)) for a in request.get("addresses", [])]
            except (OSError, ValueError, AttributeError) as e:
                logger.warning("brute-force board: ignoring clear request %s: %s", name, e)
            else:
                lifted = self.guard.clear(clients)
                for key in lifted:
                    logger.warning("brute-force block of %s cleared by %s", key, request.get("author", "an admin"))
            path.unlink(missing_ok=True)
        return bool(names)

    def publish(self) -> None:
        rows = self.guard.rows()
        current = {(r["address"], r["since"]): r for r in rows}
        for ident, row in current.items():
            if ident not in self._known:
                logger.warning("brute-force block: %s refused until %s (%.0f s, block %d in a row)", row["address"],
                               time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(row["until"])),
                               row["until"] - row["since"], row["blocks"])
        for ident, row in self._known.items():
            if ident not in current:
                logger.info("brute-force block of %s ended; %d requests refused during it (last count)",
                            row["address"], row["refused"])
        self._known = current
        data = json.dumps({"blocks": rows}, sort_keys=True).encode()
        if data != self._published:
            write_atomic(self.blocks_file, data, durable=False)  # a status report, rebuilt each second
            self._published = data
