"""--dry_run's memory plan: the GPT-2 family's parameter counts, the optimiser state to the byte and the activations
against what torch keeps on a CPU, and the verdicts the README quotes."""
from __future__ import annotations

import contextlib
import subprocess
import sys

import pytest
import torch

import train_accelerate
from gpt2repro import memory_plan
from gpt2repro.optimization import configure_muon, configure_optimizer
from gpt2repro.settings import Resolved, TrainSettings
from gpt2repro.training import enable_activation_checkpointing
from modeling_gpt2repro import GPT2ReproForCausalLM
from train_helpers import REPO, run_main, the_error_line

# OpenAI's GPT-2 sizes (their 50257-row embeddings) and ours: 47 padding rows of width C more (50304 = 393 x 128)
GPT2_FAMILY = {"gpt2-124m": (124_439_808, 768), "gpt2-350m": (354_823_168, 1024), "gpt2-774m": (774_030_080, 1280),
               "gpt2-1558m": (1_557_611_200, 1600)}


@pytest.mark.parametrize("preset", sorted(GPT2_FAMILY))
def test_presets_have_the_gpt2_family_parameter_counts(preset):
    openai, width = GPT2_FAMILY[preset]
    model = memory_plan.model_on_meta(planned(train_accelerate.parse_args(["--preset", preset])))
    assert sum(p.numel() for p in model.parameters()) == openai + 47 * width


def planned(settings: TrainSettings) -> memory_plan.PlannedRun:
    """The run a one-process --dry_run plans for these settings (eager: the chunked loss)."""
    compute = settings.compute
    resolved = Resolved("bf16" if compute.mixed_precision == "auto" else compute.mixed_precision, "off", False, 1, 1)
    return memory_plan.planned_run(settings, resolved)


def small_run(recipe: str, precision: str, *extra: str) -> tuple[TrainSettings, memory_plan.PlannedRun]:
    settings = train_accelerate.parse_args(["--recipe", recipe, "--n_layer", "3", "--n_head", "4", "--n_embd", "64",
                                            "--seq_len", "128", "--micro_batch_size", "8", "--mixed_precision",
                                            precision, *extra])
    return settings, planned(settings)


@pytest.mark.parametrize("recipe", ["gpt2", "speedrun"])
def test_optimizer_state_is_planned_to_the_byte(recipe):
    settings, run = small_run(recipe, "no")
    torch.manual_seed(0)
    model = GPT2ReproForCausalLM(run.config)
    optim = settings.optim
    if recipe == "speedrun":
        built = configure_muon(model, optim.muon_momentum, optim.weight_decay, (optim.beta1, optim.beta2),
                               optim.adam_eps, "cpu")
    else:
        built = [configure_optimizer(model, optim.weight_decay, (optim.beta1, optim.beta2), optim.adam_eps, "cpu")]
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    for optimizer in built:
        optimizer.step()
    held = sum(t.nbytes for o in built for state in o.state.values() for t in state.values()
               if isinstance(t, torch.Tensor))
    assert memory_plan.optimizer_state_bytes(model, run) == held


def saved_tensor_bytes(model: torch.nn.Module, x: torch.Tensor, bf16: bool) -> int:
    """Bytes autograd holds for backward at the end of a training forward (the peak of what it keeps), each storage
    once, the parameters left out."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    precision = torch.autocast("cpu", torch.bfloat16) if bf16 else contextlib.nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), precision:
        model(input_ids=x, shift_labels=x, return_logits=False)
    return sum(saved.values())


@pytest.mark.parametrize("recipe", ["gpt2", "speedrun"])
@pytest.mark.parametrize("precision", ["no", "bf16"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_activations_are_planned_within_a_quarter_of_what_autograd_keeps(recipe, precision, checkpointing):
    _, run = small_run(recipe, precision, *(["--gradient_checkpointing"] if checkpointing else []))
    torch.manual_seed(0)
    model = GPT2ReproForCausalLM(run.config).train()
    if checkpointing:
        enable_activation_checkpointing(model)
    x = torch.randint(0, 50257, (run.micro_batch_size, run.seq_len))
    measured = saved_tensor_bytes(model, x, precision == "bf16")
    # Take away what the plan knows exactly: the loss's d(lm_head), and the bf16 weights the matmuls keep (a
    # checkpointed forward keeps none: its blocks run again in backward, one at a time).
    config, tokens = model.config, x.numel()
    measured -= 4 * config.padded_vocab_size * config.n_embd
    if not checkpointing:
        measured -= memory_plan.plan(run, world_size=1)["bf16 weight copies (autocast)"]
    plan = memory_plan.activation_bytes(model, run, run.micro_batch_size, checkpointing)
    if checkpointing:  # the plan's peak adds the block recomputed in backward, which the forward does not hold
        plan -= memory_plan.block_bytes_per_token(config, precision) * tokens
    assert abs(plan - measured) <= 0.25 * measured, (plan, measured)


FSDP_LAUNCH = {"ACCELERATE_USE_FSDP": "true"}  # what accelerate launch sets under accelerate_configs/fsdp2_8gpu.yaml


@pytest.mark.parametrize("preset, processes, device_memory, verdict, remedy, launch", [
    ("gpt2-1558m", 8, "80GB", "fit: no", "--gradient_checkpointing --shard_optimizer: 32.7 GB (8 micro-steps", {}),
    ("gpt2-774m", 8, "80GB", "fit: no", "--micro_batch_size 16: 49.1 GB (4 micro-steps per step)", {}),
    ("gpt2-350m", 8, "80GB", "fit: no", "--compile off: 71.0 GB (1 micro-steps per step)", {}),
    ("gpt2-350m", 1, "24GB", "fit: no", "--micro_batch_size 8: 15.6 GB (64 micro-steps per step)", {}),
    ("gpt2-124m", 8, "80GB", "fit: yes", None, {}),
    ("gpt2-1558m", 8, "24GB", "fit: no", "FSDP (accelerate_configs/fsdp2_8gpu.yaml) --gradient_checkpointing: 20.8 GB",
     {}),
    ("gpt2-1558m", 8, "80GB", "fit: yes", "activation checkpointing off, FSDP", FSDP_LAUNCH),
])
def test_dry_run_plans_without_data_and_names_the_flags_that_fit(tmp_path, capsys, monkeypatch, preset, processes,
                                                                 device_memory, verdict, remedy, launch):
    for name, value in {"WORLD_SIZE": str(processes), **launch}.items():  # what the launcher gives each process
        monkeypatch.setenv(name, value)
    status, out, err = run_main(train_accelerate.main, ["--preset", preset, "--dry_run", "--device_memory",
                                                        device_memory, "--data_dir", str(tmp_path / "no_data")], capsys)
    assert status == 0 and err == "", err[-3000:]
    assert f"{processes} process(es)" in out and verdict in out, out
    assert remedy is None or remedy in out, out
    assert not (tmp_path / "no_data").exists() and not any(tmp_path.iterdir())
    if (preset, processes, launch) == ("gpt2-1558m", 8, {}):  # each process its share of the 18.7 GB state
        assert "preemption checkpoint: 2.66 GB written by the busiest process, 2.7 s at 1 GB/s" in out, out


def test_dry_run_is_a_plain_command_that_prints_nothing_else(tmp_path):
    """In a process of its own, as users run it: the plan on stdout, nothing on stderr (no library's warning), no
    GPU, data or network needed."""
    result = subprocess.run([sys.executable, str(REPO / "train_accelerate.py"), "--preset", "gpt2-124m", "--dry_run",
                             "--data_dir", str(tmp_path / "no_data")], capture_output=True, text=True, timeout=120,
                            env={"WORLD_SIZE": "8", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0 and result.stderr == "", result.stderr[-3000:]
    assert "8 process(es)" in result.stdout and "fit:" in result.stdout and not (tmp_path / "no_data").exists()


def test_a_preemption_checkpoint_over_the_grace_is_a_warning(capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "8")
    status, out, _ = run_main(train_accelerate.main, ["--preset", "gpt2-1558m", "--dry_run", "--device_memory", "80GB",
                                                      "--write_bandwidth", "50MB"], capsys)
    assert status == 0 and "53.2 s at 0.05 GB/s" in out
    assert "warning: a preemption checkpoint would not finish within the grace" in out


def test_dry_run_refuses_a_batch_the_run_would_refuse(capsys):
    status, _, err = run_main(train_accelerate.main, ["--preset", "gpt2-124m", "--micro_batch_size", "48", "--dry_run"],
                              capsys)
    assert status == 1 and the_error_line(err).startswith("error: --total_batch_size 524288 is not a multiple of")
