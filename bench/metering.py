"""What token metering (njs, nginx_templates/meter.js) costs nginx: worker CPU per request and per SSE event.

Starts `bastion up` twice (the tests' `Stack`), once with metering and once with BASTION_NJS_MODULE=off, each
with one pool on a fake upstream, and sends from one client loop: non-streamed chat completions, streamed
ones of EVENTS events (the client does not ask for usage: Bastion injects include_usage and takes the usage
event out again) and Ollama /api/chat streams. nginx's workers' CPU time is read from /proc/<pid>/schedstat
(nanoseconds) around each batch, so the gate, the manager and the client do not count. The CPU per request
depends on the pace: requests with idle gaps between them each cost several times more (cold caches), njs's
most, so the client's wall time per request is printed too (it was 44 ms before the fake upstream set
TCP_NODELAY, and metering then seemed to cost 110-130 µs per request: docs/benchmarks.md, "Token metering").

Environment: METER_REQUESTS (per batch, default 400), METER_EVENTS (events per stream, default 50).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from manager import metering
from manager.datadir import DataDir
from manager.nginx import Nginx
from tests.conftest import Stack
from tests.fakes import FakeUpstream

REQUESTS = int(os.environ.get("METER_REQUESTS", "400"))
EVENTS = int(os.environ.get("METER_EVENTS", "50"))


def worker_ns(stack: Stack) -> int:
    """CPU time of nginx's workers so far (ns)."""
    nginx = Nginx(DataDir.at(stack.data_dir))
    master = nginx.master_pid()
    assert master, "nginx is not running"
    return sum(int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) for pid in nginx.worker_pids(master))


def batch(stack: Stack, key: str, path: str, body: dict, stream: bool) -> tuple[float, float]:
    """(µs of worker CPU per request, seconds in all) for REQUESTS requests."""
    session = requests.Session()
    headers = {"Authorization": f"Bearer {key}"}
    for _ in range(20):  # warm-up
        session.post(stack.base + path, json=body, headers=headers, timeout=30).close()
    start, t0 = worker_ns(stack), time.monotonic()
    for _ in range(REQUESTS):
        r = session.post(stack.base + path, json=body, headers=headers, stream=stream, timeout=30)
        assert r.status_code == 200, r.text
        for _ in r.iter_content(None):
            pass
    elapsed = time.monotonic() - t0
    time.sleep(0.2)  # the last log line written
    return (worker_ns(stack) - start) / 1000 / REQUESTS, elapsed


def measure(njs: bool, up: FakeUpstream) -> dict[str, float]:
    if njs:
        os.environ.pop(metering.ENV, None)
    else:
        os.environ[metering.ENV] = "off"
    with tempfile.TemporaryDirectory(prefix="bastion-meter-bench-") as tmp:
        stack = Stack(Path(tmp) / "data")
        stack.start()
        try:
            assert ("token metering: njs" in stack.cli("status")) == njs
            stack.cli("pools", "add", "bench", "--url", up.url, "--models", "bench-model")
            key = stack.key("bench")
            chat = {"model": "bench-model", "messages": [{"role": "user", "content": "hi"}]}
            plain, plain_s = batch(stack, key, "/v1/chat/completions", chat, False)
            sse, sse_s = batch(stack, key, "/v1/chat/completions", {**chat, "stream": True}, True)
            ndjson, _ = batch(stack, key, "/api/chat", chat, True)
        finally:
            stack.stop()
    return {"plain": plain, "plain_ms": plain_s / REQUESTS * 1000, "sse": sse, "ndjson": ndjson,
            "sse_rps": REQUESTS / sse_s}


def main() -> None:
    up = FakeUpstream("bench", ["bench-model"], chunks=EVENTS)
    up.suffix = "é "
    try:
        off = measure(False, up)
        on = measure(True, up)
    finally:
        up.close()
    print(f"nginx worker CPU, µs per request ({REQUESTS} requests each; streams of {EVENTS} events + [DONE])")
    print(f"{'':32}{'without njs':>12}{'with njs':>12}{'added':>10}")
    for name, label in (("plain", "chat completion (JSON)"), ("sse", "chat stream (SSE), injected"),
                        ("ndjson", "Ollama /api/chat (NDJSON)")):
        print(f"{label:32}{off[name]:>12.1f}{on[name]:>12.1f}{on[name] - off[name]:>10.1f}")
    print(f"{'client wall ms per JSON request':32}{off['plain_ms']:>12.2f}{on['plain_ms']:>12.2f}")
    for name in ("sse", "ndjson"):
        per_event = (on[name] - off[name] - (on["plain"] - off["plain"])) / (EVENTS + 1)
        print(f"added per {name.upper()} event (beyond the per-request cost): {per_event:.1f} µs")


if __name__ == "__main__":
    main()
