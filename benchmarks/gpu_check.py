"""The GPU path in one command, the whole one-GPU journey (about 10 minutes on one H100/H200, estimated from earlier
runs of its parts; not part of CI, which has no GPU):

1. GPT-2 124M training steps at B x T = 16 x 1024, bf16: gpt2repro eager and compiled, transformers' GPT2LMHeadModel
   compiled (bench_train.py's step): tokens/s, MFU against gpt2repro/launch.py's datasheet peak, peak memory,
   compile time.
2. 30 optimiser steps of `train_accelerate.py --preset gpt2-124m` and of `--preset speedrun-124m` on the embedded corpus
   (prepared on the way, ~1M tokens), with the evaluation at the end (val loss, HellaSwag, samples) and its
   checkpoint; then each run resumed from that checkpoint for 10 steps more: the exit statuses, the losses, the
   samples it printed.
3. The gpt2-124m run's hf/ folder loaded with AutoModelForCausalLM on the GPU: greedy generation with the dynamic
   cache, transformers' StaticCache (generate's own compile turned off), and the StaticCache with the decoding step
   compiled whole: tokens/s and whether the tokens agree; then `eval_hellaswag.py` on it.
4. On a machine with 2 GPUs or more, the gpt2-124m run again through the README's DDP launch line
   (accelerate_configs/8gpu_ddp_bf16.yaml with --num_processes 2): compiled DDP, as `auto` runs it. With one GPU the
   table says it could not run.

The device machine reaches no network, so HellaSwag is 40 made-up examples in its schema (`synthetic_hellaswag`):
they check the scoring path on CUDA, not the model's knowledge.

    python benchmarks/gpu_check.py --output_dir $OUT       # gpu_check.md and gpu_check.json go there

Everything it measures is printed as one markdown table at the end, for the README.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_generate import cache_kwargs  # noqa: E402
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


def synthetic_hellaswag(path: Path, count: int = 40) -> Path:
    """`count` HellaSwag examples in the original jsonl schema, made up of random words (see the module's note)."""
    rng = random.Random(0)
    words = "a the man woman dog ball kitchen street water runs jumps cooks reads throws slowly quickly away".split()
    with open(path, "w") as f:
        for i in range(count):
            ctx_a, ctx_b = " ".join(rng.choices(words, k=12)).capitalize() + ".", rng.choice(words).capitalize()
            endings = [" ".join(rng.choices(words, k=rng.randint(3, 9))) + "." for _ in range(4)]
            f.write(json.dumps({"ind": i, "activity_label": "Synthetic", "ctx_a": ctx_a, "ctx_b": ctx_b,
                                "ctx": f"{ctx_a} {ctx_b}", "split": "val", "split_type": "indomain", "label": i % 4,
                                "source_id": f"synthetic~{i}", "endings": endings}) + "\n")
    return path


def run_preset(preset: str, data_dir: Path, hellaswag_file: Path, output_dir: Path, steps: int, processes: int = 1,
               resume: bool = False) -> dict:
    """`steps` optimiser steps of a GPU preset on the embedded corpus, evaluated and checkpointed at the end, on one
    GPU or `processes` through the README's DDP launch line; with `resume`, 10 steps more from that checkpoint. Its
    exit status, the losses of the steps it trained, and the last evaluation."""
    launcher = [] if processes == 1 else ["-m", "accelerate.commands.launch", "--config_file",
                                          str(REPO / "accelerate_configs" / "8gpu_ddp_bf16.yaml"), "--num_processes",
                                          str(processes)]
    max_steps = steps + 10 if resume else steps
    command = [sys.executable, *launcher, str(REPO / "train_accelerate.py"), "--preset", preset,
               "--data_dir", str(data_dir), "--output_dir", str(output_dir), "--max_steps", str(max_steps),
               "--eval_every", str(steps), "--checkpoint_every", str(steps), "--val_tokens", str(2**16),
               "--hellaswag_file", str(hellaswag_file), *(["--resume_from_checkpoint", "latest"] if resume else [])]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    metrics = output_dir / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    first_step = steps if resume else 0
    train = [r for r in records if r["type"] == "train" and r["step"] >= first_step]
    evals = [r for r in records if r["type"] == "eval"]
    return {"exit_status": result.returncode, "seconds": seconds, "steps": len(train),
            "first_loss": train[0]["loss"] if train else None, "last_loss": train[-1]["loss"] if train else None,
            "val_losses": [r["val_loss"] for r in evals], "samples": evals[-1].get("samples", []) if evals else [],
            "hellaswag_acc_norm": evals[-1].get("hellaswag_acc_norm") if evals else None,
            "tokens_per_sec": statistics.median(r["tokens_per_sec"] for r in train[5:]) if len(train) > 5 else None,
            "mfu": statistics.median(r.get("mfu", 0.0) for r in train[5:]) if len(train) > 5 else None,
            "stderr_tail": result.stderr[-2000:] if result.returncode else ""}


def generation_on_gpu(folder: Path, new_tokens: int = 128, reps: int = 3) -> dict:
    """Greedy generation of `new_tokens` after GPT-2's "Hello, I'm a language model," by the hf/ folder in `folder`,
    loaded as users load it, in bf16 on the GPU: per KV cache (bench_generate.py's variants) the median tokens/s, the
    first call's seconds (compilation included) and whether its tokens are the dynamic cache's."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.bfloat16).cuda().eval()
    prompt = torch.tensor([[15496, 11, 314, 1101, 257, 3303, 2746, 11]], device="cuda")
    kwargs = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False, "pad_token_id": 50256,
              "attention_mask": torch.ones_like(prompt)}
    results, reference = {}, None
    for cache in ("dynamic", "static", "static_compiled"):
        times = []
        for _ in range(reps + 1):  # the first call warms up (and compiles)
            start = time.perf_counter()
            tokens = model.generate(prompt, **kwargs, **cache_kwargs(cache))
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        reference = tokens if reference is None else reference
        results[cache] = {"tokens_per_sec": new_tokens / statistics.median(times[1:]), "first_call_s": times[0],
                          "same_tokens": torch.equal(tokens, reference)}
    del model
    torch.cuda.empty_cache()
    return results


def hellaswag_on_gpu(folder: Path, hellaswag_file: Path, output: Path) -> dict:
    """`eval_hellaswag.py` on the hf/ folder in `folder` (the GPU, auto dtype): its exit status, accuracy and time."""
    command = [sys.executable, str(REPO / "eval_hellaswag.py"), "--model", str(folder), "--data_file",
               str(hellaswag_file), "--output_json", str(output)]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    report = json.loads(output.read_text()) if result.returncode == 0 else {}
    return {"exit_status": result.returncode, "seconds": time.perf_counter() - start,
            "acc_norm": report.get("acc_norm"), "count": report.get("count"),
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

    data_dir, hellaswag_file = output_dir / "kjv", synthetic_hellaswag(output_dir / "hellaswag_synthetic.jsonl")
    subprocess.run([sys.executable, str(REPO / "prepare_data.py"), "--dataset", "embedded", "--output_dir",
                    str(data_dir)], check=True, capture_output=True)
    for preset in ("gpt2-124m", "speedrun-124m"):
        for label, resume in ((preset, False), (f"{preset}, resumed for 10 steps", True)):
            report["presets"][label] = run_preset(preset, data_dir, hellaswag_file, output_dir / preset,
                                                  args.preset_steps, resume=resume)
            print(label, {k: v for k, v in report["presets"][label].items() if k != "samples"}, flush=True)
    hf = output_dir / "gpt2-124m" / "checkpoints" / f"step_{args.preset_steps + 10:06d}" / "hf"
    if hf.is_dir():
        report["generation"] = generation_on_gpu(hf)
        report["eval_hellaswag"] = hellaswag_on_gpu(hf, hellaswag_file, output_dir / "hellaswag.json")
        print("generation", report["generation"], "\neval_hellaswag", report["eval_hellaswag"], flush=True)
    ddp_label = "gpt2-124m, 2 GPUs (8gpu_ddp_bf16.yaml, --num_processes 2)"
    if torch.cuda.device_count() >= 2:
        report["presets"][ddp_label] = run_preset("gpt2-124m", data_dir, hellaswag_file, output_dir / "gpt2-124m-ddp",
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
                  f"| HellaSwag (synthetic) | tokens/s | MFU | wall-clock |", "|---|---|---|---|---|---|---|---|"]
    for preset, r in report["presets"].items():
        losses = f"{r['first_loss']:.3f} -> {r['last_loss']:.3f}" if r["last_loss"] is not None else "none"
        throughput = f"{r['tokens_per_sec']:,.0f}" if r["tokens_per_sec"] else "n/a"
        mfu = f"{r['mfu']:.1%}" if r["mfu"] else "n/a"
        hellaswag = f"{r['hellaswag_acc_norm']:.3f}" if r["hellaswag_acc_norm"] is not None else "n/a"
        lines.append(f"| {preset} | {r['exit_status']} | {losses} | {r['val_losses']} | {hellaswag} | {throughput} "
                     f"| {mfu} | {r['seconds']:.0f} s |")
    if ddp_label not in report["presets"]:
        lines.append(f"| {ddp_label} | not run: this machine has {torch.cuda.device_count()} GPU | | | | | | |")
    if "generation" in report:
        lines += ["", "| gpt2-124m hf/ folder, greedy, 128 new tokens, bf16 | tokens/s | first call | tokens as "
                      "dynamic's |", "|---|---|---|---|"]
        lines += [f"| generate, {cache} cache | {g['tokens_per_sec']:,.0f} | {g['first_call_s']:.1f} s | "
                  f"{'yes' if g['same_tokens'] else 'NO'} |" for cache, g in report["generation"].items()]
        h = report["eval_hellaswag"]
        lines += ["", f"eval_hellaswag.py on the gpt2-124m hf/ folder: exit {h['exit_status']}, acc_norm "
                      f"{h['acc_norm']} over {h['count']} synthetic examples, {h['seconds']:.0f} s", h["stderr_tail"]]
    else:
        lines += ["", f"no hf/ folder at {hf}: generation and eval_hellaswag.py not run"]
    for preset, r in report["presets"].items():
        lines += ["", *(f"{preset} sample: {text!r}" for text in r["samples"]), r["stderr_tail"]]
    table = "\n".join(lines)
    (output_dir / "gpu_check.md").write_text(table + "\n")
    (output_dir / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
    print(table)


if __name__ == "__main__":
    main()
