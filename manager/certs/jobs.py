"""Certificate obtains and renewals as background jobs (manager/jobs.py), so the admin page shows each step as
it happens: Bastion's own steps (checks, requesting, applying nginx) and certbot's output lines, with the
Cloudflare token cut out and certbot's advertising left out (manager/certs/certbot.py), then the certificate
or certbot's reason for the failure. The synchronous API and the CLI run the same manage.obtain/renew.

Input is checked before the job starts (a bad domain is a 400, a busy certbot a 409, at once); what needs the
network (the webroot probe, the ACME directory, certbot) runs in the job. See docs/decisions.md, decision 42.
"""

from __future__ import annotations

import re
import secrets
import time
from typing import TYPE_CHECKING, Any

from manager import jobs, outbound
from manager import validation as v
from manager.certs import checks, manage, preflight
from manager.certs.certbot import DEADLINE, Certbot
from manager.errors import Conflict, NotFound
from manager.nginx import NginxError

if TYPE_CHECKING:
    from manager.context import Bastion

MAX_STEPS = 200  # certbot prints a few dozen lines at most; a runaway is cut, the latest step still shown
STEP_LENGTH = 300
ID_RE = re.compile(r"[0-9a-f]{16}")
# what ends a job as failed with its own words (anything else is an internal error, logged)
EXPECTED = (*manage.AcmeFailed, v.ValidationError, Conflict, NotFound, NginxError)


def certificate_jobs(b: Bastion) -> jobs.Jobs:
    # certbot may stay silent until it is stopped (DEADLINE); nginx's apply and the checks add little
    return jobs.Jobs(b.dirs.run / "certificate-jobs", DEADLINE + 120,
                     "the manager stopped during the operation; list the certificates to see where it stood, "
                     "then start it again", "certificates")


def list_jobs(b: Bastion) -> list[dict[str, Any]]:
    return certificate_jobs(b).list()


def get_job(b: Bastion, job_id: str) -> dict[str, Any]:
    job = certificate_jobs(b).get(job_id) if ID_RE.fullmatch(job_id) else None
    if job is None:
        raise NotFound("certificate job", job_id)
    return job


def start(b: Bastion, body: dict[str, Any], author: str) -> dict[str, Any]:
    """Check the request, then start the job: action obtain (domains, challenge, name) or renew (name,
    force_renewal)."""
    action = v.choice("action", body.get("action"), ("obtain", "renew"))
    if action == "obtain":
        challenge = preflight.challenge(body.get("challenge", "http-01"))
        names = checks.domains("domains", body.get("domains"), wildcard=challenge == "dns-01")
        name = checks.cert_name("name", body["name"]) if body.get("name") else checks.default_name(names)
        if (b.dirs.uploaded_certs / name).exists():
            raise Conflict("name", f"an uploaded certificate is named {name}; remove it first or choose another name")
        fields: dict[str, Any] = {"domains": names, "challenge": challenge, "force_renewal": False}
    else:
        if body.get("domains") is not None or body.get("challenge") is not None:
            raise v.ValidationError("action", "a renewal takes only name and force_renewal")
        name = checks.cert_name("name", body.get("name"))
        if name not in Certbot(b.dirs).lineages():
            if (b.dirs.uploaded_certs / name).exists():
                raise Conflict("name", f"{name} was uploaded: renew it by uploading its successor")
            raise NotFound("certificate", name)
        force = v.boolean("force_renewal", body.get("force_renewal", False))
        fields = {"domains": [], "challenge": None, "force_renewal": force}
    with Certbot(b.dirs).lock():  # busy: a 409 now rather than a failed job (a race still fails the job)
        pass

    def work(job: jobs.Job) -> None:
        def step(text: str) -> None:
            text = outbound.printable(text, STEP_LENGTH)
            job.data["status"] = text
            if len(job.data["steps"]) < MAX_STEPS:
                job.data["steps"].append({"time": time.time(), "text": text})
            job.save(force=True)  # a few dozen steps: each one is shown as it happens

        if action == "obtain":
            job.data["result"] = manage.obtain(b, fields["domains"], fields["challenge"], author, step, name=name)
        else:
            result = manage.renew(b, author, name, force=fields["force_renewal"], progress=step)[0]
            job.data["result"] = manage.describe(b, name)
            step(result["message"])

    ident = secrets.token_hex(8)
    return certificate_jobs(b).start(ident, {"action": action, "name": name, **fields, "author": author,
                                             "steps": [], "result": None},
                                     work, EXPECTED, f"certificate-{action}-{ident}")
