"""Files shared with the manager: writing one so readers see the old or the new one, never half of one; and
re-reading one in the background."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)


def write_atomic(path: Path, data: bytes, mode: int = 0o600, *, durable: bool = True) -> None:
    """Replace `path` with `data` through a temporary file and a rename. `durable` also fsyncs the file and its
    directory, so the new content survives a power cut (status files rebuilt every second skip that)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


class Reloader(threading.Thread):
    """Calls `load()` every `interval` seconds, off the request path, for as long as the process runs. A failure
    is logged and tried again next time: a dead thread would freeze what it keeps fresh, silently."""

    def __init__(self, name: str, load: Callable[[], object], interval: float):
        super().__init__(name=name, daemon=True)
        self.load = load
        self.interval = interval

    def run(self) -> None:
        while True:
            time.sleep(self.interval)
            try:
                self.load()
            except Exception:
                log.exception("%s: loading failed", self.name)


class WatchedFile:
    """A file the gate re-reads only when it changed (inode, mtime, size), off the request path. Whatever cannot
    be read, the last good contents stay; `problem` says why (for the manager's health check)."""

    what = "contents"  # for the log

    def __init__(self, path: Path):
        self.path = path
        self.problem = ""
        self._stamp: tuple[int, int, int] | None = None

    def take(self, data: bytes) -> None:
        """Parse and swap in the new contents (one reference swap: the request thread sees old or new)."""
        raise NotImplementedError

    def load(self) -> bool:
        """Read the file if it changed; True when new contents were taken."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            self.take(self.path.read_bytes())
        except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
            if str(e) != self.problem:
                log.error("ignoring unreadable %s (keeping the %s loaded): %s", self.path, self.what, e)
            self.problem = str(e)
            return False
        self.problem = ""
        return True
