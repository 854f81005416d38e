"""A receiving child process of ``srnode serve`` with ``[node] receive_processes`` > 1 (``node.ingest.procs``).

Started by the main process only: ``python -m node.app.receiver PARENT_PID FD``, ``FD`` a socket inherited from
the parent, on which it first receives ``(config, number, log level)``. It logs to the same stderr as the main
process (same format and redaction) and dies with it (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import logging
import sys
from multiprocessing.connection import Connection

from node.app.logs import REDACT, setup_logging
from node.config import secret_values
from node.ingest.procs import die_with_parent, serve_receiver


def command() -> list[str]:
    """How the main process starts a child: this module, run by the same interpreter, with the ``node`` package
    the main process runs first on the path (``ReceiverPool`` sets ``PYTHONPATH``)."""
    return [sys.executable, "-m", "node.app.receiver"]


class _Prefix(logging.Filter):
    """Starts every message of this process with ``receiver N: `` (which process said it)."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = self.prefix + str(record.msg)
        return True


def main(argv: list[str]) -> int:
    """Run one receiving child; returns its exit code (``serve_receiver``)."""
    parent_pid, fd = int(argv[0]), int(argv[1])
    die_with_parent(parent_pid)
    conn = Connection(fd)
    cfg, number, level = conn.recv()
    setup_logging(level)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_Prefix(f"receiver {number}: "))
    REDACT.secrets.update(secret_values(cfg, keys=("password", "token")))
    return serve_receiver(conn, cfg, number)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
