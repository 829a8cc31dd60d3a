"""Rendered nginx configuration: every feature combination passes `nginx -t` and says what it should."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from manager import cidr_groups, custom_config, pools
from manager import settings as settings_mod
from manager.apply import render_config
from manager.context import Bastion
from manager.datadir import DataDir
from tests.conftest import needs_nginx

pytestmark = needs_nginx


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
    text = (bastion.dirs.nginx_conf).read_text()
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
    text = bastion.dirs.nginx_conf.read_text()
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
    text = bastion.dirs.nginx_conf.read_text()
    assert "server 10.0.0.5:8000 max_fails" in text and "server 10.0.0.7:8000 max_fails" in text
    assert "server 127.0.0.1:8001 max_fails" in text and "[::1]:8001" not in text  # loopback: IPv4 only
    assert bastion.apply("again").changed is False  # stable rendering: no spurious generation
    answers.pop("gpu.example")  # a DNS hiccup keeps the last good addresses
    assert bastion.apply("dns down").changed is False
