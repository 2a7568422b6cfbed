"""Hand-written GPU kernels the patches call: one public module per kernel, with a PyTorch reference of the same
signature; and ``attention/``, the dispatcher that picks the attention kernel of every call (torch's kernels,
FlashAttention-4) for every patch that computes attention.

Triton is optional: a kernel module imports it only when its kernel runs on CUDA tensors; without it the
references run.
"""

import functools
import importlib.util


@functools.lru_cache(maxsize=None)
def triton_installed() -> bool:
    """Whether triton can be imported (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None
