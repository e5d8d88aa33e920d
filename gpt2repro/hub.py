"""The Hub: background pushes of checkpoints (the model folder, and with --hub_strategy checkpoint the training state
too), one tag per pushed step, the model card with its model-index metadata, and resuming from a pushed checkpoint."""
from __future__ import annotations

import json
import re
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from accelerate import Accelerator
from tqdm.auto import tqdm

from gpt2repro.cli import first_line
from gpt2repro.metrics_log import GPT2_124M_HELLASWAG, GPT2_124M_VAL_LOSS, GPT3_124M_HELLASWAG, latest_record
from gpt2repro.run_control import TrainingError, checked_on_every_rank, decided_on_rank0
from gpt2repro.settings import CheckpointSettings, Resolved, TrainSettings
from gpt2repro.shards import MANIFEST_NAME

# Modelled on transformers' Trainer: `end` pushes the final model alone; `every_save` the model of every checkpoint;
# `checkpoint` also the training state, to last-checkpoint/ (replaced at each push); `all_checkpoints` also keeps every
# step's training state, in checkpoints/step_NNNNNN/ as in --output_dir (Trainer's puts them at the top, with no
# last-checkpoint/).
HUB_STRATEGIES = ("end", "every_save", "checkpoint", "all_checkpoints")
LAST_CHECKPOINT = "last-checkpoint"
HELLASWAG_DATASET = "Rowan/hellaswag"


class HubPusher:
    """Pushes checkpoints to a Hub repository in a background thread, so training never waits for it: each push is
    one commit (the model folder at the top, the training state beside it as `strategy` says), then tagged with the
    checkpoint's name (step_NNNNNN), so `from_pretrained(repo, revision="step_001000")` loads that step for good.

    The constructor checks the token, that the Hub is reachable and that the token may write to the repository
    (whoami, create_repo, auth_check), so a long run fails before step 0 rather than at its end. Upload failures are
    reported, not fatal.
    """

    def __init__(self, repo_id: str, strategy: str = "every_save", private: bool | None = None):
        from huggingface_hub import HfApi

        self.api, self.repo_id, self.strategy = HfApi(), repo_id, strategy
        try:
            self.api.whoami()
        except Exception as error:
            raise TrainingError(
                f"--push_to_hub needs a Hugging Face token and a reachable Hub (run `hf auth login` or set HF_TOKEN): "
                f"{first_line(error)}"
            ) from None
        try:
            self.api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
            # create_repo accepts a repository that exists and can be read: writing is checked on its own
            self.api.auth_check(repo_id, write=True)
        except Exception as error:
            raise TrainingError(f"cannot create or write to the Hub repository {repo_id}: {first_line(error)}") \
                from None
        self.executor = ThreadPoolExecutor(max_workers=1)  # uploads run in order, one at a time
        self.uploads: dict[Path, Future] = {}

    def push(self, checkpoint: Path, commit_message: str, last: bool) -> None:
        """Queue `checkpoint`'s push as the strategy says (`last`: the run's final checkpoint; `end` pushes it
        alone). The folder must stay until busy(checkpoint) is False."""
        if self.strategy != "end" or last:
            self.uploads[checkpoint] = self.executor.submit(self._commit, checkpoint, commit_message)

    def _commit(self, checkpoint: Path, commit_message: str) -> None:
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete

        files = {str(path.relative_to(checkpoint / "hf")): path for path in (checkpoint / "hf").rglob("*")}
        state = {str(path.relative_to(checkpoint)): path for path in checkpoint.rglob("*")
                 if path.relative_to(checkpoint).parts[0] != "hf"}
        if self.strategy in ("checkpoint", "all_checkpoints"):
            files |= {f"{LAST_CHECKPOINT}/{name}": path for name, path in state.items()}
        if self.strategy == "all_checkpoints":
            files |= {f"checkpoints/{checkpoint.name}/{name}": path for name, path in state.items()}
        files = {name: path for name, path in files.items() if path.is_file()}
        # last-checkpoint/ is this step's state alone: a file of the previous one not written now (another number of
        # processes, another format) goes; with `end` or `every_save`, so does one an earlier run pushed: it would
        # no longer match the model beside it
        stale = [name for name in self.api.list_repo_files(self.repo_id)
                 if name.startswith(f"{LAST_CHECKPOINT}/") and name not in files]
        operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path)) for name, path in files.items()]
        operations += [CommitOperationDelete(path_in_repo=name) for name in stale]
        commit = self.api.create_commit(self.repo_id, operations, commit_message=commit_message)
        # A tag, not a branch: it names one commit for good. It exists already where this run went back to an earlier
        # checkpoint and trained this step again: it moves to the new commit.
        if checkpoint.name in {tag.name for tag in self.api.list_repo_refs(self.repo_id).tags}:
            self.api.delete_tag(self.repo_id, tag=checkpoint.name)
        self.api.create_tag(self.repo_id, tag=checkpoint.name, revision=commit.oid)

    def cancel_queued(self) -> None:
        """Drop the uploads not started yet (one already running cannot be stopped)."""
        self.executor.shutdown(wait=False, cancel_futures=True)

    def busy(self, folder: Path) -> bool:
        """Whether `folder` is still queued or uploading."""
        future = self.uploads.get(folder)
        return future is not None and not future.done()

    def finish(self) -> None:
        """Wait for every upload; a failure is a warning."""
        tqdm.write(f"waiting for the uploads to {self.repo_id} to finish ...")
        for failure in self.wait():
            tqdm.write(f"warning: {failure}")

    def wait(self, folder: Path | None = None) -> list[str]:
        """Wait for the upload of `folder` (all uploads when None); returns one message per failed upload."""
        failures = []
        for path in [folder] if folder is not None else list(self.uploads):
            future = self.uploads.pop(path, None)
            if future is not None and future.exception() is not None:
                failures.append(f"upload of {path} to {self.repo_id} failed: {first_line(future.exception())}")
        return failures


def start_hub_pusher(accelerator: Accelerator, settings: CheckpointSettings) -> HubPusher | None:
    """Rank 0's pusher (None without --push_to_hub, and on the other ranks), checked now rather than at the end of the
    run; a failure stops every rank alike."""
    pushers = []  # the pusher itself stays on rank 0: only the outcome is shared
    decided_on_rank0(accelerator, lambda: pushers.append(
        HubPusher(settings.hub_model_id, settings.hub_strategy, settings.hub_private_repo or None))
        if settings.push_to_hub else None)
    return pushers[0] if pushers else None



def write_model_card(folder: Path, settings: TrainSettings, resolved: Resolved, step: int, tokens_seen: int,
                     records: list[dict]) -> None:
    """The folder's README.md: what was trained, on what, how far, with its latest losses and HellaSwag (from
    `records`, metrics.jsonl's up to `step`), as a table for readers and as the card's metadata (model-index, which the
    Hub shows as the model's evaluation results)."""
    from huggingface_hub import ModelCard

    model, schedule, optim = settings.model, settings.schedule, settings.optim
    last_train, last_eval = latest_record(records, "train"), latest_record(records, "eval")
    rows = [("optimiser steps", f"{step}"), ("tokens seen", f"{tokens_seen:,}")]
    if last_train:
        rows.append(("train loss (last step)", f"{last_train['loss']:.4f}"))
    if last_eval:
        rows.append((f"val loss ({resolved.val_tokens:,} tokens, step {last_eval['step']})",
                     f"{last_eval['val_loss']:.4f}"))
        if "hellaswag_acc_norm" in last_eval:
            rows.append((f"HellaSwag acc_norm ({last_eval['hellaswag_count']} examples)",
                         f"{last_eval['hellaswag_acc_norm']:.4f}"))
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    repo = settings.checkpoint.hub_model_id or "path/to/this/folder"
    adamw = f"AdamW (betas {optim.beta1}, {optim.beta2}, eps {optim.adam_eps}, weight decay {optim.weight_decay} on " \
            f"matrices)"
    optimiser = f"{adamw}, LR {schedule.max_lr} -> {schedule.min_lr}"
    if optim.optimizer == "muon":
        optimiser = (f"Muon on the blocks' matrices (LR {optim.muon_lr}, momentum {optim.muon_momentum}), {adamw} on "
                     f"the rest (LR: embeddings {optim.embed_lr}, head {optim.head_lr}, biases and gains "
                     f"{optim.adamw_lr})")
    architecture = "".join(f" {name}={value}" for name, value in model.architecture().items())
    architecture = f"\nArchitecture options:{architecture}."
    revisions = ""
    if settings.checkpoint.push_to_hub:
        revisions = f"""
Each pushed checkpoint is also tagged with its step, e.g. `revision="step_{step:06d}"` in `from_pretrained`, or
`hf download {repo} --revision step_{step:06d}`.
"""
    body = f"""
# gpt2repro: GPT-2 trained from scratch

A GPT-2 ({model.n_layer} layers, {model.n_head} heads, width {model.n_embd}, context {model.seq_len}) trained with
`train_accelerate.py` of gpt2repro on the token shards of `{settings.data.data_dir}`.

| | |
|---|---|
{table}

Reference: GPT-2 124M scores val loss {GPT2_124M_VAL_LOSS} on FineWeb-Edu and HellaSwag acc_norm {GPT2_124M_HELLASWAG};
GPT-3 124M scores HellaSwag {GPT3_124M_HELLASWAG}.

Recipe ({settings.recipe}): {schedule.total_batch_size:,} tokens per step, micro-batch {schedule.micro_batch_size} x \
{model.seq_len}, {optimiser}, warmup {schedule.warmup_steps} steps, {schedule.lr_schedule} schedule to step \
{schedule.max_steps}, grad clip {optim.grad_clip}, mixed precision {resolved.mixed_precision}, seed \
{settings.data.seed}.{architecture}

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{repo}", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("{repo}", trust_remote_code=True)
```
{revisions}"""
    metadata = card_metadata(settings, resolved, tokens_seen, last_eval)
    ModelCard(f"---\n{metadata.to_yaml()}\n---\n{body}").save(folder / "README.md")


def training_dataset(data_dir: str) -> str | None:
    """The Hub dataset the shards were made from, as prepare_data.py recorded it (None: local files, the embedded
    corpus, or unrecorded)."""
    try:
        dataset = json.loads((Path(data_dir) / MANIFEST_NAME).read_text())["source"].get("dataset")
    except (OSError, ValueError, KeyError, AttributeError):
        return None
    return dataset if isinstance(dataset, str) and "/" in dataset else None  # "embedded" is no Hub dataset


def card_metadata(settings: TrainSettings, resolved: Resolved, tokens_seen: int, last_eval: dict | None):
    """The card's YAML header through huggingface_hub's ModelCardData: library, license, tags, the training dataset,
    the tokens seen, and model-index with the latest evaluation's val loss and HellaSwag acc_norm."""
    from huggingface_hub import EvalResult, ModelCardData

    dataset = training_dataset(settings.data.data_dir)
    results = []
    if last_eval is not None:
        results.append(EvalResult(
            task_type="text-generation", task_name="Text Generation", dataset_type=dataset or "local",
            dataset_name=f"{dataset or Path(settings.data.data_dir).name} validation shard "
                         f"({resolved.val_tokens:,} tokens)", dataset_split="validation", metric_type="loss",
            metric_name=f"val loss at step {last_eval['step']}", metric_value=round(last_eval["val_loss"], 4)))
        if "hellaswag_acc_norm" in last_eval:
            results.append(EvalResult(
                task_type="text-generation", task_name="Text Generation", dataset_type=HELLASWAG_DATASET,
                dataset_name=f"HellaSwag ({last_eval['hellaswag_count']} examples, 0-shot)",
                dataset_split="validation", metric_type="acc_norm", metric_name=f"acc_norm at step {last_eval['step']}",
                metric_value=round(last_eval["hellaswag_acc_norm"], 4)))
    name = (settings.checkpoint.hub_model_id or "gpt2repro").split("/")[-1]
    return ModelCardData(library_name="transformers", license="mit", tags=["gpt2", "gpt2repro", "causal-lm",
                         "from-scratch"], datasets=[dataset] if dataset else None, pipeline_tag="text-generation",
                         model_name=name, eval_results=results or None, tokens_seen=tokens_seen)


# ---- resuming from the Hub -------------------------------------------------------------------------------------------

HUB_REFERENCE = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(@(?P<revision>[\w./-]+))?")


def hub_reference(resume_from_checkpoint: str | None) -> tuple[str, str | None] | None:
    """(repository, revision or None) where --resume_from_checkpoint names a Hub repository, `owner/name` or
    `owner/name@revision` (a branch, a step's tag such as step_001000, a commit), rather than a local folder."""
    if resume_from_checkpoint in (None, "latest") or Path(resume_from_checkpoint).exists():
        return None
    match = HUB_REFERENCE.fullmatch(resume_from_checkpoint)
    return (match["repo"], match["revision"]) if match else None


def download_checkpoint(repo_id: str, revision: str | None, local_files_only: bool = False) -> Path:
    """The last-checkpoint/ folder of `repo_id` at `revision`, downloaded into the Hub cache (that folder alone: the
    model beside it is not needed to resume); a TrainingError naming what failed."""
    from huggingface_hub import snapshot_download

    name = f"{repo_id}@{revision}" if revision else repo_id
    try:
        snapshot = Path(snapshot_download(repo_id, revision=revision, allow_patterns=f"{LAST_CHECKPOINT}/*",
                                          local_files_only=local_files_only))
    except Exception as error:  # offline, no access, no such repository or revision, a failed transfer
        raise TrainingError(f"cannot download the training state of {name} from the Hub: {first_line(error)}") \
            from None
    if not (snapshot / LAST_CHECKPOINT).is_dir():
        raise TrainingError(f"{name} on the Hub has no {LAST_CHECKPOINT}/ folder to resume from: a run pushes one "
                            f"with --hub_strategy checkpoint or all_checkpoints")
    return snapshot / LAST_CHECKPOINT


def fetch_checkpoint(accelerator: Accelerator, repo_id: str, revision: str | None) -> Path:
    """This node's copy of the pushed training state: rank 0 downloads it (an error stops every rank with its line),
    then the first process of each other node the same commit into that node's cache (found at once where the cache
    is shared); every process gets the path on its own node."""
    folder = decided_on_rank0(accelerator, lambda: download_checkpoint(repo_id, revision))
    commit = folder.parent.name  # the snapshot's folder is named by its commit: a branch may move meanwhile
    checked_on_every_rank(accelerator, lambda: download_checkpoint(repo_id, commit)
                          if accelerator.is_local_main_process else None)
    return checked_on_every_rank(accelerator, lambda: download_checkpoint(repo_id, commit, local_files_only=True))
