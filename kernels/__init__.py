"""Compute kernels, one file each, each checked against a torch reference (docs/kernel_notes.md).

CPU: cpu_decode (fused bf16 decode forward for x86 CPUs with AVX512-BF16; C++, compiled at first
use) used by services/executor/fast_decode.py.
GPU (Triton; tested on CPU with TRITON_INTERPRET=1), used by the executor's CUDA forward and
its triton attention backend: rmsnorm (fused residual add + RMSNorm), rotary, rotary_kv_store (rotary fused with the
KV-cache store), silu_mul, skinny_gemm (decode linears of <= 16 rows), fused_moe,
decode_attention (paged GQA split-KV) and extend_attention (paged causal prefill), the last two
sharing paged_attention_block's online-softmax step.
"""
