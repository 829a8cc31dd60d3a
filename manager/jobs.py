"""Background jobs the admin page polls: a thread of the manager does the work and writes the job's record to
`run/<kind>/<id>.json`, so a poll answered by any gunicorn worker sees it. Used by Ollama pulls
(manager/ollama_models.py) and certificate obtains and renewals (manager/certs/jobs.py).

A record has `id`, `state` (running, done, failed, interrupted), `status` (the latest step, one line), `error`,
`started`, `updated`, `finished`, plus what its kind adds. Writes are atomic and at most twice a second unless
forced. A running job whose worker died (its process is gone, or it has been silent longer than its kind
allows) is shown as interrupted. Finished jobs are listed for an hour. See docs/decisions.md, decisions 40, 41.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from authsvc.files import write_atomic
from manager.errors import Conflict

log = logging.getLogger(__name__)
WRITE_EVERY = 0.5  # seconds between progress writes
KEEP_FINISHED = 3600.0  # seconds a finished job stays listed
MAX_JOBS = 50  # per kind
STATES = ["running", "done", "failed", "interrupted"]


class Job:
    """The record of a running job, owned by its thread: change `data`, then `save()`."""

    def __init__(self, path: Path, data: dict[str, Any]):
        self.path = path
        self.data = data
        self._written = 0.0

    def save(self, force: bool = False) -> None:
        now = time.time()
        self.data["updated"] = now
        if force or now - self._written >= WRITE_EVERY:
            write_atomic(self.path, json.dumps(self.data).encode(), durable=False)
            self._written = now


class Jobs:
    """The jobs of one kind. `silent_limit`: seconds a running job may go without a write before it is shown
    as interrupted; `interrupted`: the error it is then shown with (what the operator can do)."""

    def __init__(self, folder: Path, silent_limit: float, interrupted: str, what: str):
        self.folder = folder
        self.silent_limit = silent_limit
        self.interrupted = interrupted
        self.what = what  # the field a "too many jobs" refusal names

    def path(self, job_id: str) -> Path:
        return self.folder / f"{job_id}.json"

    def get(self, job_id: str) -> dict[str, Any] | None:
        job = _read(self.path(job_id))
        return None if job is None else self.shown(job, time.time())

    def list(self, match: Callable[[dict[str, Any]], bool] = lambda _: True) -> list[dict[str, Any]]:
        """The matching jobs, newest first; finished ones for an hour (older ones are deleted on the way)."""
        now = time.time()
        jobs = []
        for path in sorted(self.folder.glob("*.json")) if self.folder.is_dir() else []:
            job = _read(path)
            if job is None:
                continue
            shown = self.shown(job, now)
            if shown["state"] != "running" and now - (job.get("finished") or job["updated"]) > KEEP_FINISHED:
                path.unlink(missing_ok=True)  # ended (or interrupted) over an hour ago
                continue
            if match(job):
                jobs.append(shown)
        return sorted(jobs, key=lambda j: j["started"], reverse=True)

    def shown(self, job: dict[str, Any], now: float) -> dict[str, Any]:
        """A job as listed: a running job whose thread cannot be running any more is interrupted."""
        if job["state"] == "running" and (not _alive(job.get("pid")) or now - job["updated"] > self.silent_limit):
            job = {**job, "state": "interrupted", "error": self.interrupted}
        return {k: x for k, x in job.items() if k != "pid"}

    def running(self, job_id: str) -> dict[str, Any] | None:
        was = _read(self.path(job_id))
        if was is None:
            return None
        shown = self.shown(was, time.time())
        return shown if shown["state"] == "running" else None

    def start(self, job_id: str, fields: dict[str, Any], work: Callable[[Job], None], expected: tuple[type, ...],
              thread_name: str) -> dict[str, Any]:
        """Write the job's first record and run `work(job)` in a thread. `work` sets `status` (and its kind's
        fields) as it goes; it raises one of `expected` to fail with that error's text; anything else fails
        the job as an internal error (logged). A job always ends done or failed."""
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        if len(list(self.folder.glob("*.json"))) >= MAX_JOBS:
            self.list()  # drops old finished jobs
            if len(list(self.folder.glob("*.json"))) >= MAX_JOBS:
                raise Conflict(self.what, f"{MAX_JOBS} jobs are listed already; wait for some to finish")
        now = time.time()
        job = Job(self.path(job_id), {"id": job_id, **fields, "state": "running", "status": "starting",
                                      "error": None, "started": now, "updated": now, "finished": None,
                                      "pid": os.getpid()})
        job.save(force=True)
        first = self.shown(copy.deepcopy(job.data), now)  # the thread changes job.data from now on
        threading.Thread(target=self._run, args=(job, work, expected), daemon=True, name=thread_name).start()
        return first

    @staticmethod
    def _run(job: Job, work: Callable[[Job], None], expected: tuple[type, ...]) -> None:
        try:
            work(job)
            job.data["state"] = "done"
        except expected as e:
            job.data["state"], job.data["error"] = "failed", str(e)
        except Exception as e:  # a job must always end, whatever broke
            log.exception("job %s failed", job.data["id"])
            job.data["state"], job.data["error"] = "failed", f"internal error ({type(e).__name__})"
        job.data["finished"] = time.time()
        job.save(force=True)
        log.info("job %s (%s): %s", job.data["id"], job.path.parent.name, job.data["error"] or "done")


def _read(path: Path) -> dict[str, Any] | None:
    try:
        job = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return job if isinstance(job, dict) and isinstance(job.get("state"), str) else None


def _alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except (OSError, ValueError, TypeError):
        return False
    return True
