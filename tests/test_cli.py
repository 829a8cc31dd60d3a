"""The CLI has the API's power: one pass over every command group on a stopped stack (nginx -t only)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from manager.cli import main
from tests.conftest import needs_nginx

pytestmark = needs_nginx


@pytest.fixture
def bastion_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("BASTION_ADMIN_PASSWORD", raising=False)
    data = tmp_path / "data"

    def run(*args: str, ok: bool = True, input: str | None = None) -> str:
        result = CliRunner().invoke(main, ["--data-dir", str(data), *args], input=input, catch_exceptions=False)
        if ok:
            assert result.exit_code == 0, result.output
        else:
            assert result.exit_code != 0, result.output
        return result.output

    return run


def test_first_start_generates_the_admin_password_once(bastion_cli) -> None:
    out = bastion_cli("init")
    assert "created admin user 'admin' with password:" in out
    assert "created admin user" not in bastion_cli("init")


def test_keys_update(bastion_cli) -> None:
    bastion_cli("init")
    key_id = bastion_cli("keys", "create", "k1").splitlines()[1].split()[2]
    out = json.loads(bastion_cli("keys", "update", key_id, "--models", "llama*", "--rpm", "5", "--expires", "30d",
                                 "--cidr-groups", "private", "--name", "renamed"))
    assert out["models"] == ["llama*"] and out["rpm"] == 5 and out["expires"] and out["name"] == "renamed"
    assert out["cidr_groups"] == ["private"]
    assert json.loads(bastion_cli("keys", "update", key_id, "--expires", "never"))["expires"] is None
    assert "nothing to change" in bastion_cli("keys", "update", key_id, ok=False)
    assert "cidr_groups[0]: unknown CIDR group" in bastion_cli("keys", "update", key_id, "--cidr-groups", "x", ok=False)


def test_pools_update_and_upstreams(bastion_cli) -> None:
    bastion_cli("pools", "add", "p", "--url", "http://127.0.0.1:9", "--models", "m")
    bastion_cli("pools", "update", "p", "--method", "least_conn", "--api-key", "sk-1")
    bastion_cli("pools", "add-upstream", "p", "http://127.0.0.1:10", "--weight", "3", "--backup")
    pool = json.loads(bastion_cli("pools", "list", "--json"))[0]
    assert pool["method"] == "least_conn" and pool["api_key_set"]
    assert pool["upstreams"][1] == {"url": "http://127.0.0.1:10", "weight": 3, "backup": True, "down": False,
                                    "health": "unknown", "error": None, "error_since": None, "checked_at": None}
    assert "server 127.0.0.1:10 weight=3" in bastion_cli("config", "show")
    assert "sk-1" not in bastion_cli("config", "show")
    bastion_cli("pools", "remove-upstream", "p", "http://127.0.0.1:10/")
    assert len(json.loads(bastion_cli("pools", "list", "--json"))[0]["upstreams"]) == 1
    assert "not found" in bastion_cli("pools", "remove-upstream", "p", "http://127.0.0.1:11", ok=False)
    assert "at least one upstream" in bastion_cli("pools", "remove-upstream", "p", "http://127.0.0.1:9", ok=False)


def test_users_and_lockouts(bastion_cli) -> None:
    bastion_cli("init")
    bastion_cli("users", "add", "vera", "--role", "viewer", "--password", "vera-password")
    assert "vera" in bastion_cli("users", "list")
    bastion_cli("users", "role", "vera", "admin")
    bastion_cli("users", "passwd", "vera", "--password", "another-password")
    assert "password: must be 8 to 256" in bastion_cli("users", "passwd", "vera", "--password", "short", ok=False)
    bastion_cli("users", "remove", "vera")
    assert "the last admin cannot be removed" in bastion_cli("users", "remove", "admin", ok=False)
    assert "cleared 0" in bastion_cli("auth", "unlock")


def test_cidr_groups_settings_config_and_audit(bastion_cli) -> None:
    bastion_cli("init")
    bastion_cli("cidr-groups", "add", "office", "--allow", "10.1.0.0/16", "--deny", "10.1.2.0/24")
    assert "10.1.0.0/16" in bastion_cli("cidr-groups", "list")
    bastion_cli("settings", "set", "public_cidr_groups", '["office"]')
    conf = bastion_cli("config", "show")
    assert "deny 10.1.2.0/24;\n        allow 10.1.0.0/16;\n        deny all;" in conf
    assert "attached to public_cidr_groups" in bastion_cli("cidr-groups", "remove", "office", ok=False)
    history = bastion_cli("config", "history")
    assert "*" in history
    live = int(bastion_cli("config", "status").split()[2].rstrip(";"))
    assert "+        allow 10.1.0.0/16;" in bastion_cli("config", "diff", str(live))
    bastion_cli("config", "rollback", str(live - 1))
    assert json.loads(bastion_cli("settings", "show"))["public_cidr_groups"] == []
    assert "no drift" in bastion_cli("config", "status")
    audit = bastion_cli("audit")
    assert "roll back configuration to generation" in audit and 'set public_cidr_groups=["office"]' in audit
    assert "office" in bastion_cli("cidr-groups", "list")  # created while that generation was live
    assert "allow 10.2.0.0/16" in bastion_cli("cidr-groups", "update", "office", "--allow", "10.2.0.0/16")
    bastion_cli("settings", "set", "admin_cidr_groups", '["office", "private"]')
    assert "allow 10.2.0.0/16;" in bastion_cli("config", "show")
