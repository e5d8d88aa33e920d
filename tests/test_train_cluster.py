"""What only shows on clusters, reproduced with 1 and 2 CPU processes (gloo) and a short process-group timeout:
preemption by SIGTERM saves and resumes exactly, a slow Hub upload never blocks rank 0 inside a barrier, and
HellaSwag is decided on rank 0 for every rank. (The optimiser state and the model split among processes:
test_train_sharded.py.)"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import train_accelerate
from gpt2repro import evaluation, run_control
from train_helpers import (
    QUIET,
    QUIET_STEPS,
    REPO,
    distributed_state,
    final_weights,
    records,
    run_main,
    run_training,
    run_wrapper,
    train_here,
    training_command,
    without_timing,
)


def wait_for_train_step(output_dir: Path, step: int, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        metrics = output_dir / "metrics.jsonl"
        if metrics.exists() and any(json.loads(line)["step"] >= step for line in metrics.read_text().splitlines()
                                    if '"train"' in line):
            return
        time.sleep(0.05)
    raise AssertionError(f"the run did not reach step {step} (exit status {process.poll()})")


@pytest.mark.parametrize("processes", [1, 2])
def test_sigterm_saves_a_checkpoint_and_resume_is_exact(cluster_workspace, processes, capsys):
    root, args, _ = cluster_workspace
    micro = ["--micro_batch_size", str(8 // processes), "--no-hellaswag"] + QUIET
    reference = root / f"uninterrupted_{processes}"
    reference_args = args + micro + ["--output_dir", str(reference)]
    if processes == 1:  # a reference run, in this process
        train_here(reference_args)
    else:
        run_training(reference_args, processes=processes)

    output_dir = root / f"preempted_{processes}"
    command, env = training_command(args + micro + ["--output_dir", str(output_dir)], processes)
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    wait_for_train_step(output_dir, 1, process)
    os.killpg(process.pid, signal.SIGTERM)  # to every process of the job, as a scheduler does
    _, err = process.communicate(timeout=120)
    lines = [line for line in err.splitlines() if line.startswith("preempted by SIGTERM at step ")]
    assert len(lines) == 1, err[-3000:]
    step = int(lines[0].split("at step ")[1].split(":")[0])
    assert 0 < step < QUIET_STEPS
    if processes == 1:  # (accelerate's launcher reports the SIGTERM it got itself, with a traceback of its own)
        assert process.returncode == run_control.EXIT_PREEMPTED and "Traceback" not in err
    checkpoint = output_dir / "checkpoints" / f"step_{step:06d}"
    assert f"checkpoint {checkpoint} written" in lines[0] and (checkpoint / "trainer_state.json").is_file()
    # the training state alone, for the grace (unless the step's regular checkpoint came first); --export_hf writes
    # its model folder from it, in one process
    assert (checkpoint / "hf").exists() == (step % 4 == 0)
    status, out, err = run_main(train_accelerate.main, ["--export_hf", str(checkpoint)], capsys)
    assert status == 0 and out == f"model folder {checkpoint / 'hf'} written\n", err
    exported = AutoModelForCausalLM.from_pretrained(checkpoint / "hf", trust_remote_code=True).state_dict()
    trained = (distributed_state(checkpoint, output_dir / "state.pt")["model"] if processes == 2
               else load_file(checkpoint / "training_state" / "model.safetensors"))
    assert all(torch.equal(exported[name], value) for name, value in trained.items())

    resume_args = args + micro + ["--output_dir", str(output_dir), "--resume_from_checkpoint", "latest"]
    if processes == 1:
        train_here(resume_args)
    else:
        run_training(resume_args, processes=processes)
    assert list(map(without_timing, records(output_dir, "train"))) == \
        list(map(without_timing, records(reference, "train")))
    assert records(output_dir, "eval") == records(reference, "eval")
    weights, expected = final_weights(output_dir, QUIET_STEPS), final_weights(reference, QUIET_STEPS)
    assert all(torch.equal(weights[name], expected[name]) for name in expected)


SLOW_HUB = """
import json, os, sys, time
from pathlib import Path
import huggingface_hub
sys.path.insert(0, os.environ["TESTS"])
from hub_standin import HubStandIn

class SlowHub(HubStandIn):  # no upload finishes before the run's last checkpoint exists
    def create_commit(self, repo_id, operations, **kwargs):
        release, deadline = Path(os.environ["UPLOADS_END_WHEN"]), time.monotonic() + 120
        while not release.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        checkpoint = next(Path(o.path_or_fileobj).parent.parent for o in operations if o.path_in_repo == "config.json")
        with open(sys.argv[1], "a") as log:
            log.write(json.dumps({"folder": str(checkpoint), "there_when_done": checkpoint.is_dir()}) + "\\n")
        return super().create_commit(repo_id, operations, **kwargs)

huggingface_hub.HfApi = SlowHub
import train_accelerate
train_accelerate.main(sys.argv[2:])
"""


def test_a_slow_upload_never_blocks_a_barrier(cluster_workspace, tmp_path):
    # Before the fix, rank 0 waited for step 2's upload when pruning it at step 4, while rank 1 waited in the
    # checkpoint's barrier: with uploads this slow, the barrier timed out (--ddp_timeout 5) and the job died.
    root, args, _ = cluster_workspace
    output_dir, log = tmp_path / "out", tmp_path / "uploads.jsonl"
    run_args = args + ["--output_dir", str(output_dir), "--micro_batch_size", "4", "--max_steps", "6",
                       "--checkpoint_every", "2", "--keep_checkpoints", "1", "--ddp_timeout", "5", "--push_to_hub",
                       "--hub_model_id", "tester/tiny", "--no-hellaswag", "--num_samples", "0", "--eval_every", "100"]
    run_wrapper(SLOW_HUB, tmp_path / "slow_hub.py", [str(log), *run_args],
                UPLOADS_END_WHEN=str(output_dir / "checkpoints" / "step_000006"), STANDIN_HUB=str(tmp_path / "hub"),
                TESTS=str(REPO / "tests"))
    uploads = [json.loads(line) for line in log.read_text().splitlines()]
    assert [Path(u["folder"]).name for u in uploads] == ["step_000002", "step_000004", "step_000006"]
    assert all(u["there_when_done"] for u in uploads)  # no folder was deleted while it uploaded
    assert sorted(p.name for p in (output_dir / "checkpoints").iterdir()) == ["step_000006"]  # pruned at the end


RANK0_ONLY_HELLASWAG = """
import os, sys
import train_accelerate
from gpt2repro import hellaswag_data

if os.environ["RANK"] != "0":  # this node has neither the file nor the network
    def unavailable(*args, **kwargs):
        raise hellaswag_data.HellaSwagUnavailable("no HellaSwag data on this node")
    hellaswag_data.load_hellaswag = unavailable
train_accelerate.main(sys.argv[1:])
"""


def test_hellaswag_that_only_rank0_can_read_is_scored_by_all(cluster_workspace, tmp_path):
    root, args, hellaswag_file = cluster_workspace
    output_dir = tmp_path / "out"
    run_args = args + ["--output_dir", str(output_dir), "--micro_batch_size", "4", "--max_steps", "2",
                       "--eval_every", "2", "--hellaswag_file", str(hellaswag_file), "--num_samples", "0",
                       "--ddp_timeout", "20"]
    run_wrapper(RANK0_ONLY_HELLASWAG, tmp_path / "rank0_only.py", run_args)
    assert [r["hellaswag_count"] for r in records(output_dir, "eval")] == [3, 3]  # --hellaswag_limit 3


RANK1_WITHOUT_SHARDS = """
import os, sys, time
import train_accelerate

rank = os.environ["RANK"]
sys.stderr = open(os.path.join(os.environ["LOG_DIR"], f"rank{rank}.err"), "w", buffering=1)  # lines of one rank
argv = sys.argv[1:]
if rank == "1":  # this node's copy of the data folder is empty
    argv[argv.index("--data_dir") + 1] = os.environ["EMPTY_DATA_DIR"]
try:
    train_accelerate.main(argv)
finally:
    if rank == "1":  # as on another node: the launcher here would stop rank 0 as soon as rank 1 has exited
        time.sleep(3)
"""


def test_shards_missing_on_one_rank_stop_every_rank_with_the_same_line(cluster_workspace, tmp_path):
    root, args, _ = cluster_workspace
    (tmp_path / "empty").mkdir()
    script = tmp_path / "rank1_without_shards.py"
    script.write_text(RANK1_WITHOUT_SHARDS)
    command, env = training_command(args + ["--output_dir", str(tmp_path / "out"), "--micro_batch_size", "4",
                                            "--ddp_timeout", "60"], processes=2, script=str(script))
    env.update(PYTHONPATH=str(REPO), EMPTY_DATA_DIR=str(tmp_path / "empty"), LOG_DIR=str(tmp_path))
    started = time.monotonic()
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode != 0 and time.monotonic() - started < 45, result.stderr[-3000:]
    # each rank says it, the same line: rank 0 learnt of rank 1's failure instead of waiting for it in a collective
    errors = [[line for line in (tmp_path / f"rank{rank}.err").read_text().splitlines() if line.startswith("error: ")]
              for rank in (0, 1)]
    assert len(errors[0]) == len(errors[1]) == 1 and errors[0] == errors[1], errors
    assert errors[0][0].startswith("error: rank 1: ") and str(tmp_path / "empty") in errors[0][0]


def test_demo_data_that_rank0_cannot_prepare_stops_every_rank_at_once(tmp_path):
    """The demo's data is prepared by rank 0 alone; when that fails, the other rank learns it at once instead of
    waiting in a barrier until the process-group timeout."""
    (tmp_path / "a_file").write_text("not a folder")
    data_dir = tmp_path / "a_file" / "kjv"
    command, env = training_command(["--preset", "cpu-demo", "--micro_batch_size", "4", "--data_dir", str(data_dir),
                                     "--output_dir", str(tmp_path / "out"), "--ddp_timeout", "120"], processes=2)
    started = time.monotonic()
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 1 and time.monotonic() - started < 60, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2 and errors[0] == errors[1] and str(data_dir) in errors[0], result.stderr[-3000:]


SPLICE_CHECK = """
import sys
from gpt2repro.cli import print_line
for _ in range(1000):
    print_line("error: " + "x" * 150)
"""


def test_error_lines_of_two_processes_sharing_a_pipe_never_splice():
    """With PYTHONUNBUFFERED (as CI machines set it), `print` writes a line and its newline apart, and two ranks'
    error lines were once read back as one (CI, stop 25). Each line must reach the pipe whole."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
    command = f"{sys.executable} -c '{SPLICE_CHECK}' & {sys.executable} -c '{SPLICE_CHECK}' & wait"
    lines = subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True, timeout=60).stderr
    assert [len(line) for line in lines.splitlines()] == [157] * 2000


def test_signal_names_are_checked(capsys):
    assert run_control.parse_signals("SIGTERM, usr1") == [signal.SIGTERM, signal.SIGUSR1]
    assert run_control.parse_signals("none") == []
    with pytest.raises(ValueError, match="unknown signal 'SIGFOO'"):
        run_control.parse_signals("SIGFOO")
    with pytest.raises(ValueError, match="SIGKILL cannot be caught"):
        run_control.parse_signals("SIGTERM,SIGKILL")
    with pytest.raises(ValueError, match="SIGINT is Ctrl-C, which always saves and stops the run"):
        run_control.parse_signals("SIGTERM,SIGINT")
    with pytest.raises(SystemExit) as exit_:
        train_accelerate.parse_args(["--save_on_signals", "TERM,FOO"])
    assert exit_.value.code == 2 and "--save_on_signals: unknown signal 'FOO'" in capsys.readouterr().err


def signal_during(monkeypatch, name: str, calls: set[int], sig: signal.Signals = signal.SIGTERM,
                  module=train_accelerate) -> None:
    """`module`.`name` (e.g. train_accelerate.train_step) sends `sig` to this process during its calls numbered in
    `calls` (0-based), as a scheduler's signal landing while it runs."""
    original, count = getattr(module, name), [0]

    def with_signal(*args, **kwargs):
        if count[0] in calls:
            os.kill(os.getpid(), sig)
        count[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, with_signal)


def test_a_signal_stops_at_the_end_of_its_step_or_within_an_evaluation_and_the_chain_is_exact(
        cluster_workspace, tmp_path, capsys, monkeypatch):
    """SIGTERM during step 2 stops the run after that step (a checkpoint at step 3, its evaluation not done). The
    resumed run is signalled at the second validation batch of that evaluation and stops there, not at its end: still
    not evaluated. The next resume evaluates step 3 and is signalled after it (while it is logged): its checkpoint says
    it is done, and the last resume finishes without evaluating step 3 again. A signal during the last step lets the
    run finish. The chain's weights and records equal an uninterrupted run's."""
    root, args, _ = cluster_workspace
    run = args + ["--micro_batch_size", "8", "--max_steps", "6", "--eval_every", "3", "--checkpoint_every", "100",
                  "--no-hellaswag", "--num_samples", "0", "--eval_batch_size", "1"]
    chain = run + ["--output_dir", str(tmp_path / "chain"), "--resume_from_checkpoint", "latest"]
    with monkeypatch.context() as patch:
        signal_during(patch, "train_step", {2})
        status, _, err = run_main(train_accelerate.main, chain, capsys)
    assert status == run_control.EXIT_PREEMPTED and "preempted by SIGTERM at step 3:" in err, err[-2000:]
    assert [r["step"] for r in records(tmp_path / "chain", "train")] == [0, 1, 2]
    batches_read, original = [], evaluation.validation_batches

    def signal_at_the_second_batch(*args, **kwargs):
        for batch in original(*args, **kwargs):
            batches_read.append(batch)
            if len(batches_read) == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            yield batch

    with monkeypatch.context() as patch:
        patch.setattr(evaluation, "validation_batches", signal_at_the_second_batch)
        status, _, err = run_main(train_accelerate.main, chain, capsys)
    assert status == run_control.EXIT_PREEMPTED and "at step 3:" in err, err[-2000:]
    assert len(batches_read) == 2  # of 1000 / 32 = 31: the check before the second batch's forward saw the signal
    state_file = tmp_path / "chain" / "checkpoints" / "step_000003" / "trainer_state.json"
    assert json.loads(state_file.read_text())["evaluated"] is False
    assert [r["step"] for r in records(tmp_path / "chain", "eval")] == [0]
    with monkeypatch.context() as patch:
        signal_during(patch, "log_evaluation", {0})  # step 3's evaluation is done when the signal comes
        status, _, err = run_main(train_accelerate.main, chain, capsys)
    assert status == run_control.EXIT_PREEMPTED and "at step 3:" in err, err[-2000:]
    assert json.loads(state_file.read_text())["evaluated"] is True
    with monkeypatch.context() as patch:
        signal_during(patch, "train_step", {2})  # step 5, the last one
        status, _, err = run_main(train_accelerate.main, chain, capsys)
    assert status == 0, err[-2000:]
    assert [r["step"] for r in records(tmp_path / "chain", "eval")] == [0, 3, 6]
    assert [r["step"] for r in records(tmp_path / "chain", "train")] == list(range(6))
    status, _, err = run_main(train_accelerate.main, run + ["--output_dir", str(tmp_path / "straight")], capsys)
    assert status == 0, err[-2000:]
    straight, chained = final_weights(tmp_path / "straight", 6), final_weights(tmp_path / "chain", 6)
    assert all(torch.equal(straight[name], chained[name]) for name in straight)
    assert [without_timing(r) for r in records(tmp_path / "chain", "eval")] == \
        [without_timing(r) for r in records(tmp_path / "straight", "eval")]


def test_a_signal_during_hellaswag_stops_the_evaluation_before_its_samples(cluster_workspace, tmp_path, capsys,
                                                                           monkeypatch):
    """SIGTERM while step 0's HellaSwag is scored: the run stops when it is scored, without drawing the samples, and
    its checkpoint says that step 0 was not evaluated."""
    root, args, hellaswag_file = cluster_workspace
    output_dir = tmp_path / "run"
    signal_during(monkeypatch, "hellaswag_scores", {0}, module=evaluation)
    sampled = []
    monkeypatch.setattr(evaluation, "samples", lambda *args, **kwargs: sampled.append(args))
    status, _, err = run_main(train_accelerate.main, args + ["--micro_batch_size", "8", "--max_steps", "2",
                                                             "--hellaswag_file", str(hellaswag_file),
                                                             "--output_dir", str(output_dir)], capsys)
    assert status == run_control.EXIT_PREEMPTED and "preempted by SIGTERM at step 0:" in err, err[-2000:]
    assert sampled == [] and records(output_dir, "eval") == []
    state = json.loads((output_dir / "checkpoints" / "step_000000" / "trainer_state.json").read_text())
    assert state["evaluated"] is False


def test_signals_torchrun_does_not_forward_are_named(monkeypatch):
    """torchrun (accelerate launch) forwards only TORCHELASTIC_SIGNALS_TO_HANDLE's signals to its workers and dies of
    the others: a --save_on_signals signal outside that list would never reach the run."""
    wanted = run_control.parse_signals("SIGTERM,SIGUSR1")
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert run_control.unforwarded_signals(wanted) == []  # not under torchrun: every signal reaches the process
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    monkeypatch.delenv("TORCHELASTIC_SIGNALS_TO_HANDLE", raising=False)
    assert run_control.unforwarded_signals(wanted) == [signal.SIGUSR1]  # torch's default list
    monkeypatch.setenv("TORCHELASTIC_SIGNALS_TO_HANDLE", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1")
    assert run_control.unforwarded_signals(wanted) == []
