"""``srnode bench ingest``: C-STORE ingest throughput of the node against dcmtk ``storescp``, same transfer.

16 concurrent senders (dcmtk ``storescu`` processes, one association each) send 100 instances each (a series
per sender) first to a real ``srnode serve`` and then to ``/usr/bin/storescp --fork`` (one process per
association, writing files: the reference a PACS administrator knows). Figures: instances/s for each, their
ratio, every status Success, every instance indexed by the node, and the node's peak RSS (VmHWM).
The node is configured with a long stable_age_s so that no processing competes with ingest.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

STORESCU = "/usr/bin/storescu"
STORESCP = "/usr/bin/storescp"
ECHOSCU = "/usr/bin/echoscu"
UID_ROOT = "1.2.826.0.1.3680043.10.1087.98."  # UIDs of the synthetic benchmark series
CT_IMAGE = UID("1.2.840.10008.5.1.4.1.1.2")  # CT Image Storage (PS3.4 B.5)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (another process may take it before it is used)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_series(folder: Path, sender: int, n: int, size: int) -> list[Path]:
    """``n`` CT slices of ``size``² (one series per sender, synthetic, no patient data)."""
    folder.mkdir(parents=True, exist_ok=True)
    study = generate_uid(UID_ROOT, [f"bench-study-{sender}"])
    series = generate_uid(UID_ROOT, [f"bench-series-{sender}"])
    rng = np.random.default_rng(sender)
    pixels = rng.integers(-1000, 1500, size=(size, size), dtype=np.int16).tobytes()
    out = []
    for k in range(n):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = CT_IMAGE
        sop = generate_uid(UID_ROOT, [f"bench-{sender}-{k}"])
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        # SOP Common / Patient / Study / Series
        ds.SOPClassUID, ds.SOPInstanceUID = CT_IMAGE, sop
        ds.PatientName, ds.PatientID = "BENCH^INGEST", "BENCH"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = study, series, "CT"
        ds.SeriesNumber, ds.InstanceNumber = 1, k + 1
        # Image Plane / Image Pixel
        ds.ImagePositionPatient = [0.0, 0.0, float(k)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SliceThickness = [0.5, 0.5], 1.0
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows = ds.Columns = size
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        ds.PixelData = pixels
        p = folder / f"{k:04d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        out.append(p)
    return out


def send_concurrently(port: int, batches: list[list[Path]], aet: str, timeout: float = 600) -> dict[str, Any]:
    """One storescu process per batch, all at once; wall seconds from the first start to the last exit."""
    t0 = time.monotonic()
    procs = [subprocess.Popen([STORESCU, "-aec", aet, "-aet", f"BENCH{i:02d}", "127.0.0.1", str(port),
                               *map(str, files)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
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


def node_config(workdir: Path, port: int) -> str:
    """config.toml text for the node under test: SCP on 127.0.0.1:``port``, spool in ``workdir``, stable_age_s
    3600 s (no processing during the run), HTTP off, cubic engine on CPU."""
    spool = workdir / "spool"
    return (f'[node]\nae_title = "SRNODE"\nhost = "127.0.0.1"\nport = {port}\nspool_dir = "{spool}"\n'
            f"stable_age_s = 3600.0\nmin_free_mb = 1\nmax_associations = 32\n\n[http]\nenabled = false\n\n"
            f'[engine]\nname = "cubic"\ndevice = "cpu"\n')


def run_node(workdir: Path, batches: list[list[Path]]) -> dict[str, Any]:
    """Start ``srnode serve``, send ``batches`` concurrently, stop it (SIGTERM); returns the send figures plus
    the node's peak and after-start RSS (MiB) and the instances indexed (-1 when ``srnode status`` failed)."""
    port = free_port()
    cfg = workdir / "config.toml"
    cfg.write_text(node_config(workdir, port))
    with (workdir / "node.log").open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "node.app.cli", "serve", "--config", str(cfg)],
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_echo(port, "SRNODE")
        rss_idle = peak_rss_mb(proc.pid)
        res = send_concurrently(port, batches, "SRNODE")
        res["peak_rss_mb"] = peak_rss_mb(proc.pid)
        res["rss_after_start_mb"] = rss_idle
        status = subprocess.run([sys.executable, "-m", "node.app.cli", "status", "--json", "--config", str(cfg)],
                                capture_output=True, text=True, timeout=120)
        res["indexed"] = int(json.loads(status.stdout)["instances"]) if status.returncode == 0 else -1
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return res


def run_storescp(workdir: Path, batches: list[list[Path]]) -> dict[str, Any]:
    """Start dcmtk ``storescp --fork`` writing to ``workdir/storescp``, send ``batches`` concurrently, and
    return the send figures plus the number of files stored."""
    port, out = free_port(), workdir / "storescp"
    out.mkdir()
    proc = subprocess.Popen([STORESCP, "--fork", "-aet", "STORESCP", "-od", str(out), str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_echo(port, "STORESCP")
        res = send_concurrently(port, batches, "STORESCP")
        res["stored"] = sum(1 for _ in out.iterdir())
    finally:
        proc.terminate()
        proc.wait(30)
    return res


def configure(parser: argparse.ArgumentParser) -> None:
    """Add ``srnode bench ingest`` options to ``parser``."""
    parser.add_argument("--senders", type=int, default=16, help="concurrent associations (default 16)")
    parser.add_argument("--instances", type=int, default=100, help="instances per association (default 100)")
    parser.add_argument("--size", type=int, default=256, help="rows = columns of each instance (default 256)")
    parser.add_argument("--workdir", default="", help="keep files here (default: a temporary folder)")


def measure(senders: int, instances: int, size: int, workdir: Path,
            stage: Callable[[str], None] = lambda _name: None) -> dict[str, Any]:
    """Write ``senders`` series of ``instances`` ``size``² slices, send them to the node and then to storescp;
    the figures (instances/s, MB/s with MB = 2^20 bytes, peak RSS MiB, their ratio). ``stage`` gets each step's
    name as it starts."""
    stage("writing series")
    batches = [write_series(workdir / "send" / f"s{i:02d}", i, instances, size) for i in range(senders)]
    mb = sum(p.stat().st_size for b in batches for p in b) / 2**20
    (workdir / "node").mkdir(parents=True)
    stage("sending to srnode")
    node = run_node(workdir / "node", batches)
    stage("sending to storescp")
    ref = run_storescp(workdir, batches)
    node_ips = node["instances"] / node["seconds"]
    ref_ips = ref["instances"] / ref["seconds"]
    return {
        "senders": senders, "instances_per_sender": instances, "matrix": f"{size}x{size}", "megabytes": round(mb, 1),
        "node_instances_per_s": round(node_ips, 1), "node_mb_per_s": round(mb / node["seconds"], 1),
        "node_seconds": round(node["seconds"], 2), "node_failed_senders": node["failed"],
        "node_indexed": node["indexed"], "node_peak_rss_mb": round(node["peak_rss_mb"], 1),
        "node_rss_after_start_mb": round(node["rss_after_start_mb"], 1),
        "storescp_instances_per_s": round(ref_ips, 1), "storescp_seconds": round(ref["seconds"], 2),
        "storescp_failed_senders": ref["failed"], "storescp_stored": ref["stored"],
        "node_vs_storescp": round(node_ips / ref_ips, 3),
        "cpus": os.cpu_count(),
    }


def run(args: argparse.Namespace) -> int:
    """Run ``srnode bench ingest``; returns the exit code (1 when dcmtk is missing, a sender failed or an
    instance was not indexed)."""
    from node.app.progress import bar_of
    from node.bench.results import write_result

    for tool in (STORESCU, STORESCP, ECHOSCU):
        if not Path(tool).is_file():
            print(f"bench ingest: {tool} is missing (dcmtk); install it with scripts/install-system.sh")
            return 1
    own = not args.workdir
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="srnode-bench-ingest-"))
    try:
        bar = bar_of(args)
        bar.stage("starting", 4)
        figures = measure(args.senders, args.instances, args.size, workdir, bar.stage)
    finally:
        if own:
            shutil.rmtree(workdir, ignore_errors=True)
    out = write_result("ingest", figures)
    print(f"ingest, {figures['senders']} senders x {figures['instances_per_sender']} instances "
          f"({figures['matrix']}, {figures['megabytes']} MB):")
    print(f"  srnode   {figures['node_instances_per_s']:8.1f} instances/s  ({figures['node_seconds']} s), "
          f"indexed {figures['node_indexed']}, peak RSS {figures['node_peak_rss_mb']} MB")
    print(f"  storescp {figures['storescp_instances_per_s']:8.1f} instances/s  ({figures['storescp_seconds']} s)")
    print(f"  ratio srnode / storescp = {figures['node_vs_storescp']}   -> {out}")
    ok = not figures["node_failed_senders"] and figures["node_indexed"] == args.senders * args.instances
    return 0 if ok else 1
