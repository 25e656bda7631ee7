"""Shared test fixtures. Everything a test reads is in the repository or written by a fixture: golden
vectors in tests/golden, awkward images from tests/_bad_inputs.py, subject photos from the toy world.
The third-party ViCo photos are optional: tests that want them skip unless `--vico PATH` or
ARBOOTH_VICO names the folder."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from _bad_inputs import write_bad_inputs

# Two CPU cores on CI: keep torch from oversubscribing them, and keep results deterministic.
torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--vico", default=None, metavar="PATH",
                     help="folder of the ViCo subject photos (optional tests; default: $ARBOOTH_VICO)")


@pytest.fixture(scope="session")
def bad_inputs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of awkward image files (see tests/_bad_inputs.py for each one's expected behaviour)."""
    return write_bad_inputs(tmp_path_factory.mktemp("bad_inputs"))


@pytest.fixture(scope="session")
def vico_dir(request: pytest.FixtureRequest) -> Path:
    """The ViCo photos folder, or a skip when none is given."""
    path = request.config.getoption("--vico") or os.environ.get("ARBOOTH_VICO")
    if not path:
        pytest.skip("ViCo photos not given (--vico PATH or ARBOOTH_VICO)")
    if not Path(path).is_dir():
        pytest.fail(f"ViCo folder {path} not found")
    return Path(path)


@pytest.fixture(scope="session")
def toy_subject_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A subject folder from the toy world (5 views of one object, 96 x 96 PNGs, subject.yaml); used where
    tests once read a real ViCo subject."""
    from arbooth.toy.world import write_subject

    return write_subject(tmp_path_factory.mktemp("toy_subject") / "subject", size=96)


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """accelerate keeps one process-wide state that refuses another mixed precision once set (a real process
    runs one trainer); tests run many trainers in one process, so each test starts from a fresh state, as
    accelerate's own test cases do (accelerate.test_utils.testing.AccelerateTestCase.tearDown)."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
