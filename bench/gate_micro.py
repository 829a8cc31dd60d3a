"""The gate's own CPU per decision, in-process (`make bench`; alone: `.venv/bin/python bench/gate_micro.py`).

`Gate.__call__` on a WSGI environ shaped like authsvc/server.py's, for the request shapes that matter on the hot path:
the benchmark's chat completion (bench/bench.py REQUEST_BODY) with a key without and with a model allow-list, a
12 KB conversation, a streamed request that gets `include_usage` added, a key with an rpm and a daily token
quota, an Ollama /api/chat, and a refused wrong key. Each shape: the best of BENCH_GATE_REPEAT (default 25) timings of
BENCH_GATE_CALLS (default 2,000) calls, in µs of the process's CPU time per decision (CPU time, not wall time,
and the minimum: the machine is shared, so other programs only ever add to a timing).
`--profile SHAPE` prints cProfile's top functions for one shape instead.

the server's own work per request (reading and parsing the request, building the environ, writing the answer) is
not in these figures; bench/bench.py's "CPU per request: gate" counts both.
"""

from __future__ import annotations

import cProfile
import json
import os
import pstats
import sys
import tempfile
import time
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from authsvc import keys as keyformat  # noqa: E402
from authsvc.gate import Gate  # noqa: E402
from authsvc.snapshot import KEYS_DB  # noqa: E402
from bench import MODEL, REQUEST_BODY  # noqa: E402  (bench/bench.py, this script's neighbour)
from manager.keystore import KeyStore  # noqa: E402

CALLS = int(os.environ.get("BENCH_GATE_CALLS", "2000"))
REPEAT = int(os.environ.get("BENCH_GATE_REPEAT", "25"))
PEPPER = b"bench-pepper"
STREAM_BODY = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True},
                         separators=(",", ":")).encode()
# a conversation of 20 messages, 12 KB: real chat bodies are rarely as small as the benchmark's
LONG_BODY = json.dumps({"model": MODEL, "messages": [{"role": "user" if i % 2 else "assistant",
                                                      "content": "hello world " * 50} for i in range(20)]},
                       separators=(",", ":")).encode()
OLLAMA_BODY = json.dumps({"model": "llama3", "messages": [{"role": "user", "content": "hi"}], "stream": False},
                         separators=(",", ":")).encode()


class Body:
    """A wsgi.input that can be read again (one per shape, not one per call)."""

    def __init__(self, raw: bytes):
        self.raw = raw

    def read(self, size: int = -1) -> bytes:
        return self.raw


def environ(path: str, token: str, body: bytes) -> dict[str, Any]:
    """What authsvc/server.py hands the gate for a request nginx forwards (headers of bastion's gate location)."""
    return {
        "REQUEST_METHOD": "POST", "PATH_INFO": path, "QUERY_STRING": "", "SCRIPT_NAME": "", "SERVER_NAME": "localhost",
        "SERVER_PORT": "80", "SERVER_PROTOCOL": "HTTP/1.1", "REMOTE_ADDR": "", "CONTENT_TYPE": "application/json",
        "CONTENT_LENGTH": str(len(body)), "HTTP_HOST": "localhost", "HTTP_CONNECTION": "keep-alive",
        "HTTP_AUTHORIZATION": f"Bearer {token}", "HTTP_X_REAL_IP": "127.0.0.1",
        "HTTP_X_REQUEST_ID": "0123456789abcdef0123456789abcdef", "HTTP_USER_AGENT": "wrk",
        "wsgi.input": Body(body), "wsgi.url_scheme": "http", "wsgi.version": (1, 0), "wsgi.errors": sys.stderr,
        "wsgi.multithread": False, "wsgi.multiprocess": False, "wsgi.run_once": False,
    }


def make_gate(data: Path) -> tuple[Gate, dict[str, str]]:
    """A gate on a snapshot with one pool serving the benchmark's model and llama3, and one key per shape."""
    (data / "run").mkdir()
    # no brute-force blocks nor unauthenticated limit: the wrong key must stay a 401, call after call
    snapshot = {"pools": [{"name": "main", "models": [MODEL, "llama3:latest"]}], "body_edits": True,
                "bruteforce": {"max_failures": 0}, "unauthenticated_rpm": 0}
    (data / "snapshot.json").write_text(json.dumps(snapshot))
    store = KeyStore(data / KEYS_DB)
    tokens = {}
    for name, rules in {"plain": {}, "allow_list": {"models": ["bench-*", "llama3*"]},
                        "limits": {"rpm": 10**9, "tokens_per_day": 10**12}}.items():
        key_id, token = keyformat.generate()
        store.insert({"id": key_id, "digest": keyformat.digest(PEPPER, token), "name": name, **rules})
        tokens[name] = token
    return Gate(data / "snapshot.json", PEPPER), tokens


def shapes(tokens: dict[str, str]) -> dict[str, tuple[dict[str, Any], str]]:
    """name -> (environ, the status line expected)."""
    chat = "/v1/chat/completions"
    wrong = tokens["plain"][:-1] + ("A" if tokens["plain"][-1] != "A" else "B")
    return {
        "chat": (environ(chat, tokens["plain"], REQUEST_BODY), "200 OK"),
        "chat, allow-list": (environ(chat, tokens["allow_list"], REQUEST_BODY), "200 OK"),
        "chat, rpm + quota": (environ(chat, tokens["limits"], REQUEST_BODY), "200 OK"),
        "chat, 12 KB body": (environ(chat, tokens["plain"], LONG_BODY), "200 OK"),
        "stream + include_usage": (environ(chat, tokens["plain"], STREAM_BODY), "200 OK"),
        "ollama /api/chat": (environ("/api/chat", tokens["plain"], OLLAMA_BODY), "200 OK"),
        "wrong key (401)": (environ(chat, wrong, REQUEST_BODY), "401 Unauthorized"),
    }


def caller(gate: Gate, env: dict[str, Any], expected: str) -> Callable[[], None]:
    seen: list[str] = []

    def start_response(status: str, headers: list[tuple[str, str]]) -> None:
        seen.append(status)

    def call() -> None:
        gate(dict(env), start_response)  # a fresh environ, as the server makes for each request

    call()
    if seen[0] != expected:
        raise SystemExit(f"gate answered {seen[0]}, expected {expected}")
    seen.clear()
    return call


def main() -> int:
    profile = sys.argv[2] if len(sys.argv) > 2 and sys.argv[1] == "--profile" else None
    with tempfile.TemporaryDirectory() as tmp:
        gate, tokens = make_gate(Path(tmp))
        cases = shapes(tokens)
        if profile:
            call = caller(gate, *cases[profile])
            profiler = cProfile.Profile()
            profiler.runcall(lambda: [call() for _ in range(CALLS * 4)])
            pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
            return 0
        print(f"\ngate decision CPU, in-process (process CPU time, best of {REPEAT} x {CALLS} calls of Gate.__call__)")
        for name, (env, expected) in cases.items():
            call = caller(gate, env, expected)
            best = min(timeit.repeat(call, number=CALLS, repeat=REPEAT, timer=time.process_time)) / CALLS
            print(f"  {name:<24} {best * 1e6:6.2f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
