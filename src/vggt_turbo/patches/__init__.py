"""One module per optimization. ``ALL_PATCHES`` is the order in which wrappers are stacked (last = outermost)."""

from ._base import Patch, Target
from .cached_positions import PATCH as CACHED_POSITIONS
from .cuda_graphs import PATCH as CUDA_GRAPHS
from .fused_frame_batching import PATCH as FUSED_FRAME_BATCHING
from .global_to_frame import PATCH as GLOBAL_TO_FRAME
from .nvtx_ranges import PATCH as NVTX
from .sdpa import PATCH as SDPA
from .sync_free_rope import PATCH as SYNC_FREE_ROPE

ALL_PATCHES: tuple[Patch, ...] = (
    CACHED_POSITIONS,  # replaces Aggregator.forward without calling upstream's: must sit below sync_free_rope
    SYNC_FREE_ROPE,
    SDPA,
    FUSED_FRAME_BATCHING,
    GLOBAL_TO_FRAME,
    NVTX,
    CUDA_GRAPHS,  # outermost: captures everything below it
)

__all__ = ["ALL_PATCHES", "Patch", "Target"]
