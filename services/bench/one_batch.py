"""`radixserve bench one-batch`: one static batch through the executor, like sglang.bench_one_batch.

For each (batch size, input length): one prefill step of batch_size prompts of input_len random
token ids, then output_len - 1 decode steps; prints prefill latency and throughput, median decode
step latency and throughput, and the totals, as text and as one JSON line per run. No server needed:
the ModelRunner is driven in process, with every server flag available (--attention-backend,
--disable-cuda-graph, ...). With --executor-addr the same steps go over gRPC to a running executor
instead (--over-grpc), and the JSON also gives the executor's own step time, so the gRPC hop is
measured directly (the benchmark opens the executor's step session, so no scheduler may be connected to
it; the inter-service token and TLS flags apply as for a service). With --launch-ahead (in process) each
decode step is launched before the previous one is collected, as the executor server does when the
scheduler overlaps steps: the decode latency is then the interval between consecutive steps' results.
With --num-loras N (in process) the runner serves N random rank --lora-rank adapters on every target
(q/k/v/o/gate/up/down, scripts/make_dummy_lora.py's), request b running adapter b mod N: distinct per
request up to N; --max-loras-per-batch is raised to N when lower.

With --verify-drafts K [K ...], each run then times output_len - 1 speculative verify steps per K: every
request runs its last token plus K random draft tokens and the executor verifies them (as an NGRAM step
does), so the cost of a verify step with K drafts is measured against a plain decode step.

  radixserve bench one-batch --model-path ../shared/models/llama-3-8b --load-format dummy \\
      --dtype bfloat16 --batch-size 1 128 --input-len 128 --output-len 32
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass

import torch

from radixserve.common.args import add_server_args, args_from_namespace
from radixserve.common.step import ContinuingRequest, NewRequest, StepInput, StepOutput


@dataclass
class StepTiming:
    wall_s: float
    executor_ms: float  # the executor's own measurement (forward + sampling)


class InProcessTarget:
    """Runs steps on a ModelRunner in this process."""

    def __init__(self, args):
        from radixserve.executor.runner import build_model_runner

        self.runner = build_model_runner(args)
        compiled = self.runner.compiled_decode
        if compiled is not None and self.runner.cuda_graphs is None:
            # Outside CUDA graphs --enable-torch-compile compiles in the executor's warm-up: run it
            # here too, so that no timed step compiles.
            from radixserve.executor.warmup import run_warmup

            run_warmup(self.runner, args)
        if compiled is not None:
            print(compiled.describe(), file=sys.stderr)
        info = self.runner.model_info()
        self.kv_slots, self.vocab_size, self.device = info.kv_slots, info.vocab_size, info.device
        self.kv_cache_dtype = info.kv_cache_dtype

    def step(self, step: StepInput) -> tuple[StepOutput, StepTiming]:
        t0 = time.perf_counter()
        out = self.runner.step(step)
        return out, StepTiming(time.perf_counter() - t0, out.forward_ms)

    def decode_launching_ahead(self, steps: list[StepInput]) -> list[StepTiming]:
        """Each step launched before the previous one is collected; a step's wall time is the interval
        between its result and the previous one's."""
        timings: list[StepTiming] = []
        previous, last = None, time.perf_counter()
        for step in steps + [None]:
            launched = self.runner.launch(step) if step is not None else None
            if previous is not None:
                out = self.runner.collect(previous)
                now = time.perf_counter()
                timings.append(StepTiming(now - last, out.forward_ms))
                last = now
            previous = launched
        return timings

    def reset(self) -> None:
        self.runner.reset()


class GrpcTarget:
    """Sends the same steps to a running executor service, with the inter-service token and TLS settings of
    the flags, through a step session of its own: the executor must have none live (no scheduler connected)."""

    def __init__(self, addr: str):
        from radixserve.v1 import executor_pb2, executor_pb2_grpc
        from radixserve.common import grpc_util
        from radixserve.common.step_session import BlockingExecutorSession, SessionRefused
        from radixserve.common.step_convert import output_from_proto, step_to_proto

        self.pb = executor_pb2
        self.to_pb, self.from_pb = step_to_proto, output_from_proto
        self.channel = grpc_util.channel(addr)
        self.stub = executor_pb2_grpc.ExecutorStub(self.channel)
        info = self.stub.GetModelInfo(executor_pb2.ExecutorModelInfoRequest(), timeout=600)
        self.kv_slots, self.vocab_size, self.device = info.kv_slots, info.vocab_size, info.device
        self.kv_cache_dtype = info.kv_cache_dtype
        try:
            self.session = BlockingExecutorSession(self.stub)
        except SessionRefused as e:
            raise SystemExit(
                f"cannot drive the executor at {addr}: {e} (a scheduler holds its step session: "
                "benchmark an executor no scheduler is connected to)"
            ) from None
        self.step_id = 0

    def close(self) -> None:
        self.session.close()
        self.channel.close()

    def step(self, step: StepInput) -> tuple[StepOutput, StepTiming]:
        self.step_id += 1
        step.step_id = self.step_id  # the executor orders steps from the first one after a Reset
        msg = self.session.stamp(self.to_pb(step))
        t0 = time.perf_counter()
        resp = self.stub.Step(msg, timeout=600)
        wall = time.perf_counter() - t0
        return self.from_pb(resp), StepTiming(wall, resp.forward_ms)

    def reset(self) -> None:
        self.stub.Reset(self.session.stamp(self.pb.ExecutorResetRequest()), timeout=600)
        self.step_id = 0


def run_once(
    target,
    batch_size: int,
    input_len: int,
    output_len: int,
    seed: int,
    launch_ahead: bool = False,
    lora_names: list[str] = (),
    verify_drafts: tuple[int, ...] = (),
) -> dict:
    """lora_names: request b runs adapter lora_names[b % len], none when empty. verify_drafts: also
    time verify steps with each K drafts; they take 1 + K slots each (at most, when every draft is
    accepted)."""
    span = input_len + output_len + sum((output_len - 1) * (k + 1) for k in verify_drafts)
    if batch_size * span + 1 > target.kv_slots:
        raise SystemExit(
            f"batch {batch_size} x {span} tokens needs {batch_size * span} KV slots; "
            f"the pool has {target.kv_slots - 1} (raise --max-total-tokens or --mem-fraction-static)"
        )
    target.reset()
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, target.vocab_size, (batch_size, input_len), generator=g).tolist()
    first_slot = [1 + b * span for b in range(batch_size)]
    new = [
        NewRequest(
            f"r{b}",
            ids[b],
            list(range(first_slot[b], first_slot[b] + input_len)),
            lora_name=lora_names[b % len(lora_names)] if lora_names else "",
        )
        for b in range(batch_size)
    ]
    _, prefill = target.step(StepInput(1, new_requests=new))
    steps = [
        StepInput(
            2 + i,
            continuing_requests=[
                ContinuingRequest(f"r{b}", [first_slot[b] + input_len + i])
                for b in range(batch_size)
            ],
        )
        for i in range(output_len - 1)
    ]
    if launch_ahead:
        decodes = target.decode_launching_ahead(steps)
    else:
        decodes = [target.step(step)[1] for step in steps]
    lengths = [input_len + output_len - 1] * batch_size  # tokens with KV, per request
    verifies = {}
    step_id = output_len + 1
    for k in verify_drafts:
        verifies[k] = []
        for _ in range(output_len - 1):
            drafts = torch.randint(10, target.vocab_size, (batch_size, k), generator=g).tolist()
            step = StepInput(
                step_id,
                continuing_requests=[
                    ContinuingRequest(
                        f"r{b}",
                        list(range(first_slot[b] + lengths[b], first_slot[b] + lengths[b] + k + 1)),
                        draft_ids=drafts[b],
                    )
                    for b in range(batch_size)
                ],
            )
            step_id += 1
            out, timing = target.step(step)
            verifies[k].append(timing)
            for b, o in enumerate(out.outputs):
                lengths[b] += 1 + len(o.accepted_draft_ids)
    target.step(StepInput(step_id, finished_request_ids=[f"r{b}" for b in range(batch_size)]))
    result = summarize(batch_size, input_len, output_len, prefill, decodes)
    for k, timings in verifies.items():
        if timings:
            median = statistics.median(t.wall_s for t in timings)
            result[f"median_verify_latency_k{k}"] = median
            result[f"median_verify_executor_ms_k{k}"] = statistics.median(
                t.executor_ms for t in timings
            )
            if "median_decode_latency" in result:
                result[f"verify_k{k}_over_decode"] = median / result["median_decode_latency"]
    return result


def summarize(
    batch_size: int, input_len: int, output_len: int, prefill: StepTiming, decodes: list[StepTiming]
) -> dict:
    result = {
        "batch_size": batch_size,
        "input_len": input_len,
        "output_len": output_len,
        "prefill_latency": prefill.wall_s,
        "prefill_throughput": batch_size * input_len / prefill.wall_s,
    }
    total = prefill.wall_s + sum(d.wall_s for d in decodes)
    if decodes:
        median = statistics.median(d.wall_s for d in decodes)
        result.update(
            {
                "median_decode_latency": median,
                "median_decode_throughput": batch_size / median,
                "median_decode_executor_ms": statistics.median(d.executor_ms for d in decodes),
            }
        )
    result.update(
        {
            "overall_latency": total,
            "overall_throughput": batch_size * (input_len + output_len) / total,
        }
    )
    return result


def print_result(r: dict) -> None:
    print(
        f"Prefill. latency: {r['prefill_latency']:.5f} s, throughput: {r['prefill_throughput']:9.2f} token/s"
    )
    if "median_decode_latency" in r:
        print(
            f"Decode.  median latency: {r['median_decode_latency']:.5f} s, "
            f"median throughput: {r['median_decode_throughput']:9.2f} token/s "
            f"(executor's own step: {r['median_decode_executor_ms']:.3f} ms)"
        )
    for key in sorted(k for k in r if k.startswith("median_verify_latency_k")):
        k = key.rsplit("_k", 1)[1]
        ratio = r.get(f"verify_k{k}_over_decode")
        print(
            f"Verify (K={k} drafts). median latency: {r[key]:.5f} s"
            + (f" ({ratio:.2f}x a decode step)" if ratio is not None else "")
        )
    print(
        f"Total. latency: {r['overall_latency']:.3f} s, throughput: {r['overall_throughput']:9.2f} token/s"
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="radixserve bench one-batch",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_server_args(p)
    p.add_argument("--batch-size", type=int, nargs="+", default=[1])
    p.add_argument("--input-len", type=int, nargs="+", default=[1024])
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--run-name", default="default")
    p.add_argument("--result-filename", default=None, help="append one JSON line per run here")
    p.add_argument(
        "--no-warmup", action="store_true", help="skip the warm-up run (kernel compilation)"
    )
    p.add_argument(
        "--launch-ahead",
        action="store_true",
        help="in process: launch each decode step before collecting the previous one",
    )
    p.add_argument(
        "--num-loras",
        type=int,
        default=0,
        help="in process: serve this many random LoRA adapters, request b running adapter b mod N",
    )
    p.add_argument("--lora-rank", type=int, default=16, help="the rank of --num-loras' adapters")
    p.add_argument(
        "--verify-drafts",
        type=int,
        nargs="+",
        default=[],
        metavar="K",
        help="also time output-len - 1 speculative verify steps with K random draft tokens per "
        "request, for each K (e.g. 4 8 16), against the plain decode step",
    )
    p.add_argument(
        "--over-grpc",
        action="store_true",
        help="drive the running executor at --executor-addr over gRPC instead of one in process",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    prompt_seed = (
        1 if ns.random_seed is None else ns.random_seed
    )  # --random-seed / --seed: the prompts' too
    if ns.output_len < 1:
        raise SystemExit("--output-len must be at least 1")
    if any(k < 1 for k in ns.verify_drafts):
        raise SystemExit("--verify-drafts takes draft counts of at least 1")
    if ns.launch_ahead and ns.over_grpc:
        raise SystemExit(
            "--launch-ahead drives the executor in process; over gRPC steps go one at a time"
        )
    args = args_from_namespace(ns, "executor")
    ns.lora_names = []
    if ns.num_loras:
        if ns.over_grpc:
            raise SystemExit("--num-loras runs in process; start the executor with --lora-paths")
        args, ns.lora_names = with_dummy_loras(args, ns.num_loras, ns.lora_rank)
    if ns.over_grpc:
        from radixserve.common.grpc_security import install_from_args

        install_from_args(
            args
        )  # the token (--grpc-auth-token, $RADIXSERVE_GRPC_AUTH_TOKEN) and TLS flags
        target = GrpcTarget(ns.executor_addr)
    else:
        target = InProcessTarget(args)
    try:
        return run_all(ns, target, prompt_seed)
    finally:
        if ns.over_grpc:
            target.close()


def with_dummy_loras(args, count: int, rank: int):
    """args serving `count` random rank-`rank` adapters written to a temporary folder; their names."""
    import dataclasses
    import pathlib
    import tempfile

    from radixserve.common.model_files import resolve_model_path
    from radixserve.executor.lora.dummy import make_dummy_adapters

    folder = resolve_model_path(
        args.model_path, revision=args.revision, download_dir=args.download_dir, weights=False
    )
    config = json.loads((pathlib.Path(folder) / "config.json").read_text())
    adapters = make_dummy_adapters(
        config.get("text_config", config), tempfile.mkdtemp(prefix="radixserve-loras-"), count, rank
    )
    args = dataclasses.replace(
        args,
        enable_lora=True,
        lora_paths=" ".join(f"{n}={p}" for n, p in adapters.items()),
        max_loras_per_batch=max(args.max_loras_per_batch, count),
        max_lora_rank=rank,
        max_loaded_loras=max(args.max_loaded_loras or 0, count) or None,
    )
    return args, list(adapters)


def run_all(ns: argparse.Namespace, target, prompt_seed: int) -> int:
    if not ns.no_warmup:
        run_once(
            target,
            min(ns.batch_size),
            min(ns.input_len),
            min(ns.output_len, 8),
            prompt_seed,
            ns.launch_ahead,
            getattr(ns, "lora_names", []),
            tuple(ns.verify_drafts),
        )
    for bs in ns.batch_size:
        for input_len in ns.input_len:
            r = run_once(
                target,
                bs,
                input_len,
                ns.output_len,
                prompt_seed,
                ns.launch_ahead,
                getattr(ns, "lora_names", []),
                tuple(ns.verify_drafts),
            )
            r.update(
                {
                    "run_name": ns.run_name,
                    "device": target.device,
                    "kv_cache_dtype": target.kv_cache_dtype,
                    "launch_ahead": ns.launch_ahead,
                    "num_loras": getattr(ns, "num_loras", 0),
                    "lora_rank": getattr(ns, "lora_rank", 0) if getattr(ns, "num_loras", 0) else 0,
                    "target": f"grpc {ns.executor_addr}" if ns.over_grpc else "in-process",
                }
            )
            print_result(r)
            line = json.dumps(r)
            print(line, flush=True)
            if ns.result_filename:
                with open(ns.result_filename, "a") as f:
                    f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
