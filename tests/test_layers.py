"""The package's layer rule (pyproject.toml [tool.importlinter]) holds: `lint-imports` runs as CI runs it."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _lint_imports(cwd: Path, pythonpath: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "lint-imports"
    cmd = [str(exe)] if exe.is_file() else [shutil.which("lint-imports") or "lint-imports"]
    env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    return subprocess.run([*cmd, "--no-cache"], check=False, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_no_upward_or_sideways_imports():
    res = _lint_imports(ROOT, ROOT)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert "1 kept, 0 broken" in res.stdout


@pytest.mark.parametrize(("module", "imports", "broken"), [
    ("privacy/audit.py", "from arbooth.recipes import train_class", True),   # upward
    ("privacy/audit.py", "from arbooth.adapt import methods", True),         # sideways between siblings
    ("recipes/train_class.py", "from arbooth.adapt import methods", False),  # downward
])
def test_contract_catches_a_bad_import(tmp_path, module, imports, broken):
    """The same contract on a stand-in package: it fails exactly for the imports the layers forbid."""
    pkg = tmp_path / "arbooth"
    for sub in ("cli", "errors", "outputs", "optim", "checkpoint", "config", "precision", "runs"):
        (pkg / f"{sub}.py").parent.mkdir(parents=True, exist_ok=True)
        (pkg / f"{sub}.py").write_text("")
    for sub in ("commands", "recipes", "toy", "adapt", "privacy", "metrics", "models", "data"):
        (pkg / sub).mkdir()
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "adapt" / "methods.py").write_text("")
    (pkg / "recipes" / "train_class.py").write_text("")
    (pkg / module).write_text(imports + "\n")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    res = _lint_imports(tmp_path, tmp_path)
    assert (res.returncode != 0) == broken, res.stdout[-4000:]
