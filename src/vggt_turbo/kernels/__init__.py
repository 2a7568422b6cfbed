"""Hand-written GPU kernels the patches call: one public module per kernel, with a PyTorch reference of the same
signature.

Triton is optional: a kernel module imports it only when its kernel runs on CUDA tensors; without it the
references run.
"""
