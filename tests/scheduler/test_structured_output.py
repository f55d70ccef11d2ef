"""Structured output: xgrammar grammars compiled against the real SmolLM2 tokenizer, masks the
scheduler core sends, a fake model sampling at random among the allowed tokens, the gRPC scheduler,
and (e2e) the whole stack through the official openai client."""

from __future__ import annotations

import ast
import asyncio
import json
import re
import uuid
from collections import defaultdict, deque

import grpc
import jsonschema
import openai
import pytest

from radixserve.v1 import common_pb2, executor_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc
from radixserve.common.args import ServerArgs
from radixserve.common.grpc_util import aio_channel, aio_server, bind
from radixserve.common.model_files import resolve_model_path
from radixserve.gateway.api.errors import ApiError
from radixserve.gateway.api.native_routes import native_input
from radixserve.gateway.api.openai_routes import chat_input, completion_input
from radixserve.gateway.api.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    NativeGenerateRequest,
)
from radixserve.scheduler.core import Scheduler
from tests.configs import scheduler_config
from tests.fake_executor import (
    FakeExecutorServicer,
    FakeModel,
    allowed_tokens,
    reference_tokens as fake_reference_tokens,
)
from radixserve.scheduler.grammar import GrammarBackend, InvalidConstraint, request_grammar
from radixserve.common.sampling import SamplingParams, StoppingCriteria
from radixserve.common.step import SampledToken
from radixserve.scheduler.request import FinishReason, Request
from radixserve.scheduler.server import start_scheduler
from radixserve.tokenizer.core import load_tokenizer
from tests.stack import openai_client

VOCAB = 49152  # SmolLM2's
EOS = 2  # <|endoftext|>
PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "enum": ["ann", "bob"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "member": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 2},
    },
    "required": ["name", "age", "member"],
}
CODE_REGEX = r"(yes|no)-[0-9]{3}"
SUM_EBNF = 'root ::= sum\nsum ::= term ("+" term)*\nterm ::= [1-9] | "(" sum ")"'


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_model_path(None))


@pytest.fixture(scope="module")
def backend(tokenizer):
    return GrammarBackend(lambda: tokenizer, VOCAB, [EOS])


def sampling(**constraint) -> SamplingParams:
    return SamplingParams.from_proto(common_pb2.SamplingParams(**constraint))


def generate_request(
    rid: str, prompt: list[int], ignore_eos=False, **constraint
) -> scheduler_pb2.SchedulerGenerateRequest:
    return scheduler_pb2.SchedulerGenerateRequest(
        request_id=rid,
        input_ids=prompt,
        sampling=common_pb2.SamplingParams(**constraint),
        stopping=common_pb2.StoppingCriteria(max_new_tokens=64, ignore_eos=ignore_eos),
    )


# ---- grammar.py ------------------------------------------------------------------------------


def test_json_schema_mask_allows_a_brace_first_and_no_letters(backend, tokenizer):
    grammar = backend.matcher_for(sampling(json_schema=json.dumps(PERSON_SCHEMA)))
    allowed = allowed_tokens(grammar.next_token_bitmask(), VOCAB)
    assert len(allowed) > 0
    assert all(tokenizer.decode([t]).startswith("{") for t in allowed)
    for word in ["a", "name", "Hello", " {", "\n"]:
        [token] = tokenizer.encode(word, add_special_tokens=False)
        assert token not in allowed, word
    assert tokenizer.convert_tokens_to_ids("{") in allowed


def accepts_text(grammar, tokenizer, text: str) -> bool:
    return all(grammar.accept(t) for t in tokenizer.encode(text, add_special_tokens=False))


def test_json_object_takes_any_object_and_nothing_else(backend, tokenizer):
    grammar = backend.matcher_for(sampling(json_object=True))
    assert accepts_text(grammar, tokenizer, '{"a": [1, "x", {"b": null}]}')
    assert not grammar.terminated
    assert grammar.accept(EOS) and grammar.terminated
    assert not accepts_text(backend.matcher_for(sampling(json_object=True)), tokenizer, "[1]")


def test_second_compile_of_a_schema_is_a_cache_hit(backend):
    schema = json.dumps({"type": "object", "properties": {uuid.uuid4().hex: {"type": "integer"}}})
    before = backend.compiler.get_cache_size_bytes()
    first = backend.matcher_for(sampling(json_schema=schema))
    after_first = backend.compiler.get_cache_size_bytes()
    second = backend.matcher_for(sampling(json_schema=schema))
    assert after_first > before
    assert backend.compiler.get_cache_size_bytes() == after_first
    assert first.next_token_bitmask() == second.next_token_bitmask()


@pytest.mark.parametrize(
    "field, spec",
    [
        ("json_schema", "{not json"),
        ("json_schema", '{"type": 3}'),
        ("regex", "[a-"),
        ("ebnf", "root ::= undefined_rule"),
    ],
)
def test_constraints_that_do_not_compile_raise_a_client_message(backend, field, spec):
    with pytest.raises(InvalidConstraint, match=f"^invalid {field}: ") as caught:
        backend.matcher_for(sampling(**{field: spec}))
    assert "/cpp/" not in str(caught.value)


def test_no_backend_means_no_constraints():
    assert asyncio.run(request_grammar(None, sampling())) is None
    with pytest.raises(InvalidConstraint, match="needs the tokenizer"):
        asyncio.run(request_grammar(None, sampling(regex="a+")))


# ---- the scheduler core with a fake model that samples among the allowed tokens -------------


def reference_tokens(prompt: list[int], n: int) -> list[int]:
    return fake_reference_tokens(prompt, n, VOCAB)


class Harness:
    """Drives a core and a FakeModel; depth > 1 plans that many steps ahead, as overlap does. Checks
    that no plan samples a constrained request that a plan in flight already samples (its mask
    would miss that plan's token)."""

    def __init__(
        self, backend: GrammarBackend, pool_size=2048, depth=1, min_new_token_ratio=0.1, **core_args
    ):
        self.sched = Scheduler(
            scheduler_config(max_running_requests=16, **core_args),
            pool_size,
            context_length=512,
            eos_token_ids=[EOS],
            min_new_token_ratio=min_new_token_ratio,
        )
        self.model = FakeModel(pool_size, VOCAB)
        self.backend = backend
        self.depth = depth
        self.inflight: deque = deque()
        self.most_inflight = 0
        self.requests: dict[str, Request] = {}
        self.outputs: dict[str, list[int]] = defaultdict(list)
        self.finals = {}

    def add(
        self, rid: str, prompt: list[int], max_new=64, ignore_eos=False, **constraint
    ) -> Request:
        req = Request(rid, prompt, StoppingCriteria(max_new, ignore_eos=ignore_eos))
        req.grammar = self.backend.matcher_for(sampling(**constraint))
        self.sched.add_request(req)
        self.requests[rid] = req
        return req

    def step(self) -> bool:
        """Plan while fewer than depth steps are in flight, then update the oldest; False when idle."""
        while len(self.inflight) < self.depth and (plan := self.sched.schedule()) is not None:
            sampled_ahead = {rid for p, _ in self.inflight for rid in sampled_ids(p)}
            assert not masked_ids(plan) & sampled_ahead
            self.inflight.append((plan, self.model.step(plan)))
            self.most_inflight = max(self.most_inflight, len(self.inflight))
        if not self.inflight:
            return False
        plan, sampled = self.inflight.popleft()
        for ev in self.sched.update(plan, [SampledToken(rid, token) for rid, token in sampled]):
            self.outputs[ev.request_id] += ev.token_ids
            if ev.finished:
                self.finals[ev.request_id] = ev
        assert self.sched.check_leak(deep=True) is None
        return True

    def run(self, max_steps=2000) -> None:
        for _ in range(max_steps):
            if not self.step():
                break
        assert not self.sched.has_work()
        assert self.sched.check_leak(deep=True) is None

    def text(self, tokenizer, rid: str) -> str:
        """The output without its final EOS, as the detokenizer would show it."""
        ids = self.outputs[rid]
        assert ids[-1] == EOS, (rid, ids)
        return tokenizer.decode(ids[:-1])

    def assert_stopped_by_grammar(self, rid: str) -> None:
        final = self.finals[rid]
        assert (final.finish_reason, final.matched_stop_token_id) == (FinishReason.STOP, EOS), rid
        assert self.requests[rid].grammar is None


def sampled_ids(plan) -> set[str]:
    return {e.request_id for e in [*plan.new_requests, *plan.continuing_requests] if e.sample}


def masked_ids(plan) -> set[str]:
    return {
        e.request_id for e in [*plan.new_requests, *plan.continuing_requests] if e.token_bitmask
    }


def check_constrained_outputs(h: Harness, tokenizer, n: int) -> None:
    for i in range(n):
        for kind in ("json", "regex", "ebnf"):
            h.assert_stopped_by_grammar(f"{kind}{i}")
        jsonschema.validate(json.loads(h.text(tokenizer, f"json{i}")), PERSON_SCHEMA)
        assert re.fullmatch(CODE_REGEX, h.text(tokenizer, f"regex{i}"))
        assert eval_sum(h.text(tokenizer, f"ebnf{i}")) >= 1


def eval_sum(text: str) -> int:
    """The value of a SUM_EBNF sentence; raises if it is not one."""
    assert re.fullmatch(r"[1-9()+]+", text), text
    return eval(compile(ast.parse(text, mode="eval"), "<sum>", "eval"))


def add_mixed_batch(h: Harness, n: int) -> dict[str, list[int]]:
    """n requests of every constraint kind that random sampling finishes (the regex ones with
    ignore_eos), and n unconstrained ones; returns what the unconstrained ones must generate."""
    expected = {}
    for i in range(n):
        h.add(f"json{i}", [10 + i, 20], json_schema=json.dumps(PERSON_SCHEMA))
        h.add(f"regex{i}", [30 + i, 40], ignore_eos=True, regex=CODE_REGEX)
        h.add(f"ebnf{i}", [50 + i, 60], ebnf=SUM_EBNF)
        h.add(f"free{i}", [90 + i, 100], max_new=12, ignore_eos=True)
        expected[f"free{i}"] = reference_tokens([90 + i, 100], 12)
    return expected


@pytest.mark.parametrize(
    "core_args",
    [{}, {"chunked_prefill_size": 8, "enable_mixed_chunk": True}],
    ids=["plain", "chunked-mixed"],
)
def test_outputs_follow_their_grammars_and_stop_with_them(backend, tokenizer, core_args):
    h = Harness(backend, **core_args)
    expected_free = add_mixed_batch(h, 3)
    h.run()
    check_constrained_outputs(h, tokenizer, 3)
    for rid, tokens in expected_free.items():
        assert h.outputs[rid] == tokens
    assert not h.sched.needs_result_before_next_step()


def test_planning_ahead_never_sends_a_mask_that_misses_a_token(backend, tokenizer):
    h = Harness(backend, depth=2)
    expected_free = add_mixed_batch(h, 2)
    h.run()
    check_constrained_outputs(h, tokenizer, 2)
    for rid, tokens in expected_free.items():
        assert h.outputs[rid] == tokens
    assert h.most_inflight == 2


def test_needs_result_while_a_constrained_request_runs(backend):
    h = Harness(backend)
    h.add("free", [1, 2], max_new=4, ignore_eos=True)
    assert not h.sched.needs_result_before_next_step()
    h.add("json", [3, 4], json_schema=json.dumps(PERSON_SCHEMA))
    h.step()
    assert h.sched.needs_result_before_next_step()
    h.run()
    assert not h.sched.needs_result_before_next_step()


def test_retracted_requests_resume_their_grammar(backend, tokenizer):
    digits = r"[0-9]{30}"
    h = Harness(backend, pool_size=96, schedule_conservativeness=0.0, min_new_token_ratio=0.0)
    for i in range(5):
        h.add(f"r{i}", [5 + i] * 8, regex=digits)
    h.run()
    assert h.sched.num_retractions > 0
    for i in range(5):
        h.assert_stopped_by_grammar(f"r{i}")
        assert re.fullmatch(digits, h.text(tokenizer, f"r{i}"))


def test_abort_mid_generation_frees_everything(backend):
    h = Harness(backend)
    req = h.add("json", [1, 2, 3], json_schema=json.dumps(PERSON_SCHEMA))
    for _ in range(3):
        h.step()
    assert req.grammar is not None and h.outputs["json"]
    assert h.sched.abort("json").finish_reason == FinishReason.ABORT
    assert req.grammar is None
    h.run()
    assert not h.sched.needs_result_before_next_step()
    assert h.sched.stats().in_use == 0


def test_a_token_the_grammar_forbids_aborts_the_request(backend, tokenizer):
    h = Harness(backend)
    req = h.add("json", [1, 2, 3], json_schema=json.dumps(PERSON_SCHEMA))
    plan = h.sched.schedule()
    [letter] = tokenizer.encode("x", add_special_tokens=False)
    [event] = h.sched.update(plan, [SampledToken("json", letter)])
    assert event.finish_reason == FinishReason.ABORT
    assert req.grammar is None
    assert h.sched.check_leak(deep=True) is None


# ---- the gRPC scheduler with the fake executor -------------------------------------------------


async def collect(call) -> list:
    messages = []
    while (message := await call.read()) is not grpc.aio.EOF:
        messages.append(message)
    return messages


def test_scheduler_server_compiles_and_rejects(tokenizer):
    async def body():
        executor = FakeExecutorServicer(
            kv_slots=1024, vocab_size=VOCAB, context_length=256, eos_token_ids=(EOS,)
        )
        exec_server = aio_server()
        executor_pb2_grpc.add_ExecutorServicer_to_server(executor, exec_server)
        port = bind(exec_server, "127.0.0.1:0")
        await exec_server.start()
        scheduler = await start_scheduler(
            ServerArgs(scheduler_addr="127.0.0.1:0", executor_addr=f"127.0.0.1:{port}")
        )
        channel = aio_channel(f"127.0.0.1:{scheduler.port}")
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        try:

            def generate(rid, **constraint):
                return stub.Generate(generate_request(rid, [1, 2, 3], **constraint))

            json_call = generate("json", json_schema=json.dumps(PERSON_SCHEMA))
            json_out = [await json_call.read()]  # running: the free request decodes beside it
            free = asyncio.create_task(collect(generate("free", ignore_eos=True)))
            json_out += await collect(json_call)
            free_out = await free
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await collect(generate("bad", regex="(unclosed"))
            return executor.model.steps, json_out, free_out, caught.value
        finally:
            await channel.close()
            await scheduler.stop()
            await exec_server.stop(None)

    steps, json_out, free_out, error = asyncio.run(asyncio.wait_for(body(), timeout=60))
    ids = [t for m in json_out for t in m.token_ids]
    assert json_out[-1].finish_reason == common_pb2.FINISH_REASON_STOP and ids[-1] == EOS
    jsonschema.validate(json.loads(tokenizer.decode(ids[:-1])), PERSON_SCHEMA)
    assert [t for m in free_out for t in m.token_ids] == reference_tokens([1, 2, 3], 64)
    # Not overlapped while it ran: every decode step from its prefill to its last token sampled it.
    with_json = [i for i, plan in enumerate(steps) if "json" in sampled_ids(plan)]
    assert len(with_json) == len(ids)
    decodes_without_it = [
        plan
        for plan in steps[with_json[0] : with_json[-1]]
        if not plan.new_requests and "json" not in sampled_ids(plan)
    ]
    assert not decodes_without_it
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and error.details().startswith(
        "invalid regex: "
    )


def test_skip_tokenizer_init_rejects_constraints():
    async def body():
        executor = FakeExecutorServicer(kv_slots=256, vocab_size=VOCAB)
        exec_server = aio_server()
        executor_pb2_grpc.add_ExecutorServicer_to_server(executor, exec_server)
        port = bind(exec_server, "127.0.0.1:0")
        await exec_server.start()
        args = ServerArgs(
            scheduler_addr="127.0.0.1:0",
            executor_addr=f"127.0.0.1:{port}",
            skip_tokenizer_init=True,
        )
        scheduler = await start_scheduler(args)
        channel = aio_channel(f"127.0.0.1:{scheduler.port}")
        try:
            msg = generate_request("r", [1], regex="a")
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await collect(scheduler_pb2_grpc.SchedulerStub(channel).Generate(msg))
            return caught.value
        finally:
            await channel.close()
            await scheduler.stop()
            await exec_server.stop(None)

    error = asyncio.run(asyncio.wait_for(body(), timeout=30))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "needs the tokenizer" in error.details()


# ---- the gateway's request fields -------------------------------------------------------------


def chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest(messages=[{"role": "user", "content": "Hi"}], **fields)


def test_gateway_fills_the_constraint_from_each_api():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    json_format = {
        "type": "json_schema",
        "json_schema": {"name": "a", "schema": schema, "strict": True},
    }
    cases = [
        (chat_input(chat(response_format=json_format)), "json_schema", json.dumps(schema)),
        (chat_input(chat(response_format={"type": "json_object"})), "json_object", True),
        (chat_input(chat(response_format={"type": "text"})), None, None),
        (chat_input(chat(ebnf=SUM_EBNF)), "ebnf", SUM_EBNF),
        (completion_input(CompletionRequest(prompt="x", regex=CODE_REGEX)), "regex", CODE_REGEX),
        (
            completion_input(CompletionRequest(prompt="x", response_format=json_format)),
            "json_schema",
            json.dumps(schema),
        ),
        (
            native_input(
                NativeGenerateRequest(text="x", sampling_params={"json_schema": json.dumps(schema)})
            ),
            "json_schema",
            json.dumps(schema),
        ),
        (
            native_input(NativeGenerateRequest(text="x", sampling_params={"regex": CODE_REGEX})),
            "regex",
            CODE_REGEX,
        ),
    ]
    for inp, field, value in cases:
        sent = inp.sampling.to_proto()
        assert sent.WhichOneof("constraint") == field
        if field is not None:
            assert getattr(sent, field) == value


@pytest.mark.parametrize(
    "build, param",
    [
        (lambda: chat_input(chat(response_format={"type": "json_object"}, regex="a")), "regex"),
        (
            lambda: native_input(
                NativeGenerateRequest(text="x", sampling_params={"regex": "a", "ebnf": SUM_EBNF})
            ),
            "sampling_params.ebnf",
        ),
        (
            lambda: chat_input(
                chat(response_format={"type": "json_schema", "json_schema": {"name": "a"}})
            ),
            "response_format.json_schema",
        ),
        (lambda: chat_input(chat(response_format={"type": "yaml"})), "response_format.type"),
    ],
)
def test_gateway_rejects_conflicting_or_malformed_constraints(build, param):
    with pytest.raises(ApiError) as caught:
        build()
    assert (caught.value.status, caught.value.param) == (400, param)


# ---- end to end --------------------------------------------------------------------------------


@pytest.mark.e2e
def test_structured_output_through_the_openai_api(default_stack):
    schema = {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 20},
            # bounded: an unbounded integer let greedy decoding on one CPU repeat "1" up to max_tokens
            "population": {"type": "integer", "minimum": 0, "maximum": 99999999},
        },
        "required": ["city", "population"],
        "additionalProperties": False,
    }
    client = openai_client(default_stack)
    messages = [
        {"role": "user", "content": "Describe Paris as JSON with its city name and population."}
    ]
    resp = client.chat.completions.create(
        model="SmolLM2-135M-Instruct",
        messages=messages,
        temperature=0,
        max_tokens=80,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "city", "schema": schema, "strict": True},
        },
    )
    assert resp.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(resp.choices[0].message.content), schema)

    resp = client.completions.create(
        model="SmolLM2-135M-Instruct",
        prompt="The answer is",
        max_tokens=20,
        temperature=0.8,
        extra_body={"regex": CODE_REGEX},
    )
    assert re.fullmatch(CODE_REGEX, resp.choices[0].text)

    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="SmolLM2-135M-Instruct",
            messages=messages,
            max_tokens=10,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "bad", "schema": {"type": 3}},
            },
        )
    assert "invalid json_schema" in caught.value.message
