"""Shared test helpers.

``require_data(relative)`` returns the path of a real data file under ``$PYRO_SEQLATENT_DATA``.
Outside CI a missing file skips the test with a message naming the file; under ``CI=true`` it is
a failure, never a silent skip. ``load_benchmark(name)`` imports ``benchmarks/<name>.py``.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

from pyro_seqlatent.data.root import ENV_VAR, DataNotFoundError, data_file


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_data(relative: str):
    try:
        return data_file(relative)
    except DataNotFoundError as err:
        message = f"real data missing ({err}); set {ENV_VAR}"
        if in_ci():
            pytest.fail("CI=true and " + message, pytrace=False)
        pytest.skip(message)


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str):
    """The benchmark script ``benchmarks/<name>.py`` as a module (its folder on ``sys.path``,
    since the scripts import their sibling ``_results``)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _seed_and_clear():
    """Every test starts from a fixed seed and an empty Pyro param store."""
    import pyro

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    torch.set_default_dtype(torch.float32)
    yield
    pyro.clear_param_store()
