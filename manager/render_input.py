"""Gathering a RenderInput: the one place a rendering reads the world (store, health.json, DNS, the process
user, data-dir paths). `observe` does the slow part (DNS, files) before the store lock is taken; `gather` then
reads the store once, under the lock, and resolves only the hosts the observation did not cover (the pools
added by the change being applied)."""

from __future__ import annotations

import grp
import ipaddress
import json
import logging
import os
import pwd
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from authsvc.files import write_atomic
from manager import capacity, custom_config, generations, health, metering
from manager import settings as settings_mod
from manager.certs import manage as certs
from manager.certs import pem
from manager.render import RenderInput, host_port

if TYPE_CHECKING:
    from manager.context import Bastion

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Observation:
    """What a rendering needs from outside the store, looked at once."""

    resolved: Mapping[str, tuple[str, ...]]  # "host:port" → addresses (fresh, else the last good answer)
    fallback: Mapping[str, tuple[str, ...]]  # last good answers (resolved.json), for hosts added later
    down: frozenset[str]
    worker_user: str | None
    certificates: Mapping[str, Mapping[str, Any]]  # the certificates nginx can serve (see `servable`)
    njs_module: str | None = None  # the njs module to load for token metering (manager/metering.py)
    open_files: int = capacity.UNLIMITED  # the open-file hard limit nginx will have (manager/capacity.py)


def freeze(value: Any) -> Any:
    """A read-only deep copy: mappings become MappingProxyType, lists tuples."""
    if isinstance(value, Mapping):
        return MappingProxyType({k: freeze(v) for k, v in value.items()})
    if isinstance(value, list | tuple):
        return tuple(freeze(v) for v in value)
    return value


def resolve(host: str, port: int) -> tuple[str, ...]:
    """Every address of host:port, sorted (so the rendering is stable), as nginx wants them. A name that is
    only loopback keeps its IPv4 addresses: local servers (Ollama...) usually listen on 127.0.0.1 alone."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        return ()
    ips = {ipaddress.ip_address(a[0]) for *_, a in infos}
    if all(ip.is_loopback for ip in ips) and any(ip.version == 4 for ip in ips):
        ips = {ip for ip in ips if ip.version == 4}
    return tuple(sorted(f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}" for ip in ips))


def _resolve_all(pools: list[Mapping[str, Any]], known: Mapping[str, tuple[str, ...]],
                 fallback: Mapping[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
    """host:port → addresses for every upstream of `pools`; `known` answers are reused, a failed lookup falls
    back to the last good answer, so a DNS hiccup during an apply does not take a working upstream out."""
    result: dict[str, tuple[str, ...]] = {}
    for pool in pools:
        for up in pool["upstreams"]:
            key = host_port(up["url"])
            if key not in result:
                host, _, port = key.rpartition(":")
                result[key] = known[key] if key in known else (resolve(host, int(port)) or fallback.get(key, ()))
    return result


def worker_user(data_dir: Path) -> str | None:
    """Started as root, nginx would run its workers as `nobody`, which cannot reach the gate's socket in a
    private data dir; they run as the data dir's owner instead (see docs/security.md)."""
    if os.geteuid() != 0:
        return None
    st = data_dir.stat()
    return f"{pwd.getpwuid(st.st_uid).pw_name} {grp.getgrgid(st.st_gid).gr_name}"


def observe(bastion: Bastion, remember: bool = False) -> Observation:
    """Resolve every upstream host now in the store, read the health verdicts and the worker user. Hostnames
    are resolved here, not by nginx, so a DNS failure cannot stop nginx. With `remember` the answers are kept
    in resolved.json for the next lookup that fails. Reads the store without its lock, health.json and
    resolved.json; raises StoreCorrupt when the store cannot be read, OSError when resolved.json cannot be
    written."""
    cache_file = bastion.dirs.root / "resolved.json"
    try:
        fallback = {k: tuple(v) for k, v in json.loads(cache_file.read_text()).items()}
    except (OSError, ValueError, AttributeError):
        fallback = {}
    resolved = _resolve_all(bastion.store.all("pools"), {}, fallback)
    if remember:
        write_atomic(cache_file, json.dumps({**fallback, **resolved}, sort_keys=True).encode())
    return Observation(freeze(resolved), freeze(fallback), frozenset(health.down_urls(bastion)),
                       worker_user(bastion.dirs.root), freeze(servable(bastion)),
                       metering.detect(bastion.nginx.binary).module, capacity.hard_limit())


def servable(bastion: Bastion) -> dict[str, dict[str, Any]]:
    """name → {names, fullchain, key, digest} of every certificate nginx can serve now. One with a missing,
    unreadable or broken file, or a key of another certificate, is left out (logged): nginx would refuse to
    start on it. A digest of the chain is rendered (the key must match it, so it changes with it), so a
    renewed or replaced certificate makes a new generation that `nginx -t` checks before nginx reloads;
    nothing derived from the key is rendered."""
    result = {}
    refused = certs.refused(bastion)
    for name, _ in certs.names(bastion):
        paths = certs.files(bastion, name)
        try:
            if paths is None:
                raise FileNotFoundError("no fullchain.pem")
            chain, key = paths[0].read_bytes(), paths[1].read_bytes()
            names = pem.served_names(chain, key)
            digest = pem.chain_digest(chain)
            if digest in refused.get(name, ()):
                raise ValueError("nginx refused these files; obtain, renew or upload it again, or remove it")
        except (OSError, ValueError, IndexError) as e:
            log.error("certificate %s is not served: %s", name, e)
            continue
        result[name] = {"names": names, "fullchain": str(paths[0]), "key": str(paths[1]), "digest": digest}
    return result


def gather(bastion: Bastion, observed: Observation | None = None, extra_parallel: int | None = None) -> RenderInput:
    """The input of a rendering: the store read once (call under the store lock to apply what it holds) plus
    `observed` (observed now when not given), and the keys' max_parallel values (plus `extra_parallel`, a value
    about to be given to a key). Raises StoreCorrupt when the store cannot be read."""
    observed = observed or observe(bastion)
    tables = generations.config_state(bastion.store)
    settings = settings_mod.effective(tables["settings"][0] if tables["settings"] else {})
    dirs = bastion.dirs
    paths = {"pid": dirs.nginx_pid, "error_log": dirs.error_log, "access_log": dirs.access_log,
             "admin_access_log": dirs.logs / "admin-access.log", "temp": dirs.nginx_temp,
             "gate_socket": dirs.gate_socket, "manager_socket": dirs.manager_socket,
             "acme_webroot": dirs.acme_webroot}
    return RenderInput(
        tables=freeze(tables),
        settings=freeze(settings),
        custom_config=custom_config.renderable(settings["custom_config"], settings),
        resolved=freeze(_resolve_all(tables["pools"], observed.resolved, observed.fallback)),
        down=observed.down,
        worker_user=observed.worker_user,
        paths=freeze({name: str(path) for name, path in paths.items()}),
        certificates=observed.certificates,
        njs_module=observed.njs_module,
        open_files=observed.open_files,
        parallel_limits=tuple(sorted({*bastion.keystore.parallel_limits(), *filter(None, [extra_parallel])})),
    )
