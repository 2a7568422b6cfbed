"""Patches of the aggregator's frame and global blocks: their attention (kernel choice, qk-norm and RoPE), residual
sums and norms, MLP slicing, compilation and weight casts."""
