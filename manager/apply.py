"""Applying nginx configuration so nginx is never left broken (DESIGN.md §6).

gather the input → render the generation's files → write them → `nginx -t` → journal → atomic switch of the
`live` symlink → reload → verify (new workers, no [emerg] since the reload, /healthz reports the new generation)
→ forget the journal. On failure it switches back to the last good generation, reloads, and raises with nginx's
own words. An apply killed mid-way is finished or rolled back by `recover` at the next start or apply.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import requests

from manager import cidr_groups, generations, render_input
from manager.nginx import NginxError, local_url
from manager.render import MAIN, RenderInput, render
from manager.render import access_rules as rules_of

if TYPE_CHECKING:
    from manager.context import Bastion

log = logging.getLogger(__name__)
VERIFY_TIMEOUT = 10.0


class ConfigTestFailed(NginxError):
    """`nginx -t` refused the rendered configuration; nothing was changed."""


class ReloadFailed(NginxError):
    """nginx did not take the new configuration; the previous generation was restored."""


@dataclass(frozen=True)
class ApplyResult:
    generation: int
    changed: bool
    reloaded: bool


def render_config(bastion: Bastion, generation: int) -> str:
    """The nginx.conf the current state renders to (reads the store, health.json and DNS: not for requests)."""
    return render(render_input.gather(bastion), generation)[MAIN]


def access_rules(bastion: Bastion, group_names: list[str]) -> list[tuple[str, str]]:
    """nginx allow/deny lines for a listener with the CIDR groups now in the store."""
    return rules_of(cidr_groups.by_name(bastion), group_names)


def healthz_url(listen: str) -> str:
    return local_url(listen) + "/healthz"


def apply(bastion: Bastion, author: str = "cli", *, force_reload: bool = False,
          extra_parallel: int | None = None) -> ApplyResult:
    """Render and apply the configuration; with `force_reload` a running nginx is reloaded and verified even
    when nothing changed. Raises ConfigTestFailed or ReloadFailed, in which case nothing was left changed,
    StoreCorrupt when the store cannot be read, OSError when a generation cannot be written. Runs under the
    store lock, so applies from the manager, the supervisor and the CLI never interleave."""
    observed = render_input.observe(bastion, remember=True)  # DNS and file reads before taking the lock
    with bastion.store.transaction():
        _recover(bastion)
        return _apply(bastion, render_input.gather(bastion, observed, extra_parallel), author, force_reload)


def _apply(bastion: Bastion, inp: RenderInput, author: str, force_reload: bool) -> ApplyResult:
    dirs = bastion.dirs
    dirs.ensure()
    current = generations.live(dirs)
    master = bastion.nginx.master_pid()
    if current and _serves(bastion, inp, current):
        if force_reload and master:
            _reload_and_verify(bastion, master, current)
        return ApplyResult(current, changed=False, reloaded=bool(force_reload and master))
    nxt = generations.next_number(dirs)
    conf = generations.write(dirs, nxt, render(inp, nxt), author, inp.tables)
    try:
        bastion.nginx.test(conf)
    except NginxError as e:
        generations.discard(dirs, nxt)
        raise ConfigTestFailed(e.summary, e.output) from None
    _switch_verified(bastion, master, current, nxt)
    generations.prune(dirs)
    return ApplyResult(nxt, changed=True, reloaded=master is not None)


def _serves(bastion: Bastion, inp: RenderInput, generation: int) -> bool:
    """True when the files of `generation` on disk are exactly what `inp` renders for it."""
    try:
        return generations.files(bastion.dirs, generation) == render(inp, generation)
    except OSError:
        return False


def _switch_verified(bastion: Bastion, master: int | None, current: int, nxt: int) -> None:
    """Journal, switch to `nxt`, reload a running master and verify; forget the journal. Raises ReloadFailed
    after switching back to `current` (and reloading) when nginx does not verifiably take `nxt`."""
    dirs = bastion.dirs
    generations.begin(dirs, current, nxt)
    generations.switch(dirs, nxt)
    if master is not None:
        try:
            _reload_and_verify(bastion, master, nxt)
        except Exception as e:  # whatever went wrong, nginx must end up on the last good generation
            _restore(bastion, master, current, nxt)
            if isinstance(e, ReloadFailed):
                raise
            raise ReloadFailed("the reload could not be verified; the previous configuration was restored",
                               str(e)) from e
    generations.end(dirs)


def _restore(bastion: Bastion, master: int | None, previous: int, failed: int) -> None:
    """Switch back to `previous` (none: no live generation), reload a running master, drop `failed`, forget the
    journal. Raises OSError when the switch or the signal fails (the journal is kept for the next try)."""
    dirs = bastion.dirs
    if previous:
        generations.switch(dirs, previous)
        if master is not None:
            bastion.nginx.reload(master)
    else:
        dirs.live.unlink(missing_ok=True)
    generations.discard(dirs, failed)
    generations.end(dirs)


def recover(bastion: Bastion) -> int | None:
    """Finish or roll back an apply that was killed mid-way (see `_recover`); takes the store lock."""
    with bastion.store.transaction():
        return _recover(bastion)


def _recover(bastion: Bastion) -> int | None:
    """Generations written but never switched to are discarded. When the journal shows a switch that was never
    verified, the live generation is kept if `nginx -t` accepts it and a running master verifiably serves it,
    else the previous one is restored. Returns the generation nginx is left on, None when no switch was
    interrupted. Raises OSError when the data dir cannot be changed."""
    dirs = bastion.dirs
    for leftover in generations.unswitched(dirs):
        log.warning("discarding generation %d: an interrupted apply wrote it but never switched to it", leftover)
        generations.discard(dirs, leftover)
    entry = generations.pending(dirs)
    if entry is None:
        return None
    current = generations.live(dirs)
    previous = entry["previous"] or max((g for g in generations.numbers(dirs) if g < current), default=0)
    if current and current != previous:
        master = bastion.nginx.master_pid()
        try:
            bastion.nginx.test(dirs.nginx_conf)
            if master is not None:
                _reload_and_verify(bastion, master, current)
            log.warning("an interrupted apply left generation %d live; nginx accepts it, kept", current)
        except Exception as e:
            log.error("an interrupted apply left generation %d live, which nginx refuses (%s); back to %d",
                      current, e, previous)
            _restore(bastion, master, previous, current)
            return generations.live(dirs)
    generations.end(dirs)
    return current


def _reload_and_verify(bastion: Bastion, master: int, generation: int) -> None:
    nginx, log = bastion.nginx, bastion.dirs.error_log
    mark = _log_mark(log)
    old_workers = nginx.worker_pids(master)
    nginx.reload(master)
    url = healthz_url(bastion.settings()["public_listen"])
    deadline = time.monotonic() + VERIFY_TIMEOUT
    while time.monotonic() < deadline:
        time.sleep(0.05)
        errors = _emerg_since(log, mark)
        if errors:
            _settle(log)
            raise ReloadFailed("nginx rejected the new configuration at reload; the previous one was restored",
                               _emerg_since(log, mark))
        if not nginx.worker_pids(master) - old_workers:
            continue
        try:
            if requests.get(url, timeout=1).json().get("generation") == generation:
                return
        except (requests.RequestException, ValueError):
            pass
    raise ReloadFailed("nginx did not confirm the new configuration in time; the previous one was restored",
                       _emerg_since(log, mark))


def _settle(log: Path, quiet: float = 0.7, limit: float = 4.0) -> None:
    """Wait until nginx stops writing its error log (at most `limit` s). A refused bind() is retried for 2.5 s
    in the same reconfiguration: restoring before that ends would let its late [emerg] lines be taken for the
    verdict of the next reload."""
    deadline = time.monotonic() + limit
    size = -1
    while time.monotonic() < deadline:
        current = _log_mark(log)[1]
        if current == size:
            return
        size = current
        time.sleep(quiet)


def _log_mark(log: Path) -> tuple[int, int]:
    """(inode, size) of the error log now: where nginx's messages about the coming reload begin."""
    try:
        st = log.stat()
    except FileNotFoundError:
        return 0, 0
    return st.st_ino, st.st_size


def _emerg_since(log: Path, mark: tuple[int, int]) -> str:
    """nginx's [emerg]/[alert] lines written since `mark`, also when the log was rotated meanwhile (the rest of
    the old file, now NAME.1, then the new file from its start)."""
    inode, offset = mark
    parts = []
    for path in (log.with_name(log.name + ".1"), log):
        try:
            with path.open("rb") as f:
                current = os.fstat(f.fileno()).st_ino
                if current == inode:
                    f.seek(offset)
                elif path != log:
                    continue  # an older rotated file: nothing of this reload
                parts.append(f.read().decode(errors="replace"))
        except OSError:
            continue
    tail = "\n".join(parts)
    return "\n".join(line for line in tail.splitlines() if "[emerg]" in line or "[alert]" in line)
