"""The request pipeline shared by the REST and gRPC APIs.

tokenize -> scheduler Generate stream -> detokenizer Decode per chunk -> Delta items, then a Finish.
Closing the stream (client gone, task cancelled, stop string matched) cancels the scheduler call,
which aborts the request and frees its KV in every stage.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc

from radixserve.v1 import (
    common_pb2,
    detokenizer_pb2,
    detokenizer_pb2_grpc,
    scheduler_pb2,
    tokenizer_pb2,
    tokenizer_pb2_grpc,
)
from radixserve.common.args import ServerArgs, replica_addrs
from radixserve.common.grpc_util import aio_channel
from radixserve.common.log import request_id as log_request_id
from radixserve.common.model_files import default_model_name
from radixserve.common.sampling import (
    MAX_TOKEN_ID,
    SamplingDefaults,
    SamplingParams,
    StoppingCriteria,
)
from radixserve.gateway.pipeline.lora_models import LoraModels
from radixserve.gateway.pipeline.decode_batcher import DecodeBatcher
from radixserve.gateway.pipeline.sampling import checked_prompt_logprobs
from radixserve.gateway.pipeline.dp_router import DataParallelRouter
from radixserve.gateway.pipeline.replicas import ReplicaSet, parse_addrs
from radixserve.gateway.pipeline.sampling import server_defaults
from radixserve.gateway.pipeline.embeddings import (
    EMBEDDING_SERVER_ONLY,
    GENERATION_SERVER_ONLY,
    EmbeddingBatch,
    check_lengths,
)
from radixserve.gateway.telemetry.request_telemetry import RequestTelemetry
from radixserve.gateway.pipeline.scheduler_replicas import SchedulerReplicas
from radixserve.gateway.pipeline.scheduler_session import (
    DuplicateRequestId,
    RequestFailed,
    SchedulerSession,
)
from radixserve.gateway.api.errors import ApiError, bad_request, from_grpc, from_status
from radixserve.gateway.telemetry.metrics import GatewayMetrics, client_interceptors
from radixserve.gateway.pipeline.generation import (
    Cancellation,
    Completion,
    Delta,
    Finish,
    GenerationInput,
    ServedModel,
    PreparedRequest,
)

log = logging.getLogger("radixserve.gateway.engine")

UNARY_TIMEOUT_S = 60.0
INFO_WAIT_S = 60.0
HEALTH_TIMEOUT_S = 20.0
HEALTH_INFO_TIMEOUT_S = 5.0
TOKEN_TEXT_CACHE_LIMIT = 500_000
FINISH_NAMES = {
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_ABORT: "abort",
}


def served_model_name(args: ServerArgs) -> str:
    if args.served_model_name:
        return args.served_model_name
    try:
        return default_model_name(
            args.model_path, revision=args.revision, download_dir=args.download_dir
        )
    except (OSError, ValueError):
        return os.path.basename(str(args.model_path or "").rstrip("/")) or "default"


@dataclass
class _Stubs:
    channels: list[grpc.aio.Channel]
    tokenizer: ReplicaSet  # used as a TokenizerStub: each call goes to one of the replicas
    scheduler: SchedulerReplicas  # used as a SchedulerStub over the data-parallel replicas
    detokenizer: ReplicaSet  # used as a DetokenizerStub


class Engine:
    def __init__(self, args: ServerArgs):
        self.args = args
        self.served_name = served_model_name(args)
        self.lora = LoraModels(self)  # LoRA adapters as model names
        self.metrics = GatewayMetrics(self.served_name) if args.enable_metrics else None
        self.uses_tokenizer = not args.skip_tokenizer_init
        self._stubs: _Stubs | None = None
        self._info: ServedModel | None = None
        self._info_lock: asyncio.Lock | None = None
        self._token_texts: dict[int, str] = {}
        # One batch in flight per detokenizer replica.
        self._decode_batcher = DecodeBatcher(
            lambda: self.stubs().detokenizer,
            UNARY_TIMEOUT_S,
            max_inflight=len(parse_addrs(args.detokenizer_addr)),
        )
        # Data parallelism (--dp-size): a Session stream per scheduler replica; the router picks one per request.
        self.scheduler_addrs = replica_addrs(args.scheduler_addr, args.dp_size)
        self.router = DataParallelRouter(len(self.scheduler_addrs), args.load_balance_method)
        self.sessions = [
            SchedulerSession(lambda i=i: self.stubs().scheduler.stub(i))
            for i in range(len(self.scheduler_addrs))
        ]

    # ---- connections and backend info ----

    def stubs(self) -> _Stubs:
        """Channels are made on first use, so they belong to the running event loop."""
        if self._stubs is None:
            a = self.args

            def channel_to(service: str):
                return lambda addr: aio_channel(addr, client_interceptors(self.metrics, service))

            tokenizer = ReplicaSet(
                parse_addrs(a.tokenizer_addr),
                tokenizer_pb2_grpc.TokenizerStub,
                channel_to("tokenizer"),
            )
            detokenizer = ReplicaSet(
                parse_addrs(a.detokenizer_addr),
                detokenizer_pb2_grpc.DetokenizerStub,
                channel_to("detokenizer"),
                self.metrics.exchange_observer("detokenizer") if self.metrics else None,
            )
            scheduler = SchedulerReplicas(
                self.scheduler_addrs, channel_to("scheduler"), self.router
            )
            self._stubs = _Stubs(
                [*tokenizer.channels, *scheduler.channels, *detokenizer.channels],
                tokenizer,
                scheduler,
                detokenizer,
            )
        return self._stubs

    async def close(self) -> None:
        for session in self.sessions:
            await session.close()
        if self._stubs is not None:
            for channel in self._stubs.channels:
                await channel.close()
            self._stubs = None

    async def scheduler_info(self) -> scheduler_pb2.SchedulerInfo:
        try:
            return await self.stubs().scheduler.GetInfo(
                scheduler_pb2.SchedulerInfoRequest(), timeout=UNARY_TIMEOUT_S
            )
        except grpc.aio.AioRpcError as e:
            raise from_grpc(e, "scheduler") from None

    async def model_info(self, wait_s: float = INFO_WAIT_S) -> ServedModel:
        """Backend facts, fetched once; retries while the backends are still starting."""
        if self._info is not None:
            return self._info
        if self._info_lock is None:
            self._info_lock = asyncio.Lock()
        async with self._info_lock:
            if self._info is None:
                self._info = await self._fetch_info(wait_s)
                log.info(
                    "sampling defaults for what requests leave out: %s",
                    self._info.sampling_defaults.as_dict() or "the APIs' own",
                )
        return self._info

    async def _fetch_info(self, wait_s: float) -> ServedModel:
        deadline = asyncio.get_running_loop().time() + wait_s
        while True:
            try:
                return await self._fetch_info_once()
            except grpc.aio.AioRpcError as e:
                if asyncio.get_running_loop().time() >= deadline:
                    raise ApiError(
                        503, "the backend services are not ready", code="service_unavailable"
                    ) from None
                log.info("waiting for backends: %s", e.code().name)
                await asyncio.sleep(0.5)

    async def _fetch_info_once(self) -> ServedModel:
        stubs = self.stubs()
        sched = await stubs.scheduler.GetInfo(scheduler_pb2.SchedulerInfoRequest(), timeout=5)
        tok = None
        if self.uses_tokenizer:
            tok = await stubs.tokenizer.GetInfo(tokenizer_pb2.TokenizerInfoRequest(), timeout=5)
        context_length = sched.context_length or self.args.context_length or 0
        model_path = sched.model_path or str(self.args.model_path or "")
        return ServedModel(
            served_name=self.served_name,
            model_path=model_path,
            tokenizer_path=(tok.tokenizer_path if tok else "")
            or str(self.args.tokenizer_path or model_path),
            architecture=sched.architecture,
            context_length=context_length,
            vocab_size=sched.vocab_size or (tok.vocab_size if tok else 0),
            eos_token_ids=list(sched.eos_token_ids or (tok.eos_token_ids if tok else [])),
            has_chat_template=bool(tok and tok.chat_template),
            kv_cache_dtype=sched.kv_cache_dtype,
            kv_bytes_per_token=sched.kv_bytes_per_token,
            sampling_defaults=server_defaults(
                SamplingDefaults.from_proto(tok.generation_defaults) if tok else SamplingDefaults(),
                self.args,
            ),
        )

    # ---- preparing a request ----

    async def prepare(self, inp: GenerationInput) -> PreparedRequest:
        """Tokenize and validate; raises ApiError for anything the client must fix."""
        if self.args.is_embedding:
            raise bad_request(EMBEDDING_SERVER_ONLY)
        info = await self.model_info()
        input_ids, multimodal = await self._tokenize(
            inp.prompt, inp.prompt_param, info.vocab_size, inp.images
        )
        if not input_ids:
            raise bad_request("the prompt is empty", param=inp.prompt_param)
        if multimodal is not None and inp.truncate_prompt_tokens is not None:
            raise bad_request(
                "a prompt with images cannot be truncated", param="truncate_prompt_tokens"
            )
        if inp.truncate_prompt_tokens is not None:
            input_ids = truncated_prompt(input_ids, inp.truncate_prompt_tokens, info.context_length)
        for param, ids in (
            ("logit_bias", inp.sampling.logit_bias),
            ("token_ids_logprob", inp.sampling.token_ids_logprob),
        ):
            outside = sorted(t for t in ids if info.vocab_size and t >= info.vocab_size)
            if outside:
                raise bad_request(
                    f"{param} names token id {outside[0]}, outside the vocabulary [0, {info.vocab_size})",
                    param=param,
                    code="invalid_value",
                )
        request_id = inp.request_id or uuid.uuid4().hex
        prompt_len = len(input_ids)
        room = info.context_length - prompt_len if info.context_length else None
        requested = inp.stopping.max_new_tokens
        if room is not None and room < (requested or 1):
            completion = requested or inp.default_max_new_tokens or 1
            if multimodal is not None or not (
                self.args.allow_auto_truncate and completion < info.context_length
            ):
                completion = requested or 1
                where = "messages" if inp.prompt_param == "messages" else "prompt"
                raise bad_request(
                    f"This model's maximum context length is {info.context_length} tokens. However, you requested "
                    f"{prompt_len + completion} tokens ({prompt_len} in the {where}, {completion} in the "
                    f"completion). Please reduce the length of the {where} or completion.",
                    param=inp.prompt_param,
                    code="context_length_exceeded",
                )
            input_ids = input_ids[prompt_len - (info.context_length - completion) :]
            log.warning(
                "request %s: prompt of %d tokens truncated to its last %d (--allow-auto-truncate; context "
                "length %d, %d left for the completion)",
                request_id,
                prompt_len,
                len(input_ids),
                info.context_length,
                completion,
            )
            room = completion
        if not requested:
            defaults = [n for n in (inp.default_max_new_tokens, room) if n]
            if not defaults:
                raise bad_request(
                    "max_tokens is required: the context length is unknown", param="max_tokens"
                )
            requested = min(defaults)
        checked_prompt_logprobs(inp.sampling, len(input_ids))
        return PreparedRequest(
            request_id=request_id,
            input_ids=input_ids,
            sampling=inp.sampling,
            stopping=dataclasses.replace(inp.stopping, max_new_tokens=requested),
            stop=[s for s in inp.stop if s],
            skip_special_tokens=inp.skip_special_tokens,
            stop_regex=list(inp.stop_regex),
            multimodal=multimodal,
            lora_name=inp.lora_name,
        )

    async def _tokenize(
        self, prompt, param: str, vocab_size: int = 0, images: list[bytes] = ()
    ) -> tuple[list[int], tokenizer_pb2.TokenizerChatResult | None]:
        """The prompt's token ids, and its images as the tokenizer processed them (None: none)."""
        if isinstance(prompt, list):
            if images:
                raise bad_request("images need a text prompt, not token ids", param=param)
            limit = vocab_size or MAX_TOKEN_ID + 1
            bad = [t for t in prompt if not isinstance(t, int) or not 0 <= t < limit]
            if bad:
                raise bad_request(f"token id {bad[0]} is out of range [0, {limit})", param=param)
            return list(prompt), None
        if not self.uses_tokenizer:
            raise bad_request(
                "the server runs without a tokenizer (--skip-tokenizer-init): send token ids",
                param=param,
            )
        tokenizer = self.stubs().tokenizer
        try:
            if isinstance(prompt, str):
                resp = await tokenizer.Encode(
                    tokenizer_pb2.TokenizerEncodeRequest(
                        texts=[prompt],
                        add_special_tokens=True,
                        images=[tokenizer_pb2.TokenizerTextImages(images=images)] if images else [],
                    ),
                    timeout=UNARY_TIMEOUT_S,
                )
                result = resp.multimodal[0] if resp.multimodal else None
                return list(resp.results[0].ids), _with_images(result)
            resp = await tokenizer.ApplyChatTemplate(
                tokenizer_pb2.TokenizerChatRequest(conversations=[prompt]), timeout=UNARY_TIMEOUT_S
            )
            return list(resp.results[0].ids), _with_images(resp.results[0])
        except grpc.aio.AioRpcError as e:
            raise from_grpc(e, "tokenizer") from None

    # ---- generating ----

    def check_sequences(self, count: int, param: str, detail: str = "") -> None:
        """400 unless one request may ask for `count` sequences (prompts x n, embedding inputs): at most
        --max-request-sequences, and no more than --max-queued-requests (they are queued together, so more
        could never be admitted). Checked before any tokenization, so a huge fan-out costs nothing."""
        limit = self.args.max_request_sequences
        what = f"{count} sequences" + (f" ({detail})" if detail else "")
        if count > limit:
            raise bad_request(
                f"this request asks for {what}, more than the {limit} one request may have "
                f"(--max-request-sequences)",
                param=param,
                code="too_many_sequences",
            )
        queued = self.args.max_queued_requests
        if queued is not None and count > queued:
            raise bad_request(
                f"this request asks for {what}, more than the {queued} that may wait in the queue "
                f"(--max-queued-requests): it could never be admitted",
                param=param,
                code="too_many_sequences",
            )

    def open_streams(
        self,
        reqs: list[PreparedRequest],
        observed: bool = True,
        replica: int | None = None,
        cancellation: Cancellation | None = None,
    ) -> list["RequestStream"]:
        """Start requests on the scheduler together (the sequences of one API request: one data-parallel
        replica, one group that is queued all or none) and return one stream per request: Delta items, then
        exactly one Finish. Closing a stream aborts its request. cancellation.cancel() aborts them all (they
        finish with "abort"; if it was cancelled already they do so at once, never reaching the scheduler).
        observed=False (health probes): no metrics, span or request log. replica: the data-parallel replica
        (health probes); None: the router picks one (--load-balance-method)."""
        telemetries = [
            RequestTelemetry(req, self.served_name, self.metrics, self.args.log_requests, observed)
            for req in reqs
        ]
        if observed and len(reqs) > 1:
            log_request_id.set(reqs[0].request_id)
        if cancellation is not None and cancellation.cancelled:
            return [
                RequestStream(self, req, NotStarted(req.request_id), telemetry, None)
                for req, telemetry in zip(reqs, telemetries)
            ]
        if replica is None:
            replica = self.router.route(reqs[0].input_ids)
        else:
            self.router.pin(replica)
        for _ in reqs[1:]:
            self.router.pin(replica)
        session = self.sessions[replica]
        try:
            events = session.start_group(
                [
                    scheduler_pb2.SchedulerGenerateRequest(
                        request_id=req.request_id,
                        input_ids=req.input_ids,
                        sampling=req.sampling.to_proto(),
                        stopping=req.stopping.to_proto(),
                        trace_context=telemetry.trace_context,
                        **_multimodal_fields(req.multimodal),
                        lora_name=req.lora_name,
                    )
                    for req, telemetry in zip(reqs, telemetries)
                ]
            )
        except BaseException as e:
            for _ in reqs:
                self.router.finished(replica)
            error = (
                bad_request(str(e), param="rid", code="duplicate_request_id")
                if isinstance(e, DuplicateRequestId)
                else e
            )
            for telemetry in telemetries:
                telemetry.fail(error)
            raise error from None
        if cancellation is not None:
            cancellation.on_cancel(lambda: session.cancel(events))
        return [
            RequestStream(self, req, ev, telemetry, replica)
            for req, ev, telemetry in zip(reqs, events, telemetries)
        ]

    async def stream(
        self,
        req: PreparedRequest,
        observed: bool = True,
        replica: int | None = None,
        cancellation: Cancellation | None = None,
    ) -> AsyncIterator[Delta | Finish]:
        """Delta items, then exactly one Finish; closing the iterator aborts the request (see open_streams)."""
        [stream] = self.open_streams([req], observed, replica, cancellation)
        try:
            async for item in stream:
                yield item
        finally:
            await stream.aclose()

    async def _items(self, stream: "RequestStream") -> AsyncIterator[Delta | Finish]:
        req, events, telemetry = stream.request, stream.events, stream.telemetry
        state = detokenizer_pb2.DetokenizerState()
        generated = cached = 0
        try:
            async for msg in events:
                generated += len(msg.token_ids)
                if msg.HasField("usage"):
                    cached = msg.usage.cached_tokens
                done = msg.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED
                text, matched_stop = "", None
                shown = shown_ids(msg)
                if self.uses_tokenizer and (shown or (done and _has_pending_text(state))):
                    result = await self._decode(req, state, shown, done, telemetry)
                    state, text = result.state, result.text
                    if result.stopped:
                        matched_stop = result.matched_stop
                        generated -= drop_after_stop(msg, result.stop_token_count)
                telemetry.tokens(
                    len(msg.token_ids)
                )  # after detokenizing: TTFT as the client sees it
                if text or msg.token_ids:
                    last = done or matched_stop is not None
                    yield Delta(
                        text,
                        list(msg.token_ids),
                        list(msg.logprobs),
                        list(msg.prompt_logprobs),
                        last,
                    )
                if matched_stop is not None:
                    events.close()  # aborts the request in the scheduler and frees its KV
                    telemetry.finish("stop", generated, cached)
                    yield Finish("stop", matched_stop, len(req.input_ids), generated, cached)
                    return
                if done:
                    reason = FINISH_NAMES.get(msg.finish_reason, "abort")
                    matched = msg.matched_stop_token_id if reason == "stop" else None
                    telemetry.finish(reason, generated, cached)
                    yield Finish(reason, matched, len(req.input_ids), generated, cached)
                    return
        except RequestFailed as e:
            if e.code == grpc.StatusCode.UNAVAILABLE and stream.replica is not None:
                self.router.mark_unavailable(
                    stream.replica
                )  # the others take new requests for a while
            raise request_failure(e) from None
        finally:
            stream.close()

    async def _decode(
        self, req: PreparedRequest, state, new_ids, final: bool, telemetry: RequestTelemetry
    ):
        started = time.monotonic()
        result = await self._decode_batcher.decode(
            detokenizer_pb2.DetokenizerDecodeItem(
                request_id=req.request_id,
                state=state,
                new_token_ids=new_ids,
                stop=req.stop,
                stop_regex=req.stop_regex,
                skip_special_tokens=req.skip_special_tokens,
                final=final,
                trace_context=telemetry.decode_context(final),
            )
        )
        telemetry.decoded(time.monotonic() - started)
        return result

    async def complete(
        self,
        req: PreparedRequest,
        observed: bool = True,
        replica: int | None = None,
        cancellation: Cancellation | None = None,
    ) -> Completion:
        """Run a request to the end and collect its output (the arguments: as for open_streams)."""
        return await collect(self.stream(req, observed, replica, cancellation))

    async def detokenize(self, ids: list[int]) -> str:
        """The text of a token sequence, special tokens included ("" without a tokenizer)."""
        if not self.uses_tokenizer or not ids:
            return ""
        item = detokenizer_pb2.DetokenizerDecodeItem(
            request_id="detokenize", new_token_ids=ids, final=True, skip_special_tokens=False
        )
        try:
            resp = await self.stubs().detokenizer.Decode(
                detokenizer_pb2.DetokenizerDecodeRequest(items=[item]), timeout=UNARY_TIMEOUT_S
            )
        except grpc.aio.AioRpcError as e:
            raise from_grpc(e, "detokenizer") from None
        return resp.results[0].text

    async def token_texts(self, ids: list[int]) -> dict[int, str]:
        """The text of single tokens (for logprobs), special tokens included; cached."""
        missing = sorted({i for i in ids if i not in self._token_texts})
        if missing and self.uses_tokenizer:
            items = [
                detokenizer_pb2.DetokenizerDecodeItem(
                    request_id=str(i), new_token_ids=[i], final=True
                )
                for i in missing
            ]
            try:
                resp = await self.stubs().detokenizer.Decode(
                    detokenizer_pb2.DetokenizerDecodeRequest(items=items), timeout=UNARY_TIMEOUT_S
                )
            except grpc.aio.AioRpcError as e:
                raise from_grpc(e, "detokenizer") from None
            if len(self._token_texts) > TOKEN_TEXT_CACHE_LIMIT:
                self._token_texts.clear()
            for i, result in zip(missing, resp.results):
                self._token_texts[i] = result.text
        return {i: self._token_texts.get(i, "") for i in ids}

    # ---- embeddings (--is-embedding) ----

    async def embed(
        self, inputs: list[str] | list[list[int]], param: str = "input"
    ) -> EmbeddingBatch:
        """One vector per input, in order: texts are tokenized with the model's special tokens (BERT's
        [CLS] ... [SEP]), token-id lists are taken as they are. Raises ApiError."""
        if not self.args.is_embedding:
            raise bad_request(GENERATION_SERVER_ONLY)
        self.check_sequences(len(inputs), param, f"{len(inputs)} inputs")
        info = await self.model_info()
        if inputs and isinstance(inputs[0], str):
            sequences = await self._encode_texts(inputs, param)
        else:
            sequences = [(await self._tokenize(ids, param, info.vocab_size))[0] for ids in inputs]
        check_lengths(sequences, info.context_length, param)
        request = scheduler_pb2.SchedulerEmbedRequest(
            sequences=[common_pb2.TokenIds(ids=s) for s in sequences]
        )
        try:
            return EmbeddingBatch.from_proto(
                await self.stubs().scheduler.Embed(request, timeout=UNARY_TIMEOUT_S)
            )
        except grpc.aio.AioRpcError as e:
            raise from_grpc(e, "scheduler") from None

    async def encode(
        self, texts: list[str], param: str, add_special_tokens: bool = True
    ) -> list[list[int]]:
        """Token ids of each text (/tokenize; a 400 without a tokenizer)."""
        return await self._encode_texts(texts, param, add_special_tokens)

    async def render_chat(self, conversation: common_pb2.ChatConversation) -> tuple[str, list[int]]:
        """The chat template's prompt text and its ids (/tokenize)."""
        if not self.uses_tokenizer:
            raise bad_request(
                "the server runs without a tokenizer (--skip-tokenizer-init): send token ids",
                param="messages",
            )
        try:
            resp = await self.stubs().tokenizer.ApplyChatTemplate(
                tokenizer_pb2.TokenizerChatRequest(conversations=[conversation]),
                timeout=UNARY_TIMEOUT_S,
            )
        except grpc.aio.AioRpcError as e:
            raise from_grpc(e, "tokenizer") from None
        return resp.results[0].prompt, list(resp.results[0].ids)

    async def check_token_ids(self, ids: list[int], param: str) -> list[int]:
        """ids, or a 400 naming the first one outside the vocabulary."""
        return (await self._tokenize(list(ids), param, (await self.model_info()).vocab_size))[0]

    async def _encode_texts(
        self, texts: list[str], param: str, add_special_tokens: bool = True
    ) -> list[list[int]]:
        if not self.uses_tokenizer:
            raise bad_request(
                "the server runs without a tokenizer (--skip-tokenizer-init): send token ids",
                param=param,
            )
        try:
            resp = await self.stubs().tokenizer.Encode(
                tokenizer_pb2.TokenizerEncodeRequest(
                    texts=texts, add_special_tokens=add_special_tokens
                ),
                timeout=UNARY_TIMEOUT_S,
            )
        except grpc.aio.AioRpcError as e:
            raise from_grpc(e, "tokenizer") from None
        return [list(r.ids) for r in resp.results]

    # ---- health ----

    async def health(self, timeout: float = HEALTH_TIMEOUT_S) -> tuple[bool, str]:
        """A one-token generation through every stage, on every data-parallel replica at once: healthy when
        all of them are (a replica that is not is also left out of routing for a while). A replica fails at
        once while its scheduler reports its executor unavailable (a probe would wait in the queue until
        the executor is back)."""
        results = await asyncio.gather(
            *(self._replica_health(i, timeout) for i in range(len(self.sessions)))
        )
        failed = [(i, why) for i, why in enumerate(results) if why is not None]
        for i, why in enumerate(results):
            if why is None:
                self.router.mark_available(i)
            else:
                self.router.mark_unavailable(i)
        if not failed:
            return True, ""
        if len(self.sessions) == 1:
            return False, failed[0][1]
        return False, "; ".join(
            f"replica {i} ({self.scheduler_addrs[i]}): {why}" for i, why in failed
        )

    async def _replica_health(self, replica: int, timeout: float) -> str | None:
        """Why the replica is unhealthy, or None."""
        try:
            await asyncio.wait_for(self._health_probe(replica), timeout)
            return None
        except asyncio.TimeoutError:
            return f"no answer within {timeout:g}s"
        except ApiError as e:
            return e.message

    async def _health_probe(self, replica: int = 0) -> None:
        scheduler = self.stubs().scheduler.stub(replica)
        try:
            info = await scheduler.GetInfo(
                scheduler_pb2.SchedulerInfoRequest(), timeout=HEALTH_INFO_TIMEOUT_S
            )
        except grpc.aio.AioRpcError as e:
            raise from_grpc(e, "scheduler") from None
        if info.executor_unavailable:
            raise ApiError(
                503,
                "the executor service is unavailable (the scheduler waits for it to come back)",
                code="service_unavailable",
            )
        if self.args.is_embedding:
            ids = (await self._encode_texts(["ping"], "input"))[0] if self.uses_tokenizer else [0]
            request = scheduler_pb2.SchedulerEmbedRequest(sequences=[common_pb2.TokenIds(ids=ids)])
            try:
                await scheduler.Embed(request, timeout=UNARY_TIMEOUT_S)
            except grpc.aio.AioRpcError as e:
                raise from_grpc(e, "scheduler") from None
            return
        if self.uses_tokenizer:
            ids, _ = await self._tokenize("ping", "text")
        else:
            ids = [0]
        req = PreparedRequest(
            f"health-{uuid.uuid4().hex}",
            ids,
            SamplingParams(temperature=0),
            StoppingCriteria(max_new_tokens=1, ignore_eos=True),
            stop=[],
            skip_special_tokens=True,
        )
        result = await self.complete(
            req, observed=False, replica=replica
        )  # probes are not requests
        if result.finish is None or result.finish.reason == "abort" or not result.token_ids:
            raise ApiError(503, "the health probe produced no token")


class RequestStream:
    """One request's output (Engine.open_streams): iterate it for Delta items, then one Finish.
    close() or aclose() (either, any number of times) ends it: an unfinished request is aborted in the
    scheduler, its routing slot and telemetry are released."""

    def __init__(
        self,
        engine: Engine,
        req: PreparedRequest,
        events,
        telemetry: RequestTelemetry,
        replica: int | None,
    ):
        self.engine = engine
        self.request = req
        self.events = events  # RequestEvents, or NotStarted
        self.telemetry = telemetry
        self.replica = replica  # None: never routed (cancelled before it started)
        self._closed = False
        self._items = engine._items(self)

    def __aiter__(self):
        return self

    async def __anext__(self) -> Delta | Finish:
        return await self._items.__anext__()

    async def aclose(self) -> None:
        await self._items.aclose()
        self.close()

    def close(self) -> None:
        """Synchronous end, also for a stream never iterated (telemetry: an error being handled fails it)."""
        if self._closed:
            return
        self._closed = True
        self.events.close()
        if self.replica is not None:
            self.engine.router.finished(self.replica)
        self.telemetry.close()


class NotStarted:
    """The scheduler events of a request cancelled before it was sent: only an abort finish."""

    def __init__(self, request_id: str):
        self.request_id = request_id
        self.done = False

    def __aiter__(self):
        return self

    async def __anext__(self) -> scheduler_pb2.SchedulerGenerateResponse:
        if self.done:
            raise StopAsyncIteration
        self.done = True
        return scheduler_pb2.SchedulerGenerateResponse(
            request_id=self.request_id, finish_reason=common_pb2.FINISH_REASON_ABORT
        )

    def close(self) -> None:
        self.done = True


async def collect(stream: AsyncIterator[Delta | Finish]) -> Completion:
    """A stream's items as one Completion; the stream is closed at the end (or on error/cancel)."""
    texts, ids, logprobs, prompt_logprobs = [], [], [], []
    finish = None
    try:
        async for item in stream:
            if isinstance(item, Delta):
                texts.append(item.text)
                ids += item.token_ids
                logprobs += item.logprobs
                prompt_logprobs += item.prompt_logprobs
            else:
                finish = item
    finally:
        await stream.aclose()
    return Completion("".join(texts), ids, logprobs, finish, prompt_logprobs)


def _with_images(
    result: tokenizer_pb2.TokenizerChatResult | None,
) -> tokenizer_pb2.TokenizerChatResult | None:
    """result when it carries images or M-RoPE positions, else None; without its (large) prompt text."""
    if result is None or not (result.images or result.mrope_positions):
        return None
    result.ClearField("prompt")
    return result


def _multimodal_fields(result: tokenizer_pb2.TokenizerChatResult | None) -> dict:
    """The SchedulerGenerateRequest fields of a prompt's images."""
    if result is None:
        return {}
    return dict(
        images=result.images,
        mrope_positions=result.mrope_positions,
        mrope_position_delta=result.mrope_position_delta,
    )


def truncated_prompt(ids: list[int], keep: int, context_length: int) -> list[int]:
    """vLLM's truncate_prompt_tokens: the last `keep` prompt tokens (-1: the last context_length); 0,
    below -1 or more than the context length is a 400."""
    if keep == -1 and context_length:
        keep = context_length
    if keep < 1 or (context_length and keep > context_length):
        raise bad_request(
            f"truncate_prompt_tokens must be -1 or between 1 and the context length "
            f"({context_length}), got {keep}",
            param="truncate_prompt_tokens",
            code="invalid_value",
        )
    return ids[-keep:]


def request_failure(e: RequestFailed) -> ApiError:
    """The API error of a request the scheduler failed, naming the stage that failed it: the executor
    (it died, hung or raised while running the request's step) or the scheduler."""
    if e.stage == scheduler_pb2.FAILED_STAGE_EXECUTOR:
        return ApiError(
            503,
            "the executor service failed while running this request; retry it",
            code="service_unavailable",
        )
    return from_status(e.code, e.details, "scheduler")


def shown_ids(msg: scheduler_pb2.SchedulerGenerateResponse) -> list[int]:
    """The ids of a scheduler message whose text is output: all but the stop token (EOS or one of
    stop_token_ids) that ended the request, whose text (`</s>`, `<|im_end|>`, ...) is never shown,
    also when special tokens are kept (as SGLang and vLLM). Its id stays in the token ids."""
    ids = list(msg.token_ids)
    if (
        msg.finish_reason == common_pb2.FINISH_REASON_STOP
        and ids
        and ids[-1] == msg.matched_stop_token_id
    ):
        return ids[:-1]
    return ids


def drop_after_stop(msg: scheduler_pb2.SchedulerGenerateResponse, keep: int) -> int:
    """Cut msg's tokens (and their logprobs) after the first `keep`, those generated past the stop string
    the detokenizer matched (DetokenizerDecodeResult.stop_token_count; 0: keep all); the number cut. A
    message carries several tokens with --stream-interval N or speculative steps: the response is then
    what token-by-token streaming gives."""
    cut = len(msg.token_ids) - keep if 0 < keep < len(msg.token_ids) else 0
    if cut:
        del msg.token_ids[keep:]
        del msg.logprobs[keep:]
    return cut


def _has_pending_text(state: detokenizer_pb2.DetokenizerState) -> bool:
    return bool(state.held_text) or state.read_offset < len(state.window_ids)
