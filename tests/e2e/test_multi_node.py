"""Tensor parallelism over two nodes, simulated on one host (gloo on the CPU): `radixserve executor --tp 2
--nnodes 2 --dist-init-addr HOST:PORT` started twice, the same command line but for --node-rank, the way
each node of a real deployment starts it. Node 0 holds rank 0 (the executor the scheduler talks to) and
serves the rendezvous at --dist-init-addr; node 1 holds rank 1 and serves no gRPC.

Checked: the two-node executor decodes (greedy tokens, logprobs) as a one-process --tp 1 executor does on the
same dummy weights; a node that dies is noticed by the other (node 0 fails its steps with the collective's
error or exits, node 1 exits) rather than hanging; and `serve --dp-size 2 --tp-size 2` (two replicas of two
shards each) answers on both replicas alike."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from radixserve.v1 import executor_pb2, executor_pb2_grpc
from radixserve.common.step_session import BlockingExecutorSession
from radixserve.common.step_convert import step_to_proto
from radixserve.common.sampling import SamplingParams
from radixserve.common.step import ContinuingRequest, NewRequest, StepInput
from tests.stack import free_ports, stop_stack
from tests.tiny_stack import (
    children,
    generate,
    replicas,
    routed,
    service_pids,
    start_tiny_stack,
    tiny_model,
)

READY_TIMEOUT_S = 90
NOTICE_TIMEOUT_S = 30  # how long a node may take to notice that the other one died
DECODE_STEPS = 16
LOGPROB_ATOL = 1e-4  # fp32; the shards' partial sums add up in another order


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return tiny_model(tmp_path_factory.mktemp("multi_node") / "model")


def executor_command(model: Path, addr: str, *flags: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "radixserve.cli",
        "executor",
        "--model-path",
        str(model),
        "--load-format",
        "dummy",
        "--max-total-tokens",
        "1024",
        "--executor-addr",
        addr,
        *flags,
    ]


class Processes:
    """Processes a test starts, each logging to its own file; all killed (and reaped) on exit."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        with open(self.log_dir / f"{name}.log", "w") as log:
            proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1", "RADIXSERVE_CPU_DECODE_KERNELS": "0"},
            )
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.log_dir / f"{name}.log").read_text(errors="replace")

    def logs(self) -> str:
        return "\n".join(
            f"--- {name} (exit {p.poll()}) ---\n{self.log(name)[-4000:]}"
            for name, p in self.procs.items()
        )

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.1, deadline - time.monotonic()))
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture()
def processes(tmp_path):
    procs = Processes(tmp_path)
    try:
        yield procs
    finally:
        procs.stop_all()


def wait_ready(procs: Processes, name: str, addr: str) -> executor_pb2.ExecutorModelInfo:
    """The executor's model info once it answers; fails if any process started so far exits first."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    with grpc.insecure_channel(addr) as channel:
        stub = executor_pb2_grpc.ExecutorStub(channel)
        while True:
            exited = {n: p.returncode for n, p in procs.procs.items() if p.poll() is not None}
            assert not exited, f"exited before {name} was ready: {exited}\n{procs.logs()}"
            assert time.monotonic() < deadline, (
                f"{name} not ready after {READY_TIMEOUT_S}s\n{procs.logs()}"
            )
            try:
                return stub.GetModelInfo(executor_pb2.ExecutorModelInfoRequest(), timeout=2)
            except grpc.RpcError:
                time.sleep(0.2)


def start_two_nodes(procs: Processes, model: Path) -> str:
    """Node 0 and node 1 of `--tp 2 --nnodes 2`; the address of node 0's executor (rank 0) once ready."""
    executor_port, rendezvous_port = free_ports(2)
    addr = f"127.0.0.1:{executor_port}"
    flags = ("--tp", "2", "--nnodes", "2", "--dist-init-addr", f"127.0.0.1:{rendezvous_port}")
    procs.start("node0", executor_command(model, addr, *flags, "--node-rank", "0"))
    procs.start("node1", executor_command(model, addr, *flags, "--node-rank", "1"))
    return addr


@contextlib.contextmanager
def step_session(addr: str):
    """A stub of the executor at addr and a step session on it (Step is refused without one), for step()."""
    with grpc.insecure_channel(addr) as channel:
        stub = executor_pb2_grpc.ExecutorStub(channel)
        with BlockingExecutorSession(stub) as session:
            yield stub, session


def step(driver, step_input: StepInput, timeout: float = 60) -> executor_pb2.ExecutorStepResponse:
    stub, session = driver
    return stub.Step(session.stamp(step_to_proto(step_input)), timeout=timeout)


def decode(addr: str) -> list[tuple]:
    """Two prompts prefilled together, greedy decoding of both, a third request joining midway on the first's
    prefix (prefix_slots); every sampled (request, token, logprob, top-5 logprobs) in order."""
    sampling = SamplingParams(return_logprob=True, top_logprobs_num=5)
    prompt_a, prompt_b = [5, 17, 33, 2, 200, 9, 11, 64, 128], [3, 3, 4]
    slots = iter(range(1, 1025))
    take = lambda n: [next(slots) for _ in range(n)]  # noqa: E731
    a_slots = take(len(prompt_a))
    first = StepInput(
        1,
        new_requests=[
            NewRequest("a", prompt_a, a_slots, sampling=sampling),
            NewRequest("b", prompt_b, take(len(prompt_b)), sampling=sampling),
        ],
    )
    sampled = []
    with step_session(addr) as stub:
        outputs = [step(stub, first).outputs]
        for i in range(DECODE_STEPS):
            running = [ContinuingRequest("a", take(1)), ContinuingRequest("b", take(1))]
            new = []
            if i == 4:
                new = [
                    NewRequest("c", [77, 78], take(2), prefix_slots=a_slots[:5], sampling=sampling)
                ]
            elif i > 4:
                running.append(ContinuingRequest("c", take(1)))
            outputs.append(
                step(stub, StepInput(2 + i, new_requests=new, continuing_requests=running)).outputs
            )
    for outs in outputs:
        sampled += [
            (
                o.request_id,
                o.token_id,
                o.logprob.logprob,
                [(t.token_id, t.logprob) for t in o.logprob.top],
            )
            for o in outs
        ]
    return sampled


def assert_same_decoding(got: list[tuple], expected: list[tuple]) -> None:
    assert [(rid, tok) for rid, tok, *_ in got] == [(rid, tok) for rid, tok, *_ in expected]
    for (rid, tok, lp, top), (_, _, lp_ref, top_ref) in zip(got, expected):
        assert lp == pytest.approx(lp_ref, abs=LOGPROB_ATOL), (rid, tok)
        assert [t for t, _ in top] == [t for t, _ in top_ref], (rid, tok)
        assert [v for _, v in top] == pytest.approx([v for _, v in top_ref], abs=LOGPROB_ATOL), (
            rid,
            tok,
        )


def test_two_nodes_decode_like_one_process(model, processes):
    (port,) = free_ports(1)
    processes.start("tp1", executor_command(model, f"127.0.0.1:{port}"))
    addr = start_two_nodes(processes, model)
    info_tp1 = wait_ready(processes, "tp1", f"127.0.0.1:{port}")
    info = wait_ready(processes, "node0", addr)
    assert (
        (info.kv_slots, info.vocab_size)
        == (info_tp1.kv_slots, info_tp1.vocab_size)
        == (1025, 49152)
    )

    got, expected = decode(addr), decode(f"127.0.0.1:{port}")
    assert len(expected) == 2 + 2 * DECODE_STEPS + (DECODE_STEPS - 4)
    assert len({tok for _, tok, *_ in expected}) > 3  # not one token over and over
    assert_same_decoding(got, expected)

    node0, node1 = processes.log("node0"), processes.log("node1")
    assert "tensor-parallel shard 0 of 2 (local 0 of 1)" in node0 and "executor ready on" in node0
    assert (
        "tensor-parallel shard 1 of 2 (local 0 of 1)" in node1 and "executor ready on" not in node1
    )
    assert not children(
        processes.procs["node0"].pid
    )  # one shard per node: node 0 starts none itself


def test_node0_fails_its_steps_when_node1_dies(model, processes):
    addr = start_two_nodes(processes, model)
    wait_ready(processes, "node0", addr)
    one = StepInput(1, new_requests=[NewRequest("a", [5, 6, 7], [1, 2, 3])])
    with step_session(addr) as stub:
        assert len(step(stub, one).outputs) == 1
        processes.procs["node1"].kill()
        assert processes.procs["node1"].wait(10) == -signal.SIGKILL
        # Node 0 notices on its next step: the step's broadcast to rank 1 fails (gloo: the connection was
        # closed by the peer); the group cannot go on, so node 0 fails that step and exits non-zero, for
        # its supervisor to restart it, rather than hanging or answering every later step with an error.
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as failed:
            step(
                stub,
                StepInput(2, continuing_requests=[ContinuingRequest("a", [5])]),
                timeout=NOTICE_TIMEOUT_S,
            )
        assert time.monotonic() - started < NOTICE_TIMEOUT_S
        assert failed.value.code() != grpc.StatusCode.DEADLINE_EXCEEDED, processes.logs()
        assert processes.procs["node0"].wait(NOTICE_TIMEOUT_S) == 1, processes.logs()
    assert "closed by peer" in processes.log("node0")


def test_node1_exits_when_node0_dies(model, processes):
    addr = start_two_nodes(processes, model)
    wait_ready(processes, "node0", addr)
    processes.procs["node0"].kill()
    # Node 1 waits for rank 0's next step on the control group; the closed connection ends that wait.
    code = processes.procs["node1"].wait(NOTICE_TIMEOUT_S)
    assert code not in (0, None), processes.logs()
    assert "closed by peer" in processes.log("node1") or "Connection reset" in processes.log(
        "node1"
    )


@pytest.mark.e2e
def test_serve_on_two_nodes_answers_like_tp1(model, processes, tmp_path, tiny_stack):
    """`radixserve serve` on each node, as deployed: node 0 runs the five services, node 1 only its executor shard
    (its launcher starts nothing else and is ready at once); node 0's gateway answers as a --tp 1 stack does."""
    (rendezvous,) = free_ports(1)
    # As SGLang's multi-node example writes it: --nccl-init, argparse's prefix of --nccl-init-addr.
    flags = ("--tp", "2", "--nnodes", "2", "--nccl-init", f"127.0.0.1:{rendezvous}")
    node1 = processes.start(
        "node1",
        [
            sys.executable,
            "-m",
            "radixserve.cli",
            "serve",
            "--model-path",
            str(model),
            "--load-format",
            "dummy",
            "--max-total-tokens",
            "40000",
            *flags,
            "--node-rank",
            "1",
        ],
    )
    stacks = {}
    try:
        stacks["two nodes"] = start_tiny_stack(tmp_path / "node0", *flags, "--node-rank", "0")
        (shard,) = children(node1.pid)
        assert cmdline(shard)[
            cmdline(shard).index("--node-rank") + 1
        ] == "1" and "--tp-rank" not in cmdline(shard)
        assert not children(
            service_pids(stacks["two nodes"].proc.pid)["executor"]
        )  # rank 1 is node 1's
        answers = {"two nodes": generate(stacks["two nodes"])}
        processes.stop_all()
        stop_stack(stacks["two nodes"])
        answers["tp1"] = generate(tiny_stack)
    finally:
        for stack in stacks.values():
            stop_stack(stack)
    assert len(answers["two nodes"]["output_ids"]) == 24
    assert answers["two nodes"]["output_ids"] == answers["tp1"]["output_ids"]
    node1_log = processes.log("node1")
    assert (
        "node 1 of 2: executor shards started" in node1_log
        and "tensor-parallel shard 1 of 2" in node1_log
    )


def cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]


@pytest.mark.e2e
def test_serve_dp2_tp2_answers_on_both_replicas_alike(tmp_path):
    """The seeds' deployment: two replicas, each an executor of two shards; round robin sends the same greedy
    request to each, and both answer it the same (the same dummy weights, split the same way)."""
    sched0, sched1, exec0, exec1 = free_ports(4)
    stack = start_tiny_stack(
        tmp_path,
        "--dp-size",
        "2",
        "--tp-size",
        "2",
        "--load-balance-method",
        "round_robin",
        "--scheduler-addr",
        f"127.0.0.1:{sched0},127.0.0.1:{sched1}",
        "--executor-addr",
        f"127.0.0.1:{exec0},127.0.0.1:{exec1}",
    )
    try:
        assert {"scheduler", "executor"} <= set(
            service_pids(stack.proc.pid)
        )  # names the -dp1 twins the same
        executors = [
            pid
            for pid in children(stack.proc.pid)
            if cmdline(pid)[2:4] == ["radixserve.cli", "executor"]
        ]
        assert len(executors) == 2, [cmdline(pid) for pid in children(stack.proc.pid)]
        assert sorted(cmdline(pid)[cmdline(pid).index("--dp-rank") + 1] for pid in executors) == [
            "0",
            "1",
        ]
        for executor in executors:  # each replica's executor started its rank-1 shard
            (shard,) = children(executor)
            assert cmdline(shard)[cmdline(shard).index("--tp-rank") + 1] == "1"
        answers = [generate(stack), generate(stack)]
        assert routed(stack) == [1, 1]
        assert all(int(r["info"]["total_prompt_tokens"]) > 0 for r in replicas(stack))
    finally:
        stop_stack(stack)
    assert stack.proc.returncode == 0, stack.log_tail()
    assert (
        len(answers[0]["output_ids"]) == 24 and answers[0]["output_ids"] == answers[1]["output_ids"]
    )
    log = (tmp_path / "serve.log").read_text()
    for name in ("executor", "executor-dp1"):
        assert (
            f"[{name}] INFO radixserve.executor.parallel_state: tensor-parallel shard 0 of 2" in log
        )
        assert (
            f"[{name}-tp1] INFO radixserve.executor.parallel_state: tensor-parallel shard 1 of 2"
            in log
        )
