"""SGLang launch commands pasted as they are (the package renamed): they start on a dummy model and answer.

The multi-node one (`--tp 2 --nnodes 2 --nccl-init HOST:PORT`, SGLang's spelling abbreviated as argparse
allows) is tests/e2e/test_multi_node.py::test_serve_on_two_nodes_answers_like_tp1. Here: data, tensor and
expert parallelism together on a mixture-of-experts model with the flags SGLang users pass for it, and a
server guarded by an API key under a served name."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.stack import free_ports, start_stack, stop_stack
from tests.tiny_stack import generate, service_pids, tiny_model

pytestmark = pytest.mark.e2e


def tiny_moe(folder: Path) -> Path:
    """A Mixtral config with the SmolLM2 tokenizer (random weights: --load-format dummy)."""
    tiny_model(folder)
    (folder / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["MixtralForCausalLM"],
                "model_type": "mixtral",
                "vocab_size": 49152,
                "hidden_size": 64,
                "intermediate_size": 96,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "num_local_experts": 4,
                "num_experts_per_tok": 2,
                "max_position_embeddings": 4096,
                "rms_norm_eps": 1e-5,
                "bos_token_id": 1,
                "eos_token_id": 2,
                "dtype": "float32",
            }
        )
    )
    return folder


def launch(tmp_path: Path, *flags: str):
    """`python -m radixserve.launch_server FLAGS` on free ports."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RADIXSERVE_CPU_DECODE_KERNELS", "0")  # no kernel build on a fresh machine
        return start_stack(
            *flags,
            log_path=str(tmp_path / "serve.log"),
            timeout=300,
            command=("radixserve.launch_server",),
        )


def test_dp_tp_ep_with_sglangs_moe_flags_starts_and_answers(tmp_path):
    sched0, sched1, exec0, exec1 = free_ports(4)
    stack = launch(
        tmp_path,
        "--model-path",
        str(tiny_moe(tmp_path / "moe")),
        "--load-format",
        "dummy",
        "--dp",
        "2",
        "--tp",
        "2",
        "--enable-ep-moe",
        "--trust-remote-code",
        "--cuda-graph-max-bs",
        "64",
        "--disable-radix-cache",
        "--max-prefill-tokens",
        "4096",
        "--chunked-prefill-size",
        "-1",
        "--max-total-tokens",
        "8192",
        "--scheduler-addr",
        f"127.0.0.1:{sched0},127.0.0.1:{sched1}",
        "--executor-addr",
        f"127.0.0.1:{exec0},127.0.0.1:{exec1}",
    )
    try:
        log = stack.log_tail(400)
        assert "--trust-remote-code has no effect here" in log  # warned once, by the launcher
        assert log.count("--trust-remote-code has no effect here") == 1
        answers = [generate(stack), generate(stack)]
        info = httpx.get(stack.base_url + "/get_server_info", timeout=30).json()
    finally:
        stop_stack(stack)
    assert stack.proc.returncode == 0, stack.log_tail()
    assert (
        all(len(a["output_ids"]) == 24 for a in answers)
        and answers[0]["output_ids"] == answers[1]["output_ids"]
    )
    assert info["ep_size"] == 2 and info["tp_size"] == 2 and info["dp_size"] == 2
    assert info["disable_radix_cache"] is True and info["chunked_prefill_size"] == -1


def test_api_key_served_name_dtype_and_memory_fraction(tmp_path):
    stack = launch(
        tmp_path,
        "--model-path",
        str(tiny_model(tmp_path / "model")),
        "--load-format",
        "dummy",
        "--api-key",
        "sk-seed",
        "--served-model-name",
        "seed-model",
        "--dtype",
        "bfloat16",
        "--mem-fraction-static",
        "0.8",
    )
    try:
        url = stack.base_url + "/v1/chat/completions"
        body = {
            "model": "seed-model",
            "max_tokens": 4,
            "messages": [{"role": "user", "content": "hi"}],
        }
        refused = httpx.post(url, json=body, timeout=60)
        answered = httpx.post(
            url, json=body, headers={"Authorization": "Bearer sk-seed"}, timeout=60
        )
        models = httpx.get(
            stack.base_url + "/v1/models", headers={"Authorization": "Bearer sk-seed"}, timeout=30
        )
        executor = service_pids(stack.proc.pid)["executor"]
        argv = Path(f"/proc/{executor}/cmdline").read_bytes().decode().split("\0")
    finally:
        stop_stack(stack)
    assert refused.status_code == 401 and refused.json()["error"]["type"]
    assert answered.status_code == 200, answered.text
    assert (
        answered.json()["model"] == "seed-model"
        and answered.json()["usage"]["completion_tokens"] == 4
    )
    assert [m["id"] for m in models.json()["data"]] == ["seed-model"]
    assert (
        "sk-seed" not in argv
    )  # the key reaches the services in their environment, never on a command line
    assert (
        argv[argv.index("--mem-fraction-static") + 1] == "0.8"
        and argv[argv.index("--dtype") + 1] == "bfloat16"
    )


def test_a_refused_flag_stops_the_launch_before_anything_starts(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "radixserve.launch_server",
            "--model-path",
            "/nonexistent",
            "--kv-cache-dtype",
            "fp4_e2m1",
            "--tp",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (
        out.returncode == 2
        and "--kv-cache-dtype fp4_e2m1" in out.stderr
        and "not supported yet" in out.stderr
    )
