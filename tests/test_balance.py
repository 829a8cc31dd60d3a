"""Model- and load-aware balancing inside a pool (authsvc/balance.py, manager/balancing.py, manager/running.py):
the gate's choice, what nginx is rendered and what the manager polls. End to end with real nginx: test_balance_e2e."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from authsvc import keys as keyformat
from authsvc.balance import HEADER, PLACED_TTL, Balancer, Choice, Load
from authsvc.gate import Gate
from authsvc.model_lists import RUNNING_FILE
from manager import balancing, generations, pools, running, traffic
from manager.context import Bastion
from manager.datadir import DataDir
from manager.render import pool_view
from manager.validation import ValidationError
from tests.conftest import needs_nginx
from tests.test_gate import PEPPER, Call, key_entry, write_snapshot

A, B, C = "http://a:1", "http://b:1", "http://c:1"
THREE = (Choice(0, A), Choice(1, B), Choice(2, C))


def picks(balancer: Balancer, model: str, loads: dict[str, Load], n: int, choices=THREE, generation: int = 1,
          pool: str = "p") -> list[int | None]:
    return [balancer.pick(pool, choices, (model,), loads, generation) for _ in range(n)]


def test_the_upstream_with_the_model_loaded_wins() -> None:
    loads = {A: Load(frozenset({"m1"})), B: Load(frozenset({"m2"})), C: Load(frozenset({"m2", "m3"}))}
    b = Balancer()
    assert picks(b, "m1", loads, 4) == [0, 0, 0, 0]
    assert picks(b, "m3", loads, 2) == [2, 2]
    # loaded on two: the requests sent since the figures came count as waiting (C has 2), then in turn
    assert picks(b, "m2", loads, 2) == [1, 1]
    assert sorted(picks(b, "m2", loads, 4)) == [1, 1, 2, 2]


def test_variants_match_ollama_names() -> None:
    loads = {A: Load(frozenset({"x"})), B: Load(frozenset({"llama3:latest"}))}
    assert Balancer().pick("p", THREE[:2], ("llama3", "llama3:latest"), loads, 1) == 1


def test_fewest_waiting_then_in_turn_without_herding_on_stale_figures() -> None:
    loads = {A: Load(frozenset({"m"}), waiting=3), B: Load(frozenset({"m"}), waiting=0),
             C: Load(frozenset({"m"}), waiting=1)}
    b = Balancer()
    got = picks(b, "m", loads, 7)
    # B first (0 waiting), then B and C in turn, then all three: never every request to the one that looked idle
    assert got == [1, 2, 1, 2, 1, 2, 0]
    # new figures: the gate's own counts start again
    assert picks(b, "m", loads, 1, generation=2) == [1]


def test_down_upstreams_are_never_picked_and_no_data_means_no_choice() -> None:
    loads = {A: Load(frozenset({"m"})), B: Load(frozenset()), C: Load(frozenset())}
    choices = (Choice(0, A, live=False), Choice(1, B), Choice(2, C))
    got = picks(Balancer(), "m", loads, 6, choices)
    assert 0 not in got and len(set(got)) == 1  # loaded only on the down one: sent on, then kept together
    assert picks(Balancer(), "m", {}, 2) == [None, None]  # nothing polled: nginx balances
    assert picks(Balancer(), "m", {A: loads[A]}, 1, choices) == [None]  # only the down one has figures
    assert picks(Balancer(), "m", loads, 1, tuple(Choice(c.index, c.url, False) for c in THREE)) == [None]


def test_a_model_loaded_nowhere_stays_where_it_was_sent_until_the_figures_change() -> None:
    now = [100.0]
    b = Balancer(clock=lambda: now[0])
    loads = {A: Load(frozenset({"x"})), B: Load(frozenset({"y"})), C: Load(frozenset())}
    first = picks(b, "cold", loads, 1)[0]
    assert picks(b, "cold", loads, 5) == [first] * 5  # it is loading there
    now[0] += PLACED_TTL + 1
    again = picks(b, "cold", loads, 3)  # the upstream never showed it: forgotten, placed anew
    assert again == [again[0]] * 3 and b.placed[("p", "cold")] == (again[0], now[0])
    fresh = Balancer(clock=lambda: now[0])
    assert picks(fresh, "cold2", loads, 2) == [0, 0]
    moved = {**loads, C: Load(frozenset({"cold2"}))}  # the figures say where it is loaded: they win
    assert picks(fresh, "cold2", moved, 2, generation=2) == [2, 2]


def test_between_polls_the_gate_counts_the_loads_it_caused() -> None:
    """One model fits on each: m3 sent to A replaces m1 there, whatever the older figures say."""
    loads = {A: Load(frozenset({"m1"})), B: Load(frozenset({"m2"}))}
    b = Balancer()
    assert picks(b, "m3", loads, 2, THREE[:2]) == [0, 0]
    assert picks(b, "m1", loads, 2, THREE[:2]) == [1, 1]  # not back to A, where m3 is now
    assert picks(b, "m2", loads, 1, THREE[:2]) == [0]  # B holds m1 now, A is least busy
    two = {A: Load(frozenset({"m1", "m2"})), B: Load(frozenset())}  # A was seen holding two
    b = Balancer()
    assert picks(b, "m3", two, 1, THREE[:2]) == [0]  # loaded nowhere, a tie: A in turn; one of m1, m2 stays
    kept = [m for m in ("m1", "m2") if m in b.believed[A]]
    assert len(kept) == 1 and picks(b, kept[0], two, 1, THREE[:2]) == [0]


def test_memory_stays_bounded() -> None:
    b = Balancer()
    loads = {A: Load(frozenset()), B: Load(frozenset())}
    for i in range(25_000):
        b.pick(f"p{i % 3}", THREE[:2], (f"model-{i}",), loads, 1)
    assert len(b.placed) <= 10_000 and len(b.turns) <= 10_000 and len(b.sent) <= 10_000


def test_the_setting_is_validated_and_off_by_default() -> None:
    assert traffic.of({})["model_aware"] is False
    assert traffic.pool_fields({"model_aware": True}, defaults=True)["model_aware"] is True
    with pytest.raises(ValidationError) as e:
        traffic.pool_fields({"model_aware": "yes"}, defaults=False)
    assert e.value.field == "model_aware"


def pool(model_aware: bool = True, backup: bool = False) -> dict:
    return {"name": "ol", "model_aware": model_aware, "upstreams": [
        {"url": "http://127.0.0.1:11434", "weight": 1, "backup": False},
        {"url": "http://127.0.0.1:11435", "weight": 1, "backup": False},
        {"url": "http://127.0.0.1:11436", "weight": 1, "backup": backup}]}


def test_one_block_per_primary_upstream_with_the_others_as_backup() -> None:
    resolved = {f"127.0.0.1:{p}": (f"127.0.0.1:{p}",) for p in (11434, 11435, 11436)}
    view = pool_view(pool(backup=True), frozenset({"http://127.0.0.1:11435"}), resolved)
    assert [c["index"] for c in view["choices"]] == [0, 1]  # the pool's backup is never picked
    first = view["choices"][0]["servers"]
    assert [(s["address"][-5:], s["backup"], s["down"]) for s in first] == [
        ("11434", False, False), ("11435", True, True), ("11436", True, False)]
    assert pool_view(pool(model_aware=False), frozenset(), resolved)["choices"] == []
    one = {**pool(), "upstreams": pool()["upstreams"][:1]}
    assert balancing.choices(one) == []  # one upstream: nothing to choose
    assert balancing.gate_view(pool(), {"http://127.0.0.1:11435"}) == [
        {"index": 0, "url": "http://127.0.0.1:11434", "live": True},
        {"index": 1, "url": "http://127.0.0.1:11435", "live": False},
        {"index": 2, "url": "http://127.0.0.1:11436", "live": True}]


def test_vllm_metrics_give_the_queue_and_the_models() -> None:
    text = ("# HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n"
            "# TYPE vllm:num_requests_waiting gauge\n"
            'vllm:num_requests_waiting{engine="0",model_name="meta-llama/Llama-3.1-8B"} 4.0\n'
            'vllm:num_requests_waiting{engine="1",model_name="meta-llama/Llama-3.1-8B"} 1.0\n'
            'vllm:num_requests_waiting_other{model_name="x"} 9.0\n'
            'vllm:num_requests_running{model_name="meta-llama/Llama-3.1-8B"} 7.0\n'
            'vllm:num_requests_waiting{model_name="bad name!"} nan\n')
    assert running.queue(text) == {"models": ["meta-llama/Llama-3.1-8B"], "waiting": 5}
    assert running.queue("# nothing of vLLM\nprocess_cpu_seconds_total 3\n") is None


def gate_with(tmp_path: Path, token: str, live: bool = True) -> Gate:
    write_snapshot(tmp_path / "snapshot.json", [key_entry(token)], pools=[
        {"name": "ol", "models": ["m1", "m2"], "balance": [{"index": 0, "url": A, "live": True},
                                                           {"index": 1, "url": B, "live": live}]},
        {"name": "plain", "models": ["p"]}],
        routes=[{"model": "m2", "pools": ["ol", "plain"]}])
    return Gate(tmp_path / "snapshot.json", PEPPER)


def write_loads(tmp_path: Path, loads: dict) -> None:
    path = tmp_path / "run" / RUNNING_FILE
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps({"pools": {}, "upstreams": loads}))
    os.utime(path, (time.time() + len(loads), time.time() + len(loads)))


def test_the_gate_names_the_upstream_with_the_model_loaded(tmp_path: Path) -> None:
    token = keyformat.generate()[1]
    g = gate_with(tmp_path, token)
    call = Call(g, "/api/chat", token, {"model": "m1"})
    assert call.status == 200 and HEADER not in call.headers  # nothing polled yet: nginx balances
    write_loads(tmp_path, {A: {"models": ["m2"], "waiting": 0}, B: {"models": ["m1:latest"], "waiting": 0}})
    assert g.running.load()
    for _ in range(3):
        assert Call(g, "/api/chat", token, {"model": "m1"}).headers[HEADER] == "ol:1"
    call = Call(g, "/v1/chat/completions", token, {"model": "m2", "messages": []})  # a route: its first pool
    assert call.headers[HEADER] == "ol:0" and call.headers["X-Bastion-Fallback"] == "ol,plain"
    assert HEADER not in Call(g, "/v1/chat/completions", token, {"model": "p"}).headers  # not model-aware


def test_the_gate_never_names_a_down_upstream(tmp_path: Path) -> None:
    token = keyformat.generate()[1]
    g = gate_with(tmp_path, token, live=False)
    write_loads(tmp_path, {A: {"models": []}, B: {"models": ["m1"]}})
    assert g.running.load()
    assert {Call(g, "/api/chat", token, {"model": "m1"}).headers[HEADER] for _ in range(3)} == {"ol:0"}


@needs_nginx
def test_model_aware_pools_of_every_method_pass_nginx_t(tmp_path: Path) -> None:
    """Blocks per upstream beside hash / random_two pools (no `backup` allowed there), an unresolved https
    host, a backup upstream, and a route across model-aware pools: nginx -t passes and the maps are there."""
    bastion = Bastion(DataDir.at(tmp_path / "data"))
    pools.add(bastion, "hashed", ["http://127.0.0.1:8000", "http://127.0.0.1:8001"], models=["m1"], method="hash",
              model_aware=True)
    pools.add(bastion, "rand", ["https://api.example.invalid:8443", "https://api.example.invalid:8444"],
              models=["m1"], method="random_two", model_aware=True, api_key="sk-x")
    pools.add(bastion, "with-backup", [{"url": "http://127.0.0.1:8002"}, {"url": "http://127.0.0.1:8003"},
                                       {"url": "http://127.0.0.1:8004", "backup": True}], models=["m2"],
              model_aware=True)
    pools.add(bastion, "plain", ["http://127.0.0.1:8005"], models=["m1"])
    pools.set_route(bastion, "m1", ["hashed", "rand", "plain"])
    text = generations.joined(generations.files(bastion.dirs, generations.live(bastion.dirs)))
    for fragment in ("upstream pool_hashed__1 {", "server 127.0.0.1:8000 max_fails=3 fail_timeout=10s backup;",
                     '"rand:1" pool_rand__1;', "proxy_pass https://$bastion_target_1;",
                     "upstream pool_with-backup__1 {", "proxy_pass http://pool_plain;",
                     "set $bastion_upstream $bastion_gate_upstream;"):
        assert fragment in text, fragment
    assert "pool_with-backup__2" not in text  # a backup upstream is never picked
    bastion.nginx.test(bastion.dirs.nginx_conf)
