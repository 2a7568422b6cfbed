"""A checkpoint's tensors copied onto a GPU by several threads through pinned staging buffers.

Why: reading tensor after tensor from the memory-mapped checkpoint onto the device (``tensor.to("cuda")``, or
safetensors' ``get_tensor``) copies through pageable memory, one tensor at a time, and leaves the copy engines
waiting while the host reads the next tensor: for VGGT's 4.7 GiB of fp32 weights about a second of a one-shot
run that had them in the page cache (benchmarks/RESULTS.md). Here ``THREADS`` workers each take a share of the
bytes and stream them through two pinned buffers of their own: while one buffer's host-to-device copy runs on
the worker's CUDA stream, the worker fills the other from the map (page faults read the file, and both the
memory copy and the device copy release the GIL), so the disk or page cache, the memory bus and PCIe work at
once.

The values are the file's bytes, unchanged: each tensor is copied as raw bytes into a device tensor of the
file's dtype and shape (then converted, on the device, if the model keeps another dtype, as ``tensor.to`` would).
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Mapping, Optional

import torch

log = logging.getLogger(__name__)

THREADS = min(4, os.cpu_count() or 1)  # more did not copy faster on an H200 host (16 cores)
STAGING_BYTES = 16 * 2**20  # per buffer; two per thread (pinned host memory, kept by torch's host allocator)


def upload(state: Mapping[str, torch.Tensor], device: torch.device,
           dtypes: Optional[Mapping[str, torch.dtype]] = None, threads: int = THREADS,
           staging_bytes: int = STAGING_BYTES) -> dict[str, torch.Tensor]:
    """``{name: tensor.to(device, dtypes.get(name, tensor.dtype))}`` for host tensors ``state``, bit for bit.

    On a CUDA ``device`` through ``threads`` workers and pinned staging buffers of ``staging_bytes``; on any other
    device by ``tensor.to``. Every copy has finished when this returns.
    """
    dtypes = dtypes or {}
    shares = _shares([(name, t) for name, t in state.items() if t.numel() > 0], max(1, threads))
    buffers = _pinned(len(shares), staging_bytes) if device.type == "cuda" else None
    if buffers is None:  # off CUDA, or no pinned memory
        return {name: t.to(device=device, dtype=dtypes.get(name, t.dtype)) for name, t in state.items()}
    targets = {name: torch.empty(t.shape, dtype=t.dtype, device=device) for name, t in state.items()}
    after = torch.cuda.current_stream(device)  # the targets' stream: the workers' copies follow its work
    if shares:
        with ThreadPoolExecutor(max_workers=len(shares), thread_name_prefix="vggt-turbo-upload") as pool:
            for done in [pool.submit(_copy_share, share, targets, after, pair) for share, pair in zip(shares, buffers)]:
                done.result()
    return {name: t if dtypes.get(name, t.dtype) == t.dtype else t.to(dtypes[name]) for name, t in targets.items()}


def _pinned(workers: int, staging_bytes: int) -> Optional[list[list[torch.Tensor]]]:
    """Two pinned buffers of ``staging_bytes`` per worker, or None (logged) where the host cannot pin them: the
    tensors are then copied one by one, as ``tensor.to`` does."""
    try:
        return [[torch.empty(staging_bytes, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
                for _ in range(workers)]
    except RuntimeError as exc:
        log.info("pinned staging buffers unavailable (%s): the checkpoint is copied tensor by tensor", exc)
        return None


def _shares(jobs: list[tuple[str, torch.Tensor]], threads: int) -> list[list[tuple[str, torch.Tensor]]]:
    """The tensors dealt to at most ``threads`` workers, largest first to the least loaded, so that each worker
    copies about the same number of bytes."""
    shares: list[list[tuple[str, torch.Tensor]]] = [[] for _ in range(min(threads, len(jobs)))]
    loads = [0] * len(shares)
    for name, tensor in sorted(jobs, key=lambda job: -job[1].nbytes):
        least = loads.index(min(loads))
        shares[least].append((name, tensor))
        loads[least] += tensor.nbytes
    return shares


def _copy_share(share: list[tuple[str, torch.Tensor]], targets: dict[str, torch.Tensor], after: torch.cuda.Stream,
                buffers: list[torch.Tensor]) -> None:
    """One worker: its tensors, slice by slice, through its two pinned ``buffers`` on a stream of its own (which
    first waits for ``after``)."""
    stream = torch.cuda.Stream(after.device)
    stream.wait_stream(after)
    staging_bytes = buffers[0].numel()
    copied: list[Optional[torch.cuda.Event]] = [None, None]
    turn = 0
    with torch.cuda.stream(stream):
        for name, source in share:
            src, dst = _bytes(source.contiguous()), _bytes(targets[name])
            for begin in range(0, src.numel(), staging_bytes):
                end = min(begin + staging_bytes, src.numel())
                if copied[turn] is not None:
                    copied[turn].synchronize()  # this buffer's previous device copy has read it
                staging = buffers[turn][: end - begin]
                staging.copy_(src[begin:end])
                dst[begin:end].copy_(staging, non_blocking=True)
                copied[turn] = torch.cuda.Event()
                copied[turn].record(stream)
                turn = 1 - turn
    stream.synchronize()


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's memory as a flat uint8 tensor (a view)."""
    return t.reshape(-1).view(torch.uint8)
