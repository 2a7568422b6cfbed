"""fused_layer_scale: every block's ``x + ls(branch)`` in one pass gives upstream's outputs bit for bit (CPU:
the PyTorch reference inside the re-implemented block forward; the Triton kernel in the interpreter and on the
GPU), the DINOv2 blocks included, and upstream's code runs where the patch does not apply.

Run the interpreter tests with ``TRITON_INTERPRET=1 PYTHONPATH=<triton> python -m pytest tests/test_fused_layer_scale.py``.
"""

from __future__ import annotations


import pytest
import torch

from helpers import NO_FLAGS, assert_close, assert_equal, count_calls, needs_cuda_triton, needs_interpreter, only, run

import vggt_turbo
from vggt_turbo.kernels import scale_add as sa
from vggt_turbo.kernels import triton_installed
from vggt_turbo.patches.aggregator import fused_layer_scale as patch


# (rows, C, x dtype, branch dtype, gamma dtype): bf16 weights; upstream-autocast (fp32 stream, bf16 branch,
# fp32 gamma); fp32; a width that is not a power of two.
CASES = [
    (37, 64, torch.bfloat16, torch.bfloat16, torch.bfloat16),
    (37, 64, torch.float32, torch.bfloat16, torch.float32),
    (5, 1024, torch.float32, torch.float32, torch.float32),
    (9, 96, torch.float16, torch.float16, torch.float16),
]


def _case(rows, C, xd, bd, gd, device="cpu"):
    g = torch.Generator().manual_seed(rows * C)
    x = (torch.randn(2, rows, C, generator=g) * 3).to(device, xd)
    b = torch.randn(2, rows, C, generator=g).to(device, bd)
    gamma = (torch.rand(C, generator=g) * 2 - 1).to(device, gd)
    return x, b, gamma


def test_outputs_equal_upstream_bit_for_bit(model, images, query_points, monkeypatch) -> None:
    expected = run(model, images, query_points)
    calls = count_calls(monkeypatch, patch, "scale_add")
    vggt_turbo.apply_optimizations(model, only("fused_layer_scale"))
    assert_equal(run(model, images, query_points), expected)
    blocks = len(model.aggregator.frame_blocks) + len(model.aggregator.global_blocks)
    assert calls[0] == 2 * blocks  # two sums per block: every block took the patched path


@pytest.mark.parametrize("flag, kernel", [("fused_layer_scale", "scale_add"), ("fused_add_norm", "scale_add_norm")])
def test_dino_blocks_equal_upstream_bit_for_bit(dino_model, monkeypatch, flag, kernel) -> None:
    """A DINOv2 patch embed (``dino_model``: ViT-S, or the full model's ViT-L; blocks with
    ``NestedTensorBlock.forward(x_or_x_list)``); with
    ``fused_add_norm`` each block's norm2 and the next block's norm1 come from the sums' pass (the reference on
    the CPU: bit for bit), so the kernel runs once less than twice per block."""
    embed = dino_model.aggregator.patch_embed
    images = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        expected = embed(images)
    calls = count_calls(monkeypatch, patch, kernel)
    vggt_turbo.apply_optimizations(dino_model, only(flag))
    try:
        with torch.no_grad():
            got = embed(images)
    finally:
        vggt_turbo.revert_optimizations(dino_model)
    assert calls[0] == 2 * len(embed.blocks) - (flag == "fused_add_norm")
    tensors = [key for key, value in expected.items() if isinstance(value, torch.Tensor)]
    assert "x_norm_patchtokens" in tensors
    for key in tensors:
        assert torch.equal(got[key], expected[key]), key


def test_autograd_training_and_missing_layer_scale_run_upstream(model, monkeypatch) -> None:
    calls = count_calls(monkeypatch, patch, "scale_add")
    vggt_turbo.apply_optimizations(model, only("fused_layer_scale"))
    block = model.aggregator.frame_blocks[0]
    x = torch.randn(2, 5, block.norm1.normalized_shape[0])
    pos = torch.randint(0, 4, (2, 5, 2))
    block(x, pos=pos)  # autograd on
    assert calls[0] == 0
    with torch.no_grad():
        block.train()
        block(x, pos=pos)
        block.eval()
        assert calls[0] == 0
        gamma = block.ls1
        block.ls1 = torch.nn.Identity()  # upstream's block without init_values
        try:
            got = block(x, pos=pos)
            expected = type(block).forward(block, x, pos=pos)  # the class's own, unpatched forward
        finally:
            block.ls1 = gamma
        assert calls[0] == 0
        assert torch.equal(got, expected)


def test_reference_is_upstreams_expression() -> None:
    x, b, gamma = _case(*CASES[1])
    assert torch.equal(sa.reference(x, b, gamma), x + b * gamma)
    out = x.clone()
    assert sa.reference(out, b, gamma, out=out) is out and torch.equal(out, x + b * gamma)


def test_kernel_refuses_what_it_does_not_cover() -> None:
    x, b, gamma = _case(*CASES[0])

    def covers(x, b, gamma, out=None):
        return sa.triton_covers(x, b, gamma, out, sa._dtypes(x, b, gamma)[1])

    assert covers(x, b, gamma) == triton_installed()
    assert covers(x, b, gamma, x) == triton_installed()  # in place
    assert not covers(x, b.transpose(0, 1), gamma)  # shapes differ
    assert not covers(x[:, :, ::2], b[:, :, ::2], gamma[::2])  # not contiguous
    assert not covers(x, b, gamma[:-1])  # gamma is not over the last dimension
    assert not covers(x.double(), b, gamma)
    assert not covers(x, b, gamma, b)  # out is another tensor than x
    assert not covers(x, b, gamma, torch.empty_like(x, dtype=torch.float32))
    x32, b16, g32 = _case(*CASES[1])
    assert not covers(b16.clone(), b16, g32, b16)  # in place would lose the fp32 result


# The interpreter (numpy, which has no bf16) converts to bf16 by truncation, not rounding to nearest: cases that
# round to bf16 are checked on the GPU only.
INTERPRETED = [c for c in CASES if torch.bfloat16 not in sa._dtypes(*_case(*c))]


@needs_interpreter
@pytest.mark.parametrize("case", INTERPRETED, ids=[str(c[:2]) + str(c[2]) for c in INTERPRETED])
def test_interpreted_kernel_equals_pytorch_bit_for_bit(case) -> None:
    from vggt_turbo.kernels._scale_add_triton import scale_add_

    x, b, gamma = _case(*case)
    product, result = sa._dtypes(x, b, gamma)
    got = torch.empty_like(x, dtype=result)
    scale_add_(x, b, gamma, got, product)
    assert torch.equal(got, sa.reference(x, b, gamma))


@needs_cuda_triton
@pytest.mark.parametrize("case", CASES + [(13740, 1024, torch.bfloat16, torch.bfloat16, torch.bfloat16)], ids=str)
def test_gpu_kernel_equals_pytorch_bit_for_bit(case) -> None:
    x, b, gamma = _case(*case, device="cuda")
    expected = sa.reference(x, b, gamma)
    assert torch.equal(sa.scale_add(x, b, gamma), expected)
    if x.dtype == expected.dtype:
        out = x.clone()
        assert sa.scale_add(out, b, gamma, out=out) is out and torch.equal(out, expected)


@needs_cuda_triton
def test_gpu_model_equals_upstream_bit_for_bit(model, images, query_points) -> None:
    model = model.cuda()
    images, query_points = images.cuda(), query_points.cuda()
    base = NO_FLAGS.replace(bf16_weights=True)  # bf16 blocks: the kernel's bf16 path, as in "exact"
    with torch.autocast("cuda", dtype=torch.bfloat16):
        vggt_turbo.apply_optimizations(model, base)
        expected = run(model, images, query_points)
        vggt_turbo.apply_optimizations(model, base.replace(fused_layer_scale=True))
        got = run(model, images, query_points)
    assert_equal(got, expected)


# fused_add_norm: the first sum and norm2 of it in one pass.


def _norm_params(C: int, dtype: torch.dtype, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(C)
    return torch.randn(C, generator=g).to(device, dtype), torch.randn(C, generator=g).to(device, dtype)


def _assert_norm_within_an_ulp(got: torch.Tensor, expected: torch.Tensor) -> None:
    """The norm's fp32 sums run in another order than PyTorch's: bf16 outputs may differ by an ulp, fp32 ones by
    fp32 rounding (a few ulps of the mean and variance, carried through)."""
    tol = 2.0**-7 if got.dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(got.float(), expected.float(), rtol=tol, atol=tol)


@needs_interpreter
@pytest.mark.parametrize("case", INTERPRETED, ids=[str(c[:2]) + str(c[2]) for c in INTERPRETED])
def test_interpreted_norm_kernel(case) -> None:
    from vggt_turbo.kernels._scale_add_triton import scale_add_norm_

    x, b, gamma = _case(*case)
    product, result = sa._dtypes(x, b, gamma)
    weight, bias = _norm_params(x.shape[-1], result)
    total, normed = torch.empty_like(x, dtype=result), torch.empty_like(x, dtype=result)
    scale_add_norm_(x, b, gamma, weight, bias, 1e-6, total, normed, product)
    expected_total, expected_normed = sa.reference_norm(x, b, gamma, weight, bias, 1e-6)
    assert torch.equal(total, expected_total)
    _assert_norm_within_an_ulp(normed, expected_normed)
    if x.dtype == result:  # in place, as the blocks' second sum runs
        scale_add_norm_(x, b, gamma, weight, bias, 1e-6, x, normed, product)
        assert torch.equal(x, expected_total)
        _assert_norm_within_an_ulp(normed, expected_normed)


@needs_cuda_triton
@pytest.mark.parametrize("case", CASES + [(13740, 1024, torch.bfloat16, torch.bfloat16, torch.bfloat16)], ids=str)
def test_gpu_norm_kernel(case) -> None:
    x, b, gamma = _case(*case, device="cuda")
    weight, bias = _norm_params(x.shape[-1], sa._dtypes(x, b, gamma)[1], "cuda")
    total, normed = sa.scale_add_norm(x, b, gamma, weight, bias, 1e-6)
    expected_total, expected_normed = sa.reference_norm(x, b, gamma, weight, bias, 1e-6)
    assert torch.equal(total, expected_total)
    _assert_norm_within_an_ulp(normed, expected_normed)
    if x.dtype == total.dtype:  # in place, as the blocks' second sum runs
        got, normed = sa.scale_add_norm(x, b, gamma, weight, bias, 1e-6, out=x)
        assert got is x and torch.equal(x, expected_total)
        _assert_norm_within_an_ulp(normed, expected_normed)


def _norm1_calls(blocks) -> list[int]:
    """How often each block's ``norm1`` runs (hooks on the norms, not on the blocks, which would stop the handoff)."""
    calls = [0] * len(blocks)
    for i, block in enumerate(blocks):
        block.norm1.register_forward_hook(lambda m, a, o, i=i: calls.__setitem__(i, calls[i] + 1))
    return calls


def test_fused_add_norm_cpu_equals_upstream_bit_for_bit(model, images, query_points, monkeypatch) -> None:
    expected = run(model, images, query_points)
    agg = model.aggregator
    norm1 = _norm1_calls(list(agg.frame_blocks) + list(agg.global_blocks))
    calls = count_calls(monkeypatch, patch, "scale_add_norm")
    vggt_turbo.apply_optimizations(model, only("fused_add_norm"))
    got = run(model, images, query_points)
    assert_equal(got, expected)  # the CPU runs the reference: upstream's ops
    blocks = len(agg.frame_blocks) + len(agg.global_blocks)
    assert calls[0] == 2 * blocks - 1  # norm2 of every block, norm1 of every block but the first
    assert norm1 == [1] + [0] * (blocks - 1)  # the first frame block's own norm1 ran; the others were handed over


def test_handoff_follows_upstreams_block_order(model) -> None:
    """frame 0, global 0, frame 1, ... and, with blocks grouped (``aa_block_size``), each group of a kind in turn."""
    agg = model.aggregator
    order = patch._aggregator_order(agg)
    assert order[:4] == [agg.frame_blocks[0], agg.global_blocks[0], agg.frame_blocks[1], agg.global_blocks[1]]
    agg.aa_block_size, agg.aa_block_num = 2, len(agg.frame_blocks) // 2
    order = patch._aggregator_order(agg)
    assert order[:6] == [agg.frame_blocks[0], agg.frame_blocks[1], agg.global_blocks[0], agg.global_blocks[1],
                         agg.frame_blocks[2], agg.frame_blocks[3]]
    assert len(order) == len(agg.frame_blocks) + len(agg.global_blocks)


def test_handoff_is_taken_only_for_its_own_output_and_norm() -> None:
    handoff = patch._Handoff()
    norm, other = torch.nn.LayerNorm(8), torch.nn.LayerNorm(8)
    total, normed = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    handoff.put(total, norm, normed)
    assert handoff.take(total.view(6, 8), other) is None  # another block's norm
    assert handoff.take(total, norm) is None  # emptied by the previous take
    handoff.put(total, norm, normed)
    assert handoff.take(total.clone(), norm) is None  # equal values, other memory
    handoff.put(total, norm, normed)
    got = handoff.take(total.view(1, 6, 8), norm)  # the aggregator's reshape between frame and global blocks
    assert got is not None and got.shape == (1, 6, 8) and torch.equal(got.view(2, 3, 8), normed)


def test_no_handoff_past_a_hook_that_changes_a_block_output(model, images) -> None:
    """A forward hook may change a block's output in place: the next block must then run its own norm1."""
    def double(module, args, output):
        output.mul_(2)

    model.aggregator.frame_blocks[0].register_forward_hook(double)
    expected = run(model, images)
    vggt_turbo.apply_optimizations(model, only("fused_add_norm"))
    assert_equal(run(model, images), expected)


def test_fused_add_norm_needs_fused_layer_scale(model) -> None:
    """An option of fused_layer_scale: switching that off alone is refused, with the call that works."""
    with pytest.raises(ValueError, match=r"fused_add_norm=True needs \['fused_layer_scale'\].*fused_add_norm=False"):
        vggt_turbo.apply_optimizations(model, fused_layer_scale=False)
    vggt_turbo.apply_optimizations(model, fused_layer_scale=False, fused_add_norm=False)


def test_fused_add_norm_under_autocast_keeps_upstreams_outputs(model, images, query_points, monkeypatch) -> None:
    """Under autocast the fp32 residual sum is kept and the norm is handed to the next linear layer in the autocast
    dtype, which that layer would have cast it to: on the CPU (the PyTorch reference) bit for bit."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = run(model, images, query_points)
        calls = count_calls(monkeypatch, patch, "scale_add_norm")
        vggt_turbo.apply_optimizations(model, only("fused_add_norm"))
        got = run(model, images, query_points)
    blocks = len(model.aggregator.frame_blocks) + len(model.aggregator.global_blocks)
    assert calls[0] == 2 * blocks - 1
    assert_equal(got, expected)


@needs_cuda_triton
@pytest.mark.parametrize("rows", [1374, 13740])
def test_gpu_norm_kernel_fp32_sum_bf16_norm(rows) -> None:
    """Autocast's case: an fp32 residual, a bf16 branch and fp32 gamma; the sum is fp32 bit for bit, the norm is
    written in bf16 within an ulp of PyTorch's fp32 norm cast to bf16."""
    x, b, gamma = _case(rows, 1024, torch.float32, torch.bfloat16, torch.float32, device="cuda")
    weight, bias = _norm_params(1024, torch.float32, "cuda")
    total, normed = sa.scale_add_norm(x, b, gamma, weight, bias, 1e-6, norm_dtype=torch.bfloat16)
    expected_total, expected_normed = sa.reference_norm(x, b, gamma, weight, bias, 1e-6)
    assert total.dtype == torch.float32 and normed.dtype == torch.bfloat16
    assert torch.equal(total, expected_total)
    _assert_norm_within_an_ulp(normed, expected_normed.to(torch.bfloat16))


@needs_cuda_triton
@pytest.mark.parametrize("bf16_weights", [True, False], ids=["bf16-stream", "autocast-fp32-stream"])
def test_gpu_fused_add_norm_within_bf16_rounding(model, images, query_points, monkeypatch, bf16_weights) -> None:
    """Natively in bf16 (``bf16_weights``), and under autocast with upstream's fp32 residual stream (the norm
    written in bf16 for the next linear layer)."""
    model = model.cuda()
    images, query_points = images.cuda(), query_points.cuda()
    base = NO_FLAGS.replace(bf16_weights=bf16_weights, fused_layer_scale=True)
    calls = count_calls(monkeypatch, patch, "scale_add_norm")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        vggt_turbo.apply_optimizations(model, base)
        expected = run(model, images, query_points)
        vggt_turbo.apply_optimizations(model, base.replace(fused_add_norm=True))
        got = run(model, images, query_points)
    assert calls[0] == 2 * (len(model.aggregator.frame_blocks) + len(model.aggregator.global_blocks)) - 1
    assert_close(got, expected, tol=2e-2)


@pytest.fixture
def small_slices(monkeypatch):
    """7 tokens per slice: the small model's sequences (2 frames x 21 tokens) run their MLP in 6 slices."""
    from vggt_turbo.patches import _token_slices

    monkeypatch.setattr(_token_slices, "CHUNK_TOKENS", 7)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_long_sequences_slice_the_mlp_with_the_fused_sums(model, images, query_points, monkeypatch, small_slices,
                                                          autocast) -> None:
    """With ``chunked_mlp`` on, a long sequence keeps the fused sums and norms, slice by slice: on the CPU bit for
    bit with ``chunked_mlp`` alone (the same slices, so the same matmuls; in fp32, and under autocast with the norm
    handed over in bf16) and close to upstream (a matmul over fewer rows may round otherwise), the MLP seeing one
    slice at a time, and every sum but the first block's norm1 fused."""
    agg = model.aggregator
    slices = []
    agg.global_blocks[0].mlp.register_forward_hook(lambda m, a, o: slices.append(a[0].shape[0]))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        upstream = run(model, images, query_points)
        vggt_turbo.apply_optimizations(model, only("chunked_mlp"))
        expected = run(model, images, query_points)
        slices.clear()
        calls = count_calls(monkeypatch, patch, "scale_add_norm")
        vggt_turbo.apply_optimizations(model, only("fused_add_norm", chunked_mlp=True))
        got = run(model, images, query_points)
    assert_equal(got, expected)
    assert_close(got, upstream, tol=1e-2 if autocast else 1e-5)
    assert slices == [7] * 6  # 42 tokens in 6 slices of 7
    blocks = len(agg.frame_blocks) + len(agg.global_blocks)
    assert calls[0] == 6 * (2 * blocks - 1)  # per slice: norm2 of every block, norm1 of every block but the first


def test_sliced_sums_write_into_fresh_buffers_only() -> None:
    """The kernel writes a slice's sum into another tensor's rows only when that buffer shares memory with neither
    input (``_fresh_buffer``): a slice of the whole-sequence result."""
    x, b, gamma = _case(*CASES[0])
    dtype = sa._dtypes(x, b, gamma)[1]
    rows, branch_rows = x.view(-1, x.shape[-1]), b.view(-1, x.shape[-1])
    result = torch.empty_like(rows)
    assert sa.triton_covers(rows[:5], branch_rows[:5], gamma, result[:5], dtype) == triton_installed()
    assert not sa.triton_covers(rows[:5], branch_rows[:5], gamma, rows[5:10], dtype)  # x's own memory
    assert not sa.triton_covers(rows[:5], branch_rows[:5], gamma, result[:5].float(), dtype)  # another dtype
    weight, bias = _norm_params(x.shape[-1], dtype)
    norm_rows = torch.empty_like(rows)
    total, normed = sa.scale_add_norm(rows[:5], branch_rows[:5], gamma, weight, bias, 1e-6, out=result[:5],
                                      norm_out=norm_rows[:5])
    expected_total, expected_normed = sa.reference_norm(rows[:5], branch_rows[:5], gamma, weight, bias, 1e-6)
    assert total.data_ptr() == result.data_ptr() and normed.data_ptr() == norm_rows.data_ptr()
    assert torch.equal(result[:5], expected_total) and torch.equal(norm_rows[:5], expected_normed)


@needs_cuda_triton
def test_gpu_sliced_long_sequence_keeps_the_kernels(model, images, query_points, monkeypatch, small_slices) -> None:
    """On the GPU the slices run the Triton kernels (their buffers qualify) and stay within bf16 rounding of the
    unsliced fused path."""
    model = model.cuda()
    images, query_points = images.cuda(), query_points.cuda()
    from vggt_turbo.kernels import _scale_add_triton

    launches = count_calls(monkeypatch, _scale_add_triton, "scale_add_norm_")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        vggt_turbo.apply_optimizations(model, only("fused_add_norm"))
        expected = run(model, images, query_points)
        launches[0] = 0
        vggt_turbo.apply_optimizations(model, only("fused_add_norm", chunked_mlp=True))
        got = run(model, images, query_points)
    blocks = len(model.aggregator.frame_blocks) + len(model.aggregator.global_blocks)
    assert launches[0] == 6 * (2 * blocks - 1)  # every slice on the kernel
    assert_close(got, expected, tol=2e-2)
