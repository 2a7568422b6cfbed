"""fused_qk_norm_rope: the PyTorch reference equals upstream's qk-norm + RoPE (CPU), the patch runs it in every block
and only where it should, and the Triton kernel equals the reference (under ``TRITON_INTERPRET=1`` on the CPU, and
on a GPU against upstream under bf16 autocast, natively in bf16 and in fp32).

The q/k norms get random weights and biases here (upstream initialises them to 1 and 0, which would hide a kernel
that ignored them or read them at the wrong feature). Run the interpreter tests with

    TRITON_INTERPRET=1 PYTHONPATH=/tmp/triton-site python -m pytest -q tests/test_fused_qk_norm_rope.py

(triton installed with ``python -m pip install --target /tmp/triton-site triton``); they skip otherwise.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import assert_close, assert_equal, assert_unchanged, errors, needs_cuda, needs_interpreter, only, patched_methods, run, snapshot

import vggt_turbo
from vggt_turbo.patches import check
from vggt_turbo import IncompatibleUpstreamError
from vggt_turbo.kernels import qk_norm_rope as kernel_module
from vggt_turbo.kernels.qk_norm_rope import qk_norm_rope, qk_norm_rope_reference, qk_norm_rope_triton
from vggt_turbo.kernels.attention import AttentionPolicy
from vggt_turbo.patches import _fused_qkv
from vggt_turbo.patches.aggregator import fused_qk_norm_rope
from vggt_turbo.patches._rope_table import table_published
from vggt_turbo.random_model import random_images

DEPTH = 24  # frame and global blocks each in the small model
SPECIAL = 5  # camera + register tokens, at position 0
BF16_FLOOR = 2e-2  # as tests/test_gpu.py: relative error two bf16 runs may differ by



# --- helpers ----------------------------------------------------------------------------------------------------


def randomize_norms_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights and biases for every LayerNorm named q_norm / k_norm."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith(("q_norm", "k_norm")) and isinstance(module, nn.LayerNorm):
                module.weight.copy_(1 + 0.5 * torch.randn(module.weight.shape, generator=gen))
                module.bias.copy_(0.3 * torch.randn(module.bias.shape, generator=gen))
    return model


def attention(dim: int = 64, heads: int = 4, seed: int = 0) -> nn.Module:
    """A standalone upstream ``Attention`` with qk-norm and RoPE-2D, as the aggregator builds them."""
    from vggt.layers.attention import Attention
    from vggt.layers.rope import RotaryPositionEmbedding2D

    torch.manual_seed(seed)
    attn = Attention(dim, num_heads=heads, qk_norm=True, rope=RotaryPositionEmbedding2D(frequency=100.0))
    attn.k_norm.eps = 1e-3  # unlike q_norm's 1e-5: a kernel using one norm's eps for both would show
    return randomize_norms_(attn, seed).eval().requires_grad_(False)


def grid_positions(batch: int, height: int, width: int) -> torch.Tensor:
    """(batch, SPECIAL + height * width, 2) positions as the aggregator makes them: grid index + 1, specials at 0."""
    from vggt.layers.rope import PositionGetter

    patches = PositionGetter()(batch, height, width, torch.device("cpu")) + 1
    return torch.cat([torch.zeros(batch, SPECIAL, 2, dtype=patches.dtype), patches], dim=1)


@contextlib.contextmanager
def recording_sdpa() -> Iterator[list[tuple[torch.Tensor, ...]]]:
    """Record the (q, k, v) every ``F.scaled_dot_product_attention`` call receives: what upstream computed."""
    calls: list[tuple[torch.Tensor, ...]] = []
    original = F.scaled_dot_product_attention

    def spy(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append((q, k, v))
        return original(q, k, v, *args, **kwargs)

    with mock.patch.object(F, "scaled_dot_product_attention", spy):
        yield calls


def counting(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str) -> list[tuple]:
    """Count the calls of ``owner.name`` (pass-through); returns the list of their arguments."""
    calls: list[tuple] = []
    original: Callable[..., Any] = getattr(owner, name)

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, spy)
    return calls


def upstream_case(attn: nn.Module, x: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, tuple]:
    """Upstream's forward output and the q, k, v its SDPA received, for ``attn(x, pos)``."""
    with torch.no_grad(), recording_sdpa() as calls:
        out = attn(x, pos=pos)
    assert len(calls) == 1
    return out, calls[0]


def inputs(attn: nn.Module, x: torch.Tensor, pos: torch.Tensor) -> tuple:
    """The arguments of ``qk_norm_rope`` for ``attn(x, pos)``: qkv, positions, norms and upstream's table."""
    B, N, _ = x.shape
    with torch.no_grad():
        qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim)
    length = int(pos.max()) + 1
    dtype = kernel_module.compute_dtype(qkv)
    table = attn.rope._compute_frequency_components(attn.head_dim // 2, length, x.device, dtype)
    return (qkv, pos, attn.q_norm, attn.k_norm, *table)


FP32_NOISE = 1e-5  # absolute: the kernel's fp32 values may differ from the reference's by a few fp32 ulps (of
# the O(1) terms: near-zero results come from cancelling terms), as its reductions and fused multiply-adds differ


def assert_rounded(got: torch.Tensor, exact: torch.Tensor, units: float) -> None:
    """``got`` (half precision) is within ``units`` of its dtype's spacing of the fp32 result ``exact`` (0.5: the
    rounding to nearest, 1: any neighbour), give or take ``FP32_NOISE``; and it is the rounding to nearest of
    ``exact`` almost everywhere when ``units`` is 0.5 (a truncating kernel would miss half the time)."""
    info = torch.finfo(got.dtype)
    spacing = torch.exp2(torch.floor(torch.log2(exact.abs().clamp_min(info.tiny)))) * info.eps
    excess = ((got.float() - exact).abs() - units * spacing - FP32_NOISE).max().item()
    assert excess <= 0, f"{excess:.3g} beyond {units} units of {got.dtype} of the fp32 result"
    if units == 0.5:
        mismatched = (got != exact.to(got.dtype)).float().mean().item()
        assert mismatched < 1e-2, f"{mismatched:.2%} of the elements differ from the fp32 result rounded to nearest"


# --- the PyTorch reference (CPU) ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("batch", "height", "width"), [(1, 4, 4), (3, 3, 5), (2, 6, 2)])
def test_reference_equals_upstream_in_fp32(batch: int, height: int, width: int) -> None:
    attn = attention()
    pos = grid_positions(batch, height, width)
    x = torch.randn(batch, pos.shape[1], 64)
    _, expected = upstream_case(attn, x, pos)
    got = qk_norm_rope_reference(*inputs(attn, x, pos))
    for name, a, b in zip("qkv", got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_reference_rounds_once_in_bf16() -> None:
    """Native bf16 (bf16 weights, no autocast): the fp32 result rounded once, where upstream rounds after the norm
    and after each RoPE operation and uses a bf16 table; the two stay within bf16 noise of each other."""
    attn = attention().bfloat16()
    pos = grid_positions(2, 3, 5)
    x = torch.randn(2, pos.shape[1], 64).bfloat16()
    _, upstream = upstream_case(attn, x, pos)
    args = inputs(attn, x, pos)
    got = qk_norm_rope_reference(*args)
    exact = qk_norm_rope_reference(args[0].float(), *args[1:])
    for a, e, u in zip(got[:2], exact[:2], upstream[:2]):
        assert a.dtype == torch.bfloat16 and torch.equal(a, e.bfloat16())
        assert errors({"x": a}, {"x": u})["x"] < BF16_FLOOR


def test_attention_dtype_follows_autocast() -> None:
    qkv = torch.zeros(1, 2, 3, 1, 4)
    assert kernel_module.attention_dtype(qkv) == torch.float32
    assert kernel_module.attention_dtype(qkv.bfloat16()) == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert kernel_module.attention_dtype(qkv) == torch.bfloat16
    assert kernel_module.compute_dtype(qkv.bfloat16()) == torch.float32
    assert kernel_module.compute_dtype(qkv.double()) == torch.float64


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (lambda a: {**a, "qkv": a["qkv"][:, :, :2]}, ValueError, r"qkv must be \(B, N, 3, H, D\)"),
        (lambda a: {**a, "positions": a["positions"][:, 1:]}, ValueError, "positions must be"),
        (lambda a: {**a, "positions": a["positions"].float()}, TypeError, "positions must be integers"),
        (lambda a: {**a, "q_norm": nn.Identity()}, TypeError, "q_norm must be a LayerNorm over"),
        (lambda a: {**a, "k_norm": nn.LayerNorm(8)}, TypeError, r"k_norm must be a LayerNorm over \(16,\)"),
        (lambda a: {**a, "sin": a["sin"][:, :4]}, ValueError, r"cos and sin must be \(L, 8\) tables"),
    ],
)
def test_bad_inputs_refused(change: Callable[[dict], dict], error: type, match: str) -> None:
    attn = attention()
    pos = grid_positions(1, 2, 2)
    names = ("qkv", "positions", "q_norm", "k_norm", "cos", "sin")
    args = change(dict(zip(names, inputs(attn, torch.randn(1, pos.shape[1], 64), pos))))
    for fn in (qk_norm_rope, qk_norm_rope_reference, qk_norm_rope_triton):
        with pytest.raises(error, match=match):
            fn(**args)


def test_triton_path_refuses_what_it_does_not_cover() -> None:
    """A head dim that is not a power of two (12): the dispatcher runs the reference, the kernel says why not."""
    attn = attention(dim=48)
    pos = grid_positions(1, 2, 3)
    args = inputs(attn, torch.randn(1, pos.shape[1], 48), pos)
    with pytest.raises(ValueError, match="does not cover qkv"):
        qk_norm_rope_triton(*args)
    assert not kernel_module.triton_covers(args[0], attn.q_norm, attn.k_norm)


# --- the patch (CPU: the reference runs) ------------------------------------------------------------------------


def test_wrapper_on_a_standalone_attention_equals_upstream(monkeypatch) -> None:
    attn = attention()
    pos = grid_positions(3, 3, 5)
    x = torch.randn(3, pos.shape[1], 64)
    expected, _ = upstream_case(attn, x, pos)
    calls = counting(monkeypatch, _fused_qkv, "qk_norm_rope")
    wrapper = fused_qk_norm_rope.make_wrapper(AttentionPolicy.for_backend("auto"))
    with torch.no_grad(), table_published(attn.rope, int(pos.max()) + 1):
        got = wrapper(attn.forward, attn, (x,), {"pos": pos})
    assert len(calls) == 1
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_patched_model_equals_upstream_on_a_batch_of_non_square_sequences(model, monkeypatch) -> None:
    randomize_norms_(model)
    images = random_images(3, batch=2, seed=1)[..., :42]  # 56 x 42: 4 x 3 patches
    query_points = torch.tensor([[[5.0, 7.0], [40.0, 20.0]], [[11.0, 50.0], [30.0, 30.0]]])
    expected = run(model, images, query_points)
    vggt_turbo.apply_optimizations(model, only("fused_qk_norm_rope"))
    rope_calls = counting(monkeypatch, type(model.aggregator.rope), "_apply_1d_rope")
    fused_calls = counting(monkeypatch, _fused_qkv, "qk_norm_rope")
    out = run(model, images, query_points)
    assert len(fused_calls) == 2 * DEPTH and rope_calls == [], "upstream's RoPE ran"
    assert_close(out, expected, tol=1e-6)


def test_with_sdpa_on_this_patch_attends_with_its_backend(model, images, monkeypatch) -> None:
    sdpa_calls = counting(monkeypatch, F, "scaled_dot_product_attention")
    fused_calls = counting(monkeypatch, _fused_qkv, "qk_norm_rope")
    vggt_turbo.apply_optimizations(model, only("fused_qk_norm_rope", sdpa=True, sdpa_backend="math"))
    real = AttentionPolicy.attend
    with torch.no_grad(), mock.patch.object(AttentionPolicy, "attend", autospec=True, side_effect=real) as attend:
        model.aggregator(images)  # the heads have attention layers of their own
    assert len(fused_calls) == len(sdpa_calls) == 2 * DEPTH, "attention computed once per layer, by this patch"
    assert {c.args[0].names for c in attend.call_args_list} == {("math",)} and attend.call_count == 2 * DEPTH


def test_forced_backend_that_cannot_run_says_so(model, images) -> None:
    """cuDNN has no CPU kernel: the error of the sdpa patch, raised from this patch's attention."""
    vggt_turbo.apply_optimizations(model, only("fused_qk_norm_rope", sdpa=True, sdpa_backend="cudnn"))
    with pytest.raises(RuntimeError, match="sdpa_backend='cudnn' cannot run attention"):
        run(model, images)


def test_sdpa_backend_ignored_without_sdpa(model, images) -> None:
    """``sdpa_backend`` belongs to the sdpa flag: with it off torch's default backend runs (cuDNN would fail)."""
    vggt_turbo.apply_optimizations(model, only("fused_qk_norm_rope", sdpa_backend="cudnn"))
    assert set(run(model, images)) >= {"depth", "pose_enc"}


def test_upstream_runs_in_training_with_autograd_and_outside_the_aggregator(model, images, monkeypatch) -> None:
    calls = counting(monkeypatch, _fused_qkv, "qk_norm_rope")
    vggt_turbo.apply_optimizations(model, only("fused_qk_norm_rope"))
    model.aggregator(images)  # autograd on
    model.train()
    with torch.no_grad():
        model.aggregator(images)
    model.eval()
    attn = model.aggregator.frame_blocks[0].attn
    pos = grid_positions(2, 4, 4)
    with torch.no_grad():
        attn(torch.randn(2, pos.shape[1], 64), pos=pos)  # no table length published
    assert calls == []


def test_blocks_without_qk_norm_are_left_alone() -> None:
    from vggt.models.aggregator import Aggregator

    plain = Aggregator(img_size=56, patch_size=14, embed_dim=64, num_heads=4, patch_embed="conv", qk_norm=False)
    plain.eval()
    images = random_images(2)
    with torch.no_grad():
        expected = plain(images)[0][-1]
    vggt_turbo.apply_optimizations(plain, only("fused_qk_norm_rope"))
    assert vggt_turbo.describe(plain).targets["fused_qk_norm_rope"] == []
    with torch.no_grad():
        assert torch.equal(plain(images)[0][-1], expected)


def test_aggregator_without_rope_is_left_alone() -> None:
    """``rope_freq <= 0`` (upstream cannot run such an aggregator at this commit: it adds 1 to its missing
    positions; patching it must still work and touch no attention)."""
    from vggt.models.aggregator import Aggregator

    plain = Aggregator(img_size=56, patch_size=14, embed_dim=64, num_heads=4, patch_embed="conv", rope_freq=-1)
    vggt_turbo.apply_optimizations(plain, only("fused_qk_norm_rope"))
    assert vggt_turbo.describe(plain).targets["fused_qk_norm_rope"] == []


def test_needs_sync_free_rope() -> None:
    with pytest.raises(ValueError, match="sync_free_rope"):
        check(vggt_turbo.TurboConfig(fused_qk_norm_rope=True, sync_free_rope=False, cuda_graphs=False))


def test_revert_restores_upstream(model, images) -> None:
    before = snapshot(model)
    expected = run(model, images)
    vggt_turbo.apply_optimizations(model, only("fused_qk_norm_rope"))
    assert any(path.endswith("attn.forward") for path in patched_methods(model))
    vggt_turbo.revert_optimizations(model)
    assert_unchanged(model, before)
    assert not patched_methods(model)
    assert_equal(run(model, images), expected)


def test_incompatible_attention_refused(model) -> None:
    attn = model.aggregator.frame_blocks[0].attn

    def forward(self, x: torch.Tensor, attn_bias: Any = None, pos: Any = None) -> torch.Tensor:
        return super(type(self), self).forward(x, pos=pos)

    attn.__class__ = type("AttentionWithBias", (type(attn),), {"forward": forward})
    with pytest.raises(IncompatibleUpstreamError, match=r"'fused_qk_norm_rope'.*Attention\.forward\(x, pos\)"):
        vggt_turbo.apply_optimizations(model, only("fused_qk_norm_rope"))


# --- the Triton kernel in the interpreter (CPU) -----------------------------------------------------------------


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "padded", "expanded-positions"])
def test_interpreted_kernel_equals_reference(dtype: torch.dtype, layout: str) -> None:
    """fp32: equal to an fp32 ulp or two (reduction order, rsqrt). Half precision: next to the fp32 result (the
    interpreter truncates fp32 to bf16, up to 1 unit, where a GPU rounds to nearest: see the GPU test)."""
    attn = attention()
    pos = grid_positions(3, 3, 5)  # 3 * 20 tokens * 2 * 4 heads = 480 rows: a partial last program
    x = torch.randn(3, pos.shape[1], 64)
    qkv, _, q_norm, k_norm, cos, sin = inputs(attn, x, pos)
    qkv = qkv.to(dtype)
    B, N, _, H, D = qkv.shape
    buffer = torch.full((B, N, 4, H, D + 8), 7.0, dtype=dtype)  # room around q, k, v the kernel must not touch
    if layout == "padded":
        buffer[:, :, :3, :, :D] = qkv
        qkv = buffer[:, :, :3, :, :D]
    if layout == "expanded-positions":
        pos = pos[:1].expand(3, -1, -1)
        assert pos.stride(0) == 0
    exact = qk_norm_rope_reference(qkv.float(), pos, q_norm, k_norm, cos, sin)
    v_before = qkv[:, :, 2].clone()
    q, k, v = qk_norm_rope_triton(qkv, pos, q_norm, k_norm, cos, sin)
    assert q.untyped_storage().data_ptr() == qkv.untyped_storage().data_ptr(), "not written in place"
    assert torch.equal(v, v_before.transpose(1, 2)), "v changed"
    assert (buffer[:, :, 3] == 7).all() and (buffer[..., D:] == 7).all(), "wrote outside q and k"
    for got, e in zip((q, k), exact[:2]):
        assert got.dtype == dtype and got.shape == e.shape
        if dtype == torch.float32:
            torch.testing.assert_close(got, e, rtol=1e-6, atol=2e-6)
        else:
            assert_rounded(got, e, units=1.0)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("heads", "head_dim"), [(3, 64), (6, 32), (4, 64)])
@pytest.mark.parametrize("layout", ["projection", "padded"])
def test_interpreted_kernel_masks_heads_and_respects_strides(dtype: torch.dtype, heads: int, head_dim: int, layout: str) -> None:
    """Head counts that are not powers of two (masked rows in the token's tile), B = 2, on the (B, N, 3, H, D) view
    of the projection the model makes or a view with padding in every dimension: q and k equal the reference, v and
    the padding are untouched."""
    attn = attention(dim=heads * head_dim, heads=heads)
    pos = grid_positions(2, 3, 5)
    x = torch.randn(2, pos.shape[1], heads * head_dim)
    qkv, _, q_norm, k_norm, cos, sin = inputs(attn, x, pos)
    qkv = qkv.to(dtype)
    B, N, _, H, D = qkv.shape
    exact = qk_norm_rope_reference(qkv.float(), pos, q_norm, k_norm, cos, sin)
    buffer = torch.full((B, N, 4, H + 1, D + 8), 7.0, dtype=dtype)
    if layout == "padded":
        buffer[:, :, :3, :H, :D] = qkv
        target = buffer[:, :, :3, :H, :D]
    else:
        target = qkv.clone()
    v_before = target[:, :, 2].clone()
    got = qk_norm_rope_triton(target, pos, q_norm, k_norm, cos, sin)
    assert torch.equal(target[:, :, 2], v_before)
    assert (buffer[:, :, 3] == 7).all() and (buffer[..., H, :] == 7).all() and (buffer[..., D:] == 7).all()
    for token, e in zip(got[:2], exact[:2]):
        if dtype == torch.float32:
            torch.testing.assert_close(token, e, rtol=1e-6, atol=2e-6)
        else:
            assert_rounded(token, e, units=1.0)


@pytest.mark.parametrize(("heads", "covered"), [(64, True), (65, False)])
def test_tiles_past_the_register_limit_go_to_the_reference(heads: int, covered: bool, monkeypatch) -> None:
    """A token's q and k tile of 2 * 128 padded heads of 64 (more than ``MAX_TILE``) is left to the PyTorch path."""
    monkeypatch.setattr(kernel_module, "triton_installed", lambda: True)
    qkv = torch.zeros(1, 2, 3, heads, 64)
    norm = nn.LayerNorm(64)
    assert kernel_module.triton_covers(qkv, norm, norm) is covered


@needs_interpreter
def test_interpreted_kernel_in_the_whole_model(model, monkeypatch) -> None:
    """Every block through the kernel (the dispatcher picks it on CUDA only, so it is forced here): upstream's
    outputs to fp32 rounding."""
    randomize_norms_(model)
    images = random_images(3, batch=2, seed=1)[..., :42]
    expected = run(model, images)
    calls = counting(monkeypatch, kernel_module, "_triton")
    monkeypatch.setattr(fused_qk_norm_rope, "qk_norm_rope", qk_norm_rope_triton)
    vggt_turbo.apply_optimizations(model, only("fused_qk_norm_rope"))
    assert_close(run(model, images), expected, tol=1e-5)
    assert len(calls) == 2 * DEPTH


# --- the Triton kernel on a GPU ---------------------------------------------------------------------------------


def _vggt_case(layout: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """VGGT's attention width (16 heads of 64) on a 37 x 37 grid + 5 special tokens, 2 frames, on CUDA: frame
    layout (2 sequences of 1374 tokens) or global (1 of 2748)."""
    attn = attention(dim=1024, heads=16).cuda()
    pos = grid_positions(2, 37, 37)
    if layout == "global":
        pos = pos.reshape(1, -1, 2)
    x = torch.randn(pos.shape[0], pos.shape[1], 1024, device="cuda")
    return attn, x, pos.cuda()


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("layout", ["frame", "global"])
@pytest.mark.parametrize("mode", ["bf16-autocast", "bf16-native", "fp32"])
def test_gpu_kernel_matches_upstream(layout: str, mode: str, monkeypatch) -> None:
    if not kernel_module.triton_installed():
        pytest.skip("triton is not installed")
    attn, x, pos = _vggt_case(layout)
    if mode == "bf16-native":
        attn.bfloat16()
        x = x.bfloat16()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=mode == "bf16-autocast")
    with autocast:
        _, upstream = upstream_case(attn, x, pos)
        args = inputs(attn, x, pos)
    exact = qk_norm_rope_reference(args[0].float(), *args[1:])  # no autocast: the fp32 result, rounded nowhere
    v_before = args[0][:, :, 2].clone()
    kernel_calls = counting(monkeypatch, kernel_module, "_triton")
    with autocast:
        q, k, v = qk_norm_rope(*args)
    assert len(kernel_calls) == 1 and q.untyped_storage().data_ptr() == args[0].untyped_storage().data_ptr()
    if mode == "fp32":
        for got, expected in zip((q, k, v), upstream):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        return
    assert q.dtype == k.dtype == v.dtype == torch.bfloat16
    assert torch.equal(v, v_before.transpose(1, 2))
    for got, e, expected in zip((q, k), exact, upstream):
        assert_rounded(got, e, units=0.5)
        if mode == "bf16-autocast":  # upstream computes the same fp32 values; SDPA's autocast rounds them
            torch.testing.assert_close(expected, e, rtol=1e-6, atol=1e-6)
        else:  # upstream rounds at every step, with a bf16 table: bf16 noise apart
            assert errors({"x": got}, {"x": expected})["x"] < BF16_FLOOR


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("config", ["alone", "exact", "sdpa-cudnn", "sdpa-flash", "sdpa-efficient"])
def test_gpu_patched_model_matches_upstream_under_bf16_autocast(model, images, query_points, config, monkeypatch):
    """With every stacking that matters: alone, in the exact preset (bf16_weights, CUDA graphs, ...) and with each
    forced SDPA backend on the strided q/k/v views."""
    if not kernel_module.triton_installed():
        pytest.skip("triton is not installed")
    model, images, query_points = randomize_norms_(model).cuda(), images.cuda(), query_points.cuda()
    configs = {
        "alone": only("fused_qk_norm_rope"),
        "exact": vggt_turbo.TurboConfig(fused_qk_norm_rope=True),
        **{f"sdpa-{b}": only("fused_qk_norm_rope", sdpa=True, sdpa_backend=b) for b in ("cudnn", "flash", "efficient")},
    }
    fp32 = run(model, images, query_points)
    kernel_calls = counting(monkeypatch, kernel_module, "_triton")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        upstream = run(model, images, query_points)
        vggt_turbo.apply_optimizations(model, configs[config])
        patched = run(model, images, query_points)
    assert len(kernel_calls) >= 2 * DEPTH  # CUDA graphs: the warm-up and capture calls, none in replays
    patched_err, bf16_err = errors(patched, upstream), errors(upstream, fp32)
    # the exact preset also runs bf16_weights, whose own pose difference on this small random model is 1.6-2.1e-2
    floor = 3e-2 if config == "exact" else BF16_FLOOR
    too_far = {k: e for k, e in patched_err.items() if not e <= max(floor, 2 * bf16_err[k])}
    assert not too_far, too_far
