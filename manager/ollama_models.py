"""Ollama model management on one upstream of a pool: list, pull (a background job the page polls), delete.

The upstream is named by the client but taken from the stored pool (its URL, API key and TLS setting), so a
request can only reach an upstream the operator configured. Requests go through manager.outbound (no
redirects, size limits, timeouts); model names are checked like every other model name.

A pull takes minutes to hours, longer than a page stays open, and Ollama cancels a pull whose client goes
away: so the manager pulls in a thread and writes the job's progress to `run/ollama-pulls/<id>.json`
(gunicorn runs two workers: a poll may reach the other one), at most twice a second. A job whose worker died
(its process is gone, or it has been silent longer than the idle limit allows) is shown as interrupted.
See docs/decisions.md, decision 40.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from authsvc.files import write_atomic
from manager import discovery, outbound
from manager import pools as pools_mod
from manager import validation as v
from manager.errors import Conflict, NotFound

if TYPE_CHECKING:
    from manager.context import Bastion

log = logging.getLogger(__name__)
PULL_IDLE = 300.0  # seconds an upstream may stay silent during a pull (verifying a large blob says nothing)
WRITE_EVERY = 0.5  # seconds between progress writes
KEEP_FINISHED = 3600.0  # seconds a finished job stays listed
MAX_JOBS = 50
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

def jobs_dir(bastion: Bastion) -> Path:
    return bastion.dirs.run / "ollama-pulls"


def job_id(pool_name: str, url: str, model: str) -> str:
    """One job per pool, upstream and model: pulling the same model twice at once joins the running pull."""
    return hashlib.sha256(f"{pool_name}\n{url}\n{model}".encode()).hexdigest()[:16]


def _read(path: Path) -> dict[str, Any] | None:
    try:
        job = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return job if isinstance(job, dict) else None


def _alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except (OSError, ValueError, TypeError):
        return False
    return True


def _shown(job: dict[str, Any], now: float) -> dict[str, Any]:
    """A job as listed: a running job whose thread cannot be running any more is interrupted."""
    if job["state"] == "running" and (not _alive(job.get("pid")) or now - job["updated"] > PULL_IDLE + 60):
        job = {**job, "state": "interrupted", "error": "the manager stopped while pulling; pull again to resume"}
    return {k: x for k, x in job.items() if k != "pid"}


def list_pulls(bastion: Bastion, pool_name: str) -> list[dict[str, Any]]:
    """The pool's pulls, newest first; finished ones for an hour."""
    now = time.time()
    folder = jobs_dir(bastion)
    jobs = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        job = _read(path)
        if job is None:
            continue
        if job["state"] != "running" and now - job.get("finished", now) > KEEP_FINISHED:
            path.unlink(missing_ok=True)
            continue
        if job.get("pool") == pool_name:
            jobs.append(_shown(job, now))
    return sorted(jobs, key=lambda j: j["started"], reverse=True)


def start_pull(bastion: Bastion, pool_name: str, url: Any, model: Any, author: str) -> dict[str, Any]:
    """Start pulling `model` onto the upstream (or return the pull of it already running)."""
    pool, stored, verify = upstream_of(bastion, pool_name, url)
    name = v.model("model", model)
    folder = jobs_dir(bastion)
    folder.mkdir(mode=0o700, exist_ok=True)
    path = folder / f"{job_id(pool_name, stored, name)}.json"
    was = _read(path)
    if was and _shown(was, time.time())["state"] == "running":
        return _shown(was, time.time())
    if len(list(folder.glob("*.json"))) >= MAX_JOBS:
        list_pulls(bastion, pool_name)  # drops old finished jobs
        if len(list(folder.glob("*.json"))) >= MAX_JOBS:
            raise Conflict("model", f"{MAX_JOBS} pulls are listed already; wait for some to finish")
    now = time.time()
    job = {"id": path.stem, "pool": pool_name, "upstream": stored, "model": name, "author": author,
           "state": "running", "status": "starting", "total": None, "completed": None, "error": None,
           "started": now, "updated": now, "finished": None, "pid": os.getpid()}
    write_atomic(path, json.dumps(job).encode(), durable=False)
    bastion.audit.record(author, f"pull ollama model {name} on {stored} (pool {pool_name})")
    threading.Thread(target=_pull, args=(bastion, pool, job, path, verify), daemon=True,
                     name=f"ollama-pull-{path.stem}").start()
    return _shown(job, now)


def _pull(bastion: Bastion, pool: dict[str, Any], job: dict[str, Any], path: Path, verify: bool | str) -> None:
    """Follow Ollama's /api/pull progress lines: {"status", "digest", "total", "completed"}, an {"error"} line
    when it fails, {"status": "success"} at the end."""
    written = 0.0

    def save(force: bool = False) -> None:
        nonlocal written
        now = time.time()
        job["updated"] = now
        if force or now - written >= WRITE_EVERY:
            write_atomic(path, json.dumps(job).encode(), durable=False)
            written = now

    try:
        for line in outbound.stream_lines("POST", job["upstream"] + "/api/pull",
                                          json_body={"model": job["model"], "stream": True},
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
                job["status"] = outbound.printable(event["status"], 100)
            total, completed = discovery.integer(event.get("total")), discovery.integer(event.get("completed"))
            job["total"], job["completed"] = (total, completed) if total else (None, None)
            save()
        if job["status"] != "success":
            raise outbound.OutboundError("the upstream ended the pull without saying it succeeded")
        job["status"] = "success; asking the pool's upstreams for their models"
        save(force=True)
        try:  # before the job is done: once it is, the pool serves the new model
            pools_mod.refresh_discovered(bastion, only=job["pool"])
        except Exception:
            log.exception("model discovery after the pull of %s failed", job["model"])
        job["status"], job["state"] = "success", "done"
    except outbound.OutboundError as e:
        job["state"], job["error"] = "failed", str(e)
    except Exception as e:  # a job must always end, whatever broke
        log.exception("ollama pull %s failed", job["id"])
        job["state"], job["error"] = "failed", f"internal error ({type(e).__name__})"
    job["finished"] = time.time()
    save(force=True)
    log.info("ollama pull of %s on %s: %s", job["model"], job["upstream"], job["error"] or "done")
