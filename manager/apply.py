"""Applying nginx configuration so nginx is never left broken (DESIGN.md §6).

render → new generation dir → `nginx -t` → atomic switch of the `live` symlink → reload → verify (new
workers, no [emerg] since the reload, /healthz reports the new generation) → on failure switch back to the
last good generation, reload, and raise with nginx's own words.
"""

from __future__ import annotations

import grp
import ipaddress
import json
import os
import pwd
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import requests

from authsvc.files import write_atomic
from manager import cidr_groups, custom_config, generations, health
from manager import settings as settings_mod
from manager.nginx import NginxError
from manager.render import render

if TYPE_CHECKING:
    from manager.context import Bastion

VERIFY_TIMEOUT = 10.0
ERROR_PAGES = [
    (413, "The request body is larger than this gateway accepts."),
    (502, "No upstream server could answer the request."),
    (503, "The service is unavailable."),
    (504, "The upstream server did not answer in time."),
    (500, "The gateway could not handle the request."),
    (403, "Your address may not use this service."),
    # nginx's own refusals of malformed requests (494: headers too large, answered as 400)
    (494, "The request headers are too large."),
    (405, "This method is not allowed here."),
    (501, "This transfer encoding is not supported."),
]
ADMIN_ERROR_PAGES = [
    (403, "Your address may not use the admin interface."),
    (413, "The request body is too large."),
    (494, "The request headers are too large."),
    (405, "This method is not allowed here."),
    (501, "This transfer encoding is not supported."),
    (502, "The management service is unavailable."),
    (504, "The management service did not answer in time; the change may still complete, check before retrying."),
]


class ConfigTestFailed(NginxError):
    """`nginx -t` refused the rendered configuration; nothing was changed."""


class ReloadFailed(NginxError):
    """nginx did not take the new configuration; the previous generation was restored."""


@dataclass(frozen=True)
class ApplyResult:
    generation: int
    changed: bool
    reloaded: bool


def resolve(host: str, port: int) -> list[str]:
    """Every address of host:port, sorted (so the rendering is stable), as nginx wants them. A name that is
    only loopback keeps its IPv4 addresses: local servers (Ollama...) usually listen on 127.0.0.1 alone."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        return []
    ips = {ipaddress.ip_address(a[0]) for *_, a in infos}
    if all(ip.is_loopback for ip in ips) and any(ip.version == 4 for ip in ips):
        ips = {ip for ip in ips if ip.version == 4}
    return sorted(f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}" for ip in ips)


def host_port(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port}"


def resolve_upstreams(bastion: Bastion, remember: bool = False) -> dict[str, list[str]]:
    """host:port -> addresses for every upstream. Hostnames are resolved here, not by nginx, so a DNS failure
    cannot stop nginx; a lookup that fails falls back to the last good answer (kept in resolved.json when
    `remember`), so a DNS hiccup during an apply does not take a working upstream out."""
    cache_file = bastion.dirs.root / "resolved.json"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    result: dict[str, list[str]] = {}
    for pool in bastion.store.table("pools").all():
        for up in pool["upstreams"]:
            key = host_port(up["url"])
            if key not in result:
                host, _, port = key.rpartition(":")
                result[key] = resolve(host, int(port)) or cache.get(key, [])
    if remember:
        write_atomic(cache_file, json.dumps({**cache, **result}, sort_keys=True).encode())
    return result


def pool_view(pool: dict[str, Any], unhealthy: set[str], resolved: dict[str, list[str]]) -> dict[str, Any]:
    servers = []
    for up in pool["upstreams"]:
        parts = urlsplit(up["url"])
        common = {"weight": up.get("weight", 1), "backup": up.get("backup", False)}
        addresses = resolved.get(host_port(up["url"])) or resolve(parts.hostname or "", parts.port or 80)
        down = up["url"] in unhealthy
        note = "failed its health checks" if down else None
        servers += [{"address": a, "down": down, "note": note, **common} for a in addresses]
        if not addresses:
            servers.append({"address": "127.0.0.1:9", "down": True,
                            "note": f"{parts.hostname} did not resolve at apply time", **common})
    first = urlsplit(pool["upstreams"][0]["url"])
    default_port = 443 if first.scheme == "https" else 80
    host = f"[{first.hostname}]" if ":" in (first.hostname or "") else first.hostname  # IPv6 literal
    host_header = host if first.port == default_port else f"{host}:{first.port}"
    return {
        "name": pool["name"],
        "method": pool.get("method", "round_robin"),
        "servers": servers,
        "scheme": first.scheme,
        "host_header": host_header,
        "tls_name": first.hostname,
        "authorization": f"Bearer {pool['api_key']}" if pool.get("api_key") else "",
        # the upstream's 401/403 to the pool's own key is the gateway's fault: 502 upstream_auth_failed
        "intercept_auth": bool(pool.get("api_key")),
        "tls_verify": pool.get("tls_verify", True),
    }


def worker_user(data_dir: Path) -> str | None:
    """Started as root, nginx would run its workers as `nobody`, which cannot reach the gate's socket in a
    private data dir; they run as the data dir's owner instead (see docs/security.md)."""
    if os.geteuid() != 0:
        return None
    st = data_dir.stat()
    return f"{pwd.getpwuid(st.st_uid).pw_name} {grp.getgrgid(st.st_gid).gr_name}"


def render_config(bastion: Bastion, generation: int, resolved: dict[str, list[str]] | None = None) -> str:
    dirs, settings = bastion.dirs, bastion.settings()
    resolved = resolve_upstreams(bastion) if resolved is None else resolved
    unhealthy = health.down_urls(bastion)
    return render(
        "nginx.conf.j2",
        generation=generation,
        worker_user=worker_user(dirs.root),
        paths={
            "pid": dirs.nginx_pid,
            "error_log": dirs.error_log,
            "access_log": dirs.access_log,
            "admin_access_log": dirs.logs / "admin-access.log",
            "temp": dirs.nginx_temp,
            "gate_socket": dirs.gate_socket,
            "manager_socket": dirs.manager_socket,
        },
        pools=[pool_view(p, unhealthy, resolved)
               for p in bastion.store.table("pools").all() if p["upstreams"]],
        public_listen=settings["public_listen"],
        admin_listen=settings["admin_listen"],
        server_name=settings["server_name"] or "_",
        trusted_proxies=settings["trusted_proxies"],
        public_access=access_rules(bastion, settings["public_cidr_groups"]),
        admin_access=access_rules(bastion, settings["admin_cidr_groups"]),
        custom_config=custom_config.renderable(settings["custom_config"], settings),
        body_limit_mb=settings["body_limit_mb"],
        read_timeout=settings["read_timeout"],
        connect_timeout=settings["connect_timeout"],
        max_fails=settings["max_fails"],
        fail_timeout=settings["fail_timeout"],
        error_pages=ERROR_PAGES,
        ca_bundle=settings["ca_bundle"],
        admin_error_pages=ADMIN_ERROR_PAGES,
        admin_body_limit_kb=settings_mod.ADMIN_BODY_LIMIT_KB,
    )


def access_rules(bastion: Bastion, group_names: list[str]) -> list[tuple[str, str]]:
    """nginx allow/deny lines for a listener: denies first, then allows, then `deny all` if anything is allowed."""
    allow, deny = cidr_groups.rules(bastion, group_names)
    return [("deny", c) for c in deny] + [("allow", c) for c in allow] + ([("deny", "all")] if allow else [])


def healthz_url(listen: str) -> str:
    host, _, port = listen.rpartition(":")
    host = {"0.0.0.0": "127.0.0.1", "[::]": "[::1]"}.get(host, host)
    return f"http://{host}:{port}/healthz"


def apply(bastion: Bastion, author: str = "cli", *, force_reload: bool = False) -> ApplyResult:
    """Render and apply the configuration; with `force_reload` a running nginx is reloaded and verified even
    when nothing changed. Raises ConfigTestFailed or ReloadFailed, in which case nothing was left changed.
    Runs under the store lock, so applies from the manager, the supervisor and the CLI never interleave."""
    resolved = resolve_upstreams(bastion, remember=True)  # DNS before taking the lock: it may be slow
    with bastion.store.transaction():
        return _apply(bastion, author, force_reload, resolved)


def _apply(bastion: Bastion, author: str, force_reload: bool, resolved: dict[str, list[str]]) -> ApplyResult:
    dirs = bastion.dirs
    dirs.ensure()
    current = generations.live(dirs)
    master = bastion.nginx.master_pid()
    unchanged = dirs.nginx_conf.exists() and dirs.nginx_conf.read_text() == render_config(bastion, current, resolved)
    if current and unchanged:
        if force_reload and master:
            _reload_and_verify(bastion, master, current)
        return ApplyResult(current, changed=False, reloaded=bool(force_reload and master))

    nxt = generations.next_number(dirs)
    text = render_config(bastion, nxt, resolved)
    conf = generations.write(dirs, nxt, text, author, generations.config_state(bastion.store))
    try:
        bastion.nginx.test(conf)
    except NginxError as e:
        generations.discard(dirs, nxt)
        raise ConfigTestFailed(e.summary, e.output) from None

    generations.switch(dirs, nxt)
    if master is None:
        generations.prune(dirs)
        return ApplyResult(nxt, changed=True, reloaded=False)
    try:
        _reload_and_verify(bastion, master, nxt)
    except Exception as e:  # whatever went wrong, nginx must end up on the last good generation
        if current:
            generations.switch(dirs, current)
            bastion.nginx.reload(master)
        generations.discard(dirs, nxt)
        if isinstance(e, ReloadFailed):
            raise
        raise ReloadFailed("the reload could not be verified; the previous configuration was restored",
                           str(e)) from e
    generations.prune(dirs)
    return ApplyResult(nxt, changed=True, reloaded=True)


def _reload_and_verify(bastion: Bastion, master: int, generation: int) -> None:
    nginx, log = bastion.nginx, bastion.dirs.error_log
    mark = _log_mark(log)
    old_workers = nginx.worker_pids(master)
    nginx.reload(master)
    url = healthz_url(bastion.settings()["public_listen"])
    deadline = time.monotonic() + VERIFY_TIMEOUT
    while time.monotonic() < deadline:
        time.sleep(0.05)
        errors = _emerg_since(log, mark)
        if errors:
            raise ReloadFailed("nginx rejected the new configuration at reload; the previous one was restored",
                               errors)
        if not nginx.worker_pids(master) - old_workers:
            continue
        try:
            if requests.get(url, timeout=1).json().get("generation") == generation:
                return
        except (requests.RequestException, ValueError):
            pass
    raise ReloadFailed("nginx did not confirm the new configuration in time; the previous one was restored",
                       _emerg_since(log, mark))


def _log_mark(log: Path) -> tuple[int, int]:
    """(inode, size) of the error log now: where nginx's messages about the coming reload begin."""
    try:
        st = log.stat()
    except FileNotFoundError:
        return 0, 0
    return st.st_ino, st.st_size


def _emerg_since(log: Path, mark: tuple[int, int]) -> str:
    """nginx's [emerg]/[alert] lines written since `mark`, also when the log was rotated meanwhile (the rest of
    the old file, now NAME.1, then the new file from its start)."""
    inode, offset = mark
    parts = []
    for path in (log.with_name(log.name + ".1"), log):
        try:
            with path.open("rb") as f:
                current = os.fstat(f.fileno()).st_ino
                if current == inode:
                    f.seek(offset)
                elif path != log:
                    continue  # an older rotated file: nothing of this reload
                parts.append(f.read().decode(errors="replace"))
        except OSError:
            continue
    tail = "\n".join(parts)
    return "\n".join(line for line in tail.splitlines() if "[emerg]" in line or "[alert]" in line)
