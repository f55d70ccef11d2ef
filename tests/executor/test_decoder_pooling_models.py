"""Decoders served with --is-embedding: bare decoder stacks (LlamaModel, MistralModel, Qwen2Model)
and *ForCausalLM folders pooled by last token or mean as the folder says, and sequence classifiers
(reward models: *ForSequenceClassification) whose vector is their score head's output.

Each is checked against transformers on a tiny random model (fp32, atol 1e-5: the differences come
from op order), at the executor and through the gateway's /v1/embeddings and /v1/classify (the
real EmbeddingRunner behind a one-method scheduler, the fake tokenizer: one token per character).
"""

from __future__ import annotations

import json
import pathlib
from concurrent import futures

import grpc
import httpx
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers

from radixserve.v1 import scheduler_pb2, scheduler_pb2_grpc
from radixserve.common.args import ServerArgs
from radixserve.executor.embedding_runner import EmbeddingRunner
from radixserve.executor.models.pooling_heads import PoolingOnly, SequenceClassifier
from radixserve.executor.models.registry import get_model_class
from radixserve.executor.runner import ModelRunner
from radixserve.gateway.pipeline.classification import (
    CLASSIFY_NEEDS_EMBEDDING_SERVER,
    probabilities,
)
from radixserve.gateway.pipeline.embeddings import EMBEDDING_SERVER_ONLY
from tests.configs import runner_config
from tests.gateway.fakes import MESSAGES, MODEL, FakeBackends, RunningGateway

ATOL = 1e-5
VOCAB = 256
SEQUENCES = [[5, 17, 99, 3, 42, 8, 200], [7], [11, 12, 13, 250]]
LABELS = {0: "harmless", 1: "toxic", 2: "unsure"}

TINY = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    tie_word_embeddings=False,
)
MOE = dict(moe_intermediate_size=32, shared_expert_intermediate_size=64, num_experts=4)
CONFIG_CLASSES = {  # by architecture prefix, the longest first
    "Qwen2Moe": lambda **kw: transformers.Qwen2MoeConfig(
        **TINY, **MOE, num_experts_per_tok=2, **kw
    ),
    "Llama": lambda **kw: transformers.LlamaConfig(**TINY, **kw),
    "Mistral": lambda **kw: transformers.MistralConfig(**TINY, **kw),
    "Qwen2": lambda **kw: transformers.Qwen2Config(**TINY, **kw),
}


def save_hf(architecture: str, folder: pathlib.Path, **extra) -> torch.nn.Module:
    """A random HF `architecture` (e.g. "MistralModel") saved to folder, with wide random weights."""
    family = next(f for f in CONFIG_CLASSES if architecture.startswith(f))
    torch.manual_seed(0)
    config = CONFIG_CLASSES[family](**extra)
    model = getattr(transformers, architecture)(config).float().eval()
    with torch.no_grad():  # larger than the default init so that differences would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 1.0 if "embed" in name else 0.1)
    model.save_pretrained(folder)
    return model


def write_sentence_transformers_pooling(folder: pathlib.Path, mode_key: str) -> None:
    """modules.json: Transformer, Pooling (one legacy mode key), Normalize."""
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({mode_key: True}))
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {
            "idx": 1,
            "name": "1",
            "path": "1_Pooling",
            "type": "sentence_transformers.models.Pooling",
        },
        {
            "idx": 2,
            "name": "2",
            "path": "2_Normalize",
            "type": "sentence_transformers.models.Normalize",
        },
    ]
    (folder / "modules.json").write_text(json.dumps(modules))


def embedding_runner(folder: pathlib.Path) -> EmbeddingRunner:
    return EmbeddingRunner.from_args(
        ServerArgs(model_path=str(folder), is_embedding=True, dtype="float32", device="cpu")
    )


def hf_hidden(hf: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    base = hf if not hasattr(hf, "model") else hf.model
    with torch.no_grad():
        return base(torch.tensor([ids])).last_hidden_state[0]


# ---- decoder embeddings ----


@pytest.mark.parametrize(
    "architecture, pooling",
    [
        ("LlamaModel", None),  # no modules.json: last token, normalized
        ("MistralModel", None),
        ("Qwen2Model", None),
        ("MistralModel", "pooling_mode_mean_tokens"),
        ("Qwen2ForCausalLM", "pooling_mode_mean_tokens"),
        ("LlamaModel", "pooling_mode_lasttoken"),
    ],
)
def test_decoder_embeddings_match_hf_pooled_as_the_folder_says(architecture, pooling, tmp_path):
    hf = save_hf(architecture, tmp_path)
    if pooling:
        write_sentence_transformers_pooling(tmp_path, pooling)
    runner = embedding_runner(tmp_path)
    out = runner.embed(SEQUENCES)
    states = [hf_hidden(hf, ids) for ids in SEQUENCES]
    pooled = [s.mean(0) if pooling == "pooling_mode_mean_tokens" else s[-1] for s in states]
    assert out.normalized
    torch.testing.assert_close(
        out.vectors, F.normalize(torch.stack(pooled), dim=1), atol=ATOL, rtol=0
    )
    assert issubclass(get_model_class(architecture), PoolingOnly) == architecture.endswith("Model")


# ---- sequence classifiers (reward models) ----


@pytest.mark.parametrize(
    "architecture",
    [
        "LlamaForSequenceClassification",
        "Qwen2ForSequenceClassification",
        "MistralForSequenceClassification",
        "Qwen2MoeForSequenceClassification",  # any registered XForCausalLM, MoE too
    ],
)
def test_classifier_scores_are_hf_logits(architecture, tmp_path):
    hf = save_hf(architecture, tmp_path, num_labels=3)
    runner = embedding_runner(tmp_path)
    assert isinstance(runner.model, SequenceClassifier)
    out = runner.embed(SEQUENCES)
    with torch.no_grad():
        expected = torch.cat([hf(torch.tensor([ids])).logits for ids in SEQUENCES])
    assert not out.normalized and out.vectors.shape == (3, 3)
    torch.testing.assert_close(out.vectors, expected, atol=ATOL, rtol=0)


def test_pooling_only_models_refuse_to_generate(tmp_path):
    save_hf("Qwen2ForSequenceClassification", tmp_path, num_labels=2)
    with pytest.raises(ValueError, match="no LM head: serve it with --is-embedding"):
        ModelRunner(tmp_path, runner_config(dtype="float32", device="cpu", max_total_tokens=64))


def test_probabilities_softmax_over_labels_sigmoid_for_one():
    scores = np.array([[0.0, np.log(3.0)], [2.0, 2.0]], dtype=np.float32)
    np.testing.assert_allclose(probabilities(scores), [[0.25, 0.75], [0.5, 0.5]], atol=1e-7)
    np.testing.assert_allclose(probabilities(np.array([[0.0], [np.log(4.0)]])), [[0.5], [0.8]])


# ---- through the gateway ----


class RunnerScheduler(scheduler_pb2_grpc.SchedulerServicer):
    """A scheduler that embeds each request with a real EmbeddingRunner, in one executor call."""

    def __init__(self, runner: EmbeddingRunner):
        self.runner = runner

    def GetInfo(self, request, context):
        info = self.runner.model_info()
        return scheduler_pb2.SchedulerInfo(
            architecture=info.architecture,
            model_path=info.model_path,
            context_length=info.context_length,
            vocab_size=info.vocab_size,
            dtype=info.dtype,
        )

    def Embed(self, request, context):
        sequences = [list(s.ids) for s in request.sequences]
        out = self.runner.embed(sequences)
        return scheduler_pb2.SchedulerEmbedResponse(
            dimension=out.vectors.shape[1],
            embeddings=out.vectors.flatten().tolist(),
            normalized=out.normalized,
            prompt_tokens=sum(map(len, sequences)),
        )


class Served:
    """A gateway (--is-embedding unless told) over the fake tokenizer and `scheduler`."""

    def __init__(self, scheduler, **flags):
        self.backends = FakeBackends()
        if scheduler is not None:
            self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
            scheduler_pb2_grpc.add_SchedulerServicer_to_server(scheduler, self.server)
            port = self.server.add_insecure_port("127.0.0.1:0")
            self.server.start()
            self.backends.scheduler_addr = f"127.0.0.1:{port}"
            flags.setdefault("is_embedding", True)
        self.gateway = RunningGateway(self.backends, **flags)
        self.client = httpx.Client(base_url=self.gateway.base_url, timeout=30)

    def close(self):
        self.client.close()
        self.gateway.close()
        if hasattr(self, "server"):
            self.server.stop(0).wait()
        self.backends.stop()


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """(HF model, a gateway serving it): Llama reward model with named labels."""
    folder = tmp_path_factory.mktemp("classifier")
    hf = save_hf("LlamaForSequenceClassification", folder, id2label=LABELS)
    served = Served(RunnerScheduler(embedding_runner(folder)))
    yield hf, served.client
    served.close()


def hf_logits(hf, texts: list[str]) -> np.ndarray:
    with torch.no_grad():
        return torch.cat([hf(torch.tensor([[ord(c) for c in t]])).logits for t in texts]).numpy()


def test_classify_route_answers_hf_probabilities_and_labels(classifier):
    hf, client = classifier
    texts = ["Hi there", "you are wrong", "x"]
    expected = hf_logits(hf, texts)
    for path in ("/v1/classify", "/classify"):
        resp = client.post(path, json={"model": MODEL, "input": texts})
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["object"] == "list" and body["model"] == MODEL
        assert body["id"].startswith("classify-")
        tokens = sum(map(len, texts))
        assert body["usage"] == {
            "prompt_tokens": tokens,
            "total_tokens": tokens,
            "completion_tokens": 0,
            "prompt_tokens_details": None,
        }
        softmax = torch.softmax(torch.from_numpy(expected).double(), dim=1).numpy()
        assert [d["index"] for d in body["data"]] == [0, 1, 2]
        np.testing.assert_allclose([d["probs"] for d in body["data"]], softmax, atol=1e-5)
        assert [d["label"] for d in body["data"]] == [LABELS[int(i)] for i in expected.argmax(1)]
        assert {d["num_classes"] for d in body["data"]} == {3}
    one = client.post("/v1/classify", json={"input": "Hi there"}).json()["data"]
    np.testing.assert_allclose(one[0]["probs"], softmax[0], atol=1e-5)


def test_reward_scores_come_back_as_embeddings(classifier):
    hf, client = classifier
    texts = ["Hi there", "x"]
    resp = client.post("/v1/embeddings", json={"model": MODEL, "input": texts})
    assert resp.status_code == 200, resp.text
    got = np.array([d["embedding"] for d in resp.json()["data"]])
    np.testing.assert_allclose(got, hf_logits(hf, texts), atol=ATOL)
    # Raw scores are not unit vectors: they cannot be shortened.
    short = client.post("/v1/embeddings", json={"input": texts, "dimensions": 2})
    assert short.status_code == 400 and "not normalized" in short.json()["error"]["message"]


def error_of(resp, status: int) -> dict:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert error["type"] == "invalid_request_error"
    return error


def test_a_classifier_refuses_chat_and_bad_classify_bodies(classifier):
    _, client = classifier
    chat = client.post("/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES})
    assert error_of(chat, 400)["message"] == EMBEDDING_SERVER_ONLY
    assert (
        "must not be empty"
        in error_of(client.post("/v1/classify", json={"input": []}), 400)["message"]
    )
    assert (
        error_of(client.post("/v1/classify", json={"input": "x", "top_k": 2}), 400)["param"]
        == "top_k"
    )
    unknown = client.post("/v1/classify", json={"model": "other", "input": "x"})
    assert error_of(unknown, 404)["code"] == "model_not_found"


def test_classify_needs_a_classifier(tmp_path):
    save_hf("MistralModel", tmp_path)
    embedder = Served(RunnerScheduler(embedding_runner(tmp_path)))
    generator = Served(None)
    try:
        refused = error_of(embedder.client.post("/v1/classify", json={"input": "Hi"}), 400)
        assert (
            "no classification head" in refused["message"] and "MistralModel" in refused["message"]
        )
        assert embedder.client.post("/v1/embeddings", json={"input": "Hi"}).status_code == 200
        for path in ("/v1/classify", "/classify"):
            refused = error_of(generator.client.post(path, json={"input": "Hi"}), 400)
            assert refused["message"] == CLASSIFY_NEEDS_EMBEDDING_SERVER
    finally:
        embedder.close()
        generator.close()
