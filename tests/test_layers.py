"""The layering check of DESIGN.md (`lint-imports` with pyproject.toml's contract, which `make
lint` runs) keeps for the tree and breaks on an upward import, made at the top of a module,
inside a function, or through the `kedit` package that re-exports the API, and on a module
placed in no layer."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = (
    "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(no_cache=True))"
)


def _python_only(folder: str, names: list[str]) -> list[str]:
    """What copytree leaves out: everything but packages and Python files."""
    return [
        name
        for name in names
        if name == "__pycache__" or not (name.endswith(".py") or (Path(folder) / name).is_dir())
    ]


def lint_copy(tmp_path: Path, module: str | None = None, code: str = "") -> tuple[int, str]:
    """`lint-imports` on a copy of the sources with `code` added to `module` (a path under
    src/kedit); returns its exit code and output."""
    shutil.copytree(ROOT / "src", tmp_path / "src", ignore=_python_only)
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    if module is not None:
        path = tmp_path / "src" / "kedit" / module
        path.write_text((path.read_text() if path.exists() else "") + code)
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "src")}
    done = subprocess.run(
        [sys.executable, "-c", LINT], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    return done.returncode, " ".join((done.stdout + done.stderr).split())


def test_the_tree_keeps_the_layers(tmp_path):
    code, output = lint_copy(tmp_path)
    assert code == 0 and "1 kept, 0 broken" in output, output


@pytest.mark.parametrize(
    ("module", "code", "message"),
    [
        (
            "zoo/world.py",
            "\n\ndef _later():\n    from kedit.lm import load\n\n    return load\n",
            "kedit.zoo is not allowed to import kedit.lm: - kedit.zoo.world -> kedit.lm",
        ),
        (
            "eval/metrics.py",
            "\n\ndef _later():\n    import kedit\n\n    return kedit.load\n",
            "kedit.eval is not allowed to import kedit.api: - kedit.eval.metrics -> kedit",
        ),
        (
            "eval/runner.py",
            "\nfrom kedit.bench import runs  # noqa: E402\n",
            "kedit.eval is not allowed to import kedit.bench: - kedit.eval.runner -> kedit.bench",
        ),
        (
            "edits.py",
            "\nfrom kedit.methods import registry  # noqa: E402\n",
            "kedit.edits is not allowed to import kedit.methods",
        ),
        (
            "serve.py",
            '"""A module in no layer."""\n',
            "The following modules are not listed as layers: - kedit.serve",
        ),
    ],
    ids=["in-a-function", "through-the-package", "eval-on-bench", "edits-on-methods", "unplaced"],
)
def test_an_upward_import_breaks_the_layers(tmp_path, module, code, message):
    exit_code, output = lint_copy(tmp_path, module, code)
    assert exit_code == 1 and message in output, output
