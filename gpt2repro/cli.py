"""The command-line convention every command shares (`run_command`): a user's mistake is one `error: ...` line and
status 1, Ctrl-C one line and status 130, never a traceback."""
from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

EXIT_ERROR = 1  # a mistake the user can fix: the message says how
EXIT_INTERRUPTED = 130  # 128 + SIGINT: the shell's status for a command stopped by Ctrl-C


def first_line(error: BaseException) -> str:
    """An exception's message cut to its first line (libraries' messages run on over many), or its type's name when
    it has none."""
    return (str(error).strip() or type(error).__name__).splitlines()[0]


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
