"""The slices in which a long sequence's MLP runs (``chunked_mlp``, and ``fused_layer_scale`` when it is on).

Why slices: a block's MLP widens each token to 4x the model width and its activation keeps a second such tensor;
every MLP step works token by token, so running it over row slices keeps that wide activation to one slice at a
time. ``CHUNK_TOKENS`` rows are enough for the matmuls to run at full speed. Read at call time (tests shrink it).
"""

from __future__ import annotations

CHUNK_TOKENS = 32768


def token_slices(tokens: int) -> list[slice]:
    """The row slices of a sequence of ``tokens`` rows; one slice (all rows) when it is not longer than a chunk."""
    return [slice(start, min(start + CHUNK_TOKENS, tokens)) for start in range(0, tokens, CHUNK_TOKENS)]


def is_long(tokens: int) -> bool:
    """Whether a sequence of ``tokens`` rows runs its MLP in slices."""
    return tokens > CHUNK_TOKENS
