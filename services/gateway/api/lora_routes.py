"""Loading and unloading LoRA adapters at run time: SGLang's POST /load_lora_adapter and
/unload_lora_adapter and vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter, one body for both
({"lora_name", "lora_path"}). Unloading an adapter in use waits for its requests to end (new requests
naming it get 404 at once). Unknown adapter: 404 model_not_found; an adapter the executor cannot serve
(rank, targets, not a PEFT folder, --max-loaded-loras reached) or LoRA off: 400."""

from __future__ import annotations

from fastapi import APIRouter, Request

from radixserve.gateway.api.openai_routes import engine_of
from radixserve.gateway.api.protocol import Body, openapi_body
from radixserve.gateway.pipeline.sampling import parse_body

router = APIRouter()


class LoadLoraAdapterRequest(Body):
    lora_name: str
    lora_path: str
    ignored = {"load_inplace": "vLLM's reload flag: an adapter is loaded once (unload it first)"}


class UnloadLoraAdapterRequest(Body):
    lora_name: str
    ignored = {"lora_int_id": "vLLM's numeric id: adapters are named by lora_name"}


@router.post("/load_lora_adapter", openapi_extra=openapi_body(LoadLoraAdapterRequest))
@router.post("/v1/load_lora_adapter", openapi_extra=openapi_body(LoadLoraAdapterRequest))
async def load_lora_adapter(request: Request):
    engine = engine_of(request)
    body = parse_body(await request.body(), LoadLoraAdapterRequest)
    await engine.lora.load(body.lora_name, body.lora_path)
    return {
        "success": True,
        "message": f"LoRA adapter '{body.lora_name}' added successfully.",
        "loaded_adapters": dict(engine.lora.paths),
    }


@router.post("/unload_lora_adapter", openapi_extra=openapi_body(UnloadLoraAdapterRequest))
@router.post("/v1/unload_lora_adapter", openapi_extra=openapi_body(UnloadLoraAdapterRequest))
async def unload_lora_adapter(request: Request):
    engine = engine_of(request)
    body = parse_body(await request.body(), UnloadLoraAdapterRequest)
    await engine.lora.unload(body.lora_name)
    return {
        "success": True,
        "message": f"LoRA adapter '{body.lora_name}' removed successfully.",
        "loaded_adapters": dict(engine.lora.paths),
    }
