"""Tokens to the same validation loss: the GPT-2 recipe against the speedrun recipe (--recipe speedrun), on CPU.

Both recipes train the same model shape on the same shards with the same seed for the same number of steps (of the
same tokens), with validation loss over the same val tokens every --eval_every steps. For each corpus the table gives
the GPT-2 recipe's final val loss, the first evaluation at which the speedrun's val loss is at or below it (mid-run,
before its own final decay), and that step's share of the tokens; loss_vs_tokens.png draws both curves.

    python benchmarks/bench_recipe.py                      # KJV and Python's standard library, ~25 min on 2 cores

The shape (4 layers, width 128, T 128) gives the blocks 0.79M of 7.2M parameters (tied), 11%: twice the cpu-demo
model's 6% (width 64), where the 50304-row embedding leaves Muon, which only acts on the blocks, little to work on;
wider would cost more CPU time than this benchmark has (the lm_head matmul grows with the width too). Each
corpus's two runs go side by side, one CPU thread each; the comparison is per token, so their speeds do not matter.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from gpt2repro.recipes import PRESETS  # noqa: E402

SHAPE = ["--n_layer", "4", "--n_head", "4", "--n_embd", "128", "--seq_len", "128"]
PRESETS_OF_RECIPES = {"gpt2": "cpu-demo", "speedrun": "cpu-demo-speedrun"}
STDLIB_CHARS = 4_000_000  # 148 files, 1.8M tokens of Python 3.11 source (the KJV: 1.0M tokens)


def write_stdlib_corpus(path: Path) -> None:
    """The .py files of this Python's standard library, one document each, in path order, up to STDLIB_CHARS."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    total = 0
    with open(path, "w") as f:
        for source in sorted(stdlib.glob("*.py")):  # top level only: no tests, no vendored packages
            text = source.read_text(encoding="utf-8", errors="replace")
            f.write(json.dumps({"text": text}) + "\n")
            total += len(text)
            if total >= STDLIB_CHARS:
                break


def prepare(corpus: str, data_dir: Path) -> None:
    if (data_dir / "manifest.json").exists():
        return
    command = [sys.executable, str(REPO / "prepare_data.py"), "--output_dir", str(data_dir), "--shard_size",
               str(2**18), "--val_tokens", str(2**16)]
    if corpus == "kjv":
        command += ["--dataset", "embedded"]
    else:
        corpus_file = data_dir.parent / "stdlib.jsonl"
        write_stdlib_corpus(corpus_file)
        command += ["--data_files", str(corpus_file)]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)


def train_both(data_dir: Path, output_dir: Path, args: argparse.Namespace) -> None:
    """Both recipes at once, one thread each (the cpu-demo preset's batch, val tokens and values for each recipe)."""
    runs = []
    for recipe, preset in PRESETS_OF_RECIPES.items():
        if (output_dir / recipe / "checkpoints" / f"step_{args.steps:06d}").exists():
            continue
        command = [sys.executable, str(REPO / "train_accelerate.py"), "--preset", preset,
                   *SHAPE, "--data_dir", str(data_dir), "--output_dir", str(output_dir / recipe), "--max_steps",
                   str(args.steps), "--eval_every", str(args.eval_every), "--checkpoint_every", str(args.steps),
                   "--num_samples", "0", "--seed", str(args.seed)]
        with open(output_dir / f"{recipe}.log", "w") as log:  # the child keeps its own copy of the descriptor
            runs.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                         env=dict(os.environ, OMP_NUM_THREADS="1")))
    for run in runs:
        if run.wait() != 0:
            raise SystemExit(f"a training run failed: see {output_dir}/*.log")


def val_curve(run_dir: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["val_loss"]) for r in records if r["type"] == "eval"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="runs/bench_recipe", help="data, runs, the table and the plot")
    parser.add_argument("--steps", type=int, default=250, help="optimiser steps of 1,024 tokens for both recipes")
    parser.add_argument("--eval_every", type=int, default=25, help="steps between val-loss evaluations")
    parser.add_argument("--seed", type=int, default=1337, help="the same seed for both recipes")
    parser.add_argument("--corpora", nargs="+", choices=["kjv", "stdlib"], default=["kjv", "stdlib"],
                        help="kjv: the embedded King James Bible; stdlib: this Python's standard library source")
    args = parser.parse_args()
    output_dir = Path(args.output_dir)
    curves = {}
    for corpus in args.corpora:
        corpus_dir = output_dir / corpus
        corpus_dir.mkdir(parents=True, exist_ok=True)
        prepare(corpus, corpus_dir / "data")
        train_both(corpus_dir / "data", corpus_dir, args)
        curves[corpus] = {recipe: val_curve(corpus_dir / recipe) for recipe in PRESETS_OF_RECIPES}

    tokens_per_step = PRESETS["cpu-demo"]["total_batch_size"]
    lines = ["| corpus | GPT-2 recipe: final val loss (tokens) | speedrun: first eval at or below it (tokens) | "
             "share of the tokens | speedrun: final val loss |", "|---|---|---|---|---|"]
    for corpus, by_recipe in curves.items():
        target_step, target = by_recipe["gpt2"][-1]
        reached = next(((s, v) for s, v in by_recipe["speedrun"] if v <= target), None)
        reached_text = (f"{reached[1]:.3f} at step {reached[0]} ({reached[0] * tokens_per_step:,})" if reached
                        else "not reached")
        share = f"{reached[0] / target_step:.0%}" if reached else "-"
        lines.append(f"| {corpus} | {target:.3f} ({target_step * tokens_per_step:,}) | {reached_text} | {share} | "
                     f"{by_recipe['speedrun'][-1][1]:.3f} |")
    table = "\n".join(lines)
    print(table)
    (output_dir / "table.md").write_text(table + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(7 * len(curves), 4.5), squeeze=False)
    for ax, (corpus, by_recipe) in zip(axes[0], curves.items(), strict=True):
        for recipe, curve in by_recipe.items():
            ax.plot([s * tokens_per_step for s, _ in curve], [v for _, v in curve], "o-", ms=3, label=recipe)
        ax.axhline(by_recipe["gpt2"][-1][1], color="gray", ls="--", lw=0.8, label="GPT-2 recipe's final")
        ax.set(title=f"{corpus}: 4 layers x 128, T 128", xlabel="tokens", ylabel="val loss", ylim=(None, 8))
        ax.legend()
    fig.tight_layout()
    fig.savefig(output_dir / "loss_vs_tokens.png", dpi=100)
    print(f"wrote {output_dir / 'table.md'} and {output_dir / 'loss_vs_tokens.png'}")


if __name__ == "__main__":
    main()
