"""Checkpoints of a training run: written atomically and checked on resume, rotated, with the Hugging Face model
folder inside each (gpt2repro.hub pushes it and writes its card)."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from safetensors.torch import load_file
from tqdm.auto import tqdm
from transformers.utils import logging as transformers_logging

from configuration_gpt2repro import GPT2ReproConfig
from gpt2repro import sharded_checkpoint
from gpt2repro.atomic_files import fsync_folder, fsync_tree, write_json_atomic
from gpt2repro.cli import CommandError, first_line
from gpt2repro.data_loader import BatchPrefetcher, ShardedTokenLoader
from gpt2repro.hub import HubPusher, write_model_card
from gpt2repro.metrics_log import MetricsLog, records_up_to
from gpt2repro.run_control import TrainingError
from gpt2repro.settings import ModelSettings, Resolved, TrainSettings
from gpt2repro.shards import file_sha256
from gpt2repro.tokenizer import EOT_TOKEN_ID
from modeling_gpt2repro import GPT2ReproForCausalLM

CHECKPOINT_PREFIX = "step_"


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
    save_checkpoint with all but the step, pusher, evaluated and model_folder bound."""

    def __init__(self, save: Callable[..., Path], latest: Path | None, evaluated: bool):
        self._save, self.latest, self.evaluated = save, latest, evaluated

    def save(self, step: int, pusher: HubPusher | None, evaluated: bool = True, model_folder: bool = True) -> Path:
        self.latest = self._save(step, pusher=pusher, evaluated=evaluated, model_folder=model_folder)
        self.evaluated = evaluated
        return self.latest

    def at(self, step: int, evaluated: bool) -> Path:
        """A checkpoint of `step` for a run that stops there (a signal): the latest if it is of this step and knows of
        its evaluation (a resume would evaluate and log it again otherwise), else a new one of the training state
        alone, not pushed."""
        current = self.latest is not None and self.latest.name == f"{CHECKPOINT_PREFIX}{step:06d}"
        if current and (self.evaluated or not evaluated):
            return self.latest
        return self.save(step, pusher=None, evaluated=evaluated, model_folder=False)


def save_hf_folder(model: GPT2ReproForCausalLM, tokenizer, folder: Path, settings: TrainSettings, resolved: Resolved,
                   step: int, tokens_seen: int, records: list[dict]) -> None:
    """A folder `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` loads: weights, config with
    auto_map, the model code, tokenizer, generation config and a model card."""
    model.generation_config.update(do_sample=True, top_k=settings.eval.top_k,
                                   max_new_tokens=settings.eval.sample_tokens, pad_token_id=EOT_TOKEN_ID)
    bar_was_enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()  # its one-file "Writing model shards" bar would break the training bar
    try:
        model.save_pretrained(folder, safe_serialization=True)
    finally:
        if bar_was_enabled:
            transformers_logging.enable_progress_bar()
    tokenizer.save_pretrained(folder)
    write_model_card(folder, settings, resolved, step, tokens_seen, records)


def plain_model(config: GPT2ReproConfig, weights: dict[str, torch.Tensor]) -> GPT2ReproForCausalLM:
    """A GPT2ReproForCausalLM holding `weights` themselves (no copy, no initialisation), its head tied again (the head
    may be left out of `weights` where it is tied)."""
    with torch.device("meta"):
        model = GPT2ReproForCausalLM(config)
    if config.tie_word_embeddings:
        weights = {**weights, "lm_head.weight": weights["transformer.wte.weight"]}
    model.load_state_dict(weights, assign=True)
    model.tie_weights()
    return model


class TiedHeadNotice(logging.Filter):
    """Drops Accelerate's warning that the tied head's weight was left out of the saved weights: the tie is the
    model's design (GPT-2 shares wte with lm_head), and loading ties them again (resume is tested bitwise)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Removed shared tensor {'lm_head.weight'}" not in record.getMessage()


@contextlib.contextmanager
def tied_head_saved_quietly():
    """Accelerate's state saving without its shared-tensor warning for the tied head, which every checkpoint of
    the GPT-2 recipe printed ("This should be OK, but check ..."); any other shared tensor is still reported."""
    accelerate_logger, notice = logging.getLogger("accelerate.utils.other"), TiedHeadNotice()
    accelerate_logger.addFilter(notice)
    try:
        yield
    finally:
        accelerate_logger.removeFilter(notice)


def save_checkpoint(accelerator: Accelerator, model, optimizers: list[torch.optim.Optimizer], tokenizer,
                    train_loader: ShardedTokenLoader | BatchPrefetcher, step: int, settings: TrainSettings,
                    resolved: Resolved, metrics: MetricsLog | None, pusher: HubPusher | None, evaluated: bool = True,
                    model_folder: bool = True) -> Path:
    """Write checkpoints/step_NNNNNN/ = the training state (weights, optimiser state), loader_rank{r}.json,
    trainer_state.json and, with `model_folder`, hf/ (the model folder, from the whole weights). Everything goes to a
    temporary folder first and is renamed into place, then older checkpoints beyond --keep_checkpoints are removed.

    The training state of one process is Accelerate's (training_state/); of several, distributed_state/: each process
    writes its own share, in parallel (gpt2repro.sharded_checkpoint). A preemption checkpoint has no `model_folder`:
    it must finish within the launcher's grace, and the next regular checkpoint or `--export_hf` writes one.
    `evaluated`: whether step's evaluation (if one is due) is done; a run resumed from here does it otherwise."""
    root = Path(settings.data.output_dir) / "checkpoints"
    final = root / f"{CHECKPOINT_PREFIX}{step:06d}"
    temporary = root / f"tmp_{final.name}"
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)  # left over by a killed run
        temporary.mkdir(parents=True)
        if metrics is not None:  # the records up to this step on disk with it
            metrics.flush()
    accelerator.wait_for_everyone()
    if accelerator.num_processes > 1:
        sharded_checkpoint.save(temporary / sharded_checkpoint.STATE_FOLDER, accelerator.unwrap_model(model),
                                optimizers, with_optimizers=step > 0)  # no optimiser state before the first step
    else:
        with tied_head_saved_quietly():
            accelerator.save_state(str(temporary / "training_state"))
    write_json_atomic(temporary / f"loader_rank{accelerator.process_index}.json", train_loader.state_dict())
    # Under FSDP each process holds a shard of every weight: the whole ones are gathered on rank 0 (a collective).
    fsdp = accelerator.distributed_type == DistributedType.FSDP
    whole_weights = accelerator.get_state_dict(model) if model_folder and fsdp else None
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        tokens_seen = step * settings.schedule.total_batch_size
        write_json_atomic(temporary / "trainer_state.json",
                          {"step": step, "tokens_seen": tokens_seen, "world_size": accelerator.num_processes,
                           "evaluated": evaluated, "settings": settings.flags(),
                           "resolved": dataclasses.asdict(resolved), "files": describe_checkpoint_files(temporary)})
        if model_folder:
            unwrapped = accelerator.unwrap_model(model)
            if whole_weights is not None:  # FSDP made the model a subclass of its own: save a plain one
                unwrapped = plain_model(unwrapped.config, whole_weights)
            save_hf_folder(unwrapped, tokenizer, temporary / "hf", settings, resolved, step, tokens_seen,
                           metrics.records)
        fsync_tree(temporary)  # all of it on disk before the rename says it is whole (~1 s per GB)
        if final.exists():  # written before by a run this one resumed from an earlier checkpoint of
            shutil.rmtree(final)
        os.replace(temporary, final)
        fsync_folder(root)
        prune_checkpoints(Path(settings.data.output_dir), settings.checkpoint.keep_checkpoints, pusher)
        if pusher is not None and model_folder:
            pusher.push(final, f"step {step}: {tokens_seen:,} tokens", last=step == settings.schedule.max_steps)
    accelerator.wait_for_everyone()
    return final


def model_folder_line(checkpoint: Path) -> str:
    """A finished run's last line: its model folder, or how to write one where the checkpoint has none (a run resumed
    from a preemption checkpoint already at --max_steps)."""
    if (checkpoint / "hf").is_dir():
        return f"done: model folder {checkpoint / 'hf'}"
    return f"done: {checkpoint} holds the training state alone; write its model folder with --export_hf {checkpoint}"


def export_model_folder(checkpoint: Path, settings: TrainSettings, tokenizer) -> Path:
    """Write `checkpoint`'s hf/ folder (a preemption checkpoint has none) from its training state, whatever the number
    of processes that wrote it, in this process alone; `settings`: those it was trained with (checkpoint_problem has
    found it whole). Returns the folder."""
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    sharded = [checkpoint / sharded_checkpoint.STATE_FOLDER, checkpoint / "training_state" / "pytorch_model_fsdp_0"]
    whole = checkpoint / "training_state" / "model.safetensors"
    try:
        sharded_state = next((folder for folder in sharded if folder.is_dir()), None)
        weights = sharded_checkpoint.whole_weights(sharded_state) if sharded_state else load_file(whole)
    except Exception as error:  # whatever DCP or safetensors raise on a damaged or missing file
        raise CommandError(f"cannot read the weights of {checkpoint}: {first_line(error)}") from None
    step, output_dir = state["step"], checkpoint.parent.parent
    temporary, final, old = checkpoint / "tmp_hf", checkpoint / "hf", checkpoint / "old_hf"
    try:
        shutil.rmtree(temporary, ignore_errors=True)
        save_hf_folder(plain_model(settings.model.config(), weights), tokenizer, temporary, settings,
                       Resolved(**state["resolved"]), step, state["tokens_seen"],
                       records_up_to(output_dir / "metrics.jsonl", step))
        fsync_tree(temporary)
        if final.exists():  # set aside, not deleted, until the new one is in place
            os.replace(final, old)
        os.replace(temporary, final)
        fsync_folder(checkpoint)
        shutil.rmtree(old, ignore_errors=True)
    except OSError as error:
        raise CommandError(f"cannot write {final}: {first_line(error)}") from None
    return final


# Files up to this size (RNG states, loader positions) are checksummed in trainer_state.json; larger ones (weights,
# optimiser state) only have their size recorded, which catches truncation without hashing gigabytes at every save.
CHECKSUMMED_FILE_BYTES = 1 << 20


def describe_checkpoint_files(folder: Path) -> dict[str, dict]:
    """{relative path: {"bytes", "sha256" for small files}} of what a resume reads: the training state and the
    loaders' positions."""
    described = {}
    state_files = [*folder.glob("training_state/**/*"), *folder.glob(f"{sharded_checkpoint.STATE_FOLDER}/*")]
    for path in sorted([*state_files, *folder.glob("loader_rank*.json")]):
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
            if pusher.busy(old):
                continue
            for failure in pusher.wait(old):  # done: only collects its outcome
                tqdm.write(f"warning: {failure}")
        shutil.rmtree(old)


def in_run(checkpoint: Path, output_dir: Path) -> bool:
    """Whether `checkpoint` is one of the run in `output_dir` (rather than another run's, resumed from)."""
    return checkpoint.resolve().parent == (output_dir / "checkpoints").resolve()


def find_resume_checkpoint(resume_from_checkpoint: str | None, output_dir: Path, notify: bool) -> Path | None:
    """The checkpoint to resume from: the one --resume_from_checkpoint names, or with `latest` the newest whole one in
    `output_dir` (None: a fresh start). A damaged checkpoint is one error line naming its bad file; `latest` falls
    back past it."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(output_dir)
        for checkpoint in reversed(checkpoints):
            problem = checkpoint_problem(checkpoint)
            if problem is None:
                return checkpoint
            if notify:
                tqdm.write(f"notice: skipping checkpoint {checkpoint}: {problem}")
        if checkpoints:
            raise TrainingError(f"no checkpoint in {output_dir / 'checkpoints'} can be resumed from (see "
                                f"the notices above); move them away to start afresh")
        return None
    path = Path(resume_from_checkpoint)
    problem = checkpoint_problem(path)
    if problem is not None:
        raise TrainingError(f"cannot resume from --resume_from_checkpoint {path}: {problem}")
    return path


def choose_resume_checkpoint(resume_from_checkpoint: str | None, output_dir: Path, model: ModelSettings,
                             max_steps: int) -> Path | None:
    """Rank 0's choice of where to start (see find_resume_checkpoint and check_resume). Checkpoints of this run newer
    than the one resumed from (damaged, or a line of training the user went back from) are renamed out of the way:
    rotation would otherwise keep them and delete the new ones, and a later `latest` would pick them."""
    resume_from = find_resume_checkpoint(resume_from_checkpoint, output_dir, notify=True)
    check_resume(model, max_steps, resume_from, output_dir)
    if resume_from is not None and in_run(resume_from, output_dir):
        for newer in list_checkpoints(output_dir):
            if int(newer.name[len(CHECKPOINT_PREFIX):]) > int(resume_from.name[len(CHECKPOINT_PREFIX):]):
                set_aside = newer.with_name(f"abandoned_{newer.name}_{time.strftime('%Y%m%d-%H%M%S')}")
                os.replace(newer, set_aside)
                tqdm.write(f"notice: {newer} is newer than {resume_from}; moved to {set_aside}")
    return resume_from


def check_resume(model: ModelSettings, max_steps: int, resume_from: Path | None, output_dir: Path) -> None:
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
    saved = state.get("settings", state.get("args", {}))  # "args": the flags as checkpoints before 2026-12-06 kept them
    changed = [f"--{k} {value} (checkpoint: {saved[k]})"
               for k, value in dataclasses.asdict(model).items() if k in saved and saved[k] != value]
    if changed:
        raise TrainingError(f"cannot resume from {resume_from}: the model differs: {', '.join(changed)}; "
                            f"pass the checkpoint's values")
    if state["step"] > max_steps:
        raise TrainingError(f"{resume_from} is at step {state['step']}, beyond --max_steps {max_steps}: raise "
                            f"--max_steps to train on")


def load_checkpoint(accelerator: Accelerator, checkpoint: Path | None, train_loader: ShardedTokenLoader,
                    max_steps: int, model: GPT2ReproForCausalLM, optimizers: list[torch.optim.Optimizer],
                    sharded_optimizer: bool = False) -> tuple[int, bool]:
    """Restore the weights, optimiser state and this rank's data position from `checkpoint` into `model` (the
    unwrapped module) and `optimizers`; returns (its step, whether that step's evaluation was done), or (0, False) for a
    fresh start (None). A damaged file is one TrainingError naming it. A distributed_state/ is read share by share
    (each process reads what it holds, on any number of processes). Accelerate's training_state/ (one process's, and
    every checkpoint of earlier versions) holds the whole state; with `sharded_optimizer` it is read into host memory,
    from which each process keeps its share, rather than onto every GPU (Accelerate's choice with several processes:
    ~12.5 GB more per GPU at 1558M, where sharding was chosen to make the run fit)."""
    if checkpoint is None:
        return 0, False
    trainer_state = json.loads((checkpoint / "trainer_state.json").read_text())
    notify = accelerator.is_main_process
    if trainer_state["world_size"] != accelerator.num_processes and notify:
        tqdm.write(f"notice: {checkpoint} was written by {trainer_state['world_size']} processes and this launch "
                   f"has {accelerator.num_processes}: the run continues from the same weights, optimiser state and "
                   f"data position, but is no longer bitwise the run it would have been")
    sharded = checkpoint / sharded_checkpoint.STATE_FOLDER
    state = sharded if sharded.is_dir() else checkpoint / "training_state"
    try:
        if sharded.is_dir():
            sharded_checkpoint.load(sharded, model, optimizers, with_optimizers=trainer_state["step"] > 0)
        else:
            accelerator.load_state(str(state), **({"map_location": "cpu"} if sharded_optimizer else {}))
    except Exception as error:  # whatever torch, DCP, safetensors or pickle raise on a damaged file
        raise TrainingError(f"cannot load {state}: {first_line(error)}") from None
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


