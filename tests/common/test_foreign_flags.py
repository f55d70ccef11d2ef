"""SGLang's and vLLM's command lines: every flag of tests/data/sglang_flags.tsv (SGLang's server-arguments
reference) and tests/data/vllm_flags.tsv (vllm serve's everyday flags) is honoured (a), accepted with a
warning (b) or refused with a message (c), as its row says; one test per row and spelling."""

import csv
import os
import pathlib
import subprocess
import sys

import pytest

from radixserve.cli import build_parser
from radixserve.common.args import FlagError, ServerArgs, args_from_namespace, load_config_file
from radixserve.common.foreign_flags import IGNORED_KEY, warn_ignored

DATA = pathlib.Path(__file__).parents[1] / "data"


def rows(name: str) -> list[dict]:
    with open(DATA / name, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


SGLANG, VLLM = rows("sglang_flags.tsv"), rows("vllm_flags.tsv")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith("RADIXSERVE_"):
            monkeypatch.delenv(name)


def cases():
    for source, table in (("sglang", SGLANG), ("vllm", VLLM)):
        for row in table:
            spellings = [row["flag"], *[a for a in row["aliases"].split(",") if a]]
            for spelling in spellings:
                yield pytest.param(row, spelling, id=f"{source}:{spelling}")


def argv_for(row: dict, spelling: str) -> list[str]:
    if spelling == "MODEL":  # `vllm serve MODEL`: the positional model
        return [row["example"]]
    if row["arity"] == "none":
        return [spelling]
    if row["arity"] == "many":
        return [spelling, *row["example"].split(" ")]
    return [spelling, row["example"]]


_PARSER = (
    build_parser()
)  # built once: no RADIXSERVE_* variable is set here (clean_env), so its defaults hold


def parse(argv: list[str]):
    ns = _PARSER.parse_args(["serve", *argv])
    if getattr(ns, "model_tag", None):
        ns.model_path = ns.model_tag
    return ns, args_from_namespace(ns, "serve")


def expected_value(args: ServerArgs, raw: str):
    if raw == "<tp_size>":
        return args.tp_size
    if raw in ("true", "false"):
        return raw == "true"
    return raw


@pytest.mark.parametrize("row,spelling", list(cases()))
def test_flag_is_honoured_ignored_or_refused_as_its_row_says(row, spelling, capsys):
    argv = argv_for(row, spelling)
    if row["class"] == "c":
        with pytest.raises(SystemExit) as exc:
            parse(argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert spelling in err and "error" in err
        return
    ns, args = parse(argv)
    warnings = warn_ignored(ns)
    if row["class"] == "b":
        assert (
            len(warnings) == 1 and spelling in warnings[0] and "has no effect here" in warnings[0]
        )
        return
    assert row["class"] == "a"
    assert not getattr(ns, IGNORED_KEY, None), "an honoured flag must not warn"
    if row["maps_to"] and row["maps_to"] != "(no field)":
        for assignment in row["maps_to"].split(";"):
            name, raw = assignment.split("=", 1)
            value, want = getattr(args, name), expected_value(args, raw)
            if isinstance(value, (bool, float)):
                assert value == (want if isinstance(value, bool) else float(want)), (
                    name,
                    value,
                    raw,
                )
            else:
                assert str(value) == str(want), (name, value, raw)


def test_every_reference_flag_is_listed_once():
    flags = [r["flag"] for r in SGLANG]
    assert len(flags) == len(set(flags)) and len(flags) >= 340
    assert {r["class"] for r in SGLANG + VLLM} == {"a", "b", "c"}


# Values the honoured flags refuse (the row's note says which): the flag exits 2 naming itself.
REFUSED_VALUES = [
    ["--quantization", "bitsandbytes"],
    ["-q", "marlin"],
    ["--kv-cache-dtype", "fp4_e2m1"],
    ["--kv-cache-dtype", "mxfp8"],
    ["--load-format", "pt"],
    ["--attention-backend", "fa3"],
    ["--attention-backend", "flashinfer"],
    ["--tokenizer-mode", "slow"],
    ["--pp-size", "2"],
    ["-pp", "4"],
    ["--schedule-policy", "lof"],
    ["--device", "npu"],
    ["--tool-call-parser", "glm45"],
    ["--reasoning-parser", "step3"],
    ["--load-balance-method", "total_tokens"],
    ["--grammar-backend", "outlines"],
    ["--stream-interval", "0"],
    ["--radix-eviction-policy", "lfu"],
    ["--disaggregation-mode", "prefill"],
    ["--cpu-offload-gb", "8"],
    ["--moe-a2a-backend", "deepep"],
    ["--max-logprobs", "50"],
    ["--preferred-sampling-params", '{"bogus": 1}'],
    ["--preferred-sampling-params", "not json"],
    ["--override-generation-config", '{"temperature": 9}'],
    ["--served-model-name", "a", "b"],
    ["--api-key", "k1", "k2"],
    ["--cuda-graph-backend-decode", "breakable"],
    ["--model-impl", "transformers"],
    ["--decode-attention-backend", "fa3"],
    ["--moe-dense-tp-size", "2"],
    ["--enable-expert-parallel", "--data-parallel-size", "2"],
    ["--torch-compile-max-bs", "0", "--enable-torch-compile"],
]


@pytest.mark.parametrize("argv", REFUSED_VALUES, ids=" ".join)
def test_values_not_supported_yet_are_refused_with_a_reason(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        try:
            parse(argv)
        except FlagError as e:  # flags that parse but do not fit: the CLI exits 2 with e
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from e
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert argv[0] in err or argv[0].lstrip("-") in err, err


def test_a_wrong_value_names_the_accepted_values():
    out = subprocess.run(
        [sys.executable, "-m", "radixserve.cli", "serve", "--kv-cache-dtype", "fp9"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "invalid choice: 'fp9'" in out.stderr and "auto" in out.stderr


def test_an_unknown_flag_still_fails_with_argparse_message():
    out = subprocess.run(
        [sys.executable, "-m", "radixserve.cli", "serve", "--no-such-flag"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "unrecognized arguments: --no-such-flag" in out.stderr


def test_sglang_abbreviations_and_aliases():
    _, args = parse(
        [
            "--nccl-init",
            "10.0.0.1:5000",
            "--nnodes",
            "2",
            "--tensor-parallel-size",
            "4",
            "--enable-ep-moe",
        ]
    )
    assert args.dist_init_addr == "10.0.0.1:5000" and args.tp_size == 4 and args.ep_size == 4


def test_token_counts_take_suffixes_as_sglang_and_vllm():
    _, args = parse(
        ["--max-model-len", "32K", "--max-total-tokens", "25.6k", "--chunked-prefill-size", "2k"]
    )
    assert (args.context_length, args.max_total_tokens, args.chunked_prefill_size) == (
        32768,
        25600,
        2000,
    )


def test_vllm_max_num_batched_tokens_sets_the_prefill_chunk_and_budget():
    _, args = parse(["--max-num-batched-tokens", "4096"])
    assert args.chunked_prefill_size == 4096 and args.max_prefill_tokens == 4096


def test_schedule_conservativeness_reaches_the_scheduler_core():
    from radixserve.scheduler.server import build_core
    from radixserve.v1 import executor_pb2

    _, args = parse(["--schedule-conservativeness", "0.5"])
    core = build_core(
        args, executor_pb2.ExecutorModelInfo(kv_slots=1024, context_length=2048, eos_token_ids=[2])
    )
    assert core.init_new_token_ratio == pytest.approx(0.35)


def test_config_file_as_sglang_the_command_line_wins(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(
        "model-path: /m\ntensor-parallel-size: 2\nenable-metrics: true\nport: 31000\n"
        "disable-radix-cache: false\nlog_requests: true\n"
    )
    argv = load_config_file(["--config", str(config), "--port", "32000"])
    _, args = parse(argv)
    assert (args.model_path, args.tp_size, args.enable_metrics, args.port, args.log_requests) == (
        "/m",
        2,
        True,
        32000,
        True,
    )


def test_ignored_flags_warn_once_and_are_not_passed_to_children(capsys):
    ns, args = parse(["--enable-cache-report", "--trust-remote-code"])
    lines = warn_ignored(ns, "radixserve serve")
    assert len(lines) == 2 and "--enable-cache-report has no effect here" in lines[0]
    assert (
        "--enable-cache-report" not in args.to_cli() and "--trust-remote-code" not in args.to_cli()
    )


def test_launch_server_module_starts_like_sglangs(tmp_path):
    """`python -m radixserve.launch_server` is `radixserve serve`: a refused flag stops it as serve does."""
    out = subprocess.run(
        [sys.executable, "-m", "radixserve.launch_server", "--speculative-algorithm", "NEXTN"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (
        out.returncode == 2
        and "--speculative-algorithm" in out.stderr
        and "not supported yet" in out.stderr
    )
    out = subprocess.run(
        [sys.executable, "-m", "radixserve.launch_server", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (
        out.returncode == 0
        and "Memory and scheduling:" in out.stdout
        and "--tensor-parallel-size" in out.stdout
    )


def test_help_groups_flags_as_sglangs_reference():
    text = build_parser()._subparsers._group_actions[0].choices["serve"].format_help()
    order = [
        text.index(f"{name}:")
        for name in (
            "Model and tokenizer",
            "HTTP server",
            "Quantization and data type",
            "Memory and scheduling",
            "Runtime options",
            "Logging",
            "API related",
            "Data parallelism",
            "Multi-node distributed serving",
        )
    ]
    assert order == sorted(order)
    assert "--enable-cache-report" not in text  # ignored and refused flags stay out of --help
