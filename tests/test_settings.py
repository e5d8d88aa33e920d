"""The run's settings: every flag lands in exactly one typed, frozen group; what a checkpoint records of them loads
back; no function outside the three command scripts takes the command line's Namespace."""
from __future__ import annotations

import ast
import dataclasses
import json

import pytest

import train_accelerate
from gpt2repro.settings import GROUPS, TrainSettings
from train_helpers import REPO, TINY_RUN, final_weights, records, run_main

COMMANDS = {"train_accelerate.py", "prepare_data.py", "eval_hellaswag.py"}


def test_every_flag_is_one_setting_and_none_is_left_over():
    dests = {action.dest for action in train_accelerate.build_parser()._actions if action.dest != "help"}
    fields = {f.name for kind in GROUPS.values() for f in dataclasses.fields(kind)} | {"preset", "recipe"}
    assert dests == fields
    with pytest.raises(TypeError, match="flags without a setting"):
        TrainSettings.from_flags({**train_accelerate.parse_args([]).flags(), "no_such_flag": 1})


def test_settings_are_frozen_and_their_json_loads_back():
    settings = train_accelerate.parse_args(["--preset", "cpu-demo-speedrun", "--save_on_signals", "TERM,USR1"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.model.n_layer = 2
    recorded = json.loads(json.dumps(settings.flags()))
    assert recorded["save_on_signals"] == ["SIGTERM", "SIGUSR1"]  # by name
    assert TrainSettings.from_flags(recorded) == settings


def namespace_parameters(path) -> list[str]:
    """Functions of `path` with a parameter annotated as, or named like, the command line's Namespace."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            for arg in node.args.args + node.args.kwonlyargs:
                annotation = ast.unparse(arg.annotation) if arg.annotation else ""
                if "Namespace" in annotation or arg.arg == "args" and not annotation:
                    found.append(f"{path.name}:{node.lineno} {node.name}({arg.arg})")
    return found


def test_no_function_outside_the_commands_takes_a_namespace():
    files = [p for p in [*REPO.glob("*.py"), *(REPO / "gpt2repro").glob("*.py")] if p.name not in COMMANDS]
    assert len(files) > 20
    assert [hit for path in files for hit in namespace_parameters(path)] == []


def test_a_checkpoint_of_the_flat_flags_format_still_resumes(tiny_data, tmp_path, capsys, fresh_accelerate):
    """Checkpoints before the typed settings kept the flags flat under "args" in trainer_state.json (signals as
    numbers): such a checkpoint resumes to the uninterrupted run's weights, and its model shape is still checked."""
    data_dir, _ = tiny_data
    run = TINY_RUN + ["--data_dir", str(data_dir), "--micro_batch_size", "8", "--max_steps", "4", "--eval_every", "2",
                      "--checkpoint_every", "2", "--no-hellaswag", "--num_samples", "0"]
    status, _, err = run_main(train_accelerate.main, run + ["--output_dir", str(tmp_path / "straight")], capsys)
    assert status == 0, err
    checkpoint = tmp_path / "straight" / "checkpoints" / "step_000002"
    state_file = checkpoint / "trainer_state.json"
    state = json.loads(state_file.read_text())
    flat = dict(state.pop("settings"), save_on_signals=[15, 10])
    del state["resolved"]
    state_file.write_text(json.dumps({**state, "args": flat}))
    status, _, err = run_main(train_accelerate.main, run + ["--output_dir", str(tmp_path / "resumed"),
                                                            "--resume_from_checkpoint", str(checkpoint)], capsys)
    assert status == 0, err
    straight, resumed = final_weights(tmp_path / "straight", 4), final_weights(tmp_path / "resumed", 4)
    assert all(straight[name].equal(resumed[name]) for name in straight)
    assert records(tmp_path / "resumed", "eval")[-1] == records(tmp_path / "straight", "eval")[-1]
    status, _, err = run_main(train_accelerate.main, run + ["--output_dir", str(tmp_path / "other"), "--n_embd", "32",
                                                            "--resume_from_checkpoint", str(checkpoint)], capsys)
    assert status == 1 and "the model differs: --n_embd 32 (checkpoint: 64)" in err
