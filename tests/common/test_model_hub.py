"""Models named by hub id (services/common/model_hub.py), offline: HF and ModelScope caches laid out on disk
as their libraries lay them out, downloads replaced by fakes, and no socket may be opened."""

import hashlib
import json
import pathlib
import socket
import sys
from types import SimpleNamespace

import pytest

from radixserve.common.model_files import default_model_name, find_gguf, resolve_model_path
from radixserve.common.model_hub import HubModelError, is_hub_id, resolve_hub_model, select_files

REPO = "tiny-org/tiny-llama"
MAIN = "a" * 40
DEV = "b" * 40
TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 128,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
    "rope_theta": 10000.0,
    "eos_token_id": 2,
    "dtype": "bfloat16",
}
TOKENIZER = json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {}, "merges": []}})


def tiny_files(tag: str = "main", weights: bool = True) -> dict[str, bytes]:
    files = {
        "config.json": json.dumps({**TINY_CONFIG, "_tag": tag}).encode(),
        "tokenizer.json": TOKENIZER.encode(),
        "tokenizer_config.json": b"{}",
    }
    if weights:
        files["model.safetensors"] = b"not read by the resolution tests: " + tag.encode()
    return files


def hf_repo_folder(cache: pathlib.Path, repo_id: str) -> pathlib.Path:
    return cache / ("models--" + repo_id.replace("/", "--"))


def write_hf_snapshot(
    cache: pathlib.Path,
    repo_id: str,
    commit: str,
    files: dict[str, bytes],
    refs: tuple[str, ...] = ("main",),
) -> pathlib.Path:
    """huggingface_hub's cache layout: blobs/<hash> holds the bytes, snapshots/<commit>/<path> links to it
    (relative symlink) and refs/<branch or tag> holds the commit hash."""
    repo = hf_repo_folder(cache, repo_id)
    snapshot = repo / "snapshots" / commit
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(
            pathlib.Path(*[".."] * (len(pathlib.PurePosixPath(name).parts) + 1), "blobs", blob.name)
        )
    for ref in refs:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture(autouse=True)
def hub_env(monkeypatch, tmp_path):
    """No hub variable of the machine leaks in; offline unless a test says otherwise; no socket opens."""
    for name in (
        "HF_HUB_CACHE",
        "HUGGINGFACE_HUB_CACHE",
        "HF_HOME",
        "XDG_CACHE_HOME",
        "TRANSFORMERS_OFFLINE",
        "SGLANG_USE_MODELSCOPE",
        "RADIXSERVE_USE_MODELSCOPE",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "ms-cache"))
    monkeypatch.setenv("MODELSCOPE_HOME", str(tmp_path / "ms-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access attempted in an offline test")

    real_connect = socket.socket.connect

    def connect(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            refuse(address)
        return real_connect(sock, address)

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", connect)
    return attempts


@pytest.fixture()
def hf_cache(tmp_path):
    """The default HF cache ($HF_HOME/hub) holding REPO at MAIN (main, tag v1.0) and DEV (branch dev)."""
    cache = tmp_path / "hf-home" / "hub"
    write_hf_snapshot(cache, REPO, MAIN, tiny_files("main"), refs=("main", "v1.0"))
    write_hf_snapshot(cache, REPO, DEV, tiny_files("dev"), refs=("dev",))
    return cache


def tag_of(folder: pathlib.Path) -> str:
    return json.loads((folder / "config.json").read_text())["_tag"]


# ---- what is a hub id ----


@pytest.mark.parametrize(
    "value",
    ["meta-llama/Meta-Llama-3-8B-Instruct", "Qwen/Qwen2.5-0.5B-Instruct", "gpt2", "org/name_v1.5"],
)
def test_hub_ids(value):
    assert is_hub_id(value)


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        "/abs/org/name",
        "./org/name",
        "../name",
        "~/models/x",
        "org/../x",
        "a/b/c",
        "org/name with space",
        "model.gguf",
        "org/-bad",
        "org/",
    ],
)
def test_not_hub_ids(value):
    assert not is_hub_id(value)


def test_an_existing_folder_shaped_like_an_id_is_a_folder(tmp_path, monkeypatch, hf_cache):
    local = tmp_path / "work" / "tiny-org" / "tiny-llama"
    local.mkdir(parents=True)
    (local / "config.json").write_text(json.dumps(TINY_CONFIG))
    monkeypatch.chdir(tmp_path / "work")
    assert not is_hub_id(REPO)
    assert resolve_model_path(REPO) == local.resolve()  # not the cached snapshot of the same id
    assert default_model_name(REPO) == "tiny-llama"


# ---- Hugging Face cache ----


def test_resolves_an_id_from_the_cache_offline(hf_cache, hub_env):
    folder = resolve_model_path(REPO)
    assert folder == (hf_repo_folder(hf_cache, REPO) / "snapshots" / MAIN).resolve()
    assert tag_of(folder) == "main" and (folder / "tokenizer.json").read_text() == TOKENIZER
    assert hub_env == []


@pytest.mark.parametrize(
    "revision, tag",
    [("main", "main"), ("dev", "dev"), ("v1.0", "main"), (MAIN, "main"), (DEV, "dev")],
)
def test_revision_as_branch_tag_or_commit(hf_cache, revision, tag):
    folder = resolve_model_path(REPO, revision=revision)
    assert tag_of(folder) == tag
    assert folder.name == (DEV if tag == "dev" else MAIN)


def test_download_dir_overrides_hf_home(hf_cache, tmp_path):
    other = tmp_path / "downloads"
    write_hf_snapshot(other, REPO, DEV, tiny_files("download-dir"))
    folder = resolve_model_path(REPO, download_dir=str(other))
    assert tag_of(folder) == "download-dir" and folder.is_relative_to(other.resolve())
    assert tag_of(resolve_model_path(REPO)) == "main"  # without it: $HF_HOME/hub


@pytest.mark.parametrize("variable", ["HF_HOME", "HF_HUB_CACHE"])
def test_hf_cache_variables_are_honoured(tmp_path, monkeypatch, variable):
    root = tmp_path / "elsewhere"
    cache = root / "hub" if variable == "HF_HOME" else root
    write_hf_snapshot(cache, REPO, MAIN, tiny_files(variable))
    monkeypatch.setenv(variable, str(root))
    assert tag_of(resolve_model_path(REPO)) == variable


def test_missing_model_offline_is_a_clear_error_without_network(hf_cache, hub_env, monkeypatch):
    import huggingface_hub

    def no_listing(*args, **kwargs):
        raise AssertionError("the hub was asked while offline")

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", no_listing)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", no_listing)
    with pytest.raises(HubModelError) as info:
        resolve_model_path("other-org/missing-model", revision="v2")
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    for part in (
        "other-org/missing-model",
        "v2",
        str(hf_cache),
        "HF_HUB_OFFLINE",
        "hf download other-org/missing-model --revision v2",
        "local model folder",
    ):
        assert part in message
    with pytest.raises(HubModelError, match="revision nope"):
        resolve_model_path(REPO, revision="nope")  # a branch never fetched
    assert hub_env == []


def test_incomplete_snapshot_needs_weights_but_serves_a_tokenizer(tmp_path):
    cache = tmp_path / "hf-home" / "hub"
    write_hf_snapshot(cache, REPO, MAIN, tiny_files(weights=False))
    with pytest.raises(HubModelError, match="incomplete: it has no .safetensors weights"):
        resolve_model_path(REPO)
    assert (resolve_model_path(REPO, weights=False) / "tokenizer.json").is_file()


def test_sharded_snapshot_checks_its_index(tmp_path):
    cache = tmp_path / "hf-home" / "hub"
    files = tiny_files(weights=False)
    files["model.safetensors.index.json"] = json.dumps(
        {
            "weight_map": {
                "a": "model-00001-of-00002.safetensors",
                "b": "model-00002-of-00002.safetensors",
            }
        }
    ).encode()
    files["model-00001-of-00002.safetensors"] = b"1"
    write_hf_snapshot(cache, REPO, MAIN, files)
    with pytest.raises(HubModelError, match="model-00002-of-00002.safetensors"):
        resolve_model_path(REPO)
    write_hf_snapshot(
        cache, REPO, DEV, {**files, "model-00002-of-00002.safetensors": b"2"}, refs=("main",)
    )
    assert resolve_model_path(REPO).name == DEV


def test_gguf_only_repo(tmp_path):
    cache = tmp_path / "hf-home" / "hub"
    write_hf_snapshot(cache, "org/tiny-GGUF", MAIN, {"tiny.Q4_0.gguf": b"GGUF", "README.md": b"x"})
    gguf = resolve_hub_model("org/tiny-GGUF")
    assert (
        gguf.name == "tiny.Q4_0.gguf" and find_gguf(gguf) == gguf
    )  # then converted as a local GGUF
    assert default_model_name("org/tiny-GGUF") == "org/tiny-GGUF"
    write_hf_snapshot(
        cache, "org/many-GGUF", MAIN, {"m.Q4_0.gguf": b"GGUF", "m.Q8_0.gguf": b"GGUF"}
    )
    with pytest.raises(HubModelError, match="several .gguf files"):
        resolve_model_path("org/many-GGUF")


def test_default_model_name_is_the_id():
    assert (
        default_model_name("meta-llama/Meta-Llama-3-8B-Instruct")
        == "meta-llama/Meta-Llama-3-8B-Instruct"
    )
    assert (
        default_model_name("gpt2", revision="main", download_dir="/nowhere") == "gpt2"
    )  # no lookup


def test_local_paths_are_unchanged(tmp_path):
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert resolve_model_path(folder, revision="ignored") == folder.resolve()
    assert default_model_name(str(folder)) == "my-model"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model_path(str(tmp_path / "missing"))


# ---- downloads (the hub replaced by fakes) ----

LISTING = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "chat_template.jinja",
    "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors",
    "model.safetensors.index.json",
    "consolidated.safetensors",
    "pytorch_model.bin",
    "tf_model.h5",
    "flax_model.msgpack",
    "onnx/model.onnx",
    "original/consolidated.00.pth",
    "README.md",
    ".gitattributes",
    "1_Pooling/config.json",
    "merges.txt",
]


def test_select_files():
    chosen = select_files(LISTING, REPO)
    assert chosen == sorted(
        [
            "config.json",
            "generation_config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "tokenizer.model",
            "special_tokens_map.json",
            "chat_template.jinja",
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
            "model.safetensors.index.json",
            "1_Pooling/config.json",
            "merges.txt",
        ]
    )
    assert not any(f.endswith(".safetensors") for f in select_files(LISTING, REPO, weights=False))
    assert (
        select_files(["config.json", "consolidated.safetensors"], REPO)[-1]
        == "consolidated.safetensors"
    )
    assert select_files(["README.md", "x.Q4_K_M.gguf"], REPO) == ["x.Q4_K_M.gguf"]
    with pytest.raises(HubModelError, match="several .gguf"):
        select_files(["a.gguf", "b.gguf"], REPO)
    with pytest.raises(
        HubModelError, match=r"no .safetensors weights \(only \['pytorch_model.bin'\]\)"
    ):
        select_files(["config.json", "pytorch_model.bin"], REPO)
    with pytest.raises(HubModelError, match="no config.json"):
        select_files(["README.md"], REPO)


@pytest.fixture()
def fake_hub(monkeypatch, tmp_path):
    """Online: model_info lists LISTING; snapshot_download 'downloads' into the cache as the library would."""
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE")
    real_snapshot_download = huggingface_hub.snapshot_download
    calls = []

    def snapshot_download(
        repo_id,
        *,
        revision=None,
        cache_dir=None,
        local_files_only=False,
        allow_patterns=None,
        **kwargs,
    ):
        if local_files_only:
            return real_snapshot_download(
                repo_id,
                revision=revision,
                cache_dir=cache_dir,
                local_files_only=True,
                allow_patterns=allow_patterns,
                **kwargs,
            )
        calls.append(
            {
                "repo_id": repo_id,
                "revision": revision,
                "cache_dir": cache_dir,
                "allow": allow_patterns,
            }
        )
        files = {name: b"{}" if name.endswith(".json") else b"data" for name in allow_patterns}
        files["config.json"] = json.dumps({**TINY_CONFIG, "_tag": "downloaded"}).encode()
        files["model.safetensors.index.json"] = json.dumps(
            {
                "weight_map": {
                    "a": "model-00001-of-00002.safetensors",
                    "b": "model-00002-of-00002.safetensors",
                }
            }
        ).encode()
        return str(
            write_hf_snapshot(
                pathlib.Path(cache_dir), repo_id, DEV, files, refs=(revision or "main",)
            )
        )

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    from huggingface_hub.hf_api import RepoSibling

    def model_info(self, repo_id, revision=None):
        return SimpleNamespace(
            id=repo_id, siblings=[RepoSibling(rfilename=name) for name in LISTING]
        )

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    return calls


def test_download_when_not_cached(fake_hub, tmp_path, hub_env):
    cache = tmp_path / "dl"
    folder = resolve_model_path(REPO, revision="dev", download_dir=str(cache))
    assert tag_of(folder) == "downloaded" and folder.is_relative_to(cache.resolve())
    [call] = fake_hub
    assert call["revision"] == "dev" and pathlib.Path(call["cache_dir"]) == cache
    assert (
        "pytorch_model.bin" not in call["allow"] and "consolidated.safetensors" not in call["allow"]
    )
    assert "model-00002-of-00002.safetensors" in call["allow"]
    assert (
        resolve_model_path(REPO, revision="dev", download_dir=str(cache)) == folder
        and len(fake_hub) == 1
    )
    assert hub_env == []


def test_cached_snapshot_is_used_without_asking_the_hub(fake_hub, hf_cache):
    assert tag_of(resolve_model_path(REPO)) == "main" and fake_hub == []


def hub_http_error(cls, status: int):
    import httpx2

    request = httpx2.Request("GET", f"https://huggingface.co/api/models/{REPO}")
    return cls(f"{status} error", response=httpx2.Response(status, request=request))


@pytest.mark.parametrize(
    "error, message",
    [
        ("not_found", "neither a local path nor a model on Hugging Face"),
        ("gated", "gated model on Hugging Face"),
        ("revision", "has no revision 'dev'"),
        ("network", r"downloading failed: ConnectionError: Name or service not known"),
    ],
)
def test_hub_errors_are_clear(fake_hub, monkeypatch, error, message):
    import huggingface_hub
    from huggingface_hub.errors import (
        GatedRepoError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    errors = {
        "not_found": lambda: hub_http_error(RepositoryNotFoundError, 404),
        "gated": lambda: hub_http_error(GatedRepoError, 401),
        "revision": lambda: hub_http_error(RevisionNotFoundError, 404),
        "network": lambda: ConnectionError("Name or service not known"),
    }

    def fail(self, repo_id, revision=None):
        raise errors[error]()

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", fail)
    with pytest.raises(HubModelError, match=message) as info:
        resolve_model_path(REPO, revision="dev")
    assert REPO in str(info.value) and fake_hub == []


# ---- ModelScope ----


def write_modelscope_snapshot(
    cache: pathlib.Path, repo_id: str, revision: str, files: dict[str, bytes]
) -> pathlib.Path:
    """modelscope (>= 1.38) layout: {cache}/models/{owner}--{name}/snapshots/{revision}/{files}, plain files."""
    snapshot = cache / "models" / repo_id.replace("/", "--") / "snapshots" / revision
    for name, data in files.items():
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).write_bytes(data)
    return snapshot


@pytest.fixture()
def modelscope_env(monkeypatch, tmp_path):
    pytest.importorskip("modelscope")
    monkeypatch.setenv("SGLANG_USE_MODELSCOPE", "true")
    return tmp_path / "ms-cache"  # $MODELSCOPE_CACHE (hub_env)


def test_modelscope_cache(modelscope_env, tmp_path, hub_env):
    cache = modelscope_env
    write_modelscope_snapshot(
        cache, "Qwen/Qwen2.5-0.5B-Instruct", "master", tiny_files("ms-master")
    )
    write_modelscope_snapshot(cache, "Qwen/Qwen2.5-0.5B-Instruct", "v1.0", tiny_files("ms-v1"))
    folder = resolve_model_path("Qwen/Qwen2.5-0.5B-Instruct")
    assert tag_of(folder) == "ms-master" and folder.is_relative_to(cache.resolve())
    assert tag_of(resolve_model_path("Qwen/Qwen2.5-0.5B-Instruct", revision="v1.0")) == "ms-v1"
    other = tmp_path / "ms-downloads"
    write_modelscope_snapshot(
        other, "Qwen/Qwen2.5-0.5B-Instruct", "master", tiny_files("ms-download-dir")
    )
    assert (
        tag_of(resolve_model_path("Qwen/Qwen2.5-0.5B-Instruct", download_dir=str(other)))
        == "ms-download-dir"
    )
    assert default_model_name("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"
    with pytest.raises(HubModelError) as info:
        resolve_model_path("Qwen/Missing-Model")
    assert "Qwen/Missing-Model" in str(info.value) and "ModelScope cache" in str(info.value)
    assert str(cache) in str(
        info.value
    ) and "modelscope download --model Qwen/Missing-Model" in str(info.value)
    assert hub_env == []


def test_modelscope_legacy_cache_layout(modelscope_env):
    # modelscope < 1.38 (still read by today's): {cache}/models/{owner}/{name, dots as ___}/{files}
    legacy = modelscope_env / "models" / "Qwen" / "Qwen2___5-0___5B"
    legacy.mkdir(parents=True)
    for name, data in tiny_files("legacy").items():
        (legacy / name).write_bytes(data)
    assert tag_of(resolve_model_path("Qwen/Qwen2.5-0.5B")) == "legacy"


def test_modelscope_not_installed(monkeypatch):
    monkeypatch.setenv("RADIXSERVE_USE_MODELSCOPE", "1")
    for name in ["modelscope", *(m for m in sys.modules if m.startswith("modelscope."))]:
        monkeypatch.setitem(sys.modules, name, None)  # import modelscope... -> ImportError
    with pytest.raises(HubModelError, match="pip install modelscope"):
        resolve_model_path("Qwen/Qwen2.5-0.5B-Instruct")


# ---- through the executor and the launcher ----


def tiny_llama_weights() -> dict:
    """Random weights of TINY_CONFIG under the HF Llama names (tied embeddings: no lm_head)."""
    import torch

    c = TINY_CONFIG
    hidden, inter = c["hidden_size"], c["intermediate_size"]
    head_dim = hidden // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * head_dim, c["num_key_value_heads"] * head_dim
    shapes = {
        "model.embed_tokens.weight": (c["vocab_size"], hidden),
        "model.norm.weight": (hidden,),
    }
    for i in range(c["num_hidden_layers"]):
        layer = f"model.layers.{i}."
        shapes.update(
            {
                layer + "self_attn.q_proj.weight": (q, hidden),
                layer + "self_attn.k_proj.weight": (kv, hidden),
                layer + "self_attn.v_proj.weight": (kv, hidden),
                layer + "self_attn.o_proj.weight": (hidden, q),
                layer + "mlp.gate_proj.weight": (inter, hidden),
                layer + "mlp.up_proj.weight": (inter, hidden),
                layer + "mlp.down_proj.weight": (hidden, inter),
                layer + "input_layernorm.weight": (hidden,),
                layer + "post_attention_layernorm.weight": (hidden,),
            }
        )
    generator = torch.Generator().manual_seed(0)
    return {name: torch.randn(shape, generator=generator) * 0.1 for name, shape in shapes.items()}


def test_model_runner_loads_a_hub_id(tmp_path, hub_env):
    import torch
    from safetensors.torch import save_file

    from radixserve.common.args import ServerArgs
    from radixserve.executor.runner import ModelRunner
    from tests.configs import runner_config
    from radixserve.common.step import NewRequest, StepInput

    saved = tmp_path / "saved"
    saved.mkdir()
    weights = tiny_llama_weights()
    save_file(weights, str(saved / "model.safetensors"), metadata={"format": "pt"})
    (saved / "config.json").write_text(json.dumps(TINY_CONFIG))
    files = {p.name: p.read_bytes() for p in saved.iterdir()}
    write_hf_snapshot(tmp_path / "hub-cache", REPO, MAIN, files)

    args = ServerArgs(
        model_path=REPO,
        download_dir=str(tmp_path / "hub-cache"),
        dtype="float32",
        device="cpu",
        random_seed=0,
        max_total_tokens=64,
        disable_cuda_graph=True,
    )
    from_id = ModelRunner.from_args(args)
    from_folder = ModelRunner(
        saved, runner_config(dtype="float32", device="cpu", random_seed=0, max_total_tokens=64)
    )
    assert from_id.config.path.name == MAIN
    ours, reference = from_id.model.state_dict(), from_folder.model.state_dict()
    assert ours.keys() == reference.keys() and all(torch.equal(ours[k], reference[k]) for k in ours)
    [embedding] = [v for k, v in ours.items() if "embed_tokens" in k]
    assert torch.equal(
        embedding, weights["model.embed_tokens.weight"]
    )  # the hub file's weights, not random
    out = from_id.step(StepInput(1, new_requests=[NewRequest("a", [3, 4, 5], [1, 2, 3])]))
    assert [o.request_id for o in out.outputs] == ["a"]
    assert hub_env == []


def test_launcher_reports_a_missing_hub_model(monkeypatch):
    from radixserve import launcher
    from radixserve.common.args import ServerArgs

    monkeypatch.setattr(
        launcher, "setup_logging", lambda *a, **k: None
    )  # keeps pytest's log capture

    def never(*args, **kwargs):
        raise AssertionError("services started for a missing model")

    monkeypatch.setattr(launcher, "start_services", never)
    assert launcher.launch(ServerArgs(model_path="org/not-downloaded")) == 1
