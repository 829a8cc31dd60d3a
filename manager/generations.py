"""Rendered nginx configurations kept as numbered generations under data/nginx/generations/.

Each generation directory holds the files nginx reads (`nginx.conf` and the files it includes by relative
paths, e.g. `public.conf`), `meta.json` (author, time, each file's sha256), `rendered.json` (the files as
rendered, to show what a hand edit changed) and `state.json` (the configuration resources as they were while it
was live, kept up to date by every change, for rollback). `nginx/live` is a symlink to the live one, switched
atomically. Drift = a live file no longer has the sha256 recorded when it was written.

`nginx/apply.json` is the journal of an apply in progress: written before the switch to a new generation and
removed once nginx verifiably serves it (or the previous one was restored), so a start after a crash knows which
generation to check and which one to go back to (manager/apply.py `recover`).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from authsvc.files import write_atomic
from manager import custom_config
from manager.datadir import DataDir
from manager.store import Store

KEEP = 20
MAIN = "nginx.conf"  # the file nginx is started with; the others are included by it
JOURNAL = "apply.json"
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


def write(dirs: DataDir, generation: int, files: Mapping[str, str], author: str, state: Mapping[str, Any]) -> Path:
    """Write a new generation (0700 dir, 0600 files: they may hold upstream API keys); returns its nginx.conf.
    Raises OSError (e.g. disk full, or FileExistsError when the generation exists)."""
    gen_dir = directory(dirs, generation)
    gen_dir.mkdir(mode=0o700)
    for name, text in files.items():
        path = gen_dir / name
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_atomic(path, text.encode())
    write_atomic(gen_dir / "rendered.json", json.dumps(dict(files)).encode())
    hashes = {name: _sha256(text.encode()) for name, text in files.items()}
    meta = {"generation": generation, "author": author, "time": time.time(), "sha256": hashes[MAIN],
            "files": hashes}
    write_atomic(gen_dir / "meta.json", json.dumps(meta).encode())
    save_state(dirs, generation, state)
    return gen_dir / MAIN


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save_state(dirs: DataDir, generation: int, state: Mapping[str, Any]) -> None:
    """Record the configuration resources while `generation` is live (what a rollback to it restores)."""
    if generation and directory(dirs, generation).is_dir():
        # default=dict: a RenderInput's tables are read-only mappings
        write_atomic(directory(dirs, generation) / "state.json", json.dumps(state, default=dict).encode())


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


def live_websocket_pools(dirs: DataDir) -> set[str]:
    """Names of the pools nginx's live configuration passes WebSocket upgrades to (has `@ws_<pool>` for)."""
    try:
        return {p["name"] for p in state(dirs, live(dirs))["pools"] if p["upstreams"] and p.get("websocket")}
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


def names(dirs: DataDir, generation: int) -> list[str]:
    """The nginx files of a generation, nginx.conf first (older generations recorded only nginx.conf)."""
    return [MAIN, *sorted(set(meta(dirs, generation).get("files", {})) - {MAIN})]


def files(dirs: DataDir, generation: int) -> dict[str, str]:
    """The nginx files of a generation as they are on disk now. Raises OSError when one cannot be read."""
    gen_dir = directory(dirs, generation)
    return {name: (gen_dir / name).read_text() for name in names(dirs, generation)}


def rendered(dirs: DataDir, generation: int) -> dict[str, str]:
    """The nginx files of a generation as Bastion rendered them ({} for generations older than this record)."""
    try:
        return json.loads((directory(dirs, generation) / "rendered.json").read_text())
    except (OSError, ValueError):
        return {}


def joined(texts: Mapping[str, str]) -> str:
    """Several files as one text for people: nginx.conf, then each other file after a line naming it."""
    return "".join(text if name == MAIN else f"\n# ==== {name} ====\n{text}" for name, text in texts.items())


def live_text_masked(dirs: DataDir) -> str:
    """The live files as shown to people ("" before the first apply)."""
    current = live(dirs)
    try:
        return custom_config.mask(joined(files(dirs, current))) if current else ""
    except OSError:
        return ""


def rendered_text_masked(dirs: DataDir) -> str:
    """The live generation as Bastion rendered it, without hand edits ("" before the first apply)."""
    current = live(dirs)
    texts = rendered(dirs, current) if current else {}
    return custom_config.mask(joined(texts)) if texts else live_text_masked(dirs)


def history(dirs: DataDir) -> list[dict[str, Any]]:
    current = live(dirs)
    return [{**meta(dirs, g), "live": g == current} for g in reversed(numbers(dirs))]


def diff(old: str, new: str, old_name: str, new_name: str) -> str:
    before, after = custom_config.mask(old).splitlines(keepends=True), custom_config.mask(new).splitlines(keepends=True)
    return "".join(difflib.unified_diff(before, after, old_name, new_name))


def diff_files(old: Mapping[str, str], new: Mapping[str, str], old_name: str, new_name: str) -> str:
    """Unified diff of every file of two generations (masked), file by file."""
    return "".join(diff(old.get(name, ""), new.get(name, ""), f"{old_name}/{name}", f"{new_name}/{name}")
                   for name in [*new, *(n for n in old if n not in new)])


def changes(dirs: DataDir, generation: int) -> str:
    """What `generation` changed compared with the kept generation before it."""
    earlier = [g for g in numbers(dirs) if g < generation]
    old = files(dirs, earlier[-1]) if earlier else {}
    return diff_files(old, files(dirs, generation), f"generation {earlier[-1] if earlier else 0}",
                      f"generation {generation}")


def drifted(dirs: DataDir) -> list[str]:
    """The live files changed by hand since Bastion wrote them (a file that cannot be read counts)."""
    current = live(dirs)
    if not current:
        return []
    recorded = meta(dirs, current)
    hashes = recorded.get("files") or {MAIN: recorded.get("sha256")}
    out = []
    for name, sha in hashes.items():
        try:
            if _sha256((directory(dirs, current) / name).read_bytes()) != sha:
                out.append(name)
        except OSError:
            out.append(name)
    return out


def drift(dirs: DataDir) -> bool:
    """True when a live file was changed by hand since Bastion wrote it."""
    return bool(drifted(dirs))


def drift_diff(dirs: DataDir, changed: list[str]) -> str:
    """What was changed by hand in the live files named `changed` (see drifted()), against what Bastion rendered
    (masked)."""
    current = live(dirs)
    if not changed:
        return ""
    before = {n: t for n, t in rendered(dirs, current).items() if n in changed}
    after = {}
    for name in changed:
        try:
            after[name] = (directory(dirs, current) / name).read_text()
        except OSError:
            after[name] = ""
    return diff_files(before, after, f"generation {current} as rendered", "on disk")


# ---- the journal of an apply in progress ----

def begin(dirs: DataDir, previous: int, generation: int) -> None:
    """Record, before switching, that `generation` is about to replace `previous`. Raises OSError."""
    write_atomic(dirs.nginx / JOURNAL, json.dumps({"previous": previous, "generation": generation}).encode())


def pending(dirs: DataDir) -> dict[str, int] | None:
    """The journal of an apply that did not finish, or None. An unreadable journal counts as one that names
    no generation (previous 0): the live one must still be checked."""
    try:
        raw = (dirs.nginx / JOURNAL).read_text()
    except FileNotFoundError:
        return None
    try:
        entry = json.loads(raw)
        return {"previous": int(entry["previous"]), "generation": int(entry["generation"])}
    except (ValueError, KeyError, TypeError):
        return {"previous": 0, "generation": 0}


def end(dirs: DataDir) -> None:
    """The apply finished (verified or restored): forget the journal."""
    (dirs.nginx / JOURNAL).unlink(missing_ok=True)


def unswitched(dirs: DataDir) -> list[int]:
    """Generations written after the live one but never switched to (left by an apply that did not finish).
    Nothing when `live` is there but not a link Bastion made (e.g. a copy restored from a backup): then which
    generations were switched to cannot be told, and nothing is discarded."""
    current = live(dirs)
    if not current and (dirs.live.exists() or dirs.live.is_symlink()):
        return []
    return [g for g in numbers(dirs) if g > current]
