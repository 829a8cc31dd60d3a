"""Offline ACME for tests: Pebble with pebble-challtestsrv as its DNS, a server for the HTTP-01 webroot and a
fake Cloudflare API that feeds TXT records to challtestsrv. Everything on free ports of 127.0.0.1."""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import shutil
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.conftest import free_port

PEBBLE = shutil.which("pebble") or "/usr/bin/pebble"
CHALLTESTSRV = shutil.which("pebble-challtestsrv") or "/usr/bin/pebble-challtestsrv"
HAVE_PEBBLE = Path(PEBBLE).exists() and Path(CHALLTESTSRV).exists()
CLOUDFLARE_TOKEN = "good-cloudflare-token-0123456789"
ZONE = "example.test"


def make_cert(subject: str, issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None, *,
              ca: bool = False, names: list[str] | None = None, ips: list[str] | None = None,
              not_before: datetime.datetime | None = None, days: int = 30,
              key: ec.EllipticCurvePrivateKey | None = None) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A certificate for tests (self-signed when `issuer` is None)."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    start = not_before or datetime.datetime.now(datetime.UTC) - datetime.timedelta(hours=1)
    builder = (x509.CertificateBuilder().subject_name(name)
               .issuer_name(issuer[0].subject if issuer else name).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(start)
               .not_valid_after(start + datetime.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    alt = [x509.DNSName(n) for n in names or []] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips or []]
    if alt:
        builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
    return builder.sign(issuer[1] if issuer else key, hashes.SHA256()), key


def pem(*items) -> str:
    out = b""
    for item in items:
        if isinstance(item, x509.Certificate):
            out += item.public_bytes(serialization.Encoding.PEM)
        else:
            out += item.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())
    return out.decode()


class WebrootServer:
    """Serves `root` like nginx will serve the HTTP-01 webroot; `serving = False` answers 404 to everything."""

    def __init__(self, port: int):
        self.root = Path("/nonexistent")
        self.serving = True
        outer = self

        class Handler(SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(outer.root), **kwargs)

            def do_GET(self):
                if not outer.serving:
                    self.send_error(404)
                    return
                super().do_GET()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class FakeCloudflare:
    """The part of Cloudflare's v4 API certbot-dns-cloudflare uses (zones lookup, create/list/delete TXT
    records); records are handed to challtestsrv, which is the DNS server Pebble asks."""

    def __init__(self, challtestsrv: str):
        self.records: dict[str, dict] = {}
        self.calls: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _route(self, method: str) -> None:
                outer.calls.append(f"{method} {self.path}")
                if self.headers.get("Authorization") != f"Bearer {CLOUDFLARE_TOKEN}":
                    return self._answer(403, {"success": False, "errors": [
                        {"code": 9109, "message": "Invalid access token"}], "messages": [], "result": None})
                url = urlsplit(self.path)
                query = parse_qs(url.query)
                if query.get("page", ["1"]) != ["1"]:  # the client pages until a page comes back empty
                    return self._answer(200, _page([]))
                parts = url.path.strip("/").split("/")[2:]  # after client/v4
                if parts == ["zones"]:
                    zones = [{"id": "zone-1", "name": ZONE}] if query.get("name") == [ZONE] else []
                    return self._answer(200, _page(zones))
                if parts[:1] == ["zones"] and parts[2:3] == ["dns_records"]:
                    if method == "POST":
                        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                        rid = f"rec-{len(outer.records) + 1}"
                        outer.records[rid] = {"id": rid, **body}
                        requests.post(f"{challtestsrv}/set-txt", json={"host": body["name"] + ".",
                                                                       "value": body["content"]}, timeout=5)
                        return self._answer(200, {"success": True, "errors": [], "messages": [],
                                                  "result": outer.records[rid]})
                    if method == "GET":
                        name = query.get("name.exact", [None])[0]
                        found = [r for r in outer.records.values() if r["name"] == name]
                        return self._answer(200, _page(found))
                    if method == "DELETE" and len(parts) == 4:
                        record = outer.records.pop(parts[3], None)
                        if record:
                            requests.post(f"{challtestsrv}/clear-txt", json={"host": record["name"] + "."}, timeout=5)
                        return self._answer(200, {"success": True, "errors": [], "messages": [],
                                                  "result": {"id": parts[3]}})
                return self._answer(404, {"success": False, "errors": [{"code": 7003, "message": "no route"}],
                                          "messages": [], "result": None})

            def do_GET(self):
                self._route("GET")

            def do_POST(self):
                self._route("POST")

            def do_DELETE(self):
                self._route("DELETE")

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.base_url = f"http://127.0.0.1:{self.server.server_port}/client/v4"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _page(items: list) -> dict:
    return {"success": True, "errors": [], "messages": [], "result": items,
            "result_info": {"page": 1, "per_page": 50, "count": len(items), "total_count": len(items),
                            "total_pages": 1}}


class Pebble:
    """Pebble + challtestsrv + the webroot server. `directory` is the ACME URL, `ca_bundle` the CA file that
    makes certbot trust Pebble's listener, `root_pem()` Pebble's issuing root."""

    def __init__(self, workdir: Path, webroot_server: bool = True):
        """`webroot_server`: serve the HTTP-01 webroot on `http_port` here (False: nginx serves it)."""
        workdir.mkdir(parents=True, exist_ok=True)
        self.dns_port, self.mgmt_port = free_port(), free_port()
        self.acme_port, self.pebble_mgmt_port, self.http_port = free_port(), free_port(), free_port()
        ca = make_cert("Bastion test CA", ca=True, days=2)
        leaf, leaf_key = make_cert("localhost", ca, names=["localhost"], ips=["127.0.0.1"], days=2)
        self.ca_bundle = workdir / "pebble-listener-ca.pem"
        self.ca_bundle.write_text(pem(ca[0]))
        (workdir / "cert.pem").write_text(pem(leaf))
        (workdir / "key.pem").write_text(pem(leaf_key))
        config = {"pebble": {
            "listenAddress": f"127.0.0.1:{self.acme_port}",
            "managementListenAddress": f"127.0.0.1:{self.pebble_mgmt_port}",
            "certificate": str(workdir / "cert.pem"), "privateKey": str(workdir / "key.pem"),
            "httpPort": self.http_port, "tlsPort": free_port(), "ocspResponderURL": "",
            "externalAccountBindingRequired": False}}
        (workdir / "pebble.json").write_text(json.dumps(config))
        self.challtestsrv = f"http://127.0.0.1:{self.mgmt_port}"
        self.directory = f"https://127.0.0.1:{self.acme_port}/dir"
        self.webroot = WebrootServer(self.http_port) if webroot_server else None
        self.procs = [
            subprocess.Popen([CHALLTESTSRV, "-defaultIPv4", "127.0.0.1", "-defaultIPv6", "",
                              "-dns01", f"127.0.0.1:{self.dns_port}", "-management", f"127.0.0.1:{self.mgmt_port}",
                              "-http01", "", "-https01", "", "-tlsalpn01", ""],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
            subprocess.Popen([PEBBLE, "-config", str(workdir / "pebble.json"),
                              "-dnsserver", f"127.0.0.1:{self.dns_port}"],
                             stdout=(workdir / "pebble.log").open("wb"), stderr=subprocess.STDOUT,
                             env={**os.environ, "PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0",
                                  "PEBBLE_AUTHZREUSE": "0"}),
        ]
        self._wait()

    def _wait(self) -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                requests.get(self.directory, verify=str(self.ca_bundle), timeout=1).raise_for_status()
                requests.get(self.challtestsrv, timeout=1)
                return
            except requests.RequestException:
                time.sleep(0.1)
        self.close()
        raise RuntimeError("pebble did not start")

    def root_pem(self) -> bytes:
        """Pebble's issuing root, from its management listener (which serves the test's listener certificate)."""
        r = requests.get(f"https://127.0.0.1:{self.pebble_mgmt_port}/roots/0", verify=str(self.ca_bundle), timeout=5)
        r.raise_for_status()
        return r.content

    def close(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
        if self.webroot:
            self.webroot.close()
