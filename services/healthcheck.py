"""`radixserve healthcheck SERVICE`: exit 0 when the service answers a real call, 1 when it does not.

For container healthchecks (compose.yaml) and Kubernetes exec probes. Each check makes a call that
exercises the service, not a bare port probe:

- gateway: `GET /health` on its HTTP port, itself a one-token generation through every stage;
- tokenizer: `Encode` of a short text;
- detokenizer: `Decode` of one token;
- scheduler: `GetInfo` (it answers while it waits for a restarting executor: the gateway's /health
  reports that; a scheduler that cannot answer is the one to restart);
- executor: `GetModelInfo`.

The address is `--addr HOST:PORT`, else 127.0.0.1 and the port of the service's own address flag
(`--tokenizer-addr` ..., the gateway's `--port`): inside a container or pod, the process next door.
The check reads the same flags and RADIXSERVE_* environment as the service, so the inter-service
token and TLS settings apply; under TLS the server name checked is the host of the service's address
flag (`dns:///tokenizer:30011` -> `tokenizer`) unless `--tls-server-name` says otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import sys
import time
import urllib.error
import urllib.request

from radixserve.common.args import ServerArgs

DEFAULT_TIMEOUT_S = 20.0


def strip_scheme(addr: str) -> str:
    """host:port of the first entry of an address flag: `dns:///h:1,h2:1` -> `h:1`, `ipv4:1.2.3.4:1` -> ..."""
    first = addr.split(",")[0].strip()
    if first.startswith("dns:"):
        first = first[len("dns:") :].lstrip("/")
        if "/" in first:  # dns://authority/host:port
            first = first.split("/", 1)[1]
    for scheme in ("ipv4:", "ipv6:"):
        if first.startswith(scheme):
            first = first[len(scheme) :]
    return first


def split_host_port(addr: str) -> tuple[str, int]:
    host, _, port = strip_scheme(addr).rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"not a host:port address: {addr!r}")
    return host.strip("[]"), int(port)


def configured_addr(args: ServerArgs, service: str) -> str:
    if service == "gateway":
        return f"{args.host}:{args.port}"
    return getattr(args, f"{service}_addr")


def probe_addr(args: ServerArgs, service: str, addr: str | None) -> str:
    """--addr, else 127.0.0.1 at the port of the service's own address."""
    if addr:
        return strip_scheme(addr)
    return f"127.0.0.1:{split_host_port(configured_addr(args, service))[1]}"


def tls_server_name(args: ServerArgs, service: str, override: str | None) -> str | None:
    """The name the service's certificate is checked against: its configured host when that is a name."""
    if override:
        return override
    host = split_host_port(configured_addr(args, service))[0]
    try:
        ipaddress.ip_address(host)
        return None
    except ValueError:
        return None if host == "localhost" else host


def check_gateway(addr: str, timeout: float) -> str:
    try:
        with urllib.request.urlopen(f"http://{addr}/health", timeout=timeout) as resp:
            return f"HTTP {resp.status}"
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"HTTP {e.code}: {e.read(500).decode(errors='replace')}") from None
    except (urllib.error.URLError, OSError) as e:
        raise RuntimeError(str(getattr(e, "reason", e))) from None


async def check_grpc(service: str, addr: str, timeout: float, server_name: str | None) -> str:
    import grpc

    from radixserve.v1 import (
        detokenizer_pb2,
        detokenizer_pb2_grpc,
        executor_pb2,
        executor_pb2_grpc,
        scheduler_pb2,
        scheduler_pb2_grpc,
        tokenizer_pb2,
        tokenizer_pb2_grpc,
    )
    from radixserve.common import grpc_util

    settings = grpc_util.settings
    interceptors = list(settings.client_interceptors) or None
    if settings.channel_credentials is not None:
        options = grpc_util.channel_options()
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        channel = grpc.aio.secure_channel(
            addr, settings.channel_credentials, options=options, interceptors=interceptors
        )
    else:
        channel = grpc.aio.insecure_channel(
            addr, options=grpc_util.channel_options(), interceptors=interceptors
        )
    try:
        if service == "tokenizer":
            reply = await tokenizer_pb2_grpc.TokenizerStub(channel).Encode(
                tokenizer_pb2.TokenizerEncodeRequest(texts=["health"]), timeout=timeout
            )
            if len(reply.results) != 1 or not reply.results[0].ids:
                raise RuntimeError("Encode returned no token ids")
            return f"Encode -> {len(reply.results[0].ids)} token ids"
        if service == "detokenizer":
            item = detokenizer_pb2.DetokenizerDecodeItem(
                request_id="healthcheck", new_token_ids=[0], final=True
            )
            reply = await detokenizer_pb2_grpc.DetokenizerStub(channel).Decode(
                detokenizer_pb2.DetokenizerDecodeRequest(items=[item]), timeout=timeout
            )
            if len(reply.results) != 1 or reply.results[0].request_id != "healthcheck":
                raise RuntimeError("Decode returned no result")
            return "Decode -> 1 result"
        if service == "scheduler":
            info = await scheduler_pb2_grpc.SchedulerStub(channel).GetInfo(
                scheduler_pb2.SchedulerInfoRequest(), timeout=timeout
            )
            state = "executor unavailable" if info.executor_unavailable else "executor available"
            return (
                f"GetInfo -> {info.architecture}, {info.running_requests} running, "
                f"{info.waiting_requests} waiting, {state}"
            )
        if service == "executor":
            info = await executor_pb2_grpc.ExecutorStub(channel).GetModelInfo(
                executor_pb2.ExecutorModelInfoRequest(), timeout=timeout
            )
            return f"GetModelInfo -> {info.architecture} on {info.device}, {info.kv_slots} KV slots"
        raise ValueError(f"unknown service {service!r}")
    except grpc.aio.AioRpcError as e:
        hint = ""
        if e.code() == grpc.StatusCode.UNAUTHENTICATED:
            hint = (
                " (give the check the services' token: --grpc-auth-token or $RADIXSERVE_GRPC_AUTH_TOKEN; "
                "`radixserve serve` makes one up unless given one)"
            )
        raise RuntimeError(f"{e.code().name}: {e.details()}{hint}") from None
    finally:
        await channel.close()


def check(
    args: ServerArgs,
    service: str,
    addr: str | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
    server_name: str | None = None,
) -> tuple[bool, str]:
    """(healthy, what was seen) for the service at addr (see probe_addr)."""
    target = probe_addr(args, service, addr)
    t0 = time.perf_counter()
    try:
        if service == "gateway":
            detail = check_gateway(target, timeout)
        else:
            from radixserve.common import grpc_util
            from radixserve.common.grpc_security import install_from_args

            saved = (
                grpc_util.settings
            )  # the check's token and TLS settings apply to its own call only
            grpc_util.reset()
            try:
                install_from_args(args)
                detail = asyncio.run(
                    check_grpc(
                        service, target, timeout, tls_server_name(args, service, server_name)
                    )
                )
            finally:
                grpc_util.settings = saved
    except (RuntimeError, ValueError) as e:
        return False, f"{service} at {target}: unhealthy: {e}"
    return (
        True,
        f"{service} at {target}: healthy ({detail}, {1000 * (time.perf_counter() - t0):.0f} ms)",
    )


def add_arguments(parser: argparse.ArgumentParser, services: tuple[str, ...]) -> None:
    parser.add_argument("target", metavar="SERVICE", choices=services, help="the service to check")
    parser.add_argument(
        "--addr",
        default=None,
        help="HOST:PORT to call (default: 127.0.0.1 and the port of the service's own address "
        "flag; the gateway's HTTP --port)",
    )
    parser.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds to wait for the answer"
    )
    parser.add_argument(
        "--tls-server-name",
        default=None,
        help="name to check the service's TLS certificate against "
        "(default: the host of its address flag)",
    )


def main(args: ServerArgs, ns: argparse.Namespace) -> int:
    healthy, message = check(args, ns.target, ns.addr, ns.timeout, ns.tls_server_name)
    print(message, file=sys.stdout if healthy else sys.stderr, flush=True)
    return 0 if healthy else 1
