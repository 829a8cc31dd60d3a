"""A/B of nginx.conf variants on a running Bastion stack: nginx worker CPU µs per request (issue 13).

Starts what bench/bench.py starts (a fake upstream, `bastion up` with one pool and one key), copies the live
generation (nginx.conf, public.conf, meter.js) once per variant, edits each copy with a function below, and
runs each copy as a private nginx (own port, pid and logs; same gate socket, same pool). wrk then loads the
variants in turn, round after round (the machine is shared: interleaving spreads other programs' load over all
variants), and the CPU time of each variant's nginx workers and of the gate over each run is read from /proc.
Printed per variant: the median over rounds of nginx µs/request, gate µs/request and req/s.

Usage: .venv/bin/python bench/nginx_ab.py [VARIANT ...]   (default: all; `live` is always measured); the
gate variants `gate_same`, `gate_canned`, `gate_canned_no_njs` and `bare` (bench.py's bare nginx, for a ratio
of req/s measured in the same rounds) are measured only when named.
Environment: AB_ROUNDS (default 5), AB_SECONDS (default 4), AB_CONNECTIONS (default 32); AB_LUA (a wrk script
instead of bench/post.lua, e.g. bench/post_sdk.lua); AB_BASELINE (a checkout whose nginx_templates the variant
`main_templates` renders with, for before/after); AB_PERF=DIR (after the rounds, a `perf record` of each
variant's workers, reports in DIR).
Not part of `make bench`: a tool to find what each directive costs.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench
from authsvc.keys import key_id_of

PERF = "/usr/bin/perf"
ROUNDS = int(os.environ.get("AB_ROUNDS", "5"))
SECONDS = int(os.environ.get("AB_SECONDS", "4"))
CONNECTIONS = int(os.environ.get("AB_CONNECTIONS", "32"))

Conf = tuple[str, str]  # nginx.conf, public.conf


def drop(text: str, *patterns: str) -> str:
    """`text` without the lines matching any of the regexes."""
    return "\n".join(line for line in text.splitlines() if not any(re.search(p, line) for p in patterns)) + "\n"


def no_njs(c: Conf) -> Conf:
    main = re.sub(r"js_(?:set|var) \$(\w+)[^;]*;", r'map "" $\1 { default ""; }', c[0])
    main = drop(main, r"^load_module", r"^\s*js_")
    main = main.replace("map $http_content_length$http_transfer_encoding $bastion_body_length {\n"
                        "        \"\" \"\";\n        default $proxy_internal_body_length;\n    }\n", "")
    return main, drop(c[1], r"^\s*js_", r"proxy_set_body", r"Content-Length \$bastion_body_length")


def no_filters(c: Conf) -> Conf:
    """njs loaded, the request body still through meter.requestBody, no header/body filters."""
    return c[0], drop(c[1], r"^\s*js_header_filter", r"^\s*js_body_filter")


def no_set_body(c: Conf) -> Conf:
    """The filters kept, the body sent as nginx read it (no js_set per request)."""
    return c[0], drop(c[1], r"proxy_set_body", r"Content-Length \$bastion_body_length")


TRIVIAL_METER = """function header(r) {}
function body(r, data, flags) { r.sendBuffer(data, flags); }
function outcome(r) { return ""; }
function requestBody(r) { var t = r.requestText; return t === undefined ? "" : t; }
export default {header, body, outcome, requestBody};
"""


def njs_trivial(c: Conf) -> Conf:
    """njs as live, with a meter.js whose functions do nothing (written by start_variant): the VM's own cost."""
    return c


def njs_trivial_globals(c: Conf) -> Conf:
    """njs as live, meter.js whole (its globals and functions defined) but exporting functions that do nothing:
    what defining meter.js's top level costs each request's VM, against njs_trivial."""
    return c


def njs_trivial_functions(c: Conf) -> Conf:
    """njs_trivial plus 40 unused top-level functions: what each function declaration costs a request's VM."""
    return c


def njs_trivial_vars(c: Conf) -> Conf:
    """njs_trivial plus 40 top-level variables (two of them arrays): what meter.js's state costs a request's VM."""
    return c


def log_buffered(c: Conf) -> Conf:
    """The access log written through a 64 KiB buffer flushed every second instead of one write per line."""
    return c[0], c[1].replace("if=$bastion_log_line;", "if=$bastion_log_line buffer=64k flush=1s;")


def no_limit_conn(c: Conf) -> Conf:
    return c[0], drop(c[1], r"^\s*limit_conn ")


HEADERS = {"key": "x_bastion_key", "model": "x_bastion_model", "chain": "x_bastion_fallback",
           "usage": "x_bastion_usage", "tl_limit": "x_ratelimit_limit_tokens",
           "tl_remaining": "x_ratelimit_remaining_tokens", "tl_reset": "x_ratelimit_reset_tokens",
           "rl_limit": "x_ratelimit_limit_requests", "rl_remaining": "x_ratelimit_remaining_requests",
           "rl_reset": "x_ratelimit_reset_requests", "parallel": "x_bastion_parallel",
           "body_edits": "x_bastion_edit", "public_model": "x_bastion_public_model"}


def no_capture_maps(c: Conf) -> Conf:
    """The pool location reads $upstream_http_* directly, without the $bastion_hop maps."""
    return c[0], re.sub(r"\$bastion_gate_(\w+);", lambda m: f"$upstream_http_{HEADERS[m.group(1)]};", c[1])


def no_unused_captures(c: Conf) -> Conf:
    """Only the captures this request uses (key, model, parallel): no chain, limits, usage, edits, alias."""
    pub = re.sub(r"(set \$bastion_\w+) \$bastion_gate_(chain|usage|tl_\w+|rl_\w+|body_edits|public_model);",
                 r'\1 "";', c[1])
    return c[0], drop(pub, r"add_header x-ratelimit")


def no_ratelimit_headers(c: Conf) -> Conf:
    return c[0], drop(c[1], r"add_header x-ratelimit")


def no_timing_headers(c: Conf) -> Conf:
    return c[0], drop(c[1], r"add_header X-Process-Time", r"add_header Server-Timing")


def no_request_id_header(c: Conf) -> Conf:
    return c[0], drop(c[1], r"add_header X-Request-ID")


def no_add_header(c: Conf) -> Conf:
    return c[0], drop(c[1], r"add_header ")


def no_rewrite(c: Conf) -> Conf:
    return c[0], drop(c[1], r"^\s*rewrite ")


def no_access_log(c: Conf) -> Conf:
    return drop(c[0], r"^\s*access_log .* bastion;"), re.sub(r"access_log .* if=\$bastion_log_line;",
                                                            "access_log off;", c[1])


def no_error_pages(c: Conf) -> Conf:
    return c[0], drop(c[1], r"^\s*error_page ", r"recursive_error_pages", r"proxy_intercept_errors")


def no_hide(c: Conf) -> Conf:
    return c[0], drop(c[1], r"proxy_hide_header")


def no_gate_headers(c: Conf) -> Conf:
    """Fewer headers towards the gate: no X-Bastion-Upgrade, X-Real-IP (the gate would not see them)."""
    return c[0], drop(c[1], r"X-Bastion-Upgrade \$http_upgrade", r"proxy_set_header X-Real-IP \$remote_addr;$")


def no_sets(c: Conf) -> Conf:
    """Without the server-level `set` of the capture variables (rewrite module's per-request work)."""
    return c[0], drop(c[1], r"^        set \$bastion_(key|model|pool|hop|parallel) \"\";")


def pcre_jit(c: Conf) -> Conf:
    return c[0].replace("worker_processes auto;", "worker_processes auto;\npcre_jit on;", 1), c[1]


GATE_HEADERS = """            proxy_pass_request_headers off;
            proxy_set_header Authorization $http_authorization;
            proxy_set_header X-Api-Key $http_x_api_key;
            proxy_set_header Content-Type $content_type;
"""


def gate_headers_only(c: Conf) -> Conf:
    """Only the headers the gate reads go to it, not every header of the client."""
    return c[0], c[1].replace("            proxy_pass http://bastion_gate;\n",
                              "            proxy_pass http://bastion_gate;\n" + GATE_HEADERS, 1)


def main_templates(c: Conf) -> Conf:
    """Placeholder: start_variant renders this one with the templates of AB_BASELINE (a checkout of main)."""
    return c


def gate_only(c: Conf) -> Conf:
    """Placeholder: start_variant writes bench/bench.py's gate-only nginx (X-Accel-Redirect ignored, no pool hop)."""
    return c


def minimal(c: Conf) -> Conf:
    """Everything above at once: the floor of the two hops with this layout."""
    for f in (no_njs, no_limit_conn, no_ratelimit_headers, no_add_header, no_rewrite, no_access_log,
              no_error_pages):
        c = f(c)
    return c


VARIANTS: dict[str, Callable[[Conf], Conf]] = {
    "live": lambda c: c,
    "no_njs": no_njs,
    "no_filters": no_filters,
    "no_set_body": no_set_body,
    "njs_trivial": njs_trivial,
    "njs_trivial_globals": njs_trivial_globals,
    "njs_trivial_functions": njs_trivial_functions,
    "njs_trivial_vars": njs_trivial_vars,
    "log_buffered": log_buffered,
    "no_limit_conn": no_limit_conn,
    "no_capture_maps": no_capture_maps,
    "no_unused_captures": no_unused_captures,
    "no_ratelimit_headers": no_ratelimit_headers,
    "no_timing_headers": no_timing_headers,
    "no_request_id_header": no_request_id_header,
    "no_add_header": no_add_header,
    "no_rewrite": no_rewrite,
    "no_access_log": no_access_log,
    "no_error_pages": no_error_pages,
    "no_hide": no_hide,
    "no_gate_headers": no_gate_headers,
    "no_sets": no_sets,
    "pcre_jit": pcre_jit,
    "gate_headers_only": gate_headers_only,
    "minimal": minimal,
    "main_templates": main_templates,
    "gate_only": gate_only,
}


# gate variants: nginx.conf (live, or edited) pointed at a second gate started here: this checkout's
# authsvc.server (to try a change to the gate's code against the stack's), or bench/canned_gate.py, which answers
# every request with the same redirect: the throughput Bastion would have if the gate's own work cost nothing
SAME_GATE = ["-m", "authsvc.server", "{socket}"]
CANNED_GATE = [str(Path(__file__).with_name("canned_gate.py")), "{socket}", "bench", "{key_id}", bench.MODEL]
GATES: dict[str, tuple[list[str], Callable[[Conf], Conf]]] = {
    "gate_same": (SAME_GATE, VARIANTS["live"]),
    "gate_canned": (CANNED_GATE, VARIANTS["live"]),
    "gate_canned_no_njs": (CANNED_GATE, no_njs),
}
# `bare`: not Bastion at all, bench.py's bare nginx (proxying to the fake upstream) run with the variants, so
# that each variant's req/s has its ratio to bare nginx measured in the same rounds
BARE = "bare"


def start_gate(cleanup: ExitStack, name: str, data_dir: Path, socket: Path, key: str) -> subprocess.Popen:
    env = {**os.environ, "BASTION_DATA_DIR": str(data_dir.resolve())}
    argv = [arg.format(socket=socket, key_id=key_id_of(key)) for arg in GATES[name][0]]
    proc = subprocess.Popen([sys.executable, *argv],
                            env=env, cwd=str(bench.REPO), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    cleanup.callback(bench.stop_process, proc, signal.SIGTERM)
    deadline = time.monotonic() + 15
    while not socket.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise bench.BenchError(f"gate {name} did not start")
        time.sleep(0.05)
    return proc


def render_with(template_dir: Path, data_dir: Path, generation: int) -> dict[str, str]:
    """What the stack's current state renders to with other templates (the render input is the same)."""
    from jinja2 import FileSystemLoader

    from manager import render, render_input
    from manager.context import Bastion
    from manager.datadir import DataDir

    env = render._env.overlay(loader=FileSystemLoader(template_dir))
    context = render._context(render_input.gather(Bastion(DataDir.at(data_dir))), generation)
    files = {name: env.get_template(template).render(context) for name, template in render.FILES.items()}
    meter = template_dir / "meter.js"
    if meter.exists():
        files["meter.js"] = meter.read_text()
    return files


def live_generation(data_dir: Path) -> Path:
    return (data_dir / "nginx" / "live").resolve()


def start_variant(cleanup: ExitStack, name: str, source: Path, data_dir: Path, root: Path, public_port: int,
                  admin_port: int, edit: Callable[[Conf], Conf]) -> tuple[subprocess.Popen, int]:
    target = root / name
    shutil.copytree(source, target)
    (target / "logs").mkdir()
    port = bench.free_port()
    if edit is main_templates:
        baseline = Path(os.environ["AB_BASELINE"]) / "nginx_templates"
        for file, text in render_with(baseline, data_dir, int(source.name)).items():
            (target / file).write_text(text)
    main, public = (target / "nginx.conf").read_text(), (target / "public.conf").read_text()
    main, public = edit((main, public))
    data = str(data_dir.resolve())
    for old, new in ((f"{data}/nginx/nginx.pid", f"{target}/nginx.pid"), (f"{data}/logs/", f"{target}/logs/"),
                     (f"127.0.0.1:{public_port};", f"127.0.0.1:{port};"),
                     (f"127.0.0.1:{admin_port};", f"127.0.0.1:{bench.free_port()};")):
        main, public = main.replace(old, new), public.replace(old, new)
    (target / "nginx.conf").write_text(main)
    (target / "public.conf").write_text(public)
    if edit is gate_only:
        (target / "temp").mkdir(exist_ok=True)
        socket = data_dir.resolve() / "run" / "authsvc.sock"
        (target / "nginx.conf").write_text(bench.nginx_conf(target, bench.proxy_body(
            port, f"unix:{socket}", "\n            proxy_ignore_headers X-Accel-Redirect;")))
    if edit is njs_trivial:
        (target / "meter.js").write_text(TRIVIAL_METER)
    if edit is njs_trivial_functions:
        extra = "".join(f"function f{i}(a, b) {{ return a.indexOf(b, {i}); }}\n" for i in range(40))
        (target / "meter.js").write_text(extra + TRIVIAL_METER)
    if edit is njs_trivial_vars:
        extra = "".join(f"var v{i} = {'[]' if i < 2 else repr(str(i))};\n" for i in range(40))
        (target / "meter.js").write_text(extra + TRIVIAL_METER)
    if edit is njs_trivial_globals:
        meter = (target / "meter.js").read_text().replace("export default {header, body, outcome, requestBody};", "")
        trivial = TRIVIAL_METER.replace("function ", "function t_").replace(
            "{header, body, outcome, requestBody}", "{header: t_header, body: t_body, outcome: t_outcome, "
            "requestBody: t_requestBody}")
        (target / "meter.js").write_text(meter + trivial)
    check = subprocess.run([bench.NGINX, "-t", "-p", f"{target}/", "-c", str(target / "nginx.conf")],
                           capture_output=True, text=True)
    if check.returncode != 0:
        raise bench.BenchError(f"variant {name}: {check.stderr}")
    proc = subprocess.Popen([bench.NGINX, "-p", f"{target}/", "-c", str(target / "nginx.conf"), "-g",
                             "daemon off;"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    cleanup.callback(bench.stop_process, proc)
    deadline = time.monotonic() + 10
    while not bench.port_open(port):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise bench.BenchError(f"variant {name} did not start")
        time.sleep(0.05)
    return proc, port


def cpu(pids: list[int]) -> float:
    return sum(bench.cpu_seconds(p) for p in pids)


def switches(pids: list[int]) -> int:
    """Context switches (voluntary and not) of every thread of these processes so far."""
    total = 0
    for pid in pids:
        try:
            tasks = list(Path(f"/proc/{pid}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                for line in (task / "status").read_text().splitlines():
                    if "ctxt_switches:" in line:
                        total += int(line.split()[1])
            except OSError:
                pass
    return total


def main() -> int:
    if os.environ.get("AB_LUA"):
        bench.LUA_SCRIPT = Path(os.environ["AB_LUA"])
    names = ["live", *[n for n in sys.argv[1:] if n != "live"]] if sys.argv[1:] else list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS and n not in GATES and n != BARE]
    if unknown:
        known = [*VARIANTS, *GATES, BARE]
        print(f"unknown variants: {', '.join(unknown)}; known: {', '.join(known)}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="bastion-ab-") as tmp, ExitStack() as cleanup:
        root = Path(tmp)
        upstream = bench.start_nginx(cleanup, "fake upstream", root / "upstream", bench.fake_upstream_body)
        stack, key = cleanup.enter_context(bench.bastion_stack(root / "stack", upstream.url))
        source = live_generation(stack.data_dir)
        servers = {}
        live_gate = bench.bastion_groups(stack).get("gate", [])
        gates = {name: live_gate for name in names}
        for name in names:
            if name == BARE:
                bare = bench.start_nginx(cleanup, BARE, root / BARE,
                                         lambda port: bench.proxy_body(port, f"127.0.0.1:{upstream.port}"))
                bare.wait_ready(key)
                servers[name], gates[name] = (bare.proc, bare.url), []
                continue
            edit: Callable[[Conf], Conf] = VARIANTS.get(name, VARIANTS["live"])
            if name in GATES:
                socket = root / f"{name}.sock"
                gate_proc = start_gate(cleanup, name, stack.data_dir, socket, key)
                gates[name] = bench.descendants(gate_proc.pid, bench.parent_pids())
                live_socket = str(bench.gate_socket(stack))
                edit = (lambda new, old, then: lambda c: then((c[0].replace(old, new), c[1])))(
                    str(socket), live_socket, GATES[name][1])
            proc, port = start_variant(cleanup, name, source, stack.data_dir, root / "variants",
                                       stack.public_port, stack.admin_port, edit)
            url = f"http://127.0.0.1:{port}"
            bench.wait_for_completion(name, url, key)
            servers[name] = (proc, url)
        samples: dict[str, list[tuple[float, float, float, float]]] = {n: [] for n in names}
        for _, url in servers.values():  # warm-up
            bench.wrk(url, key, 2, CONNECTIONS, 1)
        print(f"{len(names)} variants, {ROUNDS} rounds of {SECONDS} s at {CONNECTIONS} connections", flush=True)
        for round_no in range(ROUNDS):
            order = names if round_no % 2 == 0 else names[::-1]
            for name in order:
                proc, url = servers[name]
                workers = [p for p in bench.descendants(proc.pid, bench.parent_pids()) if p != proc.pid]
                n0, g0, s0 = cpu(workers), cpu(gates[name]), switches(gates[name])
                result = bench.wrk(url, key, 2, CONNECTIONS, SECONDS)
                n1, g1, s1 = cpu(workers), cpu(gates[name]), switches(gates[name])
                if result.errors:
                    print(f"  {name}: {result.errors} errors", flush=True)
                samples[name].append(((n1 - n0) / result.requests * 1e6, (g1 - g0) / result.requests * 1e6,
                                      result.rps, (s1 - s0) / result.requests))
            print(f"  round {round_no + 1} done", flush=True)
        if os.environ.get("AB_PERF"):
            for name in names:
                proc, url = servers[name]
                workers = [p for p in bench.descendants(proc.pid, bench.parent_pids()) if p != proc.pid]
                data = root / f"{name}.perf"
                rec = subprocess.Popen([PERF, "record", "-F", "2999", "-o", str(data), "-p",
                                        ",".join(map(str, workers))], stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL)
                bench.wrk(url, key, 2, CONNECTIONS, SECONDS)
                rec.send_signal(signal.SIGINT)
                rec.wait()
                report = subprocess.run([PERF, "report", "-i", str(data), "--no-children", "--sort", "dso,sym",
                                         "--stdio"], capture_output=True, text=True).stdout
                out = Path(os.environ["AB_PERF"]) / f"{name}.txt"
                out.write_text(report)
                print(f"  perf profile of {name}: {out}", flush=True)
        base = statistics.median(s[0] for s in samples["live"])
        bare_rps = statistics.median(s[2] for s in samples[BARE]) if BARE in samples else 0.0
        print(f"\n{'variant':<22} {'nginx us/req':>13} {'vs live':>8} {'gate us/req':>12} {'req/s':>8} "
              f"{'/ bare':>7} {'gate cs/req':>11}   (medians; cs: context switches; nginx per-round values)")
        for name in names:
            ng = [s[0] for s in samples[name]]
            med, gate_med = statistics.median(ng), statistics.median(s[1] for s in samples[name])
            rps = statistics.median(s[2] for s in samples[name])
            ratio = f"{rps / bare_rps:.3f}" if bare_rps else "-"
            print(f"{name:<22} {med:>13.1f} {med - base:>+8.1f} {gate_med:>12.1f} {rps:>8.0f} {ratio:>7} "
                  f"{statistics.median(s[3] for s in samples[name]):>11.2f}   " + " ".join(f"{x:.0f}" for x in ng))
    return 0


if __name__ == "__main__":
    sys.exit(main())
