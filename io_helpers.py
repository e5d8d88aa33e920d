"""What every command shares: files written so that a crash never leaves half of one, and one command-line convention
(`run_command`): a user's mistake is one `error: ...` line and status 1, Ctrl-C one line and status 130, never a
traceback.

A file is written under a temporary name beside it, flushed to disk (fsync), renamed over the real name (an atomic
step on POSIX file systems), and then its folder is fsynced, so that after a crash or power loss the path holds either
the previous file or the new one, whole. Temporary names end in `.tmp`, which no loader of ours lists.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

EXIT_ERROR = 1  # a mistake the user can fix: the message says how
EXIT_INTERRUPTED = 130  # 128 + SIGINT: the shell's status for a command stopped by Ctrl-C

# Longest addition `temporary_path` makes to a name: "." + a pid of up to 7 digits (Linux's pid_max is at most
# 2**22 = 4,194,304) + ".tmp"
TEMPORARY_NAME_EXTRA_BYTES = len(".4194304.tmp")


def temporary_path(path: Path) -> Path:
    """Where `path` is written before it is renamed into place: beside it, named by this process, so two processes
    writing the same file (ranks fetching one download) never write into each other's temporary file."""
    return path.with_name(f"{path.name}.{os.getpid()}.tmp")


def fsync_folder(folder: Path) -> None:
    """Make a rename or new entry in `folder` durable (the entry lives in the folder, not in the file)."""
    if not hasattr(os, "O_DIRECTORY"):  # Windows cannot open a folder; its renames are journalled by NTFS
        return
    descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w") -> Iterator[IO]:
    """`open(path, mode)` for writing, made atomic: the data goes to `temporary_path(path)`, which becomes `path`
    only when the block ends without an error; otherwise it is removed and `path` is as it was. A symlink at `path`
    stays a link: the file it points to is replaced."""
    path = Path(path).resolve()
    temporary = temporary_path(path)
    try:
        with open(temporary, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())  # the data on disk before the rename makes it the file
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)


@contextlib.contextmanager
def ctrl_c_held() -> Iterator[list[int]]:
    """Ctrl-C inside the block is held, not raised: a write in several steps (temporary file, rename, the folder's
    fsync) is never cut between them, and the command can say afterwards that the file is whole. The list it gives
    holds the signal once one came. Main thread only, as every signal handler."""
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield received
    finally:
        signal.signal(signal.SIGINT, previous)


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_write(path) as f:
        f.write(text)


def write_json_atomic(path: str | Path, data) -> None:
    write_text_atomic(path, json.dumps(data, indent=1) + "\n")


def fsync_tree(folder: Path) -> None:
    """fsync every file and folder under `folder` (and itself): a folder written in place, e.g. by a library's
    `save_*`, made durable before it is renamed into its final name."""
    for root, _, files in os.walk(folder):
        for name in files:
            descriptor = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
        fsync_folder(Path(root))


def first_line(error: BaseException) -> str:
    """An exception's message cut to its first line (libraries' messages run on over many), or its type's name when
    it has none."""
    return (str(error).strip() or type(error).__name__).splitlines()[0]


# ---- the command-line convention -------------------------------------------------------------------------------------


class CommandError(Exception):
    """A problem the user can fix: the command stops with one line, `error: <message>`, and status 1."""


class CommandStopped(Exception):
    """The command stopped on request (Ctrl-C, a preemption signal) after saving what it could: its message (a line
    that says where to continue) is printed once, by rank 0, and the process exits with `exit_code`."""

    exit_code = EXIT_INTERRUPTED


def is_rank0() -> bool:
    """Whether this process is the first of a launch (torchrun and accelerate launch set RANK) or not launched."""
    return os.environ.get("RANK", "0") == "0"


def print_line(text: str) -> None:
    """`text` and its newline to stderr in one write: `print` writes them apart, and with an unbuffered stderr
    (PYTHONUNBUFFERED) two processes sharing a pipe can splice their lines into one."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def run_command(body: Callable[[], None], on_ctrl_c: str | Callable[[], str],
                errors: tuple[type[Exception], ...] = (), errors_on_every_rank: bool = False) -> None:
    """Run a command's `body` with the exit statuses every command of this project documents: 0 when it returns;
    1 after one `error: <message>` line for a CommandError (or one of `errors`); 130 after one `error: interrupted;
    <on_ctrl_c>` line on Ctrl-C; a CommandStopped's own status after its line. `errors_on_every_rank`: each process
    prints its own error (a check a single rank can fail), else rank 0 prints for all."""
    try:
        body()
    except (CommandError, *errors) as error:
        if errors_on_every_rank or is_rank0():
            print_line(f"error: {error}")
        sys.exit(EXIT_ERROR)
    except KeyboardInterrupt:
        if is_rank0():  # one line for the whole job, not a traceback from each process
            print_line(f"error: interrupted; {on_ctrl_c if isinstance(on_ctrl_c, str) else on_ctrl_c()}")
        sys.exit(EXIT_INTERRUPTED)
    except CommandStopped as stop:
        if is_rank0():
            print_line(str(stop))
        sys.exit(stop.exit_code)


def check_writable_folder(folder: Path, flag: str) -> None:
    """A CommandError naming `flag` unless files can be written in `folder` (made with its parents when missing)."""
    if folder.exists() and not folder.is_dir():
        raise CommandError(f"{flag} {folder} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()  # the sure test: root passes every os.access check
    except OSError as error:
        raise CommandError(f"{flag} {folder} is not writable ({error.strerror or first_line(error)})") from None
