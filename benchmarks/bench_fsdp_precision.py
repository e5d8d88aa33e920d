"""FSDP2's precision against the recipe's numerics (DDP + bf16 autocast), on 2 CPU processes over gloo.

    python benchmarks/bench_fsdp_precision.py                 # 60 steps of a 4-layer, 128-wide GPT on the KJV corpus

Five runs of train_accelerate.py on the same data, seed and batches, bf16 autocast, 2 micro-steps per step on each of
2 processes (so FSDP's no-sync accumulation is exercised):
    DDP                            the reference: fp32 weights, bf16 matmuls under autocast, fp32 gradient all-reduce.
    1 process                      the same recipe on one process with 4 micro-steps: the gap that the order of float
                                   sums alone makes, the floor any distributed variant is measured against.
    FSDP, fp32 weights (ours)      MixedPrecisionPolicy(reduce_dtype=fp32): weights gathered in fp32 and cast by
                                   autocast as under DDP, gradients reduce-scattered and accumulated in fp32.
    FSDP, bf16 weights             MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32): bf16 gathers and a bf16
                                   residual stream; the unsharded gradients accumulate in bf16 over micro-steps.
    FSDP, Accelerate's bf16        what Accelerate builds for mixed_precision="bf16": bf16 weights and reduction.
Printed per run: the largest and mean |loss - DDP's loss| over the steps, the final val loss and its gap, and per
process and step the bytes FSDP gathers (weights, forward and backward) and reduce-scatters (gradients), counted
from the model's parameters: communication is what a CPU cannot time for a GPU cluster.

Accelerate on a CPU runs an FSDP config as DDP; the launched wrapper makes it take its GPU path, as
tests/test_train_cluster.py does. Needs a CPU with native bf16 (AVX512-BF16/AMX) to run in minutes.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from gpt2repro.shard_writing import prepare_embedded_corpus  # noqa: E402

# train_accelerate.main under an FSDP launch on CPU, with the policy named by BENCH_FSDP_POLICY
WRAPPER = """
import os
import accelerate, torch
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from torch.distributed.fsdp import MixedPrecisionPolicy
from gpt2repro import launch
import train_accelerate

POLICIES = {"fp32-weights": MixedPrecisionPolicy(reduce_dtype=torch.float32),
            "bf16-weights": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32),
            "accelerate-bf16": None}
policy = POLICIES[os.environ["BENCH_FSDP_POLICY"]]
launch.fsdp_plugin = lambda: FullyShardedDataParallelPlugin(mixed_precision_policy=policy)
accelerator_init = accelerate.Accelerator.__init__


def init_as_on_gpus(self, *args, **kwargs):
    accelerator_init(self, *args, **kwargs)
    for state in (PartialState._shared_state, AcceleratorState._shared_state):
        state["distributed_type"] = DistributedType.FSDP
    plugin = kwargs["fsdp_plugin"]
    if self.mixed_precision != "no":
        plugin.set_mixed_precision(self.mixed_precision)
    AcceleratorState._shared_state["fsdp_plugin"] = plugin


accelerate.Accelerator.__init__ = init_as_on_gpus
train_accelerate.main()
"""
FSDP_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
            "FSDP_TRANSFORMER_CLS_TO_WRAP": "Block", "FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT",
            "FSDP_RESHARD_AFTER_FORWARD": "true"}
VARIANTS = {"DDP": None, "1 process": "one-process", "FSDP, fp32 weights (ours)": "fp32-weights",
            "FSDP, bf16 weights": "bf16-weights", "FSDP, Accelerate's bf16": "accelerate-bf16"}


def run(variant: str | None, data_dir: Path, output_dir: Path, flags: list[str], wrapper: Path) -> list[dict]:
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    script = str(REPO / "train_accelerate.py")
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--mixed_precision", "no", "--dynamo_backend", "no"]
    if variant == "one-process":
        launcher = [sys.executable]
    elif variant is not None:
        env.update(FSDP_ENV, BENCH_FSDP_POLICY=variant)
        script = str(wrapper)
    command = [*launcher, script, "--data_dir", str(data_dir), "--output_dir", str(output_dir), *flags]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"error: {variant or 'DDP'} failed:\n{result.stderr[-3000:]}")
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def communication(n_layer: int, n_embd: int, weight_bytes: int, reduce_bytes: int) -> tuple[float, float]:
    """MB one of 2 processes receives per micro-step: weight all-gathers (forward, and backward again after the
    forward's reshard; the root's weights once) and the gradient reduce-scatter (its half of the gradients)."""
    block = 12 * n_embd * n_embd + 13 * n_embd
    root = (50304 + 1024) * n_embd + 2 * n_embd
    gathered = (2 * n_layer * block + root) * weight_bytes / 2  # the other process's half
    reduced = (n_layer * block + root) * reduce_bytes / 2
    return gathered / 1e6, reduced / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--n_layer", type=int, default=4)
    parser.add_argument("--n_embd", type=int, default=128)
    args = parser.parse_args()
    flags = ["--n_layer", str(args.n_layer), "--n_head", "4", "--n_embd", str(args.n_embd), "--seq_len", "64",
             "--micro_batch_size", "4", "--total_batch_size", str(2 * 2 * 4 * 64), "--max_steps", str(args.steps),
             "--warmup_steps", "10", "--max_lr", "1e-3", "--min_lr", "1e-4", "--eval_every", str(args.steps),
             "--checkpoint_every", str(args.steps), "--val_tokens", "16384", "--no-hellaswag", "--num_samples", "0",
             "--mixed_precision", "bf16", "--seed", "1234"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        prepare_embedded_corpus(tmp / "kjv")
        (tmp / "wrapper.py").write_text(WRAPPER)
        results = {name: run(variant, tmp / "kjv", tmp / f"run{i}", flags, tmp / "wrapper.py")
                   for i, (name, variant) in enumerate(VARIANTS.items())}
    reference = [r["loss"] for r in results["DDP"] if r["type"] == "train"]
    reference_val = [r["val_loss"] for r in results["DDP"] if r["type"] == "eval"][-1]
    bytes_of = {"DDP": None, "1 process": None, "FSDP, fp32 weights (ours)": (4, 4), "FSDP, bf16 weights": (2, 4),
                "FSDP, Accelerate's bf16": (2, 2)}
    print(f"{args.steps} steps, {args.n_layer} layers x {args.n_embd}, 2 CPU processes (gloo), bf16 autocast, 2 "
          f"micro-steps of 4 x 64 per step; loss {reference[0]:.3f} -> {reference[-1]:.3f} under DDP")
    print("| run | max loss gap | mean loss gap | val loss (gap) | gathered / reduced per micro-step |")
    print("|---|---|---|---|---|")
    for name, records in results.items():
        losses = [r["loss"] for r in records if r["type"] == "train"]
        gaps = [abs(a - b) for a, b in zip(losses, reference, strict=True)]
        val = [r["val_loss"] for r in records if r["type"] == "eval"][-1]
        comm = "(no FSDP)" if bytes_of[name] is None else \
            "{:.2f} MB / {:.2f} MB".format(*communication(args.n_layer, args.n_embd, *bytes_of[name]))
        print(f"| {name} | {max(gaps):.2e} | {statistics.mean(gaps):.2e} | {val:.4f} ({val - reference_val:+.1e}) "
              f"| {comm} |")


if __name__ == "__main__":
    main()
