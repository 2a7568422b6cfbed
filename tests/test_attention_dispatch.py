"""The attention dispatcher (``kernels/attention``): each backend's reasons for refusing a call, the policy's
choice for every config, a forced backend's error, the unforced fallback and its log, and FlashAttention-4's
failure remembered per policy (so per patched model), not per process."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import vggt_turbo
from helpers import only

from vggt_turbo.config import TurboConfig
from vggt_turbo.kernels import flash_attention_4
from vggt_turbo.kernels.attention import AttentionPolicy, BackendRefused, lse, policy as policy_module
from vggt_turbo.kernels.attention.fa4 import FlashAttention4
from vggt_turbo.kernels.attention.torch_sdpa import TorchDefault, TorchKernel


def qkv(dtype: torch.dtype = torch.float32, d: int = 16) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    return tuple(torch.randn(2, 3, n, d, generator=gen).to(dtype) for n in (9, 7, 7))


def cuda_like(dtype: torch.dtype, d: int = 64) -> SimpleNamespace:
    """What the refusals read of a CUDA tensor, without a GPU."""
    return SimpleNamespace(device=torch.device("cuda"), is_cuda=True, dtype=dtype, shape=(1, 2, 8, d),
                           requires_grad=False)


# --- refusals --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lse_wanted", [False, True], ids=["plain", "lse"])
@pytest.mark.parametrize("name", ["math", "flash"])
def test_math_and_flash_accept_fp32_on_the_cpu(name: str, lse_wanted: bool) -> None:
    q, k, v = qkv()
    assert TorchKernel(name).refusal(q, k, v, lse_wanted) is None


@pytest.mark.parametrize("name", ["efficient", "cudnn"])
def test_cuda_only_kernels_refuse_the_cpu(name: str) -> None:
    q, k, v = qkv()
    assert TorchKernel(name).refusal(q, k, v, lse=False) == f"no {name!r} kernel for CPU tensors"
    assert f"no {name!r} attention kernel returning the log-sum-exp on cpu" in TorchKernel(name).refusal(q, k, v, True)


@pytest.mark.parametrize("name", ["flash", "cudnn"])
def test_half_only_kernels_refuse_fp32_on_cuda(name: str) -> None:
    q = cuda_like(torch.float32)
    assert TorchKernel(name).refusal(q, q, q, lse=False) == "dtype torch.float32 (fp16 or bf16 needed)"
    assert TorchKernel(name).refusal(cuda_like(torch.bfloat16), q, q, lse=False) is None
    assert TorchKernel("efficient").refusal(q, q, q, lse=False) is None  # efficient takes fp32


def test_flash_log_sum_exp_needs_half_on_cuda(monkeypatch) -> None:
    monkeypatch.setattr(lse, "_op", lambda device, name: object())  # as if this torch had every CUDA entry point
    assert lse.refusal(cuda_like(torch.float32), "flash") == "dtype torch.float32 (fp16 or bf16 needed)"
    assert lse.refusal(cuda_like(torch.bfloat16), "flash") is None
    assert lse.refusal(cuda_like(torch.float32), "efficient") is None


def test_torchs_own_choice_returns_no_log_sum_exp() -> None:
    q, k, v = qkv()
    assert TorchDefault().refusal(q, k, v, lse=False) is None
    assert "log-sum-exp" in TorchDefault().refusal(q, k, v, lse=True)


def test_flash_attention_4_refusals(monkeypatch) -> None:
    q, k, v = qkv()
    assert FlashAttention4().refusal(q, k, v, lse=False) == "tensors not on a CUDA device"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(flash_attention_4, "_function", lambda: None)  # the package missing
    half = cuda_like(torch.bfloat16)
    assert FlashAttention4().refusal(half, half, half, lse=True) == "flash-attn-4 is not installed"
    fp32 = cuda_like(torch.float32)
    assert FlashAttention4().refusal(fp32, fp32, fp32, lse=False) == "dtype torch.float32 (fp16 or bf16 needed)"
    wide = cuda_like(torch.bfloat16, d=256)
    assert FlashAttention4().refusal(wide, wide, wide, lse=False) == "head dim 256"
    grad = SimpleNamespace(**{**vars(half), "requires_grad": True})
    assert FlashAttention4().refusal(grad, half, half, lse=False) == "autograd on (inference only here)"


# --- the policy ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "names", "lse_names", "forced"),
    [
        (TurboConfig(), ("fa4", "auto"), ("fa4", "flash", "efficient", "math"), False),
        (TurboConfig(flash_attention_4=False), ("auto",), ("flash", "efficient", "math"), False),
        (TurboConfig(sdpa=True), ("fa4", "auto"), ("fa4", "flash", "efficient", "math"), False),
        (TurboConfig(sdpa_backend="cudnn"), ("fa4", "auto"), ("fa4", "flash", "efficient", "math"), False),
        *(
            (TurboConfig(sdpa=True, sdpa_backend=name), (name,), (name,), True)
            for name in ("cudnn", "flash", "efficient", "math", "fa4")
        ),
    ],
)
def test_policy_of_each_config(config: TurboConfig, names, lse_names, forced: bool) -> None:
    """``sdpa_backend`` counts only with ``sdpa`` on; unforced, FlashAttention-4 first under its flag."""
    policy = AttentionPolicy.from_config(config)
    assert policy.names == names and tuple(b.name for b in policy.lse_candidates) == lse_names
    assert policy.forced is forced
    first = AttentionPolicy.from_config(config, fa4_first=True)  # dino_attention's: FlashAttention-4 first anyway
    assert first.names == (names if forced else ("fa4", "auto"))


def test_forced_backend_that_refuses_raises_its_reason() -> None:
    q, k, v = qkv()
    policy = AttentionPolicy.for_backend("efficient")
    with pytest.raises(ValueError, match="sdpa_backend='efficient' cannot run attention on q.*CPU tensors") as err:
        policy.attend(q, k, v)
    assert isinstance(err.value, RuntimeError) and "\n" not in str(err.value)
    with pytest.raises(BackendRefused, match="cannot run attention with the log-sum-exp.*no 'cudnn' attention kernel"):
        AttentionPolicy.for_backend("cudnn").attend_with_lse(q, k, v)


def test_forced_backend_refused_by_torch_itself_raises_its_reason() -> None:
    """A refusal only the kernel finds (here: torch's flash for CPU takes no float64 with the others float32)."""
    q, k, v = qkv()
    with pytest.raises(BackendRefused, match="sdpa_backend='flash' cannot run attention on q.*use sdpa_backend='auto'"):
        AttentionPolicy.for_backend("flash").attend(q.double(), k, v)


def test_forced_backend_runs_only_its_kernel() -> None:
    q, k, v = qkv()
    out = AttentionPolicy.for_backend("math").attend(q, k, v)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), rtol=1e-6, atol=1e-6)


def test_unforced_policy_skips_what_refuses_and_says_why(caplog) -> None:
    q, k, v = qkv()
    with caplog.at_level(logging.DEBUG, logger=policy_module.__name__):
        out = AttentionPolicy.for_backend("auto", fa4_first=True).attend(q, k, v)
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v))
    assert any("'fa4' skipped" in r.message and "CUDA" in r.message for r in caplog.records)


def test_unforced_log_sum_exp_falls_back_to_the_math_reference(monkeypatch) -> None:
    """On the CPU torch's flash entry point runs the call; where this torch had none, the math reference would."""
    q, k, v = qkv()
    calls = []
    real = lse.fused
    monkeypatch.setattr(lse, "fused", lambda *args: calls.append(args[-1]) or real(*args))
    policy = AttentionPolicy.for_backend("auto")
    out, got = policy.attend_with_lse(q, k, v)
    assert calls == ["flash"]
    monkeypatch.setattr(lse, "_OPS", {})
    ref, ref_lse = policy.attend_with_lse(q, k, v)
    assert calls == ["flash"]  # the reference ran
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, ref_lse, rtol=1e-5, atol=1e-6)


def test_unforced_policy_whose_every_backend_refuses_names_them() -> None:
    q, k, v = qkv()
    policy = AttentionPolicy([TorchDefault()], [TorchDefault()], forced=False)
    with pytest.raises(BackendRefused, match=r"every attention backend \(auto\) refused attention with the log-sum"):
        policy.attend_with_lse(q, k, v)


# --- FlashAttention-4's failure is per policy ------------------------------------------------------------------


@pytest.fixture
def broken_fa4(monkeypatch) -> list:
    """FlashAttention-4 accepted on the CPU, and failing at every call; yields the list of its calls."""
    calls: list = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("no kernel for this GPU")

    monkeypatch.setattr(flash_attention_4, "_function", lambda: broken)
    monkeypatch.setattr(flash_attention_4, "refusal", lambda q, k, v: None)
    return calls


def test_failure_state_is_per_policy(broken_fa4) -> None:
    q, k, v = qkv()
    one, other = (AttentionPolicy.for_backend("auto", fa4_first=True) for _ in range(2))
    for _ in range(3):
        torch.testing.assert_close(one.attend(q, k, v), F.scaled_dot_product_attention(q, k, v), rtol=0, atol=0)
    assert len(broken_fa4) == 1  # tried once, then refused: "it failed earlier"
    assert "failed earlier" in one.candidates[0].refusal(q, k, v, lse=True)  # with the log-sum-exp too
    other.attend_with_lse(q, k, v)
    assert len(broken_fa4) == 2 and other.candidates[0].failure is not None  # another policy tries on its own


def test_forced_fa4_failure_raises_its_reason(broken_fa4) -> None:
    q, k, v = qkv()
    with pytest.raises(BackendRefused, match="sdpa_backend='fa4' cannot run.*FlashAttention-4 failed.*no kernel"):
        AttentionPolicy.for_backend("fa4").attend(q, k, v)


def test_failure_is_forgotten_by_a_new_application(model, images, broken_fa4, caplog) -> None:
    """Re-applying the patches (or patching another model) builds new policies: FlashAttention-4 is tried again."""
    config = only("sdpa", flash_attention_4=True)  # one patch computing the attention: one policy per application
    with caplog.at_level(logging.WARNING), torch.no_grad():
        vggt_turbo.apply_optimizations(model, config)
        model.aggregator(images)
        model.aggregator(images)
        assert len(broken_fa4) == 1
        vggt_turbo.revert_optimizations(model)
        vggt_turbo.apply_optimizations(model, config)
        model.aggregator(images)
    assert len(broken_fa4) == 2
    assert sum("FlashAttention-4 failed" in r.message for r in caplog.records) == 2
