"""EmbeddingRunner: the executor of an --is-embedding server. Token-id sequences in, one vector each out.

It loads the model like ModelRunner but allocates no KV pool (model_info reports 0 KV slots) and
runs no generation steps. Each Embed call is one forward over whole sequences:
- BERT-family encoders (models/bert.py) run a right-padded [B, L] batch with bidirectional attention;
- decoders (Llama, Qwen2, ...) run their usual flattened forward under NoCacheCausalBackend, which
  attends causally within each sequence and writes no K/V (so --attention-backend does not apply).
The hidden states are then pooled as pooling.PoolingConfig reads the model folder, except for a
sequence classifier (models/pooling_heads.py: reward models, *ForSequenceClassification): its
vector is its `score` head over the last token's hidden state, one raw score per label, not
normalized (what HF's `logits` holds).

The longest sequence accepted is the model's context length, lowered to sentence-transformers'
max_seq_length when the folder sets one: sentence-transformers would truncate longer inputs, and
rejecting them keeps every vector served equal to the reference's.
"""

from __future__ import annotations

import itertools
import os
import pathlib
import time
from dataclasses import dataclass

import torch
from torch.nn.utils.rnn import pad_sequence

from radixserve.common.args import ServerArgs
from radixserve.common.config import RunnerConfig
from radixserve.executor.attention.metadata import ExtendSeq, ForwardBatch, forward_context
from radixserve.executor.attention.no_cache import NoCacheCausalBackend
from radixserve.executor.model_config import ModelConfig, dtype_name, resolve_device
from radixserve.executor.models.bert import BertModel
from radixserve.executor.models.pooling_heads import SequenceClassifier
from radixserve.executor.pooling import PoolingConfig
from radixserve.executor.runner import ModelInfo, load_model
from radixserve.common.step import StepError, StepInput


class EmbedInputError(ValueError):
    """An Embed request that can never be served (empty, too long, token id outside the vocabulary)."""


@dataclass
class EmbedOutput:
    vectors: torch.Tensor  # [num_sequences, dimension] float32, on the CPU
    normalized: bool
    forward_ms: float


class EmbeddingRunner:
    def __init__(self, model_path: str | os.PathLike, settings: RunnerConfig):
        """model_path: the model's folder (settings.model_path resolved)."""
        self.device = resolve_device(settings.device)
        if self.device.type == "cpu":
            torch.set_num_threads(os.cpu_count() or 1)
        self.config = ModelConfig.load(
            pathlib.Path(model_path), settings.dtype, settings.context_length
        )
        self.model = load_model(
            self.config, self.device, settings.load_format, settings.random_seed
        )
        self.is_encoder = isinstance(self.model, BertModel)
        self.is_classifier = isinstance(self.model, SequenceClassifier)
        self.pooling = (
            PoolingConfig(("lasttoken",), normalize=False)
            if self.is_classifier
            else PoolingConfig.from_folder(self.config.path, self.is_encoder)
        )
        limits = [self.config.context_length, self.pooling.max_seq_length]
        if self.is_encoder:
            limits.append(self.model.max_tokens)
        self.context_length = min(n for n in limits if n)
        self.num_parameters = sum(p.numel() for p in self.model.parameters())
        self.attn_backend = NoCacheCausalBackend()

    @classmethod
    def from_args(cls, args: ServerArgs) -> "EmbeddingRunner":
        from radixserve.common.model_files import resolve_model_path

        folder = resolve_model_path(
            args.model_path,
            revision=args.revision,
            download_dir=args.download_dir,
            weights=args.load_format != "dummy",
        )
        return cls(folder, args)

    def model_info(self) -> ModelInfo:
        cfg = self.config
        return ModelInfo(
            cfg.architecture,
            str(cfg.path),
            self.context_length,
            0,
            cfg.vocab_size,
            list(cfg.eos_token_ids),
            dtype_name(cfg.dtype),
            str(self.device),
            self.num_parameters,
            kv_cache_dtype="",  # no KV cache
            kv_bytes_per_token=0,
        )

    def reset(self) -> int:
        return 0

    def launch(self, step: StepInput):
        raise StepError(
            "this executor serves embeddings (--is-embedding): it runs no generation steps"
        )

    step = launch

    def check(self, sequences: list[list[int]]) -> None:
        """Raise EmbedInputError unless every sequence can be embedded."""
        if not sequences:
            raise EmbedInputError("no sequences to embed")
        vocab = self.config.vocab_size
        for i, seq in enumerate(sequences):
            if not 1 <= len(seq) <= self.context_length:
                raise EmbedInputError(
                    f"sequence {i} has {len(seq)} tokens; embeddings take 1 to "
                    f"{self.context_length}"
                )
            bad = next((t for t in seq if not 0 <= t < vocab), None)
            if bad is not None:
                raise EmbedInputError(
                    f"sequence {i} holds token id {bad}, outside the vocabulary [0, {vocab})"
                )

    @torch.inference_mode()
    def embed(self, sequences: list[list[int]]) -> EmbedOutput:
        self.check(sequences)
        t0 = time.perf_counter()
        lengths = torch.tensor([len(s) for s in sequences], device=self.device)
        mask = (
            torch.arange(int(lengths.max()), device=self.device)[None, :] < lengths[:, None]
        ).long()
        hidden = self._encode(sequences, mask) if self.is_encoder else self._decode(sequences)
        vectors = self.pooling.pool(hidden, mask)
        if self.is_classifier:
            vectors = self.model.classify(vectors)
        vectors = vectors.cpu()
        return EmbedOutput(vectors, self.pooling.normalize, (time.perf_counter() - t0) * 1000)

    def _encode(self, sequences: list[list[int]], mask: torch.Tensor) -> torch.Tensor:
        ids = pad_sequence(
            [torch.tensor(s) for s in sequences],
            batch_first=True,
            padding_value=self.model.pad_token_id,
        ).to(self.device)
        return self.model(ids, mask)

    def _decode(self, sequences: list[list[int]]) -> torch.Tensor:
        """Hidden states [B, L, H], right-padded, of one causal forward over each sequence."""
        lengths = [len(s) for s in sequences]
        ids = torch.tensor([t for s in sequences for t in s], device=self.device)
        positions = torch.cat([torch.arange(n, device=self.device) for n in lengths])
        starts = [0, *itertools.accumulate(lengths[:-1])]
        batch = ForwardBatch(
            input_ids=ids,
            positions=positions,
            out_slots=ids.new_empty(0),
            extend_seqs=[ExtendSeq(s, n, 0) for s, n in zip(starts, lengths)],
            num_extend_tokens=ids.numel(),
            decode_lens=[],
            kv_pool=None,
            attn_backend=self.attn_backend,
        )
        with forward_context(batch):
            hidden = self.model(batch.input_ids, batch.positions)
        return pad_sequence(list(hidden.split(lengths)), batch_first=True)


def build_embedding_runner(args: ServerArgs) -> EmbeddingRunner:
    return EmbeddingRunner.from_args(args)
