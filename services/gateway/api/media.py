"""Image URLs of a request to the encoded image files the tokenizer service decodes: `data:` URLs
(base64), bare base64 (SGLang's image_data), local files under --allowed-local-media-path (file:// URLs
or absolute paths), and http(s) URLs the gateway downloads within --media-fetch-timeout. Every image
is at most --max-image-bytes and a request carries at most --max-images-per-request; anything else is
a 400 with OpenAI's error body. Whether the bytes are an image is the tokenizer's to say. Downloads go
through the gateway's one shared client (open_fetch_client, opened and closed by the app's lifespan)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import http.cookiejar
import os
import pathlib
import urllib.parse
from dataclasses import dataclass, field

import httpx
from starlette.requests import Request

from radixserve.gateway.api.errors import ApiError, bad_request


@dataclass(frozen=True)
class MediaLimits:
    allowed_local_media_path: str | None
    max_images_per_request: int
    max_image_bytes: int
    media_fetch_timeout: float
    client: httpx.AsyncClient | None = field(default=None, compare=False, repr=False)
    """The shared client http(s) images are fetched with (open_fetch_client); None (an app whose
    lifespan has not started, a test): each fetch opens a client of its own."""

    @classmethod
    def from_args(cls, args, client: httpx.AsyncClient | None = None) -> "MediaLimits":
        return cls(
            args.allowed_local_media_path,
            args.max_images_per_request,
            args.max_image_bytes,
            args.media_fetch_timeout,
            client,
        )


FETCH_POOL = httpx.Limits(max_connections=64, max_keepalive_connections=16, keepalive_expiry=30.0)
"""The shared client's connections: at most 64 open at once (more concurrent fetches wait for one,
within --media-fetch-timeout), 16 of them kept alive for 30 s between fetches."""


class _NoCookies(http.cookiejar.DefaultCookiePolicy):
    """Keeps no cookie: the shared client serves every request, so what one request's fetch was sent
    must not go out with another's."""

    def set_ok(self, cookie, request) -> bool:
        return False


def open_fetch_client(media_fetch_timeout: float) -> httpx.AsyncClient:
    """The client the gateway fetches http(s) images with, one for the app (made and closed by its
    lifespan) so that fetches reuse pooled keep-alive connections instead of building a client, a TLS
    context and a connection per image: redirects followed (at most 3), every phase within
    --media-fetch-timeout (the fetch as a whole is held to it too), FETCH_POOL, no cookies kept."""
    return httpx.AsyncClient(
        follow_redirects=True,
        max_redirects=3,
        timeout=media_fetch_timeout,
        limits=FETCH_POOL,
        cookies=http.cookiejar.CookieJar(policy=_NoCookies()),
    )


def media_limits(request: Request) -> MediaLimits:
    """The app's limits, with its shared fetch client once the lifespan has opened it (app.py)."""
    return request.app.state.media


def check_image_count(count: int, limits: MediaLimits, param: str) -> None:
    if count > limits.max_images_per_request:
        raise bad_request(
            f"{count} images in one request; at most {limits.max_images_per_request} "
            "(--max-images-per-request)",
            param=param,
            code="too_many_images",
        )


def check_image_size(data: bytes, limits: MediaLimits, param: str) -> bytes:
    """data, when it is at most --max-image-bytes (an image file a client sent as bytes)."""
    if len(data) > limits.max_image_bytes:
        raise _too_large(len(data), limits, param)
    return data


def _too_large(size: int, limits: MediaLimits, param: str) -> ApiError:
    return bad_request(
        f"image of {size} bytes is over the limit of {limits.max_image_bytes} (--max-image-bytes)",
        param=param,
        code="image_too_large",
    )


def _invalid(message: str, param: str) -> ApiError:
    return bad_request(message, param=param, code="invalid_image_url")


def _b64(text: str, limits: MediaLimits, param: str) -> bytes:
    if len(text) * 3 // 4 > limits.max_image_bytes + 3:
        raise _too_large(len(text) * 3 // 4, limits, param)
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise _invalid(f"the image's base64 data is invalid: {e}", param) from e
    if len(data) > limits.max_image_bytes:
        raise _too_large(len(data), limits, param)
    return data


def _data_url(url: str, limits: MediaLimits, param: str) -> bytes:
    header, sep, payload = url[5:].partition(",")
    if not sep or not header.endswith(";base64"):
        raise _invalid("a data: image URL must be data:<type>;base64,<data>", param)
    media_type = header[: -len(";base64")].split(";")[0]
    if media_type and not media_type.startswith("image/"):
        raise _invalid(f"a data: URL of type {media_type!r} is not an image", param)
    return _b64(payload, limits, param)


def _local_file(path: str, limits: MediaLimits, param: str) -> bytes:
    if not limits.allowed_local_media_path:
        raise bad_request(
            "local image files are not allowed (start the server with --allowed-local-media-path)",
            param=param,
            code="local_media_not_allowed",
        )
    root = pathlib.Path(limits.allowed_local_media_path).resolve()
    target = pathlib.Path(path).resolve()
    if not target.is_relative_to(root):
        raise bad_request(
            "the image file is outside --allowed-local-media-path",
            param=param,
            code="local_media_not_allowed",
        )
    try:
        size = os.path.getsize(target)
        if size > limits.max_image_bytes:
            raise _too_large(size, limits, param)
        return target.read_bytes()
    except OSError as e:
        raise _invalid(f"the image file cannot be read: {e.strerror}", param) from e


async def _fetch(client: httpx.AsyncClient, url: str, limits: MediaLimits, param: str) -> bytes:
    async with client.stream("GET", url) as response:
        if response.status_code != 200:
            raise _invalid(f"fetching the image gave HTTP {response.status_code}", param)
        media_type = response.headers.get("content-type", "").split(";")[0].strip()
        if media_type and not (
            media_type.startswith("image/") or media_type == "application/octet-stream"
        ):
            raise _invalid(f"the URL serves {media_type!r}, not an image", param)
        declared = response.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limits.max_image_bytes:
            raise _too_large(int(declared), limits, param)
        data = bytearray()
        async for chunk in response.aiter_bytes():
            data += chunk
            if len(data) > limits.max_image_bytes:
                raise _too_large(len(data), limits, param)
        return bytes(data)


async def _download(url: str, limits: MediaLimits, param: str) -> bytes:
    async def fetch() -> bytes:
        if limits.client is not None:
            return await _fetch(limits.client, url, limits, param)
        async with open_fetch_client(limits.media_fetch_timeout) as client:
            return await _fetch(client, url, limits, param)

    try:
        return await asyncio.wait_for(fetch(), limits.media_fetch_timeout)
    except asyncio.TimeoutError as e:
        raise _invalid(
            f"fetching the image took over {limits.media_fetch_timeout:g} s (--media-fetch-timeout)",
            param,
        ) from e
    except httpx.HTTPError as e:
        raise _invalid(f"the image could not be fetched: {type(e).__name__}: {e}", param) from e


async def load_image(url: str, limits: MediaLimits, param: str, bare_base64: bool = False) -> bytes:
    """The encoded image file an image URL names (ApiError 400 when it cannot be had). bare_base64:
    a string that is no URL is base64 data (SGLang's image_data)."""
    if not isinstance(url, str) or not url:
        raise _invalid("the image URL is empty", param)
    if url.startswith("data:"):
        return _data_url(url, limits, param)
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme in ("http", "https"):
        return await _download(url, limits, param)
    if scheme == "file":
        return _local_file(urllib.parse.unquote(urllib.parse.urlsplit(url).path), limits, param)
    if url.startswith("/"):
        return _local_file(url, limits, param)
    if bare_base64:
        return _b64(url, limits, param)
    raise _invalid("an image URL must be a data:, http(s) or file URL", param)


async def load_images(
    where: list[tuple[str, str]], limits: MediaLimits, param: str, bare_base64: bool = False
) -> list[bytes]:
    """The files of a request's images, given as (URL, param naming it) pairs, fetched concurrently
    after the count is checked (param names the request's image list in that error)."""
    check_image_count(len(where), limits, param)
    return list(
        await asyncio.gather(*(load_image(url, limits, at, bare_base64) for url, at in where))
    )
