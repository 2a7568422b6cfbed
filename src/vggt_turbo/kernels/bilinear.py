"""Bilinear resize with ``align_corners=True``, optionally plus a separable map, in one pass: what VGGT's DPT
heads do at the end of each fusion block and before their output convolutions.

Why: the DPT heads (depth, points) run in fp32 and resize large feature maps five times per head and chunk of
frames (four x2 steps in the fusion blocks, then to the image size: 518² x 128 channels per frame), and the last
resize is followed by a separate full-size ``x + pos_embed`` pass. Their tensors are channels-last, for which
PyTorch's CUDA kernel (``upsample_bilinear2d_nhwc_out_frame``, one thread per output element) runs far below the
GPU's bandwidth there (benchmarks/RESULTS.md). The Triton kernel computes the weights once per pixel, loads each pixel's channels as
vectors, and adds the map before its single store.

The map is separable, as DPT's positional embedding is (its first ``split`` channels depend on the column only,
the others on the row only): two small tables stand for the full-size map, which never exists.

Exact: PyTorch's CUDA arithmetic, in fp32, with the same fused multiply-adds (see ``_bilinear_triton``): equal to
PyTorch's result bit for bit on an H100 with torch 2.11 (the GPU test); a torch build whose compiler contracted
otherwise would differ in the last bit of fp32. The map is added after the resized value is rounded, as a separate
addition does. The output has the
strides PyTorch's own calls would give it (``_out_strides``), so the convolutions that follow see the same layout.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from . import triton_installed

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class SeparableMap:
    """A (C, H, W) map whose channel c at pixel (h, w) is ``cols[w, c]`` for c < ``split``, else ``rows[h, c]``."""

    rows: torch.Tensor  # (H, C)
    cols: torch.Tensor  # (W, C)
    split: int

    def full(self) -> torch.Tensor:
        """The (H, W, C) map itself (for the PyTorch path)."""
        H, C = self.rows.shape
        W = self.cols.shape[0]
        channel = torch.arange(C, device=self.rows.device)
        return torch.where(channel < self.split, self.cols[None, :, :].expand(H, W, C), self.rows[:, None, :].expand(H, W, C))


def reference(x: torch.Tensor, size: tuple[int, int], add: Optional[SeparableMap] = None) -> torch.Tensor:
    """``F.interpolate(x, size, mode="bilinear", align_corners=True)``, plus ``add`` broadcast over the batch."""
    out = F.interpolate(x, size=size, mode="bilinear", align_corners=True)
    if add is None:
        return out
    return out + add.full().permute(2, 0, 1)[None].expand(out.shape[0], -1, -1, -1)


def bilinear(x: torch.Tensor, size: tuple[int, int], add: Optional[SeparableMap] = None) -> torch.Tensor:
    """``reference(x, size, add)``, by the Triton kernel when it covers the call (CUDA, triton installed)."""
    if x.is_cuda and triton_covers(x, size, add):
        return _triton(x, size, add)
    return reference(x, size, add)


def triton_covers(x: torch.Tensor, size: tuple[int, int], add: Optional[SeparableMap]) -> bool:
    """Whether the kernel runs this call: a 4-D float tensor resized to another size (PyTorch copies an equal
    size), fewer than 2**31 output pixels, a map of the same dtype and device with contiguous (H2, C), (W2, C) tables."""
    if not (triton_installed() and x.dim() == 4 and x.dtype in KERNEL_DTYPES and len(size) == 2):
        return False
    H2, W2 = int(size[0]), int(size[1])
    if (H2, W2) == tuple(x.shape[-2:]) or min(H2, W2) < 1 or x.shape[0] * H2 * W2 >= 2**31:
        return False
    if add is None:
        return True
    C = x.shape[1]
    return all(
        t.dtype == x.dtype and t.device == x.device and t.is_contiguous() and tuple(t.shape) == (n, C)
        for t, n in ((add.rows, H2), (add.cols, W2))
    )


def _scale(in_size: int, out_size: int) -> float:
    """PyTorch's ``area_pixel_compute_scale`` with ``align_corners``: (in - 1) / (out - 1) in fp32."""
    if out_size <= 1:
        return 0.0
    return float(torch.tensor(in_size - 1, dtype=torch.float32) / (out_size - 1))


def _layout_strides(shape: tuple[int, int, int, int], channels_last: bool) -> tuple[int, ...]:
    N, C, H, W = shape
    return (H * W * C, 1, W * C, C) if channels_last else (C * H * W, H * W, W, 1)


@functools.lru_cache(maxsize=256)
def _out_strides(shape: tuple[int, ...], strides: tuple[int, ...], size: tuple[int, int], add: bool) -> tuple[int, ...]:
    """The strides of ``reference``'s result for such an input.

    An input laid out contiguously or channels-last, with no dimension of size 1, gives a result in its own layout
    (PyTorch's ``suggest_memory_format``; the map's addition keeps it: the resized tensor, first operand, has
    distinct strides that decide the order). Anything else is left to PyTorch's rules themselves, run on the meta
    device (``_meta_strides``). Why not always that: the meta kernel of this resize is a Python decomposition that
    imports torch's compiler stack on first use, seconds of a one-shot command's first call. A test checks the two
    agree on every shape and layout it tries.
    """
    N, C, H1, W1 = shape
    out_shape = (N, C, *size)
    if min(C, H1, W1, *size) > 1:  # a batch of one is laid out as any other (its stride is the full product)
        for channels_last in (False, True):
            if strides == _layout_strides((N, C, H1, W1), channels_last):
                return _layout_strides(out_shape, channels_last)
    return _meta_strides(shape, strides, size, add)


def _meta_strides(shape: tuple[int, ...], strides: tuple[int, ...], size: tuple[int, int], add: bool) -> tuple[int, ...]:
    """``reference``'s result strides, by PyTorch's own layout rules on the meta device."""
    meta = torch.empty_strided(shape, strides, device="meta")
    out = F.interpolate(meta, size=size, mode="bilinear", align_corners=True)
    if add:  # the map as reference() adds it: a permuted (H, W, C) tensor, expanded over the batch
        pos = torch.empty((*size, shape[1]), device="meta").permute(2, 0, 1)[None].expand(shape[0], -1, -1, -1)
        out = out + pos
    return tuple(out.stride())


def _triton(x: torch.Tensor, size: tuple[int, int], add: Optional[SeparableMap]) -> torch.Tensor:
    from ._bilinear_triton import bilinear_

    N, C, H1, W1 = x.shape
    H2, W2 = int(size[0]), int(size[1])
    strides = _out_strides(tuple(x.shape), tuple(x.stride()), (H2, W2), add is not None)
    out = torch.empty_strided((N, C, H2, W2), strides, dtype=x.dtype, device=x.device)
    tables = None if add is None else (add.rows, add.cols, add.split)
    bilinear_(x, out, tables, _scale(H1, H2), _scale(W1, W2))
    return out
