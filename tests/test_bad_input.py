"""Bad input gets a clear error naming the field, and nothing changes on disk (store, nginx config, snapshot)."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path

import pytest
from click.testing import CliRunner

from manager.cli import main
from tests.conftest import needs_nginx

pytestmark = needs_nginx


def run(data_dir: Path, *args: str):
    return CliRunner().invoke(main, ["--data-dir", str(data_dir), *args], catch_exceptions=False)


def _content(path: Path) -> bytes:
    """What a file holds; for SQLite its rows (opening a database may rewrite its header and add -wal/-shm)."""
    if path.suffix != ".sqlite3":
        return path.read_bytes()
    with sqlite3.connect(path) as db:
        return "\n".join(db.iterdump()).encode()


def fingerprint(data_dir: Path) -> dict[str, str]:
    """Hash of every file Bastion keeps (the lock file, logs and SQLite's journal files aside)."""
    skip = {"store.json.lock", "nginx.pid"}
    return {
        str(p.relative_to(data_dir)): hashlib.sha256(_content(p)).hexdigest() if p.is_file() else "dir"
        for p in sorted(data_dir.rglob("*"))
        if p.name not in skip and "logs" not in p.parts and not p.is_symlink()
        and not p.name.endswith(("-wal", "-shm"))
    } | {"live": str((data_dir / "nginx" / "live").resolve())}


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    assert run(d, "init").exit_code == 0
    assert run(d, "pools", "add", "main", "--url", "http://127.0.0.1:9", "--models", "m1").exit_code == 0
    return d


BAD_COMMANDS = [
    (["pools", "add", "p2", "--url", "http://127.0.0.1:9/ ;return 200", "--models", "m"], "upstreams[0].url"),
    (["pools", "add", "p2", "--url", "http://a;b:80", "--models", "m"], "upstreams[0].url"),
    (["pools", "add", "p2", "--url", "http://h}ost:80", "--models", "m"], "upstreams[0].url"),
    (["pools", "add", "p2", "--url", "http://host{:80", "--models", "m"], "upstreams[0].url"),
    (["pools", "add", "p2", "--url", "http://host:80/$uri", "--models", "m"], "upstreams[0].url"),
    (["pools", "add", "p2", "--url", "ftp://host:21", "--models", "m"], "upstreams[0].url"),
    (["pools", "add", "p2", "--url", "file:///etc/passwd", "--models", "m"], "upstreams[0].url"),
    (["pools", "add", "p2", "--url", "http://host:99999", "--models", "m"], "upstreams[0].url"),
    (["pools", "add", "p2", "--url", "http://host:80/v1", "--models", "m"], "upstreams[0].url"),
    (["pools", "add", "bad;name", "--url", "http://127.0.0.1:9", "--models", "m"], "name"),
    (["pools", "add", "Main", "--url", "http://127.0.0.1:9", "--models", "m"], "name"),
    (["pools", "add", "main", "--url", "http://127.0.0.1:10", "--models", "m"], "name"),
    (["pools", "add", "p2", "--url", "http://127.0.0.1:9", "--api-key", "sk-1\"; return 200"], "api_key"),
    (["pools", "add", "p2", "--url", "http://127.0.0.1:9", "--models", "bad model"], "models[0]"),
    (["pools", "add", "p2", "--url", "http://127.0.0.1:9", "--backup-url", "http://127.0.0.1:10",
      "--method", "hash", "--models", "m"], "upstreams"),
    (["pools", "add", "p2", "--url", "http://127.0.0.1:9", "--models", "m", "--retries", "11"], "retries"),
    (["pools", "add", "p2", "--url", "http://127.0.0.1:9", "--models", "m", "--retry-timeout", "-1"],
     "retry_timeout"),
    (["pools", "add", "p2", "--url", "http://127.0.0.1:9", "--models", "m", "--read-timeout", "0"], "read_timeout"),
    (["pools", "update", "main", "--connect-timeout", "301"], "connect_timeout"),
    (["pools", "update", "main", "--retries", "-1"], "retries"),
    (["routes", "set", "m1", *[a for i in range(9) for a in ("--pool", f"p{i}")]], "pools"),
    (["routes", "set", "m1", "--pool", "nope"], "pools[0]"),
    (["routes", "set", "m1;", "--pool", "main"], "model"),
    (["keys", "create", "evil;name"], "name"),
    (["keys", "create", "evil{name}"], "name"),
    (["keys", "create", "a$b"], "name"),
    (["keys", "create", "ok", "--models", "a b"], "models[0]"),
    (["keys", "create", "ok", "--rpm", "-1"], "rpm"),
    (["keys", "create", "ok", "--expires", "yesterday"], "expires"),
    (["keys", "create", "ok", "--expires", "2001-01-01"], "expires"),
    (["keys", "create", "ok", "--expires", "999999w"], "expires"),  # year ~21000: no calendar shows it
    (["keys", "create", "ok", "--expires", "9999-12-31T23:59:59"], "expires"),
    (["keys", "create", "ok", "--expires", "0001-01-01"], "expires"),  # astimezone() raised on it
    (["keys", "create", "ok", "--cidrs", "10.0.0.1/33"], "cidrs[0]"),
    (["keys", "create", "ok", "--cidrs", "0.0.0.0/0; allow all"], "cidrs[0]"),
    (["keys", "create", "ok", "--endpoints", "/v1/{x}"], "endpoints[0]"),
    (["settings", "set", "cors_origins", "https://app.example.com/"], "cors_origins[0]"),
    (["settings", "set", "cors_origins", "https://app.example.com/path"], "cors_origins[0]"),
    (["settings", "set", "cors_origins", "app.example.com"], "cors_origins[0]"),
    (["settings", "set", "cors_origins", 'https://a.example.com";return 200;#'], "cors_origins[0]"),
    (["settings", "set", "cors_origins", "null"], "cors_origins"),
    (["settings", "set", "cors_origins", "*,https://app.example.com"], "cors_origins"),
    (["settings", "set", "cors_methods", "GET,PO ST"], "cors_methods[1]"),
    (["settings", "set", "cors_headers", "Authorization,X-Bad;"], "cors_headers[1]"),
    (["settings", "set", "cors_credentials", "yes"], "cors_credentials"),
    (["settings", "set", "unauthenticated_rpm", "1000001"], "unauthenticated_rpm"),
    (["settings", "set", "openai_paths_without_v1", "1"], "openai_paths_without_v1"),
    (["pools", "update", "main", "--passthrough", "/tokenize,/v1/tokenize"], "passthrough[1]"),
    (["pools", "update", "main", "--passthrough", "/../etc"], "passthrough[0]"),
    (["pools", "update", "main", "--passthrough", "/x;return 200"], "passthrough[0]"),
    (["pools", "update", "main", "--passthrough", "/completions"], "passthrough[0]"),
    (["pools", "add", "p2", "--url", "http://127.0.0.1:9", "--models", "m", "--passthrough", "/a*b"],
     "passthrough[0]"),
    (["keys", "create", "ok", "--max-parallel", "0"], "max_parallel"),
    (["keys", "create", "ok", "--max-parallel", "2; limit_conn x 9"], "max_parallel"),
    (["keys", "create", "ok", "--default-model", "a b"], "default_model"),
    (["keys", "create", "ok", "--default-model", "auto"], "default_model"),
    (["pools", "add", "p2", "--url", "http://127.0.0.1:9", "--models", "m", "--alias", "pub=bad model"],
     "aliases.pub"),
    (["pools", "add", "p2", "--url", "http://127.0.0.1:9", "--models", "m", "--alias", "m=x"], "aliases.m"),
    (["pools", "update", "main", "--alias", "x;y=m1"], "aliases"),
    (["settings", "set", "auto_models", '["m1", "ll*"]'], "auto_models[1]"),
    (["up", "--public", "127.0.0.1:notaport"], "public_listen"),
    (["up", "--admin", "localhost:8081"], "admin_listen"),
]


@pytest.mark.parametrize(("args", "field"), BAD_COMMANDS, ids=[" ".join(a) for a, _ in BAD_COMMANDS])
def test_bad_input_is_refused_and_changes_nothing(data_dir: Path, args: list[str], field: str) -> None:
    before = fingerprint(data_dir)
    result = run(data_dir, *args)
    assert result.exit_code != 0
    assert f"Error: {field}" in result.output, result.output
    assert fingerprint(data_dir) == before


def test_cors_credentials_refused_with_any_origin(data_dir: Path) -> None:
    assert run(data_dir, "settings", "set", "cors_origins", "*").exit_code == 0
    before = fingerprint(data_dir)
    result = run(data_dir, "settings", "set", "cors_credentials", "true")
    assert result.exit_code != 0 and "Error: cors_credentials" in result.output, result.output
    assert fingerprint(data_dir) == before
    assert run(data_dir, "settings", "set", "cors_origins", "https://app.example.com").exit_code == 0
    assert run(data_dir, "settings", "set", "cors_credentials", "true").exit_code == 0
    before = fingerprint(data_dir)
    result = run(data_dir, "settings", "set", "cors_origins", "*")
    assert result.exit_code != 0 and "Error: cors_origins" in result.output, result.output
    assert fingerprint(data_dir) == before


def test_pool_removal_refused_while_routed(data_dir: Path) -> None:
    assert run(data_dir, "routes", "set", "m*", "--pool", "main").exit_code == 0
    before = fingerprint(data_dir)
    result = run(data_dir, "pools", "remove", "main")
    assert result.exit_code != 0 and "used by the routes for m*" in result.output
    assert fingerprint(data_dir) == before


def test_unknown_key_and_pool(data_dir: Path) -> None:
    assert "key 'nope' not found" in run(data_dir, "keys", "revoke", "nope").output
    assert "pool 'nope' not found" in run(data_dir, "pools", "remove", "nope").output


def test_key_secret_is_shown_once_and_stored_hashed(data_dir: Path) -> None:
    result = run(data_dir, "keys", "create", "alice@example.com", "--models", "llama*,gpt-4o", "--rpm", "10")
    assert result.exit_code == 0, result.output
    token = result.output.splitlines()[0]
    assert token.startswith("bst_")
    for path in data_dir.rglob("*"):
        if path.is_file():
            assert token.encode() not in path.read_bytes(), path
            assert token.split("_")[2].encode() not in path.read_bytes(), path
    listing = run(data_dir, "keys", "list", "--json").output
    assert token not in listing and "digest" not in listing
    key = json.loads(listing)[0]
    assert key["key"].endswith("****") and key["models"] == ["llama*", "gpt-4o"] and key["rpm"] == 10
    for secret_file in ("pepper", "store.json", "snapshot.json"):
        assert (data_dir / secret_file).stat().st_mode & 0o777 == 0o600


def test_upstream_api_key_never_echoed(data_dir: Path) -> None:
    assert run(data_dir, "pools", "add", "paid", "--url", "https://api.example.invalid", "--api-key", "sk-secret-1",
               "--models", "gpt-x").exit_code == 0
    listing = run(data_dir, "pools", "list", "--json").output
    assert "sk-secret-1" not in listing and '"api_key_set": true' in listing
    confs = sorted((data_dir / "nginx" / "live").glob("*.conf"))  # nginx.conf and the files it includes
    assert len(confs) > 1 and all(conf.stat().st_mode & 0o777 == 0o600 for conf in confs)
    text = "".join(conf.read_text() for conf in confs)
    # the unresolvable host does not stop nginx from starting: it is rendered as a down server
    assert "api.example.invalid did not resolve" in text and 'Authorization "Bearer sk-secret-1"' in text


def test_corrupt_store_is_a_clear_startup_error(data_dir: Path) -> None:
    store = data_dir / "store.json"
    store.write_text('{"keys": {"1": {"id": "abc"')  # half-written
    result = run(data_dir, "keys", "list")
    assert result.exit_code != 0
    assert f"{store} is not valid JSON" in result.output
    assert store.read_text() == '{"keys": {"1": {"id": "abc"'  # never overwritten


# Numbers Python's json accepts but no consumer can handle: NaN/Infinity (json.loads takes them) and times
# beyond the year 9999 (datetime, the CLI and the admin page could not show them).
BAD_EXPIRIES = ["1e308", "NaN", "Infinity", "-Infinity", "1e999", '"999999w"', "1" + "0" * 400,
                '"9999-12-31T23:59:59+00:00"', '"0001-01-01"', "true", "[]"]


@pytest.mark.parametrize("raw", BAD_EXPIRIES)
def test_api_refuses_expiries_no_consumer_can_handle(data_dir: Path, raw: str) -> None:
    from manager import users
    from manager.app import create_app

    app = create_app({"DATA_DIR": str(data_dir)})
    users.create(app.extensions["bastion"], "root", "root-password", "admin")
    client = app.test_client()
    token = client.post("/auth/token", json={"username": "root", "password": "root-password"}).json["token"]
    assert run(data_dir, "keys", "create", "victim").exit_code == 0
    key_id = json.loads(run(data_dir, "keys", "list", "--json").output)[0]["id"]
    before = fingerprint(data_dir)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    for method, path, body in (("POST", "/api/v1/keys", '{"name": "ok", "expires": ' + raw + "}"),
                               ("PATCH", f"/api/v1/keys/{key_id}", '{"expires": ' + raw + "}")):
        r = client.open(path, method=method, data=body, headers=headers)
        assert r.status_code == 400, (path, raw, r.text)
        # NaN and Infinity are not JSON: the body is refused before any field is read
        field = "body" if raw.lstrip("-") in ("NaN", "Infinity") else "expires"
        assert r.json["error"]["field"] == field and r.json["message"].startswith(f"{field}: "), r.json
    assert fingerprint(data_dir) == before


@pytest.mark.parametrize("stored", [1e308, 999999 * 604800 + 1.8e9, -1e20, float("nan")])
def test_keys_list_survives_any_stored_expiry(data_dir: Path, stored: object) -> None:
    """Stores written by older versions may hold expiries the validator accepted then."""
    assert run(data_dir, "keys", "create", "old").exit_code == 0
    with sqlite3.connect(data_dir / "keys.sqlite3") as db:
        db.execute("UPDATE keys SET expires = ?", (stored,))
    result = run(data_dir, "keys", "list")
    assert result.exit_code == 0, result.output
    assert "invalid (" in result.output or stored != stored  # SQLite stores NaN as NULL: shown as never


def test_epoch_query_params_are_bounded(data_dir: Path) -> None:
    from manager import users
    from manager.app import create_app

    app = create_app({"DATA_DIR": str(data_dir)})
    users.create(app.extensions["bastion"], "root", "root-password", "admin")
    client = app.test_client()
    token = client.post("/auth/token", json={"username": "root", "password": "root-password"}).json["token"]
    for path in ("/api/v1/usage", "/api/v1/usage/records", "/api/v1/audit"):
        for bad in ("nan", "inf", "1e308", "-1", "x"):
            r = client.get(f"{path}?since={bad}", headers={"Authorization": f"Bearer {token}"})
            assert r.status_code == 400 and r.json["error"]["field"] == "since", (path, bad, r.text)


def test_missing_pepper_is_never_silently_replaced(data_dir: Path) -> None:
    """A new pepper would turn every existing key into a wrong one: refuse, name the file, create nothing."""
    assert run(data_dir, "keys", "create", "k").exit_code == 0
    (data_dir / "pepper").unlink()
    result = run(data_dir, "keys", "list")
    assert result.exit_code != 0 and f"{data_dir / 'pepper'} is missing" in result.output, result.output
    assert not (data_dir / "pepper").exists()
