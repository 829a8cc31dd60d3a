"""The gate as a plain WSGI callable: decisions, error shapes and snapshot reloads, without nginx."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import pytest

from authsvc import keys as keyformat
from authsvc.gate import Gate
from authsvc.ratelimit import RateLimiter
from authsvc.snapshot import CHECK_INTERVAL, KEYS_DB
from manager.keystore import KeyStore

PEPPER = b"test-pepper"


def key_entry(token: str, **rules) -> dict:
    key_id = keyformat.key_id_of(token)
    return {"id": key_id, "digest": keyformat.digest(PEPPER, token), "name": "t", "enabled": True, **rules}


def write_snapshot(path: Path, keys: list[dict], **extra) -> None:
    """snapshot.json next to a key store holding exactly `keys` (any other key there is revoked)."""
    data = {"pools": [{"name": "main", "models": ["llama3:latest", "gpt-4o"]},
                      {"name": "embed", "models": ["nomic"]}],
            "routes": [{"model": "qwen*", "pools": ["embed"]}], **extra}
    path.write_text(json.dumps(data))
    write_keys(path.with_name(KEYS_DB), keys)


def write_keys(db: Path, keys: list[dict]) -> None:
    store = KeyStore(db)
    wanted = {k["id"]: k for k in keys}
    for key_id in {k["id"] for k in store.all()} - set(wanted):
        store.update(key_id, lambda _: {"revoked_at": time.time()})
    for key_id, key in wanted.items():
        if store.update(key_id, lambda _, key=key: key) is None:
            store.insert(key)


class Call:
    def __init__(self, gate: Gate, path: str, token: str | None = None, body: object = None, method: str = "POST",
                 **environ):
        raw = body if isinstance(body, bytes) else json.dumps(body).encode() if body is not None else b""
        env = {"PATH_INFO": path, "REQUEST_METHOD": method, "CONTENT_LENGTH": str(len(raw)),
               "CONTENT_TYPE": "application/json", "wsgi.input": io.BytesIO(raw), "HTTP_X_REAL_IP": "127.0.0.1",
               **environ}
        if token:
            env["HTTP_AUTHORIZATION"] = f"Bearer {token}"

        def start_response(status: str, headers: list[tuple[str, str]]) -> None:
            self.status = int(status.split()[0])
            self.headers = dict(headers)

        self.body = b"".join(gate(env, start_response))

    def json(self):
        return json.loads(self.body)


@pytest.fixture
def token() -> str:
    return keyformat.generate()[1]


@pytest.fixture
def gate(tmp_path: Path, token: str) -> Gate:
    write_snapshot(tmp_path / "snapshot.json", [key_entry(token)])
    return Gate(tmp_path / "snapshot.json", PEPPER)


def test_allowed_request_is_redirected_to_the_model_pool(gate: Gate, token: str) -> None:
    c = Call(gate, "/v1/chat/completions", token, {"model": "gpt-4o", "messages": []})
    assert c.status == 200 and c.body == b""
    assert c.headers["X-Accel-Redirect"] == "@pool_main"
    assert c.headers["X-Bastion-Key"] == keyformat.key_id_of(token)
    assert c.headers["X-Bastion-Model"] == "gpt-4o"
    assert Call(gate, "/v1/embeddings", token, {"model": "qwen2-embed"}).headers["X-Accel-Redirect"] == "@pool_embed"
    # Ollama short names
    assert Call(gate, "/api/chat", token, {"model": "llama3"}).headers["X-Accel-Redirect"] == "@pool_main"
    assert Call(gate, "/api/show", token, {"name": "nomic"}).headers["X-Accel-Redirect"] == "@pool_embed"
    # endpoints without a model go to the default (first) pool
    assert Call(gate, "/v1/files", token, method="GET").headers["X-Accel-Redirect"] == "@pool_main"


@pytest.mark.parametrize("bad", [None, "", "sk-abc", "bst_short_x", "bst_aaaaaaaaaaaa_" + "b" * 40])
def test_bad_keys_get_401_openai_shaped(gate: Gate, bad: str | None) -> None:
    c = Call(gate, "/v1/chat/completions", bad, {"model": "gpt-4o"})
    assert c.status == 401
    assert c.json()["error"]["code"] == "invalid_api_key"
    assert c.json()["error"]["type"] == "invalid_request_error"


def test_x_api_key_header_works_too(gate: Gate, token: str) -> None:
    assert Call(gate, "/v1/models", None, method="GET", HTTP_X_API_KEY=token).status == 200


def test_tampered_secret_is_refused(gate: Gate, token: str) -> None:
    tampered = token[:-1] + ("A" if token[-1] != "A" else "B")
    assert Call(gate, "/v1/models", tampered, method="GET").status == 401


def test_a_key_seen_before_does_not_let_another_secret_in(gate: Gate, token: str) -> None:
    """identify() skips the HMAC for the secret that matched last: only for that very secret."""
    assert Call(gate, "/v1/models", token, method="GET").status == 200
    assert Call(gate, "/v1/models", token, method="GET").status == 200
    tampered = token[:-1] + ("A" if token[-1] != "A" else "B")
    assert Call(gate, "/v1/models", tampered, method="GET").status == 401
    assert Call(gate, "/v1/models", token, method="GET").status == 200


def test_ollama_errors_are_ollama_shaped(gate: Gate, token: str) -> None:
    c = Call(gate, "/api/chat", None, {"model": "llama3"})
    assert c.status == 401 and isinstance(c.json()["error"], str)
    c = Call(gate, "/api/chat", token, {"model": "nope"})
    assert c.status == 404 and "nope" in c.json()["error"]


@pytest.mark.parametrize(("body", "code", "status"), [
    (b"{oops", "invalid_json", 400),
    ({"messages": []}, "missing_model", 400),
    ({"model": 42}, "missing_model", 400),
    ([1, 2], "missing_model", 400),
    (None, "missing_model", 400),
    ({"model": "bad\r\nX-Injected: 1"}, "model_not_found", 404),
    ({"model": "gpt-4o\n"}, "model_not_found", 404),
])
def test_bodies_without_a_usable_model(gate: Gate, token: str, body, code: str, status: int) -> None:
    c = Call(gate, "/v1/chat/completions", token, body)
    assert c.status == status and c.json()["error"]["code"] == code
    assert "X-Accel-Redirect" not in c.headers


def test_model_allow_list_with_globs(tmp_path: Path, token: str) -> None:
    write_snapshot(tmp_path / "snapshot.json", [key_entry(token, models=["llama*"])])
    gate = Gate(tmp_path / "snapshot.json", PEPPER)
    assert Call(gate, "/v1/chat/completions", token, {"model": "llama3:latest"}).status == 200
    c = Call(gate, "/v1/chat/completions", token, {"model": "gpt-4o"})
    assert c.status == 404 and c.json()["error"]["code"] == "model_not_found"
    listed = Call(gate, "/v1/models", token, method="GET").json()
    assert [m["id"] for m in listed["data"]] == ["llama3:latest"]
    assert Call(gate, "/v1/models/gpt-4o", token, method="GET").status == 404
    assert Call(gate, "/v1/models/llama3:latest", token, method="GET").json()["owned_by"] == "main"
    assert Call(gate, "/v1/models/llama3", token, method="GET").json()["id"] == "llama3:latest"


def test_routes_win_over_pool_model_lists(tmp_path: Path, token: str) -> None:
    write_snapshot(tmp_path / "snapshot.json", [key_entry(token)],
                   routes=[{"model": "llama*", "pools": ["embed"]}, {"model": "gpt-4o", "pools": ["embed"]}])
    gate = Gate(tmp_path / "snapshot.json", PEPPER)
    for model in ("llama3", "llama3:latest", "gpt-4o"):
        assert Call(gate, "/v1/chat/completions", token, {"model": model}).headers["X-Accel-Redirect"] == "@pool_embed"
    assert Call(gate, "/v1/embeddings", token, {"model": "nomic"}).headers["X-Accel-Redirect"] == "@pool_embed"


def test_endpoint_rules(tmp_path: Path, token: str) -> None:
    other = keyformat.generate()[1]
    write_snapshot(tmp_path / "snapshot.json", [key_entry(token), key_entry(other, endpoints=["/v1/*"])])
    gate = Gate(tmp_path / "snapshot.json", PEPPER)
    for path in ("/api/pull", "/api/push", "/api/delete", "/api/create", "/api/copy", "/api/blobs/sha256:x"):
        c = Call(gate, path, token, {"model": "llama3"})
        assert c.status == 403, path
    assert Call(gate, "/api/chat", other, {"model": "llama3"}).status == 403
    assert Call(gate, "/v1/chat/completions", other, {"model": "gpt-4o"}).status == 200
    assert Call(gate, "/elsewhere", token, method="GET").status == 404


def test_disabled_expired_and_cidr(tmp_path: Path) -> None:
    disabled, expired, local, _ = (keyformat.generate()[1] for _ in range(4))
    write_snapshot(tmp_path / "snapshot.json", [
        key_entry(disabled, enabled=False),
        key_entry(expired, expires=time.time() - 1),
        key_entry(local, cidrs=["10.0.0.0/8"]),
    ])
    gate = Gate(tmp_path / "snapshot.json", PEPPER)
    assert "disabled" in Call(gate, "/v1/models", disabled, method="GET").json()["error"]["message"]
    assert "expired" in Call(gate, "/v1/models", expired, method="GET").json()["error"]["message"]
    assert Call(gate, "/v1/models", local, method="GET").status == 403
    assert Call(gate, "/v1/models", local, method="GET", HTTP_X_REAL_IP="10.1.2.3").status == 200


def test_rate_limit_headers(tmp_path: Path, token: str) -> None:
    write_snapshot(tmp_path / "snapshot.json", [key_entry(token, rpm=2)])
    gate = Gate(tmp_path / "snapshot.json", PEPPER)
    assert Call(gate, "/v1/models", token, method="GET").status == 200
    assert Call(gate, "/v1/models", token, method="GET").status == 200
    c = Call(gate, "/v1/models", token, method="GET")
    assert c.status == 429 and c.json()["error"]["code"] == "rate_limit_exceeded"
    assert c.headers["Retry-After"] == "30"
    assert c.headers["x-ratelimit-limit-requests"] == "2"
    assert c.headers["x-ratelimit-remaining-requests"] == "0"
    assert c.headers["X-Bastion-Key"] == keyformat.key_id_of(token)  # for nginx's log only


def test_token_bucket_refills() -> None:
    now = [0.0]
    limiter = RateLimiter(clock=lambda: now[0])
    assert [limiter.hit("k", 60).allowed for _ in range(60)] == [True] * 60
    assert not limiter.hit("k", 60).allowed
    now[0] += 1.0
    assert limiter.hit("k", 60).allowed
    assert not limiter.hit("k", 60).allowed


def test_new_snapshot_takes_effect_without_restart(tmp_path: Path, token: str) -> None:
    path = tmp_path / "snapshot.json"
    write_snapshot(path, [key_entry(token)])
    gate = Gate(path, PEPPER)
    assert Call(gate, "/v1/models", token, method="GET").status == 200
    write_snapshot(path, [])  # revoked
    time.sleep(CHECK_INTERVAL + 0.05)
    assert Call(gate, "/v1/models", token, method="GET").status == 401


def test_unreadable_snapshot_keeps_the_last_good_one(tmp_path: Path, token: str) -> None:
    path = tmp_path / "snapshot.json"
    write_snapshot(path, [key_entry(token)])
    gate = Gate(path, PEPPER)
    path.write_text("{broken")
    time.sleep(CHECK_INTERVAL + 0.05)
    assert Call(gate, "/v1/models", token, method="GET").status == 200


def test_unreadable_or_missing_key_store_keeps_the_keys_loaded(tmp_path: Path, token: str) -> None:
    path = tmp_path / "snapshot.json"
    write_snapshot(path, [key_entry(token)])
    gate = Gate(path, PEPPER)
    db = tmp_path / KEYS_DB
    for name in (KEYS_DB, KEYS_DB + "-wal", KEYS_DB + "-shm"):
        (tmp_path / name).unlink(missing_ok=True)
    time.sleep(CHECK_INTERVAL + 0.05)
    assert Call(gate, "/v1/models", token, method="GET").status == 200
    db.write_bytes(b"not a database" * 100)
    time.sleep(CHECK_INTERVAL + 0.05)
    assert Call(gate, "/v1/models", token, method="GET").status == 200
    db.unlink()
    other = keyformat.generate()[1]
    write_keys(db, [key_entry(other)])  # a fresh store replaces the view
    time.sleep(CHECK_INTERVAL + 0.05)
    assert Call(gate, "/v1/models", other, method="GET").status == 200
    assert Call(gate, "/v1/models", token, method="GET").status == 401


def test_key_cidr_groups_follow_the_group_definitions(tmp_path: Path, token: str) -> None:
    path = tmp_path / "snapshot.json"
    office = {"office": {"allow": ["10.0.0.0/8"], "deny": ["10.9.0.0/16"]}}
    lost = keyformat.generate()[1]
    write_snapshot(path, [key_entry(token, cidr_groups=["office"], cidrs=["192.168.1.0/24"]),
                          key_entry(lost, cidr_groups=["gone"])], cidr_groups=office)
    gate = Gate(path, PEPPER)

    def status(key: str, address: str) -> int:
        return Call(gate, "/v1/models", key, method="GET", HTTP_X_REAL_IP=address).status

    assert [status(token, a) for a in ("10.1.2.3", "192.168.1.9", "10.9.0.1", "127.0.0.1")] == [200, 200, 403, 403]
    assert status(lost, "127.0.0.1") == 403  # a group that does not exist denies everything
    office["office"]["allow"] = ["127.0.0.0/8"]
    path.write_text(json.dumps({"pools": [{"name": "main", "models": ["gpt-4o"]}], "cidr_groups": office}))
    time.sleep(CHECK_INTERVAL + 0.05)
    assert [status(token, a) for a in ("10.1.2.3", "192.168.1.9", "127.0.0.1")] == [403, 200, 200]


def test_model_found_whatever_the_content_type(tmp_path: Path, token: str) -> None:
    write_snapshot(tmp_path / "snapshot.json", [key_entry(token, models=["gpt-4o"])],
                   pools=[{"name": "main", "models": ["gpt-4o"]}, {"name": "audio", "models": ["whisper-1"]}])
    gate = Gate(tmp_path / "snapshot.json", PEPPER)
    for content_type in ("", "text/plain", "Application/JSON"):
        c = Call(gate, "/v1/responses", token, {"model": "secret-model"}, CONTENT_TYPE=content_type)
        assert c.status == 404, content_type
    multipart = (b'--XX\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\nRIFF\r\n'
                 b'--XX\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper-1\r\n--XX--\r\n')
    c = Call(gate, "/v1/audio/transcriptions", token, multipart, CONTENT_TYPE="multipart/form-data; boundary=XX")
    assert c.status == 404  # whisper-1 is not on this key's list
    assert Call(gate, "/v1/files", token, b"\x00binary", CONTENT_TYPE="application/octet-stream").status == 400
    assert Call(gate, "/v1/models/secret-model", token, method="DELETE").status == 404


def test_multipart_routes_by_model(tmp_path: Path, token: str) -> None:
    write_snapshot(tmp_path / "snapshot.json", [key_entry(token)],
                   pools=[{"name": "main", "models": ["gpt-4o"]}, {"name": "audio", "models": ["whisper-1"]}])
    gate = Gate(tmp_path / "snapshot.json", PEPPER)
    multipart = (b'--XX\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper-1\r\n--XX--\r\n')
    c = Call(gate, "/v1/audio/transcriptions", token, multipart, CONTENT_TYPE="multipart/form-data; boundary=XX")
    assert c.headers["X-Accel-Redirect"] == "@pool_audio"
    # an unrestricted key may still send bodies the gate cannot read: they go to the default pool
    c = Call(gate, "/v1/files", token, b"\x00binary", CONTENT_TYPE="application/octet-stream")
    assert c.headers["X-Accel-Redirect"] == "@pool_main"


@pytest.mark.parametrize("path", ["/api//pull", "/api/./pull", "/v1/../api/pull", "/v1/chat/completions/.."])
def test_non_canonical_paths_refused(gate: Gate, token: str, path: str) -> None:
    assert Call(gate, path, token, {"model": "gpt-4o"}).status == 400


def test_multipart_with_two_model_fields_refused(tmp_path: Path, token: str) -> None:
    write_snapshot(tmp_path / "snapshot.json", [key_entry(token, models=["gpt-4o"])])
    gate = Gate(tmp_path / "snapshot.json", PEPPER)
    body = (b'--XX\r\nContent-Disposition: form-data; name="model"\r\n\r\ngpt-4o\r\n'
            b'--XX\r\nContent-Disposition: form-data; name="model"\r\n\r\nsecret-model\r\n--XX--\r\n')
    c = Call(gate, "/v1/audio/transcriptions", token, body, CONTENT_TYPE="multipart/form-data; boundary=XX")
    assert c.status == 400 and c.json()["error"]["code"] == "ambiguous_body"


def form(*parts: bytes, boundary: bytes = b"XX") -> bytes:
    return b"".join(b"--" + boundary + b"\r\n" + p + b"\r\n" for p in parts) + b"--" + boundary + b"--\r\n"


MODEL_PART = b'Content-Disposition: form-data; name="model"\r\n\r\ngpt-4o'
SECRET_PART = b'Content-Disposition: form-data; name="model"\r\n\r\nsecret-model'


@pytest.mark.parametrize(("body", "content_type"), [
    # a JSON body dressed as a form: model endpoints always read JSON
    (b'{"model":"secret-model"}\r\n' + form(MODEL_PART), "multipart/form-data; boundary=XX"),
    (form(MODEL_PART), "multipart/form-data; boundary=XX; boundary=YY"),
    (form(b'Content-Disposition: form-data; name="x"; name="model"\r\n\r\ngpt-4o'), "multipart/form-data; boundary=XX"),
    (form(b'Content-Disposition: form-data; name="model"\r\nContent-Disposition: form-data; name="m2"\r\n\r\ngpt-4o'),
     "multipart/form-data; boundary=XX"),
    (b"preamble\r\n" + form(MODEL_PART), "multipart/form-data; boundary=XX"),
    (form(MODEL_PART, SECRET_PART), "multipart/form-data; boundary=XX"),
    (form(b'Content-Disposition: form-data; name="model"\r\nContent-Transfer-Encoding: base64\r\n\r\nZ3B0LTRv'),
     "multipart/form-data; boundary=XX"),
    (form(MODEL_PART), "multipart/form-data; boundary*=utf-8''XX"),
    (form(MODEL_PART), 'multipart/form-data; boundary="XX"; boundary=YY'),
    (form(MODEL_PART).replace(b"--XX\r\n", b"--XX \r\n", 1), "multipart/form-data; boundary=XX"),  # padding
    (form(MODEL_PART).replace(b"\r\n", b"\n"), "multipart/form-data; boundary=XX"),
    (b"\r\n" + form(MODEL_PART), "multipart/form-data; boundary=XX"),
    (b'{"model":"gpt-4o","MODEL":"secret-model"}', "application/json"),
])
def test_bodies_that_parsers_could_read_differently_are_refused(tmp_path: Path, token: str, body: bytes,
                                                                content_type: str) -> None:
    write_snapshot(tmp_path / "snapshot.json", [key_entry(token, models=["gpt-4o"])])
    gate = Gate(tmp_path / "snapshot.json", PEPPER)
    for path in ("/v1/chat/completions", "/v1/audio/transcriptions"):
        c = Call(gate, path, token, body, CONTENT_TYPE=content_type)
        assert c.status == 400, (path, c.body)


def test_ollama_model_rules_mirror_ollama(tmp_path: Path, token: str) -> None:
    write_snapshot(tmp_path / "snapshot.json", [key_entry(token, models=["llama3*"], endpoints=["/api/*"])])
    gate = Gate(tmp_path / "snapshot.json", PEPPER)
    assert Call(gate, "/api/pull", token, {"model": None, "name": "secret-model"}).status == 404
    assert Call(gate, "/api/pull", token, {"MODEL": "secret-model"}).status == 404
    assert Call(gate, "/api/pull", token, {"name": "llama3"}).status == 200
    # a restricted key's JSON body must name a model
    assert Call(gate, "/api/ps", token, {"verbose": True}).status == 405  # GET only
    assert Call(gate, "/api/extra", token, {"verbose": True}).status == 400


def test_huge_multipart_bodies_are_refused_fast(tmp_path: Path, token: str) -> None:
    write_snapshot(tmp_path / "snapshot.json", [key_entry(token)])
    gate = Gate(tmp_path / "snapshot.json", PEPPER)
    many = form(*([b'Content-Disposition: form-data; name="a"\r\n\r\nb'] * 340_000))
    t0 = time.perf_counter()
    c = Call(gate, "/v1/audio/transcriptions", token, many, CONTENT_TYPE="multipart/form-data; boundary=XX")
    assert time.perf_counter() - t0 < 1.0
    assert c.headers.get("X-Accel-Redirect") == "@pool_main"  # unrestricted: passed on unread, to the default


# --- body reading: exact-case JSON keys on OpenAI routes, strict JSON, capped depth, strict forms, JSON 500s ---

@pytest.fixture
def restricted(tmp_path: Path, token: str) -> Gate:
    """A gate whose key may use gpt-4o only (llama3* on /api), with a secret-model pool it must not reach."""
    write_snapshot(tmp_path / "snapshot.json", [key_entry(token, models=["gpt-4o", "llama3*"])],
                   pools=[{"name": "main", "models": ["gpt-4o", "llama3:latest"]},
                          {"name": "secret", "models": ["secret-model"]}])
    return Gate(tmp_path / "snapshot.json", PEPPER)


@pytest.mark.parametrize("body", [
    b'{"MODEL":"gpt-4o"}',  # a case-sensitive upstream sees no model and may fall back to its default
    b'{"Model":"gpt-4o","messages":[]}',
    b'{"model":"secret-model","model":"gpt-4o"}',  # cJSON, yyjson, simdjson keep the first, Python the last
    b'{"mod\\u0065l":"gpt-4o"}',  # simdjson matches keys as written: no model
    b'{"model":"secret-model","\\u006dodel":"gpt-4o"}',
    b'{"MOD\\u0045L":"gpt-4o"}',
    b'{"model\\u0000":"secret-model","model":"gpt-4o"}',  # cJSON ends keys at NUL and keeps the first
])
def test_openai_routes_read_only_the_exact_model_key(restricted: Gate, token: str, body: bytes) -> None:
    for path in ("/v1/chat/completions", "/v1/responses"):
        c = Call(restricted, path, token, body)
        assert c.status == 400, (path, c.body)
        assert c.json()["error"]["code"] == "ambiguous_body" and c.json()["error"]["param"] == "model"
        assert "X-Accel-Redirect" not in c.headers


def test_model_key_rules_per_route(tmp_path: Path, restricted: Gate, token: str) -> None:
    # a model-required endpoint refuses another spelling whatever the key; an unrestricted key's other
    # endpoints pass it, unread, to the default pool (the upstream sees no model, as the gate did)
    (tmp_path / "open").mkdir()  # a data dir of its own: keys live in keys.sqlite3 beside the snapshot
    write_snapshot(tmp_path / "open" / "snapshot.json", [key_entry(token)])
    open_gate = Gate(tmp_path / "open" / "snapshot.json", PEPPER)
    assert Call(open_gate, "/v1/chat/completions", token, {"MODEL": "gpt-4o"}).status == 400
    c = Call(open_gate, "/v1/responses", token, {"MODEL": "nomic"})
    assert c.headers["X-Accel-Redirect"] == "@pool_main" and "X-Bastion-Model" not in c.headers
    # Ollama's Go decoder matches keys case-insensitively: /api keeps that rule
    assert Call(restricted, "/api/chat", token, {"Model": "llama3"}).headers["X-Bastion-Model"] == "llama3"
    assert Call(restricted, "/api/chat", token, {"MODEL": "secret-model"}).status == 404
    # ordinary bodies that mention "model" elsewhere, or escape non-ASCII text, are read as usual
    tools = {"model": "gpt-4o", "messages": [{"role": "user", "content": "model"}], "tools": [{"type": "function",
             "function": {"name": "f", "parameters": {"properties": {"model": {"type": "string"}}}}}]}
    assert Call(restricted, "/v1/chat/completions", token, tools).headers["X-Bastion-Model"] == "gpt-4o"
    escaped = b'{"model":"gpt-4o","messages":[{"role":"user","content":"\\u00e9t\\u00e9 \\\\u0041"}]}'
    assert Call(restricted, "/v1/chat/completions", token, escaped).headers["X-Bastion-Model"] == "gpt-4o"


@pytest.mark.parametrize("body", [
    b'\xef\xbb\xbf{"model":"gpt-4o"}',  # a byte order mark: Python skips it, Go and pydantic refuse the body
    '{"model":"gpt-4o"}'.encode("utf-16"),  # Python's json.loads(bytes) guesses UTF-16; upstreams read UTF-8
    b'{"model":"gpt-4o","user":"\xed\xa0\x80"}',  # an encoded surrogate: invalid UTF-8
    b'{"model":"gpt-4o","temperature":NaN}',
    b'{"model":"gpt-4o","top_p":-Infinity}',
])
def test_only_standard_json_is_read(restricted: Gate, token: str, body: bytes) -> None:
    c = Call(restricted, "/v1/chat/completions", token, body)
    assert c.status == 400 and c.json()["error"]["code"] == "invalid_json", c.body
    c = Call(restricted, "/v1/responses", token, body)
    assert c.status == 400 and c.json()["error"]["code"] == "unreadable_body", c.body


def nested(depth: int, model: str = "gpt-4o") -> bytes:
    return b'{"model":"' + model.encode() + b'","messages":' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"


def test_deep_json_is_a_400_in_the_shape_of_the_route(restricted: Gate, token: str) -> None:
    c = Call(restricted, "/v1/chat/completions", token, nested(5000))
    assert c.status == 400 and c.json()["error"]["code"] == "json_too_deep", c.body
    assert "128" in c.json()["error"]["message"]
    c = Call(restricted, "/api/chat", token, nested(5000, "llama3"))
    assert c.status == 400 and "128" in c.json()["error"], c.body
    assert Call(restricted, "/v1/responses", token, b"[" * 200_000).status == 400
    assert Call(restricted, "/v1/chat/completions", token, nested(129)).status == 400
    assert Call(restricted, "/v1/chat/completions", token, nested(128)).status == 200
    # brackets inside strings are text, not nesting
    text = {"model": "gpt-4o", "messages": [{"role": "user", "content": "[{" * 5000 + '\\"[' * 100}]}
    assert Call(restricted, "/v1/chat/completions", token, text).status == 200


def test_deep_json_check_is_cheap_and_exact() -> None:
    from authsvc import bodies
    bodies.check_depth(b"[" * 128 + b"]" * 128)
    with pytest.raises(bodies.TooDeep):
        bodies.check_depth(b"[" * 129 + b"]" * 129)
    bodies.check_depth(b'["' + b"[" * 500 + b'\\"' + b"{" * 500 + b'"]')
    wide = json.dumps([[{"a": [1]}] * 20_000]).encode()  # many brackets, shallow: the precise scan
    t0 = time.perf_counter()
    bodies.check_depth(wide)
    assert time.perf_counter() - t0 < 0.25
    with pytest.raises(bodies.TooDeep):
        bodies.loads(b"{" + b'"a":{' * 2000 + b"}" * 2001)


def test_unexpected_errors_answer_json_500(gate: Gate, token: str, caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> None:
        raise RuntimeError("boom")
    gate.source.refresh = broken  # type: ignore[method-assign]
    c = Call(gate, "/v1/chat/completions", token, {"model": "gpt-4o"}, HTTP_X_REQUEST_ID="req-1")
    assert c.status == 500 and c.headers["Content-Type"] == "application/json"
    assert c.json()["error"]["code"] == "internal_error" and c.json()["error"]["type"] == "server_error"
    assert "boom" not in c.body.decode()
    c = Call(gate, "/api/chat", token, {"model": "llama3"})
    assert c.status == 500 and isinstance(c.json()["error"], str)
    assert any("req-1" in r.getMessage() and r.exc_info for r in caplog.records)


IMAGE_PART = b'Content-Disposition: form-data; name="image[]"; filename="a.png"\r\nContent-Type: image/png\r\n\r\nPNG'


@pytest.mark.parametrize(("body", "content_type"), [
    # werkzeug reads boundary*= (RFC 2231) over boundary=: the upstream splits on YY
    (form(MODEL_PART), "multipart/form-data; boundary=XX; boundary*=utf-8''YY"),
    (form(MODEL_PART), "multipart/form-data; charset=utf-16; boundary=XX"),  # Starlette decodes fields with it
    (form(MODEL_PART), "multipart/form-data; boundary=XX;"),
    # data after the closing boundary: Go does not take `--XX--junk` as the end, and nobody should read more
    (form(MODEL_PART) + b"junk", "multipart/form-data; boundary=XX"),
    (form(MODEL_PART)[:-2] + b"junk\r\n", "multipart/form-data; boundary=XX"),
    (form(MODEL_PART) + b"\r\n", "multipart/form-data; boundary=XX"),
    # part headers: RFC 2231 names, folded lines, dispositions other than form-data, model sent as a file
    (form(MODEL_PART, b"Content-Disposition: form-data; name=\"x\"; name*=utf-8''model\r\n\r\nsecret-model"),
     "multipart/form-data; boundary=XX"),
    (form(b'Content-Disposition: form-data; name="x"\r\n ; name="model"\r\n\r\nsecret-model', MODEL_PART),
     "multipart/form-data; boundary=XX"),
    (form(b"Content-Disposition: form-data; name=\"file\"; filename*=utf-8''a.wav\r\n\r\nRIFF", MODEL_PART),
     "multipart/form-data; boundary=XX"),
    (form(b'Content-Disposition: attachment; name="model"\r\n\r\ngpt-4o'), "multipart/form-data; boundary=XX"),
    (form(b'Content-Disposition: form-data; name="model"; filename="m"\r\n\r\ngpt-4o'),
     "multipart/form-data; boundary=XX"),
    (form(b'Content-Disposition: form-data; name="model"\r\nContent-Type: text/plain; charset=utf-7\r\n\r\ngpt-4o'),
     "multipart/form-data; boundary=XX"),
    (form(b'Content-Disposition: form-data; name="model"\r\nContent-Length: 3\r\n\r\ngpt-4o'),
     "multipart/form-data; boundary=XX"),
    (form(b'Content-Disposition: form-data; name="model"\r\nX-Model: secret-model\r\n\r\ngpt-4o'),
     "multipart/form-data; boundary=XX"),
    (form(b'Content-Disposition: form-data; name="mo\\"del"\r\n\r\nsecret-model', MODEL_PART),
     "multipart/form-data; boundary=XX"),
    (form(b'Content-Disposition: form-data; name="model"\r\n\r\n gpt-4o'), "multipart/form-data; boundary=XX"),
])
def test_multipart_forms_that_parsers_split_differently_are_refused(restricted: Gate, token: str, body: bytes,
                                                                    content_type: str) -> None:
    c = Call(restricted, "/v1/audio/transcriptions", token, body, CONTENT_TYPE=content_type)
    assert c.status in (400, 404) and "X-Accel-Redirect" not in c.headers, c.body


def test_ordinary_multipart_forms_pass(restricted: Gate, token: str) -> None:
    ok = [
        (form(IMAGE_PART, IMAGE_PART, MODEL_PART), "multipart/form-data; boundary=XX"),  # image[] repeats
        (form(MODEL_PART)[:-2], "multipart/form-data; boundary=XX"),  # no CRLF after the closing boundary
        (form(MODEL_PART, boundary=b"a'b+c"), 'Multipart/Form-Data;Boundary="a\'b+c"'),
        (form(MODEL_PART, boundary=b"x y:z"), 'multipart/form-data; boundary="x y:z"'),
        (form(b'content-disposition: form-data; name=model\r\nContent-Type: text/plain; charset=utf-8\r\n'
              b'Content-Length: 6\r\n\r\ngpt-4o'), "multipart/form-data; boundary=XX"),
    ]
    for body, content_type in ok:
        c = Call(restricted, "/v1/audio/transcriptions", token, body, CONTENT_TYPE=content_type)
        assert c.headers.get("X-Bastion-Model") == "gpt-4o", (body, c.body)


def test_key_feed_reopened_after_a_read_error_reads_only_the_changes(tmp_path: Path) -> None:
    """A transient error (a busy or recovering database) must not turn the next check into a full reload inside
    a request: the single-threaded gate would stall for every key (about 150 ms at 10,000 keys)."""
    from authsvc.snapshot import KeyFeed

    tokens = [keyformat.generate()[1] for _ in range(3)]
    db = tmp_path / KEYS_DB
    write_keys(db, [key_entry(t) for t in tokens[:2]])
    feed = KeyFeed(db)
    whole, rows = feed.poll()
    assert whole and len(rows) == 2
    feed.close()  # what a read error does
    KeyStore(db).insert({**key_entry(tokens[2]), "created_at": time.time()})
    whole, rows = feed.poll()
    assert not whole and [r["id"] for r in rows] == [keyformat.key_id_of(tokens[2])]
