"""Files written so that a crash never leaves half of one.

A file is written under a temporary name beside it, flushed to disk (fsync), renamed over the real name (an atomic
step on POSIX file systems), and then its folder is fsynced, so that after a crash or power loss the path holds either
the previous file or the new one, whole. Temporary names end in `.tmp`, which no loader of ours lists.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import IO

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
