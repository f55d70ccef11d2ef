"""Configuration by environment: every flag as RADIXSERVE_<FLAG>, command-line flags win."""

import dataclasses
import os

import pytest

from radixserve.cli import SERVICES, build_parser, main
from radixserve.common.args import (
    ServerArgs,
    args_from_namespace,
    env_name,
    flag_fields,
    supported_choices,
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith("RADIXSERVE_"):
            monkeypatch.delenv(name)


def parse(*argv: str, service: str = "gateway") -> ServerArgs:
    return args_from_namespace(build_parser().parse_args([service, *argv]), service)


# Fields whose sample must agree with another's (normalize checks them together) or whose last choice maps
# back to the default: (environment value, value parsed).
SAMPLES = {
    "dtype": ("bfloat16", "bfloat16"),
    "kv_cache_dtype": ("bf16", "bf16"),
    "quantization": ("gguf", "gguf"),
    "device": ("cuda:1", "cuda:1"),
    "tool_call_parser": ("llama3", "llama3"),
    "load_balance_method": ("total_requests", "shortest_queue"),  # SGLang's name of shortest_queue
    "tokenizer_worker_num": ("2", 2),
    "tokenizer_addr": ("h:1", "h:1,h:101"),
    "detokenizer_worker_num": ("3", 3),
    "detokenizer_addr": ("h:2", "h:2,h:102,h:202"),
    "generation_config": ("openai", "vllm"),  # SGLang's --sampling-defaults name of vllm
    "preferred_sampling_params": ('{"temperature": 0.5}', '{"temperature": 0.5}'),
    "override_generation_config": ('{"top_k": 4}', '{"top_k": 4}'),
    # Must exceed the max match window (4097 like every other int).
    "speculative_ngram_history_window": ("8192", 8192),
    # EAGLE3 (the last supported algorithm) builds chains only, of num_steps + 1 tokens per step.
    "speculative_eagle_topk": ("1", 1),
    "speculative_num_draft_tokens": ("4098", 4098),
}


def sample(f: dataclasses.Field) -> tuple[str, object]:
    """An env value for the field's flag and the value it must parse to (never the default)."""
    if f.name in SAMPLES:
        return SAMPLES[f.name]
    if isinstance(f.default, bool):
        return "yes", True
    choices = supported_choices(f)
    if choices is not None:
        choice = next(c for c in reversed(choices) if c != f.default)
        return str(choice), choice
    if "int" in f.type:
        return "4097", 4097
    if "float" in f.type:
        return "0.375", 0.375
    return f"value-of-{f.name}", f"value-of-{f.name}"


def test_variable_names_follow_the_flags():
    assert env_name("model_path") == "RADIXSERVE_MODEL_PATH"
    assert env_name("tp_size") == "RADIXSERVE_TP_SIZE"
    assert (
        env_name("grpc_auth_token") == "RADIXSERVE_GRPC_AUTH_TOKEN"
    )  # the variable the README already named


def test_every_flag_can_come_from_the_environment(monkeypatch):
    expected = {}
    for f in flag_fields():
        raw, value = sample(f)
        assert value != f.default, f.name
        monkeypatch.setenv(env_name(f.name), raw)
        expected[f.name] = value
    for service in ("serve", *SERVICES):
        args = parse(service=service)
        assert {name: getattr(args, name) for name in expected} == expected, service


def test_a_value_sglang_has_but_this_version_does_not_is_refused_from_the_environment(
    monkeypatch, capsys
):
    refused = {
        "kv_cache_dtype": "fp4_e2m1",
        "quantization": "bitsandbytes",
        "load_format": "pt",
        "attention_backend": "fa3",
        "schedule_policy": "lof",
        "load_balance_method": "total_tokens",
        "tool_call_parser": "glm45",
        "device": "npu",
    }
    for name, raw in refused.items():
        monkeypatch.setenv(env_name(name), raw)
        with pytest.raises(SystemExit) as exc:
            parse(service="serve")
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert env_name(name) in err and raw in err, err
        monkeypatch.delenv(env_name(name))


def test_command_line_flags_win(monkeypatch):
    monkeypatch.setenv("RADIXSERVE_PORT", "31000")
    monkeypatch.setenv("RADIXSERVE_MODEL_PATH", "/from/env")
    monkeypatch.setenv("RADIXSERVE_SCHEDULE_POLICY", "lpm")
    monkeypatch.setenv("RADIXSERVE_ENABLE_METRICS", "true")
    monkeypatch.setenv("RADIXSERVE_DISABLE_RADIX_CACHE", "0")
    args = parse(
        "--port",
        "32000",
        "--model-path",
        "/from/flag",
        "--no-enable-metrics",
        "--disable-radix-cache",
    )
    assert (args.port, args.model_path, args.enable_metrics, args.disable_radix_cache) == (
        32000,
        "/from/flag",
        False,
        True,
    )
    assert args.schedule_policy == "lpm"  # not on the command line: the environment's
    unset = parse()
    assert (unset.port, unset.model_path, unset.enable_metrics, unset.disable_radix_cache) == (
        31000,
        "/from/env",
        True,
        False,
    )


@pytest.mark.parametrize(
    "raw,value",
    [
        ("1", True),
        ("true", True),
        ("YES", True),
        ("On", True),
        ("0", False),
        ("false", False),
        ("no", False),
        ("OFF", False),
    ],
)
def test_boolean_spellings(monkeypatch, raw, value):
    monkeypatch.setenv("RADIXSERVE_LOG_REQUESTS", raw)
    assert parse().log_requests is value


def test_empty_variables_count_as_unset(monkeypatch):
    for name in ("MODEL_PATH", "PORT", "ENABLE_METRICS", "OTLP_TRACES_ENDPOINT", "DTYPE"):
        monkeypatch.setenv(f"RADIXSERVE_{name}", "")
    args = parse()
    assert (
        args.model_path,
        args.port,
        args.enable_metrics,
        args.otlp_traces_endpoint,
        args.dtype,
    ) == (None, 30000, False, None, "auto")


def test_defaults_without_environment_are_unchanged():
    assert parse() == ServerArgs(service="gateway")


@pytest.mark.parametrize(
    "name,raw,why",
    [
        ("PORT", "http", "not a valid int"),
        ("MEM_FRACTION_STATIC", "most", "not a valid float"),
        ("DTYPE", "int3", "invalid choice"),
        ("ENABLE_METRICS", "maybe", "expected one of"),
    ],
)
def test_bad_values_stop_like_bad_flags(monkeypatch, capsys, name, raw, why):
    monkeypatch.setenv(f"RADIXSERVE_{name}", raw)
    with pytest.raises(SystemExit) as exc:
        main(["gateway", "--help"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"RADIXSERVE_{name}={raw!r}" in err and why in err


def test_tp_size_from_environment(monkeypatch):
    monkeypatch.setenv("RADIXSERVE_TP_SIZE", "1")
    assert build_parser().parse_args(["executor"]).tp_size == 1
    monkeypatch.setenv("RADIXSERVE_TP_SIZE", "2")
    ns = build_parser().parse_args(["executor"])
    assert ns.tp_size == 2 and args_from_namespace(ns, "executor").tp_size == 2
    assert build_parser().parse_args(["executor", "--tp", "1"]).tp_size == 1


def test_children_of_serve_see_the_launchers_config(monkeypatch):
    """`radixserve serve` hands its config to the services as flags; they inherit the environment too,
    so a boolean the command line turned off against the environment must reach them turned off."""
    monkeypatch.setenv("RADIXSERVE_ENABLE_METRICS", "1")
    monkeypatch.setenv("RADIXSERVE_LOG_REQUESTS", "1")
    monkeypatch.setenv("RADIXSERVE_MAX_TOTAL_TOKENS", "2048")
    monkeypatch.setenv("RADIXSERVE_GRPC_AUTH_TOKEN", "s3cret")
    args = parse("--no-log-requests", "--port", "31111", service="serve")
    assert args.enable_metrics and not args.log_requests and args.max_total_tokens == 2048
    argv = args.to_cli()
    assert "--no-log-requests" in argv and "s3cret" not in " ".join(argv)
    child = parse(*argv, service="executor")
    assert {**vars(child), "service": "serve"} == vars(args)
