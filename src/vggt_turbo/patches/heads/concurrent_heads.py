"""concurrent_heads — wraps ``VGGT.forward(images, query_points=None)`` and ``forward`` of the camera, depth and
point heads.

Why faster: at a few frames each head's kernels are too small to fill an H100 — the camera head multiplies one
token per frame by fp32 weights (weight-bandwidth bound), the DPT heads convolve the maps of one or a few frames —
and upstream runs the three heads one after another. Here each of them runs on a CUDA stream of its own, forked
from the caller's stream after the aggregator and joined back to it before ``forward`` returns, so their kernels
overlap; inside a CUDA graph (``cuda_graphs``) the three become parallel branches of the graph.

Exact, bit for bit: the same kernels on the same inputs; only their order in time changes. Each head's inputs are
kept referenced until the join, so that memory the caller's stream frees is not reused while a head still reads it.

Applies to inference calls (autograd off) on CUDA of ``MAX_FRAMES`` frame (B*S) at most: concurrent heads hold
their working memory at the same time instead of one after another, and from 2 frames on that memory grows faster
than the gain (measured with the ``exact`` preset on an H100:
``benchmarks/results/nvidia-h100-80gb-hbm3/ab_concurrent_heads.json`` and ``concurrent_heads_memory.json``), so
those calls keep upstream's order, as do longer, GPU-bound ones. Refused with ``offload_intermediates=True`` (its
copies to the GPU are ordered on the caller's stream: ``Patch.conflicts``); not applied inside a
``sequence_parallel`` call. The track head (only with ``query_points``) runs on the caller's stream as upstream's.
"""

from __future__ import annotations

import contextvars
from typing import Any, Optional

import torch
from torch import nn

from ...config import TurboConfig
from ...distributed import communicating
from ...upstream import VGGT_FORWARD, looks_like_vggt, members, vggt_of
from .._base import Patch, Target, Tier
from .._streams import Streams

MAX_FRAMES = 1  # the largest call (B*S frames) whose heads run concurrently (see above: memory)
HEADS = ("camera_head", "depth_head", "point_head")

# The camera head is a chain of about 240 small kernels (four refinement passes over fp32 weights) that must run
# one after another, while the DPT heads' convolutions fill the GPU: on a stream of higher priority its kernels
# start as soon as an SM frees up instead of queueing behind the convolutions. CUDA graphs keep the priority a
# kernel was captured with (torch instantiates them with cudaGraphInstantiateFlagUseNodePriority). Measured on an
# H100 at 1 frame: ``benchmarks/results/nvidia-h100-80gb-hbm3/concurrent_heads_priority.json``.
PRIORITY = {"camera_head": -1}  # lower is higher; 0 is the default (and lowest) priority


class _Fork:
    """The heads of one ``VGGT.forward`` call: each on its own stream, all joined back to ``origin``."""

    def __init__(self, origin: torch.cuda.Stream, device: torch.device, streams: Streams) -> None:
        self.origin = origin
        self.device = device
        self.streams = streams
        self.used: list[torch.cuda.Stream] = []
        self.inputs: list[tuple] = []  # kept until the join: the caller's stream must not reuse their memory early

    def run(self, head: str, wrapped: Any, args: tuple, kwargs: dict) -> Any:
        stream = self.streams.get(self.device, head)
        stream.wait_stream(self.origin)
        self.used.append(stream)
        self.inputs.append((args, kwargs))
        with torch.cuda.stream(stream):
            return wrapped(*args, **kwargs)

    def join(self) -> None:
        for stream in self.used:
            self.origin.wait_stream(stream)
        self.inputs.clear()


_FORK: contextvars.ContextVar[Optional[_Fork]] = contextvars.ContextVar("vggt_turbo_heads_fork", default=None)


def _frames(images: torch.Tensor) -> int:
    """B*S of upstream's input: (B, S, 3, H, W), or (S, 3, H, W) which it unsqueezes."""
    return images.shape[0] * images.shape[1] if images.dim() == 5 else images.shape[0]


def make_model_forward(streams: Streams):
    """The ``VGGT.forward`` wrapper: forks the heads of a short call onto ``streams`` (the model's own)."""

    def model_forward(wrapped: Any, model: nn.Module, args: tuple, kwargs: dict) -> Any:
        images, _ = VGGT_FORWARD.bind(*args, **kwargs)
        if (
            not isinstance(images, torch.Tensor)
            or not images.is_cuda
            or model.training
            or torch.is_grad_enabled()
            or _frames(images) > MAX_FRAMES
            or communicating()
            or _FORK.get() is not None
        ):
            return wrapped(*args, **kwargs)
        fork = _Fork(torch.cuda.current_stream(images.device), images.device, streams)
        token = _FORK.set(fork)
        try:
            return wrapped(*args, **kwargs)
        finally:
            _FORK.reset(token)
            fork.join()

    return model_forward


def make_head_forward(head: str):
    def head_forward(wrapped: Any, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        fork = _FORK.get()
        if fork is None:
            return wrapped(*args, **kwargs)
        return fork.run(head, wrapped, args, kwargs)

    return head_forward


def _targets(root: nn.Module, config: TurboConfig) -> list[Target]:
    if not looks_like_vggt(root):
        return []
    heads = [h for h in HEADS if getattr(root, h, None) is not None]
    forward = make_model_forward(Streams(PRIORITY))
    return [Target("", "forward", forward)] + [Target(h, "forward", make_head_forward(h)) for h in heads]


PATCH = Patch(
    name="concurrent_heads",
    tier=Tier.EXACT,
    sequence_parallel=True,  # inactive in a call that exchanges tensors between ranks
    summary="camera, depth and point heads on CUDA streams of their own (1 frame)",
    requirements=(VGGT_FORWARD.requirement,)
    + members("VGGT", vggt_of, ("camera_head", None), ("depth_head", None), ("point_head", None)),
    enabled=lambda c: c.concurrent_heads,
    targets=_targets,
    conflicts=lambda c: (
        "does not run with offload_intermediates=True (the heads' inputs are fetched on the caller's stream); "
        "pass concurrent_heads=False with it" if c.offload_intermediates is True else None
    ),
)
