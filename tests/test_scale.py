"""Key management does not grow with the number of keys: API and CLI writes, `bastion up`, the gate's view.

The stacks start from a store.json holding the keys the way Bastion kept them before keys moved to SQLite (an
upgraded install), so the same test also covers the move and works against any version of the code.
"""

from __future__ import annotations

import json
import multiprocessing
import secrets
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from authsvc import keys as keyformat
from authsvc.snapshot import CHECK_INTERVAL, KEYS_DB, SnapshotSource
from manager import cidr_groups, users
from manager import keys as keys_mod
from manager.context import STORE_VERSION, Bastion
from manager.datadir import DataDir
from manager.errors import Conflict
from manager.keystore import KeyStore, migrate_from
from manager.store import Store, StoreNewer
from tests.conftest import NGINX, Stack

ROUNDS = 5
BOUND_S = 0.2  # generous: docs/benchmarks.md has the real numbers (a few ms)


def key_record(n: int) -> dict:
    return {"id": f"{n:012d}", "digest": secrets.token_hex(32), "name": f"user{n}", "enabled": True,
            "expires": None, "models": [], "endpoints": [], "rpm": 0, "cidrs": [], "cidr_groups": [],
            "created_at": 1_700_000_000.0 + n, "created_by": "test", "revoked_at": None}


def write_legacy_keys(data_dir: Path, count: int) -> None:
    """store.json with `count` keys in its "keys" table, as TinyDB wrote it."""
    data_dir.mkdir(parents=True, exist_ok=True)
    table = {str(i + 1): key_record(i) for i in range(count)}
    (data_dir / "store.json").write_text(json.dumps({"keys": table}))


class KeyOps:
    """Create, disable and revoke keys through the admin API and the CLI of a running stack, timing each."""

    def __init__(self, stack: Stack):
        self.stack = stack
        self.headers = {"Authorization": f"Bearer {stack.admin_token()}"}

    def api(self, method: str, path: str, **kw) -> dict:
        r = requests.request(method, self.stack.admin + "/api/v1/keys" + path, headers=self.headers, timeout=600,
                             **kw)
        assert r.status_code in (200, 201), r.text
        return r.json()

    def cli(self, *args: str) -> str:
        return self.stack.cli("keys", *args)

    def measure(self) -> dict[str, float]:
        """Median seconds per operation over ROUNDS, and the worst of all."""
        times: dict[str, list[float]] = {}

        def run(name: str, action: Callable[..., Any], *args: Any, **kw: Any) -> Any:
            start = time.perf_counter()
            result = action(*args, **kw)
            times.setdefault(name, []).append(time.perf_counter() - start)
            return result

        for _ in range(ROUNDS):
            made = run("api create", self.api, "POST", "", json={"name": "scale"})
            run("api disable", self.api, "PATCH", f"/{made['id']}", json={"enabled": False})
            run("api revoke", self.api, "DELETE", f"/{made['id']}")
            key_id = keyformat.key_id_of(run("cli create", self.cli, "create", "scale").splitlines()[0])
            run("cli disable", self.cli, "disable", key_id)
            run("cli revoke", self.cli, "revoke", key_id)
        return {name: statistics.median(values) for name, values in times.items()} | {
            "worst": max(max(values) for values in times.values())}


@pytest.fixture
def stack_with_keys(tmp_path: Path) -> Iterator[Callable[[int], Stack]]:
    if not Path(NGINX).exists():
        pytest.skip("nginx is not installed")
    started: list[Stack] = []

    def start(count: int) -> Stack:
        stack = Stack(tmp_path / f"k{count}" / "data")
        write_legacy_keys(stack.data_dir, count)
        started.append(stack)
        stack.start()
        # the pick-up polls send a key the gate does not know yet: not a brute force
        stack.cli("settings", "set", "bruteforce_max_failures", "0")
        return stack

    yield start
    for stack in started:
        stack.stop()


def test_key_writes_do_not_grow_with_the_number_of_keys(stack_with_keys) -> None:
    small = KeyOps(stack_with_keys(100)).measure()
    big_stack = stack_with_keys(3000)
    big = KeyOps(big_stack).measure()
    report = ", ".join(f"{name} {small[name] * 1000:.0f} -> {big[name] * 1000:.0f} ms" for name in small)
    for name in small:
        if name == "worst":
            continue
        assert big[name] < BOUND_S, report
        assert big[name] < 2 * small[name] + 0.03, report  # no growth beyond noise
    assert big["worst"] < 1.0, report
    print(report)
    # the keys moved out of store.json, once
    assert "keys" not in json.loads((big_stack.data_dir / "store.json").read_text())
    assert KeyStore(big_stack.data_dir / KEYS_DB).count() == 3000 + 2 * ROUNDS
    assert (big_stack.data_dir / KEYS_DB).stat().st_mode & 0o777 == 0o600


def test_key_changes_reach_the_gate_within_a_second(stack_with_keys) -> None:
    stack = stack_with_keys(3000)
    ops = KeyOps(stack)

    def seconds_until(status: int, token: str) -> float:
        start = time.monotonic()
        while stack.get("/v1/models", token).status_code != status:
            assert time.monotonic() - start < 5, f"never {status}"
            time.sleep(0.02)
        return time.monotonic() - start

    made = ops.api("POST", "", json={"name": "fresh"})
    assert seconds_until(200, made["secret"]) < 1.0
    ops.api("PATCH", f"/{made['id']}", json={"enabled": False})
    assert seconds_until(401, made["secret"]) < 1.0
    ops.api("PATCH", f"/{made['id']}", json={"enabled": True})
    assert seconds_until(200, made["secret"]) < 1.0
    ops.api("DELETE", f"/{made['id']}")
    assert seconds_until(401, made["secret"]) < 1.0
    token = stack.key("cli-made")
    assert seconds_until(200, token) < 1.0
    stack.cli("keys", "revoke", keyformat.key_id_of(token))
    assert seconds_until(401, token) < 1.0


def test_move_from_store_json_is_idempotent_and_keeps_newer_rows(tmp_path: Path) -> None:
    """A crash between the SQLite insert and dropping the store.json table leaves both copies: the next start
    keeps what SQLite has (it may have changed since) and drops the table."""
    write_legacy_keys(tmp_path, 3)
    store = Store(tmp_path / "store.json")
    keys = KeyStore(tmp_path / KEYS_DB)
    assert keys.insert_missing([key_record(0)]) == 1  # as if the move had begun
    keys.update(key_record(0)["id"], lambda _: {"revoked_at": 5.0})
    assert migrate_from(store, keys) == 2
    assert migrate_from(store, keys) == 0
    assert "keys" not in json.loads((tmp_path / "store.json").read_text())
    assert [k["revoked_at"] for k in keys.all(include_revoked=True)] == [5.0, None, None]


def test_a_store_of_every_older_version_is_brought_up_to_date(tmp_path: Path) -> None:
    """Today's store.json before versions were kept (keys and sign-in state inside) becomes version
    STORE_VERSION on first open: keys in SQLite, the old tables gone, the rest untouched; opening it again
    changes nothing."""
    write_legacy_keys(tmp_path, 2)
    legacy = json.loads((tmp_path / "store.json").read_text())
    legacy["login_failures"] = {"1": {"subject": "admin", "failures": 3}}
    legacy["settings"] = {"1": {"read_timeout": 900}}
    (tmp_path / "store.json").write_text(json.dumps(legacy))
    bastion = Bastion(DataDir.at(tmp_path))
    data = json.loads((tmp_path / "store.json").read_text())
    assert bastion.store.version() == STORE_VERSION
    assert not {"keys", "login_failures"} & data.keys() and data["settings"] == {"1": {"read_timeout": 900}}
    assert len(bastion.keystore.all(include_revoked=True)) == 2
    before = (tmp_path / "store.json").read_bytes()
    Bastion(DataDir.at(tmp_path))
    assert (tmp_path / "store.json").read_bytes() == before


def test_a_store_from_a_newer_bastion_is_refused_and_left_alone(tmp_path: Path) -> None:
    (tmp_path / "store.json").write_text(json.dumps({"store_version": {"1": {"version": STORE_VERSION + 1}}}))
    with pytest.raises(StoreNewer, match="newer Bastion"):
        Bastion(DataDir.at(tmp_path))
    assert json.loads((tmp_path / "store.json").read_text()) == {"store_version": {"1": {"version": STORE_VERSION + 1}}}


def test_the_store_finds_documents_by_field_values(tmp_path: Path) -> None:
    store = Store(tmp_path / "store.json")
    with store.transaction():
        store.insert("pools", {"name": "a", "method": "hash"})
        store.insert("pools", {"name": "b", "method": "hash"})
        store.insert("pools", {"name": "c", "method": "least_conn"})
    assert store.find("pools", name="b") == {"name": "b", "method": "hash"}
    assert store.find("pools", name="x") is None and store.count("pools", method="hash") == 2
    with store.transaction():
        assert store.update("pools", {"method": "random_two"}, name={"a", "c"}) == 2
        assert store.remove("pools", name="b", method="least_conn") == 0
        store.upsert("pools", {"name": "d", "method": "hash"}, name="d")
    assert [(p["name"], p["method"]) for p in store.all("pools")] == [("a", "random_two"), ("b", "hash"),
                                                                       ("c", "random_two"), ("d", "hash")]
    with pytest.raises(ValueError):
        store.find("pools")  # a lookup without a field would silently take the first document


def test_group_in_use_by_a_key_cannot_be_removed(tmp_path: Path) -> None:
    bastion = Bastion(DataDir.at(tmp_path))
    cidr_groups.create(bastion, "office", ["10.0.0.0/8"])
    record, _ = keys_mod.create(bastion, "k", cidr_groups=["office"])
    with pytest.raises(Conflict, match=f"key {record['id']}"):
        cidr_groups.remove(bastion, "office")
    keys_mod.revoke(bastion, record["id"])
    cidr_groups.remove(bastion, "office")


def test_admin_listener_waits_for_long_applies_and_answers_json(tmp_path: Path) -> None:
    """nginx's default 60 s cut a long apply with an HTML 504; the admin server now waits and answers JSON."""
    from manager.apply import render_config

    conf = render_config(Bastion(DataDir.at(tmp_path)), 1)
    admin_location = conf[conf.rindex("location / {"):].split("}")[0]  # the admin server comes last
    assert "proxy_pass http://bastion_manager;" in admin_location
    assert "proxy_read_timeout 300s;" in admin_location
    assert "error_page 504 =504 @admin_error_504;" in conf
    page = conf[conf.index("location @admin_error_504"):].split("}")[0]
    assert "default_type application/json;" in page and "return 504 '{" in page


def _at_once(target, args: list[tuple]) -> None:
    """Run `target(*a, ready)` for each `a` in its own process, all starting together, like the manager's workers
    and CLI commands (spawned, not forked: SQLite forbids forking with a connection open); each must succeed."""
    context = multiprocessing.get_context("spawn")
    ready = context.Barrier(len(args))
    workers = [context.Process(target=target, args=(*a, ready)) for a in args]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
        assert w.exitcode == 0


def _create_keys(db: Path, start: int, ready) -> None:
    keys = KeyStore(db)
    ready.wait(60)  # all writers at once
    for i in range(start, start + 25):
        keys.insert(key_record(i))
        keys.update(key_record(i)["id"], lambda _: {"enabled": False})


def test_concurrent_writers_get_distinct_growing_versions(tmp_path: Path) -> None:
    """The gate loads rows above the last version it saw: every write needs its own version, in commit order."""
    db = tmp_path / KEYS_DB
    _at_once(_create_keys, [(db, n * 100) for n in range(4)])
    keys = KeyStore(db)
    assert keys.count() == 100 and not any(k["enabled"] for k in keys.all())
    versions = [r[0] for r in keys._db().execute("SELECT version FROM keys")]
    assert len(set(versions)) == 100
    assert keys._db().execute("SELECT version FROM meta").fetchone()[0] == 200  # one per write, none lost


def test_a_revoked_key_is_refused_within_a_second_among_100k(tmp_path: Path) -> None:
    """Snapshot deltas at scale: the gate loaded 100,000 keys once; a revocation then reaches it as one changed
    row (no reparse of the rest) at its next look, well within a second, and the look costs milliseconds."""
    keys = KeyStore(tmp_path / KEYS_DB)
    keys.insert_missing(key_record(i) for i in range(100_000))
    (tmp_path / "snapshot.json").write_text(json.dumps({"pools": [], "routes": []}))
    now = [0.0]
    source = SnapshotSource(tmp_path / "snapshot.json", clock=lambda: now[0])
    victim = key_record(54_321)["id"]
    assert source.snapshot.keys[victim] is not None and len(source.snapshot.keys) == 100_000
    keys.update(victim, lambda _: {"revoked_at": time.time()})
    now[0] += CHECK_INTERVAL  # the gate's next look, at most 0.25 s later
    started = time.perf_counter()
    refreshed = source.refresh()
    took = time.perf_counter() - started
    assert victim not in refreshed.keys and len(refreshed.keys) == 99_999
    assert took < 0.05, f"one changed key took {took * 1000:.1f} ms to apply"


def _add_users(data_dir: Path, start: int, ready) -> None:
    bastion = Bastion(DataDir.at(data_dir))
    ready.wait(60)
    for i in range(start, start + 5):
        users.create(bastion, f"user{i}", "password-123", "viewer", author="test")


def test_concurrent_configuration_writers_lose_nothing(tmp_path: Path) -> None:
    """The manager's workers and CLI commands change store.json at once: each change is a locked
    read-modify-write (Store.transaction), so none is lost or interleaved."""
    Bastion(DataDir.at(tmp_path))  # the data dir and its store, once
    _at_once(_add_users, [(tmp_path, n * 10) for n in range(4)])
    names = {u["username"] for u in users.all_users(Bastion(DataDir.at(tmp_path)))}
    assert names == {f"user{n * 10 + i}" for n in range(4) for i in range(5)}
