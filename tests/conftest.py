import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
# The model code that trust_remote_code loads is copied into this cache: the suite's own, so that processes of
# different tests (pytest-xdist's workers and their subprocesses) never write a module another is importing.
os.environ["HF_MODULES_CACHE"] = tempfile.mkdtemp(prefix="gpt2repro_tests_modules_")
atexit.register(shutil.rmtree, os.environ["HF_MODULES_CACHE"], ignore_errors=True)
if "PYTEST_XDIST_WORKER" in os.environ:  # one thread per worker: two workers' threads would share 2 cores
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture
def tiny_config():
    from configuration_gpt2repro import GPT2ReproConfig

    return GPT2ReproConfig(n_layer=2, n_head=4, n_embd=64, n_positions=64)


@pytest.fixture
def tiny_gpt2():
    """A randomly initialised stock transformers GPT-2, our reference implementation."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture
def fresh_accelerate():
    """A test that runs a command's main in this process, with Accelerate's singletons cleared around it."""
    from train_helpers import fresh_accelerate_state

    with fresh_accelerate_state():
        yield


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """A test module's own tiny token shards and HellaSwag file: (data_dir, hellaswag_file), in a folder of their
    own (data_dir.parent) that the module's runs may write into."""
    from train_helpers import write_tiny_data

    return write_tiny_data(tmp_path_factory.mktemp("tiny_data"))


@pytest.fixture(scope="module")
def cluster_workspace(tiny_data):
    """(the module's folder, the tiny run's flags with its data, the HellaSwag file): the 1- and 2-process runs of
    test_train_cluster.py and test_train_sharded.py."""
    from train_helpers import TINY_RUN

    data_dir, hellaswag_file = tiny_data
    return data_dir.parent, TINY_RUN + ["--data_dir", str(data_dir)], hellaswag_file


@pytest.fixture(autouse=True)
def auto_classes_restored():
    """transformers' Auto registries after each test as they were before it: loading a folder with trust_remote_code
    in this process registers the folder's own copy of our classes (transformers 5.4 for AutoConfig too), which a
    later test in the same process would otherwise get from AutoConfig.for_model("gpt2repro")."""
    from transformers.models.auto import configuration_auto, modeling_auto

    mappings = [configuration_auto.CONFIG_MAPPING, modeling_auto.MODEL_MAPPING,
                modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING]
    saved = [dict(mapping._extra_content) for mapping in mappings]
    yield
    for mapping, content in zip(mappings, saved, strict=True):
        mapping._extra_content.clear()
        mapping._extra_content.update(content)
