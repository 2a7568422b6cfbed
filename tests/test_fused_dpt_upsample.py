"""fused_dpt_upsample: the DPT heads with cached positional embeddings and the one-pass resize equal upstream's
(bit for bit on the CPU, where the resize is PyTorch's; the Triton kernel to fp32 rounding, in the interpreter and
on the GPU), chunked calls and the track head's feature extractor included, and upstream's code runs where the
patch does not apply.

The interpreter tests run with ``TRITON_INTERPRET=1 PYTHONPATH=<triton> python -m pytest tests/test_fused_dpt_upsample.py``.
"""

from __future__ import annotations

import itertools

import sys

import pytest
import torch
import torch.nn.functional as F

from helpers import NO_FLAGS, assert_equal, needs_cuda_triton, needs_interpreter, only, run

import vggt_turbo
from vggt_turbo.kernels import bilinear as bl
from vggt_turbo.patches.heads import fused_dpt_upsample as patch
from vggt_turbo.random_model import random_images



def _upstream_pos(head: torch.nn.Module, x: torch.Tensor, W: int, H: int) -> torch.Tensor:
    """Upstream's embedding as ``_apply_pos_embed`` adds it, as an (h, w, C) map."""
    return (head._apply_pos_embed(torch.zeros_like(x), W, H)[0]).permute(1, 2, 0)


def test_outputs_equal_upstream_bit_for_bit(model, images, query_points) -> None:
    expected = run(model, images, query_points)
    vggt_turbo.apply_optimizations(model, only("fused_dpt_upsample"))
    assert_equal(run(model, images, query_points), expected)
    assert_equal(run(model, images, query_points), expected)  # from the cache


def test_chunked_heads_equal_upstream(model, query_points) -> None:
    """More frames than the heads' chunk of 8: every chunk's call (frames_start_idx/end) is the patched one."""
    images = random_images(9, seed=3)
    expected = run(model, images, query_points)
    # dpt_channels_last off: it changes the last chunk's (one frame) rounding on purpose (see its tests);
    # camera_head_matmul off: its products of 8 or more rows (frames) are summed in another order (see its tests)
    vggt_turbo.apply_optimizations(model, "exact", dpt_channels_last=False, dpt_channels_last_weights=False,
                                   camera_head_matmul=False)
    assert_equal(run(model, images, query_points), expected)


def test_embeddings_are_upstreams_and_built_once(model) -> None:
    head = model.depth_head
    cache = patch._Embeddings(sys.modules[type(head).__module__])
    for (h, w, c, W, H) in ((4, 4, 8, 56, 56), (5, 7, 12, 98, 70), (37, 28, 16, 518, 392)):
        x = torch.randn(2, c, h, w)
        expected = _upstream_pos(head, x, W, H)
        assert torch.equal(cache.full(x, W, H), expected)
        assert torch.equal(cache.separable((h, w), c, W, H, x.dtype, x.device).full(), expected)
    built = dict(cache.cache)
    cache.full(torch.randn(1, 8, 4, 4), 56, 56)
    assert cache.cache.keys() == built.keys() and cache.full(torch.randn(1, 8, 4, 4), 56, 56) is built[("full", 4, 4, 8, 56, 56, 0.1, torch.float32, torch.device("cpu"))]


def test_cache_is_bounded(model, monkeypatch) -> None:
    monkeypatch.setattr(patch, "MAX_CACHED", 2)
    cache = patch._Embeddings(sys.modules[type(model.depth_head).__module__])
    for w in (3, 4, 5, 6):
        x = torch.randn(1, 4, 2, w)
        assert torch.equal(cache.full(x, 56, 56), _upstream_pos(model.depth_head, x, 56, 56))
    assert len(cache.cache) == 2


def test_autograd_and_training_run_upstream(model, images, monkeypatch) -> None:
    vggt_turbo.apply_optimizations(model, only("fused_dpt_upsample"))
    calls = []
    original = patch._resize
    monkeypatch.setattr(patch, "_resize", lambda *a: calls.append(1) or original(*a))
    with torch.enable_grad():
        model(images)
    assert not calls
    model.train()
    with torch.no_grad():
        model(images)
    assert not calls
    model.eval()
    with torch.no_grad():
        model(images)
    assert len(calls) == 2 * 5  # depth and point heads: 4 fusion blocks + the output resize each


def test_fusion_block_unlike_upstream_runs_upstream(model, images, query_points) -> None:
    """A fusion block without align_corners is left to upstream's forward (the kernel is align-corners only)."""
    model.depth_head.scratch.refinenet2.align_corners = False
    expected = run(model, images, query_points)
    vggt_turbo.apply_optimizations(model, only("fused_dpt_upsample"))
    assert_equal(run(model, images, query_points), expected)


def test_large_resize_uses_upstreams_split(model, monkeypatch) -> None:
    """Past custom_interpolate's element limit upstream's own batch-splitting function runs (then the map)."""
    monkeypatch.setattr(patch, "INT_MAX", 10)
    module = sys.modules[type(model.depth_head).__module__]
    x = torch.randn(3, 4, 5, 5).contiguous(memory_format=torch.channels_last)
    m = bl.SeparableMap(torch.randn(9, 4), torch.randn(9, 4), 2)
    got = patch._resize(module, x, (9, 9), m)
    assert torch.equal(got, module.custom_interpolate(x, (9, 9), mode="bilinear", align_corners=True)
                       + m.full().permute(2, 0, 1)[None])


def test_incompatible_fusion_block_refused(model) -> None:
    """A fusion block whose forward takes other parameters is refused before anything is patched."""
    block = model.depth_head.scratch.refinenet1

    def forward(self, x, skip=None, size=None):
        return super(type(self), self).forward(x, skip, size=size)

    block.__class__ = type("FusionRenamed", (type(block),), {"forward": forward})
    with pytest.raises(vggt_turbo.IncompatibleUpstreamError, match=r"FeatureFusionBlock\.forward\(xs, size\)"):
        vggt_turbo.apply_optimizations(model, only("fused_dpt_upsample"))
    assert vggt_turbo.describe(model).config is None


def test_reference_adds_the_separable_map() -> None:
    rows, cols = torch.randn(3, 4), torch.randn(5, 4)
    full = bl.SeparableMap(rows, cols, 1).full()
    assert full.shape == (3, 5, 4)
    assert torch.equal(full[2, 4, :1], cols[4, :1]) and torch.equal(full[2, 4, 1:], rows[2, 1:])


# --- the Triton kernel ----------------------------------------------------------------------------------------

CASES = [  # (N, C, H1, W1, H2, W2, channels_last)
    (2, 6, 5, 7, 10, 14, True),
    (2, 6, 5, 7, 9, 13, False),
    (1, 256, 4, 4, 8, 8, True),
    (3, 5, 3, 3, 1, 7, False),
    (2, 128, 6, 6, 11, 11, True),
    (1, 70, 6, 5, 13, 9, True),  # a channel count that is not a power of two, non-square
]


def _case(N, C, H1, W1, H2, W2, channels_last, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(N * 1000 + C)
    x = torch.randn(N, C, H1, W1, generator=g).to(device, dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    m = bl.SeparableMap(torch.randn(H2, C, generator=g).to(device, dtype), torch.randn(W2, C, generator=g).to(device, dtype), C // 2)
    return x, m


# The build whose fused multiply-adds the kernel reproduces (kernels/_bilinear_triton.py): bit for bit there.
BITWISE = torch.__version__.startswith("2.11") and torch.cuda.is_available()


def _check(got: torch.Tensor, ref: torch.Tensor, bitwise: bool = False) -> None:
    assert got.shape == ref.shape and got.stride() == ref.stride() and got.dtype == ref.dtype
    if bitwise:
        assert torch.equal(got, ref)
    scale = ref.abs().max().item() + 1.0
    assert (got - ref).abs().max().item() <= 4 * torch.finfo(ref.dtype).eps * scale


@needs_interpreter
@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
def test_interpreted_kernel_equals_pytorch(case) -> None:
    x, m = _case(*case)
    size = case[4:6]
    _check(bl._triton(x, size, None), bl.reference(x, size))
    _check(bl._triton(x, size, m), bl.reference(x, size, m))


LAYOUTS = ("contiguous", "channels_last", "sliced")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("add", [False, True])
def test_output_strides_are_pytorchs(layout: str, add: bool) -> None:
    """The kernel's output layout, derived without the meta device where that is unambiguous, equals what PyTorch's
    own rules give (the meta device), over shapes with and without dimensions of size 1."""
    for N, C, H1, W1, H2, W2 in itertools.product((1, 3), (1, 5), (1, 4), (1, 6), (1, 7), (2, 9)):
        x = torch.empty(N, C, H1, W1 + (layout == "sliced"), device="meta")
        x = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x
        x = x[..., :W1] if layout == "sliced" else x
        shape, strides = tuple(x.shape), tuple(x.stride())
        expected = bl._meta_strides(shape, strides, (H2, W2), add)
        assert bl._out_strides(shape, strides, (H2, W2), add) == expected, (shape, strides, (H2, W2))


def test_kernel_refuses_what_it_does_not_cover() -> None:
    x = torch.randn(1, 4, 5, 5)
    assert not bl.triton_covers(x, (5, 5), None)  # same size: PyTorch copies
    assert not bl.triton_covers(x.double(), (7, 7), None)
    assert not bl.triton_covers(x[0], (7, 7), None)
    bad = bl.SeparableMap(torch.randn(7, 3), torch.randn(7, 4), 2)
    assert not bl.triton_covers(x, (7, 7), bad)
    assert torch.equal(bl.bilinear(x, (7, 7)), F.interpolate(x, size=(7, 7), mode="bilinear", align_corners=True))


GPU_CASES = CASES + [(8, 256, 148, 148, 296, 296, True), (8, 128, 296, 296, 518, 518, True), (2, 8, 30, 30, 61, 61, True)]


@needs_cuda_triton
@pytest.mark.parametrize("case", GPU_CASES, ids=[str(c) for c in GPU_CASES])
def test_gpu_kernel_equals_pytorch(case) -> None:
    x, m = _case(*case, device="cuda")
    size = case[4:6]
    _check(bl.bilinear(x, size), bl.reference(x, size), BITWISE)
    _check(bl.bilinear(x, size, m), bl.reference(x, size, m), BITWISE)


@needs_cuda_triton
def test_gpu_model_equals_upstream(model, images, query_points) -> None:
    model = model.cuda()
    images, query_points = images.cuda(), query_points.cuda()
    expected = run(model, images, query_points)
    vggt_turbo.apply_optimizations(model, NO_FLAGS.replace(fused_dpt_upsample=True))
    got = run(model, images, query_points)
    for key, ref in expected.items():
        if BITWISE:
            assert torch.equal(got[key], ref), key
        assert (got[key] - ref).abs().max().item() <= 1e-5 * (ref.abs().max().item() + 1.0), key
