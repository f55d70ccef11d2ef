"""Data parallelism: `radixserve serve --dp-size 2` on a tiny model (two scheduler + executor pairs on the CPU)
serves requests, spreads distinct prompts over both replicas and sends a repeated long prefix to the
replica that caches it; and the flags that do not fit together are refused."""

from __future__ import annotations

import httpx
import pytest

from radixserve.cli import build_parser
from radixserve.common.args import args_from_namespace, check_parallelism, replica_addrs
from tests.stack import free_ports, stop_stack
from tests.tiny_stack import replicas, routed, service_pids, start_tiny_stack

SHARED = (
    "You are a careful assistant. Answer every question with one short sentence, name your sources, "
    "and never guess when you do not know. "
) * 4


def generate(stack, text: str) -> dict:
    body = {
        "text": text,
        "sampling_params": {"temperature": 0, "max_new_tokens": 4, "ignore_eos": True},
    }
    resp = httpx.post(stack.base_url + "/generate", json=body, timeout=120)
    assert resp.status_code == 200, resp.text
    assert len(resp.json()["output_ids"]) == 4
    return resp.json()["meta_info"]


@pytest.mark.e2e
def test_serve_dp2_spreads_prompts_and_keeps_a_prefix_on_one_replica(tmp_path):
    sched0, sched1, exec0, exec1 = free_ports(4)
    stack = start_tiny_stack(
        tmp_path,
        "--dp-size",
        "2",
        "--scheduler-addr",
        f"127.0.0.1:{sched0},127.0.0.1:{sched1}",
        "--executor-addr",
        f"127.0.0.1:{exec0},127.0.0.1:{exec1}",
    )
    try:
        assert {"scheduler", "executor"} <= set(
            service_pids(stack.proc.pid)
        )  # and their -dp1 twins
        for topic in ("rivers of Europe", "prime numbers", "the history of tea", "how bees dance"):
            generate(stack, f"Tell me about {topic}.")
        spread = routed(stack)
        assert sum(spread) == 4 and min(spread) >= 1, (
            spread
        )  # distinct prompts: both replicas served

        first = generate(stack, SHARED + "What is the capital of France?")
        again = [
            generate(stack, SHARED + q)
            for q in ("What is the capital of Peru?", "Who wrote Hamlet?")
        ]
        gained = [after - before for after, before in zip(routed(stack), spread)]
        assert sorted(gained) == [0, 3], gained  # the prefix stayed on one replica...
        assert first["prompt_tokens"] > 100
        assert all(m["cached_tokens"] >= first["prompt_tokens"] - 16 for m in again), (
            again
        )  # ...which cached it
        home = replicas(stack)[gained.index(3)]["info"]
        assert int(home["total_cached_prompt_tokens"]) >= 2 * (first["prompt_tokens"] - 16)
    finally:
        stop_stack(stack)
    assert stack.proc.returncode == 0, stack.log_tail()
    log = (tmp_path / "serve.log").read_text()
    assert "[scheduler-dp1]" in log and "[executor-dp1]" in log


def parse(*argv: str):
    args = args_from_namespace(build_parser().parse_args(["serve", *argv]), "serve")
    check_parallelism(args)
    return args


def test_replica_addresses_come_from_a_list_or_from_one_port_and_an_offset():
    assert replica_addrs("h:7000,h:7005", 2) == ["h:7000", "h:7005"]
    assert replica_addrs("10.0.0.1:30012", 3) == [
        "10.0.0.1:30012",
        "10.0.0.1:30112",
        "10.0.0.1:30212",
    ]
    args = parse("--dp", "2", "--ep", "2", "--tp", "2")
    assert (args.dp_size, args.ep_size, args.load_balance_method) == (2, 2, "cache_aware")
    shard = parse(
        *args.to_cli(), "--tp-rank", "1", "--dist-init-addr", "127.0.0.1:5000"
    )  # from its executor
    assert shard.dist_init_addr == "127.0.0.1:5000"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--dp-size", "0"], "--dp-size"),
        (["--dp-size", "2", "--scheduler-addr", "h:1,h:2,h:3"], "3 addresses for 2 replicas"),
        (["--scheduler-addr", "h:1,h:2"], "2 addresses for 1 replicas"),
        (["--dp-size", "2", "--tp", "2", "--nnodes", "2", "--dist-init-addr", "h:1"], "one node"),
        (["--dp-size", "2", "--device", "cuda:1"], "--base-gpu-id"),
        (["--tp", "4", "--ep-size", "3"], "--ep-size 3 must divide --tp-size 4"),
        (["--ep-size", "2"], "--ep-size 2 must divide --tp-size 1"),
    ],
)
def test_data_and_expert_parallel_flags_that_do_not_fit_are_refused(argv, message):
    with pytest.raises(SystemExit, match=message):
        parse(*argv)
