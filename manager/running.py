"""The Ollama upstreams' running models, for the gate's /api/ps (decision 34 in docs/decisions.md).

The gate does no I/O per request, so the supervisor asks every live upstream of the pools that speak Ollama
`GET /api/ps` (through manager.outbound: 3 s, no redirects, 1 MB) every `health_interval` seconds (10 s when
health checks are off) and writes what they run, per pool, to `run/ollama-ps.json` when it changed; the gate
loads that file off the request path (authsvc/model_lists.py) and filters it by pool API and key at each call.
Each entry keeps only Ollama's known fields, of the expected types; an upstream that does not answer
contributes nothing (its models are not running anywhere a client could reach them right now).

The same file carries, per upstream URL, what model-aware balancing needs (authsvc/balance.py, decision 38):
the models an upstream has loaded (its /api/ps) and, for the live upstreams of model-aware pools that do not
answer /api/ps, vLLM's queue from `GET /metrics` (the same limits, 1 MB): the `num_requests_waiting` gauge and
the models its `model_name` labels name. No inference request is ever sent.
"""

from __future__ import annotations

import json
import logging
import math
import re
from typing import TYPE_CHECKING, Any

from authsvc.files import write_atomic
from authsvc.model_lists import OLLAMA, RUNNING_FILE
from manager import balancing, discovery, health, outbound, pools
from manager import validation as v

if TYPE_CHECKING:
    from manager.context import Bastion

log = logging.getLogger(__name__)
PS_TIMEOUT = 3.0
PS_LIMIT = 1024 * 1024
MAX_RUNNING = 100  # entries kept per upstream
METRICS_LIMIT = 1024 * 1024  # vLLM's /metrics is some 100 KB with its histograms
WAITING_METRIC = "vllm:num_requests_waiting"
MODEL_LABEL = re.compile(r'[{,]model_name="([^"\\]*)"')
MAX_WAITING = 1_000_000


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


def ask_running(url: str, api_key: str | None, verify: bool | str) -> list[dict[str, Any]] | None:
    """The upstream's /api/ps entries; None when it gave no usable answer."""
    try:
        data = outbound.get_json(url.rstrip("/") + "/api/ps", api_key=api_key, verify=verify, max_bytes=PS_LIMIT,
                                 deadline=PS_TIMEOUT)
        listed = data["models"]
    except (outbound.OutboundError, KeyError, TypeError) as e:
        log.debug("running models of %s unknown: %s", url, e)
        return None
    if not isinstance(listed, list):
        return None
    return [e for e in map(entry, listed[:MAX_RUNNING]) if e is not None]


def queue(text: str) -> dict[str, Any] | None:
    """vLLM's Prometheus text: {"models": the model_name labels, "waiting": the sum of num_requests_waiting};
    None when the text has no such metric (not vLLM)."""
    models: set[str] = set()
    waiting, found = 0, False
    for line in text.splitlines():
        if not line.startswith(WAITING_METRIC):
            continue
        name, _, value = line.rpartition(" ")
        if name[len(WAITING_METRIC):len(WAITING_METRIC) + 1] not in ("{", " ", ""):
            continue  # another metric sharing the prefix
        try:
            count = float(value)
        except ValueError:
            continue
        if not math.isfinite(count) or count < 0:
            continue
        found = True
        waiting += int(count)
        label = MODEL_LABEL.search(name)
        if label and v.MODEL_RE.fullmatch(label.group(1)) and len(models) < MAX_RUNNING:
            models.add(label.group(1))
    return {"models": sorted(models), "waiting": min(waiting, MAX_WAITING)} if found else None


def ask_queue(url: str, api_key: str | None, verify: bool | str) -> dict[str, Any] | None:
    """The upstream's vLLM queue (`queue`) from GET /metrics; None when it gave no usable answer."""
    try:
        answer = outbound.get(url.rstrip("/") + "/metrics", api_key=api_key, verify=verify,
                              max_bytes=METRICS_LIMIT, deadline=PS_TIMEOUT)
    except outbound.OutboundError as e:
        log.debug("queue of %s unknown: %s", url, e)
        return None
    return queue(answer.body.decode("utf-8", "replace"))


def poll(bastion: Bastion) -> bool:
    """Ask the Ollama pools' live upstreams what they run, and the model-aware pools' live upstreams that do not
    answer /api/ps their vLLM queue; write the file when it changed. True if it did."""
    settings = bastion.settings()
    found = pools.discovery_state(bastion)
    down = health.down_urls(bastion)
    all_pools = bastion.store.all("pools")
    targets = [(pool, up["url"]) for pool in all_pools
               if OLLAMA in pools.effective_kinds(pool, found.get(pool["name"]))
               for up in pool["upstreams"] if up["url"] not in down]

    def how(pool: dict[str, Any]) -> tuple[str | None, bool | str]:
        return pool.get("api_key"), (settings["ca_bundle"] or True) if pool.get("tls_verify", True) else False

    def ask(target: tuple[dict[str, Any], str]) -> list[dict[str, Any]] | None:
        pool, url = target
        return ask_running(url, *how(pool))

    running: dict[str, list[dict[str, Any]]] = {}
    loads: dict[str, dict[str, Any]] = {}
    for (pool, url), models in zip(targets, outbound.in_parallel(ask, targets) if targets else [], strict=True):
        running.setdefault(pool["name"], []).extend(models or [])
        if models is not None:
            loads[url] = {"models": sorted({n for m in models for n in (m["name"], m["model"])}), "waiting": 0}
    # model-aware pools (manager/balancing.py): vLLM's queue where /api/ps said nothing
    asked: dict[str, dict[str, Any]] = {}
    for pool in all_pools:
        for view in balancing.gate_view(pool, down) or []:
            if view["live"] and view["url"] not in loads:
                asked.setdefault(view["url"], pool)
    if asked:
        urls = sorted(asked)
        for url, load in zip(urls, outbound.in_parallel(lambda u: ask_queue(u, *how(asked[u])), urls), strict=True):
            if load is not None:
                loads[url] = load
    data = json.dumps({"pools": running, "upstreams": loads}, sort_keys=True).encode()
    path = bastion.dirs.run / RUNNING_FILE
    if path.exists() and path.read_bytes() == data:
        return False
    write_atomic(path, data, durable=False)
    return True
