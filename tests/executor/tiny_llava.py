"""Tiny random LLaVA-family models saved as HF folders with a processor (the SmolLM2 tokenizer plus an
`<image>` token, a small CLIP or SigLIP image processor, a chat template that writes image parts),
and pictures made with pillow, for the vision tests of the executor, the tokenizer and the stack."""

from __future__ import annotations

import io
import pathlib
import shutil

import torch
import transformers
from PIL import Image

from radixserve.common.model_files import resolve_model_path

IMAGE_TOKEN = "<image>"
# HF-style: image parts ({"type": "image"}) written as the image token and a newline.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'].upper() }}: "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
    "{% if p['type'] == 'image' %}<image>\n{% else %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}"
    "\n{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
CLIP = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=28,
    patch_size=14,
    projection_dim=32,
)


def tokenizer():
    tok = transformers.AutoTokenizer.from_pretrained(str(resolve_model_path(None)))
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _processor(kind: str, tok):
    if kind == "llava":
        images = transformers.CLIPImageProcessor(
            size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}
        )
        return transformers.LlavaProcessor(
            image_processor=images,
            tokenizer=tok,
            patch_size=14,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
            chat_template=CHAT_TEMPLATE,
        )
    if kind == "llava_next":
        images = transformers.LlavaNextImageProcessor(
            size={"shortest_edge": 28},
            crop_size={"height": 28, "width": 28},
            image_grid_pinpoints=[[28, 56], [56, 28], [56, 56]],
        )
        return transformers.LlavaNextProcessor(
            image_processor=images,
            tokenizer=tok,
            patch_size=14,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
            chat_template=CHAT_TEMPLATE,
        )
    if kind == "llava_onevision":
        # Only the image processor: transformers builds LlavaOnevisionProcessor only with its video
        # processor, which needs torchvision (not installed here); see ONEVISION_NOTE.
        return transformers.LlavaOnevisionImageProcessor(
            size={"height": 28, "width": 28},
            image_grid_pinpoints=[[28, 56], [56, 28], [56, 56]],
        )
    raise ValueError(kind)


ONEVISION_NOTE = (
    "LlavaOnevisionProcessor needs torchvision (its video processor): the OneVision tests process "
    "images with the image processor alone and expand the placeholder by hand"
)


def _config(kind: str, vocab: int, image_token: int):
    text = transformers.LlamaConfig(vocab_size=vocab, **TEXT)
    if kind == "llava":
        return transformers.LlavaConfig(
            vision_config=transformers.CLIPVisionConfig(**CLIP),
            text_config=text,
            image_token_index=image_token,
            vision_feature_layer=-2,
        )
    if kind == "llava_next":
        return transformers.LlavaNextConfig(
            vision_config=transformers.CLIPVisionConfig(**CLIP),
            text_config=text,
            image_token_index=image_token,
            vision_feature_layer=-2,
            image_grid_pinpoints=[[28, 56], [56, 28], [56, 56]],
        )
    if kind == "llava_onevision":
        siglip = {k: v for k, v in CLIP.items() if k != "projection_dim"}
        return transformers.LlavaOnevisionConfig(
            vision_config=transformers.SiglipVisionConfig(**siglip),
            text_config=transformers.Qwen2Config(vocab_size=vocab, **TEXT),
            image_token_index=image_token,
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",
            image_grid_pinpoints=[[28, 56], [56, 28], [56, 56]],
            vision_aspect_ratio="anyres_max_9",
        )
    raise ValueError(kind)


MODEL_CLASSES = {
    "llava": "LlavaForConditionalGeneration",
    "llava_next": "LlavaNextForConditionalGeneration",
    "llava_onevision": "LlavaOnevisionForConditionalGeneration",
}


def build_tiny_llava(kind: str, folder: pathlib.Path) -> torch.nn.Module:
    """A random HF model of kind (llava, llava_next, llava_onevision) with its processor and tokenizer
    saved to folder; returns the HF model (fp32, eval)."""
    torch.manual_seed(0)
    tok = tokenizer()
    processor = _processor(kind, tok)
    config = _config(kind, len(tok), tok.convert_tokens_to_ids(IMAGE_TOKEN))
    config.text_config.eos_token_id = None
    model = getattr(transformers, MODEL_CLASSES[kind])(config).eval()
    with torch.no_grad():  # larger than the default init so that differences would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif "embed_tokens" in name:
                p.normal_(0.0, 1.0)
            else:
                p.normal_(0.0, 0.1)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model


def copy_model(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
    shutil.copytree(src, dst)
    return dst


def picture(seed: int, size: tuple[int, int] = (40, 30)) -> bytes:
    """A PNG of random colour blocks."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1] // 10 + 1, size[0] // 10 + 1, 3), generator=g)
    small = Image.fromarray(pixels.to(torch.uint8).numpy(), "RGB")
    image = small.resize(size, Image.NEAREST)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()
