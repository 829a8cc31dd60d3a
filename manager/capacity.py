"""How many connections nginx may hold, sized from the `max_streams` setting and the open-file limit.

A stream holds two of nginx's connections (the client's and the pool's) for its whole life, and each
connection is an open file. nginx's defaults (`worker_connections 512`, the process's soft limit of 1,024 open
files) break long before a GPU farm's streams do; Bastion renders `worker_connections` and
`worker_rlimit_nofile` from `max_streams`, and `bastion up` raises its own soft limit to the hard one so that
nginx, the gate and the manager start with room. Every worker gets room for all the streams: nginx does not
spread connections evenly over its workers (docs/decisions.md, decision 31).
"""

from __future__ import annotations

import logging
import resource

from manager import validation as v

log = logging.getLogger(__name__)

CONNECTIONS_PER_STREAM = 2  # the client's and the pool's
SPARE_CONNECTIONS = 1024  # gate and manager hops, admin listener, idle keep-alive, requests being refused
SPARE_FILES = 256  # logs, listening sockets, the njs module, temp files
UNLIMITED = 1 << 20  # what an "unlimited" hard limit is taken to be


def hard_limit() -> int:
    """The open-file hard limit of this process (nginx, started by the same supervisor, gets the same)."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return UNLIMITED if hard == resource.RLIM_INFINITY else hard


def most_streams(open_files: int) -> int:
    """The largest `max_streams` that fits in `open_files` per nginx worker."""
    return max(0, (open_files - SPARE_FILES - SPARE_CONNECTIONS) // CONNECTIONS_PER_STREAM)


def nginx_limits(max_streams: int, open_files: int) -> tuple[int, int]:
    """(worker_connections, worker_rlimit_nofile) for `max_streams`, never above the hard limit `open_files`
    (a worker cannot raise its limit past it; the setting's check keeps the two apart, see `check`)."""
    files = min(max_streams * CONNECTIONS_PER_STREAM + SPARE_CONNECTIONS + SPARE_FILES, open_files)
    return max(files - SPARE_FILES, 512), files


def check(field: str, max_streams: int, open_files: int | None = None) -> int:
    """`max_streams` must fit in this machine's open-file hard limit."""
    open_files = hard_limit() if open_files is None else open_files
    most = most_streams(open_files)
    if max_streams > most:
        raise v.ValidationError(field, f"at most {most} on this machine: its open-file hard limit (ulimit -Hn) "
                                       f"is {open_files}; raise it first (in a container: --ulimit nofile=N:N)")
    return max_streams


def raise_soft_limit() -> int:
    """Raise this process's soft open-file limit to the hard one (children inherit it); returns the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as e:
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, hard, e)
    return soft
