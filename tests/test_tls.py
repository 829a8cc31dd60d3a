"""HTTPS through real nginx (`bastion up --http --https`) with certificates from Pebble: HTTP-01 served by
nginx's HTTP listener, SNI, a client trusting only Pebble's root, the OpenAI SDK streaming over HTTPS, the
redirect, HSTS, a forced renewal reloading nginx through certbot's deploy hook, and certificates nginx cannot
serve left out while everything else keeps being served."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import requests

from manager import generations
from tests.acme import HAVE_PEBBLE, Pebble, make_cert, pem
from tests.conftest import NGINX, Stack, free_port
from tests.fakes import FakeUpstream

pytestmark = pytest.mark.skipif(not (HAVE_PEBBLE and Path(NGINX).exists()), reason="needs pebble and nginx")

NAME = "api.example.test"
OTHER = "www.example.test"
UPLOADED = "up.example.test"


class Tls:
    def __init__(self, stack: Stack, pebble: Pebble, https_port: int, root: Path):
        self.stack, self.pebble, self.https_port, self.root = stack, pebble, https_port, root
        self.http = f"http://127.0.0.1:{pebble.http_port}"
        self.headers = {"Authorization": f"Bearer {stack.admin_token()}"}

    def admin(self, method: str, path: str, **kw) -> requests.Response:
        return requests.request(method, self.stack.admin + path, headers=self.headers, timeout=120, **kw)

    def url(self, host: str, path: str = "/healthz") -> str:
        return f"https://{host}:{self.https_port}{path}"

    def served_certificate(self, host: str, ca: Path | None = None) -> dict:
        """The certificate nginx presents for SNI `host`, verified against `ca` (Pebble's root by default)."""
        context = ssl.create_default_context(cafile=str(ca or self.root))
        with socket.create_connection(("127.0.0.1", self.https_port), timeout=5) as raw, \
                context.wrap_socket(raw, server_hostname=host) as tls:
            return tls.getpeercert()

    def live(self, name: str) -> Path:
        return self.stack.data_dir / "certbot" / "config" / "live" / name


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tls]:
    # every *.example.test name resolves to 127.0.0.1 here (challtestsrv answers the same for Pebble)
    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host, *args, **kwargs):
        return real_getaddrinfo("127.0.0.1" if str(host).endswith(".example.test") else host, *args, **kwargs)

    root = tmp_path_factory.mktemp("tls")
    pebble = Pebble(root / "pebble", webroot_server=False)  # nginx's HTTP listener answers Pebble's challenges
    stack = Stack(root / "data")
    https_port = free_port()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket, "getaddrinfo", getaddrinfo)
        try:
            stack.start("--http", f"127.0.0.1:{pebble.http_port}", "--https", f"127.0.0.1:{https_port}")
            for name, value in (("acme_server", pebble.directory), ("acme_ca_bundle", str(pebble.ca_bundle)),
                                ("acme_email", "ops@example.test")):
                stack.cli("settings", "set", name, value)
            (root / "pebble-root.pem").write_bytes(pebble.root_pem())
            yield Tls(stack, pebble, https_port, root / "pebble-root.pem")
        finally:
            stack.stop()
            pebble.close()


@pytest.fixture(scope="module")
def obtained(tls: Tls) -> Tls:
    """Before: the HTTP listener serves only challenges, nothing listens for HTTPS. Then a certificate for two
    names is obtained through the API (HTTP-01 answered by nginx)."""
    r = requests.get(f"{tls.http}/v1/models", timeout=5, allow_redirects=False)
    assert r.status_code == 404 and "only serves ACME challenges" in r.json()["error"]["message"]
    with pytest.raises(requests.ConnectionError):
        requests.get(tls.url(NAME), verify=str(tls.root), timeout=5)
    r = tls.admin("POST", "/api/v1/certificates", json={"domains": [NAME, OTHER]})
    assert r.status_code == 201, r.text
    assert r.json()["domains"] == [NAME, OTHER]
    return tls


def serial(cert: dict) -> str:
    return cert["serialNumber"].lower().lstrip("0")


def live_serial(tls: Tls, name: str) -> str:
    from manager.certs import pem as pem_mod

    return pem_mod.read_summary(str(tls.live(name) / "cert.pem")).serial.lstrip("0")


def test_https_serves_the_obtained_certificate_to_a_client_trusting_only_pebbles_root(obtained: Tls) -> None:
    tls = obtained
    for host in (NAME, OTHER):
        r = requests.get(tls.url(host), verify=str(tls.root), timeout=5)
        assert r.status_code == 200 and r.json()["status"] == "ok", r.text
        assert serial(tls.served_certificate(host)) == live_serial(tls, NAME)
    # the system's CAs do not know Pebble: the chain really is Pebble's
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(tls.url(NAME), timeout=5)
    # the API answers over HTTPS exactly as over HTTP (a JSON 401 without a key)
    r = requests.get(tls.url(NAME, "/v1/models"), verify=str(tls.root), timeout=5)
    assert r.status_code == 401 and r.json()["error"]["code"]
    assert "Strict-Transport-Security" not in r.headers  # hsts is off by default
    # TLS 1.2 and 1.3 only
    context = ssl.create_default_context(cafile=str(tls.root))
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    with socket.create_connection(("127.0.0.1", tls.https_port), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname=NAME) as conn:
        assert conn.version() == "TLSv1.2"


def test_http_listener_serves_challenges_and_redirects_everything_else(obtained: Tls) -> None:
    tls = obtained
    challenges = tls.stack.data_dir / "acme-webroot" / ".well-known" / "acme-challenge"
    (challenges / "token-abc").write_text("token-abc.thumbprint")
    r = requests.get(f"{tls.http}/.well-known/acme-challenge/token-abc", timeout=5)
    assert r.status_code == 200 and r.text == "token-abc.thumbprint"
    for path in ("/.well-known/acme-challenge/", "/.well-known/acme-challenge/missing"):  # no listing
        assert requests.get(f"{tls.http}{path}", timeout=5).status_code == 404, path
    # nothing outside the webroot: nginx resolves the dots first (the result is redirected, or refused)
    for dots, status in (("%2e%2e/%2e%2e", 308), ("%2e%2e/%2e%2e/%2e%2e", 400)):
        r = requests.get(f"{tls.http}/.well-known/acme-challenge/{dots}/store.json", timeout=5, allow_redirects=False)
        assert r.status_code == status, dots
    r = requests.get(f"{tls.http}/v1/chat/completions?x=1", headers={"Host": NAME}, timeout=5, allow_redirects=False)
    assert r.status_code == 308  # a POST stays a POST
    assert r.headers["Location"] == f"https://{NAME}:{tls.https_port}/v1/chat/completions?x=1"


def test_openai_sdk_streams_a_chat_over_https(obtained: Tls) -> None:
    tls = obtained
    upstream = FakeUpstream("tls", ["tls-model"], chunk_delay=0.2)
    try:
        tls.stack.cli("pools", "add", "tlspool", "--url", upstream.url)
        key = tls.stack.key("tls")
        time.sleep(0.5)  # the gate picks up new snapshots within 0.25 s
        http_client = httpx.Client(verify=ssl.create_default_context(cafile=str(tls.root)))
        client = openai.OpenAI(base_url=tls.url(NAME, "/v1"), api_key=key, max_retries=0, http_client=http_client)
        stream = client.chat.completions.create(model="tls-model", messages=[{"role": "user", "content": "hi"}],
                                                stream=True)
        chunks = iter(stream)
        first = next(chunks)
        assert first.choices[0].delta.content and not upstream.stream_finished.is_set()  # streamed, not buffered
        rest = list(chunks)
        assert len(rest) >= 4 and upstream.stream_finished.wait(2)
    finally:
        upstream.close()


def test_hsts_header_over_https_only(obtained: Tls) -> None:
    tls = obtained
    tls.stack.cli("settings", "set", "hsts", "true")
    try:
        r = requests.get(tls.url(NAME, "/v1/models"), verify=str(tls.root), timeout=5)
        assert r.headers["Strict-Transport-Security"] == "max-age=63072000"
        r = requests.get(tls.url(NAME), verify=str(tls.root), timeout=5)
        assert r.headers["Strict-Transport-Security"] == "max-age=63072000"
        assert "Strict-Transport-Security" not in tls.stack.get("/v1/models").headers  # the plain listener
    finally:
        tls.stack.cli("settings", "set", "hsts", "false")


def test_forced_renew_runs_the_deploy_hook_which_reloads_nginx(obtained: Tls) -> None:
    tls = obtained
    before = serial(tls.served_certificate(NAME))
    r = tls.admin("POST", f"/api/v1/certificates/{NAME}/renew", json={"force_renewal": True})
    assert r.status_code == 200 and r.json()["ok"], r.text
    after = serial(tls.served_certificate(NAME))
    assert after != before and after == live_serial(tls, NAME)
    # the hook itself applied the new generation (author certbot), before the renewal returned
    meta = json.loads((tls.stack.data_dir / "nginx" / "live" / "meta.json").read_text())
    assert meta["author"] == "certbot", meta
    status = {c["name"]: c for c in tls.admin("GET", "/api/v1/certificates").json()}
    assert status[NAME]["last_deployed"] and status[NAME]["last_renewal"]["ok"]


def test_uploaded_certificates_and_what_nginx_cannot_serve(obtained: Tls, tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    tls = obtained
    ca = make_cert("Upload test CA", ca=True)
    leaf, key = make_cert(UPLOADED, ca, names=[UPLOADED])
    (tmp_path / "ca.pem").write_text(pem(ca[0]))
    r = tls.admin("POST", "/api/v1/certificates/upload",
                  json={"certificate": pem(leaf, ca[0]), "private_key": pem(key), "domains": [UPLOADED]})
    assert r.status_code == 201, r.text
    # served side by side with the ACME certificate, chosen by SNI
    assert serial(tls.served_certificate(UPLOADED, tmp_path / "ca.pem")) == format(leaf.serial_number, "x")
    acme_serial = serial(tls.served_certificate(NAME))
    uploaded = tls.stack.data_dir / "certs" / "uploaded" / UPLOADED
    stored = {p.name: p.read_bytes() for p in uploaded.iterdir()}

    # a successor nginx refuses (its signature uses SHA-1): 422 with nginx's words, the previous files back
    chain, weak_key = sha1_signed(tmp_path, UPLOADED)
    r = tls.admin("POST", "/api/v1/certificates/upload",
                  json={"certificate": chain, "private_key": weak_key, "domains": [UPLOADED]})
    assert r.status_code == 422 and "ca md too weak" in r.text, r.text
    assert {p.name: p.read_bytes() for p in uploaded.iterdir()} == stored
    assert serial(tls.served_certificate(UPLOADED, tmp_path / "ca.pem")) == format(leaf.serial_number, "x")
    generation = generations.live(_dirs(tls))

    # its key file goes missing: the next apply leaves its server out (logged), nginx keeps serving the rest
    (uploaded / "privkey.pem").unlink()
    tls.stack.cli("settings", "set", "read_timeout", "601")
    assert f"certificate {UPLOADED} is not served" in caplog.text
    assert generations.live(_dirs(tls)) > generation
    assert serial(tls.served_certificate(NAME)) == acme_serial
    with pytest.raises(ssl.SSLCertVerificationError):  # its name now gets the default (ACME) certificate
        tls.served_certificate(UPLOADED, tmp_path / "ca.pem")

    # a broken certificate file: left out the same way; nginx never sees it, never stops
    (uploaded / "privkey.pem").write_text(pem(key))
    (uploaded / "fullchain.pem").write_text("-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n")
    caplog.clear()
    tls.stack.cli("settings", "set", "read_timeout", "602")
    assert f"certificate {UPLOADED} is not served" in caplog.text
    assert serial(tls.served_certificate(NAME)) == acme_serial
    assert requests.get(tls.url(NAME), verify=str(tls.root), timeout=5).status_code == 200

    # removing a served certificate re-applies without it
    (uploaded / "fullchain.pem").write_text(pem(leaf, ca[0]))
    tls.stack.cli("settings", "set", "read_timeout", "600")
    assert serial(tls.served_certificate(UPLOADED, tmp_path / "ca.pem")) == format(leaf.serial_number, "x")
    assert tls.admin("DELETE", f"/api/v1/certificates/{UPLOADED}").status_code == 200
    assert UPLOADED not in (tls.stack.data_dir / "nginx" / "live" / "nginx.conf").read_text()
    with pytest.raises(ssl.SSLCertVerificationError):
        tls.served_certificate(UPLOADED, tmp_path / "ca.pem")


def sha1_signed(tmp: Path, name: str) -> tuple[str, str]:
    """A leaf certificate signed with SHA-1 (cryptography refuses to make one; OpenSSL's CLI still does),
    without its issuer: it passes Bastion's upload checks, OpenSSL's security level makes nginx refuse it."""
    def run(*argv: str) -> None:
        subprocess.run(["openssl", *argv], check=True, capture_output=True, cwd=tmp)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    run("req", "-x509", *ec, "-keyout", "weak-ca.key", "-out", "weak-ca.pem", "-days", "3", "-subj", "/CN=weak CA")
    run("req", "-new", *ec, "-keyout", "weak.key", "-out", "weak.csr", "-subj", f"/CN={name}")
    (tmp / "weak.ext").write_text(f"subjectAltName=DNS:{name}\n")
    run("x509", "-req", "-in", "weak.csr", "-CA", "weak-ca.pem", "-CAkey", "weak-ca.key", "-CAcreateserial",
        "-sha1", "-days", "2", "-extfile", "weak.ext", "-out", "weak.pem")
    return (tmp / "weak.pem").read_text(), (tmp / "weak.key").read_text()


def _dirs(tls: Tls):
    from manager.datadir import DataDir

    return DataDir.at(tls.stack.data_dir)


def test_failed_obtains_leave_nginx_serving_what_it_served(obtained: Tls) -> None:
    """The domain points elsewhere (the challenge fails), the ACME server is unreachable, the domain is hostile:
    clear errors, and nginx keeps the same generation and the same certificate."""
    tls = obtained
    generation = tls.stack.get("/healthz").json()["generation"]
    before = serial(tls.served_certificate(NAME))
    requests.post(f"{tls.pebble.challtestsrv}/add-a", json={"host": "elsewhere.example.test.",
                                                             "addresses": ["127.0.0.2"]}, timeout=5).raise_for_status()
    r = tls.admin("POST", "/api/v1/certificates", json={"domains": ["elsewhere.example.test"]})
    assert r.status_code == 502 and "failed to authenticate" in r.json()["message"], r.text
    r = tls.admin("POST", "/api/v1/certificates", json={"domains": ["x.example.test;reboot"]})
    assert r.status_code == 400 and r.json()["error"]["field"] == "domains[0]", r.text
    directory = json.loads(tls.stack.cli("settings", "show"))["acme_server"]
    tls.stack.cli("settings", "set", "acme_server", f"https://127.0.0.1:{free_port()}/dir")
    try:
        r = tls.admin("POST", "/api/v1/certificates", json={"domains": ["new.example.test"]})
        assert r.status_code == 502 and "refused" in r.json()["message"], r.text
    finally:
        tls.stack.cli("settings", "set", "acme_server", directory)
    assert tls.stack.get("/healthz").json()["generation"] == generation
    assert serial(tls.served_certificate(NAME)) == before
    assert requests.get(tls.url(NAME), verify=str(tls.root), timeout=5).status_code == 200


def test_a_certificate_nginx_refuses_does_not_block_later_changes(obtained: Tls) -> None:
    """An obtained certificate nginx cannot serve (here: another program holds the HTTPS port) is set aside
    with nginx's reason; every later change still applies, and the certificate is served once it can be."""
    tls = obtained
    for cert in tls.admin("GET", "/api/v1/certificates").json():  # no certificate: nothing listens for HTTPS
        assert tls.admin("DELETE", f"/api/v1/certificates/{cert['name']}").status_code == 200
    with socket.create_server(("127.0.0.1", tls.https_port)):  # another program holds the port
        r = tls.admin("POST", "/api/v1/certificates", json={"domains": [NAME]})
        assert r.status_code == 422 and "Address already in use" in r.text, r.text
        # an unrelated change still applies: the refused certificate is not rendered again
        assert tls.admin("PATCH", "/api/v1/settings", json={"read_timeout": 601}).status_code == 200
        assert tls.stack.post("/v1/models").status_code == 401  # the plain listener serves all along
    r = tls.admin("POST", f"/api/v1/certificates/{NAME}/renew", json={"force_renewal": True})
    assert r.status_code == 200 and r.json()["ok"], r.text
    assert requests.get(tls.url(NAME), verify=str(tls.root), timeout=5).status_code == 200
