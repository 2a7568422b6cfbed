"""torch's attention kernels as backends: ``TorchDefault`` (``"auto"``: the kernel torch picks itself) and
``TorchKernel`` (one SDPA backend forced: ``"cudnn"``, ``"flash"``, ``"efficient"`` or ``"math"``; with the
log-sum-exp, the entry points of ``lse.py``).

Why ``refusal`` checks so little: torch checks every call of a forced kernel itself and raises when the kernel cannot
run it; that error becomes this backend's refusal (``KernelRefused``). ``refusal`` names only what is certain before
any launch (no such kernel for CPU tensors, a dtype the CUDA kernel never takes), so it never turns down a call
that torch would run under ``sdpa_kernel``: the kernel that runs is the one torch runs.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ...autocast import autocast_dtype
from . import lse as lse_kernels
from .backend import Backend, KernelRefused

_MEMBERS = {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "math": "MATH"}
_NO_CPU_KERNEL = ("cudnn", "efficient")
_HALF_ON_CUDA = ("cudnn", "flash")  # fp16 and bf16 only
_HALF = (torch.float16, torch.bfloat16)


class TorchDefault(Backend):
    """``F.scaled_dot_product_attention`` as it is: torch's own choice among its kernels (cuDNN first on an H100)."""

    name = "auto"

    def refusal(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lse: bool) -> Optional[str]:
        return "torch's own choice returns no log-sum-exp" if lse else None

    def run(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lse: bool
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        return F.scaled_dot_product_attention(q, k, v), None


class TorchKernel(Backend):
    """One of torch's SDPA backends, the only one enabled during the call (``sdpa_kernel``); ``ValueError`` at
    construction (when a patch is applied, not at the first forward) where this torch has no such backend."""

    def __init__(self, name: str) -> None:
        member = getattr(SDPBackend, _MEMBERS[name], None)
        if member is None:
            raise ValueError(f"sdpa_backend={name!r} is not available in torch {torch.__version__}")
        self.name, self._member = name, member

    def refusal(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lse: bool) -> Optional[str]:
        if lse:
            return lse_kernels.refusal(q, self.name)
        if self.name in _NO_CPU_KERNEL and q.device.type == "cpu":
            return f"no {self.name!r} kernel for CPU tensors"
        if self.name in _HALF_ON_CUDA and q.device.type == "cuda":
            dtype = _sdpa_dtype(q)
            if dtype not in _HALF:
                return f"dtype {dtype} (fp16 or bf16 needed)"
        return None

    def run(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lse: bool
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        if lse:
            return lse_kernels.reference(q, k, v) if self.name == "math" else lse_kernels.fused(q, k, v, self.name)
        try:
            with sdpa_kernel([self._member]):
                return F.scaled_dot_product_attention(q, k, v), None
        except RuntimeError as err:
            raise KernelRefused(str(err)) from err


def _sdpa_dtype(q: torch.Tensor) -> torch.dtype:
    """The dtype SDPA computes q in: autocast casts every floating input but float64 to its dtype."""
    dtype = autocast_dtype(q.device.type)
    return dtype if dtype is not None and q.dtype != torch.float64 else q.dtype
