"""The optional FlashAttention-4 kernel: how calls are routed to it, its layout handling, and the fallback.

On the CPU the package cannot run: the routing and layout code is checked against a stand-in for
``flash_attn.cute.flash_attn_func`` that computes attention in fp32 with the package's conventions ((B, N, H, d)
inputs with a unit last stride, token-major output, (B, H, N) log-sum-exp). The GPU tests run the real package
when it is installed (skipped otherwise) against torch's SDPA and a float64 reference.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from vggt_turbo.config import TurboConfig
from vggt_turbo.kernels import flash_attention_4 as fa4
from vggt_turbo.kernels.attention import AttentionPolicy
from vggt_turbo.kernels.attention import fa4 as fa4_backend



def fa4_first() -> AttentionPolicy:
    """A fresh unforced policy with FlashAttention-4 first (nothing learnt from another test's failures)."""
    return AttentionPolicy.for_backend("auto", fa4_first=True)


def forced() -> AttentionPolicy:
    return AttentionPolicy.for_backend("fa4")


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, N, d) attention and log-sum-exp in float64."""
    scores = (q.double() @ k.double().transpose(-2, -1)) * q.shape[-1] ** -0.5
    lse = torch.logsumexp(scores, dim=-1)
    return torch.exp(scores - lse.unsqueeze(-1)) @ v.double(), lse


def _stand_in(calls: list):
    """A fake ``flash_attn_func`` with the package's conventions, recording the layouts it was given."""

    def flash_attn_func(q, k, v, softmax_scale=None, causal=False, return_lse=False):
        calls.append({"shapes": (q.shape, k.shape, v.shape), "last_strides": (q.stride(-1), k.stride(-1), v.stride(-1)),
                      "scale": softmax_scale, "causal": causal})
        out, lse = _reference(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        out = out.transpose(1, 2).contiguous().to(q.dtype)  # (B, N, H, d), token-major
        return (out, lse.float()) if return_lse else out

    return flash_attn_func


@pytest.fixture
def fake_package(monkeypatch):
    """FlashAttention-4 replaced by the stand-in and accepted on any device; yields the list of recorded calls."""
    calls: list = []
    monkeypatch.setattr(fa4, "_function", lambda: _stand_in(calls))
    monkeypatch.setattr(fa4, "refusal", lambda q, k, v: None)
    return calls


def _qkv_views(B: int = 2, N: int = 37, H: int = 4, d: int = 16, dtype=torch.float32):
    """q, k, v as VGGT's attention has them: (B, H, N, d) strided views of one token-major projection output."""
    qkv = torch.randn(B, N, 3, H, d, dtype=dtype)
    return qkv.permute(2, 0, 3, 1, 4).unbind(0)


def test_refusal_on_cpu_and_fp32() -> None:
    q, k, v = _qkv_views()
    assert "CUDA" in fa4.refusal(q, k, v)


def test_fa4_first_falls_back_to_torch_on_cpu() -> None:
    q, k, v = _qkv_views()
    out = fa4_first().attend(q, k, v)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), rtol=0, atol=0)
    out, lse = fa4_first().attend_with_lse(q, k, v)
    ref, ref_lse = _reference(q, k, v)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-6)


def test_forced_fa4_refuses_clearly_on_cpu() -> None:
    q, k, v = _qkv_views()
    with pytest.raises(RuntimeError, match="sdpa_backend='fa4' cannot run.*CUDA"):
        forced().attend(q, k, v)
    with pytest.raises(RuntimeError, match="sdpa_backend='fa4' cannot run.*CUDA"):
        forced().attend_with_lse(q, k, v)


def test_strided_views_go_in_without_copy_and_output_is_a_view(fake_package) -> None:
    B, N, H, d = 2, 37, 4, 16
    q, k, v = _qkv_views(B, N, H, d)
    out, lse = fa4.attention(q, k, v, return_lse=True)
    call = fake_package[-1]
    assert call["shapes"] == ((B, N, H, d),) * 3 and call["last_strides"] == (1, 1, 1)
    assert call["scale"] == pytest.approx(d**-0.5) and call["causal"] is False
    assert out.shape == (B, H, N, d) and out.transpose(1, 2).is_contiguous()  # proj's reshape is a view
    ref, ref_lse = _reference(q, k, v)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-6)


def test_routing_uses_fa4_when_it_accepts(fake_package) -> None:
    q, k, v = _qkv_views()
    fa4_first().attend(q, k, v)
    fa4_first().attend_with_lse(q, k, v)
    forced().attend(q, k, v)
    assert len(fake_package) == 3
    AttentionPolicy.for_backend("auto").attend(q, k, v)  # flag off: torch's kernel only
    assert len(fake_package) == 3


def test_failure_is_logged_once_and_falls_back(monkeypatch, caplog) -> None:
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("no kernel for this GPU")

    monkeypatch.setattr(fa4, "_function", lambda: broken)
    monkeypatch.setattr(fa4, "refusal", lambda q, k, v: None)  # accepted on the CPU
    policy = AttentionPolicy.for_backend("auto", fa4_first=True)
    q, k, v = _qkv_views()
    with caplog.at_level(logging.WARNING, logger=fa4_backend.__name__):
        first = policy.attend(q, k, v)
        second = policy.attend(q, k, v)
    torch.testing.assert_close(first, F.scaled_dot_product_attention(q, k, v), rtol=0, atol=0)
    torch.testing.assert_close(second, first, rtol=0, atol=0)
    assert len(calls) == 1 and sum("FlashAttention-4 failed" in r.message for r in caplog.records) == 1
    assert "no kernel for this GPU" in policy.candidates[0].failure


def test_policy_follows_the_flags() -> None:
    assert AttentionPolicy.from_config(TurboConfig()).names == ("fa4", "auto")
    assert AttentionPolicy.from_config(TurboConfig(flash_attention_4=False)).names == ("auto",)
    assert AttentionPolicy.from_config(TurboConfig(sdpa=True, sdpa_backend="cudnn")).names == ("cudnn",)
    assert AttentionPolicy.from_config(TurboConfig(sdpa=True, sdpa_backend="fa4", flash_attention_4=False)).names == (
        "fa4",
    )
    with pytest.raises(ValueError, match="sdpa_backend"):
        TurboConfig(sdpa_backend="fa3")


_GPU = torch.cuda.is_available() and fa4.is_installed() and torch.cuda.get_device_capability()[0] in (9, 10)


@pytest.mark.gpu
@pytest.mark.skipif(not _GPU, reason="needs flash-attn-4 and a Hopper or Blackwell GPU")
@pytest.mark.parametrize("B,N", [(4, 1374), (1, 13740)])
def test_real_package_matches_sdpa_in_bf16(B: int, N: int) -> None:
    """Frame-like and global-like VGGT shapes (head dim 64, 16 heads): against float64, FlashAttention-4's bf16
    output is as close as torch's SDPA; its log-sum-exp matches to fp32 accuracy."""
    torch.manual_seed(0)
    qkv = torch.randn(B, N, 3, 16, 64, device="cuda", dtype=torch.bfloat16)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    assert fa4.refusal(q, k, v) is None
    with torch.no_grad():
        out, lse = fa4.attention(q, k, v, return_lse=True)
        torch_out = F.scaled_dot_product_attention(q, k, v)
    ref, ref_lse = _reference(q, k, v)
    err = ((out.double() - ref).norm() / ref.norm()).item()
    torch_err = ((torch_out.double() - ref).norm() / ref.norm()).item()
    assert err <= max(2 * torch_err, 1e-2)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-4, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not _GPU, reason="needs flash-attn-4 and a Hopper or Blackwell GPU")
def test_real_package_is_captured_by_a_cuda_graph() -> None:
    """cuda_graphs captures the attention: a replay on new inputs gives what an eager call gives."""
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 16, 1374, 64, device="cuda", dtype=torch.bfloat16).unbind(0)
    with torch.no_grad():
        fa4.attention(q, k, v)  # compiles outside the capture, as cuda_graphs' warm-up does
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out, _ = fa4.attention(q, k, v)
        for t in (q, k, v):
            t.copy_(torch.randn_like(t))
        graph.replay()
        eager, _ = fa4.attention(q, k, v)
    torch.testing.assert_close(out, eager, rtol=0, atol=0)
