"""Asking the upstream for token usage in streamed OpenAI answers (`stream_options.include_usage`), and
making sure a key with a token quota cannot stream without it.

The gate has parsed the body already, so it decides here and tells nginx how to change the body: the
`X-Bastion-Usage: <byte offset> <text>` header of its redirect, which nginx's meter.js applies (the body is
otherwise replayed as the client sent it, byte for byte) and which also tells the meter to take the usage
event out of the stream again, so the client gets what it would have got without Bastion. A client that asked
for usage itself gets no header: its stream passes untouched. The text is inserted, never re-serialised: the
upstream reads the client's own bytes for everything else.

A stream without usage leaves its tokens unknown, and unknown tokens count for nothing in a quota. So for a key
with a token quota (`metered_insertion`) every way of streaming without usage is refused instead of passed on:
`include_usage` other than true, a `stream_options` that is not an object or cannot be found for sure, a
`stream` or `stream_options` key that parsers could read differently, and a pool that does not ask for usage.
"""

from __future__ import annotations

import re
from typing import Any

from authsvc import bodies

ENDPOINTS = frozenset({"/v1/chat/completions", "/v1/completions"})
STREAM_ENDPOINTS = ENDPOINTS | {"/v1/responses"}  # OpenAI routes whose `stream` must be a boolean
HEADER = "X-Bastion-Usage"
TOP_LEVEL = '"stream_options":{"include_usage":true},'  # after the body's "{": the body has a model, so a comma
_OPTIONS_KEY = re.compile(rb'"stream_options"[ \t\n\r]*:[ \t\n\r]*\{')
_ABSENT = object()
_KEYS = ("stream", "stream_options")
_JSON_TYPES = {str: "a string", int: "an integer", float: "a number", list: "an array", dict: "an object"}


class Unmeterable(ValueError):
    """A streamed request of a key with a token quota that would leave its tokens unknown; `param` names the
    field to fix."""

    def __init__(self, message: str, param: str = "stream_options"):
        super().__init__(message)
        self.param = param


def stream_type_error(body: Any) -> str | None:
    """The 400 message when a body's `stream` is not a JSON boolean (or null, which OpenAI also accepts): some
    servers (vLLM) would stream for 1 or "true" where the gate and OpenAI's API do not."""
    if not isinstance(body, dict):
        return None
    value = body.get("stream")
    if value is None or isinstance(value, bool):
        return None
    return f"Invalid type for 'stream': expected a boolean, but got {_JSON_TYPES.get(type(value), 'a value')} instead."


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
    return _inside(raw, options)


def _inside(raw: bytes, options: dict[str, Any]) -> str | None:
    """Inside the client's own stream_options object: only when it is the one plain `"stream_options": {` of
    the body (another one may be nested, e.g. in a tool's schema, or the top-level one written with escapes)."""
    found = _OPTIONS_KEY.findall(raw)
    if len(found) != 1 or raw.count(b'"stream_options"') != 1 or bodies.letter_escape(raw):
        return None
    at = _OPTIONS_KEY.search(raw).end()  # type: ignore[union-attr]
    return f"{at} \"include_usage\":true{',' if options else ''}"


def metered_insertion(raw: bytes, body: dict[str, Any], pool_asks: bool) -> str | None:
    """`insertion` for a key with a token quota (a JSON object body whose `stream` is a boolean or null): the
    header value, None when not streamed or when the client asked for usage itself, or Unmeterable when the
    stream would carry no usage. `pool_asks`: the pool has `include_usage` on."""
    if not isinstance(body, dict):
        return None
    for key in body:  # Ollama's Go decoder matches keys in any case, C parsers end a key at NUL
        if key in _KEYS:
            continue
        meant = key.lower().split("\0")[0]
        if meant in _KEYS:
            raise Unmeterable(f"The request body is ambiguous: the key `{meant}` must be written {meant!r}, "
                              f"not {key[:20]!r}.", param=meant)
    try:
        bodies.check_plain_keys(raw, _KEYS)
    except bodies.Ambiguous as e:
        raise Unmeterable(f"The request body is ambiguous: {e}.",
                          param="stream" if "`stream`" in str(e) else "stream_options") from None
    if body.get("stream") is not True:
        return None
    quota = "This API key has a token quota, so usage reporting cannot be turned off"
    options = body.get("stream_options", _ABSENT)
    if options is _ABSENT:
        if pool_asks:
            return f"{raw.index(b'{') + 1} {TOP_LEVEL}"
        raise Unmeterable(f"{quota}: the pool serving this model does not ask for usage, so a streamed request "
                          "must set `stream_options.include_usage` to true.")
    if not isinstance(options, dict):
        raise Unmeterable(f"{quota}: `stream_options` must be an object.")
    for key in options:
        if key != "include_usage" and key.lower().split("\0")[0] == "include_usage":
            raise Unmeterable(f"The request body is ambiguous: the key `include_usage` must be written "
                              f"'include_usage', not {key[:20]!r}.")
    if "include_usage" in options:
        if options["include_usage"] is True and raw.count(b'"include_usage"') == 1:
            return None  # the client asked itself (once, plainly): metered, its stream passes untouched
        raise Unmeterable(f"{quota}: `stream_options.include_usage` must be true (given once) or left out.")
    if not pool_asks:
        raise Unmeterable(f"{quota}: the pool serving this model does not ask for usage, so a streamed request "
                          "must set `stream_options.include_usage` to true.")
    at = _inside(raw, options)
    if at is None:
        raise Unmeterable(f"{quota}: Bastion cannot add `include_usage` to this `stream_options` for sure (it must "
                          "appear once in the body, written without escapes); set `include_usage` to true.")
    return at
