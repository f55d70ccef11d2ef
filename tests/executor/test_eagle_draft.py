"""EAGLE / EAGLE3 draft heads (models/eagle.py) and the proposer (executor/eagle_proposer.py) on a tiny
random Llama target, with tiny random heads saved in the published checkpoint layouts.

Covers: the target's opt-in hidden-state capture against transformers' hidden states; each head's
forward against a plain-torch reference written here (no KV cache, full causal attention over the
sequence) for a prefill and for chained drafts across two propose calls (the second reusing the
first call's draft K/V as its prefix after a simulated verify), in a batch of two requests; loading
(published names accepted, missing / inconsistent tensors refused); d2t giving target ids; and an
EAGLE head built to reproduce a (1-layer, attention-free) target, whose drafts are the target's own
greedy tokens.
"""

import json
import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the triton backend's kernels, on the CPU
import transformers
from safetensors.torch import save_file

from radixserve.executor.attention.metadata import ExtendSeq, ForwardBatch, forward_context
from radixserve.executor.attention.no_cache import NoCacheCausalBackend
from radixserve.executor.attention.registry import create_attention_backend
from radixserve.executor.attention.torch_native import TorchNativeAttentionBackend
from radixserve.executor.eagle_proposer import DraftRequest, EagleProposer
from radixserve.executor.model_config import ModelConfig
from radixserve.executor.models.eagle import load_draft_model, target_capture_layers
from radixserve.executor.runner import load_model

VOCAB, HIDDEN, HEADS, KV_HEADS, INTER = 256, 64, 4, 2, 96
HEAD_DIM = HIDDEN // HEADS
THETA = 10000.0
EPS = 1e-5
DRAFT_VOCAB = 100
ATOL = 1e-4
NUM_SLOTS = 200


def llama_config(layers: int) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        num_hidden_layers=layers,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        rms_norm_eps=EPS,
        rope_theta=THETA,
        eos_token_id=None,
    )


def save_target(folder, layers: int, edit=None):
    """A random HF Llama (wide weights) saved to folder; returns (hf model, our loaded model)."""
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(llama_config(layers)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(
                torch.rand_like(p) + 0.5
                if "norm" in name
                else torch.randn_like(p) * (1.0 if "embed" in name else 0.1)
            )
        if edit is not None:
            edit(hf)
    hf.save_pretrained(folder)
    cfg = ModelConfig.load(folder, "float32")
    return hf, load_model(cfg, torch.device("cpu"), "auto", None)


def draft_config(**extra) -> dict:
    return {
        "model_type": "llama",
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "intermediate_size": INTER,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "max_position_embeddings": 256,
        "rms_norm_eps": EPS,
        "rope_theta": THETA,
        "tie_word_embeddings": False,
        "dtype": "float32",
        **extra,
    }


def save_draft(folder, config: dict, tensors: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))


def rand(*shape, scale=0.1):
    return torch.randn(*shape) * scale


def layer_tensors(prefix: str, q_in: int, input_norm: bool) -> dict:
    out = {
        f"{prefix}.self_attn.q_proj.weight": rand(HEADS * HEAD_DIM, q_in),
        f"{prefix}.self_attn.k_proj.weight": rand(KV_HEADS * HEAD_DIM, q_in),
        f"{prefix}.self_attn.v_proj.weight": rand(KV_HEADS * HEAD_DIM, q_in),
        f"{prefix}.self_attn.o_proj.weight": rand(HIDDEN, HEADS * HEAD_DIM),
        f"{prefix}.mlp.gate_proj.weight": rand(INTER, HIDDEN),
        f"{prefix}.mlp.up_proj.weight": rand(INTER, HIDDEN),
        f"{prefix}.mlp.down_proj.weight": rand(HIDDEN, INTER),
        f"{prefix}.post_attention_layernorm.weight": torch.rand(HIDDEN) + 0.5,
    }
    if input_norm:
        out[f"{prefix}.input_layernorm.weight"] = torch.rand(HIDDEN) + 0.5
    return out


def eagle_tensors(layers: int = 2) -> dict:
    """EAGLE-1 layout: fc with bias, layer 0 without input_layernorm, the embedding saved too."""
    torch.manual_seed(1)
    out = {
        "fc.weight": rand(HIDDEN, 2 * HIDDEN),
        "fc.bias": rand(HIDDEN),
        "embed_tokens.weight": rand(VOCAB, HIDDEN),  # not read: the target's serves
    }
    for i in range(layers):
        out.update(layer_tensors(f"layers.{i}", HIDDEN, input_norm=i > 0))
    return out


def eagle3_tensors() -> dict:
    torch.manual_seed(2)
    target_ids = torch.randperm(VOCAB)[:DRAFT_VOCAB].sort().values
    t2d = torch.zeros(VOCAB, dtype=torch.bool)
    t2d[target_ids] = True
    out = {
        "fc.weight": rand(HIDDEN, 3 * HIDDEN),
        "norm.weight": torch.rand(HIDDEN) + 0.5,
        "lm_head.weight": rand(DRAFT_VOCAB, HIDDEN, scale=1.0),
        "d2t": target_ids - torch.arange(DRAFT_VOCAB),
        "t2d": t2d,
        "midlayer.hidden_norm.weight": torch.rand(HIDDEN) + 0.5,
    }
    out.update(layer_tensors("midlayer", 2 * HIDDEN, input_norm=True))
    return out


EAGLE3_AUX_IDS = [0, 1, 2]  # layer outputs: the inputs of target layers 1, 2, 3


def save_target_and_heads(root) -> None:
    """root/target: a 4-layer random target; root/EAGLE and root/EAGLE3: random heads over it."""
    save_target(root / "target", layers=4)
    save_draft(
        root / "EAGLE",
        draft_config(architectures=["LlamaForCausalLM"], num_hidden_layers=2),
        eagle_tensors(),
    )
    save_draft(
        root / "EAGLE3",
        draft_config(
            architectures=["LlamaForCausalLMEagle3"],
            num_hidden_layers=1,
            draft_vocab_size=DRAFT_VOCAB,
            eagle_config={"eagle_aux_hidden_state_layer_ids": EAGLE3_AUX_IDS},
        ),
        eagle3_tensors(),
    )


# ---- the plain-torch reference (published weight names, whole sequence, no cache) ----


def ref_rms(x, w):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS))


def ref_rope(x, positions):
    inv = 1.0 / THETA ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM)
    freqs = positions.float()[:, None] * inv[None, :]
    cos, sin = torch.cat((freqs, freqs), -1).cos(), torch.cat((freqs, freqs), -1).sin()
    half = HEAD_DIM // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), -1)
    return x * cos[:, None] + rotated * sin[:, None]


def ref_attention(W, prefix, x, positions):
    t = x.shape[0]
    q = (x @ W[f"{prefix}.self_attn.q_proj.weight"].T).view(t, HEADS, HEAD_DIM)
    k = (x @ W[f"{prefix}.self_attn.k_proj.weight"].T).view(t, KV_HEADS, HEAD_DIM)
    v = (x @ W[f"{prefix}.self_attn.v_proj.weight"].T).view(t, KV_HEADS, HEAD_DIM)
    q, k = ref_rope(q, positions), ref_rope(k, positions)
    group = HEADS // KV_HEADS
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(HEAD_DIM)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    o = torch.einsum("hqk,khd->qhd", probs, v).reshape(t, HEADS * HEAD_DIM)
    return o @ W[f"{prefix}.self_attn.o_proj.weight"].T


def ref_mlp(W, prefix, x):
    gate = x @ W[f"{prefix}.mlp.gate_proj.weight"].T
    up = x @ W[f"{prefix}.mlp.up_proj.weight"].T
    return (torch.nn.functional.silu(gate) * up) @ W[f"{prefix}.mlp.down_proj.weight"].T


def ref_eagle(W, embed, ids, hidden_rows, layers=2):
    """EAGLE-1: (LM head input, next hidden) at every position."""
    positions = torch.arange(len(ids))
    x = torch.cat((embed[ids], torch.stack(hidden_rows)), -1) @ W["fc.weight"].T + W["fc.bias"]
    for i in range(layers):
        p = f"layers.{i}"
        h = x if i == 0 else ref_rms(x, W[f"{p}.input_layernorm.weight"])
        x = x + ref_attention(W, p, h, positions)
        x = x + ref_mlp(W, p, ref_rms(x, W[f"{p}.post_attention_layernorm.weight"]))
    return x, x


def ref_eagle3(W, embed, ids, hidden_rows):
    """EAGLE3: rows 3H wide are target states (through fc), H wide the head's own."""
    positions = torch.arange(len(ids))
    h = torch.stack([r @ W["fc.weight"].T if r.numel() != HIDDEN else r for r in hidden_rows])
    p = "midlayer"
    x = torch.cat(
        (
            ref_rms(embed[ids], W[f"{p}.input_layernorm.weight"]),
            ref_rms(h, W[f"{p}.hidden_norm.weight"]),
        ),
        -1,
    )
    r = h + ref_attention(W, p, x, positions)
    out = r + ref_mlp(W, p, ref_rms(r, W[f"{p}.post_attention_layernorm.weight"]))
    return ref_rms(out, W["norm.weight"]), out


def ref_chain(forward, logits_of, ids, hidden_rows, k):
    """k greedy drafts after the sequence, recomputing it whole each time: (target ids, logits)."""
    ids, rows, drafts, all_logits = list(ids), list(hidden_rows), [], []
    for _ in range(k):
        to_logits, to_next = forward(torch.tensor(ids), rows)
        logits, token = logits_of(to_logits[-1])
        drafts.append(token)
        all_logits.append(logits)
        ids.append(token)
        rows.append(to_next[-1])
    return drafts, all_logits


# ---- running the target ----


def run_target(target, ids: list[int]):
    """Our target over the whole sequence, no cache: (final hidden [T, H], captured or None)."""
    n = len(ids)
    batch = ForwardBatch(
        torch.tensor(ids),
        torch.arange(n),
        torch.zeros(n, dtype=torch.int64),
        [ExtendSeq(0, n, 0)],
        n,
        [],
        None,
        NoCacheCausalBackend(),
    )
    with forward_context(batch), torch.inference_mode():
        out = target(batch.input_ids, batch.positions)
    return out, target.captured_hidden if target.capture_hidden_layers else None


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return save_target(tmp_path_factory.mktemp("target"), layers=4)


def test_capture_hidden_layers_match_transformers(target):
    hf, ours = target
    ids = torch.randint(0, VOCAB, (9,), generator=torch.Generator().manual_seed(3)).tolist()
    plain, _ = run_target(ours, ids)
    ours.capture_hidden_layers = (3, 0, 2)
    try:
        out, captured = run_target(ours, ids)
    finally:
        ours.capture_hidden_layers = ()
    torch.testing.assert_close(out, plain, atol=0, rtol=0)  # forward's result unchanged
    with torch.no_grad():
        states = hf(torch.tensor([ids]), output_hidden_states=True).hidden_states
    expected = torch.cat([states[i][0] for i in (3, 0, 2)], -1)  # [i]: the input of layer i
    torch.testing.assert_close(captured, expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(out, states[-1][0], atol=ATOL, rtol=0)


def test_target_capture_layers_from_config():
    def cfg(**kw):
        return ModelConfig(None, kw, "LlamaForCausalLMEagle3", torch.float32, 256)

    assert target_capture_layers(cfg(), 32) == (2, 16, 29)
    assert target_capture_layers(
        cfg(eagle_config={"eagle_aux_hidden_state_layer_ids": [1, 15, 28]}), 32
    ) == (2, 16, 29)
    assert target_capture_layers(cfg(eagle_aux_hidden_state_layer_ids=[0, 1]), 4) == (1, 2)
    with pytest.raises(ValueError, match="layer outputs"):
        target_capture_layers(cfg(eagle_aux_hidden_state_layer_ids=[0, 1, 3]), 4)


def make_head(algorithm, target_model, folder):
    if algorithm == "EAGLE":
        W = eagle_tensors()
        config = draft_config(architectures=["LlamaForCausalLM"], num_hidden_layers=2)
    else:
        W = eagle3_tensors()
        config = draft_config(
            architectures=["LlamaForCausalLMEagle3"],
            num_hidden_layers=1,
            draft_vocab_size=DRAFT_VOCAB,
            eagle_config={"eagle_aux_hidden_state_layer_ids": EAGLE3_AUX_IDS},
        )
    save_draft(folder, config, W)
    return W, load_draft_model(algorithm, folder, target_model, torch.device("cpu"))


@pytest.mark.parametrize(
    "algorithm, backend",
    [
        ("EAGLE", "torch_native"),
        ("EAGLE3", "torch_native"),
        ("EAGLE", "triton"),
        ("EAGLE3", "triton"),
    ],
)
def test_draft_chain_matches_reference_over_two_rounds(algorithm, backend, target, tmp_path):
    hf, ours = target
    W, head = make_head(algorithm, ours, tmp_path / algorithm)
    embed = ours.model.embed_tokens.weight.detach()
    if algorithm == "EAGLE":
        ours.capture_hidden_layers = ()

        def ref_forward(ids, rows):
            return ref_eagle(W, embed, ids, rows)

        def logits_of(h):
            logits = h @ ours.lm_head.weight.detach().T
            return logits, int(logits.argmax())

        def states(ids):
            return run_target(ours, ids)[0]
    else:
        ours.capture_hidden_layers = head.capture_layers
        assert head.capture_layers == (1, 2, 3)

        def ref_forward(ids, rows):
            return ref_eagle3(W, embed, ids, rows)

        def logits_of(h):
            logits = h @ W["lm_head.weight"].T
            d = int(logits.argmax())
            return logits, d + int(W["d2t"][d])

        def states(ids):
            return run_target(ours, ids)[1]

    try:
        k = 4
        table = torch.zeros(4, 64, dtype=torch.int64)
        free = torch.randperm(NUM_SLOTS - 1, generator=torch.Generator().manual_seed(5)) + 1
        free = free.tolist()

        def take(n):
            out = free[:n]
            del free[:n]
            return out

        cpu = torch.device("cpu")
        attn = create_attention_backend(backend, cpu, head.kv_shape[1])
        proposer = EagleProposer(head, NUM_SLOTS, 3, 5, attn, cpu, torch.float32, keep_logits=True)
        g = torch.Generator().manual_seed(4)
        prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (11, 6)]
        seqs, rows = [], [2, 0]
        requests, hidden, expected = [], [], []
        for p, row in zip(prompts, rows):
            bonus = int(torch.randint(0, VOCAB, (1,), generator=g))
            slots = take(len(p))
            table[row, : len(p)] = torch.tensor(slots)
            h = states(p)
            requests.append(DraftRequest(row, 0, p[1:] + [bonus], slots))
            hidden.append(h)
            expected.append(ref_chain(ref_forward, logits_of, p[1:] + [bonus], list(h), k))
            seqs.append(p + [bonus])
        drafts = proposer.propose(table, requests, torch.cat(hidden), k)
        check(drafts, proposer.logits, expected)

        # A verify step keeps a of the k drafts (request 0: 2, request 1: none), then the target's
        # own next token; the next call runs those positions with the draft K/V before them reused.
        requests, hidden, expected = [], [], []
        for i, (seq, row, kept) in enumerate(zip(seqs, rows, (2, 0))):
            accepted = drafts[i, :kept].tolist()
            bonus = int(torch.randint(0, VOCAB, (1,), generator=g))
            prefix = len(seq) - 1  # the last token (sampled last step) had no K/V yet
            full = seq + accepted
            slots = take(1 + kept)
            table[row, prefix : prefix + 1 + kept] = torch.tensor(slots)
            h = states(full)
            requests.append(DraftRequest(row, prefix, accepted + [bonus], slots))
            hidden.append(h[prefix:])
            expected.append(ref_chain(ref_forward, logits_of, full[1:] + [bonus], list(h), k))
        drafts = proposer.propose(table, requests, torch.cat(hidden), k)
        check(drafts, proposer.logits, expected)
    finally:
        ours.capture_hidden_layers = ()


def check(drafts, logits, expected):
    for i, (ids, ref_logits) in enumerate(expected):
        assert drafts[i].tolist() == ids
        for step, ref in enumerate(ref_logits):
            torch.testing.assert_close(logits[step][i], ref, atol=ATOL, rtol=0)


def test_loading_accepts_published_names_and_refuses_missing(target, tmp_path):
    _, ours = target
    cfg1 = draft_config(architectures=["LlamaForCausalLM"], num_hidden_layers=2)
    # an input_layernorm for layer 0 and a "model." prefix are tolerated
    W = {f"model.{k}": v for k, v in eagle_tensors().items()}
    W["layers.0.input_layernorm.weight"] = torch.ones(HIDDEN)
    save_draft(tmp_path / "ok", cfg1, W)
    head = load_draft_model("EAGLE", tmp_path / "ok", ours, torch.device("cpu"))
    torch.testing.assert_close(head.fc.bias, W["model.fc.bias"])

    W = eagle_tensors()
    del W["layers.1.post_attention_layernorm.weight"]
    save_draft(tmp_path / "missing", cfg1, W)
    with pytest.raises(ValueError, match="lacks weights for.*layers.1.post_attention_layernorm"):
        load_draft_model("EAGLE", tmp_path / "missing", ours, torch.device("cpu"))

    cfg3 = draft_config(
        architectures=["LlamaForCausalLMEagle3"],
        num_hidden_layers=1,
        draft_vocab_size=DRAFT_VOCAB,
        eagle_config={"eagle_aux_hidden_state_layer_ids": EAGLE3_AUX_IDS},
    )
    W = eagle3_tensors()
    del W["d2t"]
    save_draft(tmp_path / "no_d2t", cfg3, W)
    with pytest.raises(ValueError, match="lacks weights for.*d2t"):
        load_draft_model("EAGLE3", tmp_path / "no_d2t", ours, torch.device("cpu"))

    W = eagle3_tensors()
    W["t2d"] = ~W["t2d"]
    save_draft(tmp_path / "bad_t2d", cfg3, W)
    with pytest.raises(ValueError, match="t2d and d2t disagree"):
        load_draft_model("EAGLE3", tmp_path / "bad_t2d", ours, torch.device("cpu"))

    W = eagle3_tensors()
    W["d2t"] = W["d2t"] + VOCAB
    save_draft(tmp_path / "bad_d2t", cfg3, W)
    with pytest.raises(ValueError, match="outside the target vocabulary"):
        load_draft_model("EAGLE3", tmp_path / "bad_d2t", ours, torch.device("cpu"))

    save_draft(
        tmp_path / "one_layer",
        {**cfg3, "eagle_config": {"eagle_aux_hidden_state_layer_ids": [1]}},
        eagle3_tensors(),
    )
    with pytest.raises(ValueError, match="at least 2 target layers"):
        load_draft_model("EAGLE3", tmp_path / "one_layer", ours, torch.device("cpu"))

    W = eagle3_tensors()
    W["midlayer.extra.weight"] = torch.ones(3)
    save_draft(tmp_path / "extra", cfg3, W)
    with pytest.raises(KeyError, match="no matching parameter"):
        load_draft_model("EAGLE3", tmp_path / "extra", ours, torch.device("cpu"))


def test_d2t_gives_target_ids(target, tmp_path):
    _, ours = target
    W, head = make_head("EAGLE3", ours, tmp_path / "e3")
    got = head.to_target_ids(torch.arange(DRAFT_VOCAB))
    assert got.tolist() == torch.nonzero(W["t2d"]).flatten().tolist()
    assert head.compute_logits(torch.randn(2, HIDDEN)).shape == (2, DRAFT_VOCAB)


def test_proposer_refuses_bad_requests(target, tmp_path):
    _, ours = target
    _, head = make_head("EAGLE", ours, tmp_path / "e1")
    proposer = EagleProposer(
        head, NUM_SLOTS, 2, 3, TorchNativeAttentionBackend(), torch.device("cpu"), torch.float32
    )
    table = torch.zeros(2, 16, dtype=torch.int64)
    h = torch.zeros(2, HIDDEN)
    ok = DraftRequest(0, 0, [1, 2], [5, 6])
    with pytest.raises(ValueError, match="draft steps"):
        proposer.propose(table, [ok], h, 4)
    with pytest.raises(ValueError, match="slot ids"):
        proposer.propose(table, [DraftRequest(0, 0, [1, 2], [5, NUM_SLOTS])], h, 2)
    with pytest.raises(ValueError, match="exceed the context"):
        proposer.propose(table, [DraftRequest(0, 14, [1, 2], [5, 6])], h, 2)
    with pytest.raises(ValueError, match="hidden rows"):
        proposer.propose(table, [ok], h[:1], 2)
    with pytest.raises(ValueError, match="token ids"):
        proposer.propose(table, [DraftRequest(0, 0, [1], [5, 6])], h, 2)


def test_eagle_head_built_from_the_target_drafts_its_greedy_tokens(tmp_path):
    """A 1-layer target without attention (o_proj 0) and with a unit final norm: an EAGLE head whose
    fc passes the embedding through and whose layer is the target's layer predicts exactly the
    target's hidden state at the next position, up to the norm's positive scale, so its greedy
    drafts are the target's greedy tokens."""

    def edit(hf):
        layer = hf.model.layers[0]
        layer.self_attn.o_proj.weight.zero_()
        hf.model.norm.weight.fill_(1.0)

    hf, ours = save_target(tmp_path / "target", layers=1, edit=edit)
    t = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    W = {
        "fc.weight": torch.cat((torch.eye(HIDDEN), torch.zeros(HIDDEN, HIDDEN)), 1),
        "fc.bias": torch.zeros(HIDDEN),
    }
    for name, value in t.items():
        if name.startswith("model.layers.0.") and "input_layernorm" not in name:
            W[name.removeprefix("model.")] = value
    save_draft(
        tmp_path / "head",
        draft_config(architectures=["LlamaForCausalLM"], num_hidden_layers=1),
        W,
    )
    head = load_draft_model("EAGLE", tmp_path / "head", ours, torch.device("cpu"))
    prompt = torch.randint(0, VOCAB, (7,), generator=torch.Generator().manual_seed(6)).tolist()
    with torch.no_grad():
        greedy = hf.generate(
            torch.tensor([prompt]), max_new_tokens=6, do_sample=False, pad_token_id=0
        )[0, len(prompt) :].tolist()
    proposer = EagleProposer(
        head, NUM_SLOTS, 1, 5, TorchNativeAttentionBackend(), torch.device("cpu"), torch.float32
    )
    table = torch.zeros(1, 32, dtype=torch.int64)
    slots = list(range(10, 10 + len(prompt)))
    table[0, : len(prompt)] = torch.tensor(slots)
    hidden, _ = run_target(ours, prompt)
    drafts = proposer.propose(
        table, [DraftRequest(0, 0, prompt[1:] + [greedy[0]], slots)], hidden, 5
    )
    assert drafts[0].tolist() == greedy[1:6]
