"""The GPU path in one command (about 8 minutes on one H100/H200; not part of CI, which has no GPU):

1. GPT-2 124M training steps at B x T = 16 x 1024, bf16: gpt2repro eager and compiled, transformers' GPT2LMHeadModel
   compiled (bench_train.py's step): tokens/s, MFU against gpt2repro/launch.py's datasheet peak, peak memory,
   compile time.
2. 30 optimiser steps of `train_accelerate.py --preset gpt2-124m` and of `--preset speedrun-124m` on the embedded corpus
   (prepared on the way, ~1M tokens): the exit status, the first and last losses, and the samples it printed.
3. On a machine with 2 GPUs or more, the gpt2-124m run again through the README's DDP launch line
   (accelerate_configs/8gpu_ddp_bf16.yaml with --num_processes 2): compiled DDP, as `auto` runs it. With one GPU the
   table says it could not run.

    python benchmarks/gpu_check.py --output_dir $OUT       # gpu_check.md and gpu_check.json go there

Everything it measures is printed as one markdown table at the end, for the README.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_train import build_gpt2repro, build_transformers_gpt2, flops_per_token  # noqa: E402

from gpt2repro.launch import peak_flops_per_device  # noqa: E402
from gpt2repro.optimization import configure_optimizer  # noqa: E402


def time_training_step(build, compiled: bool, batch_size: int, seq_len: int, steps: int) -> dict:
    """Median seconds of a bf16 training step (forward, loss, backward, clip, fused AdamW) and what it costs."""
    torch.manual_seed(0)
    device = torch.device("cuda")
    model, loss_fn = build()
    model.to(device)
    optimizer = configure_optimizer(model, 0.1, (0.9, 0.95), 1e-8, device.type)
    step_model = torch.compile(model) if compiled else model
    x = torch.randint(0, 50257, (batch_size, seq_len), device=device)  # (B, T)
    y = torch.randint(0, 50257, (batch_size, seq_len), device=device)
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps + 2):  # the first two are warm-up: compilation, then the autotuned kernels' first run
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(step_model, x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times[2:])
    tokens_per_sec = batch_size * seq_len / seconds
    peak = peak_flops_per_device(device, "bf16")
    result = {"seconds_per_step": seconds, "tokens_per_sec": tokens_per_sec, "first_step_s": times[0],
              "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
              "mfu": flops_per_token(model, seq_len) * tokens_per_sec / peak if peak else None}
    del model, step_model, optimizer
    torch.cuda.empty_cache()
    return result


def run_preset(preset: str, data_dir: Path, output_dir: Path, steps: int, processes: int = 1) -> dict:
    """`steps` optimiser steps of a GPU preset on the embedded corpus, on one GPU or `processes` through the README's
    DDP launch line; its exit status, losses and samples."""
    launcher = [] if processes == 1 else ["-m", "accelerate.commands.launch", "--config_file",
                                          str(REPO / "accelerate_configs" / "8gpu_ddp_bf16.yaml"), "--num_processes",
                                          str(processes)]
    command = [sys.executable, *launcher, str(REPO / "train_accelerate.py"), "--preset", preset,
               "--data_dir", str(data_dir), "--output_dir", str(output_dir), "--max_steps", str(steps),
               "--eval_every", str(steps), "--checkpoint_every", str(steps), "--val_tokens", str(2**16),
               "--no-hellaswag"]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    metrics = output_dir / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    train = [r for r in records if r["type"] == "train"]
    evals = [r for r in records if r["type"] == "eval"]
    return {"exit_status": result.returncode, "seconds": seconds, "steps": len(train),
            "first_loss": train[0]["loss"] if train else None, "last_loss": train[-1]["loss"] if train else None,
            "val_losses": [r["val_loss"] for r in evals], "samples": evals[-1].get("samples", []) if evals else [],
            "tokens_per_sec": statistics.median(r["tokens_per_sec"] for r in train[5:]) if len(train) > 5 else None,
            "mfu": statistics.median(r.get("mfu", 0.0) for r in train[5:]) if len(train) > 5 else None,
            "stderr_tail": result.stderr[-2000:] if result.returncode else ""}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--output_dir", default="runs/gpu_check", help="where gpu_check.md/.json and the runs go")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--seq_len", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per model")
    parser.add_argument("--preset_steps", type=int, default=30, help="optimiser steps of each preset run")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("error: gpu_check.py needs a CUDA GPU (bench_train.py measures the same step on a CPU)")
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name()
    report = {"gpu": gpu, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "steps": {}, "presets": {}}

    for label, build, compiled in (("gpt2repro eager", build_gpt2repro, False),
                                   ("gpt2repro compiled", build_gpt2repro, True),
                                   ("transformers GPT2LMHeadModel compiled", build_transformers_gpt2, True)):
        report["steps"][label] = time_training_step(build, compiled, args.batch_size, args.seq_len, args.steps)
        print(label, report["steps"][label], flush=True)

    data_dir = output_dir / "kjv"
    subprocess.run([sys.executable, str(REPO / "prepare_data.py"), "--dataset", "embedded", "--output_dir",
                    str(data_dir)], check=True, capture_output=True)
    for preset in ("gpt2-124m", "speedrun-124m"):
        report["presets"][preset] = run_preset(preset, data_dir, output_dir / preset, args.preset_steps)
        print(preset, {k: v for k, v in report["presets"][preset].items() if k != "samples"}, flush=True)
    ddp_label = "gpt2-124m, 2 GPUs (8gpu_ddp_bf16.yaml, --num_processes 2)"
    if torch.cuda.device_count() >= 2:
        report["presets"][ddp_label] = run_preset("gpt2-124m", data_dir, output_dir / "gpt2-124m-ddp",
                                                  args.preset_steps, processes=2)
        print(ddp_label, {k: v for k, v in report["presets"][ddp_label].items() if k != "samples"}, flush=True)

    lines = [f"GPU check, {report['date']}, {gpu}, torch {torch.__version__}", "",
             f"| GPT-2 124M train step, B {args.batch_size} x T {args.seq_len}, bf16 | tokens/s | MFU | peak memory "
             f"| first step (compile) |", "|---|---|---|---|---|"]
    for label, r in report["steps"].items():
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        lines.append(f"| {label} | {r['tokens_per_sec']:,.0f} | {mfu} | {r['peak_memory_gib']:.1f} GiB "
                     f"| {r['first_step_s']:.1f} s |")
    lines += ["", f"| preset, {args.preset_steps} steps on the embedded corpus | exit | loss first -> last | val loss "
                  f"| tokens/s | MFU | wall-clock |", "|---|---|---|---|---|---|---|"]
    for preset, r in report["presets"].items():
        losses = f"{r['first_loss']:.3f} -> {r['last_loss']:.3f}" if r["last_loss"] is not None else "none"
        throughput = f"{r['tokens_per_sec']:,.0f}" if r["tokens_per_sec"] else "n/a"
        mfu = f"{r['mfu']:.1%}" if r["mfu"] else "n/a"
        lines.append(f"| {preset} | {r['exit_status']} | {losses} | {r['val_losses']} | {throughput} | {mfu} "
                     f"| {r['seconds']:.0f} s |")
    if ddp_label not in report["presets"]:
        lines.append(f"| {ddp_label} | not run: this machine has {torch.cuda.device_count()} GPU | | | | | |")
    for preset, r in report["presets"].items():
        lines += ["", *(f"{preset} sample: {text!r}" for text in r["samples"]), r["stderr_tail"]]
    table = "\n".join(lines)
    (output_dir / "gpu_check.md").write_text(table + "\n")
    (output_dir / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
    print(table)


if __name__ == "__main__":
    main()
