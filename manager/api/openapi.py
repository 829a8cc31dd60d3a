"""GET /api/v1/openapi.json, built from the operations the blueprints declared (so it matches them)."""

from __future__ import annotations

from typing import Any

from flask import jsonify

from manager.api.base import ApiBlueprint, Operation

bp = ApiBlueprint("openapi", __name__, url_prefix="/api/v1")

ERROR = {"type": "object", "properties": {
    "success": {"type": "boolean"}, "message": {"type": "string"},
    "error": {"type": "object", "properties": {"message": {"type": "string"}, "field": {"type": ["string", "null"]}}},
}}


def _operation(op: Operation) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "summary": op.summary,
        "tags": [op.tag],
        "operationId": f"{op.method}_{op.path}".replace("/", "_").replace("{", "").replace("}", "").replace("-", "_"),
        "responses": {
            str(op.status): {"description": "success", "content": {op.media: {"schema": op.response}}},
            "default": {"description": "error (4xx with the field named)",
                        "content": {"application/json": {"schema": ERROR}}},
        },
    }
    if op.csv:
        doc["responses"][str(op.status)]["content"]["text/csv"] = {"schema": {"type": "string"}}
    params = [{"name": name, "in": "path", "required": True, "schema": schema}
              for name, schema in op.path_params.items()]
    params += [{"name": name, "in": "query", "required": False, "schema": schema} for name, schema in op.query.items()]
    if params:
        doc["parameters"] = params
    if op.body is not None:
        doc["requestBody"] = {"required": True, "content": {"application/json": {"schema": op.body}}}
    doc["security"] = [] if op.public else [{"bearer": []}, {"cookie": []}]
    if op.needs_admin:
        doc["description"] = "Needs the admin role."
    return doc


def document(operations: list[Operation]) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for op in operations:
        paths.setdefault(op.path, {})[op.method] = _operation(op)
    return {
        "openapi": "3.1.0",
        "info": {"title": "Bastion management API", "version": "1"},
        "paths": paths,
        "components": {"securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
            "cookie": {"type": "apiKey", "in": "cookie", "name": "auth_token"},
        }},
    }


@bp.op("GET", "/openapi.json", "This document", public=True)
def openapi():
    from manager.api import BLUEPRINTS

    return jsonify(document([op for blueprint in BLUEPRINTS for op in blueprint.operations]))
