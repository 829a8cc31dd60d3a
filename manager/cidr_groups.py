"""CIDR groups: named allow/deny lists attached to the public listener, the admin listener or single keys.

Semantics wherever groups are attached: a client is refused when any attached group denies its address;
when the attached groups have allow entries, the address must match one of them. No group: no restriction.
The built-in group `private` (loopback and private ranges) guards the admin listener by default.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from manager import validation as v
from manager.errors import Conflict, NotFound

if TYPE_CHECKING:
    from manager.context import Bastion

BUILTIN: dict[str, dict[str, Any]] = {
    "private": {
        "name": "private",
        "allow": ["127.0.0.0/8", "::1/128", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"],
        "deny": [],
        "builtin": True,
    },
}
ATTACH_SETTINGS = ("public_cidr_groups", "admin_cidr_groups", "bruteforce_exempt_cidr_groups",
                   "metrics_cidr_groups")


def all_groups(bastion: Bastion) -> list[dict[str, Any]]:
    return [*BUILTIN.values(), *({**g, "builtin": False} for g in bastion.store.all("cidr_groups"))]


def by_name(bastion: Bastion) -> dict[str, dict[str, Any]]:
    return {g["name"]: g for g in all_groups(bastion)}


def get(bastion: Bastion, name: str) -> dict[str, Any]:
    group = by_name(bastion).get(name)
    if group is None:
        raise NotFound("cidr group", name)
    return group


def names(bastion: Bastion, field: str, value: Any) -> list[str]:
    """A list of existing group names (for settings and keys)."""
    known = by_name(bastion)
    result = v.string_list(field, value, v.name)
    for i, n in enumerate(result):
        if n not in known:
            raise v.ValidationError(f"{field}[{i}]", f"unknown CIDR group {n!r}")
    return result


EVERYWHERE = ["0.0.0.0/0", "::/0"]


def rules(bastion: Bastion, group_names: list[str]) -> tuple[list[str], list[str]]:
    """(allow, deny) networks of the named groups, in order, without repeats. A group that no longer exists
    (e.g. after a rollback) denies everything: a restriction never silently disappears."""
    return rules_in(by_name(bastion), group_names)


def rules_in(known: Mapping[str, Mapping[str, Any]], group_names: list[str]) -> tuple[list[str], list[str]]:
    """rules() over groups already read (name → group), for the pure renderer."""
    allow: list[str] = []
    deny: list[str] = []
    for n in group_names:
        group = known.get(n, {"allow": [], "deny": EVERYWHERE})
        allow += [c for c in group["allow"] if c not in allow]
        deny += [c for c in group["deny"] if c not in deny]
    return allow, deny


def _checked(name: Any, allow: Any, deny: Any) -> dict[str, Any]:
    group = {"name": v.name("name", name), "allow": v.cidrs("allow", allow or []), "deny": v.cidrs("deny", deny or [])}
    if not group["allow"] and not group["deny"]:
        raise v.ValidationError("allow", "give at least one network to allow or deny")
    return group


def create(bastion: Bastion, name: Any, allow: Any = None, deny: Any = None, author: str = "cli") -> dict[str, Any]:
    group = _checked(name, allow, deny)
    with bastion.change(author, f"create CIDR group {group['name']}"):
        if group["name"] in by_name(bastion):
            raise Conflict("name", f"a CIDR group named {group['name']!r} already exists")
        bastion.store.insert("cidr_groups", {**group, "created_at": time.time()})
    return get(bastion, group["name"])


def update(bastion: Bastion, name: str, allow: Any = None, deny: Any = None, author: str = "cli") -> dict[str, Any]:
    if name in BUILTIN:
        raise Conflict("name", f"the built-in group {name!r} cannot be changed; create your own")
    with bastion.change(author, f"update CIDR group {name}", nginx=True):
        current = get(bastion, name)
        group = _checked(name, current["allow"] if allow is None else allow, current["deny"] if deny is None else deny)
        bastion.store.update("cidr_groups", group, name=name)
    return get(bastion, name)


def remove(bastion: Bastion, name: str, author: str = "cli") -> None:
    if name in BUILTIN:
        raise Conflict("name", f"the built-in group {name!r} cannot be removed")
    with bastion.change(author, f"remove CIDR group {name}"):
        get(bastion, name)
        settings = bastion.settings()
        users = [s for s in ATTACH_SETTINGS if name in settings[s]]
        users += [f"key {key_id}" for key_id in bastion.keystore.using_group(name)]
        if users:
            raise Conflict("name", f"CIDR group {name!r} is attached to {', '.join(users)}; detach it first")
        bastion.store.remove("cidr_groups", name=name)
