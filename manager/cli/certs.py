"""`bastion certs`: obtain, list, renew, upload, remove, the Cloudflare token, and certbot's deploy hook."""

from __future__ import annotations

import functools
import json
import os
import sys

import click

from manager.certs import manage
from manager.certs.certbot import CertbotFailed
from manager.certs.preflight import AcmeUnavailable
from manager.cli import fmt_time, main, print_table, with_bastion
from manager.context import Bastion


def acme_errors(fn):
    """A failure on the ACME side becomes a clean message and a non-zero exit."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (CertbotFailed, AcmeUnavailable) as e:
            raise click.ClickException(f"nothing was changed: {e}") from None
    return wrapper


@main.group()
def certs() -> None:
    """TLS certificates: ACME (Let's Encrypt or any ACME server) through certbot, or uploaded."""


@certs.command("obtain")
@click.argument("domains", nargs=-1, required=True)
@click.option("--challenge", type=click.Choice(["http-01", "dns-01"]), default="http-01", show_default=True,
              help="http-01: the HTTP listener answers; dns-01: a TXT record through the Cloudflare API.")
@click.option("--name", help="Certificate name (default: the first domain).")
@click.option("--probe-url", help="Check the challenge directory through this base URL instead of the HTTP listener.")
@with_bastion
@acme_errors
def certs_obtain(b: Bastion, domains: tuple[str, ...], challenge: str, name: str | None,
                 probe_url: str | None) -> None:
    """Obtain a certificate for DOMAINS from the ACME server (acme_server setting)."""
    status = manage.obtain(b, list(domains), challenge, "cli", lambda step: click.echo(f"  {step}"),
                           name=name, probe_url=probe_url)
    click.echo(f"certificate {status['name']} for {', '.join(status['domains'])}, valid until "
               f"{fmt_time(status['not_after'])} ({status['days_left']} days)")


@certs.command("list")
@click.option("--json", "as_json", is_flag=True)
@with_bastion
def certs_list(b: Bastion, as_json: bool) -> None:
    """Every certificate with its names, issuer, validity and last renewal."""
    rows = manage.all_certificates(b)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    print_table([{**r, "domains": ",".join(r["domains"]), "expires": fmt_time(r["not_after"]),
                  "days_left": "-" if r["days_left"] is None else r["days_left"],
                  "last_renewal": _renewal(r["last_renewal"])} for r in rows],
                ["name", "source", "domains", "expires", "days_left", "issuer", "last_renewal"])


def _renewal(entry: dict | None) -> str:
    if not entry:
        return "-"
    return f"{fmt_time(entry['time'])} {'ok' if entry['ok'] else 'FAILED: ' + entry['message'].splitlines()[0]}"


@certs.command("renew")
@click.argument("name", required=False)
@click.option("--force", is_flag=True, help="Renew even if not due.")
@with_bastion
@acme_errors
def certs_renew(b: Bastion, name: str | None, force: bool) -> None:
    """Renew the ACME certificates that are due (or NAME); certbot runs the deploy hook after each renewal."""
    results = manage.renew(b, "cli", name, force=force)
    for r in results:
        click.echo(f"{r['name']}: {r['message'] if r['ok'] else 'FAILED: ' + r['message']}")
    if not results:
        click.echo("no certificate from an ACME server")
    if not all(r["ok"] for r in results):
        sys.exit(1)


@certs.command("upload")
@click.argument("domains", nargs=-1, required=True)
@click.option("--cert", "cert_file", type=click.File("r"), required=True,
              help="PEM: the certificate, then its chain (leaf first).")
@click.option("--key", "key_file", type=click.File("r"), required=True, help="PEM: its private key (unencrypted).")
@click.option("--name", help="Certificate name (default: the first domain).")
@with_bastion
def certs_upload(b: Bastion, domains: tuple[str, ...], cert_file, key_file, name: str | None) -> None:
    """Store an existing certificate for DOMAINS after checking it (key, chain order, validity, names)."""
    status = manage.upload(b, cert_file.read(), key_file.read(), list(domains), "cli", name=name)
    click.echo(f"certificate {status['name']} stored; valid until {fmt_time(status['not_after'])} "
               f"({status['days_left']} days)")


@certs.command("remove")
@click.argument("name")
@with_bastion
@acme_errors
def certs_remove(b: Bastion, name: str) -> None:
    """Remove a certificate and its key."""
    manage.remove(b, name, "cli")
    click.echo(f"certificate {name} removed")


@certs.command("cloudflare-token")
@click.option("--remove", is_flag=True, help="Remove the stored token.")
@with_bastion
def certs_cloudflare_token(b: Bastion, remove: bool) -> None:
    """Store the Cloudflare API token for dns-01 (Zone:DNS:Edit), read from the terminal or stdin (never an
    argument: it would show in the process list)."""
    token = None
    if not remove:
        interactive = sys.stdin.isatty()
        token = click.prompt("Cloudflare API token", hide_input=True) if interactive else sys.stdin.readline().strip()
    is_set = manage.set_cloudflare_token(b, token, "cli")
    click.echo("Cloudflare API token stored" if is_set else "Cloudflare API token removed")


@certs.command("deployed")
@click.option("--lineage", envvar="RENEWED_LINEAGE", required=True, help="certbot sets RENEWED_LINEAGE.")
@with_bastion
def certs_deployed(b: Bastion, lineage: str) -> None:
    """certbot's deploy hook after a renewal: re-applies the nginx configuration (serving the new files)."""
    name = manage.deployed(b, os.path.basename(lineage))
    click.echo(f"certificate {name} deployed")
