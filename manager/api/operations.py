"""/api/v1/config (apply, history, diff, rollback, drift), /api/v1/usage, /api/v1/audit, /api/v1/health."""

from __future__ import annotations

import json

from flask import Response, jsonify, request, stream_with_context

from manager import configuration, generations, metering, snapshot, usage_records
from manager import usage_queries as q
from manager import validation as v
from manager.api.base import (
    BOOL,
    INT,
    NULLABLE_INT,
    NULLABLE_NUM,
    NULLABLE_STR,
    NUM,
    STR,
    STR_LIST,
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


RECORD = {"type": "object", "properties": {
    "id": INT, "request_id": NULLABLE_STR, "start": NUM, "end": NUM, "key": NULLABLE_STR, "model": NULLABLE_STR,
    "pool": NULLABLE_STR, "upstream": NULLABLE_STR, "status": INT, "upstream_status": NULLABLE_INT,
    "bytes_sent": NULLABLE_INT, "request_length": NULLABLE_INT, "ttfb": NULLABLE_NUM, "duration": NULLABLE_NUM,
    "method": NULLABLE_STR, "uri": NULLABLE_STR, "remote_addr": NULLABLE_STR, "outcome": NULLABLE_STR,
    "prompt_tokens": NULLABLE_INT, "completion_tokens": NULLABLE_INT, "total_tokens": NULLABLE_INT}}
GROUP_COUNT = {"type": "object", "properties": {
    "key": NULLABLE_STR, "model": NULLABLE_STR, "pool": NULLABLE_STR, "status": NULLABLE_INT,
    "outcome": NULLABLE_STR, "requests": INT, "errors": INT, "metered": INT, "prompt_tokens": NULLABLE_INT,
    "completion_tokens": NULLABLE_INT, "total_tokens": NULLABLE_INT}}
SUMMARY_ROW = {"type": "object", "properties": {
    "key": NULLABLE_STR, "model": NULLABLE_STR, "pool": NULLABLE_STR, "bucket": INT,
    **{name: NULLABLE_NUM if name == "cost" or "duration" in name or "ttfb" in name else NULLABLE_INT
       for name in q.SUMMARY_COUNTS}}}


def _names(choices: tuple[str, ...], empty: bool = True) -> dict:
    """A comma-separated list of `choices` (or none)."""
    one = f"({'|'.join(choices)})"
    return {"type": "string", "pattern": f"^({'none|' if empty else ''}{one}(,{one})*)$"}


FILTERS = {
    "key": {"type": "string", "pattern": q.KEY_ID_RE.pattern}, "model": STR, "pool": STR,
    "since": EPOCH, "until": EPOCH,
}
FORMAT = {"type": "string", "enum": list(q.FORMATS)}
RECORDS_QUERY = {
    **FILTERS, "status": {"type": "string", "pattern": r"^([1-5]xx|[1-5][0-9][0-9])$"},
    "outcome": {"type": "string", "enum": [*usage_records.OUTCOMES, q.UNKNOWN_OUTCOME]},
    "group_by": _names(q.RECORD_GROUPS),
    "limit": {"type": "integer", "minimum": 1, "maximum": q.MAX_LIMIT},
    "offset": {"type": "integer", "minimum": 0, "maximum": q.MAX_OFFSET},
    "cursor": {"type": "string", "pattern": q.CURSOR_RE.pattern}, "format": FORMAT,
}
SUMMARY_QUERY = {
    **FILTERS,
    "group_by": _names(q.SUMMARY_GROUPS),
    "bucket": {"type": "string", "enum": list(q.BUCKETS)}, "fields": _names(q.SUMMARY_COUNTS, empty=False),
    "limit": {"type": "integer", "minimum": 1, "maximum": q.MAX_SUMMARY_ROWS}, "format": FORMAT,
}


def _limit(name: str, hi: int, default: int):
    return query_param(name, lambda f, x: v.integer(f, x, 1, hi), default)


def _csv(columns: list[str], rows: list[dict], name: str, headers: dict | None = None) -> Response:
    return Response(stream_with_context(q.to_csv(columns, rows)), mimetype="text/csv",
                    headers={"Content-Disposition": f'attachment; filename="{name}.csv"', **(headers or {})})


@usage_bp.op("GET", "", "Single requests (newest first, paged), or their counts per group", csv=True,
             query=RECORDS_QUERY,
             response=obj(records={"type": "array", "items": RECORD}, next_cursor=NULLABLE_STR,
                           group_by=STR_LIST, groups={"type": "array", "items": GROUP_COUNT}))
def usage_records_page():
    """Records from the raw table: filters, keyset (`cursor`) or `offset` paging, `group_by` for counts."""
    q.check_known(request.args, RECORDS_QUERY)
    filters = q.parse_filters(request.args)
    group_by = query_param("group_by", lambda f, x: q.names(f, x, q.RECORD_GROUPS), ())
    limit = _limit("limit", q.MAX_LIMIT, 100)
    offset = query_param("offset", lambda f, x: v.integer(f, x, 0, q.MAX_OFFSET), 0)
    after = query_param("cursor", q.cursor)
    if after is not None and (offset or group_by):
        raise v.ValidationError("cursor", "cannot be combined with offset or group_by (use one way of paging)")
    as_csv = q.wants_csv(request.args.get("format"), request.accept_mimetypes)
    usage = bastion().usage
    usage.catch_up()
    if group_by:
        groups = q.group_counts(usage, filters, group_by, limit, offset)
        if as_csv:
            return _csv([*group_by, *q.GROUP_COUNTS], groups, "usage-groups")
        return jsonify(group_by=list(group_by), groups=groups)
    page = q.records(usage, filters, limit, after, offset)
    if as_csv:
        columns = list(page.records[0]) if page.records else list(usage_records.RECORD_FIELDS)
        return _csv(columns, page.records, "usage-records",
                    {"X-Next-Cursor": page.next_cursor} if page.next_cursor else None)
    return jsonify(records=page.records, next_cursor=page.next_cursor)


@usage_bp.op("GET", "/summary", "Requests, errors, tokens, cost and p50/p95 latency per group and time bucket",
             csv=True, query=SUMMARY_QUERY,
             response=obj(span=INT, since=NULLABLE_NUM, until=NULLABLE_NUM, bucket=STR, group_by=STR_LIST,
                          truncated=BOOL, rows={"type": "array", "items": SUMMARY_ROW}))
def usage_summary():
    """From the rollups (never the raw records); costs from the `model_prices` setting."""
    q.check_known(request.args, SUMMARY_QUERY)
    filters = q.parse_filters(request.args, ("key", "model", "pool", "since", "until"))
    group_by = query_param("group_by", lambda f, x: q.names(f, x, q.SUMMARY_GROUPS), ("key", "model"))
    bucket = query_param("bucket", lambda f, x: v.choice(f, x, q.BUCKETS), "none")
    figures = query_param("fields", lambda f, x: q.names(f, x, q.SUMMARY_COUNTS, empty=False), q.SUMMARY_COUNTS)
    limit = _limit("limit", q.MAX_SUMMARY_ROWS, q.DEFAULT_SUMMARY_ROWS)
    as_csv = q.wants_csv(request.args.get("format"), request.accept_mimetypes)
    b = bastion()
    b.usage.catch_up()
    result = q.summary(b.usage, filters, group_by, bucket, b.settings()["model_prices"], limit, as_json=not as_csv,
                       fields=figures)
    if as_csv:
        return _csv(result.columns, result.rows, "usage-summary",
                    {"X-Truncated": "true"} if result.truncated else None)
    # the rows are JSON text from SQLite already (tens of thousands of rows never become Python objects)
    head = json.dumps({"span": result.span, "since": result.since, "until": result.until, "bucket": result.bucket,
                       "group_by": list(result.group_by), "truncated": result.truncated})
    return Response(f'{head[:-1]}, "rows": {result.rows_json}}}', mimetype="application/json")


@usage_bp.op("GET", "/records", "Single requests, newest first (the array of GET /api/v1/usage's records)",
             query={"key": STR, "since": EPOCH, "until": EPOCH, "limit": INT},
             response={"type": "array", "items": RECORD})
def usage_records():
    filters = q.parse_filters(request.args, ("key", "since", "until"))
    limit = _limit("limit", q.MAX_LIMIT, 1000)
    usage = bastion().usage
    usage.catch_up()
    return jsonify(q.records(usage, filters, limit).records)


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
    gate = snapshot.gate_problems(b) + snapshot.edit_problems(b)
    return jsonify(status="ok" if store == "ok" and not gate else "degraded", generation=generations.live(b.dirs),
                   nginx_running=b.nginx.master_pid() is not None, store=store, gate=gate,
                   token_metering=metering.detect(b.nginx.binary).status)
