"""Fused CPU decode path: a decode-only step of a Llama-family model in bfloat16 runs as one C++ call
(kernels/cpu_decode.cpp) instead of ~45 torch ops per layer.

The runner uses it automatically for CPU + bfloat16 steps whose tokens are all decode tokens
(at most MAX_TOKENS of them); prefill/extend steps, other dtypes and devices, and models or shapes
the kernels do not cover keep the torch path, which stays the reference. Set
RADIXSERVE_CPU_DECODE_KERNELS=0 to turn the fast path off.

The kernels get their own packed copy of the layer weights (the torch path's weights stay as they
are for prefill) and read/write the runner's KV pool in place.
"""

from __future__ import annotations

import logging

import torch

from radixserve.kernels import cpu_decode
from radixserve.executor.attention.metadata import ForwardBatch
from radixserve.executor.layers.activation import SiluAndMul
from radixserve.executor.parallel_state import tp_size

log = logging.getLogger("radixserve.executor.fast_decode")

SUPPORTED_HEAD_DIMS = (32, 48, 64, 80, 96, 128, 160, 192, 256)


def bf16(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.bfloat16).contiguous()


class FastDecode:
    MAX_TOKENS = 16  # decode batches above this run the torch path (oneDNN's GEMMs win there)

    def __init__(self, module, kernel_model, model):
        self._module = module
        self._kernel_model = kernel_model
        self._embed = model.model.embed_tokens

    @classmethod
    def build(cls, runner) -> "FastDecode | None":
        """The fast path for this runner's model, or None where it does not apply (reason logged)."""
        from radixserve.executor.models.llama import LlamaForCausalLM

        model = runner.model
        if runner.device.type != "cpu" or runner.dtype != torch.bfloat16 or tp_size() != 1:
            return None
        if getattr(model, "quant_config", None) is not None:
            log.info("fused CPU decode: quantized weights; using the torch path")
            return None
        if not isinstance(model, LlamaForCausalLM):
            log.info(
                "fused CPU decode: %s not supported; using the torch path", type(model).__name__
            )
            return None
        if getattr(model, "uses_mrope", False):  # the runner gives M-RoPE models the plain forward
            log.info("fused CPU decode: M-RoPE positions not supported; using the torch path")
            return None
        if runner.kv_pool.fp8:  # the fused kernel reads a bf16 pool only
            log.info("fused CPU decode: fp8 KV cache not supported; using the torch path")
            return None
        layers = model.model.layers
        attn0 = layers[0].self_attn
        reason = None
        if attn0.head_dim not in SUPPORTED_HEAD_DIMS:
            reason = f"head_dim {attn0.head_dim}"
        elif attn0.num_heads % attn0.num_kv_heads:
            reason = "heads not a multiple of kv heads"
        elif any(not isinstance(l.mlp.act, SiluAndMul) for l in layers):
            reason = "unexpected layer structure"
        elif any(l.self_attn.attn.sliding_window or l.self_attn.attn.logit_softcap for l in layers):
            reason = "sliding-window or soft-capped attention"
        elif getattr(model, "quant_config", None) is not None:
            reason = f"quantized weights ({model.quant_config.describe()})"
        if reason:
            log.info("fused CPU decode: unsupported model (%s); using the torch path", reason)
            return None
        module = cpu_decode.load()
        if module is None:
            return None
        rot = model.rotary_emb
        hidden = model.model.embed_tokens.weight.shape[1]
        mlp0 = layers[0].mlp
        eps = {l.input_layernorm.eps for l in layers} | {
            l.post_attention_layernorm.eps for l in layers
        }
        if len(eps) != 1 or model.model.norm.eps not in eps:
            log.info("fused CPU decode: mixed RMSNorm eps; using the torch path")
            return None
        kernel_model = module.DecodeModel(
            hidden,
            attn0.num_heads,
            attn0.num_kv_heads,
            attn0.head_dim,
            mlp0.down_proj.in_features,
            eps.pop(),
            attn0.attn.scaling,
            rot.cos_table.contiguous(),
            rot.sin_table.contiguous(),
            bf16(model.model.norm.weight),
        )
        pack, f32 = cpu_decode.pack_weight, cpu_decode.bias_f32
        pool = runner.kv_pool
        for i, layer in enumerate(layers):
            a, m = layer.self_attn, layer.mlp
            kernel_model.add_layer(
                pack(a.qkv_proj.weight.detach()),
                f32(a.qkv_proj.bias),
                pack(a.o_proj.weight.detach()),
                f32(a.o_proj.bias),
                pack(m.gate_up_proj.weight.detach()),
                f32(m.gate_up_proj.bias),
                pack(m.down_proj.weight.detach()),
                f32(m.down_proj.bias),
                pool.k[i],
                pool.v[i],
                bf16(layer.input_layernorm.weight),
                bf16(layer.post_attention_layernorm.weight),
            )
        log.info(
            "fused CPU decode kernels on for decode batches of up to %d tokens", cls.MAX_TOKENS
        )
        return cls(module, kernel_model, model)

    def supports(self, batch: ForwardBatch) -> bool:
        return batch.num_extend_tokens == 0 and 0 < batch.num_tokens <= self.MAX_TOKENS

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """Final-normed hidden states [T, hidden], like model(input_ids, positions), for a decode-only step."""
        meta = batch.table_meta
        # The kernels read row t of a [T, max_len] table up to lens[t]: the sequences' table rows, cut there.
        table = meta.table[:, : max(batch.decode_lens)].index_select(0, meta.seq_rows)
        x = self._embed(batch.input_ids)
        return self._kernel_model.forward(x, batch.positions, batch.out_slots, table, meta.seq_lens)
