"""Logging of the ``srnode`` commands: one stderr handler, third-party chatter lowered, secrets redacted."""

from __future__ import annotations

import logging
import sys


class _RedactFilter(logging.Filter):
    """Last line of defence: never let a record carry a configured secret."""

    def __init__(self) -> None:
        super().__init__()
        self.secrets: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        """Replace every secret in the formatted message by ``***``; never drops a record."""
        if self.secrets:
            msg = record.getMessage()
            for s in self.secrets:
                if s and s in msg:
                    msg = msg.replace(s, "***")
            record.msg, record.args = msg, None
        return True


REDACT = _RedactFilter()  # the one filter on the stderr handler; the service adds the configured secrets


def setup_logging(level: str = "INFO") -> None:
    """Replace the root logger's handlers by one stderr handler (with ``REDACT``) at ``level``; pynetdicom and
    httpx at WARNING. ValueError for an unknown level name."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    handler.addFilter(REDACT)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # pynetdicom is chatty at INFO and logs identifiers from datasets at DEBUG
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    # httpx logs every request (URLs with UIDs) at INFO
    logging.getLogger("httpx").setLevel(logging.WARNING)
