"""Compute kernels, one file each, each checked against a torch reference.

The CPU path uses the torch-native attention in services/executor/attention; Triton kernels for
the GPU (paged decode/extend attention, fused RMSNorm, rotary, SiLU-and-mul, KV store) land here
with the GPU executor work.
"""
