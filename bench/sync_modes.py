"""How long making a batch of received files durable takes, by method, alone and beside another writer.

The group commit (``node.ingest.commit``) makes each batch durable before answering Success. This compares, on
the file system of ``--dir``, for batches of ``--files`` new files of ``--kib`` KiB:

- ``syncfs``: one syncfs(2) of the whole file system (the node's method before 2026-11-30);
- ``seq``: fsync of each file, one after the other, then of the folder;
- ``par``: the same fsyncs issued together on 16 threads (the node's method now, ``node.store.spool.sync_batch``);
- ``early-*``: as above, after starting each file's writeback as it is closed (sync_file_range WRITE,
  ``node.store.spool.start_writeback``).

``--beside-mb N`` runs ``dd`` writing N MiB (no sync) in the same folder meanwhile: another writer's dirty data.
Prints the median and mean milliseconds per batch. Linux only. Usage:
``python bench/sync_modes.py --dir /path/on/the/spool/disk [--beside-mb 1500] syncfs par early-par``.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

LIBC = ctypes.CDLL("libc.so.6", use_errno=True)
LIBC.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def batch_ms(mode: str, folder: Path, n: int, size: int, reps: int, pool: ThreadPoolExecutor) -> list[float]:
    """Milliseconds to make each of ``reps`` batches of ``n`` new files of ``size`` bytes durable by ``mode``."""
    data = os.urandom(size)
    times = []
    for r in range(reps):
        paths = []
        for i in range(n):
            p = str(folder / f"b{r}-{i}.dcm")
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.write(fd, data)
            if mode.startswith("early-"):
                LIBC.sync_file_range(fd, 0, 0, 2)
            os.close(fd)
            paths.append(p)
        t = time.perf_counter()
        if mode.endswith("syncfs"):
            fd = os.open(folder, os.O_RDONLY)
            LIBC.syncfs(fd)
            os.close(fd)
        elif mode == "seq":
            for p in paths:
                _fsync(p)
            _fsync(str(folder))
        else:
            list(pool.map(_fsync, paths + [str(folder)]))
        times.append(1000 * (time.perf_counter() - t))
        for p in paths:
            os.unlink(p)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("modes", nargs="+", choices=["syncfs", "seq", "par", "early-syncfs", "early-par"])
    ap.add_argument("--dir", type=Path, required=True, help="a new folder on the disk to measure")
    ap.add_argument("--files", type=int, default=16)
    ap.add_argument("--kib", type=int, default=128)
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--beside-mb", type=int, default=0, help="MiB another writer (dd, no sync) writes meanwhile")
    args = ap.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    os.sync()
    dd = None
    if args.beside_mb:
        dd = subprocess.Popen(["dd", "if=/dev/zero", f"of={args.dir / 'other-writer'}", "bs=1M",
                               f"count={args.beside_mb}"], stderr=subprocess.DEVNULL)
    with ThreadPoolExecutor(16) as pool:
        for mode in args.modes:
            ms = batch_ms(mode, args.dir, args.files, args.kib * 1024, args.reps, pool)
            print(f"{mode:13s} median {statistics.median(ms):6.1f} ms  mean {statistics.mean(ms):6.1f} ms per batch "
                  f"of {args.files} x {args.kib} KiB" + (f" (beside dd {args.beside_mb} MiB)" if dd else ""),
                  flush=True)
    if dd is not None:
        dd.wait()
    (args.dir / "other-writer").unlink(missing_ok=True)


if __name__ == "__main__":
    main()
