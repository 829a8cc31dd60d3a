"""The gate's in-memory view of keys, pools and routes, kept up to date from two sources.

Pools, routes and CIDR groups: the manager writes `snapshot.json` atomically; the gate looks at the file's stat
at most every `CHECK_INTERVAL` seconds (never per request) and swaps in a fully built `Snapshot`.
Keys: the manager writes them to `keys.sqlite3` (manager.keystore), stamping every written row with a growing
`version`. At most every `CHECK_INTERVAL` seconds the gate asks SQLite whether anything was committed (`PRAGMA
data_version`, no file read) and, if so, loads only the rows above the last version it saw. So a key created,
disabled or revoked takes effect within that interval plus one request, at a cost independent of the number of
keys; a CIDR group change re-resolves only the keys in memory. Whatever cannot be read, the last good view stays.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from authsvc import balance, model_lists
from authsvc.anonymous import DEFAULT_RPM as DEFAULT_UNAUTHENTICATED_RPM
from authsvc.bruteforce import Policy
from authsvc.files import write_atomic
from authsvc.networks import Network, admits
from authsvc.quotas import FIELDS as QUOTA_FIELDS
from authsvc.routes import PassThrough

log = logging.getLogger(__name__)

CHECK_INTERVAL = 0.25
STATUS_FILE = "gate-status.json"  # in the run dir: what the gate serves, for the manager's health check
NO_KEY_STORE = "no key store yet"  # not a problem: no key was ever created
KEYS_DB = "keys.sqlite3"  # next to snapshot.json
Groups = dict[str, tuple[tuple[Network, ...], tuple[Network, ...]]]  # name -> (allow, deny)
# a group a key names but the snapshot lacks (e.g. after a rollback) denies everything: never silently open
UNKNOWN_GROUP = ((), (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")))
OLLAMA_ADMIN_PREFIXES = ("/api/pull", "/api/push", "/api/delete", "/api/create", "/api/copy", "/api/blobs")


def model_variants(model: str) -> tuple[str, ...]:
    """Ollama treats `llama3` and `llama3:latest` as one model."""
    if model.endswith(":latest"):
        return (model, model[: -len(":latest")])
    if ":" not in model:
        return (model, model + ":latest")
    return (model,)


@dataclass(slots=True)
class KeyRule:
    id: str
    digest: str
    name: str
    enabled: bool
    expires: float | None
    models: tuple[str, ...]
    endpoints: tuple[str, ...]
    rpm: int
    networks: tuple[Any, ...]
    denied: tuple[Any, ...] = ()
    cidrs: tuple[Network, ...] = ()  # the key's own networks; `networks` adds its groups' allow lists
    cidr_groups: tuple[str, ...] = ()
    # quotas (None: unlimited), enforced with the manager's consumption figures (authsvc/quotas.py)
    tpm: int | None = None
    tokens_per_day: int | None = None
    tokens_per_month: int | None = None
    requests_per_day: int | None = None
    quotas: bool = False  # any of them: the only test a key without quotas costs per request
    # traffic (authsvc/aliases.py): concurrent requests (enforced by nginx), the model of a body without one,
    # whether `"model": "auto"` resolves
    max_parallel: int | None = None
    default_model: str | None = None
    allow_auto: bool = False
    _model_cache: dict[str, bool] = field(default_factory=dict)
    # SHA-256 of the last secret that matched `digest` (authsvc.gate.Gate.identify): a repeat skips the HMAC
    seen: bytes = field(default=b"", compare=False, repr=False)

    @property
    def token_quota(self) -> bool:
        """A quota that counts tokens: its streams must report usage (authsvc/include_usage.py)."""
        return self.quotas and (self.tpm is not None or self.tokens_per_day is not None
                                or self.tokens_per_month is not None)

    @classmethod
    def from_row(cls, row: Mapping[str, Any], groups: Groups) -> KeyRule:
        """A key as the key store holds it (lists as JSON text), its groups resolved with `groups`."""
        rule = cls(
            id=row["id"],
            digest=row["digest"],
            name=row["name"],
            enabled=bool(row["enabled"]),
            expires=row["expires"],
            models=tuple(json.loads(row["models"])),
            endpoints=tuple(json.loads(row["endpoints"])),
            rpm=int(row["rpm"] or 0),
            networks=(),
            cidrs=tuple(ipaddress.ip_network(c) for c in json.loads(row["cidrs"])),
            cidr_groups=tuple(json.loads(row["cidr_groups"])),
        )
        columns = row.keys()  # a key store not yet migrated by the manager has no quota columns
        for name in QUOTA_FIELDS:
            if name in columns and row[name] is not None:
                setattr(rule, name, int(row[name]))
                rule.quotas = True
        if "max_parallel" in columns:  # schema 3
            rule.max_parallel = row["max_parallel"]
            rule.default_model = row["default_model"]
            rule.allow_auto = bool(row["allow_auto"])
        rule.resolve_groups(groups)
        return rule

    def resolve_groups(self, groups: Groups) -> None:
        """Allowed: the key's own networks plus its groups' allow lists; denied: its groups' deny lists."""
        allow, deny = list(self.cidrs), []
        for name in self.cidr_groups:
            group_allow, group_deny = groups.get(name, UNKNOWN_GROUP)
            allow += [n for n in group_allow if n not in allow]
            deny += [n for n in group_deny if n not in deny]
        self.networks, self.denied = tuple(allow), tuple(deny)

    def allows_model(self, model: str) -> bool:
        if not self.models:
            return True
        allowed = self._model_cache.get(model)
        if allowed is None:
            allowed = any(fnmatchcase(v, p) for v in model_variants(model) for p in self.models)
            if len(self._model_cache) < 10_000:
                self._model_cache[model] = allowed
        return allowed

    def allows_endpoint(self, path: str) -> bool:
        if not self.endpoints:  # default: everything but Ollama's model-management routes
            return not path.startswith(OLLAMA_ADMIN_PREFIXES)
        return any(fnmatchcase(path, p) for p in self.endpoints)

    def allows_address(self, address: str) -> bool:
        """Refused when a deny network matches; else allowed when there is no allow list or one matches."""
        return (not self.networks and not self.denied) or admits(address, self.networks, self.denied)


@dataclass(slots=True)
class Snapshot:
    keys: dict[str, KeyRule] = field(default_factory=dict)
    groups: Groups = field(default_factory=dict)
    routes: dict[str, tuple[str, ...]] = field(default_factory=dict)  # explicit routes by exact model name
    glob_routes: tuple[tuple[str, tuple[str, ...]], ...] = ()
    served: dict[str, tuple[str, ...]] = field(default_factory=dict)  # the pools' own model lists
    default_pool: str | None = None
    bruteforce: Policy = field(default_factory=Policy)
    usage_pools: frozenset[str] = frozenset()  # pools asked for stream usage (authsvc/include_usage.py)
    passthrough: PassThrough = field(default_factory=PassThrough)  # pools' extra upstream paths (routes.py)
    unauthenticated_rpm: int = DEFAULT_UNAUTHENTICATED_RPM  # per address, requests without a valid key
    balanced: frozenset[str] = frozenset()  # routes (exact or glob) whose requests start at each pool in turn
    websocket_pools: frozenset[str] = frozenset()  # pools that pass WebSocket upgrades (realtime APIs)
    aliases: dict[tuple[str, str], str] = field(default_factory=dict)  # (pool, public name) -> upstream name
    live: frozenset[str] = frozenset()  # pools with an upstream the health checks have not marked down
    auto_models: tuple[str, ...] = ()  # what "model": "auto" may resolve to, in order
    body_edits: bool = False  # nginx can edit request bodies (njs): aliases, default models and auto work
    lists: model_lists.ModelLists = field(default_factory=model_lists.ModelLists)  # APIs, lists the gate serves
    # model-aware pools: the upstreams the gate picks among (authsvc/balance.py)
    balance: dict[str, tuple[balance.Choice, ...]] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Snapshot:
        """Pools, routes and CIDR groups from snapshot.json; keys are filled in by `SnapshotSource`."""
        groups = {name: (tuple(ipaddress.ip_network(c) for c in g["allow"]),
                         tuple(ipaddress.ip_network(c) for c in g["deny"]))
                  for name, g in data.get("cidr_groups", {}).items()}
        routes: dict[str, tuple[str, ...]] = {}
        globs: list[tuple[str, tuple[str, ...]]] = []
        balanced = frozenset(r["model"] for r in data.get("routes", []) if r.get("mode") == "balance")
        for route in data.get("routes", []):
            if any(c in route["model"] for c in "*?["):
                globs.append((route["model"], tuple(route["pools"])))
            else:
                routes[route["model"]] = tuple(route["pools"])
        served: dict[str, list[str]] = {}
        aliases: dict[tuple[str, str], str] = {}
        for pool in data.get("pools", []):
            for model in pool.get("models", []):
                served.setdefault(model, []).append(pool["name"])
            for public, upstream in pool.get("aliases", {}).items():  # a public name the pool serves too
                aliases[(pool["name"], public)] = upstream
                if pool["name"] not in served.get(public, ()):
                    served.setdefault(public, []).append(pool["name"])
        pool_names = [p["name"] for p in data.get("pools", [])]
        snapshot = cls(
            groups=groups,
            routes=routes,
            glob_routes=tuple(globs),
            served={m: tuple(p) for m, p in served.items()},
            default_pool=data.get("default_pool") or (pool_names[0] if pool_names else None),
            bruteforce=Policy.from_dict(data.get("bruteforce") or {}),
            usage_pools=frozenset(p["name"] for p in data.get("pools", []) if p.get("include_usage", True)),
            passthrough=PassThrough((p["name"], p.get("passthrough") or ()) for p in data.get("pools", [])),
            unauthenticated_rpm=int(data.get("unauthenticated_rpm", DEFAULT_UNAUTHENTICATED_RPM)),
            balanced=balanced,
            websocket_pools=frozenset(p["name"] for p in data.get("pools", []) if p.get("websocket")),
            aliases=aliases,
            live=frozenset(p["name"] for p in data.get("pools", []) if p.get("live", True)),
            auto_models=tuple(data.get("auto_models", ())),
            body_edits=bool(data.get("body_edits", False)),
            balance={p["name"]: tuple(balance.Choice(int(c["index"]), str(c["url"]), bool(c["live"]))
                                      for c in p["balance"])
                     for p in data.get("pools", []) if p.get("balance")},
        )
        # every exactly named model, listed with the pool its requests would go to
        snapshot.lists = model_lists.build(data, {*served, *routes}, snapshot.pools_for, snapshot.default_pool,
                                           model_variants)
        return snapshot

    def pools_for(self, model: str) -> tuple[str, ...]:
        """Explicit routes first (exact, then globs in order), then the pools that list the model."""
        return self.route_for(model)[0]

    def route_for(self, model: str) -> tuple[tuple[str, ...], bool]:
        """The pools for `model` (see `pools_for`) and whether its route balances across them."""
        variants = model_variants(model)
        for variant in variants:
            if pools := self.routes.get(variant):
                return pools, variant in self.balanced
        for pattern, pools in self.glob_routes:
            if any(fnmatchcase(variant, pattern) for variant in variants):
                return pools, pattern in self.balanced
        for variant in variants:
            if pools := self.served.get(variant):
                return pools, False
        return (), False

    def alias_for(self, pool: str, model: str) -> str | None:
        """The upstream name of `model` in `pool` when it is one of the pool's aliases (Ollama short names
        included), else None."""
        if not self.aliases:
            return None
        for variant in model_variants(model):
            if (upstream := self.aliases.get((pool, variant))) is not None:
                return upstream
        return None


class KeyFeed:
    """Key rows from the key store, read incrementally on one read-only connection kept open.

    `poll()` returns None when nothing was committed since the last call (or the store cannot be read: the
    caller keeps what it has), else `(whole, rows)`: the rows written since, or all rows when `whole` (first
    read, or the file was replaced or restored, so versions started again).
    """

    def __init__(self, path: Path):
        self.path = path
        self.version = 0
        self._db: sqlite3.Connection | None = None
        self._inode = 0
        self._data_version: int | None = None
        self.problem = ""

    def poll(self) -> tuple[bool, list[sqlite3.Row]] | None:
        try:
            inode = os.stat(self.path).st_ino
            if self._db is None or inode != self._inode:
                self._open(inode)
            whole = self.version == 0  # first read, or another file: everything is read
            assert self._db is not None
            # read before the rows: a commit in between is seen now and again (harmlessly) next time
            data_version = self._db.execute("PRAGMA data_version").fetchone()[0]
            if data_version == self._data_version:
                return None
            if self._db.execute("SELECT version FROM meta").fetchone()[0] < self.version:
                whole, self.version = True, 0  # an older copy was put back
            rows = self._db.execute("SELECT * FROM keys WHERE version > ? ORDER BY version",
                                    (self.version,)).fetchall()
        except FileNotFoundError:  # no key created yet (or the file was moved away)
            self._inode = 0  # a file created later may get the same inode number: it is another file
            self._fail(NO_KEY_STORE, logging.INFO)
            return None
        except (OSError, sqlite3.Error) as e:
            if isinstance(e, sqlite3.DatabaseError) and not isinstance(e, sqlite3.OperationalError):
                self._inode = 0  # not a key store at all (e.g. overwritten): whatever comes next is read whole
            self._fail(f"{type(e).__name__}: {e}", logging.WARNING)
            return None
        self._data_version = data_version
        if rows:
            self.version = rows[-1]["version"]
        if self.problem:
            log.info("key store %s readable again", self.path)
            self.problem = ""
        return whole, rows

    def _open(self, inode: int) -> None:
        self.close()
        db = sqlite3.connect(self.path.resolve().as_uri() + "?mode=ro", uri=True, isolation_level=None,
                             check_same_thread=False)  # opened by whichever thread refreshes first
        db.row_factory = sqlite3.Row
        if inode != self._inode:  # reopening the same file after a read error keeps its version: no full reload
            self.version = 0
        self._db, self._inode, self._data_version = db, inode, None

    def _fail(self, problem: str, level: int) -> None:
        self.close()
        if problem != self.problem:  # once per distinct problem, not every check
            log.log(level, "key store %s unreadable, keeping the keys already loaded: %s", self.path, problem)
            self.problem = problem

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


class SnapshotSource:
    """Holds the current snapshot and reloads it when the file changes (checked at most every 0.25 s)."""

    def __init__(self, path: Path, keys_path: Path | None = None, clock=time.monotonic):
        self.path = path
        self.feed = KeyFeed(keys_path or path.with_name(KEYS_DB))
        self._clock = clock
        self._stamp: tuple[int, int, int] | None = None
        self._bad_stamp: tuple[int, int, int] | None = None
        self.problem = ""  # why the snapshot file cannot be read ("" when it can)
        self._next_check = 0.0
        self.snapshot = Snapshot()
        self.refresh(force=True)

    def status(self) -> dict[str, Any]:
        """What the gate serves, for the manager's health check: a problem means changes are not taking effect."""
        keys_problem = self.feed.problem if self.feed.problem != NO_KEY_STORE else ""
        return {"snapshot_problem": self.problem or None, "keys_problem": keys_problem or None,
                "key_version": self.feed.version}

    def refresh(self, force: bool = False) -> Snapshot:
        now = self._clock()
        if not force and now < self._next_check:
            return self.snapshot
        self._next_check = now + CHECK_INTERVAL
        self._load_file()
        self._load_keys()
        return self.snapshot

    def _load_file(self) -> None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp not in (self._stamp, self._bad_stamp):  # a bad file is read (and reported) once
            try:
                snapshot = Snapshot.from_dict(json.loads(self.path.read_bytes()))
                self._stamp, self.problem = stamp, ""
            except (OSError, ValueError, KeyError, TypeError) as e:  # keep serving the last good snapshot
                self._bad_stamp, self.problem = stamp, f"{type(e).__name__}: {e}"
                log.error("ignoring unreadable snapshot %s (serving the last good one): %s", self.path, e)
                return
            snapshot.keys = self.snapshot.keys
            if snapshot.groups != self.snapshot.groups:  # rare: re-resolve the keys that name groups
                for rule in snapshot.keys.values():
                    if rule.cidr_groups:
                        rule.resolve_groups(snapshot.groups)
            self.snapshot = snapshot

    def _load_keys(self) -> None:
        changes = self.feed.poll()
        if changes is None:
            return
        whole, rows = changes
        keys = {} if whole else self.snapshot.keys
        for row in rows:
            keys.pop(row["id"], None)
            if row["revoked_at"] is not None:
                continue
            try:
                keys[row["id"]] = KeyRule.from_row(row, self.snapshot.groups)
            except (ValueError, KeyError, TypeError) as e:  # refuse that key rather than guess
                log.warning("key %s unreadable in %s, refused until fixed: %s", row["id"], self.feed.path, e)
        self.snapshot.keys = keys


class StatusBoard(threading.Thread):
    """Publishes `SnapshotSource.status()` to `run/gate-status.json` when it changes (checked every second, off
    the request path), so the manager can raise the alarm when changes stop reaching the gate; with it the
    gate's decision counts since it started (`decisions`, for /metrics)."""

    def __init__(self, source: SnapshotSource, run_dir: Path, decisions: Mapping[str, int] | None = None,
                 more: Callable[[], dict[str, Any]] = dict):
        super().__init__(name="gate-status", daemon=True)
        self.source = source
        self.more = more  # other parts' status (the quota figures)
        self.path = run_dir / STATUS_FILE
        self.decisions = decisions
        self._published: bytes | None = None

    def status(self) -> dict[str, Any]:
        status = {**self.source.status(), **self.more()}
        if self.decisions is not None:
            status["decisions"] = dict(self.decisions)  # a copy made in C: the request thread goes on counting
        return status

    def run(self) -> None:
        while True:
            self.publish()
            time.sleep(1.0)

    def publish(self) -> None:
        data = json.dumps(self.status(), sort_keys=True).encode()
        if data != self._published:
            try:
                write_atomic(self.path, data, durable=False)
                self._published = data
            except OSError as e:  # a full disk: try again in a second
                log.debug("gate status not written: %s", e)
