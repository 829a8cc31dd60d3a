"""What every blueprint shares: declaring operations (route + OpenAPI in one place), JSON bodies, errors.

`ApiBlueprint.op()` registers a Flask view and records its OpenAPI operation at the same time, so the
document at /api/v1/openapi.json cannot drift from the routes that exist.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flask import Blueprint, current_app, g, jsonify, request

from authsvc import bodies
from manager import admin_guard
from manager.validation import ValidationError, boolean

if TYPE_CHECKING:
    from manager.context import Bastion

Schema = dict[str, Any]


@dataclass(frozen=True)
class Operation:
    method: str
    path: str  # OpenAPI form: /api/v1/keys/{key_id}
    path_params: dict[str, Schema]
    summary: str
    tag: str
    body: Schema | None
    query: dict[str, Schema]
    response: Schema
    status: int
    public: bool
    needs_admin: bool
    media: str = "application/json"  # the success response's content type
    csv: bool = False  # also answers text/csv (?format=csv or Accept: text/csv)


class ApiBlueprint(Blueprint):
    """A blueprint whose routes are declared with `op()`; `operations` feeds the OpenAPI document."""

    def __init__(self, name: str, import_name: str, url_prefix: str = "", tag: str | None = None):
        super().__init__(name, import_name, url_prefix=url_prefix or None)
        self.operations: list[Operation] = []
        self.tag = tag or name
        self.prefix = url_prefix

    def op(self, method: str, rule: str, summary: str, *, body: Schema | None = None,
           query: dict[str, Schema] | None = None, response: Schema | None = None, status: int = 200,
           public: bool = False, admin: bool | None = None, media: str = "application/json",
           csv: bool = False) -> Callable:
        """Declare an operation. `public` skips sign-in; `admin` defaults to True for methods that change things
        (False e.g. for logout, True for a GET that acts, like /nginx/reload)."""
        needs_admin = (method not in ("GET", "HEAD")) if admin is None else admin

        def register(fn: Callable) -> Callable:
            fn.public = public  # type: ignore[attr-defined]
            fn.needs_admin = needs_admin  # type: ignore[attr-defined]
            self.add_url_rule(rule, endpoint=fn.__name__, view_func=fn, methods=[method])
            path = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", self.prefix + rule)
            params = {name: INT if conv == "int" else STR for conv, name in re.findall(r"<(?:(\w+):)?(\w+)>", rule)}
            self.operations.append(Operation(
                method.lower(), path, params, summary, self.tag, body, query or {}, response or {"type": "object"},
                status, public, needs_admin, media, csv))
            return fn
        return register


def bastion() -> Bastion:
    """The `Bastion` of the app handling the current request."""
    return current_app.extensions["bastion"]


def client_ip() -> str:
    """nginx's admin listener sets X-Real-IP (after real_ip processing); only nginx reaches the manager's socket."""
    return request.headers.get("X-Real-IP") or request.remote_addr or "unknown"


def json_body() -> dict[str, Any]:
    """The request's JSON object, read like the gate reads bodies (authsvc.bodies.loads: UTF-8, no NaN,
    nesting capped, so a deep body is a 400 and never a RecursionError). A `force` field (accepted on every
    route, for the admin self-lockout guard) is taken out, so `fields()` never sees it."""
    if not request.is_json:
        raise ValidationError("body", "must be a JSON object (Content-Type: application/json)")
    try:
        data = bodies.loads(request.get_data(cache=True))
    except bodies.TooDeep as e:
        raise ValidationError("body", str(e)) from None
    except ValueError as e:  # also NaN and Infinity, which Python would take but no consumer can handle
        raise ValidationError("body", f"is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValidationError("body", "must be a JSON object")
    if "force" in data and boolean("force", data.pop("force")):
        admin_guard.force()
    return data


def fields(data: dict[str, Any], allowed: set[str], required: set[str] = frozenset()) -> dict[str, Any]:
    """The body's fields, refusing unknown ones and naming the first missing one."""
    for name in data:
        if name not in allowed:
            raise ValidationError(name, "is not a known field")
    for name in sorted(required):
        if name not in data:
            raise ValidationError(name, "is required")
    return data


def author() -> str:
    identity = getattr(g, "identity", None)
    return identity.username if identity else "anonymous"


def error_response(status: int, message: str, field_name: str | None = None, headers: dict | None = None,
                   extra: dict | None = None):
    """One error shape for every endpoint: llm-proxy's `success/message` plus a native `error` object."""
    body = {"success": False, "message": message, "error": {"message": message, "field": field_name}, **(extra or {})}
    return jsonify(body), status, headers or {}


def query_param(name: str, convert: Callable[[str, Any], Any], default: Any = None) -> Any:
    raw = request.args.get(name)
    return default if raw in (None, "") else convert(name, raw)


# Schema fragments reused across blueprints.
STR = {"type": "string"}
INT = {"type": "integer"}
NUM = {"type": "number"}
BOOL = {"type": "boolean"}
STR_LIST = {"type": "array", "items": STR}
NULLABLE_NUM = {"type": ["number", "null"]}
NULLABLE_STR = {"type": ["string", "null"]}
NULLABLE_INT = {"type": ["integer", "null"]}
OK = {"type": "object", "properties": {"success": BOOL, "message": STR}}


def obj(required: list[str] | None = None, **props: Schema) -> Schema:
    schema: Schema = {"type": "object", "properties": props, "additionalProperties": False}
    if required:
        schema["required"] = required
    return schema


def extend(schema: Schema, **props: Schema) -> Schema:
    """An object schema with more properties (allOf cannot do it when additionalProperties is false)."""
    return {**schema, "properties": {**schema["properties"], **props}}
