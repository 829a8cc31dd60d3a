"""Certificates end to end, offline: real certbot against real Pebble (HTTP-01 through a webroot server,
DNS-01 through the real certbot-dns-cloudflare plugin and a fake Cloudflare API), uploads, status, renewal
with the deploy hook, and every failure path leaving things as they were.

nginx's HTTP listener serving the webroot comes with the TLS listeners; until then the test serves the
webroot with a small HTTP server on Pebble's httpPort.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import socket
import ssl
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from click.testing import CliRunner
from cryptography import x509

from manager import users
from manager.app import create_app
from manager.cli import main as cli_main
from manager.errors import Conflict
from tests.acme import CLOUDFLARE_TOKEN, HAVE_PEBBLE, FakeCloudflare, Pebble, make_cert, pem
from tests.conftest import free_port

UTC = datetime.UTC


@pytest.fixture(scope="module")
def pebble(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pebble]:
    if not HAVE_PEBBLE:
        pytest.skip("pebble is not installed (apt-get install pebble; .ci/run does)")
    p = Pebble(tmp_path_factory.mktemp("pebble"))
    yield p
    p.close()


@pytest.fixture(scope="module")
def cloudflare(pebble: Pebble) -> Iterator[FakeCloudflare]:
    fake = FakeCloudflare(pebble.challtestsrv)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CLOUDFLARE_BASE_URL", fake.base_url)  # certbot inherits it; the plugin talks to the fake
        yield fake
    fake.close()


class Api:
    """The manager app on its own data dir, signed in as an admin, its ACME settings pointing at Pebble."""

    def __init__(self, data_dir: Path, pebble: Pebble):
        self.app = create_app({"DATA_DIR": str(data_dir)})
        self.b = self.app.extensions["bastion"]
        self.dirs = self.b.dirs
        users.create(self.b, "root", "root-password", "admin")
        self.client = self.app.test_client()
        token = self.client.post("/auth/token", json={"username": "root", "password": "root-password"}).json
        self.headers = {"Authorization": f"Bearer {token['token']}"}
        self.b.store.update_settings(http_listen=f"127.0.0.1:{pebble.http_port}", acme_server=pebble.directory,
                                     acme_ca_bundle=str(pebble.ca_bundle), acme_email="ops@example.test",
                                     dns_propagation_seconds=0)
        pebble.webroot.root = self.dirs.acme_webroot
        pebble.webroot.serving = True

    def call(self, method: str, path: str, **kw):
        return self.client.open(path, method=method, headers=self.headers, **kw)

    def cli(self, *args: str, ok: bool = True, stdin: str | None = None) -> str:
        result = CliRunner().invoke(cli_main, ["--data-dir", str(self.dirs.root), *args], input=stdin)
        assert (result.exit_code == 0) == ok, result.output
        return result.output

    def fingerprint(self) -> dict[str, str]:
        """Every certificate, key and state file (the ACME account and certbot's logs aside): to show that a
        failure changed nothing."""
        out = {}
        config = self.dirs.certbot_config
        for base in (config / "live", config / "archive", config / "renewal", self.dirs.certs):
            for path in sorted(base.rglob("*")) if base.exists() else []:
                if path.is_file() and not path.name.endswith(".lock"):
                    out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
        return out

    def certbot_ran(self) -> bool:
        return (self.dirs.certbot_logs / "letsencrypt.log").exists()


@pytest.fixture
def api(tmp_path: Path, pebble: Pebble) -> Api:
    return Api(tmp_path / "data", pebble)


def tls_handshake(fullchain: Path, key: Path, root: bytes, server_name: str) -> dict:
    """Serve the pair over TLS and connect as a client trusting only `root`; returns the peer certificate."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(fullchain, key)
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                tls.sendall(b"ok")
        except (ssl.SSLError, OSError):
            pass

    threading.Thread(target=serve, daemon=True).start()
    client_ctx = ssl.create_default_context(cadata=root.decode())
    with socket.create_connection(listener.getsockname(), timeout=5) as raw, \
            client_ctx.wrap_socket(raw, server_hostname=server_name) as tls:
        assert tls.recv(2) == b"ok"
        peer = tls.getpeercert()
    listener.close()
    return peer


# ---- ACME flows ---------------------------------------------------------------------------------------

def test_http01_obtain_serves_a_chain_a_client_trusting_only_pebbles_root_accepts(api: Api, pebble: Pebble) -> None:
    r = api.call("POST", "/api/v1/certificates", json={"domains": ["www.example.test", "API.example.test"]})
    assert r.status_code == 201, r.text
    cert = r.json
    assert cert["name"] == "www.example.test" and cert["source"] == "acme" and cert["challenge"] == "http-01"
    assert sorted(cert["domains"]) == ["api.example.test", "www.example.test"]
    assert "Pebble" in cert["issuer"] and cert["days_left"] > 30 and cert["not_before"] < cert["not_after"]
    live = api.dirs.certbot_config / "live" / "www.example.test"
    for name in ("www.example.test", "api.example.test"):
        peer = tls_handshake(live / "fullchain.pem", live / "privkey.pem", pebble.root_pem(), name)
        assert ("DNS", name) in peer["subjectAltName"]
    assert os.stat(live / "privkey.pem").st_mode & 0o077 == 0
    listed = api.call("GET", "/api/v1/certificates").json
    assert [c["name"] for c in listed] == ["www.example.test"] and listed[0]["days_left"] == cert["days_left"]
    assert "www.example.test" in api.cli("certs", "list")
    action = api.b.audit.entries()[0]["action"]
    assert action == "obtain certificate www.example.test for www.example.test, api.example.test (http-01)"


def test_llm_proxy_obtain_and_renew(api: Api) -> None:
    r = api.call("POST", "/nginx/certificates/obtain", json={"domains": ["proxy.example.test"]})
    assert r.status_code == 200 and r.json == {
        "success": True, "message": "Certificate proxy.example.test obtained for proxy.example.test"}, r.text
    r = api.call("GET", "/nginx/certificates/renew")
    assert r.status_code == 200 and r.json["success"] is True
    assert r.json["message"].startswith("proxy.example.test: not due for renewal"), r.json
    assert api.call("DELETE", "/api/v1/certificates/proxy.example.test").status_code == 200
    assert api.call("GET", "/api/v1/certificates").json == []
    assert not (api.dirs.certbot_config / "live" / "proxy.example.test").exists()
    assert api.b.audit.entries()[0]["action"] == "remove certificate proxy.example.test"


def test_one_certificate_operation_at_a_time(api: Api) -> None:
    from manager.certs.certbot import Certbot

    with Certbot(api.dirs).lock():
        r = api.call("POST", "/api/v1/certificates", json={"domains": ["www.example.test"]})
        assert r.status_code == 409 and r.json["error"]["field"] == "certificates", r.text
        assert "another certificate operation is running" in r.json["message"]
    assert not api.certbot_ran()


def test_cli_obtain_shows_progress_and_forced_renew_runs_the_deploy_hook(api: Api) -> None:
    out = api.cli("certs", "obtain", "cli.example.test")
    assert "checking the http-01 prerequisites" in out and "requesting the certificate cli.example.test" in out
    assert "Successfully received certificate." in out and "valid until" in out
    before = x509.load_pem_x509_certificate((api.dirs.certbot_config / "live/cli.example.test/cert.pem").read_bytes())
    out = api.cli("certs", "renew", "cli.example.test", "--force")
    assert "cli.example.test: renewed, valid until" in out
    after = x509.load_pem_x509_certificate((api.dirs.certbot_config / "live/cli.example.test/cert.pem").read_bytes())
    assert after.serial_number != before.serial_number
    status = api.call("GET", "/api/v1/certificates").json[0]
    assert status["last_renewal"]["ok"] is True and status["last_deployed"] > status["last_renewal"]["time"] - 60
    hook = [e for e in api.b.audit.entries() if e["author"] == "certbot"]
    assert hook and hook[0]["action"] == "deploy renewed certificate cli.example.test"
    r = api.call("POST", "/api/v1/certificates/cli.example.test/renew", json={"force_renewal": True})
    assert r.status_code == 200 and r.json["ok"] is True and r.json["message"].startswith("renewed"), r.text


def test_dns01_through_the_cloudflare_plugin(api: Api, cloudflare: FakeCloudflare) -> None:
    r = api.call("PUT", "/api/v1/certificates/cloudflare-token", json={"token": CLOUDFLARE_TOKEN})
    assert r.status_code == 200 and r.json == {"success": True, "token_set": True}
    credentials = api.dirs.cloudflare_credentials
    assert os.stat(credentials).st_mode & 0o777 == 0o600
    r = api.call("POST", "/api/v1/certificates", json={"domains": ["*.example.test", "www.example.test"],
                                                       "challenge": "dns-01"})
    assert r.status_code == 201, r.text
    assert r.json["name"] == "example.test" and sorted(r.json["domains"]) == ["*.example.test", "www.example.test"]
    assert any(c.startswith("POST /client/v4/zones/zone-1/dns_records") for c in cloudflare.calls)
    assert any(c.startswith("DELETE /client/v4/zones/zone-1/dns_records/") for c in cloudflare.calls)
    assert cloudflare.records == {}  # cleaned up
    everything = json.dumps(api.call("GET", "/api/v1/certificates").json) + json.dumps(api.b.audit.entries())
    assert CLOUDFLARE_TOKEN not in everything + api.cli("certs", "list") + api.cli("settings", "show")


# ---- background jobs (the admin page's live progress) -------------------------------------------------

def follow_job(api: Api, job: dict, limit: float = 60) -> tuple[dict, list[int]]:
    """Poll the job until it ends; returns its last record and how many steps each poll saw while it ran."""
    seen = []
    end = time.monotonic() + limit
    while job["state"] == "running":
        seen.append(len(job["steps"]))
        assert time.monotonic() < end, job
        time.sleep(0.05)
        r = api.call("GET", f"/api/v1/certificates/jobs/{job['id']}")
        assert r.status_code == 200, r.text
        job = r.json
    return job, seen


def test_obtain_and_renew_jobs_show_each_step_as_it_happens(api: Api) -> None:
    r = api.call("POST", "/api/v1/certificates/jobs", json={"action": "obtain", "domains": ["job.example.test"]})
    assert r.status_code == 202, r.text
    assert r.json["state"] == "running" and r.json["name"] == "job.example.test" and r.json["challenge"] == "http-01"
    job, seen = follow_job(api, r.json)
    assert job["state"] == "done" and job["error"] is None, job
    steps = [s["text"] for s in job["steps"]]
    assert steps[0].startswith("checking the http-01 prerequisites for job.example.test"), steps
    assert "Successfully received certificate." in steps and steps[-1].startswith("certificate job.example.test from")
    assert max(seen) >= 2 and len(set(seen) - {0}) >= 2, seen  # steps shown one by one while certbot ran
    assert job["result"]["name"] == "job.example.test" and job["result"]["days_left"] > 30
    assert [c["name"] for c in api.call("GET", "/api/v1/certificates").json] == ["job.example.test"]
    assert [j["id"] for j in api.call("GET", "/api/v1/certificates/jobs").json] == [job["id"]]

    r = api.call("POST", "/api/v1/certificates/jobs", json={"action": "renew", "name": "job.example.test",
                                                            "force_renewal": True})
    assert r.status_code == 202, r.text
    job, _ = follow_job(api, r.json)
    assert job["state"] == "done", job
    steps = [s["text"] for s in job["steps"]]
    assert steps[0] == "asking certbot to renew job.example.test (forced)" and steps[-1].startswith("renewed, valid")
    assert "applying the nginx configuration" in steps and job["result"]["last_renewal"]["ok"] is True


def test_a_failing_obtain_job_ends_failed_with_certbots_reason(api: Api, pebble: Pebble) -> None:
    requests.post(f"{pebble.challtestsrv}/add-a", json={"host": "away.example.test.",
                                                         "addresses": ["127.0.0.2"]}, timeout=5).raise_for_status()
    r = api.call("POST", "/api/v1/certificates/jobs", json={"action": "obtain", "domains": ["away.example.test"]})
    assert r.status_code == 202, r.text
    job, _ = follow_job(api, r.json)
    assert job["state"] == "failed" and job["result"] is None, job
    assert "Certbot failed to authenticate some domains" in job["error"] and "127.0.0.2" in job["error"], job
    assert job["steps"][-1]["text"] != job["error"] and api.call("GET", "/api/v1/certificates").json == []
    assert any(e["action"].startswith("obtain certificate away.example.test (http-01) failed:")
               for e in api.b.audit.entries())


def test_dns01_job_never_shows_the_cloudflare_token(api: Api, cloudflare: FakeCloudflare) -> None:
    api.cli("certs", "cloudflare-token", stdin="not-the-right-token\n")
    r = api.call("POST", "/api/v1/certificates/jobs", json={"action": "obtain", "domains": ["tok.example.test"],
                                                            "challenge": "dns-01"})
    job, _ = follow_job(api, r.json)
    assert job["state"] == "failed" and "Invalid access token" in job["error"], job
    assert "not-the-right-token" not in json.dumps(job) + json.dumps(api.call("GET", "/api/v1/certificates/jobs").json)


def test_job_requests_are_checked_before_anything_starts(api: Api) -> None:
    from manager.certs.certbot import Certbot

    for body, status, field in [
            ({"action": "obtain", "domains": ["ok.example.test", "$(id).example.test"]}, 400, "domains[1]"),
            ({"action": "obtain"}, 400, "domains"), ({"action": "revoke", "name": "x.example.test"}, 400, "action"),
            ({"action": "obtain", "domains": ["ok.example.test"], "challenge": "tls-alpn-01"}, 400, "challenge"),
            ({"action": "renew", "name": "missing.example.test"}, 404, None),
            ({"action": "renew", "name": "../etc"}, 400, "name"),
            ({"action": "renew", "name": "x.example.test", "domains": ["x.example.test"]}, 400, "action")]:
        r = api.call("POST", "/api/v1/certificates/jobs", json=body)
        assert r.status_code == status, (body, r.text)
        if field:
            assert r.json["error"]["field"] == field, (body, r.json)
    with Certbot(api.dirs).lock():
        r = api.call("POST", "/api/v1/certificates/jobs", json={"action": "obtain", "domains": ["ok.example.test"]})
        assert r.status_code == 409 and "another certificate operation is running" in r.json["message"], r.text
    assert api.call("GET", "/api/v1/certificates/jobs").json == [] and not api.certbot_ran()
    for job_id in ("0123456789abcdef", "..", "../../etc/passwd"):
        assert api.call("GET", f"/api/v1/certificates/jobs/{job_id}").status_code == 404


def test_a_viewer_cannot_start_or_see_certificate_jobs(api: Api) -> None:
    users.create(api.b, "watcher", "watcher-password", "viewer")
    token = api.client.post("/auth/token", json={"username": "watcher", "password": "watcher-password"}).json
    viewer = {"Authorization": f"Bearer {token['token']}"}
    r = api.client.post("/api/v1/certificates/jobs", json={"action": "obtain", "domains": ["v.example.test"]},
                        headers=viewer)
    assert r.status_code == 403, r.text
    assert api.client.get("/api/v1/certificates/jobs", headers=viewer).status_code == 403
    assert api.client.get("/api/v1/certificates", headers=viewer).status_code == 200
    assert not api.certbot_ran()


def test_a_job_whose_worker_died_is_interrupted(api: Api) -> None:
    now = time.time()
    folder = api.dirs.run / "certificate-jobs"
    folder.mkdir(parents=True)
    dead = {"id": "0123456789abcdef", "action": "obtain", "name": "d.example.test", "domains": ["d.example.test"],
            "challenge": "http-01", "force_renewal": False, "author": "root", "steps": [], "result": None,
            "state": "running", "status": "starting", "error": None, "started": now, "updated": now,
            "finished": None, "pid": 2**22 + 12345}  # above pid_max
    (folder / "0123456789abcdef.json").write_text(json.dumps(dead))
    job = api.call("GET", "/api/v1/certificates/jobs/0123456789abcdef").json
    assert job["state"] == "interrupted" and "start it again" in job["error"] and "pid" not in job, job


# ---- failures leave everything as it was ---------------------------------------------------------------

def test_bad_cloudflare_token_is_a_clear_502(api: Api, cloudflare: FakeCloudflare) -> None:
    assert api.cli("certs", "cloudflare-token", stdin="not-the-right-token\n") == "Cloudflare API token stored\n"
    before = api.fingerprint()
    r = api.call("POST", "/api/v1/certificates", json={"domains": ["bad.example.test"], "challenge": "dns-01"})
    assert r.status_code == 502 and r.json["success"] is False
    assert "Invalid access token" in r.json["message"] and "Cloudflare" in r.json["message"], r.json
    assert "not-the-right-token" not in r.text
    assert api.fingerprint() == before and api.call("GET", "/api/v1/certificates").json == []
    assert api.b.audit.entries()[0]["action"].startswith("obtain certificate bad.example.test (dns-01) failed:")


def test_acme_server_unreachable(api: Api) -> None:
    api.b.store.update_settings(acme_server=f"https://127.0.0.1:{free_port()}/dir")
    r = api.call("POST", "/api/v1/certificates", json={"domains": ["www.example.test"]})
    assert r.status_code == 502, r.text
    message = r.json["message"]
    assert message.startswith("the ACME server https://127.0.0.1:") and "connection refused" in message, message
    out = api.cli("certs", "obtain", "www.example.test", ok=False)
    assert "nothing was changed: the ACME server" in out
    assert not api.certbot_ran() and api.fingerprint() == {}


def test_scheduled_renewal_asks_only_for_due_certificates_at_most_twice_a_day(api: Api) -> None:
    from manager.certs import manage

    assert api.call("POST", "/api/v1/certificates", json={"domains": ["sched.example.test"]}).status_code == 201
    log_size = (api.dirs.certbot_logs / "letsencrypt.log").stat().st_size
    now = time.time()
    assert manage.scheduled_renewal(api.b, now=now) == []  # valid for years: certbot is not even started
    assert (api.dirs.certbot_logs / "letsencrypt.log").stat().st_size == log_size
    assert api.call("GET", "/api/v1/certificates").json[0]["last_renewal"] is None
    assert manage.scheduled_renewal(api.b, now=now + 11 * 3600) is None  # looked less than 12 h ago
    # within 30 days of its end the certificate is handed to certbot (which decides by its own clock)
    not_after = api.call("GET", "/api/v1/certificates").json[0]["not_after"]
    results = manage.scheduled_renewal(api.b, now=not_after - 10 * 86400)
    assert [r["name"] for r in results] == ["sched.example.test"] and results[0]["ok"], results
    assert api.call("GET", "/api/v1/certificates").json[0]["last_renewal"]["ok"] is True


def test_failed_challenge_and_failed_renewal_change_nothing(api: Api, pebble: Pebble) -> None:
    assert api.call("POST", "/api/v1/certificates", json={"domains": ["good.example.test"]}).status_code == 201
    before = api.fingerprint()
    # the domain points elsewhere: the local probe passes, the ACME server finds nobody at that address
    requests.post(f"{pebble.challtestsrv}/add-a", json={"host": "elsewhere.example.test.",
                                                         "addresses": ["127.0.0.2"]}, timeout=5).raise_for_status()
    r = api.call("POST", "/api/v1/certificates", json={"domains": ["elsewhere.example.test"]})
    assert r.status_code == 502, r.text
    assert "Certbot failed to authenticate some domains" in r.json["message"]
    assert "elsewhere.example.test" in r.json["message"] and "127.0.0.2" in r.json["message"], r.json
    assert api.fingerprint() == before
    pebble.webroot.serving = False  # and the webroot is no longer served: the renewal's challenge fails
    r = api.call("POST", "/api/v1/certificates/good.example.test/renew", json={"force_renewal": True})
    assert r.status_code == 502 and "Certbot failed to authenticate" in r.json["message"], r.text
    status = api.call("GET", "/api/v1/certificates").json
    assert [c["name"] for c in status] == ["good.example.test"]
    assert status[0]["last_renewal"]["ok"] is False and "authenticate" in status[0]["last_renewal"]["message"]
    after = api.fingerprint()
    assert {k: v for k, v in after.items() if "/certbot/" in k} == {k: v for k, v in before.items() if "/certbot/" in k}
    r = api.call("GET", "/nginx/certificates/renew?force=false")
    assert r.status_code == 200 and r.json["success"] is True  # not due: nothing asked
    actions = [e["action"] for e in api.b.audit.entries()]
    assert any(a.startswith("renew certificate good.example.test failed:") for a in actions)
    assert any(a.startswith("obtain certificate elsewhere.example.test (http-01) failed:") for a in actions)


BAD_DOMAINS = ["a.example.test;touch /tmp/pwned", "$(id).example.test", "`id`.example.test", "a.example.test\nb.c",
               "a b.example.test", "--server=https://evil.test/dir", "-d", "{x}.example.test", "a.example.test'",
               "a.example.test\"", "x.example.test|id", "a.example.test>out", "*.example.test", "a.*.example.test",
               "127.0.0.1", "localhost", "..", "", "a" * 64 + ".example.test", "a.example.test%00", "a/b.example.test",
               "a.example.test#x", "${HOME}.example.test", 42, None, ["x.example.test"]]


@pytest.mark.parametrize("domain", BAD_DOMAINS, ids=range(len(BAD_DOMAINS)))
def test_bad_domains_are_400_and_run_nothing(api: Api, domain: object) -> None:
    for path in ("/api/v1/certificates", "/nginx/certificates/obtain"):
        r = api.call("POST", path, json={"domains": ["ok.example.test", domain]})
        assert r.status_code == 400 and r.json["error"]["field"] == "domains[1]", (path, r.text)
        assert r.json["message"].startswith("domains[1]: ")
    assert api.call("POST", "/api/v1/certificates", json={"domains": ["ok.example.test"], "name": "../etc"}
                    ).status_code == 400
    assert api.call("POST", "/api/v1/certificates", json={"domains": "ok.example.test"}).status_code == 400
    if isinstance(domain, str) and domain:
        api.cli("certs", "obtain", domain, ok=False)
    assert not api.certbot_ran() and api.fingerprint() == {}
    assert [e["action"] for e in api.b.audit.entries()] == ["create user root"]


def test_missing_prerequisites_are_409_and_run_nothing(api: Api, pebble: Pebble) -> None:
    from manager.certs import preflight

    api.b.store.update_settings(http_listen=None)
    r = api.call("POST", "/api/v1/certificates", json={"domains": ["www.example.test"]})
    assert r.status_code == 409 and r.json["error"]["field"] == "http_listen" and "is off" in r.json["message"]
    r = api.call("POST", "/api/v1/certificates", json={"domains": ["www.example.test"], "challenge": "dns-01"})
    assert r.status_code == 409 and r.json["error"]["field"] == "cloudflare_token", r.text
    assert api.call("POST", "/api/v1/certificates", json={"domains": ["w.example.test"], "challenge": "tls-alpn-01"}
                    ).json["error"]["field"] == "challenge"
    assert not api.certbot_ran()
    # the probe through the HTTP listener (nginx's, once it serves the webroot; the test server here)
    base = f"http://127.0.0.1:{pebble.http_port}"
    preflight.webroot_served(api.dirs.acme_webroot, base)
    pebble.webroot.serving = False
    with pytest.raises(Conflict, match="does not serve the challenge directory"):
        preflight.webroot_served(api.dirs.acme_webroot, base)
    assert list((api.dirs.acme_webroot / ".well-known/acme-challenge").iterdir()) == []  # probe removed


# ---- uploads ------------------------------------------------------------------------------------------

def chain(names: list[str], **leaf_options) -> tuple[list, object]:
    root = make_cert("Test Root", ca=True, days=365)
    intermediate = make_cert("Test Intermediate", root, ca=True, days=365)
    leaf = make_cert(names[0], intermediate, names=names, **leaf_options)
    return [leaf[0], intermediate[0], root[0]], leaf[1]


def test_upload_is_checked_then_stored_private(api: Api) -> None:
    certs, key = chain(["up.example.test", "*.up.example.test"])
    body = {"certificate": pem(*certs), "private_key": pem(key), "domains": ["up.example.test", "a.up.example.test"]}
    r = api.call("POST", "/api/v1/certificates/upload", json=body)
    assert r.status_code == 201, r.text
    assert r.json["source"] == "upload" and r.json["name"] == "up.example.test"
    assert r.json["issuer"] == "CN=Test Intermediate"
    stored = api.dirs.uploaded_certs / "up.example.test"
    for name in ("fullchain.pem", "privkey.pem"):
        assert os.stat(stored / name).st_mode & 0o777 == 0o600
    assert len(x509.load_pem_x509_certificates((stored / "fullchain.pem").read_bytes())) == 3
    assert "PRIVATE KEY" not in r.text and "PRIVATE KEY" not in json.dumps(api.call("GET", "/api/v1/certificates").json)
    r = api.call("POST", "/api/v1/certificates/up.example.test/renew")
    assert r.status_code == 409 and "upload" in r.json["message"]
    assert api.call("DELETE", "/api/v1/certificates/up.example.test").status_code == 200
    assert not stored.exists() and api.call("GET", "/api/v1/certificates").json == []
    assert api.call("DELETE", "/api/v1/certificates/up.example.test").status_code == 404
    (api.dirs.root.parent / "chain.pem").write_text(pem(*certs))
    (api.dirs.root.parent / "key.pem").write_text(pem(key))
    out = api.cli("certs", "upload", "up.example.test", "--cert", str(api.dirs.root.parent / "chain.pem"),
                  "--key", str(api.dirs.root.parent / "key.pem"), "--name", "cli-upload")
    assert out.startswith("certificate cli-upload stored; valid until")
    assert "cli-upload  upload" in api.cli("certs", "list")
    out = api.cli("certs", "upload", "other.example.test", "--cert", str(api.dirs.root.parent / "chain.pem"),
                  "--key", str(api.dirs.root.parent / "key.pem"), ok=False)
    assert "domains: the certificate does not cover other.example.test" in out
    assert api.cli("certs", "remove", "cli-upload") == "certificate cli-upload removed\n"


def _bad_uploads() -> list[tuple[str, dict, str, str]]:
    names = ["bad.example.test"]
    certs, key = chain(names)
    other_key = make_cert("x")[1]
    now = datetime.datetime.now(UTC)
    expired, expired_key = chain(names, not_before=now - datetime.timedelta(days=60), days=30)
    future, future_key = chain(names, not_before=now + datetime.timedelta(days=2))
    ok = {"certificate": pem(*certs), "private_key": pem(key), "domains": names}
    return [
        ("key does not match", {**ok, "private_key": pem(other_key)}, "private_key", "does not match"),
        ("expired", {**ok, "certificate": pem(*expired), "private_key": pem(expired_key)}, "certificate", "expired on"),
        ("not yet valid", {**ok, "certificate": pem(*future), "private_key": pem(future_key)}, "certificate",
         "is not valid before"),
        ("chain out of order", {**ok, "certificate": pem(certs[0], certs[2], certs[1])}, "certificate",
         "did not sign certificate"),
        ("names not covered", {**ok, "domains": ["other.example.test"]}, "domains",
         "does not cover other.example.test"),
        ("not PEM", {**ok, "certificate": "hello"}, "certificate", "no readable PEM certificate"),
        ("key not PEM", {**ok, "private_key": "-----BEGIN PRIVATE KEY-----\nxx\n"}, "private_key", "not a readable"),
        ("bad name", {**ok, "name": "a;b"}, "name", "must be"),
    ]


BAD_UPLOADS = _bad_uploads()


@pytest.mark.parametrize(("case", "body", "field", "text"), BAD_UPLOADS, ids=[c[0] for c in BAD_UPLOADS])
def test_bad_uploads_are_400_and_store_nothing(api: Api, case: str, body: dict, field: str, text: str) -> None:
    good, good_key = chain(["bad.example.test"])
    assert api.call("POST", "/api/v1/certificates/upload", json={
        "certificate": pem(*good), "private_key": pem(good_key), "domains": ["bad.example.test"]}).status_code == 201
    before = api.fingerprint()
    r = api.call("POST", "/api/v1/certificates/upload", json=body)
    assert r.status_code == 400 and r.json["error"]["field"] == field and text in r.json["message"], r.text
    assert api.fingerprint() == before  # the certificate uploaded before is still the one stored


# ---- settings -----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "value"), [
    ("acme_server", "http://acme.example.test/dir"), ("acme_server", "https://acme.example.test/dir;id"),
    ("acme_server", "https://user:pw@acme.example.test/dir"), ("acme_server", "https://acme.example.test/d?x=1"),
    ("acme_server", "https://acme example.test/dir"), ("acme_server", "https://$(id)/dir"), ("acme_server", 5),
    ("acme_email", "ops@example.test;id"), ("acme_email", "ops"), ("acme_email", "o ps@example.test"),
    ("acme_email", "$(id)@example.test"), ("acme_ca_bundle", "/no/such/file.pem"), ("acme_ca_bundle", "rel.pem"),
    ("acme_ca_bundle", "/etc/hosts;id"), ("acme_key_type", "dsa"), ("dns_propagation_seconds", -1),
    ("dns_propagation_seconds", 100000), ("http_listen", "0.0.0.0:99999"), ("https_listen", "example.test:443"),
    ("hsts", "yes"), ("http_listen", "127.0.0.1:8080"), ("https_listen", "127.0.0.1:8081"),
])
def test_bad_certificate_settings_are_400_naming_the_field(api: Api, name: str, value: object) -> None:
    before = api.b.settings()
    r = api.call("PATCH", "/api/v1/settings", json={name: value})
    assert r.status_code == 400 and r.json["error"]["field"] == name, r.text
    assert api.b.settings() == before


def test_certificate_settings_defaults_and_good_values(api: Api, pebble: Pebble) -> None:
    from manager import settings

    assert settings.DEFAULTS["acme_server"] == "https://acme-v02.api.letsencrypt.org/directory"
    assert settings.DEFAULTS["http_listen"] is None and settings.DEFAULTS["https_listen"] is None
    good = {"acme_server": "https://acme-staging-v02.api.letsencrypt.org/directory", "acme_email": "Ops@Example.test",
            "acme_ca_bundle": str(pebble.ca_bundle), "acme_key_type": "rsa", "dns_propagation_seconds": 60,
            "hsts": True, "http_listen": "0.0.0.0:80", "https_listen": "[::]:443"}
    checked = settings.validate(api.b, good)
    assert checked["acme_email"] == "Ops@example.test" and checked["https_listen"] == "[::]:443"
    assert settings.validate(api.b, {"http_listen": None, "acme_email": ""}) == {"http_listen": None,
                                                                                 "acme_email": None}


# ---- certbot runs ------------------------------------------------------------------------------------

def test_certbot_output_is_trimmed_and_the_token_cut_out(tmp_path: Path) -> None:
    """What an operator sees of a failed run: certbot's reason, no advertising, never the Cloudflare token."""
    from manager.certs.certbot import Certbot, CertbotFailed
    from manager.datadir import DataDir

    bot = Certbot(DataDir.at(tmp_path))
    script = ("print('Saving debug log to /x/letsencrypt.log')\n"
              "print('Requesting a certificate for a.example.test')\n"
              "print('Error determining zone_id: 9109 token s3cr3t-token rejected')\n"
              "print('Ask for help or search for solutions at https://community.letsencrypt.org.')\n"
              "raise SystemExit(1)")
    lines: list[str] = []
    with pytest.raises(CertbotFailed) as failed:
        bot.run([sys.executable, "-c", script], None, lines.append, secret="s3cr3t-token")
    assert str(failed.value) == "Error determining zone_id: 9109 token [redacted] rejected"
    assert lines == ["Requesting a certificate for a.example.test",
                     "Error determining zone_id: 9109 token [redacted] rejected"]
    with pytest.raises(CertbotFailed, match=r"did not finish within 0\.5 s"):
        bot.run([sys.executable, "-c", "import time; time.sleep(30)"], None, deadline=0.5)


def test_certbot_argv_keeps_every_value_one_argument(tmp_path: Path) -> None:
    import shlex

    from manager.certs.certbot import Account, Certbot
    from manager.datadir import DataDir

    odd = tmp_path / "data dir; $(touch pwned)"
    bot = Certbot(DataDir.at(odd))
    argv = bot.certonly(Account("https://acme.example.test/dir", None, None, "ecdsa"), "a.example.test",
                        ["a.example.test", "b.example.test"], bot.webroot_args())
    assert "--domains=a.example.test,b.example.test" in argv and "--register-unsafely-without-email" in argv
    assert argv[argv.index("--webroot-path") + 1] == str(odd.resolve() / "acme-webroot")
    hook = bot.renew("a.example.test", force=True)
    hook_cmd = hook[hook.index("--deploy-hook") + 1]
    assert shlex.split(hook_cmd)[-4:] == ["--data-dir", str(odd.resolve()), "certs", "deployed"]


def test_domain_names_are_normalised_to_ascii() -> None:
    from manager.certs import checks

    assert checks.domains("domains", ["Bücher.Example.test", "WWW.example.test.", "bücher.example.test"]) == [
        "xn--bcher-kva.example.test", "www.example.test"]
    assert checks.domains("domains", ["*.example.test"], wildcard=True) == ["*.example.test"]
    assert checks.default_name(["*.example.test", "example.test"]) == "example.test"


def test_certificate_names_never_reach_nginx_syntax_unchecked(api: Api) -> None:
    """A certificate may name any string: an uploaded one with a name that is not a DNS name is refused, and one
    put on disk by hand is served only under its plain DNS names."""
    from manager.certs import pem as pem_mod

    hostile = "b.example.test; location /x/ { alias /; autoindex on; } server_tokens off"
    cert, key = make_cert("a.example.test", names=["a.example.test", hostile])
    before = api.fingerprint()
    r = api.call("POST", "/api/v1/certificates/upload",
                 json={"certificate": pem(cert), "private_key": pem(key), "domains": ["a.example.test"]})
    assert r.status_code == 400 and r.json["error"]["field"] == "certificate" and "DNS name" in r.json["message"]
    assert api.fingerprint() == before
    assert pem_mod.served_names(pem(cert).encode(), pem(key).encode()) == ["a.example.test"]


def test_removal_deletes_nothing_when_nginx_cannot_stop_serving_it(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    """The files go only once the configuration that leaves them out is live: a restarted nginx must never
    find its live configuration naming deleted files."""
    from manager.nginx import NginxError
    from tests.conftest import free_port

    api.b.store.update_settings(https_listen=f"127.0.0.1:{free_port()}")  # so the certificate is rendered
    certs, key = chain(["keep.example.test"])
    body = {"certificate": pem(*certs), "private_key": pem(key), "domains": ["keep.example.test"]}
    assert api.call("POST", "/api/v1/certificates/upload", json=body).status_code == 201
    assert "keep.example.test" in (api.dirs.live / "nginx.conf").read_text()
    before = api.fingerprint()

    def refuse(conf) -> None:
        raise NginxError("nginx -t rejected the configuration", "[emerg] something else is wrong")

    monkeypatch.setattr(api.b.nginx, "test", refuse)
    r = api.call("DELETE", "/api/v1/certificates/keep.example.test")
    assert r.status_code in (422, 500) and "something else is wrong" in r.text, r.text
    assert api.fingerprint() == before
    monkeypatch.undo()
    assert api.call("DELETE", "/api/v1/certificates/keep.example.test").status_code == 200
    assert api.call("GET", "/api/v1/certificates").json == []
