"""A pool's traffic settings (retries inside the pool, timeouts, WebSocket pass-through) and a route's mode
(fallback or balance across its pools): their validation, defaults and what nginx is rendered from them.

Kept apart from manager/pools.py so a pool's identity (name, upstreams, key) and how traffic flows through it
change independently. nginx enforces all of it (docs/reliability.md): the gate only names the chain of pools.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from manager import validation as v

# upstream answers that send a request to another upstream of the pool (and, across a route, to the next pool)
RETRY_STATUSES = (429, 500, 502, 503, 504)
ROUTE_MODES = ("fallback", "balance")
MAX_ROUTE_POOLS = 8  # nginx allows 10 internal redirects: the gate's, one per fallback, the last error page


def _statuses(field: str, value: Any) -> list[int]:
    if not isinstance(value, list):
        raise v.ValidationError(field, f"must be a list of HTTP statuses among {', '.join(map(str, RETRY_STATUSES))}")
    out: list[int] = []
    for i, status in enumerate(value):
        if isinstance(status, bool) or status not in RETRY_STATUSES:
            raise v.ValidationError(f"{field}[{i}]", f"must be one of {', '.join(map(str, RETRY_STATUSES))}")
        if status not in out:
            out.append(status)
    return sorted(out)


def _nullable(check: Callable[[str, Any], Any]) -> Callable[[str, Any], Any]:
    return lambda f, x: None if x is None else check(f, x)


# pool field → (validator, default). Timeouts left null follow the global settings of the same name.
POOL_FIELDS: dict[str, tuple[Callable[[str, Any], Any], Any]] = {
    "retries": (lambda f, x: v.integer(f, x, 0, 10), 2),
    "retry_timeout": (lambda f, x: v.integer(f, x, 0, 3600), 30),
    "retry_statuses": (_statuses, [502, 503, 504]),
    "connect_timeout": (_nullable(lambda f, x: v.integer(f, x, 1, 300)), None),
    "read_timeout": (_nullable(lambda f, x: v.integer(f, x, 1, 86400)), None),
    "websocket": (v.boolean, False),
    # the gate picks the upstream that has the model loaded / the shortest queue (manager/balancing.py)
    "model_aware": (v.boolean, False),
}


def pool_fields(given: Mapping[str, Any], defaults: bool) -> dict[str, Any]:
    """The traffic fields of `given` validated (an error names the field); with `defaults` the missing ones too."""
    out = {name: check(name, given[name]) for name, (check, _) in POOL_FIELDS.items() if name in given}
    if defaults:
        out = {name: default for name, (_, default) in POOL_FIELDS.items()} | out
    return out


def of(pool: Mapping[str, Any]) -> dict[str, Any]:
    """A stored pool's traffic settings, defaults filled in for pools stored before they existed."""
    return {name: pool.get(name, default) for name, (_, default) in POOL_FIELDS.items()}


def route_mode(field: str, value: Any) -> str:
    return v.choice(field, value, ROUTE_MODES)


def check_route_pools(pools: list[str]) -> None:
    if len(pools) > MAX_ROUTE_POOLS:
        raise v.ValidationError("pools", f"a route falls back across at most {MAX_ROUTE_POOLS} pools")


def view(pool: Mapping[str, Any], settings: Mapping[str, Any]) -> dict[str, Any]:
    """What the templates need: the effective timeouts and nginx's retry directives."""
    t = of(pool)
    statuses = t["retry_statuses"]
    return {
        "connect_timeout": t["connect_timeout"] or settings["connect_timeout"],
        "read_timeout": t["read_timeout"] or settings["read_timeout"],
        "next_upstream": " ".join(["error", "timeout", *(f"http_{s}" for s in statuses), "non_idempotent"]),
        "tries": t["retries"] + 1,
        "retry_timeout": t["retry_timeout"],
        # what sends a request on to the next pool of a route: nginx's own 502 (no live upstream, every try
        # failed) and 504 (timed out), and the upstream statuses the pool retries
        "fallback_statuses": sorted({502, 504, *statuses}),
        "websocket": t["websocket"],
        "model_aware": t["model_aware"],
    }
