"""/api/v1/keys: API keys (the secret appears once, in the creation response)."""

from __future__ import annotations

from flask import jsonify, request

from manager import keys as keys_mod
from manager import quotas
from manager.api.base import (
    BOOL,
    INT,
    NULLABLE_NUM,
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
)

bp = ApiBlueprint("keys", __name__, url_prefix="/api/v1/keys")
QUOTA = {"type": ["integer", "null"], "minimum": 1, "maximum": keys_mod.QUOTA_MAX}
KEY_FIELDS = {"name": STR, "models": STR_LIST, "endpoints": STR_LIST, "rpm": INT,
              "expires": {"type": ["string", "number", "null"]}, "cidrs": STR_LIST, "cidr_groups": STR_LIST,
              "enabled": BOOL, "tpm": QUOTA, "tokens_per_day": QUOTA, "tokens_per_month": QUOTA,
              "requests_per_day": QUOTA,
              "max_parallel": {"type": ["integer", "null"], "minimum": 1, "maximum": keys_mod.MAX_PARALLEL},
              "default_model": {"type": ["string", "null"]}, "allow_auto": BOOL}
EDITABLE = set(KEY_FIELDS)
KEY = obj(id=STR, key=STR, status=STR, created_at=NUM, created_by=STR, revoked_at=NULLABLE_NUM,
          last_used=NULLABLE_NUM, **{**KEY_FIELDS, "expires": NULLABLE_NUM})
KEY["additionalProperties"] = True


@bp.op("GET", "", "List keys (masked)", query={"include_revoked": BOOL},
       response={"type": "array", "items": KEY})
def list_keys():
    include = request.args.get("include_revoked", "false").lower() == "true"
    return jsonify(keys_mod.with_last_used(bastion(), keys_mod.all_keys(bastion(), include)))


@bp.op("POST", "", "Create a key; `secret` is shown in this response only", body=obj(["name"], **KEY_FIELDS),
       response=extend(KEY, secret=STR), status=201)
def create_key():
    body = fields(json_body(), EDITABLE, {"name"})
    record, token = keys_mod.create(bastion(), body.pop("name"), author=author(), **body)
    return jsonify({**record, "secret": token}), 201


QUOTA_STATE = obj(limit=INT, used=INT, remaining=INT, resets_at=NUM, window=STR)
KEY_DETAILS = extend(KEY, quotas={"type": "object", "additionalProperties": QUOTA_STATE})


@bp.op("GET", "/<key_id>", "One key (masked), with the state of each of its quotas", response=KEY_DETAILS)
def get_key(key_id: str):
    record = keys_mod.with_last_used(bastion(), [keys_mod.get(bastion(), key_id)])[0]
    return jsonify({**record, "quotas": quotas.details(bastion(), record)})


@bp.op("PATCH", "/<key_id>", "Change a key's rules; takes effect within a second", body=obj(**KEY_FIELDS),
       response=KEY)
def update_key(key_id: str):
    return jsonify(keys_mod.update(bastion(), key_id, author(), **fields(json_body(), EDITABLE)))


@bp.op("DELETE", "/<key_id>", "Revoke a key for good", response=KEY)
def revoke_key(key_id: str):
    return jsonify(keys_mod.revoke(bastion(), key_id, author()))
