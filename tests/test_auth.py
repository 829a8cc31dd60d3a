"""Sign-in rules without a server: lockout back-off, failure windows, token versions."""

from __future__ import annotations

from pathlib import Path

import pytest

from manager import auth, logins, users
from manager.context import Bastion
from manager.datadir import DataDir


@pytest.fixture
def bastion(tmp_path: Path) -> Bastion:
    b = Bastion(DataDir.at(tmp_path / "data"))
    users.create(b, "alice", "alice-password", "admin")
    return b


def fail(b: Bastion, times: int, ip: str = "10.0.0.1", user: str = "alice") -> None:
    for _ in range(times):
        with pytest.raises(auth.AuthError) as e:
            auth.login(b, user, "wrong", ip)
        assert e.value.status in (401, 429)


def test_lockout_backs_off(bastion: Bastion, monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1_000_000.0]
    monkeypatch.setattr(auth.time, "time", lambda: now[0])
    fail(bastion, 5)
    with pytest.raises(auth.AuthError) as e:
        auth.login(bastion, "alice", "alice-password", "10.9.9.9")  # the user is locked, from any address
    assert e.value.status == 429 and e.value.retry_after == pytest.approx(60)
    now[0] += 61
    fail(bastion, 5, ip="10.0.0.2")
    with pytest.raises(auth.AuthError) as e:
        auth.login(bastion, "alice", "alice-password", "10.9.9.8")
    assert e.value.retry_after == pytest.approx(120)  # the second lockout lasts twice as long
    now[0] += 121
    assert auth.login(bastion, "alice", "alice-password", "10.9.9.7")["username"] == "alice"


def test_failures_are_forgotten_after_the_window(bastion: Bastion, monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1_000_000.0]
    monkeypatch.setattr(auth.time, "time", lambda: now[0])
    fail(bastion, 4)
    now[0] += logins.FAILURE_WINDOW + 1
    fail(bastion, 1)
    assert auth.login(bastion, "alice", "alice-password", "10.0.0.1")["username"] == "alice"


def test_unknown_usernames_do_not_grow_the_store(bastion: Bastion) -> None:
    for i in range(3):
        fail(bastion, 1, ip="10.0.0.5", user=f"nobody-{i}")
    assert bastion.logins.subjects() == {"ip:10.0.0.5"}


def test_password_change_ends_sessions(bastion: Bastion) -> None:
    token, _ = auth.issue(bastion, users.find(bastion, "alice"), "api")
    assert auth.verify(bastion, token, via_cookie=False, csrf=None, unsafe_method=True).username == "alice"
    users.update(bastion, "alice", password="a-new-password")
    with pytest.raises(auth.AuthError):
        auth.verify(bastion, token, via_cookie=False, csrf=None, unsafe_method=True)
    assert users.verify_password("a-new-password", users.find(bastion, "alice")["password_hash"])
    assert users.find(bastion, "alice")["password_hash"].startswith("scrypt$")


def test_tokens_of_a_deleted_user_never_work_for_a_new_one(bastion: Bastion) -> None:
    users.create(bastion, "bob", "bob-password", "admin")
    token, _ = auth.issue(bastion, users.find(bastion, "bob"), "api")
    users.remove(bastion, "bob")
    users.create(bastion, "bob", "other-password", "viewer")
    with pytest.raises(auth.AuthError):
        auth.verify(bastion, token, via_cookie=False, csrf=None, unsafe_method=False)


def test_secrets_are_private_and_stable(bastion: Bastion) -> None:
    for path in (bastion.dirs.pepper, bastion.dirs.jwt_secret):
        assert path.stat().st_mode & 0o777 == 0o600 and len(path.read_bytes()) == 64
    before = bastion.dirs.jwt_secret.read_bytes()
    bastion.dirs.ensure()
    assert bastion.dirs.jwt_secret.read_bytes() == before
