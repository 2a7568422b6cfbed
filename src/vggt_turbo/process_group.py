"""Recognising and describing a ``torch.distributed.ProcessGroup`` that a configuration names.

``TurboConfig.sequence_parallel`` accepts a process group, so validating a config and serialising it must know one
when they see it; that is all they need of torch.distributed. Here, apart from ``distributed`` (the collectives of
sequence parallelism), so that the configuration does not depend on them; torch.distributed itself is imported when
a value is checked, not when this module is.
"""

from __future__ import annotations

from typing import Any


def is_process_group(value: Any) -> bool:
    import torch.distributed as dist

    return dist.is_available() and isinstance(value, dist.ProcessGroup)


def describe_group(value: Any) -> Any:
    """A JSON-friendly stand-in for a config value: a process group becomes ``"ProcessGroup(<backend>, N ranks)"``."""
    if not is_process_group(value):
        return value
    import torch.distributed as dist

    try:
        backend = dist.get_backend(value)
    except (RuntimeError, ValueError):  # a group already destroyed
        backend = "unknown backend"
    return f"ProcessGroup({backend}, {value.size()} ranks)"
