"""The LoRA flags: several --lora-paths (SGLang's NAME=PATH list, vLLM's --lora-modules) survive the
launcher's hand-over to the services (ServerArgs.to_cli, parsed again) and the environment; the
adapter-name rule."""

import pytest

from radixserve.cli import build_parser
from radixserve.common.args import args_from_namespace
from radixserve.common.config import lora_name_problem


def parse(argv):
    return args_from_namespace(build_parser().parse_args(["serve", *argv]), "serve")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    monkeypatch.delenv("RADIXSERVE_LORA_PATHS", raising=False)


def test_lora_paths_round_trip_through_to_cli():
    args = parse(["--lora-paths", "a=/loras/a", "/loras/b", "--max-loras-per-batch", "3"])
    assert args.lora_paths == "a=/loras/a /loras/b" and args.lora_enabled
    argv = args.to_cli()
    i = argv.index("--lora-paths")
    assert argv[i + 1] == "a=/loras/a /loras/b"
    again = parse(argv)
    assert again.lora_paths == args.lora_paths and again.max_loras_per_batch == 3
    assert parse(["--lora-modules", "x=/y"]).lora_paths == "x=/y"
    assert not parse([]).lora_enabled and parse(["--enable-lora"]).lora_enabled


def test_lora_paths_from_the_environment(monkeypatch):
    monkeypatch.setenv("RADIXSERVE_LORA_PATHS", "a=/loras/a b=/loras/b")
    assert parse([]).lora_paths == "a=/loras/a b=/loras/b"


def test_adapter_names():
    assert lora_name_problem("my-adapter_1.v2") is None
    for bad in ("", "base:adapter", "x" * 257):
        assert lora_name_problem(bad)
