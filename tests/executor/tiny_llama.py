"""A tiny Llama (a config.json alone: ModelRunner loads it with dummy weights) for the executor tests."""

from radixserve.common.sampling import SamplingParams
from radixserve.common.step import NewRequest
from radixserve.executor.runner import ModelRunner
from tests.configs import runner_config

VOCAB = 128
TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
    "rope_theta": 10000.0,
    "eos_token_id": 2,
    "dtype": "bfloat16",
}


def new(rid, ids, slots, **kw):
    sampling = kw.pop("sampling", SamplingParams())
    return NewRequest(rid, ids, slots, sampling=sampling, **kw)


def cpu_runner(model_dir, max_total_tokens: int, **config) -> ModelRunner:
    """A float32 CPU runner (seed 0) of model_dir with a KV pool of max_total_tokens; this tiny Llama's
    folder (a config.json alone) wants load_format="dummy"."""
    return ModelRunner(
        model_dir,
        runner_config(
            dtype="float32",
            device="cpu",
            random_seed=0,
            max_total_tokens=max_total_tokens,
            **config,
        ),
    )
