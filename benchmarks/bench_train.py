"""End-to-end training throughput of GPT-2 124M: gpt2repro's model against transformers' GPT2LMHeadModel
(SDPA attention, dropout 0) in the same Accelerate training step (autocast, loss, backward, clip, fused AdamW),
eager and torch.compile'd, steps interleaved across the variants, medians reported.

    python benchmarks/bench_train.py                       # bf16, B x T = 1 x 32, eager and compiled
    python benchmarks/bench_train.py --mixed_precision no --batch_size 4 --seq_len 256 --compile off

MFU uses each model's training FLOPs per token (6 per parameter that multiplies, plus attention) against
train_accelerate's peak: the datasheet bf16 figure on A100/H100, on CPU threads x clock x FMA FLOPs per
cycle (32 on AVX2). The allocator is pinned (gpt2repro.launch.pin_cpu_allocator) for both models alike.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from configuration_gpt2repro import GPT2ReproConfig  # noqa: E402
from gpt2repro.launch import accelerate_device, peak_flops_per_device, pin_cpu_allocator, resolve_mixed_precision  # noqa: E402
from gpt2repro.optimization import configure_optimizer  # noqa: E402
from modeling_gpt2repro import GPT2ReproForCausalLM, training_flops_per_token  # noqa: E402


def build_gpt2repro() -> tuple[torch.nn.Module, callable]:
    model = GPT2ReproForCausalLM(GPT2ReproConfig())  # 124M

    def loss_fn(model, x, y):
        return model(input_ids=x, shift_labels=y, return_logits=False).loss

    return model, loss_fn


def build_transformers_gpt2() -> tuple[torch.nn.Module, callable]:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # 124M, no dropout like the recipe
    config._attn_implementation = "sdpa"
    model = GPT2LMHeadModel(config)

    def loss_fn(model, x, y):
        return model(input_ids=x, labels=y, shift_labels=y).loss  # already-shifted targets, like gpt2repro's

    return model, loss_fn


def flops_per_token(model: torch.nn.Module, seq_len: int) -> int:
    """modeling_gpt2repro's training FLOPs per token, for GPT2LMHeadModel on its own numbers: its parameters that
    multiply are, as gpt2repro's, all but the position embeddings (the tied wte counted once)."""
    if isinstance(model, GPT2ReproForCausalLM):
        return model.flops_per_token(seq_len)
    num_parameters_for_flops = sum(p.numel() for p in model.parameters()) - model.transformer.wpe.weight.numel()
    return training_flops_per_token(num_parameters_for_flops, model.config.n_layer, model.config.n_embd, seq_len)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--seq_len", type=int, default=32)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per variant (compilation happens here)")
    parser.add_argument("--mixed_precision", choices=["auto", "no", "bf16"], default="auto",
                        help="auto: bf16 on GPUs that support it and CPUs with native bf16, else fp32")
    parser.add_argument("--compile", choices=["off", "on", "both"], default="both")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    args.mixed_precision, precision_line = resolve_mixed_precision(args.mixed_precision, accelerate_device())
    print(precision_line)
    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    device = accelerator.device
    if device.type == "cpu":
        pin_cpu_allocator()
    peak_flops = peak_flops_per_device(device, args.mixed_precision)
    compile_modes = {"off": [False], "on": [True], "both": [False, True]}[args.compile]

    variants = []
    for name, build in (("gpt2repro", build_gpt2repro), ("transformers GPT2LMHeadModel", build_transformers_gpt2)):
        for compiled in compile_modes:
            torch.manual_seed(args.seed)
            model, loss_fn = build()
            optimizer = configure_optimizer(model, 0.1, (0.9, 0.95), 1e-8, device.type)
            model, optimizer = accelerator.prepare(model, optimizer)
            step_model = torch.compile(model) if compiled else model
            label = f"{name} ({'compiled' if compiled else 'eager'})"
            variants.append(dict(label=label, name=name, compiled=compiled, model=step_model, optimizer=optimizer,
                                 loss_fn=loss_fn, flops=flops_per_token(accelerator.unwrap_model(model), args.seq_len),
                                 times=[]))

    x = torch.randint(0, 50257, (args.batch_size, args.seq_len), device=device)  # (B, T)
    y = torch.randint(0, 50257, (args.batch_size, args.seq_len), device=device)
    for round_index in range(args.warmup + args.steps):  # interleaved: machine load drifts alike for every variant
        for variant in variants:
            start = time.perf_counter()
            loss = variant["loss_fn"](variant["model"], x, y)
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(variant["model"].parameters(), 1.0)
            variant["optimizer"].step()
            variant["optimizer"].zero_grad(set_to_none=True)
            loss.item()  # waits for the device
            elapsed = time.perf_counter() - start
            if round_index >= args.warmup:
                variant["times"].append(elapsed)
            print(f"round {round_index} {variant['label']}: {elapsed:.2f} s", file=sys.stderr, flush=True)

    tokens = args.batch_size * args.seq_len
    print(f"GPT-2 124M training step, B x T = {args.batch_size} x {args.seq_len}, {args.mixed_precision}, "
          f"{device.type}, median of {args.steps} interleaved steps (after {args.warmup} warm-up)"
          + (f", peak {peak_flops / 1e9:.1f} GFLOP/s per device" if peak_flops else ""))
    results = {}
    for variant in variants:
        seconds = statistics.median(variant["times"])
        tokens_per_sec = tokens / seconds
        mfu = variant["flops"] * tokens_per_sec / peak_flops if peak_flops else float("nan")
        results[(variant["name"], variant["compiled"])] = tokens_per_sec
        print(f"  {variant['label']:<42} {seconds:8.3f} s/step {tokens_per_sec:10.1f} tokens/s   MFU {mfu:6.1%}")
    for compiled in compile_modes:
        ratio = results[("gpt2repro", compiled)] / results[("transformers GPT2LMHeadModel", compiled)]
        print(f"  gpt2repro / transformers ({'compiled' if compiled else 'eager'}): {ratio:.2f}x tokens/s")


if __name__ == "__main__":
    main()
