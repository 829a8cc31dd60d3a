"""A slow OpenAI-style SSE upstream for the stream benchmarks: `python bench/sse_upstream.py PORT EVENTS INTERVAL
[HOLD]`. Every streamed request gets EVENTS chat-completion chunks (or its `max_tokens`), one each INTERVAL
seconds, then, after HOLD seconds of silence (default 0), a usage chunk and `data: [DONE]`; other requests get a
small JSON answer (the model list for a GET). One asyncio process holds thousands of streams (a thread per stream
would not)."""

from __future__ import annotations

import asyncio
import json
import resource
import sys

MODEL = "bench-model"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def event(payload: dict) -> bytes:
    return chunk(b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n")


async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, events: int, interval: float,
                 hold: float = 0.0) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method = lines[0].split(" ")[0]
            length = next((int(line.split(":", 1)[1]) for line in lines[1:]
                           if line.lower().startswith("content-length:")), 0)
            request = await reader.readexactly(length) if length else b""
            if b'"stream":true' not in request.replace(b" ", b""):  # the model list, a readiness probe
                body = json.dumps({"object": "list", "data": [{"id": MODEL, "object": "model"}]} if method == "GET"
                                  else {"id": "c", "object": "chat.completion", "model": MODEL, "choices": []}).encode()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                             % (len(body), body))
                await writer.drain()
                continue
            count = int(json.loads(request).get("max_tokens", events))  # a client may ask for its own count
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
            for i in range(count):
                writer.write(event({"id": "c", "object": "chat.completion.chunk", "model": MODEL,
                                    "choices": [{"index": 0, "delta": {"content": f"t{i} "}}]}))
                await writer.drain()
                await asyncio.sleep(interval)
            await asyncio.sleep(hold)
            writer.write(event({"id": "c", "object": "chat.completion.chunk", "model": MODEL, "choices": [],
                                "usage": {"prompt_tokens": 5, "completion_tokens": count,
                                          "total_tokens": 5 + count}}))
            writer.write(chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def main(port: int, events: int, interval: float, hold: float) -> None:
    server = await asyncio.start_server(lambda r, w: answer(r, w, events, interval, hold), "127.0.0.1", port,
                                        backlog=4096)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]),
                     float(sys.argv[4]) if len(sys.argv) > 4 else 0.0))
