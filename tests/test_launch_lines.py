"""Every training launch line the README prints, run as written on 2 CPU processes with only the sizes shrunk.

A GPU launch resolves `--compile auto` to on and `--mixed_precision auto` to bf16; on this CPU each GPU line is run
with those two values given, so that what runs is what a GPU launch runs (the 8-GPU DDP line once crashed at step 0
under compile while every multi-process test ran eager). The GPUs are stood in for by CPU processes over gloo
(ACCELERATE_USE_CPU=true) and `--num_processes 2`; the multi-node template by two launchers on this machine, one per
machine rank; the FSDP line by the wrapper that makes Accelerate take its GPU path (on a CPU it runs FSDP as DDP).
"""
from __future__ import annotations

import json
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_train_sharded import FSDP_ON_CPU, FSDP_REFUSED

from train_helpers import REPO, free_port, graph_breaks, records

# `accelerate launch --config_file accelerate_configs/X.yaml ... train_accelerate.py ...`, with any environment
# assignments before it, as the README writes it (in a table cell or a code block)
LAUNCH_LINE = re.compile(r"((?:[A-Z_]+=\S+ )*accelerate launch --config_file accelerate_configs/[\w.]+\.yaml"
                         r"[^`#|\n]*train_accelerate\.py[^`#|\n]*)")


def readme_launch_lines() -> list[str]:
    """The README's training launch lines, each once; a --dry_run only plans (tests/test_memory_plan.py)."""
    lines = {line.strip() for line in LAUNCH_LINE.findall((REPO / "README.md").read_text())}
    return sorted(line for line in lines if "--dry_run" not in line)


LINES = readme_launch_lines()


def config_of(line: str) -> dict:
    return yaml.safe_load((REPO / shlex.split(line)[shlex.split(line).index("--config_file") + 1]).read_text())


def runs_on_cpu(line: str) -> bool:
    """A CPU line: its config says so (one process), or the line puts Accelerate's multi-GPU launcher on the CPU
    (ACCELERATE_USE_CPU=true before it: the 2-process gloo line)."""
    return config_of(line).get("use_cpu", False) or "ACCELERATE_USE_CPU=true" in shlex.split(line)


def line_id(line: str) -> str:
    words = shlex.split(line)
    return Path(words[words.index("--config_file") + 1]).stem


def test_every_accelerate_config_has_a_launch_line():
    assert sorted(map(line_id, LINES)) == sorted(p.stem for p in (REPO / "accelerate_configs").glob("*.yaml"))


def shrunk(data_dir: Path, hellaswag_file: Path, output_dir: Path) -> list[str]:
    """Flags appended to a launch line (the last value given wins): a tiny model, 2 steps, an evaluation with
    HellaSwag and a sample at the end, a checkpoint."""
    return ["--data_dir", str(data_dir), "--output_dir", str(output_dir), "--n_layer", "2", "--n_head", "2",
            "--n_embd", "64", "--seq_len", "32", "--micro_batch_size", "2", "--total_batch_size", "128",
            "--max_steps", "2", "--warmup_steps", "1", "--eval_every", "2", "--checkpoint_every", "2",
            "--val_tokens", "256", "--eval_batch_size", "2", "--hellaswag", "--hellaswag_file", str(hellaswag_file),
            "--hellaswag_limit", "2", "--num_samples", "1", "--sample_tokens", "4", "--seed", "1234"]


def stand_in(line: str, tmp_path: Path, extra: list[str]) -> list[tuple[list[str], dict]]:
    """The commands (one per machine rank) and environments that stand in for `line` on this machine."""
    words = shlex.split(line)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TORCH_LOGS="graph_breaks",
               PYTHONPATH=str(REPO))
    while "=" in words[0]:  # the line's own environment
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    assert words[:2] == ["accelerate", "launch"], line
    config = config_of(line)
    launcher = [sys.executable, "-m", "accelerate.commands.launch", *words[2:words.index("train_accelerate.py")]]
    script = str(REPO / "train_accelerate.py")
    if not runs_on_cpu(line):  # the GPUs: CPU processes, as many as the config asks for, at most 2
        env["ACCELERATE_USE_CPU"] = "true"
    if config["num_processes"] > 1:
        launcher += ["--num_processes", "2", "--main_process_port", str(free_port())]
    if config["distributed_type"] == "FSDP":  # Accelerate on a CPU would run the FSDP config as DDP
        script = str(FSDP_ON_CPU)
    script_args = [script, *words[words.index("train_accelerate.py") + 1:], *extra]
    if config.get("num_machines", 1) == 1:
        return [([*launcher, *script_args], env)]
    # the multi-node template: its main_process_ip is node 0's address, here this machine; --machine_rank N each
    assert "N" in launcher and config["num_machines"] == 2, line
    rank = launcher.index("N")
    return [([*launcher[:rank], str(machine_rank), *launcher[rank + 1:], "--main_process_ip", "127.0.0.1",
              *script_args], env) for machine_rank in range(2)]


@pytest.mark.parametrize("line", LINES, ids=map(line_id, LINES))
def test_readme_launch_line_trains_evaluates_and_checkpoints(line, tiny_data, tmp_path):
    if config_of(line)["distributed_type"] == "FSDP" and FSDP_REFUSED:
        pytest.skip("FSDP needs a newer accelerate")
    data_dir, hellaswag_file = tiny_data
    config, output_dir = config_of(line), tmp_path / "run"
    gpu = not runs_on_cpu(line)
    # what `auto` resolves on GPUs (FSDP: eager, its compiled Blocks not measured on a GPU yet: compiled here, to check
    # them too); a CPU line keeps its `auto`s, as its users get them
    extra = shrunk(data_dir, hellaswag_file, output_dir) + (["--compile", "on", "--mixed_precision", "bf16"] if gpu
                                                            else [])
    launches, logs = [], []
    for machine_rank, (command, env) in enumerate(stand_in(line, tmp_path, extra)):  # files: a full pipe would hang
        logs.append((tmp_path / f"stdout.{machine_rank}", tmp_path / f"stderr.{machine_rank}"))
        with open(logs[-1][0], "w") as stdout, open(logs[-1][1], "w") as stderr:
            launches.append(subprocess.Popen(command, env=env, stdout=stdout, stderr=stderr, text=True))
    for launch, (_, stderr) in zip(launches, logs, strict=True):
        launch.wait(timeout=240)
        assert launch.returncode == 0, stderr.read_text()[-4000:]
        assert graph_breaks(stderr.read_text()) == []
    stdout = "".join(out.read_text() for out, _ in logs)
    processes = 2 if config["num_processes"] > 1 else 1
    assert f"{processes} process(es) on cpu" in stdout, stdout
    if gpu:
        assert "mixed precision bf16 | compile on" in stdout, stdout
    else:  # `--compile auto` on a CPU
        assert "compile off" in stdout, stdout
    if config["num_processes"] > 1:  # torchrun does not forward SIGUSR1, one of --save_on_signals' defaults
        assert "warning: SIGUSR1 (--save_on_signals) never reaches this process" in stdout, stdout
    assert "done: model folder" in stdout
    train, evals = records(output_dir, "train"), records(output_dir, "eval")
    assert [r["step"] for r in train] == [0, 1] and all(math.isfinite(r["loss"]) for r in train)
    assert [r["step"] for r in evals] == [0, 2]
    assert all(math.isfinite(r["val_loss"]) and r["hellaswag_count"] == 2 and len(r["samples"]) == 1 for r in evals)
    checkpoint = output_dir / "checkpoints" / "step_000002"
    assert json.loads((checkpoint / "hf" / "config.json").read_text())["n_layer"] == 2
    if config["num_processes"] > 1:  # each process wrote its own share of the training state
        assert sorted(p.name for p in (checkpoint / "distributed_state").glob("*.distcp")) == ["__0_0.distcp",
                                                                                             "__1_0.distcp"]
