"""metrics.jsonl, the loss/HellaSwag plot (loss.png) and the evaluation's lines and tracker values of a training run."""
from __future__ import annotations

import json
from pathlib import Path

from accelerate import Accelerator
from tqdm.auto import tqdm

from gpt2repro.atomic_files import atomic_write, write_text_atomic

GPT2_124M_VAL_LOSS = 3.2924
GPT2_124M_HELLASWAG = 0.2955
GPT3_124M_HELLASWAG = 0.337


def records_up_to(path: Path, step: int) -> list[dict]:
    """The records of `path` that a checkpoint of `step` has seen: train records before it, evaluations up to it."""
    records = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # the last line of a killed run may be cut short
                continue
    return [r for r in records if r["step"] < step or (r["type"] == "eval" and r["step"] == step)]


def latest_record(records: list[dict], record_type: str) -> dict | None:
    return next((r for r in reversed(records) if r["type"] == record_type), None)


class MetricsLog:
    """metrics.jsonl: one JSON object per line, {"type": "train"|"eval", "step": ..., ...}; main process only.

    A train record's step is the 0-based optimiser step it took; an eval record's step is the number of
    optimiser steps done when it ran. On resume from step s the file keeps only what the checkpoint had
    seen: train records before s and evals up to s.

    The file stays open and records reach it at each evaluation and checkpoint (and at exit), not at every step: on a
    shared filesystem each close is a flush that the other ranks would wait for at the next all-reduce. A run killed
    outright loses the train records since its last evaluation or checkpoint, which a run resumed from that
    checkpoint writes again.
    """

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        self.records = [] if resume_step is None else records_up_to(path, resume_step)
        write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in self.records))
        self.file = open(path, "a")  # for the whole run (see above)

    def append(self, record: dict) -> None:
        self.records.append(record)
        self.file.write(json.dumps(record) + "\n")

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> None:
        """At the end of the run, whatever ended it: a stop on an error keeps the records that led to it."""
        self.file.close()

    def plot(self, path: Path) -> None:
        """Train and val loss against GPT-2 124M's val loss; HellaSwag against GPT-2 and GPT-3 124M."""
        from matplotlib.figure import Figure  # a figure of its own, drawn to a file: no pyplot, no display

        train = [r for r in self.records if r["type"] == "train"]
        evals = [r for r in self.records if r["type"] == "eval"]
        hellaswag = [r for r in evals if "hellaswag_acc_norm" in r]
        fig = Figure(figsize=(14, 5))
        # fixed margins: tight_layout measured every label each time, twice the drawing's own cost
        fig.subplots_adjust(left=0.065, right=0.99, bottom=0.1, top=0.93, wspace=0.15)
        ax_loss, ax_hs = fig.subplots(1, 2, sharex=True)
        ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], lw=0.8, label="train loss")
        ax_loss.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="val loss")
        ax_loss.axhline(GPT2_124M_VAL_LOSS, color="r", ls="--", label=f"GPT-2 124M val loss ({GPT2_124M_VAL_LOSS})")
        ax_loss.set(xlabel="step", ylabel="loss", yscale="log", title="loss")
        ax_loss.legend()
        ax_hs.plot([r["step"] for r in hellaswag], [r["hellaswag_acc_norm"] for r in hellaswag], "o-", label="this run")
        if not hellaswag:
            ax_hs.text(0.5, 0.5, "not evaluated in this run", transform=ax_hs.transAxes, ha="center")
        ax_hs.axhline(GPT2_124M_HELLASWAG, color="r", ls="--", label=f"GPT-2 124M ({GPT2_124M_HELLASWAG})")
        ax_hs.axhline(GPT3_124M_HELLASWAG, color="g", ls="--", label=f"GPT-3 124M ({GPT3_124M_HELLASWAG})")
        ax_hs.set(xlabel="step", ylabel="acc_norm", title="HellaSwag")
        ax_hs.legend(loc="lower right")
        with atomic_write(path, "wb") as f:
            fig.savefig(f, format="png", dpi=100)


def tracker_config(settings: dict, resolved: dict) -> dict[str, int | float | str | bool]:
    """The run's settings and what the launch resolved as the flat scalars trackers take (TensorBoard's hparams
    refuse lists, nested dicts and None): lists joined, unset values left out, resolved ones prefixed."""
    flat = {**settings, **{f"resolved_{key}": value for key, value in resolved.items()}}
    return {key: ",".join(map(str, value)) if isinstance(value, list | tuple) else value
            for key, value in flat.items() if value is not None}


def log_evaluation(accelerator: Accelerator, metrics: MetricsLog | None, step: int, result: dict, plot: Path) -> None:
    """An evaluation's record in metrics.jsonl, the plot redrawn, its numbers and samples printed (main process), and
    its numbers sent to the trackers."""
    if metrics is not None:
        metrics.append({"type": "eval", "step": step, **result})
        metrics.flush()
        metrics.plot(plot)
        lines = [f"step {step}: val loss {result['val_loss']:.4f}"]
        if "hellaswag_acc_norm" in result:
            lines[0] += (f", HellaSwag acc_norm {result['hellaswag_acc_norm']:.4f} "
                         f"({result['hellaswag_count']} examples)")
        lines += [f"  sample: {text!r}" for text in result.get("samples", [])]
        tqdm.write("\n".join(lines))
    accelerator.log({f"eval/{k}": v for k, v in result.items() if k != "samples"}, step=step)


def log_train_step(accelerator: Accelerator, metrics: MetricsLog | None, progress: tqdm, step: int, *, loss: float,
                   lr: float, grad_norm: float, step_time: float, tokens_per_sec: float, mfu: float | None) -> None:
    """A train step's record in metrics.jsonl and on the progress bar (main process), and its numbers sent to the
    trackers. `mfu` is None where the device's peak FLOP/s is unknown."""
    record = {"type": "train", "step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "step_time": step_time,
              "tokens_per_sec": tokens_per_sec, **({} if mfu is None else {"mfu": mfu})}
    if metrics is not None:
        metrics.append(record)
        progress.update(1)
        progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", norm=f"{grad_norm:.3f}",
                             tok_s=f"{tokens_per_sec:,.0f}", mfu=f"{float('nan') if mfu is None else mfu:.1%}")
    accelerator.log({f"train/{k}": v for k, v in record.items() if k not in ("type", "step")}, step=step)
