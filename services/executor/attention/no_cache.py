"""Causal attention over whole sequences that stores no K/V: decoders run as embedders.

An embedding needs one forward over each sequence and nothing afterwards, so the executor of an
--is-embedding server allocates no KV pool and the scheduler hands out no slots. Every sequence of
the batch is a prefill without prefix (ForwardBatch.extend_seqs with prefix_len 0, no decode
tokens); batch.kv_pool and batch.out_slots are not read.
"""

from __future__ import annotations

import torch

from radixserve.executor.attention.backend import AttentionBackend
from radixserve.executor.attention.metadata import ForwardBatch
from radixserve.executor.attention.torch_native import attend, extend_mask


class NoCacheCausalBackend(AttentionBackend):
    def init_forward_metadata(self, batch: ForwardBatch) -> None:
        if batch.num_extend_tokens != batch.num_tokens or any(
            s.prefix_len for s in batch.extend_seqs
        ):
            raise ValueError(
                "no-cache attention runs whole sequences only (no prefix, no decode tokens)"
            )

    def forward(self, qk, v, rope, layer, batch: ForwardBatch) -> torch.Tensor:
        q, k = self.rotate(qk, rope, layer)
        out = torch.empty(
            q.shape[0], layer.num_heads * layer.head_dim, dtype=q.dtype, device=q.device
        )
        for seq in batch.extend_seqs:
            rows = slice(seq.start, seq.start + seq.num_tokens)
            # [1, heads, len, dim]: CPU SDPA takes its fast (flash) path only for 4-D inputs.
            o = attend(
                *(t[rows].transpose(0, 1).unsqueeze(0) for t in (q, k, v)),
                extend_mask(seq, layer.sliding_window, q.device),
                layer.scaling,
                layer.logit_softcap,
                causal=True,
            )
            out[rows] = o[0].transpose(0, 1).reshape(seq.num_tokens, -1)
        return out
