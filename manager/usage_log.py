"""nginx's usage log, line by line: the `bastion` log_format (nginx_templates/_http.j2) and its parser.

Each record is one line of tab-separated fields, the first being the marker `"B1`. nginx's default escaping
writes `"`, `\\`, control characters (tab included) and bytes above 126 inside values as `\\xNN`, so a tab
always separates fields and a `"` only ever starts a record. Splitting on tabs costs a fraction of parsing JSON,
which matters: every request is a line (docs/decisions.md, decision 26).

nginx cannot unwrite half a record: when a write is cut short (a full disk) the next record is glued to the torn
one on the same line. Such a line is split at each record marker, the torn part skipped and counted.

Lines written before the format changed (JSON objects starting with `{"time":`) are still read, so an upgrade
loses no usage.
"""

from __future__ import annotations

import codecs
import gc
import json
from typing import Any

RECORD_START = '"B1\t'
MARKER = '"B1'
# the fields nginx writes, in order (the marker first)
FIELDS = ("marker", "end", "request_id", "key", "model", "pool", "upstream", "status", "bytes_sent",
          "request_length", "duration", "upstream_status", "ttfb", "method", "uri", "remote_addr", "outcome",
          "prompt_tokens", "completion_tokens", "total_tokens")
# a parsed line is the list of FIELDS' values as nginx wrote them (unescaped); what each becomes in a record
# (numbers, nulls, the upstream that answered) is decided in one place, manager/usage_records.py
Line = list[Any]
_STATUS = FIELDS.index("status")
_LEGACY_START = '{"time":'
_decode_json = json.JSONDecoder().raw_decode


def _unescape(value: str) -> str:
    """nginx's `\\xNN` escapes back to text (UTF-8 bytes of a model name or URI)."""
    if "\\x" not in value:
        return value
    return codecs.escape_decode(value.encode())[0].decode("utf-8", errors="replace")


def _fields(line: str) -> Line | None:
    """One record's fields, or None unless `line` is exactly one record."""
    f = line.split("\t")
    if len(f) != len(FIELDS) or f[0] != MARKER or not f[_STATUS].isdigit():
        return None
    try:
        return [_unescape(value) for value in f] if "\\" in line else f
    except ValueError:  # a broken escape: nginx writes none, a hand edit or a damaged file may
        return None


def _legacy(line: str) -> Line | None:
    """A JSON record of the format before decision 26, as the same fields."""
    try:
        entry, end = _decode_json(line)
        if end != len(line):
            return None
        get = entry.get

        def text(name: str) -> str:  # nginx wrote strings; anything else (an object, say) was not nginx
            value = get(name) or ""
            if not isinstance(value, str):
                raise TypeError(name)
            return value

        return [MARKER, str(float(entry["time"])), text("request_id"), text("key"), text("model"), text("pool"),
                text("upstream"), str(int(entry["status"])), str(int(get("bytes_sent") or 0)),
                str(int(get("request_length") or 0)), str(float(entry["request_time"])), text("upstream_status"),
                text("upstream_header_time"), text("method"), text("uri"), text("remote_addr"), "", "", "", ""]
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def parse_lines(text: str) -> tuple[list[Line], int]:
    """Field lists of the complete lines in `text`, and how many torn or unreadable pieces were skipped."""
    # A batch makes millions of small lists and strings and no cycles: the cyclic garbage collector would walk
    # them over and over (a third of the parsing time), so it waits until the batch is parsed.
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _parse_lines(text)
    finally:
        if collecting:
            gc.enable()


def _parse_lines(text: str) -> tuple[list[Line], int]:
    lines, skipped = [], 0
    width = len(FIELDS)
    for line in text.split("\n"):  # not splitlines(): nginx's escaping leaves U+2028 and friends alone
        f = line.split("\t")
        if len(f) == width and f[0] == MARKER and f[_STATUS].isdigit() and "\\" not in line:  # nearly all lines
            lines.append(f)
        elif (fields := _fields(line)) or (line.startswith(_LEGACY_START) and (fields := _legacy(line))):
            lines.append(fields)
        elif line:
            head, *records = line.split(RECORD_START)
            skipped += bool(head)
            for record in records:
                if fields := _fields(RECORD_START + record):
                    lines.append(fields)
                else:
                    skipped += 1
    return lines, skipped


def _escape(value: object) -> str:
    """As nginx's default log escaping: `"`, `\\`, control characters and non-ASCII bytes as `\\xNN`."""
    text = str(value)
    if text.isascii() and text.isprintable() and '"' not in text and "\\" not in text:
        return text
    return "".join(chr(b) if 32 <= b <= 126 and b not in (34, 92) else f"\\x{b:02X}" for b in text.encode())


def format_record(**values: object) -> str:
    """One line as nginx writes it (for tests, benchmarks and tools): FIELDS' values by name, "" when absent."""
    return "\t".join([MARKER, *(_escape(values.get(name, "")) for name in FIELDS[1:])]) + "\n"


def parse_line(line: str) -> dict[str, Any] | None:
    """One line's fields by name (tests and tools)."""
    lines, skipped = parse_lines(line)
    return dict(zip(FIELDS, lines[0], strict=True)) if len(lines) == 1 and not skipped else None
