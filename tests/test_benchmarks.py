"""Every benchmark script still imports what it uses (two did not after the package move, which no test ran): each is
loaded as its command would load it, without running its main. And what the GPU check makes up to run offline."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

from gpt2repro.hellaswag_data import read_hellaswag_file
from train_helpers import REPO

BENCHMARKS = sorted((REPO / "benchmarks").glob("*.py"))


def load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"benchmark_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", BENCHMARKS, ids=[path.stem for path in BENCHMARKS])
def test_a_benchmark_loads(path):
    assert callable(load(path).main)


def test_the_gpu_checks_made_up_hellaswag_reads_as_hellaswag(tmp_path):
    """gpu_check.py scores made-up examples on the device machine (no network): they must pass our reader's checks."""
    path = load(REPO / "benchmarks" / "gpu_check.py").synthetic_hellaswag(tmp_path / "hellaswag.jsonl")
    examples = read_hellaswag_file(path)
    assert len(examples) == 40 and all(len(example["endings"]) == 4 for example in examples)
