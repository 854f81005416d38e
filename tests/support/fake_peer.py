"""A stand-in for ECLARE's ``run-eclare`` (same options, same output geometry) for tests without the peer venv.

Like ECLARE 1.0.1 it takes the NIfTI's coarsest axis as the slice axis, resamples it to the finest in-plane
spacing over the same field of view (``radifox.utils.resize.affine.update_affine``: the first output sample half
an output step past the input's first slice edge) and writes ``<name><suffix>.nii.gz`` into --out-dir.
FAKE_PEER=coords (default): each voxel holds its own RAS position along the slice direction (mm) + 0.01 column
+ 0.02 row, so a reader can check where each value came from; FAKE_PEER=cubic: cubic B-spline of the input;
FAKE_PEER=hang: never finishes (for the runner's time cap). Like ECLARE it prints a training bar
(``n/n [00:02<00:00, ...it/s, loss=...]``) for its --n-patches, and "!!! Running on CPU !!!" for --gpu-id >= 0
when FAKE_PEER_GPU is unset (it has none). FAKE_PEER_CHILD=PATH: first of all it starts a child that waits
forever (as ECLARE's data-loader workers would, in its process group) and writes the child's PID to PATH;
FAKE_PEER_EXIT=N: then it exits with N at once (after the GPU line, unless FAKE_PEER=hang).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
from pathlib import Path


def _start_child(pid_path: Path) -> None:
    """A child waiting forever, its PID written to ``pid_path`` (atomically: a reader sees all of it or none)."""
    child = subprocess.Popen([sys.executable, "-c", "import threading; threading.Event().wait()"])
    tmp = pid_path.with_suffix(".tmp")
    tmp.write_text(str(child.pid))
    tmp.replace(pid_path)


def main(argv: list[str]) -> int:
    if os.environ.get("FAKE_PEER_CHILD"):
        _start_child(Path(os.environ["FAKE_PEER_CHILD"]))
    p = argparse.ArgumentParser()
    p.add_argument("--in-fpath", required=True)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--suffix", default="_eclare")
    p.add_argument("--n-patches", type=int, default=1000000)
    p.add_argument("--gpu-id", type=int, default=-1)
    args, _rest = p.parse_known_args(argv)  # the other budget and profile options are ECLARE's, ignored here
    if args.gpu_id >= 0 and not os.environ.get("FAKE_PEER_GPU"):
        print("GPU index not provided or no GPU support currently available.\n!!! Running on CPU !!!", flush=True)
    if os.environ.get("FAKE_PEER") == "hang":
        print("fake peer: hanging", flush=True)
        threading.Event().wait()  # until killed
    if os.environ.get("FAKE_PEER_EXIT"):
        return int(os.environ["FAKE_PEER_EXIT"])
    import nibabel as nib  # here: a peer that only starts a child and exits need not load them
    import numpy as np

    n = args.n_patches
    print(f"\r  0%|          | 0/{n} [00:00<?, ?it/s]\r100%|##########| {n}/{n} [00:02<00:00, {n / 2:.2f}it/s, "
          "loss=0.0123]", file=sys.stderr)
    img = nib.load(args.in_fpath)
    a = np.asarray(img.affine, float)
    zooms = np.sqrt((a[:3, :3] ** 2).sum(axis=0))
    if int(np.argmax(zooms)) != 2:
        print("fake peer: the slice axis must be the NIfTI's third", file=sys.stderr)
        return 2
    sep = round(float(zooms[2] / zooms[:2].min()), 3)
    data = np.asarray(img.get_fdata(dtype=np.float32))
    n_out = int(round(data.shape[2] * sep))
    out_a = a.copy()
    out_a[:3, 2] = a[:3, 2] / sep
    out_a[:3, 3] = a[:3, 3] - out_a[:3, 2] * (sep - 1) / 2
    if os.environ.get("FAKE_PEER", "coords") == "cubic":
        from models.cubic import resample_axis

        k_in = (np.arange(n_out) - (sep - 1) / 2) / sep  # output sample k' in input slice index
        out = resample_axis(data, 2, k_in).astype(np.float32)
    else:
        i, j, k = np.meshgrid(np.arange(data.shape[0]), np.arange(data.shape[1]), np.arange(n_out), indexing="ij")
        ras = (out_a[:3, :3] @ np.stack([i.ravel(), j.ravel(), k.ravel()]) + out_a[:3, 3:4]).T
        u = a[:3, 2] / np.linalg.norm(a[:3, 2])
        out = ((ras @ u).reshape(i.shape) + 0.01 * i + 0.02 * j).astype(np.float32)
    name = Path(args.in_fpath).name.replace(".nii", f"{args.suffix}.nii")
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(out, out_a), str(Path(args.out_dir) / name))
    print("fake peer: ECLARE elapsed time: 0.0100s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
