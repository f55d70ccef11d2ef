"""Security between the services: TLS (mutual with --grpc-tls-ca) and a shared token in gRPC metadata.

`install_from_args(args)`, the first thing each service's serve() does, installs both process-wide
through grpc_util.install. With no TLS flag and no token it installs nothing, so calls pay nothing.
The gateway's public gRPC API (a `public` server) is served over TLS without client certificates
and without the token: --api-key guards it.

`radixserve serve` always has a token (the launcher makes one up when none is given). A service started
alone on a non-loopback address must have the token or mutual TLS, or --insecure-internal
(check_internal_security, run by the CLI before the service starts).
"""

from __future__ import annotations

import collections
import hmac
import ipaddress
import os
from pathlib import Path

import grpc

from radixserve.common import grpc_util
from radixserve.common.args import FlagError, ServerArgs

TOKEN_ENV = "RADIXSERVE_GRPC_AUTH_TOKEN"
TOKEN_METADATA_KEY = "x-radixserve-grpc-token"


def auth_token(args: ServerArgs) -> str | None:
    """--grpc-auth-token, else $RADIXSERVE_GRPC_AUTH_TOKEN; an empty one is none."""
    return args.grpc_auth_token or os.environ.get(TOKEN_ENV) or None


def install_from_args(args: ServerArgs) -> None:
    """Install TLS credentials and the token interceptors the flags ask for; exits with a message on bad flags."""
    tls = TlsCredentials.from_args(args)
    token = auth_token(args)
    if tls is None and token is None:
        return
    grpc_util.install(
        client_interceptors=token_client_interceptors(token) if token else (),
        bidi_metadata=[(TOKEN_METADATA_KEY, token)] if token else (),
        sync_client_interceptors=[SyncTokenInterceptor(token)] if token else (),
        inter_service_interceptors=[TokenServerInterceptor(token)] if token else (),
        channel_credentials=tls and tls.channel,
        server_credentials=tls and tls.server,
        public_server_credentials=tls and tls.public_server,
    )


def listen_hosts(args: ServerArgs, service: str) -> list[str]:
    """The hosts a standalone service binds: the gateway its HTTP and public gRPC ones; an executor shard other
    than rank 0 (tensor parallelism) none, as it serves no gRPC."""
    if service == "gateway":
        return [args.host, args.grpc_host]
    if service == "executor" and args.tp_size > 1:
        rank = (
            args.tp_rank
            if args.tp_rank is not None
            else args.node_rank * (args.tp_size // max(args.nnodes, 1))
        )
        if rank != 0:
            return []
    return [
        addr.strip().rpartition(":")[0]
        for addr in getattr(args, f"{service}_addr").split(",")
        if addr.strip()
    ]


def is_loopback(host: str) -> bool:
    host = host.strip().strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name (other than localhost), 0.0.0.0 / :: (every interface) or empty


def check_internal_security(args: ServerArgs, service: str) -> None:
    """Refuse (FlagError) to start a service alone on a non-loopback address with nothing that authenticates
    the other services' calls, unless --insecure-internal: anyone who reaches its port could drive it (write
    KV through Executor.Step, abort every request through Scheduler.Abort). `radixserve serve` gives its
    services a token of its own when none is given."""
    if (
        args.insecure_internal
        or auth_token(args) is not None
        or (args.grpc_tls_ca and args.grpc_tls_cert)
    ):
        return
    exposed = [host or "*" for host in listen_hosts(args, service) if not is_loopback(host)]
    if exposed:
        raise FlagError(
            f"{service} would listen on {', '.join(dict.fromkeys(exposed))} (not loopback) and accept calls from "
            f"anyone who reaches it: give every service the same --grpc-auth-token (or ${TOKEN_ENV}; e.g. "
            f"`openssl rand -hex 32`), or mutual TLS (--grpc-tls-cert, --grpc-tls-key and --grpc-tls-ca); "
            f"--insecure-internal starts it unauthenticated anyway"
        )


class TlsCredentials:
    def __init__(self, cert_pem: bytes, key_pem: bytes, ca_pem: bytes | None):
        # With a CA, servers require client certificates signed by it (mutual TLS).
        self.server = grpc.ssl_server_credentials(
            [(key_pem, cert_pem)], root_certificates=ca_pem, require_client_auth=ca_pem is not None
        )
        self.public_server = grpc.ssl_server_credentials([(key_pem, cert_pem)])
        # Without a CA, clients verify servers against the system's roots.
        self.channel = grpc.ssl_channel_credentials(
            root_certificates=ca_pem, private_key=key_pem, certificate_chain=cert_pem
        )

    @classmethod
    def from_args(cls, args: ServerArgs) -> "TlsCredentials | None":
        cert, key, ca = args.grpc_tls_cert, args.grpc_tls_key, args.grpc_tls_ca
        if not (cert or key or ca):
            return None
        if not (cert and key):
            missing = [
                flag
                for flag, value in (("--grpc-tls-cert", cert), ("--grpc-tls-key", key))
                if not value
            ]
            raise SystemExit(
                f"error: TLS between services needs --grpc-tls-cert and --grpc-tls-key "
                f"(--grpc-tls-ca is optional); missing {' and '.join(missing)}"
            )
        return cls(
            read_pem(cert, "--grpc-tls-cert"),
            read_pem(key, "--grpc-tls-key"),
            read_pem(ca, "--grpc-tls-ca") if ca else None,
        )


def read_pem(path: str, flag: str) -> bytes:
    try:
        data = Path(path).expanduser().read_bytes()
    except OSError as e:
        raise SystemExit(f"error: cannot read {flag} {path}: {e.strerror}") from None
    if b"-----BEGIN " not in data:
        raise SystemExit(f"error: {flag} {path} is not a PEM file")
    return data


def _with_token(
    details: grpc.aio.ClientCallDetails, entry: tuple[str, str]
) -> grpc.aio.ClientCallDetails:
    metadata = grpc.aio.Metadata(*(details.metadata or ()))
    metadata.add(*entry)
    return details._replace(metadata=metadata)


class _UnaryUnaryToken(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, token: str):
        self.entry = (TOKEN_METADATA_KEY, token)

    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(_with_token(client_call_details, self.entry), request)


class _UnaryStreamToken(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, token: str):
        self.entry = (TOKEN_METADATA_KEY, token)

    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(_with_token(client_call_details, self.entry), request)


class _StreamUnaryToken(grpc.aio.StreamUnaryClientInterceptor):
    def __init__(self, token: str):
        self.entry = (TOKEN_METADATA_KEY, token)

    async def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return await continuation(_with_token(client_call_details, self.entry), request_iterator)


def token_client_interceptors(token: str) -> list:
    """One interceptor per RPC kind (a grpc.aio channel files each interceptor under one kind only) but
    bidirectional calls, which send the token themselves (grpc_util.open_bidi: such an interceptor would
    cost every streamed message a queue and a task)."""
    return [kind(token) for kind in (_UnaryUnaryToken, _UnaryStreamToken, _StreamUnaryToken)]


class _SyncCallDetails(
    collections.namedtuple(
        "_SyncCallDetails",
        ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression"),
    ),
    grpc.ClientCallDetails,
):
    pass


class SyncTokenInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """The token on every call of a blocking channel (grpc.intercept_channel; see grpc_util.channel)."""

    def __init__(self, token: str):
        self.entry = (TOKEN_METADATA_KEY, token)

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return _SyncCallDetails(
            details.method,
            details.timeout,
            [*(details.metadata or ()), self.entry],
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)


class TokenServerInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every call that does not carry the token with UNAUTHENTICATED."""

    def __init__(self, token: str):
        self.token = token.encode()

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        sent = next(
            (
                value
                for key, value in handler_call_details.invocation_metadata or ()
                if key == TOKEN_METADATA_KEY
            ),
            None,
        )
        if isinstance(sent, str) and hmac.compare_digest(sent.encode(), self.token):
            return handler
        return denying_handler(
            handler, grpc.StatusCode.UNAUTHENTICATED, "missing or wrong inter-service token"
        )


def denying_handler(
    handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str
) -> grpc.RpcMethodHandler:
    """A handler of the same kind as handler that ends every call with code."""

    async def deny(_request, context: grpc.aio.ServicerContext):
        await context.abort(code, message)

    serializers = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(deny, **serializers)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(deny, **serializers)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(deny, **serializers)
    return grpc.stream_stream_rpc_method_handler(deny, **serializers)
