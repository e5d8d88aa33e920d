"""Tokenising a corpus on worker processes: every document becomes `[50256] + encode_ordinary(text)` (<|endoftext|>
first, as build-nanogpt), worker tasks encoded in document order. The workers also read the .txt files and parse the
JSON lines (a task's `read`, gpt2repro/corpus.py), so the main process does little more than write shards; Ctrl-C
reaches the main process alone, which stops between two tasks.
"""
from __future__ import annotations

import multiprocessing
import os
import signal
from collections import deque
from collections.abc import Iterable, Iterator

import numpy as np

from gpt2repro.corpus import Task
from gpt2repro.shards import to_token_array
from gpt2repro.tokenizer import EOT_TOKEN_ID, get_tiktoken_encoding

TASKS_IN_FLIGHT_PER_PROC = 2  # bounded read-ahead: a streamed corpus is never pulled into memory whole


def available_cores() -> int:
    """CPU cores this process may run on (os.sched_getaffinity is Linux-only)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def ordinary_tokens(text: str) -> np.ndarray:
    """tiktoken's `encode_ordinary(text)` as a uint32 array, made without a Python int per token."""
    encoding = get_tiktoken_encoding()
    try:  # with no special token allowed, `encode` is `encode_ordinary` (one regex pass over the whole text)
        return encoding.encode_to_numpy(text, disallowed_special=())
    except UnicodeEncodeError:  # lone surrogates, which encode_ordinary replaces first
        return np.array(encoding.encode_ordinary(text), dtype=np.uint32)


def encode_task(task: Task) -> tuple[np.ndarray, np.ndarray, int]:
    """One worker task: (uint16 tokens of all documents, EOT first in each; tokens per document; UTF-8 bytes)."""
    texts = task.read(task.items)
    pieces, lengths = [], np.empty(len(texts), dtype=np.int64)
    eot = np.array([EOT_TOKEN_ID], dtype=np.uint32)
    for i, text in enumerate(texts):
        ids = ordinary_tokens(text)
        pieces += [eot, ids]
        lengths[i] = len(ids) + 1  # +1: the EOT
    num_bytes = sum(len(text.encode("utf-8")) for text in texts)
    # uint16 halves what goes back through the pipe; the check turns an impossible id into an error, not a wrap
    return to_token_array(np.concatenate(pieces)), lengths, num_bytes


def tokenize(tasks: Iterable[Task], num_proc: int) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """`encode_task` of each task, in order, on `num_proc` processes with a bounded read-ahead.

    (multiprocessing's `imap` would pull the whole input iterator into its task queue: a streamed
    corpus would end up in memory.)
    """
    if num_proc == 1:
        yield from map(encode_task, tasks)
        return
    get_tiktoken_encoding()  # built once here, so forked workers inherit it instead of each building it (~1 s)
    pool = multiprocessing.Pool(num_proc, initializer=start_worker)
    pending = deque()
    try:
        for task in tasks:
            pending.append(pool.apply_async(encode_task, (task,)))
            if len(pending) >= TASKS_IN_FLIGHT_PER_PROC * num_proc:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
    finally:
        # The pool's orderly exit also after an error or Ctrl-C: the tasks in flight finish (a fraction of a second),
        # then the workers leave. `terminate` stops workers wherever they are, possibly holding one of the pool's pipe
        # locks, and then can wait for that lock forever.
        for result in pending:
            result.wait()
        pool.close()
        pool.join()


def start_worker() -> None:
    """A tokenising worker ignores Ctrl-C, which a terminal sends to every process of the group: the main process
    alone acts on it (`StopBetweenTasks`), with one line rather than a traceback from each worker."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    get_tiktoken_encoding()


class StopBetweenTasks:
    """Ctrl-C while tokenising: the first one stops the run at the next `check`, between two tasks, where the main
    process holds none of the pool's locks (a KeyboardInterrupt raised inside the pool's machinery could leave its
    exit waiting forever); a second one stops at once."""

    def __enter__(self) -> "StopBetweenTasks":
        self.requested = False
        self.previous_handler = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, *exc_info) -> None:
        signal.signal(signal.SIGINT, self.previous_handler)

    def _on_sigint(self, signum: int, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def check(self) -> None:
        if self.requested:
            raise KeyboardInterrupt
