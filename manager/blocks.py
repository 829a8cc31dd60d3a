"""Brute-force blocks held by the gate (authsvc.bruteforce): listed from the file the gate publishes each
second (`run/blocks.json`), cleared by dropping a request file into `run/blocks-clear/` that the gate applies
within a quarter of a second. Clears are audited."""

from __future__ import annotations

import json
import secrets
import time
from typing import TYPE_CHECKING, Any

from authsvc.bruteforce import BLOCKS_FILE, CLEAR_DIR, POLL_INTERVAL, parse_client
from authsvc.files import write_atomic
from manager import validation as v
from manager.errors import NotFound

if TYPE_CHECKING:
    from manager.context import Bastion

APPLY_TIMEOUT = 4 * POLL_INTERVAL + 1.0  # the gate's poll, plus room for a busy machine


def listing(bastion: Bastion) -> list[dict[str, Any]]:
    """Blocks in force, oldest first: address (or IPv6 /64), since, until, retry_after, blocks in a row,
    failures that started it, requests refused during it (as of the gate's last report, at most 1 s old)."""
    try:
        rows = json.loads((bastion.dirs.run / BLOCKS_FILE).read_bytes())["blocks"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    now = time.time()
    return [{**r, "retry_after": max(1, round(r["until"] - now))} for r in rows
            if isinstance(r, dict) and isinstance(r.get("until"), (int, float)) and r["until"] > now]


def client(field: str, value: Any) -> str:
    try:
        return parse_client(v.require_str(field, value).strip())
    except ValueError:
        raise v.ValidationError(field, "must be an IP address or an IPv6 /64 network") from None


def clear(bastion: Bastion, address: str | None, author: str = "cli") -> dict[str, Any]:
    """Lift one client's block (404 unless it is listed) or, with `address` None, every block; the gate also
    forgets their failure counts. `applied` says whether the running gate confirmed it in time."""
    blocked = [r["address"] for r in listing(bastion)]
    if address is None:
        targets = blocked
        request: dict[str, Any] = {"all": True}
        action = f"clear all brute-force blocks ({len(blocked)})"
    else:
        key = client("address", address)
        if key not in blocked:
            raise NotFound("brute-force block", key)
        targets = [key]
        request = {"addresses": [key]}
        action = f"clear brute-force block of {key}"
    applied = _send(bastion, {**request, "author": author}) if targets or address is None else True
    bastion.audit.record(author, action)
    return {"cleared": targets, "applied": applied}


def _send(bastion: Bastion, request: dict[str, Any]) -> bool:
    """Hand a clear request to the gate and wait until it took it (the file is gone). No running gate holds
    blocks, so none is written then."""
    if not bastion.dirs.gate_socket.exists():
        return False
    folder = bastion.dirs.run / CLEAR_DIR
    folder.mkdir(mode=0o700, exist_ok=True)
    path = folder / f"{time.time_ns()}-{secrets.token_hex(4)}.json"
    write_atomic(path, json.dumps(request).encode())
    deadline = time.monotonic() + APPLY_TIMEOUT
    while time.monotonic() < deadline:
        if not path.exists():
            return True
        time.sleep(0.05)
    return False
