"""HellaSwag scoring speed: eval_hellaswag.evaluate_hellaswag against the one-example-at-a-time method.

The reference method is build-nanogpt's: per example, the 4 rows context + ending padded to the longest, one
forward with logits at every position, cross-entropy everywhere, then the ending positions summed. Both run
on the same randomly initialised GPT-2 124M-shaped model (GPT2ReproForCausalLM) and the same synthetic,
HellaSwag-sized examples (contexts ~40 tokens, endings ~20), in this process, interleaved chunk by chunk
(the machine is shared and noisy). Prints the median examples/s of each over the chunks and their ratio, and
checks that both methods pick the same endings.

    python benchmarks/bench_hellaswag.py
    python benchmarks/bench_hellaswag.py --examples 40 --chunks 4 --dtype bfloat16
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from configuration_gpt2repro import GPT2ReproConfig  # noqa: E402
from eval_hellaswag import evaluate_hellaswag, render_example  # noqa: E402
from hardware import pin_cpu_allocator, resolve_dtype  # noqa: E402
from modeling_gpt2repro import GPT2ReproForCausalLM  # noqa: E402
from tokenization_gpt2repro import get_tokenizer  # noqa: E402

# Short common words: each is one GPT-2 token with its leading space, so n words ~ n tokens.
WORDS = ("the a man woman he she it they then and is are was on in at to of with his her their up down over "
         "into water ball car dog rope knife paint wall floor hand hands head arm side front back top small "
         "large red blue white black new old first next last long high low good right left "
         "walks runs jumps picks puts holds cuts wipes throws smiles turns looks stands sits moves starts").split()


def synthetic_examples(n: int, seed: int) -> list[dict]:
    """HellaSwag-shaped examples: contexts of 30-50 words, endings of 12-28 (HellaSwag's ActivityNet half)."""
    rng = random.Random(seed)

    def text(low: int, high: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high))).capitalize() + "."

    examples = []
    for _ in range(n):
        ctx = text(30, 50)
        examples.append({"ctx": ctx, "activity_label": "Synthetic", "ctx_a": ctx, "ctx_b": "",
                         "endings": [text(12, 28) for _ in range(4)], "label": rng.randrange(4)})
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=100)
    parser.add_argument("--chunks", type=int, default=5,
                        help="the examples are timed in this many chunks, both methods interleaved chunk by chunk")
    parser.add_argument("--batch_size", type=int, default=8, help="evaluate_hellaswag's examples per forward")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                        help="weights' dtype, both; auto: bfloat16 where this CPU has native bf16, else float32")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not 1 <= args.chunks <= args.examples:
        parser.error("--chunks must be between 1 and --examples")

    args.dtype, precision_line = resolve_dtype(args.dtype, torch.device("cpu"))
    print(precision_line)
    # glibc hands freed blocks over 32 MB back to the OS and page-faults them in again: noisy system time for
    # whichever method allocates more. Both run under the pinned allocator, as training does.
    pin_cpu_allocator()
    torch.manual_seed(args.seed)
    model = GPT2ReproForCausalLM(GPT2ReproConfig()).to(getattr(torch, args.dtype)).eval()  # GPT-2 124M shape
    tokenizer = get_tokenizer()
    examples = synthetic_examples(args.examples, args.seed)
    context_tokens = statistics.mean(len(tokenizer(e["ctx"])["input_ids"]) for e in examples)
    ending_tokens = statistics.mean(len(tokenizer(" " + x)["input_ids"]) for e in examples for x in e["endings"])
    print(f"{len(examples)} examples, mean context {context_tokens:.1f} tokens, mean ending {ending_tokens:.1f} "
          f"tokens; GPT-2 124M shape, {args.dtype}, {torch.get_num_threads()} threads")

    one_at_a_time(model, tokenizer, examples[:2])  # warm up both paths
    evaluate_hellaswag(model, tokenizer, examples[:2], show_progress=False)
    # Each example is scored once by each method; the chunks give the repetitions, each timed back to back.
    chunk_size = -(-len(examples) // args.chunks)  # ceil
    rates = {"one example at a time": [], "evaluate_hellaswag": []}
    same_picks = 0
    for start in range(0, len(examples), chunk_size):
        chunk = examples[start: start + chunk_size]
        t0 = time.perf_counter()
        reference_picks = one_at_a_time(model, tokenizer, chunk)
        t1 = time.perf_counter()
        result = evaluate_hellaswag(model, tokenizer, chunk, batch_size=args.batch_size, show_progress=False,
                                    return_predictions=True)
        t2 = time.perf_counter()
        rates["one example at a time"].append(len(chunk) / (t1 - t0))
        rates["evaluate_hellaswag"].append(len(chunk) / (t2 - t1))
        same_picks += sum(p["pred"] == r for p, r in zip(result["predictions"], reference_picks, strict=True))
        print(f"examples {start}-{start + len(chunk) - 1}: one at a time {rates['one example at a time'][-1]:.2f} "
              f"ex/s, evaluate_hellaswag {rates['evaluate_hellaswag'][-1]:.2f} ex/s")
    medians = {name: statistics.median(values) for name, values in rates.items()}
    for name, median in medians.items():
        print(f"{name:>22}: {median:.2f} examples/s (median of {len(rates[name])} chunks)")
    print(f"speed-up: {medians['evaluate_hellaswag'] / medians['one example at a time']:.2f}x; "
          f"same endings picked: {same_picks}/{len(examples)}")


if __name__ == "__main__":
    main()
