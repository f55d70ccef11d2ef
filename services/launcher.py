"""`radixserve serve`: the five services as separate OS processes talking gRPC on loopback.

The launcher resolves the model once (converting a GGUF into the cache, with progress), starts
the services with the same flags (one tokenizer or detokenizer process per address of
--tokenizer-addr / --detokenizer-addr, which take comma-separated lists of local addresses) and
waits until the gateway's /health answers. A service that exits before that stops the launch
(exit code 1): a bad flag or model fails fast instead of crash-looping.

Once ready, a service that dies is restarted with the same command, after a backoff that grows
with quick crashes in a row; after too many the launcher stops everything and exits 1 (see
supervisor.py). Only the dead service is restarted: the gateway keeps running, and its /health
answers 503 until the stack works again.

With --dp-size N > 1 the scheduler and the executor run N times (replicas "scheduler", "scheduler-dp1", ...,
"executor", "executor-dp1", ...): replica i listens at the i-th address of --scheduler-addr /
--executor-addr (or the one given, its port + i * DP_PORT_STRIDE), its executor takes the GPUs from
--base-gpu-id + i * tp_size on, and each process is restarted on its own like any other. The gateway
routes requests over the replicas' schedulers.

With --tp-size > 1 the executor process starts its tensor-parallel shards itself and exits if one
dies (see services/executor/shard_group.py), so the executor restarts as a whole. On a node other than
0 (--node-rank k > 0) only the executor runs: its shards join node 0's group, and it is ready once
started (node 0's gateway answers for the server).

The services accept only calls that carry the inter-service token (--grpc-auth-token, or
$RADIXSERVE_GRPC_AUTH_TOKEN); without one the launcher makes one up for the launch. Children get it in
their environment, never on their command line (argv shows in `ps`).

SIGTERM or SIGINT stops the gateway first and gives it --shutdown-timeout (plus a margin) to drain
its requests, then stops the other services; the launcher exits 0 with no child left.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

from radixserve.common.args import ServerArgs, env_name, replica_args, replica_name
from radixserve.common.grpc_security import TOKEN_ENV, TlsCredentials, auth_token
from radixserve.common.log import setup_logging
from radixserve.common.phase_clock import PhaseClock
from radixserve.common.model_files import default_model_name, resolve_model_path
from radixserve.common.model_hub import HubModelError, is_hub_id
from radixserve.gateway.pipeline.replicas import parse_addrs
from radixserve.supervisor import ProcessSpec, Supervisor, stop_processes

# Start order: the slow one first, so it loads while the others start.
START_ORDER = ("executor", "scheduler", "tokenizer", "detokenizer", "gateway")
REPLICATED = ("tokenizer", "detokenizer")  # stateless: one process per address of their flag
DATA_PARALLEL = ("executor", "scheduler")  # one pair per --dp-size replica
READY_TIMEOUT_S = 600
# One readiness probe (/health: a one-token generation); short, so that a probe sent before every
# service was up, or queued behind early traffic, does not hide for long that the server is ready.
READY_PROBE_TIMEOUT_S = 5.0
POLL_S = 0.2
GATEWAY_STOP_MARGIN_S = 10.0  # past --shutdown-timeout, for the gateway's own shutdown
STOP_TIMEOUT_S = 10.0  # for the other services

log = logging.getLogger("radixserve.launcher")


def child_command(service: str, args: ServerArgs) -> list[str]:
    return [sys.executable, "-m", "radixserve.cli", service, *args.to_cli()]


def ensure_internal_token(args: ServerArgs) -> None:
    """Without --grpc-auth-token or $RADIXSERVE_GRPC_AUTH_TOKEN, a random token of this launch, so that the
    services answer only each other (and whoever is given the token) even on loopback; the children get it
    in their environment (child_env), never on their command line."""
    if auth_token(args) is None:
        args.grpc_auth_token = secrets.token_urlsafe(32)
        log.info(
            "services authenticate each other with a token made up for this launch (choose one with "
            "--grpc-auth-token or $%s to call them directly)",
            TOKEN_ENV,
        )


def child_env(args: ServerArgs) -> dict[str, str] | None:
    """Secrets (the inter-service token, the API key) go to the children in their environment, as
    RADIXSERVE_<FLAG>: argv shows in `ps`. None: they inherit the launcher's."""
    secrets = {
        env_name(f.name): getattr(args, f.name)
        for f in dataclasses.fields(args)
        if f.metadata.get("secret") and getattr(args, f.name)
    }
    return {**os.environ, **secrets} if secrets else None


def service_specs(args: ServerArgs) -> list[ProcessSpec]:
    """The processes to run, in START_ORDER; replicas are named tokenizer, tokenizer-2, ..."""
    env = child_env(args)
    if args.node_rank > 0:
        return [ProcessSpec("executor", child_command("executor", args), env)]
    specs = []
    for service in START_ORDER:
        if service in DATA_PARALLEL:
            for i in range(args.dp_size):
                specs.append(
                    ProcessSpec(
                        replica_name(service, i), child_command(service, replica_args(args, i)), env
                    )
                )
            continue
        if service not in REPLICATED:
            specs.append(ProcessSpec(service, child_command(service, args), env))
            continue
        if args.skip_tokenizer_init:
            continue
        addrs = parse_addrs(getattr(args, f"{service}_addr"))
        for i, addr in enumerate(addrs):
            own = (
                args if len(addrs) == 1 else dataclasses.replace(args, **{f"{service}_addr": addr})
            )
            specs.append(
                ProcessSpec(
                    service if i == 0 else f"{service}-{i + 1}", child_command(service, own), env
                )
            )
    return specs


def start_services(args: ServerArgs) -> dict[str, subprocess.Popen]:
    TlsCredentials.from_args(
        args
    )  # half-given or unreadable TLS flags stop here, before any child starts
    return {spec.name: spec.spawn() for spec in service_specs(args)}


def stop_services(procs: dict[str, subprocess.Popen], timeout: float = STOP_TIMEOUT_S) -> None:
    stop_processes(procs, timeout)


def _healthy(args: ServerArgs) -> bool:
    if args.node_rank > 0:
        return True  # shards only: node 0's gateway reports the server's health
    try:
        with urllib.request.urlopen(
            f"http://{args.host}:{args.port}/health", timeout=READY_PROBE_TIMEOUT_S
        ) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _resolve_model(args: ServerArgs, original: str | None, hub: dict) -> None:
    """The model (and a hub-id tokenizer) as local folders, for the services: converted, downloaded or looked up."""
    if args.load_format != "dummy" or args.model_path is None or is_hub_id(original):
        args.model_path = str(
            resolve_model_path(original, **hub, weights=args.load_format != "dummy")
        )
    if is_hub_id(args.tokenizer_path):
        # --revision belongs to the model: it applies to a tokenizer id only when that is the model's id.
        revision = args.revision if args.tokenizer_path == original else None
        args.tokenizer_path = str(
            resolve_model_path(args.tokenizer_path, revision, args.download_dir, weights=False)
        )


def launch(args: ServerArgs) -> int:
    setup_logging("launcher", args.log_level)
    original = args.model_path
    hub = {"revision": args.revision, "download_dir": args.download_dir}
    clock = PhaseClock()
    # A hub id is resolved here once, even for dummy weights (its config and tokenizer, then), and the
    # services get the local folder; the served name stays the id.
    try:
        with clock.phase("resolve/convert model"):
            _resolve_model(args, original, hub)
    except HubModelError as e:
        log.error("%s", e)
        return 1
    if args.served_model_name is None:
        args.served_model_name = default_model_name(original, **hub)
    log.info("model %s from %s", args.served_model_name, args.model_path)

    stopping = False

    def on_signal(signum, _frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    ensure_internal_token(args)
    supervisor = Supervisor(service_specs(args), start_services(args))
    try:
        t0 = time.time()
        while not stopping and not _healthy(args):
            if (why := supervisor.first_failed_start() or supervisor.check()) is not None:
                log.error("%s before the server was ready", why)
                return 1
            waited = time.time() - t0
            if waited > READY_TIMEOUT_S:
                log.error("not ready after %ds", READY_TIMEOUT_S)
                return 1
            if int(waited) // 10 != int(waited - 0.5) // 10:
                log.info("waiting for the services to come up (%.0fs)", waited)
            time.sleep(0.5)
        if not stopping and args.node_rank > 0:
            log.info(
                "node %d of %d: executor shards started; they join %s",
                args.node_rank,
                args.nnodes,
                args.dist_init_addr,
            )
        elif not stopping:
            clock.phases.append(
                ("services up (the executor's phases: its `startup:` line)", time.time() - t0)
            )
            log.info(
                "ready: OpenAI API at http://%s:%d/v1, gRPC API at %s:%d; start: %s",
                args.host,
                args.port,
                args.grpc_host,
                args.gateway_grpc_port,
                clock.summary(),
            )
            print(f"radixserve ready: http://{args.host}:{args.port}/v1", flush=True)
        while not stopping:
            if (why := supervisor.check()) is not None:
                log.error("%s; stopping the server", why)
                return 1
            time.sleep(POLL_S)
        log.info(
            "shutting down: the gateway drains its requests (up to %gs), then the other services stop",
            args.shutdown_timeout,
        )
        return 0
    finally:
        supervisor.stop("gateway", args.shutdown_timeout + GATEWAY_STOP_MARGIN_S, STOP_TIMEOUT_S)
