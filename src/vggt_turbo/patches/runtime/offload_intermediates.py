"""offload_intermediates — wraps ``Aggregator.forward(images)`` (through ``cached_positions``' output store) and the
heads' entry points (``CameraHead.forward``, ``DPTHead._forward_impl``; see ``_head_inputs``).

Why leaner: the heads read four of the aggregator's 24 layer outputs, each (S, 1374, 2048) per sequence — at
200 frames 2.1 GiB each in bf16 (4.2 GiB in fp32 under plain autocast), held on the GPU from the layer that
makes it to the end of the heads: at long sequences they are the largest part of the peak. This patch copies
each kept intermediate to pinned host memory as soon as it exists and frees the GPU copy (the forward waits for
the last copy before returning, one host synchronisation per call); the heads then fetch
only the frames of the chunk they are about to process (``frames_chunk_size`` = 8 in upstream), and the camera
head only its camera tokens. The cost is PCIe traffic: one device-to-host copy of each kept layer and one
host-to-device copy of each chunk per DPT head. Both run on a side stream of the model's own (``_streams``), so
they overlap the compute instead of delaying it: a layer's copy starts when the layer exists and runs while the
next blocks compute (its GPU memory is released once the copy is done, ``record_stream``), and each DPT head
fetches the next chunk of frames while the current one computes (``_head_inputs``), holding one chunk more.

When it applies: inference on CUDA (eval, autograd off), not while a CUDA graph is being captured (short
sequences, which gain nothing), and only for a whole VGGT: patched alone, an Aggregator returns its outputs on the
GPU as upstream (nothing would fetch them back). Needs ``cached_positions``, whose loop it hooks into.

``offload_intermediates="auto"`` (the default): the patch is applied, but each call offloads only when its images
hold at least ``OFFLOAD_AUTO_FRAMES`` frames in all (B*S); shorter calls run as with ``False`` (the heads' input
wrappers pass tensors already on the GPU through untouched). The PCIe copies cost a few % of the time at every
length, while the kept intermediates are a large share of the peak only at long sequences. Under
``sequence_parallel`` the frames counted are the rank's own (its aggregator sees only those), and the camera head's
tokens are brought back to the GPU before they are gathered across ranks (``sequence_parallel``'s camera-head
wrapper). ``True`` offloads every call where it applies, as described above.

Exact: the same values, moved and brought back bit for bit.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch
from torch import nn

from ...config import AUTO, TurboConfig
from ...upstream import AGGREGATOR_FORWARD, looks_like_vggt
from .._base import Patch, Target, Tier, aggregator_path
from .._head_inputs import HEAD_INPUT_REQUIREMENTS, head_input_targets
from .._streams import Streams
from .._store import STORE

log = logging.getLogger(__name__)

# "auto" offloads calls of at least this many frames (B*S): the kept intermediates grow with the frames, their
# share of the peak too, while the copies cost about the same fraction of the time at any length.
OFFLOAD_AUTO_FRAMES = 32


def to_host(t: torch.Tensor, side: Optional[Streams] = None) -> torch.Tensor:
    """A pinned host copy of ``t``, filled asynchronously on ``side``'s stream after the work already queued on the
    current one (the caching host allocator does not reuse the block before the copy is done; ``t``'s GPU memory
    is not reused before it either). Without ``side``, in the current stream's order."""
    host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=True)
    if side is None:
        host.copy_(t, non_blocking=True)
        return host
    stream = side.after_current(t.device)
    with torch.cuda.stream(stream):
        host.copy_(t, non_blocking=True)
    t.record_stream(stream)
    return host


def applies(agg: nn.Module, images: torch.Tensor) -> bool:
    return (
        images.is_cuda
        and not agg.training
        and not torch.is_grad_enabled()
        and not torch.cuda.is_current_stream_capturing()
    )


def frames(images: torch.Tensor) -> int:
    """Frames in one call: B*S of the aggregator's (B, S, 3, H, W) images."""
    return images.shape[:-3].numel()


def make_aggregator_forward(side: Streams, auto: bool):
    """The ``Aggregator.forward`` wrapper: store the kept layers on the host through ``side``'s stream; with
    ``auto``, only for calls of at least ``OFFLOAD_AUTO_FRAMES`` frames."""

    def aggregator_forward(wrapped: Any, agg: nn.Module, args: tuple, kwargs: dict) -> Any:
        images = AGGREGATOR_FORWARD.bind(*args, **kwargs)[0]
        if not applies(agg, images) or (auto and frames(images) < OFFLOAD_AUTO_FRAMES):
            return wrapped(*args, **kwargs)
        token = STORE.set(lambda t: to_host(t, side if t.is_cuda else None))
        try:
            outputs = wrapped(*args, **kwargs)
        finally:
            STORE.reset(token)
        # The host copies are filled asynchronously: wait for them once here, so that host-side reads (the camera
        # head's non-contiguous slice, a caller reading the tokens) never see a copy still in flight.
        if images.is_cuda:
            side.synchronize(images.device)
            torch.cuda.current_stream(images.device).synchronize()
        return outputs

    return aggregator_forward


def _enabled(config: TurboConfig) -> bool:
    """True and "auto" apply the patch ("auto" decides per call)."""
    return config.offload_intermediates == AUTO or config.offload_intermediates is True


def _targets(root: nn.Module, config: TurboConfig) -> list[Target]:
    if not looks_like_vggt(root):
        if config.offload_intermediates is True:
            log.info("vggt_turbo offload_intermediates: an Aggregator patched alone keeps its outputs on the GPU")
        return []
    side = Streams()
    forward = make_aggregator_forward(side, auto=config.offload_intermediates == AUTO)
    return [Target(aggregator_path(root), "forward", forward), *head_input_targets(root, prefetch=side)]


PATCH = Patch(
    name="offload_intermediates",
    tier=Tier.EXACT,
    # each rank's own kept layers; the camera tokens come back to the GPU to be gathered
    sequence_parallel=True,
    requires=("cached_positions",),  # hooks into its loop
    summary="the 4 layer outputs the heads read kept in pinned host memory; `auto`: calls of 32 frames or more",
    requirements=(AGGREGATOR_FORWARD.requirement,) + HEAD_INPUT_REQUIREMENTS,
    enabled=_enabled,
    targets=_targets,
)
