"""Training-step speed of GPT2ReproForCausalLM against transformers' GPT2LMHeadModel, side by side.

One optimiser step = forward + backward + fused AdamW on one micro-batch of B x T tokens, for the 124M model.
Both models run in this process, interleaved step by step (the machine is shared and noisy), under the same
allocator and precision, eager against eager (or compiled against compiled with --compile). Prints the median
step time, tokens/s, the ratio, and MFU against a bf16 / fp32 matmul ceiling measured in the same run.

    python benchmarks/bench_model.py                      # auto precision (bf16 only where native), B=4, T=256
    python benchmarks/bench_model.py --dtype float32 --steps 6
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from configuration_gpt2repro import GPT2ReproConfig  # noqa: E402
from gpt2repro.launch import pin_cpu_allocator, resolve_dtype  # noqa: E402
from modeling_gpt2repro import GPT2ReproForCausalLM  # noqa: E402


def matmul_ceiling(dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    """FLOP/s of a square matmul in nn.Linear's layout (x @ W.T) and the given precision: this CPU's practical peak."""
    x, w = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    x @ w.t()  # warm up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        x @ w.t()
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times)


def make_step(model: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype, compile_model: bool):
    """One training step of `model` as a closure; each model computes its loss the way its users would."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                                  fused=True)
    forward = torch.compile(model) if compile_model else model
    ours = isinstance(model, GPT2ReproForCausalLM)
    y = torch.roll(x, -1, dims=1)  # next-token targets for the shift_labels path

    def step() -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            if ours:
                loss = forward(input_ids=x, shift_labels=y, return_logits=False).loss
            else:
                loss = forward(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per model (after 2 warm-up steps)")
    parser.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto",
                        help="auto: bfloat16 autocast where this CPU has native bf16, else float32")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.dtype, precision_line = resolve_dtype(args.dtype, torch.device("cpu"))
    print(precision_line)
    dtype = getattr(torch, args.dtype)
    B, T = args.batch_size, args.seq_len
    # glibc would hand each model's large freed blocks back to the OS and page-fault them in again, a different
    # cost for each model: both run under the pinned allocator, as training does.
    pin_cpu_allocator()

    torch.manual_seed(args.seed)
    ours = GPT2ReproForCausalLM(GPT2ReproConfig()).train()
    gpt2_config = GPT2Config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    theirs = GPT2LMHeadModel._from_config(gpt2_config, attn_implementation="sdpa").train()
    assert theirs.config._attn_implementation == "sdpa"
    x = torch.randint(0, 50257, (B, T))
    steps = {"gpt2repro": make_step(ours, x, dtype, args.compile),
             "transformers GPT2LMHeadModel": make_step(theirs, x, dtype, args.compile)}
    flops_per_step = ours.flops_per_token(T) * B * T  # same architecture and work for both (50257 vs 50304 aside)

    for step in steps.values():  # warm up (compilation, allocator, oneDNN kernels)
        for _ in range(2):
            step()
    times = {name: [] for name in steps}
    for _ in range(args.steps):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    ceiling = matmul_ceiling(dtype)
    if dtype == torch.bfloat16 and ceiling < matmul_ceiling(torch.float32):
        print(f"note: this CPU ({torch.backends.cpu.get_cpu_capability()}) has no native bf16 matmul: bf16 is slower "
              "than fp32 here; --dtype float32 measures what users of this CPU would run")

    print(f"torch {torch.__version__}, CPU {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} "
          f"threads, {args.dtype}, B={B} T={T}, compile={args.compile}, {args.steps} interleaved steps each")
    print(f"{args.dtype} matmul ceiling: {ceiling / 1e9:.0f} GFLOP/s = "
          f"{ceiling / (flops_per_step / (B * T)):.0f} tokens/s")
    tokens_per_s = {}
    for name, ts in times.items():
        median = statistics.median(ts)
        tokens_per_s[name] = B * T / median
        print(f"{name:30s} median {median * 1000:7.0f} ms/step  {tokens_per_s[name]:6.0f} tokens/s  "
              f"MFU {flops_per_step / median / ceiling:5.1%}  (min {min(ts) * 1000:.0f}, max {max(ts) * 1000:.0f} ms)")
    ratio = tokens_per_s["gpt2repro"] / tokens_per_s["transformers GPT2LMHeadModel"]
    print(f"ratio gpt2repro / transformers: {ratio:.2f}x")


if __name__ == "__main__":
    main()
