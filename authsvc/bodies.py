"""Reading the model out of a request body the way the upstream will, or refusing the body.

The gate checks the model; the upstream uses it. Whenever two parsers could disagree, the body is refused
rather than guessed at. OpenAI-style servers (vLLM, llama.cpp, LiteLLM: Python json, pydantic, nlohmann, ...)
read the exact key `model`, and some JSON parsers keep the first of repeated keys (cJSON, yyjson, simdjson)
where others keep the last; Ollama (Go) matches keys case-insensitively; werkzeug honours `boundary*=` and
skips a multipart preamble; and so on. Every function raises ValueError for a body it will not vouch for:
`TooDeep` for nesting beyond MAX_DEPTH, `Ambiguous` for a body that parsers read differently.

`loads` is the one JSON reader for outside input (request bodies here and in the manager, upstream answers).
"""

from __future__ import annotations

import json
import re
from array import array
from collections.abc import Iterator
from itertools import accumulate
from json.decoder import scanstring  # type: ignore[attr-defined]
from typing import Any

import orjson

# The lowest nesting limit among common JSON parsers (serde_json 128, pydantic 200, Python ~1000): deeper bodies
# are refused before they reach any parser. Real requests nest below 20 (JSON schemas included).
MAX_DEPTH = 128
MAX_PARTS = 256
MAX_HEADER_LINES = 16


class TooDeep(ValueError):
    """JSON nested deeper than MAX_DEPTH."""


class Ambiguous(ValueError):
    """A body that upstream parsers would read differently (or that the gate cannot vouch for)."""


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


_DECODER = json.JSONDecoder(parse_constant=_refuse_constant)  # built once: json.loads(**kw) builds one per call
_SCAN = _DECODER.scan_once
_NOT_SKELETON = bytes(b for b in range(256) if b not in b'[]{}"\\/bfnrtu')  # brackets, quotes and escapes
_DEPTH_STEP = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")
_WHITESPACE = re.compile(r"[ \t\n\r]*")
# \u0040-\u007f: the only escapes that can spell an ASCII letter of a key (clients escape non-ASCII, not letters)
_LETTER_ESCAPE = re.compile(rb"\\u00[4-7][0-9A-Fa-f]")
_QUOTED: dict[str, bytes] = {}  # check_plain_keys: a key name as a JSON string, in bytes
_MODEL_KEY = re.compile(rb'"model"[ \t\n\r]*:')  # `model` written as a key, at any level


def letter_escape(raw: bytes) -> bool:
    """Whether the body escapes an ASCII letter (`\\u0040`-`\\u007f`); a body without a backslash (found with
    memchr, many times faster than the regex) has none."""
    return b"\\" in raw and _LETTER_ESCAPE.search(raw) is not None


def _occurrences(raw: bytes, byte: bytes) -> int:
    """How often `byte` occurs in `raw`: CPython's bytes.count of one byte is a plain loop (12 KB: 3.5 us), while
    replace finds each with memchr (0.3 us)."""
    return len(raw) - len(raw.replace(byte, b""))


def check_depth(raw: bytes, limit: int = MAX_DEPTH) -> None:
    """Raise TooDeep when brackets outside strings nest deeper than `limit`. Ordinary bodies have fewer
    brackets than the limit in all, which two counts prove; only the others are scanned."""
    if len(raw) <= limit or _occurrences(raw, b"[") + _occurrences(raw, b"{") <= limit:
        return
    skeleton = raw.translate(None, _NOT_SKELETON)
    if b"\\" in skeleton:  # drop escaped backslashes, then escaped quotes: every quote left delimits a string
        skeleton = skeleton.replace(b"\\\\", b"").replace(b'\\"', b"")
    # then the escape letters, and strings without brackets (`""` also drops no bracket between two strings)
    skeleton = skeleton.translate(None, b"\\/bfnrtu").replace(b'""', b"")
    steps = b"".join(skeleton.split(b'"')[::2]).translate(_DEPTH_STEP)
    # as signed bytes: +1 per opening, -1 per closing bracket; the highest running sum is the depth
    if max(accumulate(array("b", steps)), default=0) > limit:
        raise TooDeep(f"the JSON nests deeper than {limit} levels")


def _text(raw: bytes | str) -> str:
    """The body as text: UTF-8 (RFC 8259), no byte order mark, nesting checked first."""
    data = raw.encode() if isinstance(raw, str) else raw
    check_depth(data)
    text = data.decode("utf-8")
    if text.startswith("\ufeff"):
        raise ValueError("a JSON text must not start with a byte order mark")
    return text


def loads(raw: bytes | str) -> Any:
    """Parse JSON from outside as every upstream parser can: UTF-8 without a byte order mark, no NaN or
    Infinity, at most MAX_DEPTH levels deep. Raises ValueError (TooDeep for nesting), never RecursionError."""
    return _parse(_text(raw))


def _parse(text: str) -> Any:
    try:
        # JSONDecoder.decode without its two Python wrappers (the C scanner, then only whitespace may follow);
        # anything else goes through decode itself, which raises the usual error
        try:
            value, end = _SCAN(text, _WHITESPACE.match(text).end())
        except StopIteration:
            return _DECODER.decode(text)
        if end != len(text) and _WHITESPACE.match(text, end).end() != len(text):
            return _DECODER.decode(text)
        return value
    except RecursionError:  # check_depth prevents it; a caller deep in its own stack still gets a ValueError
        raise TooDeep("the JSON nests too deeply") from None


def _request_body(raw: bytes) -> Any:
    """`loads(raw)`, sooner: orjson first, the strict parser for whatever orjson refuses, so the same bodies are
    refused with the same errors. Where orjson accepts a body the two agree (RFC 8259 both; repeated keys: the
    last value, at the first's place), but for integers beyond 64 bits, which orjson makes floats: of the values
    the gate reads only `stream`'s type could show it (include_usage.stream_type_error), so a float there is
    parsed again the strict way."""
    check_depth(raw)  # orjson allows 1024 levels
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return loads(raw)
    if type(body) is dict and type(body.get("stream")) is float:
        return loads(raw)
    return body


def _top_level_members(text: str) -> Iterator[tuple[str, str, int, int]]:
    """(key as written, key decoded, value start, value end in characters) for each member of the top-level
    object of a valid JSON object text. Values are skipped with the C scanner: about one more parse."""
    i = _WHITESPACE.match(text).end() + 1  # past "{"
    while True:
        i = _WHITESPACE.match(text, i).end()
        if text[i] == "}":
            return
        key, end = scanstring(text, i + 1)
        written = text[i:end]
        i = _WHITESPACE.match(text, _WHITESPACE.match(text, end).end() + 1).end()  # past ":"
        _, after = _DECODER.scan_once(text, i)
        yield written, key, i, after
        i = _WHITESPACE.match(text, after).end()
        if text[i] == "}":
            return
        i += 1  # past ","


def model_span(raw: bytes, ollama: bool) -> tuple[int, int] | None:
    """The byte span [start, end) of the top-level model value the upstream reads (the member `json_document`
    took the model from: `model`, or on Ollama routes `model` in any case, else `name`), or None. Call it only
    on a body `json_document` accepted (so no key is repeated or ambiguous)."""
    text = _text(raw)
    spans: dict[str, tuple[int, int, bool]] = {}
    for _, key, start, end in _top_level_members(text):
        name = key.lower() if ollama else key
        if name == "model" or (ollama and name == "name"):
            spans[name] = (start, end, bool(_parse(text[start:end])))
    chosen = spans.get("model")
    if ollama and (chosen is None or not chosen[2]):
        chosen = spans.get("name", chosen)
    if chosen is None:
        return None
    start, end, _ = chosen
    if len(text) != len(raw):  # not ASCII: characters to bytes
        start = len(text[:start].encode())
        end = start + len(text[chosen[0]:end].encode())
    return start, end


def check_plain_keys(raw: bytes, names: tuple[str, ...]) -> None:
    """Raise Ambiguous when one of `names` is a top-level key of the JSON object `raw` given more than once or
    written with escapes (parsers keep different ones of repeated keys). Two cheap bytes checks first: only a
    body that may have such a key has its keys read."""
    if not letter_escape(raw):
        for name in names:
            quoted = _QUOTED.get(name)
            if quoted is None:
                quoted = _QUOTED[name] = f'"{name}"'.encode()  # a few fixed names: never grows beyond them
            if raw.count(quoted) > 1:
                break
        else:
            return
    written: dict[str, list[str]] = {}
    for spelled, key, _, _ in _top_level_members(_text(raw)):
        if key in names:
            written.setdefault(key, []).append(spelled)
    for key, spellings in written.items():
        if len(spellings) > 1:
            raise Ambiguous(f"the key `{key}` is given more than once")
        if spellings[0] != f'"{key}"':
            raise Ambiguous(f"the key `{key}` is written with escapes")


def json_model(raw: bytes, ollama: bool) -> str | Any | None:
    """The model of a JSON object body, or None when the body names none (the raw value, maybe not a string);
    see `json_document`."""
    return json_document(raw, ollama)[0]


def json_document(raw: bytes, ollama: bool) -> tuple[str | Any | None, Any]:
    """(model, the parsed body): the model of a JSON object body, or None when the body names none (the raw
    value, maybe not a string).

    OpenAI-style endpoints: the exact key `model`, written once and without escapes; another spelling (`MODEL`:
    Ollama's /v1 reads it, pydantic does not) is refused. Ollama routes (`ollama`): `model` in any case, else
    `name`, like Ollama's Go decoder (two spellings of one key are refused: Go keeps the last, Python both)."""
    body = _request_body(raw)
    if not isinstance(body, dict):
        return None, body
    if ollama:
        return _ollama_model(body), body
    # Python's dict hides a repeated or escaped `model`; cheap bytes checks say when to look at the keys
    first = _MODEL_KEY.search(raw)
    if (first and _MODEL_KEY.search(raw, first.end())) or letter_escape(raw):
        written = [w for w, key, _, _ in _top_level_members(_text(raw)) if key == "model"]
        if len(written) > 1:
            raise Ambiguous("the key `model` is given more than once")
        if written and written[0] != '"model"':
            raise Ambiguous("the key `model` is written with escapes")
    for key in body:  # C parsers (cJSON) end a key at NUL: `model\u0000` is `model` to them
        if key != "model" and key[:5].lower() == "model" and key[5:6] in ("", "\0"):
            raise Ambiguous(f"the model key must be written `model`, not {json.dumps(key[:20])}")
    return body.get("model"), body


def _ollama_model(body: dict[str, Any]) -> Any:
    by_lower: dict[str, Any] = {}
    for key, value in body.items():
        lowered = key.lower()
        if lowered in ("model", "name"):
            if lowered in by_lower:
                raise Ambiguous(f"the key {key[:20]!r} is given in two spellings")
            by_lower[lowered] = value
    model = by_lower.get("model")
    if not model:
        return by_lower.get("name", model)
    return model


# Exactly one plain boundary parameter: `boundary*=` (RFC 2231, honoured by werkzeug), a second boundary or a
# charset (Starlette decodes fields with it) would let parsers split or decode the form differently.
# Quoted: RFC 2046 bchars (a space but not last); unquoted: the bchars that are also token characters.
_FORM_TYPE = re.compile(r"multipart/form-data[ \t]*;[ \t]*boundary=(?:\"([0-9A-Za-z'()+_,./:=? -]{0,69}"
                        r"[0-9A-Za-z'()+_,./:=?-])\"|([0-9A-Za-z'+_.-]{1,70}))[ \t]*", re.IGNORECASE)
_TOKEN = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_HEADER = re.compile(rb"(" + _TOKEN + rb"):[ \t]*([^\r\n\x00]*?)[ \t]*")
# form-data with `name` and `filename` only: no `name*=`/`filename*=` (RFC 2231/5987), no escapes in quotes
_DISPOSITION = re.compile(rb"form-data((?:[ \t]*;[ \t]*(?:name|filename)=(?:\"[^\"\\\r\n]*\"|" + _TOKEN
                          + rb"))+)", re.IGNORECASE)
_PARAM = re.compile(rb"[ \t]*;[ \t]*(name|filename)=(\"[^\"\\\r\n]*\"|" + _TOKEN + rb")", re.IGNORECASE)
_PART_HEADERS = frozenset({b"content-disposition", b"content-type", b"content-length"})
_PLAIN_TEXT = re.compile(rb"text/plain(?:[ \t]*;[ \t]*charset=(?:utf-8|us-ascii|\"utf-8\"|\"us-ascii\"))?",
                         re.IGNORECASE)


def _boundary(content_type: str) -> bytes:
    match = _FORM_TYPE.fullmatch(content_type)
    if not match:
        raise Ambiguous("a multipart Content-Type must have exactly one plain boundary parameter and no other")
    return (match[1] or match[2]).encode("ascii")


def _part(piece: bytes) -> tuple[dict[bytes, bytes], dict[bytes, bytes], bytes]:
    """Headers, Content-Disposition parameters and content of one part, read strictly."""
    head, sep, content = piece.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    if not sep or len(lines) > MAX_HEADER_LINES:
        raise Ambiguous("malformed multipart part headers")
    headers: dict[bytes, bytes] = {}
    for line in lines:
        match = _HEADER.fullmatch(line)  # no folded lines, no bare CR or LF
        name = match and match[1].lower()
        if not match or name in headers or name not in _PART_HEADERS:
            raise Ambiguous("a multipart part may have one each of Content-Disposition, Content-Type and "
                            "Content-Length, written on one line")
        headers[name] = match[2]
    if b"content-length" in headers and headers[b"content-length"] != str(len(content)).encode():
        raise Ambiguous("a multipart part's Content-Length does not match its content")
    disposition = _DISPOSITION.fullmatch(headers.get(b"content-disposition", b""))
    if not disposition:
        raise Ambiguous("a multipart part needs `Content-Disposition: form-data` with `name` (and `filename`)")
    params: dict[bytes, bytes] = {}
    for key, value in _PARAM.findall(disposition[1]):
        if key.lower() in params:
            raise Ambiguous("a multipart part needs exactly one name")
        params[key.lower()] = value.strip(b'"') if value.startswith(b'"') else value
    if b"name" not in params:
        raise Ambiguous("a multipart part needs exactly one name")
    return headers, params, content


def form_model(raw: bytes, content_type: str) -> str | None:
    """The `model` field of a multipart/form-data body, read strictly: one plain boundary, nothing before the
    first boundary, nothing after the closing one but one CRLF, CRLF line ends, one `form-data` disposition
    with one `name` per part, no transfer encodings, at most 256 parts and one `model` field, which is a plain
    field (no filename) in UTF-8."""
    delimiter = b"\r\n--" + _boundary(content_type)
    pieces = (b"\r\n" + raw).split(delimiter)
    if pieces[0] != b"" or len(pieces) < 2 or pieces[-1] not in (b"--", b"--\r\n"):
        raise Ambiguous("a multipart body must start with its boundary and end with the closing boundary")
    if len(pieces) > MAX_PARTS + 2:
        raise Ambiguous("too many multipart parts")
    values: list[bytes] = []
    for piece in pieces[1:-1]:
        if not piece.startswith(b"\r\n"):  # a closing boundary, padding or a longer boundary-like line
            raise Ambiguous("malformed multipart boundary line")
        headers, params, content = _part(piece[2:])
        if params[b"name"] == b"model":
            if b"filename" in params or not _PLAIN_TEXT.fullmatch(headers.get(b"content-type", b"text/plain")):
                raise Ambiguous("the field 'model' must be a plain text field")
            values.append(content)
    if len(values) > 1:
        raise Ambiguous("the field 'model' appears more than once")
    return values[0].decode("utf-8") if values else None
