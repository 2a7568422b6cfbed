"""One attention dispatcher for every patch: backends that say why they refuse a call, and a policy that picks
among them (the design of xformers' attention dispatch).

- ``backend.py``: what a backend is (``Backend``: a name, ``refusal``, ``run``).
- ``torch_sdpa.py``: torch's kernels: its own choice (``"auto"``) and each SDPA backend forced.
- ``lse.py``: torch's entry points that also return the log-sum-exp, and their PyTorch reference.
- ``fa4.py``: FlashAttention-4 (``kernels/flash_attention_4.py``), which remembers a failure.
- ``policy.py``: ``AttentionPolicy``, built once from the config, which picks the backend per call.
"""

from .backend import Backend, KernelRefused
from .policy import AttentionPolicy, BackendRefused

__all__ = ["AttentionPolicy", "Backend", "BackendRefused", "KernelRefused"]
