"""The Ollama upstreams' running models, for the gate's /api/ps (decision 34 in docs/decisions.md).

The gate does no I/O per request, so the supervisor asks every live upstream of the pools that speak Ollama
`GET /api/ps` (through manager.outbound: 3 s, no redirects, 1 MB) every `health_interval` seconds (10 s when
health checks are off) and writes what they run, per pool, to `run/ollama-ps.json` when it changed; the gate
loads that file off the request path (authsvc/model_lists.py) and filters it by pool API and key at each call.
Each entry keeps only Ollama's known fields, of the expected types; an upstream that does not answer
contributes nothing (its models are not running anywhere a client could reach them right now).
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

from authsvc.files import write_atomic
from authsvc.model_lists import OLLAMA, RUNNING_FILE
from manager import discovery, health, outbound, pools
from manager import validation as v

if TYPE_CHECKING:
    from manager.context import Bastion

log = logging.getLogger(__name__)
PS_TIMEOUT = 3.0
PS_LIMIT = 1024 * 1024
MAX_RUNNING = 100  # entries kept per upstream


def entry(raw: Any) -> dict[str, Any] | None:
    """One /api/ps entry as the gate may show it, or None when it names no routable model."""
    if not isinstance(raw, dict):
        return None
    name = raw.get("name") if isinstance(raw.get("name"), str) else raw.get("model")
    if not isinstance(name, str) or not v.MODEL_RE.fullmatch(name):
        return None
    out = {"name": name, "model": raw.get("model") if isinstance(raw.get("model"), str) else name,
           **discovery.ollama_details(raw)}
    out.pop("modified_at", None)  # not part of /api/ps
    for field in ("size_vram", "context_length"):
        if (n := discovery.integer(raw.get(field))) is not None:
            out[field] = n
    if (expires := discovery.text(raw.get("expires_at"))) is not None:
        out["expires_at"] = expires
    return out


def upstream_running(url: str, api_key: str | None, verify: bool | str) -> list[dict[str, Any]]:
    try:
        data = outbound.get_json(url.rstrip("/") + "/api/ps", api_key=api_key, verify=verify, max_bytes=PS_LIMIT,
                                 deadline=PS_TIMEOUT)
        listed = data["models"]
    except (outbound.OutboundError, KeyError, TypeError) as e:
        log.debug("running models of %s unknown: %s", url, e)
        return []
    if not isinstance(listed, list):
        return []
    return [e for e in map(entry, listed[:MAX_RUNNING]) if e is not None]


def poll(bastion: Bastion) -> bool:
    """Ask the Ollama pools' live upstreams what they run; write the file when it changed. True if it did."""
    settings = bastion.settings()
    found = pools.discovery_state(bastion)
    down = health.down_urls(bastion)
    targets = [(pool, up["url"]) for pool in bastion.store.all("pools")
               if OLLAMA in pools.effective_kinds(pool, found.get(pool["name"]))
               for up in pool["upstreams"] if up["url"] not in down]

    def ask(target: tuple[dict[str, Any], str]) -> list[dict[str, Any]]:
        pool, url = target
        verify = (settings["ca_bundle"] or True) if pool.get("tls_verify", True) else False
        return upstream_running(url, pool.get("api_key"), verify)

    running: dict[str, list[dict[str, Any]]] = {}
    for (pool, _), models in zip(targets, outbound.in_parallel(ask, targets) if targets else [], strict=True):
        running.setdefault(pool["name"], []).extend(models)
    data = json.dumps({"pools": running}, sort_keys=True).encode()
    path = bastion.dirs.run / RUNNING_FILE
    if path.exists() and path.read_bytes() == data:
        return False
    write_atomic(path, data, durable=False)
    return True
