"""Patches of the whole forward's execution: CUDA graphs, offloading the kept layers to host memory, sequence
parallelism over GPUs and NVTX ranges."""
