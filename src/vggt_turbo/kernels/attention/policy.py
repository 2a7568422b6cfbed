"""``AttentionPolicy``: which backend runs each attention call, built once from the config.

Why a policy object: every patch that computes attention itself (``sdpa``, ``fused_qk_norm_rope``, ``kv_subsample``,
``sequence_parallel``, ``dino_attention``) must pick its kernel the same way, with and without the log-sum-exp
(``kv_subsample`` merges partial softmaxes with it). The policy holds ordered candidates and asks each, in turn, why
it refuses the call (``Backend.refusal``); the first that accepts runs it. Unforced (``sdpa_backend="auto"``):
FlashAttention-4 first where the ``flash_attention_4`` flag is on, then torch's own choice; with the log-sum-exp,
FlashAttention-4, then torch's flash, efficient and math entry points (``lse.py``). Forced (``sdpa`` on with
another ``sdpa_backend``): that backend alone, and a call it refuses raises ``BackendRefused`` naming the reason
instead of silently running another kernel (a forced backend is for ablations).

A patch builds its policy when it is applied, and its wrappers hold it: what a policy learns at run time
(FlashAttention-4 failed, ``fa4.py``) belongs to that model's patch, not to the process.
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

import torch

from ...config import TurboConfig
from .backend import Backend, KernelRefused
from .fa4 import FlashAttention4
from .torch_sdpa import TorchDefault, TorchKernel

log = logging.getLogger(__name__)

# The log-sum-exp kernels of an unforced policy, after FlashAttention-4: flash where it takes the call (fp16/bf16 on
# CUDA, any float on the CPU), else efficient (CUDA), else the math reference.
_LSE_ORDER = ("flash", "efficient", "math")


class BackendRefused(ValueError, RuntimeError):
    """A forced attention backend cannot run a call; ``str(error)`` is one line naming the backend, the call and
    the reason. A ``ValueError`` (the inputs do not fit the backend asked for) that is also a ``RuntimeError``
    (raised during the forward, as torch's own refusal of a forced kernel is)."""


class AttentionPolicy:
    """Ordered candidates for plain attention (``attend``) and for attention with the log-sum-exp
    (``attend_with_lse``); ``forced``: one backend whose refusal raises."""

    def __init__(self, candidates: Sequence[Backend], lse_candidates: Sequence[Backend], forced: bool) -> None:
        self.candidates = tuple(candidates)
        self.lse_candidates = tuple(lse_candidates)
        self.forced = forced

    @classmethod
    def from_config(cls, config: TurboConfig, fa4_first: Optional[bool] = None) -> "AttentionPolicy":
        """The policy of ``config``: ``sdpa_backend`` when ``sdpa`` is on, else unforced; FlashAttention-4 first
        when unforced and ``fa4_first`` (default: the ``flash_attention_4`` flag)."""
        name = config.sdpa_backend if config.sdpa else "auto"
        return cls.for_backend(name, fa4_first=config.flash_attention_4 if fa4_first is None else fa4_first)

    @classmethod
    def for_backend(cls, name: str, fa4_first: bool = False) -> "AttentionPolicy":
        """The policy of one ``sdpa_backend`` value: ``"auto"`` unforced (FlashAttention-4 first with
        ``fa4_first``), any other that backend forced; ``ValueError`` for one this torch lacks."""
        if name == "auto":
            first: tuple[Backend, ...] = (FlashAttention4(),) if fa4_first else ()
            return cls(first + (TorchDefault(),), first + tuple(TorchKernel(n) for n in _LSE_ORDER), forced=False)
        backend = FlashAttention4() if name == "fa4" else TorchKernel(name)
        return cls((backend,), (backend,), forced=True)

    @property
    def names(self) -> tuple[str, ...]:
        """The plain-attention candidates' names, in order."""
        return tuple(b.name for b in self.candidates)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``F.scaled_dot_product_attention(q, k, v)`` on the first candidate that accepts the call."""
        return self._run(self.candidates, q, k, v, lse=False)[0]

    def attend_with_lse(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``softmax(q kᵀ / sqrt(d)) v`` and the log-sum-exp of each query's scaled scores (float32, (B, H, N)),
        for (B, H, N, d) queries and (B, H, K, d) keys and values of one dtype."""
        out, lse = self._run(self.lse_candidates, q, k, v, lse=True)
        assert lse is not None
        return out, lse

    def _run(
        self, candidates: tuple[Backend, ...], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lse: bool
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        for backend in candidates:
            reason = backend.refusal(q, k, v, lse)
            cause: Optional[KernelRefused] = None
            if reason is None:
                try:
                    return backend.run(q, k, v, lse)
                except KernelRefused as err:
                    reason, cause = str(err), err
            if self.forced:
                raise BackendRefused(
                    f"vggt_turbo: sdpa_backend={backend.name!r} cannot run {_call(q, lse)}: {_one_line(reason)}; "
                    "use sdpa_backend='auto'"
                ) from cause
            if log.isEnabledFor(logging.DEBUG):  # formatted only then: this runs at every call
                log.debug("vggt_turbo: attention backend %r skipped for %s: %s", backend.name, _call(q, lse),
                          _one_line(reason))
        names = ", ".join(b.name for b in candidates)
        raise BackendRefused(f"vggt_turbo: every attention backend ({names}) refused {_call(q, lse)} (debug log: why)")

    def __repr__(self) -> str:
        return f"AttentionPolicy({' > '.join(self.names)}{', forced' if self.forced else ''})"


def _call(q: torch.Tensor, lse: bool) -> str:
    return f"attention{' with the log-sum-exp' if lse else ''} on q{tuple(q.shape)} {q.dtype} on {q.device}"


def _one_line(text: str) -> str:
    return " ".join(text.split())
