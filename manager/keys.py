"""API keys: create (secret shown once), list (masked), enable/disable, revoke, edit."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from tinydb import Query

from authsvc import keys as keyformat
from manager import cidr_groups
from manager import validation as v
from manager.errors import NotFound

if TYPE_CHECKING:
    from manager.context import Bastion

Key = Query()


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
    }
    unknown = set(values) - set(checks)
    if unknown:
        raise v.ValidationError(sorted(unknown)[0], "is not a key field")
    return {k: checks[k](k, x) for k, x in values.items()}


def create(bastion: Bastion, name: str, author: str = "cli", **fields: Any) -> tuple[dict[str, Any], str]:
    """Create a key; returns (public record, full key). The full key is not stored and cannot be shown again."""
    values = _rules(bastion, {"name": name, **{k: x for k, x in fields.items() if x is not None}})
    key_id, token = keyformat.generate()
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
        "created_at": time.time(),
        "created_by": author,
        "revoked_at": None,
    }
    with bastion.change(author, f"create key {key_id} ({record['name']})") as db:
        db.table("keys").insert(record)
    return public(record), token


def _find(bastion: Bastion, key_id: str) -> dict[str, Any]:
    record = bastion.store.table("keys").get(Key.id == key_id)
    if record is None:
        raise NotFound("key", key_id)
    return record


def get(bastion: Bastion, key_id: str) -> dict[str, Any]:
    return public(_find(bastion, key_id))


def all_keys(bastion: Bastion, include_revoked: bool = False) -> list[dict[str, Any]]:
    keys = bastion.store.table("keys").all()
    return [public(k) for k in keys if include_revoked or not k.get("revoked_at")]


def update(bastion: Bastion, key_id: str, author: str = "cli", **fields: Any) -> dict[str, Any]:
    values = _rules(bastion, fields)
    with bastion.change(author, f"update key {key_id} ({', '.join(sorted(values))})") as db:
        record = _find(bastion, key_id)
        if record.get("revoked_at"):
            raise NotFound("key", key_id)
        db.table("keys").update(values, Key.id == key_id)
    return get(bastion, key_id)


def revoke(bastion: Bastion, key_id: str, author: str = "cli") -> dict[str, Any]:
    """Revoke for good (kept for the record and for usage history, never usable again)."""
    with bastion.change(author, f"revoke key {key_id}") as db:
        record = _find(bastion, key_id)
        if not record.get("revoked_at"):
            db.table("keys").update({"revoked_at": time.time(), "enabled": False}, Key.id == key_id)
    return get(bastion, key_id)


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
    last = bastion.usage.last_used() if rows else {}
    return [{**r, "last_used": last.get(r["id"])} for r in rows]
