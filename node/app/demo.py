"""``make demo``: the main job on embedded defaults, end to end, on this machine.

Starts the node on localhost (free ports), sends it a real series (the shared 5 mm phantom CT when
``../shared/data`` is present, otherwise a generated CT head phantom with exact geometry and HU) with dcmtk
``storescu`` (pynetdicom's SCU when dcmtk is absent), waits for the job to be delivered, and prints where the
derived and uncertainty series went plus the job's PNG preview, ``preview-job<N>.png`` (original / derived /
uncertainty in three planes; one file per job, never overwritten).
The destination is the folder srnode-out/ in the repository root, plus a local Orthanc on 127.0.0.1:8042
(``SRNODE_DEMO_ORTHANC``) if one answers.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from pydicom import dcmread

from node.app.logs import setup_logging
from node.app.phantom import write_phantom_series
from node.app.preview import write_preview
from node.app.service import Node
from node.config import DEFAULTS, Config, config_from_dict
from node.config.dump import config_toml
from node.derived.modules import PARAMETRIC_MAP_STORAGE
from node.dimse import Status, label
from node.store import Job, JobState

log = logging.getLogger("srnode.demo")
ROOT = Path(__file__).resolve().parents[2]
SHARED_SERIES = ROOT.parent / "shared" / "data" / "ct_head_phantom_philips_5mm"
STORESCU = "/usr/bin/storescu"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _local_orthanc() -> str:
    url = os.environ.get("SRNODE_DEMO_ORTHANC", "http://127.0.0.1:8042")
    try:
        with urllib.request.urlopen(f"{url}/system", timeout=1.0) as r:
            return url if r.status == 200 else ""
    except OSError:
        return ""


def demo_config(workdir: Path, out_dir: Path, orthanc_url: str, engine: str | None) -> Config:
    """The embedded defaults with the spool under ``workdir``, free loopback ports for DICOM and HTTP,
    stable_age_s 2 s, the folder ``out_dir`` (and Orthanc at ``orthanc_url``, when given) as destinations of
    the default rule, and ``engine`` when given. ConfigError when the result is not valid."""
    data = {k: v for k, v in DEFAULTS.items()}
    data["node"] = {**DEFAULTS["node"], "spool_dir": str(workdir / "spool"), "port": _free_port(),
                    "stable_age_s": 2.0}
    data["http"] = {"port": _free_port()}
    dests = [{"name": "local", "kind": "folder", "path": str(out_dir)}]
    if orthanc_url:
        dests.append({"name": "orthanc", "kind": "orthanc", "url": orthanc_url})
    data["destinations"] = dests
    data["rules"] = [{**DEFAULTS["rules"][0], "destinations": [d["name"] for d in dests]}]
    if engine:
        data["engine"] = {**DEFAULTS.get("engine", {}), "name": engine}
    return config_from_dict(data, "embedded defaults (demo)")


def _series_files(workdir: Path) -> tuple[list[Path], str]:
    if SHARED_SERIES.is_dir():
        return sorted(SHARED_SERIES.glob("*.dcm")), f"real CT (phantom, 5 mm) from {SHARED_SERIES}"
    files = write_phantom_series(workdir / "phantom")
    return list(files), "generated CT head phantom (../shared/data absent)"


def _send(files: list[Path], cfg: Config) -> None:
    if Path(STORESCU).exists():
        cmd = [STORESCU, "-aec", cfg.node.ae_title, "-aet", "DEMO_SCU", "127.0.0.1", str(cfg.node.port),
               *map(str, files)]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            raise SystemExit(f"storescu failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
        return
    from pynetdicom import AE, StoragePresentationContexts

    ae = AE(ae_title="DEMO_SCU")
    ae.requested_contexts = StoragePresentationContexts
    assoc = ae.associate("127.0.0.1", cfg.node.port, ae_title=cfg.node.ae_title)
    if not assoc.is_established:
        raise SystemExit("the node refused the association")
    try:
        for f in files:
            status = assoc.send_c_store(dcmread(f))
            code = getattr(status, "Status", None)
            if code != Status.SUCCESS:
                raise SystemExit(f"{f}: C-STORE status {label(code) if code is not None else 'none (no answer)'}")
    finally:
        assoc.release()


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns 0 when the job was delivered, else 1. ``--workdir`` is deleted and recreated;
    relative paths are taken from the repository root."""
    p = argparse.ArgumentParser(prog="python -m node.app.demo", description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="demo-run", help="spool and scratch (default ./demo-run, recreated)")
    p.add_argument("--out", default="srnode-out", help="folder destination (default ./srnode-out)")
    p.add_argument("--engine", default=None, help="engine name (default: the embedded default)")
    p.add_argument("--timeout", type=float, default=1200.0, help="seconds to wait for the result")
    args = p.parse_args(argv)

    setup_logging("WARNING")
    workdir, out_dir = (ROOT / args.workdir).resolve(), (ROOT / args.out).resolve()
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    orthanc_url = _local_orthanc()
    cfg = demo_config(workdir, out_dir, orthanc_url, args.engine)
    config_file = workdir / "config.toml"  # the demo's spool is workdir/spool: `srnode status` needs this config
    config_file.write_text(config_toml(cfg, "the configuration `make demo` ran with (python -m node.app.demo)"))
    files, what = _series_files(workdir)

    print(f"srnode demo: node {cfg.node.ae_title} on 127.0.0.1:{cfg.node.port}, engine {cfg.engine.name} "
          f"(device {cfg.engine.options.device}), destinations: {', '.join(d.name + '=' + d.address for d in cfg.destinations)}")
    node = Node(cfg)
    node.start()
    t0 = time.monotonic()
    try:
        print(f"sending {len(files)} instances: {what}")
        _send(files, cfg)
        print(f"sent in {time.monotonic() - t0:.1f} s; waiting {cfg.node.stable_age_s:.0f} s of quiet, then processing…")
        job = _wait_delivered(node, args.timeout)
    finally:
        node.stop()
    took = time.monotonic() - t0
    if job is None or job.state != JobState.DELIVERED:
        print(f"demo FAILED: job state {getattr(job, 'state', 'none')}: {getattr(job, 'reason', '')}")
        return 1
    derived = sorted((out_dir / job.study_uid / job.derived_series_uid).glob("*.dcm"))
    unc = sorted((out_dir / job.study_uid / job.uncertainty_series_uid).glob("*.dcm")) if job.uncertainty_series_uid else []
    print(f"\ndone in {took:.1f} s (engine {job.engine}{'; fallback: ' + job.fallback if job.fallback else ''})")
    summary = (job.report or {}).get("summary") or {}
    if summary.get("line"):
        print(f"  summary: {summary['line']}")
    print(f"  derived series     {len(derived):4d} instances -> {out_dir / job.study_uid / job.derived_series_uid}")
    if unc:
        head = dcmread(unc[0], stop_before_pixels=True)
        kind = (f"Parametric Map, {head.get('NumberOfFrames', '?')} float frames"
                if str(head.SOPClassUID) == PARAMETRIC_MAP_STORAGE else "Secondary Capture card")
        print(f"  uncertainty series {len(unc):4d} instance{'s' if len(unc) != 1 else ''} ({kind}) -> "
              f"{out_dir / job.study_uid / job.uncertainty_series_uid}")
    else:
        print(f"  no uncertainty series (engine {job.engine} has no sigma, or [derive] uncertainty = \"none\")")
    for what, series in (("derived", derived), ("uncertainty", unc)):
        if series:
            hdr = dcmread(series[0], stop_before_pixels=True)
            print(f"  {what} label: SeriesNumber {hdr.get('SeriesNumber', '')}, "
                  f"SeriesDescription {str(hdr.get('SeriesDescription', ''))!r}")
    if orthanc_url:
        print(f"  also stored in Orthanc at {orthanc_url} (same study)")
    png = write_preview(files, derived, unc, preview_path(out_dir, job.id))
    shown = "original / derived / uncertainty" if unc else "original / derived"
    print(f"  preview ({shown}, 3 planes): {png}")
    print(f"  the job and its deliveries: {_srnode()} status --config {_shown(config_file)}")
    return 0


def preview_path(out_dir: Path, job_id: int) -> Path:
    """``out_dir/preview-job<N>.png``, one per job; the spool (and so job numbers) starts afresh with every demo,
    so an earlier demo's file of that number is kept and this one is ``preview-job<N>-<k>.png``."""
    path, k = out_dir / f"preview-job{job_id}.png", 1
    while path.exists():
        k += 1
        path = out_dir / f"preview-job{job_id}-{k}.png"
    return path


def _srnode() -> str:
    """How to call the ``srnode`` command from here: the venv's script when this is its python."""
    script = Path(sys.executable).parent / "srnode"
    on_path = shutil.which("srnode")
    if script.exists():
        return "srnode" if on_path and Path(on_path).absolute() == script.absolute() else _shown(script)
    return "srnode" if on_path else f"{_shown(Path(sys.executable))} -m node.app.cli"


def _shown(path: Path) -> str:
    """``path`` relative to the current folder when it lies below it."""
    try:
        return str(path.absolute().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _wait_delivered(node: Node, timeout: float) -> Job | None:
    """The demo's job once delivered, failed or dead-lettered (its states printed as they change)."""
    index = node.ctx.index
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        jobs = index.jobs(())
        if jobs:
            job = jobs[-1]
            if job.state != last:
                print(f"  job {job.id}: {job.state}{(' — ' + job.reason) if job.reason else ''}")
                last = job.state
            if job.state in (JobState.DELIVERED, JobState.FAILED, JobState.DEAD_LETTER):
                return job
        time.sleep(0.5)
    return None


if __name__ == "__main__":
    sys.exit(main())

