"""Warm-up: before the executor says ready, run the paths traffic will take, so that the first
requests do not pay for compilation, autotuning or the allocator's first growth.

Triton compiles a kernel per specialization of its integer arguments (== 1, divisible by 16, other),
the skinny GEMM autotunes per (rows bucket, N, K), the int4 kernels compile once per class of rows
(kernels/int4_gemm.M_CLASSES; the plan below reaches every class), the fp8 kernels (kernels/fp8_gemm.py)
compile for <= 16 rows (the skinny kernel, tuned per rows bucket) and two block sets of the prefill GEMM
(<= 64 rows and more; the 1x33 and 3x48 prefills reach both), cuBLAS picks and caches an
algorithm per shape, and the caching allocator grows at the first large step. CUDA graph capture already covers decode at the
graph batch sizes; this runs the rest through the runner's real step path (under tensor parallelism,
the leader's, so every shard warms up too): prefills of 1, 3, 16 and 17 sequences of short lengths of
each class and one as large as a step can be, a prefill in two chunks, decode steps right after each
(graph replay), a decode batch above the graph sizes (eager), a step mixing a prefill with decodes,
and every sampling path (greedy, temperature / top-p / top-k / min-p, seeded, penalties, logit bias,
logprobs, a token bitmask). On the CPU, where nothing is compiled per shape, one small step. With
--enable-torch-compile outside CUDA graphs (torch_compile.py), a decode step of every batch size the
compiled forward takes, which compiles it. Then the runner is reset: the scheduler starts with every
slot free and the KV written here is garbage nobody reads.

With --enable-lora, the LoRA layers run kernels/lora.py's shrink and expand (or, with --lora-backend
torch, their torch references) on every step that names an adapter, and CUDA graph capture covers only
decode: so the same prefill shapes run again through them, each prefill of one sequence on an adapter
(uniform tiles: the tile GEMM), each of several sequences alternating adapter and base-model rows
(mixed tiles: the per-token GEMV; uniform base-model tiles beside them), and their decodes, the chunked
prefill, the mixed prefill + decode step, the eager decode above the graphs and the largest prefill, all
mixing an adapter's rows with the base model's; on the CPU, one small mixed step. Adapters may not be
loaded yet (--lora-paths is optional), so these run a warm-up adapter of zeros at --max-lora-rank on
every target module (lora/dummy.write_zero_adapter), loaded through the runner (under tensor
parallelism, by every shard) into the first free GPU slot and unloaded afterwards: the loaded adapters,
/v1/models and the slots (every one free, in their first order) are as if no warm-up ran. Where the
host set is already full (--max-loaded-loras), the LoRA scenarios are skipped with a warning.

Triton keeps compiled kernels in its cache (TRITON_CACHE_DIR) and, with TRITON_CACHE_AUTOTUNING=1
(set by the executor), the autotuner's choices, so a restart mostly loads instead of compiling.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import time

from radixserve.common.sampling import SamplingParams, StoppingCriteria
from radixserve.common.step import ContinuingRequest, NewRequest, StepError, StepInput
from radixserve.executor.lora.adapter import LoraError
from radixserve.executor.lora.dummy import write_zero_adapter

log = logging.getLogger("radixserve.executor.warmup")

_SAMPLED = SamplingParams(temperature=0.8, top_p=0.9, top_k=40, min_p=0.05)
_PENALISED = SamplingParams(
    temperature=0.7,
    frequency_penalty=0.5,
    presence_penalty=0.3,
    repetition_penalty=1.1,
    logit_bias={0: -1.0, 1: 2.0},
    return_logprob=True,
    top_logprobs_num=5,
)
_SEEDED = SamplingParams(temperature=1.0, seed=1234, return_logprob=True)
# Each with the stop conditions it warms up beside: the penalised one also holds EOS back (min_new_tokens).
SAMPLING_VARIANTS = (
    (SamplingParams(), StoppingCriteria()),
    (_SAMPLED, StoppingCriteria()),
    (_PENALISED, StoppingCriteria(min_new_tokens=2)),
    (_SEEDED, StoppingCriteria()),
)
# (sequences, tokens each) of the GPU plan's prefills: each class of counts Triton specializes on.
PREFILL_SHAPES = ((1, 1), (1, 7), (1, 16), (1, 33), (3, 5), (3, 48), (16, 1), (17, 3), (17, 16))
WARMUP_LORA_NAME = "radixserve-warmup"  # the warm-up adapter's name (another where it is taken)


@dataclasses.dataclass
class WarmupReport:
    steps: int = 0
    tokens: int = 0
    skipped: list[str] = dataclasses.field(
        default_factory=list
    )  # scenarios that did not fit the KV pool
    failed: list[str] = dataclasses.field(
        default_factory=list
    )  # scenarios whose step was refused (a bug)
    seconds: float = 0.0


class _Slots:
    """Hands out KV slots from the start of the pool (slot 0 is the padding slot); reused per scenario."""

    def __init__(self, total: int):
        self.total, self.next = total, 1
        self.free: list[int] = []

    def take(self, n: int) -> list[int]:
        if n <= len(self.free):
            slots, self.free = self.free[:n], self.free[n:]
            return slots
        if self.next + n > self.total:
            raise _DoesNotFit
        slots = list(range(self.next, self.next + n))
        self.next += n
        return slots

    def give_back(self, slots: list[int]) -> None:
        """Slots of a finished request, handed out again."""
        self.free += slots


class _DoesNotFit(Exception):
    pass


class Warmup:
    def __init__(
        self,
        runner,
        *,
        kv_slots: int,
        vocab_size: int,
        max_prefill_tokens: int,
        chunked_prefill_size: int,
        max_running_requests: int,
        graph_max_bs: int,
        on_gpu: bool,
        decode_steps: int = 2,
        compiled_max_bs: int = 0,
        lora=None,
    ):
        """compiled_max_bs: the largest decode batch of a torch.compile'd forward compiled here (0: none).
        lora: the runner's LoraManager (None: LoRA off), whose layers the warm-up adapter fits."""
        self.runner = runner
        self.kv_slots, self.vocab = kv_slots, vocab_size
        step_tokens = (
            max_prefill_tokens
            if chunked_prefill_size <= 0
            else min(max_prefill_tokens, chunked_prefill_size)
        )
        self.step_tokens = max(1, step_tokens)
        self.max_running = max(1, max_running_requests)
        self.graph_max_bs = graph_max_bs
        self.on_gpu = on_gpu
        self.compiled_max_bs = min(compiled_max_bs, self.max_running)
        self.decode_steps = decode_steps
        self.lora = lora
        self.report = WarmupReport()
        self._ids = 0
        self._step_id = 0

    # -- scenarios
    def plan(self) -> list[tuple[str, callable]]:
        """(name, run) pairs, cheapest first, so that a small pool still gets the common shapes."""
        # On the GPU, each class of token and sequence counts that Triton specializes on (1, multiples of 16,
        # others). On the CPU nothing is compiled or tuned per shape: one small step pays the first call's
        # set-up (measured on the embedded model: the whole GPU-style plan took 7 s of the start and made the
        # first chat no faster, docs/benchmarks.md).
        compiled = []
        if self.compiled_max_bs:
            n = self.compiled_max_bs
            compiled.append((f"compiled decode of 1..{n}", lambda: self._every_decode_size(n)))
        if not self.on_gpu:
            return [
                ("prefill 1x7 + decode", lambda: self._prefill_decode(1, min(7, self.step_tokens))),
                *compiled,
            ]
        scenarios = [
            (
                f"prefill {n}x{length} + decode",
                lambda n=n, length=length: self._prefill_decode(n, length),
            )
            for n, length in self._prefill_shapes()
        ]
        scenarios.extend(compiled)
        scenarios.append(("sampling variants", self._sampling_variants))
        scenarios.append(("chunked prefill", self._chunked_prefill))
        scenarios.append(("mixed prefill + decode", self._mixed))
        if self.graph_max_bs and self.max_running > self.graph_max_bs:
            n = self.graph_max_bs + 1
            scenarios.append((f"eager decode of {n}", lambda n=n: self._prefill_decode(n, 1)))
        # On the GPU, a step as large as the scheduler makes: cuBLAS shapes and the allocator's growth.
        big = self._largest_prefill() if self.on_gpu else None
        if big is not None:
            n, length = big
            scenarios.append(
                (
                    f"largest prefill {n}x{length}",
                    lambda: self._prefill_decode(n, length, decode=False),
                )
            )
        return scenarios

    def lora_plan(self, name: str) -> list[tuple[str, callable]]:
        """The scenarios that run the LoRA layers, on adapter `name` (loaded): a sequence alone on it
        (uniform tiles), several alternating it with the base model (mixed tiles)."""
        both = (name, "")
        if not self.on_gpu:  # nothing compiled per shape: one small step sets the LoRA path up
            n, length = min(2, self.max_running), min(7, self.step_tokens)
            return [
                (
                    f"LoRA prefill {n}x{length} + decode",
                    lambda: self._prefill_decode(n, length, adapters=both),
                )
            ]
        scenarios = [
            (
                f"LoRA prefill {n}x{length} + decode",
                lambda n=n, length=length: self._prefill_decode(n, length, adapters=both),
            )
            for n, length in self._prefill_shapes()
        ]
        scenarios.append(("LoRA chunked prefill", lambda: self._chunked_prefill(name)))
        scenarios.append(("LoRA mixed prefill + decode", lambda: self._mixed(both)))
        if self.graph_max_bs and self.max_running > self.graph_max_bs:
            n = self.graph_max_bs + 1
            scenarios.append(
                (
                    f"LoRA eager decode of {n}",
                    lambda n=n: self._prefill_decode(n, 1, adapters=both),
                )
            )
        big = self._largest_prefill()
        if big is not None:
            n, length = big
            scenarios.append(
                (
                    f"LoRA largest prefill {n}x{length}",
                    lambda: self._prefill_decode(n, length, decode=False, adapters=both),
                )
            )
        return scenarios

    def _prefill_shapes(self) -> list[tuple[int, int]]:
        """PREFILL_SHAPES that fit one step."""
        return [
            (n, length)
            for n, length in PREFILL_SHAPES
            if n <= self.max_running and n * length <= self.step_tokens
        ]

    def _largest_prefill(self) -> tuple[int, int] | None:
        budget = min(self.step_tokens, self.kv_slots - 64)
        if budget < 512:
            return None
        length = min(512, budget)
        return max(1, min(self.max_running, budget // length)), length

    def run(self) -> WarmupReport:
        t0 = time.perf_counter()
        self._run(self.plan())
        if self.lora is not None:
            self._run_lora()
        self.report.seconds = time.perf_counter() - t0
        return self.report

    def _run_lora(self) -> None:
        """lora_plan() on a warm-up adapter of zeros, loaded for it and unloaded after."""
        names = set(self.lora.names())
        name = WARMUP_LORA_NAME
        while name in names:
            name += "-"
        with tempfile.TemporaryDirectory(prefix="radixserve-lora-warmup-") as folder:
            write_zero_adapter(
                self.lora.layers, self.lora.targets, folder, self.lora.max_rank, self.lora.dtype
            )
            try:
                self.runner.load_lora(name, folder)
            except LoraError as e:  # the host set is full (--max-loaded-loras)
                log.warning(
                    "the LoRA warm-up did not run (%s); the first LoRA requests may compile", e
                )
                self.report.skipped += [n for n, _ in self.lora_plan(name)]
                return
            try:  # (the folder outlives the load: under tensor parallelism, every shard reads it)
                self._run(self.lora_plan(name))
            finally:
                self.runner.unload_lora(name)

    def _run(self, scenarios: list[tuple[str, callable]]) -> None:
        for name, scenario in scenarios:
            try:
                scenario()
            except _DoesNotFit:
                self.report.skipped.append(name)
            except (
                StepError
            ) as e:  # refused before anything ran, on every shard alike: the server can still start
                log.warning(
                    "warm-up step %r was refused (%s); the first requests of that shape may compile",
                    name,
                    e,
                )
                self.report.failed.append(name)
            finally:
                self.runner.reset()

    # -- helpers
    def _tokens(self, n: int) -> list[int]:
        return [(7919 * (i + self._ids) + 17) % self.vocab for i in range(n)]

    def _rid(self) -> str:
        self._ids += 1
        return f"warmup-{self._ids}"

    def _step(self, new=(), continuing=(), finished=()) -> None:
        self._step_id += 1
        step = StepInput(
            step_id=self._step_id,
            finished_request_ids=list(finished),
            new_requests=list(new),
            continuing_requests=list(continuing),
        )
        self.runner.step(step)
        self.report.steps += 1
        self.report.tokens += sum(len(r.input_ids) for r in new) + sum(
            max(1, len(r.input_ids)) for r in continuing
        )

    def _new(
        self,
        slots: _Slots,
        length: int,
        sampling: SamplingParams = SamplingParams(),
        sample: bool = True,
        bitmask: bytes = b"",
        stopping: StoppingCriteria = StoppingCriteria(),
        lora_name: str = "",
    ) -> NewRequest:
        ids = self._tokens(length)
        return NewRequest(
            self._rid(),
            ids,
            slots.take(length),
            sampling=sampling,
            sample=sample,
            token_bitmask=bitmask,
            penalty_prompt_ids=ids,
            stopping=stopping,
            lora_name=lora_name,
        )

    def _decode(self, slots: _Slots, requests: list[NewRequest], steps: int) -> None:
        for _ in range(steps):
            self._step(
                continuing=[ContinuingRequest(r.request_id, slots.take(1)) for r in requests]
            )

    # -- scenarios
    def _prefill_decode(
        self, n: int, length: int, decode: bool = True, adapters: tuple[str, ...] = ("",)
    ) -> None:
        """n prompts of length tokens (request i on adapters[i % len(adapters)]), decode steps after."""
        slots = _Slots(self.kv_slots)
        requests = [
            self._new(slots, length, lora_name=adapters[i % len(adapters)]) for i in range(n)
        ]
        self._step(new=requests)
        if decode:
            self._decode(slots, requests, self.decode_steps)
        self._step(finished=[r.request_id for r in requests])

    def _every_decode_size(self, n: int) -> None:
        """A decode step of n requests, then of n-1, ..., 1: each group of one-token prompts is
        prefilled as the previous one finishes and takes its slots again (2n slots in all)."""
        slots = _Slots(self.kv_slots)
        done: list[str] = []
        for k in range(n, 0, -1):
            group = [self._new(slots, 1) for _ in range(k)]
            self._step(new=group, finished=done)
            decode = [ContinuingRequest(r.request_id, slots.take(1)) for r in group]
            self._step(continuing=decode)
            done = [r.request_id for r in group]
            slots.give_back([s for r in (*group, *decode) for s in r.new_slots])
        self._step(finished=done)

    def _bitmask(self) -> bytes:
        words = (self.vocab + 31) // 32
        mask = bytearray(b"\xff" * (words * 4))
        mask[0] = 0xF0  # a few tokens disallowed
        return bytes(mask)

    def _sampling_variants(self) -> None:
        slots = _Slots(self.kv_slots)
        requests = [
            self._new(slots, 4, sampling, stopping=stopping)
            for sampling, stopping in SAMPLING_VARIANTS
        ]
        requests.append(self._new(slots, 4, _SAMPLED, bitmask=self._bitmask()))
        self._step(new=requests)
        self._decode(slots, requests, self.decode_steps)
        self._step(finished=[r.request_id for r in requests])

    def _chunked_prefill(self, lora_name: str = "") -> None:
        slots = _Slots(self.kv_slots)
        first = self._new(slots, 24, sample=False, lora_name=lora_name)
        self._step(new=[first])
        rest = ContinuingRequest(first.request_id, slots.take(9), input_ids=self._tokens(9))
        self._step(continuing=[rest])
        self._decode(slots, [first], 1)
        self._step(finished=[first.request_id])

    def _mixed(self, adapters: tuple[str, ...] = ("",)) -> None:
        """Two running requests decode beside a third's prefill (request i on adapters[i % len])."""
        slots = _Slots(self.kv_slots)
        running = [self._new(slots, 6, lora_name=adapters[i % len(adapters)]) for i in range(2)]
        self._step(new=running)
        arriving = self._new(slots, 20, lora_name=adapters[2 % len(adapters)])
        self._step(
            new=[arriving],
            continuing=[ContinuingRequest(r.request_id, slots.take(1)) for r in running],
        )
        self._decode(slots, [*running, arriving], 1)
        self._step(finished=[r.request_id for r in (*running, arriving)])


def run_warmup(runner, args) -> WarmupReport:
    """Warm up a ModelRunner (or rank 0's TensorParallelLeader) for the traffic `args` allows."""
    inner = getattr(runner, "runner", runner)  # the leader wraps rank 0's runner
    rows = inner.slot_table.rows
    # A compiled decode forward outside CUDA graphs compiles here (under them, in the capture).
    compiled = inner.compiled_decode if inner.cuda_graphs is None else None
    warmup = Warmup(
        runner,
        kv_slots=inner.kv_slots,
        vocab_size=inner.config.vocab_size,
        max_prefill_tokens=args.max_prefill_tokens,
        chunked_prefill_size=args.chunked_prefill_size,
        max_running_requests=min(rows, args.max_running_requests or rows),
        graph_max_bs=inner.cuda_graphs.max_bs if inner.cuda_graphs is not None else 0,
        on_gpu=inner.device.type == "cuda",
        compiled_max_bs=compiled.max_bs if compiled is not None else 0,
        lora=inner.lora,
    )
    report = warmup.run()
    log.info(
        "warm-up: %d steps, %d tokens in %.1fs%s",
        report.steps,
        report.tokens,
        report.seconds,
        f" (did not fit the KV pool: {', '.join(report.skipped)})" if report.skipped else "",
    )
    if compiled is not None:
        log.info("%s", compiled.describe())
    return report
