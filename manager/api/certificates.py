"""/api/v1/certificates: status, obtain (ACME), upload, renew, remove, and the write-only Cloudflare token.

An obtain runs certbot inside the request (seconds; the admin listener waits 300 s). A failure on the ACME
side (server unreachable, challenge refused, Cloudflare refusing the token) is a 502 carrying certbot's own
explanation; checks that fail before anything is asked are 400 (bad input) or 409 (missing prerequisite).
`POST /jobs` runs an obtain or a renewal as a background job instead, which the admin page polls for each
step (manager/certs/jobs.py).
"""

from __future__ import annotations

from flask import jsonify, request

from manager.api.base import (
    BOOL,
    NULLABLE_NUM,
    NULLABLE_STR,
    STR,
    STR_LIST,
    ApiBlueprint,
    author,
    bastion,
    error_response,
    fields,
    json_body,
    obj,
)
from manager.certs import jobs, manage
from manager.certs.certbot import CertbotFailed
from manager.certs.preflight import AcmeUnavailable
from manager.validation import boolean

bp = ApiBlueprint("certificates", __name__, url_prefix="/api/v1/certificates")

CHALLENGE = {"type": "string", "enum": ["http-01", "dns-01"]}
RENEWAL = {"type": ["object", "null"], "properties": {"time": {"type": "number"}, "ok": BOOL, "message": STR}}
CERTIFICATE = obj(name=STR, source={"type": "string", "enum": ["acme", "upload"]},
                  challenge={"type": ["string", "null"]}, domains=STR_LIST, issuer=NULLABLE_STR,
                  not_before=NULLABLE_NUM, not_after=NULLABLE_NUM, days_left={"type": ["integer", "null"]},
                  last_renewal=RENEWAL, last_deployed=NULLABLE_NUM)
RESULT = obj(name=STR, ok=BOOL, message=STR)
JOB = obj(id=STR, action={"type": "string", "enum": ["obtain", "renew"]}, name=STR, domains=STR_LIST,
          challenge={"type": ["string", "null"]}, force_renewal=BOOL, author=STR,
          state={"type": "string", "enum": ["running", "done", "failed", "interrupted"]},
          status=STR, steps={"type": "array", "items": obj(time={"type": "number"}, text=STR)},
          error=NULLABLE_STR, result={"oneOf": [CERTIFICATE, {"type": "null"}]}, started={"type": "number"},
          updated={"type": "number"}, finished=NULLABLE_NUM)


@bp.app_errorhandler(CertbotFailed)
@bp.app_errorhandler(AcmeUnavailable)
def acme_failed(e: Exception):
    """The ACME side failed; nothing was changed (also for the llm-proxy routes, in their shape)."""
    return error_response(502, str(e))


@bp.op("GET", "", "Every certificate: names, issuer, validity, days left, source, last renewal",
       response={"type": "array", "items": CERTIFICATE})
def list_certificates():
    return jsonify(manage.all_certificates(bastion()))


@bp.op("POST", "", "Obtain a certificate from the ACME server (runs certbot; takes seconds)",
       body=obj(["domains"], domains=STR_LIST, challenge=CHALLENGE, name=STR), response=CERTIFICATE, status=201)
def obtain():
    body = fields(json_body(), {"domains", "challenge", "name"}, {"domains"})
    return jsonify(manage.obtain(bastion(), body["domains"], body.get("challenge", "http-01"), author(),
                                 name=body.get("name"))), 201


@bp.op("GET", "/jobs", "The obtain and renewal jobs (running, and finished within the hour), newest first",
       response={"type": "array", "items": JOB}, admin=True)
def list_jobs():
    return jsonify(jobs.list_jobs(bastion()))


@bp.op("GET", "/jobs/<job_id>", "One obtain or renewal job: its steps so far, then the certificate or the error",
       response=JOB, admin=True)
def get_job(job_id: str):
    return jsonify(jobs.get_job(bastion(), job_id))


@bp.op("POST", "/jobs", "Obtain (domains, challenge, name) or renew (name, force_renewal) as a background job: "
       "answers at once; poll the job for each step", body=obj(["action"], action={"type": "string", "enum":
       ["obtain", "renew"]}, domains=STR_LIST, challenge=CHALLENGE, name=STR, force_renewal=BOOL),
       response=JOB, status=202)
def start_job():
    body = fields(json_body(), {"action", "domains", "challenge", "name", "force_renewal"}, {"action"})
    return jsonify(jobs.start(bastion(), body, author())), 202


@bp.op("POST", "/upload", "Store an existing certificate chain and key (PEM), checked first",
       body=obj(["certificate", "private_key", "domains"], certificate=STR, private_key=STR, domains=STR_LIST,
                name=STR), response=CERTIFICATE, status=201)
def upload():
    body = fields(json_body(), {"certificate", "private_key", "domains", "name"},
                  {"certificate", "private_key", "domains"})
    return jsonify(manage.upload(bastion(), body["certificate"], body["private_key"], body["domains"], author(),
                                 name=body.get("name"))), 201


@bp.op("POST", "/<name>/renew", "Renew one ACME certificate if due (force_renewal: now); runs the deploy hook",
       body=obj(force_renewal=BOOL), response=RESULT)
def renew(name: str):
    # `force` is the admin self-lockout override on every route (base.json_body), hence force_renewal
    body = fields(json_body(), {"force_renewal"}) if request.get_data(cache=True) else {}
    force = boolean("force_renewal", body.get("force_renewal", False))
    return jsonify(manage.renew(bastion(), author(), name, force=force)[0])


@bp.op("DELETE", "/<name>", "Remove a certificate (ACME: deleted from certbot's store, not revoked; upload: its files)",
       response=obj(success=BOOL))
def remove(name: str):
    manage.remove(bastion(), name, author())
    return jsonify(success=True)


@bp.op("PUT", "/cloudflare-token", "Set the Cloudflare API token for dns-01 (write-only; null removes it)",
       body=obj(["token"], token=NULLABLE_STR), response=obj(success=BOOL, token_set=BOOL))
def cloudflare_token():
    body = fields(json_body(), {"token"}, {"token"})
    return jsonify(success=True, token_set=manage.set_cloudflare_token(bastion(), body["token"], author()))
