"""Models named by hub id: `--model-path meta-llama/Meta-Llama-3-8B-Instruct`, as SGLang and vLLM take them.

A `--model-path` (or `--tokenizer-path`) value is a hub id when no local file or folder of that name
exists and it reads `org/name` or a bare `name` (no leading `/`, `.` or `~`, no `..`). It is resolved
to a local snapshot folder:

- Hugging Face (the default), through the HF cache and `huggingface_hub`: the cache is `--download-dir`
  when given, else `$HF_HUB_CACHE`, else `$HF_HOME/hub` (default ~/.cache/huggingface/hub); `--revision`
  names a branch, tag or commit (default main).
- ModelScope, when `SGLANG_USE_MODELSCOPE` or `RADIXSERVE_USE_MODELSCOPE` is true, through the
  `modelscope` library and its cache (`--download-dir`, else `$MODELSCOPE_CACHE`, default ~/.cache/modelscope).

The cache is looked in first, without network: a snapshot found there is used as it is (a branch is not
checked for newer commits). Otherwise the files a serving engine needs are downloaded (with the hub
library's progress bars): *.json (config, generation config, tokenizer, safetensors index,
sentence-transformers modules), tokenizer vocabularies, chat templates and the top-level *.safetensors;
never *.bin/*.pth/*.h5/*.msgpack/onnx, which radixserve does not load. A repo of GGUF files only
gives its one .gguf (converted by model_files.py as a local one). With `HF_HUB_OFFLINE` (or
`TRANSFORMERS_OFFLINE`) set, for either hub, nothing is downloaded: a model not in the cache is an error.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import pathlib
import re
from collections.abc import Iterable

log = logging.getLogger("radixserve.model_hub")

TRUE_VALUES = ("1", "true", "yes", "on")
MODELSCOPE_ENV = ("SGLANG_USE_MODELSCOPE", "RADIXSERVE_USE_MODELSCOPE")
OFFLINE_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
HF_DEFAULT_REVISION = "main"
MODELSCOPE_DEFAULT_REVISION = "master"
_ID_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,95}")
# Top-level files besides *.json that tokenizers read: sentencepiece models, BPE merges and vocabularies.
TOKENIZER_SUFFIXES = (".model", ".tiktoken", ".txt")
WEIGHTS_SUFFIX = ".safetensors"
GGUF_SUFFIX = ".gguf"
UNLOADABLE_SUFFIXES = (".bin", ".pth", ".pt", ".h5", ".msgpack", ".onnx", ".ckpt")


class HubModelError(FileNotFoundError):
    """A hub id that could not be turned into local files (not cached and not downloadable, unknown,
    gated, or holding nothing radixserve can load)."""


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in TRUE_VALUES


def use_modelscope() -> bool:
    return any(_env_true(name) for name in MODELSCOPE_ENV)


def hub_offline() -> bool:
    return any(_env_true(name) for name in OFFLINE_ENV)


def is_hub_id(value: str | os.PathLike | None) -> bool:
    """Whether a --model-path / --tokenizer-path value names a hub repo rather than a local path."""
    if value is None:
        return False
    text = os.fspath(value)
    if not isinstance(text, str) or not text or text.startswith(("/", ".", "~")) or ".." in text:
        return False
    if text.endswith(GGUF_SUFFIX) or pathlib.Path(text).exists():
        return False  # a missing local .gguf stays a local path (its error names the file)
    parts = text.split("/")
    return len(parts) <= 2 and all(_ID_PART.fullmatch(part) for part in parts)


def hf_cache_dir(download_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """The HF hub cache: download_dir, else $HF_HUB_CACHE, else $HF_HOME/hub (read now, not at import)."""
    if download_dir:
        return pathlib.Path(download_dir).expanduser()
    env = os.environ
    cache = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if cache:
        return pathlib.Path(cache).expanduser()
    home = env.get("HF_HOME") or os.path.join(
        env.get("XDG_CACHE_HOME") or "~/.cache", "huggingface"
    )
    return pathlib.Path(home).expanduser() / "hub"


def modelscope_cache_dir(download_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """The ModelScope cache: download_dir, else $MODELSCOPE_CACHE, else ~/.cache/modelscope."""
    if download_dir:
        return pathlib.Path(download_dir).expanduser()
    return pathlib.Path(os.environ.get("MODELSCOPE_CACHE") or "~/.cache/modelscope").expanduser()


# ---- which files ----


def _is_top(path: str) -> bool:
    return "/" not in path


def _weight_files(top: list[str]) -> list[str]:
    """Top-level safetensors; consolidated.safetensors (Mistral's own format) only when nothing else."""
    files = [f for f in top if f.endswith(WEIGHTS_SUFFIX)]
    hf_layout = [f for f in files if not f.startswith("consolidated")]
    return hf_layout or files


def select_files(files: Iterable[str], model_id: str, weights: bool = True) -> list[str]:
    """The files of a repo (paths as the hub lists them) that serving needs; weights=False: config and
    tokenizer only (dummy weights, a tokenizer). Raises HubModelError for a repo it cannot serve."""
    files = sorted(set(files))
    top = [f for f in files if _is_top(f)]
    small = [
        f
        for f in files
        if f.endswith(".json")
        or f.endswith(".jinja")
        or (_is_top(f) and f.endswith(TOKENIZER_SUFFIXES))
    ]
    safetensors = _weight_files(top)
    ggufs = [f for f in top if f.endswith(GGUF_SUFFIX)]
    if safetensors and "config.json" in top:
        return sorted(set(small + safetensors)) if weights else small
    if not weights and "config.json" in top:
        return small
    if len(ggufs) == 1:
        return sorted(set(small + ggufs))
    if ggufs:
        raise HubModelError(
            f"{model_id} holds several .gguf files and no safetensors: {ggufs}; download the one you want "
            f"(`hf download {model_id} FILE.gguf --local-dir DIR`) and pass its path as --model-path"
        )
    if "config.json" not in top:
        raise HubModelError(
            f"{model_id} has no config.json and no .gguf file: not a model radixserve can load"
        )
    other = [f for f in top if f.endswith(UNLOADABLE_SUFFIXES)]
    raise HubModelError(
        f"{model_id} has no .safetensors weights{f' (only {other[:4]})' if other else ''}; radixserve loads "
        "safetensors or GGUF: convert the weights to safetensors and pass the local folder"
    )


def servable_path(
    folder: pathlib.Path, model_id: str, weights: bool = True
) -> tuple[pathlib.Path | None, str]:
    """What to load from a snapshot folder (the folder, or its one .gguf file), or None and what it lacks."""
    ggufs = sorted(folder.glob("*" + GGUF_SUFFIX))
    has_config = (folder / "config.json").is_file()
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as e:
            return None, f"its {index.name} is unreadable ({e})"
        missing = [s for s in shards if not (folder / s).is_file()]
        weights_problem = f"weight files {missing[:3]} are missing" if missing else ""
    else:
        present = any(p.is_file() for p in folder.glob("*" + WEIGHTS_SUFFIX))
        weights_problem = "" if present else "it has no .safetensors weights"
    if has_config and (not weights or not weights_problem):
        return folder, ""
    if len(ggufs) == 1 and ggufs[0].is_file():
        return ggufs[0], ""
    if len(ggufs) > 1 and not has_config:
        raise HubModelError(
            f"{model_id} ({folder}) holds several .gguf files: {[g.name for g in ggufs]}; "
            "pass the path of the one you want as --model-path"
        )
    return None, weights_problem if has_config else "it has no config.json"


# ---- resolution ----


def resolve_hub_model(
    model_id: str,
    revision: str | None = None,
    download_dir: str | os.PathLike | None = None,
    *,
    weights: bool = True,
) -> pathlib.Path:
    """A local snapshot folder (or the .gguf file of a GGUF-only repo) for a hub id: from the cache when
    there, else downloaded; weights=False needs config and tokenizer files only."""
    if use_modelscope():
        return _resolve_modelscope(model_id, revision, download_dir, weights)
    return _resolve_hf(model_id, revision, download_dir, weights)


def _missing_message(
    model_id: str, revision: str, cache: pathlib.Path, why: str, hub: str, command: str
) -> str:
    return (
        f"model {model_id!r} (revision {revision}) is not in the {hub} cache {cache} ({why}), and no local "
        f"file or folder of that name exists. Download it into that cache where the network allows "
        f"(`{command}`), or pass a local model folder as --model-path"
    )


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}".strip().splitlines()[0][:500]


def _hf_download_error(
    error: Exception,
    model_id: str,
    revision: str,
    cache: pathlib.Path,
    command: str,
    cached_problem: str,
) -> HubModelError:
    from huggingface_hub.errors import (
        GatedRepoError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(error, GatedRepoError):
        return HubModelError(
            f"{model_id} is a gated model on Hugging Face: accept its license on https://huggingface.co/{model_id} "
            "and log in (`hf auth login`, or set HF_TOKEN), or pass a local model folder"
        )
    if isinstance(error, RepositoryNotFoundError):
        return HubModelError(
            f"{model_id} is neither a local path nor a model on Hugging Face (repository not found; a private "
            "one needs HF_TOKEN); check the spelling or pass a local model folder"
        )
    if isinstance(error, RevisionNotFoundError):
        return HubModelError(
            f"{model_id} has no revision {revision!r} on Hugging Face (--revision names a "
            "branch, tag or commit)"
        )
    why = f"{cached_problem}; " if cached_problem else ""
    return HubModelError(
        _missing_message(
            model_id,
            revision,
            cache,
            f"{why}downloading failed: {_describe(error)}",
            "Hugging Face",
            command,
        )
    )


def _resolve_hf(model_id: str, revision: str | None, download_dir, weights: bool) -> pathlib.Path:
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    cache = hf_cache_dir(download_dir)
    shown_revision = revision or HF_DEFAULT_REVISION
    command = (
        f"hf download {model_id}"
        + (f" --revision {revision}" if revision else "")
        + (f" --cache-dir {cache}" if download_dir else "")
    )
    cached_problem = "no complete snapshot of that revision"
    try:
        # Only config.json is checked against a cached file listing here; servable_path checks the rest.
        folder = snapshot_download(
            model_id,
            revision=revision,
            cache_dir=cache,
            local_files_only=True,
            allow_patterns=["config.json"],
        )
    except HFValidationError as e:
        raise HubModelError(f"{model_id!r} is neither a local path nor a valid hub id ({e})") from e
    except LocalEntryNotFoundError:
        pass
    else:
        path, cached_problem = servable_path(pathlib.Path(folder), model_id, weights)
        if path is not None:
            log.info("%s (revision %s) from the cache: %s", model_id, shown_revision, path)
            return path
        cached_problem = f"the cached snapshot {folder} is incomplete: {cached_problem}"
    if hub_offline():
        raise HubModelError(
            _missing_message(
                model_id,
                shown_revision,
                cache,
                f"{cached_problem}; HF_HUB_OFFLINE is set, so nothing is downloaded",
                "Hugging Face",
                command,
            )
        )
    try:
        # model_info fails fast without network (list_repo_files retries for half a minute); its siblings
        # list the repo's files.
        siblings = HfApi().model_info(model_id, revision=revision).siblings
        files = (
            [s.rfilename for s in siblings]
            if siblings is not None
            else HfApi().list_repo_files(model_id, revision=revision)
        )
    except Exception as e:  # noqa: BLE001 - every failure to reach the hub becomes one clear error
        raise _hf_download_error(e, model_id, shown_revision, cache, command, cached_problem) from e
    selected = select_files(files, model_id, weights)
    log.info(
        "downloading %d files of %s (revision %s) into %s",
        len(selected),
        model_id,
        shown_revision,
        cache,
    )
    try:
        folder = snapshot_download(
            model_id,
            revision=revision,
            cache_dir=cache,
            allow_patterns=[glob.escape(f) for f in selected],
        )
    except Exception as e:  # noqa: BLE001
        raise _hf_download_error(e, model_id, shown_revision, cache, command, cached_problem) from e
    path, problem = servable_path(pathlib.Path(folder), model_id, weights)
    if path is None:
        raise HubModelError(
            f"downloaded {model_id} (revision {shown_revision}) into {folder}, but {problem}"
        )
    return path


def _resolve_modelscope(
    model_id: str, revision: str | None, download_dir, weights: bool
) -> pathlib.Path:
    try:
        from modelscope.hub.api import HubApi
        from modelscope.hub.snapshot_download import snapshot_download
    except ImportError as e:
        raise HubModelError(
            f"{model_id}: SGLANG_USE_MODELSCOPE / RADIXSERVE_USE_MODELSCOPE asks for ModelScope, but the modelscope "
            "library is not installed: `pip install modelscope` (or unset the variable to use Hugging Face)"
        ) from e
    if "/" not in model_id:
        raise HubModelError(
            f"{model_id!r} is neither a local path nor a ModelScope id (ModelScope ids read ORG/NAME)"
        )
    cache = modelscope_cache_dir(download_dir)
    cache_arg = str(cache)  # always given: the library reads $MODELSCOPE_CACHE once per process
    shown_revision = revision or MODELSCOPE_DEFAULT_REVISION
    command = (
        f"modelscope download --model {model_id}"
        + (f" --revision {revision}" if revision else "")
        + (f" --cache_dir {cache}" if download_dir else "")
    )
    cached_problem = "no snapshot of that revision"
    try:
        folder = snapshot_download(
            model_id, revision=revision, cache_dir=cache_arg, local_files_only=True
        )
    except Exception as e:  # noqa: BLE001 - the library's not-cached error class differs between versions
        log.debug("%s not in the ModelScope cache: %s", model_id, _describe(e))
    else:
        path, cached_problem = servable_path(pathlib.Path(folder), model_id, weights)
        if path is not None:
            log.info(
                "%s (revision %s) from the ModelScope cache: %s", model_id, shown_revision, path
            )
            return path
        cached_problem = f"the cached snapshot {folder} is incomplete: {cached_problem}"
    if hub_offline():
        raise HubModelError(
            _missing_message(
                model_id,
                shown_revision,
                cache,
                f"{cached_problem}; HF_HUB_OFFLINE is set, so nothing is downloaded",
                "ModelScope",
                command,
            )
        )
    try:
        listing = HubApi().get_model_files(model_id, revision=revision, recursive=True)
        files = [
            item.get("Path") or item.get("Name")
            for item in listing
            if item.get("Type", "blob") != "tree"
        ]
        selected = select_files([f for f in files if f], model_id, weights)
        log.info(
            "downloading %d files of %s (revision %s) from ModelScope into %s",
            len(selected),
            model_id,
            shown_revision,
            cache,
        )
        folder = snapshot_download(
            model_id,
            revision=revision,
            cache_dir=cache_arg,
            allow_patterns=[glob.escape(f) for f in selected],
        )
    except HubModelError:
        raise
    except Exception as e:  # noqa: BLE001
        raise HubModelError(
            f"could not get {model_id!r} (revision {shown_revision}) from ModelScope ({_describe(e)}): check the id "
            f"and revision, the network and your ModelScope token; or download it where the network allows "
            f"(`{command}`) or pass a local model folder"
        ) from e
    path, problem = servable_path(pathlib.Path(folder), model_id, weights)
    if path is None:
        raise HubModelError(
            f"downloaded {model_id} (revision {shown_revision}) into {folder}, but {problem}"
        )
    return path
