"""The APIs each pool speaks and the model lists the gate answers itself: /v1/models, /v1/models/<id>,
/api/tags, /api/ps, /api/version.

A pool speaks `openai`, `ollama` or both (manager/discovery.py detects it, the operator may say so): /api/*
requests go only to pools that speak Ollama, /v1/* only to pools that speak OpenAI. The list entries are made
once per snapshot, when a list is first asked for, with the details the upstreams reported: a request filters
them by the key's allow-list and encodes them, as before; an unrestricted key gets the whole body, encoded once.

/api/ps: the gate does no I/O per request, so the manager polls the Ollama upstreams' /api/ps and writes the
running models to `run/ollama-ps.json` (manager/running.py); a `Reloader` thread (authsvc/files.py) loads
that file when it changes, off the request path (docs/decisions.md, decision 34).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from authsvc import balance
from authsvc.files import WatchedFile

log = logging.getLogger(__name__)

OPENAI, OLLAMA = "openai", "ollama"
BOTH = frozenset((OPENAI, OLLAMA))
# answered by /api/version when no Ollama upstream reported its own: a version whose API shape Bastion relays
FALLBACK_VERSION = "0.6.0"
RUNNING_FILE = "ollama-ps.json"  # in the run dir
CHECK_INTERVAL = 0.25
Allows = Callable[[str], bool] | None  # the key's model check; None: the key may use every model


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


_encoder = json.JSONEncoder(separators=(",", ":"))  # one encoder: json.dumps with options makes one per call


def dumps(value: Any) -> bytes:
    return _encoder.encode(value).encode()


@dataclass(slots=True)
class Listing:
    """A list answer: its entries, and the whole body for keys that may use every model, made once, when first
    asked (not while the snapshot loads: most snapshots are replaced before anyone lists models)."""
    wrap: Callable[[list[dict[str, Any]]], dict[str, Any]]
    entries: tuple[tuple[str, dict[str, Any]], ...] = ()
    whole: bytes | None = None

    @classmethod
    def of(cls, wrap: Callable[[list[dict[str, Any]]], dict[str, Any]],
           entries: Iterable[tuple[str, dict[str, Any]]]) -> Listing:
        return cls(wrap, tuple(entries))

    def body(self, allows: Allows) -> bytes:
        if allows is None:
            if self.whole is None:
                self.whole = dumps(self.wrap([e for _, e in self.entries]))
            return self.whole
        return dumps(self.wrap([e for m, e in self.entries if allows(m)]))


def openai_list(entries: Iterable[tuple[str, dict[str, Any]]]) -> Listing:
    return Listing.of(lambda data: {"object": "list", "data": data}, entries)


def ollama_list(entries: Iterable[tuple[str, dict[str, Any]]]) -> Listing:
    return Listing.of(lambda models: {"models": models}, entries)


@dataclass(slots=True)
class Lists:
    openai: Listing
    by_id: dict[str, dict[str, Any]]  # /v1/models/<id>
    tags: Listing
    ollama_names: frozenset[str]  # the models /api/* can reach, Ollama short names included


@dataclass(slots=True)
class ModelLists:
    """Routing by API, and the lists: made when first asked for, not while the snapshot loads (loading runs on
    the request path; most snapshots are replaced before anyone lists models)."""
    kinds: dict[str, frozenset[str]] = field(default_factory=dict)  # pool -> APIs; a pool not named: both
    mixed: bool = False  # some pool does not speak both: routing filters pools
    defaults: dict[str, str | None] = field(default_factory=dict)  # API -> pool for requests without a model
    version: bytes = dumps({"version": FALLBACK_VERSION})
    make: Callable[[], Lists] = lambda: Lists(openai_list(()), {}, ollama_list(()), frozenset())
    _lists: Lists | None = None

    @property
    def lists(self) -> Lists:
        if self._lists is None:
            self._lists = self.make()
        return self._lists

    @property
    def openai(self) -> Listing:
        return self.lists.openai

    @property
    def tags(self) -> Listing:
        return self.lists.tags

    def speaking(self, pools: tuple[str, ...], ollama: bool) -> tuple[str, ...]:
        """The pools (in order) that speak the request's API."""
        if not self.mixed:
            return pools
        kind = OLLAMA if ollama else OPENAI
        return tuple(p for p in pools if kind in self.kinds.get(p, BOTH))

    def default(self, ollama: bool, default_pool: str | None) -> str | None:
        return self.defaults.get(OLLAMA if ollama else OPENAI, default_pool) if self.mixed else default_pool

    def speaks_ollama(self, pool: str) -> bool:
        return OLLAMA in self.kinds.get(pool, BOTH)

    def model(self, wanted: str, variants: Callable[[str], tuple[str, ...]], allows: Allows) -> bytes | None:
        """The /v1/models/<id> entry (Ollama short names included), None when unknown or not allowed."""
        for variant in variants(wanted):
            entry = self.lists.by_id.get(variant)
            if entry is not None:
                return dumps(entry) if allows is None or allows(variant) else None
        return None


def build(data: dict[str, Any], names: Iterable[str], pools_for: Callable[[str], tuple[str, ...]],
          default_pool: str | None, variants: Callable[[str], tuple[str, ...]]) -> ModelLists:
    """The lists for snapshot.json's pools; `names`: every exactly named model (served or routed)."""
    pools = {p["name"]: p for p in data.get("pools", [])}
    kinds = {name: frozenset(p.get("kinds") or BOTH) & BOTH or BOTH for name, p in pools.items()}
    lists = ModelLists(kinds=kinds, mixed=any(k != BOTH for k in kinds.values()))
    order = ([default_pool] if default_pool in pools else []) + list(pools)
    lists.defaults = {kind: next((p for p in order if kind in kinds[p]), None) for kind in BOTH}
    names = sorted(names)

    def make() -> Lists:
        for pool in pools.values():
            pool["modified_at"] = iso(pool.get("created", 0))  # once per pool, not per model
        openai, tags, by_id = [], [], {}
        for model in names:
            routed = pools_for(model)
            for_openai = lists.speaking(routed, ollama=False)
            if for_openai:
                entry = openai_entry(model, pools.get(for_openai[0], {"name": for_openai[0]}), variants)
                openai.append((model, entry))
                by_id[model] = entry
            for_ollama = lists.speaking(routed, ollama=True)
            if for_ollama:
                pool = pools.get(for_ollama[0], {"name": for_ollama[0]})
                tags.append((model, ollama_entry(model, pool, variants)))
        reachable = frozenset(v for model, _ in tags for v in variants(model))
        return Lists(openai_list(openai), by_id, ollama_list(tags), reachable)

    lists.make = make
    versions = [p["version"] for name, p in pools.items()
                if OLLAMA in kinds[name] and isinstance(p.get("version"), str)]
    if versions:
        lists.version = dumps({"version": min(versions, key=version_key)})
    return lists


def details_of(pool: dict[str, Any], kind: str, model: str, variants: Callable[[str], tuple[str, ...]]
               ) -> dict[str, Any]:
    known = pool.get(kind)
    if not known:
        return {}
    found = known.get(model)
    return found if found is not None else next((known[v] for v in variants(model) if v in known), {})


def openai_entry(model: str, pool: dict[str, Any], variants: Callable[[str], tuple[str, ...]]) -> dict[str, Any]:
    """As the upstream lists it (`created`, `owned_by`); else created with the pool, owned by the pool."""
    info = details_of(pool, OPENAI, model, variants)
    return {"id": model, "object": "model", "created": info.get("created", pool.get("created", 0)),
            "owned_by": info.get("owned_by", pool["name"])}


def ollama_entry(model: str, pool: dict[str, Any], variants: Callable[[str], tuple[str, ...]]) -> dict[str, Any]:
    """As the upstream's /api/tags has it; a model it did not list gets the pool's creation date and no details."""
    info = details_of(pool, OLLAMA, model, variants)
    return {"name": model, "model": model, "modified_at": info.get("modified_at") or pool.get("modified_at")
            or iso(pool.get("created", 0)),
            "size": info.get("size", 0), "digest": info.get("digest", ""), "details": info.get("details", {})}


def version_key(version: str) -> tuple[int, ...]:
    """Numeric order of `0.6.10` and the like (what follows a '-' is ignored)."""
    return tuple(int(n) for n in version.split("-", 1)[0].split("+", 1)[0].split(".")[:4] if n.isdigit())


class RunningFile(WatchedFile):
    """The Ollama upstreams' running models as the manager last polled them ({"pools": {pool: [entry...]},
    "upstreams": {url: {"models": [...], "waiting": n}}}), re-read only when the file changed."""

    what = "running models"

    def __init__(self, path: Path):
        super().__init__(path)
        self.entries: tuple[tuple[str, str, bytes], ...] = ()  # (pool, model, JSON entry)
        # per upstream URL: models loaded and requests waiting, for model-aware pools (authsvc/balance.py)
        self.loads: dict[str, balance.Load] = {}
        self.generation = 0  # one more at every load that changed anything

    def take(self, data: bytes) -> None:
        parsed = json.loads(data)
        entries = tuple((pool, entry["name"], dumps(entry)) for pool, running in parsed["pools"].items()
                        for entry in running)
        loads = {url: balance.Load(frozenset(load["models"]), int(load.get("waiting") or 0))
                 for url, load in parsed.get("upstreams", {}).items()}
        # reference swaps: the request thread sees the old or the new, the figures before their generation
        self.entries, self.loads = entries, loads
        self.generation += 1

    def body(self, lists: ModelLists, allows: Allows) -> bytes:
        """/api/ps: the running models of the pools that speak Ollama now, each model once, for the key; only
        models a client can reach through Bastion (not whatever else an upstream has loaded)."""
        seen: set[str] = set()
        out = []
        reachable = lists.lists.ollama_names if self.entries else frozenset()
        for pool, model, entry in self.entries:
            if (model not in seen and model in reachable and lists.speaks_ollama(pool)
                    and (allows is None or allows(model))):
                seen.add(model)
                out.append(entry)
        return b'{"models":[' + b",".join(out) + b"]}"
