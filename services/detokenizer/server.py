"""gRPC front of the detokenizer service: Decode, for a batch of requests at a time.

Per-request state lives with the caller (the gateway), in DetokenizerState, sent with every call;
this process keeps none, so any replica can serve any call.
"""

from __future__ import annotations

import asyncio
import logging

import grpc
from transformers import PreTrainedTokenizerBase

from radixserve.v1 import detokenizer_pb2, detokenizer_pb2_grpc
from radixserve.common import grpc_util, tracing
from radixserve.common.args import ServerArgs
from radixserve.common.grpc_security import install_from_args
from radixserve.common.log import setup_logging
from radixserve.common.ordered_stream import answer_in_order
from radixserve.detokenizer.incremental import DecodeState, DecodeStep, decode_step
from radixserve.detokenizer.stop_strings import MAX_STOP_REGEXES, compile_stop_regex
from radixserve.tokenizer.core import load_tokenizer, tokenizer_folder
from radixserve.common.lifecycle import run_service, run_until_signalled

log = logging.getLogger("radixserve.detokenizer")


def state_from_proto(state: detokenizer_pb2.DetokenizerState) -> DecodeState:
    window = list(state.window_ids)
    if not 0 <= state.prefix_offset <= state.read_offset <= len(window):
        raise ValueError(
            f"bad DetokenizerState offsets: prefix {state.prefix_offset}, "
            f"read {state.read_offset}, window of {len(window)}"
        )
    return DecodeState(
        window, state.prefix_offset, state.read_offset, state.held_text, state.emitted_chars
    )


def state_to_proto(state: DecodeState) -> detokenizer_pb2.DetokenizerState:
    return detokenizer_pb2.DetokenizerState(
        window_ids=state.window_ids,
        prefix_offset=state.prefix_offset,
        read_offset=state.read_offset,
        held_text=state.held_text,
        emitted_chars=state.emitted_chars,
    )


# A batch of at most this many requests is decoded on the event loop: each takes ~0.1 ms, less than
# the hop to a worker thread and back (~0.2 ms of CPU per call, a stream's every token at batch 1).
# Larger batches go to a thread, so that the loop keeps serving other calls meanwhile.
INLINE_DECODE_MAX_ITEMS = 4


def decodes_inline(request: detokenizer_pb2.DetokenizerDecodeRequest) -> bool:
    return len(request.items) <= INLINE_DECODE_MAX_ITEMS


class DetokenizerServicer(detokenizer_pb2_grpc.DetokenizerServicer):
    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.tokenizer = tokenizer
        self.vocab_size = len(tokenizer)

    def _check_stop_regexes(self, patterns) -> None:
        if len(patterns) > MAX_STOP_REGEXES:
            raise ValueError(f"at most {MAX_STOP_REGEXES} stop regexes, got {len(patterns)}")
        for pattern in patterns:
            compile_stop_regex(pattern)

    def _check_ids(self, request_id: str, ids) -> None:
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(
                f"request {request_id!r}: token ids out of range [0, {self.vocab_size}): {bad[:5]}"
            )

    def _decode_item(
        self, item: detokenizer_pb2.DetokenizerDecodeItem
    ) -> detokenizer_pb2.DetokenizerDecodeResult:
        self._check_ids(item.request_id, item.new_token_ids)
        self._check_stop_regexes(item.stop_regex)
        step: DecodeStep = decode_step(
            self.tokenizer,
            state_from_proto(item.state),
            list(item.new_token_ids),
            list(item.stop),
            skip_special_tokens=item.skip_special_tokens,
            final=item.final,
            stop_regex=list(item.stop_regex),
        )
        return detokenizer_pb2.DetokenizerDecodeResult(
            request_id=item.request_id,
            text=step.text,
            state=state_to_proto(step.state),
            stopped=step.stopped,
            matched_stop=step.matched_stop,
            stop_token_count=step.stop_token_count,
        )

    def _decode_traced_item(self, item: detokenizer_pb2.DetokenizerDecodeItem):
        """_decode_item inside a `detokenize` span, when the item carries a trace context."""
        parent = tracing.context_from_proto(item.trace_context) if tracing.enabled() else None
        if parent is None:
            return self._decode_item(item)
        with tracing.tracer().start_as_current_span(
            "detokenize",
            context=parent,
            attributes={
                "radixserve.request_id": item.request_id,
                "radixserve.tokens": len(item.new_token_ids),
                "radixserve.final": item.final,
            },
        ) as span:
            result = self._decode_item(item)
            span.set_attributes(
                {"radixserve.text_chars": len(result.text), "radixserve.stopped": result.stopped}
            )
            return result

    def _decode_batch(self, request: detokenizer_pb2.DetokenizerDecodeRequest):
        decode = self._decode_traced_item if tracing.enabled() else self._decode_item
        return detokenizer_pb2.DetokenizerDecodeResponse(results=[decode(i) for i in request.items])

    async def Decode(self, request, context):
        try:
            if decodes_inline(request):
                return self._decode_batch(request)
            return await asyncio.to_thread(self._decode_batch, request)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))

    async def DecodeStream(self, request_iterator, context):
        async for answer in answer_in_order(self.Decode, request_iterator, context):
            yield answer


async def start_server(
    tokenizer: PreTrainedTokenizerBase, addr: str
) -> tuple[grpc.aio.Server, int]:
    """Start serving on addr ("host:0" picks a free port); returns the server and its port."""
    return await grpc_util.start_aio_server(
        detokenizer_pb2_grpc.add_DetokenizerServicer_to_server, DetokenizerServicer(tokenizer), addr
    )


async def serve(args: ServerArgs) -> None:
    install_from_args(args)
    folder = tokenizer_folder(args)
    tokenizer = await asyncio.to_thread(load_tokenizer, folder)
    log.info("loaded tokenizer from %s", folder)
    server, _ = await start_server(tokenizer, args.detokenizer_addr)
    log.info("detokenizer ready on %s", args.detokenizer_addr)
    await run_until_signalled(server)


def main(args: ServerArgs) -> int:
    setup_logging("detokenizer", args.log_level)
    return run_service(serve, args)
