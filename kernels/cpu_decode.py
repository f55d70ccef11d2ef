"""Loader and thin wrappers for the fused bf16 CPU decode kernels in cpu_decode.cpp.

The extension is compiled at first use with torch.utils.cpp_extension (gcc, ninja) and cached in the
torch extensions directory (TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions); later
processes only load the cached .so. `load()` returns None, with a warning logged, when the CPU lacks
AVX512-BF16, when RADIXSERVE_CPU_DECODE_KERNELS=0, or when the build fails: callers then keep the
torch path.

Builds are guarded by a flock next to the build folder, which the OS releases when its holder dies: a
build killed midway (Ctrl-C, the launcher stopping the executor) never blocks later ones, and waiting for
another live process's build is bounded by RADIXSERVE_CPU_DECODE_BUILD_WAIT seconds (default 600).
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import logging
import os
import pathlib
import signal
import sys
import threading
import time

import torch

log = logging.getLogger("radixserve.kernels.cpu_decode")

_SOURCE = pathlib.Path(__file__).with_name("cpu_decode.cpp")
# The GGUF row-dot kernels it shares with gguf_cpu.cpp (torch rebuilds on changes of the .cpp only, so the
# header's text is part of the extension's name).
_GGUF_HEADER = pathlib.Path(__file__).with_name("gguf_cpu_kernels.h")
_ENV_SWITCH = "RADIXSERVE_CPU_DECODE_KERNELS"
# Seconds to wait for another live process's build of the extension before giving up on it (the torch
# path then serves this process). A build takes ~35 s, ~1 min on 2 cores, ~2 min on a loaded machine;
# 600 s leaves 5x that for slow or oversubscribed machines (several executors starting together) while
# still bounding a hung compiler. Giving up early costs this process the fast path for its whole life;
# waiting only delays its start, and only while a live process builds (a killed builder's lock is
# released by the OS at once).
_ENV_BUILD_WAIT = "RADIXSERVE_CPU_DECODE_BUILD_WAIT"
_DEFAULT_BUILD_WAIT_S = 600.0
# -march=native plus the ISA flags load() checks, spelled out so that the build does not depend on the CPU
# it runs on; -ffp-contract=off as gguf_cpu.cpp: the shared GGUF row dots must give the torch path's bits
# (no FMA contraction).
_CFLAGS = [
    "-O3",
    "-march=native",
    "-mavx512f",
    "-mavx512bw",
    "-mavx512vl",
    "-mavx512bf16",
    "-fopenmp",
    "-ffp-contract=off",
    "-DNDEBUG",
]
_LOCK_POLL_S = 0.2
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
    """Built with -march=native, so the cached .so is only valid on CPUs with the same features; and the
    name covers the sources (the .cpp and gguf_cpu_kernels.h, which torch's rebuild check does not read)
    and the flags: a changed source builds under a new name instead of rebuilding, in place, a .so that
    other worktrees' processes (sharing the torch extensions folder) load."""
    cpu_key = hashlib.sha256(
        " ".join(
            [*sorted(_cpu_flags()), *_CFLAGS, _SOURCE.read_text(), _GGUF_HEADER.read_text()]
        ).encode()
    ).hexdigest()[:10]
    return f"radixserve_cpu_decode_{cpu_key}"


def _build_directory(name: str) -> pathlib.Path:
    """Where torch.utils.cpp_extension.load() would put `name` by default (TORCH_EXTENSIONS_DIR/<name>,
    else <torch cache>/py<ver>_<accelerator>/<name>). We compute it and pass it to load() explicitly, so
    that our lock file and torch's build folder can never disagree."""
    from torch.utils import cpp_extension

    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root is None:
        if torch.version.hip is not None:
            accelerator = "rocm" + torch.version.hip.replace(".", "")
        elif torch.version.cuda is not None:
            accelerator = "cu" + torch.version.cuda.replace(".", "")
        else:
            accelerator = "cpu"
        py = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
        root = os.path.join(cpp_extension.get_default_build_root(), f"{py}_{accelerator}")
    return pathlib.Path(root) / name


def _build_wait_s() -> float:
    raw = os.environ.get(_ENV_BUILD_WAIT)
    if raw is None or not raw.strip():
        return _DEFAULT_BUILD_WAIT_S
    try:
        return max(0.0, float(raw))
    except ValueError:
        log.warning(
            "%s=%r is not a number of seconds; using %gs",
            _ENV_BUILD_WAIT,
            raw,
            _DEFAULT_BUILD_WAIT_S,
        )
        return _DEFAULT_BUILD_WAIT_S


def _leftover_build_pids(build_dir: pathlib.Path) -> list[int]:
    """ninja processes working in build_dir, and their children (the compiler): leftovers of a builder that
    was killed alone (the launcher SIGTERMs only the executor, so its ninja keeps running). Linux /proc."""
    try:
        entries = [int(e) for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return []
    target = os.path.realpath(build_dir)
    ninjas, children = [], {}
    for pid in entries:
        if pid == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
            comm = stat[stat.index("(") + 1 : stat.rindex(")")]
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
            children.setdefault(ppid, []).append(pid)
            if comm == "ninja" and os.readlink(f"/proc/{pid}/cwd") == target:
                ninjas.append(pid)
        except (OSError, ValueError):  # gone meanwhile, or another user's process
            continue
    found, todo = [], list(ninjas)
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.append(pid)
            todo.extend(children.get(pid, []))
    return found


def _stop_leftover_build(build_dir: pathlib.Path) -> bool:
    """Stop the ninja (and compiler) of a killed build still running in build_dir; False when some still
    run after 15 s (not ours to signal). They cannot finish anyway: torch reads ninja's output through a
    pipe whose reader died with the builder, so ninja dies of SIGPIPE at its next line, before recording
    or linking anything; meanwhile its compile would only race ours on the same files."""
    start = time.monotonic()
    logged = False
    while True:
        pids = _leftover_build_pids(build_dir)
        if not pids:
            return True
        waited = time.monotonic() - start
        if waited >= 15.0:
            log.warning(
                "processes of a killed build (pid %s) still run in %s; using the torch path",
                ", ".join(map(str, pids)),
                build_dir,
            )
            return False
        if not logged:
            log.warning(
                "stopping the build left running in %s by a killed process (pid %s)",
                build_dir,
                ", ".join(map(str, pids)),
            )
            logged = True
        sig = (
            signal.SIGTERM if waited < 5.0 else signal.SIGKILL
        )  # ninja and gcc end at once on SIGTERM
        for pid in pids:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(_LOCK_POLL_S)


def _acquire_build_lock(lock_path: pathlib.Path, deadline: float) -> int | None:
    """An fd holding an exclusive flock on lock_path, or None when another process still holds it at
    `deadline`. The OS drops a flock when its holder dies, however it dies, so a killed builder never
    blocks the next one. The file is never deleted (deleting a flock file lets two processes lock
    two different files); it holds the holder's pid, for the log."""
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    logged = False
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                pass
            now = time.monotonic()
            if now >= deadline:
                os.close(fd)
                return None
            if not logged:
                try:
                    holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                except OSError:
                    holder = "?"
                log.warning(
                    "waiting up to %.0fs for another process (pid %s) to build the CPU decode kernels "
                    "(lock %s)",
                    deadline - now,
                    holder,
                    lock_path,
                )
                logged = True
            time.sleep(min(_LOCK_POLL_S, max(0.0, deadline - now)))
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd
    except BaseException:
        os.close(fd)
        raise


def _compile(name: str, build_dir: pathlib.Path) -> str:
    """The compile itself (torch.utils.cpp_extension, gcc, ninja; a no-op when the cached build is current);
    callers hold the build lock. Returns the path of the .so, which torch has dlopen()ed (so its symbols
    resolve) but not imported: importing runs AVX512 code, building and dlopen() do not.

    The ISA flags are spelled out although -march=native implies them on the CPUs load() accepts (it
    checks exactly these four), so that the build does not depend on the CPU it runs on."""
    from torch.utils import cpp_extension

    return cpp_extension.load(
        name=name,
        sources=[str(_SOURCE)],
        build_directory=str(build_dir),
        is_python_module=False,
        extra_cflags=_CFLAGS,
        extra_ldflags=["-fopenmp"],
        verbose=False,
    )


def _build_library() -> str | None:
    """Build the extension (or reuse the cached build) under the build lock; the path of the .so, or None
    when another process's build of it did not finish within RADIXSERVE_CPU_DECODE_BUILD_WAIT seconds
    (warning logged).

    torch guards its build folder with `<build dir>/lock`, a file created with O_EXCL and removed when the
    build ends; a builder killed meanwhile leaves it behind and torch then waits on it forever, silently.
    We take our own flock on `<build dir>.lock` around torch's load() first: while we hold it no live
    process of ours is building, so a torch lock file found then is stale and is removed."""
    name = _extension_name()
    build_dir = _build_directory(name)
    build_dir.mkdir(parents=True, exist_ok=True)
    lock_path = build_dir.with_name(build_dir.name + ".lock")
    wait_s = _build_wait_s()
    deadline = time.monotonic() + wait_s
    fd = _acquire_build_lock(lock_path, deadline)
    if fd is None:
        log.warning(
            "another process has been building the CPU decode kernels for over %gs (%s; lock %s); "
            "using the torch path",
            wait_s,
            _ENV_BUILD_WAIT,
            lock_path,
        )
        return None
    try:
        torch_lock = build_dir / "lock"
        if torch_lock.exists():
            if not _stop_leftover_build(build_dir):
                return None
            log.warning(
                "removing stale torch build lock %s left by a killed build of the CPU decode kernels",
                torch_lock,
            )
            torch_lock.unlink(missing_ok=True)
        return _compile(name, build_dir)
    finally:
        os.close(fd)  # releases the flock


def _import_library(path: str):
    """Import the built .so as a Python module (runs its init, which needs AVX512)."""
    module_name = pathlib.Path(path).name.split(".")[0]  # <name> or <name>_v<N>, as torch names it
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _build():
    """The extension module (built at first use), or None when another process's build did not finish in
    time. Raises when the build or the import fails."""
    t0 = time.perf_counter()
    path = _build_library()
    if path is None:
        return None
    module = _import_library(path)
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
                log.warning(
                    "building the CPU decode kernels failed (%s: %s); using the torch path",
                    type(e).__name__,
                    str(e).strip().splitlines()[-1] if str(e).strip() else "",
                )
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
