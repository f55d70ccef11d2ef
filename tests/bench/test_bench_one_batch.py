"""`radixserve bench one-batch`: in process and over gRPC against a running executor, on a tiny model."""

import json
import subprocess
import sys

import pytest

from radixserve.bench import one_batch
from tests.stack import free_ports
from tests.executor.hf_parity import build_hf_model


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    build_hf_model("llama", folder)
    return folder


def wait_for_port(port: int, timeout: float) -> None:
    import socket
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on port {port} after {timeout}s")


def json_lines(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def check_record(r: dict, bs: int, input_len: int, output_len: int) -> None:
    assert (r["batch_size"], r["input_len"], r["output_len"]) == (bs, input_len, output_len)
    for key in (
        "prefill_latency",
        "prefill_throughput",
        "median_decode_latency",
        "median_decode_throughput",
        "overall_latency",
        "overall_throughput",
        "median_decode_executor_ms",
    ):
        assert r[key] > 0, key
    assert r["prefill_throughput"] == pytest.approx(bs * input_len / r["prefill_latency"])
    assert r["median_decode_throughput"] == pytest.approx(bs / r["median_decode_latency"])


def test_in_process(tiny_model, capsys, tmp_path):
    results = tmp_path / "r.jsonl"
    assert (
        one_batch.main(
            [
                "--model-path",
                str(tiny_model),
                "--device",
                "cpu",
                "--batch-size",
                "1",
                "3",
                "--input-len",
                "5",
                "17",
                "--output-len",
                "4",
                "--max-total-tokens",
                "200",
                "--result-filename",
                str(results),
            ]
        )
        == 0
    )
    records = json_lines(capsys.readouterr().out)
    assert [(r["batch_size"], r["input_len"]) for r in records] == [
        (1, 5),
        (1, 17),
        (3, 5),
        (3, 17),
    ]
    for r in records:
        check_record(r, r["batch_size"], r["input_len"], 4)
        assert r["target"] == "in-process"
    assert json_lines(results.read_text()) == records


def test_fp8_kv_cache(tiny_model, capsys):
    argv = ["--model-path", str(tiny_model), "--device", "cpu", "--batch-size", "2"]
    argv += ["--input-len", "9", "--output-len", "3", "--max-total-tokens", "200"]
    assert one_batch.main([*argv, "--kv-cache-dtype", "fp8_e5m2"]) == 0
    (record,) = json_lines(capsys.readouterr().out)
    check_record(record, 2, 9, 3)
    assert record["kv_cache_dtype"] == "fp8_e5m2"


def test_in_process_launching_ahead(tiny_model, capsys):
    assert (
        one_batch.main(
            [
                "--model-path",
                str(tiny_model),
                "--device",
                "cpu",
                "--batch-size",
                "2",
                "--input-len",
                "5",
                "--output-len",
                "6",
                "--max-total-tokens",
                "200",
                "--launch-ahead",
                "--no-warmup",
            ]
        )
        == 0
    )
    [record] = json_lines(capsys.readouterr().out)
    check_record(record, 2, 5, 6)
    assert record["launch_ahead"] is True


def test_pool_too_small_is_a_clear_error(tiny_model):
    with pytest.raises(SystemExit, match="KV slots"):
        one_batch.main(
            [
                "--model-path",
                str(tiny_model),
                "--device",
                "cpu",
                "--batch-size",
                "4",
                "--input-len",
                "100",
                "--output-len",
                "4",
                "--max-total-tokens",
                "200",
                "--no-warmup",
            ]
        )


def test_over_grpc(tiny_model, capsys):
    (port,) = free_ports(1)
    addr = f"127.0.0.1:{port}"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "radixserve.cli",
            "executor",
            "--model-path",
            str(tiny_model),
            "--device",
            "cpu",
            "--executor-addr",
            addr,
            "--max-total-tokens",
            "200",
        ]
    )
    try:
        wait_for_port(port, timeout=120)
        assert (
            one_batch.main(
                [
                    "--over-grpc",
                    "--executor-addr",
                    addr,
                    "--batch-size",
                    "2",
                    "--input-len",
                    "9",
                    "--output-len",
                    "3",
                ]
            )
            == 0
        )
        (r,) = json_lines(capsys.readouterr().out)
        check_record(r, 2, 9, 3)
        assert r["target"] == f"grpc {addr}"
        # the executor's own step time is part of the wall time seen across gRPC
        assert r["median_decode_executor_ms"] <= r["median_decode_latency"] * 1000
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_verify_steps_with_k_drafts(tiny_model, capsys):
    argv = ["--model-path", str(tiny_model), "--device", "cpu", "--batch-size", "2"]
    argv += ["--input-len", "9", "--output-len", "4", "--max-total-tokens", "200"]
    assert one_batch.main([*argv, "--verify-drafts", "2", "5", "--no-warmup"]) == 0
    out = capsys.readouterr().out
    (record,) = json_lines(out)
    check_record(record, 2, 9, 4)
    for k in (2, 5):
        assert record[f"median_verify_latency_k{k}"] > 0
        assert record[f"median_verify_executor_ms_k{k}"] > 0
        assert record[f"verify_k{k}_over_decode"] == pytest.approx(
            record[f"median_verify_latency_k{k}"] / record["median_decode_latency"]
        )
    assert "Verify (K=5 drafts). median latency" in out
