"""`accelerate launch` for the tests whose subject is what the processes compute, not how they were started.

    python tests/forked_launch.py [accelerate launch options] SCRIPT [SCRIPT ARGS]
    python tests/forked_launch.py --serve FD      (a launch server: see `serve`; train_helpers.run_launch starts it)

Accelerate's own launch command runs as usual (its flags, its configuration, the environment it gives each process)
up to where it hands over to torchrun. There, instead of torchrun's agent starting a fresh interpreter per process,
each importing torch, transformers and the project anew (~3 s of CPU each; a 2-process launch costs ~11 s of CPU in
all, measured on 2 cores), the processes are forked from this one, which has imported them already (~7 s in all). Each
gets the environment torchrun gives a worker on one machine, and unbuffered output, as torchrun's `python -u`. What
torchrun's agent itself does (its store, forwarding signals, restarts, its run id) is left out: the tests of signals,
failures and the README's launch lines run `accelerate launch` itself.
"""
from __future__ import annotations

import argparse
import json
import os
import runpy
import signal
import socket
import sys

# imported once, here, before the processes are forked (the point of this launcher), with what rank 0 imports when it
# first scores HellaSwag (evaluate) and draws loss.png (matplotlib)
import evaluate  # noqa: F401
import matplotlib.figure  # noqa: F401
import torch.distributed.run
from accelerate.commands.launch import launch_command, launch_command_parser

import train_accelerate  # noqa: F401


def run_forked(args: argparse.Namespace) -> None:
    """torch.distributed.run.run's place: `args.nproc_per_node` processes forked from this one, each running the script
    as `python SCRIPT ARGS` would. The first that fails stops the others (as torchrun's agent does) and gives this
    launcher's exit status."""
    if str(args.nnodes) not in ("1", "1:1"):
        sys.exit("error: forked_launch.py runs one machine's processes only")
    world_size = int(args.nproc_per_node)
    port = args.master_port
    if getattr(args, "standalone", False):  # Accelerate found its port taken: torchrun would pick a free one
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    sys.stdout.flush()  # nothing buffered here may be written again by each child
    sys.stderr.flush()
    children = {}
    for rank in range(world_size):
        pid = os.fork()
        if pid == 0:
            run_rank(rank, world_size, args.master_addr or "127.0.0.1", str(port), args)  # never returns
        children[pid] = rank
    status = 0
    while children:
        pid, wait_status = os.wait()
        del children[pid]
        code = os.waitstatus_to_exitcode(wait_status)
        if code != 0 and status == 0:
            status = code if code > 0 else 128 - code  # killed by signal N: 128 + N, as a shell reports it
            for other in children:
                os.kill(other, signal.SIGTERM)
    if status:
        print(f"forked_launch.py: a process exited with status {status}", file=sys.stderr)
        sys.exit(status)


def run_rank(rank: int, world_size: int, master_addr: str, master_port: str, args: argparse.Namespace) -> None:
    """In a forked child: torchrun's worker environment for `rank` on one machine, then the script; the interpreter
    exits from here as at the end of `python SCRIPT`."""
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
        GROUP_RANK="0", GROUP_WORLD_SIZE="1", ROLE_NAME="default", ROLE_RANK=str(rank), ROLE_WORLD_SIZE=str(world_size),
        MASTER_ADDR=master_addr, MASTER_PORT=master_port, TORCH_NCCL_ASYNC_ERROR_HANDLING="1",
    )
    sys.stdout.reconfigure(write_through=True)  # as `python -u`, which torchrun runs each worker with
    sys.stderr.reconfigure(write_through=True)
    script = os.path.abspath(args.training_script)
    sys.argv = [script, *args.training_script_args]
    sys.path[0] = os.path.dirname(script)  # as for `python SCRIPT`
    runpy.run_path(script, run_name="__main__")
    sys.exit(0)


def launch(argv: list[str]) -> None:
    torch.distributed.run.run = run_forked  # Accelerate (1.3 and later) calls it through the module
    launch_command(launch_command_parser().parse_args(argv))


def serve(connection: socket.socket) -> None:
    """A launch server: each request on `connection` (a JSON message {"argv", "env", "cwd"} with the stdout and
    stderr file descriptors attached) is a launch run by a child forked from this process, which has imported
    everything already; its pid is sent back, then its exit status. One launch at a time; returns when the other end
    closes. The requester sends only launches whose environment differs from this process's in what is read at run
    time (train_helpers.run_launch): what the libraries read at import is this process's."""
    while True:
        message, fds, _, _ = socket.recv_fds(connection, 1 << 20, 2)
        if not message:
            return
        request = json.loads(message)
        launcher = os.fork()
        if launcher == 0:
            connection.close()
            os.setpgid(0, 0)  # the launch and its processes: one group, for the requester to stop on a timeout
            for fd, target in zip(fds, (1, 2), strict=True):
                os.dup2(fd, target)
                os.close(fd)
            os.chdir(request["cwd"])
            os.environ.clear()
            os.environ.update(request["env"])
            sys.argv = [sys.argv[0], *request["argv"]]
            launch(request["argv"])
            sys.exit(0)  # the interpreter exits here (or where the launch raised SystemExit), never in the loop
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
