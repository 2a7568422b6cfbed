"""sequence_parallel — wraps ``VGGT.forward(images, query_points=None)``, ``Aggregator.forward(images)``, the
aggregator's first attention step (``Aggregator._process_frame_attention(tokens, B, S, P, C, frame_idx, pos=None)``
in upstream's order),
``CameraHead.forward(aggregated_tokens_list, num_iterations=4)``, ``DPTHead.forward(aggregated_tokens_list,
images, patch_start_idx, frames_chunk_size=8)`` of the depth and point heads, and replaces ``Attention.forward(x,
pos=None)`` of every global block that attends across frames: the frames of one sequence are split over the ranks
of a torch.distributed process group.

Contract: every rank builds the same model, applies ``sequence_parallel=True`` (the default group) or a
``ProcessGroup``, and calls ``model(images)`` with the *same full* (B, S, 3, H, W) images. Why the full images:
a user script stays the single-GPU script (load the images, call the model); the images are small next to the
activations (3 MB per 518 px frame against ~90 MB of activations); each rank slices its own frames, so no scatter
is needed. Only the shapes are compared across ranks (a mismatch would otherwise hang in a collective).
Rank r takes ``S // N`` consecutive frames, the first ``S % N`` ranks one more (``distributed.Shard``).

What runs where:
  - patch embed, frame blocks, the global blocks listed in ``global_to_frame_layers`` (frame attention, no
    communication) and the depth and point heads: on the rank's own frames only.
  - global attention, exact, DeepSpeed-Ulysses style: q, k, v of the local frames are computed locally (qkv,
    qk-norm, RoPE with the frames' own positions), then one all-to-all gives each rank *all* frames for its share
    of the heads, the same fused attention kernel as in one process (the config's ``AttentionPolicy``,
    ``kernels/attention``) runs on that, and a second all-to-all returns each rank its frames for all heads before
    ``proj``. The heads are split like the frames: 16 heads on
    3 GPUs is 6/5/5, exact like any split, at the price of imbalance (the slowest rank has ``ceil(H/N)`` heads).
    More ranks than heads is refused at apply time.
  - special tokens: upstream gives frame 0 of each sequence its own camera and register tokens
    (``slice_expand_and_flatten``) and every other frame the "other" ones; the rank holding frame 0 keeps that,
    every other rank's first frame gets the "other" tokens (written before the first block runs).
  - camera head: its trunk attends across frames, so the last layer's camera tokens (B, S, 2C: tiny) are
    all-gathered and every rank runs it on all frames.
  - output (``sequence_parallel_output``): ``"gathered"`` (default) returns upstream's dict on every rank, so a
    script written for one GPU needs no change (and ``all_gather`` is symmetric, where a gather to rank 0 is not a
    native NCCL collective); ``"sharded"`` returns each rank its own frames (``pose_enc``, the dense maps and
    ``images`` sliced to ``distributed.Shard.frames``), which saves each rank the memory of everyone's maps.

Why Ulysses rather than ring attention: each rank sends 4 n C (N-1)/N values per global layer (q, k, v out,
the output back; n its tokens, C the width), where ring attention receives every other rank's K and V, 2 n C (N-1):
the same at N = 2, less beyond. Above all it calls the fused SDPA kernel as it is, each head exactly as on one GPU,
where ring attention needs a kernel that returns the log-sum-exp and merges partial softmaxes (other rounding,
a custom kernel per backend). Ring attention can hide its exchanges behind compute; here they are exposed, which
costs milliseconds per layer against seconds of attention at the lengths that need several GPUs. Its limit,
N <= heads, is no limit for VGGT's 16 heads.

Why faster: global attention is O((S*P)^2) and dominates long sequences; each rank computes 1/N of the heads over
the full sequence and 1/N of every frame-local op, so the forward's time and the per-rank activations fall by
about N (the gathered outputs excepted); communication is two all-to-alls per global layer.

Exact: the same operations on the same values; only the attention kernel's batching and the matmuls' row counts
differ (fp32 on the CPU agrees to ~1e-7). The track head is not run (``query_points`` is refused): it correlates
dense feature maps of all frames (34 MB per 518 px frame in fp32), which every rank would have to gather; run
tracking on one GPU.

Refused: training mode or autograd on (collectives here have no backward), ``query_points`` with a track head,
different input shapes on different ranks (at call time); no initialised process group, more ranks than heads,
and patches not verified with sequence parallelism (``Patch.sequence_parallel``; at apply time). ``cuda_graphs`` does not
capture a call that communicates (it runs eagerly). With fewer frames than ranks the whole sequence runs on every
rank through the other patches, as without this one (shapes are still compared; ``"sharded"`` still slices); with
one rank nothing changes but the refusals.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch
from torch import nn

from ...autocast import autocast_dtype
from ...config import TurboConfig
from ...distributed import (
    Call,
    Group,
    Shard,
    agree_on_shape,
    all_gather_frames,
    all_to_all,
    calling,
    current,
    group_of,
    split,
    world_size,
)
from ...kernels.attention import AttentionPolicy
from ...upstream import (
    AGGREGATOR_FORWARD,
    AGGREGATOR_LAYOUT,
    AGGREGATOR_STEPS,
    ATTENTION_FORWARD,
    ATTENTION_MEMBERS,
    CAMERA_HEAD_FORWARD,
    DPT_FORWARD,
    FRAME_STEP,
    GLOBAL_STEP,
    VGGT_FORWARD,
    Method,
    aggregator_of,
    looks_like_vggt,
    members,
)
from .._base import Patch, Target, Tier, aggregator_path, join
from .._fused_qkv import fits, fused_qkv
from .._head_inputs import first_param

log = logging.getLogger(__name__)


def _check_inference(module: nn.Module) -> None:
    if module.training or torch.is_grad_enabled():
        raise RuntimeError(
            "vggt_turbo sequence_parallel is inference-only: call the model in eval mode under torch.no_grad() or "
            "torch.inference_mode() (its collectives have no backward)"
        )


def _begin(images: torch.Tensor, group: Group, output: str) -> Call:
    """Check that every rank got the same shape and cut the sequence: the call every wrapper below reads."""
    if images.dim() != 5:
        raise ValueError(f"expected images of shape (B, S, 3, H, W), got {tuple(images.shape)}")
    agree_on_shape(images.shape, images.device, group)
    return Call(group, Shard.of(images.shape[1], group), output)


def _place(t: torch.Tensor, call: Call, local: bool) -> torch.Tensor:
    """A per-frame output (frames on dim 1) where ``call.output`` wants it: this rank's frames (``local``) are
    all-gathered for ``"gathered"``; every frame's are sliced to this rank's for ``"sharded"``."""
    if local and call.output == "gathered":
        return all_gather_frames(t, call.shard, call.group)
    if not local and call.output == "sharded":
        return t[:, call.shard.frames]
    return t


# --- the forwards that set up a call --------------------------------------------------------------------------


def make_vggt_wrapper(group: Group, output: str):
    """``VGGT.forward``: check the call, cut the sequence, run upstream's forward (the aggregator and heads below
    do the rest)."""

    def vggt_forward(wrapped: Any, model: nn.Module, args: tuple, kwargs: dict) -> Any:
        images, query_points = VGGT_FORWARD.bind(*args, **kwargs)
        _check_inference(model)
        if query_points is not None and getattr(model, "track_head", None) is not None:
            raise ValueError(
                "vggt_turbo sequence_parallel does not run the track head (it correlates dense feature maps of all "
                "frames): call without query_points, or run tracking on one rank without sequence_parallel"
            )
        if world_size(group) == 1:
            return wrapped(*args, **kwargs)
        with calling(_begin(images if images.dim() == 5 else images.unsqueeze(0), group, output)) as call:
            predictions = wrapped(*args, **kwargs)
        if "images" in predictions:  # upstream echoes the input; sharded: this rank's frames, like the maps
            predictions["images"] = _place(predictions["images"], call, local=False)
        return predictions

    return vggt_forward


def make_aggregator_wrapper(group: Group, output: str):
    """``Aggregator.forward``: inside a call, run the patched stack below on this rank's frames only; called on its
    own (an Aggregator patched alone, or ``model.aggregator(images)``), set up the call and place the outputs."""

    def aggregator_forward(wrapped: Any, agg: nn.Module, args: tuple, kwargs: dict) -> Any:
        images = AGGREGATOR_FORWARD.bind(*args, **kwargs)[0]
        call = current()
        if call is not None:
            return wrapped(images[:, call.shard.frames]) if call.communicates else wrapped(*args, **kwargs)
        _check_inference(agg)
        if world_size(group) == 1:
            return wrapped(*args, **kwargs)
        with calling(_begin(images, group, output)) as call:
            outputs, patch_start_idx = aggregator_forward(wrapped, agg, args, kwargs)
            # on the images' device: offload_intermediates leaves a whole VGGT's layers in host memory
            placed = [None if t is None else _place(t.to(images.device), call, call.communicates) for t in outputs]
            return placed, patch_start_idx

    return aggregator_forward


# --- what changes inside a call -------------------------------------------------------------------------------


def make_first_step(step: Method):
    """The wrapper of the aggregator's first attention step (``step``: ``FRAME_STEP`` or ``GLOBAL_STEP``, as
    ``aa_order`` says): on a rank whose frames start after frame 0, give each sequence's first local frame the
    "other frames" camera and register tokens (the embedding gave it frame 0's), in place."""

    def first_step(wrapped: Any, agg: nn.Module, args: tuple, kwargs: dict) -> Any:
        tokens, B, S, P, C, idx, _ = step.bind(*args, **kwargs)
        call = current()
        if idx == 0 and call is not None and call.communicates and call.shard.start > 0:
            first = tokens.view(B, S, P, C)[:, 0]
            cameras = agg.camera_token.shape[2]
            first[:, :cameras] = agg.camera_token[0, 1]
            first[:, cameras : agg.patch_start_idx] = agg.register_token[0, 1]
        return wrapped(*args, **kwargs)

    return first_step


def camera_head_forward(wrapped: Any, head: nn.Module, args: tuple, kwargs: dict) -> Any:
    """The trunk attends across frames: give it every frame's camera token (it reads only token 0 of the last layer;
    from the head's device: ``offload_intermediates`` may have left the layer in host memory)."""
    call = current()
    if call is None:
        return wrapped(*args, **kwargs)
    tokens, num_iterations = CAMERA_HEAD_FORWARD.bind(*args, **kwargs)
    if call.communicates:
        local = tokens[-1][:, :, :1].to(first_param(head).device)
        tokens = [all_gather_frames(local, call.shard, call.group)]
    return [_place(pose, call, local=False) for pose in wrapped(tokens, num_iterations)]


def dpt_head_forward(wrapped: Any, head: nn.Module, args: tuple, kwargs: dict) -> Any:
    """Per-frame head: this rank's tokens with this rank's images; the maps placed as the output option says."""
    call = current()
    if call is None:
        return wrapped(*args, **kwargs)
    tokens, images, patch_start_idx, frames_chunk_size = DPT_FORWARD.bind(*args, **kwargs)
    if call.communicates:
        images = images[:, call.shard.frames]
    preds, conf = wrapped(tokens, images, patch_start_idx, frames_chunk_size)
    return _place(preds, call, call.communicates), _place(conf, call, call.communicates)


def _attention_dtype(q: torch.Tensor, v: torch.Tensor) -> torch.dtype:
    """What SDPA computes in: autocast's dtype when autocast is on for the device (SDPA would cast to it itself, so
    casting before sending is exact and halves the bytes sent), else the inputs' common dtype."""
    return autocast_dtype(q.device.type) or torch.promote_types(q.dtype, v.dtype)


def _heads_to_ranks(attn: nn.Module, x: torch.Tensor, pos: Optional[torch.Tensor], heads: tuple[int, ...],
                    tokens: tuple[int, ...], call: Call, fuse: bool) -> torch.Tensor:
    """Local tokens, all heads -> every rank's tokens, this rank's heads: q, k, v stacked as (3, B, h, N, D).
    ``fuse``: qk-norm and RoPE as ``fused_qk_norm_rope`` computes them (the single-process model's rounding)."""
    B, n, _ = x.shape
    D = attn.head_dim
    fused = fused_qkv(attn, x, pos) if fuse and fits(attn) else None
    if fused is not None:
        q, k, v = fused
    else:
        q, k, v = attn.qkv(x).reshape(B, n, 3, attn.num_heads, D).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        if attn.rope is not None:  # one at a time, so the pre-RoPE q is freed before k is rotated
            q = attn.rope(q, pos)
            k = attn.rope(k, pos)
    send_numels = [n * B * 3 * h * D for h in heads]
    send = q.new_empty(sum(send_numels), dtype=_attention_dtype(q, v))
    first = 0
    for part, h in zip(send.split(send_numels), heads):  # rank j's block: (n, B, 3, h_j, D), token-major
        mine = slice(first, first + h)
        torch.stack([t[:, mine].permute(2, 0, 1, 3) for t in (q, k, v)], dim=2, out=part.view(n, B, 3, h, D))
        first += h
    del q, k, v  # the projection and the normed, rotated q and k: freed before the receive buffer exists
    h = heads[call.shard.rank]
    recv = all_to_all(send, send_numels, [t * B * 3 * h * D for t in tokens], call.group)
    return recv.view(sum(tokens), B, 3, h, D).permute(2, 1, 3, 0, 4)  # blocks in rank order = frame order


def _tokens_to_ranks(out: torch.Tensor, heads: tuple[int, ...], tokens: tuple[int, ...], call: Call) -> torch.Tensor:
    """This rank's heads, every rank's tokens (B, h, N, D) -> local tokens, all heads (B, n, H * D)."""
    B, h, _, D = out.shape
    n = tokens[call.shard.rank]
    send = out.permute(2, 0, 1, 3).contiguous().view(-1)  # (N, B, h, D): rank i's tokens are one block
    recv_numels = [n * B * hj * D for hj in heads]
    recv = all_to_all(send, [t * B * h * D for t in tokens], recv_numels, call.group)
    parts = [part.view(n, B, hj, D) for part, hj in zip(recv.split(recv_numels), heads)]
    return torch.cat(parts, dim=2).transpose(0, 1).reshape(B, n, -1)  # heads in order, as upstream's reshape


def make_attention_wrapper(policy: AttentionPolicy, fuse: bool):
    """``Attention.forward`` of a global block: Ulysses attention inside a call that communicates, else as below."""

    def attention_forward(wrapped: Any, attn: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
        call = current()
        if call is None or not call.communicates:
            return wrapped(*args, **kwargs)
        x, pos = ATTENTION_FORWARD.bind(*args, **kwargs)
        counts, rank = call.shard.counts, call.shard.rank
        per_frame = x.shape[1] // counts[rank]  # tokens per frame: x is (B, S_local * P, C)
        tokens = tuple(c * per_frame for c in counts)
        heads = split(attn.num_heads, len(counts))
        received = _heads_to_ranks(attn, x, pos, heads, tokens, call, fuse)
        out = policy.attend(*received.unbind(0))
        del received  # this rank's heads over the whole sequence: not needed past the kernel
        return attn.proj_drop(attn.proj(_tokens_to_ranks(out, heads, tokens, call)))

    return attention_forward


# --- the patch ------------------------------------------------------------------------------------------------


def _targets(root: nn.Module, config: TurboConfig) -> list[Target]:
    group = group_of(config.sequence_parallel)
    agg, aggregator = aggregator_path(root), aggregator_of(root)
    heads, ranks = aggregator.global_blocks[0].attn.num_heads, world_size(group)
    if ranks > heads:
        raise ValueError(
            f"sequence_parallel over {ranks} ranks needs at least as many attention heads; this model has {heads}"
        )
    if config.cuda_graphs:
        log.info("vggt_turbo sequence_parallel: calls that communicate run eagerly (cuda_graphs cannot capture them)")
    output = config.sequence_parallel_output
    attention = make_attention_wrapper(AttentionPolicy.from_config(config), config.fused_qk_norm_rope)
    local = set(config.global_to_frame_layers)
    step = {"frame": FRAME_STEP, "global": GLOBAL_STEP}[aggregator.aa_order[0]]
    targets = [
        Target(agg, step.name, make_first_step(step)),
        *(
            Target(join(agg, "global_blocks", str(i), "attn"), "forward", attention)
            for i in range(len(aggregator.global_blocks))
            if i not in local
        ),
        Target(agg, "forward", make_aggregator_wrapper(group, output)),
    ]
    if looks_like_vggt(root):
        if root.camera_head is not None:
            targets.append(Target("camera_head", "forward", camera_head_forward))
        targets += [Target(h, "forward", dpt_head_forward) for h in ("depth_head", "point_head") if getattr(root, h) is not None]
        targets.append(Target("", "forward", make_vggt_wrapper(group, output)))
    return targets


PATCH = Patch(
    name="sequence_parallel",
    tier=Tier.EXACT,
    sequence_parallel=True,
    summary="a sequence's frames split over the ranks of a process group; global attention exchanges heads (Ulysses)",
    options={"sequence_parallel_output": "`gathered` (every rank gets every frame) or `sharded`"},
    requirements=AGGREGATOR_LAYOUT
    + AGGREGATOR_STEPS
    + members("Aggregator", aggregator_of, ("camera_token", None), ("register_token", None), ("patch_start_idx", None))
    + ATTENTION_MEMBERS
    + (VGGT_FORWARD.requirement, CAMERA_HEAD_FORWARD.requirement, DPT_FORWARD.requirement),
    enabled=lambda c: c.sequence_parallel is not False,
    targets=_targets,
)
