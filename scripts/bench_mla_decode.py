"""DeepSeek MLA decode on a GPU: the compressed KV cache's bytes per token against an MHA cache of the
same model, and the decode step time (CUDA graphs, triton backend, dummy weights) at each batch size.

  python scripts/bench_mla_decode.py --model-path ../shared/models/deepseek-v2-lite --batch-size 1 64
"""

from __future__ import annotations

import argparse
import json

import torch

from radixserve.bench.one_batch import InProcessTarget, run_once
from radixserve.common.args import ServerArgs
from radixserve.executor.kv_cache import kv_bytes_per_token


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model-path", required=True)
    p.add_argument("--batch-size", type=int, nargs="+", default=[1, 64])
    p.add_argument("--input-len", type=int, default=1024)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--device", default="cuda", help="cpu: a smoke run (torch_native, no graphs)")
    a = p.parse_args()
    cuda = a.device == "cuda"
    span = a.input_len + a.steps
    target = InProcessTarget(
        ServerArgs(
            model_path=a.model_path,
            dtype="bfloat16",
            device=a.device,
            load_format="dummy",
            attention_backend="triton" if cuda else "torch_native",
            max_total_tokens=max(a.batch_size) * span + 16,
            cuda_graph_max_bs=max(a.batch_size),
            disable_cuda_graph=not cuda,
        )
    )
    runner = target.runner
    cfg = runner.config
    mha = kv_bytes_per_token(
        cfg.num_layers,
        cfg.num_heads,
        cfg.get("qk_nope_head_dim") + cfg.get("qk_rope_head_dim"),
        runner.kv_dtype,
        cfg.get("v_head_dim"),
    )
    print(
        json.dumps(
            {
                "mla_kv_bytes_per_token": runner.kv_bytes_per_token,
                "mha_kv_bytes_per_token": mha,
                "ratio": round(mha / runner.kv_bytes_per_token, 2),
                "cuda_graphs": runner.cuda_graphs is not None,
            }
        )
    )
    for bs in a.batch_size:
        r = run_once(target, bs, a.input_len, a.steps, seed=1)
        print(
            json.dumps(
                {
                    "batch_size": bs,
                    "context": a.input_len,
                    "decode_step_ms_median": round(1000 * r["median_decode_latency"], 3),
                    "prefill_s": round(r["prefill_latency"], 3),
                    "device": torch.cuda.get_device_name() if cuda else "cpu",
                }
            )
        )


if __name__ == "__main__":
    main()
