"""What only shows on clusters, reproduced with 1 and 2 CPU processes (gloo) and a short process-group timeout:
preemption by SIGTERM saves and resumes exactly, a slow Hub upload never blocks rank 0 inside a barrier, and
HellaSwag is decided on rank 0 for every rank."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import accelerate
import pytest
import torch
import yaml
from packaging.version import Version
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import train_accelerate
from gpt2repro import evaluation, launch, run_control
from train_helpers import (
    REPO,
    TINY_RUN,
    distributed_state,
    final_weights,
    records,
    run_main,
    run_training,
    training_command,
)

STEPS = 8
QUIET = ["--max_steps", str(STEPS), "--num_samples", "0", "--eval_every", "100", "--checkpoint_every", "4"]


@pytest.fixture(scope="module")
def workspace(tiny_data):
    data_dir, hellaswag_file = tiny_data
    return data_dir.parent, TINY_RUN + ["--data_dir", str(data_dir)], hellaswag_file


def without_timing(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in ("step_time", "tokens_per_sec", "mfu")}


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
def test_sigterm_saves_a_checkpoint_and_resume_is_exact(workspace, processes, capsys):
    root, args, _ = workspace
    micro = ["--micro_batch_size", str(8 // processes), "--no-hellaswag"] + QUIET
    reference = root / f"uninterrupted_{processes}"
    run_training(args + micro + ["--output_dir", str(reference)], processes=processes)

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
    assert 0 < step < STEPS
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

    run_training(args + micro + ["--output_dir", str(output_dir), "--resume_from_checkpoint", "latest"],
                 processes=processes)
    assert list(map(without_timing, records(output_dir, "train"))) == \
        list(map(without_timing, records(reference, "train")))
    assert records(output_dir, "eval") == records(reference, "eval")
    weights, expected = final_weights(output_dir, STEPS), final_weights(reference, STEPS)
    assert all(torch.equal(weights[name], expected[name]) for name in expected)


def run_wrapper(source: str, path: Path, args: list[str], **env: str) -> None:
    """Writes `source` (a script that patches something, then calls train_accelerate.main) to `path` and runs it as 2
    gloo processes with the repository importable; the run must succeed."""
    path.write_text(source)
    command, run_env = training_command(args, processes=2, script=str(path))
    run_env.update(PYTHONPATH=str(REPO), **env)
    result = subprocess.run(command, env=run_env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-4000:]


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


def test_a_slow_upload_never_blocks_a_barrier(workspace, tmp_path):
    # Before the fix, rank 0 waited for step 2's upload when pruning it at step 4, while rank 1 waited in the
    # checkpoint's barrier: with uploads this slow, the barrier timed out (--ddp_timeout 5) and the job died.
    root, args, _ = workspace
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


def test_hellaswag_that_only_rank0_can_read_is_scored_by_all(workspace, tmp_path):
    root, args, hellaswag_file = workspace
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


def test_shards_missing_on_one_rank_stop_every_rank_with_the_same_line(workspace, tmp_path):
    root, args, _ = workspace
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


def test_a_signal_stops_at_the_end_of_its_step_or_within_an_evaluation_and_the_chain_is_exact(workspace, tmp_path,
                                                                                             capsys, monkeypatch):
    """SIGTERM during step 2 stops the run after that step (a checkpoint at step 3, its evaluation not done). The
    resumed run is signalled at the second validation batch of that evaluation and stops there, not at its end: still
    not evaluated. The next resume evaluates step 3 and is signalled after it (while it is logged): its checkpoint says
    it is done, and the last resume finishes without evaluating step 3 again. A signal during the last step lets the
    run finish. The chain's weights and records equal an uninterrupted run's."""
    root, args, _ = workspace
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


@pytest.mark.parametrize("recipe", ["gpt2", "speedrun"])
def test_shard_optimizer_gives_the_same_weights_and_resumes_on_any_world_size(workspace, tmp_path, recipe):
    """2 processes with the optimiser state split (ZeRO-1: AdamW's moments by parameter, Muon's momentum by matrix)
    and without: the same weights, bit for bit (each update is computed once, by the same arithmetic). The sharded
    run's checkpoint is its processes' shares, together the plain run's whole state; it resumes exactly on 2
    processes, and on 1 process (with a notice) to
    weights equal up to float summation order. The speedrun's are compared by their losses and gradient norms: Adam
    turns a gradient entry that is 0 in one summation order and float noise in the other into a whole LR step
    (embeddings' LR 0.6), so some of its rows differ by up to 1.5 (measured on an AVX-512 CPU) while the losses
    agree to 3e-6."""
    root, args, _ = workspace
    args = args + ["--recipe", recipe]
    run = args + ["--micro_batch_size", "4"] + QUIET + ["--no-hellaswag"]
    run_training(run + ["--output_dir", str(tmp_path / "plain")], processes=2)
    run_training(run + ["--output_dir", str(tmp_path / "sharded"), "--shard_optimizer"], processes=2)
    sharded = final_weights(tmp_path / "sharded", STEPS)
    assert all(torch.equal(w, sharded[name]) for name, w in final_weights(tmp_path / "plain", STEPS).items())
    checkpoint = tmp_path / "sharded" / "checkpoints" / "step_000004"
    folders = [tmp_path / run / "checkpoints" / "step_000004" for run in ("plain", "sharded")]
    for folder in folders:  # each process wrote its own share, and each tensor once (DCP's save plans deduplicated)
        files = sorted(p.name for p in (folder / "distributed_state").glob("*.distcp"))
        assert files == ["__0_0.distcp", "__1_0.distcp"] and not (folder / "training_state").exists()
    plain_bytes, sharded_bytes = (sum(p.stat().st_size for p in (f / "distributed_state").iterdir()) for f in folders)
    assert sharded_bytes == pytest.approx(plain_bytes, rel=0.01)
    saved = [distributed_state(folder, tmp_path / f"state_{n}.pt") for n, folder in enumerate(folders)]
    # the shares make the whole: a state for every weight (the tied head is the embedding's)
    assert saved[0]["optimizer"].keys() == saved[1]["optimizer"].keys() == saved[0]["model"].keys()
    for name, moments in saved[0]["optimizer"].items():
        assert all(torch.equal(value, saved[1]["optimizer"][name][key]) for key, value in moments.items()), name
    run_training(run + ["--output_dir", str(tmp_path / "resumed_2"), "--shard_optimizer", "--resume_from_checkpoint",
                        str(checkpoint)], processes=2)
    assert all(torch.equal(w, sharded[name]) for name, w in final_weights(tmp_path / "resumed_2", STEPS).items())
    one_process = args + ["--micro_batch_size", "8"] + QUIET + ["--no-hellaswag"]
    resumed = run_training(one_process + ["--output_dir", str(tmp_path / "resumed_1"), "--checkpoint_every", "2",
                                          "--resume_from_checkpoint", str(checkpoint)])
    assert "was written by 2 processes and this launch has 1" in resumed.stdout
    if recipe == "gpt2":
        for name, w in final_weights(tmp_path / "resumed_1", STEPS).items():
            torch.testing.assert_close(w, sharded[name], rtol=0, atol=1e-5, msg=name)
    resumed_train, sharded_train = records(tmp_path / "resumed_1", "train"), records(tmp_path / "sharded", "train")[4:]
    assert [r["step"] for r in resumed_train] == [r["step"] for r in sharded_train] == list(range(4, STEPS))
    assert [r["loss"] for r in resumed_train] == pytest.approx([r["loss"] for r in sharded_train], rel=1e-5)
    assert [r["grad_norm"] for r in resumed_train] == pytest.approx([r["grad_norm"] for r in sharded_train], rel=1e-3)
    # a whole-state checkpoint (one process's: every checkpoint's format in earlier versions) resumed on 2 processes
    # with the state split: each keeps its share of what it reads
    run_training(run + ["--output_dir", str(tmp_path / "from_one"), "--shard_optimizer", "--resume_from_checkpoint",
                        str(tmp_path / "resumed_1" / "checkpoints" / "step_000006")], processes=2)
    from_one, one_train = records(tmp_path / "from_one", "train"), records(tmp_path / "resumed_1", "train")[2:]
    assert [r["step"] for r in from_one] == [r["step"] for r in one_train] == [6, 7]
    assert [r["loss"] for r in from_one] == pytest.approx([r["loss"] for r in one_train], rel=1e-5)


FSDP_REFUSED = Version(accelerate.__version__) < launch.FSDP_ACCELERATE
FSDP_ON_CPU = """
import accelerate
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

import train_accelerate

accelerator_init = accelerate.Accelerator.__init__


def init_as_on_gpus(self, *args, **kwargs):  # what Accelerate does with an FSDP config on GPUs (accelerate/state.py)
    accelerator_init(self, *args, **kwargs)
    for state in (PartialState._shared_state, AcceleratorState._shared_state):
        state["distributed_type"] = DistributedType.FSDP
    plugin = kwargs.get("fsdp_plugin") or FullyShardedDataParallelPlugin()  # the rest from the FSDP_* environment
    if self.mixed_precision != "no":
        plugin.set_mixed_precision(self.mixed_precision)  # keeps a policy the plugin was given
    AcceleratorState._shared_state["fsdp_plugin"] = plugin


accelerate.Accelerator.__init__ = init_as_on_gpus
train_accelerate.main()
"""


def fsdp_launch_environment() -> dict[str, str]:
    """The environment `accelerate launch --config_file accelerate_configs/fsdp2_8gpu.yaml` gives each process."""
    config = yaml.safe_load((REPO / "accelerate_configs" / "fsdp2_8gpu.yaml").read_text())
    assert config["distributed_type"] == "FSDP"
    env = {"ACCELERATE_USE_FSDP": "true"}
    for key, value in config["fsdp_config"].items():
        env[key.upper().replace("_LAYER_CLS_", "_CLS_")] = str(value).lower() if isinstance(value, bool) else str(value)
    return env


@pytest.mark.skipif(FSDP_REFUSED, reason=f"FSDP needs accelerate >= {launch.FSDP_ACCELERATE}")
def test_fsdp2_trains_as_ddp_does_and_resumes_exactly(workspace, tmp_path):
    """Accelerate under accelerate_configs/fsdp2_8gpu.yaml, on 2 CPU processes (Accelerate turns FSDP into DDP on a
    CPU; the wrapper makes it take its GPU path): with 2 micro-steps per step, evaluations (val, HellaSwag, samples:
    every forward is a collective under FSDP) and sharded checkpoints, it trains as DDP does (float summation order
    apart), resumes bitwise, and each hf/ folder is the whole model, loadable. With --compile on (the Blocks compiled
    inside FSDP) it trains as eager FSDP does and evaluates and samples alike."""
    root, args, hellaswag_file = workspace
    run = args + ["--micro_batch_size", "2", "--max_steps", "8", "--eval_every", "4", "--num_samples", "2",
                  "--hellaswag_file", str(hellaswag_file)]
    env = fsdp_launch_environment()
    run_wrapper(FSDP_ON_CPU, tmp_path / "fsdp_on_cpu.py", run + ["--output_dir", str(tmp_path / "fsdp")], **env)
    run_training(run + ["--output_dir", str(tmp_path / "ddp")], processes=2)
    checkpoint = tmp_path / "fsdp" / "checkpoints" / "step_000004"
    files = sorted(p.name for p in (checkpoint / "distributed_state").glob("*.distcp"))
    assert files == ["__0_0.distcp", "__1_0.distcp"]  # each process wrote its own shard
    run_wrapper(FSDP_ON_CPU, tmp_path / "fsdp_on_cpu.py", run + ["--output_dir", str(tmp_path / "resumed"),
                                                                   "--resume_from_checkpoint", str(checkpoint)], **env)
    # --compile on: each Block compiled inside its FSDP module (inductor), evaluation and sampling eager
    run_wrapper(FSDP_ON_CPU, tmp_path / "fsdp_on_cpu.py", run + ["--output_dir", str(tmp_path / "compiled"),
                                                                   "--compile", "on"], **env)

    fsdp, ddp = records(tmp_path / "fsdp", "train"), records(tmp_path / "ddp", "train")
    assert [r["step"] for r in fsdp] == list(range(8))
    for a, b in zip(fsdp, ddp, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["grad_norm"] == pytest.approx(b["grad_norm"],
                                                                                                 rel=1e-4)
    for a, b in zip(records(tmp_path / "compiled", "train"), fsdp, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    evals = records(tmp_path / "fsdp", "eval")
    assert [r["step"] for r in evals] == [0, 4, 8] and all(len(r["samples"]) == 2 for r in evals)
    for a, b in zip(records(tmp_path / "compiled", "eval"), evals, strict=True):
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-4) and len(a["samples"]) == 2
    for a, b in zip(evals, records(tmp_path / "ddp", "eval"), strict=True):
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)
        assert a["hellaswag_count"] == b["hellaswag_count"] == 3
    weights, expected = final_weights(tmp_path / "fsdp", 8), final_weights(tmp_path / "ddp", 8)
    assert weights.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(weights[name], value, rtol=0, atol=1e-5, msg=name)
    resumed = final_weights(tmp_path / "resumed", 8)
    assert all(torch.equal(resumed[name], value) for name, value in weights.items())
    assert [without_timing(r) for r in records(tmp_path / "resumed", "train")] == \
        [without_timing(r) for r in fsdp if r["step"] >= 4]
    hf = tmp_path / "fsdp" / "checkpoints" / "step_000008" / "hf"
    assert sorted(path.name for path in hf.glob("*.py")) == ["configuration_gpt2repro.py", "modeling_gpt2repro.py"]
    model = AutoModelForCausalLM.from_pretrained(hf, trust_remote_code=True)
    assert all(torch.equal(model.state_dict()[name], value) for name, value in weights.items())


@pytest.mark.skipif(FSDP_REFUSED, reason=f"FSDP needs accelerate >= {launch.FSDP_ACCELERATE}")
def test_fsdp2_under_bf16_autocast_trains_as_ddp_does(workspace, tmp_path):
    """bf16 autocast, 2 micro-steps per step: FSDP with the recipe's policy (fp32 weights under autocast, gradients
    reduced and accumulated in fp32) trains as DDP does. Measured here over these 6 steps: gaps in the loss of 4e-6 on
    average (1.9e-5 at most) with the recipe's policy, 5.9e-5 on average with Accelerate's default (bf16 weights and
    reduction); over 60 steps of a larger model benchmarks/bench_fsdp_precision.py puts the first at the float-order
    floor (one process against two) and the second 20x above it."""
    root, args, _ = workspace
    run = args + ["--micro_batch_size", "2", "--max_steps", "6", "--eval_every", "6", "--checkpoint_every", "6",
                  "--no-hellaswag", "--num_samples", "0", "--mixed_precision", "bf16"]
    run_wrapper(FSDP_ON_CPU, tmp_path / "fsdp_on_cpu.py", run + ["--output_dir", str(tmp_path / "fsdp")],
                **fsdp_launch_environment())
    run_training(run + ["--output_dir", str(tmp_path / "ddp")], processes=2)
    fsdp, ddp = records(tmp_path / "fsdp", "train"), records(tmp_path / "ddp", "train")
    gaps = [abs(a["loss"] - b["loss"]) for a, b in zip(fsdp, ddp, strict=True)]
    assert len(gaps) == 6 and sum(gaps) / len(gaps) < 2e-5 and max(gaps) < 1e-4, gaps
    assert records(tmp_path / "fsdp", "eval")[-1]["val_loss"] == pytest.approx(
        records(tmp_path / "ddp", "eval")[-1]["val_loss"], abs=1e-4)


@pytest.mark.parametrize("flags, line", [
    (["--recipe", "speedrun"], "error: Muon orthogonalises whole matrices and FSDP splits each one among the"),
    (["--shard_optimizer"], "error: FSDP already splits the optimiser state with the parameters: drop"),
], ids=["muon", "shard_optimizer"])
def test_fsdp2_refuses_what_cannot_work_with_it_in_one_line(workspace, tmp_path, flags, line):
    """Each before any work; with an accelerate too old for FSDP2, that comes first."""
    root, args, _ = workspace
    if FSDP_REFUSED:
        line = f"error: FSDP needs accelerate >= {launch.FSDP_ACCELERATE}"
    script = tmp_path / "fsdp_on_cpu.py"
    script.write_text(FSDP_ON_CPU)
    command, env = training_command(args + ["--output_dir", str(tmp_path / "out"), "--micro_batch_size", "4", *flags],
                                    processes=2, script=str(script))
    env.update(PYTHONPATH=str(REPO), **fsdp_launch_environment())
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode != 0 and line in result.stderr, result.stderr[-3000:]
    assert not (tmp_path / "out" / "checkpoints").exists()


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
