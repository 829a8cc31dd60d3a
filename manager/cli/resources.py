"""Pools, routes and keys."""

from __future__ import annotations

import json

import click

from authsvc.quotas import iso as quotas_iso
from manager import keys as keys_mod
from manager import pools as pools_mod
from manager import quotas as quotas_mod
from manager import traffic
from manager import validation as v
from manager.cli import csv, fmt_time, main, print_table, with_bastion
from manager.context import Bastion

# ---- pools and routes ---------------------------------------------------------------------------------

def traffic_options(command):
    """The options of a pool's traffic settings (manager/traffic.py); unset ones are not passed on."""
    options = [
        click.option("--retries", type=int, help="Other upstreams of the pool tried before the first byte "
                     "(connect errors, timeouts, --retry-status answers; default 2)."),
        click.option("--retry-timeout", type=int, help="Seconds after which no other upstream is tried "
                     "(0: no limit; default 30)."),
        click.option("--retry-status", "retry_statuses", type=click.Choice([str(s) for s in traffic.RETRY_STATUSES]),
                     multiple=True, help="Upstream status retried elsewhere (repeat; default 502 503 504)."),
        click.option("--connect-timeout", type=int, help="Seconds to connect to an upstream (default: setting)."),
        click.option("--read-timeout", type=int, help="Seconds without a byte from the upstream, before the "
                     "first one and between chunks (default: setting)."),
        click.option("--websocket/--no-websocket", default=None, help="Pass WebSocket upgrades (realtime APIs)."),
        click.option("--model-aware/--no-model-aware", default=None, help="Send each request to the upstream "
                     "that has its model loaded, else the shortest queue (Ollama /api/ps, vLLM /metrics; default "
                     "off)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def traffic_given(given: dict) -> dict:
    """The traffic options given on the command line, as pool fields."""
    out = {k: given.pop(k) for k in list(given) if k in traffic.POOL_FIELDS}
    if out.get("retry_statuses"):
        out["retry_statuses"] = [int(s) for s in out["retry_statuses"]]
    return {k: x for k, x in out.items() if x not in (None, ())}


@main.group()
def pools() -> None:
    """Upstream pools: named groups of LLM servers."""


def alias_dict(pairs: tuple[str, ...]) -> dict[str, str]:
    """--alias PUBLIC=UPSTREAM options as {public: upstream} (names are checked by manager/pools.py)."""
    out: dict[str, str] = {}
    for pair in pairs:
        public, sep, upstream = pair.partition("=")
        if not sep or public.strip() in out:
            raise click.UsageError(f"--alias {pair!r}: give PUBLIC=UPSTREAM, each public name once")
        out[public.strip()] = upstream.strip()
    return out


@pools.command("add")
@click.argument("name")
@click.option("--url", "urls", multiple=True, required=True, help="Upstream base URL (repeat for several).")
@click.option("--backup-url", "backup_urls", multiple=True, help="Upstream used only when the others fail.")
@click.option("--api-key", help="Key the upstream expects (sent as Authorization: Bearer).")
@click.option("--models", help="Comma-separated models served (default: ask the upstreams).")
@click.option("--weight", type=int, default=1, show_default=True, help="Weight of each --url upstream.")
@click.option("--method", type=click.Choice(v.BALANCING_METHODS), default="round_robin", show_default=True)
@click.option("--tls-verify/--no-tls-verify", default=True, show_default=True,
              help="Check https upstreams' certificates against the system CAs.")
@click.option("--include-usage/--no-include-usage", default=True, show_default=True,
              help="Ask for stream_options.include_usage on streamed OpenAI requests (token metering).")
@click.option("--passthrough", help="Comma-separated extra upstream paths (exact, or a prefix ending in *).")
@click.option("--alias", "alias_pairs", multiple=True, metavar="PUBLIC=UPSTREAM",
              help="Serve the upstream model UPSTREAM under the public name PUBLIC (repeat for several; needs njs).")
@traffic_options
@click.option("--api-kinds", help="Comma-separated APIs the upstreams speak: openai, ollama (default: detect).")
@with_bastion
def pools_add(b: Bastion, name: str, urls: tuple[str, ...], backup_urls: tuple[str, ...], api_key: str | None,
              models: str | None, weight: int, method: str, tls_verify: bool, include_usage: bool,
              passthrough: str | None, alias_pairs: tuple[str, ...], api_kinds: str | None, **more: object) -> None:
    """Add a pool and apply the nginx configuration."""
    ups = [{"url": u, "weight": weight} for u in urls] + [{"url": u, "backup": True} for u in backup_urls]
    click.echo(f"adding pool {name} and applying nginx configuration...")
    pool = pools_mod.add(b, name, ups, api_key=api_key, models=csv(models), method=method, tls_verify=tls_verify,
                         include_usage=include_usage, aliases=alias_dict(alias_pairs), api_kinds=csv(api_kinds),
                         passthrough=csv(passthrough),
                         **traffic_given(more))
    served = pool["models"] or pool["discovered_models"]
    source = "configured" if pool["models"] else "discovered"
    if served:
        click.echo(f"pool {name} added; models ({source}): {', '.join(served)}")
    else:
        why = pool["discovery_error"] or "the upstreams list none"
        click.echo(f"pool {name} added; no models found: {why}")
    if pool["discovery_error"] and served:
        click.echo(f"warning: {pool['discovery_error']}", err=True)
    detected = "configured" if pool["api_kinds"] else "detected" if pool["detected_api_kinds"] else "not detected"
    click.echo(f"APIs ({detected}): {', '.join(pool['effective_api_kinds'])}")


@pools.command("update")
@click.argument("name")
@click.option("--method", type=click.Choice(v.BALANCING_METHODS))
@click.option("--api-key", help="New upstream API key ('' removes it).")
@click.option("--models", help="Comma-separated models ('' = discover from the upstreams).")
@click.option("--tls-verify/--no-tls-verify", default=None, help="Check https upstreams' certificates.")
@click.option("--include-usage/--no-include-usage", default=None,
              help="Ask for stream_options.include_usage on streamed OpenAI requests.")
@click.option("--passthrough", help="Comma-separated extra upstream paths ('' = none).")
@click.option("--alias", "alias_pairs", multiple=True, metavar="PUBLIC=UPSTREAM",
              help="Replace the pool's model aliases with these (repeat for several).")
@click.option("--no-aliases", is_flag=True, help="Remove every model alias of the pool.")
@traffic_options
@click.option("--api-kinds", help="Comma-separated APIs the upstreams speak: openai, ollama ('' = detect).")
@with_bastion
def pools_update(b: Bastion, name: str, method: str | None, api_key: str | None, models: str | None,
                 tls_verify: bool | None, include_usage: bool | None, passthrough: str | None,
                 alias_pairs: tuple[str, ...], no_aliases: bool, api_kinds: str | None, **more: object) -> None:
    """Change a pool and apply the nginx configuration."""
    if alias_pairs and no_aliases:
        raise click.UsageError("give --alias or --no-aliases, not both")
    aliases = {} if no_aliases else alias_dict(alias_pairs) if alias_pairs else None
    given = (("method", method), ("api_key", api_key), ("models", csv(models)), ("tls_verify", tls_verify),
             ("include_usage", include_usage), ("aliases", aliases), ("api_kinds", csv(api_kinds)),
             ("passthrough", csv(passthrough)))
    changes = {k: x for k, x in given if x is not None} | traffic_given(more)
    if not changes:
        raise click.UsageError("nothing to change: give at least one option")
    pools_mod.update(b, name, **changes)
    click.echo(f"pool {name} updated")


@pools.command("add-upstream")
@click.argument("name")
@click.argument("url")
@click.option("--weight", type=int, default=1, show_default=True)
@click.option("--backup", is_flag=True, help="Used only when the other upstreams fail.")
@with_bastion
def pools_add_upstream(b: Bastion, name: str, url: str, weight: int, backup: bool) -> None:
    pools_mod.add_upstream(b, name, {"url": url, "weight": weight, "backup": backup})
    click.echo(f"upstream {url} added to pool {name}")


@pools.command("remove-upstream")
@click.argument("name")
@click.argument("url")
@with_bastion
def pools_remove_upstream(b: Bastion, name: str, url: str) -> None:
    pools_mod.remove_upstream(b, name, url)
    click.echo(f"upstream {url} removed from pool {name}")


@pools.command("list")
@click.option("--json", "as_json", is_flag=True)
@with_bastion
def pools_list(b: Bastion, as_json: bool) -> None:
    rows = pools_mod.all_pools(b)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    def upstream(u: dict) -> str:
        return u["url"] + (" (backup)" if u["backup"] else "") + (" (DOWN)" if u["down"] else "")

    print_table([{"name": p["name"], "method": p["method"], "upstreams": " ".join(map(upstream, p["upstreams"])),
                  "apis": ",".join(p["effective_api_kinds"]),
                  "models": ",".join([*(p["models"] or p["discovered_models"]),
                                      *(f"{a}={u}" for a, u in p["aliases"].items())]) or "-",
                  "status": pool_status(p)}
                 for p in rows], ["name", "method", "upstreams", "apis", "models", "status"])


def pool_status(pool: dict) -> str:
    """`ok`, or each problem of the pool's last health checks and model discovery, with since when."""
    problems = [f"{u['url']}: {u['error']} (since {fmt_time(u['error_since'])})"
                for u in pool["upstreams"] if u["error"]]
    if pool["discovery_error"]:
        problems.append(f"discovery: {pool['discovery_error']} (since {fmt_time(pool['discovery_error_since'])})")
    return "; ".join(problems) or "ok"


@pools.command("remove")
@click.argument("name")
@with_bastion
def pools_remove(b: Bastion, name: str) -> None:
    pools_mod.remove(b, name)
    click.echo(f"pool {name} removed")


@pools.command("refresh")
@with_bastion
def pools_refresh(b: Bastion) -> None:
    """Ask upstreams now which models they serve (pools without a model list)."""
    changed = pools_mod.refresh_discovered(b)
    click.echo(f"updated: {', '.join(changed)}" if changed else "no change")
    for pool in pools_mod.all_pools(b):
        if pool["discovery_error"]:
            click.echo(f"pool {pool['name']}: {pool['discovery_error']}", err=True)


@main.group()
def routes() -> None:
    """Explicit model → pool routes (exact names or globs), checked before the pools' model lists."""


@routes.command("set")
@click.argument("model")
@click.option("--pool", "pool_names", multiple=True, required=True, help="A pool (repeat: tried in this order).")
@click.option("--mode", type=click.Choice(traffic.ROUTE_MODES), default="fallback", show_default=True,
              help="fallback: the pools in order; balance: each request starts at the next pool in turn.")
@with_bastion
def routes_set(b: Bastion, model: str, pool_names: tuple[str, ...], mode: str) -> None:
    route = pools_mod.set_route(b, model, list(pool_names), mode=mode)
    click.echo(f"{route['model']} -> {', '.join(route['pools'])} ({route['mode']})")


@routes.command("list")
@with_bastion
def routes_list(b: Bastion) -> None:
    print_table([{"model": r["model"], "pools": ",".join(r["pools"]), "mode": r.get("mode", "fallback")}
                 for r in pools_mod.all_routes(b)], ["model", "pools", "mode"])


@routes.command("remove")
@click.argument("model")
@with_bastion
def routes_remove(b: Bastion, model: str) -> None:
    pools_mod.remove_route(b, model)
    click.echo(f"route {model} removed")


# ---- keys ---------------------------------------------------------------------------------------------

@main.group()
def keys() -> None:
    """API keys for clients."""


def key_rule_options(fn):
    """The options shared by `keys create` and `keys update` (not given = default / unchanged)."""
    options = [
        click.option("--models", help="Comma-separated allowed models; globs like llama* work (default: all)."),
        click.option("--endpoints", help="Comma-separated allowed paths, e.g. /v1/*,/api/pull (default: all but "
                                         "Ollama model management)."),
        click.option("--rpm", type=int, help="Requests per minute (0 = unlimited)."),
        click.option("--expires", help="Duration (30d, 12h), ISO date, or never."),
        click.option("--cidrs", help="Comma-separated client networks allowed to use the key."),
        click.option("--cidr-groups", help="Comma-separated CIDR groups applied to the key."),
        click.option("--tpm", help="Tokens per minute (sliding minute), or none (unlimited, the default)."),
        click.option("--tokens-per-day", help="Tokens per UTC day, or none."),
        click.option("--tokens-per-month", help="Tokens per UTC month, or none."),
        click.option("--requests-per-day", help="Requests per UTC day, or none."),
        click.option("--max-parallel", help="Requests in flight at once (nginx answers 429 beyond), or none."),
        click.option("--default-model", help="Model for a request body without one ('' = none; needs njs)."),
        click.option("--allow-auto/--no-allow-auto", default=None,
                     help='Let "model": "auto" pick the first live model of the auto_models setting.'),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def key_rules(models, endpoints, rpm, expires, cidrs, cidr_groups, max_parallel, default_model, allow_auto,
              **quotas) -> dict:
    """The options given; a quota given as `none` stays in, as None (unlimited), and is validated by keys.py."""
    given = {"models": csv(models), "endpoints": csv(endpoints), "rpm": rpm, "expires": expires,
             "cidrs": csv(cidrs), "cidr_groups": csv(cidr_groups), "max_parallel": max_parallel,
             "default_model": default_model, "allow_auto": allow_auto}
    return {k: x for k, x in given.items() if x is not None} | {k: x for k, x in quotas.items() if x is not None}


@keys.command("create")
@click.argument("name")
@key_rule_options
@with_bastion
def keys_create(b: Bastion, name: str, **rules) -> None:
    """Create a key and print it once."""
    record, token = keys_mod.create(b, name, **key_rules(**rules))
    click.echo(token)
    click.echo(f"key id {record['id']} ({record['name']}); store it now, it cannot be shown again", err=True)


@keys.command("update")
@click.argument("key_id")
@click.option("--name", help="New name.")
@key_rule_options
@with_bastion
def keys_update(b: Bastion, key_id: str, name: str | None, **rules) -> None:
    """Change a key's rules (takes effect within a second)."""
    changes = key_rules(**rules) | ({"name": name} if name else {})
    if not changes:
        raise click.UsageError("nothing to change: give at least one option")
    record = keys_mod.update(b, key_id, **changes)
    click.echo(json.dumps(record, indent=2))


@keys.command("show")
@click.argument("key_id")
@click.option("--json", "as_json", is_flag=True)
@with_bastion
def keys_show(b: Bastion, key_id: str, as_json: bool) -> None:
    """One key's rules and, per quota, its limit, use, what remains and when it resets."""
    record = keys_mod.with_last_used(b, [keys_mod.get(b, key_id)])[0]
    state = quotas_mod.details(b, record)
    if as_json:
        click.echo(json.dumps({**record, "quotas": state}, indent=2))
        return
    for name in ("id", "name", "key", "status", "models", "endpoints", "rpm", "max_parallel", "default_model",
                 "allow_auto", "cidrs", "cidr_groups"):
        value = record[name] if record[name] is not None else "-"
        if isinstance(value, list):  # an empty list allows everything, except for groups: none
            value = ",".join(value) or ("-" if name == "cidr_groups" else "*")
        click.echo(f"{name + ':':15} {value}")
    for name in ("expires", "created_at", "last_used"):
        click.echo(f"{name + ':':15} {fmt_time(record[name])}")
    if not state:
        click.echo("quotas:         none")
        return
    click.echo("")
    print_table([{"quota": name, "limit": s["limit"], "used": s["used"], "remaining": s["remaining"],
                  "resets": quotas_iso(s["resets_at"]), "window": s["window"]} for name, s in state.items()],
                ["quota", "limit", "used", "remaining", "resets", "window"])


@keys.command("list")
@click.option("--all", "include_revoked", is_flag=True, help="Include revoked keys.")
@click.option("--json", "as_json", is_flag=True)
@with_bastion
def keys_list(b: Bastion, include_revoked: bool, as_json: bool) -> None:
    rows = keys_mod.with_last_used(b, keys_mod.all_keys(b, include_revoked))
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    print_table([{"id": r["id"], "name": r["name"], "status": r["status"], "models": ",".join(r["models"]) or "*",
                  "rpm": r["rpm"] or "-", "expires": fmt_time(r["expires"]), "last_used": fmt_time(r["last_used"])}
                 for r in rows], ["id", "name", "status", "models", "rpm", "expires", "last_used"])


def _key_action(name: str, help_text: str, action):
    @keys.command(name, help=help_text)
    @click.argument("key_id")
    @with_bastion
    def command(b: Bastion, key_id: str) -> None:
        record = action(b, key_id)
        click.echo(f"key {record['id']} is {record['status']}")
    return command


_key_action("revoke", "Revoke a key for good.", keys_mod.revoke)
_key_action("disable", "Stop a key working until enabled again.",
            lambda b, key_id: keys_mod.update(b, key_id, enabled=False))
_key_action("enable", "Let a disabled key work again.", lambda b, key_id: keys_mod.update(b, key_id, enabled=True))
