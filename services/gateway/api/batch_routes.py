"""OpenAI's Files and Batch APIs: /v1/files and /v1/batches."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Literal

from fastapi import APIRouter, FastAPI, File, Form, Query, Request, UploadFile
from fastapi.responses import FileResponse

from radixserve.common.args import ServerArgs
from radixserve.gateway.api.batch_runner import BatchRunner
from radixserve.gateway.api.errors import bad_request
from radixserve.gateway.api.file_store import (
    UPLOAD_PURPOSES,
    BatchStore,
    FileStore,
    default_storage_path,
    page,
)
from radixserve.gateway.api.protocol import Body, openapi_body
from radixserve.gateway.pipeline.sampling import parse_body

router = APIRouter()
MAX_METADATA_PAIRS = 16


def install(app: FastAPI, args: ServerArgs) -> None:
    """Adds the routes and the stores; the app's lifespan resumes and stops the runner."""
    root = Path(args.file_storage_path) if args.file_storage_path else default_storage_path()
    app.state.file_store = FileStore(root)
    app.state.batch_runner = BatchRunner(
        app, app.state.file_store, BatchStore(root), api_key=args.api_key
    )
    app.include_router(router)


def files_of(request: Request) -> FileStore:
    return request.app.state.file_store


def runner_of(request: Request) -> BatchRunner:
    return request.app.state.batch_runner


# ---- /v1/files ----


@router.post("/v1/files")
async def upload_file(request: Request, file: UploadFile = File(...), purpose: str = Form(...)):
    if purpose not in UPLOAD_PURPOSES:
        raise bad_request(f"purpose must be one of {', '.join(UPLOAD_PURPOSES)}", param="purpose")
    return await asyncio.to_thread(
        files_of(request).create, file.file, file.filename or "upload", purpose
    )


@router.get("/v1/files")
async def list_files(
    request: Request,
    purpose: str | None = None,
    limit: int = Query(10000, ge=1, le=10000),
    after: str | None = None,
    order: Literal["asc", "desc"] = "desc",
):
    files = files_of(request).list(purpose)
    return page(files if order == "desc" else files[::-1], limit, after)


@router.get("/v1/files/{file_id}")
async def get_file(file_id: str, request: Request):
    return files_of(request).get(file_id)


@router.get("/v1/files/{file_id}/content")
async def get_file_content(file_id: str, request: Request):
    store = files_of(request)
    store.get(file_id)
    return FileResponse(store.content_path(file_id), media_type="application/octet-stream")


@router.delete("/v1/files/{file_id}")
async def delete_file(file_id: str, request: Request):
    return files_of(request).delete(file_id)


# ---- /v1/batches ----


class CreateBatchBody(Body):
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None = None


@router.post("/v1/batches", openapi_extra=openapi_body(CreateBatchBody))
async def create_batch(request: Request):
    body = parse_body(await request.body(), CreateBatchBody)
    if body.metadata and len(body.metadata) > MAX_METADATA_PAIRS:
        raise bad_request(f"metadata holds at most {MAX_METADATA_PAIRS} pairs", param="metadata")
    return await runner_of(request).create(
        body.input_file_id, body.endpoint, body.completion_window, body.metadata
    )


@router.get("/v1/batches")
async def list_batches(
    request: Request, limit: int = Query(20, ge=1, le=100), after: str | None = None
):
    return page(runner_of(request).list(), limit, after)


@router.get("/v1/batches/{batch_id}")
async def get_batch(batch_id: str, request: Request):
    return runner_of(request).get(batch_id)


@router.post("/v1/batches/{batch_id}/cancel")
async def cancel_batch(batch_id: str, request: Request):
    return runner_of(request).cancel(batch_id)
