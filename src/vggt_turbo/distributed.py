"""What sequence parallelism needs from ``torch.distributed``: the process group, how frames and heads are split
over its ranks, the call in progress on this thread, and the three collectives of the forward.

Split: ``split(total, parts)`` gives every part ``total // parts`` and the first ``total % parts`` parts one more,
so shards differ by at most one frame (or one attention head) and rank order is frame order.

Collectives: plain c10d calls, with no autograd (none of them defines a backward). Sequence parallelism is
inference-only and refuses to run with gradients enabled, so nothing here is ever differentiated; using the
functional, differentiable collectives instead would only add graph bookkeeping. Every rank must make the same
calls in the same order: each helper here is called by every rank of the group or by none.

Devices: with the NCCL backend every tensor handed to a collective must be on the rank's current CUDA device
(``torch.cuda.set_device(local_rank)`` before the first call); with gloo, on the CPU.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import torch
import torch.distributed as dist

from .process_group import is_process_group

# None: torch.distributed's default group (what ``sequence_parallel=True`` selects).
Group = Optional["dist.ProcessGroup"]


def group_of(value: Any) -> Group:
    """The group a ``sequence_parallel`` config value names (``True``: the default group, as None); raises
    ``ValueError`` when torch.distributed is not usable, so that nothing is patched."""
    if not dist.is_available():
        raise ValueError("sequence_parallel needs torch.distributed, which this torch build lacks")
    if not dist.is_initialized():
        raise ValueError(
            "sequence_parallel needs an initialised process group: call torch.distributed.init_process_group() "
            "(e.g. under torchrun) before vggt_turbo.apply_optimizations"
        )
    return value if is_process_group(value) else None


def world_size(group: Group) -> int:
    return dist.get_world_size(group)


def split(total: int, parts: int) -> tuple[int, ...]:
    """``total`` items over ``parts`` in order: ``total // parts`` each, the first ``total % parts`` one more."""
    base, extra = divmod(total, parts)
    return tuple(base + (i < extra) for i in range(parts))


@dataclass(frozen=True)
class Shard:
    """Rank ``rank``'s frames of a sequence: ``counts[r]`` frames per rank, in rank order."""

    counts: tuple[int, ...]
    rank: int

    @classmethod
    def of(cls, frames: int, group: Group) -> "Shard":
        return cls(split(frames, dist.get_world_size(group)), dist.get_rank(group))

    @property
    def start(self) -> int:
        return sum(self.counts[: self.rank])

    @property
    def stop(self) -> int:
        return self.start + self.counts[self.rank]

    @property
    def frames(self) -> slice:
        return slice(self.start, self.stop)

    @property
    def distributed(self) -> bool:
        """Every rank holds at least one frame. Otherwise (fewer frames than ranks) the whole sequence runs on
        every rank: see ``patches.runtime.sequence_parallel``."""
        return min(self.counts) > 0


@dataclass(frozen=True)
class Call:
    """A sequence-parallel forward in progress on this thread (set by the outermost patched forward)."""

    group: Group
    shard: Shard
    output: str  # one of config.SEQUENCE_PARALLEL_OUTPUTS

    @property
    def communicates(self) -> bool:
        return self.shard.distributed


_CALL: contextvars.ContextVar[Optional[Call]] = contextvars.ContextVar("vggt_turbo_sequence_parallel", default=None)


def current() -> Optional[Call]:
    """The sequence-parallel call this thread is in, or None."""
    return _CALL.get()


def communicating() -> bool:
    """True inside a sequence-parallel call that exchanges tensors between ranks (so must not be captured in a
    CUDA graph: the other ranks' side of each collective is not part of it)."""
    call = _CALL.get()
    return call is not None and call.communicates


@contextlib.contextmanager
def calling(call: Call) -> Iterator[Call]:
    token = _CALL.set(call)
    try:
        yield call
    finally:
        _CALL.reset(token)


def agree_on_shape(shape: Sequence[int], device: torch.device, group: Group) -> None:
    """Raise ``ValueError`` on every rank unless every rank passed the same input shape.

    A rank with another frame count would wait in a collective the others never reach: a hang instead of an
    error. One small all-gather per forward prevents it (the contents are not compared: the contract is the same
    images on every rank).
    """
    mine = torch.tensor(list(shape), dtype=torch.long, device=device)
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(everyone, mine, group=group)
    shapes = [tuple(t.tolist()) for t in everyone]
    if len(set(shapes)) > 1:
        raise ValueError(
            "sequence_parallel: every rank must call the model with the same images; input shapes by rank: "
            + ", ".join(f"{r}: {s}" for r, s in enumerate(shapes))
        )


def all_to_all(send: torch.Tensor, send_numels: Sequence[int], recv_numels: Sequence[int], group: Group) -> torch.Tensor:
    """Exchange flat buffers: ``send`` (1-D) holds, in rank order, ``send_numels[j]`` elements for rank j; the
    result (1-D) holds, in rank order, ``recv_numels[i]`` elements from rank i. Uneven sizes are allowed, so no
    padding is sent."""
    recv = send.new_empty(sum(recv_numels))
    dist.all_to_all_single(recv, send, list(recv_numels), list(send_numels), group=group)
    return recv


def all_gather_frames(local: torch.Tensor, shard: Shard, group: Group) -> torch.Tensor:
    """(B, counts[rank], ...) on each rank -> (B, sum(counts), ...) on every rank, frames in rank order.

    Shards may differ by one frame and the collective needs equal sizes: each is padded to the largest (at most one
    frame per rank), gathered into one buffer, and the padding dropped after. With equal shards and B = 1 the
    buffer already is the result (a view), so a gathered output costs its own size once, not twice.
    """
    most = max(shard.counts)
    if local.shape[1] == most:
        padded = local.contiguous()
    else:
        padded = local.new_zeros((local.shape[0], most, *local.shape[2:]))
        padded[:, : local.shape[1]] = local
    ranks, batch = len(shard.counts), padded.shape[0]
    gathered = padded.new_empty((ranks * batch, *padded.shape[1:]))  # the ranks' inputs end to end on dim 0
    _all_gather_into(gathered, padded, group=group)
    if batch == 1 and min(shard.counts) == most:
        return gathered.view(1, ranks * most, *padded.shape[2:])
    parts = gathered.view(ranks, *padded.shape)
    return torch.cat([part[:, :count] for part, count in zip(parts, shard.counts)], dim=1)


# torch >= 2.13 names it all_gather_single (all_gather_into_tensor is deprecated there); older torch has only the latter.
_all_gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
