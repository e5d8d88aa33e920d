"""What a training run measures at each evaluation: the validation loss, HellaSwag, and samples from `generate`."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from tqdm.auto import tqdm

from gpt2repro.data_loader import TokenStream, validation_batches
from gpt2repro.hellaswag import HellaSwagScoringError, evaluate_hellaswag
from gpt2repro.run_control import StopSignals, TrainingError
from gpt2repro.settings import EvalSettings
from gpt2repro.tokenizer import EOT_TOKEN_ID, IGNORE_INDEX
from modeling_gpt2repro import GPT2ReproForCausalLM

SAMPLE_PROMPT = "Hello, I'm a language model,"
RECIPE_VAL_TOKENS = 20 * 64 * 1024 * 8  # 10,485,760: build-nanogpt's 20 val batches of 64 x 1024 on 8 GPUs


@dataclass(frozen=True)
class ValidationData:
    """The validation split a run evaluates on: its first `val_tokens` tokens, in rows of `seq_len`; `seed` seeds the
    samples."""
    data_dir: str
    seq_len: int
    val_tokens: int
    seed: int


@torch.no_grad()
def run_evaluation(accelerator: Accelerator, model: GPT2ReproForCausalLM, tokenizer, settings: EvalSettings,
                   data: ValidationData, hellaswag_examples: list[dict] | None,
                   signals: StopSignals | None = None) -> dict | None:
    """Val loss over the first `data.val_tokens` val tokens (identical on any world size), HellaSwag, and samples.

    `model` is the plain module (no DDP, no compile): evaluation never goes through the compiled graph. With
    `signals`, every process checks them between validation batches and between the parts, all at the same points,
    and None is returned when one came: the run then saves within seconds (a scheduler's grace period may be 30 s)
    instead of after a long evaluation.

    Under FSDP every forward gathers the parameters from all processes, so every process runs the same forwards:
    its share of the validation batches, fillers included; all of HellaSwag; the samples.
    """
    def stop_requested() -> bool:
        return signals is not None and any(signals.requested(accelerator))

    collective_forwards = accelerator.distributed_type == DistributedType.FSDP
    model.eval()
    try:
        val_loss = validation_loss(accelerator, model, data, settings.eval_batch_size, stop_requested,
                                   collective_forwards)
        if val_loss is None or stop_requested():
            return None
        result = {"val_loss": val_loss}
        if hellaswag_examples:
            result.update(hellaswag_scores(accelerator, model, tokenizer, hellaswag_examples, settings.eval_batch_size,
                                           settings.hellaswag_limit, shared_out=not collective_forwards))
            if stop_requested():
                return None
        if (accelerator.is_main_process or collective_forwards) and settings.num_samples > 0:
            result["samples"] = samples(accelerator, model, tokenizer, settings, data.seq_len, data.seed)
        return result
    finally:
        model.train()


def validation_loss(accelerator: Accelerator, model: GPT2ReproForCausalLM, data: ValidationData, batch_size: int,
                    stop_requested: Callable[[], bool], collective_forwards: bool = False) -> float | None:
    """The mean loss over every target of the validation tokens, over all processes; None when stop_requested().
    `collective_forwards`: every batch goes through the model, fillers too (FSDP)."""
    device = accelerator.device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    target_count = torch.zeros((), dtype=torch.float64, device=device)
    batches = validation_batches(data.data_dir, batch_size, data.seq_len, data.val_tokens, accelerator.process_index,
                                 accelerator.num_processes)
    with accelerator.autocast():
        for x, y in batches:
            if stop_requested():  # before the filler check: every process checks at every batch
                return None
            count = int((y != IGNORE_INDEX).sum())
            if count == 0 and not collective_forwards:  # a filler batch: ranks yield equally many batches, some
                continue  # have nothing left to score
            loss = model(input_ids=x.to(device), shift_labels=y.to(device), return_logits=False).loss
            if count == 0:
                continue
            loss_sum += loss.double() * count  # the mean over this batch's targets, back to a sum
            target_count += count
    totals = accelerator.reduce(torch.stack([loss_sum, target_count]), reduction="sum")
    return (totals[0] / totals[1]).item()


def hellaswag_scores(accelerator: Accelerator, model: GPT2ReproForCausalLM, tokenizer, examples: list[dict],
                     batch_size: int, limit: int | None, shared_out: bool = True) -> dict:
    """HellaSwag's scores: each process scores its share of `examples`, or all of them (not `shared_out`)."""
    try:
        with accelerator.autocast():
            scores = evaluate_hellaswag(model, tokenizer, examples, style="completion", batch_size=batch_size,
                                        accelerator=accelerator if shared_out else None, limit=limit,
                                        show_progress=False)
    except HellaSwagScoringError as error:  # raised on every process alike
        raise TrainingError(f"{error} (--no-hellaswag trains without it)") from None
    return {"hellaswag_acc": scores["acc"], "hellaswag_acc_norm": scores["acc_norm"],
            "hellaswag_count": scores["count"]}


def samples(accelerator: Accelerator, model: GPT2ReproForCausalLM, tokenizer, settings: EvalSettings, seq_len: int,
            seed: int) -> list[str]:
    """--num_samples continuations of SAMPLE_PROMPT, drawn from their own seeded RNG: training's random state is the
    same with or without them."""
    device = accelerator.device
    prompt = tokenizer(SAMPLE_PROMPT, return_tensors="pt").input_ids.to(device)  # (1, 8)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), accelerator.autocast():
        torch.manual_seed(seed)
        max_new_tokens = min(settings.sample_tokens, seq_len - prompt.shape[1])  # stay inside the context
        output = model.generate(prompt, do_sample=True, top_k=settings.top_k, max_new_tokens=max_new_tokens,
                                num_return_sequences=settings.num_samples, pad_token_id=EOT_TOKEN_ID)
    return tokenizer.batch_decode(output)


def resolve_val_tokens(val_tokens: int | None, data_dir: str, notify: bool) -> int:
    """--val_tokens as given, or unset: the recipe's number, or the whole val split of a smaller corpus (with a
    notice). An explicit value larger than the split stays an error (validation_batches says so)."""
    if val_tokens is not None:
        return val_tokens
    split_tokens = TokenStream(data_dir, "val").num_tokens
    if split_tokens < RECIPE_VAL_TOKENS and notify:
        tqdm.write(f"notice: validation uses the whole val split of {data_dir} ({split_tokens:,} tokens), fewer "
                   f"than the recipe's {RECIPE_VAL_TOKENS:,}")
    return min(RECIPE_VAL_TOKENS, split_tokens)
