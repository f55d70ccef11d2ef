"""gRPC front of the tokenizer service: Encode, ApplyChatTemplate, GetInfo. Stateless.

Tokenizing is CPU work, so it runs in a worker thread and the event loop stays responsive.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable, TypeVar

import grpc

from radixserve.v1 import common_pb2, tokenizer_pb2, tokenizer_pb2_grpc
from radixserve.common import grpc_util
from radixserve.common.args import ServerArgs
from radixserve.common.grpc_security import install_from_args
from radixserve.common.multimodal import prompt_image_to_proto
from radixserve.common.log import setup_logging
from radixserve.tokenizer.conversation import conversation_from_proto
from radixserve.tokenizer.core import RenderedChat, TokenizerCore, tokenizer_folder
from radixserve.common.lifecycle import run_service, run_until_signalled

log = logging.getLogger("radixserve.tokenizer")
T = TypeVar("T")


async def run_in_thread_or_abort(
    context: grpc.aio.ServicerContext, fn: Callable[..., T], *args
) -> T:
    """fn(*args) in a worker thread; a ValueError ends the call with INVALID_ARGUMENT."""
    try:
        return await asyncio.to_thread(fn, *args)
    except ValueError as e:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))


def chat_result(r: RenderedChat) -> tokenizer_pb2.TokenizerChatResult:
    return tokenizer_pb2.TokenizerChatResult(
        prompt=r.prompt,
        ids=r.ids,
        images=[prompt_image_to_proto(i) for i in r.images],
        mrope_positions=r.mrope_positions,
        mrope_position_delta=r.mrope_position_delta,
    )


class TokenizerServicer(tokenizer_pb2_grpc.TokenizerServicer):
    def __init__(self, core: TokenizerCore):
        self.core = core

    async def Encode(self, request, context):
        if request.images:
            return await self._encode_with_images(request, context)
        results = await run_in_thread_or_abort(
            context, self.core.encode, list(request.texts), request.add_special_tokens
        )
        return tokenizer_pb2.TokenizerEncodeResponse(
            results=[common_pb2.TokenIds(ids=ids) for ids in results]
        )

    async def _encode_with_images(self, request, context):
        if len(request.images) != len(request.texts):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{len(request.images)} image lists for {len(request.texts)} texts",
            )

        def encode():
            return [
                self.core.with_images(text, list(images.images), request.add_special_tokens)
                if images.images
                else RenderedChat(text, self.core.encode([text], request.add_special_tokens)[0])
                for text, images in zip(request.texts, request.images)
            ]

        rendered = await run_in_thread_or_abort(context, encode)
        return tokenizer_pb2.TokenizerEncodeResponse(
            results=[common_pb2.TokenIds(ids=r.ids) for r in rendered],
            multimodal=[chat_result(r) for r in rendered],
        )

    async def ApplyChatTemplate(self, request, context):
        def render():
            return self.core.apply_chat_template(
                [conversation_from_proto(c) for c in request.conversations]
            )

        rendered = await run_in_thread_or_abort(context, render)
        return tokenizer_pb2.TokenizerChatResponse(results=[chat_result(r) for r in rendered])

    async def GetInfo(self, request, context):
        info = self.core.info()
        return tokenizer_pb2.TokenizerInfo(
            vocab_size=info.vocab_size,
            eos_token_ids=info.eos_token_ids,
            bos_token_id=info.bos_token_id,
            chat_template=info.chat_template,
            tokenizer_path=info.tokenizer_path,
            generation_defaults=info.generation_defaults.to_proto(),
        )


async def start_server(core: TokenizerCore, addr: str) -> tuple[grpc.aio.Server, int]:
    """Start serving core on addr ("host:0" picks a free port); returns the server and its port."""
    return await grpc_util.start_aio_server(
        tokenizer_pb2_grpc.add_TokenizerServicer_to_server, TokenizerServicer(core), addr
    )


async def serve(args: ServerArgs) -> None:
    install_from_args(args)
    folder = tokenizer_folder(args)
    core = await asyncio.to_thread(
        TokenizerCore, folder, args.chat_template, args.generation_config
    )
    log.info("loaded tokenizer from %s (vocab %d)", folder, core.info().vocab_size)
    log.info("sampling defaults of the generation config: %s", core.generation_defaults.as_dict())
    server, _ = await start_server(core, args.tokenizer_addr)
    log.info("tokenizer ready on %s", args.tokenizer_addr)
    await run_until_signalled(server)


def main(args: ServerArgs) -> int:
    setup_logging("tokenizer", args.log_level)
    return run_service(serve, args)
