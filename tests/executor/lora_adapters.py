"""PEFT LoRA adapters on the tiny HF models of hf_parity.py, for the LoRA tests: each saved as a PEFT folder
(adapter_config.json + adapter_model.safetensors) beside the HF model that runs it (the reference).

Adapters are made with init_lora_weights=False (random A and B, B scaled up), so their deltas move
the logits far beyond the parity tolerance."""

import copy

import peft
import torch

# name -> (rank, alpha, targets, use_rslora): a mix of ranks, scalings, fused-layer shard subsets
ADAPTERS = {
    "qv4": (4, 8, ["q_proj", "v_proj"], False),
    "all8": (
        8,
        16,
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        False,
    ),
    "mix16": (16, 8, ["k_proj", "o_proj", "gate_proj", "down_proj"], True),
}


def make_adapter(base: torch.nn.Module, folder, name: str, seed: int = 0) -> torch.nn.Module:
    """Save adapter `name` (ADAPTERS) of base to folder; the PEFT model with it (base is not changed)."""
    rank, alpha, targets, rslora = ADAPTERS[name]
    torch.manual_seed(seed)
    config = peft.LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=targets,
        init_lora_weights=False,
        use_rslora=rslora,
    )
    model = peft.get_peft_model(copy.deepcopy(base), config).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "lora_B" in pname:
                p.normal_(0.0, 0.2)
    model.save_pretrained(str(folder))
    return model


def lora_paths(folders: dict) -> str:
    """--lora-paths for {name: folder}."""
    return " ".join(f"{n}={f}" for n, f in folders.items())
