"""/api/v1/pools/<name>/ollama/...: the models on one Ollama upstream of a pool: list, pull, delete (admins
only; manager/ollama_models.py). The upstream is named by its URL and must be one of the pool's."""

from __future__ import annotations

from flask import jsonify, request

from manager import ollama_models as om
from manager import outbound
from manager.api.base import (
    INT,
    NULLABLE_INT,
    NULLABLE_NUM,
    NULLABLE_STR,
    STR,
    ApiBlueprint,
    author,
    bastion,
    error_response,
    fields,
    json_body,
    obj,
)
from manager.errors import NotFound

bp = ApiBlueprint("ollama", __name__, url_prefix="/api/v1/pools")

MODEL = {"type": "object", "required": ["name"], "properties": {
    "name": STR, "size": INT, "digest": STR, "modified_at": STR,
    "details": {"type": "object", "additionalProperties": True}}}
PULL = obj(id=STR, pool=STR, upstream=STR, model=STR, author=STR,
           state={"type": "string", "enum": ["running", "done", "failed", "interrupted"]},
           status=STR, total=NULLABLE_INT, completed=NULLABLE_INT, error=NULLABLE_STR, started={"type": "number"},
           updated={"type": "number"}, finished=NULLABLE_NUM)
WHERE = {"upstream": STR}


def upstream_failed(e: outbound.OutboundError):
    """The upstream's refusal or failure, as a 502 naming it (its own words when it gave some)."""
    return error_response(502, f"the Ollama upstream: {e}", "upstream")


@bp.op("GET", "/<name>/ollama/models", "The models on one Ollama upstream of the pool (its /api/tags)",
       query=WHERE, response={"type": "array", "items": MODEL}, admin=True)
def list_models(name: str):
    try:
        return jsonify(om.list_models(bastion(), name, request.args.get("upstream")))
    except outbound.OutboundError as e:
        return upstream_failed(e)


@bp.op("DELETE", "/<name>/ollama/models", "Delete a model from one Ollama upstream of the pool",
       query={**WHERE, "model": STR}, response=obj(success={"type": "boolean"}))
def delete_model(name: str):
    try:
        om.delete_model(bastion(), name, request.args.get("upstream"), request.args.get("model"), author())
    except outbound.OutboundError as e:
        return upstream_failed(e)
    return jsonify(success=True)


@bp.op("GET", "/<name>/ollama/pulls", "The pool's model pulls (running, and finished within the hour)",
       response={"type": "array", "items": PULL}, admin=True)
def list_pulls(name: str):
    if bastion().store.find("pools", name=name) is None:
        raise NotFound("pool", name)
    return jsonify(om.list_pulls(bastion(), name))


@bp.op("POST", "/<name>/ollama/pulls", "Start pulling a model onto one Ollama upstream of the pool (a job: "
       "poll the pulls for its progress)", body=obj(["upstream", "model"], upstream=STR, model=STR), response=PULL,
       status=202)
def start_pull(name: str):
    body = fields(json_body(), {"upstream", "model"}, {"upstream", "model"})
    return jsonify(om.start_pull(bastion(), name, body["upstream"], body["model"], author())), 202
