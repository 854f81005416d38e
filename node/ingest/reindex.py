"""The spool files are the truth: put every instance file the index does not list (back) into the index.

Run by the node at every start (an index deleted, emptied or restored from an old backup must not hide what the
spool holds) and by ``srnode reindex``. Each file under ``instances/<Study>/<Series>/<SOP>.dcm`` whose SOP
Instance UID the index lacks is read (header only, as admission reads it) and recorded; its series goes back to
'receiving' and takes the normal way (stable → rules → job). The caller that sent it is not known any more: the
instance is recorded with the calling AE ``REINDEXED`` and no per-caller rule restriction. A file of a series the
index marks 'pruned' is a leftover of a prune killed before it removed its files (``node.store.prune``): it is
removed, not recorded (``ReindexResult.removed``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from node.errors import IngestError
from node.ingest.admit import read_header
from node.store import Index, Instance, Spool, pruned_leftover

log = logging.getLogger(__name__)

REINDEXED_CALLER = "REINDEXED"


@dataclass
class ReindexResult:
    files: int = 0  # instance files in the spool
    added: int = 0  # of them, recorded in the index now
    series: set[tuple[str, str]] = field(default_factory=set)  # (study, series) that got instances
    skipped: list[str] = field(default_factory=list)  # files left out, each with why (no patient data)
    removed: int = 0  # leftovers of an interrupted prune, removed (``node.store.prune.pruned_leftover``)


ADMITTED = 1 << 62  # bytes: read_header's size limit for instances the spool holds (accepted before; never dropped)


def reindex_spool(spool: Spool, index: Index) -> ReindexResult:
    """Record every instance file of ``spool`` that ``index`` lacks; returns what was found and done."""
    out = ReindexResult()
    known = index.indexed_sops()
    for path in spool.instance_files():
        out.files += 1
        if path.stem in known:
            continue
        try:
            # already accepted: no size limit (memory stays bounded); a deflated one is inflated in incoming/ (a
            # copy beside it, in the series folder, stayed there for good when the start was killed meanwhile)
            header = read_header(path, ADMITTED, spool.incoming)
            expected = spool.instance_path(header.study_uid, header.series_uid, header.sop_uid)
        except IngestError as exc:
            out.skipped.append(f"{path}: {exc}")
            continue
        if expected != path:
            out.skipped.append(f"{path}: its UIDs say it belongs at {expected}")
            continue
        if pruned_leftover(index, header.study_uid, header.series_uid, header.sop_uid):
            try:
                path.unlink()
                out.removed += 1
            except OSError as exc:
                out.skipped.append(f"{path}: a leftover of a prune, cannot be removed: {exc.strerror or exc}")
            continue
        inst = Instance(sop_uid=header.sop_uid, series_uid=header.series_uid, study_uid=header.study_uid,
                        sop_class=header.sop_class, transfer_syntax=header.transfer_syntax, path=str(path),
                        calling_ae=REINDEXED_CALLER, allowed_rules="")
        if index.add_instance(inst, header.modality, path.stat().st_size, header.size_hint):
            out.added += 1
            out.series.add((header.study_uid, header.series_uid))
    if out.removed:
        log.warning("reindex: removed %d instance file(s) left by an interrupted prune", out.removed)
    for why in out.skipped:
        log.warning("reindex: skipped %s", why)
    return out
