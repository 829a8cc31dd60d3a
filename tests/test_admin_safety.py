"""Admin safety: sign-in never depends on a writable disk, and no admin locks themselves out by accident.

- Sign-in state (failure counts, logged-out tokens) lives in auth.sqlite3 plus memory (manager/logins.py):
  nothing is written before the password check, lockouts hold when the disk refuses writes, and concurrent
  wrong attempts never get more than MAX_FAILURES password checks.
- The self-lockout guard (manager/admin_guard.py): a change through the admin API that would make the admin
  listener deny the requester's own address is a 409 unless the request says force; tested through real nginx.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from manager import auth, generations, logins, users
from manager import settings as settings_mod
from manager.app import create_app
from manager.context import Bastion
from manager.datadir import DataDir
from tests.conftest import NGINX, Stack, free_port

PASSWORD = "right-password"


def make_app(data_dir: Path):
    return create_app({"DATA_DIR": str(data_dir)})


def sign_in(app, password: str = PASSWORD, ip: str = "127.0.0.1", user: str = "admin") -> int:
    r = app.test_client().post("/auth/token", json={"username": user, "password": password},
                               environ_base={"REMOTE_ADDR": ip})
    return r.status_code


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    users.create(Bastion(DataDir.at(d)), "admin", PASSWORD, "admin")
    return d


@pytest.fixture
def slow_checks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count password checks; each takes 0.2 s so that parallel attempts overlap."""
    checks: list[int] = []
    real = users.verify_password

    def counting(password: str, stored: str) -> bool:
        checks.append(1)
        time.sleep(0.2)
        return real(password, stored)

    monkeypatch.setattr(users, "verify_password", counting)
    return checks


def parallel_wrong_sign_ins(app, n: int = 10) -> list[int]:
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda _: sign_in(app, "wrong"), range(n)))


# -- sign-in state -------------------------------------------------------------------------------------------

# Runs in its own process: RLIMIT_FSIZE 0 makes every file write fail (EFBIG), for root too.
NO_WRITES_SCRIPT = """
import json, resource, sys, time
from concurrent.futures import ThreadPoolExecutor
from manager import users
from manager.app import create_app

app = create_app({"DATA_DIR": sys.argv[1]})
resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.RLIM_INFINITY))
checks = []
real = users.verify_password
def counting(password, stored):
    checks.append(1)
    time.sleep(0.2)
    return real(password, stored)
users.verify_password = counting

def token(password):
    r = app.test_client().post("/auth/token", json={"username": "admin", "password": password})
    return r.status_code, (r.json or {}).get("token")

out = {}
out["first"], tok = token(sys.argv[2])
checks.clear()
with ThreadPoolExecutor(10) as pool:
    out["parallel"] = [s for s, _ in pool.map(lambda _: token("wrong"), range(10))]
out["checks"] = len(checks)
out["after"] = token(sys.argv[2])[0]
headers = {"Authorization": f"Bearer {tok}"}
out["logout"] = app.test_client().post("/auth/logout", headers=headers).status_code
out["after_logout"] = app.test_client().get("/api/v1/settings", headers=headers).status_code
print(json.dumps(out))
"""


def test_sign_in_lockout_and_logout_work_when_no_file_can_be_written(data_dir: Path) -> None:
    store_before = (data_dir / "store.json").read_bytes()
    done = subprocess.run([sys.executable, "-c", NO_WRITES_SCRIPT, str(data_dir), PASSWORD],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["first"] == 200, done.stderr  # was a 500: login wrote the store before checking the password
    assert out["checks"] <= logins.MAX_FAILURES and sorted(out["parallel"]).count(401) == out["checks"]
    assert set(out["parallel"]) <= {401, 429}
    assert out["after"] == 429  # the lockout holds, kept in memory
    assert out["logout"] == 200 and out["after_logout"] == 401  # the logout holds in this process
    assert (data_dir / "store.json").read_bytes() == store_before
    assert "could not write" in done.stderr


def test_parallel_wrong_sign_ins_get_at_most_max_failures_checks(data_dir: Path, slow_checks: list[int]) -> None:
    app = make_app(data_dir)
    statuses = parallel_wrong_sign_ins(app)
    assert len(slow_checks) <= logins.MAX_FAILURES and statuses.count(401) == len(slow_checks)
    assert statuses.count(429) == len(statuses) - len(slow_checks)
    assert sign_in(app) == 429


def test_processes_share_counts_and_logouts_through_the_state_file(data_dir: Path) -> None:
    worker_a, worker_b = make_app(data_dir), make_app(data_dir)  # like gunicorn's two workers
    for app in (worker_a, worker_b, worker_a, worker_b, worker_a):
        assert sign_in(app, "wrong") == 401
    assert sign_in(worker_b) == 429 and sign_in(worker_a) == 429
    auth.unlock(Bastion(DataDir.at(data_dir)))  # `bastion auth unlock`, another process
    assert sign_in(worker_a) == 200 and sign_in(worker_b) == 200
    token = worker_a.test_client().post("/auth/token", json={"username": "admin", "password": PASSWORD}).json["token"]
    headers = {"Authorization": f"Bearer {token}"}
    assert worker_a.test_client().post("/auth/logout", headers=headers).status_code == 200
    assert worker_b.test_client().get("/api/v1/settings", headers=headers).status_code == 401
    assert (data_dir / "auth.sqlite3").stat().st_mode & 0o777 == 0o600
    assert "login_failures" not in (data_dir / "store.json").read_text()


def test_old_sign_in_tables_leave_store_json(data_dir: Path) -> None:
    store = data_dir / "store.json"
    data = json.loads(store.read_text())
    del data["store_version"]  # as a Bastion before store versions wrote it
    data["login_failures"] = {"1": {"subject": "ip:127.0.0.1", "failures": 0, "lockouts": 3,
                                    "last": time.time(), "locked_until": time.time() + 3600}}
    data["revoked_tokens"] = {"1": {"jti": "x", "exp": time.time() + 60}}
    store.write_text(json.dumps(data))
    app = make_app(data_dir)
    assert sign_in(app) == 200  # old lockouts are not carried over
    assert set(json.loads(store.read_text())) == set(data) - {"login_failures", "revoked_tokens"} | {"store_version"}


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A data dir on a 2 MB tmpfs that is full (root only)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], check=True)
    try:
        users.create(Bastion(DataDir.at(mount / "data")), "admin", PASSWORD, "admin")
        yield mount / "data"
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def fill(path: Path) -> None:
    with path.open("wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC


def test_sign_in_on_a_full_disk_then_counts_reach_the_disk(full_disk: Path) -> None:
    app = make_app(full_disk)
    assert sign_in(app, "wrong", ip="10.8.8.8", user="nobody") == 401  # auth.sqlite3 exists, with a row
    filler = full_disk.parent / "filler"
    fill(filler)
    assert sign_in(app) == 200  # was a 500
    for _ in range(logins.MAX_FAILURES):
        assert sign_in(app, "wrong") == 401
    assert sign_in(app) == 429
    assert sign_in(app, ip="10.9.9.9") == 429  # the user is locked, from any address
    filler.unlink()  # space returns: the next completed attempt writes the counts kept in memory too
    assert sign_in(app, "wrong", ip="10.9.9.9", user="nobody") == 401
    assert sign_in(make_app(full_disk)) == 429  # a fresh process reads the lockout from disk


# -- admin self-lockout guard --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def admin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    if not Path(NGINX).exists():
        pytest.skip("nginx is not installed")
    s = Stack(tmp_path_factory.mktemp("guard") / "data")
    s.start()
    s.cli("cidr-groups", "add", "office", "--allow", "10.0.0.0/8")
    s.cli("cidr-groups", "add", "loopback", "--allow", "127.0.0.0/8")
    yield s
    s.stop()


def call(s: Stack, method: str, path: str, **kw) -> requests.Response:
    headers = {"Authorization": f"Bearer {s.admin_token()}", **kw.pop("headers", {})}
    return requests.request(method, s.admin + path, headers=headers, timeout=30, **kw)


def state(s: Stack) -> tuple[str, str, str]:
    """The store, the live generation and its nginx.conf, byte for byte."""
    live = s.data_dir / "nginx" / "live"
    return (hashlib.sha256((s.data_dir / "store.json").read_bytes()).hexdigest(), str(live.resolve()),
            hashlib.sha256((live / "nginx.conf").read_bytes()).hexdigest())


def assert_refused(s: Stack, r: requests.Response, address: str = "127.0.0.1") -> None:
    assert r.status_code == 409, r.text
    assert r.json()["message"] == (f"this change would deny your address {address} on the admin listener; "
                                   "include it in the allowed networks or repeat the request with force=true")


def assert_locked_out_then_restore(s: Stack) -> None:
    time.sleep(0.3)
    assert requests.get(s.admin + "/api/v1/health", timeout=10).status_code == 403
    s.cli("settings", "set", "admin_cidr_groups", '["private"]')  # the CLI carries no address: no guard
    s.cli("settings", "set", "trusted_proxies", "[]")
    assert call(s, "GET", "/api/v1/settings").status_code == 200


def test_write_default_with_the_readme_cidr_is_refused(admin: Stack) -> None:
    before = state(admin)
    body = {"domain": "llm.example.com", "cidrGroups": ["192.168.1.0/24"]}
    assert_refused(admin, call(admin, "POST", "/nginx/config/write-default", json=body))
    assert state(admin) == before
    assert call(admin, "GET", "/api/v1/settings").json()["admin_cidr_groups"] == ["private"]
    # including the requester's network is fine
    ok = call(admin, "POST", "/nginx/config/write-default", json={**body, "cidrGroups": ["192.168.1.0/24",
                                                                                          "127.0.0.1/32"]})
    assert ok.status_code == 200, ok.text
    # force (a body field the llm-proxy route does not know otherwise) makes the change
    r = call(admin, "POST", "/nginx/config/write-default", json={**body, "force": True})
    assert r.status_code == 200, r.text
    assert_locked_out_then_restore(admin)


def test_settings_changes_are_guarded(admin: Stack) -> None:
    before = state(admin)
    assert_refused(admin, call(admin, "PATCH", "/api/v1/settings", json={"admin_cidr_groups": ["office"]}))
    # trusted proxies change the address nginx sees: behind 127.0.0.1 the admin would be 203.0.113.9
    xff = {"X-Forwarded-For": "203.0.113.9"}
    assert_refused(admin, call(admin, "PATCH", "/api/v1/settings", json={"trusted_proxies": ["127.0.0.1/32"]},
                               headers=xff), "203.0.113.9")
    assert state(admin) == before
    r = call(admin, "PATCH", "/api/v1/settings", json={"trusted_proxies": ["127.0.0.1/32"]},
             headers={"X-Forwarded-For": "10.1.2.3"})  # a private address behind the proxy: still admitted
    assert r.status_code == 200, r.text
    admin.cli("settings", "set", "trusted_proxies", "[]")
    r = call(admin, "PATCH", "/api/v1/settings?force=true", json={"admin_cidr_groups": ["office"]})
    assert r.status_code == 200, r.text
    assert_locked_out_then_restore(admin)


def test_cidr_group_edits_and_rollbacks_are_guarded(admin: Stack) -> None:
    admin.cli("settings", "set", "admin_cidr_groups", '["loopback"]')
    try:
        before = state(admin)
        assert_refused(admin, call(admin, "PATCH", "/api/v1/cidr-groups/loopback", json={"allow": ["10.0.0.0/8"]}))
        assert_refused(admin, call(admin, "PATCH", "/api/v1/cidr-groups/loopback", json={"deny": ["127.0.0.1/32"]}))
        assert state(admin) == before
        ok = call(admin, "PATCH", "/api/v1/cidr-groups/loopback", json={"deny": ["127.0.0.2/32"]})
        assert ok.status_code == 200, ok.text
    finally:
        admin.cli("settings", "set", "admin_cidr_groups", '["private"]')
    # a generation whose admin listener only admits the office network
    admin.cli("settings", "set", "admin_cidr_groups", '["office"]')
    office_generation = generations.live(DataDir.at(admin.data_dir))
    admin.cli("settings", "set", "admin_cidr_groups", '["private"]')
    before = state(admin)
    assert_refused(admin, call(admin, "POST", "/api/v1/config/rollback", json={"generation": office_generation}))
    assert state(admin) == before
    r = call(admin, "POST", "/api/v1/config/rollback", json={"generation": office_generation, "force": True})
    assert r.status_code == 200, r.text
    assert_locked_out_then_restore(admin)


def test_force_must_be_a_boolean(admin: Stack) -> None:
    r = call(admin, "PATCH", "/api/v1/settings", json={"read_timeout": 600, "force": "maybe"})
    assert r.status_code == 400 and r.json()["error"]["field"] == "force"
    assert call(admin, "PATCH", "/api/v1/settings?force=yes", json={"read_timeout": 600}).status_code == 400



def test_the_guard_sees_addresses_as_nginx_does() -> None:
    from manager import admin_guard

    seen = admin_guard.seen_address
    assert seen("127.0.0.1", "203.0.113.9", []) == "127.0.0.1"  # no trusted proxy: the header means nothing
    assert seen("127.0.0.1", "203.0.113.9", ["127.0.0.1/32"]) == "203.0.113.9"
    assert seen("127.0.0.1", "203.0.113.9, 10.0.0.2", ["127.0.0.0/8", "10.0.0.0/8"]) == "203.0.113.9"  # recursive
    assert seen("127.0.0.1", "10.0.0.3, 10.0.0.2", ["127.0.0.0/8", "10.0.0.0/8"]) == "10.0.0.3"  # all trusted
    assert seen("127.0.0.1", "junk", ["127.0.0.0/8"]) == "127.0.0.1"
    assert seen("192.0.2.1", "10.0.0.2", ["127.0.0.0/8"]) == "192.0.2.1"  # an untrusted peer's header is ignored
    rules = [("deny", "10.0.0.1/32"), ("allow", "10.0.0.0/8"), ("deny", "all")]
    assert not admin_guard.permits(rules, "10.0.0.1") and admin_guard.permits(rules, "10.9.9.9")
    assert not admin_guard.permits(rules, "192.0.2.1") and admin_guard.permits(rules, "::ffff:10.1.1.1")
    assert admin_guard.permits([], "192.0.2.1")


@pytest.mark.skipif(not Path(NGINX).exists(), reason="nginx is not installed")
def test_moving_the_admin_listener_out_of_reach_is_refused(data_dir: Path) -> None:
    port = free_port()
    settings_mod.update(Bastion(DataDir.at(data_dir)), {"admin_listen": f"0.0.0.0:{port}"})  # as the CLI: no guard
    app = make_app(data_dir)
    client = app.test_client()

    def patch(ip: str):
        token = client.post("/auth/token", json={"username": "admin", "password": PASSWORD},
                            environ_base={"REMOTE_ADDR": ip}).json["token"]
        return client.patch("/api/v1/settings", json={"admin_listen": f"127.0.0.1:{port}"},
                            headers={"Authorization": f"Bearer {token}"}, environ_base={"REMOTE_ADDR": ip})

    r = patch("10.1.2.3")  # a remote admin on a private network
    assert r.status_code == 409 and r.json["message"] == (
        f"this change would move the admin listener to 127.0.0.1:{port}, which your address 10.1.2.3 cannot reach; "
        "keep an address you can reach or repeat the request with force=true")
    assert patch("127.0.0.1").status_code == 200  # an admin on the host itself keeps access
