"""Bastion vs. bare nginx: throughput and latency of small non-streamed chat completions (`make bench`).

One run starts, on free ports and in a temporary directory:

* a fake upstream: a private nginx answering every request with a fixed chat completion (never the bottleneck);
* bare nginx: a private nginx proxying everything to the fake upstream, with the proxy settings Bastion uses
  for pools (keepalive 32, HTTP/1.1, no buffering);
* Bastion: `bastion up` (via the tests' `Stack` helper) with one pool pointing at the fake upstream and one key;
* gate only: a private nginx proxying to Bastion's gate socket with X-Accel-Redirect ignored, which shows the
  cost of nginx + gate without the second hop to the pool.

wrk then sends `POST /v1/chat/completions` (bench/post.lua) to each target: a warm-up, a throughput run at
32 connections and a latency run at 4 connections. Afterwards the RSS of every process is sampled and a table
is printed, together with whether the targets are met (>= 0.3x bare throughput at 32 connections, <= 1 ms
added p50 latency at 4 connections).

Environment: BENCH_SECONDS (length of each measured run, default 10), BENCH_WARMUP (default 2).
Exit status: 0 after a measurement whatever the numbers, 1 when something failed to start or answer.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.conftest import Stack  # noqa: E402

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
WRK = shutil.which("wrk") or "/usr/bin/wrk"
LUA_SCRIPT = Path(__file__).with_name("post.lua")

SECONDS = int(os.environ.get("BENCH_SECONDS", "10"))
WARMUP_SECONDS = int(os.environ.get("BENCH_WARMUP", "2"))
THROUGHPUT_CONNECTIONS = 32
LATENCY_CONNECTIONS = 4
TARGET_RATIO = 0.3
TARGET_ADDED_P50_MS = 1.0

MODEL = "bench-model"
API_PATH = "/v1/chat/completions"
REQUEST_BODY = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
                          separators=(",", ":")).encode()
COMPLETION = ('{"id":"x","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant",'
              '"content":"hi"},"finish_reason":"stop"}]}')
MODELS = f'{{"object":"list","data":[{{"id":"{MODEL}","object":"model"}}]}}'


class BenchError(RuntimeError):
    """Something did not start or did not answer as expected; the run is void."""


# --- processes ---------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parent_pids() -> dict[int, int]:
    """pid -> ppid of every process (from /proc/<pid>/stat)."""
    result = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # fields after the ")" that ends the command name: state, ppid, ...
        result[int(entry.name)] = int(stat[stat.rindex(")") + 2 :].split()[1])
    return result


def descendants(pid: int, parents: dict[int, int]) -> list[int]:
    """`pid` and every process below it."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(child for child, parent in parents.items() if parent == current)
    return found


def rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGQUIT, timeout: float = 10) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# --- private nginx instances -------------------------------------------------------------------------------


def nginx_conf(prefix: Path, http_body: str) -> str:
    """A self-contained nginx.conf: everything nginx writes stays under `prefix`."""
    temp = "\n".join(f"    {kind}_temp_path {prefix}/temp/{kind};"
                     for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return f"""worker_processes auto;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{
    worker_connections 4096;
}}
http {{
    access_log off;
    server_tokens off;
    tcp_nodelay on;
{temp}
{http_body}
}}
"""


def fake_upstream_body(port: int) -> str:
    return f"""    server {{
        listen 127.0.0.1:{port};
        default_type application/json;
        keepalive_requests 100000;
        location = /v1/models {{
            return 200 '{MODELS}';
        }}
        location / {{
            return 200 '{COMPLETION}';
        }}
    }}"""


def proxy_body(port: int, server: str, extra: str = "") -> str:
    """nginx proxying everything to `server` with the settings Bastion uses for pools."""
    return f"""    upstream target {{
        server {server};
        keepalive 32;
    }}
    server {{
        listen 127.0.0.1:{port};
        keepalive_requests 100000;
        location / {{
            proxy_pass http://target;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;{extra}
        }}
    }}"""


@dataclass
class PrivateNginx:
    name: str
    prefix: Path
    port: int
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, http_body: str) -> None:
        (self.prefix / "temp").mkdir(parents=True, exist_ok=True)
        conf = self.prefix / "nginx.conf"
        conf.write_text(nginx_conf(self.prefix, http_body))
        self.proc = subprocess.Popen([NGINX, "-p", f"{self.prefix}/", "-c", str(conf), "-g", "daemon off;"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"{self.name} nginx exited ({self.proc.returncode}):\n{self.error_log()}")
            if port_open(self.port):
                return
            time.sleep(0.05)
        raise BenchError(f"{self.name} nginx did not listen on {self.port}:\n{self.error_log()}")

    def error_log(self) -> str:
        try:
            return (self.prefix / "error.log").read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc:
            stop_process(self.proc)

    def pids(self) -> list[int]:
        return descendants(self.proc.pid, parent_pids()) if self.proc and self.proc.poll() is None else []


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


# --- Bastion -----------------------------------------------------------------------------------------------


def post_completion(base: str, key: str) -> tuple[int, bytes]:
    req = urllib.request.Request(base + API_PATH, data=REQUEST_BODY, method="POST",
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError as e:
        return 0, str(e).encode()


def wait_for_completion(name: str, base: str, key: str, timeout: float = 15) -> None:
    """Until `base` answers the benchmark request with the fake upstream's completion."""
    deadline = time.monotonic() + timeout
    status, body = 0, b""
    while time.monotonic() < deadline:
        status, body = post_completion(base, key)
        if status == 200:
            return
        time.sleep(0.1)
    raise BenchError(f"{name} did not answer {API_PATH} with 200 (last: {status} {body[:300]!r})")


@contextmanager
def bastion_stack(root: Path, upstream_url: str) -> Iterator[tuple[Stack, str]]:
    """`bastion up` with one pool on the fake upstream; yields the stack and a key."""
    stack = Stack(root / "data")
    try:
        try:
            stack.start()
        except RuntimeError as e:
            raise BenchError(str(e)) from e
        stack.cli("pools", "add", "bench", "--url", upstream_url, "--models", MODEL)
        key = stack.key("bench")
        time.sleep(0.5)  # the gate looks at the snapshot at most every 0.25 s
        wait_for_completion("Bastion", stack.base, key)
        yield stack, key
    finally:
        stack.stop()


def bastion_rss(stack: Stack) -> dict[str, int]:
    """RSS (KiB) of the stack by role: each direct child of the supervisor and everything below it."""
    if not stack.proc or stack.proc.poll() is not None:
        return {}
    parents = parent_pids()
    roles = {"supervisor": rss_kib(stack.proc.pid)}
    for child in (pid for pid, parent in parents.items() if parent == stack.proc.pid):
        command = cmdline(child)
        role = next((r for r in ("nginx", "granian", "gunicorn") if r in command), "other")
        roles[role] = roles.get(role, 0) + sum(rss_kib(pid) for pid in descendants(child, parents))
    return roles


# --- wrk ---------------------------------------------------------------------------------------------------


@dataclass
class WrkResult:
    rps: float
    requests: int
    errors: int
    p50_ms: float | None = None
    p99_ms: float | None = None


UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}


def to_ms(value: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", value)
    if not m:
        raise ValueError(f"unknown wrk duration {value!r}")
    return float(m.group(1)) * UNIT_MS[m.group(2)]


def parse_wrk(output: str) -> WrkResult:
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.M)
    total = re.search(r"^\s*(\d+) requests in", output, re.M)
    if not rps or not total:
        raise BenchError(f"cannot parse wrk output:\n{output}")
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", output))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    result = WrkResult(float(rps.group(1)), int(total.group(1)), errors + (int(non2xx.group(1)) if non2xx else 0))
    for percent, attr in (("50", "p50_ms"), ("99", "p99_ms")):
        m = re.search(rf"^\s+{percent}%\s+(\S+)", output, re.M)
        if m:
            setattr(result, attr, to_ms(m.group(1)))
    return result


def wrk(url: str, key: str, threads: int, connections: int, seconds: int, latency: bool = False) -> WrkResult:
    argv = [WRK, "-t", str(threads), "-c", str(connections), "-d", f"{seconds}s", "-s", str(LUA_SCRIPT)]
    if latency:
        argv.append("--latency")
    proc = subprocess.run([*argv, url + API_PATH], capture_output=True, text=True,
                          env={**os.environ, "BENCH_KEY": key}, timeout=seconds + 60)
    if proc.returncode != 0:
        raise BenchError(f"wrk failed ({proc.returncode}): {proc.stderr or proc.stdout}")
    return parse_wrk(proc.stdout)


@dataclass
class Measurement:
    throughput: WrkResult
    latency: WrkResult


def measure(name: str, url: str, key: str) -> Measurement:
    print(f"  {name}: warm-up {WARMUP_SECONDS} s, {THROUGHPUT_CONNECTIONS} connections {SECONDS} s, "
          f"{LATENCY_CONNECTIONS} connections {SECONDS} s", flush=True)
    wrk(url, key, 2, THROUGHPUT_CONNECTIONS, WARMUP_SECONDS)
    throughput = wrk(url, key, 2, THROUGHPUT_CONNECTIONS, SECONDS)
    latency = wrk(url, key, 1, LATENCY_CONNECTIONS, SECONDS, latency=True)
    return Measurement(throughput, latency)


# --- report ------------------------------------------------------------------------------------------------


def fmt_ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def print_report(results: dict[str, Measurement], rss: dict[str, dict[str, int]]) -> None:
    print("\nresults (req/s at 32 connections; latency in ms at 4 connections; errors = non-2xx + socket errors)")
    print(f"  {'target':<12} {'req/s':>10} {'p50 ms':>9} {'p99 ms':>9} {'errors':>8}")
    for name, m in results.items():
        errors = m.throughput.errors + m.latency.errors
        print(f"  {name:<12} {m.throughput.rps:>10.0f} {fmt_ms(m.latency.p50_ms):>9} "
              f"{fmt_ms(m.latency.p99_ms):>9} {errors:>8}")
    bare, bastion = results["bare nginx"], results["Bastion"]
    ratio = bastion.throughput.rps / bare.throughput.rps if bare.throughput.rps else 0.0
    added_p50 = (bastion.latency.p50_ms or 0.0) - (bare.latency.p50_ms or 0.0)
    added_p99 = (bastion.latency.p99_ms or 0.0) - (bare.latency.p99_ms or 0.0)
    print(f"\n  throughput ratio Bastion/bare: {ratio:.3f}")
    print(f"  added p50 latency: {added_p50:.3f} ms   added p99 latency: {added_p99:.3f} ms")
    print("\nRSS after the load (MiB)")
    for name, roles in rss.items():
        detail = ", ".join(f"{role} {kib / 1024:.1f}" for role, kib in roles.items())
        print(f"  {name:<12} total {sum(roles.values()) / 1024:6.1f}   ({detail})")
    print("\ntargets")
    print(f"  throughput >= {TARGET_RATIO}x bare nginx at {THROUGHPUT_CONNECTIONS} connections: "
          f"{'MET' if ratio >= TARGET_RATIO else 'NOT MET'} ({ratio:.3f}x)")
    print(f"  added p50 <= {TARGET_ADDED_P50_MS} ms at {LATENCY_CONNECTIONS} connections: "
          f"{'MET' if added_p50 <= TARGET_ADDED_P50_MS else 'NOT MET'} ({added_p50:.3f} ms)")


def print_machine() -> None:
    nginx_version = subprocess.run([NGINX, "-v"], capture_output=True, text=True).stderr.strip()
    print(f"machine: {os.cpu_count()} CPUs, {nginx_version}, granian {importlib.metadata.version('granian')}, "
          f"python {sys.version.split()[0]}")


# --- main --------------------------------------------------------------------------------------------------


def run(tmp: Path) -> None:
    with ExitStack() as cleanup:
        upstream = PrivateNginx("fake upstream", tmp / "upstream", free_port())
        cleanup.callback(upstream.stop)
        upstream.start(fake_upstream_body(upstream.port))

        bare = PrivateNginx("bare", tmp / "bare", free_port())
        cleanup.callback(bare.stop)
        bare.start(proxy_body(bare.port, f"127.0.0.1:{upstream.port}"))
        wait_for_completion("bare nginx", bare.url, "none")

        print("starting Bastion...", flush=True)
        stack, key = cleanup.enter_context(bastion_stack(tmp, upstream.url))

        gate = PrivateNginx("gate only", tmp / "gate", free_port())
        cleanup.callback(gate.stop)
        gate_socket = stack.data_dir.resolve() / "run" / "authsvc.sock"
        gate.start(proxy_body(gate.port, f"unix:{gate_socket}", "\n            proxy_ignore_headers X-Accel-Redirect;"))
        wait_for_completion("gate-only nginx", gate.url, key)

        print("measuring...", flush=True)
        results = {
            "bare nginx": measure("bare nginx", bare.url, key),
            "Bastion": measure("Bastion", stack.base, key),
            "gate only": measure("gate only", gate.url, key),
        }
        rss = {"bare nginx": {"nginx": sum(rss_kib(p) for p in bare.pids())}, "Bastion": bastion_rss(stack)}
        print_report(results, rss)


def main() -> int:
    for tool in (NGINX, WRK):
        if not Path(tool).exists():
            print(f"error: {tool} is not installed", file=sys.stderr)
            return 1
    print_machine()
    try:
        with tempfile.TemporaryDirectory(prefix="bastion-bench-") as tmp:
            run(Path(tmp))
    except (BenchError, subprocess.SubprocessError, AssertionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
