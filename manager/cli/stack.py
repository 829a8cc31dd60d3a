"""`bastion init` and `bastion up`."""

from __future__ import annotations

import logging
import os

import click

from authsvc import logconfig
from manager import environment, generations
from manager import settings as settings_mod
from manager import users as users_mod
from manager.apply import healthz_url
from manager.cli import main, with_bastion
from manager.context import Bastion
from manager.store import StoreCorrupt

log = logging.getLogger(__name__)


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
@click.option("--public", envvar="BASTION_PUBLIC_LISTEN",
              help="Public listener HOST:PORT (saved; default 127.0.0.1:8080; env BASTION_PUBLIC_LISTEN).")
@click.option("--admin", envvar="BASTION_ADMIN_LISTEN",
              help="Admin listener HOST:PORT (saved; default 127.0.0.1:8081; env BASTION_ADMIN_LISTEN).")
@click.option("--http", envvar="BASTION_HTTP_LISTEN", help="HTTP listener HOST:PORT: ACME challenges, redirect to "
              "HTTPS (saved; default off; env BASTION_HTTP_LISTEN).")
@click.option("--https", envvar="BASTION_HTTPS_LISTEN", help="HTTPS listener HOST:PORT, serving once a certificate "
              "exists (saved; default off; env BASTION_HTTPS_LISTEN).")
@click.option("--nginx", "nginx_path", help="Path of the nginx binary (same as the global --nginx).")
@click.option("--log-level", type=click.Choice(logconfig.LEVELS, case_sensitive=False), envvar=logconfig.ENV,
              default="INFO", show_default=True, help="Detail of the log lines of every process (stderr and logs/).")
@with_bastion(check_store=False)
def up(b: Bastion, public: str | None, admin: str | None, http: str | None, https: str | None,
       nginx_path: str | None, log_level: str) -> None:
    """Run nginx, the gate and the manager in the foreground until Ctrl-C."""
    from manager.supervisor import Supervisor

    logconfig.configure(log_level)
    os.environ[logconfig.ENV] = log_level.upper()  # the children log at the same level
    if nginx_path:
        b.nginx.binary = nginx_path
    environment.stop_timeout()  # a bad BASTION_STOP_TIMEOUT is refused before anything is changed
    if running := b.nginx.master_pid():  # before anything is changed: never move a live stack's listeners
        raise click.ClickException(f"Bastion for {b.dirs.root} is already running (nginx pid {running})")
    try:
        b.store.check()
    except StoreCorrupt as e:
        # the data plane does not need the store: serve the last good configuration while it is repaired
        if not generations.live(b.dirs):
            raise click.ClickException(str(e)) from None
        log.error("%s", e)
        log.error("starting on the last good configuration (generation %d); listener options and admin set-up "
                  "wait until the store is repaired", generations.live(b.dirs))
    else:
        changes = {k: x for k, x in (("public_listen", public), ("admin_listen", admin), ("http_listen", http),
                                     ("https_listen", https)) if x}
        current = b.settings()
        changes = {k: x for k, x in changes.items() if current.get(k) != x}
        changes.update(environment.settings(b))  # BASTION_ACME_EMAIL and friends (docs/deploy.md)
        if changes:
            settings_mod.update(b, changes, "up")
        environment.apply_cloudflare_token(b)
        announce_admin(b)
    raise SystemExit(Supervisor(b, click.echo).run())


@main.command()
@with_bastion(check_store=False)
def healthcheck(b: Bastion) -> None:
    """Exit 0 when the public listener answers /healthz (a container's HEALTHCHECK)."""
    import requests

    try:
        listen = b.settings()["public_listen"]
    except (StoreCorrupt, OSError):  # the data plane serves on while the store is repaired: ask it
        listen = settings_mod.effective(generations.live_settings(b.dirs))["public_listen"]
    url = healthz_url(listen)
    try:
        answer = requests.get(url, timeout=5)
    except requests.RequestException as e:
        raise click.ClickException(f"{url}: {type(e).__name__}") from None
    if not answer.ok:
        raise click.ClickException(f"{url}: HTTP {answer.status_code}")
    click.echo(f"{url}: ok")
