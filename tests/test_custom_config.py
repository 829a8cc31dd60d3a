"""custom_config: an allow-list read by a real nginx tokenizer, and the masking of secrets for viewers.

Defect classes (issue 7): #6 a custom block made nginx (root) create files and sockets or reach Bastion's own
sockets; #10 viewers read credentials in custom_config unless they were a double-quoted Bearer.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import requests

from manager import custom_config
from manager import settings as settings_mod
from manager.context import Bastion
from manager.datadir import DataDir
from manager.validation import ValidationError
from tests.conftest import Stack, free_port, needs_nginx
from tests.fakes import FakeUpstream


def check(text: str) -> str:
    return settings_mod.VALIDATORS["custom_config"]("custom_config", text)


REFUSED = [  # (config, directive named in the error, line)
    ("server {\n    listen unix:/tmp/bastion-evil.sock;\n}", "listen", 2),
    ("server {\n  listen 9000;\n  location / { proxy_pass http://bastion_manager; }\n}", "proxy_pass", 3),
    ("server {\n  listen 9000;\n  location / { proxy_pass http://bastion_gate/x; }\n}", "proxy_pass", 3),
    ("server {\n  listen 9000;\n  location / { proxy_pass http://pool_main; }\n}", "proxy_pass", 3),
    ("server {\n  listen 9000;\n  location / { proxy_pass http://unix:/run/x.sock:/; }\n}", "proxy_pass", 3),
    ("server {\n  listen 9000;\n  location / {\n    proxy_pass http://$http_x_target;\n  }\n}", "proxy_pass", 4),
    ("server {\n  listen 9000;\n  location / { proxy_pass ftp://10.0.0.1/; }\n}", "proxy_pass", 3),
    ("upstream x {\n  server unix:/run/bastion/manager.sock;\n}", "upstream", 1),
    ("map $uri $x { default 1; }", "map", 1),
    ("server { listen 9000; }\nlimit_req_zone $binary_remote_addr zone=z:10m rate=1r/s;", "limit_req_zone", 2),
    ("include /etc/shadow;", "include", 1),
    ("server {\n  listen 9000;\n  access_log /etc/cron.d/x;\n}", "access_log", 3),
    ("server {\n  listen 9000;\n  error_log /root/x;\n}", "error_log", 3),
    ("server {\n  listen 9000;\n  root /;\n}", "root", 3),
    ("server {\n  listen 9000;\n  location /a/ {\n    alias /etc/;\n  }\n}", "alias", 4),
    ("server {\n  listen 9000 ssl;\n}", "listen", 2),
    ("server {\n  listen localhost:9000;\n}", "listen", 2),
    ("server {\n  listen 9000;\n  ssl_certificate /etc/ssl/x.pem;\n}", "ssl_certificate", 3),
    ("server {\n  listen 9000;\n  location / {\n    proxy_pass http://10.0.0.1;\n"
     "    proxy_ssl_trusted_certificate /etc/shadow;\n  }\n}", "proxy_ssl_trusted_certificate", 5),
    ("server {\n  listen 9000;\n  location / { proxy_store on; }\n}", "proxy_store", 3),
    ("server {\n  listen 9000;\n  # a comment with a brace }\n  js_import x.js;\n}", "js_import", 4),
    ("server {\n  listen 9000;\n  content_by_lua_block { os.execute('id') }\n}", "content_by_lua_block", 3),
    ("server {\n  listen 9000;\n  resolver 10.9.9.9;\n}", "resolver", 3),
    ("server {\n  listen 9000;\n  if (-f /etc/passwd) { return 200; }\n}", "if", 3),
    ("server {\n  listen 9000;\n  set $x y;\n}", "set", 3),
    ("server {\n  listen 9000;\n  try_files $uri /index.html;\n}", "try_files", 3),
    ("server {\n  listen 9000;\n  allow unix:;\n}", "allow", 3),
    ('server {\n  listen 9000;\n  return 200 "}";\n  "root" /;\n}', "root", 4),  # quoted name, brace in string
    ("server {\n  listen 9000;\n  error_page 404 =200 file.html;\n}", "error_page", 3),
    ("server {\n  listen 9000;\n  location / { listen 9001; }\n}", "listen", 3),
    ("server {\n  listen 9000;\n  location / {\n    proxy_pass http://a:b@10.0.0.1/;\n  }\n}", "proxy_pass", 4),
]


@pytest.mark.parametrize(("text", "directive", "line"), REFUSED, ids=[d for _, d, _ in REFUSED])
def test_refused_directives_name_the_directive_and_line(text: str, directive: str, line: int) -> None:
    with pytest.raises(ValidationError) as e:
        check(text)
    assert e.value.field == "custom_config"
    assert e.value.message.startswith(f"line {line}: "), e.value.message
    assert f"'{directive}'" in e.value.message, e.value.message


SYNTAX = [  # text that would let the rest of nginx.conf be read differently
    ("server { listen 9000; }\n}\nuser root;", 2),  # closes http { }
    ("server { listen 9000;\n  return 200 'abc;\n}", 2),  # an open string swallows Bastion's config
    ("server { listen 9000;", 1),
    ('server { listen 9000; return 200 "a"b; }', 1),
    ("server { listen 9000; return 200 x\\", 1),
]


@pytest.mark.parametrize(("text", "line"), SYNTAX)
def test_incomplete_syntax_is_refused_with_its_line(text: str, line: int) -> None:
    with pytest.raises(ValidationError) as e:
        check(text)
    assert e.value.message.startswith(f"line {line}: "), e.value.message


def test_tokenizer_reads_like_nginx() -> None:
    from manager.custom_config import parse, tokenize

    words = [t.value for t in tokenize(r"""a "b\"c" 'd\'e' f\;g ${h}i j#k # comment ; {
        }""") if t.kind == "word"]
    assert words == ["a", 'b"c', "d'e", "f\\;g", "${h}i", "j#k"]
    tree = parse("server { listen 1; location ~ ^/(a|b)$ { return 200 '{\"x\": 1}'; } }")
    assert tree[0].name.value == "server" and tree[0].block[1].values == ["~", "^/(a|b)$"]
    assert tree[0].block[1].block[0].values == ["200", '{"x": 1}']
    depth = "server { listen 1; " + "location / { " * 20 + "}" * 21
    with pytest.raises(ValidationError, match="nested deeper"):
        check(depth)


USEFUL = """server {
    listen 127.0.0.1:PORT default_server;
    listen [::1]:PORT;
    server_name api.example.com *.example.org;
    client_max_body_size 20m;
    # comments, regexes with backslashes, quotes of both kinds
    location ~* \\.(png|jpe?g)$ { return 404; }
    location / {
        proxy_pass http://127.0.0.1:UPSTREAM;
        proxy_http_version 1.1;
        proxy_set_header Host $host;
        proxy_set_header X-Api-Key 'upstream-secret';
        proxy_read_timeout 600s;
        proxy_buffering off;
        add_header X-Served-By "bastion-custom" always;
        add_header X-Quoted "a\\"b; c} # d" always;
        add_header X-Word ${host}x#y always;
        limit_except GET POST { allow 127.0.0.0/8; deny all; }
    }
    location = /old { rewrite ^ /new permanent; }
    location /ping { default_type application/json; return 200 '{"pong": true}'; }
    location @fallback { return 503; }
    error_page 502 504 =503 @fallback;
    access_log off;
} # a trailing comment without a line break"""


@needs_nginx
def test_useful_configs_are_accepted_and_pass_nginx_t(tmp_path: Path) -> None:
    bastion = Bastion(DataDir.at(tmp_path / "data"))
    text = USEFUL.replace("UPSTREAM", str(free_port())).replace("PORT", str(free_port()))
    settings_mod.update(bastion, {"custom_config": text})  # validates, renders and runs nginx -t
    assert text in bastion.dirs.nginx_conf.read_text()  # embedded verbatim
    assert bastion.settings()["custom_config"] == text


SECRET_SPELLINGS = [
    ("proxy_set_header Authorization 'Bearer sq-bearer-1';", "sq-bearer-1"),
    ('proxy_set_header Authorization "Basic YmFzaWMtMg==";', "YmFzaWMtMg=="),
    ("proxy_set_header X-Api-Key unquoted-3;", "unquoted-3"),
    ('add_header X-Token "dq-token-4" always;', "dq-token-4"),
    ("proxy_set_header Cookie 'session=sess-5; other=6';", "sess-5"),
    ("return 302 https://bob:url-pass-7@example.com/;", "url-pass-7"),
    ("return 302 https://example.com/cb?api_key=query-8&x=1;", "query-8"),
    ("proxy_set_header X-Multi \"a\\\"b secret-9\";", "secret-9"),
    ("more_set_headers 'X-Extra: extra-10';", "extra-10"),
    ("set $token tok-11;", "tok-11"),
    ('proxy_set_header X-Broken "unterminated-12', "unterminated-12"),
]


@pytest.mark.parametrize(("line", "secret"), SECRET_SPELLINGS, ids=[s for _, s in SECRET_SPELLINGS])
def test_mask_hides_every_header_value_and_url_credential(line: str, secret: str) -> None:
    text = f"server {{\n    location / {{\n        {line}\n    }}\n}}\n"
    masked = custom_config.mask(text)
    assert secret not in masked and "****" in masked, masked


def test_mask_keeps_what_is_not_secret() -> None:
    text = ('proxy_set_header Host $host;\nproxy_set_header Connection "";\nadd_header X-Request-ID '
            "$bastion_request_id always;\nproxy_set_header X-Forwarded-For \"$remote_addr, $host:$server_port\";\n"
            "proxy_pass http://127.0.0.1:8000/v1;\nreturn 200 '{\"ok\":true}';\n")
    assert custom_config.mask(text) == text
    assert custom_config.mask('proxy_set_header Authorization "Bearer sk-1";') == \
        'proxy_set_header Authorization "Bearer ****";'


# ---- through the API of a real stack ----

@pytest.fixture(scope="module")
def upstream():
    up = FakeUpstream("custom", ["m"])
    yield up
    up.close()


@pytest.fixture(scope="module")
def admin(stack: Stack, upstream: FakeUpstream) -> str:
    stack.cli("pools", "add", "main", "--url", upstream.url, "--api-key", "pool-secret-0")
    return stack.admin_token()


def call(stack: Stack, method: str, path: str, token: str, **kw) -> requests.Response:
    return requests.request(method, stack.admin + path, headers={"Authorization": f"Bearer {token}"},
                            timeout=30, **kw)


def snapshot(stack: Stack) -> tuple[bytes, bytes]:
    return ((stack.data_dir / "store.json").read_bytes(),
            (stack.data_dir / "nginx" / "live" / "nginx.conf").read_bytes())


@pytest.mark.parametrize("text", [
    "server { listen unix:SOCK; }",
    "server { listen PORT; location / { proxy_pass http://bastion_manager; } }",
    "server { listen PORT; location / { proxy_pass http://unix:SOCK:/; } }",
    "upstream evil { server unix:SOCK; }\nserver { listen PORT; location / { proxy_pass http://evil; } }",
])
def test_refused_config_changes_nothing_and_creates_no_socket(stack: Stack, admin: str, tmp_path: Path,
                                                               text: str) -> None:
    sock = tmp_path / "evil.sock"
    text = text.replace("SOCK", str(sock)).replace("PORT", str(free_port()))
    before = snapshot(stack)
    for method, path, body in (("POST", "/nginx/config/update", {"config": text}),
                               ("PATCH", "/api/v1/settings", {"custom_config": text})):
        r = call(stack, method, path, admin, json=body)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["field"] == "custom_config" and "line 1: " in r.json()["error"]["message"]
        assert snapshot(stack) == before
    assert not sock.exists()


@pytest.mark.parametrize("text", [
    "server { listen 127.0.0.1:FREE; location / { proxy_pass http://127.0.0.1:ADMIN; } }",
    "server { listen FREE; location / { proxy_pass http://[::ffff:127.0.0.1]:ADMIN/; } }",
    "server { listen FREE; location / { proxy_pass http://localhost:ADMIN; } }",
    "server { listen ADMIN; return 200; }",
    "server { listen 127.0.0.1:PUBLIC; server_name evil; return 200; }",
])
def test_custom_servers_keep_off_bastions_listeners(stack: Stack, admin: str, text: str) -> None:
    """Proxying to the admin listener would reach it as nginx (a local, trusted client) from anywhere."""
    text = (text.replace("ADMIN", str(stack.admin_port)).replace("PUBLIC", str(stack.public_port))
            .replace("FREE", str(free_port())))
    before = snapshot(stack)
    r = call(stack, "POST", "/nginx/config/update", admin, json={"config": text})
    assert r.status_code == 400 and "listener's" in r.json()["message"], r.text
    assert snapshot(stack) == before


def test_custom_servers_keep_off_the_http_and_https_listeners(stack: Stack, admin: str) -> None:
    port = free_port()
    assert call(stack, "PATCH", "/api/v1/settings", admin,
                json={"https_listen": f"127.0.0.1:{port}"}).status_code == 200
    try:
        text = f"server {{ listen 127.0.0.1:{port}; return 200; }}"
        r = call(stack, "POST", "/nginx/config/update", admin, json={"config": text})
        assert r.status_code == 400 and "https listener's" in r.json()["message"], r.text
    finally:
        assert call(stack, "PATCH", "/api/v1/settings", admin, json={"https_listen": None}).status_code == 200


def test_listeners_cannot_move_onto_a_custom_servers_port(stack: Stack, admin: str) -> None:
    port = free_port()
    text = f"server {{ listen 127.0.0.1:{port}; return 200 'custom'; }}"
    assert call(stack, "POST", "/nginx/config/update", admin, json={"config": text}).status_code == 200
    r = call(stack, "PATCH", "/api/v1/settings", admin, json={"admin_listen": f"127.0.0.1:{port}"})
    assert r.status_code == 400 and r.json()["error"]["field"] == "custom_config", r.text
    assert call(stack, "POST", "/nginx/config/update", admin, json={"config": ""}).status_code == 200


SECRET_CONFIG = """server {
    listen 127.0.0.1:PORT;
    location / {
        proxy_pass UPSTREAM;
        proxy_set_header Authorization 'Bearer sq-secret-1';
        proxy_set_header X-Api-Key xkey-secret-2;
        proxy_set_header Proxy-Authorization "Basic YmFzaWMtc2VjcmV0LTM=";
        add_header X-Debug-Token "dq-secret-4" always;
    }
    location /go { return 302 https://bob:url-secret-5@example.com/; }
    location /q { return 302 https://example.com/?api_key=query-secret-6; }
}"""
SECRETS = ["sq-secret-1", "xkey-secret-2", "YmFzaWMtc2VjcmV0LTM=", "dq-secret-4", "url-secret-5",
           "query-secret-6", "pool-secret-0", "hand-secret-8"]


def test_viewers_never_read_secrets_admins_read_their_custom_config(stack: Stack, admin: str,
                                                                     upstream: FakeUpstream) -> None:
    port = free_port()
    text = SECRET_CONFIG.replace("PORT", str(port)).replace("UPSTREAM", upstream.url)
    r = call(stack, "POST", "/nginx/config/update", admin, json={"config": text})
    assert r.status_code == 200, r.text
    generation = call(stack, "GET", "/api/v1/config", admin).json()["generation"]
    # the custom server works, with its headers
    answer = requests.get(f"http://127.0.0.1:{port}/v1/models", timeout=10)
    assert answer.status_code == 200 and answer.headers["X-Debug-Token"] == "dq-secret-4"
    assert upstream.requests[-1]["headers"]["X-Api-Key"] == "xkey-secret-2"

    r = call(stack, "POST", "/api/v1/users", admin, json={"username": "vic", "password": "viewer-pass",
                                                          "role": "viewer"})
    assert r.status_code == 201, r.text
    viewer = stack.admin_token("vic", "viewer-pass")
    # a hand edit of the live file (drift) with one more secret
    live = stack.data_dir / "nginx" / "live" / "nginx.conf"
    original = live.read_bytes()
    live.write_bytes(original.replace(b"proxy_set_header X-Api-Key xkey-secret-2;",
                                      b"proxy_set_header X-Api-Key xkey-secret-2;\n"
                                      b"        proxy_set_header X-Hand 'hand-secret-8';"))
    try:
        reads = {path: call(stack, "GET", path, viewer) for path in (
            "/api/v1/settings", "/nginx/config/get", "/nginx/config/get-default", "/api/v1/config/live",
            f"/api/v1/config/history/{generation}", "/api/v1/config")}
        assert reads["/api/v1/config"].json()["drift"] is True
        assert "X-Hand" in reads["/api/v1/config"].json()["drift_diff"]
        assert "X-Api-Key" in reads[f"/api/v1/config/history/{generation}"].json()["diff"]
        for path, r in reads.items():
            assert r.status_code == 200, (path, r.text)
            leaked = [s for s in SECRETS if s in r.text]
            assert not leaked, (path, leaked)
        # admins read back what they wrote (to edit it); rendered nginx text is masked for them too
        assert call(stack, "GET", "/api/v1/settings", admin).json()["custom_config"] == text
        for path in ("/nginx/config/get", "/api/v1/config/live", "/nginx/config/get-default"):
            body = call(stack, "GET", path, admin).text
            assert "pool-secret-0" not in body and "sq-secret-1" not in body, path
    finally:
        live.write_bytes(original)
    assert hashlib.sha256(live.read_bytes()).hexdigest() == hashlib.sha256(original).hexdigest()


@needs_nginx
def test_a_stored_config_the_allow_list_refuses_is_never_rendered(tmp_path: Path) -> None:
    """A custom config stored by an older version (or restored by a rollback to one) is left out."""
    bastion = Bastion(DataDir.at(tmp_path / "data"))
    sock = tmp_path / "evil.sock"
    bastion.store.update_settings(custom_config=f"server {{ listen unix:{sock}; }}")
    bastion.apply("test")
    assert "unix:" + str(sock) not in bastion.dirs.nginx_conf.read_text()
