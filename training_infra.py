"""The infrastructure of train_accelerate.py, kept apart so that the training script reads as the recipe and its loop:
checkpoints (atomic, checked on resume, rotated), the Hugging Face model folder and its card, metrics.jsonl and the
loss/HellaSwag plot, background pushes to the Hub, preemption signals, and decisions rank 0 makes for every rank.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from tqdm.auto import tqdm
from transformers.utils import logging as transformers_logging

from eval_hellaswag import HellaSwagFormatError, HellaSwagUnavailable, load_hellaswag
from io_helpers import (
    EXIT_INTERRUPTED,
    atomic_write,
    first_line,
    fsync_folder,
    fsync_tree,
    write_json_atomic,
    write_text_atomic,
)
from modeling_gpt2repro import GPT2ReproForCausalLM
from token_shards import ShardedTokenLoader, file_sha256
from tokenization_gpt2repro import EOT_TOKEN_ID

# Reference lines of the loss/HellaSwag plot (FineWeb-Edu val loss and HellaSwag acc_norm, see the README).
GPT2_124M_VAL_LOSS = 3.2924
GPT2_124M_HELLASWAG = 0.2955
GPT3_124M_HELLASWAG = 0.337
CHECKPOINT_PREFIX = "step_"
# GPT2ReproConfig's options that train_accelerate.py has a flag for, besides the shape: a resume must keep them all
ARCHITECTURE_FLAGS = ("position_embedding", "qk_norm", "mlp_activation", "norm", "tie_word_embeddings", "logit_softcap",
                      "zero_init_residual", "bias")
T = TypeVar("T")


class TrainingError(RuntimeError):
    """A problem the user can fix; main() prints the message as one line and exits with status 1."""


# ---- command line ----------------------------------------------------------------------------------------------------


def preset_as_flags(preset: dict) -> str:
    return " ".join(f"--{key} {'none' if value is None else value}" if not isinstance(value, bool)
                    else f"--{'' if value else 'no-'}{key}" for key, value in preset.items())


def float_or_none(text: str) -> float | None:
    """A flag's number, or None for 'none' (to unset a value a recipe or preset gave); argparse names this function
    in its error for anything else."""
    return None if text.strip().lower() == "none" else float(text)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except the unset ones (their help says what happens then)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


# ---- versions --------------------------------------------------------------------------------------------------------


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each block's activations in backward instead of keeping them (memory for ~1/3 more compute).
    transformers 5.24 renamed gradient_checkpointing_enable (now deprecated) to activation_checkpointing_enable."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


# ---- metrics: metrics.jsonl and the loss/HellaSwag plot --------------------------------------------------------------


class MetricsLog:
    """metrics.jsonl: one JSON object per line, {"type": "train"|"eval", "step": ..., ...}; main process only.

    A train record's step is the 0-based optimiser step it took; an eval record's step is the number of
    optimiser steps done when it ran. On resume from step s the file keeps only what the checkpoint had
    seen: train records before s and evals up to s.
    """

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        records = []
        if resume_step is not None and path.exists():
            for line in path.read_text().splitlines():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:  # the last line of a killed run may be cut short
                    continue
            records = [r for r in records
                       if r["step"] < resume_step or (r["type"] == "eval" and r["step"] == resume_step)]
        self.records = records
        write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in records))

    def append(self, record: dict) -> None:
        self.records.append(record)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def latest(self, record_type: str) -> dict | None:
        return next((r for r in reversed(self.records) if r["type"] == record_type), None)

    def plot(self, path: Path) -> None:
        """Train and val loss against GPT-2 124M's val loss; HellaSwag against GPT-2 and GPT-3 124M."""
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt

        train = [r for r in self.records if r["type"] == "train"]
        evals = [r for r in self.records if r["type"] == "eval"]
        hellaswag = [r for r in evals if "hellaswag_acc_norm" in r]
        fig, (ax_loss, ax_hs) = plt.subplots(1, 2, figsize=(14, 5), sharex=True)
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
        fig.tight_layout()
        with atomic_write(path, "wb") as f:
            fig.savefig(f, format="png", dpi=100)
        plt.close(fig)


def log_evaluation(accelerator: Accelerator, metrics: MetricsLog | None, step: int, result: dict, plot: Path) -> None:
    """An evaluation's record in metrics.jsonl, the plot redrawn, its numbers and samples printed (main process), and
    its numbers sent to the trackers."""
    if metrics is not None:
        metrics.append({"type": "eval", "step": step, **result})
        metrics.plot(plot)
        lines = [f"step {step}: val loss {result['val_loss']:.4f}"]
        if "hellaswag_acc_norm" in result:
            lines[0] += (f", HellaSwag acc_norm {result['hellaswag_acc_norm']:.4f} "
                         f"({result['hellaswag_count']} examples)")
        lines += [f"  sample: {text!r}" for text in result.get("samples", [])]
        tqdm.write("\n".join(lines))
    accelerator.log({f"eval/{k}": v for k, v in result.items() if k != "samples"}, step=step)


# ---- Hub pushes ------------------------------------------------------------------------------------------------------


class HubPusher:
    """Uploads model folders to a Hub repository in a background thread, so training never waits for it.

    The constructor checks the token and that the Hub is reachable (whoami, create_repo), so a long run
    fails before step 0 rather than at its end. Upload failures are reported, not fatal.
    """

    def __init__(self, repo_id: str):
        from huggingface_hub import HfApi

        self.api = HfApi()
        self.repo_id = repo_id
        try:
            self.api.whoami()
        except Exception as error:
            raise TrainingError(
                f"--push_to_hub needs a Hugging Face token and a reachable Hub (run `hf auth login` or set HF_TOKEN): "
                f"{first_line(error)}"
            ) from None
        try:
            self.api.create_repo(repo_id, repo_type="model", exist_ok=True)
        except Exception as error:
            raise TrainingError(f"cannot create or access the Hub repository {repo_id}: {first_line(error)}") from None
        self.executor = ThreadPoolExecutor(max_workers=1)  # uploads run in order, one at a time
        self.uploads: dict[Path, Future] = {}

    def push(self, folder: Path, commit_message: str) -> None:
        self.uploads[folder] = self.executor.submit(
            self.api.upload_folder, repo_id=self.repo_id, folder_path=str(folder), commit_message=commit_message
        )

    def cancel_queued(self) -> None:
        """Drop the uploads not started yet (one already running cannot be stopped)."""
        self.executor.shutdown(wait=False, cancel_futures=True)

    def busy(self, folder: Path) -> bool:
        """Whether `folder` is still queued or uploading."""
        future = self.uploads.get(folder)
        return future is not None and not future.done()

    def wait(self, folder: Path | None = None) -> list[str]:
        """Wait for the upload of `folder` (all uploads when None); returns one message per failed upload."""
        failures = []
        for path in [folder] if folder is not None else list(self.uploads):
            future = self.uploads.pop(path, None)
            if future is not None and future.exception() is not None:
                failures.append(f"upload of {path} to {self.repo_id} failed: {first_line(future.exception())}")
        return failures


def start_hub_pusher(accelerator: Accelerator, repo_id: str | None) -> HubPusher | None:
    """Rank 0's pusher to `repo_id` (None: no pushes; other ranks get None too), checked now rather than at the end of
    the run; a failure stops every rank alike."""
    pushers = []  # the pusher itself stays on rank 0: only the outcome is shared
    decided_on_rank0(accelerator, lambda: pushers.append(HubPusher(repo_id)) if repo_id else None)
    return pushers[0] if pushers else None


# ---- checkpoints -----------------------------------------------------------------------------------------------------


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary folders of interrupted writes are skipped)."""
    root = output_dir / "checkpoints"
    if not root.is_dir():
        return []
    # Exactly step_NNNNNN: temporary folders and the user's own copies (step_000006_backup) are not checkpoints.
    found = [p for p in root.iterdir() if p.is_dir() and re.fullmatch(rf"{CHECKPOINT_PREFIX}\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def write_model_card(folder: Path, args: argparse.Namespace, step: int, tokens_seen: int, metrics: MetricsLog) -> None:
    last_train, last_eval = metrics.latest("train"), metrics.latest("eval")
    rows = [("optimiser steps", f"{step}"), ("tokens seen", f"{tokens_seen:,}")]
    if last_train:
        rows.append(("train loss (last step)", f"{last_train['loss']:.4f}"))
    if last_eval:
        rows.append((f"val loss ({args.val_tokens:,} tokens, step {last_eval['step']})",
                     f"{last_eval['val_loss']:.4f}"))
        if "hellaswag_acc_norm" in last_eval:
            rows.append((f"HellaSwag acc_norm ({last_eval['hellaswag_count']} examples)",
                         f"{last_eval['hellaswag_acc_norm']:.4f}"))
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    repo = args.hub_model_id or "path/to/this/folder"
    adamw = f"AdamW (betas {args.beta1}, {args.beta2}, eps {args.adam_eps}, weight decay {args.weight_decay} on " \
            f"matrices)"
    optimiser = f"{adamw}, LR {args.max_lr} -> {args.min_lr}"
    if args.optimizer == "muon":
        optimiser = (f"Muon on the blocks' matrices (LR {args.muon_lr}, momentum {args.muon_momentum}), {adamw} on "
                     f"the rest (LR: embeddings {args.embed_lr}, head {args.head_lr}, biases and gains "
                     f"{args.adamw_lr})")
    architecture = "".join(f" {name}={getattr(args, name)}" for name in ARCHITECTURE_FLAGS)
    architecture = f"\nArchitecture options:{architecture}."
    card = f"""---
library_name: transformers
license: mit
tags: [gpt2, gpt2repro, causal-lm, from-scratch]
---

# gpt2repro: GPT-2 trained from scratch

A GPT-2 ({args.n_layer} layers, {args.n_head} heads, width {args.n_embd}, context {args.seq_len}) trained with
`train_accelerate.py` of gpt2repro on the token shards of `{args.data_dir}`.

| | |
|---|---|
{table}

Reference: GPT-2 124M scores val loss {GPT2_124M_VAL_LOSS} on FineWeb-Edu and HellaSwag acc_norm {GPT2_124M_HELLASWAG};
GPT-3 124M scores HellaSwag {GPT3_124M_HELLASWAG}.

Recipe ({args.recipe}): {args.total_batch_size:,} tokens per step, micro-batch {args.micro_batch_size} x {args.seq_len},
{optimiser}, warmup {args.warmup_steps} steps, {args.lr_schedule} schedule to step {args.max_steps}, grad clip
{args.grad_clip}, mixed precision {args.mixed_precision}, seed {args.seed}.{architecture}

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{repo}", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("{repo}")
```
"""
    (folder / "README.md").write_text(card)


def save_hf_folder(model: GPT2ReproForCausalLM, tokenizer, folder: Path, args: argparse.Namespace, step: int,
                   tokens_seen: int, metrics: MetricsLog) -> None:
    """A folder `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` loads: weights, config with
    auto_map, the model code, tokenizer, generation config and a model card."""
    model.generation_config.update(do_sample=True, top_k=args.top_k, max_new_tokens=args.sample_tokens,
                                   pad_token_id=EOT_TOKEN_ID)
    bar_was_enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()  # its one-file "Writing model shards" bar would break the training bar
    try:
        model.save_pretrained(folder, safe_serialization=True)
    finally:
        if bar_was_enabled:
            transformers_logging.enable_progress_bar()
    tokenizer.save_pretrained(folder)
    write_model_card(folder, args, step, tokens_seen, metrics)


def save_checkpoint(accelerator: Accelerator, model, tokenizer, train_loader: ShardedTokenLoader, step: int,
                    args: argparse.Namespace, metrics: MetricsLog | None, pusher: HubPusher | None,
                    evaluated: bool = True) -> Path:
    """Write checkpoints/step_NNNNNN/ = training_state/ (Accelerate's state: weights, optimiser, RNG of every rank),
    loader_rank{r}.json, trainer_state.json and hf/ (the model folder). Everything goes to a temporary folder
    first and is renamed into place, then older checkpoints beyond --keep_checkpoints are removed.
    `evaluated`: whether step's evaluation (if one is due) is done; a run resumed from here does it otherwise."""
    root = Path(args.output_dir) / "checkpoints"
    final = root / f"{CHECKPOINT_PREFIX}{step:06d}"
    temporary = root / f"tmp_{final.name}"
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)  # left over by a killed run
        temporary.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary / "training_state"))
    write_json_atomic(temporary / f"loader_rank{accelerator.process_index}.json", train_loader.state_dict())
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        tokens_seen = step * args.total_batch_size
        write_json_atomic(temporary / "trainer_state.json",
                          {"step": step, "tokens_seen": tokens_seen, "world_size": accelerator.num_processes,
                           "evaluated": evaluated, "args": vars(args), "files": describe_checkpoint_files(temporary)})
        unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
        save_hf_folder(unwrapped, tokenizer, temporary / "hf", args, step, tokens_seen, metrics)
        fsync_tree(temporary)  # all of it on disk before the rename says it is whole (~1 s per GB)
        if final.exists():  # written before by a run this one resumed from an earlier checkpoint of
            shutil.rmtree(final)
        os.replace(temporary, final)
        fsync_folder(root)
        prune_checkpoints(Path(args.output_dir), args.keep_checkpoints, pusher)
        if pusher is not None:
            pusher.push(final / "hf", f"step {step}: {tokens_seen:,} tokens")
    accelerator.wait_for_everyone()
    return final


# Files up to this size (RNG states, loader positions) are checksummed in trainer_state.json; larger ones (weights,
# optimiser state) only have their size recorded, which catches truncation without hashing gigabytes at every save.
CHECKSUMMED_FILE_BYTES = 1 << 20


def describe_checkpoint_files(folder: Path) -> dict[str, dict]:
    """{relative path: {"bytes", "sha256" for small files}} of what a resume reads: training_state/ and the loaders."""
    described = {}
    for path in sorted([*folder.glob("training_state/**/*"), *folder.glob("loader_rank*.json")]):
        if path.is_file():
            size = path.stat().st_size
            described[str(path.relative_to(folder))] = (
                {"bytes": size, "sha256": file_sha256(path)} if size <= CHECKSUMMED_FILE_BYTES else {"bytes": size})
    return described


def checkpoint_problem(folder: Path) -> str | None:
    """Why `folder` cannot be resumed from, in words naming the file; None when it is whole."""
    state_file = folder / "trainer_state.json"
    try:
        state = json.loads(state_file.read_text())
        int(state["step"])
    except FileNotFoundError:
        return "it has no trainer_state.json (not a checkpoint folder)"
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"{state_file} is unreadable ({first_line(error)})"
    for name, recorded in state.get("files", {}).items():  # checkpoints written before the file list: unchecked
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != recorded["bytes"]:
            return f"{path} is {path.stat().st_size} bytes but was {recorded['bytes']} when written (truncated?)"
        if "sha256" in recorded and file_sha256(path) != recorded["sha256"]:
            return f"{path} changed since it was written (its sha256 differs)"
    return None


def prune_checkpoints(output_dir: Path, keep: int, pusher: HubPusher | None) -> None:
    """Remove all but the newest `keep` checkpoints, except those still uploading: they go at a later checkpoint or
    at the end. Rank 0 must never wait for the network here, while the other ranks wait for it in a barrier (an
    upload slower than the process-group timeout would abort the job)."""
    for old in list_checkpoints(output_dir)[:-keep]:
        if pusher is not None:
            if pusher.busy(old / "hf"):
                continue
            for failure in pusher.wait(old / "hf"):  # done: only collects its outcome
                tqdm.write(f"warning: {failure}")
        shutil.rmtree(old)


def in_run(checkpoint: Path, output_dir: Path) -> bool:
    """Whether `checkpoint` is one of the run in `output_dir` (rather than another run's, resumed from)."""
    return checkpoint.resolve().parent == (output_dir / "checkpoints").resolve()


def find_resume_checkpoint(args: argparse.Namespace, notify: bool) -> Path | None:
    """The checkpoint to resume from: the named one, or with `latest` the newest whole one in --output_dir (None:
    a fresh start). A damaged checkpoint is one error line naming its bad file; `latest` falls back past it."""
    if args.resume_from_checkpoint is None:
        return None
    if args.resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(Path(args.output_dir))
        for checkpoint in reversed(checkpoints):
            problem = checkpoint_problem(checkpoint)
            if problem is None:
                return checkpoint
            if notify:
                tqdm.write(f"notice: skipping checkpoint {checkpoint}: {problem}")
        if checkpoints:
            raise TrainingError(f"no checkpoint in {Path(args.output_dir) / 'checkpoints'} can be resumed from (see "
                                f"the notices above); move them away to start afresh")
        return None
    path = Path(args.resume_from_checkpoint)
    problem = checkpoint_problem(path)
    if problem is not None:
        raise TrainingError(f"cannot resume from --resume_from_checkpoint {path}: {problem}")
    return path


def choose_resume_checkpoint(args: argparse.Namespace, output_dir: Path) -> Path | None:
    """Rank 0's choice of where to start (see find_resume_checkpoint and check_resume). Checkpoints of this run newer
    than the one resumed from (damaged, or a line of training the user went back from) are renamed out of the way:
    rotation would otherwise keep them and delete the new ones, and a later `latest` would pick them."""
    resume_from = find_resume_checkpoint(args, notify=True)
    check_resume(args, resume_from, output_dir)
    if resume_from is not None and in_run(resume_from, output_dir):
        for newer in list_checkpoints(output_dir):
            if int(newer.name[len(CHECKPOINT_PREFIX):]) > int(resume_from.name[len(CHECKPOINT_PREFIX):]):
                set_aside = newer.with_name(f"abandoned_{newer.name}_{time.strftime('%Y%m%d-%H%M%S')}")
                os.replace(newer, set_aside)
                tqdm.write(f"notice: {newer} is newer than {resume_from}; moved to {set_aside}")
    return resume_from


def check_resume(args: argparse.Namespace, resume_from: Path | None, output_dir: Path) -> None:
    """Refuse what would overwrite another run or silently do nothing."""
    checkpoints = list_checkpoints(output_dir)
    if resume_from is None:
        if checkpoints:
            raise TrainingError(f"{output_dir} already holds checkpoints: continue with --resume_from_checkpoint "
                                f"latest or choose another --output_dir")
        return
    if not in_run(resume_from, output_dir) and (checkpoints or (output_dir / "metrics.jsonl").exists()):
        raise TrainingError(f"--output_dir {output_dir} holds another run's checkpoints or metrics, which resuming "
                            f"{resume_from} there would overwrite: resume into an empty --output_dir")
    state = json.loads((resume_from / "trainer_state.json").read_text())
    saved = state.get("args", {})
    shape = ("n_layer", "n_head", "n_embd", "seq_len", *ARCHITECTURE_FLAGS)
    changed = [f"--{k} {getattr(args, k)} (checkpoint: {saved[k]})"
               for k in shape if k in saved and saved[k] != getattr(args, k)]
    if changed:
        raise TrainingError(f"cannot resume from {resume_from}: the model differs: {', '.join(changed)}; "
                            f"pass the checkpoint's values")
    if state["step"] > args.max_steps:
        raise TrainingError(f"{resume_from} is at step {state['step']}, beyond --max_steps {args.max_steps}: raise "
                            f"--max_steps to train on")


def check_finite(step: int, loss: float, grad_norm: float, output_dir: Path) -> None:
    """Stop the run at a loss or gradient norm that is NaN or infinite (train_step has not updated the weights)."""
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        last_good = list_checkpoints(output_dir)
        raise TrainingError(f"step {step}: loss {loss} / grad norm {grad_norm} is not finite; stopped without updating "
                            f"the weights. Last good checkpoint: {last_good[-1] if last_good else 'none yet'} (try a "
                            f"lower --max_lr)")


def load_checkpoint(accelerator: Accelerator, checkpoint: Path, train_loader: ShardedTokenLoader,
                    max_steps: int) -> tuple[int, bool]:
    """Restore the weights, optimiser, RNG states and this rank's data position from `checkpoint`; returns (its step,
    whether that step's evaluation was done). A damaged file is one TrainingError naming it."""
    trainer_state = json.loads((checkpoint / "trainer_state.json").read_text())
    notify = accelerator.is_main_process
    if trainer_state["world_size"] != accelerator.num_processes and notify:
        tqdm.write(f"notice: {checkpoint} was written by {trainer_state['world_size']} processes and this launch "
                   f"has {accelerator.num_processes}: the run continues from the same weights, optimiser state and "
                   f"data position, but is no longer bitwise the run it would have been")
    try:
        accelerator.load_state(str(checkpoint / "training_state"))
    except Exception as error:  # whatever torch, safetensors or pickle raise on a damaged file
        raise TrainingError(f"cannot load {checkpoint / 'training_state'}: {first_line(error)}") from None
    loader_file = checkpoint / f"loader_rank{accelerator.process_index}.json"
    if not loader_file.exists():  # a rank the checkpoint did not have: every rank saved the same window index
        loader_file = checkpoint / "loader_rank0.json"
    try:
        train_loader.load_state_dict(json.loads(loader_file.read_text()))
    except ValueError as error:  # another data folder, sequence length, shuffle or seed
        raise TrainingError(f"cannot resume from {checkpoint}: {error}") from None
    if trainer_state["step"] == max_steps and notify:
        tqdm.write(f"notice: {checkpoint} is already at --max_steps {max_steps}: nothing to train (raise --max_steps "
                   f"to train on)")
    return trainer_state["step"], trainer_state.get("evaluated", True)


# ---- preemption and Ctrl-C -------------------------------------------------------------------------------------------


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


EXIT_PREEMPTED = 75  # sysexits.h's EX_TEMPFAIL, a temporary failure: the same command with --resume_from_checkpoint
# latest continues


class TrainingPreempted(Exception):
    """A preemption signal reached the run; `checkpoint` holds the state at `step`."""

    exit_code = EXIT_PREEMPTED

    def __init__(self, step: int, checkpoint: Path, signal_name: str | None):
        super().__init__(f"preempted{f' by {signal_name}' if signal_name else ''} at step {step}: checkpoint "
                         f"{checkpoint} written; continue with the same command and --resume_from_checkpoint latest")
        self.step, self.checkpoint = step, checkpoint


class TrainingInterrupted(Exception):
    """Ctrl-C, at optimiser step `step` (None: before training); the message says where the run continues from."""

    exit_code = EXIT_INTERRUPTED

    def __init__(self, step: int | None, output_dir: Path):
        checkpoints = list_checkpoints(output_dir)
        super().__init__(f"interrupted{f' at step {step}' if step is not None else ' before training'}; continue with "
                         f"the same command and --resume_from_checkpoint latest "
                         f"(from {checkpoints[-1] if checkpoints else 'the start: no checkpoint yet'})")
        self.step = step


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

    def stop(self, summed_flags, step: int, checkpoint: Path, output_dir: Path) -> None:
        """Raise what ends the run when any process got a signal (`summed_flags`: `flags()` summed over processes);
        `checkpoint` holds the state at `step`. A preemption wins over Ctrl-C: schedulers requeue on its status."""
        preempted, interrupted = summed_flags
        if preempted:
            raise TrainingPreempted(step, checkpoint, self.received)
        if interrupted:
            raise TrainingInterrupted(step, output_dir)


# ---- decided once for every rank -------------------------------------------------------------------------------------


def load_hellaswag_examples(args: argparse.Namespace, notify: bool) -> list[dict] | None:
    """HellaSwag's validation examples, or None (with one notice) when no data was named and none is found."""
    if not args.hellaswag:
        return None
    try:
        return load_hellaswag(args.hellaswag_file)
    except HellaSwagFormatError as error:
        raise TrainingError(f"--hellaswag_file: {error}") from None
    except HellaSwagUnavailable as error:
        if args.hellaswag_file:  # asked for by name: a typo must not cost a long run its HellaSwag curve
            raise TrainingError(str(error)) from None
        if notify:  # the loader's own hint names eval_hellaswag's flag, so training says it in its own words
            tqdm.write("notice: HellaSwag is skipped: its data is neither cached nor downloadable from here; pass "
                       "--hellaswag_file with a local HellaSwag val jsonl or parquet file (--no-hellaswag silences "
                       "this)")
        return None


def decided_on_rank0(accelerator: Accelerator, decide: Callable[[], T]) -> T:
    """`decide()` run on rank 0 alone, its result (or TrainingError) given to every rank: a decision each rank made
    for itself could differ (files seen differently, a network on one node only), and ranks that went different
    ways would wait for each other in a collective until the process-group timeout."""
    outcome: list = [None]
    if accelerator.is_main_process:
        try:
            outcome[0] = ("value", decide())
        except TrainingError as error:
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
    except TrainingError as error:
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


def check_output_dir(output_dir: Path) -> None:
    """--output_dir must be a folder this process can write, checked before anything is computed."""
    if output_dir.exists() and not output_dir.is_dir():
        raise TrainingError(f"--output_dir {output_dir} is a file, not a folder")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=output_dir).close()
    except OSError as error:
        raise TrainingError(f"--output_dir {output_dir} is not writable: {error.strerror or error}") from None


def prepare_demo_data(accelerator: Accelerator, args: argparse.Namespace) -> None:
    """The demo's data folder is built from the embedded corpus the first time (main process; others wait)."""
    with accelerator.main_process_first():
        if accelerator.is_main_process and not any(Path(args.data_dir).glob("*train*")):
            import prepare_data

            tqdm.write(f"preparing the embedded corpus in {args.data_dir} ...")
            prepare_data.main(["--dataset", "embedded", "--output_dir", args.data_dir])
