"""Every benchmark script still imports what it uses (two did not after the package move, which no test ran): each is
loaded as its command would load it, without running its main."""
from __future__ import annotations

import importlib.util

import pytest

from train_helpers import REPO

BENCHMARKS = sorted((REPO / "benchmarks").glob("*.py"))


@pytest.mark.parametrize("path", BENCHMARKS, ids=[path.stem for path in BENCHMARKS])
def test_a_benchmark_loads(path):
    spec = importlib.util.spec_from_file_location(f"benchmark_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert callable(module.main)
