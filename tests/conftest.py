"""Shared test fixtures. `../shared` (reference vectors, bad inputs, ViCo photos) sits beside the
repository for every developer and for CI; ARBOOTH_SHARED points elsewhere if needed."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ARBOOTH_SHARED", ROOT.parent / "shared")).resolve()

# Two CPU cores on CI: keep torch from oversubscribing them, and keep results deterministic.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.fail(f"reference folder {SHARED} not found; set ARBOOTH_SHARED")
    return SHARED


@pytest.fixture(scope="session")
def bad_inputs_dir(shared_dir: Path) -> Path:
    return shared_dir / "bad_inputs"
