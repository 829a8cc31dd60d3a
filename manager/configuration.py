"""Operations on the nginx configuration as a whole: reload, rollback, the llm-proxy default config and the
custom server config. Each goes through `Bastion.change()`/`apply()`, so test → reload → verify → roll back."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from manager import generations
from manager import settings as settings_mod
from manager import validation as v
from manager.apply import ApplyResult
from manager.errors import NotFound

if TYPE_CHECKING:
    from manager.context import Bastion

DEFAULT_GROUP = "default"  # the CIDR group `write-default` manages


def reload(bastion: Bastion, author: str) -> ApplyResult:
    """Apply the current state and make a running nginx reload (verified) even when nothing changed."""
    result = bastion.apply(author, force_reload=True)
    bastion.audit.record(author, f"reload nginx (generation {result.generation})")
    return result


def rollback(bastion: Bastion, generation: Any, author: str) -> ApplyResult:
    """Restore pools, routes, settings and CIDR groups as they were at a kept generation and apply them.
    Keys and users are never rolled back (a revoked key stays revoked)."""
    generation = v.integer("generation", generation, 1, 10**9)
    try:
        state = generations.state(bastion.dirs, generation)
    except (OSError, ValueError):
        raise NotFound("generation", str(generation)) from None
    before = generations.live(bastion.dirs)
    with bastion.change(author, f"roll back configuration to generation {generation}", nginx=True):
        for name in generations.CONFIG_TABLES:
            bastion.store.replace_all(name, state.get(name, []))
    after = generations.live(bastion.dirs)
    changed = after != before
    return ApplyResult(after, changed=changed, reloaded=changed and bastion.nginx.master_pid() is not None)


def write_default(bastion: Bastion, domain: Any, cidrs: Any, author: str) -> dict[str, Any]:
    """llm-proxy's default config: serve `domain`, admin listener restricted to `cidrs` (group `default`)."""
    server_name = v.hostname("domain", v.require_str("domain", domain))
    allow = v.cidrs("cidrGroups", cidrs)
    if not allow:
        raise v.ValidationError("cidrGroups", "give at least one network")
    with bastion.change(author, f"write default config for {server_name} (admin from {', '.join(allow)})",
                        nginx=True):
        group = {"name": DEFAULT_GROUP, "allow": allow, "deny": []}
        bastion.store.upsert("cidr_groups", group, name=DEFAULT_GROUP)
        bastion.store.update_settings(server_name=server_name, admin_cidr_groups=[DEFAULT_GROUP])
    return bastion.settings()


def set_custom_config(bastion: Bastion, text: Any, author: str) -> None:
    settings_mod.update(bastion, {"custom_config": text}, author)
