"""Fused CPU decode path: a decode-only step of a Llama-family model in bfloat16 runs as one C++ call
(kernels/cpu_decode.cpp) instead of ~45 torch ops per layer.

The runner uses it automatically for CPU + bfloat16 steps of at most MAX_TOKENS tokens that are all
generated ones: decode tokens, and the tokens of a speculative verify step (at most
DECODE_ROWS_MAX_TOKENS after a cached prefix), each run as a decode step at its length, as the torch
path's attention runs them (torch_native's _as_decode_rows): so verify rows stay decode rows, bit for
bit, and NGRAM stays lossless. Prompt tokens (prefills, later chunks, a prompt's last token recomputed
after a full radix-cache hit), other dtypes and devices, and models or shapes the kernels do not cover
keep the torch path, which stays the reference. Set RADIXSERVE_CPU_DECODE_KERNELS=0 to turn the fast
path off.

The kernels get their own packed copy of bf16 layer weights (the torch path's weights stay as they are
for prefill) and read/write the runner's KV pool in place. A model served natively from a GGUF file
(quantization gguf) whose linears are each one or more runs of Q4_0 / Q4_1 / Q8_0 / Q4_K / Q5_K / Q6_K
blocks (a Q4_K_M qkv: Q4_K q|k, Q6_K v) hands the kernels those blocks as they are (no copy): they run
the row dots of the torch path's gguf_cpu kernels, run by run, so each linear gives the torch path's bits.
Such a model's LM head (compute_logits as Llama's, one run of those blocks, no bias) also runs as one
C++ call (gguf_cpu.gguf_logits: float32 logits, the torch path's bits) for the steps the fused path runs.
"""

from __future__ import annotations

import logging

import torch

from radixserve.kernels import cpu_decode, gguf_cpu
from radixserve.executor.attention.metadata import ForwardBatch
from radixserve.executor.attention.torch_native import DECODE_ROWS_MAX_TOKENS
from radixserve.executor.layers.activation import SiluAndMul
from radixserve.executor.parallel_state import tp_size

log = logging.getLogger("radixserve.executor.fast_decode")

SUPPORTED_HEAD_DIMS = (32, 48, 64, 80, 96, 128, 160, 192, 256)


def bf16(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.bfloat16).contiguous()


def gguf_blocks(linear) -> tuple[torch.Tensor, int] | None:
    """A GGUF linear's blocks and type when it is one run of rows of a fused type (an LM head for
    gguf_cpu.gguf_logits), else None."""
    runs = gguf_runs(linear)
    return runs[0] if runs is not None and len(runs) == 1 else None


def gguf_runs(linear) -> list[tuple[torch.Tensor, int]] | None:
    """A GGUF linear's runs of rows (blocks, type) in output order when the kernels run it: every run of
    a fused type. A Q4_K_M layer's qkv is two runs (Q4_K q|k, Q6_K v): the fused step runs each into its
    columns, as the torch path's GgufLinearMethod.apply does; with a bias, only one run (the torch path
    adds a multi-run linear's bias after rounding each run's output to the activations' dtype)."""
    parts = getattr(linear.weight, "gguf_parts", None)
    if not parts:
        return None
    if len(parts) > 1 and getattr(linear, "bias", None) is not None:
        return None
    if any(q not in gguf_cpu.KERNEL_TYPES or rows.dtype != torch.uint8 for q, rows in parts):
        return None
    return [(rows.contiguous(), q) for q, rows in parts]


def runs_args(linear) -> tuple[list[torch.Tensor], list[int]]:
    """DecodeModel.add_gguf_layer's arguments for a linear: its runs' blocks, their types."""
    runs = gguf_runs(linear)
    return [rows for rows, _ in runs], [int(q) for _, q in runs]


def decoder_linears(model):
    """Every decoder layer's qkv, o, gate_up and down linears, in order."""
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        yield from (a.qkv_proj, a.o_proj, m.gate_up_proj, m.down_proj)


def gguf_unsupported(model) -> str | None:
    """Why the fused path cannot run this GGUF model's linears as the torch path does, or None."""
    if gguf_cpu.load() is None:  # the torch path then dequantizes: other bits than the row dots
        return "the GGUF CPU kernels are off"
    for lin in decoder_linears(model):
        if gguf_runs(lin) is None:
            types = [gguf_cpu.base_type(q) for q, _ in getattr(lin.weight, "gguf_parts", [])]
            fused = gguf_cpu.type_names(gguf_cpu.FUSED_TYPES)
            return f"GGUF block types {types} (runs of {fused} run fused)"
    return None


def gguf_layout(model) -> str:
    """How a GGUF model's linears hold their blocks, for the startup log."""
    types = {q for lin in decoder_linears(model) for q, _ in getattr(lin.weight, "gguf_parts", [])}
    packed = types & set(gguf_cpu.PACKED_TYPES)
    if packed == types:
        return "rows packed 16 at a time"
    return "rows partly packed" if packed else "rows in the file's order"


def lm_head_blocks(model) -> tuple[torch.Tensor, int] | None:
    """The LM head's blocks and type where gguf_cpu.gguf_logits computes model.compute_logits (Llama's:
    the head's output widened to float32) with the same bits, else None."""
    from radixserve.executor.models.llama import LlamaForCausalLM

    head = getattr(model, "lm_head", None)
    if type(model).compute_logits is not LlamaForCausalLM.compute_logits or head is None:
        return None
    if getattr(head, "bias", None) is not None or gguf_cpu.load() is None:
        return None
    return gguf_blocks(head)


class FastDecode:
    MAX_TOKENS = 16  # decode batches above this run the torch path (oneDNN's GEMMs win there)

    def __init__(self, module, kernel_model, model):
        self._module = module
        self._kernel_model = kernel_model
        self._embed = model.model.embed_tokens
        self._compute_logits = model.compute_logits
        self._lm_head = lm_head_blocks(model)

    @classmethod
    def build(cls, runner) -> "FastDecode | None":
        """The fast path for this runner's model, or None where it does not apply (reason logged)."""
        from radixserve.executor.models.llama import LlamaForCausalLM

        model = runner.model
        if runner.device.type != "cpu" or runner.dtype != torch.bfloat16 or tp_size() != 1:
            return None
        quant = getattr(model, "quant_config", None)
        if quant is not None and quant.name != "gguf":
            log.info("fused CPU decode: quantized weights (%s); using the torch path", quant.name)
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
        elif quant is not None:
            reason = gguf_unsupported(model)
        if reason:
            log.info("fused CPU decode: unsupported model (%s); using the torch path", reason)
            return None
        module = cpu_decode.load()
        if module is None:
            return None
        rot = model.rotary_emb
        hidden = model.model.norm.weight.shape[0]  # (a GGUF embedding holds blocks, not values)
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
            if quant is not None:
                kernel_model.add_gguf_layer(
                    *runs_args(a.qkv_proj),
                    f32(a.qkv_proj.bias),
                    *runs_args(a.o_proj),
                    f32(a.o_proj.bias),
                    *runs_args(m.gate_up_proj),
                    f32(m.gate_up_proj.bias),
                    *runs_args(m.down_proj),
                    f32(m.down_proj.bias),
                    pool.k[i],
                    pool.v[i],
                    bf16(layer.input_layernorm.weight),
                    bf16(layer.post_attention_layernorm.weight),
                )
                continue
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
            "fused CPU decode kernels on for decode batches of up to %d tokens%s",
            cls.MAX_TOKENS,
            "" if quant is None else f" (GGUF blocks: {gguf_layout(model)})",
        )
        return cls(module, kernel_model, model)

    def supports(self, batch: ForwardBatch) -> bool:
        """Steps whose tokens are all generated ones: decode tokens, and verify steps (the token sampled
        last step, then its drafts: extends after a cached prefix short enough that the torch path's
        attention runs them as decode rows too). Prompt tokens, however few and whatever is cached
        before them, take the prefill's path (the torch path), which the fused step does not equal bit
        for bit: a request's text must not depend on whether its prompt was cached."""
        if not 0 < batch.num_tokens <= self.MAX_TOKENS:
            return False
        if not batch.extend_seqs:
            return True
        samples = batch.samples
        if samples is None or not samples.num_drafts:
            return False
        # Only a verify step's extend has drafts (batch_builder): its tokens are the drafts and one.
        drafts = dict(zip(samples.request_ids, samples.num_drafts))
        spans = batch.seq_spans[: len(batch.extend_seqs)]
        return all(
            drafts.get(rid, 0) + 1 == seq.num_tokens
            and seq.prefix_len > 0
            and seq.num_tokens <= DECODE_ROWS_MAX_TOKENS
            for (rid, *_), seq in zip(spans, batch.extend_seqs)
        )

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """model.compute_logits(hidden) for rows of forward()'s hidden states: float32 [T, vocab]."""
        if self._lm_head is not None:
            logits = gguf_cpu.gguf_logits(hidden, *self._lm_head)
            if logits is not None:
                return logits
        return self._compute_logits(hidden)

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """Final-normed hidden states [T, hidden], like model(input_ids, positions), for a step that
        supports() takes: every token as a decode step at its length."""
        meta = batch.table_meta
        x = self._embed(batch.input_ids)
        if not batch.extend_seqs:
            # The kernels read row t of a [T, max_len] table up to lens[t]: the sequences' rows, cut there.
            table = meta.table[:, : max(batch.decode_lens)].index_select(0, meta.seq_rows)
            return self._kernel_model.forward(
                x, batch.positions, batch.out_slots, table, meta.seq_lens
            )
        # Token t of an extend after prefix p reads its sequence's row up to p + t + 1 (its own key and
        # the earlier ones of this step, which the kernels store before attending).
        seqs, lens = [], []
        for i, seq in enumerate(batch.extend_seqs):
            seqs += [i] * seq.num_tokens
            lens += range(seq.prefix_len + 1, seq.seq_len + 1)
        n_ext = len(batch.extend_seqs)
        seqs += range(n_ext, n_ext + len(batch.decode_lens))
        lens += batch.decode_lens
        rows = meta.seq_rows.index_select(0, torch.tensor(seqs, device=meta.seq_rows.device))
        table = meta.table[:, : max(lens)].index_select(0, rows)
        lens_t = torch.tensor(lens, dtype=torch.int64, device=rows.device)
        return self._kernel_model.forward(x, batch.positions, batch.out_slots, table, lens_t)
