"""Write an HF folder with LLaVA-OneVision-7B's geometry and no weights, to serve with --load-format dummy
(the H100 vision benchmark, scripts/gpu_bench.sh's `vision` stage):

    python scripts/make_dummy_llava_onevision.py --out .models/llava-ov-7b [--tiny]
    radixserve serve --model-path .models/llava-ov-7b --load-format dummy --dtype bfloat16

The geometry is llava-hf/llava-onevision-qwen2-7b-ov-hf's: a Qwen2-7B text model and a SigLIP-so400m
vision tower (384 px, patch 14: 729 rows per crop) whose features come from its last kept layer (llava-hf
drops the 27th layer, whose output the features never used, and reads layer -1 of the 26 left), a 2-layer
GELU projector, anyres_max_9 over 384-px crops in grids up to 6x6.

The tokenizer is the embedded SmolLM2's plus an `<image>` token at OneVision's id (151646), its vocabulary
padded with unused tokens (`<|unused_N|>`, never produced from text) to Qwen2's 152064 rows, so that every
id random weights can sample decodes (the server refuses ids past the tokenizer's). The chat template is
ChatML, an image part written as `<image>` and a newline, as OneVision's own.

--tiny keeps the folder's shape (same model type, processor, pinpoint grid, tokenizer) and shrinks only
the layer counts and sizes (image 28 px), so that it starts on a CPU in seconds.
"""

from __future__ import annotations

import argparse
import json
import pathlib

IMAGE_TOKEN = "<image>"
# ChatML (SmolLM2's and Qwen2's), image parts written as OneVision's template writes them.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
    "{% if p['type'] in ('image', 'image_url') %}<image>\n{% else %}{{ p['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
IMAGE_TOKEN_ID = 151646  # llava-hf/llava-onevision-qwen2-7b-ov-hf's image_token_index
MAX_GRID = 6  # anyres pinpoints: every (rows, cols) crop grid up to 6 x 6

# LLaVA-OneVision-7B (llava-hf/llava-onevision-qwen2-7b-ov-hf).
FULL = {
    "text": dict(
        hidden_size=3584,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        intermediate_size=18944,
        vocab_size=152064,
        rope_theta=1000000.0,
        max_position_embeddings=32768,
    ),
    "vision": dict(
        hidden_size=1152,
        num_hidden_layers=26,  # SigLIP-so400m's 27 less the unused last one (see the docstring)
        num_attention_heads=16,
        intermediate_size=4304,
        image_size=384,
        patch_size=14,
    ),
}
# --tiny: the same shape at CPU sizes (only the counts and sizes differ).
TINY = {
    "text": {
        **FULL["text"],
        **dict(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=128,
        ),
    },
    "vision": {
        **FULL["vision"],
        **dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            image_size=28,
        ),
    },
}


def pinpoints(crop: int) -> list[list[int]]:
    return [[crop * r, crop * c] for r in range(1, MAX_GRID + 1) for c in range(1, MAX_GRID + 1)]


def config(geometry: dict, eos_id: int) -> dict:
    """config.json (llava-hf's keys)."""
    text, vision = geometry["text"], geometry["vision"]
    return {
        "architectures": ["LlavaOnevisionForConditionalGeneration"],
        "model_type": "llava_onevision",
        "image_token_index": IMAGE_TOKEN_ID,
        "image_grid_pinpoints": pinpoints(vision["image_size"]),
        "vision_aspect_ratio": "anyres_max_9",
        "vision_feature_layer": -1,
        "vision_feature_select_strategy": "full",
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": True,
        "use_image_newline_parameter": True,
        "tie_word_embeddings": False,
        "dtype": "bfloat16",
        "text_config": {
            "model_type": "qwen2",
            "architectures": ["Qwen2ForCausalLM"],
            **text,
            "hidden_act": "silu",
            "rms_norm_eps": 1e-6,
            "max_window_layers": text["num_hidden_layers"],
            "use_sliding_window": False,
            "sliding_window": None,
            "tie_word_embeddings": False,
            "bos_token_id": None,
            "eos_token_id": eos_id,
            "dtype": "bfloat16",
        },
        "vision_config": {
            "model_type": "siglip_vision_model",
            **vision,
            "hidden_act": "gelu_pytorch_tanh",
            "layer_norm_eps": 1e-6,
            "num_channels": 3,
            "vision_use_head": False,
        },
    }


def image_processor_config(geometry: dict) -> dict:
    """preprocessor_config.json: LlavaOnevisionImageProcessor as llava-hf configures it."""
    size = geometry["vision"]["image_size"]
    return {
        "image_processor_type": "LlavaOnevisionImageProcessor",
        "processor_class": "LlavaOnevisionProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "do_rescale": True,
        "do_normalize": True,
        "do_pad": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "rescale_factor": 1 / 255,
        "resample": 3,
        "size": {"height": size, "width": size},
        "image_grid_pinpoints": pinpoints(size),
    }


def processor_config(geometry: dict) -> dict:
    """processor_config.json: LlavaOnevisionProcessor's own fields."""
    vision = geometry["vision"]
    return {
        "processor_class": "LlavaOnevisionProcessor",
        "image_token": IMAGE_TOKEN,
        "num_image_tokens": (vision["image_size"] // vision["patch_size"]) ** 2,
        "vision_feature_select_strategy": "full",
        "vision_aspect_ratio": "anyres_max_9",
    }


def write_tokenizer(folder: pathlib.Path, vocab_size: int) -> int:
    """The embedded SmolLM2 tokenizer, padded to vocab_size ids with `<image>` at IMAGE_TOKEN_ID, into
    folder; returns its EOS id."""
    from radixserve.common.model_files import resolve_model_path

    smol = resolve_model_path(None, weights=False)
    tokenizer = json.loads((smol / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    for i in range(len(vocab), vocab_size):
        vocab[IMAGE_TOKEN if i == IMAGE_TOKEN_ID else f"<|unused_{i}|>"] = i
    tokenizer["added_tokens"].append(
        {
            "id": IMAGE_TOKEN_ID,
            "content": IMAGE_TOKEN,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
    )
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False))
    settings = json.loads((smol / "tokenizer_config.json").read_text())
    settings["extra_special_tokens"] = [IMAGE_TOKEN]
    settings.pop("chat_template", None)  # chat_template.jinja
    (folder / "tokenizer_config.json").write_text(json.dumps(settings, indent=2) + "\n")
    return vocab[settings["eos_token"]]


def write(out: str | pathlib.Path, tiny: bool = False) -> pathlib.Path:
    """Write the folder; returns it."""
    folder = pathlib.Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    geometry = TINY if tiny else FULL
    eos_id = write_tokenizer(folder, geometry["text"]["vocab_size"])
    files = {
        "config.json": config(geometry, eos_id),
        "preprocessor_config.json": image_processor_config(geometry),
        "processor_config.json": processor_config(geometry),
        "generation_config.json": {"eos_token_id": eos_id},
    }
    for name, content in files.items():
        (folder / name).write_text(json.dumps(content, indent=2) + "\n")
    (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return folder


def main(argv=None) -> pathlib.Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True, help="the folder to write")
    p.add_argument("--tiny", action="store_true", help="CPU sizes, same folder shape")
    args = p.parse_args(argv)
    folder = write(args.out, args.tiny)
    print(folder)
    return folder


if __name__ == "__main__":
    main()
