"""Every HTTP request the manager sends out (model discovery, health checks, later ACME pre-flight).

What answers is input like any other, possibly hostile or broken, so a request here:
- never follows a redirect: a 3xx is a failure that names where it pointed (an upstream must not make the
  manager fetch another service, e.g. one on loopback, and publish its answer);
- reads the answer in chunks and stops at `max_bytes` (a Content-Length above it is refused unread);
- has one deadline for connect, TLS, headers and every read (not the DNS lookup). Socket timeouts alone bound each
  read, not their sum, so a watchdog shuts the socket down when the deadline passes and a server that drips
  a byte at a time cannot hold the caller;
- parses JSON with every parser error caught;
- fails with an `OutboundError` whose message is a short sentence an operator can act on.

The standard library's http.client is used directly: it lets the watchdog own the socket, and it ignores
proxy environment variables, as nginx does for the same upstreams.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

from authsvc import bodies

T = TypeVar("T")
R = TypeVar("R")
MODEL_LIST_LIMIT = 4 * 1024 * 1024
DEFAULT_DEADLINE = 5.0
MAX_PARALLEL = 8  # requests at once when many upstreams are asked (discovery, health checks)
CHUNK = 64 * 1024
ERROR_LIMIT = 16 * 1024  # bytes of an error answer read for its message
AUTH_STATUSES = (401, 403)
KEY_REJECTED = "upstream rejected the pool's API key"
KEY_NEEDED = "upstream needs an API key"


class OutboundError(Exception):
    """An outbound request failed; `str(error)` says why. `status` is the HTTP status when the server
    answered (any status: it is alive), None when no answer came (refused, timeout, TLS...)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]  # names in lower case
    body: bytes



def in_parallel(ask: Callable[[T], R], items: list[T]) -> list[R]:
    """`ask` for every item, up to MAX_PARALLEL at a time: many slow upstreams cost one deadline, not one each."""
    with ThreadPoolExecutor(max_workers=min(len(items), MAX_PARALLEL) or 1) as executor:
        return list(executor.map(ask, items))

def get(url: str, *, api_key: str | None = None, verify: bool | str = True, max_bytes: int = MODEL_LIST_LIMIT,
        deadline: float = DEFAULT_DEADLINE, read_body: bool = True) -> Answer:
    """GET `url` (with `Authorization: Bearer api_key` when given). Returns a 2xx answer; raises OutboundError
    for anything else. `verify`: True (system CAs), a CA bundle path, or False. Without `read_body` only the
    status line and headers are read (enough to know the server is alive)."""
    return send("GET", url, api_key=api_key, verify=verify, max_bytes=max_bytes, deadline=deadline,
                read_body=read_body)


def send(method: str, url: str, *, json_body: Any = None, api_key: str | None = None, verify: bool | str = True,
         max_bytes: int = MODEL_LIST_LIMIT, deadline: float = DEFAULT_DEADLINE, read_body: bool = True) -> Answer:
    """`method` `url` with `json_body` (when not None) as JSON; otherwise as `get`. A refusal's own words
    (Ollama's `{"error": ...}`) are kept in the OutboundError when the answer is small JSON."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise OutboundError(f"{printable(url)} is not an http(s) URL")
    https = parts.scheme == "https"
    host, port = parts.hostname, parts.port or (443 if https else 80)
    end = time.monotonic() + deadline
    sock = _connect(host, port, end, deadline)
    cut = threading.Event()
    watchdog_sock = sock.dup()  # shutting down the connection through a dup works after the TLS wrap too

    def expire() -> None:
        cut.set()
        with contextlib.suppress(OSError):
            watchdog_sock.shutdown(socket.SHUT_RDWR)

    watchdog = threading.Timer(max(0.0, end - time.monotonic()), expire)
    watchdog.daemon = True
    watchdog.start()
    conn: http.client.HTTPConnection | None = None
    try:
        if https:
            sock = _tls_context(verify).wrap_socket(sock, server_hostname=host)
            conn = http.client.HTTPSConnection(host, port)
        else:
            conn = http.client.HTTPConnection(host, port)
        conn.sock = sock  # already connected: http.client will not connect again
        headers = {"Accept": "application/json", "User-Agent": "Bastion"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        payload = None
        if json_body is not None:
            payload = json.dumps(json_body).encode()
            headers["Content-Type"] = "application/json"
        conn.request(method, (parts.path or "/") + (f"?{parts.query}" if parts.query else ""), body=payload,
                     headers=headers)
        resp = conn.getresponse()
        answer_headers = {k.lower(): v for k, v in resp.getheaders()}
        _check_status(resp.status, answer_headers, api_key, resp if method != "GET" else None)
        body = _read(resp, answer_headers, max_bytes) if read_body else b""
        if cut.is_set():  # an answer cut short by the watchdog can look complete
            raise OutboundError(_timeout(deadline))
        return Answer(resp.status, answer_headers, body)
    except OutboundError:
        if cut.is_set():  # e.g. "the answer ended early" because the watchdog cut it
            raise OutboundError(_timeout(deadline)) from None
        raise
    except ssl.SSLCertVerificationError as e:
        raise OutboundError(f"TLS verification failed: {e.verify_message or e.reason}") from None
    except ssl.SSLError as e:
        raise OutboundError(_timeout(deadline) if cut.is_set() else f"TLS failed: {e.reason or e}") from None
    except (OSError, http.client.HTTPException) as e:
        if cut.is_set() or isinstance(e, TimeoutError):
            raise OutboundError(_timeout(deadline)) from None
        if isinstance(e, http.client.HTTPException):
            raise OutboundError("the answer is not valid HTTP") from None
        raise OutboundError(f"the connection failed ({e.strerror or e})") from None
    finally:
        watchdog.cancel()
        watchdog_sock.close()
        if conn is not None:
            conn.close()
        sock.close()


def stream_lines(method: str, url: str, *, json_body: Any = None, api_key: str | None = None,
                 verify: bool | str = True, deadline: float = DEFAULT_DEADLINE, idle: float = 300.0,
                 max_line: int = 64 * 1024) -> Iterator[bytes]:
    """The lines of a long answer (Ollama's NDJSON progress), as they come. `deadline` bounds the connection
    and the answer's head; after it, each line must come within `idle` seconds (a pull takes as long as it
    takes, but an upstream gone silent fails). A line longer than `max_line` fails; nothing is kept."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise OutboundError(f"{printable(url)} is not an http(s) URL")
    https = parts.scheme == "https"
    host, port = parts.hostname, parts.port or (443 if https else 80)
    sock = _connect(host, port, time.monotonic() + deadline, deadline)
    conn: http.client.HTTPConnection | None = None
    try:
        sock.settimeout(deadline)
        try:
            if https:
                sock = _tls_context(verify).wrap_socket(sock, server_hostname=host)
                conn = http.client.HTTPSConnection(host, port)
            else:
                conn = http.client.HTTPConnection(host, port)
            conn.sock = sock
            headers = {"Accept": "application/x-ndjson", "User-Agent": "Bastion", "Content-Type": "application/json"}
            if api_key:
                headers["Authorization"] = f"Bearer {api_key}"
            payload = json.dumps(json_body).encode() if json_body is not None else None
            conn.request(method, parts.path or "/", body=payload, headers=headers)
            resp = conn.getresponse()
            _check_status(resp.status, {k.lower(): v for k, v in resp.getheaders()}, api_key, resp)
        except ssl.SSLCertVerificationError as e:
            raise OutboundError(f"TLS verification failed: {e.verify_message or e.reason}") from None
        except TimeoutError:
            raise OutboundError(_timeout(deadline)) from None
        except (OSError, http.client.HTTPException) as e:
            raise OutboundError(f"the connection failed ({getattr(e, 'strerror', None) or e})") from None
        sock.settimeout(idle)
        while True:
            try:
                line = resp.readline(max_line + 1)
            except TimeoutError:
                raise OutboundError(f"nothing from the upstream for {idle:g} s") from None
            except (OSError, http.client.HTTPException) as e:
                raise OutboundError(f"the answer broke off ({getattr(e, 'strerror', None) or e})") from None
            if not line:
                return
            if len(line) > max_line:
                raise OutboundError(f"a line of the answer is longer than {_size(max_line)}")
            if line.strip():
                yield line
    finally:
        if conn is not None:
            conn.close()
        sock.close()


def get_json(url: str, **options: Any) -> Any:
    """`get` and parse the answer as JSON (options as for `get`)."""
    answer = get(url, **options)
    return parse_json(answer.body, answer.status)


def parse_json(raw: bytes, status: int | None = None) -> Any:
    try:
        return bodies.loads(raw)  # the gate's reader: depth-capped, so a deep answer is never a RecursionError
    except ValueError:
        raise OutboundError("the answer is not JSON", status) from None


def printable(text: str, limit: int = 200) -> str:
    """Text from the far side, safe to show in a status, a log line or a terminal."""
    clean = "".join(c if c.isprintable() else "?" for c in text[:limit])
    return clean + ("..." if len(text) > limit else "")


def _connect(host: str, port: int, end: float, deadline: float) -> socket.socket:
    """A connection to the first address of `host` that accepts one; all attempts share the deadline."""
    where = f"{host}:{port}"
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        raise OutboundError(f"{host} does not resolve") from None
    error: OSError = TimeoutError()
    for family, kind, proto, _, address in addresses:
        remaining = end - time.monotonic()
        if remaining <= 0:
            break
        sock = socket.socket(family, kind, proto)
        sock.settimeout(remaining)
        try:
            sock.connect(address)
            return sock
        except OSError as e:
            sock.close()
            error = e
    if isinstance(error, ConnectionRefusedError):
        raise OutboundError(f"connection refused by {where}")
    if isinstance(error, TimeoutError):
        raise OutboundError(f"no connection to {where} within {deadline:g} s")
    raise OutboundError(f"cannot connect to {where} ({error.strerror or error})")


def _tls_context(verify: bool | str) -> ssl.SSLContext:
    if verify is False:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    try:
        return ssl.create_default_context(cafile=verify if isinstance(verify, str) else None)
    except OSError as e:
        raise OutboundError(f"cannot read the CA bundle {verify} ({e.strerror or e})") from None


def _check_status(status: int, headers: dict[str, str], api_key: str | None,
                  resp: http.client.HTTPResponse | None = None) -> None:
    if 200 <= status < 300:
        return
    if resp is not None and status >= 400 and status not in AUTH_STATUSES:
        said = _said(resp)
        if said:
            raise OutboundError(f"the upstream answered HTTP {status}: {said}", status)
    if 300 <= status < 400:
        location = printable(headers.get("location", "nowhere"))
        raise OutboundError(f"the upstream answered with a redirect to {location}; Bastion does not follow "
                            "redirects", status)
    if status in AUTH_STATUSES:
        raise OutboundError(KEY_REJECTED if api_key else KEY_NEEDED, status)
    raise OutboundError(f"the upstream answered HTTP {status}", status)


def _said(resp: http.client.HTTPResponse) -> str | None:
    """The `error` of a small JSON refusal (Ollama: {"error": "model 'x' not found"}), printable."""
    try:
        data = bodies.loads(resp.read(ERROR_LIMIT + 1)[:ERROR_LIMIT])
    except (ValueError, OSError, http.client.HTTPException):
        return None
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict):  # OpenAI's shape
        error = error.get("message")
    return printable(error) if isinstance(error, str) and error else None


def _read(resp: http.client.HTTPResponse, headers: dict[str, str], max_bytes: int) -> bytes:
    too_large = OutboundError(f"the answer is larger than {_size(max_bytes)}", resp.status)
    declared = headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise too_large
    body = bytearray()
    while chunk := resp.read1(CHUNK):
        body += chunk
        if len(body) > max_bytes:
            raise too_large
    if declared.isdigit() and len(body) < int(declared):
        raise OutboundError("the answer ended early", resp.status)
    return bytes(body)


def _size(n: int) -> str:
    return f"{n / 2**20:g} MB" if n >= 2**20 else f"{n / 2**10:g} KB"


def _timeout(deadline: float) -> str:
    return f"no complete answer within {deadline:g} s"
