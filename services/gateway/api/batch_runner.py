"""Runs /v1/batches in the background, sending each input line to this same app in process.

Going through the app (an in-process ASGI transport) reuses every endpoint's validation and response
format exactly. Each finished line is appended to the batch's progress file, so a batch interrupted by
a restart resumes with only the lines it had not finished.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass, field

import httpx

from radixserve.gateway.api.errors import ApiError, bad_request
from radixserve.gateway.api.file_store import BATCH_OUTPUT_PURPOSE, BatchStore, FileStore, new_id

log = logging.getLogger("radixserve.gateway.batch")

BATCH_ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
COMPLETION_WINDOWS_S = {"24h": 24 * 3600}
MAX_LINES = 50_000
DEFAULT_CONCURRENCY = 32
SAVE_INTERVAL_S = 1.0
UNFINISHED = ("validating", "in_progress", "finalizing", "cancelling")
CANCELLABLE = ("validating", "in_progress")


@dataclass
class BatchLine:
    index: int
    custom_id: str
    body: dict


@dataclass(eq=False)
class BatchJob:
    batch: dict
    lines: list[BatchLine] | None = None  # None: read from the input file when the job starts
    cancel_requested: bool = False
    in_flight: set[asyncio.Task] = field(default_factory=set)
    task: asyncio.Task | None = None
    saved_at: float = 0.0


def parse_input(data: bytes, endpoint: str) -> list[BatchLine]:
    """The requests of a batch input file, or a 400 naming its first bad line (numbered from 1)."""
    lines: list[BatchLine] = []
    seen: set[str] = set()
    for number, raw in enumerate(data.splitlines(), start=1):
        if not raw.strip():
            continue
        problem, code = _line_problem(raw, endpoint, seen)
        if problem:
            raise bad_request(
                f"Line {number} of the input file: {problem}", param="input_file_id", code=code
            )
        entry = json.loads(raw)
        seen.add(entry["custom_id"])
        lines.append(BatchLine(number - 1, entry["custom_id"], entry["body"]))
    if not lines:
        raise bad_request(
            "The input file holds no requests", param="input_file_id", code="empty_file"
        )
    if len(lines) > MAX_LINES:
        raise bad_request(
            f"The input file holds {len(lines)} requests; a batch takes at most {MAX_LINES}",
            param="input_file_id",
            code="too_many_requests",
        )
    return lines


def _line_problem(raw: bytes, endpoint: str, seen: set[str]) -> tuple[str | None, str | None]:
    try:
        entry = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"not valid JSON ({e})", "invalid_json_line"
    if not isinstance(entry, dict):
        return "not a JSON object", "invalid_json_line"
    custom_id = entry.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return "custom_id must be a non-empty string", "missing_required_parameter"
    if custom_id in seen:
        return f"custom_id {custom_id!r} is used by an earlier line", "duplicate_custom_id"
    if entry.get("method") != "POST":
        return "method must be POST", "invalid_method"
    if entry.get("url") != endpoint:
        return (
            f"url {entry.get('url')!r} is not the batch's endpoint {endpoint!r}",
            "mismatched_endpoint",
        )
    if not isinstance(entry.get("body"), dict):
        return "body must be a JSON object", "missing_required_parameter"
    return None, None


def new_batch(
    input_file_id: str, endpoint: str, completion_window: str, metadata: dict | None, total: int
) -> dict:
    now = int(time.time())
    return {
        "id": new_id("batch_"),
        "object": "batch",
        "endpoint": endpoint,
        "errors": None,
        "input_file_id": input_file_id,
        "completion_window": completion_window,
        "status": "validating",
        "output_file_id": None,
        "error_file_id": None,
        "created_at": now,
        "in_progress_at": None,
        "expires_at": now + COMPLETION_WINDOWS_S[completion_window],
        "finalizing_at": None,
        "completed_at": None,
        "failed_at": None,
        "expired_at": None,
        "cancelling_at": None,
        "cancelled_at": None,
        "request_counts": {"total": total, "completed": 0, "failed": 0},
        "metadata": metadata,
    }


def _result(line: BatchLine, status: int, body) -> dict:
    request_id = (
        body.get("id") if isinstance(body, dict) and isinstance(body.get("id"), str) else None
    )
    return {
        "id": new_id("batch_req_"),
        "custom_id": line.custom_id,
        "response": {
            "status_code": status,
            "request_id": request_id or f"req_{uuid.uuid4().hex}",
            "body": body,
        },
        "error": None,
    }


def _expired_result(line: BatchLine) -> dict:
    return {
        "id": new_id("batch_req_"),
        "custom_id": line.custom_id,
        "response": None,
        "error": {
            "code": "batch_expired",
            "message": "This request could not be executed before the completion window expired.",
        },
    }


class BatchRunner:
    def __init__(
        self,
        app,
        files: FileStore,
        batches: BatchStore,
        api_key: str | None = None,
        concurrency: int = DEFAULT_CONCURRENCY,
    ):
        self.app = app
        self.files = files
        self.batches = batches
        self.api_key = api_key
        self.concurrency = concurrency
        self.jobs: dict[str, BatchJob] = {}

    # ---- the API's operations ----

    async def create(
        self, input_file_id: str, endpoint: str, completion_window: str, metadata: dict | None
    ) -> dict:
        if endpoint not in BATCH_ENDPOINTS:
            raise bad_request(
                f"endpoint must be one of {', '.join(BATCH_ENDPOINTS)}", param="endpoint"
            )
        if completion_window not in COMPLETION_WINDOWS_S:
            raise bad_request(
                f"completion_window must be one of {', '.join(COMPLETION_WINDOWS_S)}",
                param="completion_window",
            )
        purpose = self.files.get(input_file_id)["purpose"]
        if purpose != "batch":
            raise bad_request(
                f"File {input_file_id} has purpose {purpose!r}; a batch's input needs 'batch'",
                param="input_file_id",
            )
        lines = await asyncio.to_thread(self._read_input, input_file_id, endpoint)
        batch = new_batch(input_file_id, endpoint, completion_window, metadata, len(lines))
        self.batches.save(batch)
        self._start(BatchJob(batch, lines))
        return batch

    def get(self, batch_id: str) -> dict:
        job = self.jobs.get(batch_id)
        return job.batch if job else self.batches.get(batch_id)

    def list(self) -> list[dict]:
        """Newest first; running batches as they are now."""
        return [
            self.jobs[b["id"]].batch if b["id"] in self.jobs else b for b in self.batches.list()
        ]

    def cancel(self, batch_id: str) -> dict:
        batch = self.get(batch_id)
        job = self.jobs.get(batch_id)
        if job is None or batch["status"] not in (*CANCELLABLE, "cancelling"):
            raise ApiError(
                409,
                f"Cannot cancel a batch with status '{batch['status']}'.",
                type="invalid_request_error",
                code="batch_not_cancellable",
            )
        if batch["status"] in CANCELLABLE:
            job.cancel_requested = True
            batch.update(status="cancelling", cancelling_at=int(time.time()))
            self.batches.save(batch)
            for task in job.in_flight:
                task.cancel()
        return batch

    # ---- lifecycle ----

    def resume_unfinished(self) -> None:
        """Restarts the batches a previous process left running; call once the event loop runs."""
        for batch in self.batches.list():
            if batch["status"] in UNFINISHED:
                log.info("resuming batch %s (%s)", batch["id"], batch["status"])
                self._start(BatchJob(batch, cancel_requested=batch["status"] == "cancelling"))

    async def close(self) -> None:
        """Stops every batch where it is, its state on disk as it was: the next start resumes it."""
        tasks = [job.task for job in self.jobs.values() if job.task]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _read_input(self, input_file_id: str, endpoint: str) -> list[BatchLine]:
        return parse_input(self.files.read(input_file_id), endpoint)

    def _start(self, job: BatchJob) -> None:
        batch_id = job.batch["id"]
        self.jobs[batch_id] = job
        job.task = asyncio.create_task(self._run(job))
        job.task.add_done_callback(lambda _: self.jobs.pop(batch_id, None))

    # ---- running a batch ----

    async def _run(self, job: BatchJob) -> None:
        batch = job.batch
        try:
            lines = job.lines
            if lines is None:
                lines = await asyncio.to_thread(
                    self._read_input, batch["input_file_id"], batch["endpoint"]
                )
            records = self.batches.read_progress(batch["id"])
            batch["request_counts"] = {
                "total": len(lines),
                "completed": sum(r["ok"] for r in records),
                "failed": sum(not r["ok"] for r in records),
            }
            if batch["status"] == "validating":
                batch.update(status="in_progress", in_progress_at=int(time.time()))
                self.batches.save(batch)
            if batch["status"] == "in_progress":
                done = {r["index"] for r in records}
                await self._execute(job, [line for line in lines if line.index not in done])
            await self._finalize(job, lines)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.exception("batch %s failed", batch["id"])
            self._fail(batch, e)

    async def _execute(self, job: BatchJob, lines: list[BatchLine]) -> None:
        """Runs lines, `concurrency` at a time, until all are done, the batch is cancelled or it expires."""
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        transport = httpx.ASGITransport(app=self.app, raise_app_exceptions=False)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://batch.local", headers=headers, timeout=None
        ) as client:
            with self.batches.open_progress(job.batch["id"]) as progress:
                try:
                    await asyncio.wait_for(
                        self._launch(job, lines, client, progress),
                        timeout=max(0.0, job.batch["expires_at"] - time.time()),
                    )
                except asyncio.TimeoutError:
                    log.warning("batch %s expired", job.batch["id"])
                finally:
                    self.batches.save(job.batch)  # the latest counts, also when the gateway stops

    async def _launch(
        self, job: BatchJob, lines: list[BatchLine], client: httpx.AsyncClient, progress
    ) -> None:
        slots = asyncio.Semaphore(self.concurrency)

        def finished(task: asyncio.Task) -> None:
            job.in_flight.discard(task)
            slots.release()

        try:
            for line in lines:
                await slots.acquire()
                if job.cancel_requested:
                    break
                task = asyncio.create_task(self._run_line(job, line, client, progress))
                job.in_flight.add(task)
                task.add_done_callback(finished)
            while job.in_flight:
                await asyncio.wait(set(job.in_flight))
        finally:
            for task in job.in_flight:
                task.cancel()
            if job.in_flight:
                await asyncio.wait(set(job.in_flight))

    async def _run_line(
        self, job: BatchJob, line: BatchLine, client: httpx.AsyncClient, progress
    ) -> None:
        status, body = await self._call(job.batch["endpoint"], line, client)
        ok = status < 400
        progress.write(
            json.dumps({"index": line.index, "ok": ok, "result": _result(line, status, body)})
            + "\n"
        )
        progress.flush()
        job.batch["request_counts"]["completed" if ok else "failed"] += 1
        if time.monotonic() - job.saved_at >= SAVE_INTERVAL_S:
            job.saved_at = time.monotonic()
            self.batches.save(job.batch)

    async def _call(
        self, endpoint: str, line: BatchLine, client: httpx.AsyncClient
    ) -> tuple[int, object]:
        if line.body.get("stream"):
            return 400, bad_request(
                "Streaming is not supported in batch requests", param="stream"
            ).body()
        try:
            response = await client.post(endpoint, json=line.body)
        except Exception:
            log.exception("batch line %s failed", line.custom_id)
            return 500, ApiError(500, "Internal server error", code="internal_error").body()
        try:
            return response.status_code, response.json()
        except ValueError:
            return response.status_code, response.text

    async def _finalize(self, job: BatchJob, lines: list[BatchLine]) -> None:
        """Writes the output and error files; lines neither finished nor cancelled had expired."""
        batch = job.batch
        records = {r["index"]: r for r in self.batches.read_progress(batch["id"])}
        if job.cancel_requested:
            outcome = "cancelled"
        else:
            outcome = "completed" if all(line.index in records for line in lines) else "expired"
            batch.update(
                status="finalizing", finalizing_at=batch["finalizing_at"] or int(time.time())
            )
            self.batches.save(batch)
        outputs, errors = [], []
        for line in lines:
            record = records.get(line.index)
            if record is not None:
                (outputs if record["ok"] else errors).append(record["result"])
            elif outcome == "expired":
                errors.append(_expired_result(line))
        batch["output_file_id"] = await self._store_results(batch["id"], "output", outputs)
        batch["error_file_id"] = await self._store_results(batch["id"], "error", errors)
        batch["request_counts"] = {
            "total": len(lines),
            "completed": len(outputs),
            "failed": len(errors),
        }
        batch.update(status=outcome, **{f"{outcome}_at": int(time.time())})
        self.batches.save(batch)
        self.batches.delete_progress(batch["id"])

    async def _store_results(self, batch_id: str, kind: str, results: list[dict]) -> str | None:
        if not results:
            return None
        data = "".join(json.dumps(r) + "\n" for r in results).encode()
        stored = await asyncio.to_thread(
            self.files.create, data, f"{batch_id}_{kind}.jsonl", BATCH_OUTPUT_PURPOSE
        )
        return stored["id"]

    def _fail(self, batch: dict, error: Exception) -> None:
        if isinstance(error, ApiError):
            code, message = error.code or "invalid_request", error.message
        else:
            code, message = "internal_error", f"The batch could not be run: {error}"
        batch.update(
            status="failed",
            failed_at=int(time.time()),
            errors={
                "object": "list",
                "data": [{"code": code, "message": message, "param": None, "line": None}],
            },
        )
        self.batches.save(batch)
        self.batches.delete_progress(batch["id"])
