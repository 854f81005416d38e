"""Waiting for sockets to become readable or writable without ``select.select``'s file-descriptor limit.

``select.select`` takes only descriptors below ``FD_SETSIZE`` (1024 on Linux) and raises ``ValueError``
("filedescriptor out of range in select()") above: every accepted association costs the node three descriptors
(its socket and :class:`node.ingest.reactor.QuietDUL`'s wake-up socket pair), so ~340 open connections, hostile
ones included, made the gate (``GuardedAssociationServer._first_bytes``) fail every new caller. ``poll(2)``
(``select.poll``) has no such limit and, like ``select``, allocates no descriptor of its own.
"""

from __future__ import annotations

import select
from collections.abc import Sequence
from typing import Protocol, TypeVar


class HasFileno(Protocol):
    def fileno(self) -> int: ...


T = TypeVar("T", bound=HasFileno)

READ = select.POLLIN | select.POLLPRI
WRITE = select.POLLOUT


def wait_ready(objs: Sequence[T], timeout_s: float, *, write: bool = False) -> list[T]:
    """Those of ``objs`` (sockets, anything with ``fileno()``) that are readable (``write``: writable) within
    ``timeout_s`` seconds (0: do not wait; negative counts as 0), as ``select.select`` reports them: a socket
    whose peer hung up or that has an error counts as ready (its next read tells which). Empty on timeout.
    Raises OSError when one of them is closed (no descriptor any more)."""
    poller = select.poll()
    by_fd: dict[int, T] = {}
    for obj in objs:
        fd = obj.fileno()
        if fd < 0:
            raise OSError("wait on a closed socket")
        by_fd[fd] = obj
        poller.register(fd, WRITE if write else READ)
    events = poller.poll(max(0.0, timeout_s) * 1000.0)  # milliseconds, rounded up by Python
    return [by_fd[fd] for fd, _ in events if fd in by_fd]
