"""Tiny random Qwen2-VL / Qwen2.5-VL checkpoints saved as HF folders the way the hub's are (config.json
as transformers 5 writes it, text_config and vision_config nested; preprocessor_config.json naming
Qwen2VLProcessor; the SmolLM2 tokenizer plus Qwen's vision tokens and a chat template writing image
parts as <|vision_start|><|image_pad|><|vision_end|>), for the runner and stack tests.

transformers builds Qwen2VLProcessor only with torchvision (its video processor), which is not
installed here: the tokenizer service then takes the image processor alone (tokenizer/images.py
GridPlaceholderProcessor)."""

from __future__ import annotations

import json
import pathlib

import torch
import transformers

from radixserve.common.model_files import resolve_model_path
from tests.executor.test_qwen2_vl_vs_hf import MERGE, PATCH, TEXT, VISION

VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
    "{% if p['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
KINDS = {"qwen2_vl": "Qwen2VLConfig", "qwen2_5_vl": "Qwen2_5_VLConfig"}
VISION_CONFIGS = {
    "qwen2_vl": dict(**VISION, depth=2, embed_dim=32, hidden_size=64, mlp_ratio=2),
    "qwen2_5_vl": dict(
        **VISION,
        depth=2,
        hidden_size=32,
        out_hidden_size=64,
        intermediate_size=48,
        window_size=16,
        fullatt_block_indexes=[1],
    ),
}


def tokenizer():
    tok = transformers.AutoTokenizer.from_pretrained(str(resolve_model_path(None)))
    tok.add_special_tokens({"additional_special_tokens": VISION_TOKENS})
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_tiny_qwen2_vl(kind: str, folder: pathlib.Path) -> torch.nn.Module:
    """A random HF model of kind (qwen2_vl, qwen2_5_vl) with its image processor and tokenizer saved to
    folder; returns the HF model (fp32, eval). Images are resized to 8..32 pixels a side (patch 4,
    merge 2: 1 to 16 image tokens)."""
    torch.manual_seed(0)
    tok = tokenizer()
    ids = dict(zip(VISION_TOKENS, tok.convert_tokens_to_ids(VISION_TOKENS)))
    config = getattr(transformers, KINDS[kind])(
        text_config=dict(TEXT, vocab_size=len(tok)),
        vision_config=VISION_CONFIGS[kind],
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    model = transformers.AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # larger than the default init so that differences would show
        for name, p in model.named_parameters():
            if "norm" in name or "ln_q" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 1.0 if "embed_tokens" in name else 0.1)
    folder.mkdir(parents=True, exist_ok=True)
    model.eval().save_pretrained(folder)
    images = transformers.Qwen2VLImageProcessorPil(
        patch_size=PATCH,
        merge_size=MERGE,
        temporal_patch_size=2,
        min_pixels=8 * 8,
        max_pixels=32 * 32,
    )
    images.save_pretrained(folder)
    # As the hub's checkpoints: the processor class the image processor belongs to.
    pre = folder / "preprocessor_config.json"
    pre.write_text(
        json.dumps({**json.loads(pre.read_text()), "processor_class": "Qwen2VLProcessor"})
    )
    tok.save_pretrained(folder)
    return model
