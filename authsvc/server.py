"""The gate's HTTP server: `python -m authsvc.server SOCKET` with BASTION_DATA_DIR set (decision 44).

Only nginx connects, over a unix socket that only the data dir's owner may open. nginx sends HTTP/1.1 requests
with their whole body and a Content-Length (it reads a request body completely before it asks the gate: request
buffering is on), and keeps connections open for the next request. The gate never waits on I/O, so one asyncio
loop in one thread serves every connection and calls the WSGI application (authsvc/gate.py) directly: no thread
hand-off per request, which is most of what a general-purpose server costs on this path (docs/benchmarks.md).

What is not nginx's plain HTTP/1.1 (a chunked or oversized body, a malformed head) is answered 400 and the
connection closed; the environ is a WSGI one as granian built it before (PATH_INFO percent-decoded to latin-1
text, repeated headers joined with ",", values without surrounding spaces), so the gate sees the same request.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import unquote_to_bytes

from authsvc import logconfig

log = logging.getLogger(__name__)

MAX_HEAD = 65536  # nginx's own limit for a client's request head is 4 x 8 KiB by default
MAX_BODY = 1 << 30  # nginx enforces body_limit_mb first; this only bounds what a broken peer can make us hold
CLOSE_AFTER = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
NO_BODY = ("HEAD",)
Application = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class BadRequest(Exception):
    pass


_ENVIRON_KEYS: dict[str, str] = {}


def _environ_key(name: str) -> str:
    """The WSGI environ key of a header name (remembered: nginx sends the same few names all day)."""
    key = _ENVIRON_KEYS.get(name)
    if key is None:
        upper = name.upper().replace("-", "_")
        key = upper if upper in ("CONTENT_TYPE", "CONTENT_LENGTH") else "HTTP_" + upper
        if len(_ENVIRON_KEYS) < 4096:  # a client may send any names; nginx passes them on
            _ENVIRON_KEYS[name] = key
    return key


# what every request's environ holds whatever the request (copied, then the request's own keys are added)
_CONSTANT_ENVIRON: dict[str, Any] = {
    "SCRIPT_NAME": "", "SERVER_NAME": "gate", "SERVER_PORT": "0", "REMOTE_ADDR": "", "wsgi.version": (1, 0),
    "wsgi.url_scheme": "http", "wsgi.errors": sys.stderr, "wsgi.multithread": False, "wsgi.multiprocess": False,
    "wsgi.run_once": False,
}


def parse_head(head: bytes) -> dict[str, Any]:
    """The WSGI environ of a request head (without the blank line), or BadRequest."""
    request_line, *lines = head.decode("latin-1").split("\r\n")
    parts = request_line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1.") or not parts[0].isalpha():
        raise BadRequest("request line")
    method, target, protocol = parts
    path, _, query = target.partition("?")
    if "%" in path:
        path = unquote_to_bytes(path).decode("latin-1")
    environ = _CONSTANT_ENVIRON.copy()
    environ["REQUEST_METHOD"], environ["PATH_INFO"], environ["QUERY_STRING"] = method, path, query
    environ["SERVER_PROTOCOL"] = protocol
    for line in lines:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            raise BadRequest("header line")
        key = _environ_key(name)
        value = value.strip()
        if key in environ and key[:5] == "HTTP_":
            environ[key] = f"{environ[key]},{value}"
        else:
            environ[key] = value
    return environ


def response(status: str, headers: list[tuple[str, str]], body: bytes, method: str) -> bytes:
    lines = [f"HTTP/1.1 {status}"]
    lines += [f"{name}: {value}" for name, value in headers]
    lines.append(f"Content-Length: {len(body)}\r\n\r\n")
    out = "\r\n".join(lines).encode("latin-1")
    return out if method in NO_BODY else out + body


class Connection(asyncio.Protocol):
    """One connection from nginx: requests one after the other, each answered as soon as it is complete."""

    def __init__(self, app: Application, gone: Callable[[Connection], None] = lambda _: None):
        self.app = app
        self.gone = gone  # told when the connection is closed
        self.buffer = bytearray()
        self.head: tuple[dict[str, Any], int] | None = None  # the request whose body is still arriving, its end
        self.transport: asyncio.Transport | None = None
        self._status = ""  # the answer being made (start_response)
        self._headers: list[tuple[str, str]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        try:
            while self.transport is not None and self._serve_one():
                pass
        except BadRequest as e:
            log.warning("closing a gate connection: bad %s", e)
            self._close(CLOSE_AFTER)

    def _serve_one(self) -> bool:
        """Answer the first request of the buffer if it is complete; False when more bytes are needed."""
        if self.head is None:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buffer) > MAX_HEAD:
                    raise BadRequest("head: too long")
                return False
            environ = parse_head(bytes(self.buffer[:end]))
            if "HTTP_TRANSFER_ENCODING" in environ:
                raise BadRequest("body: chunked (nginx sends a Content-Length)")
            length = environ.get("CONTENT_LENGTH", "0") or "0"
            if not length.isdigit() or int(length) > MAX_BODY:
                raise BadRequest("Content-Length")
            del self.buffer[:end + 4]
            self.head = environ, int(length)
        environ, length = self.head
        if len(self.buffer) < length:
            return False
        self.head = None
        environ["wsgi.input"] = io.BytesIO(self.buffer[:length])
        del self.buffer[:length]
        answer = self._call(environ)
        if environ["SERVER_PROTOCOL"] == "HTTP/1.0" or environ.get("HTTP_CONNECTION", "").lower() == "close":
            self._close(answer)
            return False
        self.transport.write(answer)  # type: ignore[union-attr]
        return True

    def _call(self, environ: dict[str, Any]) -> bytes:
        body = b"".join(self.app(environ, self._start_response))
        return response(self._status, self._headers, body, environ["REQUEST_METHOD"])

    def _start_response(self, status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
        self._status, self._headers = status, headers

    def _close(self, last: bytes) -> None:
        if self.transport is not None:
            self.transport.write(last)
        self.close()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()  # after what was written has gone out
            self.transport = None

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.gone(self)


async def serve(app: Application, path: Path) -> None:
    """Serve `app` on the unix socket `path` (0600 from the start) until SIGTERM or SIGINT. A request is answered
    within the loop's turn that completes it, so at a stop no request is half done: the open connections (nginx's
    idle keepalive ones) are closed once what was written to them has gone out."""
    path.unlink(missing_ok=True)
    loop = asyncio.get_running_loop()
    connections: set[Connection] = set()

    def connection() -> Connection:
        made = Connection(app, connections.discard)
        connections.add(made)
        return made

    umask = os.umask(0o177)
    try:
        server = await loop.create_unix_server(connection, str(path), backlog=1024)
    finally:
        os.umask(umask)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("the gate serves %s", path)
    await stop.wait()
    server.close()
    for open_connection in list(connections):
        open_connection.close()
    await asyncio.sleep(0.05)  # the transports flush what they hold
    path.unlink(missing_ok=True)


def main() -> None:
    from authsvc.gate import Gate

    logconfig.configure()
    app = Gate.from_data_dir(Path(os.environ["BASTION_DATA_DIR"]))
    asyncio.run(serve(app, Path(sys.argv[1])))


if __name__ == "__main__":
    main()
