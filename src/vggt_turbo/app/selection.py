"""Which frames of ``count`` to use: the one rule behind ``--frames``/``--stride`` and the preview's strip.

Apart from ``inputs`` (which imports torch) so that the preview's renderer, a torch-free process of its own
(``preview_process``), can import it.
"""

from __future__ import annotations

from typing import Optional

import numpy as np


def select(count: int, frames: Optional[int] = None, stride: Optional[int] = None) -> list[int]:
    """Indices of the frames to use out of ``count``: ``frames`` evenly spaced (first and last included), or
    every ``stride``-th, or all. Asking for more frames than there are gives all of them."""
    if stride is not None:
        return list(range(0, count, stride))
    if frames is None or frames >= count:
        return list(range(count))
    return sorted({int(round(i)) for i in np.linspace(0, count - 1, frames)})
