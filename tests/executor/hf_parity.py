"""Tiny random Llama, Qwen2 and MoE models saved as HF folders (fp32, wide random weights), and the parity
checks of our ModelRunner against transformers' forward and greedy generate that test_model_vs_hf and
test_moe_vs_hf run against their `models` fixture ((hf model, runner) pairs).

Tolerance: logits agree to atol 1e-4 (fp32; the differences come from op order).
"""

import os
import random

import torch
import transformers

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from radixserve.common.step import ContinuingRequest, NewRequest, StepInput

ATOL = 1e-4
VOCAB = 256

CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
    ),
    "llama3_rope_tied_headdim": lambda: transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        attention_bias=True,
        mlp_bias=True,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 50000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
    "qwen2": lambda: transformers.Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    ),
}

COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    tie_word_embeddings=False,
    num_experts_per_tok=2,
)

MOE_CONFIGS = {
    "mixtral": lambda: transformers.MixtralConfig(
        **COMMON, intermediate_size=96, num_hidden_layers=2, num_local_experts=8, rms_norm_eps=1e-5
    ),
    # layer 1 dense (mlp_only_layers), layers 0 and 2 sparse with the gated shared expert
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(
        **COMMON,
        intermediate_size=128,
        moe_intermediate_size=48,
        shared_expert_intermediate_size=80,
        num_hidden_layers=3,
        num_experts=8,
        mlp_only_layers=[1],
        decoder_sparse_step=1,
        norm_topk_prob=False,
    ),
    # head_dim 32 (q width 128 != hidden 64); decoder_sparse_step 2: layers 1 and 3 sparse, 0 and 2 dense
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
        **COMMON,
        head_dim=32,
        intermediate_size=128,
        moe_intermediate_size=48,
        num_hidden_layers=4,
        num_experts=4,
        decoder_sparse_step=2,
        norm_topk_prob=True,
    ),
}


def build_hf_model(name_or_config, folder) -> torch.nn.Module:
    """A random HF model (a CONFIGS name or a config) saved to folder, with wide random weights."""
    torch.manual_seed(0)
    config = CONFIGS[name_or_config]() if isinstance(name_or_config, str) else name_or_config
    config.eos_token_id = None
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # larger than the default init so that differences would show
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.1 if "embed" not in pname else 1.0)
    model.save_pretrained(folder)
    return model


def hf_last_logits(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0, -1].float()


class SlotPool:
    """Hands out shuffled, non-contiguous slot ids like a scheduler would."""

    def __init__(self, kv_slots: int, seed: int = 0):
        self.free = list(range(1, kv_slots, 3))
        random.Random(seed).shuffle(self.free)

    def take(self, n: int) -> list[int]:
        out, self.free = self.free[:n], self.free[n:]
        return out


def prompts(seed: int, *lengths: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]


def check_batched_prefill_decode_and_prefix_reuse(models):
    hf, runner = models
    runner.reset()
    pool = SlotPool(runner.kv_slots)
    a, b, c = prompts(1, 7, 12, 1)
    slots = {"a": pool.take(len(a)), "b": pool.take(len(b)), "c": pool.take(1)}
    out = runner.step(
        StepInput(1, new_requests=[NewRequest(r, p, slots[r]) for r, p in zip("abc", (a, b, c))])
    )
    assert [o.request_id for o in out.outputs] == ["a", "b", "c"]
    for i, p in enumerate((a, b, c)):
        torch.testing.assert_close(out.logits[i].cpu(), hf_last_logits(hf, p), atol=ATOL, rtol=0)
    seqs = {
        "a": a + [out.outputs[0].token_id],
        "b": b + [out.outputs[1].token_id],
        "c": c + [out.outputs[2].token_id],
    }

    # Decode of three requests in one step, plus a new request reusing a's first 5 slots as its prefix.
    d = a[:5] + prompts(2, 6)[0]
    d_new = pool.take(len(d) - 5)
    cont = [ContinuingRequest(r, pool.take(1)) for r in ("b", "a", "c")]
    out = runner.step(
        StepInput(
            2,
            new_requests=[NewRequest("d", d[5:], d_new, prefix_slots=slots["a"][:5])],
            continuing_requests=cont,
        )
    )
    assert [o.request_id for o in out.outputs] == ["d", "b", "a", "c"]
    torch.testing.assert_close(out.logits[0].cpu(), hf_last_logits(hf, d), atol=ATOL, rtol=0)
    for i, r in enumerate(("b", "a", "c")):
        torch.testing.assert_close(
            out.logits[i + 1].cpu(), hf_last_logits(hf, seqs[r]), atol=ATOL, rtol=0
        )


def check_chunked_prefill(models):
    hf, runner = models
    runner.reset()
    pool = SlotPool(runner.kv_slots, seed=1)
    (p,) = prompts(3, 20)
    out = runner.step(
        StepInput(1, new_requests=[NewRequest("x", p[:8], pool.take(8), sample=False)])
    )
    assert out.outputs == []
    out = runner.step(
        StepInput(2, continuing_requests=[ContinuingRequest("x", pool.take(12), p[8:])])
    )
    torch.testing.assert_close(out.logits[0].cpu(), hf_last_logits(hf, p), atol=ATOL, rtol=0)


def check_greedy_matches_hf_generate(models):
    hf, runner = models
    runner.reset()
    pool = SlotPool(runner.kv_slots, seed=2)
    p, other = prompts(4, 9, 5)
    with torch.no_grad():
        expected = hf.generate(
            torch.tensor([p]), max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0
        )[0, len(p) :].tolist()
    # A second request shares the batch, so the comparison covers batched decode.
    out = runner.step(
        StepInput(
            1,
            new_requests=[
                NewRequest("g", p, pool.take(len(p))),
                NewRequest("o", other, pool.take(len(other))),
            ],
        )
    )
    got = [out.outputs[0].token_id]
    for step in range(31):
        out = runner.step(
            StepInput(
                step + 2,
                continuing_requests=[
                    ContinuingRequest("o", pool.take(1)),
                    ContinuingRequest("g", pool.take(1)),
                ],
            )
        )
        got.append(out.outputs[1].token_id)
    assert got == expected
