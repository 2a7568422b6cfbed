"""Running a group of aggregator blocks on either token layout — shared by the frame and global patches."""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def run_blocks(
    aggregator: nn.Module,
    blocks: nn.ModuleList,
    tokens: torch.Tensor,
    B: int,
    S: int,
    P: int,
    C: int,
    idx: int,
    pos: Optional[torch.Tensor],
    frame_layout: Callable[[int], bool],
) -> tuple[torch.Tensor, int, list[torch.Tensor]]:
    """Run ``aggregator.aa_block_size`` blocks from ``idx``; block ``i`` sees (B*S, P, C) when
    ``frame_layout(i)`` (attention within each frame) and (B, S*P, C) otherwise (attention across frames).

    ``reshape`` is a free view for the contiguous token tensors the blocks produce. Intermediates are views in
    upstream's (B, S, P, C) layout; checkpointing in training mode mirrors upstream.
    """
    intermediates = []
    for _ in range(aggregator.aa_block_size):
        rows, length = (B * S, P) if frame_layout(idx) else (B, S * P)
        tokens = tokens.reshape(rows, length, C)
        block_pos = pos.reshape(rows, length, 2) if pos is not None else None
        if aggregator.training:
            tokens = checkpoint(blocks[idx], tokens, block_pos, use_reentrant=aggregator.use_reentrant)
        else:
            tokens = blocks[idx](tokens, pos=block_pos)
        idx += 1
        intermediates.append(tokens.view(B, S, P, C))
    return tokens, idx, intermediates
