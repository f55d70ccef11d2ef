"""The steps of a forward that torch.compile must not trace, as torch.library custom ops.

Under --enable-torch-compile (torch_compile.py) the model's decode forward is traced whole
(fullgraph) and inductor fuses the norms, activations and residual adds around two kinds of calls it
sees only as opaque ops with a known output shape:
- radixserve::attention: the attention backend's forward (rotary, KV store, paged attention). It
  reads the step's metadata (slot-table rows, lengths, KV pool) from the forward context the runner
  sets, not from its arguments, so the compiled graph does not depend on the step; the layer is
  named by a key into a registry, since a module is not an op argument.
- radixserve::skinny_gemm: the Triton skinny GEMM of small-batch CUDA linears (kernels/skinny_gemm.py),
  autotuned in its own way, which inductor would otherwise replace with cuBLAS.
Eager forwards never go through these ops (their dispatch costs a few microseconds per call).
"""

from __future__ import annotations

import itertools
import weakref

import torch

from radixserve.executor.attention.metadata import get_forward_batch
from radixserve.executor.layers.rotary import rope_step

_layers: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_keys = itertools.count()


def register_layer(layer) -> int:
    """The key under which radixserve::attention finds this attention layer."""
    key = next(_keys)
    _layers[key] = layer
    return key


@torch.library.custom_op("radixserve::attention", mutates_args=())
def attention(
    qk: torch.Tensor,
    v: torch.Tensor,
    cos_table: torch.Tensor,
    sin_table: torch.Tensor,
    positions: torch.Tensor,
    layer_key: int,
) -> torch.Tensor:
    """Attention.forward of the registered layer: [T, heads * head_dim]."""
    batch = get_forward_batch()
    rope = rope_step(cos_table, sin_table, positions)
    # A backend may rotate q in place; an op's inputs stay unchanged.
    return batch.attn_backend.forward(qk.clone(), v, rope, _layers[layer_key], batch)


@attention.register_fake
def _(qk, v, cos_table, sin_table, positions, layer_key):
    return qk.new_empty(qk.shape[0], (qk.shape[1] - v.shape[1]) * qk.shape[2])


@torch.library.custom_op("radixserve::skinny_gemm", mutates_args=())
def skinny_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """kernels/skinny_gemm.py's F.linear for at most its M_MAX rows."""
    from radixserve.kernels import skinny_gemm as kernel

    return kernel.skinny_gemm(x, weight, bias)


@skinny_gemm.register_fake
def _(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])
