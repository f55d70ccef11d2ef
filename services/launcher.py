"""`radixserve serve`: the five services as separate OS processes talking gRPC on loopback.

The launcher resolves the model once (converting a GGUF into the cache, with progress), starts
the services with the same flags, waits until the gateway's /health answers, and stops them all
when it is interrupted or when any of them exits.
"""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

from services.common.args import ServerArgs
from services.common.log import setup_logging
from services.common.model_files import default_model_name, resolve_model_path

# Start order: the slow one first, so it loads while the others start.
START_ORDER = ("executor", "scheduler", "tokenizer", "detokenizer", "gateway")
READY_TIMEOUT_S = 600

log = logging.getLogger("radixserve.launcher")


def _die_with_parent() -> None:
    """Child processes get SIGTERM if the launcher dies, even by SIGKILL (Linux prctl)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def child_command(service: str, args: ServerArgs) -> list[str]:
    return [sys.executable, "-m", "services.cli", service, *args.to_cli()]


def start_services(args: ServerArgs) -> dict[str, subprocess.Popen]:
    procs = {}
    for service in START_ORDER:
        if service in ("tokenizer", "detokenizer") and args.skip_tokenizer_init:
            continue
        procs[service] = subprocess.Popen(child_command(service, args), preexec_fn=_die_with_parent)
        log.info("started %s (pid %d)", service, procs[service].pid)
    return procs


def stop_services(procs: dict[str, subprocess.Popen], timeout: float = 10.0) -> None:
    for proc in procs.values():
        if proc.poll() is None:
            proc.terminate()
    deadline = time.time() + timeout
    for proc in procs.values():
        try:
            proc.wait(max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _healthy(args: ServerArgs) -> bool:
    try:
        with urllib.request.urlopen(f"http://{args.host}:{args.port}/health", timeout=30) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _exited(procs: dict[str, subprocess.Popen]) -> str | None:
    for name, proc in procs.items():
        if proc.poll() is not None:
            return f"{name} exited with code {proc.returncode}"
    return None


def launch(args: ServerArgs) -> int:
    setup_logging("launcher", args.log_level)
    original = args.model_path
    if args.load_format != "dummy" or args.model_path is None:
        args.model_path = str(resolve_model_path(original))
    if args.served_model_name is None:
        args.served_model_name = default_model_name(original)
    log.info("model %s from %s", args.served_model_name, args.model_path)

    stopping = False

    def on_signal(signum, _frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    procs = start_services(args)
    try:
        t0 = time.time()
        while not stopping and not _healthy(args):
            if (why := _exited(procs)) is not None:
                log.error("%s before the server was ready", why)
                return 1
            waited = time.time() - t0
            if waited > READY_TIMEOUT_S:
                log.error("not ready after %ds", READY_TIMEOUT_S)
                return 1
            if int(waited) // 10 != int(waited - 0.5) // 10:
                log.info("waiting for the services to come up (%.0fs)", waited)
            time.sleep(0.5)
        if not stopping:
            log.info("ready in %.1fs: OpenAI API at http://%s:%d/v1, gRPC API at %s:%d",
                      time.time() - t0, args.host, args.port, args.grpc_host, args.gateway_grpc_port)
            print(f"radixserve ready: http://{args.host}:{args.port}/v1", flush=True)
        while not stopping:
            if (why := _exited(procs)) is not None:
                log.error("%s; stopping the server", why)
                return 1
            time.sleep(0.5)
        log.info("shutting down")
        return 0
    finally:
        stop_services(procs)
