"""``kv_subsample`` computes AVGGT's subsampled global attention (kept grid keys, own key, mean-fill), checked
against an independent dense reference that builds the full score matrix with an explicit mask; and it keeps its
promises: fused kernels only, nothing dropped means upstream, validation, composition, B > 1 and H != W, revert.
"""

from __future__ import annotations

import copy
import math
from typing import Optional

import pytest
import torch
from torch import nn

from helpers import NO_FLAGS, assert_close, assert_equal, errors, patched_methods, run
from test_equivalence import FrameAttention

import vggt_turbo
from vggt_turbo import TurboConfig
from vggt_turbo.config import FAST_GLOBAL_TO_FRAME_LAYERS, FAST_KV_SUBSAMPLE
from vggt_turbo.kernels.attention import AttentionPolicy
from vggt_turbo.patches.approximate import kv_subsample
from vggt_turbo.random_model import random_images

DEPTH = 24
CPU_KERNEL = "_scaled_dot_product_flash_attention_for_cpu"


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str) -> tuple[torch.Tensor, ...]:
    """Attention and log-sum-exp on ``backend`` (an ``sdpa_backend`` value; ``"auto"``: unforced)."""
    return AttentionPolicy.for_backend(backend).attend_with_lse(q, k, v)


def kept_mask(frames: int, specials: int, height: int, width: int, stride: int) -> torch.Tensor:
    """Token by token, in upstream's order (per frame: specials, then the patch grid row by row)."""
    kept = []
    for _ in range(frames):
        kept += [True] * specials
        kept += [row % stride == 0 and col % stride == 0 for row in range(height) for col in range(width)]
    return torch.tensor(kept)


def dense_subsampled_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """The attention of every (B, H, N, d) query over the kept keys, its own key and the dropped keys' mean, as one
    softmax over an explicit score matrix (in the inputs' dtype: give it fp32 or fp64)."""
    N, d = q.shape[-2:]
    allowed = kept[None, :] | torch.eye(N, dtype=torch.bool)
    scores = (q @ k.transpose(-2, -1) * d**-0.5).masked_fill(~allowed, -math.inf)
    k_mean = k[:, :, ~kept].mean(dim=2, keepdim=True)
    v_mean = v[:, :, ~kept].mean(dim=2, keepdim=True)
    weights = torch.cat([scores, q @ k_mean.transpose(-2, -1) * d**-0.5], dim=-1).softmax(dim=-1)
    return weights[..., :N] @ v + weights[..., N:] * v_mean


class DenseSubsampledAttention(nn.Module):
    """Upstream's ``Attention`` (its own projection, qk-norm and RoPE modules), then
    ``dense_subsampled_attention``."""

    def __init__(self, attn: nn.Module, kept: torch.Tensor) -> None:
        super().__init__()
        self.attn, self.kept = attn, kept

    def forward(self, x: torch.Tensor, pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        a, (B, N, C) = self.attn, x.shape
        q, k, v = a.qkv(x).reshape(B, N, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = a.rope(a.q_norm(q), pos), a.rope(a.k_norm(k), pos)
        out = dense_subsampled_attention(q, k, v, self.kept)
        return a.proj(out.transpose(1, 2).reshape(B, N, C))


def reference_model(pristine: nn.Module, config: TurboConfig, images: torch.Tensor) -> nn.Module:
    """A copy of upstream whose global blocks do by hand what ``config`` asks: frame attention for
    ``global_to_frame_layers``, dense subsampled attention for the subsampled layers."""
    ref = copy.deepcopy(pristine)
    agg = ref.aggregator
    frames, (height, width) = images.shape[1], (s // agg.patch_size for s in images.shape[-2:])
    kept = kept_mask(frames, agg.patch_start_idx, height, width, config.kv_subsample)
    subsampled = config.kv_subsample_layers or [i for i in range(DEPTH) if i not in config.global_to_frame_layers]
    for i in subsampled:
        agg.global_blocks[i].attn = DenseSubsampledAttention(agg.global_blocks[i].attn, kept)
    for i in config.global_to_frame_layers:
        agg.global_blocks[i] = FrameAttention(agg.global_blocks[i], frames)
    return ref


CONFIGS = {
    "alone": NO_FLAGS.replace(kv_subsample=2),
    "stride-3-some-layers": NO_FLAGS.replace(kv_subsample=3, kv_subsample_layers=(0, 11, 23)),
    "exact+kv": TurboConfig.preset("exact").replace(kv_subsample=2),
    "fast": TurboConfig.preset("fast"),
    "with-frame-layers": NO_FLAGS.replace(global_to_frame_layers=(0, 1), kv_subsample=2, kv_subsample_layers=(5, 23)),
    "sdpa-math-kernel": NO_FLAGS.replace(kv_subsample=2, sdpa=True, sdpa_backend="math"),
    "sdpa-flash-kernel": NO_FLAGS.replace(kv_subsample=4, sdpa=True, sdpa_backend="flash"),
}


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_equals_dense_reference(pristine, model, images, query_points, reference, config: TurboConfig) -> None:
    expected = run(reference_model(pristine, config, images), images, query_points)
    vggt_turbo.apply_optimizations(model, config)
    out = run(model, images, query_points)
    assert_close(out, expected)
    from_upstream = errors(out, reference)  # an approximation that changes nothing would not be tested at all
    assert from_upstream["pose_enc"] > 1e-4 and max(from_upstream.values()) > 1e-3, from_upstream


@pytest.mark.parametrize("config", [CONFIGS["alone"], CONFIGS["fast"]], ids=["alone", "fast"])
def test_batch_of_non_square_sequences(pristine, model, config: TurboConfig) -> None:
    """B = 2, S = 3, a 4 x 3 patch grid (56 x 42): rows and columns subsampled with their own lengths."""
    images = random_images(3, batch=2, seed=1)[..., :42]
    query_points = torch.tensor([[[5.0, 7.0], [40.0, 20.0]], [[11.0, 50.0], [30.0, 30.0]]])
    expected = run(reference_model(pristine, config, images), images, query_points)
    vggt_turbo.apply_optimizations(model, config)
    assert_close(run(model, images, query_points), expected)


def test_stride_one_is_off(model, images, query_points, reference) -> None:
    cfg = NO_FLAGS.replace(kv_subsample=1)
    assert cfg.is_exact
    vggt_turbo.apply_optimizations(model, cfg)
    assert "kv_subsample" not in vggt_turbo.describe(model).targets
    assert_equal(run(model, images, query_points), reference)


def test_nothing_dropped_runs_upstream(model, monkeypatch) -> None:
    """A 1 x 1 patch grid keeps its only patch at any stride: upstream's attention runs, bit for bit."""
    images = random_images(3, size=14, seed=4)
    expected = run(model, images)
    vggt_turbo.apply_optimizations(model, NO_FLAGS.replace(kv_subsample=4))
    calls = counting(monkeypatch, CPU_KERNEL)
    assert_equal(run(model, images), expected)
    assert calls == []


def counting(monkeypatch: pytest.MonkeyPatch, op_name: str) -> list[tuple]:
    """Spy on ``torch.ops.aten.<op_name>``: the list of the key shapes it was called with."""
    calls: list[tuple] = []
    original = getattr(torch.ops.aten, op_name)

    class Spy:
        default = original.default  # the schema is read from here

        def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs: object) -> object:
            calls.append(tuple(k.shape))
            return original(q, k, v, **kwargs)

    monkeypatch.setattr(torch.ops.aten, op_name, Spy())
    return calls


def test_fused_kernel_over_the_kept_keys_only(model, images, monkeypatch) -> None:
    """The fast preset's aggregator: the 19 subsampled layers call the fused log-sum-exp kernel with the kept keys
    only (2 frames x (5 specials + the kept ones of the 4 x 4 patches)) and the mean-fill key; the 24 frame and 5
    swapped global layers keep SDPA."""
    sdpa = []
    original_sdpa = torch.nn.functional.scaled_dot_product_attention
    spy = lambda *args, **kwargs: sdpa.append(1) or original_sdpa(*args, **kwargs)  # noqa: E731
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    calls = counting(monkeypatch, CPU_KERNEL)
    vggt_turbo.apply_optimizations(model, "fast")
    with torch.no_grad():
        model.aggregator(images)
    heads = model.aggregator.global_blocks[0].attn.num_heads
    keys = 2 * (5 + math.ceil(4 / FAST_KV_SUBSAMPLE) ** 2) + 1
    assert calls == [(1, heads, keys, 16)] * (DEPTH - len(FAST_GLOBAL_TO_FRAME_LAYERS))
    assert len(sdpa) == DEPTH + len(FAST_GLOBAL_TO_FRAME_LAYERS)


def test_training_mode_runs_the_wrapped_attention(model, images, monkeypatch) -> None:
    vggt_turbo.apply_optimizations(model, NO_FLAGS.replace(kv_subsample=2))
    calls = counting(monkeypatch, CPU_KERNEL)
    model.train()
    with torch.no_grad():
        model.aggregator(images)
    assert calls == []


def test_revert_restores_upstream(model, images, query_points, reference) -> None:
    vggt_turbo.apply_optimizations(model, "fast")
    assert max(errors(run(model, images, query_points), reference).values()) > 1e-3
    vggt_turbo.revert_optimizations(model)
    assert patched_methods(model) == {}
    assert_equal(run(model, images, query_points), reference)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_fused_qk_norm_rope_gives_the_unfused_result(model, images, query_points, monkeypatch, autocast: bool) -> None:
    """With ``fused_qk_norm_rope`` on, the subsampled layers take q, k, v from its kernel path (every one of them,
    not the fallback) and give what upstream's modules give: in fp32 to ~1e-6, under CPU bf16 autocast to bf16
    rounding."""
    config = NO_FLAGS.replace(kv_subsample=2, sync_free_rope=True)
    fused = []
    original = kv_subsample.fused_qkv
    monkeypatch.setattr(kv_subsample, "fused_qkv", lambda *args: fused.append(original(*args)) or fused[-1])
    results = []
    for on in (False, True):
        vggt_turbo.apply_optimizations(model, config.replace(fused_qk_norm_rope=on))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            results.append(run(model, images, query_points))
    assert len(fused) == DEPTH and all(qkv is not None for qkv in fused)
    if autocast:
        assert all(t.dtype == torch.bfloat16 for qkv in fused for t in qkv)
    assert_close(results[1], results[0], tol=2e-2 if autocast else 1e-5)


def strided_qkv(B: int, N: int, H: int, d: int, dtype: torch.dtype, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """q, k, v (B, H, N, d) as token-major views of one (B, N, 3, H, d) buffer, as ``fused_qkv`` gives them; q
    scaled by 3 for sharper softmaxes (the own and mean terms win for some queries, lose for others)."""
    qkv = torch.randn(B, N, 3, H, d, generator=gen) * torch.tensor([3.0, 1.0, 1.0])[:, None, None]
    return qkv.to(dtype).permute(2, 0, 3, 1, 4).unbind(0)


@pytest.mark.parametrize("chunk", [None, 2 * 3 * 16 * 7], ids=["one-chunk", "chunks-of-7-tokens"])
@pytest.mark.parametrize("backend", ["auto", "math"])
@pytest.mark.parametrize("stride", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_subsampled_attention_matches_dense_softmax(
    monkeypatch, dtype: torch.dtype, stride: int, backend: str, chunk: Optional[int]
) -> None:
    """B = 2 sequences of 3 frames of 5 specials and a 5 x 7 patch grid (odd: partial last rows and columns of the
    stride), strided (token-major) inputs; bf16 inputs also under CPU bf16 autocast (the scores stay fp32). Against
    the explicit softmax in fp64 of the same (rounded) inputs."""
    if chunk is not None:
        monkeypatch.setattr(kv_subsample, "_SCORE_CHUNK", chunk)  # 120 tokens: 17 chunks of 7, one of 1
    frames, specials, height, width, heads, d = 3, 5, 5, 7, 3, 16
    N = frames * (specials + height * width)
    tokens = kv_subsample.kept_tokens(frames, specials, height, width, stride, torch.device("cpu"))
    gen = torch.Generator().manual_seed(stride)
    q, k, v = strided_qkv(2, N, heads, d, dtype, gen)
    assert q.stride(2) == 3 * heads * d
    expected = dense_subsampled_attention(q.double(), k.double(), v.double(), tokens.kept)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    rounding = (expected.to(dtype).double() - expected).pow(2).mean().sqrt()  # the output's own rounding, rms
    for autocast in (False, True) if dtype == torch.bfloat16 else (False,):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = kv_subsample.subsampled_attention(q, k, v, tokens, AttentionPolicy.for_backend(backend))
        assert out.dtype == dtype and out.shape == q.shape
        torch.testing.assert_close(out.double(), expected, atol=tol, rtol=tol)
        assert (out.double() - expected).pow(2).mean().sqrt() <= max(2 * rounding, 1e-6)


def test_kept_tokens_layout() -> None:
    """3 frames, 5 specials, a 3 x 4 grid, stride 2: rows 0 and 2, columns 0 and 2 of each frame."""
    got = kv_subsample.kept_tokens(3, 5, 3, 4, 2, torch.device("cpu"))
    expected = kept_mask(3, 5, 3, 4, 2)
    assert torch.equal(got.kept, expected)
    assert torch.equal(got.index, expected.nonzero().flatten())
    assert got.dropped == int((~expected).sum()) == 3 * (12 - 4)


@pytest.mark.parametrize("backend", ["auto", "flash", "math"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_with_lse_matches_dense_softmax(backend: str, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 16, generator=gen) for n in (37, 11, 11))
    scores = q @ k.transpose(-2, -1) / 4
    out, lse = attention_with_lse(q.to(dtype), k.to(dtype), v.to(dtype), backend)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert out.dtype == dtype and lse.dtype == torch.float32 and lse.shape == (2, 3, 37)
    torch.testing.assert_close(lse, torch.logsumexp(scores, dim=-1), atol=tol * 4, rtol=0)
    torch.testing.assert_close(out.float(), scores.softmax(dim=-1) @ v, atol=tol, rtol=0)


@pytest.mark.parametrize("backend", ["efficient", "cudnn"])
def test_forced_kernel_missing_on_the_cpu_says_so(backend: str) -> None:
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(RuntimeError, match=f"no '{backend}' attention kernel"):
        attention_with_lse(q, q, q, backend)


# --- configuration ---------------------------------------------------------------------------------------------


def test_fast_preset_subsamples_the_layers_it_does_not_swap() -> None:
    fast = TurboConfig.preset("fast")
    assert fast.kv_subsample == FAST_KV_SUBSAMPLE >= 2 and fast.kv_subsample_layers == ()
    assert fast.global_to_frame_layers == FAST_GLOBAL_TO_FRAME_LAYERS
    assert not TurboConfig(kv_subsample=2).is_exact and TurboConfig(kv_subsample=1).is_exact


@pytest.mark.parametrize(
    ("flags", "error", "match"),
    [
        ({"kv_subsample": 0}, ValueError, "kv_subsample must be >= 1"),
        ({"kv_subsample": True}, TypeError, "kv_subsample must be an int"),
        ({"kv_subsample": 2.0}, TypeError, "kv_subsample must be an int"),
        ({"kv_subsample_layers": (3,)}, ValueError, "needs kv_subsample >= 2"),
        ({"kv_subsample": 2, "kv_subsample_layers": (3, 3)}, ValueError, "kv_subsample_layers has duplicates"),
        ({"kv_subsample": 2, "kv_subsample_layers": (-1,)}, ValueError, "kv_subsample_layers must be >= 0"),
        ({"kv_subsample": 2, "kv_subsample_layers": 5}, TypeError, "kv_subsample_layers must be a sequence"),
        ({"kv_subsample": 2, "kv_subsample_layers": (4, 9), "global_to_frame_layers": (0, 4)}, ValueError,
         r"\[4\] are in both"),
    ],
)
def test_bad_values_refused(flags: dict, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        TurboConfig(**flags)


def test_layers_past_the_depth_refused_at_apply(model) -> None:
    before = patched_methods(model)
    with pytest.raises(ValueError, match=r"kv_subsample_layers \[24\] out of range"):
        vggt_turbo.apply_optimizations(model, "exact", kv_subsample=2, kv_subsample_layers=(3, 24))
    assert patched_methods(model) == before


def test_layers_default_to_those_not_swapped(model) -> None:
    assert kv_subsample.layers(model, TurboConfig(kv_subsample=2)) == list(range(DEPTH))
    fast = kv_subsample.layers(model, TurboConfig.preset("fast"))
    assert fast == list(range(len(FAST_GLOBAL_TO_FRAME_LAYERS), DEPTH))
    assert kv_subsample.layers(model, TurboConfig(kv_subsample=3, kv_subsample_layers=(7, 2))) == [2, 7]


# --- GPU (skipped without CUDA) ---------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["auto", "flash", "efficient"])  # cudnn: refused (kernels/attention/lse.py)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_kernels_return_the_log_sum_exp(backend: str, dtype: torch.dtype) -> None:
    """Each CUDA kernel's output and log-sum-exp against the fp32 math path (N not a multiple of 32, to see
    efficient's padded log-sum-exp sliced)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 16, n, 64, device="cuda", generator=gen) for n in (1000, 300, 300))
    expected_out, expected_lse = attention_with_lse(q, k, v, "math")
    try:
        out, lse = attention_with_lse(q.to(dtype), k.to(dtype), v.to(dtype), backend)
    except RuntimeError as err:  # flash takes no fp32; report, do not hide, anything else
        if dtype == torch.float32 and backend == "flash":
            pytest.skip(f"{backend} refuses fp32: {err}")
        raise
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(lse, expected_lse, atol=tol * 8, rtol=0)
    torch.testing.assert_close(out.float(), expected_out, atol=tol, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_fast_preset_never_syncs_and_replays_as_a_cuda_graph(model, images) -> None:
    """bf16 autocast on CUDA: the fast preset's aggregator (after a warm-up call) synchronises with the host not
    once, and the whole model captured and replayed as a CUDA graph gives what it gives eagerly."""
    from vggt_turbo.patches.runtime.cuda_graphs import graph_cache

    model, images = model.cuda(), images.cuda()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        vggt_turbo.apply_optimizations(model, "fast", cuda_graphs=False)
        model.aggregator(images)  # warm-up: RoPE tables, bf16 weight copies
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            model.aggregator(images)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        eager = {k: v.clone() for k, v in model(images).items() if k in ("depth", "world_points", "pose_enc")}
        vggt_turbo.apply_optimizations(model, "fast")
        graphed = [model(images) for _ in range(3)][-1]
    assert any(entry.graph is not None for entry in graph_cache(model).entries.values())
    for key, value in eager.items():
        assert errors({key: graphed[key]}, {key: value})[key] < 1e-2, key
