"""The `bastion` command line: the same operations as the API, for operators and scripts."""

from __future__ import annotations

import functools
import json
import os
import time
from datetime import datetime
from typing import Any

import click

from manager import auth as auth_mod
from manager import cidr_groups as cidr_groups_mod
from manager import configuration, generations
from manager import keys as keys_mod
from manager import pools as pools_mod
from manager import settings as settings_mod
from manager import users as users_mod
from manager import validation as v
from manager.apply import ConfigTestFailed, ReloadFailed
from manager.context import Bastion
from manager.datadir import DEFAULT_DATA_DIR, DataDir
from manager.errors import Conflict, NotFound
from manager.nginx import NginxError
from manager.store import StoreCorrupt


def friendly_errors(fn):
    """Turn the core's errors into clean CLI messages and a non-zero exit, at the boundary only."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (v.ValidationError, Conflict) as e:
            raise click.ClickException(f"{e.field}: {e.message}") from None
        except (NotFound, StoreCorrupt, OSError) as e:
            raise click.ClickException(str(e)) from None
        except (ConfigTestFailed, ReloadFailed, NginxError) as e:
            raise click.ClickException(f"{e.summary}\n{e.output}".strip()) from None
    return wrapper


def csv(value: str | None) -> list[str] | None:
    """A comma-separated option as a list (None when the option was not given)."""
    return None if value is None else [x.strip() for x in value.split(",") if x.strip()]


def fmt_time(ts: float | None) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M") if ts else "-"


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    table = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in table)) if table else len(c) for i, c in enumerate(columns)]
    click.echo("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)))
    for row in table:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))


@click.group()
@click.option("--data-dir", envvar="BASTION_DATA_DIR", default=DEFAULT_DATA_DIR, show_default=True,
              type=click.Path(file_okay=False), help="Where Bastion keeps its state (env BASTION_DATA_DIR).")
@click.option("--nginx", "nginx_binary", envvar="BASTION_NGINX", default=None, help="Path of the nginx binary.")
@click.pass_context
def main(ctx: click.Context, data_dir: str, nginx_binary: str | None) -> None:
    """Bastion: a gateway for self-hosted LLM servers."""
    os.umask(0o077)  # logs, analytics and every other file Bastion creates are private to its user
    ctx.obj = lambda: Bastion(DataDir.at(data_dir), nginx_binary)  # built lazily: --help needs no data dir


def get_bastion(ctx: click.Context) -> Bastion:
    try:
        return ctx.obj()
    except StoreCorrupt as e:
        raise click.ClickException(str(e)) from None


def with_bastion(fn):
    @click.pass_context
    @friendly_errors
    @functools.wraps(fn)
    def wrapper(ctx: click.Context, *args, **kwargs):
        return fn(get_bastion(ctx), *args, **kwargs)
    return wrapper


@main.command()
@with_bastion
def init(b: Bastion) -> None:
    """Create the data dir and render the first nginx configuration."""
    result = b.apply("init")
    announce_admin(b)
    click.echo(f"data dir {b.dirs.root} ready (nginx generation {result.generation})")


def announce_admin(b: Bastion) -> None:
    """First start: create the `admin` user and show its generated password once."""
    password = users_mod.ensure_admin(b)
    if password:
        click.echo(f"created admin user 'admin' with password: {password}")
        click.echo("  (shown once; set BASTION_ADMIN_PASSWORD before the first start to choose it)")


@main.command()
@click.option("--public", help="Public listener HOST:PORT (saved; default 127.0.0.1:8080).")
@click.option("--admin", help="Admin listener HOST:PORT (saved; default 127.0.0.1:8081).")
@click.option("--nginx", "nginx_path", help="Path of the nginx binary (same as the global --nginx).")
@with_bastion
def up(b: Bastion, public: str | None, admin: str | None, nginx_path: str | None) -> None:
    """Run nginx, the gate and the manager in the foreground until Ctrl-C."""
    from manager.supervisor import Supervisor

    if nginx_path:
        b.nginx.binary = nginx_path
    changes = {k: x for k, x in (("public_listen", public), ("admin_listen", admin)) if x}
    if changes:
        settings_mod.update(b, changes, "up")
    announce_admin(b)
    raise SystemExit(Supervisor(b, click.echo).run())


# ---- pools and routes ---------------------------------------------------------------------------------

@main.group()
def pools() -> None:
    """Upstream pools: named groups of LLM servers."""


@pools.command("add")
@click.argument("name")
@click.option("--url", "urls", multiple=True, required=True, help="Upstream base URL (repeat for several).")
@click.option("--backup-url", "backup_urls", multiple=True, help="Upstream used only when the others fail.")
@click.option("--api-key", help="Key the upstream expects (sent as Authorization: Bearer).")
@click.option("--models", help="Comma-separated models served (default: ask the upstreams).")
@click.option("--weight", type=int, default=1, show_default=True, help="Weight of each --url upstream.")
@click.option("--method", type=click.Choice(v.BALANCING_METHODS), default="round_robin", show_default=True)
@with_bastion
def pools_add(b: Bastion, name: str, urls: tuple[str, ...], backup_urls: tuple[str, ...], api_key: str | None,
              models: str | None, weight: int, method: str) -> None:
    """Add a pool and apply the nginx configuration."""
    ups = [{"url": u, "weight": weight} for u in urls] + [{"url": u, "backup": True} for u in backup_urls]
    click.echo(f"adding pool {name} and applying nginx configuration...")
    pool = pools_mod.add(b, name, ups, api_key=api_key, models=csv(models),
                         method=method)
    served = pool["models"] or pool["discovered_models"]
    source = "configured" if pool["models"] else "discovered"
    click.echo(f"pool {name} added; models ({source}): {', '.join(served) or 'none found yet'}")


@pools.command("update")
@click.argument("name")
@click.option("--method", type=click.Choice(v.BALANCING_METHODS))
@click.option("--api-key", help="New upstream API key ('' removes it).")
@click.option("--models", help="Comma-separated models ('' = discover from the upstreams).")
@with_bastion
def pools_update(b: Bastion, name: str, method: str | None, api_key: str | None, models: str | None) -> None:
    """Change a pool and apply the nginx configuration."""
    changes = {k: x for k, x in (("method", method), ("api_key", api_key), ("models", csv(models))) if x is not None}
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
    current = pools_mod.get(b, name)["upstreams"]
    pools_mod.update(b, name, upstreams=[*current, {"url": url, "weight": weight, "backup": backup}])
    click.echo(f"upstream {url} added to pool {name}")


@pools.command("remove-upstream")
@click.argument("name")
@click.argument("url")
@with_bastion
def pools_remove_upstream(b: Bastion, name: str, url: str) -> None:
    current = pools_mod.get(b, name)["upstreams"]
    normalised = v.upstream_url("url", url)
    remaining = [u for u in current if u["url"] != normalised]
    if len(remaining) == len(current):
        raise click.ClickException(f"pool {name} has no upstream {normalised}")
    pools_mod.update(b, name, upstreams=remaining)
    click.echo(f"upstream {normalised} removed from pool {name}")


@pools.command("list")
@click.option("--json", "as_json", is_flag=True)
@with_bastion
def pools_list(b: Bastion, as_json: bool) -> None:
    rows = pools_mod.all_pools(b)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    print_table([{"name": p["name"], "method": p["method"],
                  "upstreams": " ".join(u["url"] + (" (backup)" if u["backup"] else "") for u in p["upstreams"]),
                  "models": ",".join(p["models"] or p["discovered_models"]) or "-"} for p in rows],
                ["name", "method", "upstreams", "models"])


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


@main.group()
def routes() -> None:
    """Explicit model → pool routes (exact names or globs), checked before the pools' model lists."""


@routes.command("set")
@click.argument("model")
@click.option("--pool", "pool_names", multiple=True, required=True)
@with_bastion
def routes_set(b: Bastion, model: str, pool_names: tuple[str, ...]) -> None:
    route = pools_mod.set_route(b, model, list(pool_names))
    click.echo(f"{route['model']} -> {', '.join(route['pools'])}")


@routes.command("list")
@with_bastion
def routes_list(b: Bastion) -> None:
    print_table([{"model": r["model"], "pools": ",".join(r["pools"])} for r in pools_mod.all_routes(b)],
                ["model", "pools"])


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
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def key_rules(models, endpoints, rpm, expires, cidrs, cidr_groups) -> dict:
    given = {"models": csv(models), "endpoints": csv(endpoints), "rpm": rpm, "expires": expires,
             "cidrs": csv(cidrs), "cidr_groups": csv(cidr_groups)}
    return {k: x for k, x in given.items() if x is not None}


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


# ---- usage and config ---------------------------------------------------------------------------------

@main.command()
@click.option("--key", "key_id", help="Only this key id.")
@click.option("--since", default="24h", show_default=True, help="Duration back (24h, 7d) or ISO date.")
@click.option("--records", is_flag=True, help="List single requests instead of the summary.")
@click.option("--json", "as_json", is_flag=True)
@with_bastion
def usage(b: Bastion, key_id: str | None, since: str, records: bool, as_json: bool) -> None:
    """Requests per key and model, from nginx's access log."""
    m = v.DURATION_RE.fullmatch(since)
    start = time.time() - int(m.group(1)) * v.DURATION_UNITS[m.group(2)] if m else None
    if start is None:
        try:
            start = datetime.fromisoformat(since).timestamp()
        except ValueError:
            raise v.ValidationError("since", "must be a duration like 24h or an ISO date") from None
    b.usage.ingest()
    rows = b.usage.records(key_id, start) if records else b.usage.summary(key_id, start)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    elif records:
        print_table([{**r, "start": fmt_time(r["start"]), "ttfb": f"{r['ttfb']:.3f}" if r["ttfb"] is not None else "-",
                      "duration": f"{r['duration']:.3f}"} for r in rows],
                    ["start", "key", "model", "pool", "upstream", "status", "bytes_sent", "ttfb", "duration"])
    else:
        print_table([{**r, "avg_ttfb": f"{r['avg_ttfb']:.3f}" if r["avg_ttfb"] is not None else "-",
                      "avg_duration": f"{r['avg_duration']:.3f}", "last_request": fmt_time(r["last_request"])}
                     for r in rows],
                    ["key", "model", "requests", "errors", "bytes_sent", "avg_ttfb", "avg_duration", "last_request"])


@main.group("users")
def users_group() -> None:
    """Admin users of the management API and page."""


@users_group.command("add")
@click.argument("username")
@click.option("--role", type=click.Choice(users_mod.ROLES), default="viewer", show_default=True)
@click.password_option(help="Password (asked when not given).")
@with_bastion
def users_add(b: Bastion, username: str, role: str, password: str) -> None:
    users_mod.create(b, username, password, role)
    click.echo(f"user {username} ({role}) created")


@users_group.command("list")
@with_bastion
def users_list(b: Bastion) -> None:
    print_table([{**u, "created_at": fmt_time(u["created_at"])} for u in users_mod.all_users(b)],
                ["username", "role", "created_at"])


@users_group.command("passwd")
@click.argument("username")
@click.password_option(help="New password (asked when not given).")
@with_bastion
def users_passwd(b: Bastion, username: str, password: str) -> None:
    """Set a new password (signs the user out everywhere)."""
    users_mod.update(b, username, password=password)
    click.echo(f"password of {username} changed")


@users_group.command("role")
@click.argument("username")
@click.argument("role", type=click.Choice(users_mod.ROLES))
@with_bastion
def users_role(b: Bastion, username: str, role: str) -> None:
    users_mod.update(b, username, role=role)
    click.echo(f"{username} is now {role}")


@users_group.command("remove")
@click.argument("username")
@with_bastion
def users_remove(b: Bastion, username: str) -> None:
    users_mod.remove(b, username)
    click.echo(f"user {username} removed")


@main.group("auth")
def auth_group() -> None:
    """Sign-in protection."""


@auth_group.command("unlock")
@click.argument("subject", required=False)
@with_bastion
def auth_unlock(b: Bastion, subject: str | None) -> None:
    """Clear login lockouts: all, or one SUBJECT like user:alice or ip:10.0.0.5."""
    click.echo(f"cleared {auth_mod.unlock(b, subject)} lockout record(s)")


@main.group("cidr-groups")
def cidr_groups_group() -> None:
    """Named allow/deny network lists for listeners and keys."""


@cidr_groups_group.command("add")
@click.argument("name")
@click.option("--allow", help="Comma-separated networks to allow.")
@click.option("--deny", help="Comma-separated networks to deny.")
@with_bastion
def cidr_groups_add(b: Bastion, name: str, allow: str | None, deny: str | None) -> None:
    group = cidr_groups_mod.create(b, name, csv(allow) or [], csv(deny) or [])
    click.echo(f"CIDR group {group['name']} created")


@cidr_groups_group.command("update")
@click.argument("name")
@click.option("--allow", help="Comma-separated networks to allow (replaces the list).")
@click.option("--deny", help="Comma-separated networks to deny (replaces the list).")
@with_bastion
def cidr_groups_update(b: Bastion, name: str, allow: str | None, deny: str | None) -> None:
    """Change a group and apply the nginx configuration."""
    group = cidr_groups_mod.update(b, name, csv(allow), csv(deny))
    allowed, denied = ",".join(group["allow"]) or "-", ",".join(group["deny"]) or "-"
    click.echo(f"CIDR group {group['name']}: allow {allowed}; deny {denied}")


@cidr_groups_group.command("list")
@with_bastion
def cidr_groups_list(b: Bastion) -> None:
    print_table([{"name": g["name"], "allow": ",".join(g["allow"]) or "-", "deny": ",".join(g["deny"]) or "-",
                  "builtin": "yes" if g["builtin"] else ""} for g in cidr_groups_mod.all_groups(b)],
                ["name", "allow", "deny", "builtin"])


@cidr_groups_group.command("remove")
@click.argument("name")
@with_bastion
def cidr_groups_remove(b: Bastion, name: str) -> None:
    cidr_groups_mod.remove(b, name)
    click.echo(f"CIDR group {name} removed")


@main.command()
@click.option("--limit", type=int, default=50, show_default=True)
@with_bastion
def audit(b: Bastion, limit: int) -> None:
    """Who changed what, newest first."""
    print_table([{**e, "time": fmt_time(e["time"])} for e in b.audit.entries(limit=limit)],
                ["time", "author", "action"])


@main.group()
def settings() -> None:
    """Listeners, limits and timeouts (see docs/configuration.md)."""


@settings.command("show")
@with_bastion
def settings_show(b: Bastion) -> None:
    click.echo(json.dumps(b.settings(), indent=2))


@settings.command("set")
@click.argument("name")
@click.argument("value")
@with_bastion
def settings_set(b: Bastion, name: str, value: str) -> None:
    """Set one setting and apply it. VALUE is JSON when it parses as JSON; otherwise a string, or for list
    settings a comma-separated list."""
    try:
        parsed = json.loads(value)
    except ValueError:
        parsed = csv(value) if isinstance(settings_mod.DEFAULTS.get(name), list) else value
    settings_mod.update(b, {name: parsed})
    click.echo(f"{name} = {json.dumps(b.settings()[name])}")


@main.group()
def config() -> None:
    """The nginx configuration Bastion renders."""


@config.command("apply")
@with_bastion
def config_apply(b: Bastion) -> None:
    """Render, test and (if nginx runs) reload; rolls back on failure."""
    click.echo("rendering and testing nginx configuration...")
    result = configuration.reload(b, "cli")
    state = "reloaded" if result.reloaded else "written (nginx not running)" if result.changed else "unchanged"
    click.echo(f"generation {result.generation}: {state}")


@config.command("history")
@with_bastion
def config_history(b: Bastion) -> None:
    """Kept generations, newest first (* = live)."""
    print_table([{"generation": f"{h['generation']}{' *' if h['live'] else ''}", "author": h.get("author", "-"),
                  "time": fmt_time(h.get("time"))} for h in generations.history(b.dirs)],
                ["generation", "author", "time"])


@config.command("diff")
@click.argument("generation", type=int)
@with_bastion
def config_diff(b: Bastion, generation: int) -> None:
    """What GENERATION changed compared with the one before (upstream keys masked)."""
    if generation not in generations.numbers(b.dirs):
        raise click.ClickException(f"generation {generation} is not kept")
    click.echo(generations.changes(b.dirs, generation) or "(no change)")


@config.command("rollback")
@click.argument("generation", type=int)
@with_bastion
def config_rollback(b: Bastion, generation: int) -> None:
    """Restore pools, routes, settings and CIDR groups of GENERATION (keys and users stay as they are)."""
    click.echo(f"rolling back to generation {generation}...")
    result = configuration.rollback(b, generation, "cli")
    if result.changed:
        click.echo(f"generation {result.generation} is live with the configuration of generation {generation}")
    else:
        click.echo(f"configuration restored; nginx's configuration was already that of generation {generation}")


@config.command("status")
@with_bastion
def config_status(b: Bastion) -> None:
    """Live generation, and whether the files on disk were changed by hand."""
    drift = generations.drift(b.dirs)
    click.echo(f"live generation {generations.live(b.dirs)}; nginx "
               f"{'running' if b.nginx.master_pid() else 'not running'}; "
               f"{'DRIFT: the live nginx.conf was changed by hand' if drift else 'no drift'}")


@config.command("show")
@with_bastion
def config_show(b: Bastion) -> None:
    click.echo(f"# live generation {generations.live(b.dirs)}: {b.dirs.nginx_conf} (upstream keys masked)")
    click.echo(generations.mask_secrets(b.dirs.nginx_conf.read_text()) if b.dirs.nginx_conf.exists()
               else "# not rendered yet")


if __name__ == "__main__":
    main()
