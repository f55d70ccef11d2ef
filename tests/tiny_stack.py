"""`radixserve serve` on a tiny random Llama with the real SmolLM2 tokenizer: starts and restarts in
seconds, and decodes fast enough that long requests are still running when a test disrupts them."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import httpx
import pytest

from radixserve.common.model_files import resolve_model_path
from tests.stack import Stack, start_stack

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
MODEL = "tiny-llama"


def tiny_model(folder: Path) -> Path:
    """A config for random weights (--load-format dummy) plus the SmolLM2 tokenizer."""
    smol = resolve_model_path(None)
    folder.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (smol / name).exists():
            shutil.copy(smol / name, folder / name)
    (folder / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
                "vocab_size": 49152,
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "max_position_embeddings": 32768,
                "bos_token_id": 1,
                "eos_token_id": 2,
                "dtype": "float32",
            }
        )
    )
    return folder


def start_tiny_stack(tmp_path: Path, *flags: str, **stack_options) -> Stack:
    """stack_options: start_stack's (grpc_token)."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RADIXSERVE_CPU_DECODE_KERNELS", "0")  # no kernel build on a fresh machine
        return start_stack(
            "--model-path",
            str(tiny_model(tmp_path / "model")),
            "--load-format",
            "dummy",
            "--served-model-name",
            MODEL,
            "--max-total-tokens",
            "40000",
            *flags,
            log_path=str(tmp_path / "serve.log"),
            timeout=180,
            **stack_options,
        )


def service_pids(launcher_pid: int) -> dict[str, int]:
    """The launcher's children by service name (from their command lines)."""
    pids = {}
    for task in Path(f"/proc/{launcher_pid}/task").iterdir():
        for pid in (task / "children").read_text().split():
            try:
                argv = (Path("/proc") / pid / "cmdline").read_bytes().split(b"\0")
            except FileNotFoundError:
                continue
            if b"radixserve.cli" in argv:
                pids[argv[argv.index(b"radixserve.cli") + 1].decode()] = int(pid)
    return pids


def alive(pid: int) -> bool:
    """Whether pid runs (a zombie does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def children(pid: int) -> list[int]:
    return [
        int(c)
        for task in Path(f"/proc/{pid}/task").iterdir()
        for c in (task / "children").read_text().split()
    ]


def flush_cache(stack) -> None:
    """Empties the stack's radix cache (refused while requests run)."""
    httpx.post(stack.base_url + "/flush_cache", timeout=30).raise_for_status()


def generate(stack, timeout: float = 120) -> dict:
    """/generate of a fixed prompt, greedy; retried while the stack answers 503 (an executor restarting)."""
    body = {
        "text": "The capital of France is",
        "sampling_params": {"temperature": 0, "max_new_tokens": 24, "ignore_eos": True},
    }
    deadline = time.monotonic() + timeout
    while True:
        resp = httpx.post(stack.base_url + "/generate", json=body, timeout=120)
        if resp.status_code != 503 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert resp.status_code == 200, resp.text
    return resp.json()


def replicas(stack) -> list[dict]:
    resp = httpx.get(stack.base_url + "/get_server_info", timeout=60)
    assert resp.status_code == 200, resp.text
    listed = resp.json()["scheduler"]["replicas"]
    assert [r["index"] for r in listed] == [0, 1] and all(r["reachable"] for r in listed)
    return listed


def routed(stack) -> list[int]:
    return [int(r["routed_requests"]) for r in replicas(stack)]
