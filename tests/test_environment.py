"""Configuration by environment variables (containers): secrets from a variable or a file, settings applied by
`bastion up`, bad values refused naming the variable with nothing changed."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from manager import auth, environment, users
from manager.cli import main
from manager.context import Bastion
from manager.datadir import DataDir
from manager.validation import ValidationError
from tests.conftest import free_port


@pytest.fixture
def bastion(tmp_path: Path) -> Bastion:
    return Bastion(DataDir.at(tmp_path / "data"))


def test_secret_from_the_variable_or_a_file(tmp_path: Path) -> None:
    name = environment.ADMIN_PASSWORD
    assert environment.secret(name, {}) is None
    assert environment.secret(name, {name: ""}) is None
    assert environment.secret(name, {name: "from-env"}) == "from-env"
    file = tmp_path / "pw"
    file.write_text("from file \n")  # one final newline goes (echo adds it), inner spaces stay
    assert environment.secret(name, {f"{name}_FILE": str(file)}) == "from file "


@pytest.mark.parametrize(("env", "field", "message"), [
    ({"BASTION_ADMIN_PASSWORD": "a", "BASTION_ADMIN_PASSWORD_FILE": "/x"}, "BASTION_ADMIN_PASSWORD", "not both"),
    ({"BASTION_ADMIN_PASSWORD_FILE": "/nonexistent/pw"}, "BASTION_ADMIN_PASSWORD_FILE", "cannot read"),
    ({"BASTION_ADMIN_PASSWORD_FILE": "EMPTY"}, "BASTION_ADMIN_PASSWORD_FILE", "is empty"),
])
def test_bad_secret_names_the_variable(tmp_path: Path, env: dict, field: str, message: str) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n")
    env = {k: str(empty) if x == "EMPTY" else x for k, x in env.items()}
    with pytest.raises(ValidationError) as e:
        environment.secret(environment.ADMIN_PASSWORD, env)
    assert e.value.field == field and message in e.value.message


def test_children_get_no_secrets() -> None:
    env = {"PATH": "/bin", "BASTION_ADMIN_PASSWORD": "pw", "BASTION_CLOUDFLARE_API_TOKEN": "t",
           "BASTION_DATA_DIR": "/data"}
    assert environment.child_env(env) == {"PATH": "/bin", "BASTION_DATA_DIR": "/data"}


def test_admin_password_from_a_file(bastion: Bastion, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BASTION_ADMIN_PASSWORD", raising=False)
    file = tmp_path / "admin_password"
    file.write_text("s3cret-from-a-file\n")
    monkeypatch.setenv("BASTION_ADMIN_PASSWORD_FILE", str(file))
    assert users.ensure_admin(bastion) is None  # chosen, so not shown
    assert auth.login(bastion, "admin", "s3cret-from-a-file", "127.0.0.1")


def test_settings_from_the_environment(bastion: Bastion) -> None:
    env = {"BASTION_ACME_EMAIL": "ops@example.com", "BASTION_TRUSTED_PROXIES": "10.0.0.0/8, 192.0.2.0/24",
           "BASTION_SERVER_NAME": "", "BASTION_ACME_SERVER": ""}
    assert environment.settings(bastion, env) == {"acme_email": "ops@example.com",
                                                  "trusted_proxies": ["10.0.0.0/8", "192.0.2.0/24"]}
    bastion.store.update_settings(acme_email="ops@example.com")
    assert environment.settings(bastion, env) == {"trusted_proxies": ["10.0.0.0/8", "192.0.2.0/24"]}


@pytest.mark.parametrize(("var", "value"), [("BASTION_ACME_EMAIL", "not-an-email"),
                                            ("BASTION_TRUSTED_PROXIES", "10.0.0.0/8,nonsense"),
                                            ("BASTION_ACME_SERVER", "ftp://acme.example")])
def test_bad_setting_names_the_variable(bastion: Bastion, var: str, value: str) -> None:
    with pytest.raises(ValidationError) as e:
        environment.settings(bastion, {var: value})
    assert e.value.field.startswith(var)  # BASTION_TRUSTED_PROXIES[1]: the second entry


def test_cloudflare_token_stored_once(bastion: Bastion) -> None:
    bastion.dirs.ensure()
    path = bastion.dirs.cloudflare_credentials
    assert environment.apply_cloudflare_token(bastion, {}) is False and not path.exists()
    assert environment.apply_cloudflare_token(bastion, {"BASTION_CLOUDFLARE_API_TOKEN": "tok-1"}) is True
    assert "tok-1" in path.read_text() and path.stat().st_mode & 0o777 == 0o600
    assert environment.apply_cloudflare_token(bastion, {"BASTION_CLOUDFLARE_API_TOKEN": "tok-1"}) is False
    with pytest.raises(ValidationError) as e:
        environment.apply_cloudflare_token(bastion, {"BASTION_CLOUDFLARE_API_TOKEN": "two\nlines"})
    assert e.value.field == "BASTION_CLOUDFLARE_API_TOKEN" and "tok-1" in path.read_text()


def test_up_refuses_a_bad_variable_before_starting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BASTION_ACME_EMAIL", "not-an-email")
    monkeypatch.setenv("BASTION_PUBLIC_LISTEN", "127.0.0.1:1")
    data = tmp_path / "data"
    result = CliRunner().invoke(main, ["--data-dir", str(data), "up"])
    assert result.exit_code != 0 and "BASTION_ACME_EMAIL" in result.output, result.output
    assert Bastion(DataDir.at(data)).settings()["public_listen"] != "127.0.0.1:1"  # nothing changed


def test_healthcheck_fails_without_a_stack(bastion: Bastion) -> None:
    bastion.store.update_settings(public_listen=f"127.0.0.1:{free_port()}")  # never another stack's port
    result = CliRunner().invoke(main, ["--data-dir", str(bastion.dirs.root), "healthcheck"])
    assert result.exit_code != 0 and "/healthz" in result.output, result.output


def test_stop_timeout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert environment.stop_timeout({}) == 10
    assert environment.stop_timeout({"BASTION_STOP_TIMEOUT": "8"}) == 8
    for bad in ("0", "abc", "99999"):
        with pytest.raises(ValidationError) as e:
            environment.stop_timeout({"BASTION_STOP_TIMEOUT": bad})
        assert e.value.field == "BASTION_STOP_TIMEOUT"
    monkeypatch.setenv("BASTION_STOP_TIMEOUT", "soon")
    result = CliRunner().invoke(main, ["--data-dir", str(tmp_path / "data"), "up"])
    assert result.exit_code != 0 and "BASTION_STOP_TIMEOUT" in result.output, result.output
