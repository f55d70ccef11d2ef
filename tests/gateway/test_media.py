"""The gateway's image URLs (services/gateway/api/media.py) without the stack: data: URLs and bare base64,
local files only under --allowed-local-media-path, http(s) downloads from a local server with the size,
type and time limits; each failure an ApiError 400 with its code. Downloads share the app's one client
(its keep-alive connections; no cookie kept), which the app's lifespan opens and closes."""

from __future__ import annotations

import asyncio
import base64
import http.server
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from radixserve.common.args import ServerArgs
from radixserve.gateway.api.errors import ApiError
from radixserve.gateway.api.media import (
    FETCH_POOL,
    MediaLimits,
    check_image_count,
    load_image,
    open_fetch_client,
)
from radixserve.gateway.app import create_app
from tests.gateway.image_server import ImageServer

PNG = b"\x89PNG\r\n\x1a\n" + bytes(100)


def limits(tmp_path=None, **kw) -> MediaLimits:
    fields = dict(
        allowed_local_media_path=str(tmp_path) if tmp_path else None,
        max_images_per_request=2,
        max_image_bytes=1000,
        media_fetch_timeout=10.0,  # generous: a loaded CI machine; the slow case sets 0.3
    )
    fields.update(kw)
    return MediaLimits(**fields)


def load(url, lim, bare_base64=False) -> bytes:
    return asyncio.run(load_image(url, lim, "messages.0.content.0.image_url", bare_base64))


def refused(url, lim, code, bare_base64=False) -> ApiError:
    with pytest.raises(ApiError) as err:
        load(url, lim, bare_base64)
    assert err.value.status == 400 and err.value.code == code, err.value.message
    assert err.value.param == "messages.0.content.0.image_url"
    return err.value


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/slow.png":
            time.sleep(20)
        body = bytes(5000) if self.path == "/big.png" else PNG
        self.send_response(404 if self.path == "/missing.png" else 200)
        self.send_header("Content-Type", "text/html" if self.path == "/page" else "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except OSError:
            pass

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_data_urls_and_bare_base64():
    b64 = base64.b64encode(PNG).decode()
    assert load(f"data:image/png;base64,{b64}", limits()) == PNG
    assert load(b64, limits(), bare_base64=True) == PNG
    refused("data:image/png;base64,@@@", limits(), "invalid_image_url")
    refused(f"data:text/plain;base64,{b64}", limits(), "invalid_image_url")
    refused("data:image/png,rawtext", limits(), "invalid_image_url")
    big = base64.b64encode(bytes(2000)).decode()
    refused(f"data:image/png;base64,{big}", limits(), "image_too_large")
    refused(b64, limits(), "invalid_image_url")  # not a URL, and bare base64 only for image_data


def test_local_files_only_under_the_allowed_folder(tmp_path):
    (tmp_path / "a.png").write_bytes(PNG)
    (tmp_path / "big.png").write_bytes(bytes(2000))
    refused(f"file://{tmp_path / 'a.png'}", limits(), "local_media_not_allowed")
    assert load(f"file://{tmp_path / 'a.png'}", limits(tmp_path)) == PNG
    assert load(str(tmp_path / "a.png"), limits(tmp_path)) == PNG
    refused(f"file://{tmp_path / '..' / 'escape.png'}", limits(tmp_path), "local_media_not_allowed")
    refused(str(tmp_path / "big.png"), limits(tmp_path), "image_too_large")
    refused(str(tmp_path / "none.png"), limits(tmp_path), "invalid_image_url")


def test_http_downloads_with_limits(server):
    assert load(f"{server}/a.png", limits()) == PNG
    refused(f"{server}/big.png", limits(), "image_too_large")
    refused(f"{server}/page", limits(), "invalid_image_url")
    refused(f"{server}/missing.png", limits(), "invalid_image_url")
    t0 = time.monotonic()
    error = refused(f"{server}/slow.png", limits(media_fetch_timeout=0.3), "invalid_image_url")
    assert "took over 0.3 s" in error.message and time.monotonic() - t0 < 10  # not the 20 s
    refused("http://127.0.0.1:9/nothing.png", limits(), "invalid_image_url")


def test_image_count_limit():
    check_image_count(2, limits(), "messages")
    with pytest.raises(ApiError) as err:
        check_image_count(3, limits(), "messages")
    assert err.value.code == "too_many_images"


@pytest.fixture
def image_server():
    with ImageServer(PNG) as server:
        yield server


async def fetch_twice(url: str, lim: MediaLimits) -> list[bytes]:
    return [await load_image(f"{url}/{i}.png", lim, "image_data.0") for i in range(2)]


def test_fetches_through_a_shared_client_reuse_its_connection(image_server):
    # Without a shared client, each fetch opens its own connection.
    assert asyncio.run(fetch_twice(image_server.url, limits())) == [PNG, PNG]
    assert image_server.connections == 2

    async def shared() -> list[bytes]:
        async with open_fetch_client(10.0) as client:
            return await fetch_twice(image_server.url, limits(client=client))

    image_server.reset()
    assert asyncio.run(shared()) == [PNG, PNG]
    assert image_server.connections == 1  # the second image came on the first's connection
    assert image_server.cookies == [None, None]  # the first answer's cookie was not kept


def test_shared_client_keeps_the_limits(server):
    async def run() -> None:
        async with open_fetch_client(10.0) as client:
            lim = limits(client=client)
            with pytest.raises(ApiError) as err:
                await load_image(f"{server}/big.png", lim, "p")
            assert err.value.code == "image_too_large"
            slow = limits(client=client, media_fetch_timeout=0.3)
            with pytest.raises(ApiError) as err:
                await load_image(f"{server}/slow.png", slow, "p")
            assert "took over 0.3 s" in err.value.message
            for path in ("page", "missing.png"):
                with pytest.raises(ApiError) as err:
                    await load_image(f"{server}/{path}", lim, "p")
                assert err.value.code == "invalid_image_url"
            assert await load_image(f"{server}/a.png", lim, "p") == PNG  # the pool still serves

    t0 = time.monotonic()
    asyncio.run(run())
    assert time.monotonic() - t0 < 10


def test_the_app_lifespan_opens_one_client_and_closes_it(image_server):
    app = create_app(ServerArgs(media_fetch_timeout=7.0))
    assert app.state.media.client is None  # before the lifespan: a client per fetch
    with TestClient(app) as http_client:
        media = app.state.media
        assert isinstance(media.client, httpx.AsyncClient)
        assert not media.client.is_closed
        assert media.client.timeout.read == 7.0
        assert media.client._transport._pool._max_connections == FETCH_POOL.max_connections
        got = http_client.portal.call(fetch_twice, image_server.url, media)
        assert got == [PNG, PNG] and image_server.connections == 1
    assert media.client.is_closed
    assert app.state.media.client is None
