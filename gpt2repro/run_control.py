"""How the processes of a training run stop together: a user's error, a preemption signal or Ctrl-C, and the decisions
and checks every rank must agree on. A rank that stopped alone would leave the others waiting in their next collective
until the process-group timeout (30 minutes by default), so every outcome here is shared before anyone acts on it.
"""
from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from gpt2repro.cli import EXIT_INTERRUPTED, CommandError, CommandStopped, first_line

T = TypeVar("T")


class TrainingError(CommandError):
    """A problem the user can fix: the run stops with one `error:` line and status 1."""


def parse_signals(text: str) -> list[signal.Signals]:
    """'SIGTERM,SIGUSR1' (or 'TERM,USR1') -> the signals; 'none' -> []."""
    if text.strip().lower() == "none":
        return []
    found = []
    for name in (part.strip().upper() for part in text.split(",") if part.strip()):
        try:
            found.append(signal.Signals[name if name.startswith("SIG") else "SIG" + name])
        except KeyError:
            raise ValueError(f"unknown signal {name!r}; name signals like SIGTERM,SIGUSR1, or 'none'") from None
        if found[-1] in (signal.SIGKILL, signal.SIGSTOP):
            raise ValueError(f"{found[-1].name} cannot be caught, so nothing can be saved on it")
        if found[-1] == signal.SIGINT:
            raise ValueError(f"SIGINT is Ctrl-C, which always saves and stops the run (exit {EXIT_INTERRUPTED})")
    return found


def unforwarded_signals(signals: list[signal.Signals]) -> list[signal.Signals]:
    """Of `signals`, those that never reach this process because the torchrun launcher that started it (accelerate
    launch runs one) forwards only TORCHELASTIC_SIGNALS_TO_HANDLE's (its default: SIGTERM, SIGINT, SIGHUP, SIGQUIT)
    and dies of the others. None outside torchrun."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return []
    return [s for s in signals if s.name not in {name.strip() for name in torchrun_forwarded().split(",")}]


def torchrun_forwarded() -> str:
    """The signals a torchrun launcher forwards to its workers (it sets this variable for them)."""
    return os.environ.get("TORCHELASTIC_SIGNALS_TO_HANDLE", "SIGTERM,SIGINT,SIGHUP,SIGQUIT")


EXIT_PREEMPTED = 75  # sysexits.h's EX_TEMPFAIL, a temporary failure: the same command with --resume_from_checkpoint
# latest continues


class TrainingPreempted(CommandStopped):
    """A preemption signal reached the run; `checkpoint` holds the state at `step`."""

    exit_code = EXIT_PREEMPTED

    def __init__(self, step: int, checkpoint: Path, signal_name: str | None):
        super().__init__(f"preempted{f' by {signal_name}' if signal_name else ''} at step {step}: checkpoint "
                         f"{checkpoint} written; continue with the same command and --resume_from_checkpoint latest")
        self.step, self.checkpoint = step, checkpoint


class TrainingInterrupted(CommandStopped):
    """Ctrl-C at optimiser step `step`; the message says where the run continues from: its newest checkpoint `latest`
    (None: there is none)."""

    exit_code = EXIT_INTERRUPTED

    def __init__(self, step: int, latest: Path | None):
        super().__init__(f"error: interrupted at step {step}; {where_to_continue(latest)}")  # as every Ctrl-C line
        self.step = step


def where_to_continue(latest: Path | None) -> str:
    """The end of an interrupted run's line: how to continue it, from its newest checkpoint `latest` (None: none)."""
    return (f"continue with the same command and --resume_from_checkpoint latest "
            f"(from {latest or 'the start: no checkpoint yet'})")


class StopSignals:
    """Preemption signals and Ctrl-C, recorded by their handlers and acted on by every rank at the same step boundary.

    A handler only sets a flag: an exception raised wherever the main thread happens to be (inside a checkpoint write,
    a lock shared with a thread, a collective) may not unwind promptly or at all. The ranks learn whether any of them
    got a signal by summing `flags()` in the step's one collective (train_step), or with `requested()` where no step
    ran. A second Ctrl-C stops at once, with a KeyboardInterrupt.
    """

    def __init__(self, preemption_signals: list[signal.Signals]):
        self.received: str | None = None  # the first preemption signal's name
        self.interrupted = False
        self.previous = {sig: signal.signal(sig, self._record) for sig in {*preemption_signals, signal.SIGINT}}

    def close(self) -> None:
        """Give the signals back their handlers of before (train() may run inside a longer-lived process)."""
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def _record(self, signum: int, frame) -> None:
        if signum != signal.SIGINT:
            self.received = self.received or signal.Signals(signum).name
        elif self.interrupted:
            raise KeyboardInterrupt  # the second Ctrl-C: the user does not want to wait for the step boundary
        else:
            self.interrupted = True

    def flags(self) -> list[float]:
        """This process's [preemption signal received, Ctrl-C received], to be summed over processes."""
        return [float(self.received is not None), float(self.interrupted)]

    def requested(self, accelerator: Accelerator) -> tuple[float, float]:
        """The flags summed over processes, in a collective of their own (a step boundary without a train step)."""
        if accelerator.num_processes == 1:
            return tuple(self.flags())
        flags = accelerator.reduce(torch.tensor(self.flags(), device=accelerator.device), reduction="sum")
        return tuple(flags.tolist())

    def stop(self, summed_flags, step: int, checkpoint: Path) -> None:
        """Raise what ends the run when any process got a signal (`summed_flags`: `flags()` summed over processes);
        `checkpoint` holds the state at `step`. A preemption wins over Ctrl-C: schedulers requeue on its status."""
        preempted, interrupted = summed_flags
        if preempted:
            raise TrainingPreempted(step, checkpoint, self.received)
        if interrupted:
            raise TrainingInterrupted(step, checkpoint)


def decided_on_rank0(accelerator: Accelerator, decide: Callable[[], T]) -> T:
    """`decide()` run on rank 0 alone, its result (or its CommandError, as a TrainingError) given to every rank: a
    decision each rank made for itself could differ (files seen differently, a network on one node only), and ranks
    that went different ways would wait for each other in a collective until the process-group timeout."""
    outcome: list = [None]
    if accelerator.is_main_process:
        try:
            outcome[0] = ("value", decide())
        except CommandError as error:
            outcome[0] = ("error", str(error))
        except BaseException as error:  # a bug: the other ranks stop with a pointer, rank 0 with the traceback
            outcome[0] = ("crash", f"rank 0 failed with {type(error).__name__}: {first_line(error)}")
            if accelerator.num_processes > 1:
                broadcast_object_list(outcome, from_process=0)
            raise
    if accelerator.num_processes > 1:
        broadcast_object_list(outcome, from_process=0)
    kind, value = outcome[0]
    if kind != "value":
        raise TrainingError(value)
    return value


def checked_on_every_rank(accelerator: Accelerator, check: Callable[[], T]) -> T:
    """`check()` run on every rank (this node's view of the data or the output folder); when it fails on any rank, every
    rank raises the same TrainingError naming the first rank it failed on (a Ctrl-C on any: KeyboardInterrupt on all).
    A rank that stopped alone would leave the others waiting in the next collective until the process-group timeout
    (30 minutes by default) on another node."""
    outcome = crash = None  # (kind, message) when the check failed here
    try:
        value = check()
    except CommandError as error:
        outcome = ("error", str(error))
    except KeyboardInterrupt as error:
        outcome, crash = ("interrupted", ""), error
    except BaseException as error:  # a bug: the other ranks stop with a pointer, this one with the traceback
        outcome, crash = ("error", f"failed with {type(error).__name__}: {first_line(error)}"), error
    outcomes = [outcome]
    if accelerator.num_processes > 1:
        outcomes = [None] * accelerator.num_processes
        torch.distributed.all_gather_object(outcomes, outcome)
    if crash is not None:
        raise crash
    if any(o is not None and o[0] == "interrupted" for o in outcomes):
        raise KeyboardInterrupt
    for rank, found in enumerate(outcomes):
        if found is not None:
            raise TrainingError(found[1] if len(outcomes) == 1 else f"rank {rank}: {found[1]}")
    return value


