"""Loader and thin wrappers for the fused bf16 CPU decode kernels in cpu_decode.cpp.

The extension is compiled at first use with torch.utils.cpp_extension (gcc, ninja) and cached in the
torch extensions directory (TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions); later
processes only load the cached .so. `load()` returns None, with a warning logged, when the CPU lacks
AVX512-BF16, when RADIXSERVE_CPU_DECODE_KERNELS=0, or when the build fails: callers then keep the
torch path.
"""
from __future__ import annotations

import hashlib
import logging
import os
import pathlib
import threading
import time

import torch

log = logging.getLogger("radixserve.kernels.cpu_decode")

_SOURCE = pathlib.Path(__file__).with_name("cpu_decode.cpp")
_ENV_SWITCH = "RADIXSERVE_CPU_DECODE_KERNELS"
_lock = threading.Lock()
_module = None
_tried = False


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_has_avx512_bf16() -> bool:
    return {"avx512f", "avx512bw", "avx512vl", "avx512_bf16"} <= _cpu_flags()


def _extension_name() -> str:
    """Built with -march=native, so the cached .so is only valid on CPUs with the same features."""
    cpu_key = hashlib.sha256(" ".join(sorted(_cpu_flags())).encode()).hexdigest()[:10]
    return f"radixserve_cpu_decode_{cpu_key}"


def _build():
    from torch.utils import cpp_extension
    t0 = time.perf_counter()
    module = cpp_extension.load(
        name=_extension_name(), sources=[str(_SOURCE)],
        extra_cflags=["-O3", "-march=native", "-mavx512bf16", "-fopenmp", "-DNDEBUG"],
        extra_ldflags=["-fopenmp"], verbose=False)
    log.info("CPU decode kernels ready in %.1fs", time.perf_counter() - t0)
    return module


def load():
    """The compiled extension module, or None when it is unavailable (reason logged once)."""
    global _module, _tried
    with _lock:
        if _tried:
            return _module
        _tried = True
        if os.environ.get(_ENV_SWITCH, "1").lower() in ("0", "false", "no", "off"):
            log.info("CPU decode kernels disabled by %s", _ENV_SWITCH)
        elif not cpu_has_avx512_bf16():
            log.info("CPU decode kernels need AVX512-BF16; using the torch path")
        else:
            try:
                _module = _build()
            except Exception as e:  # compiler missing, ninja missing, build error, bad .so
                log.warning("building the CPU decode kernels failed (%s: %s); using the torch path",
                            type(e).__name__, str(e).strip().splitlines()[-1] if str(e).strip() else "")
        return _module


def reset_for_tests() -> None:
    global _module, _tried
    with _lock:
        _module, _tried = None, False


def pack_weight(w: torch.Tensor) -> torch.Tensor:
    """[N, K] weight -> [ceil(N/16), K/2, 16, 2] bf16: per 16 output rows, K in pairs (K must be even)."""
    n, k = w.shape
    assert k % 2 == 0, "K must be even"
    blocks = (n + 15) // 16
    padded = torch.zeros(blocks * 16, k, dtype=torch.bfloat16)
    padded[:n] = w.to(torch.bfloat16)
    return padded.view(blocks, 16, k // 2, 2).permute(0, 2, 1, 3).contiguous()


def bias_f32(b: torch.Tensor | None) -> torch.Tensor | None:
    return None if b is None else b.detach().float().contiguous()
