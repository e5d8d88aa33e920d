"""Shared by the tests: tiny shards, a tiny HellaSwag file, running a script's main in-process, launching runs,
reading results, and the checks every command's refusals share (one error line, files unchanged)."""
from __future__ import annotations

import atexit
import contextlib
import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import load_file

from gpt2repro.shards import shard_name, write_shard

REPO = Path(__file__).resolve().parent.parent
SCRIPT = str(REPO / "train_accelerate.py")
FORKED_LAUNCH = REPO / "tests" / "forked_launch.py"
SEED = 1234
# A tiny GPT (2 layers, width 64, T = 32) in fp32; 12 steps of 256 tokens, evals at 0/6/12, checkpoints at 4/8/12.
TINY_MODEL = ["--n_layer", "2", "--n_head", "2", "--n_embd", "64", "--seq_len", "32"]
TINY_RUN = TINY_MODEL + [
    "--total_batch_size", "256", "--max_steps", "12", "--warmup_steps", "2", "--eval_every", "6",
    "--checkpoint_every", "4", "--keep_checkpoints", "2", "--val_tokens", "1000", "--eval_batch_size", "4",
    "--mixed_precision", "no", "--seed", str(SEED), "--hellaswag_limit", "3",
]
VAL_TOKENS, TRAIN_TOKENS = 4000, 20000
# 8 steps without evaluations or samples, checkpoints at 4 and 8: the multi-process runs that compare weights
QUIET_STEPS = 8
QUIET = ["--max_steps", str(QUIET_STEPS), "--num_samples", "0", "--eval_every", "100", "--checkpoint_every", "4"]


def write_tiny_data(folder: Path) -> tuple[Path, Path]:
    """Random GPT-2 token shards (one val, one train) and a 4-example HellaSwag jsonl in the original schema."""
    data_dir = folder / "data"
    data_dir.mkdir()
    rng = np.random.default_rng(0)
    write_shard(data_dir / shard_name("tiny", "val", 0), rng.integers(0, 50257, VAL_TOKENS))
    write_shard(data_dir / shard_name("tiny", "train", 1), rng.integers(0, 50257, TRAIN_TOKENS))
    hellaswag_file = folder / "hellaswag_val.jsonl"
    with open(hellaswag_file, "w") as f:
        for i in range(4):
            ctx_a, ctx_b = f"A man number {i} is standing in a kitchen.", "He"
            f.write(json.dumps({
                "ind": i, "activity_label": "Cooking", "ctx_a": ctx_a, "ctx_b": ctx_b, "ctx": f"{ctx_a} {ctx_b}",
                "split": "val", "split_type": "indomain", "label": i % 4, "source_id": f"test~{i}",
                "endings": ["cuts an onion.", "sings to the fridge.", "flies away.", "reads a long book slowly."],
            }) + "\n")
    return data_dir, hellaswag_file


def run_main(main: Callable[[list[str]], object], argv: list[str], capsys) -> tuple[int, str, str]:
    """A script's `main(argv)` in this process: (exit status, stdout, stderr). Each in-process run builds its own
    Accelerator: Accelerate's process-wide singletons are cleared first."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    try:
        main(argv)
        status = 0
    except SystemExit as exit_:
        status = exit_.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def free_port() -> int:
    """A TCP port free on this machine now, e.g. for `accelerate launch --main_process_port`."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def gloo_worker(rank: int, port: int, world_size: int = 2):
    """The body of a torch.multiprocessing worker in a gloo process group of `world_size` on this machine. On success
    every process passes a last barrier (none leaves while a peer still receives: gloo aborts it), the group is torn
    down and the process ends at once, skipping the interpreter's and C++'s exit-time teardown, where a finished
    worker once aborted in CI ("terminate called without an active exception", SIGABRT). An error propagates as
    usual: torch.multiprocessing reports its traceback."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        yield
        dist.barrier()
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def training_command(args: list[str], processes: int = 1, script: str = SCRIPT,
                     forked: bool = False) -> tuple[list[str], dict]:
    """The command line and environment of a CPU run of `script` (train_accelerate.py or a wrapper of it): plain
    python, or `accelerate launch` with gloo DDP; `forked`: for start_forked, which forks its processes from one that
    has imported the project (tests/forked_launch.py), for a test of what they compute or how they end rather than
    of how they start."""
    # One thread per process: tiny ops are dominated by thread hand-offs, and a second thread of a busy machine
    # makes every op wait for it (measured: 78 ms vs 181 ms per tiny forward + backward).
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    if forked:  # the launch server imports the project
        env.update(PYTHONPATH=str(REPO))
    if processes == 1:
        return [sys.executable, script, *args], env
    env.update(ACCELERATE_USE_CPU="true")
    launcher = [sys.executable, *([str(FORKED_LAUNCH)] if forked else
                                  ["-m", "accelerate.commands.launch"]),
                "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no",
                "--dynamo_backend", "no", "--main_process_port", str(free_port())]
    return [*launcher, script, *args], env


def train_here(args: list[str]) -> str:
    """A one-process run of train_accelerate.py in this process, where a process of its own would prove nothing more
    (a reference run, a resume): no interpreter to start, nothing to import. It must succeed; returns its stdout."""
    import train_accelerate

    out, err = io.StringIO(), io.StringIO()
    with fresh_accelerate_state(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            train_accelerate.main(args)
        except SystemExit as exit_:
            raise AssertionError(f"the run exited {exit_.code}: {err.getvalue()[-3000:]}") from None
    return out.getvalue()


# Read by the tests' wrapper scripts or by Accelerate's FSDP plugin when a run starts, never at import, or by nothing
# (pytest's name of the running test): launches whose environments differ in these alone share a server
READ_AT_RUN_TIME = ("ACCELERATE_USE_FSDP", "FSDP_", "STANDIN_HUB", "TESTS", "UPLOADS_END_WHEN", "PYTEST_CURRENT_TEST")


class LaunchServer:
    """tests/forked_launch.py --serve, started by this test process with a launch's environment (what the libraries
    read at import): each launch it serves is forked from it, with no interpreter to start and nothing to import
    (~3.7 s of CPU saved per launch after its first). One launch at a time."""

    def __init__(self, env: dict[str, str]):
        self.connection, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.process = subprocess.Popen([sys.executable, str(FORKED_LAUNCH), "--serve", str(theirs.fileno())], env=env,
                                        pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL)
        theirs.close()

    def reply(self) -> dict:
        message = self.connection.recv(4096)
        if not message:
            raise RuntimeError(f"the launch server ended (exit status {self.process.poll()})")
        return json.loads(message)

    def close(self, kill: bool = False) -> None:
        self.connection.close()  # the server returns when its end closes
        if kill:
            self.process.kill()
        self.process.wait(timeout=60)


class ServedProcess:
    """A launch, or a plain `python SCRIPT ARGS` run, forked by a launch server, watched as a subprocess.Popen is:
    pid (its process group's too), poll, send_signal, communicate. Its output goes to files, read as text at the end.
    Whatever stops a wait for it (a timeout, pytest-timeout's alarm, Ctrl-C) kills its group and the server."""

    def __init__(self, server: LaunchServer, argv: list[str], env: dict[str, str], cwd: Path | None, plain: bool,
                 on_end: Callable[[], None]):
        self.server, self.args, self.on_end, self.returncode = server, argv, on_end, None
        self.stdout, self.stderr = tempfile.TemporaryFile(), tempfile.TemporaryFile()
        request = json.dumps({"argv": argv, "env": env, "cwd": str(cwd or os.getcwd()), "plain": plain}).encode()
        self.pid = None
        self.wait_for(lambda: socket.send_fds(server.connection, [request], [self.stdout.fileno(),
                                                                              self.stderr.fileno()]), None)
        self.pid = self.wait_for(lambda: server.reply()["pid"], 120)  # a new server's first waits for its imports

    def wait_for(self, call: Callable[[], object], timeout: float | None) -> object:
        try:
            self.server.connection.settimeout(timeout)
            return call()
        except BlockingIOError:  # poll's: no status yet
            raise
        except BaseException as stop:
            if self.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)
            self.server.close(kill=True)
            self.returncode = -signal.SIGKILL
            if isinstance(stop, TimeoutError):
                raise subprocess.TimeoutExpired(self.args, timeout) from None
            raise

    def poll(self) -> int | None:
        if self.returncode is None:
            with contextlib.suppress(BlockingIOError):
                self.wait_for(self.ended, 0)
        return self.returncode

    def ended(self) -> None:
        self.returncode = self.server.reply()["status"]
        self.on_end()

    def send_signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self.wait_for(self.ended, timeout)
        return self.returncode

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        self.wait(timeout)
        outputs = []
        for file in (self.stdout, self.stderr):
            file.seek(0)
            outputs.append(file.read().decode())
            file.close()
        return outputs[0], outputs[1]


# This test process's servers, by the environment they import with, the most recently used last; at most 3 kept
LAUNCH_SERVERS: dict[tuple[tuple[str, str], ...], LaunchServer] = {}
atexit.register(lambda: [server.close() for server in LAUNCH_SERVERS.values()])


def start_forked(command: list[str], env: dict[str, str], cwd: Path | None = None) -> ServedProcess:
    """training_command(..., forked=True)'s command (a launch, or plain python on one process), forked by this test
    process's launch server for its environment (one started if none). The server is kept for the next command once
    this one has ended; one that failed to serve is closed and dropped."""
    key = tuple(sorted((k, v) for k, v in env.items() if not k.startswith(READ_AT_RUN_TIME)))
    server = LAUNCH_SERVERS.pop(key, None) or LaunchServer(env)

    def keep_server() -> None:
        LAUNCH_SERVERS[key] = server
        while len(LAUNCH_SERVERS) > 3:
            LAUNCH_SERVERS.pop(next(iter(LAUNCH_SERVERS))).close()

    plain = command[1] != str(FORKED_LAUNCH)
    return ServedProcess(server, command[1 if plain else 2:], env, cwd, plain, keep_server)


def run_launch(command: list[str], env: dict[str, str], cwd: Path | None = None,
               timeout: float = 240) -> subprocess.CompletedProcess:
    """start_forked's command run to its end, its output captured as text. Within pytest-timeout's 300 s by
    default."""
    process = start_forked(command, env, cwd)
    stdout, stderr = process.communicate(timeout)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def run_training(args: list[str], processes: int = 1, cwd: Path | None = None, env: dict[str, str] | None = None,
                 script: str = SCRIPT) -> subprocess.CompletedProcess:
    """A CPU run of `script` (train_accelerate.py or a wrapper of it, see training_command), forked by a launch server
    (start_forked), with `env` added to its environment; it must succeed."""
    command, run_env = training_command(args, processes, script, forked=True)
    run_env.update(env or {})
    result = run_launch(command, run_env, cwd)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def run_script(script: Path, args: list[str], **env: str) -> subprocess.CompletedProcess:
    """`script` (one that patches something, then calls train_accelerate.main) run on 2 gloo processes (run_training)
    with `env` added."""
    return run_training(args, processes=2, env=env, script=str(script))


def run_wrapper(source: str, path: Path, args: list[str], **env: str) -> subprocess.CompletedProcess:
    """run_script of `source`, written to `path` first."""
    path.write_text(source)
    return run_script(path, args, **env)


def without_timing(record: dict) -> dict:
    """A metrics record without its wall-clock figures, the only fields two runs of the same steps may differ in."""
    return {k: v for k, v in record.items() if k not in ("step_time", "tokens_per_sec", "mfu")}


# dynamo's log of every graph break (torch._logging), one "[__graph_breaks]" line each: compiled runs must have none
GRAPH_BREAK_LOG = {"TORCH_LOGS": "graph_breaks"}


def graph_breaks(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "__graph_breaks" in line]


def records(output_dir: Path, record_type: str) -> list[dict]:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == record_type]


def final_weights(output_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(output_dir / "checkpoints" / f"step_{step:06d}" / "hf" / "model.safetensors")


def distributed_state(checkpoint: Path, scratch: Path) -> dict:
    """A multi-process checkpoint's training state, whole ({"model": ..., "optimizer": {parameter name: state}}), read
    in this process through torch's own converter (written to `scratch`)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(checkpoint / "distributed_state", scratch)
    return torch.load(scratch, weights_only=False)


@contextlib.contextmanager
def fresh_accelerate_state():
    """An in-process run of a command builds its own Accelerator: Accelerate's process-wide singletons are cleared
    around it. One thread: the tiny models' ops are far faster without thread hand-offs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    try:
        yield
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        torch.set_num_threads(threads)


def tree_checksums(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by path: what must not change when a command is refused."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def the_error_line(stderr: str, prefix: str = "error: ") -> str:
    """The one line of `stderr` that says what went wrong (progress bars aside), after asserting that there is
    exactly one (no line else names an error) and no traceback."""
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith(prefix), stderr[-3000:]
    return errors[0]
