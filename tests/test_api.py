"""The management API on the admin listener of a real stack: llm-proxy recipes, auth, config lifecycle."""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import threading
import time

import jwt
import pytest
import requests

from tests.conftest import ADMIN_PASSWORD, Stack
from tests.fakes import FakeUpstream


def curl(*args: str) -> dict:
    out = subprocess.run(["curl", "-sS", *args], capture_output=True, text=True, timeout=30, check=True).stdout
    return json.loads(out)


@pytest.fixture(scope="module")
def upstream():
    up = FakeUpstream("api", ["api-model"])
    yield up
    up.close()


@pytest.fixture(scope="module")
def api(stack: Stack, upstream: FakeUpstream) -> Stack:
    stack.cli("pools", "add", "main", "--url", upstream.url)
    return stack


@pytest.fixture(scope="module")
def token(api: Stack) -> str:
    return api.admin_token()


def call(stack: Stack, method: str, path: str, token: str | None = None, **kw) -> requests.Response:
    headers = kw.pop("headers", {})
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return requests.request(method, stack.admin + path, headers=headers, timeout=30, **kw)


def live_config_sha(stack: Stack) -> str:
    return hashlib.sha256((stack.data_dir / "nginx" / "live" / "nginx.conf").read_bytes()).hexdigest()


def test_llm_proxy_setup_flow_with_curl(api: Stack) -> None:
    base = api.admin
    login = json.dumps({"username": "admin", "password": ADMIN_PASSWORD})
    token = curl("-X", "POST", f"{base}/auth/token", "-H", "Content-Type: application/json", "-d", login)["token"]
    auth = ["-H", f"Authorization: Bearer {token}", "-H", "Content-Type: application/json"]
    created = curl("-X", "POST", f"{base}/api/keys", *auth, "-d", '{"username":"user1"}')
    assert created["success"] is True and created["key"]["username"] == "user1"
    secret, key_id = created["key"]["key"], created["key"]["id"]
    assert secret.startswith("bst_") and created["key"]["createdAt"].endswith("Z")
    listed = curl(f"{base}/api/keys", *auth)
    entry = next(k for k in listed["keys"] if k["id"] == key_id)
    assert entry["key"] != secret and entry["key"].endswith("****")
    written = curl("-X", "POST", f"{base}/nginx/config/write-default", *auth,
                   "-d", '{"domain":"llm.example.com","cidrGroups":["127.0.0.0/8","192.168.1.0/24"]}')
    assert written == {"success": True, "message": "Default config written successfully"}
    reloaded = curl(f"{base}/nginx/reload", *auth)
    assert reloaded["success"] is True
    conf = curl(f"{base}/nginx/config/get", *auth)["config"]
    assert "server_name llm.example.com;" in conf and "allow 192.168.1.0/24;" in conf
    # the key works on the data plane; one request succeeds, one fails (unknown model)
    time.sleep(0.5)
    ok = api.post("/v1/chat/completions", secret, json={"model": "api-model", "messages": []})
    assert ok.status_code == 200
    assert api.post("/v1/chat/completions", secret, json={"model": "nope", "messages": []}).status_code == 404
    time.sleep(0.2)
    records = curl(f"{base}/api/analytics/{key_id}", *auth)["records"]
    assert len(records) == 2
    assert records[0]["endTime"] >= records[0]["startTime"] > 0
    assert records[1]["endTime"] is None
    # llm-proxy passed the key itself; that works too, and date ranges are epoch ms
    now_ms = int(time.time() * 1000)
    assert len(curl(f"{base}/api/analytics/{secret}?startDate={now_ms - 60_000}&endDate={now_ms + 1000}",
                    *auth)["records"]) == 2
    assert curl(f"{base}/api/analytics/{key_id}?startDate={now_ms + 60_000}", *auth)["records"] == []
    deleted = curl("-X", "DELETE", f"{base}/api/keys/{key_id}", *auth)
    assert deleted == {"success": True, "message": "API key deleted successfully"}
    time.sleep(0.5)
    assert api.post("/v1/chat/completions", secret, json={"model": "api-model"}).status_code == 401


def test_certificate_routes_answer_through_the_admin_listener(api: Stack, token: str) -> None:
    """The ACME flows run against Pebble in test_certificates.py; here: the llm-proxy shapes through nginx."""
    r = call(api, "POST", "/nginx/certificates/obtain", token, json={"domains": ["a.example.com"]})
    assert r.status_code == 409 and r.json()["success"] is False and "http_listen" in r.json()["message"]
    r = call(api, "GET", "/nginx/certificates/renew", token)
    assert r.status_code == 200 and r.json() == {"success": True, "message": "no certificate to renew"}


def test_config_refused_by_nginx_t_changes_nothing(api: Stack, token: str) -> None:
    before = live_config_sha(api)
    # allowed directives (the allow-list passes it), a value only nginx judges
    config = "server { listen 127.0.0.1:1; keepalive_timeout forever; }"
    r = call(api, "POST", "/nginx/config/update", token, json={"config": config})
    assert r.status_code == 422
    body = r.json()
    assert body["success"] is False and "nginx -t rejected" in body["message"] and "invalid value" in body["nginx"]
    assert live_config_sha(api) == before
    assert call(api, "GET", "/api/v1/settings", token).json()["custom_config"] == ""


def test_config_rejected_at_reload_rolls_back_while_traffic_flows(api: Stack, token: str) -> None:
    key = api.key("flow")
    time.sleep(0.5)
    stop, statuses = threading.Event(), []

    def traffic() -> None:
        while not stop.is_set():
            statuses.append(api.post("/v1/chat/completions", key, json={"model": "api-model"}).status_code)

    thread = threading.Thread(target=traffic)
    thread.start()
    try:
        before = live_config_sha(api)
        gen = call(api, "GET", "/api/v1/config", token).json()["generation"]
        with socket.socket() as blocker:  # `nginx -t` passes; the master cannot bind the port at reload
            blocker.bind(("127.0.0.1", 0))
            blocker.listen()
            custom = f"server {{ listen 127.0.0.1:{blocker.getsockname()[1]}; return 204; }}"
            r = call(api, "POST", "/nginx/config/update", token, json={"config": custom})
        assert r.status_code == 422, r.text
        assert "previous one was restored" in r.json()["message"] and "Address already in use" in r.json()["nginx"]
        assert live_config_sha(api) == before
        assert call(api, "GET", "/api/v1/config", token).json()["generation"] == gen
        time.sleep(0.3)
    finally:
        stop.set()
        thread.join()
    assert len(statuses) > 5 and set(statuses) == {200}


def test_rollback_to_an_earlier_generation(api: Stack, token: str) -> None:
    first = call(api, "PATCH", "/api/v1/settings", token, json={"read_timeout": 700})
    assert first.status_code == 200 and first.json()["read_timeout"] == 700
    gen_700 = call(api, "GET", "/api/v1/config", token).json()["generation"]
    call(api, "PATCH", "/api/v1/settings", token, json={"read_timeout": 800})
    history = call(api, "GET", "/api/v1/config/history", token).json()
    assert history[0]["live"] and history[0]["author"] == "admin"
    detail = call(api, "GET", f"/api/v1/config/history/{history[0]['generation']}", token).json()
    assert "-            proxy_read_timeout 700s;" in detail["diff"]
    assert "+            proxy_read_timeout 800s;" in detail["diff"]
    r = call(api, "POST", "/api/v1/config/rollback", token, json={"generation": gen_700})
    assert r.status_code == 200, r.text
    assert call(api, "GET", "/api/v1/settings", token).json()["read_timeout"] == 700
    assert "proxy_read_timeout 700s;" in call(api, "GET", "/api/v1/config/live", token).json()["config"]
    assert api.get("/healthz").json()["generation"] == r.json()["generation"]
    assert call(api, "POST", "/api/v1/config/rollback", token, json={"generation": 999999}).status_code == 404


def test_drift_detected(api: Stack, token: str) -> None:
    assert call(api, "GET", "/api/v1/config", token).json()["drift"] is False
    conf = api.data_dir / "nginx" / "live" / "nginx.conf"
    original = conf.read_text()
    try:
        conf.write_text(original.replace("worker_connections 11024;", "worker_connections 1024;"))
        status = call(api, "GET", "/api/v1/config", token).json()
        assert status["drift"] is True and "+    worker_connections 1024;" in status["drift_diff"]
    finally:
        conf.write_text(original)
    assert call(api, "GET", "/api/v1/config", token).json()["drift"] is False


INJECTIONS = [
    ("/nginx/config/write-default", {"domain": "a.com; return 200", "cidrGroups": ["10.0.0.0/8"]}, "domain"),
    ("/nginx/config/write-default", {"domain": "a.com{", "cidrGroups": ["10.0.0.0/8"]}, "domain"),
    ("/nginx/config/write-default", {"domain": "a .com", "cidrGroups": ["10.0.0.0/8"]}, "domain"),
    ("/nginx/config/write-default", {"domain": "a.com\nb", "cidrGroups": ["10.0.0.0/8"]}, "domain"),
    ("/nginx/config/write-default", {"domain": "$host", "cidrGroups": ["10.0.0.0/8"]}, "domain"),
    ("/nginx/config/write-default", {"domain": "fe80::1%x;allow all;#", "cidrGroups": ["10.0.0.0/8"]}, "domain"),
    ("/nginx/config/write-default", {"domain": "::1%$host", "cidrGroups": ["10.0.0.0/8"]}, "domain"),
    ("/nginx/config/write-default", {"domain": "a.com", "cidrGroups": ["fe80::%x;allow all;#/64"]},
     "cidrGroups[0]"),
    ("/nginx/config/write-default", {"domain": "a.com", "cidrGroups": ["0.0.0.0/0; allow all"]}, "cidrGroups[0]"),
    ("/nginx/config/write-default", {"domain": "a.com", "cidrGroups": ["10.0.0.1/33"]}, "cidrGroups[0]"),
    ("/nginx/config/write-default", {"domain": "a.com", "cidrGroups": "10.0.0.0/8"}, "cidrGroups"),
    ("/nginx/config/write-default", {"domain": 5, "cidrGroups": []}, "domain"),
    ("/nginx/config/write-default", {"domain": "a.com"}, "cidrGroups"),
    ("/api/v1/pools", {"name": "x", "upstreams": ["http://h:80;"]}, "upstreams[0].url"),
    ("/api/v1/pools", {"name": "x", "upstreams": [{"url": "http://h/ {"}]}, "upstreams[0].url"),
    ("/api/v1/pools", {"name": "x", "upstreams": "http://h:80"}, "upstreams"),
    ("/api/v1/pools", {"name": "x y", "upstreams": ["http://h:80"]}, "name"),
    ("/api/v1/pools", {"name": "x", "upstreams": ["http://h:80"], "api_key": "a b"}, "api_key"),
    ("/api/v1/pools", {"name": "x", "upstreams": [{"url": "http://h:80", "weight": "9"}], "method": "best"},
     "method"),
    ("/api/keys", {"username": "bob; rm -rf"}, "username"),
    ("/nginx/config/update", {"config": "server { listen 127.0.0.1:1; access_log /etc/passwd; }"}, "custom_config"),
    ("/nginx/config/update", {"config": 'server { return 200 "#"; "root" /; }'}, "custom_config"),
    ("/nginx/config/update", {"config": "include /etc/shadow;"}, "custom_config"),
    ("/nginx/config/update", {"config": "server {\n  # c\n  js_import x.js; }"}, "custom_config"),
    ("/nginx/config/update", {"config": "server { r\\oot /; }"}, "custom_config"),
    ("/api/keys", {"username": 123}, "username"),
    ("/api/v1/keys", {"name": "k", "rpm": "many"}, "rpm"),
    ("/api/v1/keys", {"name": "k", "models": ["a b"]}, "models[0]"),
    ("/api/v1/keys", {"name": "k", "models": "gpt-4o"}, "models"),
    ("/api/v1/keys", {"name": "k", "cidr_groups": ["nope"]}, "cidr_groups[0]"),
    ("/api/v1/keys", {"name": "k", "colour": "red"}, "colour"),
    ("/api/v1/cidr-groups", {"name": "g", "allow": ["10.0.0.1/33"]}, "allow[0]"),
    ("/api/v1/routes", {"model": "m", "pools": ["ghost"]}, "pools[0]"),
    ("/api/v1/pools", {"name": "p2", "upstreams": ["http://127.0.0.1:9"], "models": ["m"],
                       "passthrough": ["/tokenize", "/v1/x"]}, "passthrough[1]"),
    ("/api/v1/routes", {"model": "m", "pools": ["main"], "mode": "random"}, "mode"),
    ("/api/v1/pools", {"name": "x", "upstreams": ["http://h:80"], "retry_statuses": [404]}, "retry_statuses[0]"),
    ("/api/v1/pools", {"name": "x", "upstreams": ["http://h:80"], "read_timeout": 0}, "read_timeout"),
    ("/api/v1/pools", {"name": "x", "upstreams": ["http://h:80"], "websocket": "on"}, "websocket"),
    ("/api/v1/users", {"username": "eve", "password": "short"}, "password"),
    ("/api/v1/users", {"username": "eve", "password": "long-enough", "role": "root"}, "role"),
    ("/auth/token", {"username": ["admin"], "password": 1}, None),
]


@pytest.mark.parametrize(("path", "body", "field"), INJECTIONS, ids=[f"{p} {b}" for p, b, _ in INJECTIONS])
def test_bad_input_is_a_400_naming_the_field(api: Stack, token: str, path: str, body: dict, field: str | None) -> None:
    before = live_config_sha(api)
    store_before = (api.data_dir / "store.json").read_bytes()
    r = call(api, "POST", path, token, json=body)
    if field is None:  # wrong credential types: refused like wrong credentials
        assert r.status_code == 401
        return
    assert r.status_code == 400, r.text
    assert r.json()["error"]["field"] == field and r.json()["success"] is False
    assert live_config_sha(api) == before
    assert (api.data_dir / "store.json").read_bytes() == store_before


def test_wrong_body_types_and_sizes(api: Stack, token: str) -> None:
    for data in ("not json", "[1, 2]", "null", ""):
        r = call(api, "POST", "/api/v1/keys", token, data=data, headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["field"] == "body"
    r = call(api, "POST", "/api/v1/keys", token, json={"name": "x" * 300_000})
    assert r.status_code == 413 and r.json()["success"] is False
    r = call(api, "PATCH", "/api/v1/settings", token, json={"body_limit_mb": True})
    assert r.status_code == 400 and r.json()["error"]["field"] == "body_limit_mb"
    before = (api.data_dir / "store.json").read_bytes()
    for body, field in (({"cors_origins": ["https://a.example.com/x"]}, "cors_origins[0]"),
                        ({"cors_origins": "https://a.example.com"}, "cors_origins"),
                        ({"cors_origins": ["*"], "cors_credentials": True}, "cors_credentials"),
                        ({"unauthenticated_rpm": "lots"}, "unauthenticated_rpm")):
        r = call(api, "PATCH", "/api/v1/settings", token, json=body)
        assert r.status_code == 400 and r.json()["error"]["field"] == field, r.text
    assert (api.data_dir / "store.json").read_bytes() == before
    shown = call(api, "GET", "/api/v1/settings", token).json()
    assert shown["cors_origins"] == [] and shown["openai_paths_without_v1"] is True
    assert shown["unauthenticated_rpm"] == 60


def test_authentication_required(api: Stack) -> None:
    for method, path in (("GET", "/api/keys"), ("GET", "/api/v1/pools"), ("POST", "/api/v1/keys"),
                         ("GET", "/nginx/config/get"), ("GET", "/nginx/reload")):
        r = call(api, method, path)
        assert r.status_code == 401, path
    assert call(api, "GET", "/api/v1/health").status_code == 200
    assert call(api, "GET", "/api/v1/openapi.json").status_code == 200


def test_forged_expired_and_wrong_secret_tokens(api: Stack, token: str) -> None:
    claims = jwt.decode(token, options={"verify_signature": False})
    wrong_secret = jwt.encode(claims, "not-the-secret-but-long-enough-for-hs256", algorithm="HS256")
    secret = (api.data_dir / "jwt_secret").read_bytes().strip()
    expired = jwt.encode({**claims, "exp": int(time.time()) - 10}, secret, algorithm="HS256")
    promoted = token.split(".")
    promoted[1] = jwt.utils.base64url_encode(json.dumps({**claims, "sub": "someone"}).encode()).decode()
    none_alg = jwt.encode(claims, None, algorithm="none")
    for bad in (wrong_secret, expired, ".".join(promoted), none_alg, "garbage", token[:-2]):
        assert call(api, "GET", "/api/keys", bad).status_code == 401


def test_viewer_reads_but_cannot_change(api: Stack, token: str) -> None:
    r = call(api, "POST", "/api/v1/users", token, json={"username": "viv", "password": "viewer-pass", "role": "viewer"})
    assert r.status_code == 201
    viewer = api.admin_token("viv", "viewer-pass")
    assert call(api, "GET", "/api/keys", viewer).status_code == 200
    assert call(api, "GET", "/api/v1/settings", viewer).status_code == 200
    for method, path, body in (("POST", "/api/keys", {"username": "v1"}), ("DELETE", "/api/keys/abc", None),
                               ("PATCH", "/api/v1/settings", {"read_timeout": 5}), ("GET", "/nginx/reload", None),
                               ("POST", "/api/v1/config/apply", None), ("POST", "/api/v1/pools", {"name": "p"})):
        r = call(api, method, path, viewer, json=body)
        assert r.status_code == 403, (method, path, r.text)
    assert call(api, "POST", "/auth/logout", viewer).status_code == 200


def test_cookie_session_needs_csrf_and_logout_ends_it(api: Stack) -> None:
    s = requests.Session()
    r = s.post(api.admin + "/auth/login", json={"username": "admin", "password": ADMIN_PASSWORD}, timeout=10)
    assert r.status_code == 200 and r.json() == {"success": True, "username": "admin", "role": "admin",
                                                 "csrfToken": s.cookies["csrf_token"]}
    cookie = next(c for c in s.cookies if c.name == "auth_token")
    assert cookie.has_nonstandard_attr("HttpOnly") and cookie.get_nonstandard_attr("SameSite") == "Strict"
    assert s.get(api.admin + "/api/keys", timeout=10).status_code == 200
    r = s.post(api.admin + "/api/keys", json={"username": "cookie1"}, timeout=10)
    assert r.status_code == 403 and "X-CSRF-Token" in r.json()["message"]
    r = s.post(api.admin + "/api/keys", json={"username": "cookie1"}, timeout=10,
               headers={"X-CSRF-Token": "wrong"})
    assert r.status_code == 403
    r = s.post(api.admin + "/api/keys", json={"username": "cookie1"}, timeout=10,
               headers={"X-CSRF-Token": s.cookies["csrf_token"]})
    assert r.status_code == 201
    stolen = s.cookies["auth_token"]
    assert s.post(api.admin + "/auth/logout", headers={"X-CSRF-Token": s.cookies["csrf_token"]},
                  timeout=10).status_code == 200
    r = requests.get(api.admin + "/api/keys", cookies={"auth_token": stolen}, timeout=10)
    assert r.status_code == 401


def test_logout_ends_a_bearer_token(api: Stack) -> None:
    t = api.admin_token()
    assert call(api, "POST", "/auth/logout", t).status_code == 200
    assert call(api, "GET", "/api/keys", t).status_code == 401


def test_lockout_after_repeated_failures(api: Stack, token: str) -> None:
    call(api, "POST", "/api/v1/users", token, json={"username": "locky", "password": "locky-pass", "role": "viewer"})
    for _ in range(5):
        r = requests.post(api.admin + "/auth/token", json={"username": "locky", "password": "wrong"}, timeout=10)
        assert r.status_code == 401
    r = requests.post(api.admin + "/auth/token", json={"username": "locky", "password": "locky-pass"}, timeout=10)
    assert r.status_code == 429 and int(r.headers["Retry-After"]) > 0
    # the client IP is locked out too, for any user (until the back-off ends)
    r = requests.post(api.admin + "/auth/token", json={"username": "admin", "password": ADMIN_PASSWORD}, timeout=10)
    assert r.status_code == 429
    api.cli("auth", "unlock")
    assert requests.post(api.admin + "/auth/token", json={"username": "locky", "password": "locky-pass"},
                         timeout=10).status_code == 200


def test_audit_log_records_changes(api: Stack, token: str) -> None:
    call(api, "POST", "/api/v1/routes", token, json={"model": "audited-*", "pools": ["main"]})
    entries = call(api, "GET", "/api/v1/audit", token).json()
    assert entries[0]["author"] == "admin" and entries[0]["action"] == "route audited-* to main"


def test_openapi_describes_every_route(api: Stack) -> None:
    doc = call(api, "GET", "/api/v1/openapi.json").json()
    assert doc["openapi"].startswith("3.")
    described = {(path, method) for path, ops in doc["paths"].items() for method in ops}
    from manager.app import create_app

    app = create_app({"DATA_DIR": str(api.data_dir)})
    import re

    routes = {(re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule), method.lower())
              for rule in app.url_map.iter_rules() for method in rule.methods - {"HEAD", "OPTIONS"}}
    assert routes == described


def test_admin_listener_cidr_and_real_ip(api: Stack, token: str) -> None:
    key = api.key("cidr")
    office_key = api.key("office-only", "--cidrs", "10.0.0.0/8")
    time.sleep(0.5)
    assert call(api, "POST", "/api/v1/cidr-groups", token, json={"name": "office", "allow": ["10.0.0.0/8"]}).ok
    r = call(api, "PATCH", "/api/v1/settings", token, json={"admin_cidr_groups": ["office"], "force": True})
    assert r.status_code == 200, r.text
    try:
        refused = call(api, "GET", "/api/v1/health")
        assert refused.status_code == 403 and "admin interface" in refused.json()["message"]
        assert api.get("/v1/models", key).status_code == 200  # the public listener still serves keys
        # behind a trusted proxy, the address in X-Forwarded-For is the one CIDR rules see
        api.cli("settings", "set", "trusted_proxies", '["127.0.0.1/32"]')
        assert call(api, "GET", "/api/v1/health", headers={"X-Forwarded-For": "10.1.2.3"}).status_code == 200
        assert call(api, "GET", "/api/v1/health", headers={"X-Forwarded-For": "8.8.8.8"}).status_code == 403
        # ...and so do the keys' own CIDR rules on the public listener
        assert api.get("/v1/models", office_key).status_code == 403
        assert api.get("/v1/models", office_key, headers={"X-Forwarded-For": "10.1.2.3"}).status_code == 200
    finally:
        api.cli("settings", "set", "admin_cidr_groups", '["private"]')
        api.cli("settings", "set", "trusted_proxies", "[]")
    assert call(api, "GET", "/api/v1/health").status_code == 200
