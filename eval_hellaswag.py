"""HellaSwag (validation, 10,042 examples) for any causal LM: ours, stock `gpt2`, any AutoModelForCausalLM.

Each example is a context and 4 candidate endings; the model picks the ending it finds most likely.
Two scoring styles:
- completion (default; build-nanogpt, llm.c): context = `ctx`, ending = " " + ending; the loss is the
  cross-entropy of the ending tokens only. acc picks the lowest summed loss, acc_norm the lowest loss per
  ending token. OpenAI GPT-2 124M in fp32: acc 0.2859, acc_norm 0.2955.
- harness (lm-evaluation-harness): context = "<activity_label>: <ctx_a> <Ctx_b>" with WikiHow markup cleaned
  up; acc picks the highest summed log-likelihood, acc_norm the highest log-likelihood per character of the
  ending. OpenAI GPT-2 124M: acc 28.92%, acc_norm 31.14%.

The accuracies come from the `evaluate` metric in `gpt2repro/hellaswag_accuracy.py` (loaded by path: offline).

An example longer than the model's context (n_positions or max_position_embeddings) loses the start of its context,
as in lm-evaluation-harness; one whose ending alone fills the context is skipped; the result counts both
(`truncated`, `skipped`). How the examples are packed and scored fast: `gpt2repro/hellaswag.py`.

    python eval_hellaswag.py --model openai-community/gpt2
    python eval_hellaswag.py --model out/checkpoint --style harness --dtype bfloat16 --limit 1000 --seed 0
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 eval_hellaswag.py --model out/checkpoint

From a training loop (every process calls it; each scores its share of the examples):

    from gpt2repro.hellaswag import evaluate_hellaswag
    from gpt2repro.hellaswag_data import load_hellaswag

    examples = load_hellaswag()
    result = evaluate_hellaswag(model, tokenizer, examples, accelerator=accelerator)  # {"acc", "acc_norm", ...}
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gpt2repro.cli import CommandError, run_command
from gpt2repro.hellaswag import HellaSwagScoringError, context_window, evaluate_hellaswag
from gpt2repro.hellaswag_data import STYLES, default_cache_dir, load_hellaswag_on_every_process, random_sample
from gpt2repro.hellaswag_run import check_report_path, load_model, load_model_tokenizer, write_report
from gpt2repro.launch import pin_cpu_allocator, resolve_dtype


def build_parser() -> argparse.ArgumentParser:
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
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch_size must be at least 1")
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be at least 1")
    if args.seed is not None and args.limit is None:
        parser.error("--seed needs --limit: it draws the random sample of --limit examples")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # An error is met by every process alike (the inputs all of them read, the gathered scoring) or by the main
    # process alone (writing --output_json): rank 0 prints it, once.
    run_command(lambda: score_from_command_line(args), "nothing was written: run the same command again")


def score_from_command_line(args: argparse.Namespace) -> None:
    from accelerate import Accelerator

    from gpt2repro.tokenizer import get_tokenizer

    accelerator = Accelerator()
    if accelerator.device.type == "cpu":
        pin_cpu_allocator()  # as training does: the logits (~100 MB a batch) would page-fault in again each batch
    # The user's inputs are all checked before the model loads and the scoring runs: a mistake costs seconds.
    output = None if args.output_json is None else Path(args.output_json)
    if output is not None:
        check_report_path(output, args.data_file)
    examples = load_hellaswag_on_every_process(accelerator, args.data_file, args.cache_dir)
    if args.limit is not None and args.limit > len(examples):
        raise CommandError(f"--limit {args.limit} is more than the {len(examples)} examples of "
                           f"{args.data_file or 'the HellaSwag validation split'}")
    if args.limit is not None and args.seed is not None:
        examples = random_sample(examples, args.limit, args.seed)
    dtype, precision_line = resolve_dtype(args.dtype, accelerator.device)
    model = load_model(args.model, dtype)
    accelerator.print(precision_line, file=sys.stderr)  # once the model loaded: an error stays the only line
    model.to(accelerator.device)
    tokenizer = load_model_tokenizer(args.model)
    if tokenizer is None:
        print(f"{args.model} has no usable tokenizer: using GPT-2's", file=sys.stderr)
        tokenizer = get_tokenizer()

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
    accelerator.print(f"HellaSwag {args.style} ({result['count']} examples, {dtype}): "
                      f"acc {result['acc']:.4f}  acc_norm {result['acc_norm']:.4f}{fitted}")
    if output is not None and accelerator.is_main_process:
        write_report(output, {"model": args.model, "style": args.style, "dtype": dtype, "data_file": args.data_file,
                              **result, "predictions": predictions})


if __name__ == "__main__":
    main()
