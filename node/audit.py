"""Append-only audit log (JSON lines): associations, received series, job decisions, deliveries.

Only identifiers that are not patient data go in: AE titles, addresses, UIDs, counts, states and reasons.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from node.phi import PHI_KEYWORDS

log = logging.getLogger(__name__)

# keys that must never reach the audit log, whatever a caller passes
_FORBIDDEN = frozenset(PHI_KEYWORDS)


class AuditLog:
    """Appends one JSON object per event to ``path`` (opened in append mode, flushed and fsync'ed).

    Creates the parent folder (OSError when it cannot).
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def write(self, event: str, **fields: Any) -> None:
        """Append ``{"time": UTC ISO 8601, "event": event, **fields}``; patient keys (PatientName, PatientID,
        ...) are dropped, other values are written with ``str`` when not JSON. A write error is logged, not
        raised."""
        rec = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "event": event}
        rec.update({k: v for k, v in fields.items() if k not in _FORBIDDEN})
        line = json.dumps(rec, default=str, sort_keys=False) + "\n"
        try:
            with self._lock, self.path.open("a", encoding="utf-8") as fh:
                fh.write(line)
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            log.error("audit log %s: cannot append: %s", self.path, exc)

    def read(self) -> list[dict[str, Any]]:
        """Every record, oldest first ([] when the file does not exist). json.JSONDecodeError on a damaged
        line, OSError."""
        if not self.path.exists():
            return []
        return [json.loads(ln) for ln in self.path.read_text(encoding="utf-8").splitlines() if ln.strip()]
