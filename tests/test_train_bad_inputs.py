"""train_accelerate.py against bad input and damaged files: each is one `error:` line and a non-zero exit, and no
valid file changes; a damaged newest checkpoint with `latest` falls back to the one before."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest

import train_accelerate
from gpt2repro import checkpointing
from gpt2repro.shards import file_sha256, open_shard, shard_name, write_shard
from train_helpers import (
    TINY_RUN,
    fresh_accelerate_state,
    records,
    run_main,
    the_error_line,
    training_command,
    tree_checksums,
    write_tiny_data,
)

STEPS = 6
RUN = TINY_RUN + ["--micro_batch_size", "8", "--checkpoint_every", "2", "--keep_checkpoints", "3", "--eval_every",
                  "100", "--no-hellaswag", "--num_samples", "0"]


def assert_refused(status: int, err: str, *fragments: str) -> None:
    assert status == 1, err[-3000:]
    line = the_error_line(err)
    assert all(fragment in line for fragment in fragments), line


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 6-step run with checkpoints at steps 2, 4 and 6."""
    root = tmp_path_factory.mktemp("bad_inputs")
    data_dir, _ = write_tiny_data(root)
    with fresh_accelerate_state():
        train_accelerate.main(RUN + ["--data_dir", str(data_dir), "--output_dir", str(root / "run"),
                                     "--max_steps", str(STEPS)])
    return root, data_dir


@pytest.fixture
def run_copy(finished_run, tmp_path):
    """A private copy of the finished run, and the flags that continue it."""
    root, data_dir = finished_run
    shutil.copytree(root / "run", tmp_path / "run")
    return tmp_path / "run", RUN + ["--data_dir", str(data_dir), "--output_dir", str(tmp_path / "run")]


def test_resuming_into_a_folder_of_another_run_is_refused(finished_run, run_copy, tmp_path, capsys):
    root, _ = finished_run
    other_run, argv = run_copy
    before = tree_checksums(other_run)
    status, _, err = run_main(train_accelerate.main, argv + ["--max_steps", "8", "--resume_from_checkpoint",
                                                             str(root / "run" / "checkpoints" / "step_000004")], capsys)
    assert_refused(status, err, "holds another run's checkpoints or metrics")
    assert tree_checksums(other_run) == before


@pytest.mark.parametrize("damaged, how", [
    ("training_state/model.safetensors", "truncate"),
    ("training_state/optimizer.bin", "truncate"),
    ("training_state/random_states_0.pkl", "truncate"),
    ("training_state/random_states_0.pkl", "flip"),  # same size: only its checksum tells (resume would not be exact)
    ("loader_rank0.json", "flip"),
    ("trainer_state.json", "truncate"),
])
def test_a_damaged_checkpoint_is_named_and_latest_falls_back(run_copy, capsys, damaged, how):
    run, argv = run_copy
    newest = run / "checkpoints" / "step_000006"
    path = newest / damaged
    data = bytearray(path.read_bytes())
    if how == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    before = tree_checksums(run)
    status, _, err = run_main(train_accelerate.main,
                              argv + ["--max_steps", str(STEPS), "--resume_from_checkpoint", str(newest)], capsys)
    assert_refused(status, err, f"cannot resume from --resume_from_checkpoint {newest}", str(path))
    assert tree_checksums(run) == before

    status, _, err = run_main(train_accelerate.main,
                              argv + ["--max_steps", str(STEPS), "--resume_from_checkpoint", "latest"], capsys)
    assert status == 0, err
    # steps 4 and 5 were trained again from the step-4 checkpoint, which replaced the damaged one
    assert [r["step"] for r in records(run, "train")] == list(range(STEPS))
    assert checkpointing.checkpoint_problem(newest) is None
    # the damaged one was moved aside, not left for rotation or a later `latest` to pick
    [abandoned] = [p for p in (run / "checkpoints").iterdir() if p.name.startswith("abandoned_step_000006_")]
    assert (abandoned / damaged).read_bytes() == bytes(data)


def test_fallback_notice_names_the_damaged_file(run_copy, capsys, fresh_accelerate):
    run, argv = run_copy
    newest = run / "checkpoints" / "step_000006"
    (newest / "training_state" / "optimizer.bin").write_bytes(b"")
    train_accelerate.main(argv + ["--max_steps", str(STEPS), "--resume_from_checkpoint", "latest"])
    out = capsys.readouterr().out
    assert f"notice: skipping checkpoint {newest}: {newest / 'training_state' / 'optimizer.bin'} is 0 bytes" in out


def test_a_stray_folder_in_checkpoints_is_ignored(run_copy, capsys):
    run, argv = run_copy
    backup = run / "checkpoints" / "step_000006_backup"
    shutil.copytree(run / "checkpoints" / "step_000006", backup)
    before = tree_checksums(backup)
    status, _, err = run_main(train_accelerate.main, argv + ["--max_steps", "8", "--resume_from_checkpoint", "latest"],
                              capsys)
    assert status == 0, err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "step_000004", "step_000006", "step_000006_backup", "step_000008"]  # rotation kept 3 and left the copy alone
    assert tree_checksums(backup) == before


@pytest.mark.parametrize("change, fragments", [
    (["--n_embd", "32", "--max_steps", "8"], ["the model differs", "--n_embd 32 (checkpoint: 64)"]),
    (["--seq_len", "16", "--max_steps", "8"], ["--seq_len 16 (checkpoint: 32)"]),
    (["--recipe", "speedrun", "--max_steps", "8"], ["--position_embedding rope (checkpoint: learned)",
                                                    "--tie_word_embeddings False (checkpoint: True)"]),
    (["--max_steps", "3"], ["is at step 6, beyond --max_steps 3"]),
])
def test_resume_with_other_flags_is_refused(run_copy, capsys, change, fragments):
    run, argv = run_copy
    before = tree_checksums(run)
    status, _, err = run_main(train_accelerate.main, argv + change + ["--resume_from_checkpoint", "latest"], capsys)
    assert_refused(status, err, *fragments)
    assert tree_checksums(run) == before


def test_a_finished_run_resumed_says_there_is_nothing_to_do(run_copy, capsys, fresh_accelerate):
    run, argv = run_copy
    before = tree_checksums(run / "checkpoints")
    train_accelerate.main(argv + ["--max_steps", str(STEPS), "--resume_from_checkpoint", "latest"])
    assert "is already at --max_steps 6: nothing to train" in capsys.readouterr().out
    assert tree_checksums(run / "checkpoints") == before


def test_output_dir_that_is_a_file_is_refused(finished_run, tmp_path, capsys):
    _, data_dir = finished_run
    target = tmp_path / "taken"
    target.write_text("not a folder")
    status, _, err = run_main(train_accelerate.main, RUN + ["--data_dir", str(data_dir), "--output_dir", str(target)],
                              capsys)
    assert_refused(status, err, f"--output_dir {target} is a file")
    assert target.read_text() == "not a folder"


@pytest.mark.parametrize("flag, value", [("--warmup_steps", "-1"), ("--max_lr", "-0.1"), ("--grad_clip", "-1")])
def test_negative_values_are_usage_errors(finished_run, tmp_path, capsys, flag, value):
    _, data_dir = finished_run
    status, _, err = run_main(train_accelerate.main,
                              RUN + ["--data_dir", str(data_dir), "--output_dir", str(tmp_path / "o"), flag, value],
                              capsys)
    assert status == 2 and f"{flag} must not be negative" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_bad_shards_are_named(finished_run, tmp_path, capsys):
    _, data_dir = finished_run
    bad = tmp_path / "bad_data"
    shutil.copytree(data_dir, bad)
    train_shard = bad / shard_name("tiny", "train", 1)
    tokens = np.array(open_shard(train_shard))
    tokens[777] = 65000  # a uint16, but no GPT-2 token
    write_shard(train_shard, tokens)
    status, _, err = run_main(train_accelerate.main,
                              RUN + ["--data_dir", str(bad), "--output_dir", str(tmp_path / "o"), "--no-shuffle"],
                              capsys)
    # in order, offset 777 is in window 24 (777 // 32), read at step 3 (8 windows per step)
    assert_refused(status, err, f"{train_shard} holds token id 65000 at offset 777")
    assert [r["step"] for r in records(tmp_path / "o", "train")] == [0, 1, 2]

    # with a manifest, a shard changed in place after preparation: --verify_data names it
    tokens[777] = 100
    write_shard(train_shard, tokens)
    val_shard = bad / shard_name("tiny", "val", 0)
    manifest = {"shards": [{"name": p.name, "tokens": len(open_shard(p)), "sha256": file_sha256(p)}
                           for p in (val_shard, train_shard)]}
    (bad / "manifest.json").write_text(json.dumps(manifest))
    tokens[778] = 101
    write_shard(train_shard, tokens)
    status, _, err = run_main(train_accelerate.main,
                              RUN + ["--data_dir", str(bad), "--output_dir", str(tmp_path / "o2"), "--verify_data"],
                              capsys)
    assert_refused(status, err, f"{train_shard} does not match the sha256")


def test_ctrl_c_is_one_line_naming_how_to_continue(finished_run, tmp_path):
    _, data_dir = finished_run
    output_dir = tmp_path / "interrupted"
    command, env = training_command(RUN + ["--data_dir", str(data_dir), "--output_dir", str(output_dir),
                                           "--max_steps", "100000"])
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (output_dir / "checkpoints" / "step_000002").exists():
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: interrupted at step ") and "--resume_from_checkpoint latest" in last
    assert str(output_dir / "checkpoints") in last


def test_export_hf_refuses_what_it_cannot_export_in_one_line(run_copy, capsys):
    """--export_hf of no checkpoint, and of one written by an earlier version (its trainer_state.json keeps the flags
    as "args"; every such checkpoint has its hf/ folder): one line each, nothing written."""
    run, _ = run_copy
    status, _, err = run_main(train_accelerate.main, ["--export_hf", str(run)], capsys)
    assert_refused(status, err, f"cannot export {run}: it has no trainer_state.json (not a checkpoint folder)")
    checkpoint = run / "checkpoints" / "step_000004"
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    state["args"] = state.pop("settings")
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))
    before = tree_checksums(run)
    status, _, err = run_main(train_accelerate.main, ["--export_hf", str(checkpoint)], capsys)
    assert_refused(status, err, f"{checkpoint} was written by an earlier version", f"use {checkpoint / 'hf'}")
    assert tree_checksums(run) == before


def test_a_run_ending_on_a_checkpoint_without_its_model_folder_says_how_to_write_one(tmp_path):
    (tmp_path / "hf").mkdir()
    assert checkpointing.model_folder_line(tmp_path) == f"done: model folder {tmp_path / 'hf'}"
    (tmp_path / "hf").rmdir()
    assert checkpointing.model_folder_line(tmp_path) == (f"done: {tmp_path} holds the training state alone; write its "
                                                         f"model folder with --export_hf {tmp_path}")
