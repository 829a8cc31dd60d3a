"""Rendered nginx configuration: every feature combination passes `nginx -t` and says what it should."""

from __future__ import annotations

import builtins
import io
import os
import re
import socket
from pathlib import Path

import pytest

from manager import cidr_groups, custom_config, generations, pools
from manager import settings as settings_mod
from manager.apply import render_config
from manager.context import Bastion
from manager.datadir import DataDir
from manager.metering import METER_JS
from manager.nginx import Nginx
from manager.render import RenderInput, render
from manager.render_input import freeze, gather
from manager.validation import ValidationError
from nginx_templates import TEMPLATE_DIR
from tests.conftest import needs_nginx

pytestmark = needs_nginx


def live_text(bastion: Bastion) -> str:
    """Every file of the live generation, as one text."""
    return generations.joined(generations.files(bastion.dirs, generations.live(bastion.dirs)))


@pytest.fixture
def bastion(tmp_path: Path) -> Bastion:
    return Bastion(DataDir.at(tmp_path / "data"))


def test_every_feature_renders_and_passes_nginx_t(bastion: Bastion) -> None:
    pools.add(bastion, "local", [{"url": "http://127.0.0.1:8000", "weight": 3},
                                 {"url": "http://127.0.0.1:8001", "backup": True}], models=["m1"],
              method="least_conn")
    pools.add(bastion, "v6", ["http://[::1]:8002"], models=["m2"], method="hash")
    pools.add(bastion, "cloud", ["https://api.example.invalid"], api_key="sk-cloud", models=["m3"],
              method="random_two")
    cidr_groups.create(bastion, "office", ["10.1.0.0/16"], ["10.1.2.0/24"])
    settings_mod.update(bastion, {"public_cidr_groups": ["office"], "trusted_proxies": ["192.0.2.0/24"],
                                  "server_name": "llm.example.com",
                                  "custom_config": "server { listen 127.0.0.1:65001; return 204; }"})
    text = live_text(bastion)
    fragments = [
        "least_conn;",
        "server 127.0.0.1:8000 weight=3 max_fails=3 fail_timeout=10s;",
        "server 127.0.0.1:8001 max_fails=3 fail_timeout=10s backup;",
        "hash $bastion_key consistent;",
        "server [::1]:8002 max_fails=3 fail_timeout=10s;",
        "random two least_conn;",
        "server 127.0.0.1:9 max_fails=3 fail_timeout=10s down;  # api.example.invalid did not resolve",
        "proxy_pass https://pool_cloud;",
        "proxy_set_header Host api.example.invalid;",
        "proxy_ssl_name api.example.invalid;",
        'proxy_set_header Authorization "Bearer sk-cloud";',
        "proxy_ssl_verify on;",
        "proxy_ssl_trusted_certificate /etc/ssl/certs/ca-certificates.crt;",
        "proxy_set_header Host [::1]:8002;",
        "deny 10.1.2.0/24;\n        allow 10.1.0.0/16;\n        deny all;",
        "set_real_ip_from 192.0.2.0/24;",
        "server_name llm.example.com;",
        "server { listen 127.0.0.1:65001; return 204; }",
        "proxy_buffering off;",
        "gzip off;",
    ]
    for fragment in fragments:
        assert fragment in text, fragment
    bastion.nginx.test(bastion.dirs.nginx_conf)
    # people see the config with upstream keys masked
    assert "sk-cloud" not in custom_config.mask(text)


def test_render_is_deterministic(bastion: Bastion) -> None:
    pools.add(bastion, "local", ["http://127.0.0.1:8000"], models=["m1"])
    assert render_config(bastion, 7) == render_config(bastion, 7)
    result = bastion.apply("test")
    assert not result.changed  # nothing new to apply: no new generation


def test_tls_verification_can_be_turned_off_per_pool(bastion: Bastion) -> None:
    pools.add(bastion, "selfsigned", ["https://127.0.0.1:8443"], models=["m"], tls_verify=False)
    text = live_text(bastion)
    assert "proxy_ssl_name 127.0.0.1;" in text and "proxy_ssl_verify on;" not in text


def test_every_address_of_a_hostname_is_a_server(bastion: Bastion, monkeypatch: pytest.MonkeyPatch) -> None:
    answers = {"gpu.example": [("10.0.0.7", 8000), ("10.0.0.5", 8000)],
               "localhost": [("::1", 8001), ("127.0.0.1", 8001)]}

    def fake_getaddrinfo(host, port, *args, **kwargs):
        if host not in answers:
            raise socket.gaierror("no such host")
        return [(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, p))
                for ip, p in answers[host]]

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    pools.add(bastion, "gpu", ["http://gpu.example:8000"], models=["m"])
    pools.add(bastion, "local", ["http://localhost:8001"], models=["n"])
    text = live_text(bastion)
    assert "server 10.0.0.5:8000 max_fails" in text and "server 10.0.0.7:8000 max_fails" in text
    assert "server 127.0.0.1:8001 max_fails" in text and "[::1]:8001" not in text  # loopback: IPv4 only
    assert bastion.apply("again").changed is False  # stable rendering: no spurious generation
    answers.pop("gpu.example")  # a DNS hiccup keeps the last good addresses
    assert bastion.apply("dns down").changed is False


# ---- the pure rendering: golden files, no I/O ----

GOLDEN = Path(__file__).parent / "golden"
GOLDEN_ROOT = "/srv/bastion-golden"  # the data dir named in the golden files


def golden_input(tls: bool = False, njs: bool = False) -> RenderInput:
    """A fixed input touching every feature of the templates (`tls`: with the HTTP and HTTPS listeners, two
    certificates, HSTS and CORS for two origins with credentials; `njs`: with token metering, CORS for any
    origin and no /v1-less paths)."""
    pools_ = [
        {"name": "local", "method": "least_conn", "models": ["m1"],
         "upstreams": [{"url": "http://127.0.0.1:8000", "weight": 3},
                       {"url": "http://127.0.0.1:8001", "backup": True}]},
        {"name": "cloud", "method": "random_two", "api_key": "sk-golden", "models": ["m2"],
         "upstreams": [{"url": "https://api.example.com:443"}]},
        {"name": "selfsigned", "tls_verify": False, "upstreams": [{"url": "https://[::1]:8443"}]},
        {"name": "gpu", "method": "hash", "upstreams": [{"url": "http://gpu.example:8000"},
                                                         {"url": "http://gone.example:8000"}],
         "retries": 0, "retry_timeout": 0, "retry_statuses": [429, 503], "connect_timeout": 2, "read_timeout": 30,
         "websocket": True},
        {"name": "empty", "upstreams": []},
    ]
    stored = {"public_cidr_groups": ["office"], "admin_cidr_groups": ["private", "vanished"],
              "trusted_proxies": ["192.0.2.0/24"], "server_name": "llm.example.com", "read_timeout": 700}
    if tls:
        stored.update(http_listen="127.0.0.1:8880", https_listen="127.0.0.1:8443", hsts=True)
        stored.update(cors_origins=["https://app.example.com", "http://localhost:3000"], cors_credentials=True)
    if njs:
        stored.update(cors_origins=["*"], cors_headers=["Authorization", "Content-Type"],
                      openai_paths_without_v1=False)
    tables = {"pools": pools_, "routes": [], "settings": [stored],
              "cidr_groups": [{"name": "office", "allow": ["10.1.0.0/16"], "deny": ["10.1.2.0/24"]}]}
    resolved = {"127.0.0.1:8000": ["127.0.0.1:8000"], "127.0.0.1:8001": ["127.0.0.1:8001"],
                "api.example.com:443": ["203.0.113.7:443"], "::1:8443": ["[::1]:8443"],
                "gpu.example:8000": ["10.0.0.5:8000", "10.0.0.7:8000"], "gone.example:8000": []}
    paths = {"pid": "nginx/nginx.pid", "error_log": "logs/error.log", "access_log": "logs/access.log",
             "admin_access_log": "logs/admin-access.log", "temp": "nginx/temp", "gate_socket": "run/authsvc.sock",
             "manager_socket": "run/manager.sock"}
    return RenderInput(
        tables=freeze(tables), settings=freeze(settings_mod.effective(stored)),
        custom_config="server { listen 127.0.0.1:65001; return 204; }", resolved=freeze(resolved),
        down=frozenset({"http://127.0.0.1:8001"}), worker_user=None,
        paths=freeze({k: f"{GOLDEN_ROOT}/{v}" for k, v in {**paths, "acme_webroot": "acme-webroot"}.items()}),
        certificates=freeze(GOLDEN_CERTIFICATES if tls else {}), njs_module=NJS_MODULE if njs else None,
        parallel_limits=(2, 5) if njs else ())


NJS_MODULE = "/usr/lib/nginx/modules/ngx_http_js_module.so"  # Debian's


GOLDEN_CERTIFICATES = {
    "api.example.com": {"names": ["api.example.com", "www.example.com"], "digest": "0123456789abcdef",
                        "fullchain": f"{GOLDEN_ROOT}/certbot/config/live/api.example.com/fullchain.pem",
                        "key": f"{GOLDEN_ROOT}/certbot/config/live/api.example.com/privkey.pem"},
    "wild": {"names": ["*.example.org"], "digest": "fedcba9876543210",
             "fullchain": f"{GOLDEN_ROOT}/certs/uploaded/wild/fullchain.pem",
             "key": f"{GOLDEN_ROOT}/certs/uploaded/wild/privkey.pem"},
}


@pytest.mark.parametrize("case", ["plain", "tls", "njs"])
def test_rendering_matches_the_golden_files_byte_for_byte(tmp_path: Path, case: str) -> None:
    """The checked-in files are what this input renders to (BASTION_UPDATE_GOLDEN=1 rewrites them after a
    deliberate template change: review the diff), and nginx accepts them. With token metering the generation
    also holds meter.js, as it is in nginx_templates (not kept twice)."""
    if case == "njs" and not Path(NJS_MODULE).exists():
        pytest.skip("no njs module")
    golden = GOLDEN if case == "plain" else GOLDEN / case
    files = render(golden_input(tls=case == "tls", njs=case == "njs"), 42)
    if case == "njs":
        meter = files.pop(METER_JS)
        assert meter == (TEMPLATE_DIR / METER_JS).read_text()
    if os.environ.get("BASTION_UPDATE_GOLDEN"):
        golden.mkdir(exist_ok=True)
        for name, text in files.items():
            (golden / name).write_text(text)
    assert sorted(files) == sorted(p.name for p in golden.iterdir() if p.is_file())
    for name, text in files.items():
        assert text.encode() == (golden / name).read_bytes(), f"{name} differs from {golden}/{name}"
    # the golden bytes themselves pass nginx -t (moved to a real data dir, with real certificate files)
    dirs = DataDir.at(tmp_path)
    dirs.ensure()
    gen = dirs.generations / "000042"
    gen.mkdir()
    for name in files:
        (gen / name).write_text((golden / name).read_text().replace(GOLDEN_ROOT, str(tmp_path)))
    if case == "njs":
        (gen / METER_JS).write_text(meter)
    if case == "tls":
        from tests.acme import make_cert, pem

        for cert in GOLDEN_CERTIFICATES.values():
            chain = Path(cert["fullchain"].replace(GOLDEN_ROOT, str(tmp_path)))
            chain.parent.mkdir(parents=True)
            leaf, key = make_cert(cert["names"][0], names=cert["names"])
            chain.write_text(pem(leaf))
            Path(cert["key"].replace(GOLDEN_ROOT, str(tmp_path))).write_text(pem(key))
    Nginx(dirs).test(gen / "nginx.conf")


def test_njs_runs_only_for_requests_that_reach_a_pool() -> None:
    """Decision 44: njs makes a VM for every request that touches it (6-12 µs of nginx CPU). The log line's
    outcome and the body towards a pool reach meter.js only through maps, whose value nginx evaluates for the
    matching entry alone: a request the gate answers (no pool) and a body without edits never start njs."""
    files = render(golden_input(njs=True), 42)
    main, public = files["nginx.conf"], files["public.conf"]
    js_set = set(re.findall(r"js_set \$(\w+)", main))
    start = main.index("log_format bastion ")
    logged = set(re.findall(r"\$(\w+)", main[start:main.index(";", start)]))
    assert "bastion_outcome" in logged and not js_set & logged
    assert 'map $bastion_pool $bastion_outcome {\n        "" "";\n        default $bastion_meter_outcome;' in main
    sent = set(re.findall(r"proxy_set_body \$(\w+);", public))
    assert sent == {"bastion_request_body"} and not js_set & sent
    assert 'map $bastion_body_edits $bastion_request_body {\n        "" $request_body;' in main


def test_render_is_a_pure_function_of_its_input(bastion: Bastion, monkeypatch: pytest.MonkeyPatch) -> None:
    """Gathered once, the input renders to the same bytes whatever happens afterwards, and rendering touches
    neither files nor the network."""
    answers = {"gpu.example": "10.0.0.5"}

    def fake_getaddrinfo(host, port, *args, **kwargs):
        if host not in answers:
            raise socket.gaierror("no such host")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (answers[host], port))]

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    pools.add(bastion, "gpu", ["http://gpu.example:8000"], models=["m"])
    inp = gather(bastion)
    first = render(inp, 3)
    assert render(inp, 3) == first
    # the world changes after gathering: DNS, health verdicts, the store
    answers["gpu.example"] = "10.0.0.9"
    (bastion.dirs.root / "health.json").write_text('{"http://gpu.example:8000": {"down": true, "fails": 9}}')
    settings_mod.update(bastion, {"read_timeout": 900})
    assert "10.0.0.9" in render(gather(bastion), 3)["nginx.conf"]  # a new gathering sees it...

    def no_io(*args, **kwargs):
        raise AssertionError("rendering did I/O")

    for module, name in ((socket, "getaddrinfo"), (socket, "socket"), (builtins, "open"), (io, "open"),
                         (os, "open"), (os, "stat"), (os, "listdir"), (os, "scandir")):
        monkeypatch.setattr(module, name, no_io)
    assert render(inp, 3) == first  # ...the gathered input does not
    with pytest.raises(TypeError):
        inp.tables["pools"][0]["name"] = "changed"  # type: ignore[index]


def test_only_certificates_nginx_can_load_are_rendered(bastion: Bastion, caplog: pytest.LogCaptureFixture) -> None:
    """A certificate whose key belongs to another one, or whose key file is missing, is left out (logged);
    nginx gets the rest and still passes `nginx -t`."""
    from tests.acme import make_cert, pem

    settings_mod.update(bastion, {"http_listen": "127.0.0.1:8880", "https_listen": "127.0.0.1:8443"})
    good = make_cert("a.example.test", names=["a.example.test"])
    other = make_cert("b.example.test", names=["b.example.test"])
    for name, cert, key in (("a.example.test", *good), ("b.example.test", other[0], good[1]),
                            ("c.example.test", *other)):
        folder = bastion.dirs.uploaded_certs / name
        folder.mkdir(parents=True)
        (folder / "fullchain.pem").write_text(pem(cert))
        if name != "c.example.test":
            (folder / "privkey.pem").write_text(pem(key))
    inp = gather(bastion)
    assert list(inp.certificates) == ["a.example.test"]
    assert "certificate b.example.test is not served: the private key does not belong" in caplog.text
    assert "certificate c.example.test is not served" in caplog.text
    text = render(inp, 5)["nginx.conf"]
    assert "listen 127.0.0.1:8443 ssl default_server;\n        server_name a.example.test;" in text
    assert "b.example.test" not in text and "c.example.test" not in text
    assert "return 308 https://$host:8443$request_uri;" in text
    bastion.apply("test")
    assert "server_name a.example.test;" in live_text(bastion)
    # published on another port (a container's 8443 as 443): the redirect names the port clients reach
    settings_mod.update(bastion, {"https_public_port": 443})
    assert "return 308 https://$host$request_uri;" in live_text(bastion)
    settings_mod.update(bastion, {"https_public_port": "9443"})
    assert "return 308 https://$host:9443$request_uri;" in live_text(bastion)
    with pytest.raises(ValidationError):
        settings_mod.update(bastion, {"https_public_port": 0})
