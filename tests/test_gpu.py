"""GPU-only checks (skipped without CUDA): bf16 autocast, a forced cuDNN attention backend, and the absence of
device-to-host synchronisation that ``sync_free_rope`` (and the exact preset as a whole) promise.

Sync detection uses ``torch.cuda.set_sync_debug_mode("error")``: every synchronising CUDA call then raises.
Each check also runs upstream under the same detector and expects it to raise, so a detector that sees nothing
cannot make the test pass.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import pytest
import torch
from torch import nn

from helpers import errors, only, run

import vggt_turbo
from vggt_turbo.bench import precision
from vggt_turbo.bench.fidelity import fp32_reference_mode

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

BF16_FLOOR = 2e-2  # relative error two bf16 runs may differ by whatever their kernels


@pytest.fixture
def cuda_inputs(model, images, query_points) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The small model and its inputs already on the GPU, so that no copy happens inside a forward."""
    return model.cuda(), images.cuda(), query_points.cuda()


CONTRACT = precision.CONTRACT  # an exact patch's error vs fp32: at most this times upstream-autocast's


def test_exact_preset_meets_the_precision_contract(cuda_inputs, capsys) -> None:
    """The contract (issue #17): against upstream in fp32 (TF32 off), every output of the ``exact`` preset under bf16
    autocast is within 1.25x of upstream-autocast's own error. Without query points: the small model's track head
    on 3 points x 2 frames gives 6 visibilities, too few for a relative error to mean anything (it moved 1.1e-3 vs
    3.2e-3 between two roundings); the track outputs are held to the contract at full size, 64 points, by
    ``vggt-turbo bench --precision``."""
    model, images, _ = cuda_inputs
    with fp32_reference_mode():
        fp32 = run(model, images)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        upstream = run(model, images)
        vggt_turbo.apply_optimizations(model)
        patched = run(model, images)
    patched_err, bf16_err = errors(patched, fp32), errors(upstream, fp32)
    with capsys.disabled():
        print("\nbf16 autocast, relative error against fp32 per output: exact (upstream-autocast)")
        for key, err in patched_err.items():
            print(f"  {key:>18}: {err:.2e} ({bf16_err[key]:.2e})")
    too_far = {k: (e, bf16_err[k]) for k, e in patched_err.items() if not e <= CONTRACT * bf16_err[k] + 1e-7}
    assert not too_far, too_far


def test_forced_cudnn_backend_runs(cuda_inputs) -> None:
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("cuDNN attention needs compute capability 8.0 or newer")
    model, images, _ = cuda_inputs
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        upstream = model.aggregator(images)[0][-1]
        vggt_turbo.apply_optimizations(model, "exact", sdpa_backend="cudnn")
        patched = model.aggregator(images)[0][-1]
    assert torch.isfinite(patched).all()
    assert errors({"tokens": patched}, {"tokens": upstream})["tokens"] < BF16_FLOOR


def arm(*_: object) -> None:
    torch.cuda.set_sync_debug_mode("error")


def disarm(*_: object) -> None:
    torch.cuda.set_sync_debug_mode("default")


@contextlib.contextmanager
def syncs_raise(blocks: tuple[nn.Module, ...] = ()) -> Iterator[None]:
    """Make synchronising CUDA calls raise: only inside ``blocks`` if given (via forward hooks), else throughout."""
    handles = [h for b in blocks for h in (b.register_forward_pre_hook(arm), b.register_forward_hook(disarm))]
    if not blocks:
        arm()
    try:
        yield
    finally:
        disarm()
        for handle in handles:
            handle.remove()
        torch.cuda.synchronize()


def aggregate(model: nn.Module, images: torch.Tensor) -> None:
    with torch.no_grad():
        model.aggregator(images)


def test_sync_free_rope_issues_no_sync_in_attention(cuda_inputs) -> None:
    """The detector is armed only inside the attention blocks, where upstream's RoPE syncs in every layer
    (upstream's forward also copies the special tokens' positions from the host, outside the blocks)."""
    model, images, _ = cuda_inputs
    blocks = (*model.aggregator.frame_blocks, *model.aggregator.global_blocks)
    with pytest.raises(RuntimeError, match="synchroniz"), syncs_raise(blocks):
        aggregate(model, images)
    vggt_turbo.apply_optimizations(model, only("sync_free_rope"))
    with syncs_raise(blocks):
        aggregate(model, images)


def test_exact_preset_aggregator_forward_never_syncs(cuda_inputs) -> None:
    """The whole patched aggregator forward (after one warm-up call that fills the caches) has no sync at all."""
    model, images, _ = cuda_inputs
    with pytest.raises(RuntimeError, match="synchroniz"), syncs_raise():
        aggregate(model, images)
    vggt_turbo.apply_optimizations(model, "exact")
    aggregate(model, images)
    with syncs_raise():
        aggregate(model, images)


def test_exact_preset_under_bf16_autocast_never_syncs(cuda_inputs) -> None:
    """Also with ``bf16_weights`` engaged (its copies are checked by address and version, never by value)."""
    model, images, _ = cuda_inputs
    vggt_turbo.apply_optimizations(model, "exact", cuda_graphs=False)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        aggregate(model, images)
        with syncs_raise():
            aggregate(model, images)


def test_compile_matches_upstream_under_bf16(cuda_inputs) -> None:
    from vggt_turbo.patches.aggregator import compile_blocks

    model, images, query_points = cuda_inputs
    torch._dynamo.reset()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        upstream = run(model, images, query_points)
        vggt_turbo.apply_optimizations(model, only("compile"))
        compiled = run(model, images, query_points)
    assert compile_blocks.compiled.cache_info().currsize >= 1
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0
    errs = errors(compiled, upstream)
    assert max(errs.values()) < BF16_FLOOR, errs
