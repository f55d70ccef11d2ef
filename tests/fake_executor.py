"""A deterministic stand-in for the executor, for tests and for running the scheduler without a model.

The "model" samples a token that depends only on the whole sequence so far, through a hash chain
kept in its fake KV memory: each written slot holds (position, token, hash of tokens 0..position).
Reading a prefix whose slots were overwritten or handed out in the wrong order breaks the chain
and raises, and a wrong prefix changes every later token, so scheduler bugs surface as errors or
as outputs that differ from an unconstrained run. It runs steps as the executor does: new requests
may carry a first prefill chunk that does not sample, continuing requests may run explicit
input_ids (later chunks), and only requests with sample set get an output. With page_size > 1 it
also checks the page layout of every slot written. A token_bitmask restricts the sample to the
tokens it allows, picked by the same hash (uniformly, over hashes). Steps are common/step.py's
StepInput; the servicer converts the executor's messages to it with common/step_convert.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc
import numpy as np

from radixserve.v1 import executor_pb2, executor_pb2_grpc
from radixserve.common.sampling import SamplingParams
from radixserve.common.step import (
    PromptLogprobRange,
    PromptLogprobs,
    SampledToken,
    StepInput,
    StepOutput,
    token_logprob,
)
from radixserve.common.step_convert import output_to_proto, step_from_proto
from radixserve.common.step_session import StepSessions, StepsOverStream

_MOD = (1 << 61) - 1


def fake_prompt_logprob(token_id: int) -> float:
    """The logprob FakeModel reports for prompt token token_id (any position)."""
    return -0.25 - (token_id % 8) / 8


def fake_prompt_logprobs(
    rid: str, r: PromptLogprobRange, input_ids: list[int], vocab_size: int
) -> PromptLogprobs:
    """FakeModel's prompt logprobs of a range: each target with fake_prompt_logprob and rank 1, and as
    top alternatives the target, then the ids after it, each one lower."""
    out = []
    for t in r.targets(input_ids):
        lp = fake_prompt_logprob(t)
        top = [((t + j) % vocab_size, lp - j) for j in range(r.top_logprobs_num)]
        out.append(token_logprob(t, lp, top, rank=1))
    return PromptLogprobs(rid, out)


def chain_hash(prev: int, token: int) -> int:
    return (prev * 1_000_003 + token + 1) % _MOD


def reference_tokens(prompt: list[int], n: int, vocab_size: int) -> list[int]:
    """What FakeModel generates for prompt, unconstrained and undisturbed: each token is the
    running hash of the sequence so far, modulo the vocabulary."""
    h = 0
    for t in prompt:
        h = chain_hash(h, t)
    out = []
    for _ in range(n):
        out.append(h % vocab_size)
        h = chain_hash(h, out[-1])
    return out


class FakeExecutorError(AssertionError):
    pass


def allowed_tokens(token_bitmask: bytes, vocab_size: int) -> np.ndarray:
    """The token ids a token_bitmask allows (bit j of little-endian int32 word i: token 32*i+j)."""
    bits = np.unpackbits(np.frombuffer(token_bitmask, dtype=np.uint8), bitorder="little")
    return np.flatnonzero(bits[:vocab_size])


@dataclass
class _ReqState:
    slots: list[int]
    kv_hash: int  # hash of every token with KV
    last_token: (
        int | None
    )  # sampled by the request's last step; None after a chunk that did not sample
    sampling: SamplingParams


@dataclass
class FakeModel:
    kv_slots: int
    vocab_size: int = 1000
    # With page_size > 1, also check that every request's slots are laid out by pages: token i at
    # offset i % page_size of a page, contiguous within the page.
    page_size: int = 1
    kv: dict[int, tuple[int, int, int]] = field(default_factory=dict)
    reqs: dict[str, _ReqState] = field(default_factory=dict)
    steps: list = field(default_factory=list)
    # The prompt logprobs of the last step's ranges (see fake_prompt_logprobs).
    prompt_logprobs: list[PromptLogprobs] = field(default_factory=list)

    def token_for(self, seq_hash: int) -> int:
        return seq_hash % self.vocab_size

    def step(self, plan: StepInput) -> list[tuple[str, int]]:
        """Run one plan; return (request_id, token_id) per sampling request, new requests first."""
        self.steps.append(plan)
        for rid in plan.finished_request_ids:
            self.reqs.pop(rid, None)
        live_slots = {s for st in self.reqs.values() for s in st.slots}
        written: list[int] = []
        outputs: list[tuple[str, int]] = []
        self.prompt_logprobs = []
        for req in plan.new_requests + plan.continuing_requests:
            if req.prompt_logprobs is not None:
                self.prompt_logprobs.append(
                    fake_prompt_logprobs(
                        req.request_id, req.prompt_logprobs, req.input_ids, self.vocab_size
                    )
                )
        for new in plan.new_requests:
            rid = new.request_id
            if rid in self.reqs:
                raise FakeExecutorError(f"new request {rid} is already live")
            if not new.input_ids:
                raise FakeExecutorError(f"new request {rid} has no input_ids")
            prefix = list(new.prefix_slots)
            st = _ReqState(prefix, self._read_prefix(rid, prefix), None, new.sampling)
            live_slots.update(prefix)
            self.reqs[rid] = st
            self._run(rid, st, list(new.input_ids), list(new.new_slots), live_slots, written)
            if new.sample:
                outputs.append((rid, self._sample(rid, st, new.token_bitmask)))
        for cont in plan.continuing_requests:
            rid = cont.request_id
            st = self.reqs.get(rid)
            if st is None:
                raise FakeExecutorError(f"continuing request {rid} is unknown")
            tokens = list(cont.input_ids)
            if not tokens:
                if st.last_token is None:
                    raise FakeExecutorError(f"{rid}: decode, but its last step sampled nothing")
                tokens = [st.last_token]
            self._run(rid, st, tokens, list(cont.new_slots), live_slots, written)
            if cont.sample:
                outputs.append((rid, self._sample(rid, st, cont.token_bitmask)))
        return outputs

    def _run(
        self,
        rid: str,
        st: _ReqState,
        tokens: list[int],
        slots: list[int],
        live_slots: set[int],
        written: list[int],
    ) -> None:
        """Write the KV of tokens at the request's next positions."""
        if len(slots) != len(tokens):
            raise FakeExecutorError(f"{rid}: {len(tokens)} tokens, {len(slots)} slots")
        for token, slot in zip(tokens, slots):
            self._check_page_layout(rid, st.slots, slot)
            st.kv_hash = chain_hash(st.kv_hash, token)
            self._write(slot, (len(st.slots), token, st.kv_hash), live_slots, written)
            st.slots.append(slot)
            live_slots.add(slot)
        st.last_token = None

    def _sample(self, rid: str, st: _ReqState, token_bitmask: bytes = b"") -> int:
        st.last_token = self.token_for(st.kv_hash)
        if token_bitmask:
            allowed = allowed_tokens(token_bitmask, self.vocab_size)
            if not len(allowed):
                raise FakeExecutorError(f"{rid}: the token_bitmask allows no token")
            st.last_token = int(allowed[st.kv_hash % len(allowed)])
        return st.last_token

    def _check_page_layout(self, rid: str, slots: list[int], slot: int) -> None:
        ps = self.page_size
        pos = len(slots)
        if ps == 1:
            return
        if slot % ps != pos % ps or (pos % ps and slot != slots[-1] + 1):
            raise FakeExecutorError(
                f"{rid}: slot {slot} for position {pos} breaks the page layout (page size {ps})"
            )

    def _read_prefix(self, rid: str, prefix: list[int]) -> int:
        h = 0
        for pos, slot in enumerate(prefix):
            entry = self.kv.get(slot)
            if entry is None:
                raise FakeExecutorError(f"{rid}: prefix slot {slot} was never written")
            kv_pos, token, kv_hash = entry
            if kv_pos != pos or chain_hash(h, token) != kv_hash:
                raise FakeExecutorError(
                    f"{rid}: prefix slot {slot} at position {pos} holds stale KV"
                )
            h = kv_hash
        return h

    def _write(self, slot: int, entry, live_slots: set[int], written: list[int]) -> None:
        if not 0 < slot < self.kv_slots:
            raise FakeExecutorError(f"slot {slot} outside 1..{self.kv_slots - 1}")
        if slot in live_slots:
            raise FakeExecutorError(f"slot {slot} is in use by a live request")
        if slot in written:
            raise FakeExecutorError(f"slot {slot} written twice in one step")
        written.append(slot)
        self.kv[slot] = entry


class FakeExecutorServicer(StepsOverStream, executor_pb2_grpc.ExecutorServicer):
    """The FakeModel behind the Executor gRPC interface."""

    def __init__(
        self,
        kv_slots: int = 512,
        vocab_size: int = 1000,
        context_length: int = 256,
        eos_token_ids: tuple[int, ...] = (),
        fail_steps: bool = False,
        page_size: int = 1,
    ):
        self.model = FakeModel(kv_slots, vocab_size, page_size=page_size)
        self.context_length = context_length
        self.eos_token_ids = eos_token_ids
        self.fail_steps = fail_steps  # answer Step with UNAVAILABLE (to test failure handling)
        self.fail_step_ids: set[int] = set()  # answer these steps with UNAVAILABLE
        self.sessions = (
            StepSessions()
        )  # as on the real executor: steps from the live session, in step_id order

    async def GetModelInfo(self, request, context):
        return executor_pb2.ExecutorModelInfo(
            architecture="FakeForCausalLM",
            model_path="fake",
            context_length=self.context_length,
            kv_slots=self.model.kv_slots,
            vocab_size=self.model.vocab_size,
            eos_token_ids=list(self.eos_token_ids),
            dtype="float32",
            device="cpu",
            kv_cache_dtype="float32",
            kv_bytes_per_token=64,
        )

    async def Step(self, request, context):
        session = await self.sessions.wait_turn(request, context)
        await session.order.done(request.step_id)
        if self.fail_steps or request.step_id in self.fail_step_ids:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "fake executor failure")
        try:
            outputs = self.model.step(step_from_proto(request))
        except FakeExecutorError as e:
            await context.abort(grpc.StatusCode.INTERNAL, str(e))
        return output_to_proto(
            StepOutput(
                request.step_id,
                [
                    SampledToken(
                        rid, token, -0.5 if self.model.reqs[rid].sampling.return_logprob else None
                    )
                    for rid, token in outputs
                ],
                forward_ms=0.0,
                prompt_logprobs=self.model.prompt_logprobs,
            )
        )

    async def Reset(self, request, context):
        session = await self.sessions.admit(request.session_id, context)
        await session.order.reset()
        return executor_pb2.ExecutorResetResponse(dropped=self._drop_requests())

    async def OpenSession(self, request, context):
        async def reset() -> int:
            return self._drop_requests()

        async for event in self.sessions.open(request, context, reset):
            yield event

    def _drop_requests(self) -> int:
        dropped = len(self.model.reqs)
        self.model.reqs.clear()
        return dropped
