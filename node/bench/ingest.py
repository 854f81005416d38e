"""``srnode bench ingest``: C-STORE ingest throughput of the node against dcmtk ``storescp`` and Orthanc, same run.

Two workloads, each sent with dcmtk ``storescu`` (one process per association) to three servers one after the
other, in the same run (the machine may be shared: only ratios from one run are compared):

- concurrent: ``--senders`` associations at once (default 16), ``--instances`` CT slices of ``--size``² each
  (default 100 of 256²), a series per sender;
- one association: ``--small-instances`` slices of ``--small-size``² (default 5000 of 64²) in ONE association.

The servers: a real ``srnode serve`` (its C-STORE answers Success only once the file and its index row are on
disk: ``node.ingest.commit``), ``/usr/bin/storescp --fork`` (one process per association, writing files, no
fsync at all: the reference a PACS administrator knows) and Orthanc 1.10.1 with its defaults for storage
(``SyncStorageArea`` true: an fsync after each file written, the default since Orthanc 1.7.4; its index in
SQLite). Figures: instances/s for each, the ratios srnode/storescp and srnode/Orthanc, every status Success,
every instance indexed by the node (and stored by the others), the node's and Orthanc's peak RSS (VmHWM, MiB).
The node is configured with a long stable_age_s so that no processing competes with ingest.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

STORESCU = "/usr/bin/storescu"
STORESCP = "/usr/bin/storescp"
ORTHANC = "/usr/sbin/Orthanc"
ECHOSCU = "/usr/bin/echoscu"
UID_ROOT = "1.2.826.0.1.3680043.10.1087.98."  # UIDs of the synthetic benchmark series
# dcmtk 3.6.7 (storescu, storescp, Orthanc's DICOM layer) leaves Nagle's algorithm on unless the environment sets
# TCP_NODELAY: a sender then waits ~40 ms per instance for a delayed ACK (measured: storescu -> storescp, 200
# instances of 64², 8.8 s with Nagle, 0.14 s without). Every dcmtk process of the benchmarks runs without it, as
# the node does (node.dimse.no_delay), so that the figures measure the servers, not the TCP timers.
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
CT_IMAGE = UID("1.2.840.10008.5.1.4.1.1.2")  # CT Image Storage (PS3.4 B.5)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (another process may take it before it is used)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_series(folder: Path, sender: int, n: int, size: int, tag: str = "") -> list[Path]:
    """``n`` CT slices of ``size``² (one series per sender, synthetic, no patient data); ``tag`` makes the UIDs
    of another workload distinct."""
    folder.mkdir(parents=True, exist_ok=True)
    study = generate_uid(UID_ROOT, [f"bench-study-{tag}{sender}"])
    series = generate_uid(UID_ROOT, [f"bench-series-{tag}{sender}"])
    frame = generate_uid(UID_ROOT, [f"bench-frame-{tag}{sender}"])
    rng = np.random.default_rng(sender)
    pixels = rng.integers(-1000, 1500, size=(size, size), dtype=np.int16).tobytes()
    out = []
    for k in range(n):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = CT_IMAGE
        sop = generate_uid(UID_ROOT, [f"bench-{tag}{sender}-{k}"])
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        # SOP Common / Patient / Study / Series
        ds.SOPClassUID, ds.SOPInstanceUID = CT_IMAGE, sop
        ds.PatientName, ds.PatientID = "BENCH^INGEST", "BENCH"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = study, series, "CT"
        ds.SeriesNumber, ds.InstanceNumber = 1, k + 1
        # Image Plane / Image Pixel
        ds.ImagePositionPatient = [0.0, 0.0, float(k)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.FrameOfReferenceUID = frame
        ds.PixelSpacing, ds.SliceThickness = [0.5, 0.5], 1.0
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows = ds.Columns = size
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        ds.PixelData = pixels
        p = folder / f"{k:05d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        out.append(p)
    return out


def send_concurrently(port: int, batches: list[list[Path]], aet: str, timeout: float = 600) -> dict[str, Any]:
    """One storescu process per batch, all at once; wall seconds from the first start to the last exit."""
    t0 = time.monotonic()
    procs = [subprocess.Popen([STORESCU, "-aec", aet, "-aet", f"BENCH{i:02d}", "127.0.0.1", str(port),
                               *map(str, files)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env=DCMTK_ENV)
             for i, files in enumerate(batches)]
    outputs = [p.communicate(timeout=timeout)[0].decode(errors="replace") for p in procs]
    seconds = time.monotonic() - t0
    failed = [f"sender {i}: rc {p.returncode}: {out[-300:]}" for i, (p, out) in enumerate(zip(procs, outputs, strict=True))
              if p.returncode != 0]
    return {"seconds": seconds, "failed": failed, "instances": sum(len(b) for b in batches)}


def wait_echo(port: int, aet: str, timeout: float = 60) -> None:
    """Until dcmtk ``echoscu`` gets a C-ECHO answer from ``aet`` on 127.0.0.1:``port``; RuntimeError after
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = subprocess.run([ECHOSCU, "-aec", aet, "-to", "2", "127.0.0.1", str(port)], capture_output=True)
        if r.returncode == 0:
            return
        time.sleep(0.2)
    raise RuntimeError(f"no C-ECHO answer on port {port} within {timeout:.0f} s")


def peak_rss_mb(pid: int) -> float:
    """VmHWM (peak resident set) of a live process, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def node_config(workdir: Path, port: int, receive_path: str = "") -> str:
    """config.toml text for the node under test: SCP on 127.0.0.1:``port``, spool in ``workdir``, stable_age_s
    3600 s (no processing during the run), no per-address association limit (every sender is local), HTTP off,
    cubic engine on CPU; ``receive_path``: ``[node]
    receive_path`` ("": the default)."""
    spool = workdir / "spool"
    path = f'receive_path = "{receive_path}"\n' if receive_path else ""
    return (f'[node]\nae_title = "SRNODE"\nhost = "127.0.0.1"\nport = {port}\nspool_dir = "{spool}"\n'
            f"stable_age_s = 3600.0\nmin_free_mb = 1\nmax_associations = 32\n"
            # every sender is on 127.0.0.1: --senders above the per-address default (16) must not be refused
            f"max_associations_per_address = 0\n{path}\n[http]\nenabled = false\n\n"
            f'[engine]\nname = "cubic"\ndevice = "cpu"\n')


def _stop(proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_node(workdir: Path, workloads: dict[str, list[list[Path]]],
             receive_path: str = "") -> dict[str, dict[str, Any]]:
    """Start ``srnode serve``, send each workload (its batches concurrently), stop it (SIGTERM); per workload the
    send figures, the node's peak RSS so far and the instances indexed in all (-1 when ``srnode status``
    failed)."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    cfg = workdir / "config.toml"
    cfg.write_text(node_config(workdir, port, receive_path))
    with (workdir / "node.log").open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "node.app.cli", "serve", "--config", str(cfg)],
                                stdout=log, stderr=subprocess.STDOUT)
    out: dict[str, dict[str, Any]] = {}
    try:
        wait_echo(port, "SRNODE")
        rss_idle = peak_rss_mb(proc.pid)
        for name, batches in workloads.items():
            res = send_concurrently(port, batches, "SRNODE")
            res["peak_rss_mb"] = peak_rss_mb(proc.pid)
            res["rss_after_start_mb"] = rss_idle
            status = subprocess.run([sys.executable, "-m", "node.app.cli", "status", "--json", "--config",
                                     str(cfg)], capture_output=True, text=True, timeout=120)
            res["stored"] = int(json.loads(status.stdout)["instances"]) if status.returncode == 0 else -1
            out[name] = res
    finally:
        _stop(proc)
    return out


def run_storescp(workdir: Path, workloads: dict[str, list[list[Path]]]) -> dict[str, dict[str, Any]]:
    """Start dcmtk ``storescp --fork`` writing to ``workdir/storescp``, send each workload concurrently; per
    workload the send figures plus the number of files stored in all."""
    port, folder = free_port(), workdir / "storescp"
    folder.mkdir(parents=True)
    proc = subprocess.Popen([STORESCP, "--fork", "-aet", "STORESCP", "-od", str(folder), str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=DCMTK_ENV)
    out: dict[str, dict[str, Any]] = {}
    try:
        wait_echo(port, "STORESCP")
        for name, batches in workloads.items():
            res = send_concurrently(port, batches, "STORESCP")
            res["stored"] = sum(1 for _ in folder.iterdir())
            out[name] = res
    finally:
        proc.terminate()
        proc.wait(30)
    return out


def orthanc_config(workdir: Path, dicom_port: int, http_port: int) -> dict[str, Any]:
    """Orthanc's configuration for the run: storage and SQLite index in ``workdir/db``, any caller may store,
    ports given; everything else (``SyncStorageArea`` true, ``DicomThreadsCount`` 4, no compression) left at
    Orthanc 1.10.1's defaults."""
    return {"Name": "bench-ingest", "StorageDirectory": str(workdir / "db"), "IndexDirectory": str(workdir / "db"),
            "HttpPort": http_port, "DicomPort": dicom_port, "DicomAet": "ORTHANC", "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False, "DicomCheckCalledAet": False, "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True, "StableAge": 3600, "SaveJobs": False, "Plugins": []}


def _orthanc_count(url: str) -> int:
    with urllib.request.urlopen(f"{url}/statistics", timeout=30) as r:
        return int(json.loads(r.read())["CountInstances"])


def run_orthanc(workdir: Path, workloads: dict[str, list[list[Path]]]) -> dict[str, dict[str, Any]]:
    """Start Orthanc (``orthanc_config``), send each workload concurrently; per workload the send figures, the
    instances Orthanc holds in all and its peak RSS so far (MiB)."""
    workdir.mkdir(parents=True, exist_ok=True)
    dicom_port, http_port = free_port(), free_port()
    cfg = workdir / "orthanc.json"
    cfg.write_text(json.dumps(orthanc_config(workdir, dicom_port, http_port), indent=2))
    with (workdir / "orthanc.log").open("wb") as log:
        proc = subprocess.Popen([ORTHANC, str(cfg)], stdout=log, stderr=subprocess.STDOUT, cwd=workdir,
                                env=DCMTK_ENV)
    out: dict[str, dict[str, Any]] = {}
    try:
        wait_echo(dicom_port, "ORTHANC")
        for name, batches in workloads.items():
            res = send_concurrently(dicom_port, batches, "ORTHANC")
            res["stored"] = _orthanc_count(f"http://127.0.0.1:{http_port}")
            res["peak_rss_mb"] = peak_rss_mb(proc.pid)
            out[name] = res
    finally:
        _stop(proc)
    return out


def configure(parser: argparse.ArgumentParser) -> None:
    """Add ``srnode bench ingest`` options to ``parser``."""
    parser.add_argument("--senders", type=int, default=16, help="concurrent associations (default 16)")
    parser.add_argument("--instances", type=int, default=100, help="instances per association (default 100)")
    parser.add_argument("--size", type=int, default=256, help="rows = columns of each instance (default 256)")
    parser.add_argument("--small-instances", type=int, default=5000,
                        help="instances of the one-association workload (default 5000; 0: skip it)")
    parser.add_argument("--small-size", type=int, default=64,
                        help="rows = columns of the one-association workload's instances (default 64)")
    parser.add_argument("--no-orthanc", action="store_true", help="leave Orthanc out (it is needed otherwise)")
    parser.add_argument("--receive-path", default="", choices=["", "lean", "pynetdicom"],
                        help="the node's [node] receive_path (default: the node's default)")
    parser.add_argument("--workdir", default="", help="keep files here (default: a temporary folder)")


def _figures(res: dict[str, Any], expected: int) -> dict[str, Any]:
    out = {"instances_per_s": round(res["instances"] / res["seconds"], 1), "seconds": round(res["seconds"], 2),
           "failed_senders": res["failed"], "stored": res["stored"], "all_stored": res["stored"] >= expected}
    for k in ("peak_rss_mb", "rss_after_start_mb"):
        if k in res:
            out[k] = round(res[k], 1)
    return out


def measure(senders: int, instances: int, size: int, workdir: Path, small_instances: int = 0,
            small_size: int = 64, orthanc: bool = True,
            stage: Callable[[str], None] = lambda _name: None, receive_path: str = "") -> dict[str, Any]:
    """Write the workloads, send them to the node, storescp and (``orthanc``) Orthanc in that order; per workload
    and server the figures (instances/s, seconds, stored), the ratios srnode/storescp and srnode/Orthanc, MB
    (2^20 bytes) sent and the peak RSS (MiB) of the node and Orthanc. ``stage`` gets each step's name as it starts;
    ``receive_path``: the node's ``[node] receive_path`` ("": its default)."""
    stage("writing series")
    workloads = {"concurrent": [write_series(workdir / "send" / f"s{i:02d}", i, instances, size)
                                for i in range(senders)]}
    if small_instances:
        workloads["one_association"] = [write_series(workdir / "send" / "small", 0, small_instances, small_size,
                                                      tag="small-")]
    os.sync()  # the workloads' own dirty pages are not left for the first server's syncs to write
    stage("sending to srnode")
    servers: dict[str, dict[str, dict[str, Any]]] = {"srnode": run_node(workdir / "node", workloads,
                                                                                 receive_path)}
    stage("sending to storescp")
    servers["storescp"] = run_storescp(workdir, workloads)
    if orthanc:
        stage("sending to Orthanc")
        servers["orthanc"] = run_orthanc(workdir / "orthanc", workloads)
    figures: dict[str, Any] = {"cpus": os.cpu_count(), "load_average_before": os.getloadavg(),
                               "receive_path": receive_path or "default"}
    expected = 0
    for name, batches in workloads.items():
        expected += sum(len(b) for b in batches)
        w: dict[str, Any] = {
            "associations": len(batches), "instances": sum(len(b) for b in batches),
            "matrix": f"{size}x{size}" if name == "concurrent" else f"{small_size}x{small_size}",
            "megabytes": round(sum(p.stat().st_size for b in batches for p in b) / 2**20, 1)}
        for server, per in servers.items():
            w[server] = _figures(per[name], expected)
        node = w["srnode"]["instances_per_s"]
        w["srnode_vs_storescp"] = round(node / w["storescp"]["instances_per_s"], 3)
        if orthanc:
            w["srnode_vs_orthanc"] = round(node / w["orthanc"]["instances_per_s"], 3)
        figures[name] = w
    figures["load_average_after"] = os.getloadavg()
    figures["node_peak_rss_mb"] = max(v["peak_rss_mb"] for v in servers["srnode"].values())
    return figures


def run(args: argparse.Namespace) -> int:
    """Run ``srnode bench ingest``; returns the exit code (1 when dcmtk or Orthanc is missing, a sender failed
    or an instance was not indexed / stored)."""
    from node.app.progress import bar_of
    from node.bench.results import write_result

    tools = [STORESCU, STORESCP, ECHOSCU] + ([] if args.no_orthanc else [ORTHANC])
    for tool in tools:
        if not Path(tool).is_file():
            print(f"bench ingest: {tool} is missing (dcmtk, Orthanc); install it with scripts/install-system.sh "
                  "(or pass --no-orthanc)")
            return 1
    own = not args.workdir
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="srnode-bench-ingest-"))
    try:
        bar = bar_of(args)
        bar.stage("starting", 4 if args.no_orthanc else 5)
        figures = measure(args.senders, args.instances, args.size, workdir, args.small_instances,
                          args.small_size, not args.no_orthanc, bar.stage, args.receive_path)
        bar.close()
    finally:
        if own:
            shutil.rmtree(workdir, ignore_errors=True)
    out = write_result("ingest", figures, command=" ".join(["srnode", *map(shlex.quote, sys.argv[1:])]))
    ok = True
    for name in ("concurrent", "one_association"):
        w = figures.get(name)
        if not w:
            continue
        print(f"ingest, {name}: {w['associations']} association(s) x {w['instances'] // w['associations']} "
              f"instances ({w['matrix']}, {w['megabytes']} MB):")
        for server in ("srnode", "storescp", "orthanc"):
            if server in w:
                f = w[server]
                rss = f" peak RSS {f['peak_rss_mb']} MB" if "peak_rss_mb" in f else ""
                print(f"  {server:9s}{f['instances_per_s']:8.1f} instances/s ({f['seconds']} s), stored "
                      f"{'all' if f['all_stored'] else 'NOT ALL'}{rss}")
                ok = ok and f["all_stored"] and not f["failed_senders"]
        print(f"  srnode / storescp = {w['srnode_vs_storescp']}"
              + (f", srnode / Orthanc = {w['srnode_vs_orthanc']}" if "srnode_vs_orthanc" in w else ""))
    print(f"-> {out}")
    return 0 if ok else 1
