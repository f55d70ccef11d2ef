"""Compute kernels, one file each, each checked against a torch reference.

cpu_decode: fused bf16 decode forward for x86 CPUs with AVX512-BF16 (C++, compiled at first use),
used by services/executor/fast_decode.py. The CPU prefill path uses the torch-native attention in
services/executor/attention; Triton kernels for the GPU (paged decode/extend attention, fused RMSNorm, rotary,
SiLU-and-mul, KV store) land here with the GPU executor work.
"""
