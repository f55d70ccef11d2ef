"""Uploaded files (/v1/files) and batch state (/v1/batches), kept as plain files under --file-storage-path.

    files/<file id>.json       the file object         files/<file id>.data   its content
    batches/<batch id>.json    the batch object        batches/<batch id>.progress.jsonl   its finished lines

Objects are written to a temporary file and renamed over the old one, so a crash leaves either version
whole; content is in place before its object, so a listed file always has its bytes. Folders are made
on the first write: a gateway that never stores anything leaves no trace.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import BinaryIO, TextIO

from radixserve.gateway.api.errors import ApiError

UPLOAD_PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")
BATCH_OUTPUT_PURPOSE = "batch_output"
# What new_id makes: no "/", "..", NUL or absolute path can reach a file name; long ones answer 404, not 500.
_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")


def default_storage_path() -> Path:
    data_home = os.environ.get("XDG_DATA_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "share"
    )
    return Path(data_home) / "radixserve" / "storage"


def new_id(prefix: str) -> str:
    """Ids sort in creation order: a fixed-width nanosecond clock, then randomness."""
    return f"{prefix}{time.time_ns():016x}{uuid.uuid4().hex[:8]}"


def checked_id(value: str, kind: str, param: str) -> str:
    """value if it could be an id of this store; otherwise the object does not exist (404)."""
    if _ID.fullmatch(value):
        return value
    raise ApiError(404, f"No such {kind} object: {value}", param=param, code="not_found")


def write_json_atomic(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _read_objects(folder: Path) -> list[dict]:
    """Every stored object in folder, newest first."""
    if not folder.is_dir():
        return []
    objects = []
    for path in folder.glob("*.json"):
        try:
            objects.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError):
            continue  # deleted meanwhile
    return sorted(objects, key=lambda o: o["id"], reverse=True)


def page(objects: list[dict], limit: int, after: str | None) -> dict:
    """OpenAI's cursor page over objects (already in list order): the `limit` objects after id `after`."""
    if after is not None:
        ids = [o["id"] for o in objects]
        objects = objects[ids.index(after) + 1 :] if after in ids else []
    data = objects[:limit]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": len(objects) > limit,
    }


class FileStore:
    def __init__(self, root: Path):
        self.folder = root / "files"

    def _object_path(self, file_id: str) -> Path:
        return self.folder / f"{checked_id(file_id, 'File', 'file_id')}.json"

    def content_path(self, file_id: str) -> Path:
        return self.folder / f"{checked_id(file_id, 'File', 'file_id')}.data"

    def create(self, source: BinaryIO | bytes, filename: str, purpose: str) -> dict:
        """Store content (bytes or a readable binary file); blocking, so run it off the event loop."""
        file_id = new_id("file-")
        self.folder.mkdir(parents=True, exist_ok=True)
        content = self.content_path(file_id)
        try:
            with open(content, "wb") as out:
                if isinstance(source, bytes):
                    out.write(source)
                else:
                    shutil.copyfileobj(source, out)
        except BaseException:
            content.unlink(missing_ok=True)
            raise
        obj = {
            "id": file_id,
            "object": "file",
            "bytes": content.stat().st_size,
            "created_at": int(time.time()),
            "filename": filename,
            "purpose": purpose,
            "status": "processed",
        }
        write_json_atomic(self._object_path(file_id), obj)
        return obj

    def get(self, file_id: str) -> dict:
        try:
            return json.loads(self._object_path(file_id).read_text())
        except FileNotFoundError:
            raise ApiError(
                404, f"No such File object: {file_id}", param="file_id", code="not_found"
            ) from None

    def read(self, file_id: str) -> bytes:
        self.get(file_id)
        return self.content_path(file_id).read_bytes()

    def list(self, purpose: str | None = None) -> list[dict]:
        return [f for f in _read_objects(self.folder) if purpose is None or f["purpose"] == purpose]

    def delete(self, file_id: str) -> dict:
        self.get(file_id)
        self._object_path(file_id).unlink(missing_ok=True)
        self.content_path(file_id).unlink(missing_ok=True)
        return {"id": file_id, "object": "file", "deleted": True}


class BatchStore:
    def __init__(self, root: Path):
        self.folder = root / "batches"

    def _object_path(self, batch_id: str) -> Path:
        return self.folder / f"{checked_id(batch_id, 'Batch', 'batch_id')}.json"

    def save(self, batch: dict) -> None:
        write_json_atomic(self._object_path(batch["id"]), batch)

    def get(self, batch_id: str) -> dict:
        try:
            return json.loads(self._object_path(batch_id).read_text())
        except FileNotFoundError:
            raise ApiError(
                404, f"No such Batch object: {batch_id}", param="batch_id", code="not_found"
            ) from None

    def list(self) -> list[dict]:
        return _read_objects(self.folder)

    def progress_path(self, batch_id: str) -> Path:
        return self.folder / f"{checked_id(batch_id, 'Batch', 'batch_id')}.progress.jsonl"

    def read_progress(self, batch_id: str) -> list[dict]:
        """The records appended so far; a line cut short by a crash is skipped."""
        try:
            raw = self.progress_path(batch_id).read_text().splitlines()
        except FileNotFoundError:
            return []
        records = []
        for line in raw:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return records

    def open_progress(self, batch_id: str) -> TextIO:
        """For appending records, one JSON line each, after any a previous run left."""
        path = self.progress_path(batch_id)
        self.folder.mkdir(parents=True, exist_ok=True)
        out = open(path, "a")
        if out.tell() and not path.read_bytes().endswith(b"\n"):
            out.write(
                "\n"
            )  # ends a line cut short by a crash, so it stays one line read_progress skips
        return out

    def delete_progress(self, batch_id: str) -> None:
        self.progress_path(batch_id).unlink(missing_ok=True)
