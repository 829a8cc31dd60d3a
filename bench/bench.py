"""Bastion vs. bare nginx: throughput and latency of small non-streamed chat completions (`make bench`).

One run starts, on free ports and in a temporary directory:

* a fake upstream: a private nginx answering every request with a fixed chat completion (never the bottleneck);
* bare nginx: a private nginx proxying everything to the fake upstream, with the proxy settings Bastion uses
  for pools (keepalive 32, HTTP/1.1, no buffering);
* Bastion: `bastion up` (via the tests' `Stack` helper) with one pool on the fake upstream and one key, with
  token metering (njs) and, as "no metering", without (BASTION_NJS_MODULE=off), both running; after the measured
  runs, METERING_ROUNDS more throughput runs of each, taking turns, go into the metering ratio;
* gate only: a private nginx proxying to Bastion's gate socket with X-Accel-Redirect ignored, which shows what
  nginx + gate cost without the second hop to the pool.

wrk sends `POST /v1/chat/completions` (bench/post.lua) to each target: a warm-up, a throughput run at 32
connections and a latency run at 4 connections. During the throughput run the CPU time of every process is
counted ("other" is whatever else the machine did: interrupts, and other programs, which make a run unreliable);
after the load the RSS is sampled. A table is printed, with whether the targets are met (>= 0.4x bare throughput
at 32 connections, <= 1 ms added p50 latency at 4 connections, metering costing <= 10 % of throughput).

Environment: BENCH_SECONDS (length of each measured run, default 10), BENCH_WARMUP (default 2).
Exit status: 0 after a measurement whatever the numbers, 1 when something failed to start or answer.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.conftest import Stack  # noqa: E402

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
WRK = shutil.which("wrk") or "/usr/bin/wrk"
LUA_SCRIPT = Path(__file__).with_name("post.lua")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

SECONDS = int(os.environ.get("BENCH_SECONDS", "10"))
WARMUP_SECONDS = int(os.environ.get("BENCH_WARMUP", "2"))
THROUGHPUT_CONNECTIONS = 32
LATENCY_CONNECTIONS = 4
TARGET_RATIO = 0.4  # issue 13 (it was 0.3 before)
METERING_ROUNDS = 2  # more runs without and with token metering, after the measured ones
TARGET_ADDED_P50_MS = 1.0
TARGET_METERING = 0.9  # issue 9: token metering may cost at most 10 % of throughput

MODEL = "bench-model"
API_PATH = "/v1/chat/completions"
REQUEST_BODY = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
                          separators=(",", ":")).encode()
COMPLETION = ('{"id":"x","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant",'
              '"content":"hi"},"finish_reason":"stop"}]}')
MODELS = f'{{"object":"list","data":[{{"id":"{MODEL}","object":"model"}}]}}'

Groups = dict[str, list[int]]  # role -> pids


class BenchError(RuntimeError):
    """Something did not start or did not answer as expected; the run is void."""


# --- processes ---------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def proc_stat(pid: int) -> list[str]:
    """Fields of /proc/<pid>/stat after the command name (state, ppid, ...); empty if the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return []
    return stat[stat.rindex(")") + 2 :].split()


def parent_pids() -> dict[int, int]:
    """pid -> ppid of every process."""
    result = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := proc_stat(int(entry.name))):
            result[int(entry.name)] = int(fields[1])
    return result


def descendants(pid: int, parents: dict[int, int]) -> list[int]:
    """`pid` and every process below it."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(child for child, parent in parents.items() if parent == current)
    return found


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = proc_stat(pid)
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS if fields else 0.0


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


def worker_user() -> str:
    """As root, nginx would run its workers as `nobody`, which cannot enter the 0700 temporary dir (nor reach
    the gate's socket); like Bastion, run them as the current user instead."""
    if os.geteuid() != 0:
        return ""
    return f"user {pwd.getpwuid(os.getuid()).pw_name} {grp.getgrgid(os.getgid()).gr_name};\n"


def nginx_conf(prefix: Path, http_body: str, connections: int = 4096) -> str:
    """A self-contained nginx.conf: everything nginx writes stays under `prefix`."""
    temp = "\n".join(f"    {kind}_temp_path {prefix}/temp/{kind};"
                     for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return f"""{worker_user()}worker_processes auto;
worker_rlimit_nofile {connections + 256};
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{
    worker_connections {connections};
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
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, http_body: str, connections: int = 4096) -> None:
        (self.prefix / "temp").mkdir(parents=True, exist_ok=True)
        conf = self.prefix / "nginx.conf"
        conf.write_text(nginx_conf(self.prefix, http_body, connections))
        self.proc = subprocess.Popen([NGINX, "-p", f"{self.prefix}/", "-c", str(conf), "-g", "daemon off;"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"{self.name} exited ({self.proc.returncode}):\n{self.error_log()}")
            if port_open(self.port):
                return
            time.sleep(0.05)
        raise BenchError(f"{self.name} did not listen on {self.port}:\n{self.error_log()}")

    def wait_ready(self, key: str) -> None:
        try:
            wait_for_completion(self.name, self.url, key)
        except BenchError as e:
            raise BenchError(f"{e}\n{self.error_log()}") from None

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
    """Until `base` answers the benchmark request with a 200."""
    deadline = time.monotonic() + timeout
    status, body = 0, b""
    while time.monotonic() < deadline:
        status, body = post_completion(base, key)
        if status == 200:
            return
        time.sleep(0.1)
    raise BenchError(f"{name} did not answer {API_PATH} with 200 (last: {status} {body[:300]!r})")


@contextmanager
def bastion_stack(root: Path, upstream_url: str, metering: bool = True) -> Iterator[tuple[Stack, str]]:
    """`bastion up` with one pool on the fake upstream (with token metering, when nginx has njs, or without);
    yields the stack and a key."""
    root.mkdir(exist_ok=True)
    stack = Stack(root / "data")
    saved = os.environ.get("BASTION_NJS_MODULE")
    try:
        try:
            if not metering:
                os.environ["BASTION_NJS_MODULE"] = "off"
            stack.start()
        except RuntimeError as e:
            raise BenchError(str(e)) from e
        finally:
            if saved is None:
                os.environ.pop("BASTION_NJS_MODULE", None)
            else:
                os.environ["BASTION_NJS_MODULE"] = saved
        stack.cli("pools", "add", "bench", "--url", upstream_url, "--models", MODEL)
        key = stack.key("bench")
        time.sleep(0.5)  # the gate looks at the snapshot at most every 0.25 s
        wait_for_completion("Bastion", stack.base, key)
        yield stack, key
    finally:
        stack.stop()


def bastion_groups(stack: Stack) -> Groups:
    """The stack's processes by role: each direct child of the supervisor with everything below it."""
    if not stack.proc or stack.proc.poll() is not None:
        return {}
    parents = parent_pids()
    groups: Groups = {"supervisor": [stack.proc.pid]}
    for child in (pid for pid, parent in parents.items() if parent == stack.proc.pid):
        command = cmdline(child)
        role = next((role for needle, role in (("nginx", "nginx"), ("authsvc.server", "gate"), ("gunicorn", "gunicorn"))
                     if needle in command), "other")
        groups.setdefault(role, []).extend(descendants(child, parents))
    return groups


def gate_socket(stack: Stack) -> Path:
    return stack.data_dir.resolve() / "run" / "authsvc.sock"


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
        raise BenchError(f"unknown wrk duration {value!r}")
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
    cpu: dict[str, float]  # role -> % of one core during the throughput run


def machine_busy_seconds() -> float:
    """CPU time all cores spent busy so far (everything in /proc/stat's cpu line but idle and iowait)."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / CLOCK_TICKS


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def throughput_with_cpu(url: str, key: str, groups: Groups) -> tuple[WrkResult, dict[str, float]]:
    """The 32-connection run, and how much CPU each group of processes (and wrk itself) used meanwhile."""
    before = {role: sum(cpu_seconds(p) for p in pids) for role, pids in groups.items()}
    wrk_before, busy_before, started = children_cpu_seconds(), machine_busy_seconds(), time.monotonic()
    result = wrk(url, key, 2, THROUGHPUT_CONNECTIONS, SECONDS)
    elapsed = time.monotonic() - started
    cpu = {role: 100 * (sum(cpu_seconds(p) for p in groups[role]) - spent) / elapsed
           for role, spent in before.items()}
    cpu["wrk"] = 100 * (children_cpu_seconds() - wrk_before) / elapsed
    # interrupts and anything else running on the machine (other programs make the numbers unreliable)
    cpu["other"] = 100 * (machine_busy_seconds() - busy_before) / elapsed - sum(cpu.values())
    return result, cpu


def measure(name: str, url: str, key: str, groups: Groups) -> Measurement:
    print(f"  {name}: warm-up {WARMUP_SECONDS} s, {THROUGHPUT_CONNECTIONS} connections {SECONDS} s, "
          f"{LATENCY_CONNECTIONS} connections {SECONDS} s", flush=True)
    wrk(url, key, 2, THROUGHPUT_CONNECTIONS, WARMUP_SECONDS)
    throughput, cpu = throughput_with_cpu(url, key, groups)
    latency = wrk(url, key, 1, LATENCY_CONNECTIONS, SECONDS, latency=True)
    return Measurement(throughput, latency, cpu)


# --- report ------------------------------------------------------------------------------------------------


def fmt_ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def print_results(results: dict[str, Measurement]) -> None:
    print(f"\nresults (req/s at {THROUGHPUT_CONNECTIONS} connections; latency in ms at {LATENCY_CONNECTIONS} "
          "connections; errors = non-2xx + socket errors)")
    print(f"  {'target':<12} {'req/s':>10} {'p50 ms':>9} {'p99 ms':>9} {'errors':>8}")
    for name, m in results.items():
        errors = m.throughput.errors + m.latency.errors
        print(f"  {name:<12} {m.throughput.rps:>10.0f} {fmt_ms(m.latency.p50_ms):>9} "
              f"{fmt_ms(m.latency.p99_ms):>9} {errors:>8}")
    print(f"\nCPU during the {THROUGHPUT_CONNECTIONS}-connection run (% of one core; {os.cpu_count()} cores)")
    for name, m in results.items():
        print(f"  {name:<12} " + ", ".join(f"{role} {pct:.0f}" for role, pct in m.cpu.items()))


def print_rss(rss: dict[str, dict[str, int]]) -> None:
    print("\nRSS after the load (MiB)")
    for name, roles in rss.items():
        detail = ", ".join(f"{role} {kib / 1024:.1f}" for role, kib in roles.items())
        print(f"  {name:<12} total {sum(roles.values()) / 1024:6.1f}   ({detail})")


def cpu_us_per_request(m: Measurement, role: str) -> float:
    """CPU of a role during a throughput run, per request served, in µs."""
    requests = m.throughput.rps * SECONDS
    return m.cpu.get(role, 0.0) / 100 * SECONDS / requests * 1e6 if requests else 0.0


def print_targets(bare: Measurement, bastion: Measurement, metering_pairs: list[tuple[float, float]],
                  gate_only: Measurement) -> None:
    """`metering_pairs`: req/s without and with token metering, run after run."""
    ratio = bastion.throughput.rps / bare.throughput.rps if bare.throughput.rps else 0.0
    without = sum(w for w, _ in metering_pairs)
    metering = sum(m for _, m in metering_pairs) / without if without else 0.0

    def us_per_request(role: str) -> float:  # CPU of a role in the Bastion run, per request
        return cpu_us_per_request(bastion, role)

    added_p50 = (bastion.latency.p50_ms or 0.0) - (bare.latency.p50_ms or 0.0)
    added_p99 = (bastion.latency.p99_ms or 0.0) - (bare.latency.p99_ms or 0.0)
    print(f"\nthroughput ratio Bastion/bare: {ratio:.3f}")
    print(f"added latency at {LATENCY_CONNECTIONS} connections: p50 {added_p50:.3f} ms, p99 {added_p99:.3f} ms")
    runs = ", ".join(f"{w:.0f}/{m:.0f}" for w, m in metering_pairs)
    print(f"throughput ratio with token metering / without: {metering:.3f} (req/s without/with, taking turns: {runs})")
    print(f"CPU per request: gate {us_per_request('gate'):.1f} us, nginx {us_per_request('nginx'):.1f} us "
          f"(both hops), supervisor {us_per_request('supervisor'):.1f} us (usage ingestion of the log line, and the "
          f"rest of its work); gate only: gate {cpu_us_per_request(gate_only, 'gate'):.1f} us "
          f"(bench/gate_micro.py gives the gate's own code alone)")
    print("\ntargets")
    print(f"  throughput >= {TARGET_RATIO}x bare nginx at {THROUGHPUT_CONNECTIONS} connections: "
          f"{'MET' if ratio >= TARGET_RATIO else 'NOT MET'} ({ratio:.3f}x)")
    print(f"  added p50 <= {TARGET_ADDED_P50_MS} ms at {LATENCY_CONNECTIONS} connections: "
          f"{'MET' if added_p50 <= TARGET_ADDED_P50_MS else 'NOT MET'} ({added_p50:.3f} ms)")
    print(f"  token metering costs <= {1 - TARGET_METERING:.0%} of throughput: "
          f"{'MET' if metering >= TARGET_METERING else 'NOT MET'} ({metering:.3f}x)")


def print_machine() -> None:
    nginx_version = subprocess.run([NGINX, "-v"], capture_output=True, text=True).stderr.strip()
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"machine: {os.cpu_count()} CPUs, {nginx_version}, "
          f"python {sys.version.split()[0]}; load average before the run {load}; runs of {SECONDS} s", flush=True)


# --- main --------------------------------------------------------------------------------------------------


def rss_by_role(groups: Groups) -> dict[str, int]:
    return {role: sum(rss_kib(p) for p in pids) for role, pids in groups.items()}


def start_nginx(cleanup: ExitStack, name: str, prefix: Path, body: Callable[[int], str]) -> PrivateNginx:
    server = PrivateNginx(name, prefix)
    cleanup.callback(server.stop)
    server.start(body(server.port))
    return server


def run(tmp: Path) -> None:
    with ExitStack() as cleanup:
        upstream = start_nginx(cleanup, "fake upstream", tmp / "upstream", fake_upstream_body)
        bare = start_nginx(cleanup, "bare nginx", tmp / "bare",
                           lambda port: proxy_body(port, f"127.0.0.1:{upstream.port}"))
        bare.wait_ready("none")
        upstream_group = {"upstream": upstream.pids()}
        print("measuring...", flush=True)
        results = {"bare nginx": measure("bare nginx", bare.url, "none", {"nginx": bare.pids(), **upstream_group})}
        plain, plain_key = cleanup.enter_context(bastion_stack(tmp / "plain", upstream.url, metering=False))
        results["no metering"] = measure("Bastion without token metering", plain.base, plain_key,
                                         {**bastion_groups(plain), **upstream_group})
        print("starting Bastion...", flush=True)
        stack, key = cleanup.enter_context(bastion_stack(tmp, upstream.url))
        gate = start_nginx(cleanup, "gate-only nginx", tmp / "gate", lambda port: proxy_body(
            port, f"unix:{gate_socket(stack)}", "\n            proxy_ignore_headers X-Accel-Redirect;"))
        gate.wait_ready(key)
        stack_groups = bastion_groups(stack)
        results["Bastion"] = measure("Bastion", stack.base, key, {**stack_groups, **upstream_group})
        results["gate only"] = measure("gate only", gate.url, key,
                                       {"nginx": gate.pids(), "gate": stack_groups.get("gate", [])})
        # the VM's speed drifts between runs: more runs without and with metering, taking turns, so the ratio
        # compares the two under the same conditions on average
        pairs = [(results["no metering"].throughput.rps, results["Bastion"].throughput.rps)]
        for _ in range(METERING_ROUNDS):
            pairs.append((wrk(plain.base, plain_key, 2, THROUGHPUT_CONNECTIONS, SECONDS).rps,
                          wrk(stack.base, key, 2, THROUGHPUT_CONNECTIONS, SECONDS).rps))
        print_results(results)
        print_rss({"bare nginx": rss_by_role({"nginx": bare.pids()}), "Bastion": rss_by_role(bastion_groups(stack))})
        print_targets(results["bare nginx"], results["Bastion"], pairs, results["gate only"])


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
