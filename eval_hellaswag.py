"""HellaSwag (validation, 10,042 examples) for any causal LM: ours, stock `gpt2`, any AutoModelForCausalLM.

Each example is a context and 4 candidate endings; the model picks the ending it finds most likely.
Two scoring styles:
- completion (default; build-nanogpt, llm.c): context = `ctx`, ending = " " + ending; the loss is the
  cross-entropy of the ending tokens only. acc picks the lowest summed loss, acc_norm the lowest loss per
  ending token. OpenAI GPT-2 124M in fp32: acc 0.2859, acc_norm 0.2955.
- harness (lm-evaluation-harness): context = "<activity_label>: <ctx_a> <Ctx_b>" with WikiHow markup cleaned
  up; acc picks the highest summed log-likelihood, acc_norm the highest log-likelihood per character of the
  ending. OpenAI GPT-2 124M: acc 28.92%, acc_norm 31.14%.

The accuracies come from the `evaluate` metric in `hellaswag_accuracy.py` (loaded by path: offline).

How an example is scored, fast: its context and 4 endings are packed into one row, with an attention mask that
lets each ending see only the context and itself, so the context costs 1/4 of what 4 full rows would; logits
are computed only where an ending token is predicted. Several examples (padded and masked) share each forward,
sorted by length to keep padding small. The model must accept position_ids and a custom 4-D attention mask, as
transformers' models do. An example longer than the model's context (n_positions or max_position_embeddings)
loses the start of its context, as in lm-evaluation-harness; one whose ending alone fills the context is skipped;
the result counts both (`truncated`, `skipped`).

    python eval_hellaswag.py --model openai-community/gpt2
    python eval_hellaswag.py --model out/checkpoint --style harness --dtype bfloat16 --limit 1000 --seed 0
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 eval_hellaswag.py --model out/checkpoint

From a training loop (every process calls it; each scores its share of the examples):

    examples = load_hellaswag()
    result = evaluate_hellaswag(model, tokenizer, examples, accelerator=accelerator)  # {"acc", "acc_norm", ...}
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import inspect
import json
import math
import os
import random
import re
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import gpt2repro
from gpt2repro.atomic_files import atomic_write, ctrl_c_held, write_json_atomic
from gpt2repro.cli import CommandError, CommandStopped, first_line, run_command
from gpt2repro.launch import pin_cpu_allocator, resolve_dtype

HUB_DATASET = "Rowan/hellaswag"
ORIGINAL_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_{split}.jsonl"
ORIGINAL_SPLIT_NAMES = {"train": "train", "validation": "val", "test": "test"}  # the Hub's names -> the files'
NUM_ENDINGS = 4
TEXT_FIELDS = ("ctx", "activity_label", "ctx_a", "ctx_b")
METRIC_PATH = Path(gpt2repro.__file__).with_name("hellaswag_accuracy.py")  # in the package, in a checkout or installed
STYLES = ("completion", "harness")
CROSS_ENTROPY_SLICE_BYTES = 4 << 20  # fp32 logits per slice in token_losses: ~20 positions at GPT-2's vocabulary


class HellaSwagUnavailable(RuntimeError):
    """No HellaSwag data could be found locally or fetched."""


class HellaSwagFormatError(ValueError):
    """A HellaSwag record is malformed; the message names the file and line (or row)."""


class HellaSwagScoringError(RuntimeError):
    """Scoring failed on one of the processes; every process raises it alike, with that process's message."""


# ---- data ------------------------------------------------------------------------------------------------------------


def normalize_example(record: object, where: str) -> dict:
    """One HellaSwag record from either schema (label int or string) as {ctx, activity_label, ctx_a, ctx_b,
    endings (4 strings), label (int 0-3)}, plus the dataset's own id `ind` when it has one. `where` ("file:line")
    goes into every error message."""
    if not isinstance(record, dict):
        raise HellaSwagFormatError(f"{where}: expected a JSON object, got {type(record).__name__}")
    endings = record.get("endings")
    if not isinstance(endings, (list, tuple)) or len(endings) != NUM_ENDINGS \
            or not all(isinstance(e, str) and e for e in endings):
        raise HellaSwagFormatError(f"{where}: 'endings' must be a list of {NUM_ENDINGS} non-empty strings")
    for field in TEXT_FIELDS:
        if not isinstance(record.get(field), str):
            raise HellaSwagFormatError(f"{where}: '{field}' must be a string")
    if not record["ctx"].strip():
        raise HellaSwagFormatError(f"{where}: 'ctx' is empty, so there is nothing to continue")
    label = record.get("label")
    # The original jsonl has int labels; the Hub copy has strings ("" in the unlabelled test split).
    if isinstance(label, str) and label.strip().isdigit():
        label = int(label)
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < NUM_ENDINGS:
        raise HellaSwagFormatError(f"{where}: 'label' must be an ending index 0-{NUM_ENDINGS - 1}, got {label!r}")
    example = {**{field: record[field] for field in TEXT_FIELDS}, "endings": list(endings), "label": label}
    if "ind" in record:
        example["ind"] = record["ind"]
    return example


def read_hellaswag_file(path: str | os.PathLike) -> list[dict]:
    """A local HellaSwag file, .jsonl (one record a line) or .parquet, in either schema; at least one record."""
    path = Path(path)
    if not path.exists():
        raise HellaSwagUnavailable(f"HellaSwag data file {path} does not exist.")
    if not path.is_file():
        raise HellaSwagUnavailable(f"HellaSwag data file {path} is not a file (a jsonl or parquet file is needed).")
    if path.suffix.lower() == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except pa.ArrowInvalid:  # no parquet footer: another format, or cut short
            raise HellaSwagFormatError(f"{path}: not a parquet file, or a damaged one") from None
        except (pa.ArrowException, OSError) as err:
            raise HellaSwagFormatError(f"{path}: cannot be read as parquet ({first_line(err)})") from None
        if not rows:
            raise HellaSwagFormatError(f"{path}: no HellaSwag records (the parquet table has no rows)")
        return [normalize_example(row, f"{path}: row {i}") for i, row in enumerate(rows, start=1)]
    examples = []
    blank_lines = 0
    try:
        with open(path, "rb") as f:  # bytes: a line that is not UTF-8 is named like any other bad line
            for line_number, raw_line in enumerate(f, start=1):
                try:
                    line = raw_line.decode("utf-8")
                except UnicodeDecodeError:
                    raise HellaSwagFormatError(f"{path}:{line_number}: not UTF-8 text (is this a jsonl file?)") \
                        from None
                if not line.strip():
                    blank_lines += 1
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise HellaSwagFormatError(f"{path}:{line_number}: not valid JSON ({err.msg})") from None
                examples.append(normalize_example(record, f"{path}:{line_number}"))
    except OSError as err:  # e.g. no permission to read it
        raise HellaSwagUnavailable(f"HellaSwag data file {path} cannot be read: {err.strerror}") from None
    if not examples:
        raise HellaSwagFormatError(
            f"{path}: no HellaSwag records ({'only blank lines' if blank_lines else 'the file is empty'})"
        )
    return examples


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gpt2repro" / "hellaswag"


def load_hellaswag(data_file: str | None = None, split: str = "validation", cache_dir: str | None = None) -> list[dict]:
    """HellaSwag examples, normalised (see `normalize_example`).

    Sources, first found wins: `data_file` (jsonl or parquet); the original jsonl already downloaded into
    `cache_dir`; the Hub dataset `Rowan/hellaswag` through `datasets` (its own cache works offline with
    HF_HUB_OFFLINE=1); the original jsonl from GitHub, downloaded once into `cache_dir`.
    """
    if data_file is not None:
        return read_hellaswag_file(data_file)
    if split not in ORIGINAL_SPLIT_NAMES:
        raise ValueError(f"split must be one of {list(ORIGINAL_SPLIT_NAMES)}, got {split!r}")
    url = ORIGINAL_URL.format(split=ORIGINAL_SPLIT_NAMES[split])
    cached_file = Path(cache_dir or default_cache_dir()) / url.rsplit("/", 1)[-1]
    if cached_file.is_file():
        return read_hellaswag_file(cached_file)

    import datasets

    try:
        rows = datasets.load_dataset(HUB_DATASET, split=split)
    except (OSError, RuntimeError):
        pass  # unreachable, not cached, or a Hub layout this `datasets` cannot read: try the original file
    else:
        return [normalize_example(row, f"{HUB_DATASET} ({split}) row {i}") for i, row in enumerate(rows, start=1)]

    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            data = response.read()
    except OSError:  # URLError, timeouts, refused connections
        raise HellaSwagUnavailable(
            f"HellaSwag {split} data is not available offline: pass --data_file with a local HellaSwag jsonl or "
            f"parquet file, or go online so it can be fetched from the Hugging Face Hub ({HUB_DATASET}) or {url}."
        ) from None
    try:
        cached_file.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(cached_file, "wb") as f:  # concurrent processes never see half a file
            f.write(data)
    except OSError as err:
        raise HellaSwagUnavailable(
            f"HellaSwag {split} data was downloaded but cannot be cached in {cached_file.parent} ({err.strerror}): "
            f"pass --cache_dir with a writable folder."
        ) from None
    return read_hellaswag_file(cached_file)


def load_hellaswag_for_training(data_file: str | None) -> list[dict] | None:
    """The validation examples a training run scores at each evaluation (train_accelerate.py's --hellaswag_file), or
    None, with one notice, when no file was named and the data is neither cached nor downloadable. A named file that
    cannot be read is a CommandError: a typo must not cost a long run its HellaSwag curve."""
    try:
        return load_hellaswag(data_file)
    except HellaSwagFormatError as error:
        raise CommandError(f"--hellaswag_file: {error}") from None
    except HellaSwagUnavailable as error:
        if data_file:
            raise CommandError(str(error)) from None
        # load_hellaswag's own hint names this command's --data_file, so training says it in its own words
        tqdm.write("notice: HellaSwag is skipped: its data is neither cached nor downloadable from here; pass "
                   "--hellaswag_file with a local HellaSwag val jsonl or parquet file (--no-hellaswag silences this)")
        return None


# ---- scoring ---------------------------------------------------------------------------------------------------------


def harness_preprocess(text: str) -> str:
    """lm-evaluation-harness' HellaSwag text clean-up: WikiHow's " [title]" becomes a sentence break, other
    [bracketed] markup goes, and the double spaces that leaves are halved."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def render_example(example: dict, style: str) -> tuple[str, list[str], list[int] | None]:
    """(context, the 4 continuations as appended to it, each ending's length in characters for harness
    acc_norm or None when acc_norm is per token)."""
    if style == "completion":
        return example["ctx"], [" " + ending for ending in example["endings"]], None
    if style == "harness":
        context = harness_preprocess(
            example["activity_label"] + ": " + example["ctx_a"] + " " + example["ctx_b"].capitalize()
        )
        endings = [harness_preprocess(ending) for ending in example["endings"]]
        # max(1, ...): an ending made only of markup would otherwise divide by zero.
        return context, [" " + ending for ending in endings], [max(1, len(ending)) for ending in endings]
    raise ValueError(f"style must be one of {STYLES}, got {style!r}")


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
    accelerator=None,
    limit: int | None = None,
    show_progress: bool = True,
    return_predictions: bool = False,
) -> dict:
    """Score `examples` (from `load_hellaswag`) with a causal LM; returns the metric's dict: acc, acc_norm,
    correct, correct_norm, count (the examples scored), plus `truncated` and `skipped`, and `predictions` if
    asked: per example, in input order, its `index` in `examples`, the dataset's `ind`, `label`, `skipped`,
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


# ---- command line ----------------------------------------------------------------------------------------------------


def load_tokenizer(model_name: str):
    """The model's own tokenizer, or GPT-2's (offline) when the model has none: a checkpoint folder saved
    without one loads as an EMPTY tokenizer in transformers 5 rather than failing, hence the probe."""
    from transformers import AutoTokenizer

    from gpt2repro.tokenizer import get_tokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_name, trust_remote_code=True)
        if tokenizer("Hello world", add_special_tokens=False)["input_ids"]:
            return tokenizer
    except (OSError, ValueError):
        pass
    print(f"{model_name} has no usable tokenizer: using GPT-2's", file=sys.stderr)
    return get_tokenizer()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="HellaSwag validation accuracy of a causal LM (completion or lm-evaluation-harness scoring).",
        epilog="Multi-process: accelerate launch [--multi_gpu --num_processes N] eval_hellaswag.py --model ...",
    )
    parser.add_argument("--model", required=True, help="checkpoint folder or Hub id (e.g. openai-community/gpt2)")
    parser.add_argument("--data_file", default=None,
                        help="local HellaSwag .jsonl or .parquet (either schema); default: the Hub, else GitHub")
    parser.add_argument("--cache_dir", default=None,
                        help=f"where the GitHub jsonl is cached (default {default_cache_dir()})")
    parser.add_argument("--style", choices=STYLES, default="completion",
                        help="completion: build-nanogpt/llm.c scoring; harness: lm-evaluation-harness scoring")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                        help="weights' dtype; auto: bfloat16 on GPUs that support it and CPUs with native bf16 "
                             "(AVX512-BF16/AMX), else float32")
    parser.add_argument("--batch_size", type=int, default=8,
                        help="examples per forward (each one packed row: context + 4 endings)")
    parser.add_argument("--limit", type=int, default=None, help="score only N examples (the first N, or see --seed)")
    parser.add_argument("--seed", type=int, default=None,
                        help="with --limit: score a random sample of N examples drawn with this seed")
    parser.add_argument("--output_json", default=None, help="write the result and per-example predictions here")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch_size must be at least 1")
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be at least 1")
    if args.seed is not None and args.limit is None:
        parser.error("--seed needs --limit: it draws the random sample of --limit examples")
    return args


def output_problem(output: Path, data_file: str | None) -> str | None:
    """Why the result could not be written to `output` (--output_json), or None. Checked before the scoring, whose
    result would otherwise be lost."""
    if output.is_dir():
        return f"--output_json {output} is a folder: name a file, e.g. {output / 'hellaswag.json'}"
    if output.exists() and not output.is_file():
        return f"--output_json {output} is not a regular file"
    if data_file is not None and output.is_file() and Path(data_file).is_file() and output.samefile(data_file):
        return f"--output_json {output} is the --data_file: the result would overwrite the data"
    folder = output.absolute().parent
    while not folder.exists():  # folders still to be made: the nearest existing one must take them
        folder = folder.parent
    if not folder.is_dir():
        return f"--output_json {output}: {folder} is a file, so no folder can be made in it"
    try:
        tempfile.TemporaryFile(dir=folder).close()  # the sure test: root passes every os.access check
    except OSError as err:
        return f"--output_json {output}: cannot write in {folder} ({err.strerror})"
    return None


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # An error is met by every process alike (the inputs all of them read, the gathered scoring) or by the main
    # process alone (writing --output_json): rank 0 prints it, once.
    run_command(lambda: score_from_command_line(args), "nothing was written: run the same command again")


def score_from_command_line(args: argparse.Namespace) -> None:
    from accelerate import Accelerator
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    accelerator = Accelerator()
    if accelerator.device.type == "cpu":
        pin_cpu_allocator()  # as training does: the logits (~100 MB a batch) would page-fault in again each batch
    # The user's inputs are all checked before the model loads and the scoring runs: a mistake costs seconds.
    output = None if args.output_json is None else Path(args.output_json)
    if output is not None and (problem := output_problem(output, args.data_file)):
        raise CommandError(problem)
    error = None
    with accelerator.main_process_first():  # one download, then the others read the cached file
        try:  # caught inside, so that every process still reaches the barrier at the end of the block
            examples = load_hellaswag(args.data_file, cache_dir=args.cache_dir)
        except (HellaSwagUnavailable, HellaSwagFormatError) as err:
            error = err
    if error is not None:
        raise CommandError(str(error))
    if args.limit is not None and args.limit > len(examples):
        raise CommandError(f"--limit {args.limit} is more than the {len(examples)} examples of "
                           f"{args.data_file or 'the HellaSwag validation split'}")
    if args.limit is not None and args.seed is not None:
        sample = random.Random(args.seed).sample(range(len(examples)), args.limit)
        examples = [examples[i] for i in sorted(sample)]  # in dataset order; `ind` in the output names them
    model_path = Path(args.model).expanduser()
    if args.model.startswith(("/", ".", "~")) and not model_path.is_dir():
        raise CommandError(f"the model folder {args.model} "
                           f"{'is a file, not a folder' if model_path.exists() else 'does not exist'}")
    args.dtype, precision_line = resolve_dtype(args.dtype, accelerator.device)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            args.model, dtype=getattr(torch, args.dtype), trust_remote_code=True
        )
    # ValueError: a folder that holds no model config; SafetensorError: truncated or corrupt weights.
    except (OSError, ValueError, SafetensorError) as err:
        raise CommandError(f"could not load the model '{args.model}' (a checkpoint folder, e.g. a training "
                           f"checkpoint's hf/ folder, or a Hub id that needs the network or the local Hub "
                           f"cache): {first_line(err)}") from None
    accelerator.print(precision_line, file=sys.stderr)  # once the model loaded: an error stays the only line
    model.to(accelerator.device)
    tokenizer = load_tokenizer(args.model)

    try:
        result = evaluate_hellaswag(model, tokenizer, examples, style=args.style, batch_size=args.batch_size,
                                    accelerator=accelerator, limit=args.limit, return_predictions=True)
    except HellaSwagScoringError as error:
        raise CommandError(str(error)) from None
    predictions = result.pop("predictions")
    max_positions = context_window(model)
    if result["count"] == 0:
        raise CommandError(f"none of the {result['skipped']} examples fits the model's context of "
                           f"{max_positions} tokens: in each, an ending alone fills it")
    fitted = ""
    if result["truncated"] or result["skipped"]:
        fitted = (f"; longer than the model's context of {max_positions} tokens: {result['truncated']} cut from "
                  f"the left, {result['skipped']} skipped (an ending alone fills it)")
    accelerator.print(f"HellaSwag {args.style} ({result['count']} examples, {args.dtype}): "
                      f"acc {result['acc']:.4f}  acc_norm {result['acc_norm']:.4f}{fitted}")
    if output is not None and accelerator.is_main_process:
        report = {"model": args.model, "style": args.style, "dtype": args.dtype, "data_file": args.data_file,
                  **result, "predictions": predictions}
        try:
            output.parent.mkdir(parents=True, exist_ok=True)
            with ctrl_c_held() as ctrl_c:
                write_json_atomic(output, report)
        except OSError as err:  # e.g. the disk filled up: the previous file, if any, is intact
            raise CommandError(f"could not write --output_json {output}: {err.strerror or first_line(err)}") from None
        if ctrl_c:
            raise CommandStopped(f"error: interrupted while writing --output_json {output}, which was written whole")


if __name__ == "__main__":
    main()
