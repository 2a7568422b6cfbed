"""kv_subsample — replaces ``Attention.forward(x, pos=None)`` of the global blocks it applies to (and wraps
``Aggregator.forward(images)`` to tell them the patch grid).

APPROXIMATION (changes outputs; off in the "exact" preset). It is AVGGT's second step (arXiv 2512.02541: "subsampling
K/V over patch tokens with diagonal preservation and a mean-fill component"; the method section, Sec. 4, as the
reimplementations cite it). Every query of the sequence (all S*P tokens, special ones included) attends, in one
softmax, to

  1. the kept keys/values: every frame's special tokens (camera and registers, the first ``patch_start_idx`` of
     the frame) and the patch tokens on a grid of stride r over the frame's h x w patch grid (rows 0, r, 2r, ...,
     columns 0, r, 2r, ...): ``patch_start_idx + ceil(h/r) * ceil(w/r)`` tokens per frame, about 1/r² of them;
  2. diagonal preservation: its own key/value, when its token is not kept (a kept token already sees itself;
     its key is not counted twice);
  3. mean-fill: one more key/value pair, the mean of the keys and the mean of the values of all dropped patch
     tokens of the sequence (per batch element and head), with its plain score ``q·k̄/sqrt(d)``.

``r = TurboConfig.kv_subsample``. Where the paper leaves a choice open in what this project could read of it (the
abstract and public reimplementations; the full text was not available when this was written), the choice is
named here: mean-fill is one key with its plain score (not raised by log(number dropped)), and the diagonal term
is added only for queries whose own key was dropped. Nothing is dropped (too few patches for the stride): upstream
runs. The error is reported by the benchmarks and the fidelity harness (``vggt_turbo.bench.fidelity``).

Why faster: global attention costs O(N²) for N = S*P tokens; here the shared keys are about N/r², and the extra
two keys per query cost O(N·d). The mean-fill pair is the same for all queries of a sequence and head, so it is
one more key/value of the shared ones (the means taken in fp32, rounded to the attention dtype). The attention
over the shared keys runs on a fused kernel that also returns each query's log-sum-exp
(``AttentionPolicy.attend_with_lse``, ``kernels/attention``), and the own key's score (fp32) is merged with it by
log-sum-exp: no (N x keys) score matrix ever exists. The kept-token index is built on the device once per forward
(no host sync, no host-to-device copy: ``cuda_graphs`` can capture it).

Layers: ``kv_subsample_layers``, or when empty every global layer not in ``global_to_frame_layers`` (those run as
frame attention; a layer in both lists is refused by ``TurboConfig``). The attention kernel follows ``sdpa``
(the config's ``AttentionPolicy``): with it on, ``sdpa_backend`` picks the kernel here too; with it off,
FlashAttention-4 where ``flash_attention_4`` is on and the package runs the call (it returns the log-sum-exp),
else torch's flash or efficient kernel, or the math reference. For the listed layers this wrapper (stacked above
``sdpa``'s and ``fused_qk_norm_rope``'s) computes q, k and v and the attention itself: with ``fused_qk_norm_rope``
on, q, k and v come from its kernel (``_fused_qkv.fused_qkv``: strided views of the projection output,
qk-norm and RoPE in fp32 rounded once, no fp32 temporaries), where that applies (inference, the table length
published by ``sync_free_rope``); else from upstream's projection, qk-norm and RoPE modules. In training mode, or
called outside its aggregator's forward, the wrapped forward runs.

Memory (``subsampled_attention``): besides its output, the gathered shared keys and values (2/r² of a
(B, H, N, d) tensor) while the kernel runs, then a few (B, H, N) float32 vectors; the own scores come from float32
copies of bounded chunks of q, and the log-sum-exp merge (float32 weights) runs in place on the kernel's output.
"""

from __future__ import annotations

import contextvars
import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from ...autocast import autocast_dtype
from ...config import TurboConfig
from ...kernels.attention import AttentionPolicy
from ...upstream import (
    AGGREGATOR_FORWARD,
    AGGREGATOR_LAYOUT,
    ATTENTION_FORWARD,
    ATTENTION_MEMBERS,
    aggregator_of,
    members,
)
from .._base import Patch, Target, Tier, aggregator_path, join
from .._fused_qkv import fits, fused_qkv


@dataclass(frozen=True)
class KeptTokens:
    """Which of a sequence's N tokens keep their key/value: ``index`` (sorted, on the device), ``kept`` (N bools)
    and how many patch tokens are dropped (the mean-fill's count)."""

    index: torch.Tensor
    kept: torch.Tensor
    dropped: int


def kept_tokens(frames: int, specials: int, height: int, width: int, stride: int, device: torch.device) -> KeptTokens:
    """The kept tokens of ``frames`` frames of ``specials`` special tokens then a ``height`` x ``width`` patch grid
    (row-major, upstream's token order), with patches kept every ``stride`` rows and columns."""
    rows = torch.arange(0, height, stride, device=device)
    cols = torch.arange(0, width, stride, device=device)
    per_frame = specials + height * width
    local = torch.cat([torch.arange(specials, device=device), specials + (rows[:, None] * width + cols).flatten()])
    index = (torch.arange(frames, device=device)[:, None] * per_frame + local).flatten()
    patch = torch.arange(frames * per_frame, device=device) % per_frame - specials
    kept = (patch < 0) | (((patch // width) % stride == 0) & ((patch % width) % stride == 0))
    dropped = frames * (height * width - math.ceil(height / stride) * math.ceil(width / stride))
    return KeptTokens(index, kept, dropped)


@dataclass
class _Grid:
    """Published by the patched ``Aggregator.forward`` for the duration of its call."""

    aggregator: nn.Module
    height: int  # patches per column
    width: int  # patches per row
    cache: dict = field(default_factory=dict)  # (frames, stride, device) -> KeptTokens, for this call's layers

    def kept(self, tokens: int, stride: int, device: torch.device) -> KeptTokens:
        specials = self.aggregator.patch_start_idx
        per_frame = specials + self.height * self.width
        frames, rest = divmod(tokens, per_frame)
        if rest or not frames:
            raise RuntimeError(
                f"vggt_turbo kv_subsample: a global attention got {tokens} tokens, not whole frames of {per_frame} "
                f"({specials} special tokens and a {self.height}x{self.width} patch grid)"
            )
        key = (frames, stride, device)
        if key not in self.cache:
            self.cache[key] = kept_tokens(frames, specials, self.height, self.width, stride, device)
        return self.cache[key]


_GRID: contextvars.ContextVar[Optional[_Grid]] = contextvars.ContextVar("vggt_turbo_kv_grid", default=None)


def aggregator_forward(wrapped: Any, aggregator: nn.Module, args: tuple, kwargs: dict) -> Any:
    images = AGGREGATOR_FORWARD.bind(*args, **kwargs)[0]
    size = aggregator.patch_size
    token = _GRID.set(_Grid(aggregator, images.shape[-2] // size, images.shape[-1] // size))
    try:
        return wrapped(*args, **kwargs)
    finally:
        _GRID.reset(token)


def subsampled_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tokens: KeptTokens, policy: AttentionPolicy
) -> torch.Tensor:
    """(B, H, N, d) attention of every query over the kept keys, its own key when dropped and the dropped keys'
    mean (see the module docstring), merged by log-sum-exp; q, k, v of one dtype, any strides.

    The mean-fill pair is the same for every query of a sequence and head: it is one more key and value of the
    kernel's (appended to the kept ones, in q's dtype), so the kernel's softmax and log-sum-exp cover it. Only
    the own key is merged here. Memory: besides the output, the gathered keys and values (2/r² of a (B, H, N, d)
    tensor) while the kernel runs, then a few (B, H, N) float32 vectors and a float32 copy of a bounded chunk of
    q (``_SCORE_CHUNK`` elements); the merge runs in place on the kernel's output."""
    index = torch.cat([tokens.index, tokens.index[:1]])  # the kept tokens, then a row for the mean (filled below)
    k_shared, v_shared = k.index_select(2, index), v.index_select(2, index)
    for full, shared in ((k, k_shared), (v, v_shared)):
        # The dropped tokens' sums are all tokens' minus the kept ones' (no gather of the ~N dropped rows), in fp32.
        kept_sum = shared[:, :, :-1].sum(2, dtype=torch.float32)
        shared[:, :, -1] = (full.sum(2, dtype=torch.float32) - kept_sum) / tokens.dropped
    out, lse = policy.attend_with_lse(q, k_shared, v_shared)
    del k_shared, v_shared
    with torch.autocast(q.device.type, enabled=False):  # fp32 scores and weights are meant
        # Laid out in memory as out is (token-major from most kernels): the merge reads them along out's rows.
        own = _own_scores(q, k, _empty_like_rows(out)).masked_fill_(tokens.kept, -math.inf)
        top = torch.maximum(own, lse, out=torch.empty_like(own))
        w_shared = torch.sub(lse, top, out=torch.empty_like(own)).exp_()
        w_own = own.sub_(top).exp_()
        total = torch.add(w_shared, w_own, out=top)
        # In place, each op computing in fp32 and rounding once to out's dtype (the kernel's output is fresh).
        out.mul_(w_shared.div_(total).unsqueeze(-1))
        return out.addcmul_(v, w_own.div_(total).unsqueeze(-1))


_SCORE_CHUNK = 2**24  # elements of one float32 chunk of q in ``_own_scores`` (64 MiB)


def _empty_like_rows(t: torch.Tensor, rows: Optional[int] = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An empty (B, H, N) tensor, or (B, H, rows, d) when ``rows`` is given, for a (B, H, N, d) ``t``, whose memory
    runs over the dims in the order of ``t``'s strides: token-major for a token-major ``t``."""
    shape = list(t.shape[:-1]) if rows is None else [*t.shape[:2], rows, t.shape[3]]
    order = sorted(range(len(shape)), key=lambda i: t.stride(i), reverse=True)  # outermost first
    memory = torch.empty([shape[i] for i in order], dtype=dtype, device=t.device)
    return memory.permute([order.index(i) for i in range(len(shape))])


def _own_scores(q: torch.Tensor, k: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """Each query's scaled score against its own key, in float32, written into the (B, H, N) ``own``; a chunk of
    tokens at a time: a float32 copy of the chunk's queries (laid out as q) is the only (chunk, d) temporary, the
    products with the keys being taken in place in it (exact: a product of two bf16 values fits in float32)."""
    B, H, N, d = q.shape
    rows = max(1, _SCORE_CHUNK // (B * H * d))
    for start in range(0, N, rows):
        chunk = slice(start, start + rows)
        q32 = _empty_like_rows(q, min(rows, N - start)).copy_(q[:, :, chunk])
        torch.sum(q32.mul_(k[:, :, chunk]), dim=-1, out=own[:, :, chunk])
    return own.mul_(d**-0.5)


def _qkv(attn: nn.Module, x: torch.Tensor, pos: Optional[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Upstream's q, k, v (projection, qk-norm, RoPE), cast to what its SDPA would compute in."""
    B, N, _ = x.shape
    q, k, v = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if attn.rope is not None:
        q, k = attn.rope(q, pos), attn.rope(k, pos)
    dtype = autocast_dtype(x.device.type) or torch.promote_types(q.dtype, v.dtype)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def make_wrapper(stride: int, policy: AttentionPolicy, fused: bool = False):
    """The ``Attention.forward`` wrapper of the subsampled global layers (``fused``: q, k and v from
    ``_fused_qkv.fused_qkv`` where it applies, else from upstream's modules), attending as ``policy`` picks."""

    def attention_forward(wrapped: Any, attn: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
        grid = _GRID.get()
        if attn.training or grid is None or not any(b.attn is attn for b in grid.aggregator.global_blocks):
            return wrapped(*args, **kwargs)
        x, pos = ATTENTION_FORWARD.bind(*args, **kwargs)
        B, N, C = x.shape
        tokens = grid.kept(N, stride, x.device)
        if not tokens.dropped:
            return wrapped(*args, **kwargs)
        qkv = fused_qkv(attn, x, pos) if fused and fits(attn) else None
        q, k, v = qkv if qkv is not None else _qkv(attn, x, pos)
        out = subsampled_attention(q, k, v.to(q.dtype), tokens, policy)
        return attn.proj_drop(attn.proj(out.transpose(1, 2).reshape(B, N, C)))

    return attention_forward


def layers(root: nn.Module, config: TurboConfig) -> list[int]:
    """The global layers subsampled for ``config`` (``ValueError`` for one past the model's depth)."""
    depth = len(aggregator_of(root).global_blocks)
    bad = [i for i in config.kv_subsample_layers if i >= depth]
    if bad:
        raise ValueError(
            f"kv_subsample_layers {bad} out of range: this model has {depth} global blocks (0-{depth - 1})"
        )
    return list(config.kv_subsample_layers) or [i for i in range(depth) if i not in config.global_to_frame_layers]


def _targets(root: nn.Module, config: TurboConfig) -> list[Target]:
    agg = aggregator_path(root)
    attention = make_wrapper(config.kv_subsample, AttentionPolicy.from_config(config), config.fused_qk_norm_rope)
    return [
        Target(agg, "forward", aggregator_forward),
        *(Target(join(agg, "global_blocks", str(i), "attn"), "forward", attention) for i in layers(root, config)),
    ]


PATCH = Patch(
    name="kv_subsample",
    tier=Tier.APPROXIMATE,
    summary=(
        "global attention over every frame's special tokens and every r-th patch row and column, plus each "
        "query's own key and the dropped keys' mean (AVGGT)"
    ),
    options={"kv_subsample_layers": "the global layers it applies to (default: all not in `global_to_frame_layers`)"},
    # the aggregator layout and the Attention parts that sdpa's forward reads too, and the grid's geometry
    requirements=AGGREGATOR_LAYOUT
    + ATTENTION_MEMBERS
    + (AGGREGATOR_FORWARD.requirement,)
    + members("Aggregator", aggregator_of, ("patch_size", None), ("patch_start_idx", None)),
    enabled=lambda c: c.kv_subsample > 1,
    targets=_targets,
)
