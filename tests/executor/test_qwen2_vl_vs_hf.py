"""Qwen2-VL and Qwen2.5-VL (models/qwen2_vl.py) against transformers on tiny random fp32 models: M-RoPE
positions against get_rope_index, the M-RoPE rotation against transformers' rotary, both weight layouts,
then our model run through the executor's slot table, KV pool and attention backend (a step built by
BatchBuilder, its positions replaced by M-RoPE ones and its token embeddings by the image-merged ones,
as the image pipeline does): prefill logits of prompts with one and two images (batched, and chunked)
and greedy decode at positions p + delta against transformers' forward and generate (torch_native;
triton under TRITON_INTERPRET=1 on the CPU); text requests through the unchanged ModelRunner.

Images are random pixels through transformers' Qwen2-VL image processor (patch 4, merge 2).
Tolerance: logits agree to atol 1e-4 (hf_parity.ATOL; fp32, the differences come from op order).
"""

import json
import os
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from radixserve.common.step import ContinuingRequest, NewRequest, StepInput  # noqa: E402
from radixserve.executor.attention.metadata import forward_context  # noqa: E402
from radixserve.executor.attention.registry import create_attention_backend  # noqa: E402
from radixserve.executor.batch_builder import BatchBuilder  # noqa: E402
from radixserve.executor.kv_cache import KVPool  # noqa: E402
from radixserve.executor.layers.rotary import MRotaryEmbedding  # noqa: E402
from radixserve.executor.model_config import ModelConfig  # noqa: E402
from radixserve.executor.models.qwen2_vl import (  # noqa: E402
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLForConditionalGeneration,
    image_token_count,
    mrope_positions,
)
from radixserve.executor.models.registry import get_model_class  # noqa: E402
from radixserve.executor.runner import ModelRunner, load_model  # noqa: E402
from radixserve.executor.slot_table import SlotTable  # noqa: E402
from radixserve.executor.weights import iterate_safetensors  # noqa: E402
from tests.configs import runner_config  # noqa: E402
from tests.executor.hf_parity import (  # noqa: E402
    ATOL,
    SlotPool,
    check_batched_prefill_decode_and_prefix_reuse,
)

VOCAB = 256
IMAGE, VIDEO, START, END = 250, 251, 252, 253  # image placeholder, video, vision start / end tokens
PATCH, MERGE = 4, 2

TEXT = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    bos_token_id=None,
    eos_token_id=None,
    # head_dim 16: 8 frequency pairs, 2 rotated by the temporal position, 3 by height, 3 by width
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
)
VISION = dict(patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=2, num_heads=2)
SPECIAL = dict(
    image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=START, vision_end_token_id=END
)

CONFIGS = {
    "qwen2_vl": lambda: transformers.Qwen2VLConfig(
        text_config=TEXT,
        vision_config=dict(**VISION, depth=2, embed_dim=32, hidden_size=64, mlp_ratio=2),
        **SPECIAL,
    ),
    # windowed attention in block 0 (2x2 merged units a window), full attention in block 1
    "qwen2_5_vl": lambda: transformers.Qwen2_5_VLConfig(
        text_config=TEXT,
        vision_config=dict(
            **VISION,
            depth=2,
            hidden_size=32,
            out_hidden_size=64,
            intermediate_size=48,
            window_size=16,
            fullatt_block_indexes=[1],
        ),
        **SPECIAL,
    ),
}
OUR_CLASS = {
    "qwen2_vl": Qwen2VLForConditionalGeneration,
    "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
}


@dataclass
class ImageTensors:
    """One image's processor outputs (the shape of services/common/multimodal.ImageTensors)."""

    pixel_values: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


def make_images(seed: int, *sizes: tuple[int, int]) -> list[ImageTensors]:
    """Random RGB images of (height, width) sizes (multiples of PATCH * MERGE: kept as they are),
    each through the image processor on its own."""
    processor = transformers.Qwen2VLImageProcessorPil(
        patch_size=PATCH,
        merge_size=MERGE,
        temporal_patch_size=2,
        min_pixels=8 * 8,
        max_pixels=64 * 64,
    )
    rng = np.random.RandomState(seed)
    out = []
    for height, width in sizes:
        pixels = rng.randint(0, 256, (height, width, 3), dtype=np.uint8)
        made = processor(images=[Image.fromarray(pixels)], return_tensors="pt")
        assert made["image_grid_thw"].tolist() == [[1, height // PATCH, width // PATCH]]
        out.append(ImageTensors(made["pixel_values"], {"image_grid_thw": made["image_grid_thw"]}))
    return out


def grids(images: list[ImageTensors]) -> list[tuple[int, int, int]]:
    return [tuple(im.extras["image_grid_thw"].reshape(3).tolist()) for im in images]


def prompt(seed: int, text_lengths: list[int], images: list[ImageTensors]) -> list[int]:
    """Random text runs with each image's <start> <image>*n <end> between them (len(images) + 1 runs)."""
    g = torch.Generator().manual_seed(seed)
    out: list[int] = []
    for i, n in enumerate(text_lengths):
        out += torch.randint(3, 240, (n,), generator=g).tolist()
        if i < len(images):
            grid = grids(images[i : i + 1])[0]
            out += [START] + [IMAGE] * (grid[1] * grid[2] // MERGE**2) + [END]
    return out


def build_hf(name: str, folder) -> torch.nn.Module:
    """A random HF model saved to folder, with wide random weights (hf_parity.build_hf_model's)."""
    torch.manual_seed(0)
    config = CONFIGS[name]()
    model = transformers.AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname or "ln_q" in pname:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 1.0 if "embed_tokens" in pname else 0.1)
    model.save_pretrained(folder)
    return model.eval()


@pytest.fixture(scope="module", params=list(CONFIGS))
def models(request, tmp_path_factory):
    """(name, hf model, our model, its folder), built once per config."""
    folder = tmp_path_factory.mktemp(request.param)
    hf = build_hf(request.param, folder)
    config = ModelConfig.load(folder, dtype="float32")
    ours = load_model(config, torch.device("cpu"), "auto", 0)
    assert type(ours) is OUR_CLASS[request.param]
    return request.param, hf, ours, folder


def hf_positions(hf, ids: list[int], image_grids) -> tuple[torch.Tensor, int]:
    input_ids = torch.tensor([ids])
    types = (input_ids == IMAGE).int()
    positions, delta = hf.model.get_rope_index(
        input_ids, types, torch.tensor(image_grids) if image_grids else None
    )
    return positions[:, 0], int(delta)


def hf_logits(hf, ids: list[int], images: list[ImageTensors]) -> torch.Tensor:
    """transformers' logits [T, vocab] of one prompt."""
    input_ids = torch.tensor([ids])
    kwargs = {}
    if images:
        kwargs = dict(
            pixel_values=torch.cat([im.pixel_values for im in images]),
            image_grid_thw=torch.tensor(grids(images)),
            mm_token_type_ids=(input_ids == IMAGE).int(),
        )
    with torch.no_grad():
        return hf(input_ids, **kwargs).logits[0].float()


def hf_generate(hf, ids: list[int], images: list[ImageTensors], n: int) -> list[int]:
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        out = hf.generate(
            input_ids,
            pixel_values=torch.cat([im.pixel_values for im in images]),
            image_grid_thw=torch.tensor(grids(images)),
            mm_token_type_ids=(input_ids == IMAGE).int(),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    return out[0, len(ids) :].tolist()


# --- M-RoPE positions and rotation -----------------------------------------------------------------


@pytest.mark.parametrize("num_images", [0, 1, 2])
def test_mrope_positions_match_get_rope_index(models, num_images):
    _, hf, ours, _ = models
    images = make_images(num_images, (24, 40), (32, 16))[:num_images]
    for seed, lengths in enumerate(([5, 3, 4], [0, 0, 0], [1, 6, 0])):
        ids = prompt(seed, lengths[: num_images + 1], images)
        if not ids:
            continue
        got, delta = mrope_positions(ours.full_config.hf, ids, grids(images))
        expected, expected_delta = hf_positions(hf, ids, grids(images))
        assert got.dtype == torch.int64 and got.shape == (3, len(ids))
        assert torch.equal(got, expected) and delta == expected_delta, (lengths, num_images)
        # the next token continues at len(ids) + delta in every row, past every position so far
        assert len(ids) + delta == int(got.max()) + 1


def test_mrope_positions_refuse_mismatched_image_tokens(models):
    _, _, ours, _ = models
    hf_config = ours.full_config.hf
    (image,) = make_images(0, (16, 16))
    ids = prompt(0, [3, 2], [image])
    assert image_token_count(hf_config, grids([image])[0]) == 4
    with pytest.raises(ValueError, match="image tokens"):
        mrope_positions(hf_config, ids, [])  # tokens without an image
    with pytest.raises(ValueError, match="image tokens"):
        mrope_positions(hf_config, ids[:-4], grids([image]))  # the run cut short
    with pytest.raises(ValueError, match="in a row"):  # 4 image tokens, not consecutive
        mrope_positions(hf_config, [IMAGE, IMAGE, 7, IMAGE, IMAGE], grids([image]))
    with pytest.raises(ValueError, match="merge blocks"):
        mrope_positions(hf_config, ids, [(1, 3, 4)])


def test_mrope_rotation_matches_transformers():
    from transformers.models.qwen2_vl import modeling_qwen2_vl as hf_qwen2_vl

    torch.manual_seed(0)
    config = CONFIGS["qwen2_vl"]().text_config
    hf_rope = hf_qwen2_vl.Qwen2VLRotaryEmbedding(config)
    ours = MRotaryEmbedding(16, 512, 10000.0, {"rope_type": "default"}, torch.float32, [2, 3, 3])
    positions = torch.randint(0, 512, (3, 9))
    q, k = torch.randn(2, 9, 4, 16)
    cos, sin = hf_rope(q, positions[:, None, :])  # [1, T, head_dim]
    expected_q, expected_k = hf_qwen2_vl.apply_rotary_pos_emb(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin
    )
    got = ours.prepare(positions).rotate(torch.cat((q, k), 1), 4)
    torch.testing.assert_close(got[:, :4], expected_q[0].transpose(0, 1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[:, 4:], expected_k[0].transpose(0, 1), atol=1e-5, rtol=1e-5)
    # text positions (three equal rows) rotate as the plain rotary, and [T] positions mean that
    same = positions[0].expand(3, -1)
    torch.testing.assert_close(
        ours.prepare(same).rotate(q.clone(), 4), ours.prepare(positions[0]).rotate(q.clone(), 4)
    )
    with pytest.raises(ValueError, match="mrope_section"):
        MRotaryEmbedding(16, 8, 10000.0, {"rope_type": "default"}, torch.float32, [2, 3, 2])


# --- loading ---------------------------------------------------------------------------------------


def flat_config(nested: dict) -> dict:
    """The older config.json layout (the hub's Qwen2-VL / Qwen2.5-VL): text keys at the top, the rope
    as rope_theta + rope_scaling {"type": "mrope", "mrope_section"}."""
    flat = {k: v for k, v in nested.items() if k != "text_config"}
    text = dict(nested["text_config"])
    rope = text.pop("rope_parameters")
    flat.update({k: v for k, v in text.items() if k not in ("model_type", "architectures")})
    flat["rope_theta"] = rope["rope_theta"]
    flat["rope_scaling"] = {"type": "mrope", "mrope_section": rope["mrope_section"]}
    return flat


def test_registry_and_both_layouts(models, tmp_path):
    name, hf, ours, folder = models
    arch = type(hf).__name__
    assert get_model_class(arch) is OUR_CLASS[name]
    assert ours.is_multimodal and ours.uses_mrope
    # transformers 5's weight names (model.language_model.*, model.visual.*, lm_head.*); the saved
    # checkpoint has the older ones (model.*, visual.*), which the fixture loaded
    state = hf.state_dict()
    assert any(n.startswith("model.language_model.") for n in state)
    assert any(n.startswith("model.visual.") for n in state)
    # the older flat config.json
    nested = json.loads((folder / "config.json").read_text())
    assert "text_config" in nested
    (tmp_path / "config.json").write_text(json.dumps(flat_config(nested)))
    flat = ModelConfig.load(tmp_path, dtype="float32")
    assert flat.num_layers == 2 and flat.num_kv_heads == 2 and flat.head_dim == 16
    again = OUR_CLASS[name](flat)
    again.load_weights(state.items())
    assert again.config.hf["num_hidden_layers"] == ours.config.hf["num_hidden_layers"] == 2
    for (n1, p1), (n2, p2) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    # same sections and theta (the nested config's context length is ModelConfig's default, longer)
    assert torch.equal(again.rotary_emb.section_rows, ours.rotary_emb.section_rows)
    for table in ("cos_table", "sin_table"):
        got = getattr(again.rotary_emb, table)
        assert got.shape[0] == 512 and torch.equal(got, getattr(ours.rotary_emb, table)[:512])
    # a checkpoint without the tower is refused
    partial = [(n, t) for n, t in iterate_safetensors(folder) if not n.startswith("visual.")]
    with pytest.raises(ValueError, match="lacks weights for: .'visual"):
        OUR_CLASS[name](flat).load_weights(partial)


def test_the_tower_takes_the_model_dtype(models):
    _, _, _, folder = models
    model = load_model(ModelConfig.load(folder, dtype="bfloat16"), torch.device("cpu"), "dummy", 0)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    (image,) = make_images(5, (16, 16))
    (embeds,) = model.embed_images([image])
    assert embeds.dtype == torch.bfloat16 and embeds.shape == (4, 64)
    assert torch.isfinite(embeds).all()


def test_embed_images_checks_pixel_rows(models):
    _, _, ours, _ = models
    (image,) = make_images(1, (16, 24))
    (embeds,) = ours.embed_images([image])
    assert embeds.shape == (6, 64)
    assert ours.embed_images([]) == []
    bad = ImageTensors(image.pixel_values[:-1], image.extras)
    with pytest.raises(ValueError, match="do not match its grid"):
        ours.embed_images([bad])
    with pytest.raises(ValueError, match="image_grid_thw"):
        ours.embed_images([ImageTensors(image.pixel_values)])


# --- through the executor's attention ---------------------------------------------------------------


class Executor:
    """Our model run over the executor's slot table, KV pool and attention backend, M-RoPE positions
    and image embeddings put into each step the way the image pipeline does."""

    def __init__(self, model, backend: str = "torch_native", kv_slots: int = 1024):
        text = model.config
        self.model = model
        device = torch.device("cpu")
        self.pool = KVPool(
            kv_slots, text.num_layers, text.num_kv_heads, text.head_dim, torch.float32, device
        )
        self.builder = BatchBuilder(
            kv_slots,
            text.vocab_size,
            512,
            SlotTable(8, 512, device),
            self.pool,
            create_attention_backend(backend, device, text.num_kv_heads),
        )
        self.states: dict = {}
        self.requests: dict[str, dict] = {}  # request id -> its positions, delta, embeddings
        self.slots = SlotPool(kv_slots)

    def add(self, rid: str, ids: list[int], images: list[ImageTensors]) -> None:
        positions, delta = mrope_positions(self.model.full_config.hf, ids, grids(images))
        embeds = self.model.model.embed_tokens(torch.tensor(ids)).detach()
        if images:
            merged = torch.cat(self.model.embed_images(images))
            embeds[torch.tensor(ids) == IMAGE] = merged
        self.requests[rid] = dict(ids=ids, positions=positions, delta=delta, embeds=embeds, done=0)

    def step(self, prefill: dict[str, int], decode: list[str]) -> torch.Tensor:
        """Run `prefill` ({request: tokens of its prompt to run now}) then one decode token of each
        `decode` request (its last sampled token); the logits [T, vocab] of every token of the step."""
        new, cont = [], []
        for rid, n in prefill.items():
            r = self.requests[rid]
            tokens = r["ids"][r["done"] : r["done"] + n]
            last = r["done"] + n == len(r["ids"])  # the last chunk samples
            if r["done"] == 0:
                new.append(NewRequest(rid, tokens, self.slots.take(n), sample=last))
            else:
                cont.append(ContinuingRequest(rid, self.slots.take(n), tokens, sample=last))
        cont += [ContinuingRequest(rid, self.slots.take(1)) for rid in decode]
        step = StepInput(1, new_requests=new, continuing_requests=cont)
        batch = self.builder.build(step, self.states)
        positions, embeds = [], []
        for rid, n in prefill.items():
            r = self.requests[rid]
            positions.append(r["positions"][:, r["done"] : r["done"] + n])
            embeds.append(r["embeds"][r["done"] : r["done"] + n])
            r["done"] += n
        first_decode = batch.num_extend_tokens
        decode_ids = []
        for i, rid in enumerate(decode):
            r = self.requests[rid]
            p = int(batch.positions[first_decode + i])  # its sequence position
            positions.append(torch.full((3, 1), p + r["delta"]))
            decode_ids.append(r["next"])
        ids = torch.cat(
            [batch.input_ids[:first_decode], torch.tensor(decode_ids, dtype=torch.int64)]
        )
        embeds.append(self.model.model.embed_tokens(ids[first_decode:]).detach())
        with torch.no_grad(), forward_context(batch):
            hidden = self.model(ids, torch.cat(positions, 1), torch.cat(embeds))
            return self.model.compute_logits(hidden)

    def sample(self, rid: str, logits_row: torch.Tensor) -> int:
        token = int(logits_row.argmax())
        self.requests[rid]["next"] = token
        return token


def check_prefill_and_decode(hf, ours, backend: str, steps: int) -> None:
    one = make_images(2, (24, 40))
    two = make_images(3, (16, 24), (32, 16))
    a, b = prompt(10, [4, 3], one), prompt(11, [2, 5, 1], two)
    expected = {"a": hf_logits(hf, a, one), "b": hf_logits(hf, b, two)}
    ex = Executor(ours, backend)
    ex.add("a", a, one)
    ex.add("b", b, two)
    # both prompts in one step; every token's logits
    logits = ex.step({"a": len(a), "b": len(b)}, [])
    torch.testing.assert_close(logits[: len(a)], expected["a"], atol=ATOL, rtol=0)
    torch.testing.assert_close(logits[len(a) :], expected["b"], atol=ATOL, rtol=0)
    ex.sample("a", logits[len(a) - 1])
    ex.sample("b", logits[-1])
    # greedy decode of both in one batch, each at its own p + delta
    got = {"a": [ex.requests["a"]["next"]], "b": [ex.requests["b"]["next"]]}
    for _ in range(steps - 1):
        logits = ex.step({}, ["b", "a"])
        got["b"].append(ex.sample("b", logits[0]))
        got["a"].append(ex.sample("a", logits[1]))
    assert got["a"] == hf_generate(hf, a, one, steps)
    assert got["b"] == hf_generate(hf, b, two, steps)


def test_prefill_logits_and_greedy_decode_match_hf(models):
    _, hf, ours, _ = models
    check_prefill_and_decode(hf, ours, "torch_native", steps=8)


def test_chunked_image_prefill_matches_hf(models):
    """A prompt's chunks cut through its image: each chunk's positions are its slice of the prompt's."""
    _, hf, ours, _ = models
    images = make_images(4, (16, 24), (24, 24))
    ids = prompt(12, [3, 2, 2], images)
    expected = hf_logits(hf, ids, images)
    ex = Executor(ours)
    ex.add("c", ids, images)
    cut = [0, 6, 15, len(ids)]  # inside the first image, inside the second, the rest
    for lo, hi in zip(cut, cut[1:]):
        logits = ex.step({"c": hi - lo}, [])
        torch.testing.assert_close(logits, expected[lo:hi], atol=ATOL, rtol=0)


def test_triton_backend_matches_hf(models):
    """The triton backend's fused rotary + KV store reads the per-step M-RoPE tables (CPU: interpreted)."""
    name, hf, ours, _ = models
    if name != "qwen2_vl":
        pytest.skip("the decoder is the same for both versions: one backend run is enough")
    check_prefill_and_decode(hf, ours, "triton", steps=2)


def test_text_requests_through_the_model_runner(models, tmp_path):
    """With the hub's flat config the executor's ModelRunner, which knows nothing of images yet, serves
    text: positions [T] rotate as three equal rows (delta 0), as transformers does without images."""
    _, hf, _, folder = models
    nested = json.loads((folder / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(flat_config(nested)))
    (tmp_path / "model.safetensors").symlink_to(folder / "model.safetensors")
    runner = ModelRunner(
        tmp_path,
        runner_config(dtype="float32", device="cpu", max_total_tokens=1024),
    )
    check_batched_prefill_decode_and_prefix_reuse((hf, runner))
