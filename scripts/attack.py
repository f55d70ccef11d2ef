"""Run the attacks of issue 17 (hardening) against a running radixserve server, from outside, and say
for each what was sent, what came back and whether the answer was bounded (in time and size) and correct.

Usage: python scripts/attack.py --base-url http://127.0.0.1:30000
           [--grpc-scheduler 127.0.0.1:30012 --grpc-executor 127.0.0.1:30013 [--grpc-token T]]
           [--api-key K] [--only NAME ...] [--json FILE] [--watch-local] [sizes and time caps, see --help]

Attacks (names for --only; issue 17's defect numbers in brackets):
  grammar            [1] after a warm-up constraint (it starts the server's compiler): json_schema with a
                     100,000-string enum (twice, 3 s client timeout); schemas nested 150 and 1,000 deep; a
                     47-byte schema that compiles for minutes ("[a-z]{1,2xxxx}"), sent 4 times with a 3 s
                     client timeout (the client gives up), then once waiting for the server's answer (a 400
                     naming --grammar-compile-timeout; or, where the server's --request-timeout is shorter, a
                     200 whose choice ended "abort" at that timeout), then once more (a failure the server
                     remembers should be answered at once)
  amplification      [2] /v1/completions with prompt ["a"] * 800 and n 128 (102,400 sequences), repeated
                     for --repeat-seconds; then, when the server has --request-timeout, a big but allowed
                     request (32 sequences of 512 tokens) that must end at that timeout and leave the
                     scheduler's queues (its probe is information only: an allowed load, not an attack)
  slow-headers       [3] many sockets (300) that never finish their request head, trickling a header line
                     a second, as slowloris does: the server should close them
  huge-header        [3] one header streamed up to 200 MB (the server should answer 431 early and close),
                     and a head of 1,000 small headers, each repeated for --repeat-seconds
  internal           [4] with --grpc-scheduler / --grpc-executor: Executor.Step, Scheduler.Generate and
                     Scheduler.Abort(abort_all) without a token (expected: UNAUTHENTICATED), with a wrong
                     token, and with --grpc-token: GetInfo and a small Generate (OK), Executor.Step outside
                     the scheduler's step session (FAILED_PRECONDITION)
  n-over-queue       [5] chat with n above --max-queued-requests (expected: 400 without Retry-After)
  upload-disconnect  [6] clients that close (or reset) the connection halfway through their body upload;
                     only the client side is seen here (the server's log is checked by the test suite)
  null-content       [8] chat messages whose content is null or missing (expected: 400)
Defects 7 (SIGTERM drain), 9 (start-up back-off) and 10 (idle keepalive) need control of the server's
processes; the test suite covers them (tests/e2e/test_drain.py, tests/e2e/test_internal_auth.py).

During grammar, amplification, slow-headers and huge-header a probe thread polls GET /health and sends a
small chat (max_tokens 4) back to back; its line gives the number of answers, any non-200 (a 200 whose
choice was aborted counts as one) and the largest latency; it passes when all are 200 and the chat's
latency stays under --probe-max-latency. With --watch-local it adds the RSS and CPU time of the radixserve
processes on this machine and of the script itself (which competes for the CPU when run on the server).

WARNING: against an unprotected server the internal attack really writes KV slots through Executor.Step
and aborts every request (Abort abort_all); the other attacks cost the server what they cost. Run it on a
server you own. Every attack has its own time cap and the script closes every socket it opens.

Between attacks the script waits (up to 15 s) for the scheduler to be idle (/get_server_info), so that
one attack's work does not count against the next.

Output: one line per case: PASS / FAIL / INFO / SKIP, the case, what was sent, what came back. Exit
status 1 when any case failed, 2 when the server cannot be reached or an attack overran its time cap (the
script then stops).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import resource
import select
import selectors
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from urllib.parse import urlsplit

import httpx

TOKEN_METADATA_KEY = "x-radixserve-grpc-token"  # radixserve.common.grpc_security.TOKEN_METADATA_KEY
ATTACKS = (
    "grammar",
    "amplification",
    "slow-headers",
    "huge-header",
    "internal",
    "n-over-queue",
    "upload-disconnect",
    "null-content",
)
MESSAGES = [{"role": "user", "content": "Say hi."}]
OVERRUN_GRACE_S = 60.0  # past an attack's cap by this much, the watchdog stops the script


# ---- results ----


@dataclass
class Result:
    attack: str
    case: str
    sent: str
    got: str
    seconds: float | None = None  # time to the answer (or to the end of the case)
    bounded: bool | None = None
    correct: bool | None = None
    status: str = ""  # pass | fail | info | skip
    details: dict = field(default_factory=dict)

    def __post_init__(self):
        if not self.status:
            self.status = "pass" if self.bounded and self.correct else "fail"

    def line(self) -> str:
        timing = "" if self.seconds is None else f" in {self.seconds:.2f} s"
        verdict = (
            ""
            if self.status in ("info", "skip")
            else f" [{'bounded' if self.bounded else 'NOT BOUNDED'}, {'correct' if self.correct else 'NOT CORRECT'}]"
        )
        return f"{self.status.upper():4} {self.attack}/{self.case}: sent {self.sent} -> {self.got}{timing}{verdict}"


class Report:
    def __init__(self, json_path: str | None):
        self.results: list[Result] = []
        self.json_file = (
            None
            if json_path is None
            else (sys.stdout if json_path == "-" else open(json_path, "w"))
        )
        self.lock = threading.Lock()

    def add(self, result: Result) -> Result:
        with self.lock:
            self.results.append(result)
            if self.json_file is not sys.stdout:
                print(result.line(), flush=True)
            if self.json_file is not None:
                self.json_file.write(json.dumps(asdict(result)) + "\n")
                self.json_file.flush()
        return result

    def close(self) -> None:
        if self.json_file not in (None, sys.stdout):
            self.json_file.close()


# ---- HTTP helpers ----


@dataclass
class Answer:
    status: int | None  # None: no answer (the client's timeout or a transport error)
    seconds: float
    code: str | None = None
    message: str = ""
    body: object = None
    headers: dict = field(default_factory=dict)
    failure: str = ""  # why there is no answer

    def describe(self, limit: int = 110) -> str:
        if self.status is None:
            return self.failure
        text = f"{self.status}"
        if isinstance(self.body, dict) and isinstance(self.body.get("choices"), list):
            reasons = Counter(
                c.get("finish_reason") for c in self.body["choices"] if isinstance(c, dict)
            )
            text += " finish_reason " + ", ".join(
                f"{r}" + (f" x{n}" if n > 1 else "") for r, n in reasons.items()
            )
        if self.code:
            text += f" {self.code}"
        if self.message:
            msg = self.message if len(self.message) <= limit else self.message[:limit] + "..."
            text += f' "{msg}"'
        return text

    @property
    def openai_error(self) -> bool:
        """A 4xx/5xx with OpenAI's {"error": {message, type, param, code}}."""
        error = self.body.get("error") if isinstance(self.body, dict) else None
        return isinstance(error, dict) and {"message", "type", "param", "code"} <= set(error)


class Target:
    """The server under attack: its URL, the client's headers, the model, and what /get_server_info says."""

    def __init__(self, args):
        self.args = args
        self.base_url = args.base_url.rstrip("/")
        parts = urlsplit(self.base_url)
        self.tls = parts.scheme == "https"
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if self.tls else 80)
        self.headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        self.client = httpx.Client(
            base_url=self.base_url,
            headers=self.headers,
            timeout=30,
            limits=httpx.Limits(max_connections=8, max_keepalive_connections=4),
        )
        self.model = args.model or self._first_model()
        self.server_args = self._server_info() or {}

    def close(self) -> None:
        self.client.close()

    def _first_model(self) -> str:
        try:
            resp = self.client.get("/v1/models", timeout=10)
            return resp.json()["data"][0]["id"]
        except Exception:  # noqa: BLE001 - any server: fall back to a name servers with one model accept
            return "default"

    def _server_info(self) -> dict | None:
        try:
            resp = self.client.get("/get_server_info", timeout=10)
            return resp.json() if resp.status_code == 200 else None
        except Exception:  # noqa: BLE001 - not a radixserve server, or not reachable: flags unknown
            return None

    def queue_counts(self) -> tuple[int, int] | None:
        """The scheduler's (running, waiting) requests from /get_server_info; None when unavailable."""
        info = self._server_info()
        if not info or not isinstance(info.get("scheduler"), dict):
            return None
        sched = info["scheduler"]
        return int(sched.get("running_requests", 0)), int(sched.get("waiting_requests", 0))

    def post(
        self, path: str, body: dict | bytes, timeout: float, client: httpx.Client | None = None
    ) -> Answer:
        """body: JSON, or a JSON text already encoded."""
        started = time.monotonic()
        try:
            if isinstance(body, bytes):
                resp = (client or self.client).post(
                    path,
                    content=body,
                    timeout=timeout,
                    headers={"Content-Type": "application/json"},
                )
            else:
                resp = (client or self.client).post(path, json=body, timeout=timeout)
        except httpx.TimeoutException:
            return Answer(
                None,
                time.monotonic() - started,
                failure=f"no answer within the client's {timeout:g} s",
            )
        except httpx.HTTPError as e:
            return Answer(None, time.monotonic() - started, failure=f"{type(e).__name__}: {e}")
        return answer_of(resp, time.monotonic() - started)

    def chat(self, timeout: float, client: httpx.Client | None = None, **fields) -> Answer:
        body = {"model": self.model, "messages": MESSAGES, "max_tokens": 8, **fields}
        return self.post("/v1/chat/completions", body, timeout, client)

    def connect(self, timeout: float = 5.0) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout=timeout)
        if self.tls:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            sock = context.wrap_socket(sock, server_hostname=self.host)
        return sock

    def head_prefix(self, method: str = "GET", path: str = "/health") -> bytes:
        lines = [
            f"{method} {path} HTTP/1.1",
            f"Host: {self.host}:{self.port}",
            "User-Agent: radixserve-attack",
        ]
        lines += [f"{k}: {v}" for k, v in self.headers.items()]
        return ("\r\n".join(lines) + "\r\n").encode()


def answer_of(resp: httpx.Response, seconds: float) -> Answer:
    try:
        body = resp.json()
    except ValueError:
        body = resp.text[:300]
    code, message = None, ""
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        code = body["error"].get("code") or body["error"].get("type")
        message = str(body["error"].get("message", ""))
    return Answer(resp.status_code, seconds, code, message, body, dict(resp.headers))


def status_line(data: bytes) -> int | None:
    """The status code of an HTTP/1.1 response's first line, or None."""
    first = data.split(b"\r\n", 1)[0].split()
    if len(first) >= 2 and first[0].startswith(b"HTTP/") and first[1].isdigit():
        return int(first[1])
    return None


def mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} KB"


# ---- the probe: /health and a small chat while an attack runs ----

SERVICES = ("gateway", "tokenizer", "scheduler", "executor", "detokenizer")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def local_services() -> dict[str, dict[str, float]]:
    """RSS (MB) and CPU time used so far (s) of each radixserve service process on this machine, by service
    name (for --watch-local); with "grammar": the scheduler's grammar compiler processes (a zygote and the
    workers it forks; "procs" counts them, "ticks" gives each one's CPU ticks by pid) and "attack": this
    script's own CPU time."""
    try:
        out = subprocess.run(
            ["ps", "-eo", "pid=,rss=,args="], capture_output=True, text=True, timeout=10
        ).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    found: dict[str, dict[str, float]] = {}
    for line in out.splitlines():
        pid, rss, *cmd = line.split()
        name = None
        if "radixserve.cli" in cmd and len(cmd) > cmd.index("radixserve.cli") + 1:
            name = cmd[cmd.index("radixserve.cli") + 1]
        elif any("grammar_worker" in part for part in cmd):
            name = "grammar"
        if name not in (*SERVICES, "grammar"):
            continue
        try:
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
            ticks = int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            ticks = 0
        entry = found.setdefault(name, {"rss_mb": 0.0, "cpu_s": 0.0, "procs": 0, "ticks": {}})
        entry["rss_mb"] += int(rss) / 1024
        entry["cpu_s"] += ticks / CLOCK_TICKS
        entry["procs"] += 1
        entry["ticks"][pid] = ticks
    times = os.times()
    found["attack"] = {
        "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "cpu_s": times.user + times.system,
        "procs": 1,
    }
    return found


class Probe(threading.Thread):
    """Back to back: GET /health (5 s timeout) and a chat of max_tokens 4 (30 s timeout); with --watch-local,
    the largest RSS seen of each local radixserve service and the CPU time each (and this script) used."""

    def __init__(self, target: Target):
        super().__init__(daemon=True, name="probe")
        self.target = target
        self.stopping = threading.Event()
        self.started_round = threading.Event()
        self.health: list[tuple[int | str, float]] = []
        self.chats: list[tuple[int | str, float]] = []
        self.local_before = local_services() if target.args.watch_local else {}
        self.rss_max = {name: v["rss_mb"] for name, v in self.local_before.items()}
        self.compilers_max = self.local_before.get("grammar", {}).get("procs", 0)
        # CPU ticks of each compiler process as last seen: a worker killed between two rounds keeps its last figure
        self.compiler_ticks: dict[str, int] = dict(
            self.local_before.get("grammar", {}).get("ticks", {})
        )
        self.compiler_ticks_before = sum(self.compiler_ticks.values())
        self.wall_started = time.monotonic()

    def run(self) -> None:
        target = self.target
        with httpx.Client(
            base_url=target.base_url, headers=target.headers, limits=httpx.Limits(max_connections=2)
        ) as client:
            while True:  # at least one round, begun before the attack
                self.started_round.set()
                started = time.monotonic()
                try:
                    status: int | str = client.get("/health", timeout=5).status_code
                except httpx.HTTPError as e:
                    status = type(e).__name__
                self.health.append((status, time.monotonic() - started))
                answer = target.chat(30, client, max_tokens=4)
                status = answer.status if answer.status is not None else "no answer"
                if status == 200 and "abort" in answer.describe():
                    status = "200 finish_reason abort"
                self.chats.append((status, answer.seconds))
                if target.args.watch_local:
                    for name, v in local_services().items():
                        self.rss_max[name] = max(v["rss_mb"], self.rss_max.get(name, 0))
                        if name == "grammar":
                            self.compilers_max = max(self.compilers_max, v["procs"])
                            self.compiler_ticks.update(v["ticks"])
                if self.stopping.wait(target.args.probe_interval):
                    break

    def stop(self) -> None:
        self.stopping.set()
        self.join(60)

    def result(self, attack: str, counts: bool = True) -> Result:
        def summary(samples: list[tuple[int | str, float]]) -> tuple[str, list]:
            bad = Counter(s for s, _ in samples if s != 200)
            worst = max((t for _, t in samples), default=0.0)
            text = f"{len(samples) - sum(bad.values())}/{len(samples)} x 200, max {worst:.2f} s"
            if bad:
                text += f", non-200: {dict(bad)}"
            return text, sorted(bad.items(), key=str)

        health_text, health_bad = summary(self.health)
        chat_text, chat_bad = summary(self.chats)
        chat_max = max((t for _, t in self.chats), default=0.0)
        limit = self.target.args.probe_max_latency
        correct = bool(self.chats) and not health_bad and not chat_bad
        bounded = chat_max < limit
        got = f"/health {health_text}; chat (max_tokens 4) {chat_text}"
        details = {"health": self.health, "chats": self.chats, "chat_max_s": chat_max}
        if self.target.args.watch_local:
            wall = time.monotonic() - self.wall_started
            after = local_services()
            self.compiler_ticks.update(after.get("grammar", {}).get("ticks", {}))
            cpu = {
                n: round(after[n]["cpu_s"] - self.local_before.get(n, {"cpu_s": 0.0})["cpu_s"], 1)
                for n in after
            }
            if self.compiler_ticks:
                spent = sum(self.compiler_ticks.values()) - self.compiler_ticks_before
                cpu["grammar"] = round(spent / CLOCK_TICKS, 1)
            before = {n: v["rss_mb"] for n, v in self.local_before.items()}
            got += "; RSS MB before -> max: " + ", ".join(
                f"{n} {before.get(n, 0):.0f} -> {self.rss_max[n]:.0f}"
                for n in SERVICES
                if n in self.rss_max
            )
            got += f"; CPU s in {wall:.1f} s: " + ", ".join(
                f"{n} {cpu[n]:.1f}" for n in (*SERVICES, "grammar", "attack") if n in cpu
            )
            if self.compilers_max:
                got += (
                    f"; grammar compiler processes (zygote + workers) at most {self.compilers_max}"
                )
            details.update(
                rss_before_mb={n: round(v, 1) for n, v in before.items()},
                rss_max_mb={n: round(v, 1) for n, v in self.rss_max.items()},
                cpu_s=cpu,
                wall_s=round(wall, 2),
                compiler_processes_max=self.compilers_max,
            )
        status = "" if counts else "info"
        return Result(
            attack,
            "probe",
            f"/health + chat back to back during {attack} (limit {limit:g} s)",
            got,
            None,
            bounded,
            correct,
            status,
            details,
        )


@contextlib.contextmanager
def probing(target: Target, report: Report, attack: str, counts: bool = True) -> Iterator[Probe]:
    probe = Probe(target)
    probe.start()
    probe.started_round.wait(10)
    try:
        yield probe
    finally:
        probe.stop()
        report.add(probe.result(attack, counts))


# ---- 1: grammar compile DoS ----


def json_schema_format(schema: str) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "attack", "schema": json.loads(schema)}}


def chat_with_raw_schema(target: Target, schema: str) -> bytes:
    """A chat body with a json_schema given as text (one nested too deep for Python's json to build)."""
    body = json.dumps({"model": target.model, "messages": MESSAGES, "max_tokens": 8})
    return (
        body[:-1]
        + ', "response_format": {"type": "json_schema", "json_schema": {"name": "attack", '
        '"schema": ' + schema + "}}}"
    ).encode()


def poison(n: int) -> str:
    """47 bytes of JSON schema that xgrammar compiles for minutes (n=5000: seconds)."""
    return json.dumps({"type": "string", "pattern": "[a-z]{1,%d}" % n})


def nested_arrays(depth: int) -> str:
    return '{"type": "array", "items": ' * (depth - 1) + '{"type": "string"}' + "}" * (depth - 1)


def expect_4xx(attack: str, case: str, sent: str, answers: list[Answer], within: float) -> Result:
    """Every answer a 4xx in OpenAI's error shape, each within `within` seconds."""
    worst = max(a.seconds for a in answers)
    bounded = all(a.status is not None for a in answers) and worst < within
    correct = all(
        a.status is not None and 400 <= a.status < 500 and a.openai_error for a in answers
    )
    got = "; ".join(dict.fromkeys(a.describe() for a in answers))
    if len(answers) > 1:
        got = f"{len(answers)} x {got}, slowest"
    return Result(
        attack,
        case,
        sent,
        got,
        worst,
        bounded,
        correct,
        details={
            "seconds": [round(a.seconds, 3) for a in answers],
            "statuses": [a.status for a in answers],
        },
    )


def attack_grammar(target: Target, report: Report) -> None:
    args = target.args
    give_up = args.grammar_client_timeout
    # The first constraint starts the server's compiler (seconds): measured apart, so that the cases below
    # see a warm server. Repeated while the server's --request-timeout ends it before the compiler is up.
    started = time.monotonic()
    tries = []
    while time.monotonic() - started < args.grammar_wait:
        tries.append(target.chat(args.grammar_wait, response_format={"type": "json_object"}))
        if "abort" not in tries[-1].describe():
            break
    report.add(
        Result(
            "grammar",
            "warm-up",
            "chat with response_format json_object until it is not aborted (the "
            "first constraint starts the server's compiler)",
            "; ".join(f"{a.describe()} in {a.seconds:.2f} s" for a in tries),
            time.monotonic() - started,
            status="info",
        )
    )
    with probing(target, report, "grammar"):
        enum = json.dumps({"enum": [f"value-{i:06d}" for i in range(args.enum_size)]})
        answers = [target.chat(give_up, response_format=json_schema_format(enum)) for _ in range(2)]
        report.add(
            expect_4xx(
                "grammar",
                "huge-enum",
                f"2 chats, json_schema enum of {args.enum_size} strings "
                f"({mb(len(enum))}), client timeout {give_up:g} s",
                answers,
                give_up,
            )
        )

        for depth in sorted(
            {150, args.deep_nesting}
        ):  # past the server's schema depth limit; past JSON parsers'
            deep = nested_arrays(depth)
            answer = target.post(
                "/v1/chat/completions", chat_with_raw_schema(target, deep), give_up
            )
            report.add(
                expect_4xx(
                    "grammar",
                    f"deep-nesting-{depth}",
                    f"json_schema of arrays nested {depth} deep "
                    f"({mb(len(deep))}), client timeout {give_up:g} s",
                    [answer],
                    give_up,
                )
            )

        # The slow schema, abandoned by its clients (two at a time), each a schema not seen before.
        base = 20000 + random.randrange(0, 5000, 100)  # (counts of 100,000 and more compile fast)
        outcomes: list[Answer] = []

        def abandon(i: int) -> None:  # its own connection, closed when the client gives up
            with httpx.Client(base_url=target.base_url, headers=target.headers) as client:
                outcomes.append(
                    target.chat(
                        give_up, client, response_format=json_schema_format(poison(base + i))
                    )
                )

        started = time.monotonic()
        for first in range(0, args.grammar_repeats, 2):
            threads = [
                threading.Thread(target=abandon, args=(i,), daemon=True)
                for i in range(first + 1, min(first + 3, args.grammar_repeats + 1))
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join(give_up + 30)
        kinds = Counter(a.describe(60) for a in outcomes)
        report.add(
            Result(
                "grammar",
                "slow-schema-abandoned",
                f"{args.grammar_repeats} chats, 2 at a time, json_schema pattern [a-z]{{1,2xxxx}} "
                f"(47 bytes, compiles for minutes), client timeout {give_up:g} s",
                "; ".join(f"{n} x {k}" for k, n in kinds.items()),
                time.monotonic() - started,
                bounded=len(outcomes) == args.grammar_repeats,
                correct=all(a.status is None or 400 <= a.status < 500 for a in outcomes),
                details={"note": "the server's side shows in the probe and in slow-schema-waited"},
            )
        )

        schema = poison(base + 99)
        answer = target.chat(args.grammar_wait, response_format=json_schema_format(schema))
        report.add(
            slow_schema_result(
                "slow-schema-waited",
                f"the same kind of schema (new), client timeout {args.grammar_wait:g} s",
                answer,
                args.grammar_wait,
                target,
            )
        )
        again = target.chat(args.grammar_wait, response_format=json_schema_format(schema))
        ended_by_timeout = answer.status == 200
        report.add(
            slow_schema_result(
                "slow-schema-again",
                "the same schema again (expected at once: a failure the "
                "server remembers"
                + (
                    ", unless its compile was cut by --request-timeout)"
                    if ended_by_timeout
                    else ")"
                ),
                again,
                args.grammar_wait if ended_by_timeout else min(args.grammar_wait, 2.0),
                target,
            )
        )


def slow_schema_result(
    case: str, sent: str, answer: Answer, within: float, target: Target
) -> Result:
    """A 4xx; or, on a server whose --request-timeout is shorter than its --grammar-compile-timeout, a 200 whose
    choices all ended "abort" at that timeout (the request timeout ends the request in every stage)."""
    result = expect_4xx("grammar", case, sent, [answer], within)
    timeout = target.server_args.get("request_timeout")
    compile_limit = target.server_args.get("grammar_compile_timeout")
    if answer.status == 200 and timeout and compile_limit and timeout < compile_limit:
        reasons = (
            {c.get("finish_reason") for c in answer.body.get("choices", [])}
            if isinstance(answer.body, dict)
            else set()
        )
        result.correct = reasons == {"abort"} and answer.seconds < timeout + 1.5
        result.bounded = answer.seconds < within
        result.status = "pass" if result.bounded and result.correct else "fail"
        result.got += (
            f" (ended by --request-timeout {timeout:g}, shorter than --grammar-compile-timeout "
            f"{compile_limit:g})"
        )
    return result


# ---- 2: amplification; a timeout that stops work ----


def attack_amplification(target: Target, report: Report) -> None:
    args = target.args
    with probing(target, report, "amplification"):
        body = {"model": target.model, "prompt": ["a"] * 800, "n": 128, "max_tokens": 4}
        size = len(json.dumps(body))
        answers = repeat_for(
            args.repeat_seconds, args.repeat_pause, lambda: target.post("/v1/completions", body, 30)
        )
        report.add(
            expect_4xx(
                "amplification",
                "800-prompts-x-n128",
                f'/v1/completions prompt ["a"]*800, n 128 (102,400 sequences, {mb(size)}), '
                f"{repeated(args)}",
                answers,
                5.0,
            )
        )

    timeout = target.server_args.get("request_timeout")
    if not timeout:
        report.add(
            Result(
                "amplification",
                "big-allowed-with-timeout",
                "(nothing)",
                "skipped: the server reports no --request-timeout (/get_server_info)",
                status="skip",
            )
        )
        return
    limits = [args.big_sequences] + [
        target.server_args[k]
        for k in ("max_request_sequences", "max_queued_requests")
        if target.server_args.get(k)
    ]
    count = max(1, min(limits))
    n = 8 if count >= 8 else 1
    prompts = [f"Story {i}: once upon a time" for i in range(count // n)]
    body = {
        "model": target.model,
        "prompt": prompts,
        "n": n,
        "max_tokens": args.big_max_tokens,
        "ignore_eos": True,
    }
    sent = (
        f"/v1/completions {len(prompts)} prompts x n {n} = {len(prompts) * n} sequences of max_tokens "
        f"{args.big_max_tokens} (ignore_eos) against --request-timeout {timeout:g}"
    )
    with probing(target, report, "amplification/big-allowed", counts=False):
        answer = target.post("/v1/completions", body, timeout + 60)
        drained, drain_s, counts = wait_drained(target, 15.0)
    finish = Counter()
    if answer.status == 200 and isinstance(answer.body, dict):
        finish = Counter(c.get("finish_reason") for c in answer.body.get("choices", []))
    got = answer.describe() + (f" finish_reason {dict(finish)}" if finish else "")
    got += (
        f"; scheduler queues empty {drain_s:.2f} s after the answer"
        if drained
        else f"; scheduler still (running, waiting) = {counts} 15 s after the answer"
    )
    ended_at_timeout = answer.status is not None and answer.seconds < timeout + 5
    report.add(
        Result(
            "amplification",
            "big-allowed-with-timeout",
            sent,
            got,
            answer.seconds,
            bounded=ended_at_timeout and drained,
            correct=answer.status in (200, 504) and (answer.status != 504 or answer.openai_error),
            details={"finish_reasons": dict(finish), "drain_s": drain_s, "queues": counts},
        )
    )


def wait_drained(
    target: Target, cap: float, allowed_running: int = 1
) -> tuple[bool, float, tuple | None]:
    """Wait until the scheduler runs at most `allowed_running` requests (the probe's own) and queues nothing."""
    started = time.monotonic()
    counts = None
    while time.monotonic() - started < cap:
        counts = target.queue_counts()
        if counts is None:
            return True, 0.0, None  # the server does not say: only the answer's time counts
        if counts[0] <= allowed_running and counts[1] == 0:
            return True, time.monotonic() - started, counts
        time.sleep(0.1)
    return False, time.monotonic() - started, counts


# ---- 3: slow and huge heads ----


def raise_open_file_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(
            resource.RLIMIT_NOFILE,
            (wanted if hard == resource.RLIM_INFINITY else min(wanted, hard), hard),
        )


def attack_slow_headers(target: Target, report: Report) -> None:
    args = target.args
    count, cap = args.slow_headers, args.slow_headers_seconds
    raise_open_file_limit(count + 256)
    socks: dict[socket.socket, int] = {}
    opened: dict[int, float] = {}
    closed_at: dict[int, float] = {}
    answers: Counter = Counter()
    connect_errors: Counter = Counter()
    selector = selectors.DefaultSelector()
    with probing(target, report, "slow-headers"):
        try:
            started = time.monotonic()
            for i in range(count):
                if time.monotonic() - started > cap / 2:
                    connect_errors["not opened: half the cap spent connecting"] += count - i
                    break
                try:
                    sock = target.connect()
                    sock.sendall(target.head_prefix())  # no blank line: the head never ends
                    sock.setblocking(False)
                except OSError as e:
                    connect_errors[type(e).__name__] += 1
                    continue
                socks[sock] = i
                opened[i] = time.monotonic()
                selector.register(sock, selectors.EVENT_READ, i)
            open_done = time.monotonic()
            next_trickle = time.monotonic() + 1.0
            line = 0
            while socks and time.monotonic() - started < cap:
                for key, _ in selector.select(timeout=0.2):
                    sock = key.fileobj
                    try:
                        data = sock.recv(4096)
                    except (BlockingIOError, ssl.SSLWantReadError):
                        continue
                    except OSError:
                        data = b""
                    if data:
                        answers[status_line(data) or "other"] += 1
                    selector.unregister(sock)
                    closed_at[socks.pop(sock)] = time.monotonic()
                    sock.close()
                if (
                    time.monotonic() >= next_trickle
                ):  # slowloris: a header line a second keeps data coming
                    line += 1
                    for sock in list(socks):
                        with contextlib.suppress(OSError):
                            sock.send(f"X-Slow-{line}: x\r\n".encode())
                    next_trickle += 1.0
            still_open = len(socks)
        finally:
            for sock in socks:
                with contextlib.suppress(Exception):
                    selector.unregister(sock)
                sock.close()
            selector.close()
    longest = max((closed_at[i] - opened[i] for i in closed_at), default=0.0)
    got = (
        f"{len(closed_at)} closed by the server (answers: {dict(answers) or 'none'}), the last after "
        f"{longest:.1f} s; {still_open} still open at the {cap:g} s cap"
    )
    if connect_errors:
        got += f"; connect errors {dict(connect_errors)}"
    report.add(
        Result(
            "slow-headers",
            "unfinished-heads",
            f"{count} sockets sending a head without its end (opened in {open_done - started:.1f} s), "
            f"one more header line a second",
            got,
            time.monotonic() - started,
            bounded=still_open == 0,
            correct=all(s in (408, 431, 503, "other") for s in answers) or not answers,
            details={
                "closed": len(closed_at),
                "answers": {str(k): v for k, v in answers.items()},
                "still_open": still_open,
                "longest_s": longest,
                "connect_errors": dict(connect_errors),
            },
        )
    )


def attack_huge_header(target: Target, report: Report) -> None:
    args = target.args
    with probing(target, report, "huge-header"):
        results = repeat_for(
            args.repeat_seconds,
            args.repeat_pause,
            lambda: huge_header(target, args.header_mb * 1_000_000, args.huge_header_seconds),
        )
        report.add(worst_of(results, repeated(args)))
        report.add(
            worst_of(
                repeat_for(
                    args.repeat_seconds, args.repeat_pause, lambda: many_headers(target, 1000)
                ),
                repeated(args),
            )
        )


def repeat_for(seconds: float, pause: float, attempt: Callable[[], object]) -> list:
    """attempt() until `seconds` have passed (at least once), `pause` seconds apart."""
    started = time.monotonic()
    outcomes = [attempt()]
    while time.monotonic() - started + pause < seconds:
        time.sleep(pause)
        outcomes.append(attempt())
    return outcomes


def repeated(args) -> str:
    pause = (
        f"with {args.repeat_pause:g} s between attempts" if args.repeat_pause else "back to back"
    )
    return f"repeated {pause} for {args.repeat_seconds:g} s"


def worst_of(results: list[Result], how: str) -> Result:
    """One line for a case repeated: the first failing attempt, else the slowest; with the count."""
    failing = [r for r in results if r.status == "fail"]
    pick = failing[0] if failing else max(results, key=lambda r: r.seconds or 0.0)
    extra = (
        f"{len(failing)} of {len(results)} attempts failed, e.g."
        if failing
        else f"{len(results)} attempts, all like this; slowest"
    )
    return Result(
        pick.attack,
        pick.case,
        f"{pick.sent}, {how}",
        f"{extra} {pick.got}",
        pick.seconds,
        pick.bounded,
        pick.correct,
        pick.status,
        {**pick.details, "attempts": len(results), "failed": len(failing)},
    )


def huge_header(target: Target, total: int, cap: float) -> Result:
    sent_desc = f"GET /health with one header of {mb(total)}, streamed in 64 KB pieces"
    started = time.monotonic()
    sent = 0
    reply = b""
    ended = ""
    chunk = b"a" * 65536
    try:
        sock = target.connect()
    except OSError as e:
        return Result(
            "huge-header",
            "200MB-header",
            sent_desc,
            f"could not connect: {e}",
            bounded=False,
            correct=False,
        )
    try:
        sock.sendall(target.head_prefix() + b"X-Huge: ")
        sock.setblocking(False)
        answered_at = None
        while time.monotonic() - started < cap:
            want_write = sent < total and answered_at is None
            readable, writable, _ = select.select([sock], [sock] if want_write else [], [], 0.5)
            if readable:
                try:
                    data = sock.recv(65536)
                except (BlockingIOError, ssl.SSLWantReadError):
                    data = None
                except OSError as e:
                    ended = f"connection {type(e).__name__}"
                    break
                if data == b"":
                    ended = ended or "closed by the server"
                    break
                if data:
                    reply += data
                    answered_at = answered_at or time.monotonic()
                    continue
            if writable:
                try:
                    sent += sock.send(
                        chunk if total - sent >= len(chunk) else chunk[: total - sent]
                    )
                except (BlockingIOError, ssl.SSLWantWriteError):
                    pass
                except OSError as e:  # the server closed or reset: read whatever answer arrived
                    ended = f"send failed: {type(e).__name__}"
                    want_write = False
                    answered_at = answered_at or time.monotonic()
            if not want_write and answered_at and time.monotonic() - answered_at > 3:
                break
    finally:
        sock.close()
    seconds = time.monotonic() - started
    status = status_line(reply)
    got = (
        f"{status if status else 'no HTTP answer'} after {mb(sent)} sent"
        + (f" ({ended})" if ended else "")
        + (f': "{body_excerpt(reply)}"' if status else "")
    )
    return Result(
        "huge-header",
        "200MB-header",
        sent_desc,
        got,
        seconds,
        bounded=sent < total and seconds < cap,
        correct=status == 431,
        details={"bytes_sent": sent, "status": status},
    )


def body_excerpt(reply: bytes, limit: int = 100) -> str:
    body = reply.split(b"\r\n\r\n", 1)[-1].decode(errors="replace")
    with contextlib.suppress(ValueError, KeyError, TypeError):
        body = json.loads(body)["error"]["message"]
    return body if len(body) <= limit else body[:limit] + "..."


def many_headers(target: Target, count: int) -> Result:
    head = (
        target.head_prefix()
        + b"".join(f"X-Many-{i}: v\r\n".encode() for i in range(count))
        + b"\r\n"
    )
    started = time.monotonic()
    reply = b""
    try:
        with target.connect() as sock:
            sock.settimeout(10)
            with contextlib.suppress(OSError):
                sock.sendall(head)
            with contextlib.suppress(OSError):
                while len(reply) < 65536:
                    data = sock.recv(65536)
                    if not data:
                        break
                    reply += data
                    if b"\r\n\r\n" in reply and status_line(reply) is not None:
                        break
    except OSError as e:
        reply = reply or f"error {e}".encode()
    status = status_line(reply)
    return Result(
        "huge-header",
        "1000-headers",
        f"GET /health with {count} headers ({mb(len(head))})",
        f'{status}: "{body_excerpt(reply)}"' if status else "no HTTP answer",
        time.monotonic() - started,
        bounded=status is not None,
        correct=status == 431,
    )


# ---- 4: internal services ----


def attack_internal(target: Target, report: Report) -> None:
    args = target.args
    if not (args.grpc_scheduler or args.grpc_executor):
        report.add(
            Result(
                "internal",
                "unauthenticated",
                "(nothing)",
                "skipped: no --grpc-scheduler/--grpc-executor",
                status="skip",
            )
        )
        return
    import grpc

    from radixserve.v1 import (
        common_pb2,
        executor_pb2,
        executor_pb2_grpc,
        scheduler_pb2,
        scheduler_pb2_grpc,
    )

    def call(fn: Callable[[list], object], metadata: list) -> tuple[str, str, float]:
        started = time.monotonic()
        try:
            fn(metadata)
            return "OK", "", time.monotonic() - started
        except grpc.RpcError as e:
            return e.code().name, (e.details() or "")[:100], time.monotonic() - started

    def case(
        name: str, sent: str, fn: Callable[[list], object], metadata: list, expect: str
    ) -> None:
        code, detail, seconds = call(fn, metadata)
        got = code + (f' "{detail}"' if detail else "")
        report.add(
            Result(
                "internal",
                name,
                sent,
                got,
                seconds,
                bounded=seconds < 15,
                correct=code == expect,
                details={"expected": expect},
            )
        )

    step = executor_pb2.ExecutorStepRequest(
        step_id=1,
        new_requests=[
            executor_pb2.ExecutorNewRequest(
                request_id="attack-step",
                input_ids=[7] * 8,
                new_slots=list(range(1, 9)),
                sample=True,
            )
        ],
    )
    generate = scheduler_pb2.SchedulerGenerateRequest(
        request_id=f"attack-{random.getrandbits(32):08x}",
        input_ids=[1, 2, 3],
        stopping=common_pb2.StoppingCriteria(max_new_tokens=4),
    )
    keys = [
        ("none", [], "UNAUTHENTICATED"),
        ("wrong-token", [(TOKEN_METADATA_KEY, "wrong-token")], "UNAUTHENTICATED"),
    ]
    channels = []
    try:
        if args.grpc_executor:
            channels.append(channel := grpc.insecure_channel(args.grpc_executor))
            executor = executor_pb2_grpc.ExecutorStub(channel)
            for key, metadata, expect in keys:
                case(
                    f"executor-step-{key}",
                    f"Executor.Step (input_ids [7]*8 into KV slots 1..8), token: {key}",
                    lambda md: executor.Step(step, timeout=10, metadata=md),
                    metadata,
                    expect,
                )
            if args.grpc_token:
                case(
                    "executor-step-token-no-session",
                    "Executor.Step with the token, outside the scheduler's session",
                    lambda md: executor.Step(step, timeout=10, metadata=md),
                    [(TOKEN_METADATA_KEY, args.grpc_token)],
                    "FAILED_PRECONDITION",
                )
        if args.grpc_scheduler:
            channels.append(channel := grpc.insecure_channel(args.grpc_scheduler))
            scheduler = scheduler_pb2_grpc.SchedulerStub(channel)
            for key, metadata, expect in keys:
                case(
                    f"scheduler-generate-{key}",
                    f"Scheduler.Generate (3 tokens, max_new_tokens 4), token: {key}",
                    lambda md: list(scheduler.Generate(generate, timeout=10, metadata=md)),
                    metadata,
                    expect,
                )
                case(
                    f"scheduler-abort-all-{key}",
                    f"Scheduler.Abort(abort_all), token: {key}",
                    lambda md: scheduler.Abort(
                        scheduler_pb2.SchedulerAbortRequest(abort_all=True), timeout=10, metadata=md
                    ),
                    metadata,
                    expect,
                )
            if args.grpc_token:
                token = [(TOKEN_METADATA_KEY, args.grpc_token)]
                case(
                    "scheduler-getinfo-token",
                    "Scheduler.GetInfo with the token",
                    lambda md: scheduler.GetInfo(
                        scheduler_pb2.SchedulerInfoRequest(), timeout=10, metadata=md
                    ),
                    token,
                    "OK",
                )
                case(
                    "scheduler-generate-token",
                    "Scheduler.Generate with the token (max_new_tokens 4)",
                    lambda md: list(scheduler.Generate(generate, timeout=30, metadata=md)),
                    token,
                    "OK",
                )
    finally:
        for channel in channels:
            channel.close()


# ---- 5, 6, 8 ----


def attack_n_over_queue(target: Target, report: Report) -> None:
    queue = target.server_args.get("max_queued_requests")
    n = queue + 36 if queue else (target.server_args.get("max_request_sequences") or 256) + 1
    answer = target.chat(30, n=n, max_tokens=4)
    retry_after = answer.headers.get("retry-after")
    got = answer.describe() + (
        f", Retry-After: {retry_after}" if retry_after else ", no Retry-After"
    )
    limit = f"--max-queued-requests {queue}" if queue else "no --max-queued-requests reported"
    report.add(
        Result(
            "n-over-queue",
            "n-above-queue-limit",
            f"chat n {n}, max_tokens 4, idle server ({limit})",
            got,
            answer.seconds,
            bounded=answer.status is not None and answer.seconds < 10,
            correct=answer.status == 400 and answer.openai_error and not retry_after,
        )
    )


def attack_upload_disconnect(target: Target, report: Report) -> None:
    count = target.args.upload_disconnects
    head = target.head_prefix("POST", "/v1/chat/completions") + (
        b"Content-Type: application/json\r\nContent-Length: 1000000\r\n\r\n"
    )
    partial = b'{"model": "m", "messages": [{"role": "user", "content": "' + b"x" * 16000
    started = time.monotonic()
    errors: Counter = Counter()
    for i in range(count):
        try:
            with target.connect() as sock:
                sock.sendall(head + partial)
                time.sleep(0.02)
                if i % 2:  # every other one resets the connection instead of closing it
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError as e:
            errors[type(e).__name__] += 1
    seconds = time.monotonic() - started
    health = target.client.get("/health", timeout=10).status_code
    after = target.chat(30, max_tokens=4)
    got = (
        f"client side: {count - sum(errors.values())} uploads cut off after {mb(len(head) + len(partial))} of "
        f"1 MB ({count // 2} closed, {count - count // 2} reset){'; errors ' + str(dict(errors)) if errors else ''}"
        f"; then /health {health}, a chat {after.describe()} in {after.seconds:.2f} s "
        "(the server's log: see tests/gateway/test_http_limits.py)"
    )
    report.add(
        Result(
            "upload-disconnect",
            "cut-uploads",
            f"{count} POST /v1/chat/completions announcing 1 MB",
            got,
            seconds,
            bounded=health == 200 and after.status == 200,
            correct=not errors,
        )
    )


def attack_null_content(target: Target, report: Report) -> None:
    cases = (
        ("null-content", [{"role": "user", "content": None}]),
        ("missing-content", [{"role": "user"}]),
        (
            "null-content-after-system",
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": None}],
        ),
    )
    for name, messages in cases:
        answer = target.chat(30, messages=messages, max_tokens=4)
        report.add(
            Result(
                "null-content",
                name,
                f"chat messages {json.dumps(messages)}",
                answer.describe(),
                answer.seconds,
                bounded=answer.status is not None,
                correct=answer.status == 400 and answer.openai_error,
            )
        )


RUNNERS: dict[str, Callable[[Target, Report], None]] = {
    "grammar": attack_grammar,
    "amplification": attack_amplification,
    "slow-headers": attack_slow_headers,
    "huge-header": attack_huge_header,
    "internal": attack_internal,
    "n-over-queue": attack_n_over_queue,
    "upload-disconnect": attack_upload_disconnect,
    "null-content": attack_null_content,
}


def cap_of(name: str, args) -> float:
    """Seconds attack `name` may take before the watchdog stops the script."""
    return {
        "grammar": 2 * args.grammar_client_timeout
        + args.grammar_repeats / 2 * (args.grammar_client_timeout + 1)
        + 2 * args.grammar_wait
        + 60,
        "amplification": args.repeat_seconds + 30.0 + 180,
        "slow-headers": args.slow_headers_seconds + 60,
        "huge-header": 2 * args.repeat_seconds + args.huge_header_seconds + 30 + 60,
        "internal": 120.0,
        "n-over-queue": 60.0,
        "upload-disconnect": 5.0 * args.upload_disconnects + 60,
        "null-content": 120.0,
    }[name]


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--base-url", default="http://127.0.0.1:30000")
    p.add_argument("--api-key", default=None, help="sent as Authorization: Bearer KEY")
    p.add_argument(
        "--model", default=None, help="model name in requests (default: the first of /v1/models)"
    )
    p.add_argument(
        "--grpc-scheduler",
        default=None,
        help="the scheduler's gRPC address (for the internal attack)",
    )
    p.add_argument(
        "--grpc-executor",
        default=None,
        help="the executor's gRPC address (for the internal attack)",
    )
    p.add_argument(
        "--grpc-token",
        default=None,
        help="the inter-service token, to show that an authenticated call works (never used for Abort)",
    )
    p.add_argument(
        "--only",
        nargs="+",
        default=None,
        metavar="NAME",
        help=f"attacks to run, of {', '.join(ATTACKS)} (space or comma separated)",
    )
    p.add_argument(
        "--json",
        default=None,
        metavar="FILE",
        help="also write JSON lines to FILE ('-': stdout only)",
    )
    p.add_argument(
        "--watch-local",
        action="store_true",
        help="with each probe, the RSS and CPU time of local radixserve processes and of this script",
    )
    p.add_argument(
        "--probe-max-latency",
        type=float,
        default=2.0,
        help="largest latency of the probe's small chat",
    )
    p.add_argument(
        "--probe-interval", type=float, default=0.2, help="pause between probe rounds (s)"
    )
    p.add_argument("--enum-size", type=int, default=100_000)
    p.add_argument("--deep-nesting", type=int, default=1000)
    p.add_argument("--grammar-client-timeout", type=float, default=3.0)
    p.add_argument(
        "--grammar-repeats", type=int, default=4, help="slow-schema requests the client abandons"
    )
    p.add_argument(
        "--grammar-wait",
        type=float,
        default=60.0,
        help="client timeout for the slow schema's answer",
    )
    p.add_argument(
        "--repeat-seconds",
        type=float,
        default=10.0,
        help="the amplification and huge-header requests are repeated this long",
    )
    p.add_argument(
        "--repeat-pause",
        type=float,
        default=0.0,
        help="seconds between those repeats (0: back to back)",
    )
    p.add_argument(
        "--big-sequences",
        type=int,
        default=32,
        help="sequences of the big allowed request (at most the server's limits)",
    )
    p.add_argument("--big-max-tokens", type=int, default=512)
    p.add_argument(
        "--slow-headers", type=int, default=300, help="sockets that never finish their head"
    )
    p.add_argument(
        "--slow-headers-seconds", type=float, default=40.0, help="how long they are held at most"
    )
    p.add_argument("--header-mb", type=float, default=200.0, help="size of the huge header (MB)")
    p.add_argument("--huge-header-seconds", type=float, default=60.0)
    p.add_argument("--upload-disconnects", type=int, default=20)
    args = p.parse_args(argv)
    names = [n for item in (args.only or ATTACKS) for n in item.split(",") if n]
    unknown = set(names) - set(ATTACKS)
    if unknown:
        p.error(f"unknown attacks {sorted(unknown)}; known: {', '.join(ATTACKS)}")
    args.only = [n for n in ATTACKS if n in names]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        with httpx.Client(
            headers={"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        ) as client:
            client.get(args.base_url.rstrip("/") + "/health", timeout=10)
    except httpx.HTTPError as e:
        print(f"cannot reach {args.base_url}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    report = Report(args.json)
    target = Target(args)
    try:
        if args.json != "-":
            known = {
                k: target.server_args.get(k)
                for k in (
                    "max_queued_requests",
                    "max_request_sequences",
                    "request_timeout",
                    "grammar_compile_timeout",
                    "http_header_timeout",
                    "http_max_header_bytes",
                    "http_max_connections",
                )
            }
            print(
                f"target {target.base_url}, model {target.model!r}, server flags "
                f"{known if target.server_args else 'unknown (no /get_server_info)'}",
                flush=True,
            )
        for i, name in enumerate(args.only):
            if i:  # let the previous attack's work end, so that it does not count against this one
                wait_drained(target, 15.0, allowed_running=0)
                time.sleep(1.0)
            cap = cap_of(name, args)
            watchdog = threading.Timer(cap + OVERRUN_GRACE_S, overrun, (name, cap, report))
            watchdog.daemon = True
            watchdog.start()
            started = time.monotonic()
            try:
                RUNNERS[name](target, report)
            except Exception as e:  # noqa: BLE001 - one attack's failure must not stop the others
                report.add(
                    Result(
                        name,
                        "error",
                        "(the attack stopped)",
                        f"{type(e).__name__}: {e}",
                        time.monotonic() - started,
                        bounded=False,
                        correct=False,
                    )
                )
            finally:
                watchdog.cancel()
    finally:
        target.close()
    counts = Counter(r.status for r in report.results)
    if args.json != "-":
        print(
            f"{len(report.results)} cases: {counts['pass']} passed, {counts['fail']} failed, {counts['info']} "
            f"info, {counts['skip']} skipped. Not run here (need server control; see tests/e2e/test_drain.py, "
            "tests/e2e/test_internal_auth.py): 7 SIGTERM drain, 9 start-up back-off, 10 idle keepalive.",
            flush=True,
        )
    report.close()
    return 1 if counts["fail"] else 0


def overrun(name: str, cap: float, report: Report) -> None:
    report.add(
        Result(
            name,
            "overrun",
            "(the attack)",
            f"still running {cap + OVERRUN_GRACE_S:g} s after it started "
            f"(cap {cap:g} s): stopping the script",
            bounded=False,
            correct=False,
        )
    )
    report.close()
    sys.stdout.flush()
    os._exit(2)


if __name__ == "__main__":
    sys.exit(main())
