"""Asking the upstream for token usage in streamed OpenAI answers (`stream_options.include_usage`).

The gate has parsed the body already, so it decides here and tells nginx how to change the body: the
`X-Bastion-Usage: <byte offset> <text>` header of its redirect, which nginx's meter.js applies (the body is
otherwise replayed as the client sent it, byte for byte) and which also tells the meter to take the usage
event out of the stream again, so the client gets what it would have got without Bastion. A client that asked
for usage itself gets no header: its stream passes untouched. The text is inserted, never re-serialised: the
upstream reads the client's own bytes for everything else.
"""

from __future__ import annotations

import re
from typing import Any

ENDPOINTS = frozenset({"/v1/chat/completions", "/v1/completions"})
HEADER = "X-Bastion-Usage"
TOP_LEVEL = '"stream_options":{"include_usage":true},'  # after the body's "{": the body has a model, so a comma
_OPTIONS_KEY = re.compile(rb'"stream_options"[ \t\n\r]*:[ \t\n\r]*\{')
_ESCAPE = re.compile(rb"\\u00[4-7][0-9A-Fa-f]")  # an escaped ASCII letter could spell `stream_options`
_ABSENT = object()


def insertion(raw: bytes, body: Any) -> str | None:
    """The header value that adds include_usage to a streamed request's `body` (parsed from `raw`), or None:
    not streamed, the client asked already (or said no), or its stream_options cannot be found for sure."""
    if not isinstance(body, dict) or body.get("stream") is not True:
        return None
    options = body.get("stream_options", _ABSENT)
    if options is _ABSENT:
        return f"{raw.index(b'{') + 1} {TOP_LEVEL}"
    if not isinstance(options, dict) or "include_usage" in options:
        return None
    # inside the client's own stream_options object: only when it is the one plain `"stream_options": {` of
    # the body (another one may be nested, e.g. in a tool's schema, or the top-level one written with escapes)
    found = _OPTIONS_KEY.findall(raw)
    if len(found) != 1 or raw.count(b'"stream_options"') != 1 or _ESCAPE.search(raw):
        return None
    at = _OPTIONS_KEY.search(raw).end()  # type: ignore[union-attr]
    return f"{at} \"include_usage\":true{',' if options else ''}"
