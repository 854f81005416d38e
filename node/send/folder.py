"""Folder destination: each file copied atomically to ``path/<StudyUID>/<SeriesUID>/<SOPUID>.dcm``."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from pydicom import dcmread

from node.config import FolderDestination
from node.errors import DeliveryError
from node.store.spool import atomic_copy, valid_uid

log = logging.getLogger(__name__)


class FolderSender:
    """Sender writing into one ``FolderDestination``'s ``path``."""

    def __init__(self, dest: FolderDestination) -> None:
        self.name = dest.name
        self.root = Path(dest.path)

    def target(self, path: Path) -> Path:
        try:
            ds = dcmread(path, stop_before_pixels=True, specific_tags=[
                "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"])
        except Exception as exc:  # noqa: BLE001 - pydicom raises many types on a broken file
            raise DeliveryError(f"folder {self.name}: {path} is not a readable DICOM file: {exc}",
                                retryable=False) from exc
        uids = [str(ds.get(k, "")) for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")]
        if not all(valid_uid(u) for u in uids):
            raise DeliveryError(f"folder {self.name}: {path} lacks valid Study/Series/SOP Instance UIDs",
                                retryable=False)
        return self.root / uids[0] / uids[1] / f"{uids[2]}.dcm"

    def send(self, paths: Sequence[Path]) -> None:
        for p in paths:
            dst = self.target(Path(p))
            try:
                atomic_copy(Path(p), dst)
            except OSError as exc:
                raise DeliveryError(f"folder {self.name}: cannot write {dst}: {exc}") from exc
        log.debug("folder %s: %d file(s) written under %s", self.name, len(paths), self.root)

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DeliveryError(f"folder {self.name}: cannot create {self.root}: {exc}") from exc


def create(dest: FolderDestination) -> FolderSender:
    """The sender of kind ``FolderDestination.kind`` for ``dest`` (``node.send.base.make_sender``)."""
    return FolderSender(dest)
