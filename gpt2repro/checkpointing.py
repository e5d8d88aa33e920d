"""Checkpoints of a training run and what they carry out: written atomically and checked on resume, rotated, the
Hugging Face model folder inside each (with its model card), and background pushes of it to the Hub.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from tqdm.auto import tqdm
from transformers.utils import logging as transformers_logging

from configuration_gpt2repro import GPT2ReproConfig
from gpt2repro.atomic_files import fsync_folder, fsync_tree, write_json_atomic
from gpt2repro.cli import first_line
from gpt2repro.metrics_log import GPT2_124M_HELLASWAG, GPT2_124M_VAL_LOSS, GPT3_124M_HELLASWAG, MetricsLog
from gpt2repro.run_control import TrainingError, decided_on_rank0
from gpt2repro.shards import BatchPrefetcher, ShardedTokenLoader, file_sha256
from gpt2repro.tokenizer import EOT_TOKEN_ID
from modeling_gpt2repro import GPT2ReproForCausalLM

CHECKPOINT_PREFIX = "step_"


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

    def finish(self, output_dir: Path, keep: int) -> None:
        """Wait for every upload (a failure is a warning), then remove the checkpoints kept while they uploaded."""
        tqdm.write(f"waiting for the uploads to {self.repo_id} to finish ...")
        for failure in self.wait():
            tqdm.write(f"warning: {failure}")
        prune_checkpoints(output_dir, keep, None)

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


def latest_checkpoint(output_dir: Path) -> Path | None:
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


class RunCheckpoints:
    """The newest checkpoint this run wrote or resumed from (`latest`; None: none yet), and whether its step's
    evaluation was done when it was written (a run resumed from it does the evaluation otherwise). `save` writes one:
    save_checkpoint with all but the step, pusher and evaluated bound."""

    def __init__(self, save: Callable[..., Path], latest: Path | None, evaluated: bool):
        self._save, self.latest, self.evaluated = save, latest, evaluated

    def save(self, step: int, pusher: HubPusher | None, evaluated: bool = True) -> Path:
        self.latest, self.evaluated = self._save(step, pusher=pusher, evaluated=evaluated), evaluated
        return self.latest

    def at(self, step: int, evaluated: bool) -> Path:
        """A checkpoint of `step` for a run that stops there: the latest if it is of this step and knows of its
        evaluation (a resume would evaluate and log it again otherwise), else a new one, not pushed."""
        current = self.latest is not None and self.latest.name == f"{CHECKPOINT_PREFIX}{step:06d}"
        if current and (self.evaluated or not evaluated):
            return self.latest
        return self.save(step, pusher=None, evaluated=evaluated)


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
    architecture = "".join(f" {name}={getattr(args, name)}" for name in GPT2ReproConfig.architecture_options)
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


def plain_model(config: GPT2ReproConfig, weights: dict[str, torch.Tensor]) -> GPT2ReproForCausalLM:
    """A GPT2ReproForCausalLM holding `weights` themselves (no copy, no initialisation), its head tied again."""
    with torch.device("meta"):
        model = GPT2ReproForCausalLM(config)
    model.load_state_dict(weights, assign=True)
    model.tie_weights()
    return model


def save_checkpoint(accelerator: Accelerator, model, tokenizer, train_loader: ShardedTokenLoader | BatchPrefetcher,
                    step: int, args: argparse.Namespace, metrics: MetricsLog | None, pusher: HubPusher | None,
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
    # Under FSDP each process holds a shard of every weight: the whole ones are gathered on rank 0 (a collective).
    whole_weights = accelerator.get_state_dict(model) if accelerator.distributed_type == DistributedType.FSDP else None
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        tokens_seen = step * args.total_batch_size
        write_json_atomic(temporary / "trainer_state.json",
                          {"step": step, "tokens_seen": tokens_seen, "world_size": accelerator.num_processes,
                           "evaluated": evaluated, "args": vars(args), "files": describe_checkpoint_files(temporary)})
        unwrapped = accelerator.unwrap_model(model)
        if whole_weights is not None:  # FSDP made the model a subclass of its own: save a plain one
            unwrapped = plain_model(unwrapped.config, whole_weights)
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
    shape = ("n_layer", "n_head", "n_embd", "seq_len", *GPT2ReproConfig.architecture_options)
    changed = [f"--{k} {getattr(args, k)} (checkpoint: {saved[k]})"
               for k in shape if k in saved and saved[k] != getattr(args, k)]
    if changed:
        raise TrainingError(f"cannot resume from {resume_from}: the model differs: {', '.join(changed)}; "
                            f"pass the checkpoint's values")
    if state["step"] > args.max_steps:
        raise TrainingError(f"{resume_from} is at step {state['step']}, beyond --max_steps {args.max_steps}: raise "
                            f"--max_steps to train on")


def load_checkpoint(accelerator: Accelerator, checkpoint: Path | None, train_loader: ShardedTokenLoader,
                    max_steps: int) -> tuple[int, bool]:
    """Restore the weights, optimiser, RNG states and this rank's data position from `checkpoint`; returns (its step,
    whether that step's evaluation was done), or (0, False) for a fresh start (None). A damaged file is one
    TrainingError naming it."""
    if checkpoint is None:
        return 0, False
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


