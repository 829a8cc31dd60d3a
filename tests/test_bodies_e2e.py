"""Deep JSON through real nginx: the admin sign-in and the gate answer a 400 JSON error, never an empty 500."""

from __future__ import annotations

import requests

from tests.conftest import Stack

DEEP = 5000


def deep(prefix: str) -> str:
    return prefix + "[" * DEEP + "]" * DEEP + "}"


def test_deep_json_is_a_json_400_on_both_listeners(stack: Stack) -> None:
    r = requests.post(stack.admin + "/auth/login", data=deep('{"username":"admin","password":'),
                      headers={"Content-Type": "application/json"}, timeout=10)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["field"] == "body" and "128" in r.json()["message"]
    key = stack.key("deep")
    r = stack.post("/v1/chat/completions", key, data=deep('{"model":"m","messages":'),
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "json_too_deep"
    r = stack.post("/api/chat", key, data=deep('{"model":"m","messages":'))
    assert r.status_code == 400 and "128" in r.json()["error"], r.text
    assert stack.admin_token()  # and signing in still works
