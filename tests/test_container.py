"""Container smoke test (`make test-container`; skipped in `make test`): build the image with a real engine
(podman + runc, on a debootstrapped Debian base without Python), run it on the host network on free ports,
and check what an operator relies on: a key made through the admin API streams a chat to an upstream on the
host, key and usage survive a restart, `podman stop` ends it cleanly and quickly (a stream in flight
finishes), no Python process is root, and no secret is in any image layer.

Needs root, podman, runc and debootstrap (.ci/run installs them). Phases and their wall times are printed.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import secrets
import shutil
import subprocess
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.acme import make_cert, pem
from tests.conftest import free_port
from tests.fakes import FakeUpstream
from tests.podman import Podman, host_ca_bundle

pytestmark = pytest.mark.skipif(os.environ.get("BASTION_CONTAINER_TEST") != "1",
                                reason="container smoke test: `make test-container` (root, podman, runc, debootstrap)")

ROOT = Path(__file__).resolve().parent.parent
IMAGE = "localhost/bastion:test"
UID = 10001  # the image's `bastion` user
TIMES: dict[str, float] = {}


def timed(phase: str, started: float) -> None:
    TIMES[phase] = time.monotonic() - started
    print(f"[container] {phase}: {TIMES[phase]:.1f} s", flush=True)


class Container:
    """The gateway container: its name, volume, ports and the secrets it was given."""

    def __init__(self, podman: Podman, tmp: Path):
        self.podman = podman
        self.name = f"bastion-test-{secrets.token_hex(4)}"
        self.volume = self.name + "-data"
        self.public, self.admin, self.http, self.https = (free_port() for _ in range(4))
        self.base = f"http://127.0.0.1:{self.public}"
        self.admin_url = f"http://127.0.0.1:{self.admin}"
        self.admin_password = "admin-" + secrets.token_urlsafe(18)
        self.cloudflare_token = "cf-" + secrets.token_urlsafe(24)
        # the admin password as a file (compose secrets mount the same way), the token from an env file
        self.password_file = tmp / "admin_password"
        self.password_file.write_text(self.admin_password + "\n")
        os.chown(self.password_file, UID, UID)
        self.password_file.chmod(0o400)
        self.env_file = tmp / "bastion.env"
        self.env_file.write_text(f"BASTION_CLOUDFLARE_API_TOKEN={self.cloudflare_token}\n"
                                 "BASTION_ACME_EMAIL=ops@example.com\n")
        self._token: str | None = None

    def create(self) -> None:
        self.podman.run(
            "run", "-d", "--name", self.name, "--network=host", "--health-interval=disable",
            "-v", f"{self.volume}:/data", "-v", f"{self.password_file}:/run/secrets/admin_password:ro",
            "--env-file", str(self.env_file),
            "-e", "BASTION_ADMIN_PASSWORD_FILE=/run/secrets/admin_password",
            "-e", f"BASTION_PUBLIC_LISTEN=127.0.0.1:{self.public}",
            "-e", f"BASTION_ADMIN_LISTEN=127.0.0.1:{self.admin}",
            "-e", f"BASTION_HTTP_LISTEN=127.0.0.1:{self.http}",
            "-e", f"BASTION_HTTPS_LISTEN=127.0.0.1:{self.https}",
            IMAGE)

    def wait_healthy(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.state() != "running":
                raise AssertionError(f"container is {self.state()}:\n{self.logs()}")
            if self.podman.run("healthcheck", "run", self.name, check=False).returncode == 0:
                return
            time.sleep(0.5)
        raise AssertionError(f"container not healthy within {timeout} s:\n{self.logs()}")

    def state(self) -> str:
        return self.podman.out("inspect", self.name, "--format", "{{.State.Status}}")

    def logs(self) -> str:
        return self.podman.run("logs", self.name, check=False, text=True).stdout[-4000:]

    def api(self, method: str, path: str, **kw) -> requests.Response:
        if not self._token:
            r = requests.post(self.admin_url + "/auth/token", timeout=10,
                              json={"username": "admin", "password": self.admin_password})
            assert r.status_code == 200, r.text
            self._token = r.json()["token"]
        return requests.request(method, self.admin_url + path, timeout=30,
                                headers={"Authorization": f"Bearer {self._token}"}, **kw)

    def volume_dir(self) -> Path:
        return Path(self.podman.out("volume", "inspect", self.volume, "--format", "{{.Mountpoint}}"))

    def remove(self) -> None:
        self.podman.run("rm", "-f", "-t", "0", self.name, check=False)
        self.podman.run("volume", "rm", "-f", self.volume, check=False)


def stream_chat(base: str, key: str, model: str) -> tuple[list[str], float, float]:
    """Stream a chat; returns the SSE data lines, the time of the first content event and of the end."""
    start = time.monotonic()
    first = None
    events = []
    with requests.post(base + "/v1/chat/completions", stream=True, timeout=30,
                       headers={"Authorization": f"Bearer {key}"},
                       json={"model": model, "stream": True, "messages": [{"role": "user", "content": "hi"}]}) as r:
        assert r.status_code == 200, r.text
        for line in r.iter_lines():
            if line.startswith(b"data: "):
                events.append(line[6:].decode())
                if first is None and '"content"' in events[-1]:
                    first = time.monotonic() - start
    return events, first or 0.0, time.monotonic() - start


@pytest.fixture(scope="module")
def podman() -> Iterator[Podman]:
    # asked for explicitly, so a missing requirement is a failure, not a skip
    assert os.geteuid() == 0, "the container smoke test needs root (podman with runc, debootstrap)"
    path = "/usr/sbin:/usr/bin:/sbin:/bin"
    missing = [t for t in ("podman", "runc", "debootstrap") if not shutil.which(t, path=path)]
    assert not missing, f"install {' '.join(missing)} (apt-get install podman runc debootstrap)"
    p = Podman()
    yield p
    # untagged images are the build cache too: only those of builds over a day old go
    p.run("image", "prune", "-f", "--filter", "until=24h", check=False)
    p.close()
    print("[container] " + ", ".join(f"{k} {v:.1f} s" for k, v in TIMES.items()), flush=True)


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    up = FakeUpstream("host", ["llama3"], chunk_delay=0.2, chunks=5)
    yield up
    up.close()


@pytest.fixture(scope="module")
def container(podman: Podman, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Container]:
    started = time.monotonic()
    base = podman.base_image(echo=lambda m: print(f"[container] {m}", flush=True))
    timed("base image", started)
    started = time.monotonic()
    # --jobs=2: the final stage's apt step runs beside the build stage's pip install (cold: 84 s instead of 130 s)
    build = ["build", "--jobs=2", "--format", "docker", "--network=host", "--pull=never", "--build-arg", f"BASE={base}",
             "-t", IMAGE]
    if ca := host_ca_bundle():
        build += ["--secret", f"id=ca,src={ca}"]
    podman.run(*build, str(ROOT), timeout=900)
    timed("build", started)
    tmp = tmp_path_factory.mktemp("container")
    tmp.chmod(0o755)
    c = Container(podman, tmp)
    started = time.monotonic()
    c.create()
    try:
        c.wait_healthy()
        timed("start until healthy", started)
        yield c
    finally:
        c.remove()


@pytest.fixture(scope="module")
def key(container: Container, upstream: FakeUpstream) -> dict:
    r = container.api("POST", "/api/v1/pools", json={"name": "host", "upstreams": [upstream.url],
                                                      "models": ["llama3"]})
    assert r.status_code in (200, 201), r.text
    r = container.api("POST", "/api/v1/keys", json={"name": "container-test"})
    assert r.status_code in (200, 201), r.text
    return r.json()


def usage_records(c: Container, key_id: str, want: int, timeout: float = 15) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        r = c.api("GET", "/api/v1/usage", params={"key": key_id})
        assert r.status_code == 200, r.text
        records = r.json()["records"]
        if len(records) >= want or time.monotonic() > deadline:
            return records
        time.sleep(0.5)


def test_admin_page_and_health(container: Container) -> None:
    assert requests.get(container.base + "/healthz", timeout=5).ok
    page = requests.get(container.admin_url + "/", timeout=5)
    assert page.status_code == 200 and "text/html" in page.headers["Content-Type"]


def test_key_streams_a_chat_to_the_host_upstream(container: Container, key: dict, upstream: FakeUpstream) -> None:
    events, first, total = stream_chat(container.base, key["secret"], "llama3")
    assert events[-1] == "[DONE]"
    text = "".join(c["delta"].get("content") or "" for e in events[:-1] for c in json.loads(e)["choices"])
    assert "host" in text, events
    assert first < total - 0.5, f"not streamed: first content after {first:.2f} s of {total:.2f} s"
    assert "Bearer bst_" not in json.dumps(upstream.requests[-1]["headers"])  # the client's key stays here
    records = usage_records(container, key["id"], 1)
    assert records and records[0]["status"] == 200 and records[0]["total_tokens"], records


def test_https_on_its_listener_and_certbot_in_the_image(container: Container, key: dict, tmp_path: Path) -> None:
    assert container.podman.out("exec", container.name, "certbot", "--version").startswith("certbot ")
    ca = make_cert("Container test CA", ca=True)
    # the only certificate is the HTTPS listener's default server: its IP address is checked, not a name
    leaf, leaf_key = make_cert("gateway.example.com", ca, names=["gateway.example.com"], ips=["127.0.0.1"])
    (tmp_path / "ca.pem").write_text(pem(ca[0]))
    r = container.api("POST", "/api/v1/certificates/upload",
                      json={"certificate": pem(leaf, ca[0]), "private_key": pem(leaf_key),
                            "domains": ["gateway.example.com"]})
    assert r.status_code == 201, r.text
    r = requests.post(f"https://127.0.0.1:{container.https}/v1/chat/completions", verify=str(tmp_path / "ca.pem"),
                      headers={"Authorization": f"Bearer {key['secret']}"}, timeout=10,
                      json={"model": "llama3", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200 and "host" in r.text, r.text
    # the HTTP listener redirects to the published HTTPS port (443 in the image), not the container's own
    r = requests.get(f"http://127.0.0.1:{container.http}/v1/models", allow_redirects=False, timeout=5)
    assert r.status_code == 308 and r.headers["Location"] == "https://127.0.0.1/v1/models", r.headers


def processes(container: Container) -> dict[int, tuple[int, str]]:
    """{pid: (uid, command line)} of the container's processes, read from the host's /proc."""
    pid1 = int(container.podman.out("inspect", container.name, "--format", "{{.State.Pid}}"))
    procs = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                uid = int(re.search(r"^Uid:\s+(\d+)", (entry / "status").read_text(), re.M).group(1))
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            except (OSError, AttributeError):
                continue
            procs[int(entry.name)] = (int(stat[stat.rindex(")") + 2:].split()[1]), uid, cmd)
    tree, todo = {}, [pid1]
    while todo:
        pid = todo.pop()
        if pid in procs:
            tree[pid] = procs[pid][1:]
            todo += [p for p, (ppid, _, _) in procs.items() if ppid == pid]
    return tree


def test_processes_are_not_root(container: Container) -> None:
    tree = processes(container)
    names = " ".join(cmd for _, cmd in tree.values())
    for needle in ("tini", "bastion up", "authsvc.server", "gunicorn", "nginx: master", "nginx: worker"):
        assert needle in names, f"{needle} not running: {tree}"
    assert {uid for uid, _ in tree.values()} == {UID}, tree


def image_findings(podman: Podman, image: str, needles: dict[str, bytes]) -> list[str]:
    """Where any needle shows in the image: its history, its configuration, any byte of any layer; and any file
    under run/secrets/ (a build secret's mount point) in a layer."""
    found = []
    for source in ("history", "image inspect"):
        text = podman.run(*source.split(), *(["--no-trunc"] if source == "history" else []), image).stdout
        found += [f"{what} in {source}" for what, needle in needles.items() if needle in text]
    archive = podman.run("save", "--format", "docker-archive", image, stdout=subprocess.PIPE,
                         capture_output=False).stdout
    assert len(archive) > 50 << 20  # really the image
    found += [f"{what} in a layer" for what, needle in needles.items() if needle in archive]
    with tarfile.open(fileobj=io.BytesIO(archive)) as outer:
        for member in outer:
            if member.name.endswith(".tar"):
                with tarfile.open(fileobj=outer.extractfile(member)) as layer:
                    found += [f"file {n}" for n in layer.getnames() if n.lstrip("./").startswith("run/secrets")]
    return found


def test_no_secret_in_the_image(container: Container, podman: Podman) -> None:
    data = container.volume_dir()
    needles = {
        "admin password": container.admin_password.encode(),
        "Cloudflare token": container.cloudflare_token.encode(),
        "pepper": (data / "pepper").read_bytes().strip(),
        "JWT secret": (data / "jwt_secret").read_bytes().strip(),
    }
    # the token did reach the data dir (so the needle is a real one), and not the children's environment
    assert container.cloudflare_token in (data / "certs" / "cloudflare.ini").read_text()
    # the host's own CAs (a proxy's) that the build got as a secret: those not in the image's Debian bundle
    if ca := host_ca_bundle():
        pem = re.compile(rb"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", re.S)
        image_ca = podman.run("run", "--rm", "--network=host", "--entrypoint", "cat", IMAGE,
                              "/etc/ssl/certs/ca-certificates.crt").stdout
        for i, cert in enumerate(set(pem.findall(ca.read_bytes())) - set(pem.findall(image_ca))):
            needles[f"host CA certificate {i}"] = cert.splitlines()[1]
    assert image_findings(podman, IMAGE, needles) == []
    print(f"[container] image layers checked for {len(needles)} secrets: {', '.join(needles)}", flush=True)
    # the container's environment has the token (not the image); the children of `bastion up` do not
    children = [pid for pid, (_, cmd) in processes(container).items()
                if re.search("authsvc.server|gunicorn|nginx", cmd)]
    assert children
    for pid in children:
        assert container.cloudflare_token.encode() not in Path(f"/proc/{pid}/environ").read_bytes()


def test_restart_keeps_keys_and_usage(container: Container, key: dict) -> None:
    before = usage_records(container, key["id"], 1)
    started = time.monotonic()
    stop = container.podman.run("stop", container.name, text=True)
    took = time.monotonic() - started
    code = container.podman.out("inspect", container.name, "--format", "{{.State.ExitCode}}")
    print(f"[container] podman stop (idle): {took:.1f} s, exit code {code}", flush=True)
    assert code == "0" and took < 10, (code, took, stop.stderr, container.logs())
    started = time.monotonic()
    container.podman.run("start", container.name)
    container.wait_healthy()
    timed("restart until healthy", started)
    container._token = None  # sign in again: the admin user and its password came back from the volume
    r = container.api("GET", f"/api/v1/keys/{key['id']}")
    assert r.status_code == 200 and r.json()["status"] == "active", r.text
    assert len(usage_records(container, key["id"], len(before))) >= len(before)
    events, _, _ = stream_chat(container.base, key["secret"], "llama3")  # the same secret still works
    assert events[-1] == "[DONE]"
    assert len(usage_records(container, key["id"], len(before) + 1)) == len(before) + 1


def test_stop_lets_a_stream_finish_and_exits_cleanly(container: Container, key: dict,
                                                    upstream: FakeUpstream) -> None:
    upstream.chunk_delay = 0.5  # a 2.5 s stream
    result: dict = {}

    def client() -> None:
        try:
            result["events"] = stream_chat(container.base, key["secret"], "llama3")[0]
        except Exception as e:
            result["error"] = e

    t = threading.Thread(target=client)
    t.start()
    time.sleep(1.0)  # the stream is under way
    started = time.monotonic()
    container.podman.run("stop", container.name)
    took = time.monotonic() - started
    t.join(10)
    upstream.chunk_delay = 0.2
    code = container.podman.out("inspect", container.name, "--format", "{{.State.ExitCode}}")
    print(f"[container] podman stop during a stream: {took:.1f} s, exit code {code}", flush=True)
    assert code == "0" and took < 10, (code, took, container.logs())
    assert result.get("events", [None])[-1] == "[DONE]", result
    assert "stopping..." in container.logs()


def test_stop_cuts_a_stream_longer_than_the_grace_period_and_exits_cleanly(container: Container, key: dict,
                                                                         upstream: FakeUpstream) -> None:
    """`podman stop` kills after 10 s: the image's BASTION_STOP_TIMEOUT (6 s) ends a longer stream first."""
    container.podman.run("start", container.name)
    container.wait_healthy()
    upstream.chunk_delay, upstream.chunks = 1.0, 30  # a 30 s stream
    got: list[str] = []

    def client() -> None:
        with contextlib.suppress(requests.RequestException):
            got.extend(stream_chat(container.base, key["secret"], "llama3")[0])

    t = threading.Thread(target=client)
    t.start()
    time.sleep(1.5)
    started = time.monotonic()
    container.podman.run("stop", container.name)
    took = time.monotonic() - started
    t.join(10)
    upstream.chunk_delay, upstream.chunks = 0.2, 5
    code = container.podman.out("inspect", container.name, "--format", "{{.State.ExitCode}}")
    print(f"[container] podman stop during a 30 s stream: {took:.1f} s, exit code {code}", flush=True)
    assert code == "0" and 5 < took < 10, (code, took, container.logs())
    assert "[DONE]" not in got
