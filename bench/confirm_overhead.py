"""Benchmark: what confirming a delivery costs next to sending it (``node.send.confirm``), per method.

Real peers only: one Orthanc 1.10 (DICOM, REST, DICOMweb plugin) that knows the benchmark's report listener as a
modality. For each method the same phantom series (``--slices`` instances, 64x64 CT) is sent once by the outbox's
sender, then confirmed: Storage Commitment (N-ACTION until the N-EVENT-REPORT has settled the delivery), C-FIND
count (the commitment refused: a caller Orthanc does not know), Orthanc REST count, DICOMweb QIDO-RS count. The
outbox runs in-process; its attempt is timed whole and the send alone is timed with the same sender.

    python bench/confirm_overhead.py --slices 40 --repeat 3

Figures (median seconds of ``--repeat`` runs, and confirm/send ratios measured in the same run) go to
bench/results/confirm_overhead-<UTC>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pynetdicom import AE, evt  # noqa: E402
from pynetdicom.sop_class import StorageCommitmentPushModel  # type: ignore[attr-defined]  # noqa: E402

from node.app.phantom import write_phantom_series  # noqa: E402
from node.store import DeliveryState  # noqa: E402
from tests.send.test_confirm import Harness, _cfg, put_modality  # noqa: E402
from tests.support.pacs import orthanc_dicomweb  # noqa: E402
from tests.support.peers import free_port  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=40)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="srnode-confirm-bench-"))
    orthanc = orthanc_dicomweb(tmp / "orthanc")
    port = free_port()
    put_modality(orthanc, "bench", "SRBENCH", port)
    current: list[Harness] = []
    ae = AE(ae_title="SRBENCH")
    ae.add_supported_context(StorageCommitmentPushModel, scu_role=True, scp_role=True)
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[
        (evt.EVT_N_EVENT_REPORT, lambda e: current[0].outbox.confirm.on_report(e))])
    dicom = {"name": "d", "kind": "dicom", "ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port}
    methods: dict[str, dict[str, Any]] = {
        "commitment": {**dicom, "calling_ae_title": "SRBENCH"},
        "c-find count": {**dicom, "calling_ae_title": "SRNOBODY"},
        "orthanc rest count": {"name": "d", "kind": "orthanc", "url": orthanc.url},
        "qido-rs count": {"name": "d", "kind": "dicomweb", "url": f"{orthanc.url}/dicom-web"},
        "none (dicom)": {**dicom, "confirm": "none"},
    }
    out: dict[str, Any] = {"command": " ".join(["python", *sys.argv]), "slices": args.slices,
                           "repeat": args.repeat, "machine": "shared CPU (other jobs running)", "methods": {}}
    try:
        for k, (label, dest) in enumerate(methods.items()):
            sends, totals = [], []
            for r in range(args.repeat):
                work = tmp / f"m{k}-{r}"
                files = write_phantom_series(work / "ct", slices=args.slices, size=64, seed=1000 * k + r)
                h = Harness(work, _cfg(work, dest), files)
                current[:] = [h]
                sender = h.outbox.sender("d")
                t0 = time.perf_counter()
                sender.send(files)  # the send alone (a resend of the same files is harmless)
                sends.append(time.perf_counter() - t0)
                orthanc.clear()
                d = h.job(1)
                t0 = time.perf_counter()
                h.outbox.attempt(d)
                h.wait_state(d, DeliveryState.DELIVERED, DeliveryState.UNCONFIRMED, timeout=120, interval=0.005)
                totals.append(time.perf_counter() - t0)
                got = h.now(d)
                assert got.state is DeliveryState.DELIVERED, (label, got)
                orthanc.clear()
            send_s, total_s = statistics.median(sends), statistics.median(totals)
            out["methods"][label] = {"send_s": round(send_s, 3), "send_and_confirm_s": round(total_s, 3),
                                     "confirm_s": round(total_s - send_s, 3),
                                     "confirm_over_send": round((total_s - send_s) / send_s, 3)}
            print(f"{label:20s} send {send_s:6.3f} s  send+confirm {total_s:6.3f} s  "
                  f"confirm/send {(total_s - send_s) / send_s:5.2f}", flush=True)
    finally:
        server.shutdown()
        orthanc.stop()
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"confirm_overhead-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
