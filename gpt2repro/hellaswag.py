"""HellaSwag scored with any causal LM (ours, stock `gpt2`, any AutoModelForCausalLM): `evaluate_hellaswag`.

Each example is a context and 4 candidate endings; the model picks the ending it finds most likely, in one of the
two styles of `gpt2repro.hellaswag_data.render_example`. The accuracies come from the `evaluate` metric in
`hellaswag_accuracy.py`, beside this module (loaded by path: offline).

How an example is scored, fast: its context and 4 endings are packed into one row, with an attention mask that
lets each ending see only the context and itself, so the context costs 1/4 of what 4 full rows would; logits
are computed only where an ending token is predicted. Several examples (padded and masked) share each forward,
sorted by length to keep padding small. The model must accept position_ids and a custom 4-D attention mask, as
transformers' models do. An example longer than the model's context (n_positions or max_position_embeddings)
loses the start of its context, as in lm-evaluation-harness; one whose ending alone fills the context is skipped;
the result counts both (`truncated`, `skipped`).
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import math
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from gpt2repro.cli import first_line
from gpt2repro.hellaswag_data import NUM_ENDINGS, STYLES, render_example

if TYPE_CHECKING:
    from accelerate import Accelerator

METRIC_PATH = Path(__file__).with_name("hellaswag_accuracy.py")  # beside this module, in a checkout or installed
CROSS_ENTROPY_SLICE_BYTES = 4 << 20  # fp32 logits per slice in token_losses: ~20 positions at GPT-2's vocabulary


class HellaSwagScoringError(RuntimeError):
    """Scoring failed on one of the processes; every process raises it alike, with that process's message."""


def tokenize_examples(examples: list[dict], tokenizer, style: str) -> list[dict]:
    """Per example: context token ids, the 4 endings' token ids, and the 4 acc_norm divisors."""
    rendered = [render_example(example, style) for example in examples]
    texts = [text for context, endings, _ in rendered for text in [context, *endings]]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []  # a process's share may be empty
    tokenized = []
    for i, (_, _, char_lengths) in enumerate(rendered):
        context_ids, *ending_ids = ids[i * (1 + NUM_ENDINGS): (i + 1) * (1 + NUM_ENDINGS)]
        if not context_ids or not all(ending_ids):
            raise ValueError(f"HellaSwag example {i}: the context and every ending must give at least one token")
        norm_divisors = char_lengths or [len(e) for e in ending_ids]
        tokenized.append({"context": context_ids, "endings": ending_ids, "norm_divisors": norm_divisors})
    return tokenized


def context_window(model: torch.nn.Module) -> int | None:
    """How many positions the model embeds: `n_positions` (GPT-2, ours) or `max_position_embeddings` (most other
    transformers models); None when its config names neither, and then nothing is cut."""
    config = getattr(model, "config", None)
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def fit_to_context(example: dict, max_positions: int | None) -> dict | None:
    """`example` (from `tokenize_examples`) fitted to a context of `max_positions`, as lm-evaluation-harness fits
    its rows: the endings stay whole and the context keeps its last tokens, as many as fit beside the longest
    ending. An ending's last token is never an input, so context + ending may take max_positions + 1 tokens. The 4
    endings share one context, cut for the longest: a shorter ending may see fewer context tokens than the
    harness, which cuts each row alone, would give it. Adds `context_tokens_dropped`; None when not even one
    context token fits (an ending alone fills the context), so that the example cannot be scored."""
    room = len(example["context"]) if max_positions is None else max_positions + 1 - max(map(len, example["endings"]))
    if room < 1:
        return None
    context = example["context"][-room:]
    return {**example, "context": context, "context_tokens_dropped": len(example["context"]) - len(context)}


class PackedBatch(NamedTuple):
    """Examples packed one per row by `pack_batch`; N counts the ending tokens of the whole batch."""

    input_ids: torch.Tensor  # (B, T), left-padded
    position_ids: torch.Tensor  # (B, T)
    attention_allowed: torch.Tensor  # (B, T, T) bool: the keys each query may attend to
    predictors: torch.Tensor  # (N, 2): the (row, position) whose logits predict each ending token
    targets: torch.Tensor  # (N,): the ending tokens
    ending_index: torch.Tensor  # (N,): per ending token, 4 * (its example's row) + its ending
    logits_needed: int  # every predictor lies in the last `logits_needed` positions of its row


def pack_batch(batch: list[dict]) -> PackedBatch:
    """One row per example: its context, then its 4 endings back to back, each ending without its last token (an
    input that predicts nothing scored). Each ending sees the context and its own earlier tokens only, and its
    position ids restart at len(context), so it is scored exactly as the row context + ending would be, while the
    context is computed once instead of 4 times. The highest position is len(context) + len(longest ending) - 2.
    Rows are left-padded so that all endings sit in the last positions. An ending's first token is predicted by the
    last context token, each later one by the ending's previous token."""
    B = len(batch)
    lengths = [len(ex["context"]) + sum(len(ending) - 1 for ending in ex["endings"]) for ex in batch]
    T = max(lengths)
    input_ids = torch.zeros(B, T, dtype=torch.long)  # pad id 0: any valid id, it is masked
    position_ids = torch.zeros(B, T, dtype=torch.long)
    segment = torch.full((B, T), -1)  # per position: -1 padding, 0 context, j + 1 ending j
    predictors, targets, ending_index = [], [], []
    for i, ex in enumerate(batch):
        context_len = len(ex["context"])
        at = T - lengths[i]  # left padding
        input_ids[i, at: at + context_len] = torch.tensor(ex["context"])
        position_ids[i, at: at + context_len] = torch.arange(context_len)
        segment[i, at: at + context_len] = 0
        last_context_position = at + context_len - 1
        at += context_len
        for j, ending in enumerate(ex["endings"]):
            n = len(ending) - 1  # inputs: all but the last token
            input_ids[i, at: at + n] = torch.tensor(ending[:-1], dtype=torch.long)
            position_ids[i, at: at + n] = torch.arange(context_len, context_len + n)
            segment[i, at: at + n] = j + 1
            predictors += [(i, last_context_position)] + [(i, at + k) for k in range(n)]
            targets += ending
            ending_index += [NUM_ENDINGS * i + j] * len(ending)
            at += n

    positions = torch.arange(T)
    causal = positions[None, :] <= positions[:, None]  # (T, T): key position <= query position
    query_segment, key_segment = segment[:, :, None], segment[:, None, :]  # (B, T, 1), (B, 1, T)
    allowed = causal & (key_segment != -1) & ((key_segment == 0) | (key_segment == query_segment))  # (B, T, T)
    # Padding queries see themselves: an all-masked row would be NaN. This also keeps the mask safe where autocast
    # turns the most negative fp32 bias into bf16 -inf: no row is all -inf.
    allowed |= torch.eye(T, dtype=torch.bool)
    predictors = torch.tensor(predictors)
    return PackedBatch(input_ids, position_ids, allowed, predictors, torch.tensor(targets), torch.tensor(ending_index),
                       logits_needed=T - int(predictors[:, 1].min()))


def accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether the model's forward takes `logits_to_keep` (transformers' causal LMs and ours): an int n there computes
    the logits of the last n positions only, the lm_head being most of a small model's FLOPs."""
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def token_losses(logits: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy (nats, fp32) of targets[k] under logits[rows[k]], for (R, V) logits of any dtype; a row may
    predict several targets. The log-softmax runs in fp32 over slices of consecutive rows: on a CPU a few rows, so
    that each slice's fp32 copy stays in the cache, where a gather and fp32 copy of all the scored rows would go
    through memory several times (measured: ~2x faster at GPT-2's vocabulary); on a GPU all rows at once."""
    per_slice = max(1, CROSS_ENTROPY_SLICE_BYTES // (4 * logits.shape[-1])) if logits.device.type == "cpu" \
        else len(logits)
    order = rows.argsort(stable=True)  # by row: each slice's targets are then consecutive
    counts = torch.bincount(rows // per_slice, minlength=-(-len(logits) // per_slice)).tolist()
    losses = []
    for logits_slice, slice_rows, slice_targets, count in zip(
            logits.split(per_slice), rows[order].split(counts), targets[order].split(counts), counts, strict=True):
        if count:  # e.g. the context positions when the model computed logits everywhere
            log_probs = F.log_softmax(logits_slice.float(), dim=-1)
            losses.append(-log_probs[slice_rows % per_slice, slice_targets])
    return torch.empty(len(rows), device=logits.device).index_copy_(0, order, torch.cat(losses))


def score_batch(model: torch.nn.Module, batch: list[dict], device: torch.device) -> torch.Tensor:
    """Summed cross-entropy (nats) of each ending given its context: (B, 4), float32 on the CPU. One forward for the
    batch, packed by `pack_batch`; logits only for the last positions, which hold every ending, where the model
    accepts `logits_to_keep`, and the log-softmax in fp32 (whatever the model's dtype) only where an ending token
    is predicted."""
    packed = pack_batch(batch)
    # Additive float mask (0 / most negative): what every attention implementation accepts as a custom 4-D mask
    # (eager attention adds it to the scores; a boolean mask would be added as 0/1 there).
    dtype = next(model.parameters()).dtype
    attention_bias = torch.zeros(packed.attention_allowed.shape, dtype=dtype).masked_fill(
        ~packed.attention_allowed, torch.finfo(dtype).min)[:, None]  # (B, 1, T, T)
    keep = {"logits_to_keep": packed.logits_needed} if accepts_logits_to_keep(model) else {}
    logits = model(
        packed.input_ids.to(device), attention_mask=attention_bias.to(device),
        position_ids=packed.position_ids.to(device), use_cache=False, **keep,
    ).logits  # (B, kept, V): the last `kept` positions, all T without logits_to_keep
    B, kept, _ = logits.shape
    first_kept = packed.input_ids.shape[1] - kept
    rows = packed.predictors[:, 0] * kept + packed.predictors[:, 1] - first_kept  # in logits.flatten(0, 1)
    losses = token_losses(logits.flatten(0, 1), rows.to(logits.device), packed.targets.to(logits.device)).cpu()
    return torch.zeros(NUM_ENDINGS * B).index_add_(0, packed.ending_index, losses).view(B, NUM_ENDINGS)


@functools.cache
def load_metric():
    """The shipped `evaluate` metric, by path (no Hub), in memory (no cache files shared between processes); loaded
    once per process."""
    import evaluate

    return evaluate.load(str(METRIC_PATH), keep_in_memory=True)


def longest_first(tokenized: list[dict | None]) -> list[int]:
    """The order in which `score_share` scores its examples (from `fit_to_context`; None: skipped): longest first,
    so that similar lengths share a batch (little padding) and an out-of-memory shows up at once."""
    return sorted(
        (j for j, ex in enumerate(tokenized) if ex is not None),
        key=lambda j: (sum(map(len, tokenized[j]["endings"])), len(tokenized[j]["context"])),
        reverse=True,
    )


def score_share(model: torch.nn.Module, tokenizer, examples: list[dict], indices: list[int], style: str,
                batch_size: int, device: torch.device, show_progress: bool) -> list[dict]:
    """This process's share of `evaluate_hellaswag`: the prediction records of examples[indices]."""
    max_positions = context_window(model)
    tokenized = [fit_to_context(ex, max_positions)
                 for ex in tokenize_examples([examples[i] for i in indices], tokenizer, style)]
    records = [{"index": indices[j], "ind": examples[indices[j]].get("ind"), "label": examples[indices[j]]["label"],
                "skipped": True, "context_tokens_dropped": None, "pred": None, "pred_norm": None,
                "ending_nll": None, "ending_nll_norm": None}
               for j, ex in enumerate(tokenized) if ex is None]
    order = longest_first(tokenized)

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), tqdm(total=len(order), desc=f"HellaSwag ({style})", unit="example",
                                          disable=not show_progress) as progress:
            for start in range(0, len(order), batch_size):
                batch_positions = order[start: start + batch_size]
                batch = [tokenized[j] for j in batch_positions]
                losses = score_batch(model, batch, device)  # (B, 4)
                norm_losses = losses / torch.tensor([ex["norm_divisors"] for ex in batch], dtype=torch.float32)
                for j, ex_losses, ex_norm_losses in zip(batch_positions, losses.tolist(), norm_losses.tolist(),
                                                        strict=True):
                    index = indices[j]
                    records.append({
                        "index": index,
                        "ind": examples[index].get("ind"),
                        "label": examples[index]["label"],
                        "skipped": False,
                        "context_tokens_dropped": tokenized[j]["context_tokens_dropped"],
                        "pred": min(range(NUM_ENDINGS), key=ex_losses.__getitem__),  # first of ties, like argmin
                        "pred_norm": min(range(NUM_ENDINGS), key=ex_norm_losses.__getitem__),
                        "ending_nll": ex_losses,
                        "ending_nll_norm": ex_norm_losses,
                    })
                progress.update(len(batch))
    finally:
        model.train(was_training)
    return records


def evaluate_hellaswag(
    model: torch.nn.Module,
    tokenizer,
    examples: list[dict],
    *,
    style: str = "completion",
    batch_size: int = 8,
    accelerator: Accelerator | None = None,
    limit: int | None = None,
    show_progress: bool = True,
    return_predictions: bool = False,
) -> dict:
    """Score `examples` (from `hellaswag_data.load_hellaswag`) with a causal LM; returns the metric's dict: acc,
    acc_norm, correct, correct_norm, count (the examples scored), plus `truncated` and `skipped`, and `predictions`
    if asked: per example, in input order, its `index` in `examples`, the dataset's `ind`, `label`, `skipped`,
    `context_tokens_dropped`, `pred` (lowest summed loss), `pred_norm` (lowest normalised loss), and the 4
    endings' `ending_nll` (summed negative log-likelihood, nats) and `ending_nll_norm` (per token in completion
    style, per character in harness style); a skipped example has None in the last five.

    An example longer than the model's context (`context_window`) has its context cut from the left to fit
    (`fit_to_context`) and counts as `truncated`; one whose ending alone fills the context is not scored and
    counts as `skipped`. When every example is skipped, acc and acc_norm are NaN and count is 0: a training
    run's evaluation reports that rather than stopping the run.

    The model stays where and how the caller put it (device, dtype, autocast); it is put in eval mode and its
    training mode restored afterwards. With an `accelerator`, every process must call this: each scores a
    disjoint share of the examples and the results are gathered once per example, so every process returns
    the same dict.
    """
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    examples = examples[:limit] if limit is not None else examples
    if not examples:
        raise ValueError("no HellaSwag examples to evaluate")
    if accelerator is not None:
        model = accelerator.unwrap_model(model)  # no DDP forward: the processes run different numbers of batches
    device = next(model.parameters()).device

    indices = list(range(len(examples)))
    distributed = accelerator is not None and accelerator.num_processes > 1
    if distributed:
        # A contiguous, unpadded share each: no example is scored twice.
        with accelerator.split_between_processes(indices) as share:
            indices = list(share)
    failure = None
    try:
        records = score_share(model, tokenizer, examples, indices, style, batch_size, device,
                              show_progress and (accelerator is None or accelerator.is_local_main_process))
    except Exception as error:
        if not distributed:
            raise
        # Every process must reach the gather below, or the others would wait there until the process-group
        # timeout: the failure travels with the results and every process raises it.
        failure = f"process {accelerator.process_index}: {type(error).__name__}: {first_line(error)}"
        records = []
    if distributed:
        from accelerate.utils import gather_object

        failures = [f for f in gather_object([failure]) if f is not None]
        if failures:
            raise HellaSwagScoringError(f"HellaSwag scoring failed on {failures[0]}")
        records = gather_object(records)
    records.sort(key=lambda record: record["index"])
    if [record["index"] for record in records] != list(range(len(examples))):
        raise RuntimeError("HellaSwag results were not gathered exactly once per example")
    scored = [r for r in records if not r["skipped"]]
    if scored:
        # Loaded after the scoring, not before: importing `evaluate` (and `datasets`) is half a second of start-up.
        # The first load copies the module into evaluate's cache: the main process first.
        with accelerator.main_process_first() if accelerator is not None else contextlib.nullcontext():
            metric = load_metric()
        result = metric.compute(
            predictions=[r["pred"] for r in scored],
            predictions_norm=[r["pred_norm"] for r in scored],
            references=[r["label"] for r in scored],
        )
    else:  # the metric refuses an empty list
        result = {"acc": math.nan, "acc_norm": math.nan, "correct": 0, "correct_norm": 0, "count": 0}
    result["truncated"] = sum(1 for r in scored if r["context_tokens_dropped"])
    result["skipped"] = len(records) - len(scored)
    if return_predictions:
        result["predictions"] = records
    return result
