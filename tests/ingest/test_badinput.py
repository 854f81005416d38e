"""The bad-input corpus against the real node process: each file gets a clear status or a recorded reason,
nothing crashes, and a good series sent alongside still reaches its destination.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from pydicom.filereader import read_file_meta_info
from pynetdicom import AE

from tests.ingest import make_corpus
from tests.support.nodeproc import NodeProc
from tests.support.peers import storescu

DONE = ("delivered", "failed", "dead-letter", "ignored", "superseded")
# bad series whose every value can still be honoured exactly (per-slice rescale / signedness): processing is right
MAY_BE_PROCESSED = {"series_mixed_signedness", "series_mixed_rescale", "len_pixel_past_eof"}
UNEXPECTED = 0x0110  # the SCP's "processing failure": an exception it did not foresee



def send_raw(port: int, paths: list[Path], aet: str = "SRNODE") -> list[str]:
    """One association; per file the C-STORE status as '0xNNNN', or why nothing could be sent."""
    ae = AE(ae_title="CORPUS")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    metas = []
    for p in paths:
        meta = read_file_meta_info(p)
        metas.append(meta)
        ae.add_requested_context(str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID))
    assoc = ae.associate("127.0.0.1", port, ae_title=aet)
    if not assoc.is_established:
        return ["association " + ("rejected" if assoc.is_rejected else "not established (no acceptable context)")] * len(paths)
    out: list[str] = []
    try:
        for p in paths:
            try:
                rsp = assoc.send_c_store(p)
            except ValueError as exc:  # no accepted presentation context for the file's transfer syntax
                out.append(f"context rejected ({str(exc)[:60]})")
                continue
            out.append(f"0x{int(rsp.Status):04X}" if rsp is not None and "Status" in rsp else "no response")
    finally:
        if assoc.is_established:
            assoc.release()
    return out


def test_corpus_gets_statuses_or_reasons_and_good_series_flows(tmp_path: Path, raw_send: None) -> None:
    corpus = tmp_path / "corpus"
    cases = make_corpus.make_corpus(corpus)
    good = make_corpus.good_series(tmp_path / "good")
    assert sum(len(c.files) for c in cases) >= 50
    with NodeProc.start(tmp_path / "node", {"rules": [
            {"name": "ct", "match": {"Modality": "^(CT|MR)$"}, "through_plane_factor": 2, "destinations": ["out"]}]}
                        ) as node:
        # the good series goes in beside the corpus, from another association at the same time
        good_result: dict[str, Any] = {}
        sender = threading.Thread(target=lambda: good_result.update(
            r=storescu([tmp_path / "good" / f for f in good.files], node.port, calling="GOODCT")))
        sender.start()
        statuses: dict[str, list[str]] = {}
        for c in cases:
            statuses[c.name] = send_raw(node.port, [corpus / f for f in c.files])
        sender.join(120)
        assert good_result["r"].returncode == 0, good_result["r"].stderr

        accepted = {c.name for c in cases if "0x0000" in statuses[c.name]}
        wanted = {c.series_uid for c in cases if c.name in accepted} | {good.series_uid}
        jobs = node.wait_jobs(
            lambda js: wanted <= {j["series"] for j in js if j["state"] in DONE},
            timeout=180, what="a final state for every accepted series and the good one")
        assert node.proc is not None and node.proc.poll() is None, "the node died"
        log = node.log()
        out_files = list((tmp_path / "node" / "out").rglob("*.dcm"))

    by_series = {j["series"]: j for j in jobs}
    table = []
    for c in cases:
        j = by_series.get(c.series_uid)
        outcome = f"{j['state']}: {j['reason']}" if j else "not indexed"
        table.append(f"{c.name:28s} {','.join(sorted(set(statuses[c.name]))):28s} {outcome[:110]}")
    print("\n" + "\n".join(table))
    (tmp_path / "badinput-table.txt").write_text("\n".join(table) + "\n")

    problems = []
    for c in cases:
        st = statuses[c.name]
        if any(s.startswith("0x") and int(s, 16) == UNEXPECTED for s in st) or "no response" in st:
            problems.append(f"{c.name}: unforeseen failure in the SCP ({st})")
        if c.expect == "refuse" and "0x0000" in st:
            problems.append(f"{c.name}: should have been refused, got {st}")
        if c.name in accepted:
            j = by_series[c.series_uid]
            if j["state"] == "delivered" and c.name not in MAY_BE_PROCESSED:
                problems.append(f"{c.name} ({c.why}): processed and delivered instead of refused with a reason")
            if j["state"] != "delivered" and not j["reason"].strip():
                problems.append(f"{c.name}: state {j['state']} without a reason")
    assert not problems, "\n".join(problems) + "\n" + json.dumps(statuses, indent=1)
    # the node's own "this should not happen" paths (pydicom's decoders log their tracebacks themselves)
    for marker in ("unexpected error", "internal error", "stability watcher:", "Exception in thread"):
        assert marker not in log, log[max(0, log.index(marker) - 500):][:4000]
    # the good series: delivered, (8 - 1) * 2 + 1 derived slices in the destination
    assert by_series[good.series_uid]["state"] == "delivered", by_series[good.series_uid]
    assert len(out_files) >= 15, [p.name for p in out_files]
