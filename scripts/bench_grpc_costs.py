"""CPU cost of one gRPC exchange between two processes on this machine, as the services make them.

A client process sends --calls tiny messages one at a time to a server process (grpc.aio on uvloop,
as every service runs) and reads both processes' CPU time: microseconds per exchange on each side, for
  unary              one unary call (how Executor.Step and Detokenizer.Decode go),
  unary+thread       the handler answers from asyncio.to_thread (a hop to a worker thread and back),
  unary+token        the inter-service token's client and server interceptors (what `serve` installs),
  bidi               one write and one read on an open bidirectional stream,
  ordered            the same through common/ordered_stream.py with the inter-service token (how
                     Executor.Steps and Detokenizer.DecodeStream go: OrderedExchange.exchange on the
                     client, the token sent at the call's start as grpc_util.open_bidi does, the token
                     check and answer_in_order around the unary handler on the server).
Usage: python scripts/bench_grpc_costs.py [--calls 3000]   (prints one JSON line per case)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import resource
import subprocess
import sys
import time

import grpc
import uvloop

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from radixserve.common.grpc_security import (  # noqa: E402
    TOKEN_METADATA_KEY,
    TokenServerInterceptor,
    token_client_interceptors,
)
from radixserve.common.ordered_stream import OrderedExchange, answer_in_order  # noqa: E402

CASES = ("unary", "unary+thread", "unary+token", "bidi", "ordered")
TOKEN = "bench"
PAYLOAD = b"x" * 40  # about a one-token step's answer


def own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def process_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def serve(case: str, port: int) -> None:
    async def unary(request, context):
        if case == "unary+thread":
            return await asyncio.to_thread(lambda: request)
        return request

    async def bidi(requests, context):
        if case == "ordered":
            async for answer in answer_in_order(unary, requests, context):
                yield answer
            return
        async for request in requests:
            yield request

    tokens = case in ("unary+token", "ordered")
    server = grpc.aio.server(interceptors=[TokenServerInterceptor(TOKEN)] if tokens else None)
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.B", handlers),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


async def exchange(case: str, port: int, calls: int, server_pid: int) -> dict:
    tokens = case in ("unary+token", "ordered")
    interceptors = token_client_interceptors(TOKEN) if tokens else None
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", interceptors=interceptors) as ch:
        await ch.channel_ready()
        if case == "ordered":
            bidi = ch.stream_stream("/bench.B/Bidi")  # carries the token itself, as open_bidi does
            ordered = OrderedExchange(lambda: bidi(metadata=[(TOKEN_METADATA_KEY, TOKEN)]))

            async def one():
                await ordered.exchange(PAYLOAD)

        elif case == "bidi":
            stream = ch.stream_stream("/bench.B/Bidi")()

            async def one():
                await stream.write(PAYLOAD)
                await stream.read()
        else:
            call = ch.unary_unary("/bench.B/Unary")

            async def one():
                await call(PAYLOAD)

        for _ in range(200):  # warm-up
            await one()
        client0, server0, t0 = own_cpu_s(), process_cpu_s(server_pid), time.perf_counter()
        for _ in range(calls):
            await one()
        client1, server1, t1 = own_cpu_s(), process_cpu_s(server_pid), time.perf_counter()
    return {
        "case": case,
        "client_cpu_us": round((client1 - client0) / calls * 1e6),
        "server_cpu_us": round((server1 - server0) / calls * 1e6),
        "wall_us": round((t1 - t0) / calls * 1e6),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--calls", type=int, default=3000)
    p.add_argument("--port", type=int, default=31300)
    p.add_argument("--serve", choices=CASES, help=argparse.SUPPRESS)  # the server process
    a = p.parse_args()
    if a.serve:
        uvloop.run(serve(a.serve, a.port))
        return
    for i, case in enumerate(CASES):
        port = a.port + i
        server = subprocess.Popen([sys.executable, __file__, "--serve", case, "--port", str(port)])
        try:
            print(json.dumps(uvloop.run(exchange(case, port, a.calls, server.pid))), flush=True)
        finally:
            server.kill()
            server.wait()


if __name__ == "__main__":
    main()
