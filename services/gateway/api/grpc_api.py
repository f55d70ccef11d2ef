"""The public gRPC Gateway service (gateway.proto), sharing the engine with the REST API."""

from __future__ import annotations

import logging
import time

import grpc

from radixserve.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from radixserve.common.grpc_util import aio_server, bind
from radixserve.gateway.api.auth import grpc_interceptors
from radixserve.gateway.pipeline.engine import Engine
from radixserve.gateway.api.errors import ApiError, bad_request, grpc_status_for
from radixserve.gateway.api.media import MediaLimits, check_image_count, check_image_size
from radixserve.gateway.pipeline.generation import Cancellation, Delta, GenerationInput
from radixserve.gateway.pipeline.request_control import Deadline
from radixserve.gateway.telemetry.request_tracing import grpc_entry_span
from radixserve.common.sampling import SamplingParams, StoppingCriteria
from radixserve.gateway.pipeline.sampling import checked

log = logging.getLogger("radixserve.gateway.grpc")
FINISH_ENUMS = {
    "stop": common_pb2.FINISH_REASON_STOP,
    "length": common_pb2.FINISH_REASON_LENGTH,
    "abort": common_pb2.FINISH_REASON_ABORT,
}


def generation_input(
    request: gateway_pb2.GatewayGenerateRequest, limits: MediaLimits, lora: str = ""
) -> GenerationInput:
    """request as the engine takes it, its images checked against limits, run with LoRA adapter lora
    (the model checked already)."""
    kind = request.WhichOneof("prompt")
    if kind is None:
        raise bad_request("one of text, chat or input_ids is required", param="prompt")
    prompt = {
        "text": lambda: request.text,
        "chat": lambda: request.chat,
        "input_ids": lambda: list(request.input_ids.ids),
    }[kind]()
    # max_new_tokens 0: as many as the context leaves.
    sampling, stopping = checked(
        SamplingParams.from_proto(request.sampling), StoppingCriteria.from_proto(request.stopping)
    )
    return GenerationInput(
        prompt,
        sampling,
        stopping,
        list(request.stop),
        request.skip_special_tokens,
        request_id=request.request_id,
        prompt_param=kind,
        images=request_images(request, limits),
        lora_name=lora,
    )


def request_images(request: gateway_pb2.GatewayGenerateRequest, limits: MediaLimits) -> list[bytes]:
    """A text prompt's images (`images`), checked as the REST API checks its images: the count of
    the request's images (a chat's are in its content parts) and each one's size."""
    if request.images and request.WhichOneof("prompt") != "text":
        raise bad_request("images go with a text prompt (a chat's in its content parts)", "images")
    in_chat = [
        (part.image, f"chat.messages.{i}.content_parts.{j}.image")
        for i, message in enumerate(request.chat.messages)
        for j, part in enumerate(message.content_parts)
        if part.WhichOneof("part") == "image"
    ]
    where = [(data, f"images.{i}") for i, data in enumerate(request.images)] + in_chat
    check_image_count(len(where), limits, "images" if request.images else "chat")
    for data, param in where:
        check_image_size(data, limits, param)
    return list(request.images)


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, engine: Engine):
        self.engine = engine

    async def Generate(self, request, context: grpc.aio.ServicerContext):
        with grpc_entry_span("radixserve.v1.Gateway/Generate", context.invocation_metadata()):
            async for response in self._generate(request, context):
                yield response

    async def _generate(self, request, context: grpc.aio.ServicerContext):
        # --request-timeout as in the REST API: preparation past it is DEADLINE_EXCEEDED, generation past
        # it is aborted in the scheduler and ends with FINISH_REASON_ABORT.
        deadline = Deadline(self.engine.args.request_timeout, time.monotonic())
        cancellation = Cancellation()
        timer = None
        try:
            self.engine.check_sequences(1, "prompt")
            # lora_name, else model, may name a LoRA adapter; any other unknown name: model_not_found
            lora = await self.engine.lora.resolve(request.lora_name or request.model)
            prepared = await deadline.run(
                self.engine.prepare(
                    generation_input(request, MediaLimits.from_args(self.engine.args), lora)
                )
            )
            timer = deadline.arm(cancellation, prepared.request_id)
            stream = self.engine.stream(prepared, cancellation=cancellation)
            try:
                async for item in stream:
                    if isinstance(item, Delta):
                        yield gateway_pb2.GatewayGenerateResponse(
                            request_id=prepared.request_id,
                            text=item.text,
                            token_ids=item.token_ids,
                            logprobs=item.logprobs,
                            prompt_logprobs=item.prompt_logprobs,
                        )
                        continue
                    yield gateway_pb2.GatewayGenerateResponse(
                        request_id=prepared.request_id,
                        finish_reason=FINISH_ENUMS[item.reason],
                        usage=common_pb2.Usage(
                            prompt_tokens=item.prompt_tokens,
                            completion_tokens=item.completion_tokens,
                            cached_tokens=item.cached_tokens,
                        ),
                        matched_stop=item.matched if isinstance(item.matched, str) else "",
                    )
            finally:
                await stream.aclose()
        except ApiError as e:
            await context.abort(grpc_status_for(e.status), e.message)
        finally:
            if timer is not None:
                timer.cancel()

    async def ListModels(self, request, context):
        try:
            info = await self.engine.model_info()
        except ApiError as e:
            await context.abort(grpc_status_for(e.status), e.message)
        return gateway_pb2.GatewayListModelsResponse(
            models=[
                gateway_pb2.GatewayModel(
                    id=self.engine.served_name,
                    context_length=info.context_length,
                    root=info.model_path,
                )
            ]
        )

    async def Health(self, request, context):
        healthy, detail = await self.engine.health()
        return gateway_pb2.GatewayHealthResponse(healthy=healthy, detail=detail)


async def start_grpc_api(
    engine: Engine, addr: str, api_key: str | None = None
) -> tuple[grpc.aio.Server, int]:
    """Start the public gRPC server on addr (host:port); returns it and the bound port."""
    server = aio_server(grpc_interceptors(api_key), public=True)
    gateway_pb2_grpc.add_GatewayServicer_to_server(GatewayServicer(engine), server)
    port = bind(server, addr, public=True)
    await server.start()
    return server, port
