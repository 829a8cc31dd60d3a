"""Error bodies in the shape each client family expects: OpenAI on /v1, Ollama on /api."""

from __future__ import annotations

import json

# status -> (OpenAI error type, default code)
OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "requests",
    503: "server_error",
}


def body(status: int, message: str, code: str | None, *, ollama: bool, param: str | None = None,
         kind: str | None = None) -> bytes:
    """`kind` overrides the OpenAI error type of the status (OpenAI answers an exhausted quota with the type
    `insufficient_quota`, other 429s with `requests`)."""
    if ollama:
        return json.dumps({"error": message}).encode()
    error = {"message": message, "type": kind or OPENAI_TYPES.get(status, "server_error"), "param": param,
             "code": code}
    return json.dumps({"error": error}).encode()
