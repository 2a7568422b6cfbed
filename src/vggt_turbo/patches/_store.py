"""Where the aggregator's kept intermediates go as soon as they exist: ``cached_positions``' forward loop stores
each through ``STORE``; ``offload_intermediates`` sets it to a copy to host memory for the duration of a call."""

from __future__ import annotations

import contextvars
from typing import Callable

import torch

STORE: contextvars.ContextVar[Callable[[torch.Tensor], torch.Tensor]] = contextvars.ContextVar(
    "vggt_turbo_store", default=lambda t: t
)
