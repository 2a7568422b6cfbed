"""FlashAttention-4 (``kernels/flash_attention_4.py``) as a backend, which remembers that it failed.

Why it remembers: a failure inside the optional package (a kernel that does not compile for this GPU, a CUDA
library that does not load) would recur at every call. The first one is logged as a warning and turned into a
refusal (``KernelRefused``): an unforced policy runs its next backend, and from then on this backend refuses every
call, so the warning is not repeated. The failure is this object's alone: each patch builds its policy, and so this
backend, when it is applied to a model, so a revert, a new application or another model starts afresh.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

from .. import flash_attention_4
from .backend import Backend, KernelRefused

log = logging.getLogger(__name__)


class FlashAttention4(Backend):
    """FlashAttention-4 where the package runs the call (CUDA, Hopper or Blackwell, fp16 or bf16, inference)."""

    name = "fa4"

    def __init__(self) -> None:
        self.failure: Optional[str] = None  # the error of the call that failed, once one has

    def refusal(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lse: bool) -> Optional[str]:
        if self.failure is not None:
            return f"it failed earlier ({self.failure})"
        return flash_attention_4.refusal(q, k, v)

    def run(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lse: bool
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        try:
            return flash_attention_4.attention(q, k, v, return_lse=lse)
        except Exception as err:  # a compile or launch error inside the package
            self.failure = f"{type(err).__name__}: {err}"
            log.warning("vggt_turbo: FlashAttention-4 failed (%s); this model's attention does not try it again",
                        self.failure)
            raise KernelRefused(f"FlashAttention-4 failed ({self.failure})") from err
