"""Fake tokenizer, scheduler and detokenizer gRPC services for the gateway tests, and a Gateway over them.

Text is one token per character (id = code point). The fake scheduler streams OUTPUT_TEXT two
tokens per message and records which requests were cancelled by their caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections.abc import Sequence
from concurrent import futures

import grpc
import httpx

from radixserve.v1 import (
    common_pb2,
    detokenizer_pb2,
    detokenizer_pb2_grpc,
    scheduler_pb2,
    scheduler_pb2_grpc,
    tokenizer_pb2,
    tokenizer_pb2_grpc,
)

from radixserve.common.args import ServerArgs
from radixserve.detokenizer.stop_strings import scan_for_stops
from radixserve.gateway.server import Gateway

EOS_ID = 3
CONTEXT_LENGTH = 256
VOCAB_SIZE = 0x110000
MODEL_PATH = "/models/fake-model"
KV_BYTES_PER_TOKEN = 4096  # what the fake scheduler says of its executor's KV pool (fp8_e5m2)
OUTPUT_TEXT = "The quick brown fox jumps over the lazy dog. "
POISON = "☠"  # a prompt holding it is rejected by the fake scheduler with INVALID_ARGUMENT
EOS_MARKER = "EOS"  # a prompt holding it makes the fake scheduler emit EOS after EOS_AFTER tokens
EOS_AFTER = 5
FAIL_MARKER = "BOOM"  # a prompt holding it makes the fake scheduler fail with UNAVAILABLE after FAIL_AFTER tokens
FAIL_AFTER = 4
# A prompt holding it fails like FAIL_MARKER but as the executor's failure: on a Session, its error's failed_stage
# names the executor, and its message (EXECUTOR_FAILURE_MESSAGE) does not.
EXECUTOR_FAIL_MARKER = "CRASH"
EXECUTOR_FAILURE_MESSAGE = "step 3 lost its worker (connection reset)"
# A prompt holding SCRIPT_OPEN + text + SCRIPT_CLOSE makes the fake model say that text and then EOS
# (the last such span of the prompt counts): how tests script tool calls and answers.
SCRIPT_OPEN, SCRIPT_CLOSE = "⟦", "⟧"
# The fake model's logprob of a token asked for with token_ids_logprob, at every output position:
# ASKED_LOGPROBS' where listed, else ASKED_LOGPROB (all exact in float32).
ASKED_LOGPROB = -4.0
ASKED_LOGPROBS = {ord("Y"): -0.5, ord("N"): -1.5}
MODEL = "fake-model"  # the served model name of a RunningGateway
MESSAGES = [{"role": "user", "content": "Hi"}]


def encode(text: str) -> list[int]:
    return [ord(c) for c in text]


def render_chat(conv: common_pb2.ChatConversation) -> str:
    text = "".join(f"<{m.role}>{m.content}" for m in conv.messages)
    return text + ("<assistant>" if conv.add_generation_prompt else "")


class FakeTokenizer(tokenizer_pb2_grpc.TokenizerServicer):
    # What GetInfo reports as the model's generation_config.json sampling defaults (set before a gateway starts).
    generation_defaults: tokenizer_pb2.TokenizerGenerationDefaults | None = None

    def Encode(self, request, context):
        return tokenizer_pb2.TokenizerEncodeResponse(
            results=[common_pb2.TokenIds(ids=encode(t)) for t in request.texts]
        )

    def ApplyChatTemplate(self, request, context):
        results = []
        for conv in request.conversations:
            prompt = render_chat(conv)
            results.append(tokenizer_pb2.TokenizerChatResult(prompt=prompt, ids=encode(prompt)))
        return tokenizer_pb2.TokenizerChatResponse(results=results)

    def GetInfo(self, request, context):
        return tokenizer_pb2.TokenizerInfo(
            vocab_size=VOCAB_SIZE,
            eos_token_ids=[EOS_ID],
            bos_token_id=-1,
            chat_template="fake",
            tokenizer_path="/models/fake-tokenizer",
            generation_defaults=self.generation_defaults,
        )


def scripted_output(prompt_text: str) -> str | None:
    """The text between the prompt's last SCRIPT_OPEN and the SCRIPT_CLOSE after it, if any."""
    start = prompt_text.rfind(SCRIPT_OPEN)
    end = prompt_text.find(SCRIPT_CLOSE, start + 1)
    return None if start < 0 or end < 0 else prompt_text[start + 1 : end]


def output_token(i: int, prompt: list[int]) -> int:
    script = scripted_output("".join(map(chr, prompt))) if ord(SCRIPT_OPEN) in prompt else None
    if script is not None:
        return ord(script[i]) if i < len(script) else EOS_ID
    if EOS_MARKER in "".join(map(chr, prompt)) and i == EOS_AFTER:
        return EOS_ID
    return ord(OUTPUT_TEXT[i % len(OUTPUT_TEXT)])


class FakeScheduler(scheduler_pb2_grpc.SchedulerServicer):
    """adapters: LoRA on (2 adapters a batch) with these loaded, each from /adapters/<name>; none:
    LoRA off, as the real scheduler answers without --enable-lora."""

    def __init__(self, step_delay: float = 0.002, adapters: Sequence[str] = ()):
        self.step_delay = step_delay
        self.adapters = list(adapters)
        self.lock = threading.Lock()
        self.prompts: list[list[int]] = []
        self.started: list[str] = []
        self.cancelled: list[str] = []
        self.completed: list[str] = []
        self.active: set[str] = set()
        self.sessions = 0
        self.requests: dict[str, scheduler_pb2.SchedulerGenerateRequest] = {}  # by request id

    def _cached_tokens(self, ids: list[int]) -> int:
        best = 0
        for seen in self.prompts:
            n = 0
            while n < min(len(seen), len(ids)) and seen[n] == ids[n]:
                n += 1
            best = max(best, n)
        return min(best, len(ids) - 1)

    def Generate(self, request, context):
        rid, ids, sp, stop = (
            request.request_id,
            list(request.input_ids),
            request.sampling,
            request.stopping,
        )
        if POISON in "".join(map(chr, ids)):
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "the fake scheduler rejects this prompt"
            )
        if len(ids) + stop.max_new_tokens > CONTEXT_LENGTH:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "prompt too long")
        finished = threading.Event()

        def on_rpc_end():
            with self.lock:
                self.active.discard(rid)
                if not finished.is_set():
                    self.cancelled.append(rid)

        context.add_callback(on_rpc_end)
        with self.lock:
            cached = self._cached_tokens(ids)
            self.prompts.append(ids)
            self.requests[rid] = request
            self.started.append(rid)
            self.active.add(rid)
        usage = common_pb2.Usage(prompt_tokens=len(ids), cached_tokens=cached)
        pending: list[int] = []
        produced = 0
        while True:
            token = output_token(produced, ids)
            produced += 1
            pending.append(token)
            reason, matched = common_pb2.FINISH_REASON_UNSPECIFIED, 0
            if (token == EOS_ID and not stop.ignore_eos) or token in stop.stop_token_ids:
                reason, matched = common_pb2.FINISH_REASON_STOP, token
            elif produced >= stop.max_new_tokens:
                reason = common_pb2.FINISH_REASON_LENGTH
            if len(pending) < 2 and reason == common_pb2.FINISH_REASON_UNSPECIFIED:
                continue
            time.sleep(self.step_delay)
            if FAIL_MARKER in "".join(map(chr, ids)) and produced > FAIL_AFTER:
                finished.set()
                context.abort(grpc.StatusCode.UNAVAILABLE, "the fake scheduler lost its executor")
            if EXECUTOR_FAIL_MARKER in "".join(map(chr, ids)) and produced > FAIL_AFTER:
                finished.set()
                if isinstance(context, _SessionRequestContext):
                    raise _RequestAborted(
                        grpc.StatusCode.UNAVAILABLE,
                        EXECUTOR_FAILURE_MESSAGE,
                        scheduler_pb2.FAILED_STAGE_EXECUTOR,
                    )
                context.abort(grpc.StatusCode.UNAVAILABLE, EXECUTOR_FAILURE_MESSAGE)
            if not context.is_active():
                return
            usage.completion_tokens = produced
            msg = scheduler_pb2.SchedulerGenerateResponse(
                request_id=rid,
                token_ids=pending,
                finish_reason=reason,
                matched_stop_token_id=matched,
                usage=usage,
                logprobs=[fake_logprob(t, sp) for t in pending] if sp.return_logprob else [],
                prompt_logprobs=fake_prompt_logprobs(ids, sp) if produced <= 2 else [],
            )
            pending = []
            if reason != common_pb2.FINISH_REASON_UNSPECIFIED:
                finished.set()
                with self.lock:
                    self.completed.append(rid)
                yield msg
                return
            yield msg

    def Session(self, request_iterator, context):
        """Generate, multiplexed: each request runs Generate in a thread with a per-request context."""
        with self.lock:
            self.sessions += 1
        out: queue.Queue = queue.Queue()
        contexts: dict[str, _SessionRequestContext] = {}

        def run(msg):
            ctx = contexts[msg.request_id]
            try:
                for resp in self.Generate(msg, ctx):
                    out.put(scheduler_pb2.SchedulerSessionEvents(events=[resp]))
            except _RequestAborted as e:
                out.put(
                    scheduler_pb2.SchedulerSessionEvents(
                        errors=[
                            scheduler_pb2.SchedulerRequestError(
                                request_id=msg.request_id,
                                code=e.code.value[0],
                                message=e.details,
                                failed_stage=e.stage,
                            )
                        ]
                    )
                )
            finally:
                ctx.end()

        def read():
            try:
                for action in request_iterator:
                    kind = action.WhichOneof("action")
                    if kind in ("generate", "generate_group"):
                        msgs = (
                            [action.generate]
                            if kind == "generate"
                            else list(action.generate_group.requests)
                        )
                        for msg in msgs:
                            contexts[msg.request_id] = _SessionRequestContext()
                            threading.Thread(target=run, args=(msg,), daemon=True).start()
                    else:
                        for rid in action.abort.request_ids:
                            if rid in contexts:
                                contexts[rid].end()
            except grpc.RpcError:
                pass  # the gateway closed the stream

        threading.Thread(target=read, daemon=True).start()
        try:
            while context.is_active():
                try:
                    yield out.get(timeout=0.05)
                except queue.Empty:
                    pass
        finally:
            for ctx in list(contexts.values()):
                ctx.end()

    def GetInfo(self, request, context):
        with self.lock:
            running = len(self.active)
        return scheduler_pb2.SchedulerInfo(
            architecture="FakeForCausalLM",
            model_path=MODEL_PATH,
            context_length=CONTEXT_LENGTH,
            max_total_tokens=4096,
            free_tokens=4096,
            running_requests=running,
            eos_token_ids=[EOS_ID],
            dtype="float32",
            kv_cache_dtype="fp8_e5m2",
            kv_bytes_per_token=KV_BYTES_PER_TOKEN,
            config_json='{"schedule_policy": "fcfs"}',
            vocab_size=VOCAB_SIZE,
            max_loras_per_batch=2 if self.adapters else 0,
            lora_adapters=[
                scheduler_pb2.SchedulerLoraAdapter(name=name, path=f"/adapters/{name}")
                for name in self.adapters
            ],
        )

    def Abort(self, request, context):
        return scheduler_pb2.SchedulerAbortResponse()

    def FlushCache(self, request, context):
        with self.lock:
            self.prompts.clear()
        return scheduler_pb2.SchedulerFlushCacheResponse(freed_tokens=7)

    # Loading and unloading as a scheduler without LoRA (--enable-lora off) answers.
    def LoadLoraAdapter(self, request, context):
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, "LoRA is off")

    def UnloadLoraAdapter(self, request, context):
        context.abort(grpc.StatusCode.NOT_FOUND, f"LoRA adapter {request.name!r} is not loaded")


class _RequestAborted(Exception):
    def __init__(
        self, code: grpc.StatusCode, details: str, stage: int = scheduler_pb2.FAILED_STAGE_SCHEDULER
    ):
        self.code, self.details, self.stage = code, details, stage


class _SessionRequestContext:
    """The part of a grpc.ServicerContext that FakeScheduler.Generate uses, for one session request."""

    def __init__(self):
        self.active = True
        self.callbacks = []
        self.lock = threading.Lock()

    def abort(self, code, details):
        raise _RequestAborted(code, details)

    def add_callback(self, fn):
        self.callbacks.append(fn)

    def is_active(self) -> bool:
        return self.active

    def end(self) -> None:
        with self.lock:
            callbacks, self.callbacks, self.active = self.callbacks, [], False
        for fn in callbacks:
            fn()


def fake_logprob(token: int, sp: common_pb2.SamplingParams) -> common_pb2.TokenLogprob:
    top = [
        common_pb2.TopLogprob(token_id=token, logprob=-0.25),
        common_pb2.TopLogprob(token_id=ord("?"), logprob=-2.0),
    ]
    asked = [
        common_pb2.TopLogprob(token_id=t, logprob=ASKED_LOGPROBS.get(t, ASKED_LOGPROB))
        for t in sp.token_ids_logprob
    ]
    return common_pb2.TokenLogprob(
        token_id=token, logprob=-0.25, top=top[: sp.top_logprobs_num], token_ids_logprobs=asked
    )


def fake_prompt_logprob(position: int) -> float:
    """The fake scheduler's logprob of the prompt token at position (1, 2, ...)."""
    return -position / 8


def fake_prompt_logprobs(ids: list[int], sp: common_pb2.SamplingParams) -> list:
    """Prompt logprobs from max(prompt_logprob_start, 1) on, when asked: each token with
    fake_prompt_logprob and rank 2, and as top alternatives "e" (-0.0625), then the token itself."""
    if not sp.HasField("prompt_logprob_start"):
        return []
    out = []
    for j in range(max(sp.prompt_logprob_start, 1), len(ids)):
        top = [
            common_pb2.TopLogprob(token_id=ord("e"), logprob=-0.0625),
            common_pb2.TopLogprob(token_id=ids[j], logprob=fake_prompt_logprob(j)),
        ]
        out.append(
            common_pb2.TokenLogprob(
                token_id=ids[j],
                logprob=fake_prompt_logprob(j),
                rank=2,
                top=top[: sp.prompt_top_logprobs_num],
            )
        )
    return out


def decode_item(
    item: detokenizer_pb2.DetokenizerDecodeItem,
) -> detokenizer_pb2.DetokenizerDecodeResult:
    """One char per id; text that could start a stop string is held back until it is decided."""
    new_text = "".join(
        "" if (i == EOS_ID and item.skip_special_tokens) else ("<eos>" if i == EOS_ID else chr(i))
        for i in item.new_token_ids
    )
    full = item.state.held_text + new_text
    state = detokenizer_pb2.DetokenizerState(emitted_chars=item.state.emitted_chars)
    if item.stop_regex:  # the real scan, which owns stop regexes
        scan = scan_for_stops(full, list(item.stop), item.final, list(item.stop_regex))
        state.held_text = scan.held
        state.emitted_chars += len(scan.emit)
        return detokenizer_pb2.DetokenizerDecodeResult(
            request_id=item.request_id,
            text=scan.emit,
            state=state,
            stopped=scan.matched_stop is not None,
            matched_stop=scan.matched_stop or "",
        )
    hits = [(full.find(s), s) for s in item.stop if s and s in full]
    if hits:
        index, stop = min(hits)
        state.emitted_chars += index
        return detokenizer_pb2.DetokenizerDecodeResult(
            request_id=item.request_id,
            text=full[:index],
            state=state,
            stopped=True,
            matched_stop=stop,
        )
    hold = 0
    if not item.final:
        for s in item.stop:
            for k in range(min(len(s) - 1, len(full)), 0, -1):
                if full.endswith(s[:k]):
                    hold = max(hold, k)
                    break
    text = full[: len(full) - hold]
    state.held_text = full[len(full) - hold :]
    state.emitted_chars += len(text)
    return detokenizer_pb2.DetokenizerDecodeResult(
        request_id=item.request_id, text=text, state=state
    )


class SyncDecodeStream:
    """Detokenizer.DecodeStream for a servicer on a synchronous gRPC server: each request through
    self.Decode, answered in order (the real servicer's is asyncio)."""

    def DecodeStream(self, request_iterator, context):
        for request in request_iterator:
            yield self.Decode(request, context)


class FakeDetokenizer(SyncDecodeStream, detokenizer_pb2_grpc.DetokenizerServicer):
    def Decode(self, request, context):
        return detokenizer_pb2.DetokenizerDecodeResponse(
            results=[decode_item(i) for i in request.items]
        )


class FakeBackends:
    """The three fakes on ephemeral loopback ports (sync gRPC servers, independent of any event loop).
    tokenizer: another FakeTokenizer in its place; adapters: the scheduler's LoRA adapters."""

    def __init__(
        self,
        step_delay: float = 0.002,
        tokenizer: FakeTokenizer | None = None,
        adapters: Sequence[str] = (),
    ):
        self.tokenizer = tokenizer or FakeTokenizer()
        self.scheduler = FakeScheduler(step_delay, adapters)
        self.detokenizer = FakeDetokenizer()
        self.tokenizer_addr = self._serve(
            "tokenizer", tokenizer_pb2_grpc.add_TokenizerServicer_to_server, self.tokenizer
        )
        self.detokenizer_addr = self._serve(
            "detokenizer", detokenizer_pb2_grpc.add_DetokenizerServicer_to_server, self.detokenizer
        )
        self.scheduler_addr = self._serve(
            "scheduler", scheduler_pb2_grpc.add_SchedulerServicer_to_server, self.scheduler
        )

    def _serve(self, name, add, servicer) -> str:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=32))
        add(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        setattr(self, f"{name}_server", server)
        return f"127.0.0.1:{port}"

    def stop_scheduler(self) -> None:
        self.scheduler_server.stop(0).wait()

    def stop(self) -> None:
        for name in ("tokenizer", "scheduler", "detokenizer"):
            getattr(self, f"{name}_server").stop(0).wait()


@contextlib.asynccontextmanager
async def gateway_client(tokenizer_addr: str, scheduler_addr: str, detokenizer_addr: str, **flags):
    """A Gateway on free loopback ports (its gRPC API too) and an httpx client for it: yields (client, gateway)."""
    gateway = Gateway(
        ServerArgs(
            host="127.0.0.1",
            port=0,
            grpc_host="127.0.0.1",
            gateway_grpc_port=0,
            tokenizer_addr=tokenizer_addr,
            scheduler_addr=scheduler_addr,
            detokenizer_addr=detokenizer_addr,
            log_level="warning",
            **flags,
        )
    )
    await gateway.start()
    try:
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{gateway.http_port}", timeout=30
        ) as client:
            yield client, gateway
    finally:
        await gateway.stop()


class RunningGateway:
    """A Gateway over `backends` with its own event loop in a thread, for synchronous tests."""

    def __init__(self, backends: FakeBackends, **overrides):
        self.backends = backends
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        args = ServerArgs(
            host="127.0.0.1",
            port=0,
            grpc_host="127.0.0.1",
            gateway_grpc_port=0,
            tokenizer_addr=backends.tokenizer_addr,
            scheduler_addr=backends.scheduler_addr,
            detokenizer_addr=backends.detokenizer_addr,
            served_model_name=MODEL,
            log_level="warning",
            **overrides,
        )
        self.gateway = Gateway(args)
        self.run(self.gateway.start())
        self.base_url = f"http://127.0.0.1:{self.gateway.http_port}"
        self.grpc_addr = f"127.0.0.1:{self.gateway.grpc_port}"

    def run(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self):
        self.run(self.gateway.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def expected_output(n: int) -> str:
    return (OUTPUT_TEXT * (n // len(OUTPUT_TEXT) + 1))[:n]


def wait_until(predicate, timeout: float = 5.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()
