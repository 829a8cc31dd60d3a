"""A stand-in for the gate that decides nothing (bench/nginx_ab.py variants `gate_canned*`): the floor of the gate hop.

`python bench/canned_gate.py SOCKET POOL KEY_ID MODEL` serves nginx on a unix socket like authsvc/server.py, with
the same asyncio loop and connection handling, but answers every request with the same redirect to `@pool_POOL`
without reading anything but where the request ends. What Bastion's throughput would be if the gate's own work
(parsing, the key, the body, the route) cost nothing; never a way to run Bastion.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

LENGTH = b"\r\ncontent-length: "


class Canned(asyncio.Protocol):
    def __init__(self, answer: bytes):
        self.answer = answer
        self.buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            at = self.buffer.lower().find(LENGTH, 0, end)
            length = int(self.buffer[at + len(LENGTH):self.buffer.find(b"\r\n", at + 2)]) if at >= 0 else 0
            if len(self.buffer) < end + 4 + length:
                return
            self.buffer = self.buffer[end + 4 + length:]
            self.transport.write(self.answer)  # type: ignore[attr-defined]


async def serve(socket: Path, answer: bytes) -> None:
    umask = os.umask(0o177)
    try:
        server = await asyncio.get_running_loop().create_unix_server(lambda: Canned(answer), str(socket))
    finally:
        os.umask(umask)
    async with server:
        await server.serve_forever()


def main() -> None:
    socket, pool, key_id, model = sys.argv[1:5]
    answer = (f"HTTP/1.1 200 OK\r\nX-Accel-Redirect: @pool_{pool}\r\nX-Bastion-Key: {key_id}\r\n"
              f"X-Bastion-Model: {model}\r\nContent-Length: 0\r\n\r\n").encode()
    asyncio.run(serve(Path(socket), answer))


if __name__ == "__main__":
    main()
