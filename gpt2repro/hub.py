"""The Hub: background pushes of each checkpoint's model folder, and the model card that goes with it."""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from accelerate import Accelerator
from tqdm.auto import tqdm

from gpt2repro.cli import first_line
from gpt2repro.metrics_log import GPT2_124M_HELLASWAG, GPT2_124M_VAL_LOSS, GPT3_124M_HELLASWAG, latest_record
from gpt2repro.run_control import TrainingError, decided_on_rank0
from gpt2repro.settings import Resolved, TrainSettings


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


def start_hub_pusher(accelerator: Accelerator, repo_id: str | None) -> HubPusher | None:
    """Rank 0's pusher to `repo_id` (None: no pushes; other ranks get None too), checked now rather than at the end of
    the run; a failure stops every rank alike."""
    pushers = []  # the pusher itself stays on rank 0: only the outcome is shared
    decided_on_rank0(accelerator, lambda: pushers.append(HubPusher(repo_id)) if repo_id else None)
    return pushers[0] if pushers else None


def write_model_card(folder: Path, settings: TrainSettings, resolved: Resolved, step: int, tokens_seen: int,
                     records: list[dict]) -> None:
    """The folder's README.md: what was trained, on what, how far, with its latest losses and HellaSwag (from
    `records`, metrics.jsonl's up to `step`)."""
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
    card = f"""---
library_name: transformers
license: mit
tags: [gpt2, gpt2repro, causal-lm, from-scratch]
---

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
"""
    (folder / "README.md").write_text(card)
