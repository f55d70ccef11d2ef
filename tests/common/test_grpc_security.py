"""Security between the services: mutual TLS and the shared token on every RPC kind, the gateway's public
API left to --api-key, bad TLS flags, and the launcher handing the token over in the environment."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import sys
import time
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import grpc
import httpx
import pytest

from radixserve.v1 import (
    gateway_pb2,
    gateway_pb2_grpc,
    scheduler_pb2,
    scheduler_pb2_grpc,
    tokenizer_pb2,
)
from radixserve.v1 import tokenizer_pb2_grpc
from radixserve import launcher
from radixserve.common import grpc_util
from radixserve.common.args import ServerArgs
from radixserve.common.grpc_security import (
    TOKEN_ENV,
    TOKEN_METADATA_KEY,
    install_from_args,
    token_client_interceptors,
)
from radixserve.common.model_files import resolve_model_path
from radixserve.gateway.api.grpc_api import start_grpc_api
from radixserve.tokenizer.core import TokenizerCore
from radixserve.tokenizer.server import start_server as start_tokenizer
from tests.gateway.fakes import MESSAGES, MODEL, FakeBackends, RunningGateway

TOKEN = "inter-service-s3cret"
TEXT = "Hello, TLS!"
RPC_KINDS = ("unary_unary", "unary_stream", "stream_stream")


@dataclass
class Certs:
    ca: str
    cert: str
    key: str
    rogue_cert: str  # signed by another CA
    rogue_key: str

    def read(self, name: str) -> bytes:
        return Path(getattr(self, name)).read_bytes()

    def client(self, cert: str | None = "cert", key: str = "key") -> grpc.ChannelCredentials:
        if cert is None:
            return grpc.ssl_channel_credentials(self.read("ca"))
        return grpc.ssl_channel_credentials(self.read("ca"), self.read(key), self.read(cert))


def openssl(*argv: str, cwd: Path) -> None:
    subprocess.run(["openssl", *argv], cwd=cwd, check=True, capture_output=True)


def make_ca(folder: Path, name: str) -> None:
    openssl(
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.pem",
        "-subj",
        f"/CN={name}",
        "-days",
        "2",
        cwd=folder,
    )


def make_cert(folder: Path, name: str, ca: str) -> None:
    """A certificate for 127.0.0.1 / localhost, good for a server and a client."""
    (folder / "ext.cnf").write_text(
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n"
    )
    openssl(
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.csr",
        "-subj",
        "/CN=localhost",
        cwd=folder,
    )
    openssl(
        "x509",
        "-req",
        "-in",
        f"{name}.csr",
        "-CA",
        f"{ca}.pem",
        "-CAkey",
        f"{ca}.key",
        "-CAcreateserial",
        "-out",
        f"{name}.pem",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
        cwd=folder,
    )


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Certs:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command makes the test certificates")
    folder = tmp_path_factory.mktemp("certs")
    make_ca(folder, "ca")
    make_cert(folder, "service", "ca")
    make_ca(folder, "rogue-ca")
    make_cert(folder, "rogue", "rogue-ca")
    return Certs(
        *(
            str(folder / name)
            for name in ("ca.pem", "service.pem", "service.key", "rogue.pem", "rogue.key")
        )
    )


@pytest.fixture(scope="module")
def core() -> TokenizerCore:
    return TokenizerCore(resolve_model_path(None))


class EchoScheduler(scheduler_pb2_grpc.SchedulerServicer):
    """The scheduler's two streaming RPCs, echoing the prompt back."""

    async def Generate(self, request, context):
        for token in request.input_ids:
            yield scheduler_pb2.SchedulerGenerateResponse(
                request_id=request.request_id, token_ids=[token]
            )

    async def Session(self, request_iterator, context):
        async for action in request_iterator:
            yield scheduler_pb2.SchedulerSessionEvents(
                events=[
                    scheduler_pb2.SchedulerGenerateResponse(
                        request_id=action.generate.request_id, token_ids=action.generate.input_ids
                    )
                ]
            )


async def start_backends(core: TokenizerCore) -> tuple[list[grpc.aio.Server], str, str]:
    """The real tokenizer service and the echo scheduler, with whatever security is installed."""
    tokenizer, tokenizer_port = await start_tokenizer(core, "127.0.0.1:0")
    scheduler, scheduler_port = await grpc_util.start_aio_server(
        scheduler_pb2_grpc.add_SchedulerServicer_to_server, EchoScheduler(), "127.0.0.1:0"
    )
    return [tokenizer, scheduler], f"127.0.0.1:{tokenizer_port}", f"127.0.0.1:{scheduler_port}"


def bidi_with(token: str | None):
    """How a client with this token opens a bidirectional call (they carry their metadata themselves:
    grpc_util.open_bidi for the installed token)."""
    metadata = [(TOKEN_METADATA_KEY, token)] if token else []
    return lambda method: method(timeout=10, metadata=metadata)


def installed_bidi(method):
    return grpc_util.open_bidi(method, timeout=10)


async def call_every_kind(client, tokenizer_addr: str, scheduler_addr: str) -> dict:
    """Each RPC kind the services use, through channels from client (make_channel, or (make_channel,
    open_bidi) when the bidirectional call carries a token): its result or its status code."""
    make_channel, open_bidi = client if isinstance(client, tuple) else (client, bidi_with(None))
    results = {}

    async def attempt(kind: str, call) -> None:
        try:
            results[kind] = await call()
        except grpc.aio.AioRpcError as e:
            results[kind] = e.code()

    async with (
        make_channel(tokenizer_addr) as tokenizer_channel,
        make_channel(scheduler_addr) as scheduler_channel,
    ):
        tokenizer = tokenizer_pb2_grpc.TokenizerStub(tokenizer_channel)
        scheduler = scheduler_pb2_grpc.SchedulerStub(scheduler_channel)

        async def encode():
            response = await tokenizer.Encode(
                tokenizer_pb2.TokenizerEncodeRequest(texts=[TEXT]), timeout=10
            )
            return [list(r.ids) for r in response.results]

        async def generate():
            request = scheduler_pb2.SchedulerGenerateRequest(request_id="g", input_ids=[1, 2, 3])
            return [list(m.token_ids) async for m in scheduler.Generate(request, timeout=10)]

        async def session():  # written and read as the gateway does
            call = open_bidi(scheduler.Session)
            try:
                events = []
                for i in (4, 5):
                    await call.write(
                        scheduler_pb2.SchedulerSessionRequest(
                            generate=scheduler_pb2.SchedulerGenerateRequest(
                                request_id=f"s{i}", input_ids=[i]
                            )
                        )
                    )
                    events.append([list(e.token_ids) for e in (await call.read()).events])
                return events
            except asyncio.InvalidStateError:  # the server ended the call before a write
                return await call.code()
            finally:
                call.cancel()

        await attempt("unary_unary", encode)
        await attempt("unary_stream", generate)
        await attempt("stream_stream", session)
    return results


def expected_results(core: TokenizerCore) -> dict:
    return {
        "unary_unary": core.encode([TEXT]),
        "unary_stream": [[1], [2], [3]],
        "stream_stream": [[[4]], [[5]]],
    }


def every_kind(outcome) -> dict:
    return dict.fromkeys(RPC_KINDS, outcome)


def run_against_backends(core: TokenizerCore, channel_makers: dict) -> dict:
    async def scenario():
        servers, tokenizer_addr, scheduler_addr = await start_backends(core)
        try:
            return {
                name: await call_every_kind(make, tokenizer_addr, scheduler_addr)
                for name, make in channel_makers.items()
            }
        finally:
            await asyncio.gather(*(server.stop(None) for server in servers))

    return asyncio.run(scenario())


def test_mutual_tls_and_token_guard_every_rpc_kind(certs, core, clean_grpc):
    install_from_args(
        ServerArgs(
            grpc_tls_cert=certs.cert,
            grpc_tls_key=certs.key,
            grpc_tls_ca=certs.ca,
            grpc_auth_token=TOKEN,
        )
    )
    with_token = token_client_interceptors(TOKEN)
    outcomes = run_against_backends(
        core,
        {
            "installed": (grpc_util.aio_channel, installed_bidi),
            "no token": lambda addr: grpc.aio.secure_channel(addr, certs.client()),
            "wrong token": (
                lambda addr: grpc.aio.secure_channel(
                    addr, certs.client(), interceptors=token_client_interceptors("guess")
                ),
                bidi_with("guess"),
            ),
            "plaintext": (
                lambda addr: grpc.aio.insecure_channel(addr, interceptors=with_token),
                bidi_with(TOKEN),
            ),
            "no client cert": (
                lambda addr: grpc.aio.secure_channel(
                    addr, certs.client(cert=None), interceptors=with_token
                ),
                bidi_with(TOKEN),
            ),
            "client cert of another CA": (
                lambda addr: grpc.aio.secure_channel(
                    addr, certs.client(cert="rogue_cert", key="rogue_key"), interceptors=with_token
                ),
                bidi_with(TOKEN),
            ),
        },
    )
    assert outcomes == {
        "installed": expected_results(core),
        "no token": every_kind(grpc.StatusCode.UNAUTHENTICATED),
        "wrong token": every_kind(grpc.StatusCode.UNAUTHENTICATED),
        "plaintext": every_kind(grpc.StatusCode.UNAVAILABLE),
        "no client cert": every_kind(grpc.StatusCode.UNAVAILABLE),
        "client cert of another CA": every_kind(grpc.StatusCode.UNAVAILABLE),
    }


def test_token_from_the_environment_without_tls(core, clean_grpc, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    install_from_args(ServerArgs())
    assert (
        grpc_util.settings.channel_credentials is None
        and grpc_util.settings.server_credentials is None
    )
    outcomes = run_against_backends(
        core,
        {
            "installed": (grpc_util.aio_channel, installed_bidi),
            "no token": grpc.aio.insecure_channel,
        },
    )
    assert outcomes == {
        "installed": expected_results(core),
        "no token": every_kind(grpc.StatusCode.UNAUTHENTICATED),
    }


def test_tls_without_ca_asks_no_client_certificate(certs, core, clean_grpc):
    install_from_args(ServerArgs(grpc_tls_cert=certs.cert, grpc_tls_key=certs.key))
    outcomes = run_against_backends(
        core,
        {
            "server verified, no client cert": lambda addr: grpc.aio.secure_channel(
                addr, certs.client(cert=None)
            ),
            "plaintext": grpc.aio.insecure_channel,
        },
    )
    assert outcomes == {
        "server verified, no client cert": expected_results(core),
        "plaintext": every_kind(grpc.StatusCode.UNAVAILABLE),
    }


def test_gateway_public_api_needs_neither_token_nor_client_certificate(certs, clean_grpc):
    install_from_args(
        ServerArgs(
            grpc_tls_cert=certs.cert,
            grpc_tls_key=certs.key,
            grpc_tls_ca=certs.ca,
            grpc_auth_token=TOKEN,
        )
    )

    async def health():
        return True, "fake engine"

    async def scenario():
        server, port = await start_grpc_api(SimpleNamespace(health=health), "127.0.0.1:0")
        try:
            async with grpc.aio.secure_channel(
                f"127.0.0.1:{port}", certs.client(cert=None)
            ) as channel:
                answer = await gateway_pb2_grpc.GatewayStub(channel).Health(
                    gateway_pb2.GatewayHealthRequest(), timeout=10
                )
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                with pytest.raises(grpc.aio.AioRpcError) as plaintext:
                    await gateway_pb2_grpc.GatewayStub(channel).Health(
                        gateway_pb2.GatewayHealthRequest(), timeout=10
                    )
            return answer, plaintext.value.code()
        finally:
            await server.stop(None)

    answer, plaintext_code = asyncio.run(scenario())
    assert (answer.healthy, answer.detail) == (True, "fake engine")
    assert plaintext_code == grpc.StatusCode.UNAVAILABLE  # the public API is served over TLS too


class TokenRecorder(grpc.ServerInterceptor):
    """Notes each call's method and whether it carried the token."""

    def __init__(self):
        self.calls: list[tuple[str, bool]] = []

    def intercept_service(self, continuation, handler_call_details):
        sent = (TOKEN_METADATA_KEY, TOKEN) in tuple(handler_call_details.invocation_metadata or ())
        self.calls.append((handler_call_details.method.rsplit("/", 1)[-1], sent))
        return continuation(handler_call_details)


class RecordingBackends(FakeBackends):
    def __init__(self):
        self.recorder = TokenRecorder()
        super().__init__()

    def _serve(self, name, add, servicer) -> str:
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=8), interceptors=[self.recorder]
        )
        add(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        setattr(self, f"{name}_server", server)
        return f"127.0.0.1:{port}"


def test_gateway_sends_the_token_on_every_backend_call(clean_grpc):
    install_from_args(ServerArgs(grpc_auth_token=TOKEN))
    backends = RecordingBackends()
    gw = RunningGateway(backends)
    try:
        for stream in (False, True):
            r = httpx.post(
                gw.base_url + "/v1/chat/completions",
                timeout=30,
                json={"model": MODEL, "messages": MESSAGES, "max_tokens": 4, "stream": stream},
            )
            assert r.status_code == 200, r.text

        async def public_health():
            async with grpc.aio.insecure_channel(
                gw.grpc_addr
            ) as channel:  # no token: --api-key guards this API
                return await gateway_pb2_grpc.GatewayStub(channel).Health(
                    gateway_pb2.GatewayHealthRequest(), timeout=30
                )

        assert asyncio.run(public_health()).healthy
    finally:
        gw.close()
        backends.stop()
    calls = backends.recorder.calls
    assert {"ApplyChatTemplate", "Session", "DecodeStream"} <= {method for method, _ in calls}
    assert all(sent for _, sent in calls), calls


def test_no_flags_install_nothing(clean_grpc):
    install_from_args(ServerArgs())
    assert grpc_util.settings == grpc_util.GrpcSettings()


@pytest.mark.parametrize(
    "flags, message",
    [
        ({"grpc_tls_cert": "CERT"}, "missing --grpc-tls-key"),
        ({"grpc_tls_key": "KEY"}, "missing --grpc-tls-cert"),
        ({"grpc_tls_ca": "CA"}, "missing --grpc-tls-cert and --grpc-tls-key"),
        (
            {"grpc_tls_cert": "CERT", "grpc_tls_key": "/nonexistent/key.pem"},
            "cannot read --grpc-tls-key",
        ),
        (
            {"grpc_tls_cert": "NOT_PEM", "grpc_tls_key": "KEY"},
            "--grpc-tls-cert .* is not a PEM file",
        ),
    ],
)
def test_bad_tls_flags_stop_the_start(certs, clean_grpc, tmp_path, flags, message):
    (tmp_path / "not.pem").write_text("not a certificate")
    files = {
        "CERT": certs.cert,
        "KEY": certs.key,
        "CA": certs.ca,
        "NOT_PEM": str(tmp_path / "not.pem"),
    }
    args = ServerArgs(**{name: files.get(value, value) for name, value in flags.items()})
    with pytest.raises(SystemExit, match=message):
        install_from_args(args)
    with pytest.raises(SystemExit, match=message):
        launcher.start_services(args)  # before any child starts
    assert grpc_util.settings == grpc_util.GrpcSettings()


def test_half_given_tls_flags_exit_the_service_with_a_message(certs):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "radixserve.cli",
            "tokenizer",
            "--grpc-tls-cert",
            certs.cert,
            "--tokenizer-addr",
            "127.0.0.1:0",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "error: TLS between services needs --grpc-tls-cert and --grpc-tls-key" in result.stderr
    assert "Traceback" not in result.stderr


def test_secrets_stay_out_of_the_command_line():
    args = ServerArgs(grpc_auth_token=TOKEN, api_key="api-key-123")
    for secret, flag in ((TOKEN, "--grpc-auth-token"), ("api-key-123", "--api-key")):
        assert secret not in " ".join(args.to_cli()) and flag not in args.to_cli()
        assert secret not in " ".join(launcher.child_command("gateway", args))
    assert launcher.child_env(args)[TOKEN_ENV] == TOKEN
    assert launcher.child_env(args)["RADIXSERVE_API_KEY"] == "api-key-123"
    assert launcher.child_env(ServerArgs()) is None  # children inherit the launcher's environment


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_for_tokenizer(
    addr: str, interceptors, deadline: float
) -> tokenizer_pb2.TokenizerInfo:
    async with grpc.aio.insecure_channel(addr, interceptors=interceptors) as channel:
        stub = tokenizer_pb2_grpc.TokenizerStub(channel)
        while True:
            try:
                return await stub.GetInfo(tokenizer_pb2.TokenizerInfoRequest(), timeout=5)
            except grpc.aio.AioRpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE or time.time() > deadline:
                    raise
                await asyncio.sleep(0.2)


def test_launcher_hands_the_token_to_children_in_their_environment(monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    monkeypatch.setattr(launcher, "START_ORDER", ("tokenizer",))
    addr = f"127.0.0.1:{free_port()}"
    procs = launcher.start_services(
        ServerArgs(grpc_auth_token=TOKEN, tokenizer_addr=addr, log_level="warning")
    )
    try:
        pid = procs["tokenizer"].pid
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert b"tokenizer" in cmdline and not any(TOKEN.encode() in arg for arg in cmdline)
        assert f"{TOKEN_ENV}={TOKEN}".encode() in environ

        deadline = time.time() + 45
        info = asyncio.run(wait_for_tokenizer(addr, token_client_interceptors(TOKEN), deadline))
        assert info.vocab_size > 0
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            asyncio.run(wait_for_tokenizer(addr, None, deadline))
        assert (
            denied.value.code() == grpc.StatusCode.UNAUTHENTICATED
        )  # the child took the token from its env
    finally:
        launcher.stop_services(procs)
