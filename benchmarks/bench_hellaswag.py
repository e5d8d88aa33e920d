"""HellaSwag scoring speed: the command's path (gpt2repro.hellaswag.evaluate_hellaswag) against one example at a time
and against its ceiling, and the command's start-up.

- command path: evaluate_hellaswag as eval_hellaswag.py runs it (tokenising, packing, the 4-D mask, logits only
  at the ending positions, the fp32 cross-entropy, the metric).
- one at a time: build-nanogpt's method: per example, the 4 rows context + ending padded to the longest, one
  forward with logits at every position, cross-entropy everywhere, then the ending positions summed.
- ceiling: one plain batched forward per batch over the same packed tokens (the command's batches, in its order),
  no mask, no position ids, logits only for the last positions that hold the endings (`logits_to_keep`), nothing
  after it: what the command's forwards would cost with no work around them.

Each runs on a randomly initialised transformers GPT2LMHeadModel ("stock") and on ours (GPT2ReproForCausalLM, the
same weights), at the 4-layer size and at 124M, over synthetic HellaSwag-shaped rows (no HellaSwag data offline),
the three methods interleaved repetition by repetition (the machine is shared and noisy); the medians are printed.
The start-up is the time from launching `python eval_hellaswag.py` on a saved 4-layer checkpoint to its first
scored batch; its median over a few launches is printed with the whole command's time.

    python benchmarks/bench_hellaswag.py
    python benchmarks/bench_hellaswag.py --sizes 4-layer --models stock --repeats 3 --dtype float32
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from gpt2repro.hellaswag import (  # noqa: E402
    evaluate_hellaswag,
    fit_to_context,
    longest_first,
    pack_batch,
    tokenize_examples,
)
from gpt2repro.hellaswag_data import render_example  # noqa: E402
from gpt2repro.launch import cpu_bf16_flags, pin_cpu_allocator, resolve_dtype  # noqa: E402
from gpt2repro.tokenizer import get_tokenizer  # noqa: E402
from modeling_gpt2repro import GPT2ReproForCausalLM  # noqa: E402

SIZES = {  # model shape; examples timed per repetition (one at a time: a quarter of them)
    "4-layer": (dict(n_layer=4, n_head=4, n_embd=256), 96),
    "124M": (dict(n_layer=12, n_head=12, n_embd=768), 48),
}
# Short common words: each is one GPT-2 token with its leading space, so n words ~ n tokens.
WORDS = ("the a man woman he she it they then and is are was on in at to of with his her their up down over "
         "into water ball car dog rope knife paint wall floor hand hands head arm side front back top small "
         "large red blue white black new old first next last long high low good right left "
         "walks runs jumps picks puts holds cuts wipes throws smiles turns looks stands sits moves starts").split()
# eval_hellaswag.main with the time of its first scored batch on stderr: the start-up ends there.
STARTUP_PROBE = """
import sys, time
import eval_hellaswag
from gpt2repro import hellaswag

score_batch = hellaswag.score_batch
def timed_score_batch(*args, **kwargs):
    if timed_score_batch.first:
        print(f"first batch at {time.time()}", file=sys.stderr, flush=True)
        timed_score_batch.first = False
    return score_batch(*args, **kwargs)
timed_score_batch.first = True
hellaswag.score_batch = timed_score_batch
eval_hellaswag.main(sys.argv[1:])
"""


def synthetic_examples(n: int, seed: int) -> list[dict]:
    """HellaSwag-shaped examples: contexts of 60-100 words, 4 endings of 15-30 (a word ~ a token)."""
    rng = random.Random(seed)

    def text(low: int, high: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high))).capitalize() + "."

    examples = []
    for i in range(n):
        ctx = text(60, 100)
        examples.append({"ind": i, "ctx": ctx, "activity_label": "Synthetic", "ctx_a": ctx, "ctx_b": "",
                         "endings": [text(15, 30) for _ in range(4)], "label": rng.randrange(4)})
    return examples


def one_at_a_time(model: torch.nn.Module, tokenizer, examples: list[dict]) -> list[int]:
    """The reference method; returns the ending picked (lowest summed loss) per example."""
    picks = []
    for example in examples:
        context, continuations, _ = render_example(example, "completion")
        context_ids = tokenizer(context)["input_ids"]
        rows = [context_ids + tokenizer(c)["input_ids"] for c in continuations]
        T = max(map(len, rows))
        tokens = torch.zeros(4, T, dtype=torch.long)
        ending_mask = torch.zeros(4, T)
        for i, row in enumerate(rows):
            tokens[i, : len(row)] = torch.tensor(row)
            ending_mask[i, len(context_ids): len(row)] = 1
        with torch.inference_mode():
            logits = model(tokens).logits  # (4, T, V): every position
            losses = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="none")
        summed = (losses.view(4, T - 1) * ending_mask[:, 1:]).sum(dim=1)  # position t predicts token t + 1
        picks.append(int(summed.argmin()))
    return picks


def plain_forwards(model: torch.nn.Module, batches: list) -> None:
    """The ceiling: the command's forwards over its packed batches, with nothing around them."""
    with torch.inference_mode():
        for packed in batches:
            model(packed.input_ids, logits_to_keep=packed.logits_needed, use_cache=False)


def bench_model(model: torch.nn.Module, tokenizer, examples: list[dict], batch_size: int,
                repeats: int) -> tuple[dict[str, float], str]:
    """Median examples/s of the three methods, interleaved repetition by repetition, and how many of the examples
    scored one at a time got the same ending picked by the command path (near-ties may round apart in bf16)."""
    tokenized = [fit_to_context(ex, model.config.n_positions) for ex in tokenize_examples(examples, tokenizer,
                                                                                          "completion")]
    order = longest_first(tokenized)
    batches = [pack_batch([tokenized[j] for j in order[start: start + batch_size]])
               for start in range(0, len(order), batch_size)]
    reference_examples = examples[: max(1, len(examples) // 4)]  # the slow method: fewer examples, same rate
    methods = {
        "command path": (examples, lambda: evaluate_hellaswag(model, tokenizer, examples, batch_size=batch_size,
                                                              show_progress=False, return_predictions=True)),
        "one at a time": (reference_examples, lambda: one_at_a_time(model, tokenizer, reference_examples)),
        "ceiling": (examples, lambda: plain_forwards(model, batches)),
    }
    evaluate_hellaswag(model, tokenizer, examples[:batch_size], show_progress=False)  # warm up every path
    one_at_a_time(model, tokenizer, examples[:1])
    plain_forwards(model, batches[-1:])
    rates = {name: [] for name in methods}
    outputs = {}
    for _ in range(repeats):
        for name, (timed_examples, run) in methods.items():
            start = time.perf_counter()
            outputs[name] = run()
            rates[name].append(len(timed_examples) / (time.perf_counter() - start))
    picks = [p["pred"] for p in outputs["command path"]["predictions"][: len(reference_examples)]]
    same_picks = sum(a == b for a, b in zip(picks, outputs["one at a time"], strict=True))
    return {name: statistics.median(values) for name, values in rates.items()}, f"{same_picks}/{len(picks)}"


def bench_startup(model: GPT2LMHeadModel, tokenizer, dtype: str, batch_size: int,
                  launches: int) -> tuple[float, float, int]:
    """(median start-up s, median whole command s, examples) of `python eval_hellaswag.py` on `model` saved with
    its tokenizer, over synthetic examples."""
    examples = synthetic_examples(4 * batch_size, seed=1)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        data_file = Path(folder) / "val.jsonl"
        data_file.write_text("".join(json.dumps(example) + "\n" for example in examples))
        startups, totals = [], []
        for _ in range(launches):
            launched = time.time()
            out = subprocess.run([sys.executable, "-c", STARTUP_PROBE, "--model", folder, "--data_file",
                                  str(data_file), "--dtype", dtype, "--batch_size", str(batch_size)],
                                 env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
            totals.append(time.time() - launched)
            if out.returncode != 0:
                raise RuntimeError(f"eval_hellaswag.py failed: {out.stderr[-2000:]}")
            startups.append(float(re.search(r"first batch at ([0-9.]+)", out.stderr).group(1)) - launched)
    return statistics.median(startups), statistics.median(totals), len(examples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    parser.add_argument("--models", nargs="+", choices=("stock", "ours"), default=["stock", "ours"])
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repetitions; 124M does 3 at most")
    parser.add_argument("--launches", type=int, default=3, help="command launches timed for the start-up")
    parser.add_argument("--batch_size", type=int, default=8, help="evaluate_hellaswag's examples per forward")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                        help="weights' dtype; auto: bfloat16 where this CPU has native bf16, else float32")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    args.dtype, precision_line = resolve_dtype(args.dtype, torch.device("cpu"))
    cpu = " + ".join([torch.backends.cpu.get_cpu_capability(), *cpu_bf16_flags()])  # e.g. AVX512 + avx512_bf16
    print(f"{precision_line}; CPU {cpu}, {torch.get_num_threads()} threads")
    # glibc hands freed blocks over 32 MB back to the OS and page-faults them in again: noisy system time for
    # whichever method allocates more. All run under the pinned allocator, as the command does.
    pin_cpu_allocator()
    tokenizer = get_tokenizer()
    print("synthetic HellaSwag-shaped rows (no HellaSwag data offline): contexts of 60-100 common words, 4 endings "
          "of 15-30, one GPT-2 token a word")
    print(f"{'size':>8} {'model':>6} {'examples':>8} {'command ex/s':>12} {'one at a time':>13} {'speed-up':>8} "
          f"{'ceiling ex/s':>12} {'of ceiling':>10} {'same picks':>10}")
    for size in args.sizes:
        shape, num_examples = SIZES[size]
        torch.manual_seed(args.seed)
        stock = GPT2LMHeadModel(GPT2Config(**shape)).to(getattr(torch, args.dtype)).eval()
        models = {"stock": stock, "ours": GPT2ReproForCausalLM.from_gpt2(stock).to(getattr(torch, args.dtype)).eval()}
        examples = synthetic_examples(num_examples, args.seed)
        for name in args.models:
            rates, same_picks = bench_model(models[name], tokenizer, examples, args.batch_size,
                                args.repeats if size == "4-layer" else min(args.repeats, 3))
            print(f"{size:>8} {name:>6} {num_examples:>8} {rates['command path']:>12.2f} "
                  f"{rates['one at a time']:>13.2f} {rates['command path'] / rates['one at a time']:>7.1f}x "
                  f"{rates['ceiling']:>12.2f} {rates['command path'] / rates['ceiling']:>10.0%} {same_picks:>10}")
        if size == "4-layer" and args.launches:
            startup, total, count = bench_startup(stock, tokenizer, args.dtype, args.batch_size, args.launches)
            print(f"start-up of python eval_hellaswag.py (stock 4-layer checkpoint, {count} examples): {startup:.2f} s "
                  f"to the first scored batch, {total:.2f} s in all (medians of {args.launches} launches)")


if __name__ == "__main__":
    main()
