"""Building the CPU decode kernels (kernels/cpu_decode.py) can never hang on a build that died.

torch.utils.cpp_extension guards a build folder with `<build dir>/lock` (created with O_EXCL, removed when
the build ends); a builder killed midway leaves it and torch then waits on it forever. cpu_decode guards
the build with a flock of its own, which the OS drops when its holder dies, and removes the stale torch
lock while holding it. The fast tests replace the compile; one test compiles for real (~1 min).
"""

import fcntl
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from radixserve.kernels import cpu_decode

LOGGER = "radixserve.kernels.cpu_decode"


@pytest.fixture
def ext_dir(tmp_path, monkeypatch):
    root = tmp_path / "torch_extensions"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(root))
    build_dir = cpu_decode._build_directory(cpu_decode._extension_name())
    assert build_dir.parent == root
    return build_dir


@pytest.fixture
def fake_compile(monkeypatch):
    """Replaces the compile; records whether torch's lock file was there when it ran."""
    calls = []

    def compile_(name, build_dir):
        calls.append((build_dir / "lock").exists())
        return str(build_dir / f"{name}.so")

    monkeypatch.setattr(cpu_decode, "_compile", compile_)
    return calls


def spawn_lock_holder(lock_path):
    """Another live process holding the build flock, as a process building the kernels does."""
    script = textwrap.dedent(f"""
        import fcntl, os, sys, time
        fd = os.open({str(lock_path)!r}, os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.pwrite(fd, b"%d\\n" % os.getpid(), 0)
        print("locked", flush=True)
        time.sleep(120)
    """)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def alive(pid) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def lock_path_of(build_dir):
    return build_dir.with_name(build_dir.name + ".lock")


def test_stale_torch_lock_without_a_holder_is_removed(ext_dir, fake_compile, caplog):
    ext_dir.mkdir(parents=True)
    (ext_dir / "lock").touch()  # left by a builder that was killed
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        path = cpu_decode._build_library()
    assert path == str(ext_dir / f"{ext_dir.name}.so")
    assert fake_compile == [False], "the stale torch lock must be gone before torch's load() runs"
    assert "removing stale torch build lock" in caplog.text and str(ext_dir / "lock") in caplog.text
    # our flock file stays (never deleted) and is free again
    fd = os.open(lock_path_of(ext_dir), os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)


def test_no_warning_without_a_stale_lock(ext_dir, fake_compile, caplog):
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert cpu_decode._build_library() is not None
    assert fake_compile == [False] and caplog.text == ""


def test_wait_for_a_live_builder_is_bounded(ext_dir, fake_compile, monkeypatch, caplog):
    """load() gives up (None: the torch path) after RADIXSERVE_CPU_DECODE_BUILD_WAIT seconds, saying why."""
    monkeypatch.setenv("RADIXSERVE_CPU_DECODE_BUILD_WAIT", "1")
    monkeypatch.setenv("RADIXSERVE_CPU_DECODE_KERNELS", "1")
    monkeypatch.setattr(cpu_decode, "cpu_has_avx512_bf16", lambda: True)
    holder = spawn_lock_holder(lock_path_of(ext_dir))
    cpu_decode.reset_for_tests()
    try:
        t0 = time.monotonic()
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            assert cpu_decode.load() is None
        waited = time.monotonic() - t0
    finally:
        cpu_decode.reset_for_tests()
        holder.kill()
        holder.wait()
    assert 0.9 <= waited < 5, waited
    assert fake_compile == []
    waiting = [r.getMessage() for r in caplog.records if "waiting up to" in r.getMessage()]
    assert len(waiting) == 1, caplog.text  # said once, with the lock and its holder
    assert str(lock_path_of(ext_dir)) in waiting[0] and f"pid {holder.pid}" in waiting[0]
    assert "using the torch path" in caplog.records[-1].getMessage()


def test_builder_killed_while_we_wait_releases_the_lock(ext_dir, fake_compile, monkeypatch, caplog):
    """A builder dying (SIGKILL) while we wait for it lets us build at once, its torch lock removed."""
    monkeypatch.setenv("RADIXSERVE_CPU_DECODE_BUILD_WAIT", "60")
    holder = spawn_lock_holder(lock_path_of(ext_dir))
    ext_dir.mkdir(parents=True, exist_ok=True)
    (ext_dir / "lock").touch()  # as torch's baton of the builder about to be killed
    killer = threading.Timer(1.0, holder.kill)
    killer.start()
    try:
        t0 = time.monotonic()
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            assert cpu_decode._build_library() is not None
        waited = time.monotonic() - t0
    finally:
        killer.cancel()
        holder.kill()
        holder.wait()
    assert 0.9 <= waited < 10, waited
    assert fake_compile == [False]
    assert "waiting up to" in caplog.text and "removing stale torch build lock" in caplog.text


def test_build_left_running_by_a_killed_builder_is_stopped(ext_dir, fake_compile, tmp_path, caplog):
    """A ninja (with a child) still running in the build folder after its builder was killed is stopped
    before the rebuild, not raced. A shell named `ninja` stands for it."""
    ext_dir.mkdir(parents=True)
    (ext_dir / "lock").touch()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ninja").symlink_to(shutil.which("sh"))
    orphan = subprocess.Popen(
        [str(bin_dir / "ninja"), "-c", "sleep 120 & echo $!; wait"],
        cwd=ext_dir,
        stdout=subprocess.PIPE,
        text=True,
    )
    child = int(orphan.stdout.readline())
    try:
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            assert cpu_decode._build_library() is not None
        assert orphan.wait(5) == -signal.SIGTERM
        deadline = time.monotonic() + 5
        while alive(child):
            assert time.monotonic() < deadline, "the child of the leftover ninja still runs"
            time.sleep(0.05)
    finally:
        for pid in (orphan.pid, child):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        orphan.wait()
    assert fake_compile == [False]
    # The pids named: the ninja and its child (which, caught between fork and exec, may still be
    # named ninja and be listed first).
    named = re.search(r"by a killed process \(pid ([0-9, ]+)\)", caplog.text)
    assert named and orphan.pid in {int(p) for p in named.group(1).split(", ")}, caplog.text


def test_bad_wait_setting_falls_back_to_the_default(monkeypatch, caplog):
    monkeypatch.setenv("RADIXSERVE_CPU_DECODE_BUILD_WAIT", "soon")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert cpu_decode._build_wait_s() == cpu_decode._DEFAULT_BUILD_WAIT_S
    assert "RADIXSERVE_CPU_DECODE_BUILD_WAIT" in caplog.text


# --- the real thing: compile, kill the builder midway, compile again ---------------------------------

BUILD = textwrap.dedent("""
    import ctypes, logging, pathlib, sys
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(message)s")
    from radixserve.kernels import cpu_decode
    path = cpu_decode._build_library()
    assert path is not None
    # loadable: dlopen() with every symbol resolved and the module's init exported (torch dlopen()ed it
    # already). Importing it runs its init, which needs AVX512: only where the CPU has it.
    getattr(ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL), "PyInit_" + pathlib.Path(path).name.split(".")[0])
    if cpu_decode.cpu_has_avx512_bf16():
        assert hasattr(cpu_decode._import_library(path), "DecodeModel")
    print(path, flush=True)
""")
REBUILD_BOUND_S = 180  # one build: ~35 s, ~60 s on 2 cores; without the fix it never ends


@pytest.mark.timeout(REBUILD_BOUND_S + 120)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")
def test_rebuild_after_the_builder_was_killed_midway(tmp_path):
    env = {
        **os.environ,
        "TORCH_EXTENSIONS_DIR": str(tmp_path),
        "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
    }
    env.pop("RADIXSERVE_CPU_DECODE_BUILD_WAIT", None)
    if not (shutil.which("c++", path=env["PATH"]) and shutil.which("ninja", path=env["PATH"])):
        pytest.skip("no C++ compiler or ninja")
    # Its own session, so that the cleanup can reach everything it started; killed alone, as the
    # launcher kills the executor (its ninja and compiler go on running)
    first = subprocess.Popen(
        [sys.executable, "-c", BUILD],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob("*/lock")):
            assert first.poll() is None, "the build ended before it could be killed"
            assert time.monotonic() < deadline, "torch's lock file never appeared"
            time.sleep(0.05)
        time.sleep(1.0)  # compiling
        assert first.poll() is None
        first.kill()
        first.wait()
        [torch_lock] = tmp_path.glob(
            "*/lock"
        )  # left behind: without the fix, the next build waits forever

        t0 = time.monotonic()
        second = subprocess.run(
            [sys.executable, "-c", BUILD],
            env=env,
            capture_output=True,
            text=True,
            timeout=REBUILD_BOUND_S,
        )
        took = time.monotonic() - t0
    finally:
        try:
            os.killpg(first.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert second.returncode == 0, second.stderr[-3000:]
    print(f"rebuild after the killed build took {took:.1f}s")
    so = second.stdout.strip().splitlines()[-1]
    assert os.path.isfile(so) and os.path.dirname(so) == str(torch_lock.parent)
    assert not torch_lock.exists()
    assert "removing stale torch build lock" in second.stderr
