"""Which autocast dtype is active: one helper for every patch that must round as upstream-under-autocast would.

torch 2.4 added per-device ``torch.is_autocast_enabled(device_type)`` / ``torch.get_autocast_dtype``; older
releases (upstream pins 2.3) only have the CUDA and CPU variants, which is why this is not a one-liner.
"""

from __future__ import annotations

from typing import Optional

import torch


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The autocast dtype active for ``device_type`` ("cuda", "cpu", ...), or None when autocast is off there or
    has no such device type (e.g. "meta", which recent torch refuses with a RuntimeError)."""
    try:
        return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    except RuntimeError:  # a device type autocast does not know: no autocast there
        return None
    except TypeError:  # torch < 2.4: per-device functions
        if device_type == "cuda":
            return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None
        if device_type == "cpu":
            return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
        return None
