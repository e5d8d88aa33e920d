"""Ctrl-C at random moments of a run (inside a step, an evaluation, a checkpoint write), on an idle and then on a
loaded machine: every time one line and exit 130 within seconds, and the run continued with `--resume_from_checkpoint
latest` after each interruption ends with the weights and records of a run never interrupted. Each run is a process
forked from one that has imported the project (train_helpers.start_forked), where it gets its Ctrl-C and exits as
`python train_accelerate.py` does; test_train_bad_inputs.py's Ctrl-C goes to a fresh `python train_accelerate.py`."""
from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from train_helpers import (
    TINY_RUN,
    ServedProcess,
    final_weights,
    records,
    start_forked,
    train_here,
    training_command,
    without_timing,
)

STEPS = 16
# Frequent evaluations (val, HellaSwag, samples) and checkpoints, so that random moments land in them too.
RUN = TINY_RUN + ["--micro_batch_size", "8", "--max_steps", str(STEPS), "--eval_every", "2", "--checkpoint_every",
                  "3", "--keep_checkpoints", "2", "--num_samples", "2", "--sample_tokens", "4"]
# Where each Ctrl-C lands: after a random delay (in a step or an evaluation) or while a checkpoint is written; from the
# fourth on, with a busy loop beside, where a slow exit shows.
MOMENTS = ["random", "random", "checkpoint", "random", "checkpoint"]
LOADED_FROM = 3
# From Ctrl-C to the exit: 0.3-3 s measured on 2 cores with a busy loop beside, up to 6 s with a training run and a
# pip install beside the suite; a hang (the bug this guards against) never ends
EXIT_WITHIN_S = 15


def last_train_step(output_dir: Path) -> int:
    metrics = output_dir / "metrics.jsonl"
    lines = metrics.read_text().splitlines() if metrics.exists() else []
    steps = [json.loads(line)["step"] for line in lines if '"train"' in line and line.endswith("}")]
    return max(steps, default=-1)


def metrics_file_id(output_dir: Path) -> int | None:
    metrics = output_dir / "metrics.jsonl"
    return metrics.stat().st_ino if metrics.exists() else None


def wait_for_moment(output_dir: Path, process: ServedProcess, moment: str, rng: random.Random) -> bool:
    """Wait until training runs, then for `moment`: 'checkpoint' (a checkpoint being written: its temporary folder
    exists) or 'random' (a random delay, landing in a step or an evaluation). False: the run got too near its end."""
    previous = metrics_file_id(output_dir)
    deadline = time.monotonic() + 120
    # Each run writes metrics.jsonl anew (atomically: a new file) just before its loop; its records reach it at
    # evaluations and checkpoints, so the file, not its last record, says that the loop has started.
    while metrics_file_id(output_dir) in (None, previous):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1][-3000:]
        time.sleep(0.01)
    if moment == "checkpoint":
        while not any((output_dir / "checkpoints").glob("tmp_step_*")):
            assert time.monotonic() < deadline
            if process.poll() is not None:
                return False
            time.sleep(0.002)
    else:
        time.sleep(rng.uniform(0, 0.8))
    return last_train_step(output_dir) < STEPS - 5 and process.poll() is None  # records lag by up to 2 steps


@pytest.fixture(scope="module")
def workspace(tiny_data):
    data_dir, hellaswag_file = tiny_data
    root = data_dir.parent
    args = RUN + ["--data_dir", str(data_dir), "--hellaswag_file", str(hellaswag_file)]
    train_here(args + ["--output_dir", str(root / "uninterrupted")])
    return root, args


def test_ctrl_c_at_random_moments_stops_at_once_and_resumes_exactly(workspace):
    root, args = workspace
    output_dir = root / "interrupted"
    rng = random.Random(1)
    exits, moments, busy = [], [], None
    try:
        command, env = training_command(args + ["--output_dir", str(output_dir), "--resume_from_checkpoint", "latest"],
                                        forked=True)
        while True:
            if len(exits) == LOADED_FROM and busy is None:  # a busy loop on a core of this 2-core machine
                busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            if len(exits) == len(MOMENTS):  # the rest of the run, uninterrupted, needs no load beside it
                busy.kill()
            process = start_forked(command, env)
            moment = MOMENTS[len(exits)] if len(exits) < len(MOMENTS) else "random"
            if len(exits) >= len(MOMENTS) or not wait_for_moment(output_dir, process, moment, rng):
                _, err = process.communicate(timeout=300)  # the rest of the run, uninterrupted
                assert process.returncode == 0, err[-3000:]
                break
            process.send_signal(signal.SIGINT)
            sent = time.monotonic()
            try:
                _, err = process.communicate(timeout=60)
            except subprocess.TimeoutExpired:  # (the process is killed)
                raise AssertionError(f"no exit 60 s after Ctrl-C ({moment}): {process.communicate()[1][-3000:]}") \
                    from None
            exits.append(time.monotonic() - sent)
            moments.append(f"{moment}{' (loaded)' if busy else ''}")
            last = err.strip().splitlines()[-1]
            assert process.returncode == 130 and "Traceback" not in err, err[-3000:]
            assert last.startswith("error: interrupted at step ") and "--resume_from_checkpoint latest" in last, \
                err[-3000:]
            step = int(last.split("at step ")[1].split(";")[0])
            assert f"(from {output_dir / 'checkpoints' / f'step_{step:06d}'})" in last  # saved at the step it names
    finally:
        if busy is not None:
            busy.kill()
    assert len(exits) == len(MOMENTS), moments
    slowest = max(exits)
    print(f"{len(exits)} interruptions, exit after: "
          f"{', '.join(f'{moment} {seconds:.2f} s' for moment, seconds in zip(moments, exits, strict=True))}")
    assert slowest < EXIT_WITHIN_S, [round(t, 2) for t in exits]

    reference = root / "uninterrupted"
    assert list(map(without_timing, records(output_dir, "train"))) == \
        list(map(without_timing, records(reference, "train")))
    assert records(output_dir, "eval") == records(reference, "eval")
    weights, expected = final_weights(output_dir, STEPS), final_weights(reference, STEPS)
    assert all(torch.equal(weights[name], expected[name]) for name in expected)
