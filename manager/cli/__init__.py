"""The `bastion` command line: the same operations as the API, for operators and scripts."""

from __future__ import annotations

import functools
import os
import sqlite3
from datetime import datetime
from typing import Any

import click

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
        except sqlite3.Error as e:  # a key, usage or sign-in database that is locked, full or damaged
            raise click.ClickException(f"database error: {e}") from None
        except (ConfigTestFailed, ReloadFailed, NginxError) as e:
            raise click.ClickException(f"{e.summary}\n{e.output}".strip()) from None
    return wrapper


def csv(value: str | None) -> list[str] | None:
    """A comma-separated option as a list (None when the option was not given)."""
    return None if value is None else [x.strip() for x in value.split(",") if x.strip()]


def fmt_time(ts: Any) -> str:
    """Local time of stored epoch seconds; a value no calendar can show (older stores may hold one) is shown as is."""
    if not ts:
        return "-"
    try:
        return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M")
    except (TypeError, ValueError, OverflowError, OSError):
        return f"invalid ({ts!r})"


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


def get_bastion(ctx: click.Context, check_store: bool = True) -> Bastion:
    try:
        bastion = ctx.obj()
        if check_store:
            bastion.store.check()
        return bastion
    except StoreCorrupt as e:
        raise click.ClickException(str(e)) from None


def with_bastion(fn=None, *, check_store: bool = True):
    """Pass the data dir's `Bastion` as first argument; with `check_store` a corrupt store is reported at once."""
    def decorate(fn):
        @click.pass_context
        @friendly_errors
        @functools.wraps(fn)
        def wrapper(ctx: click.Context, *args, **kwargs):
            return fn(get_bastion(ctx, check_store), *args, **kwargs)
        return wrapper
    return decorate(fn) if fn else decorate


# the command groups register themselves on `main`
from manager.cli import access, certs, operations, resources, stack  # noqa: E402, F401

