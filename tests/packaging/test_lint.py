"""The code style the repository keeps: ruff's lint (pycodestyle errors, pyflakes) and its formatter,
at 100 columns (pyproject.toml [tool.ruff]), over the project's Python."""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
PATHS = ["services", "kernels", "tests", "scripts"]


def ruff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ruff", *args, *PATHS], cwd=ROOT, capture_output=True, text=True
    )


def test_ruff_lint_finds_nothing():
    result = ruff("check", "--no-cache", "--output-format", "concise")
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_code_is_formatted():
    result = ruff("format", "--no-cache", "--check")
    assert result.returncode == 0, (
        "run `ruff format services kernels tests scripts`:\n" + result.stdout + result.stderr
    )
