"""The fused bf16 CPU decode kernels (kernels/cpu_decode.cpp), each against a torch reference.

Tolerances: outputs are bf16 (8 bits of mantissa, relative step 2^-8 = 0.0039); kernels accumulate in
fp32 in another order than torch, so results may differ by a bf16 rounding step or two of the output
magnitude. Checks use atol = 2e-2 * max|reference| and rtol = 2e-2.
"""

import json

import pytest
import torch
import torch.nn.functional as F

from radixserve.kernels import cpu_decode

cd = cpu_decode.load()
pytestmark = pytest.mark.skipif(
    cd is None, reason="CPU decode kernels unavailable (no AVX512-BF16 or no compiler)"
)

BF = torch.bfloat16


def close(got: torch.Tensor, ref: torch.Tensor, rel: float = 2e-2) -> None:
    got, ref = got.float(), ref.float()
    torch.testing.assert_close(got, ref, atol=rel * ref.abs().max().item() + 1e-6, rtol=rel)


@pytest.mark.parametrize("m", [1, 3, 4, 7, 16])
@pytest.mark.parametrize(
    "n, k", [(64, 32), (960, 576), (200, 96), (8, 2), (3072, 576), (576, 1536)]
)
@pytest.mark.parametrize("bias", [False, True])
def test_gemm(m, n, k, bias):
    g = torch.Generator().manual_seed(m * 1000 + n + k)
    x = torch.randn(m, k, generator=g).to(BF)
    w = (torch.randn(n, k, generator=g) * k**-0.5).to(BF)
    b = torch.randn(n, generator=g).to(BF) if bias else None
    got = cd.gemm(x, cpu_decode.pack_weight(w), n, cpu_decode.bias_f32(b))
    ref = F.linear(x.float(), w.float(), None if b is None else b.float())
    assert got.dtype == BF and got.shape == (m, n)
    close(got, ref)


@pytest.mark.parametrize("m, h", [(1, 576), (5, 64), (3, 40)])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("with_weight", [False, True])
def test_add_rms(m, h, with_residual, with_weight):
    g = torch.Generator().manual_seed(m + h)
    x = torch.randn(m, h, generator=g).to(BF)
    res = torch.randn(m, h, generator=g).to(BF) if with_residual else None
    w = (1 + 0.1 * torch.randn(h, generator=g)).to(BF) if with_weight else None
    out, new_res = cd.add_rms(x, res, 1e-5, w)
    r = x if res is None else (x + res)
    ref_res = r.clone()
    rf = r.float()
    ref = rf * torch.rsqrt(rf.pow(2).mean(-1, keepdim=True) + 1e-5)
    if w is not None:
        ref = ref * w.float()
    close(new_res, ref_res, 1e-2)
    close(out, ref)


def rope_ref(x: torch.Tensor, pos: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2).float() / d)
    f = pos.float()[:, None] * inv[None, :]
    cos, sin = (
        torch.cat((f.cos(), f.cos()), -1)[:, None],
        torch.cat((f.sin(), f.sin()), -1)[:, None],
    )
    xf = x.float()
    rot = torch.cat((-xf[..., d // 2 :], xf[..., : d // 2]), -1)
    return xf * cos + rot * sin


def tables(d: int, max_pos: int, theta: float = 10000.0):
    inv = 1.0 / theta ** (torch.arange(0, d, 2).float() / d)
    f = torch.arange(max_pos).float()[:, None] * inv[None, :]
    cos = torch.cat((f.cos(), f.cos()), -1).to(BF)
    sin = torch.cat((-f.sin(), f.sin()), -1).to(BF)
    return cos, sin


@pytest.mark.parametrize("d", [64, 128, 40])
def test_rope_store(d):
    g = torch.Generator().manual_seed(d)
    m, nh, nkv, slots = 5, 6, 2, 64
    qkv = torch.randn(m, (nh + 2 * nkv) * d, generator=g).to(BF)
    pos = torch.tensor([0, 7, 100, 33, 250])
    out_slots = torch.tensor([9, 3, 40, 17, 63])  # non-contiguous, unordered
    k_cache = torch.zeros(slots, nkv, d, dtype=BF)
    v_cache = torch.zeros(slots, nkv, d, dtype=BF)
    cos, sin = tables(d, 256)
    orig = qkv.clone()
    cd.rope_store(qkv, nh, nkv, pos, cos, sin, out_slots, k_cache, v_cache)
    q_ref = rope_ref(orig[:, : nh * d].view(m, nh, d), pos)
    k_ref = rope_ref(orig[:, nh * d : (nh + nkv) * d].view(m, nkv, d), pos)
    close(qkv[:, : nh * d].view(m, nh, d), q_ref)
    close(k_cache[out_slots], k_ref)
    assert torch.equal(v_cache[out_slots], orig[:, (nh + nkv) * d :].view(m, nkv, d))
    untouched = torch.ones(slots, dtype=torch.bool)
    untouched[out_slots] = False
    assert k_cache[untouched].abs().sum() == 0 and v_cache[untouched].abs().sum() == 0


@pytest.mark.parametrize("d", [64, 128, 32])
@pytest.mark.parametrize("nh, nkv", [(9, 3), (4, 4), (8, 1)])
def test_decode_attention_paged_gqa(d, nh, nkv):
    g = torch.Generator().manual_seed(d + nh)
    num_slots = 600
    k_cache = torch.randn(num_slots, nkv, d, generator=g).to(BF)
    v_cache = torch.randn(num_slots, nkv, d, generator=g).to(BF)
    lens = [1, 37, 130, 5]
    perm = torch.randperm(num_slots - 1, generator=g) + 1  # scattered slots, never slot 0
    seqs, start = [], 0
    for n in lens:
        seqs.append(perm[start : start + n])
        start += n
    table = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=0)
    q = torch.randn(len(lens), nh, d, generator=g).to(BF)
    scale = d**-0.5
    got = cd.decode_attention(q, k_cache, v_cache, table, torch.tensor(lens), scale)
    for i, s in enumerate(seqs):
        k = k_cache[s].float().transpose(0, 1)  # [nkv, L, d]
        v = v_cache[s].float().transpose(0, 1)
        qi = q[i].float().view(nkv, nh // nkv, d)
        ref = F.scaled_dot_product_attention(qi, k, v, scale=scale).reshape(nh * d)
        close(got[i], ref)


@pytest.mark.parametrize("m, i", [(1, 1536), (4, 40)])
def test_silu_mul(m, i):
    g = torch.Generator().manual_seed(i)
    gu = (3 * torch.randn(m, 2 * i, generator=g)).to(BF)
    got = cd.silu_mul(gu)
    ref = F.silu(gu[:, :i].float()) * gu[:, i:].float()
    close(got, ref)


def step_tables(seq_tokens, prefix=5, shared_prefix=False):
    """out_slots, table and lens of a step whose sequence i has seq_tokens[i] new tokens after `prefix`
    cached ones (distinct slots per sequence, or the same prefix slots for all): tokens of a sequence are
    consecutive, each reading its sequence's slots up to its own."""
    slots, rows, lens, free = [], [], [], iter(range(100, 10_000))
    for n in seq_tokens:
        cached = (
            list(range(1, prefix + 1)) if shared_prefix else [next(free) for _ in range(prefix)]
        )
        new = [next(free) for _ in range(n)]
        for j in range(n):
            slots.append(new[j])
            rows.append(cached + new)
            lens.append(prefix + j + 1)
    width = max(map(len, rows))
    table = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    return torch.tensor(slots), table, torch.tensor(lens)


@pytest.mark.parametrize(
    "seq_tokens, threads, bounds",
    [
        ([1] * 16, 2, [0, 8, 16]),  # decode rows: an even split
        ([1] * 7, 2, [0, 3, 7]),
        ([1] * 16, 3, [0, 5, 10, 16]),
        ([3, 13], 2, [0, 3, 16]),  # a verify step: a sequence's tokens read each other's K/V slots
        ([6, 4, 6], 2, [0, 6, 16]),  # 8 splits a sequence; 6 and 10 are as near, the earlier wins
        ([16], 2, [0, 16, 16]),  # one sequence: one thread
        ([1] * 4, 1, [0, 4]),
    ],
)
def test_token_bounds_keep_sequences_together(seq_tokens, threads, bounds):
    """The fused forward gives each thread a slice of the step's tokens and runs them without barriers:
    a slice must not read a K/V slot another slice writes in the step."""
    assert cd.token_bounds(threads, *step_tables(seq_tokens)) == bounds


def test_token_bounds_split_sequences_sharing_a_cached_prefix():
    # 16 requests with one prompt share its cached slots: they only read each other's old slots.
    assert cd.token_bounds(2, *step_tables([1] * 16, shared_prefix=True)) == [0, 8, 16]


def test_token_bounds_refuses_lens_past_the_table():
    slots, table, lens = step_tables([1, 1])
    with pytest.raises(RuntimeError, match="lens must lie"):
        cd.token_bounds(2, slots, table, lens + table.shape[1])


# --- the fused decode path inside the ModelRunner ---------------------------------------------------

TINY = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 256,
    "hidden_size": 128,
    "intermediate_size": 320,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
    "rope_theta": 10000.0,
    "eos_token_id": 2,
}


def write_model(folder, config):
    """config.json + random safetensors weights, scaled so logits are spread (decisive greedy choices)."""
    from safetensors.torch import save_file

    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    g = torch.Generator().manual_seed(0)
    h, inter = config["hidden_size"], config["intermediate_size"]
    d = h // config["num_attention_heads"]
    nkv = config["num_key_value_heads"]
    bias = config["model_type"] == "qwen2"

    def rnd(*shape, std):
        return (torch.randn(*shape, generator=g) * std).to(BF)

    tensors = {
        "model.embed_tokens.weight": rnd(config["vocab_size"], h, std=1.0),
        "model.norm.weight": (1 + rnd(h, std=0.1)).to(BF),
    }
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors[p + "input_layernorm.weight"] = (1 + rnd(h, std=0.1)).to(BF)
        tensors[p + "post_attention_layernorm.weight"] = (1 + rnd(h, std=0.1)).to(BF)
        for name, out in (("q", h), ("k", nkv * d), ("v", nkv * d)):
            tensors[p + f"self_attn.{name}_proj.weight"] = rnd(out, h, std=h**-0.5)
            if bias:
                tensors[p + f"self_attn.{name}_proj.bias"] = rnd(out, std=0.5)
        tensors[p + "self_attn.o_proj.weight"] = rnd(h, h, std=h**-0.5)
        tensors[p + "mlp.gate_proj.weight"] = rnd(inter, h, std=h**-0.5)
        tensors[p + "mlp.up_proj.weight"] = rnd(inter, h, std=h**-0.5)
        tensors[p + "mlp.down_proj.weight"] = rnd(h, inter, std=inter**-0.5)
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


def make_runner(folder, enabled: bool, monkeypatch):
    from radixserve.executor.runner import ModelRunner
    from tests.configs import runner_config

    monkeypatch.setenv("RADIXSERVE_CPU_DECODE_KERNELS", "1" if enabled else "0")
    cpu_decode.reset_for_tests()
    try:
        return ModelRunner(
            folder,
            runner_config(dtype="bfloat16", device="cpu", random_seed=0, max_total_tokens=2000),
        )
    finally:
        cpu_decode.reset_for_tests()


def run_greedy(runner, prompts, steps):
    """Prefill the prompts (torch path), then `steps` decode steps; slots of a sequence are scattered."""
    from radixserve.common.sampling import SamplingParams
    from radixserve.common.step import ContinuingRequest, NewRequest, StepInput

    greedy = SamplingParams(temperature=0.0)
    free = list(range(1, 1800))
    free = (
        free[1::2] + free[0::2]
    )  # odd slots first: prompts and decode tokens never get adjacent runs
    new = []
    for r, p in enumerate(prompts):
        new.append(NewRequest(f"r{r}", p, [free.pop() for _ in p], sampling=greedy))
    out = runner.step(StepInput(0, new_requests=new))
    tokens = [[o.token_id] for o in out.outputs]
    logits = []
    for s in range(steps):
        cont = [ContinuingRequest(f"r{r}", [free.pop(len(free) // 2)]) for r in range(len(prompts))]
        out = runner.step(StepInput(s + 1, continuing_requests=cont))
        for r, o in enumerate(out.outputs):
            tokens[r].append(o.token_id)
        logits.append(out.logits)
    return tokens, logits


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fast_decode_matches_torch_path(tmp_path, monkeypatch, arch):
    config = dict(TINY)
    if arch == "qwen2":
        config.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2")
    folder = write_model(tmp_path / arch, config)
    fast = make_runner(folder, True, monkeypatch)
    ref = make_runner(folder, False, monkeypatch)
    assert fast.fast_decode is not None and ref.fast_decode is None
    prompts = [[(7 * i + 3 * n) % 250 + 3 for i in range(n)] for n in (5, 33, 17)]
    for batch in (prompts, prompts[1:2]):  # several sequences of different lengths, and batch 1
        got_tokens, got_logits = run_greedy(fast, batch, 16)
        ref_tokens, ref_logits = run_greedy(ref, batch, 16)
        for a, b in zip(got_logits, ref_logits):
            close(a, b, 3e-2)
        assert got_tokens == ref_tokens
        fast.reset()
        ref.reset()


def test_fallback_when_build_fails(tmp_path, monkeypatch, caplog):
    def broken():
        raise RuntimeError("error: compiler exploded")

    folder = write_model(tmp_path / "m", TINY)
    monkeypatch.setattr(cpu_decode, "_build", broken)
    with caplog.at_level("WARNING"):
        runner = make_runner(folder, True, monkeypatch)
    assert runner.fast_decode is None
    assert any("compiler exploded" in r.getMessage() for r in caplog.records)
    tokens, _ = run_greedy(runner, [[5, 6, 7]], 3)  # the torch path serves decode
    assert len(tokens[0]) == 4
