"""Validation of every value that can reach a template, the snapshot or a subprocess.

Each validator returns the normalised value or raises `ValidationError` naming the field. Nothing is ever
pasted into nginx syntax without passing through here first (DESIGN.md §6).
"""

from __future__ import annotations

import ipaddress
import math
import re
import time
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from authsvc.gate import MODEL_RE  # one definition: the gate checks the same names


class ValidationError(ValueError):
    """A bad input: `field` names what was wrong, `message` says why."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._@-]{0,63}$")
MODEL_GLOB_RE = re.compile(r"^[A-Za-z0-9*?\[\]][A-Za-z0-9._:/@+*?\[\]-]{0,199}$")
ENDPOINT_RE = re.compile(r"^/[A-Za-z0-9/_.*-]{0,100}$")
SECRET_RE = re.compile(r"^[A-Za-z0-9._~+/=:-]{1,512}$")
HOST_LABEL_RE = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
URL_CHARS_RE = re.compile(r"^[A-Za-z0-9:/.\-\[\]_]+$")
DURATION_RE = re.compile(r"^(\d{1,6})([smhdw])$")
DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
BALANCING_METHODS = ("round_robin", "least_conn", "hash", "random_two")
# Times are bounded to what every consumer (datetime, the CLI, JavaScript's Date) can show.
MAX_EPOCH = 253_402_214_400  # 9999-12-31T00:00:00Z


def require_str(field: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ValidationError(field, "must be a string")
    return value


def name(field: str, value: Any) -> str:
    """A resource name that may appear in nginx syntax (pool names): lowercase, digits, '_' and '-'."""
    value = require_str(field, value)
    if not NAME_RE.fullmatch(value):
        raise ValidationError(field, "must be 1-63 characters of a-z, 0-9, '_' or '-', starting with a-z or 0-9")
    return value


def label(field: str, value: Any) -> str:
    """A human label (key names, usernames): letters, digits, space and ._@- only."""
    value = require_str(field, value)
    if not LABEL_RE.fullmatch(value):
        raise ValidationError(field, "must be 1-64 characters of letters, digits, spaces or . _ @ -")
    return value


def model(field: str, value: Any, *, allow_glob: bool = False) -> str:
    value = require_str(field, value)
    pattern = MODEL_GLOB_RE if allow_glob else MODEL_RE
    if not pattern.fullmatch(value):
        allowed = "letters, digits and . _ : / @ + -" + (" plus glob characters * ? [ ]" if allow_glob else "")
        raise ValidationError(field, f"{value!r} is not a valid model name ({allowed}, at most 200)")
    return value


def string_list(field: str, value: Any, item: Any, *, max_items: int = 500) -> list[str]:
    """A list of strings, each checked by `item(field, value)`; repeats are dropped."""
    if not isinstance(value, list):
        raise ValidationError(field, "must be a list of strings")
    if len(value) > max_items:
        raise ValidationError(field, f"at most {max_items} items")
    out: list[str] = []
    for i, v in enumerate(value):
        checked = item(f"{field}[{i}]", v)
        if checked not in out:
            out.append(checked)
    return out


def models(field: str, value: Any, *, allow_glob: bool = False, max_items: int = 500) -> list[str]:
    return string_list(field, value, lambda f, v: model(f, v, allow_glob=allow_glob), max_items=max_items)


def endpoint(field: str, value: Any) -> str:
    value = require_str(field, value)
    if not ENDPOINT_RE.fullmatch(value):
        raise ValidationError(field, "must be a path like /v1/* or /api/pull (letters, digits, / _ . - *)")
    return value


def endpoints(field: str, value: Any) -> list[str]:
    return string_list(field, value, endpoint)


def secret(field: str, value: Any) -> str:
    """An upstream API key: printable token characters only (it is sent in an HTTP header)."""
    value = require_str(field, value)
    if not SECRET_RE.fullmatch(value):
        raise ValidationError(field, "must be 1-512 characters of letters, digits and . _ ~ + / = : -")
    return value


def integer(field: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool):
        raise ValidationError(field, "must be an integer")
    if isinstance(value, str) and re.fullmatch(r"-?\d{1,18}", value.strip()):
        value = int(value)
    if not isinstance(value, int):
        raise ValidationError(field, "must be an integer")
    if not lo <= value <= hi:
        raise ValidationError(field, f"must be between {lo} and {hi}")
    return value


def number(field: str, value: Any, lo: float, hi: float) -> float:
    """A finite number (a JSON number or decimal text) in [lo, hi]. NaN and Infinity, which Python's json
    accepts in request bodies, are refused."""
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise ValidationError(field, "must be a number") from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValidationError(field, "must be a number")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValidationError(field, "must be a finite number (not NaN or Infinity)")
    if not lo <= value <= hi:
        raise ValidationError(field, f"must be between {lo} and {hi}")
    return float(value)


def epoch(field: str, value: Any) -> float:
    """Epoch seconds from 1970 to the year 9999."""
    return number(field, value, 0, MAX_EPOCH)


def iso_timestamp(text: str) -> float:
    """Epoch seconds of an ISO date/time (local time when it names no zone); ValueError if there is none."""
    try:
        dt = datetime.fromisoformat(text.strip())
        if dt.tzinfo is None:
            dt = dt.astimezone()  # raises for dates at the edge of the calendar (year 1, year 9999)
        return dt.timestamp()
    except (ValueError, OverflowError, OSError) as e:
        raise ValueError(f"{text!r} is not an ISO date/time datetime can handle") from e


def boolean(field: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValidationError(field, "must be true or false")
    return value


def choice(field: str, value: Any, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    if value not in choices:
        raise ValidationError(field, f"must be one of {', '.join(choices)}")
    return value


def no_zone(field: str, value: str) -> str:
    """Python's ipaddress accepts any text after '%' as an IPv6 zone id: never let one through."""
    if "%" in value:
        raise ValidationError(field, f"{value!r} must not contain '%' (IPv6 zone ids are not supported)")
    return value


def hostname(field: str, value: str) -> str:
    """An IP address or a DNS name (IDNA, each label 1-63 of a-z0-9-), returned lowercase/ASCII."""
    no_zone(field, value)
    try:
        return str(ipaddress.ip_address(value.strip("[]")))
    except ValueError:
        pass
    try:
        ascii_name = value.encode("idna").decode("ascii").lower().rstrip(".")
    except UnicodeError as e:
        raise ValidationError(field, f"{value!r} is not a valid hostname") from e
    labels = ascii_name.split(".")
    if not ascii_name or len(ascii_name) > 253 or not all(HOST_LABEL_RE.fullmatch(x) for x in labels):
        raise ValidationError(field, f"{value!r} is not a valid hostname")
    return ascii_name


def upstream_url(field: str, value: Any) -> str:
    """An upstream base URL: http(s)://host[:port] with no path, query, credentials or odd characters."""
    value = require_str(field, value).strip()
    if not URL_CHARS_RE.fullmatch(value):
        raise ValidationError(field, "contains characters not allowed in an upstream URL (spaces, ; { } $ quotes...)")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https"):
        raise ValidationError(field, "scheme must be http or https")
    if parts.path not in ("", "/"):
        raise ValidationError(field, "give the server root only, like http://host:8000 (paths such as /v1 are kept)")
    if not parts.hostname:
        raise ValidationError(field, "has no host")
    try:
        port = parts.port if parts.port is not None else (443 if parts.scheme == "https" else 80)
    except ValueError as e:
        raise ValidationError(field, "port must be a number between 1 and 65535") from e
    if port < 1:
        raise ValidationError(field, "port must be a number between 1 and 65535")
    host = hostname(field, parts.hostname)
    netloc = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{netloc}:{port}"


def file_path(field: str, value: Any) -> str:
    """An absolute path of an existing file, made of safe characters (it is written into nginx syntax)."""
    value = require_str(field, value)
    if not re.fullmatch(r"/[A-Za-z0-9._/-]{1,255}", value) or "/../" in value:
        raise ValidationError(field, "must be an absolute path of letters, digits and . _ / -")
    if not Path(value).is_file():
        raise ValidationError(field, f"{value} is not a file")
    return value


def cidr(field: str, value: Any) -> str:
    value = no_zone(field, require_str(field, value))
    try:
        return str(ipaddress.ip_network(value, strict=False))
    except ValueError as e:
        raise ValidationError(field, f"{value!r} is not a valid IP network (like 10.0.0.0/8)") from e


def cidrs(field: str, value: Any) -> list[str]:
    return string_list(field, value, cidr)


def listen(field: str, value: Any) -> str:
    """A listen address HOST:PORT (IPv6 as [addr]:port)."""
    value = no_zone(field, require_str(field, value))
    host, sep, port = value.rpartition(":")
    if not sep or not host:
        raise ValidationError(field, "must be HOST:PORT, like 127.0.0.1:8080")
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError as e:
        raise ValidationError(field, "host must be an IP address") from e
    p = integer(field, port, 1, 65535)
    return f"[{ip}]:{p}" if ip.version == 6 else f"{ip}:{p}"


def expiry(field: str, value: Any, now: float | None = None) -> float | None:
    """None/"" (never), a duration like 30d/12h, an ISO date/time, or epoch seconds → epoch seconds, in the
    future and before 9999-12-31 (every consumer can show it)."""
    if value in (None, "", "never"):
        return None
    now = time.time() if now is None else now
    if isinstance(value, str) and (m := DURATION_RE.fullmatch(value.strip())):
        result = now + int(m.group(1)) * DURATION_UNITS[m.group(2)]
    elif isinstance(value, str):
        try:
            result = iso_timestamp(value)
        except ValueError:
            raise ValidationError(field, "must be a duration like 30d or 12h, or an ISO date like 2027-01-31") from None
    elif isinstance(value, int | float) and not isinstance(value, bool):
        result = value if isinstance(value, int) else number(field, value, -math.inf, math.inf)
    else:
        raise ValidationError(field, "must be a duration, an ISO date or epoch seconds")
    if result <= now:
        raise ValidationError(field, "must be in the future")
    if result > MAX_EPOCH:
        raise ValidationError(field, "must be before 9999-12-31")
    return float(result)
