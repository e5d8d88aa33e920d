"""What a training run measures at each evaluation: the validation loss, HellaSwag, and samples from `generate`."""
from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from tqdm.auto import tqdm

from eval_hellaswag import HellaSwagScoringError, evaluate_hellaswag
from gpt2repro.run_control import StopSignals, TrainingError
from gpt2repro.shards import TokenStream, validation_batches
from gpt2repro.tokenizer import EOT_TOKEN_ID, IGNORE_INDEX
from modeling_gpt2repro import GPT2ReproForCausalLM

SAMPLE_PROMPT = "Hello, I'm a language model,"
RECIPE_VAL_TOKENS = 20 * 64 * 1024 * 8  # 10,485,760: build-nanogpt's 20 val batches of 64 x 1024 on 8 GPUs


@torch.no_grad()
def evaluate(accelerator: Accelerator, model: GPT2ReproForCausalLM, tokenizer, args: argparse.Namespace,
             hellaswag_examples: list[dict] | None, signals: StopSignals | None = None) -> dict | None:
    """Val loss over the first --val_tokens val tokens (identical on any world size), HellaSwag, and samples.

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
        val_loss = validation_loss(accelerator, model, args, stop_requested, collective_forwards)
        if val_loss is None or stop_requested():
            return None
        result = {"val_loss": val_loss}
        if hellaswag_examples:
            result.update(hellaswag_scores(accelerator, model, tokenizer, args, hellaswag_examples,
                                           shared_out=not collective_forwards))
            if stop_requested():
                return None
        if (accelerator.is_main_process or collective_forwards) and args.num_samples > 0:
            result["samples"] = samples(accelerator, model, tokenizer, args)
        return result
    finally:
        model.train()


def validation_loss(accelerator: Accelerator, model: GPT2ReproForCausalLM, args: argparse.Namespace,
                    stop_requested: Callable[[], bool], collective_forwards: bool = False) -> float | None:
    """The mean loss over every target of the validation tokens, over all processes; None when stop_requested().
    `collective_forwards`: every batch goes through the model, fillers too (FSDP)."""
    device = accelerator.device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    target_count = torch.zeros((), dtype=torch.float64, device=device)
    batches = validation_batches(args.data_dir, args.eval_batch_size, args.seq_len, args.val_tokens,
                                 accelerator.process_index, accelerator.num_processes)
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


def hellaswag_scores(accelerator: Accelerator, model: GPT2ReproForCausalLM, tokenizer, args: argparse.Namespace,
                     examples: list[dict], shared_out: bool = True) -> dict:
    """HellaSwag's scores: each process scores its share of `examples`, or all of them (not `shared_out`)."""
    try:
        with accelerator.autocast():
            scores = evaluate_hellaswag(model, tokenizer, examples, style="completion", batch_size=args.eval_batch_size,
                                        accelerator=accelerator if shared_out else None, limit=args.hellaswag_limit,
                                        show_progress=False)
    except HellaSwagScoringError as error:  # raised on every process alike
        raise TrainingError(f"{error} (--no-hellaswag trains without it)") from None
    return {"hellaswag_acc": scores["acc"], "hellaswag_acc_norm": scores["acc_norm"],
            "hellaswag_count": scores["count"]}


def samples(accelerator: Accelerator, model: GPT2ReproForCausalLM, tokenizer, args: argparse.Namespace) -> list[str]:
    """--num_samples continuations of SAMPLE_PROMPT, drawn from their own seeded RNG: training's random state is the
    same with or without them."""
    device = accelerator.device
    prompt = tokenizer(SAMPLE_PROMPT, return_tensors="pt").input_ids.to(device)  # (1, 8)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), accelerator.autocast():
        torch.manual_seed(args.seed)
        max_new_tokens = min(args.sample_tokens, args.seq_len - prompt.shape[1])  # stay inside the context
        output = model.generate(prompt, do_sample=True, top_k=args.top_k, max_new_tokens=max_new_tokens,
                                num_return_sequences=args.num_samples, pad_token_id=EOT_TOKEN_ID)
    return tokenizer.batch_decode(output)


def choose_val_tokens(args: argparse.Namespace, notify: bool) -> None:
    """Unset --val_tokens: the recipe's number, or the whole val split of a smaller corpus (with a notice). An explicit
    value larger than the split stays an error (validation_batches says so)."""
    if args.val_tokens is not None:
        return
    split_tokens = TokenStream(args.data_dir, "val").num_tokens
    args.val_tokens = min(RECIPE_VAL_TOKENS, split_tokens)
    if args.val_tokens < RECIPE_VAL_TOKENS and notify:
        tqdm.write(f"notice: validation uses the whole val split of {args.data_dir} ({split_tokens:,} tokens), fewer "
                   f"than the recipe's {RECIPE_VAL_TOKENS:,}")
