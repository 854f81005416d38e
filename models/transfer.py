"""Moving large volumes between the GPU and the host for the engines, and a small pool for host-side work.

A pageable ``tensor.cpu()`` of a 600x512^2 float32 volume ran at ~1.5 GB/s on the H100 node (the driver stages
it page by page). ``to_host`` instead DMAs chunks into two small pinned buffers kept for the process (one pair
per device, guarded by a lock) and copies each chunk into the numpy result with a few threads while the next
chunk is in flight. Values are copied bit for bit. ``host_pool`` runs numpy work (internal pairs, sigma helpers)
while the GPU works through its queue. torch + numpy only.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

CHUNK_ELEMS = 16 << 20  # float32 elements per pinned buffer (64 MiB)
COPY_THREADS = 4

host_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="srnode-host")
_copy_pool = ThreadPoolExecutor(max_workers=COPY_THREADS, thread_name_prefix="srnode-copy")
_lock = threading.Lock()
_staging: dict[int, tuple[threading.Lock, list[torch.Tensor]]] = {}


def _buffers(device: torch.device) -> tuple[threading.Lock, list[torch.Tensor]]:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    with _lock:
        if idx not in _staging:
            bufs = [torch.empty(CHUNK_ELEMS, dtype=torch.float32, pin_memory=True) for _ in range(2)]
            _staging[idx] = (threading.Lock(), bufs)
        return _staging[idx]


def _copy(dst: np.ndarray, src: np.ndarray) -> None:
    """dst[:] = src (1-D, same length) split over the copy threads (numpy releases the GIL while copying)."""
    n = dst.size
    if n < (1 << 20):
        dst[:] = src
        return
    step = -(-n // COPY_THREADS)
    parts = [(a, min(n, a + step)) for a in range(0, n, step)]
    list(_copy_pool.map(lambda p: np.copyto(dst[p[0] : p[1]], src[p[0] : p[1]]), parts))


def to_host(t: torch.Tensor) -> np.ndarray:
    """A float32 numpy copy of ``t`` (a CPU tensor's own memory when already on the host)."""
    t = t.detach()
    if t.device.type != "cuda":
        return t.numpy()
    if t.dtype != torch.float32:
        return t.cpu().numpy()
    src = t.contiguous().view(-1)
    out = np.empty(tuple(t.shape), dtype=np.float32)
    dst = out.reshape(-1)
    n = src.numel()
    starts = list(range(0, n, CHUNK_ELEMS))
    lock, bufs = _buffers(t.device)
    stream = torch.cuda.current_stream(t.device)
    with lock:

        def issue(i: int) -> torch.cuda.Event:
            c0 = starts[i]
            c1 = min(n, c0 + CHUNK_ELEMS)
            bufs[i % 2][: c1 - c0].copy_(src[c0:c1], non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(stream)
            return ev

        pending = issue(0) if starts else None
        for i, c0 in enumerate(starts):
            nxt = issue(i + 1) if i + 1 < len(starts) else None  # into the other buffer, drained last round
            assert pending is not None
            pending.synchronize()
            c1 = min(n, c0 + CHUNK_ELEMS)
            _copy(dst[c0:c1], bufs[i % 2].numpy()[: c1 - c0])
            pending = nxt
    return out


def to_device(a: np.ndarray, device: torch.device) -> torch.Tensor:
    """``a`` as a float32 tensor on ``device`` (shares memory on the CPU; chunked through pinned buffers on CUDA)."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    if device.type != "cuda":
        return torch.from_numpy(a)
    out = torch.empty(a.shape, dtype=torch.float32, device=device)
    src, dst = a.reshape(-1), out.view(-1)
    n = src.size
    lock, bufs = _buffers(out.device)
    stream = torch.cuda.current_stream(out.device)
    events: list[torch.cuda.Event | None] = [None, None]
    with lock:
        for i, c0 in enumerate(range(0, n, CHUNK_ELEMS)):
            c1 = min(n, c0 + CHUNK_ELEMS)
            ev = events[i % 2]
            if ev is not None:
                ev.synchronize()  # the DMA out of this buffer (two chunks ago) is done
            _copy(bufs[i % 2].numpy()[: c1 - c0], src[c0:c1])
            dst[c0:c1].copy_(bufs[i % 2][: c1 - c0], non_blocking=True)
            done = torch.cuda.Event()
            done.record(stream)
            events[i % 2] = done
        for ev in events:
            if ev is not None:
                ev.synchronize()  # the buffers may be reused by the next caller
    return out
