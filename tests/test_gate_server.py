"""The gate's HTTP server (authsvc/server.py) on a real unix socket with a WSGI app that echoes its environ: the
environ it builds (as granian built it), pipelined and split requests, and what it refuses. The whole suite runs
the real gate behind it, with real nginx, through `bastion up`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from authsvc import server


def echo(environ: dict[str, Any], start_response) -> list[bytes]:
    seen = {k: v for k, v in environ.items() if isinstance(v, str)}
    seen["body"] = environ["wsgi.input"].read().decode("latin-1")
    start_response("200 OK", [("Content-Type", "application/json"), ("X-Test", "yes")])
    return [json.dumps(seen).encode()]


@pytest.fixture
def sock(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "gate.sock"
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()

    async def run() -> None:
        srv = await loop.create_unix_server(lambda: server.Connection(echo), str(path))
        async with srv:
            await stop.wait()

    thread = threading.Thread(target=loop.run_until_complete, args=(run(),), daemon=True)
    thread.start()
    deadline = time.monotonic() + 5
    while not path.exists():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    yield path
    loop.call_soon_threadsafe(stop.set)
    thread.join(5)


def exchange(path: Path, *pieces: bytes, pause: float = 0.05) -> bytes:
    """Send `pieces` (pausing between them) and read until the server closes or goes quiet."""
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(path))
        for piece in pieces:
            s.sendall(piece)
            time.sleep(pause)
        s.settimeout(0.5)
        out = b""
        try:
            while data := s.recv(65536):
                out += data
        except TimeoutError:
            pass
        return out


def answers(raw: bytes) -> list[tuple[str, dict[str, str], bytes]]:
    """The responses in `raw`: status line, headers, body (by Content-Length)."""
    out = []
    while raw:
        head, _, rest = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers["content-length"])
        body, raw = rest[:length], rest[length:]
        out.append((lines[0], headers, body))
    return out


def request(method: str, target: str, body: bytes = b"", extra: str = "") -> bytes:
    return (f"{method} {target} HTTP/1.1\r\nHost: gate\r\n{extra}Content-Length: {len(body)}\r\n\r\n"
            .encode("latin-1") + body)


def test_the_environ_is_what_granian_gave_the_gate(sock: Path) -> None:
    raw = exchange(sock, request("POST", "/v1/a%20b%2Fc%C3%A9?x=%20y", b"hello",
                                 "X-Foo: one\r\nX-Foo: two\r\nX-Bar:   spaced  \r\nContent-Type: text/plain\r\n"))
    ((status, headers, body),) = answers(raw)
    assert status == "HTTP/1.1 200 OK" and headers["x-test"] == "yes"
    seen = json.loads(body)
    assert seen["PATH_INFO"] == "/v1/a b/c\u00c3\u00a9" and seen["QUERY_STRING"] == "x=%20y"
    assert (seen["REQUEST_METHOD"], seen["SERVER_PROTOCOL"]) == ("POST", "HTTP/1.1")
    assert (seen["HTTP_X_FOO"], seen["HTTP_X_BAR"], seen["CONTENT_TYPE"]) == ("one,two", "spaced", "text/plain")
    assert (seen["CONTENT_LENGTH"], seen["body"]) == ("5", "hello")


def test_pipelined_requests_and_a_body_split_across_reads_are_each_answered_in_order(sock: Path) -> None:
    big = b"x" * 300_000
    first, second, third = request("POST", "/1", b"a"), request("POST", "/2", big), request("GET", "/3")
    raw = exchange(sock, first + second[:1000], second[1000:150_000], second[150_000:] + third[:7], third[7:])
    got = [json.loads(body) for _, _, body in answers(raw)]
    assert [(g["PATH_INFO"], len(g["body"])) for g in got] == [("/1", 1), ("/2", 300_000), ("/3", 0)]


def test_head_gets_the_length_without_the_body_and_the_connection_stays_usable(sock: Path) -> None:
    raw = exchange(sock, request("HEAD", "/h") + request("GET", "/after"))
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK") and b"Content-Length: " in head
    assert int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0]) > 0
    assert json.loads(answers(rest)[0][2])["PATH_INFO"] == "/after"  # no body came between


@pytest.mark.parametrize("bad", [
    b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    b"POST /x HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
    b"GARBAGE\r\n\r\n",
    b"GET /x HTTP/1.1\r\nNo colon here\r\n\r\n",
    b"GET /x HTTP/1.1\r\n X-Folded: continued\r\n\r\n",
    b"GET /x HTTP/1.1\r\nX-Big: " + b"y" * (server.MAX_HEAD + 10),
])
def test_what_nginx_never_sends_is_refused_and_the_connection_closed(sock: Path, bad: bytes) -> None:
    raw = exchange(sock, bad)
    assert raw == server.CLOSE_AFTER


def test_connection_close_and_http_1_0_end_the_connection_after_the_answer(sock: Path) -> None:
    for first in (request("GET", "/c", extra="Connection: close\r\n"),
                  b"GET /old HTTP/1.0\r\nContent-Length: 0\r\n\r\n"):
        raw = exchange(sock, first + request("GET", "/never"))
        assert [json.loads(body)["PATH_INFO"] for _, _, body in answers(raw)] in (["/c"], ["/old"])


def test_the_socket_is_private_from_the_start(tmp_path: Path) -> None:
    path = tmp_path / "gate.sock"
    loop = asyncio.new_event_loop()
    task = loop.create_task(server.serve(echo, path))
    loop.run_until_complete(asyncio.sleep(0.2))
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            loop.run_until_complete(task)
        loop.close()
