"""What the warm-up tests share (test_executor_warmup.py, test_lora_warmup.py): the server flags
run_warmup reads, the GPU plan's Warmup, and on a GPU a tiny bfloat16 Llama served with the traffic
that must compile nothing after the warm-up (CompileCounter counts)."""

import random
import types

import torch
import transformers

from radixserve.common.step import ContinuingRequest, NewRequest, StepInput
from radixserve.executor.runner import ModelRunner
from radixserve.executor.warmup import Warmup
from tests.configs import runner_config
from tests.executor.hf_parity import build_hf_model


def server_args(**overrides):
    values = dict(max_prefill_tokens=16384, chunked_prefill_size=8192, max_running_requests=None)
    return types.SimpleNamespace(**{**values, **overrides})


def gpu_plan_warmup(
    runner, max_running_requests: int, graph_max_bs: int, vocab_size: int | None = None, **kw
) -> Warmup:
    """The GPU plan (on_gpu) for runner at the default prefill limits (server_args()'s); vocab_size:
    the runner's unless given."""
    return Warmup(
        runner,
        kv_slots=runner.kv_slots,
        vocab_size=runner.config.vocab_size if vocab_size is None else vocab_size,
        max_prefill_tokens=16384,
        chunked_prefill_size=8192,
        max_running_requests=max_running_requests,
        graph_max_bs=graph_max_bs,
        on_gpu=True,
        **kw,
    )


def build_cuda_llama(folder):
    """A tiny Llama (vocabulary 512, 2 layers) saved in folder; the HF model."""
    return build_hf_model(
        transformers.LlamaConfig(
            vocab_size=512,
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=8,
            num_key_value_heads=2,
            max_position_embeddings=4096,
        ),
        folder,
    )


def cuda_runner(folder, cuda_graph_max_bs: int, **config) -> ModelRunner:
    """A bfloat16 runner on the GPU of folder's model, for 64 running requests."""
    return ModelRunner(
        folder,
        runner_config(
            dtype="bfloat16",
            device="cuda",
            max_total_tokens=65536,
            cuda_graph_max_bs=cuda_graph_max_bs,
            max_running_requests=64,
            **config,
        ),
    )


def serve_traffic(runner, batch_sizes, lengths, decodes: int, adapters=None) -> None:
    """Six waves of prefills (a random count from batch_sizes, each of a random length from lengths,
    random tokens under 512; adapters: each a random one of them, None: the base model) joining the
    running decodes, then decodes steps; at most 40 run, as the scheduler's cap would keep it. The
    random choices are seeded (0)."""
    rng = random.Random(0)
    slot, step, live = 1, 1, []
    for wave in range(6):
        new = []
        for i in range(rng.choice(batch_sizes)):
            length = rng.choice(lengths)
            tokens = [rng.randrange(512) for _ in range(length)]
            extra = {} if adapters is None else {"lora_name": rng.choice(adapters)}
            new.append(
                NewRequest(f"w{wave}-{i}", tokens, list(range(slot, slot + length)), **extra)
            )
            slot += length
        cont = [ContinuingRequest(rid, [slot + k]) for k, rid in enumerate(live)]
        slot += len(live)
        runner.step(StepInput(step, new_requests=new, continuing_requests=cont))
        step += 1
        live += [r.request_id for r in new]
        finished, live = live[:-40], live[-40:]
        for _ in range(decodes):
            cont = [ContinuingRequest(rid, [slot + k]) for k, rid in enumerate(live)]
            slot += len(live)
            runner.step(StepInput(step, continuing_requests=cont, finished_request_ids=finished))
            finished, step = [], step + 1
    torch.cuda.synchronize()


class CompileCounter:
    """Counts Triton JIT compilations (in-memory cache misses) and autotuning runs."""

    def __init__(self):
        import triton

        self.knobs = triton.knobs.runtime
        self.compiles = 0
        self.tunes = 0
        self.what: list[str] = []  # the compiled and autotuned kernels' names

    def __enter__(self):
        from triton.runtime.autotuner import Autotuner

        self.previous = self.knobs.jit_cache_hook
        self.knobs.jit_cache_hook = self._count
        self.autotuner, self.original_bench = Autotuner, Autotuner._bench
        counter = self

        def bench(tuner, *args, **kwargs):
            counter.tunes += 1
            counter.what.append(f"autotune {getattr(tuner.fn, '__name__', tuner.fn)} {tuner.keys}")
            return counter.original_bench(tuner, *args, **kwargs)

        Autotuner._bench = bench
        return self

    def _count(self, *args, **kwargs):
        self.compiles += 1
        self.what.append(
            kwargs["repr"][:400]
        )  # the kernel's name, launch options and argument types
        return False  # compile as usual

    def __exit__(self, *exc):
        self.knobs.jit_cache_hook = self.previous
        self.autotuner._bench = self.original_bench
