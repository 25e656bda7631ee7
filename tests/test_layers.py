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
    assert "2 kept, 0 broken" in res.stdout


@pytest.mark.parametrize(("module", "imports", "broken"), [
    ("privacy/audit.py", "from arbooth.recipes import train_class", True),   # upward
    ("privacy/audit.py", "from arbooth.adapt import methods", True),         # sideways between siblings
    ("recipes/train_class.py", "from arbooth.adapt import methods", False),  # downward
    ("commands/generate.py", "from arbooth.recipes import train_subject", True),  # inference -> training loop
    ("commands/generate.py", "from arbooth import subject_bases", False),         # inference -> library
    ("commands/train_subject.py", "from arbooth.recipes import train_subject", False),  # a training command
    ("jobs/toy_class.py", "from arbooth.recipes import train_class", False),    # a job runs a recipe
    ("recipes/train_class.py", "from arbooth.jobs import toy_class", True),     # a recipe never runs a job
])
def test_contract_catches_a_bad_import(tmp_path, module, imports, broken):
    """The same contract on a stand-in package: it fails exactly for the imports the layers forbid."""
    pkg = tmp_path / "arbooth"
    for sub in ("cli", "errors", "outputs", "optim", "checkpoint", "config", "precision", "runs", "sample_folder",
                "model_card", "tracking", "progress", "subject_bases"):
        (pkg / f"{sub}.py").parent.mkdir(parents=True, exist_ok=True)
        (pkg / f"{sub}.py").write_text("")
    for sub in ("commands", "jobs", "bench", "recipes", "toy", "adapt", "privacy", "metrics", "models", "data"):
        (pkg / sub).mkdir()
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "adapt" / "methods.py").write_text("")
    (pkg / "jobs" / "toy_class.py").write_text("")
    for name in ("train_class", "train_class_dp", "train_subject"):
        (pkg / "recipes" / f"{name}.py").write_text("")
    for name in ("sample", "generate", "export", "profile", "eval_subject", "eval_class", "pretrain_toy",
                 "pretrain_toy_class", "toy_data", "train_subject"):
        (pkg / "commands" / f"{name}.py").write_text("")
    (pkg / module).write_text(imports + "\n")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    res = _lint_imports(tmp_path, tmp_path)
    assert (res.returncode != 0) == broken, res.stdout[-4000:]


def test_every_command_is_under_the_training_loop_contract():
    """A new command cannot slip past the "inference never imports a training loop" contract: each module of
    arbooth/commands is either one of the training commands or a source module of that contract."""
    import tomllib

    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    forbidden = next(c for c in contracts if c["type"] == "forbidden")
    sources = set(forbidden["source_modules"])
    training = {"train_class", "train_subject", "audit", "bench_subject"}
    for path in (ROOT / "arbooth" / "commands").glob("*.py"):
        if path.stem == "__init__" or path.stem in training:
            continue
        assert f"arbooth.commands.{path.stem}" in sources, f"{path.name}: add it to the forbidden contract"


def test_recipes_hold_only_training_loops_and_their_configs():
    """arbooth/recipes/ is one explicit loop per file (train_*.py) and its config (*_config.py); a job that
    runs a loop and then evaluates (the class main job) lives in arbooth/jobs/."""
    names = sorted(p.name for p in (ROOT / "arbooth" / "recipes").glob("*.py") if p.name != "__init__.py")
    others = [n for n in names if not (n.startswith("train_") or n.endswith("_config.py"))]
    assert not others, f"not a training loop or its config: {others}"
