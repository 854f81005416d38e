"""Append-only audit log (JSON lines): associations, received series, job decisions, deliveries.

Only identifiers that are not patient data go in: AE titles, addresses, UIDs, counts, states and reasons.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
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


class PeerBudget:
    """How many refusals of one peer address (rejected associations, connections dropped before one) the node
    writes one by one: at most ``per_minute`` lines and audit records per address in ``window_s`` seconds; the
    rest are counted, and the count is written with the first one of the next window (and by :meth:`flush` at
    the node's stop). ``per_minute`` 0: no bound. The budget is per address and ``kind`` (what was refused: another
    called AE title, a limit, an unreadable request, ...): review19, with one budget per address, 60 rejections
    for one reason (a modality retrying with a wrong called AE title) left every other refusal of that address for
    the rest of the minute (a TLS handshake failing, a limit reached by another AE title behind the same address)
    without its line and audit record, its reason known nowhere. The lines stay bounded: at most ``per_minute``
    for each of the few kinds.

    One host opening and closing associations that are refused (another called AE title: 128 a second from one
    sequential client on the CI machine) wrote a WARNING line (163 bytes) and an fsync'ed audit record (186
    bytes) each: ~45 KB/s, ~160 MB an hour per connection stream, on the spool's disk, whose free space decides
    whether every modality's C-STORE is accepted. Thread-safe."""

    def __init__(self, per_minute: int, window_s: float = 60.0, clock: Callable[[], float] = time.monotonic,
                 max_peers: int = 10_000) -> None:
        self.per_minute, self.window_s, self.clock, self.max_peers = per_minute, window_s, clock, max_peers
        self._peers: dict[tuple[str, str], list[float]] = {}  # (address, kind) -> [window start, written, counted]
        self._lock = threading.Lock()

    def take(self, address: str, kind: str = "") -> tuple[bool, str]:
        """(write this one?, a note to add to it: the count of those not written since the last one, or that the
        next ones are counted; "" for none). ``kind``: what was refused (a fixed word, never a peer's value); each
        kind of an address has its own budget."""
        if self.per_minute <= 0:
            return True, ""
        now = self.clock()
        key = (address, kind)
        what = f"{address} ({kind})" if kind else address
        with self._lock:
            entry = self._peers.get(key)
            note = ""
            if entry is None or now - entry[0] >= self.window_s:
                if entry is not None and entry[2]:
                    note = f"{int(entry[2])} more from {what} were counted, not written one by one, before this"
                if entry is None and len(self._peers) >= self.max_peers:
                    self._prune(now)
                entry = self._peers[key] = [now, 0, 0]
            if entry[1] >= self.per_minute:
                entry[2] += 1
                return False, ""
            entry[1] += 1
            if entry[1] == self.per_minute:
                note = "; ".join(x for x in (note, f"the next ones from {what} are counted, not written one by "
                                             f"one, for up to {self.window_s:g} s") if x)
            return True, note

    def _prune(self, now: float) -> None:
        self._peers = {a: e for a, e in self._peers.items() if now - e[0] < self.window_s or e[2]}
        if len(self._peers) >= self.max_peers:  # as many addresses counting at once: forget the oldest
            for a in sorted(self._peers, key=lambda k: self._peers[k][0])[:len(self._peers) // 2]:
                del self._peers[a]

    def flush(self) -> dict[str, int]:
        """The counts not written yet, by address, all kinds together (then forgotten): for one last line at the
        node's stop."""
        out: dict[str, int] = {}
        with self._lock:
            for (address, _kind), e in self._peers.items():
                if e[2]:
                    out[address] = out.get(address, 0) + int(e[2])
            self._peers.clear()
        return out
