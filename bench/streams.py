"""Thousands of concurrent slow SSE streams through Bastion and through bare nginx, in the same run:
`python bench/streams.py` (run by `make bench`).

A slow upstream (bench/sse_upstream.py: one asyncio process) answers every chat completion with EVENTS chunks,
one every INTERVAL seconds. The client (asyncio, this process) opens STREAMS streams at RATE per second and
holds them all at once; each must end with `data: [DONE]`. Printed per target: streams completed, broken
(closed early or an error status, by kind), time to first byte p50/p99, and nginx's RSS (and the gate's) with
every stream open, per stream above idle. Bare nginx gets the same connection room as Bastion renders for its
default `max_streams` (manager/capacity.py), so the comparison is the proxy, not a setting.

Environment: STREAMS (default 5000), STREAM_RATE (500 per second), STREAM_EVENTS (20), STREAM_INTERVAL (1.0 s).
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import (
    API_PATH,
    MODEL,
    BenchError,
    PrivateNginx,
    bastion_groups,
    bastion_stack,
    free_port,
    port_open,
    proxy_body,
    rss_kib,
    stop_process,
)
from manager import capacity, settings

STREAMS = int(os.environ.get("STREAMS", "5000"))
RATE = float(os.environ.get("STREAM_RATE", "500"))
EVENTS = int(os.environ.get("STREAM_EVENTS", "20"))
INTERVAL = float(os.environ.get("STREAM_INTERVAL", "1.0"))
BODY = json.dumps({"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "hi"}]}).encode()


@dataclass
class Outcome:
    ttfb: list[float] = field(default_factory=list)
    kinds: Counter[str] = field(default_factory=Counter)


async def one_stream(port: int, key: str, outcome: Outcome) -> None:
    started = time.monotonic()
    writer = None
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST %s HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer %s\r\nContent-Type: "
                     b"application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                     % (API_PATH.encode(), key.encode(), len(BODY), BODY))
        await writer.drain()
        status = (await reader.readline()).split(b" ")[1:2]
        if status != [b"200"]:
            outcome.kinds[f"status {status[0].decode() if status else 'none'}"] += 1
            return
        await reader.readuntil(b"\r\n\r\n")
        first = await reader.read(1)
        if not first:
            outcome.kinds["closed before the first byte"] += 1
            return
        outcome.ttfb.append(time.monotonic() - started)
        seen = bytearray(first)
        while b"data: [DONE]" not in seen:
            data = await reader.read(65536)
            if not data:
                outcome.kinds["closed before [DONE]"] += 1
                return
            seen = seen[-32:] + data
        outcome.kinds["completed"] += 1
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
        outcome.kinds[type(e).__name__] += 1
    finally:
        if writer:
            writer.close()


async def run_streams(port: int, key: str, on_peak) -> Outcome:
    """STREAMS streams opened at RATE per second; `on_peak()` is called once all are open."""
    outcome = Outcome()
    tasks = []
    start = time.monotonic()
    for i in range(STREAMS):
        delay = start + i / RATE - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one_stream(port, key, outcome)))
    await asyncio.sleep(min(2.0, EVENTS * INTERVAL / 4))
    on_peak()
    await asyncio.gather(*tasks)
    return outcome


def rss_mib(pids: list[int]) -> float:
    return sum(rss_kib(p) for p in pids) / 1024


def measure(name: str, port: int, key: str, pids) -> dict:
    """One target: RSS of its processes at idle and with every stream open, and the streams' outcome."""
    idle = {role: rss_mib(p) for role, p in pids().items()}
    peak: dict[str, float] = {}

    def at_peak() -> None:
        peak.update({role: rss_mib(p) for role, p in pids().items()})

    print(f"  {name}: {STREAMS} streams at {RATE:.0f}/s, {EVENTS} events {INTERVAL} s apart...", flush=True)
    outcome = asyncio.run(run_streams(port, key, at_peak))
    ttfb = sorted(outcome.ttfb)
    return {"idle": idle, "peak": peak, "kinds": outcome.kinds,
            "ttfb_p50": ttfb[len(ttfb) // 2] * 1000 if ttfb else None,
            "ttfb_p99": ttfb[int(len(ttfb) * 0.99)] * 1000 if ttfb else None}


def report(results: dict[str, dict]) -> None:
    print(f"\n{STREAMS} concurrent streams ({EVENTS} events, {INTERVAL} s apart, opened at {RATE:.0f}/s):")
    for name, r in results.items():
        kinds = r["kinds"]
        broken = sum(n for k, n in kinds.items() if k != "completed")
        detail = ", ".join(f"{k}: {n}" for k, n in kinds.items() if k != "completed")
        print(f"  {name}: completed {kinds['completed']}, broken {broken}{f' ({detail})' if detail else ''}; "
              f"TTFB p50 {r['ttfb_p50']:.2f} ms, p99 {r['ttfb_p99']:.2f} ms")
        for role in r["peak"]:
            grown = r["peak"][role] - r["idle"].get(role, 0.0)
            print(f"    RSS {role}: {r['idle'].get(role, 0.0):.1f} MiB idle, {r['peak'][role]:.1f} MiB with "
                  f"the streams open: {grown * 1024 / STREAMS:.1f} KiB per stream")
    bastion = results.get("Bastion", {}).get("kinds", Counter())
    print(f"  target: zero broken through Bastion: "
          f"{'MET' if bastion.get('completed') == STREAMS else 'NOT MET'}")


def main() -> int:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < STREAMS + 256:
        print(f"error: the open-file hard limit ({hard}) is below {STREAMS} streams", file=sys.stderr)
        return 1
    connections, _ = capacity.nginx_limits(settings.DEFAULTS["max_streams"], capacity.hard_limit())
    with tempfile.TemporaryDirectory(prefix="bastion-streams-") as name, ExitStack() as cleanup:
        tmp = Path(name)
        port = free_port()
        upstream = subprocess.Popen([sys.executable, str(Path(__file__).with_name("sse_upstream.py")), str(port),
                                     str(EVENTS), str(INTERVAL)])
        cleanup.callback(stop_process, upstream, signal.SIGTERM)
        while not port_open(port):
            time.sleep(0.05)
        bare = PrivateNginx("bare nginx", tmp / "bare")
        cleanup.callback(bare.stop)
        bare.start(proxy_body(bare.port, f"127.0.0.1:{port}"), connections)
        results = {"bare nginx": measure("bare nginx", bare.port, "none", lambda: {"nginx": bare.pids()})}
        bare.stop()
        try:
            with bastion_stack(tmp / "bastion", f"http://127.0.0.1:{port}") as (stack, key):
                public = int(stack.base.rpartition(":")[2])
                groups = lambda: {r: p for r, p in bastion_groups(stack).items() if r in ("nginx", "gate")}  # noqa: E731
                results["Bastion"] = measure("Bastion", public, key, groups)
        except BenchError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        report(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
