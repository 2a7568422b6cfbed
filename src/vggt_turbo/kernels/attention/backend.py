"""What an attention backend is: a name, the reason it refuses a call (None when it accepts) and a way to run it.

Why a refusal with a reason rather than a yes or no (as xformers' attention dispatch does, each of its operators
listing why it does not support an input): ``policy.AttentionPolicy`` can then pick among backends without knowing
any of them, a forced backend's error names what is wrong with the call, and an unforced policy can log why it
passed a backend over.
"""

from __future__ import annotations

import abc
from typing import Optional

import torch


class KernelRefused(RuntimeError):
    """Raised by ``Backend.run`` when the kernel refused the call only once it was asked to run it (a check that
    the kernel itself makes on the host), or failed in a way its backend takes as a refusal: the policy treats it
    as that backend's refusal of the call, ``str(error)`` being the reason."""


class Backend(abc.ABC):
    """One attention kernel, named as ``TurboConfig.sdpa_backend`` names it."""

    name: str

    @abc.abstractmethod
    def refusal(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lse: bool) -> Optional[str]:
        """Why this backend cannot compute softmax(q kᵀ/√d) v for (B, H, N, d) q and (B, H, K, d) k, v (and, with
        ``lse``, each query's log-sum-exp), or None when it can. Checked on the host, before any launch."""

    @abc.abstractmethod
    def run(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lse: bool
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The (B, H, N, d) output and, with ``lse``, the natural log-sum-exp of each query's scaled scores (float32,
        (B, H, N); None without ``lse``). Call only after ``refusal`` returned None; ``KernelRefused`` when the
        kernel refuses the call itself."""
