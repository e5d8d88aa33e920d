"""train_accelerate.py as users launch it: the same 12-step tiny run (fp32) with gradient accumulation, as one
big batch, on 2 processes through `accelerate launch` (gloo DDP), and killed then resumed; its checkpoints
loaded by AutoModelForCausalLM in a fresh process."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from test_model import BLOCK_OUR_MODULES

import train_accelerate
from configuration_gpt2repro import GPT2ReproConfig
from gpt2repro import checkpointing, memory_plan
from gpt2repro.optimization import get_lr
from gpt2repro.settings import Resolved
from modeling_gpt2repro import GPT2ReproForCausalLM
from train_helpers import (
    GRAPH_BREAK_LOG,
    TINY_RUN,
    final_weights,
    graph_breaks,
    records,
    run_training,
    run_wrapper,
    start_forked,
    train_here,
    training_command,
    without_timing,
)

MAX_STEPS = 12
TIMING_KEYS = ("step_time", "tokens_per_sec", "mfu")  # wall-clock figures, the only fields that may differ


@pytest.fixture(scope="module")
def workspace(tiny_data):
    data_dir, hellaswag_file = tiny_data
    return data_dir.parent, TINY_RUN + ["--data_dir", str(data_dir), "--hellaswag_file", str(hellaswag_file)]


@pytest.fixture(scope="module")
def accumulated_run(workspace):
    """One process, micro-batch 2: 4 accumulation steps of 2 x 32 per 256-token step."""
    root, args = workspace
    train_here(args + ["--output_dir", str(root / "accumulated"), "--micro_batch_size", "2"])
    return root / "accumulated"


def assert_runs_close(run, reference, rel: float = 1e-5):
    """Losses, gradient norms and validation losses within `rel`, the same LRs, the final weights close."""
    train, train_ref = records(run, "train"), records(reference, "train")
    assert [r["step"] for r in train] == list(range(MAX_STEPS))
    for key in ("loss", "grad_norm"):
        assert [r[key] for r in train] == pytest.approx([r[key] for r in train_ref], rel=rel), key
    assert [r["lr"] for r in train] == [r["lr"] for r in train_ref]
    evals, evals_ref = records(run, "eval"), records(reference, "eval")
    assert [r["step"] for r in evals] == [r["step"] for r in evals_ref] == [0, 6, 12]
    assert [r["val_loss"] for r in evals] == pytest.approx([r["val_loss"] for r in evals_ref], rel=rel)
    weights, weights_ref = final_weights(run, MAX_STEPS), final_weights(reference, MAX_STEPS)
    assert weights.keys() == weights_ref.keys()
    for name in weights:
        torch.testing.assert_close(weights[name], weights_ref[name], rtol=1e-4, atol=1e-5, msg=name)


def test_run_outputs(accumulated_run):
    train, evals = records(accumulated_run, "train"), records(accumulated_run, "eval")
    for record in train:  # the LR actually set at each step is the schedule's
        assert record["lr"] == get_lr(record["step"], 6e-4, 6e-5, 2, MAX_STEPS)
        assert record["tokens_per_sec"] > 0 and 0 < record["mfu"] < 1
    for record in evals:
        assert 0 <= record["hellaswag_acc_norm"] <= 1 and record["hellaswag_count"] == 3  # --hellaswag_limit 3
        assert len(record["samples"]) == 4 and \
            all(s.startswith("Hello, I'm a language model,") for s in record["samples"])
    assert (accumulated_run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # checkpoints at 4, 8, 12; --keep_checkpoints 2 leaves the last two, no temporary folder
    assert sorted(p.name for p in (accumulated_run / "checkpoints").iterdir()) == ["step_000008", "step_000012"]
    card = (accumulated_run / "checkpoints" / "step_000012" / "hf" / "README.md").read_text()
    assert f"| val loss (1,000 tokens, step 12) | {evals[-1]['val_loss']:.4f} |" in card


def test_accumulation_equals_one_big_batch(workspace, accumulated_run):
    root, args = workspace
    train_here(args + ["--output_dir", str(root / "big_batch"), "--micro_batch_size", "8", "--num_samples", "0"])
    assert_runs_close(root / "big_batch", accumulated_run)


# train_accelerate.main with a DDP communication hook that counts gradient all-reduces (the hook sees each
# bucket; a backward that syncs ends with the last bucket) between optimiser steps; writes them per rank.
COUNT_GRADIENT_SYNCS = """
import json, os, sys
from accelerate import Accelerator
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
import train_accelerate

syncs_per_step = [0]
prepare = Accelerator.prepare

def prepare_and_count(self, model, optimizer):
    model, optimizer = prepare(self, model, optimizer)

    def counting_allreduce(process_group, bucket):
        syncs_per_step[-1] += bucket.is_last()
        return allreduce_hook(process_group, bucket)

    model.register_comm_hook(None, counting_allreduce)
    step = optimizer.step

    def step_and_start_counting(*args, **kwargs):
        syncs_per_step.append(0)
        return step(*args, **kwargs)

    optimizer.step = step_and_start_counting
    return model, optimizer

Accelerator.prepare = prepare_and_count
train_accelerate.main(sys.argv[2:])
with open(f"{sys.argv[1]}.rank{os.environ['RANK']}", "w") as f:
    json.dump(syncs_per_step[:-1], f)  # the last entry counts after the last step: nothing
"""


def test_two_processes_equal_one_with_twice_the_accumulation_and_sync_once_per_step(workspace, accumulated_run):
    """2 processes, 2 micro-steps each, against 1 with 4. Averaging is linear, so syncing every micro-step would give
    the same weights: the gradient all-reduces are counted instead, one per optimiser step."""
    root, args = workspace
    syncs = root / "ddp_syncs"
    result = run_wrapper(COUNT_GRADIENT_SYNCS, root / "count_gradient_syncs.py",
                         [str(syncs), *args, "--output_dir", str(root / "ddp"), "--micro_batch_size", "2"])
    assert "2 process(es) on cpu | 2 micro-steps of 2 x 32" in result.stdout
    assert_runs_close(root / "ddp", accumulated_run)
    ddp_samples = [r["samples"] for r in records(root / "ddp", "eval")]
    assert ddp_samples[0] == records(accumulated_run, "eval")[0]["samples"]  # same seed, same initial weights
    for rank in (0, 1):
        assert json.loads(syncs.with_suffix(f".rank{rank}").read_text()) == [1] * MAX_STEPS


def test_compiled_ddp_equals_eager_and_resumes_exactly(workspace, accumulated_run):
    """--compile on with 2 processes, as `auto` resolves it on GPUs: the model's forward compiled whole inside DDP
    (the README's multi-GPU launch crashed at step 0 when DDP's wrapper was compiled under fullgraph). With 2
    micro-steps per step, so that both of DDP's paths run compiled (the first micro-step under no_sync, the last
    syncing, as every micro-step does without accumulation: test_launch_lines.py's 8-GPU line), it trains as the eager
    run does (1e-4), evaluates, scores HellaSwag and samples eager beside it, and dynamo logs no graph break anywhere.
    Resumed on 2 processes from the step-8 checkpoint, it ends with the uninterrupted compiled run's records and
    weights, bit for bit."""
    root, args = workspace
    output_dir = root / "compiled_ddp"
    run = args + ["--micro_batch_size", "2", "--compile", "on"]
    result = run_training(run + ["--output_dir", str(output_dir)], processes=2, env=GRAPH_BREAK_LOG)
    assert "2 process(es) on cpu | 2 micro-steps of 2 x 32" in result.stdout
    assert "compile on" in result.stdout
    assert graph_breaks(result.stderr) == []
    assert_runs_close(output_dir, accumulated_run, rel=1e-4)
    evals, evals_eager = records(output_dir, "eval"), records(accumulated_run, "eval")
    assert all(r["hellaswag_count"] == 3 for r in evals)
    assert evals[0]["samples"] == evals_eager[0]["samples"]  # the same initial weights, sampled eager
    resumed_dir = root / "compiled_ddp_resumed"
    result = run_training(run + ["--output_dir", str(resumed_dir), "--resume_from_checkpoint",
                                 str(output_dir / "checkpoints" / "step_000008")], processes=2, env=GRAPH_BREAK_LOG)
    assert graph_breaks(result.stderr) == []
    assert list(map(without_timing, records(resumed_dir, "train"))) == \
        [without_timing(r) for r in records(output_dir, "train") if r["step"] >= 8]
    assert records(resumed_dir, "eval") == [r for r in evals if r["step"] > 8]
    weights, reference = final_weights(resumed_dir, MAX_STEPS), final_weights(output_dir, MAX_STEPS)
    assert all(torch.equal(weights[name], reference[name]) for name in reference)


def test_planned_checkpoint_bytes_are_what_a_checkpoint_writes(workspace, accumulated_run):
    """--dry_run's preemption figure against the files of a real checkpoint's training state (a preemption checkpoint
    has no hf/): its weights and optimiser state, within 0.1% (the few-KB files are left out of the plan)."""
    _, args = workspace
    settings = train_accelerate.parse_args(args + ["--micro_batch_size", "2"])
    run = memory_plan.planned_run(settings, Resolved("no", "off", False, 1, 4))
    planned = memory_plan.checkpoint_bytes(memory_plan.model_on_meta(run), run, world_size=1)
    checkpoint = accumulated_run / "checkpoints" / "step_000012"
    written = sum(p.stat().st_size for p in (checkpoint / "training_state").rglob("*") if p.suffix in (".safetensors",
                                                                                                   ".bin"))
    assert planned == pytest.approx(written, rel=1e-3)


def test_resume_after_kill_equals_uninterrupted_run(workspace, accumulated_run):
    root, args = workspace
    output_dir = root / "killed"
    run_args = args + ["--output_dir", str(output_dir), "--micro_batch_size", "2"]
    process = start_forked(*training_command(run_args, forked=True))  # in a process group of its own
    deadline = time.monotonic() + 120
    while not (output_dir / "checkpoints" / "step_000004").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)  # mid-run: the eval at step 6 (with HellaSwag and samples) comes next
    assert process.wait() == -signal.SIGKILL
    assert not (output_dir / "checkpoints" / "step_000012").exists()

    train_here(run_args + ["--resume_from_checkpoint", "latest"])
    resumed, uninterrupted = records(output_dir, "train"), records(accumulated_run, "train")
    assert list(map(without_timing, resumed)) == list(map(without_timing, uninterrupted))  # bitwise: floats as repr
    assert records(output_dir, "eval") == records(accumulated_run, "eval")
    weights, reference = final_weights(output_dir, MAX_STEPS), final_weights(accumulated_run, MAX_STEPS)
    assert all(torch.equal(weights[name], reference[name]) for name in reference)


LOAD_IN_FRESH_PROCESS = BLOCK_OUR_MODULES + """
import json, torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
folder = sys.argv[1]
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)  # transformers 5.25 reads config.json
prompt = tokenizer("Hello, I'm a language model,", return_tensors="pt")
greedy = model.generate(**prompt, max_new_tokens=16, do_sample=False)
torch.save(model.state_dict(), sys.argv[2])
print(json.dumps({"class": type(model).__name__, "module": type(model).__module__, "ids": prompt.input_ids[0].tolist(),
                  "greedy": greedy[0].tolist(), "top_k": GenerationConfig.from_pretrained(folder).top_k}))
"""


def test_checkpoint_loads_with_automodel_in_a_fresh_process(accumulated_run, tmp_path):
    from safetensors.torch import load_file

    checkpoint = accumulated_run / "checkpoints" / "step_000012"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH="")
    result = subprocess.run([sys.executable, "-c", LOAD_IN_FRESH_PROCESS, str(checkpoint / "hf"),
                             str(tmp_path / "sd.pt")], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    for stops_a_newcomer in ("Do you wish to run the custom code", "You are using a model of type", "Removed shared"):
        assert stops_a_newcomer not in result.stdout + result.stderr, result.stderr[-3000:]
    loaded = json.loads(result.stdout.splitlines()[-1])
    assert loaded["class"] == "GPT2ReproForCausalLM"
    assert loaded["module"].startswith("transformers_modules")  # the code saved in the folder, not the checkout
    assert loaded["ids"] == [15496, 11, 314, 1101, 257, 3303, 2746, 11]  # GPT-2's ids (tiktoken "gpt2")
    assert loaded["top_k"] == 50
    state = torch.load(tmp_path / "sd.pt")
    trained = load_file(checkpoint / "training_state" / "model.safetensors")  # Accelerate's copy of the weights
    for name, tensor in trained.items():
        assert torch.equal(state[name], tensor), name
    assert torch.equal(state["lm_head.weight"], state["transformer.wte.weight"])
    # greedy decoding through the folder's own code equals transformers' GPT-2 on the same weights
    model = GPT2ReproForCausalLM(GPT2ReproConfig.from_pretrained(checkpoint / "hf"))
    model.load_state_dict(state)
    prompt = torch.tensor([loaded["ids"]])
    assert loaded["greedy"] == model.to_gpt2().generate(prompt, max_new_tokens=16, do_sample=False,
                                                        pad_token_id=50256)[0].tolist()


def test_a_sharded_optimizer_reads_the_whole_state_into_host_memory(accumulated_run):
    """From a whole-state checkpoint (one process's, or any of an earlier version) with --shard_optimizer, Accelerate's
    load_state is asked to read it to the CPU, from which each process keeps its share; without it (several processes)
    Accelerate would put the whole state on every GPU. On a CPU both places are host memory, so this checks what is
    asked, not the memory."""
    checkpoint, asked = accumulated_run / "checkpoints" / "step_000008", []
    loader = SimpleNamespace(load_state_dict=lambda state: None)
    accelerator = SimpleNamespace(is_main_process=False, num_processes=1, process_index=0,
                                  load_state=lambda folder, **kwargs: asked.append(kwargs))
    for sharded in (True, False):
        assert checkpointing.load_checkpoint(accelerator, checkpoint, loader, MAX_STEPS, None, [], sharded) == (8, True)
    assert asked == [{"map_location": "cpu"}, {}]
