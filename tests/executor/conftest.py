"""Fixtures of the executor tests."""

import json

import pytest

from radixserve.executor.runner import ModelRunner
from tests.executor.tiny_llama import TINY_CONFIG
from tests.configs import runner_config


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    (folder / "config.json").write_text(json.dumps(TINY_CONFIG))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 5]}))
    return folder


@pytest.fixture()
def runner(model_dir):
    return ModelRunner(
        model_dir,
        runner_config(
            dtype="float32", device="cpu", load_format="dummy", random_seed=0, max_total_tokens=200
        ),
    )
