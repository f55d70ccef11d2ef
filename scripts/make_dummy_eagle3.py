"""Write a random EAGLE3 draft head for a target's config.json (no target weights needed), in the published
layout (`midlayer.*`, `fc`, `norm`, its own `lm_head` over a reduced vocabulary with `d2t`/`t2d`), so a GPU
benchmark can measure what a head costs per step at the target's real geometry:

    python scripts/make_dummy_eagle3.py --model-path .models/llama-3-8b --out /tmp/eagle3-head
    radixserve serve --model-path .models/llama-3-8b --load-format dummy \
        --speculative-algorithm EAGLE3 --speculative-draft-model-path /tmp/eagle3-head ...

Random weights accept (almost) no drafts: the figure it gives is the cost of a step's drafting and
verification, not a speed-up.
"""

import argparse
import json
import pathlib

import torch
from safetensors.torch import save_file


def head_tensors(cfg: dict, draft_vocab: int, dtype: torch.dtype, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    hidden, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    head_dim = cfg.get("head_dim") or hidden // cfg["num_attention_heads"]
    q_out, kv_out = cfg["num_attention_heads"] * head_dim, cfg["num_key_value_heads"] * head_dim

    def rand(*shape):
        return (torch.randn(*shape, generator=gen) * 0.02).to(dtype)

    def ones(n):
        return torch.ones(n, dtype=dtype)

    target_ids = torch.randperm(vocab, generator=gen)[:draft_vocab].sort().values
    t2d = torch.zeros(vocab, dtype=torch.bool)
    t2d[target_ids] = True
    return {
        "fc.weight": rand(hidden, 3 * hidden),  # the three captured target layers, concatenated
        "norm.weight": ones(hidden),
        "lm_head.weight": rand(draft_vocab, hidden),
        "d2t": target_ids - torch.arange(draft_vocab),
        "t2d": t2d,
        "midlayer.hidden_norm.weight": ones(hidden),
        "midlayer.input_layernorm.weight": ones(hidden),
        "midlayer.post_attention_layernorm.weight": ones(hidden),
        # the layer's attention reads [embedding, hidden]: twice the width
        "midlayer.self_attn.q_proj.weight": rand(q_out, 2 * hidden),
        "midlayer.self_attn.k_proj.weight": rand(kv_out, 2 * hidden),
        "midlayer.self_attn.v_proj.weight": rand(kv_out, 2 * hidden),
        "midlayer.self_attn.o_proj.weight": rand(hidden, q_out),
        "midlayer.mlp.gate_proj.weight": rand(inter, hidden),
        "midlayer.mlp.up_proj.weight": rand(inter, hidden),
        "midlayer.mlp.down_proj.weight": rand(hidden, inter),
    }


def main(argv=None) -> pathlib.Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--model-path", required=True, help="the target's folder with config.json, or the file"
    )
    p.add_argument(
        "--out", required=True, help="the head's folder (config.json + model.safetensors)"
    )
    p.add_argument(
        "--draft-vocab-size", type=int, default=32000, help="published EAGLE3 heads use 32,000"
    )
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    config_path = pathlib.Path(args.model_path)
    if config_path.is_dir():
        config_path = config_path / "config.json"
    target = json.loads(config_path.read_text())
    target = target.get("text_config", target)
    keys = (
        "hidden_size",
        "intermediate_size",
        "num_attention_heads",
        "num_key_value_heads",
        "vocab_size",
    )
    head = {k: target[k] for k in keys}
    for k in ("head_dim", "rms_norm_eps", "rope_theta", "rope_scaling", "max_position_embeddings"):
        if target.get(k) is not None:
            head[k] = target[k]
    head.update(
        architectures=["LlamaForCausalLMEagle3"],
        model_type="llama",
        num_hidden_layers=1,
        draft_vocab_size=min(args.draft_vocab_size, target["vocab_size"]),
        tie_word_embeddings=False,
        torch_dtype=args.dtype,
    )
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(head, indent=1))
    tensors = head_tensors(target, head["draft_vocab_size"], getattr(torch, args.dtype), args.seed)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"))
    print(out)
    return out


if __name__ == "__main__":
    main()
