"""Wrappers that hand each VGGT head its inputs on its own device and dtype, one chunk at a time — shared by the
patches that store the aggregator's kept intermediates differently from upstream (``bf16_weights``: in bf16;
``offload_intermediates``: in host memory).

Upstream's heads read ``aggregated_tokens_list`` directly: the camera head token 0 of each frame of the last
layer, each DPT head (depth, points, the track head's feature extractor) its ``intermediate_layer_idx`` layers,
``frames_chunk_size`` frames at a time through ``_forward_impl``. These wrappers convert only what the head is
about to read, just before it runs, so no full-size converted copy of an intermediate ever exists. A tensor
already on the head's device and dtype passes through untouched (so two patches may stack these wrappers).

With ``prefetch`` (``offload_intermediates``: the layers are in host memory), a DPT head's wrapper also starts the
host-to-device copy of its next chunk of frames on a side stream before running the current chunk, so the transfer
overlaps the chunk's compute; the next call takes it if it asks for exactly those frames (upstream's loop), after
its stream waits for the copy. Anything else is fetched as without prefetching.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from ..upstream import CAMERA_HEAD_FORWARD, DPT_FORWARD_IMPL, Requirement, head_of
from ._base import Target
from ._streams import Streams


def first_param(module: nn.Module) -> torch.Tensor:
    """A parameter of ``module``: the device and dtype its head computes in."""
    return next(module.parameters())


def _fits(t: torch.Tensor, like: torch.Tensor) -> bool:
    return t.dtype == like.dtype and t.device == like.device


def camera_head_forward(wrapped: Any, head: nn.Module, args: tuple, kwargs: dict) -> Any:
    """The camera head reads only token 0 of each frame of the last layer: convert that slice alone."""
    tokens, num_iterations = CAMERA_HEAD_FORWARD.bind(*args, **kwargs)
    like = first_param(head)
    if _fits(tokens[-1], like):
        return wrapped(*args, **kwargs)
    last = tokens[-1][:, :, :1].to(device=like.device, dtype=like.dtype, non_blocking=True)
    return wrapped([*tokens[:-1], last], num_iterations)


class _Prefetched:
    """The next chunk's layers, copied to the device on a side stream: taken by the call that asks for them."""

    def __init__(self) -> None:
        self._slot: Optional[tuple[tuple, list[torch.Tensor], torch.cuda.Event]] = None

    def put(self, key: tuple, layers: list[torch.Tensor], done: torch.cuda.Event) -> None:
        self._slot = (key, layers, done)

    def take(self, key: tuple) -> Optional[list[torch.Tensor]]:
        slot, self._slot = self._slot, None
        if slot is None or slot[0] != key:
            return None
        _, layers, done = slot
        torch.cuda.current_stream(layers[0].device).wait_event(done)
        return layers


def _fetch(sources: list[torch.Tensor], like: torch.Tensor) -> list[torch.Tensor]:
    return [t.to(device=like.device, dtype=like.dtype, non_blocking=True) for t in sources]


def _prefetch_next(side: Streams, slot: _Prefetched, tokens: list, layers: list[int], like: torch.Tensor,
                   start: int, end: int) -> None:
    """Start copying the chunk after ``[start, end)`` (same length, clipped to the sequence), if there is one.
    The buffers are allocated on the current stream (whose queued work may still use the memory they reuse), so the
    side stream waits for that work before writing them."""
    frames = tokens[layers[0]].shape[1]
    if end >= frames:
        return
    following = (end, min(frames, end + (end - start)))
    sources = [tokens[i][:, following[0]:following[1]] for i in layers]
    buffers = [torch.empty(t.shape, dtype=like.dtype, device=like.device) for t in sources]
    stream = side.after_current(like.device)
    with torch.cuda.stream(stream):
        for buffer, source in zip(buffers, sources):
            buffer.copy_(source, non_blocking=True)
        done = stream.record_event()
    for buffer in buffers:  # a prefetch that is never taken must not free memory the copy still writes
        buffer.record_stream(stream)
    slot.put((tuple(id(tokens[i]) for i in layers), following), buffers, done)


def make_dpt_forward_impl(prefetch: Optional[Streams] = None):
    """The ``DPTHead._forward_impl`` wrapper of one head: convert only the layers the head reads, only for the frames
    of this chunk (the chunk's frames are then passed as the whole sequence: upstream's ``_forward_impl`` uses
    ``images`` for its shape only); with ``prefetch``, host-resident layers' next chunk is copied ahead."""
    slot = _Prefetched()

    def dpt_forward_impl(wrapped: Any, head: nn.Module, args: tuple, kwargs: dict) -> Any:
        tokens, images, patch_start_idx, start, end = DPT_FORWARD_IMPL.bind(*args, **kwargs)
        like = first_param(head)
        layers = sorted(set(head.intermediate_layer_idx))
        if all(_fits(tokens[i], like) for i in layers):
            return wrapped(*args, **kwargs)
        chunked = start is not None and end is not None
        frames = slice(start, end) if chunked else slice(None)
        sources = [tokens[i] for i in layers]
        ahead = prefetch is not None and chunked and like.is_cuda and all(not t.is_cuda for t in sources)
        fetched = slot.take((tuple(id(t) for t in sources), (start, end))) if ahead else None
        if fetched is None:
            fetched = _fetch([t[:, frames] for t in sources], like)
        if ahead:
            _prefetch_next(prefetch, slot, tokens, layers, like, start, end)
        chunk = list(tokens)
        for i, t in zip(layers, fetched):
            chunk[i] = t
        return wrapped(chunk, images[:, frames], patch_start_idx)

    return dpt_forward_impl


def head_input_targets(root: nn.Module, prefetch: Optional[Streams] = None) -> list[Target]:
    """The wrappers for every head ``root`` (a VGGT) has (each DPT head its own, with its own prefetch slot)."""
    targets = []
    if getattr(root, "camera_head", None) is not None:
        targets.append(Target("camera_head", "forward", camera_head_forward))
    for path in ("depth_head", "point_head"):
        if getattr(root, path, None) is not None:
            targets.append(Target(path, "_forward_impl", make_dpt_forward_impl(prefetch)))
    if getattr(root, "track_head", None) is not None:
        targets.append(Target("track_head.feature_extractor", "_forward_impl", make_dpt_forward_impl(prefetch)))
    return targets


HEAD_INPUT_REQUIREMENTS = (
    CAMERA_HEAD_FORWARD.requirement,
    DPT_FORWARD_IMPL.requirement,
    Requirement("DPTHead", "intermediate_layer_idx", head_of("depth_head")),
)
