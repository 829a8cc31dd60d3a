"""Time to first byte with model-aware balancing vs round robin: `python bench/balance.py` (run by `make bench`).

Two fake Ollama upstreams (tests/fakes.py) serve the same two models but keep only one loaded at a time: a request
for a model that is not loaded waits LOAD seconds (the head too) while it loads, evicting the other. One
`bastion up` with one pool of both upstreams (health checks, hence the /api/ps polling, every second). The same
sequence of streamed /api/chat requests (models drawn at random, fixed seed, CONCURRENCY clients) goes through
the pool twice: with `model_aware` off (nginx's round robin) and on (the gate picks the upstream that has the
model loaded), each starting with nothing loaded. Printed per mode: requests, model loads, time to first byte
(response head) p50/p90/max and mean.

Environment: BALANCE_REQUESTS (default 60), BALANCE_LOAD (0.5 s), BALANCE_CONCURRENCY (2), BALANCE_MODELS (2).
"""

from __future__ import annotations

import http.client
import json
import os
import random
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import BenchError
from tests.conftest import Stack
from tests.fakes import FakeUpstream

REQUESTS = int(os.environ.get("BALANCE_REQUESTS", "60"))
LOAD = float(os.environ.get("BALANCE_LOAD", "0.5"))
CONCURRENCY = int(os.environ.get("BALANCE_CONCURRENCY", "2"))
MODELS = [f"bench-m{i}" for i in range(1, int(os.environ.get("BALANCE_MODELS", "2")) + 1)]


def ttfb(port: int, key: str, model: str) -> float:
    """Seconds until the answer's head of one streamed /api/chat (the body is read to the end)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]})
    started = time.perf_counter()
    conn.request("POST", "/api/chat", body, {"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    resp = conn.getresponse()
    head = time.perf_counter() - started
    resp.read()
    conn.close()
    if resp.status != 200:
        raise BenchError(f"/api/chat for {model} answered {resp.status}")
    return head


def wait_polled(stack: Stack, ups: list[FakeUpstream], timeout: float = 15) -> None:
    """Until the manager's last poll shows the upstreams with nothing loaded (and the gate has read it)."""
    path = stack.data_dir / "run" / "ollama-ps.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            loads = json.loads(path.read_text()).get("upstreams", {})
            if all(loads.get(up.url, {}).get("models") == [] for up in ups):
                time.sleep(0.5)
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.1)
    raise BenchError("the upstreams' /api/ps was not polled")


def run_mode(stack: Stack, key: str, ups: list[FakeUpstream], model_aware: bool, sequence: list[str]) -> dict:
    stack.cli("pools", "update", "pool", "--model-aware" if model_aware else "--no-model-aware")
    for up in ups:
        up.running, up.loads = [], 0
    wait_polled(stack, ups)
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        times = list(pool.map(lambda m: ttfb(stack.public_port, key, m), sequence))
    cuts = statistics.quantiles(times, n=10)
    return {"loads": sum(up.loads for up in ups), "p50": statistics.median(times), "p90": cuts[8],
            "max": max(times), "mean": statistics.fmean(times)}


def main() -> int:
    ups = [FakeUpstream(f"ollama-{i}", MODELS) for i in (1, 2)]
    for up in ups:
        up.load_delay, up.max_loaded, up.running = LOAD, 1, []
    rng = random.Random(13)
    sequence = [rng.choice(MODELS) for _ in range(REQUESTS)]
    results = {}
    with tempfile.TemporaryDirectory(prefix="bastion-balance-") as tmp:
        stack = Stack(Path(tmp) / "data")
        try:
            stack.start()
            stack.cli("settings", "set", "health_interval", "1")
            stack.cli("pools", "add", "pool", *(a for up in ups for a in ("--url", up.url)), "--models",
                      ",".join(MODELS), "--api-kinds", "ollama,openai")
            key = stack.key("bench")
            for name, aware in (("round robin", False), ("model-aware", True)):
                results[name] = run_mode(stack, key, ups, aware, sequence)
        except (BenchError, RuntimeError) as e:
            print(f"balance benchmark failed: {e}", file=sys.stderr)
            return 1
        finally:
            stack.stop()
            for up in ups:
                up.close()
    print(f"\nModel-aware balancing: {REQUESTS} streamed /api/chat requests over {len(MODELS)} models, "
          f"{CONCURRENCY} clients, two upstreams keeping one model loaded each, {LOAD:g} s per model load")
    print(f"{'mode':<14}{'loads':>7}{'TTFB p50':>11}{'p90':>9}{'max':>9}{'mean':>9}")
    for name, r in results.items():
        print(f"{name:<14}{r['loads']:>7}{r['p50'] * 1000:>9.1f}ms{r['p90'] * 1000:>7.0f}ms{r['max'] * 1000:>7.0f}ms"
              f"{r['mean'] * 1000:>7.0f}ms")
    ratio = results["round robin"]["mean"] / results["model-aware"]["mean"]
    print(f"mean TTFB: model-aware {ratio:.1f}x lower than round robin")
    return 0


if __name__ == "__main__":
    sys.exit(main())
