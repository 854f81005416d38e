"""ECLARE, the peer of ``srnode bench peers``, run as a subprocess on a NIfTI file, its output read back.

ECLARE (Remedios et al., self-supervised through-plane SR; ``eclare==1.0.1`` on PyPI, console script
``run-eclare``) runs by default in its own venv (``make peers-venv`` -> ``.venv-eclare/``: it pins scipy);
``peer_command`` picks another interpreter or command line instead (``--peer``, ``--peer-python PY``,
``$SRNODE_ECLARE_CMD``). ``run_peer`` writes the thick input as NIfTI (``node.bench.nifti``), runs ECLARE on it
with the slice profile given, capped in time, as the leader of a process group of its own that is killed whole
whenever the run ends (``_run_capped``), and reads its output back onto the truth grid. ``training_progress``
reads ECLARE's training rate from its log, ``fit_budget`` cuts a patch budget to fit a deadline at that rate, and
``peer_versions`` asks the peer's interpreter what it runs with.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.engine import VolumeInput
from node.bench.nifti import Geometry, load_nifti, nifti_affine, read_onto, write_nifti
from node.errors import EngineError

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
PEER_VENV = ROOT / ".venv-eclare"
PEER_CMD_ENV = "SRNODE_ECLARE_CMD"  # a command line that runs ECLARE's run-eclare (default: the peer venv's)
ECLARE_MAIN = "import sys; from eclare.main import main; sys.exit(main())"  # run-eclare's entry point
ECLARE_DEFAULT_PATCHES = 1_000_000  # eclare.main's --n-patches default
ECLARE_NO_GPU = "Running on CPU"  # eclare.utils.misc_utils.parse_device prints "!!! Running on CPU !!!"


@dataclass(frozen=True)
class PeerRun:
    """A peer's output on the truth grid, its wall seconds, and what it said about itself."""

    data: np.ndarray  # (Z, Y, X) float32 on the truth grid
    seconds: float
    index_map: tuple[float, float]  # truth slice k -> output slice scale * k + shift
    output_shape: tuple[int, ...]  # the output's nibabel shape (X, Y, Z')
    output_spacing: tuple[float, ...]  # its voxel size (mm)
    log_tail: str
    progress: dict[str, float]  # ECLARE's training progress bar read back (``training_progress``); {} if none


class PeerTimeout(EngineError):
    """The peer ran past its time cap (``--peer-timeout``) and was killed."""


def training_progress(log: str, n_patches: int) -> dict[str, float]:
    """ECLARE's training bar (tqdm, total = ``n_patches``, ``n/total [elapsed<left, rate it/s, loss=...]``) read
    from its log: ``patches`` done, ``train_s`` elapsed (tqdm's whole seconds), ``patches_per_s`` (done/elapsed)
    and the last ``loss``. {} when the log has no such bar."""
    last = None
    for m in re.finditer(r"(\d+)/(\d+) \[(?:(\d+):)?(\d+):(\d+)<[^,\]]*,[^\]]*?(?:loss=([0-9.eE+-]+))?\]", log):
        if int(m.group(2)) == n_patches:
            last = m
    if last is None:
        return {}
    done = int(last.group(1))
    secs = 3600 * int(last.group(3) or 0) + 60 * int(last.group(4)) + int(last.group(5))
    out = {"patches": float(done), "train_s": float(secs)}
    if secs > 0:
        out["patches_per_s"] = round(done / secs, 1)
    if last.group(6):
        out["loss"] = float(last.group(6))
    return out


def _run_capped(argv: list[str], cwd: Path, log_path: Path, timeout: float, need_gpu: bool) -> int:
    """Run ``argv`` with stdout and stderr into ``log_path`` as the leader of a session and process group of its own
    (``setsid``). Returns its exit code; PeerTimeout after ``timeout`` seconds; EngineError when ``need_gpu`` and
    ECLARE says it found no GPU. However the run ends (its exit with any code, the cap, that error, an exception
    or KeyboardInterrupt here), the whole group is killed (``_kill_group``): ECLARE's data-loader workers and
    whatever else it started and left behind. A descendant that starts a session of its own leaves the group and
    is not reached."""
    with log_path.open("wb") as out:
        try:
            proc = subprocess.Popen(argv, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1"})
        except OSError as exc:
            raise EngineError(f"peer {Path(argv[0]).name}: {exc}") from exc
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    return proc.wait(timeout=min(1.0, max(0.01, deadline - time.monotonic())))
                except subprocess.TimeoutExpired:
                    pass
                if need_gpu:
                    with log_path.open("rb") as f:
                        if ECLARE_NO_GPU in f.read(8192).decode(errors="replace"):
                            raise EngineError("ECLARE found no GPU (its torch sees no CUDA device): stopped")
                if time.monotonic() >= deadline:
                    raise PeerTimeout(f"ECLARE ran past its cap of {timeout:g} s and was stopped")
        finally:
            _kill_group(proc)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL every process in the group that ``proc`` leads (``proc`` itself if still running, and the members
    it left behind if it exited: the group outlives its leader while it has members), then reap ``proc``."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):  # no member left (PermissionError: macOS, only zombies left)
        pass
    proc.wait()


def run_peer(command: list[str], lr: VolumeInput, g_lr: Geometry, g_truth: Geometry,
             truth_shape: tuple[int, int, int], workdir: Path, n_patches: int, batch_size: int,
             gpu_id: int = -1, timeout: float = 7200.0) -> PeerRun:
    """Write ``lr`` (its slices at ``g_lr``) as NIfTI, run ``command`` + ECLARE's options on it (``--gpu-id``
    ``gpu_id``; >= 0 also means: stop it if it finds no GPU), at most ``timeout`` seconds, its log in
    ``workdir/peer.log``, and read the output back onto ``g_truth``. ``command``: the peer's argv prefix
    (``run-eclare`` of the peer venv, ``PY -c <run-eclare's main>``, or a stand-in taking the same options).
    PeerTimeout past the cap; EngineError when the peer fails or writes nothing; VolumeError for an output that
    is not on the input's in-plane grid."""
    workdir.mkdir(parents=True, exist_ok=True)
    src = workdir / "lr.nii.gz"
    write_nifti(src, lr.data, g_lr)
    out_dir = workdir / "out"
    profile = "gaussian" if lr.profile == "gaussian" else "boxcar"
    rel = lr.slice_thickness / min(g_lr.pixel)
    argv = [*command, "--in-fpath", str(src), "--out-dir", str(out_dir), "--n-patches", str(n_patches),
            "--batch-size", str(batch_size), "--relative-slice-thickness", f"{rel:.6g}",
            "--relative-slice-profile-type", profile, "--gpu-id", str(gpu_id), "--suffix", "_peer"]
    log.info("peer: %s", shlex.join(argv))
    log_path = workdir / "peer.log"
    t0 = time.perf_counter()
    rc = _run_capped(argv, workdir, log_path, timeout, gpu_id >= 0)
    seconds = time.perf_counter() - t0
    text = log_path.read_bytes().decode(errors="replace")
    tail = text.replace("\r", "\n")[-1500:]
    outs = sorted(out_dir.glob("*_peer.nii*")) if out_dir.is_dir() else []
    if rc != 0 or not outs:
        raise EngineError(f"peer {Path(command[-1]).name} failed (exit {rc}): " + " ".join(tail.split()[-60:]))
    img = load_nifti(outs[0])
    m = np.linalg.inv(img.affine) @ nifti_affine(g_truth)
    data = read_onto(outs[0], g_truth, truth_shape)
    zooms = np.sqrt((np.asarray(img.affine)[:3, :3] ** 2).sum(axis=0))
    return PeerRun(data, seconds, (float(m[2, 2]), float(m[2, 3])), tuple(int(s) for s in img.shape),
                   tuple(round(float(z), 4) for z in zooms), tail, training_progress(text, n_patches))


def peer_command(peer: str = "", peer_python: str = "") -> list[str]:
    """ECLARE's argv prefix: the command line ``peer``, else ``peer_python -c <run-eclare's main>``, else
    ``$SRNODE_ECLARE_CMD``, else the peer venv's ``run-eclare``. EngineError when none is there."""
    if peer:
        return shlex.split(peer)
    if peer_python:
        return [peer_python, "-c", ECLARE_MAIN]
    env = os.environ.get(PEER_CMD_ENV, "").strip()
    if env:
        return shlex.split(env)
    exe = PEER_VENV / "bin" / "run-eclare"
    if not exe.is_file():
        raise EngineError(f"{exe} is missing: make peers-venv (ECLARE in its own venv), or give --peer-python / "
                          f"${PEER_CMD_ENV}")
    return [str(exe)]


def peer_versions(command: list[str]) -> dict[str, str]:
    """The versions ECLARE runs with (eclare, torch + its CUDA, numpy, scipy, python), asked of the peer's own
    interpreter: ``command[0]`` when it is a Python, else the ``python`` beside a console script. {} when that
    cannot be told (a stand-in, no interpreter found, or it fails within 120 s)."""
    exe = Path(command[0])
    py = exe if exe.name.startswith("python") else exe.with_name("python")
    if not (py.is_file() or (exe.name.startswith("python") and "/" not in command[0])):
        return {}
    probe = ("import importlib.metadata as m, platform, json, torch\n"
             "def v(n):\n"
             "    try:\n        return m.version(n)\n"
             "    except m.PackageNotFoundError:\n        return ''\n"
             "print(json.dumps({'eclare': v('eclare'), 'torch': torch.__version__, 'cuda': str(torch.version.cuda),"
             " 'cuda_available': str(torch.cuda.is_available()), 'numpy': v('numpy'), 'scipy': v('scipy'),"
             " 'nibabel': v('nibabel'), 'python': platform.python_version()}))")
    try:
        r = subprocess.run([str(py), "-c", probe], capture_output=True, text=True, timeout=120)
        got = json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 and r.stdout.strip() else {}
    except (OSError, subprocess.TimeoutExpired, ValueError):
        return {}
    return {str(k): str(v) for k, v in got.items()} if isinstance(got, dict) else {}


def fit_budget(n_patches: int, batch: int, left_s: float, prev: dict[str, Any] | None) -> tuple[int, str]:
    """ECLARE's patch budget for a run that has ``left_s`` seconds: ``n_patches``, or fewer when the previous
    series' run (``prev``: its ``eclare`` figures, with ``progress.patches_per_s`` and ``seconds``) says they
    would not fit: its fixed cost (seconds - training seconds) is taken again, the rest at 85 % of its rate (a
    margin for a costlier series). (budget, why it was cut or ""); 0 when not even one batch fits."""
    rate = float((prev or {}).get("progress", {}).get("patches_per_s", 0.0))
    if not prev or rate <= 0:
        return n_patches, ""
    fixed = max(0.0, float(prev.get("seconds", 0.0)) - float(prev["progress"].get("train_s", 0.0)))
    fit = int((left_s - fixed) * rate * 0.85) // batch * batch
    if fit >= n_patches:
        return n_patches, ""
    return max(fit, 0), (f"cut from {n_patches} to fit the {left_s:.0f} s left before the deadline at the previous "
                         f"series' {rate:.0f} patches/s (+{fixed:.0f} s fixed cost)")
