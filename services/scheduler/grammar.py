"""Structured output: compiles a request's constraint (SamplingParams.constraint) with xgrammar and
tracks where its output stands in the grammar.

A GrammarBackend holds the tokenizer's vocabulary as xgrammar sees it and a GrammarCompiler, whose
own cache (LRU, bounded by GRAMMAR_CACHE_BYTES) keeps compiled grammars by their source text and
options, i.e. by (kind, spec): a schema sent again is not compiled again. It loads the tokenizer on
the first constrained request, so servers that never see one do not pay for it. Each constrained
request gets a RequestGrammar (an xgrammar GrammarMatcher) that the scheduler core asks for the
next token's bitmask and feeds every sampled token.

JSON is generated on one line, with ", " and ": " as the only whitespace (xgrammar's
any_whitespace=False): with free whitespace, small models tend to loop on newlines and spaces.
"""
from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass

import xgrammar as xgr
from transformers import PreTrainedTokenizerBase

from radixserve.v1 import common_pb2, executor_pb2
from radixserve.common.args import ServerArgs
from radixserve.tokenizer.core import load_tokenizer, tokenizer_folder

GRAMMAR_CACHE_BYTES = 256 << 20
COMPILE_THREADS = 4
# OpenAI's json_object: any JSON object (what SGLang compiles it to as well).
JSON_OBJECT_SCHEMA = '{"type": "object"}'
# xgrammar's C++ errors start "[hh:mm:ss] /path/file.cc:123: ", checks then "Check failed: (...) is false: ".
_XGRAMMAR_LOG_PREFIX = re.compile(r"^\[[^\]]*\] \S+:\d+: (Check failed: .*? is false: )?")


class InvalidConstraint(ValueError):
    """The constraint does not compile; the message is fit for the client."""


@dataclass(frozen=True)
class Constraint:
    kind: str  # "json_schema" | "regex" | "ebnf" | "json_object"
    spec: str  # "" for json_object

    @classmethod
    def of(cls, sampling: common_pb2.SamplingParams) -> Constraint | None:
        kind = sampling.WhichOneof("constraint")
        if kind is None:
            return None
        return cls(kind, "" if kind == "json_object" else getattr(sampling, kind))


class RequestGrammar:
    """One request's position in its grammar. Used from the scheduler's step loop only."""

    def __init__(self, compiled: xgr.CompiledGrammar, vocab_size: int):
        self._matcher = xgr.GrammarMatcher(compiled)
        self._bitmask = xgr.allocate_token_bitmask(1, vocab_size)

    def next_token_bitmask(self) -> bytes:
        """The tokens allowed next, in the executor's token_bitmask layout (little-endian int32
        words; bit j of word i allows token 32*i+j)."""
        self._matcher.fill_next_token_bitmask(self._bitmask)
        return self._bitmask[0].numpy().astype("<i4").tobytes()

    def accept(self, token_id: int) -> bool:
        """Advance past a sampled token; False (state unchanged) if the grammar forbids it."""
        return self._matcher.accept_token(token_id)

    @property
    def terminated(self) -> bool:
        """Whether the grammar is complete and its stop token (EOS) was accepted."""
        return self._matcher.is_terminated()


class GrammarBackend:
    """Compiles constraints against one tokenizer, loaded on first use. compile and matcher_for may
    run in worker threads (xgrammar compiles thread-safely)."""

    def __init__(self, load: Callable[[], PreTrainedTokenizerBase], vocab_size: int,
                 stop_token_ids: list[int]):
        """vocab_size is the model's (its logits width), which may exceed the tokenizer's;
        stop_token_ids (the model's EOS ids; empty: the tokenizer's) end a complete output."""
        self.load_tokenizer = load
        self.vocab_size = vocab_size
        self.stop_token_ids = list(stop_token_ids)
        self._compiler: xgr.GrammarCompiler | None = None
        self._lock = threading.Lock()

    @property
    def compiler(self) -> xgr.GrammarCompiler:
        with self._lock:
            if self._compiler is None:
                info = xgr.TokenizerInfo.from_huggingface(
                    self.load_tokenizer(), vocab_size=self.vocab_size,
                    stop_token_ids=self.stop_token_ids or None)
                self._compiler = xgr.GrammarCompiler(info, max_threads=COMPILE_THREADS,
                                                     cache_limit_bytes=GRAMMAR_CACHE_BYTES)
            return self._compiler

    def compile(self, constraint: Constraint) -> xgr.CompiledGrammar:
        compiler = self.compiler
        try:
            if constraint.kind == "json_schema":
                return compiler.compile_json_schema(constraint.spec, any_whitespace=False)
            if constraint.kind == "json_object":
                return compiler.compile_json_schema(JSON_OBJECT_SCHEMA, any_whitespace=False)
            if constraint.kind == "regex":
                return compiler.compile_regex(constraint.spec)
            if constraint.kind == "ebnf":
                return compiler.compile_grammar(constraint.spec)
        except RuntimeError as e:
            raise InvalidConstraint(f"invalid {constraint.kind}: {_client_message(e)}") from None
        raise InvalidConstraint(f"unknown constraint kind {constraint.kind!r}")

    def matcher_for(self, sampling: common_pb2.SamplingParams) -> RequestGrammar | None:
        """A fresh matcher for the request's constraint, or None when it has none."""
        constraint = Constraint.of(sampling)
        if constraint is None:
            return None
        return RequestGrammar(self.compile(constraint), self.vocab_size)


def grammar_backend(args: ServerArgs, model: executor_pb2.ExecutorModelInfo) -> GrammarBackend | None:
    """The scheduler's backend for the served model; None without a tokenizer."""
    if args.skip_tokenizer_init:
        return None
    return GrammarBackend(lambda: load_tokenizer(tokenizer_folder(args)), model.vocab_size,
                          list(model.eos_token_ids))


async def request_grammar(backend: GrammarBackend | None,
                          sampling: common_pb2.SamplingParams) -> RequestGrammar | None:
    """The request's matcher (None if unconstrained), compiled in a worker thread: a big schema
    takes a while, and the step loop must not stall meanwhile. Raises InvalidConstraint."""
    if sampling.WhichOneof("constraint") is None:
        return None
    if backend is None:
        raise InvalidConstraint("structured output needs the tokenizer (the server runs with "
                                "--skip-tokenizer-init)")
    return await asyncio.to_thread(backend.matcher_for, sampling)


def _client_message(error: RuntimeError) -> str:
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return _XGRAMMAR_LOG_PREFIX.sub("", first_line)
