"""scripts/make_dummy_llava_onevision.py: the folder has LLaVA-OneVision-7B's geometry and no weights, and
its --tiny twin serves (`radixserve serve --load-format dummy`, no torchvision) a chat request with one
picture, whose placeholder expands to the picture's rows."""

from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
import pytest

from tests.bench.scripts_loader import load_script
from PIL import Image


def test_full_folder_has_onevision_7b_geometry(tmp_path):
    from transformers import AutoTokenizer, LlavaOnevisionConfig

    folder = load_script("make_dummy_llava_onevision").main(["--out", str(tmp_path / "ov")])
    config = json.loads((folder / "config.json").read_text())
    text, vision = config["text_config"], config["vision_config"]
    assert (
        text["hidden_size"],
        text["num_hidden_layers"],
        text["num_attention_heads"],
        text["num_key_value_heads"],
        text["intermediate_size"],
        text["vocab_size"],
        text["rope_theta"],
        text["max_position_embeddings"],
    ) == (3584, 28, 28, 4, 18944, 152064, 1e6, 32768)
    assert (
        vision["model_type"],
        vision["hidden_size"],
        vision["num_attention_heads"],
        vision["intermediate_size"],
        vision["image_size"],
        vision["patch_size"],
    ) == ("siglip_vision_model", 1152, 16, 4304, 384, 14)
    assert config["vision_aspect_ratio"] == "anyres_max_9"
    assert config["vision_feature_layer"] == -1
    assert config["vision_feature_select_strategy"] == "full"
    assert len(config["image_grid_pinpoints"]) == 36
    assert config["image_grid_pinpoints"][-1] == [2304, 2304]
    tok = AutoTokenizer.from_pretrained(str(folder))
    # OneVision's image token id; every id the model can sample decodes
    assert config["image_token_index"] == tok.convert_tokens_to_ids("<image>") == 151646
    assert len(tok) == text["vocab_size"]
    assert tok.encode("a <image>\nb", add_special_tokens=False).count(151646) == 1
    processor = json.loads((folder / "processor_config.json").read_text())
    assert processor["num_image_tokens"] == 729
    assert not list(folder.glob("*.safetensors"))  # --load-format dummy
    LlavaOnevisionConfig.from_pretrained(str(folder))  # transformers reads it


def png(seed: int, size=(96, 64)) -> str:
    pixels = np.random.RandomState(seed).randint(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


@pytest.mark.e2e
def test_tiny_folder_serves_a_chat_request_with_one_image(tmp_path):
    from tests.stack import start_stack, stop_stack, wait_idle_and_check_no_leak

    folder = load_script("make_dummy_llava_onevision").main(
        ["--out", str(tmp_path / "ov"), "--tiny"]
    )
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RADIXSERVE_CPU_DECODE_KERNELS", "0")
        stack = start_stack(
            "--model-path",
            str(folder),
            "--load-format",
            "dummy",
            "--served-model-name",
            "ov",
            "--max-total-tokens",
            "4096",
            log_path=str(tmp_path / "serve.log"),
            timeout=180,
        )
    try:

        def chat(content) -> dict:
            r = httpx.post(
                stack.base_url + "/v1/chat/completions",
                json={
                    "model": "ov",
                    "messages": [{"role": "user", "content": content}],
                    "max_tokens": 4,
                    "temperature": 0,
                    "ignore_eos": True,
                },
                timeout=120,
            )
            assert r.status_code == 200, r.text
            return r.json()

        question = {"type": "text", "text": "What is in this picture?"}
        with_image = chat([{"type": "image_url", "image_url": {"url": png(1)}}, question])
        text_only = chat([question])
        assert with_image["usage"]["completion_tokens"] == 4
        # the tiny tower's 28-px crops are 2 x 2 patches: a base view and at least one crop
        extra = with_image["usage"]["prompt_tokens"] - text_only["usage"]["prompt_tokens"]
        assert extra >= 2 * 4, (with_image["usage"], text_only["usage"])
        wait_idle_and_check_no_leak(stack)
    finally:
        stop_stack(stack)
