"""One import root: the wheel installs `radixserve` and nothing else at top level, every package of the
repository is in it, and nothing in the repository root shadows a third-party distribution (transformers
imports Hugging Face's `kernels`, which a regular package named kernels/ at the root would hide)."""

import pathlib
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    [path] = out.glob("radixserve-*.whl")
    return zipfile.ZipFile(path)


def test_the_wheel_installs_one_top_level_package(wheel):
    names = wheel.namelist()
    top = {name.split("/")[0] for name in names}
    assert top == {"radixserve", next(t for t in top if t.endswith(".dist-info"))}
    [top_level] = [n for n in names if n.endswith(".dist-info/top_level.txt")] or [None]
    if top_level:
        assert wheel.read(top_level).decode().split() == ["radixserve"]


def test_every_package_of_the_repository_is_in_the_wheel(wheel):
    names = set(wheel.namelist())
    expected = {
        "radixserve/cli.py",
        "radixserve/launch_server.py",
        "radixserve/kernels/cpu_decode.cpp",
        "radixserve/kernels/gguf_cpu_kernels.h",  # included by cpu_decode.cpp and gguf_cpu.cpp
        "radixserve/kernels/rmsnorm.py",
        "radixserve/v1/executor_pb2.py",
    }
    for folder in (ROOT / "services").rglob("*.py"):
        rel = folder.relative_to(ROOT / "services")
        if rel.parts[:2] == ("pb", "radixserve"):
            expected.add("radixserve/v1/" + rel.name)
        else:
            expected.add("radixserve/" + rel.as_posix())
    for path in (ROOT / "kernels").glob("*.py"):
        expected.add("radixserve/kernels/" + path.name)
    assert expected <= names, sorted(expected - names)


def test_nothing_importable_at_the_repository_root():
    """`python -m` and pytest put the working directory first on sys.path: a regular package or module there
    would shadow an installed distribution of the same name."""
    shadowing = [
        p.name
        for p in ROOT.iterdir()
        if not p.name.startswith(".")
        and ((p.is_dir() and (p / "__init__.py").exists()) or (p.is_file() and p.suffix == ".py"))
    ]
    assert shadowing == []


def test_transformers_imports_hf_kernels_from_the_repository_root():
    code = (
        "import kernels, transformers.models.llama.modeling_llama, radixserve.kernels.rmsnorm, radixserve.cli;"
        "print(kernels.__file__); print(radixserve.kernels.rmsnorm.__file__)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    hf_kernels, ours = out.stdout.split()
    assert "site-packages" in hf_kernels and not hf_kernels.startswith(str(ROOT / "kernels"))
    assert (
        pathlib.Path(ours).parent == ROOT / "kernels"
    )  # the editable install maps radixserve.kernels here


def test_launch_server_runs_from_the_repository_root():
    out = subprocess.run(
        [sys.executable, "-m", "radixserve.launch_server", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0 and "usage: radixserve serve" in out.stdout, out.stderr[-2000:]
