"""Admin users, sign-in lockouts, CIDR groups and brute-force blocks."""

from __future__ import annotations

import json

import click

from manager import auth as auth_mod
from manager import blocks as blocks_mod
from manager import cidr_groups as cidr_groups_mod
from manager import users as users_mod
from manager.cli import csv, fmt_time, main, print_table, with_bastion
from manager.context import Bastion


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


@main.group("blocks")
def blocks_group() -> None:
    """Clients the gate refuses after too many invalid API keys."""


@blocks_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@with_bastion
def blocks_list(b: Bastion, as_json: bool) -> None:
    rows = blocks_mod.listing(b)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    print_table([{**r, "since": fmt_time(r["since"]), "until": fmt_time(r["until"])} for r in rows],
                ["address", "since", "until", "retry_after", "blocks", "failures", "refused"])


@blocks_group.command("clear")
@click.argument("address", required=False)
@click.option("--all", "everything", is_flag=True, help="Lift every block and forget all failure counts.")
@with_bastion
def blocks_clear(b: Bastion, address: str | None, everything: bool) -> None:
    """Lift the block of ADDRESS (an IP address, or an IPv6 /64), or of every client with --all."""
    if everything == (address is not None):
        raise click.UsageError("give an ADDRESS or --all")
    result = blocks_mod.clear(b, None if everything else address)
    note = "" if result["applied"] else " (no running gate confirmed it; a restarted gate holds no blocks)"
    click.echo(f"cleared {len(result['cleared'])} block(s){': ' if result['cleared'] else ''}"
               f"{', '.join(result['cleared'])}{note}")
