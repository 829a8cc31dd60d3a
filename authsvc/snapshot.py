"""The gate's in-memory view of keys, pools and routes, rebuilt when the manager publishes a new snapshot.

The manager writes `snapshot.json` atomically; the gate looks at the file's stat at most every
`CHECK_INTERVAL` seconds (never per request) and swaps in a fully built `Snapshot`, so a key created, disabled
or revoked takes effect within that interval plus one request.
"""

from __future__ import annotations

import ipaddress
import json
import os
import time
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from authsvc.bruteforce import Policy

CHECK_INTERVAL = 0.25
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
    _model_cache: dict[str, bool] = field(default_factory=dict)

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
        if not self.networks and not self.denied:
            return True
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        if any(ip in net for net in self.denied):
            return False
        return not self.networks or any(ip in net for net in self.networks)


@dataclass(slots=True)
class Snapshot:
    keys: dict[str, KeyRule] = field(default_factory=dict)
    routes: dict[str, tuple[str, ...]] = field(default_factory=dict)  # explicit routes by exact model name
    glob_routes: tuple[tuple[str, tuple[str, ...]], ...] = ()
    served: dict[str, tuple[str, ...]] = field(default_factory=dict)  # the pools' own model lists
    models: tuple[tuple[str, str], ...] = ()  # (model id, owning pool) for /v1/models
    default_pool: str | None = None
    bruteforce: Policy = field(default_factory=Policy)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Snapshot:
        keys = {
            k["id"]: KeyRule(
                id=k["id"],
                digest=k["digest"],
                name=k.get("name", ""),
                enabled=bool(k.get("enabled", True)),
                expires=k.get("expires"),
                models=tuple(k.get("models") or ()),
                endpoints=tuple(k.get("endpoints") or ()),
                rpm=int(k.get("rpm") or 0),
                networks=tuple(ipaddress.ip_network(c) for c in k.get("cidrs") or ()),
                denied=tuple(ipaddress.ip_network(c) for c in k.get("deny_cidrs") or ()),
            )
            for k in data.get("keys", [])
        }
        routes: dict[str, tuple[str, ...]] = {}
        globs: list[tuple[str, tuple[str, ...]]] = []
        for route in data.get("routes", []):
            if any(c in route["model"] for c in "*?["):
                globs.append((route["model"], tuple(route["pools"])))
            else:
                routes[route["model"]] = tuple(route["pools"])
        served: dict[str, list[str]] = {}
        for pool in data.get("pools", []):
            for model in pool.get("models", []):
                served.setdefault(model, []).append(pool["name"])
        pool_names = [p["name"] for p in data.get("pools", [])]
        snapshot = cls(
            keys=keys,
            routes=routes,
            glob_routes=tuple(globs),
            served={m: tuple(p) for m, p in served.items()},
            default_pool=data.get("default_pool") or (pool_names[0] if pool_names else None),
            bruteforce=Policy.from_dict(data.get("bruteforce") or {}),
        )
        # every exactly named model, owned by the pool its requests would go to
        snapshot.models = tuple(sorted((m, snapshot.pools_for(m)[0]) for m in {*served, *routes}))
        return snapshot

    def pools_for(self, model: str) -> tuple[str, ...]:
        """Explicit routes first (exact, then globs in order), then the pools that list the model."""
        variants = model_variants(model)
        for variant in variants:
            if pools := self.routes.get(variant):
                return pools
        for pattern, pools in self.glob_routes:
            if any(fnmatchcase(variant, pattern) for variant in variants):
                return pools
        for variant in variants:
            if pools := self.served.get(variant):
                return pools
        return ()

    def model_entry(self, model: str) -> tuple[str, str] | None:
        """(listed id, owning pool) for /v1/models/<id>, Ollama short names included."""
        owners = dict(self.models)
        for variant in model_variants(model):
            if variant in owners:
                return variant, owners[variant]
        return None


class SnapshotSource:
    """Holds the current snapshot and reloads it when the file changes (checked at most every 0.25 s)."""

    def __init__(self, path: Path, clock=time.monotonic):
        self.path = path
        self._clock = clock
        self._stamp: tuple[int, int, int] | None = None
        self._next_check = 0.0
        self.snapshot = Snapshot()
        self.refresh(force=True)

    def refresh(self, force: bool = False) -> Snapshot:
        now = self._clock()
        if not force and now < self._next_check:
            return self.snapshot
        self._next_check = now + CHECK_INTERVAL
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return self.snapshot
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            try:
                self.snapshot = Snapshot.from_dict(json.loads(self.path.read_bytes()))
                self._stamp = stamp
            except (ValueError, KeyError, TypeError) as e:  # keep serving the last good snapshot
                print(f"authsvc: ignoring unreadable snapshot {self.path}: {e}", flush=True)
        return self.snapshot
