"""Greedy tokens of the executor vs HF transformers on the same random weights, at full model size.

Builds the HF model from a config folder (e.g. ../shared/models/llama-3-8b) with random weights on
the GPU, loads the same tensors into a ModelRunner (triton backend, CUDA graphs as served), and
generates greedily from a few prompts on both. The random weights are variance-preserving
(std 1/sqrt(fan_in) for every matrix, N(0, 1) embeddings, norm scales 1): the usual 0.02 init
gives an 8B model near-flat logits whose argmax is decided by rounding noise alone, which would
test nothing. Where bf16 rounding still makes the two fork, the
comparison follows vLLM's check_logprobs_close: at the first differing token each side's token
must be among the other side's top-5, and the comparison of that prompt stops there.

  python scripts/check_hf_parity.py --model-path .models/llama-3-8b --dtype bfloat16 --max-new-tokens 32
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import transformers

from radixserve.common.config import RunnerConfig
from radixserve.executor.runner import ModelRunner
from radixserve.common.step import ContinuingRequest, NewRequest, StepInput

TOP = 5


def hf_generate(hf, prompt: list[int], n: int) -> tuple[list[int], list[torch.Tensor]]:
    out = hf.generate(
        torch.tensor([prompt], device="cuda"),
        max_new_tokens=n,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
        output_scores=True,
        return_dict_in_generate=True,
    )
    return out.sequences[0, len(prompt) :].tolist(), [s[0].float() for s in out.scores]


def ours_generate(
    runner: ModelRunner, prompts: list[list[int]], n: int
) -> tuple[list[list[int]], list[list[torch.Tensor]]]:
    """All prompts in one batch (prefill together, then decode together)."""
    runner.reset()
    slot, spans = 1, []
    new = []
    for i, p in enumerate(prompts):
        new.append(NewRequest(f"p{i}", p, list(range(slot, slot + len(p)))))
        spans.append(slot + len(p))
        slot += len(p) + n
    out = runner.step(StepInput(1, new_requests=new))
    tokens = [[o.token_id] for o in out.outputs]
    logits = [[out.logits[i].float()] for i in range(len(prompts))]
    for s in range(n - 1):
        cont = [ContinuingRequest(f"p{i}", [spans[i] + s]) for i in range(len(prompts))]
        out = runner.step(StepInput(2 + s, continuing_requests=cont))
        for i, o in enumerate(out.outputs):
            tokens[i].append(o.token_id)
            logits[i].append(out.logits[i].float())
    return tokens, logits


def compare(ours: list[int], ours_logits, theirs: list[int], their_logits) -> dict:
    for pos, (a, b) in enumerate(zip(ours, theirs)):
        if a != b:
            ours_top = ours_logits[pos].topk(TOP).indices.tolist()
            their_top = their_logits[pos].topk(TOP).indices.tolist()
            ok = a in their_top and b in ours_top
            return {
                "identical_prefix": pos,
                "fork_ok": ok,
                "ours": a,
                "hf": b,
                "ours_top5": ours_top,
                "hf_top5": their_top,
            }
    return {"identical_prefix": len(ours), "fork_ok": True}


@torch.no_grad()
def init_variance_preserving(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() == 1:
            p.fill_(1.0 if "norm" in name else 0.0)
        elif "embed_tokens" in name:
            p.copy_(torch.randn(p.shape, generator=gen, device="cuda"))
        else:
            p.copy_(torch.randn(p.shape, generator=gen, device="cuda") * p.shape[1] ** -0.5)


def logits_agreement(ours: torch.Tensor, theirs: torch.Tensor) -> dict:
    diff = (ours - theirs).abs()
    return {
        "max_abs_diff": diff.max().item(),
        "mean_abs_diff": diff.mean().item(),
        "logit_std": theirs.std().item(),
        "cosine": torch.nn.functional.cosine_similarity(ours, theirs, dim=0).item(),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model-path", required=True)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--num-prompts", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    dtype = getattr(torch, a.dtype)
    torch.manual_seed(a.seed)
    config = transformers.AutoConfig.from_pretrained(a.model_path)
    with torch.device("cuda"):
        hf = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    init_variance_preserving(hf, a.seed)
    kv_tokens = a.num_prompts * (a.prompt_len + a.max_new_tokens) + 64
    runner = ModelRunner(
        a.model_path,
        RunnerConfig(
            dtype=a.dtype,
            device="cuda",
            load_format="dummy",
            max_total_tokens=kv_tokens,
            cuda_graph_max_bs=max(8, a.num_prompts),
        ),
    )
    runner.model.load_weights((name, t) for name, t in hf.state_dict().items())
    vocab = config.vocab_size
    g = torch.Generator().manual_seed(a.seed)
    prompts = [
        torch.randint(10, vocab, (a.prompt_len,), generator=g).tolist()
        for _ in range(a.num_prompts)
    ]
    ours, ours_logits = ours_generate(runner, prompts, a.max_new_tokens)
    results = []
    with torch.no_grad():
        for i, prompt in enumerate(prompts):
            theirs, their_logits = hf_generate(hf, prompt, a.max_new_tokens)
            results.append(
                compare(ours[i], ours_logits[i], theirs, their_logits)
                | {"first_step_logits": logits_agreement(ours_logits[i][0], their_logits[0])}
            )
    summary = {
        "model": a.model_path,
        "dtype": a.dtype,
        "max_new_tokens": a.max_new_tokens,
        "prompts": results,
        "all_ok": all(r["fork_ok"] for r in results),
    }
    print(json.dumps(summary))
    return 0 if summary["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
