"""--generation-config: which generation_config.json the tokenizer reads its sampling defaults from."""

import json
import logging

import pytest

from radixserve.tokenizer.core import generation_defaults


def write(folder, config: dict):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "generation_config.json").write_text(json.dumps(config))
    return folder


def test_auto_reads_the_model_folder_and_vllm_reads_nothing(tmp_path):
    model = write(tmp_path / "model", {"eos_token_id": [2, 5], "temperature": 0.6, "top_k": 20})
    assert generation_defaults(model, "auto").as_dict() == {"temperature": 0.6, "top_k": 20}
    assert generation_defaults(model, "vllm").as_dict() == {}
    assert generation_defaults(tmp_path / "no-config", "auto").as_dict() == {}


def test_a_folder_setting_reads_that_folder(tmp_path):
    model = write(tmp_path / "model", {"temperature": 0.6})
    other = write(tmp_path / "other", {"top_p": 0.9, "max_new_tokens": 64})
    assert generation_defaults(model, str(other)).as_dict() == {"top_p": 0.9, "max_new_tokens": 64}
    with pytest.raises(FileNotFoundError, match="--generation-config"):
        generation_defaults(model, str(tmp_path / "missing"))


def test_values_out_of_range_are_ignored_with_a_warning(tmp_path, caplog):
    model = write(tmp_path / "model", {"temperature": 7.0})
    with caplog.at_level(logging.WARNING, logger="radixserve.tokenizer"):
        assert generation_defaults(model, "auto").as_dict() == {}
    assert any("temperature" in r.getMessage() for r in caplog.records)
