"""/api/v1/config (apply, history, diff, rollback, drift), /api/v1/usage, /api/v1/audit, /api/v1/health."""

from __future__ import annotations

from flask import jsonify

from manager import configuration, generations, metering, snapshot
from manager import validation as v
from manager.api.base import (
    BOOL,
    INT,
    NULLABLE_NUM,
    NUM,
    STR,
    ApiBlueprint,
    author,
    bastion,
    extend,
    fields,
    json_body,
    obj,
    query_param,
)
from manager.errors import NotFound
from manager.store import StoreCorrupt

config_bp = ApiBlueprint("config", __name__, url_prefix="/api/v1/config")
usage_bp = ApiBlueprint("usage", __name__, url_prefix="/api/v1/usage")
audit_bp = ApiBlueprint("audit", __name__, url_prefix="/api/v1/audit")
health_bp = ApiBlueprint("health", __name__, url_prefix="/api/v1/health")

GENERATION = obj(generation=INT, author=STR, time=NUM, sha256=STR, live=BOOL,
                 files={"type": "object", "additionalProperties": STR})  # file name → sha256
APPLIED = obj(generation=INT, changed=BOOL, reloaded=BOOL)
EPOCH = {"type": "number", "minimum": 0}


def _applied(result) -> dict:
    return {"generation": result.generation, "changed": result.changed, "reloaded": result.reloaded}


@config_bp.op("GET", "", "Live generation, drift and whether nginx runs",
              response=obj(generation=INT, drift=BOOL, drift_diff=STR, nginx_running=BOOL))
def config_status():
    b = bastion()
    drifted = generations.drifted(b.dirs)
    # what was changed by hand, against what Bastion rendered for this generation (no rendering here)
    diff = generations.drift_diff(b.dirs, drifted)
    return jsonify(generation=generations.live(b.dirs), drift=bool(drifted), drift_diff=diff,
                   nginx_running=b.nginx.master_pid() is not None)


@config_bp.op("GET", "/live", "The live nginx.conf (upstream keys masked)", response=obj(generation=INT, config=STR))
def config_live():
    dirs = bastion().dirs
    return jsonify(generation=generations.live(dirs), config=generations.live_text_masked(dirs))


@config_bp.op("POST", "/apply", "Render, test, reload and verify (rolled back with nginx's message on failure)",
              response=APPLIED)
def config_apply():
    return jsonify(_applied(configuration.reload(bastion(), author())))


@config_bp.op("GET", "/history", "Kept generations, newest first", response={"type": "array", "items": GENERATION})
def config_history():
    return jsonify(generations.history(bastion().dirs))


@config_bp.op("GET", "/history/<int:generation>", "One generation and its diff to the one before",
              response=extend(GENERATION, diff=STR))
def config_generation(generation: int):
    dirs = bastion().dirs
    if generation not in generations.numbers(dirs):
        raise NotFound("generation", str(generation))
    meta = generations.meta(dirs, generation)
    live = generation == generations.live(dirs)
    return jsonify({**meta, "live": live, "diff": generations.changes(dirs, generation)})


@config_bp.op("POST", "/rollback", "Restore pools, routes, settings and CIDR groups of a kept generation",
              body=obj(["generation"], generation=INT), response=APPLIED)
def config_rollback():
    body = fields(json_body(), {"generation"}, {"generation"})
    return jsonify(_applied(configuration.rollback(bastion(), body["generation"], author())))


@usage_bp.op("GET", "", "Requests per key and model", query={"key": STR, "since": EPOCH, "until": EPOCH},
             response={"type": "array", "items": obj(key=STR, model=STR, requests=INT, errors=INT, bytes_sent=INT,
                                                     avg_ttfb=NULLABLE_NUM, avg_duration=NUM, last_request=NUM)})
def usage_summary():
    usage = bastion().usage
    usage.ingest()
    return jsonify(usage.summary(query_param("key", lambda f, x: x), query_param("since", v.epoch),
                                 query_param("until", v.epoch)))


@usage_bp.op("GET", "/records", "Single requests, newest first",
             query={"key": STR, "since": EPOCH, "until": EPOCH, "limit": INT},
             response={"type": "array", "items": {"type": "object"}})
def usage_records():
    usage = bastion().usage
    usage.ingest()
    return jsonify(usage.records(query_param("key", lambda f, x: x), query_param("since", v.epoch),
                                 query_param("until", v.epoch),
                                 query_param("limit", lambda f, x: v.integer(f, x, 1, 10000), 1000)))


@audit_bp.op("GET", "", "Who changed what, newest first", query={"since": EPOCH, "limit": INT},
             response={"type": "array", "items": obj(time=NUM, author=STR, action=STR)})
def audit_log():
    return jsonify(bastion().audit.entries(query_param("since", v.epoch),
                                           query_param("limit", lambda f, x: v.integer(f, x, 1, 10000), 200)))


@health_bp.op("GET", "", "Is the stack up, which generation is live, do changes reach the data plane", public=True,
              response=obj(status=STR, generation=INT, nginx_running=BOOL, store=STR,
                           gate={"type": "array", "items": STR}, token_metering=STR))
def health():
    b = bastion()
    try:
        b.store.check()
        store = "ok"
    except StoreCorrupt:  # the data plane still serves the live generation; the message names the file
        store = "unreadable (see the manager log; management answers 503 until it is repaired)"
    # the gate keeps serving what it has; a problem here means changes (a revoked key!) do not reach it
    gate = snapshot.gate_problems(b)
    return jsonify(status="ok" if store == "ok" and not gate else "degraded", generation=generations.live(b.dirs),
                   nginx_running=b.nginx.master_pid() is not None, store=store, gate=gate,
                   token_metering=metering.detect(b.nginx.binary).status)
