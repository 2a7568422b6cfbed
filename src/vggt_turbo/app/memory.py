"""Will the frames fit? A rough estimate made before running, so that a too-long sequence fails in a second with
advice instead of minutes later with an out-of-memory error; and the peak memory that was actually used.

The estimate is weights + a fixed part + a part per frame. Measured with ``reconstruct``'s forward (full model,
exact preset, 518x518 frames) on an H100 with torch 2.11, as CUDA's peak allocation above the fp32 weights
(4.4 GiB):

  frames           1     8    16    32    64   128
  bf16 (GiB)     2.4   4.2   4.6   5.4   8.1  14.5    -> about 0.10 GiB per frame beyond ~32 frames
  fp32 (GiB)     0.6   2.5   2.9   3.7   7.2     -    -> about 0.11 GiB per frame

The fixed part (heads run on chunks of 8 frames; autocast keeps bf16 copies of the weights) dominates short
sequences, the aggregator's activations long ones (the 0.09 GiB per frame measured for upstream's aggregator
alone). Both are scaled linearly to the run's pixels per frame and model width and rounded up, so the estimate
errs on the side of "does not fit" by a GiB or two. It is a guide, not a guarantee:
``torch.cuda.OutOfMemoryError`` during the run is still caught and answered with the same advice.
"""

from __future__ import annotations

import math
import sys
from typing import Optional

import torch
from torch import nn

from .errors import UserError

GIB = 1024**3
# (fixed, per frame) above the weights at 518x518 for the 1024-wide model; see the table above.
_MEASURED = {16: (3.5 * GIB, 0.10 * GIB), 32: (2.5 * GIB, 0.12 * GIB)}  # keyed by the autocast dtype's bits
_REFERENCE_PIXELS = 518 * 518
_REFERENCE_WIDTH = 1024


def weight_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def activation_bytes(model: nn.Module, height: int, width: int, dtype: torch.dtype) -> tuple[float, float]:
    """(fixed, per frame) bytes a forward needs beyond the weights, scaled from the measurements above."""
    fixed, per_frame = _MEASURED[16 if torch.finfo(dtype).bits == 16 else 32]
    embed_dim = model.aggregator.camera_token.shape[-1]
    scale = (height * width / _REFERENCE_PIXELS) * (embed_dim / _REFERENCE_WIDTH)
    return fixed * scale, per_frame * scale


def available_bytes(device: torch.device) -> Optional[int]:
    """Free memory where the run will allocate: the GPU's free memory, or the system's available RAM (Linux)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_fits(model: nn.Module, frames: int, height: int, width: int, device: torch.device, dtype: torch.dtype) -> None:
    """Raise ``UserError`` saying how many frames fit when ``frames`` will not.

    Called before the model is built, with its skeleton (``weights.Plan.skeleton``, parameters on the meta
    device): the weights are counted too, on either device, since they are yet to be allocated.
    """
    free = available_bytes(device)
    if free is None:
        return
    weights = weight_bytes(model)
    fixed, per_frame = activation_bytes(model, height, width, dtype)
    need = weights + fixed + frames * per_frame
    if need <= free:
        return
    fit = max(0, math.floor((free - weights - fixed) / per_frame))
    raise UserError(
        f"{frames} frames at {width}x{height} need about {need / GIB:.1f} GiB on {device} ({weights / GIB:.1f} GiB "
        f"weights + {fixed / GIB:.1f} GiB + {per_frame / GIB:.2f} GiB per frame) but {free / GIB:.1f} GiB are free, "
        f"so about {fit} frames fit. {advice(fit)}"
    )


def advice(fit: Optional[int] = None) -> str:
    """What lowers the memory a run needs. Not ``--preset fast``: its approximations save time, not memory
    (the exact preset already offloads the heads' inputs and chunks what can be chunked)."""
    frames = f"--frames {fit}" if fit else "--frames N"
    return f"Use fewer frames ({frames} or --stride K) or a device with more free memory."


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak(device: torch.device) -> tuple[Optional[int], str]:
    """(bytes, what was measured): CUDA's max_memory_allocated, or the process's peak resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "CUDA max_memory_allocated"
    try:
        import resource
    except ImportError:  # not on Windows
        return None, "unavailable"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss * (1 if sys.platform == "darwin" else 1024), "process peak RSS"
