"""Rendered nginx configurations kept as numbered generations under data/nginx/generations/.

Each generation directory holds `nginx.conf`, `meta.json` (author, time, sha256) and `state.json` (the
configuration resources as they were while it was live, kept up to date by every change, for rollback).
`nginx/live` is a symlink to the live one, switched atomically. Drift = the live file no longer has the
sha256 recorded when it was written.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from authsvc.files import write_atomic
from manager import custom_config
from manager.datadir import DataDir
from manager.store import Store

KEEP = 20
CONFIG_TABLES = ("pools", "routes", "settings", "cidr_groups")  # what a rollback restores (never keys or users)


def directory(dirs: DataDir, generation: int) -> Path:
    return dirs.generations / f"{generation:06d}"


def live(dirs: DataDir) -> int:
    try:
        return int(os.readlink(dirs.live).rsplit("/", 1)[-1])
    except (OSError, ValueError):
        return 0


def numbers(dirs: DataDir) -> list[int]:
    return sorted(int(p.name) for p in dirs.generations.iterdir() if p.name.isdigit())


def next_number(dirs: DataDir) -> int:
    return max([live(dirs), *numbers(dirs)]) + 1


def config_state(store: Store) -> dict[str, Any]:
    data = store.dump() or {}  # one read of the store, not one per table
    return {name: [dict(doc) for doc in data.get(name, {}).values()] for name in CONFIG_TABLES}


def write(dirs: DataDir, generation: int, text: str, author: str, state: dict[str, Any]) -> Path:
    """Write a new generation (0600 files: they may hold upstream API keys); returns its nginx.conf."""
    gen_dir = directory(dirs, generation)
    gen_dir.mkdir(mode=0o700)
    conf = gen_dir / "nginx.conf"
    write_atomic(conf, text.encode())
    meta = {"generation": generation, "author": author, "time": time.time(),
            "sha256": hashlib.sha256(text.encode()).hexdigest()}
    write_atomic(gen_dir / "meta.json", json.dumps(meta).encode())
    save_state(dirs, generation, state)
    return conf


def save_state(dirs: DataDir, generation: int, state: dict[str, Any]) -> None:
    """Record the configuration resources while `generation` is live (what a rollback to it restores)."""
    if generation and directory(dirs, generation).is_dir():
        write_atomic(directory(dirs, generation) / "state.json", json.dumps(state).encode())


def discard(dirs: DataDir, generation: int) -> None:
    shutil.rmtree(directory(dirs, generation), ignore_errors=True)


def switch(dirs: DataDir, generation: int) -> None:
    tmp = dirs.nginx / ".live.tmp"
    tmp.unlink(missing_ok=True)
    os.symlink(f"generations/{generation:06d}", tmp)
    os.replace(tmp, dirs.live)


def prune(dirs: DataDir) -> None:
    current = live(dirs)
    for g in numbers(dirs)[:-KEEP]:
        if g != current:
            discard(dirs, g)


def meta(dirs: DataDir, generation: int) -> dict[str, Any]:
    try:
        return json.loads((directory(dirs, generation) / "meta.json").read_text())
    except (OSError, ValueError):
        return {"generation": generation}


def state(dirs: DataDir, generation: int) -> dict[str, Any]:
    """The configuration a kept generation was rendered from. Raises FileNotFoundError if not kept."""
    return json.loads((directory(dirs, generation) / "state.json").read_text())


def live_pools(dirs: DataDir) -> set[str]:
    """Names of the pools nginx's live configuration has a location for."""
    try:
        return {p["name"] for p in state(dirs, live(dirs))["pools"] if p["upstreams"]}
    except (OSError, ValueError, KeyError):
        return set()


def live_settings(dirs: DataDir) -> dict[str, Any]:
    """The settings the live generation was rendered from ({} when unknown): what a supervisor can go on with
    while the store cannot be read."""
    try:
        docs = state(dirs, live(dirs)).get("settings") or [{}]
        return dict(docs[0])
    except (OSError, ValueError, AttributeError, IndexError, TypeError):
        return {}


def live_text_masked(dirs: DataDir) -> str:
    """The live nginx.conf as shown to people ("" before the first apply)."""
    return custom_config.mask(dirs.nginx_conf.read_text()) if dirs.nginx_conf.exists() else ""


def text(dirs: DataDir, generation: int) -> str:
    return (directory(dirs, generation) / "nginx.conf").read_text()


def history(dirs: DataDir) -> list[dict[str, Any]]:
    current = live(dirs)
    return [{**meta(dirs, g), "live": g == current} for g in reversed(numbers(dirs))]


def diff(old: str, new: str, old_name: str, new_name: str) -> str:
    before, after = custom_config.mask(old).splitlines(keepends=True), custom_config.mask(new).splitlines(keepends=True)
    return "".join(difflib.unified_diff(before, after, old_name, new_name))


def changes(dirs: DataDir, generation: int) -> str:
    """What `generation` changed compared with the kept generation before it."""
    earlier = [g for g in numbers(dirs) if g < generation]
    old = text(dirs, earlier[-1]) if earlier else ""
    return diff(old, text(dirs, generation), f"generation {earlier[-1] if earlier else 0}",
                f"generation {generation}")


def drift(dirs: DataDir) -> bool:
    """True when the live file was changed by hand since Bastion wrote it."""
    current = live(dirs)
    if not current:
        return False
    try:
        on_disk = hashlib.sha256(dirs.nginx_conf.read_bytes()).hexdigest()
    except OSError:
        return True
    return on_disk != meta(dirs, current).get("sha256")
