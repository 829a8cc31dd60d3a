"""RenderInput → the files of one nginx generation. Pure: no DNS, no file reads, no clock, no store; the same
input and generation number always give the same bytes (manager/render_input.py gathers the input)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

from jinja2 import Environment, FileSystemLoader, StrictUndefined

from authsvc import routes
from manager import balancing, capacity, cidr_groups, cors, traffic
from manager.metering import METER_JS
from manager.settings import ADMIN_BODY_LIMIT_KB
from nginx_templates import TEMPLATE_DIR

# nginx's stub_status on the admin listener (read by manager/metrics.py; nginx answers it, the manager never sees it)
NGINX_STATUS_PATH = "/_bastion/nginx-status"

_env = Environment(
    loader=FileSystemLoader(TEMPLATE_DIR),
    undefined=StrictUndefined,
    keep_trailing_newline=True,
    autoescape=False,  # nginx syntax, not HTML: every value is validated before it gets here
    auto_reload=False,  # templates are code: read once, never looked at again (a rendering does no I/O)
)

MAIN = "nginx.conf"
_METER_SOURCE = (TEMPLATE_DIR / METER_JS).read_text()  # JavaScript, not a template: read once, as it is
FILES = {MAIN: "nginx.conf.j2", "public.conf": "public.conf.j2"}  # file of a generation → its template
ERROR_PAGES = (
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
)
ADMIN_ERROR_PAGES = (
    (403, "Your address may not use the admin interface."),
    (413, "The request body is too large."),
    (494, "The request headers are too large."),
    (405, "This method is not allowed here."),
    (501, "This transfer encoding is not supported."),
    (502, "The management service is unavailable."),
    (504, "The management service did not answer in time; the change may still complete, check before retrying."),
)
_EMPTY: Mapping[str, Any] = MappingProxyType({})


@dataclass(frozen=True)
class RenderInput:
    """Everything a rendering depends on, read once (deeply immutable: mappings are read-only, lists tuples)."""

    tables: Mapping[str, tuple[Mapping[str, Any], ...]]  # pools, routes, settings, cidr_groups as stored
    settings: Mapping[str, Any]  # effective settings (defaults filled in)
    custom_config: str  # the stored custom config if it passes the allow-list with these settings, else ""
    resolved: Mapping[str, tuple[str, ...]]  # "host:port" of every upstream → its addresses (may be empty)
    down: frozenset[str]  # upstream URLs that failed their health checks
    worker_user: str | None  # "user group" for nginx's workers when started as root
    paths: Mapping[str, str]  # data-dir paths nginx writes or connects to
    # certificate name → {names, fullchain, key, digest} of each certificate whose files were readable
    certificates: Mapping[str, Mapping[str, Any]] = field(default_factory=lambda: _EMPTY)
    njs_module: str | None = None  # path of the njs module: token metering on (manager/metering.py)
    open_files: int = capacity.UNLIMITED  # the open-file hard limit of nginx's processes
    parallel_limits: tuple[int, ...] = ()  # the keys' distinct max_parallel values: one limit_conn zone each


def render(inp: RenderInput, generation: int) -> dict[str, str]:
    """The files of a generation: name (relative to the generation dir) → text; with token metering also
    meter.js, which nginx.conf imports from the generation's directory (so it switches with the rest)."""
    context = _context(inp, generation)
    files = {name: _env.get_template(template).render(context) for name, template in FILES.items()}
    if inp.njs_module:
        files[METER_JS] = _METER_SOURCE
    return files


def _context(inp: RenderInput, generation: int) -> dict[str, Any]:
    settings = inp.settings
    groups = {**cidr_groups.BUILTIN, **{g["name"]: g for g in inp.tables["cidr_groups"]}}
    connections, open_files = capacity.nginx_limits(settings["max_streams"], inp.open_files)
    return {
        "generation": generation,
        "njs_module": inp.njs_module,
        # the zone of limit 1 is always there: a value nginx has no zone for (after a rollback) falls back to it
        "parallel_limits": sorted({1, *inp.parallel_limits}),
        "worker_user": inp.worker_user,
        "worker_connections": connections,
        "worker_rlimit_nofile": open_files,
        "paths": inp.paths,
        # `index`: names the pool's nginx variables (a pool name may hold '-', which variable names cannot)
        "pools": [{**pool_view(p, inp.down, inp.resolved), **traffic.view(p, settings), "index": i}
                  for i, p in enumerate(p for p in inp.tables["pools"] if p["upstreams"])],
        "public_listen": settings["public_listen"],
        "admin_listen": settings["admin_listen"],
        "server_name": settings["server_name"] or "_",
        "trusted_proxies": settings["trusted_proxies"],
        "public_access": access_rules(groups, settings["public_cidr_groups"]),
        "admin_access": access_rules(groups, settings["admin_cidr_groups"]),
        "status_readers": status_readers(settings["admin_listen"]),
        "nginx_status_path": NGINX_STATUS_PATH,
        "custom_config": inp.custom_config,
        "body_limit_mb": settings["body_limit_mb"],
        "read_timeout": settings["read_timeout"],
        "connect_timeout": settings["connect_timeout"],
        "max_fails": settings["max_fails"],
        "fail_timeout": settings["fail_timeout"],
        "error_pages": ERROR_PAGES,
        "ca_bundle": settings["ca_bundle"],
        "admin_error_pages": ADMIN_ERROR_PAGES,
        "admin_body_limit_kb": ADMIN_BODY_LIMIT_KB,
        "cors": cors.view(settings),
        "openai_alias": routes.ALIAS_REGEX if settings["openai_paths_without_v1"] else None,
        **_tls(settings, inp.certificates),
    }


def _tls(settings: Mapping[str, Any], certificates: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The HTTP listener (ACME challenges, then the redirect) and one HTTPS server per certificate: only when
    `https_listen` is set and a certificate can be served, so nginx never starts without one."""
    https = settings["https_listen"] if certificates else None
    # the redirect names the port clients reach: in a container 8443 is published as 443
    port = str(settings.get("https_public_port") or https.rpartition(":")[2]) if https else ""
    return {
        "http_listen": settings["http_listen"],
        "https_listen": https,
        "tls_servers": [{"name": name, **cert} for name, cert in certificates.items()] if https else [],
        "https_redirect": f"https://$host{'' if port == '443' else ':' + port}$request_uri" if https else None,
        "hsts": bool(settings["hsts"] and https),
    }


def access_rules(groups: Mapping[str, Mapping[str, Any]], names: list[str]) -> list[tuple[str, str]]:
    """nginx allow/deny lines for a listener: denies first, then allows, then `deny all` if anything is allowed."""
    allow, deny = cidr_groups.rules_in(groups, names)
    return [("deny", c) for c in deny] + [("allow", c) for c in allow] + ([("deny", "all")] if allow else [])


def status_readers(admin_listen: str) -> list[str]:
    """Who may read nginx's connection counts (stub_status) on the admin listener: the manager only, which
    connects to nginx.local_url(admin_listen), so from loopback or from the listener's own address."""
    host = admin_listen.rpartition(":")[0].strip("[]")
    return ["127.0.0.1", "::1"] + ([host] if host not in ("0.0.0.0", "::", "127.0.0.1", "::1") else [])


def host_port(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port}"


def pool_view(pool: Mapping[str, Any], down: frozenset[str], resolved: Mapping[str, tuple[str, ...]]) -> dict[str, Any]:
    """A pool as the templates see it: one server line per resolved address (a placeholder marked down when
    the host did not resolve), and how to reach the first upstream (scheme, Host, TLS name, key)."""
    servers = []
    for i, up in enumerate(pool["upstreams"]):
        common = {"weight": up.get("weight", 1), "backup": up.get("backup", False)}
        addresses = resolved.get(host_port(up["url"]), ())
        note = "failed its health checks" if up["url"] in down else None
        servers += [{"address": a, "down": bool(note), "note": note, "upstream": i, **common} for a in addresses]
        if not addresses:
            servers.append({"address": "127.0.0.1:9", "down": True, "upstream": i,
                            "note": f"{urlsplit(up['url']).hostname} did not resolve at apply time", **common})
    first = urlsplit(pool["upstreams"][0]["url"])
    default_port = 443 if first.scheme == "https" else 80
    host = f"[{first.hostname}]" if ":" in (first.hostname or "") else first.hostname  # IPv6 literal
    return {
        "name": pool["name"],
        "method": pool.get("method", "round_robin"),
        "servers": servers,
        "scheme": first.scheme,
        "host_header": host if first.port == default_port else f"{host}:{first.port}",
        "tls_name": first.hostname,
        "authorization": f"Bearer {pool['api_key']}" if pool.get("api_key") else "",
        # the upstream's 401/403 to the pool's own key is the gateway's fault: 502 upstream_auth_failed
        "intercept_auth": bool(pool.get("api_key")),
        "tls_verify": pool.get("tls_verify", True),
        # model-aware balancing: one block per upstream the gate may pick (manager/balancing.py)
        "choices": balancing.blocks(pool, servers),
    }
