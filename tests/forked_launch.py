"""`accelerate launch` for the tests whose subject is what the processes compute, not how they were started.

    python tests/forked_launch.py [accelerate launch options] SCRIPT [SCRIPT ARGS]
    python tests/forked_launch.py --serve FD      (a launch server: see `serve`; train_helpers.start_forked starts it)

Accelerate's own launch command runs as usual (its flags, its configuration, the environment it gives each process)
up to where it hands over to torchrun. There, instead of torchrun's agent starting a fresh interpreter per process,
each importing torch, transformers and the project anew (~3 s of CPU each; a 2-process launch costs ~11 s of CPU in
all, measured on 2 cores), the processes are forked from this one, which has imported them already (~7 s in all). Each
gets the environment torchrun gives a worker on one machine, and unbuffered output, as torchrun's `python -u`. What
torchrun's agent itself does (its store, forwarding signals, restarts) is left out: the tests of signals sent to a
launch, of failures and the README's launch lines run `accelerate launch` itself. All processes of a launch share this
interpreter's hash seed (under torchrun each has its own). The launch server also runs plain `python SCRIPT ARGS`
commands, forked the same way (one process, no launcher).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import runpy
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable

# imported once, here, before the processes are forked (the point of this launcher), with what rank 0 imports when it
# first scores HellaSwag (evaluate) and draws loss.png (matplotlib)
import evaluate  # noqa: F401
import matplotlib.figure  # noqa: F401
import torch.distributed.run
from accelerate.commands.launch import launch_command, launch_command_parser

import train_accelerate  # noqa: F401

PEER_GRACE_S = 30  # torchrun's agent: SIGTERM to the other workers, SIGKILL after its --shutdown_timeout


def run_forked(args: argparse.Namespace) -> None:
    """torch.distributed.run.run's place: `args.nproc_per_node` processes forked from this one, each running the script
    as `python -u SCRIPT ARGS` would. When one fails the others get SIGTERM, then SIGKILL after torchrun's grace, and
    the launch exits 1, as `accelerate launch` does when torchrun reports a failed worker."""
    if str(args.nnodes) not in ("1", "1:1") or args.module or args.no_python or int(args.max_restarts) > 0:
        sys.exit("error: forked_launch.py runs one machine's processes of a Python script, without restarts")
    world_size = int(args.nproc_per_node)
    port = args.master_port
    if getattr(args, "standalone", False):  # Accelerate found its port taken: torchrun would pick a free one
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    children = {fork(run_rank, rank, world_size, args.master_addr or "127.0.0.1", str(port), args): rank
                for rank in range(world_size)}
    failure, kill_at = None, None
    while children:
        pid, wait_status = os.waitpid(-1, os.WNOHANG if kill_at else 0)
        if pid == 0:  # after a failure, the others still running
            if time.monotonic() > kill_at:
                for other in children:
                    os.kill(other, signal.SIGKILL)
                kill_at = None
            time.sleep(0.05)
            continue
        rank, code = children.pop(pid), os.waitstatus_to_exitcode(wait_status)
        if code != 0 and failure is None:
            failure = f"process {rank} exited with status {code}" if code > 0 else \
                f"process {rank} was killed by {signal.Signals(-code).name}"
            for other in children:
                os.kill(other, signal.SIGTERM)
            kill_at = time.monotonic() + PEER_GRACE_S
    if failure:
        sys.exit(f"forked_launch.py: {failure}")


def fork(child: Callable[..., None], *args: object) -> int:
    """os.fork, `child(*args)` in the child (which exits from there, never returning to the caller's code). No thread
    but this one may run here: a thread's locks would be held for good in the child."""
    assert threading.active_count() == 1, threading.enumerate()
    # What is here (the imports) is moved out of the collector's sight: the child's collections, the last one at its
    # exit above all, no longer walk it (measured: a child's exit 1.45 s -> 0.38 s) nor copy its pages
    gc.freeze()
    sys.stdout.flush()  # nothing buffered here may be written again by the child
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        child(*args)
        sys.exit(0)
    return pid


def run_rank(rank: int, world_size: int, master_addr: str, master_port: str, args: argparse.Namespace) -> None:
    """In a forked child: torchrun's worker environment for `rank` on one machine (its agent's store aside: rank 0
    hosts the store), then the script as under torchrun's `python -u`."""
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
        GROUP_RANK="0", GROUP_WORLD_SIZE="1", ROLE_NAME="default", ROLE_RANK=str(rank), ROLE_WORLD_SIZE=str(world_size),
        MASTER_ADDR=master_addr, MASTER_PORT=master_port, TORCHELASTIC_RUN_ID=str(args.rdzv_id),
        TORCHELASTIC_RESTART_COUNT="0", TORCHELASTIC_MAX_RESTARTS="0",
        TORCHELASTIC_SIGNALS_TO_HANDLE=args.signals_to_handle,
    )
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    run_as_main(args.training_script, args.training_script_args)


def run_as_main(script: str, script_args: list[str]) -> None:
    """In a forked child: the script as `python -u SCRIPT ARGS` runs it (unbuffered output), then exit."""
    for name, fd in (("stdout", 1), ("stderr", 2)):
        stream = getattr(sys, name)
        setattr(sys, name, io.TextIOWrapper(open(fd, "wb", buffering=0, closefd=False), encoding=stream.encoding,
                                            errors=stream.errors, write_through=True))
    script = os.path.abspath(script)
    sys.argv = [script, *script_args]
    sys.path[0] = os.path.dirname(script)  # as for `python SCRIPT`
    runpy.run_path(script, run_name="__main__")
    sys.exit(0)


def launch(argv: list[str]) -> None:
    torch.distributed.run.run = run_forked  # Accelerate (1.3 and later) calls it through the module
    launch_command(launch_command_parser().parse_args(argv))


def run_request(connection: socket.socket, fds: list[int], request: dict) -> None:
    """In a forked child of the server: the requester's output files, folder, environment and arguments, then the
    launch, or for a plain request (argv: SCRIPT ARGS) the script as `python -u` runs it in this process. Its
    processes form a group of their own, for the requester to signal or to stop on a timeout."""
    connection.close()
    os.setpgid(0, 0)
    for fd, target in zip(fds, (1, 2), strict=True):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    if request["plain"]:
        run_as_main(request["argv"][0], request["argv"][1:])
    sys.argv = [sys.argv[0], *request["argv"]]
    launch(request["argv"])


def serve(connection: socket.socket) -> None:
    """A launch server: each request on `connection` (a JSON message {"argv", "env", "cwd", "plain"} with the stdout
    and stderr file descriptors attached) is a launch (or a plain script run) by a child forked from this process,
    which has imported everything already; its pid is sent back, then its exit status. One launch at a time; returns
    when the other end closes. The requester sends only launches whose environment differs from this process's in
    what is read at run time (train_helpers.start_forked): what the libraries read at import is this process's."""
    while True:
        message, fds, _, _ = socket.recv_fds(connection, 1 << 20, 2)
        if not message:
            return
        request = json.loads(message)
        launcher = fork(run_request, connection, fds, request)
        with contextlib.suppress(ProcessLookupError):  # as the child does: the group exists before the pid is sent
            os.setpgid(launcher, launcher)
        for fd in fds:
            os.close(fd)
        connection.send(json.dumps({"pid": launcher}).encode())
        _, wait_status = os.waitpid(launcher, 0)
        connection.send(json.dumps({"status": os.waitstatus_to_exitcode(wait_status)}).encode())


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"]:
        serve(socket.socket(fileno=int(sys.argv[2])))
    else:
        launch(sys.argv[1:])
