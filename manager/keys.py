"""API keys: create (secret shown once), list (masked), enable/disable, revoke, edit.

Keys live in the key store (manager.keystore, SQLite), not in store.json: each write is one short transaction,
independent of how many keys exist, and reaches the gate within a second without a snapshot rebuild. Keys are
never part of a configuration rollback.
"""

from __future__ import annotations

import time
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any

from authsvc import keys as keyformat
from authsvc.aliases import AUTO
from manager import cidr_groups, metering, usage_queries
from manager import validation as v
from manager.errors import NotFound
from manager.keystore import QUOTA_FIELDS

if TYPE_CHECKING:
    from manager.context import Bastion

QUOTA_MAX = 10**15  # tokens or requests; a bound only so that nothing overflows
MAX_PARALLEL = 10_000  # concurrent requests of one key
MAX_PARALLEL_VALUES = 64  # distinct max_parallel values in use: nginx has one connection zone per value


def quota(field: str, value: Any) -> int | None:
    """A quota: a positive integer, or None (null) for unlimited."""
    if value is None:
        return None
    if isinstance(value, str) and value.strip().lower() in ("none", "null", "unlimited"):
        return None
    try:
        return v.integer(field, value, 1, QUOTA_MAX)
    except v.ValidationError:
        raise v.ValidationError(field, f"must be a positive integer (at most {QUOTA_MAX}), or null (none) for unlimited"
                                ) from None


def max_parallel(field: str, value: Any) -> int | None:
    """Concurrent requests of a key (enforced by nginx): a positive integer, or None (null) for unlimited."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "unlimited")):
        return None
    try:
        return v.integer(field, value, 1, MAX_PARALLEL)
    except v.ValidationError:
        raise v.ValidationError(field, f"must be a positive integer (at most {MAX_PARALLEL}), or null (none) for "
                                "unlimited") from None


def default_model(field: str, value: Any) -> str | None:
    """The model a request without one gets: an exact model name (no glob, not `auto`), or None."""
    if value is None or value == "":
        return None
    name = v.model(field, value)
    if name == AUTO:
        raise v.ValidationError(field, "cannot be `auto`; set allow_auto and send \"model\": \"auto\" instead")
    return name


def _rules(bastion: Bastion, values: dict[str, Any]) -> dict[str, Any]:
    """Validate the editable fields present in `values`."""
    checks = {
        "cidr_groups": lambda f, x: cidr_groups.names(bastion, f, x),
        "name": v.label,
        "models": lambda f, x: v.models(f, x, allow_glob=True),
        "endpoints": v.endpoints,
        "rpm": lambda f, x: v.integer(f, x, 0, 1_000_000),
        "expires": v.expiry,
        "cidrs": v.cidrs,
        "enabled": v.boolean,
        **dict.fromkeys(QUOTA_FIELDS, quota),
        "max_parallel": max_parallel,
        "default_model": default_model,
        "allow_auto": v.boolean,
    }
    unknown = set(values) - set(checks)
    if unknown:
        raise v.ValidationError(sorted(unknown)[0], "is not a key field")
    checked = {k: checks[k](k, x) for k, x in values.items()}
    for name in ("default_model", "allow_auto"):
        if checked.get(name) and not metering.body_edits(bastion):
            raise v.ValidationError(name, "needs nginx's njs module, which rewrites the request body (see "
                                    "docs/configuration.md, \"Model aliases\"); it is unavailable or turned off")
    return checked


def _parallel_zone(bastion: Bastion, values: dict[str, Any], author: str) -> None:
    """A `max_parallel` value no key had yet needs its own connection zone in nginx: applied before the key is
    written, so nginx enforces the limit from the key's first request (refused: nothing is written)."""
    limit = values.get("max_parallel")
    if limit is None:
        return
    if bastion.keystore.has_parallel_limit(limit):
        return
    known = bastion.keystore.parallel_limits()
    if len(known) >= MAX_PARALLEL_VALUES:
        raise v.ValidationError("max_parallel", f"at most {MAX_PARALLEL_VALUES} different values can be in use; "
                                f"use one of {', '.join(map(str, known))}")
    bastion.apply(author, extra_parallel=limit)


def _group_lock(bastion: Bastion, fields: dict[str, Any]) -> AbstractContextManager[Any]:
    """A key that names CIDR groups is checked and written under the store lock, so a group cannot be removed
    between the check and the write (cidr_groups.remove looks for keys using it under that lock). So is a key
    with a max_parallel: an apply (which reads the keys' values under that lock) cannot drop the zone of a value
    between its own apply and its write."""
    needed = fields.get("cidr_groups") or fields.get("max_parallel") not in (None, "", "none", "null", "unlimited")
    return bastion.store.transaction() if needed else nullcontext()


def create(bastion: Bastion, name: str, author: str = "cli", **fields: Any) -> tuple[dict[str, Any], str]:
    """Create a key; returns (public record, full key). The full key is not stored and cannot be shown again."""
    given = {"name": name, **{k: x for k, x in fields.items() if x is not None}}
    key_id, token = keyformat.generate()
    with _group_lock(bastion, given):
        values = _rules(bastion, given)
        _parallel_zone(bastion, values, author)
        record = {
            "id": key_id,
            "digest": keyformat.digest(bastion.pepper, token),
            "name": values["name"],
            "enabled": values.get("enabled", True),
            "expires": values.get("expires"),
            "models": values.get("models", []),
            "endpoints": values.get("endpoints", []),
            "rpm": values.get("rpm", 0),
            "cidrs": values.get("cidrs", []),
            "cidr_groups": values.get("cidr_groups", []),
            **{f: values.get(f) for f in QUOTA_FIELDS},
            "max_parallel": values.get("max_parallel"),
            "default_model": values.get("default_model"),
            "allow_auto": values.get("allow_auto", False),
            "created_at": time.time(),
            "created_by": author,
            "revoked_at": None,
        }
        bastion.keystore.insert(record)
    bastion.audit.record(author, f"create key {key_id} ({record['name']})")
    return public(record), token


def get(bastion: Bastion, key_id: str) -> dict[str, Any]:
    record = bastion.keystore.get(key_id)
    if record is None:
        raise NotFound("key", key_id)
    return public(record)


def all_keys(bastion: Bastion, include_revoked: bool = False) -> list[dict[str, Any]]:
    return [public(k) for k in bastion.keystore.all(include_revoked)]


def update(bastion: Bastion, key_id: str, author: str = "cli", **fields: Any) -> dict[str, Any]:
    def change(record: dict[str, Any]) -> dict[str, Any]:
        if record.get("revoked_at"):
            raise NotFound("key", key_id)
        return values

    with _group_lock(bastion, fields):
        values = _rules(bastion, fields)
        _parallel_zone(bastion, values, author)
        record = bastion.keystore.update(key_id, change)
    if record is None:
        raise NotFound("key", key_id)
    bastion.audit.record(author, f"update key {key_id} ({', '.join(sorted(values))})")
    return public(record)


def revoke(bastion: Bastion, key_id: str, author: str = "cli") -> dict[str, Any]:
    """Revoke for good (kept for the record and for usage history, never usable again)."""
    def change(record: dict[str, Any]) -> dict[str, Any]:
        return {} if record.get("revoked_at") else {"revoked_at": time.time(), "enabled": False}

    record = bastion.keystore.update(key_id, change)
    if record is None:
        raise NotFound("key", key_id)
    bastion.audit.record(author, f"revoke key {key_id}")
    return public(record)


def status(record: dict[str, Any], now: float | None = None) -> str:
    now = time.time() if now is None else now
    if record.get("revoked_at"):
        return "revoked"
    if not record.get("enabled", True):
        return "disabled"
    if record.get("expires") and record["expires"] <= now:
        return "expired"
    return "active"


def public(record: dict[str, Any]) -> dict[str, Any]:
    """A key as shown after creation: masked, no digest."""
    out = {k: x for k, x in record.items() if k != "digest"}
    out["key"] = keyformat.mask(record["id"])
    out["status"] = status(record)
    return out


def with_last_used(bastion: Bastion, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add `last_used` from the usage analytics (the gate never writes, so this is where it is known)."""
    last = usage_queries.last_used(bastion.usage, [r["id"] for r in rows]) if rows else {}
    return [{**r, "last_used": last.get(r["id"])} for r in rows]
