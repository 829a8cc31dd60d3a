"""Prometheus metrics of the whole gateway, in the text exposition format 0.0.4, written at scrape time.

Everything is read where it already lives, so a scrape costs a few small reads and nothing is counted twice:
- traffic, tokens, cut streams and the latency histograms: the usage store's all-time rollup rows
  (manager.usage, span TOTAL_SPAN; monotonic, never pruned), as fresh as the last ingestion (every second);
- requests in flight: nginx's stub_status on the admin listener (render.NGINX_STATUS_PATH, loopback only);
- upstream health: the health checker's health.json; gate decisions: the gate's run/gate-status.json.

Label cardinality (decision 27): the series labelled by key are requests by status class and tokens by type,
one set per (key, model, pool) that ever had traffic; histograms, cuts and bytes are per (model, pool) only, so
thousands of keys cost a few series each, never a histogram each. Key ids only: no name, secret or digest.

Access (manager/api/metrics.py): a signed-in user, the metrics token (stored as its SHA-256 in
`metrics_token.json`, 0600), or an address inside the allow lists of `metrics_cidr_groups`.
"""

from __future__ import annotations

import hashlib
import http.client
import ipaddress
import json
import math
import platform
import secrets
import time
from collections.abc import Iterable, Mapping
from importlib import metadata
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from authsvc.files import write_atomic
from authsvc.snapshot import STATUS_FILE
from manager import cidr_groups, generations, health, pools, usage_queries
from manager.nginx import local_url
from manager.render import NGINX_STATUS_PATH
from manager.usage_records import DURATION_BOUNDS, TTFB_BOUNDS

if TYPE_CHECKING:
    from manager.context import Bastion

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TOKEN_PREFIX = "bstm_"  # tells the metrics token from a sign-in JWT in an Authorization header
TOKEN_FILE = "metrics_token.json"
STATUS_TIMEOUT = 1.0
# the scrape's own request on the admin listener and the manager's stub_status request are both "Writing"
OWN_REQUESTS = 2
CUTS = (("upstream", "upstream_cut"), ("client", "client_cut"), ("timeout", "timeout"))

Labels = Mapping[str, str]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float | int | None) -> str:
    if value is None:
        return "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


class Exposition:
    """The text format: `# HELP` and `# TYPE` once per family, then its samples, label values escaped."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str) -> None:
        self.lines.append(f"# HELP {name} {help_text.replace(chr(92), chr(92) * 2).replace(chr(10), chr(92) + 'n')}")
        self.lines.append(f"# TYPE {name} {kind}")

    def sample(self, name: str, labels: Labels, value: float | int | None) -> None:
        if labels:
            text = ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items())
            self.lines.append(f"{name}{{{text}}} {_number(value)}")
        else:
            self.lines.append(f"{name} {_number(value)}")

    def histogram(self, name: str, labels: Labels, bounds: Iterable[float], cumulative: Iterable[int], count: int,
                  total: float) -> None:
        for bound, n in zip(bounds, cumulative, strict=True):
            self.sample(f"{name}_bucket", {**labels, "le": repr(float(bound))}, n)
        self.sample(f"{name}_bucket", {**labels, "le": "+Inf"}, count)
        self.sample(f"{name}_sum", labels, float(total or 0.0))
        self.sample(f"{name}_count", labels, count)

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def render(bastion: Bastion, own_requests: int = OWN_REQUESTS) -> str:
    """The whole exposition. A source that cannot be read leaves its samples out (nginx's shows as
    bastion_nginx_up 0); the others are still served. `own_requests`: how many requests nginx is handling for
    this scrape itself (1 when not asked through nginx, as by the CLI)."""
    out = Exposition()
    _usage(out, bastion)
    _gate(out, bastion)
    _upstreams(out, bastion)
    _nginx(out, bastion, own_requests)
    _info(out, bastion)
    return out.text()


OTHER_MODEL = "other"
# (name, help, bucket bounds, the rollups' cumulative bucket columns, count column, sum column)
HISTOGRAMS = (
    ("bastion_request_duration_seconds",
     "Time from the request's first byte to the response's last (nginx $request_time), by model and pool.",
     DURATION_BOUNDS, "d", "requests", "duration_sum"),
    ("bastion_time_to_first_byte_seconds",
     "Time until the upstream's response header (nginx $upstream_header_time), by model and pool; requests that "
     "reached an upstream and got an answer.",
     TTFB_BOUNDS, "t", "ttfb_count", "ttfb_sum"),
)


def known_models(bastion: Bastion) -> set[str]:
    """Model names an operator configured or the upstreams reported: the only ones /metrics labels by name."""
    names = {route["model"] for route in pools.all_routes(bastion) if not any(c in route["model"] for c in "*?[")}
    for pool in pools.all_pools(bastion):
        names.update(pool.get("models") or [], pool.get("discovered_models") or [])
    return names


def fold_models(rows: Iterable[Mapping[str, Any]], known: set[str]) -> list[dict[str, Any]]:
    """Rows with a model no pool lists (a name a client made up for a glob route) added up under "other", so that
    clients cannot grow the number of series."""
    folded: dict[tuple[Any, ...], dict[str, Any]] = {}
    for row in rows:
        row = dict(row)
        if row["model"] and row["model"] not in known:
            row["model"] = OTHER_MODEL
        group = (row.get("key"), row["model"], row["pool"])
        if (into := folded.get(group)) is None:
            folded[group] = row
        else:
            for name, value in row.items():
                if name not in ("key", "model", "pool"):
                    into[name] += value
    return list(folded.values())


def _usage(out: Exposition, bastion: Bastion) -> None:
    keys, models = usage_queries.totals(bastion.usage)
    known = known_models(bastion)
    keys, models = fold_models(keys, known), fold_models(models, known)
    out.family("bastion_requests_total", "counter",
               "Requests logged by nginx on the public listener, by API key id, model, pool and status class "
               "(2xx: every status below 400).")
    for r in keys:
        where = {"key": r["key"], "model": r["model"], "pool": r["pool"]}
        ok = r["requests"] - r["client_errors"] - r["server_errors"]
        for code_class, n in (("2xx", ok), ("4xx", r["client_errors"]), ("5xx", r["server_errors"])):
            out.sample("bastion_requests_total", {**where, "code_class": code_class}, n)
    out.family("bastion_tokens_total", "counter",
               "Tokens the upstreams reported, by API key id, model, pool and type; only where some requests had "
               "token counts (see bastion_metered_requests_total: unknown is never counted as 0).")
    for r in keys:
        if r["metered"]:
            where = {"key": r["key"], "model": r["model"], "pool": r["pool"]}
            out.sample("bastion_tokens_total", {**where, "type": "prompt"}, r["prompt_tokens"])
            out.sample("bastion_tokens_total", {**where, "type": "completion"}, r["completion_tokens"])
    out.family("bastion_metered_requests_total", "counter", "Requests whose token counts are known, by model and pool.")
    for r in models:
        out.sample("bastion_metered_requests_total", {"model": r["model"], "pool": r["pool"]}, r["metered"])
    out.family("bastion_stream_cuts_total", "counter",
               "Responses that did not complete, by model, pool and cause: cut by the upstream, by the client, or "
               "timed out.")
    for r in models:
        for cause, column in CUTS:
            out.sample("bastion_stream_cuts_total", {"model": r["model"], "pool": r["pool"], "cause": cause}, r[column])
    out.family("bastion_response_bytes_total", "counter", "Bytes sent to clients, by model and pool.")
    for r in models:
        out.sample("bastion_response_bytes_total", {"model": r["model"], "pool": r["pool"]}, r["bytes_sent"])
    for name, about, bounds, column, count, total in HISTOGRAMS:
        out.family(name, "histogram", about)
        for r in models:
            out.histogram(name, {"model": r["model"], "pool": r["pool"]}, bounds,
                          (r[f"{column}{i}"] for i in range(len(bounds))), r[count], r[total])
    out.family("bastion_usage_ingest_backlog_bytes", "gauge",
               "Bytes of nginx's usage log not yet in the usage store (ingested every second): the counters above "
               "lag by this much.")
    out.sample("bastion_usage_ingest_backlog_bytes", {}, bastion.usage.backlog())


def gate_decisions(bastion: Bastion) -> dict[str, int]:
    """The gate's decision counts since it started, as it last published them (every second)."""
    try:
        status = json.loads((bastion.dirs.run / STATUS_FILE).read_bytes())
    except (OSError, ValueError):
        return {}
    decisions = status.get("decisions") if isinstance(status, dict) else None
    if not isinstance(decisions, dict):
        return {}
    return {k: v for k, v in decisions.items() if isinstance(k, str) and isinstance(v, int)}


def _gate(out: Exposition, bastion: Bastion) -> None:
    out.family("bastion_gate_decisions_total", "counter",
               "The gate's decisions since it started: allow (sent to a pool), answer (served by the gate, e.g. "
               "model lists), refuse and error, with the error code as reason.")
    for name, n in sorted(gate_decisions(bastion).items()):
        decision, _, reason = name.partition(":")
        out.sample("bastion_gate_decisions_total", {"decision": decision, "reason": reason}, n)


def _upstreams(out: Exposition, bastion: Bastion) -> None:
    checks = health.load(bastion)
    out.family("bastion_upstream_up", "gauge",
               "1 when the active health check finds the upstream alive, 0 when it is marked down; absent before "
               "the first check or with health_interval 0.")
    for pool in bastion.store.all("pools"):
        for upstream in pool["upstreams"]:
            if (check := checks.get(upstream["url"])) is not None:
                out.sample("bastion_upstream_up", {"pool": pool["name"], "upstream": upstream["url"]},
                           0 if check.get("down") else 1)


def nginx_status(admin_listen: str) -> dict[str, int] | None:
    """nginx's stub_status numbers (active, accepted, handled, requests, reading, writing, waiting), or None."""
    url = urlsplit(local_url(admin_listen))
    conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=STATUS_TIMEOUT)
    try:
        conn.request("GET", NGINX_STATUS_PATH)
        resp = conn.getresponse()
        text = resp.read(4096).decode("ascii", errors="replace")
        if resp.status != 200:
            return None
    except (OSError, http.client.HTTPException):  # refused, timed out, or not HTTP: nginx is not answering
        return None
    finally:
        conn.close()
    # Active connections: 2 \nserver accepts handled requests\n 10 10 20 \nReading: 0 Writing: 1 Waiting: 1
    words = text.split()
    try:
        numbers = [int(w) for w in words if w.isdigit()]
        active, accepted, handled, requests, reading, writing, waiting = numbers
    except ValueError:
        return None
    return {"active": active, "accepted": accepted, "handled": handled, "requests": requests,
            "reading": reading, "writing": writing, "waiting": waiting}


def _nginx(out: Exposition, bastion: Bastion, own_requests: int) -> None:
    status = nginx_status(bastion.settings()["admin_listen"])
    out.family("bastion_nginx_up", "gauge", "1 when nginx answered this scrape's status request.")
    out.sample("bastion_nginx_up", {}, 0 if status is None else 1)
    if status is None:
        return
    out.family("bastion_requests_in_flight", "gauge",
               "Requests nginx is processing now on all its listeners, this scrape's own excepted (stub_status "
               "Writing): proxied requests and open streams, requests at the gate, admin requests.")
    out.sample("bastion_requests_in_flight", {}, max(0, status["writing"] - own_requests))
    out.family("bastion_nginx_connections", "gauge",
               "Client connections nginx holds, by state: reading a request header, writing (processing a request), "
               "waiting (idle keepalive).")
    for state in ("reading", "writing", "waiting"):
        out.sample("bastion_nginx_connections", {"state": state}, status[state])
    out.family("bastion_nginx_connections_accepted_total", "counter", "Client connections nginx accepted.")
    out.sample("bastion_nginx_connections_accepted_total", {}, status["accepted"])
    out.family("bastion_nginx_http_requests_total", "counter", "HTTP requests nginx read, on all its listeners.")
    out.sample("bastion_nginx_http_requests_total", {}, status["requests"])


def _info(out: Exposition, bastion: Bastion) -> None:
    try:
        version = metadata.version("bastion-gateway")
    except metadata.PackageNotFoundError:
        version = "unknown"
    out.family("bastion_build_info", "gauge", "Always 1; the labels say which Bastion and Python serve.")
    out.sample("bastion_build_info", {"version": version, "python": platform.python_version()}, 1)
    out.family("bastion_config_generation", "gauge", "The live nginx configuration generation.")
    out.sample("bastion_config_generation", {}, generations.live(bastion.dirs))


# --- access --------------------------------------------------------------------------------------------------


def _token_path(bastion: Bastion):
    return bastion.dirs.root / TOKEN_FILE


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(bastion: Bastion, author: str = "cli") -> str:
    """A new metrics token (the previous one stops working); only its SHA-256 is kept. Shown once."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    write_atomic(_token_path(bastion), json.dumps({"sha256": _digest(token), "created_at": time.time()}).encode())
    bastion.audit.record(author, "create metrics token")
    return token


def revoke_token(bastion: Bastion, author: str = "cli") -> bool:
    """Remove the metrics token; False when there was none."""
    try:
        _token_path(bastion).unlink()
    except FileNotFoundError:
        return False
    bastion.audit.record(author, "revoke metrics token")
    return True


def token_info(bastion: Bastion) -> dict[str, Any]:
    try:
        stored = json.loads(_token_path(bastion).read_bytes())
        return {"set": True, "created_at": stored.get("created_at")}
    except (OSError, ValueError):
        return {"set": False, "created_at": None}


def token_matches(bastion: Bastion, presented: str) -> bool:
    try:
        stored = json.loads(_token_path(bastion).read_bytes())["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return isinstance(stored, str) and secrets.compare_digest(stored, _digest(presented))


def address_admitted(bastion: Bastion, address: str) -> bool:
    """True when `address` is inside an allow list of `metrics_cidr_groups` and no deny list: no group or no
    allow entry admits nobody (unlike a listener, where no group means no restriction)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    allow, deny = cidr_groups.rules(bastion, bastion.settings()["metrics_cidr_groups"])
    if any(ip in ipaddress.ip_network(c) for c in deny):
        return False
    return any(ip in ipaddress.ip_network(c) for c in allow)
