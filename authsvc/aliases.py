"""Which model a request really asks for, and the body edits that tell the upstream: model aliases (a public
name a pool serves under another upstream name), a key's default model (for a body without one) and `"model":
"auto"` (the first model of the `auto_models` setting with a live pool).

The gate reads the body once (authsvc.bodies) and knows the exact byte span of its model value, so it never
re-serialises the body: it names byte edits, `[start, end, text]` (an insertion when start == end), in one
header, X-Bastion-Edit, which nginx's meter.js applies to the body it sends upstream (`requestBody`); every other
byte goes as the client sent it. The stream_options.include_usage insertion (authsvc/include_usage.py) travels in
the same list. The answer reports the public name again: X-Bastion-Public-Model tells meter.js to put it in the
top-level `model` of the JSON answer, of each SSE event and of each NDJSON line.

Edits need njs; a snapshot that says nginx cannot apply them (`Snapshot.body_edits`) makes every request that
needs one a 503 naming the reason, never a request sent upstream with a name the upstream does not know.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote_plus

from authsvc import bodies

AUTO = "auto"
EDIT_HEADER = "X-Bastion-Edit"
PUBLIC_HEADER = "X-Bastion-Public-Model"
ARGS_HEADER = "X-Bastion-Args"  # a WebSocket's query string with the upstream's model name (the @wsa_ location)
_COMPACT = json.JSONEncoder(separators=(",", ":"))  # built once: json.dumps with options builds one per call


@dataclass(slots=True)
class Choice:
    """What a request is routed on and what its upstream gets: `model` is the name key allow-lists, routing and
    usage see (public, resolved); `pool` the pool chosen here (None: the gate's usual choice); `upstream` the
    name the upstream must read; `inserted` when the body names no model (a key's default model is added)."""

    model: str
    pool: str | None = None
    upstream: str | None = None
    inserted: bool = False

    @property
    def sent(self) -> str:
        return self.upstream or self.model


def model_edit(raw: bytes, body: dict[str, Any], choice: Choice, asked: str | None,
               ollama: bool) -> tuple[int, int, str] | None:
    """The body edit that makes the upstream read `choice.sent`; None when the body (whose model is `asked`)
    names it already. Raises ValueError when the body's model value cannot be found for sure."""
    value = json.dumps(choice.sent)
    if choice.inserted:
        at = raw.index(b"{") + 1
        return at, at, f'"model":{value}' + ("," if body else "")
    if asked == choice.sent:
        return None
    span = bodies.model_span(raw, ollama)
    if span is None:
        raise ValueError("the body's model cannot be found for sure")
    return span[0], span[1], value


def usage_edit(insert: str | None) -> list[tuple[int, int, str]]:
    """include_usage's "<offset> <text>" as an edit."""
    if not insert:
        return []
    at, _, text = insert.partition(" ")
    return [(int(at), int(at), text)]


def edit_header(edits: list[tuple[int, int, str]]) -> str:
    """The X-Bastion-Edit value: the edits in body order, as compact JSON (ASCII: it is an HTTP header)."""
    return _COMPACT.encode(sorted(edits, key=lambda e: (e[0], e[1])))


def query_with_model(query: str, upstream: str) -> str:
    """A WebSocket's query string naming `upstream` as its model: the `model` parameter (the gate read exactly
    one, as urllib's parse_qs splits and decodes names) gets the new value; every other byte stays as sent."""
    parts = query.split("&")
    for i, part in enumerate(parts):
        if unquote_plus(part.partition("=")[0]) == "model":
            parts[i] = "model=" + quote(upstream, safe="")
    return "&".join(parts)
