"""Usage, audit, settings and the nginx configuration."""

from __future__ import annotations

import json
import time

import click

from authsvc import bodies
from manager import configuration, generations
from manager import metrics as metrics_mod
from manager import settings as settings_mod
from manager import validation as v
from manager.cli import csv, fmt_time, main, print_table, with_bastion
from manager.context import Bastion

# ---- metrics ---------------------------------------------------------------------------------------------

@main.group("metrics")
def metrics_group() -> None:
    """Prometheus /metrics on the admin listener: print it, manage its token."""


@metrics_group.command("show")
@with_bastion
def metrics_show(b: Bastion) -> None:
    """Print what /metrics serves now (after ingesting the usage log)."""
    b.usage.ingest()
    click.echo(metrics_mod.render(b, own_requests=1), nl=False)  # only the status request is nginx's


@metrics_group.command("token")
@with_bastion
def metrics_token(b: Bastion) -> None:
    """Create the metrics token (replaces the previous one) and print it once: Prometheus sends it as a bearer
    token."""
    click.echo(metrics_mod.create_token(b))


@metrics_group.command("revoke-token")
@with_bastion
def metrics_revoke_token(b: Bastion) -> None:
    """Revoke the metrics token."""
    click.echo("metrics token revoked" if metrics_mod.revoke_token(b) else "no metrics token was set")


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
            start = v.iso_timestamp(since)
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
        parsed = bodies.loads(value.encode())  # depth-capped: a silly value is a string, never a traceback
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
    changed = generations.drifted(b.dirs)
    click.echo(f"live generation {generations.live(b.dirs)}; nginx "
               f"{'running' if b.nginx.master_pid() else 'not running'}; "
               + (f"DRIFT: changed by hand: {', '.join(changed)}" if changed else "no drift"))


@config.command("show")
@with_bastion
def config_show(b: Bastion) -> None:
    click.echo(f"# live generation {generations.live(b.dirs)}: {b.dirs.nginx_conf} (upstream keys masked)")
    click.echo(generations.live_text_masked(b.dirs) or "# not rendered yet")
