"""``srnode bench e2e``: first instance sent → last derived instance stored in Orthanc.

A real node process (cubic engine, CPU) receives a 140-slice 512² CT (the shared 1 mm phantom, or a generated
phantom of the same size when ../shared/data is absent) from dcmtk ``storescu`` and sends the derived series
to a real Orthanc started for the run (cubic has no sigma: no uncertainty object; with a sigma engine its
Parametric Map is one more result). The clock starts when storescu starts and stops when Orthanc holds every
derived instance (and, separately, every result the node delivered).

Then, in the same run and to the same Orthanc, dcmtk ``storescu`` sends the same result files again (the study
deleted first): once on one association (the reference rate) and once split over as many ``storescu`` processes
as the node has associations. Two targets (issue #15 item 2), each printed with PASS/FAIL:

- latency: last instance received (storescu done) -> last result stored in Orthanc <= ``stable_age_s`` + the
  job's processing seconds + 8 s;
- rate: the node's delivery rate (results / seconds of the delivery, from the node's log) >= 0.8 x the rate of one
  ``storescu`` association sending the same files.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from node.bench.ingest import DCMTK_ENV
from node.bench.results import write_result
from node.dicom_read import dicom_files

ROOT = Path(__file__).resolve().parents[2]
SHARED_1MM = ROOT.parent / "shared" / "data" / "ct_head_phantom_philips_1mm"
ORTHANC = "/usr/sbin/Orthanc"
STORESCU = "/usr/bin/storescu"  # dcmtk's, not pynetdicom's script of the same name
ECHOSCU = "/usr/bin/echoscu"


def configure(parser: argparse.ArgumentParser) -> None:
    """Add ``srnode bench e2e`` options to ``parser``."""
    parser.add_argument("--series", default="", help="folder of the input series (default: the shared 1 mm "
                                                      "phantom, or a generated 140x512x512 phantom)")
    parser.add_argument("--stable-age", type=float, default=2.0, help="[node].stable_age_s for the run (s)")
    parser.add_argument("--factor", type=int, default=2, help="through-plane factor")
    parser.add_argument("--timeout", type=float, default=1800.0, help="give up after this many seconds")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs, spool)")
    parser.add_argument("--associations", type=int, default=4,
                        help="the node's C-STORE associations to Orthanc ([[destinations]] associations)")


LATENCY_SLACK_S = 8.0  # issue #15 item 2: last received -> last stored <= stable_age + processing + 8 s
RATE_RATIO = 0.8  # issue #15 item 2: node delivery rate >= 0.8 x one storescu association's
# the outbox's line once the destination accepted every file ("accepted" while a commitment report is awaited,
# "delivered" when the delivery settled at once), and its line once the destination confirmed them
DELIVERED = re.compile(r"job (\d+) -> pacs: (\d+) file\(s\) (?:delivered|accepted) in ([0-9.]+) s")
CONFIRMED = re.compile(r"job (\d+) -> pacs: (\d+) file\(s\) delivered(?: in [0-9.]+ s)?, ([^\n]*)")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(cond: Any, timeout: float, what: str, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            v = cond()
            if v:
                return v
        except (httpx.HTTPError, OSError):
            pass
        time.sleep(interval)
    raise TimeoutError(f"bench e2e: timed out after {timeout:.0f} s waiting for {what}")


def _toml(cfg: dict[str, Any]) -> str:
    out = []
    for section, body in cfg.items():
        if isinstance(body, list):
            for item in body:
                out.append(f"[[{section}]]")
                out += [f"{k} = {json.dumps(v)}" if not isinstance(v, dict) else
                        f"{k} = {{ {', '.join(f'{a} = {json.dumps(b)}' for a, b in v.items())} }}"
                        for k, v in item.items()]
        else:
            out.append(f"[{section}]")
            out += [f"{k} = {json.dumps(v)}" for k, v in body.items()]
    return "\n".join(out) + "\n"


def _series_files(args: argparse.Namespace, work: Path) -> tuple[list[Path], str]:
    if args.series:
        return dicom_files(Path(args.series)), args.series
    if SHARED_1MM.is_dir():
        return sorted(SHARED_1MM.glob("*.dcm")), "shared ct_head_phantom_philips_1mm"
    from node.app.phantom import write_phantom_series

    return write_phantom_series(work / "phantom", slices=140, size=512, step_mm=1.0), "generated phantom 140x512"


def _storescu_rates(url: str, study: str, dicom_port: int, results: list[Path], associations: int,
                    counts: Any) -> dict[str, float]:
    """dcmtk ``storescu`` sending ``results`` to the same Orthanc, its copy of ``study`` deleted before each try:
    on one association, then split over ``associations`` storescu processes. Rates in instances/s; RuntimeError
    when storescu fails, TimeoutError when Orthanc does not hold them all afterwards."""
    out: dict[str, float] = {"storescu_files": len(results)}
    for n in (1, associations):
        for sid in httpx.post(f"{url}/tools/lookup", content=study, timeout=30).json():
            httpx.delete(f"{url}/studies/{sid['ID']}", timeout=120).raise_for_status()
        t = time.monotonic()
        procs = [subprocess.Popen([STORESCU, "-aec", "ORTHANC", "-aet", "BENCH", "127.0.0.1", str(dicom_port),
                                   *map(str, results[i::n])], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  env=DCMTK_ENV)
                 for i in range(n)]
        if any(p.wait() != 0 for p in procs):
            raise RuntimeError("storescu of the result files to Orthanc failed")
        seconds = time.monotonic() - t
        _wait(lambda: sum(counts().values()) >= len(results), 60, "storescu's files in Orthanc")
        out[f"storescu_{n}_assoc_s"] = round(seconds, 2)
        out[f"storescu_{n}_assoc_inst_per_s"] = round(len(results) / seconds, 1)
    return out


def run(args: argparse.Namespace) -> int:
    """Run ``srnode bench e2e``; returns the exit code. TimeoutError when Orthanc, the node or the results do
    not appear in time; RuntimeError when storescu fails."""
    import logging

    from pydicom import dcmread

    from node.app.progress import bar_of

    logging.getLogger("httpx").setLevel(logging.WARNING)

    work = Path(tempfile.mkdtemp(prefix="srnode-bench-e2e-"))
    procs: list[subprocess.Popen[bytes]] = []
    bar = bar_of(args)
    bar.stage("starting Orthanc", 5)
    try:
        files, source = _series_files(args, work)
        study = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        n_out = (len(files) - 1) * args.factor + 1
        # Orthanc, the PACS
        o_http, o_dicom, port = _port(), _port(), _port()
        (work / "orthanc").mkdir()
        (work / "orthanc.json").write_text(json.dumps({
            "Name": "bench", "StorageDirectory": str(work / "orthanc"), "IndexDirectory": str(work / "orthanc"),
            "HttpPort": o_http, "DicomPort": o_dicom, "DicomAet": "ORTHANC", "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False, "DicomCheckCalledAet": False, "DicomAlwaysAllowStore": True,
            # the node as a known modality, as a PACS administrator sets it up: Storage Commitment reports go to it
            "DicomModalities": {"srnode": ["SRNODE", "127.0.0.1", port]}, "Plugins": []}))
        with (work / "orthanc.log").open("wb") as lf:
            procs.append(subprocess.Popen([ORTHANC, str(work / "orthanc.json")], stdout=lf, stderr=lf,
                                          env=DCMTK_ENV))
        url = f"http://127.0.0.1:{o_http}"
        _wait(lambda: httpx.get(f"{url}/system", timeout=2).status_code == 200, 60, "Orthanc")
        # the node
        bar.stage("starting srnode")
        cfg = {"node": {"port": port, "spool_dir": str(work / "spool"), "stable_age_s": args.stable_age,
                        "min_free_mb": 1},
               "engine": {"name": "cubic", "device": "cpu"}, "http": {"enabled": False},
               "destinations": [{"name": "pacs", "kind": "dicom", "ae_title": "ORTHANC", "host": "127.0.0.1",
                                 "port": o_dicom, "associations": args.associations}],
               "rules": [{"name": "bench", "match": {"Modality": ".*"}, "through_plane_factor": args.factor,
                          "destinations": ["pacs"]}]}
        (work / "config.toml").write_text(_toml(cfg))
        with (work / "node.log").open("wb") as lf:
            procs.append(subprocess.Popen([sys.executable, "-m", "node.app.cli", "serve", "--config",
                                           str(work / "config.toml")], cwd=ROOT, stdout=lf, stderr=lf,
                                          env={**os.environ, "PYTHONUNBUFFERED": "1"}))
        _wait(lambda: subprocess.run([ECHOSCU, "-aec", "SRNODE", "127.0.0.1", str(port)],
                                     capture_output=True).returncode == 0, 300, "the node")

        def counts() -> dict[str, int]:
            r = httpx.post(f"{url}/tools/find", json={"Level": "Series", "Expand": True,
                                                      "Query": {"StudyInstanceUID": study}}, timeout=10)
            return {s["MainDicomTags"].get("Modality", ""): len(s["Instances"]) for s in r.json()}

        print(f"bench e2e: {len(files)} slices from {source} -> srnode (cubic, CPU, x{args.factor}) -> Orthanc")
        bar.stage("sending")
        t0 = time.monotonic()
        sent = subprocess.run([STORESCU, "-aec", "SRNODE", "-aet", "BENCH", "127.0.0.1", str(port),
                               *map(str, files)], capture_output=True, text=True, env=DCMTK_ENV)
        t_sent = time.monotonic() - t0
        if sent.returncode != 0:
            raise RuntimeError(f"storescu failed: {sent.stderr[-500:]}")
        marks: dict[str, float] = {}
        delivered: dict[str, float] = {}
        confirmation: list[str] = []
        node_log = work / "node.log"
        bar.stage("waiting for the derived series in Orthanc")

        def done() -> bool:
            c = counts()
            for modality, key in (("CT", "derived"), ("OT", "uncertainty")):
                if key not in marks and c.get(modality, 0) >= n_out:
                    marks[key] = time.monotonic() - t0
            if "all" not in marks:
                m = DELIVERED.search(node_log.read_text(errors="replace"))
                if m and sum(c.values()) >= int(m.group(2)):
                    marks["all"] = time.monotonic() - t0
                    delivered.update(files=int(m.group(2)), seconds=float(m.group(3)))
            if "confirmed" not in marks:
                m = CONFIRMED.search(node_log.read_text(errors="replace"))
                if m:
                    marks["confirmed"] = time.monotonic() - t0
                    confirmation.append(m.group(3))
            return "derived" in marks and "all" in marks and "confirmed" in marks

        _wait(done, args.timeout, "the derived series and every delivered result in Orthanc", interval=0.25)
        status = subprocess.run([sys.executable, "-m", "node.app.cli", "status", "--json", "--config",
                                 str(work / "config.toml")], cwd=ROOT, capture_output=True, text=True)
        job = json.loads(status.stdout)["jobs"][-1] if status.returncode == 0 else {}
        processing_s = float((job.get("report") or {}).get("seconds") or 0.0)
        results = sorted((work / "spool" / "outbox").rglob("*.dcm"))
        bar.stage("storescu sending the same results")
        reference = _storescu_rates(url, study, o_dicom, results, args.associations, counts)
        latency = marks["all"] - t_sent
        budget = args.stable_age + processing_s + LATENCY_SLACK_S
        node_rate = delivered["files"] / max(delivered["seconds"], 1e-3)
        ratio = node_rate / reference["storescu_1_assoc_inst_per_s"]
        figures = {
            "input": source, "slices_in": len(files), "matrix": "512x512", "slices_out": n_out,
            "engine": "cubic", "device": "cpu", "factor": args.factor, "stable_age_s": args.stable_age,
            "associations": args.associations,
            "send_s": round(t_sent, 2),
            "first_sent_to_last_derived_in_orthanc_s": round(marks["derived"], 2),
            "first_sent_to_last_uncertainty_in_orthanc_s": round(marks["uncertainty"], 2)
            if "uncertainty" in marks else None,
            "first_sent_to_last_result_in_orthanc_s": round(marks["all"], 2),
            "job_processing_s": (job.get("report") or {}).get("seconds"),
            "results_delivered": delivered["files"], "node_delivery_s": delivered["seconds"],
            "node_delivery_inst_per_s": round(node_rate, 1),
            **reference,
            "last_received_to_last_stored_s": round(latency, 2),
            "last_received_to_delivery_confirmed_s": round(marks["confirmed"] - t_sent, 2),
            "confirmation": confirmation[0] if confirmation else "",
            "target_latency_budget_s": round(budget, 2),
            "target_latency_pass": latency <= budget,
            "rate_ratio_vs_storescu": round(ratio, 2),
            "target_rate_ratio": RATE_RATIO,
            "target_rate_pass": ratio >= RATE_RATIO,
            "cpu_count": os.cpu_count(), "load_average": os.getloadavg(),
        }
        out = write_result("e2e", figures)
        for k, v in figures.items():
            print(f"  {k}: {v}")
        print(f"target latency: last received -> last stored {latency:.1f} s <= stable_age {args.stable_age:g} + "
              f"processing {processing_s:.1f} + {LATENCY_SLACK_S:g} = {budget:.1f} s: "
              f"{'PASS' if latency <= budget else 'FAIL'}")
        print(f"target rate: node {node_rate:.1f} inst/s vs storescu {reference['storescu_1_assoc_inst_per_s']:.1f} "
              f"inst/s = {ratio:.2f} >= {RATE_RATIO}: {'PASS' if ratio >= RATE_RATIO else 'FAIL'}")
        print(f"wrote {out}")
        return 0
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(60)
                except subprocess.TimeoutExpired:
                    p.kill()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"work folder kept: {work}")
