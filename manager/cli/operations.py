"""Usage, audit, settings and the nginx configuration."""

from __future__ import annotations

import json
import time

import click

from authsvc import bodies
from manager import configuration, generations, metering, snapshot
from manager import metrics as metrics_mod
from manager import settings as settings_mod
from manager import usage_queries as q
from manager import validation as v
from manager.cli import csv, fmt_time, main, print_table, with_bastion
from manager.context import Bastion
from manager.usage_records import RECORD_FIELDS

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

def _when(name: str, text: str | None, now: float) -> float | None:
    """A duration back from now (30m, 24h, 7d), an ISO date/time, or epoch seconds."""
    if text in (None, ""):
        return None
    if m := v.DURATION_RE.fullmatch(text.strip()):
        return now - int(m.group(1)) * v.DURATION_UNITS[m.group(2)]
    try:
        return v.epoch(name, text) if text.strip().replace(".", "", 1).isdigit() else v.iso_timestamp(text)
    except ValueError:
        raise v.ValidationError(name, "must be a duration like 24h or 7d, an ISO date, or epoch seconds") from None


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _count(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


SUMMARY_TABLE = ["requests", "errors", "metered", "total_tokens", "cost", "p50_duration", "p95_duration",
                 "p50_ttfb", "p95_ttfb"]
RECORDS_TABLE = ["start", "key", "model", "pool", "upstream", "status", "outcome", "total_tokens", "bytes_sent",
                 "ttfb", "duration"]


@main.command()
@click.option("--by", "by", default="key,model", show_default=True,
              help="Comma-separated: key, model, pool (groups) and at most one of minute, hour, day (time buckets).")
@click.option("--since", default="24h", show_default=True, help="Duration back (30m, 24h, 7d), ISO date or epoch.")
@click.option("--until", default=None, help="End of the range (same forms; default now).")
@click.option("--key", "key_id", help="Only this key id.")
@click.option("--model", help="Only this model.")
@click.option("--pool", help="Only this pool.")
@click.option("--status", help="Records only: a status (200) or class (5xx).")
@click.option("--outcome", help="Records only: completed, upstream_cut, client_cut, timeout or unknown.")
@click.option("--records", is_flag=True, help="List single requests, newest first, instead of the summary.")
@click.option("--limit", type=click.IntRange(1, q.MAX_LIMIT), default=1000, show_default=True,
              help="Records only: at most this many.")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Same as --format json.")
@with_bastion
def usage(b: Bastion, by: str, since: str, until: str | None, key_id: str | None, model: str | None,
          pool: str | None, status: str | None, outcome: str | None, records: bool, limit: int, fmt: str,
          as_json: bool) -> None:
    """Usage from the analytics store: a summary per key, model, pool and/or time bucket (requests, errors,
    tokens, cost, p50/p95 of duration and time to first byte), or single requests with --records."""
    now = time.time()
    args = {"key": key_id, "model": model, "pool": pool, "since": _when("since", since, now),
            "until": _when("until", until, now)}
    if records:
        args.update(status=status, outcome=outcome)
    elif status or outcome:
        raise v.ValidationError("--status" if status else "--outcome", "applies to --records only (rollups keep "
                                "no status or outcome; use the API's GET /api/v1/usage?group_by=status)")
    filters = q.parse_filters({name: value for name, value in args.items() if value is not None})
    fmt = "json" if as_json else fmt
    b.usage.ingest()
    if records:
        rows = q.records(b.usage, filters, limit).records
        columns = list(rows[0]) if rows else list(RECORD_FIELDS)
        table = [{**r, "start": fmt_time(r["start"]), "ttfb": _num(r["ttfb"]), "duration": _num(r["duration"]),
                  "outcome": r["outcome"] or "-", "total_tokens": _count(r["total_tokens"])} for r in rows]
        _output(fmt, rows, columns, table, RECORDS_TABLE)
        return
    parts = q.names("--by", by, (*q.SUMMARY_GROUPS, "minute", "hour", "day"))
    buckets = [p for p in parts if p not in q.SUMMARY_GROUPS]
    if len(buckets) > 1:
        raise v.ValidationError("--by", f"at most one time bucket ({', '.join(buckets)} given)")
    group_by = tuple(p for p in parts if p in q.SUMMARY_GROUPS)
    result = q.summary(b.usage, filters, group_by, buckets[0] if buckets else "none",
                       b.settings()["model_prices"], now=now,
                       fields=SUMMARY_TABLE if fmt == "table" else q.SUMMARY_COUNTS)
    table = [{**r, "bucket": fmt_time(r.get("bucket")), **{g: r[g] or "-" for g in group_by},
              **{c: _count(r[c]) for c in ("requests", "errors", "metered", "total_tokens")},
              "cost": "-" if r["cost"] is None else f"${r['cost']:.4f}",
              **{c: _num(r[c]) for c in SUMMARY_TABLE[5:]}} for r in result.rows]
    _output(fmt, result.rows, result.columns, table, [*(["bucket"] if buckets else []), *group_by, *SUMMARY_TABLE])
    if fmt == "table":
        span = {60: "minute", 3600: "hour", 86400: "day"}[result.span]
        click.echo(f"(from the per-{span} rollups, {fmt_time(result.since) if result.since else 'the start'} to "
                   f"{fmt_time(result.until) if result.until else 'now'}; durations and TTFB in seconds, "
                   f"percentiles estimated from histograms)")


def _output(fmt: str, rows: list[dict], columns: list[str], table: list[dict], table_columns: list[str]) -> None:
    if fmt == "json":
        click.echo(json.dumps(rows, indent=2))
    elif fmt == "csv":
        for chunk in q.to_csv(columns, rows):
            click.echo(chunk, nl=False)
    else:
        print_table(table, table_columns)


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
    """Live generation, whether the files on disk were changed by hand, token metering."""
    print_status(b)


@main.command("status")
@with_bastion
def status(b: Bastion) -> None:
    """Live generation, nginx, drift and token metering (as `config status`)."""
    print_status(b)


def print_status(b: Bastion) -> None:
    changed = generations.drifted(b.dirs)
    click.echo(f"live generation {generations.live(b.dirs)}; nginx "
               f"{'running' if b.nginx.master_pid() else 'not running'}; "
               + (f"DRIFT: changed by hand: {', '.join(changed)}" if changed else "no drift"))
    click.echo(f"token metering: {metering.detect(b.nginx.binary).status}")
    for problem in snapshot.edit_problems(b):
        click.echo(f"warning: {problem}")


@config.command("show")
@with_bastion
def config_show(b: Bastion) -> None:
    click.echo(f"# live generation {generations.live(b.dirs)}: {b.dirs.nginx_conf} (upstream keys masked)")
    click.echo(generations.live_text_masked(b.dirs) or "# not rendered yet")
