"""Follow an Orthanc ``/changes`` feed: every StableSeries of a ``[[sources]]`` entry with ``follow_changes = true``
is pulled over Orthanc's REST API and admitted like any received series (never srnode's own output), once all of it
was read (staged in the spool's ``incoming/``: a pull cut mid-way admits none of it). A series pulled whole,
nothing refused, declares its size (``Admission.declare``): it completes without the quiet period.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import re
import threading
from pathlib import Path

import httpx
import pydicom
from pydicom.dataset import Dataset

from node.config import Config, OrthancSource
from node.errors import NodeError
from node.ingest.admit import Admission
from node.ingest.pull import (
    FetchError,
    Staging,
    orthanc_call,
    orthanc_client,
    orthanc_series_files,
    source_caller,
    stage_all,
)
from node.own import is_srnode_description, own_output_marker
from node.store import atomic_write

log = logging.getLogger(__name__)

_ORTHANC_ID = re.compile(r"[0-9A-Za-z-]{1,100}")  # Orthanc's ids (a SHA-1 in dashed groups): one URL path segment


def is_own_output(ds: Dataset, suffix: str) -> bool:
    """srnode's derived / uncertainty output (never pulled back in): any of its markers (``node.own``), its
    SeriesDescription; and, in this follower, every DERIVED image (as the Orthanc plugin does)."""
    if "DERIVED" in [str(v).upper() for v in (ds.get("ImageType") or [])]:
        return True
    if is_srnode_description(str(ds.get("SeriesDescription", "") or ""), suffix):
        return True
    return bool(own_output_marker(ds))


class ChangesFollower:
    """Follow an Orthanc ``/changes`` feed; every StableSeries is pulled over REST into the spool.

    The last change seen is kept in ``<spool>/changes-<source>.json`` so a restart neither misses nor repeats.
    """

    def __init__(self, cfg: Config, src: OrthancSource, admission: Admission) -> None:
        self.cfg, self.src, self.admission = cfg, src, admission
        self.caller = source_caller(src, "orthanc-changes")
        self.state_path = Path(cfg.node.spool_dir) / f"changes-{src.name}.json"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"changes-{src.name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _since(self, client: httpx.Client) -> int:
        try:
            return int(json.loads(self.state_path.read_text())["since"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            if not isinstance(exc, FileNotFoundError):  # not a first start: changes since the lost position are
                log.warning("changes follower %s: %s cannot be read (%s): reading the feed from its end; series "
                            "that became stable since the last position saved may not be pulled (pull them with "
                            "srnode fetch)", self.src.name, self.state_path, type(exc).__name__)
            # first start: begin at the end of the feed (do not pull the whole archive)
            last = orthanc_call(self.src, "changes", lambda: client.get("/changes", params={"last": ""})).json()
            end = last.get("Last") if isinstance(last, dict) else None
            if not isinstance(end, int) or isinstance(end, bool):  # never 0: that is the whole archive
                raise ValueError("GET /changes?last answered without its 'Last' (an integer): where the feed ends "
                                 "is unknown, nothing is pulled") from None
            return end

    def _save(self, since: int) -> None:
        """Keep ``since`` in the state file, atomically and durably (a power cut leaves the old or the new)."""
        atomic_write(self.state_path, json.dumps({"since": since}).encode())

    def _loop(self) -> None:
        since: int | None = None
        with orthanc_client(self.src) as client:
            while not self._stop.is_set():
                try:
                    if since is None:
                        since = self._since(client)
                    params = {"since": since, "limit": 100}
                    page = orthanc_call(self.src, "changes", lambda p=params: client.get(  # type: ignore[misc]
                        "/changes", params=p)).json()
                    if not isinstance(page, dict):
                        raise ValueError(f"GET /changes answered JSON that is not Orthanc's ({type(page).__name__})")
                    changes = page.get("Changes", [])
                    if not isinstance(changes, list):
                        raise ValueError(f"GET /changes answered 'Changes' that is not a list "
                                         f"({type(changes).__name__})")
                    for pos, change in enumerate(changes):
                        seq = self._change(client, change, pos, since)
                        if seq is not None and seq > since:
                            since = seq
                            self._save(since)
                    last = page.get("Last")  # past a last change without its Seq: never read (nor said_nothing) again
                    if isinstance(last, int) and not isinstance(last, bool) and changes and last > since:
                        since = last
                        self._save(since)
                    if page.get("Done", True):
                        self._stop.wait(self.src.poll_s)
                except (NodeError, OSError, ValueError) as exc:
                    log.warning("changes follower %s: %s; retrying in %.0f s", self.src.name, exc,
                                self.src.poll_s)
                    self._stop.wait(self.src.poll_s)
                except Exception as exc:  # noqa: BLE001 - whatever a source's answer makes fail (a change that
                    # is not an object, a file pydicom cannot read): the follower goes on; it ended the thread
                    log.warning("changes follower %s: %s: %s; retrying in %.0f s", self.src.name, type(exc).__name__,
                                str(exc)[:200], self.src.poll_s)
                    self._stop.wait(self.src.poll_s)

    def _change(self, client: httpx.Client, change: object, pos: int, since: int) -> int | None:
        """Act on one change of the feed (pull a StableSeries); returns its Seq, None when it has none usable.
        A malformed change (not an object, no integer Seq, a StableSeries without a string ID) is skipped with
        one warning naming its position, and whether a series may be lost by it: the feed goes on (it blocked
        there, a warning every poll_s). Raises what a pull raises (the change is read again next round)."""
        seq = change.get("Seq") if isinstance(change, dict) else None
        seq_ok = isinstance(seq, int) and not isinstance(seq, bool)
        where = f"change Seq {seq}" if seq_ok else f"change {pos + 1} of the page read after Seq {since}"
        if not isinstance(change, dict):
            log.warning("changes follower %s: %s is not an object (%s): skipped; had it told of a series becoming "
                        "stable, that series is not pulled (pull it with srnode fetch)", self.src.name, where,
                        type(change).__name__)
            return None
        kind, series_id = change.get("ChangeType"), change.get("ID")
        id_ok = isinstance(series_id, str) and bool(_ORTHANC_ID.fullmatch(series_id))
        said_nothing = kind != "StableSeries" and isinstance(kind, str) or kind == "StableSeries" and id_ok
        if kind == "StableSeries" and not id_ok:
            log.warning("changes follower %s: %s, a StableSeries, has no usable ID (%s): skipped; that series is "
                        "not pulled (pull it with srnode fetch)", self.src.name, where, type(series_id).__name__)
        elif not isinstance(kind, str):
            log.warning("changes follower %s: %s has no ChangeType (%s): skipped; had it told of a series becoming "
                        "stable, that series is not pulled (pull it with srnode fetch)", self.src.name, where,
                        type(kind).__name__)
        elif kind == "StableSeries":
            self._pull(client, str(series_id))
        if not seq_ok:
            if said_nothing:  # one warning a change
                log.warning("changes follower %s: %s has no integer Seq (%s): %s; the feed goes on from the next",
                            self.src.name, where, type(seq).__name__,
                            "its series pulled" if kind == "StableSeries" else "skipped")
            return None
        return int(seq)  # type: ignore[arg-type]

    def _pull(self, client: httpx.Client, series_id: str) -> None:
        files = orthanc_series_files(client, self.src, series_id)
        first = next(files, None)
        if first is None:
            return
        head = pydicom.dcmread(io.BytesIO(first), stop_before_pixels=True)
        if is_own_output(head, self.cfg.derive.series_description_suffix):
            log.info("changes follower %s: series %s is srnode output, left alone", self.src.name, series_id)
            return
        refused: list[str] = []
        # the whole series is read first, staged in the spool's incoming/ (one instance in memory at a time): a
        # pull cut mid-way admits none of it, so no job is made from part of it (the one staging path of pulls)
        with Staging(self.admission, self.caller) as stage:
            stage_all(stage, itertools.chain((first,), files),
                       f"changes follower {self.src.name}: Orthanc series {series_id}")
            n = stage.admit(refused)
        for why in refused:
            log.warning("changes follower %s: Orthanc series %s: %s", self.src.name, series_id, why)
        if stage.cut_short:  # stored in part (a commit failed part-way): pulled again, the feed position kept
            raise FetchError(f"Orthanc series {series_id}: stored in part (series {', '.join(stage.cut_short)}); "
                             "pulled again next round")
        log.info("changes follower %s: series %s pulled, %d instance(s)", self.src.name, series_id, n)
        if n and not refused:  # Orthanc's whole stable series is in: its size is known
            self.admission.declare(str(head.StudyInstanceUID), str(head.SeriesInstanceUID), n,
                                   f"orthanc-changes from {self.src.name}")


def start_followers(cfg: Config, admission: Admission) -> list[ChangesFollower]:
    """Start a follower for every ``kind = "orthanc"`` source with ``follow_changes = true``."""
    out = []
    for src in cfg.sources:
        if isinstance(src, OrthancSource) and src.follow_changes:
            f = ChangesFollower(cfg, src, admission)
            f.start()
            out.append(f)
    return out


