"""Prometheus /metrics: the exposition read back by a strict parser (tests/prom_text.py), counts against the
requests sent through real nginx and the gate, and who may read it."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

from manager import auth, cidr_groups, settings, users
from manager import metrics as metrics_mod
from manager.app import create_app
from manager.usage import Usage
from manager.usage_log import format_record
from manager.usage_records import DURATION_BOUNDS
from manager.validation import ValidationError
from tests import prom_text
from tests.conftest import Stack, free_port
from tests.fakes import FakeUpstream

DAY = 86400
T0 = 1_764_000_000.0 - 1_764_000_000.0 % DAY  # a midnight
WEIRD_MODEL = 'we"ird\\model\nx'  # nginx escapes these in the log; /metrics must escape them in label values


def records(t: float = T0 + 100) -> str:
    """k1/m1: 3 ok with tokens, a 429, a 502 cut by the upstream; k2/weird: 2 ok (no tokens), one cut by the
    client, one timeout; one request refused before any key was known."""
    lines = []
    for i in range(3):
        lines.append(format_record(end=t + i, request_id=f"ok{i}", key="k1", model="m1", pool="p", status=200,
                                   duration=0.2, ttfb=0.02, outcome="completed", prompt_tokens=3,
                                   completion_tokens=4, total_tokens=7))
    lines.append(format_record(end=t + 3, request_id="limited", key="k1", model="m1", pool="", status=429,
                               duration=0.001))
    lines.append(format_record(end=t + 4, request_id="cut", key="k1", model="m1", pool="p", status=502,
                               duration=7.0, ttfb=0.3, outcome="upstream_cut"))
    for i, outcome in enumerate(("completed", "completed", "client_cut", "timeout")):
        lines.append(format_record(end=t + 5 + i, request_id=f"w{i}", key="k2", model=WEIRD_MODEL, pool="p",
                                   status=200, duration=40.0 + i, ttfb=1.5, outcome=outcome))
    lines.append(format_record(end=t + 9, request_id="nokey", status=401, duration=0.0005))
    return "".join(lines)


@pytest.fixture
def app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(metrics_mod, "known_models", lambda bastion: {"m1", WEIRD_MODEL})  # as if pools listed them
    app = create_app({"DATA_DIR": str(tmp_path / "data")})
    b = app.extensions["bastion"]
    b.dirs.access_log.write_text(records())
    b.usage.ingest()
    return app


def scrape(client, address: str = "127.0.0.1", **headers: str):
    return client.get("/metrics", headers={"X-Real-IP": address, **headers})


def test_exposition_counts_tokens_cuts_and_histograms(app) -> None:
    r = scrape(app.test_client())
    assert r.status_code == 200 and r.content_type == metrics_mod.CONTENT_TYPE
    fams = prom_text.parse(r.get_data(as_text=True))
    req = fams["bastion_requests_total"]
    assert req.type == "counter" and req.help
    assert req.value(key="k1", model="m1", pool="p", code_class="2xx") == 3
    assert req.value(key="k1", model="m1", pool="p", code_class="5xx") == 1
    assert req.value(key="k1", model="m1", pool="", code_class="4xx") == 1
    assert req.value(key="k2", model=WEIRD_MODEL, pool="p", code_class="2xx") == 4  # escaping round trip
    assert req.value(key="", model="", pool="", code_class="4xx") == 1
    assert req.total() == 10
    tokens = fams["bastion_tokens_total"]
    assert tokens.value(key="k1", model="m1", pool="p", type="prompt") == 9
    assert tokens.value(key="k1", model="m1", pool="p", type="completion") == 12
    assert tokens.total(key="k2") == 0 and not [s for s in tokens.samples if s[1]["key"] == "k2"]  # unknown: absent
    assert fams["bastion_metered_requests_total"].value(model="m1", pool="p") == 3
    cuts = fams["bastion_stream_cuts_total"]
    assert cuts.value(model="m1", pool="p", cause="upstream") == 1
    assert cuts.value(model=WEIRD_MODEL, pool="p", cause="client") == 1
    assert cuts.value(model=WEIRD_MODEL, pool="p", cause="timeout") == 1
    duration = fams["bastion_request_duration_seconds"]
    assert duration.type == "histogram"
    name = "bastion_request_duration_seconds"
    assert duration.value(name + "_count", model="m1", pool="p") == 4
    assert duration.value(name + "_bucket", model="m1", pool="p", le="0.25") == 3
    assert duration.value(name + "_bucket", model="m1", pool="p", le="5.0") == 3
    assert duration.value(name + "_bucket", model="m1", pool="p", le="10.0") == 4
    assert duration.value(name + "_sum", model="m1", pool="p") == pytest.approx(7.6)
    assert len([s for s in duration.samples if s[0] == name + "_bucket"]) == 4 * (len(DURATION_BOUNDS) + 1)
    ttfb = fams["bastion_time_to_first_byte_seconds"]
    assert ttfb.value("bastion_time_to_first_byte_seconds_count", model="", pool="") == 0  # the gate answered
    assert ttfb.value("bastion_time_to_first_byte_seconds_bucket", model=WEIRD_MODEL, pool="p", le="2.5") == 4
    assert fams["bastion_usage_ingest_backlog_bytes"].value() == 0
    assert fams["bastion_nginx_up"].value() == 0  # no nginx runs here: said so, the rest is served
    (info,) = fams["bastion_build_info"].samples
    assert info[1]["version"] and info[2] == 1


def test_counters_come_from_all_time_rows_that_pruning_keeps(app) -> None:
    b = app.extensions["bastion"]
    before = prom_text.parse(scrape(app.test_client()).get_data(as_text=True))
    assert b.usage.prune(0, {"minute": 1, "hour": 1, "day": 1}, now=T0 + 10 * DAY) > 0
    with b.usage._connect() as db:
        assert db.execute("SELECT COUNT(*) FROM rollups WHERE span > 0").fetchone()[0] == 0
    after = prom_text.parse(scrape(app.test_client()).get_data(as_text=True))
    assert after["bastion_requests_total"].samples == before["bastion_requests_total"].samples
    # more traffic on a later day adds to them
    b.dirs.access_log.write_text(b.dirs.access_log.read_text() + records(T0 + 20 * DAY))
    b.usage.ingest()
    later = prom_text.parse(scrape(app.test_client()).get_data(as_text=True))
    assert later["bastion_requests_total"].total() == 20
    assert later["bastion_tokens_total"].total(type="prompt") == 18


def test_backlog_is_what_ingestion_has_not_read(tmp_path: Path) -> None:
    usage = Usage(tmp_path / "usage.sqlite3", tmp_path / "access.log")
    assert usage.backlog() == 0
    usage.log_path.write_text(records())
    assert usage.backlog() == usage.log_path.stat().st_size
    usage.ingest()
    assert usage.backlog() == 0
    with usage.log_path.open("a") as f:
        f.write("partial line without its end")
    assert usage.backlog() == len("partial line without its end")


def test_readers(app) -> None:
    """Without credentials only from metrics_cidr_groups; the metrics token or a sign-in from anywhere nginx
    admits. A wrong token is refused even from an admitted address (it says it is a token)."""
    b = app.extensions["bastion"]
    client = app.test_client()
    assert scrape(client, "10.1.2.3").status_code == 200  # "private", the default
    r = scrape(client, "203.0.113.7")
    assert r.status_code == 401 and "metrics_cidr_groups" in r.json["message"]
    assert r.headers["WWW-Authenticate"].startswith("Bearer")
    users.ensure_admin(b)
    admin_jwt, _ = auth.issue(b, users.find(b, "admin"), "api")
    r = client.post("/api/v1/metrics/token", headers={"Authorization": f"Bearer {admin_jwt}"})
    assert r.status_code == 201
    token = r.json["token"]
    assert token.startswith(metrics_mod.TOKEN_PREFIX)
    assert token not in (b.dirs.root / metrics_mod.TOKEN_FILE).read_text()  # only its digest is kept
    assert (b.dirs.root / metrics_mod.TOKEN_FILE).stat().st_mode & 0o777 == 0o600
    assert scrape(client, "203.0.113.7", Authorization=f"Bearer {token}").status_code == 200
    assert scrape(client, "203.0.113.7", Authorization=f"Bearer {admin_jwt}").status_code == 200
    assert scrape(client, "10.1.2.3", Authorization=f"Bearer {token}x").status_code == 401
    assert scrape(client, "203.0.113.7", Authorization="Bearer not-a-jwt").status_code == 401
    assert client.get("/api/v1/metrics/token", headers={"Authorization": f"Bearer {admin_jwt}"}).json["set"] is True
    r = client.delete("/api/v1/metrics/token", headers={"Authorization": f"Bearer {admin_jwt}"})
    assert r.status_code == 200 and r.json["revoked"] is True
    assert scrape(client, "203.0.113.7", Authorization=f"Bearer {token}").status_code == 401


def test_metrics_cidr_groups(app) -> None:
    b = app.extensions["bastion"]
    b.store.update_settings(metrics_cidr_groups=[])  # no group: nobody without credentials
    assert not metrics_mod.address_admitted(b, "127.0.0.1")
    cidr_groups.create(b, "scrapers", allow=["192.0.2.0/24", "::ffff:0:0/96"], deny=["192.0.2.66/32"])
    b.store.update_settings(metrics_cidr_groups=["scrapers"])
    assert metrics_mod.address_admitted(b, "192.0.2.5")
    assert not metrics_mod.address_admitted(b, "192.0.2.66")  # deny wins
    assert not metrics_mod.address_admitted(b, "127.0.0.1")
    assert metrics_mod.address_admitted(b, "::ffff:192.0.2.5")  # as nginx matches mapped addresses
    assert not metrics_mod.address_admitted(b, "unix:")
    with pytest.raises(ValidationError, match="unknown CIDR group"):
        settings.validate(b, {"metrics_cidr_groups": ["nope"]})


# ---- end to end: real nginx, gate and manager ---------------------------------------------------------------


@pytest.fixture(scope="module")
def pools(stack: Stack, upstreams: dict[str, FakeUpstream]) -> Iterator[dict[str, str]]:
    """alpha, beta with a dead upstream first, slow (3 s streams); active health checks every second."""
    slow = FakeUpstream("slow", ["slow-model"], chunk_delay=0.5, chunks=6)
    stack.cli("settings", "set", "bruteforce_max_failures", "0")
    stack.cli("pools", "add", "alpha", "--url", upstreams["alpha"].url, "--api-key", "sk-upstream-alpha")
    dead = f"http://127.0.0.1:{free_port()}"
    stack.cli("pools", "add", "beta", "--url", dead, "--url", upstreams["beta"].url, "--models", "beta-model")
    stack.cli("pools", "add", "slow", "--url", slow.url, "--models", "slow-model")
    stack.cli("settings", "set", "health_interval", "1")
    yield {"dead": dead, "beta": upstreams["beta"].url}
    slow.close()


@pytest.fixture(scope="module")
def keys(stack: Stack, pools) -> dict[str, str]:
    made = {"one": stack.key("metrics-one"), "two": stack.key("metrics-two", "--models", "beta-model")}
    time.sleep(0.5)
    return made


def fetch(stack: Stack, **headers: str) -> dict[str, prom_text.Family]:
    r = requests.get(stack.admin + "/metrics", headers=headers, timeout=10)
    assert r.status_code == 200, r.text
    assert r.headers["Content-Type"] == metrics_mod.CONTENT_TYPE
    return prom_text.parse(r.text)


def until(check: Callable[[], bool], seconds: float = 15.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("not reached in time")
        time.sleep(0.3)


def key_id(key: str) -> str:
    return key.split("_")[1]


def decisions(fams: dict[str, prom_text.Family]) -> dict[tuple[str, str], float]:
    return {(lab["decision"], lab["reason"]): v for _, lab, v in fams["bastion_gate_decisions_total"].samples}


def test_counts_match_the_requests_sent(stack: Stack, keys: dict[str, str]) -> None:
    one, two = keys["one"], keys["two"]
    base = decisions(fetch(stack))
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    for _ in range(5):
        assert stack.post("/v1/chat/completions", one, json={"model": "alpha-model", **chat}).status_code == 200
    for _ in range(3):
        assert stack.post("/v1/chat/completions", two, json={"model": "beta-model", **chat}).status_code == 200
    for _ in range(2):  # the upstream's own 500
        assert stack.post("/v1/fail/500", one, json={"model": "alpha-model"}).status_code == 500
    for _ in range(4):  # refused by the gate: the key may not use that model
        assert stack.post("/v1/chat/completions", two, json={"model": "alpha-model", **chat}).status_code == 404
    for _ in range(3):
        assert stack.post("/v1/chat/completions", "bst_nope_nope", json={"model": "alpha-model"}).status_code == 401
    assert stack.get("/v1/models", one).status_code == 200  # answered by the gate itself

    def req(fams, key, model, pool, code_class) -> float:
        try:
            return fams["bastion_requests_total"].value(key=key, model=model, pool=pool, code_class=code_class)
        except KeyError:
            return 0

    def counted() -> bool:
        fams = fetch(stack)
        return (req(fams, key_id(one), "alpha-model", "alpha", "2xx") == 5
                and req(fams, key_id(two), "beta-model", "beta", "2xx") == 3
                and req(fams, key_id(one), "alpha-model", "alpha", "5xx") == 2
                and fams["bastion_requests_total"].total(key=key_id(two), code_class="4xx") == 4
                and fams["bastion_requests_total"].total(key="", code_class="4xx") == 3
                and fams["bastion_requests_total"].total() == 18)
    until(counted)
    fams = fetch(stack)
    duration = fams["bastion_request_duration_seconds"]
    assert duration.value("bastion_request_duration_seconds_count", model="alpha-model", pool="alpha") == 7
    assert duration.value("bastion_request_duration_seconds_bucket", model="beta-model", pool="beta",
                          le="+Inf") == 3
    ttfb = fams["bastion_time_to_first_byte_seconds"]
    assert ttfb.value("bastion_time_to_first_byte_seconds_count", model="alpha-model", pool="alpha") == 7
    assert fams["bastion_usage_ingest_backlog_bytes"].value() >= 0

    def gate_counted() -> bool:
        now = decisions(fetch(stack))
        delta = {k: v - base.get(k, 0) for k, v in now.items()}
        return (delta.get(("allow", ""), 0) == 10 and delta.get(("refuse", "model_not_found"), 0) == 4
                and delta.get(("refuse", "invalid_api_key"), 0) == 3 and delta.get(("answer", ""), 0) == 1)
    until(gate_counted, 5)


def test_no_secret_in_the_exposition(stack: Stack, keys: dict[str, str]) -> None:
    text = requests.get(stack.admin + "/metrics", timeout=10).text
    with sqlite3.connect(stack.data_dir / "keys.sqlite3") as db:
        digests = [row[0] for row in db.execute("SELECT digest FROM keys")]
    assert digests
    for key in keys.values():
        assert key not in text and key.split("_")[2] not in text
        assert f'key="{key_id(key)}"' in text  # ids only
    for secret in [*digests, "sk-upstream-alpha", "metrics-one"]:  # digests, the pool's key, key names
        assert secret not in text


def test_requests_in_flight(stack: Stack, keys: dict[str, str]) -> None:
    def in_flight() -> float:
        return fetch(stack)["bastion_requests_in_flight"].value()

    until(lambda: in_flight() == 0, 5)  # this scrape's own requests are not counted
    done = threading.Event()

    def stream() -> None:  # 6 chunks 0.5 s apart
        with requests.post(stack.base + "/v1/chat/completions", stream=True, timeout=10,
                           headers={"Authorization": f"Bearer {keys['one']}"},
                           json={"model": "slow-model", "stream": True, "messages": []}) as r:
            for _ in r.iter_content(None):
                pass
        done.set()

    threads = [threading.Thread(target=stream) for _ in range(2)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    assert in_flight() == 2
    # the CLI asks nginx directly (one request of its own, not two)
    assert prom_text.parse(stack.cli("metrics", "show"))["bastion_requests_in_flight"].value() == 2
    for t in threads:
        t.join()
    assert done.is_set()
    until(lambda: in_flight() == 0, 5)
    fams = fetch(stack)
    assert fams["bastion_nginx_up"].value() == 1
    assert fams["bastion_nginx_connections"].value(state="writing") >= 2
    assert fams["bastion_config_generation"].value() >= 1


def test_upstream_health(stack: Stack, pools: dict[str, str]) -> None:
    def up(fams, upstream: str) -> float | None:
        try:
            return fams["bastion_upstream_up"].value(pool="beta", upstream=upstream)
        except KeyError:
            return None
    until(lambda: up(fetch(stack), pools["dead"]) == 0)  # health_fails (2) failed probes
    assert up(fetch(stack), pools["beta"]) == 1


@pytest.fixture
def outside(stack: Stack) -> Iterator[Callable[[str], dict[str, str]]]:
    """Requests that nginx sees from another address: loopback becomes a trusted proxy, the address is sent
    as X-Forwarded-For. The office group (203.0.113.0/24) may reach the admin listener, 198.51.100.0/24 not."""
    stack.cli("cidr-groups", "add", "office", "--allow", "203.0.113.0/24")
    stack.cli("settings", "set", "admin_cidr_groups", '["private", "office"]')
    stack.cli("settings", "set", "trusted_proxies", '["127.0.0.1/32"]')
    yield lambda address: {"X-Forwarded-For": address}
    stack.cli("settings", "set", "trusted_proxies", "[]")
    stack.cli("settings", "set", "admin_cidr_groups", '["private"]')
    stack.cli("cidr-groups", "remove", "office")


def test_access_through_nginx(stack: Stack, keys, outside) -> None:
    url = stack.admin + "/metrics"
    office, stranger = outside("203.0.113.7"), outside("198.51.100.9")
    assert requests.get(url, timeout=10).status_code == 200  # loopback is in "private"
    r = requests.get(url, headers=office, timeout=10)
    assert r.status_code == 401 and "metrics_cidr_groups" in r.json()["message"]
    token = stack.cli("metrics", "token").strip()
    assert requests.get(url, headers={**office, "Authorization": f"Bearer {token}"}, timeout=10).status_code == 200
    jwt_token = stack.admin_token()
    assert requests.get(url, headers={**office, "Authorization": f"Bearer {jwt_token}"}, timeout=10).status_code == 200
    # nginx refuses an address outside admin_cidr_groups before the manager is asked, token or not
    r = requests.get(url, headers={**stranger, "Authorization": f"Bearer {token}"}, timeout=10)
    assert r.status_code == 403
    # nginx's own status page is for the manager only
    assert requests.get(stack.admin + "/_bastion/nginx-status", headers=office, timeout=10).status_code == 403
    stack.cli("settings", "set", "metrics_cidr_groups", "[]")
    try:
        assert requests.get(url, timeout=10).status_code == 401  # now even loopback needs the token
        assert requests.get(url, headers={"Authorization": f"Bearer {token}"}, timeout=10).status_code == 200
    finally:
        stack.cli("settings", "set", "metrics_cidr_groups", '["private"]')
    assert "revoked" in stack.cli("metrics", "revoke-token")
    assert requests.get(url, headers={**office, "Authorization": f"Bearer {token}"}, timeout=10).status_code == 401


GOOD = """# HELP a_total Help with \\\\ and \\n.
# TYPE a_total counter
a_total{x="q\\"uote\\\\"} 1
# HELP h Hist.
# TYPE h histogram
h_bucket{le="1.0"} 1
h_bucket{le="+Inf"} 2
h_sum 3.5
h_count 2
"""


@pytest.mark.parametrize("bad", [
    GOOD.replace('q\\"uote', 'q"uote'),  # unescaped quote
    GOOD.replace('h_bucket{le="1.0"} 1', 'h_bucket{le="1.0"} 3'),  # not cumulative
    GOOD.replace("h_count 2", "h_count 3"),  # +Inf differs from _count
    GOOD.replace('h_bucket{le="+Inf"} 2\n', ""),  # no +Inf bucket
    GOOD + 'a_total{x="other"} 1\n',  # a family in two groups
    GOOD.replace("h_sum 3.5\n", "h_sum 3.5\nh_sum 3.5\n"),  # duplicate series
    GOOD.replace("a_total", "a"),  # a counter not named *_total
    GOOD.replace("# TYPE a_total counter\n", "") .replace("# HELP a_total Help with \\\\ and \\n.\n", ""),  # no TYPE
    GOOD.replace("Help with", "Help \\x with"),  # bad escape in HELP
    GOOD[:-1],  # no final newline
])
def test_the_parser_is_strict(bad: str) -> None:
    assert prom_text.parse(GOOD)["h"].value("h_count") == 2
    with pytest.raises(ValueError):
        prom_text.parse(bad)


def test_models_no_pool_lists_are_counted_under_other() -> None:
    """A glob route lets clients name any model: those names must not each become a series of their own."""
    rows = [{"key": "k1", "model": "llama", "pool": "p", "requests": 2, "prompt_tokens": 5},
            {"key": "k1", "model": "made-up-1", "pool": "p", "requests": 1, "prompt_tokens": 1},
            {"key": "k1", "model": "made-up-2", "pool": "p", "requests": 3, "prompt_tokens": 2},
            {"key": "k2", "model": "made-up-1", "pool": "p", "requests": 4, "prompt_tokens": 0},
            {"key": "k2", "model": "", "pool": "", "requests": 7, "prompt_tokens": 0}]
    folded = {(r["key"], r["model"]): r["requests"] for r in metrics_mod.fold_models(rows, {"llama"})}
    assert folded == {("k1", "llama"): 2, ("k1", "other"): 4, ("k2", "other"): 4, ("k2", ""): 7}
