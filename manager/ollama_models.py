"""Ollama model management on one upstream of a pool: list, pull (a background job the page polls), delete.

The upstream is named by the client but taken from the stored pool (its URL, API key and TLS setting), so a
request can only reach an upstream the operator configured. Requests go through manager.outbound (no
redirects, size limits, timeouts); model names are checked like every other model name.

A pull takes minutes to hours, longer than a page stays open, and Ollama cancels a pull whose client goes
away: so the manager pulls in a background job (manager/jobs.py: a thread writing `run/ollama-pulls/<id>.json`,
which any gunicorn worker can read). A job whose worker died (its process is gone, or it has been silent longer
than the idle limit allows) is shown as interrupted. See docs/decisions.md, decision 40.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import TYPE_CHECKING, Any

from manager import discovery, jobs, outbound
from manager import pools as pools_mod
from manager import validation as v
from manager.errors import Conflict, NotFound

if TYPE_CHECKING:
    from manager.context import Bastion

log = logging.getLogger(__name__)
PULL_IDLE = 300.0  # seconds an upstream may stay silent during a pull (verifying a large blob says nothing)
DELETE_DEADLINE = 30.0


def upstream_of(bastion: Bastion, pool_name: str, url: Any) -> tuple[dict[str, Any], str, bool | str]:
    """(the stored pool, the stored upstream URL, TLS verification) for a client's `upstream`; the pool
    must speak Ollama."""
    pool = bastion.store.find("pools", name=pool_name)
    if pool is None:
        raise NotFound("pool", pool_name)
    if url in (None, ""):
        raise v.ValidationError("upstream", "is required (the URL of one of the pool's upstreams)")
    wanted = v.upstream_url("upstream", url)
    stored = next((u["url"] for u in pool["upstreams"] if u["url"] == wanted), None)
    if stored is None:
        raise v.ValidationError("upstream", f"{wanted} is not an upstream of pool {pool_name}")
    state = pools_mod.discovery_state(bastion).get(pool_name)
    if discovery.OLLAMA not in pools_mod.effective_kinds(pool, state):
        raise Conflict("upstream", f"pool {pool_name} does not speak the Ollama API (its API kinds: "
                       f"{', '.join(pools_mod.effective_kinds(pool, state))})")
    ca_bundle = bastion.settings()["ca_bundle"]
    verify: bool | str = (ca_bundle or True) if pool.get("tls_verify", True) else False
    return pool, stored, verify


def list_models(bastion: Bastion, pool_name: str, url: Any) -> list[dict[str, Any]]:
    """The models on one upstream (/api/tags), with the details discovery keeps (sizes, digests, families)."""
    pool, stored, verify = upstream_of(bastion, pool_name, url)
    data = outbound.get_json(stored + "/api/tags", api_key=pool.get("api_key"), verify=verify,
                             max_bytes=outbound.MODEL_LIST_LIMIT)
    entries = data.get("models") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise outbound.OutboundError("the answer to /api/tags is not a model list", 200)
    out = []
    for entry in entries:
        name = entry.get("name") if isinstance(entry, dict) else None
        if isinstance(name, str) and v.MODEL_RE.fullmatch(name):
            out.append({"name": name, **discovery.ollama_details(entry)})
    return out


def delete_model(bastion: Bastion, pool_name: str, url: Any, model: Any, author: str) -> None:
    """DELETE /api/delete on the upstream, then the pool's models are asked again."""
    pool, stored, verify = upstream_of(bastion, pool_name, url)
    name = v.model("model", model)
    bastion.audit.record(author, f"delete ollama model {name} on {stored} (pool {pool_name})")
    outbound.send("DELETE", stored + "/api/delete", json_body={"model": name}, api_key=pool.get("api_key"),
                  verify=verify, deadline=DELETE_DEADLINE, max_bytes=64 * 1024)
    pools_mod.refresh_discovered(bastion, only=pool_name)


# ---- pulls --------------------------------------------------------------------------------------------------

def pulls(bastion: Bastion) -> jobs.Jobs:
    return jobs.Jobs(bastion.dirs.run / "ollama-pulls", PULL_IDLE + 60,
                     "the manager stopped while pulling; pull again to resume", "model")


def job_id(pool_name: str, url: str, model: str) -> str:
    """One job per pool, upstream and model: pulling the same model twice at once joins the running pull."""
    return hashlib.sha256(f"{pool_name}\n{url}\n{model}".encode()).hexdigest()[:16]


def list_pulls(bastion: Bastion, pool_name: str) -> list[dict[str, Any]]:
    """The pool's pulls, newest first; finished ones for an hour."""
    return pulls(bastion).list(lambda job: job.get("pool") == pool_name)


def start_pull(bastion: Bastion, pool_name: str, url: Any, model: Any, author: str) -> dict[str, Any]:
    """Start pulling `model` onto the upstream (or return the pull of it already running)."""
    pool, stored, verify = upstream_of(bastion, pool_name, url)
    name = v.model("model", model)
    kind, ident = pulls(bastion), job_id(pool_name, stored, name)
    running = kind.running(ident)
    if running:
        return running
    job = kind.start(ident, {"pool": pool_name, "upstream": stored, "model": name, "author": author,
                             "total": None, "completed": None},
                     lambda job: _pull(bastion, pool, job, verify), (outbound.OutboundError,), f"ollama-pull-{ident}")
    bastion.audit.record(author, f"pull ollama model {name} on {stored} (pool {pool_name})")
    return job


def _pull(bastion: Bastion, pool: dict[str, Any], job: jobs.Job, verify: bool | str) -> None:
    """Follow Ollama's /api/pull progress lines: {"status", "digest", "total", "completed"}, an {"error"} line
    when it fails, {"status": "success"} at the end."""
    data = job.data
    for line in outbound.stream_lines("POST", data["upstream"] + "/api/pull",
                                      json_body={"model": data["model"], "stream": True},
                                      api_key=pool.get("api_key"), verify=verify, idle=PULL_IDLE):
        try:
            event = json.loads(line)
        except ValueError:
            raise outbound.OutboundError("a progress line is not JSON") from None
        if not isinstance(event, dict):
            continue
        if isinstance(event.get("error"), str):
            raise outbound.OutboundError(outbound.printable(event["error"]))
        if isinstance(event.get("status"), str):
            data["status"] = outbound.printable(event["status"], 100)
        total, completed = discovery.integer(event.get("total")), discovery.integer(event.get("completed"))
        data["total"], data["completed"] = (total, completed) if total else (None, None)
        job.save()
    if data["status"] != "success":
        raise outbound.OutboundError("the upstream ended the pull without saying it succeeded")
    data["status"] = "success; asking the pool's upstreams for their models"
    job.save(force=True)
    try:  # before the job is done: once it is, the pool serves the new model
        pools_mod.refresh_discovered(bastion, only=data["pool"])
    except Exception:
        log.exception("model discovery after the pull of %s failed", data["model"])
    data["status"] = "success"
