"""Reading the model out of a request body the way the upstream will, or refusing the body.

The gate checks the model; the upstream uses it. Whenever two parsers could disagree (duplicate or
differently cased keys, ambiguous multipart forms), the body is refused rather than guessed at: Ollama (Go)
matches JSON keys case-insensitively, python-multipart (vLLM) takes the last of repeated parameters, and
so on. Every function raises ValueError for a body it will not vouch for.
"""

from __future__ import annotations

import json
import re
from typing import Any

MAX_PARTS = 256
MAX_HEADER_LINES = 16
_NAME_PARAM = re.compile(rb"(?:^|;)\s*name\s*=\s*(\"[^\"]*\"|[^;\s]*)", re.IGNORECASE)
_MODEL_KEYS = ("model", "name")


def json_model(raw: bytes, ollama: bool) -> str | Any | None:
    """The model of a JSON object body: `model` (any case), on Ollama routes else `name`, like Ollama does.
    Returns None when the body names none, the raw value (maybe not a string) otherwise. A repeated key is
    read as the last one by Python and Go alike; two spellings of one key (`model`, `MODEL`) are refused."""
    body = json.loads(raw)
    if not isinstance(body, dict):
        return None
    by_lower: dict[str, Any] = {}
    for key, value in body.items():
        lowered = key.lower()
        if lowered in _MODEL_KEYS:
            if lowered in by_lower:
                raise ValueError(f"the key {key!r} is given in two spellings")
            by_lower[lowered] = value
    model = by_lower.get("model")
    if ollama and not model:
        return by_lower.get("name", model)
    return model


def _boundary(content_type: str) -> bytes:
    params = [p.strip() for p in content_type.split(";")[1:]]
    boundaries = [p[len("boundary="):] for p in params if p.lower().startswith("boundary=")]
    if len(boundaries) != 1:
        raise ValueError("a multipart body needs exactly one boundary")
    boundary = boundaries[0].strip('"')
    if not 1 <= len(boundary) <= 70:
        raise ValueError("bad multipart boundary")
    return boundary.encode("latin-1")


def form_model(raw: bytes, content_type: str) -> str | None:
    """The `model` field of a multipart/form-data body, read strictly: no preamble, CRLF line ends, one
    Content-Disposition with one `name` per part, no transfer encodings, at most one `model` field."""
    delimiter = b"\r\n--" + _boundary(content_type)
    pieces = (b"\r\n" + raw).split(delimiter)
    if pieces[0] != b"" or len(pieces) < 2 or not pieces[-1].startswith(b"--"):
        raise ValueError("malformed multipart body (preamble or no closing boundary)")
    if len(pieces) > MAX_PARTS + 2:
        raise ValueError("too many multipart parts")
    values: list[bytes] = []
    for piece in pieces[1:-1]:
        if not piece.startswith(b"\r\n"):
            raise ValueError("malformed multipart boundary line")
        head, sep, content = piece[2:].partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        if not sep or len(lines) > MAX_HEADER_LINES or any(b"\n" in line or b"\r" in line for line in lines):
            raise ValueError("malformed multipart part headers")
        names = [line.partition(b":")[0].strip().lower() for line in lines]
        if names.count(b"content-disposition") != 1 or b"content-transfer-encoding" in names:
            raise ValueError("ambiguous multipart part headers")
        disposition = lines[names.index(b"content-disposition")].partition(b":")[2]
        params = _NAME_PARAM.findall(disposition)
        if len(params) != 1:
            raise ValueError("a multipart part needs exactly one name")
        if params[0].strip(b'"') == b"model":
            values.append(content)
    if len(values) > 1:
        raise ValueError("the field 'model' appears more than once")
    return values[0].decode("utf-8", errors="replace").strip() if values else None
