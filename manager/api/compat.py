"""The llm-proxy management API, same paths, methods, bodies and response shapes, so its curl recipes work.

Deliberate difference: key listings show a masked key (secrets are never stored, see docs/security.md).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

from flask import jsonify

from authsvc import keys as keyformat
from manager import configuration, generations, usage_queries
from manager import keys as keys_mod
from manager import validation as v
from manager.api.base import (
    BOOL,
    INT,
    OK,
    STR,
    STR_LIST,
    ApiBlueprint,
    author,
    bastion,
    fields,
    json_body,
    obj,
    query_param,
)
from manager.certs import manage as certificates

bp = ApiBlueprint("compat", __name__, tag="llm-proxy")
KEY = obj(id=STR, key=STR, username=STR, createdAt=STR)
WEEK_MS = 7 * 24 * 3600 * 1000


def _llm_proxy_key(record: dict, token: str | None = None) -> dict:
    created = datetime.fromtimestamp(record["created_at"], UTC).isoformat(timespec="milliseconds")
    return {"id": record["id"], "key": token or record["key"], "username": record["name"],
            "createdAt": created.replace("+00:00", "Z")}


@bp.op("GET", "/api/keys", "List API keys (masked)", response=obj(success=BOOL, keys={"type": "array", "items": KEY}))
def list_keys():
    return jsonify(success=True, keys=[_llm_proxy_key(k) for k in keys_mod.all_keys(bastion())])


@bp.op("POST", "/api/keys", "Create an API key; the full key is in this response only",
       body=obj(["username"], username=STR), response=obj(success=BOOL, key=KEY), status=201)
def create_key():
    body = fields(json_body(), {"username"}, {"username"})
    record, token = keys_mod.create(bastion(), v.label("username", body["username"]), author=author())
    return jsonify(success=True, key=_llm_proxy_key(record, token)), 201


@bp.op("DELETE", "/api/keys/<key_id>", "Revoke an API key", response=OK)
def delete_key(key_id: str):
    keys_mod.revoke(bastion(), key_id, author())
    return jsonify(success=True, message="API key deleted successfully")


@bp.op("GET", "/api/analytics/<key_ref>", "Requests of a key (epoch ms; endTime null for failed requests)",
       query={"startDate": INT, "endDate": INT},
       response=obj(success=BOOL, records={"type": "array",
                                           "items": obj(startTime=INT, endTime={"type": ["integer", "null"]})}))
def analytics(key_ref: str):
    key_id = keyformat.key_id_of(key_ref) or key_ref  # llm-proxy passed the key itself; the id works too
    keys_mod.get(bastion(), key_id)  # 404 for an unknown key
    now_ms = int(time.time() * 1000)
    end = query_param("endDate", lambda f, x: v.integer(f, x, 0, 10**14), now_ms)
    start = query_param("startDate", lambda f, x: v.integer(f, x, 0, 10**14), end - WEEK_MS)
    usage = bastion().usage
    usage.catch_up()
    rows = usage_queries.records(usage, usage_queries.Filters(key=key_id, since=start / 1000, until=end / 1000),
                                 limit=100_000).records
    records = [{"startTime": int(r["start"] * 1000),
                "endTime": int(r["end"] * 1000) if r["status"] < 400 else None} for r in reversed(rows)]
    return jsonify(success=True, records=records)


@bp.op("POST", "/nginx/certificates/obtain", "Obtain a certificate through HTTP-01 (runs certbot; takes seconds)",
       body=obj(["domains"], domains=STR_LIST), response=OK)
def obtain_certificates():
    body = fields(json_body(), {"domains"}, {"domains"})
    status = certificates.obtain(bastion(), body["domains"], "http-01", author())
    return jsonify(success=True, message=f"Certificate {status['name']} obtained for {', '.join(status['domains'])}")


@bp.op("GET", "/nginx/certificates/renew", "Renew the certificates that are due (runs certbot)", response=OK,
       admin=True)
def renew_certificates():
    results = certificates.renew(bastion(), author())
    message = "; ".join(f"{r['name']}: {r['message']}" for r in results) or "no certificate to renew"
    ok = all(r["ok"] for r in results)
    return jsonify(success=ok, message=message), 200 if ok else 502


@bp.op("POST", "/nginx/config/write-default", "Serve a domain; admin listener limited to these networks",
       body=obj(["domain", "cidrGroups"], domain=STR, cidrGroups=STR_LIST), response=OK)
def write_default():
    body = fields(json_body(), {"domain", "cidrGroups"}, {"domain", "cidrGroups"})
    configuration.write_default(bastion(), body["domain"], body["cidrGroups"], author())
    return jsonify(success=True, message="Default config written successfully")


@bp.op("GET", "/nginx/reload", "Reload nginx (verified; rolled back if it fails)", response=OK, admin=True)
def reload_nginx():
    result = configuration.reload(bastion(), author())
    return jsonify(success=True, message=f"nginx reloaded (generation {result.generation})")


@bp.op("GET", "/nginx/config/get", "The live nginx configuration (upstream keys masked)",
       response=obj(success=BOOL, message=STR, config=STR))
def get_config():
    dirs = bastion().dirs
    return jsonify(success=True, message=f"generation {generations.live(dirs)}",
                   config=generations.live_text_masked(dirs))


@bp.op("POST", "/nginx/config/update", "Set the custom server config (tested, applied, rolled back on failure)",
       body=obj(["config"], config=STR), response=OK)
def update_config():
    body = fields(json_body(), {"config"}, {"config"})
    configuration.set_custom_config(bastion(), body["config"], author())
    return jsonify(success=True, message=f"config applied (generation {generations.live(bastion().dirs)})")


@bp.op("GET", "/nginx/config/get-default", "The configuration Bastion renders from its settings",
       response=obj(success=BOOL, config=STR))
def get_default_config():
    # the live generation as rendered (hand edits left out): no DNS, store or health reads in a GET
    return jsonify(success=True, config=generations.rendered_text_masked(bastion().dirs))
