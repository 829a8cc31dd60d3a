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


def test_nginx_refusals_of_malformed_requests_are_json(stack: Stack) -> None:
    """Headers too large, TRACE, an unknown Transfer-Encoding: nginx refuses them itself, in JSON too."""
    for base in (stack.base, stack.admin):
        cases = (("GET", {"X-Big": "a" * 40_000}, 400), ("TRACE", {}, 405), ("POST", {"Transfer-Encoding": "x"}, 501))
        for method, headers, status in cases:
            r = requests.request(method, base + "/v1/models", headers=headers, timeout=10)
            assert r.status_code == status, (base, method, r.text)
            assert r.headers["Content-Type"] == "application/json" and "X-Request-ID" in r.headers
            assert r.json()["error"]["message"], r.text
