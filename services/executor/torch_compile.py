"""--enable-torch-compile: decode steps of up to --torch-compile-max-bs requests run a torch.compile'd
forward, compiled at start, never on traffic.

What is compiled: the model's forward and LM head (token ids, positions -> float32 logits) of a
decode-only step, traced whole (fullgraph=True: a graph break is an error at start, not a silent
slowdown). Attention and the skinny GEMM are custom ops inductor calls as they are
(compiled_ops.py); RMSNorm and SiluAndMul take their torch code under compile, which inductor fuses
with the residual adds around them.

Shapes: the batch dimension is marked dynamic, so one graph serves size 1 and one or two (a guard on
the size, e.g. the skinny GEMM's 16 rows, splits them) every other size; RADIXSERVE_TORCH_COMPILE_STATIC=1
compiles each size with static shapes instead (dynamic=False, as SGLang; one compile per size, which
at 32 layers takes tens of seconds each). With CUDA graphs (cuda_graph_runner.py) the compiled forward
is compiled for each graph batch size up to max_bs and then captured, so a replay runs it. Without
them (CPU, --disable-cuda-graph, a backend that cannot be captured) the executor's warm-up
(warmup.py) runs a decode step of every size 1..max_bs, which compiles what traffic will need.

Mode: "default" (fused pointwise and reduction kernels, GEMMs from cuBLAS / the skinny GEMM).
RADIXSERVE_TORCH_COMPILE_MODE picks another, e.g. max-autotune-no-cudagraphs (SGLang's default,
which also autotunes GEMM templates: minutes per shape).
"""

from __future__ import annotations

import logging
import os
import time

import torch
import torch._dynamo

from radixserve.executor import compiled_ops  # noqa: F401  (registers the custom ops)
from radixserve.executor.attention.metadata import ForwardBatch

log = logging.getLogger("radixserve.executor.torch_compile")

MODE = os.environ.get("RADIXSERVE_TORCH_COMPILE_MODE", "default")
STATIC_SHAPES = os.environ.get("RADIXSERVE_TORCH_COMPILE_STATIC", "0") == "1"


def graphs_compiled() -> int:
    """Graphs dynamo has compiled in this process so far."""
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


class CompiledDecode:
    def __init__(self, model, max_bs: int, num_sizes: int, static_shapes: bool = STATIC_SHAPES):
        """num_sizes: the batch sizes that will be compiled (with static shapes, one compile each)."""
        self.model, self.max_bs, self.static_shapes = model, max_bs, static_shapes
        self.compiled_sizes: set[int] = set()
        self.compile_seconds = 0.0
        self.graphs = 0
        # Every static size (or dynamic range) is a recompile of the same code.
        needed = (num_sizes if static_shapes else 3) + 4
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, needed)
        self._compiled = torch.compile(
            self._logits, mode=MODE, fullgraph=True, dynamic=False if static_shapes else None
        )

    def _logits(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model.compute_logits(self.model(input_ids, positions))

    def supports(self, batch: ForwardBatch) -> bool:
        return (
            batch.num_extend_tokens == 0
            and 0 < batch.num_tokens <= self.max_bs
            and batch.table_meta is not None
            and not batch.prompt_logprobs
        )

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits [B, vocab] of a decode step of B <= max_bs tokens, inside its forward_context."""
        bs = input_ids.shape[0]
        if not self.static_shapes and bs > 1:
            torch._dynamo.mark_dynamic(input_ids, 0)
            torch._dynamo.mark_dynamic(positions, 0)
        before, t0 = graphs_compiled(), time.perf_counter()
        logits = self._compiled(input_ids, positions)
        if graphs_compiled() != before:
            self.compile_seconds += time.perf_counter() - t0
            self.graphs += graphs_compiled() - before
            self.compiled_sizes.add(bs)
        return logits

    def describe(self) -> str:
        sizes = sorted(self.compiled_sizes)
        shapes = "static shapes" if self.static_shapes else "dynamic batch size"
        return (
            f"torch.compile (mode {MODE}, {shapes}): {self.graphs} graphs compiled in "
            f"{self.compile_seconds:.1f}s at decode batch sizes {sizes}, covering 1..{self.max_bs}"
        )
