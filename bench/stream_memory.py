"""nginx memory per open stream, by the number of SSE events it has passed on: `python bench/stream_memory.py`
(run by `make bench`).

njs (Debian's 0.7) frees nothing a request allocates before the request ends, so the token meter's body filter
makes nginx's memory grow with every chunk of a metered stream until the stream ends. This measures it: N
streams at once (default 200), each of which gets exactly K events (3 ms apart, from bench/sse_upstream.py: K is
the request's `max_tokens`) and then waits, silent, while nginx's RSS is read; for K = 10 and K = 500, through
bare nginx and through Bastion (metered; the client does not ask for usage, so the meter takes out the usage
event it had the upstream add: its most allocating path). nginx is reloaded before each measurement (fresh
workers: memory a worker's allocator kept would hide the growth).

Environment: MEMORY_STREAMS (default 200).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import (
    API_PATH,
    MODEL,
    PrivateNginx,
    bastion_groups,
    bastion_stack,
    free_port,
    port_open,
    proxy_body,
    rss_kib,
    stop_process,
)

STREAMS = int(os.environ.get("MEMORY_STREAMS", "200"))
EVENT_COUNTS = (10, 500)
GAP = 0.003  # seconds between events: separate reads for nginx
HOLD = 15.0  # seconds the upstream waits after the events before it ends the stream


async def one_stream(port: int, key: str, events: int, reached: list[int]) -> bool:
    """A stream of `events` events; counts itself in `reached` once it has them all; True when it ended well."""
    body = json.dumps({"model": MODEL, "stream": True, "max_tokens": events,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"POST %s HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer %s\r\nContent-Type: "
                     b"application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                     % (API_PATH.encode(), key.encode(), len(body), body))
        await writer.drain()
        seen, counted = b"", False
        while data := await reader.read(65536):
            seen += data
            if not counted and seen.count(b"data: ") >= events:
                counted = True
                reached.append(1)
        return b"data: [DONE]" in seen
    finally:
        writer.close()


async def streams_rss(port: int, key: str, events: int, pids: Callable[[], list[int]]) -> tuple[float, int]:
    """KiB of nginx RSS per stream once every stream has its events, and how many ended well."""
    idle = sum(rss_kib(p) for p in pids())
    reached: list[int] = []
    tasks = [asyncio.create_task(one_stream(port, key, events, reached)) for _ in range(STREAMS)]
    deadline = time.monotonic() + HOLD - 2
    while len(reached) < STREAMS and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)
    held = sum(rss_kib(p) for p in pids())
    ended = sum(await asyncio.gather(*tasks))
    if len(reached) < STREAMS:
        raise RuntimeError(f"only {len(reached)} of {STREAMS} streams got their {events} events in time")
    return (held - idle) / STREAMS, ended


def measure(name: str, port: int, key: str, pids: Callable[[], list[int]], reload: Callable[[], None]) -> None:
    per_stream = {}
    for events in EVENT_COUNTS:
        reload()
        per_stream[events], ended = asyncio.run(streams_rss(port, key, events, pids))
        print(f"  {name}: {STREAMS} streams held after {events} events: {per_stream[events]:.1f} KiB of nginx RSS "
              f"per stream ({ended} of {STREAMS} ended with [DONE])", flush=True)
    low, high = EVENT_COUNTS
    print(f"  {name}: {(per_stream[high] - per_stream[low]) / (high - low) * 1024:.0f} bytes per event passed on",
          flush=True)


def reloaded(master_pid: Callable[[], int], pids: Callable[[], list[int]]) -> Callable[[], None]:
    """A reload of nginx that returns once the old workers are gone and new ones run."""
    def workers() -> set[int]:
        return set(pids()) - {master_pid()}

    def reload() -> None:
        before = workers()
        os.kill(master_pid(), signal.SIGHUP)
        deadline = time.monotonic() + 10
        while workers() & before or not workers():
            if time.monotonic() > deadline:
                raise RuntimeError("nginx did not reload")
            time.sleep(0.1)
        time.sleep(0.5)
    return reload


def main() -> int:
    print(f"nginx memory per open stream ({STREAMS} streams), by events passed on:", flush=True)
    with tempfile.TemporaryDirectory(prefix="bastion-stream-memory-") as name, ExitStack() as cleanup:
        tmp = Path(name)
        port = free_port()
        upstream = subprocess.Popen([sys.executable, str(Path(__file__).with_name("sse_upstream.py")), str(port),
                                     str(EVENT_COUNTS[0]), str(GAP), str(HOLD)])
        cleanup.callback(stop_process, upstream, signal.SIGTERM)
        while not port_open(port):
            time.sleep(0.05)
        bare = PrivateNginx("bare nginx", tmp / "bare")
        cleanup.callback(bare.stop)
        bare.start(proxy_body(bare.port, f"127.0.0.1:{port}"))
        measure("bare nginx", bare.port, "none", bare.pids,
                reloaded(lambda: bare.proc.pid, bare.pids))
        bare.stop()
        with bastion_stack(tmp / "bastion", f"http://127.0.0.1:{port}") as (stack, key):
            public = int(stack.base.rpartition(":")[2])
            pids = lambda: bastion_groups(stack)["nginx"]  # noqa: E731
            measure("Bastion", public, key, pids,
                    reloaded(lambda: int((stack.data_dir / "nginx" / "nginx.pid").read_text()), pids))
    return 0


if __name__ == "__main__":
    sys.exit(main())
