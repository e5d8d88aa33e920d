"""Greedy generation speed of GPT2ReproForCausalLM against transformers' GPT2LMHeadModel, same weights.

One measurement = `model.generate` of exactly 128 new tokens (greedy, min_new_tokens = max_new_tokens) after a
16-token prompt, for the 124M model with random weights (GPT2LMHeadModel's, imported into ours with `from_gpt2`).
Both models run in this process under the same allocator, threads and dtype, interleaved call by call (the machine
is shared and noisy), at batch 1 and batch 8, in float32 and in the `auto` dtype (bf16 only where the hardware has
it natively: `gpt2repro.launch.resolve_dtype`; where auto is float32 it is not run twice). Both must generate the same
tokens (float32: an error otherwise; bf16: a note, since the two models may round differently).

Prints the median tokens/s of each model (prompt processing included), their ratio, and the memory-bandwidth
bound: at batch B every forward reads all the weights once (plus the KV cache) for B tokens, so
tokens/s <= B x read bandwidth / bytes read per forward, with the read bandwidth of this machine measured in the
same run, between the generate calls. At batch 1 that is the real limit; at batch 8 it is loose, since matmuls of 8
rows run far below both the bandwidth and the FMA peak of a CPU (~20 GFLOP/s on one AVX2 core here, both models).
It also prints what torch's matmuls over the same weights take alone, with no model around them: the ceiling that
any model built on these kernels can reach on this machine.

Each model runs with each KV cache of --caches: `dynamic` (generate's default: the cache grows by concatenation),
`static` (transformers' StaticCache, preallocated for prompt + new tokens, its empty slots masked), and
`static_compiled` (the static cache with the decoding step compiled whole by generate's own compile, as transformers
does by default on a GPU; asked for here with CompileConfig's `_compile_all_devices`). The first call of a compiled
variant compiles (its time is printed); the timed calls reuse the graph.

    python benchmarks/bench_generate.py                          # float32 and auto, batch 1 and 8, 3 reps
    python benchmarks/bench_generate.py --dtypes float32 --batch_sizes 1 --reps 5 --threads 2
    python benchmarks/bench_generate.py --caches dynamic static_compiled
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import CompileConfig, GPT2Config, GPT2LMHeadModel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from gpt2repro.launch import pin_cpu_allocator, resolve_dtype  # noqa: E402
from gpt2repro.tokenizer import EOT_TOKEN_ID  # noqa: E402
from modeling_gpt2repro import GPT2ReproForCausalLM  # noqa: E402

OURS, THEIRS = "gpt2repro", "transformers GPT2LMHeadModel"
CACHES = ("dynamic", "static", "static_compiled")
# 256 MiB: 8x this machine's 32 MiB L3 (and larger than any L3 we know of), so the read streams from DRAM, as the
# ~0.5 GB of float32 weights do; small enough to read several times per measurement in ~0.1 s.
BANDWIDTH_BUFFER_BYTES = 256 << 20


def read_bandwidth(buffer: torch.Tensor, reps: int = 3) -> float:
    """Bytes/s of reading `buffer` once (a sum: one read stream, no writes), the best of `reps`.

    A decoding step mostly streams weights in (the matvecs' outputs are tiny), so a read-only pass is its
    ceiling; a copy would add write traffic (and write-allocate reads) that decoding does not do."""
    buffer.sum()  # warm up (threads, page tables)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        buffer.sum()
        best = min(best, time.perf_counter() - t0)
    return buffer.numel() * buffer.element_size() / best


def make_models(dtype: torch.dtype, seed: int) -> dict[str, torch.nn.Module]:
    """Transformers' GPT-2 124M with random weights (no Hub here) and ours with the same weights, in `dtype`."""
    torch.manual_seed(seed)
    theirs = GPT2LMHeadModel._from_config(GPT2Config(), attn_implementation="sdpa").eval()
    assert theirs.config._attn_implementation == "sdpa"
    ours = GPT2ReproForCausalLM.from_gpt2(theirs)
    # Whole models in `dtype`, not autocast: generation is bound by reading the weights, and autocast would read the
    # fp32 weights and write a bf16 copy of each at every step, more traffic than fp32 alone.
    return {OURS: ours.to(dtype), THEIRS: theirs.to(dtype)}


def cache_kwargs(cache: str) -> dict:
    """generate()'s arguments for one KV cache variant of --caches."""
    if cache == "dynamic":
        return {}
    if cache == "static":  # generate() would compile a static cache's step by itself on a GPU (transformers 5.x)
        return {"cache_implementation": "static", "disable_compile": True}
    compile_config = CompileConfig(fullgraph=True)  # a graph break in the decoding step is an error, not a slowdown
    compile_config._compile_all_devices = True  # transformers compiles on accelerators only unless told
    return {"cache_implementation": "static", "compile_config": compile_config}


def bytes_per_forward(model: torch.nn.Module, batch_size: int, prompt_len: int, new_tokens: int) -> tuple[int, int]:
    """(weight bytes, mean KV-cache bytes) one forward of `generate` reads.

    Every weight is read once per forward whatever the batch: the matmuls stream them all (the tied wte as the
    lm_head), except the position embeddings, of which a decoding step reads one row. Forward i (0 = the prompt)
    also reads the cache of the prompt_len + i earlier positions: keys and values of every layer."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())  # tied matrices once
    wpe = model.get_submodule("transformer.wpe").weight
    weights -= wpe.numel() * wpe.element_size()
    config = model.config
    mean_positions = prompt_len + (new_tokens - 1) / 2  # forwards 0..new_tokens-1 see prompt_len + i cached positions
    kv_cache = 2 * config.n_layer * batch_size * mean_positions * config.n_embd * wpe.element_size()
    return weights, int(kv_cache)


def matmuls_alone_s(model: torch.nn.Module, batch_size: int, reps: int = 5) -> float:
    """Seconds of one forward's weight matmuls alone (every Linear and the tied head, on (B, in) random rows), the
    best of `reps`: what torch's kernels on this CPU take to stream the weights, with no model around them. Where it
    is well below the bandwidth bound, the bound is out of reach for any model built on these kernels."""
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = [torch.randn(batch_size, w.shape[1], dtype=w.dtype) for w in weights]
    best = float("inf")
    with torch.no_grad():
        for _ in range(reps + 1):  # the first one warms up
            t0 = time.perf_counter()
            for w, x in zip(weights, inputs, strict=True):
                torch.nn.functional.linear(x, w)
            best = min(best, time.perf_counter() - t0)
    return best


def first_difference(a: torch.Tensor, b: torch.Tensor) -> str:
    """Where two (B, T) token tensors first differ, for the error message."""
    row, col = (a != b).nonzero()[0].tolist()
    return (f"row {row}, position {col}: {a[row, col].item()} vs {b[row, col].item()} "
            f"({(a != b).float().mean():.1%} of tokens differ)")


def bench_batch(models: dict[str, torch.nn.Module], dtype: torch.dtype, batch_size: int, args: argparse.Namespace,
                bandwidth_buffer: torch.Tensor) -> None:
    """Times `generate` of both models with each cache of --caches, interleaved, and prints one block of results."""
    prompt = torch.randint(0, GPT2Config().vocab_size, (batch_size, args.prompt_len))
    # The all-ones mask says there is no padding; without it generate guesses (and warns) at batch > 1, since the
    # pad token is also the end-of-text token that may occur in a prompt.
    kwargs = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens, "do_sample": False,
              "pad_token_id": EOT_TOKEN_ID, "attention_mask": torch.ones_like(prompt)}
    variants = [(name, cache) for cache in args.caches for name in models]

    tokens, warm_up_s = {}, {}
    for name, cache in variants:  # warm up (and compile), and the tokens to check
        t0 = time.perf_counter()
        tokens[name, cache] = models[name].generate(prompt, **kwargs, **cache_kwargs(cache))
        warm_up_s[name, cache] = time.perf_counter() - t0
        assert tokens[name, cache].shape == (batch_size, args.prompt_len + args.new_tokens), (name, cache)
    reference = tokens[variants[0]]
    differ = [variant for variant, out in tokens.items() if not torch.equal(out, reference)]
    if differ and dtype == torch.float32:
        raise AssertionError(f"float32: {differ[0]} generated other tokens than {variants[0]}: "
                             f"{first_difference(tokens[differ[0]], reference)}")

    times: dict[tuple[str, str], list[float]] = {variant: [] for variant in variants}
    bandwidths = []
    for rep in range(args.reps):
        bandwidths.append(read_bandwidth(bandwidth_buffer))
        # Alternating the order: the machine's load drifts, and a call finds the caches warm with the previous call's
        # allocations; each variant gets the early and late positions equally often.
        for variant in variants if rep % 2 == 0 else variants[::-1]:
            t0 = time.perf_counter()
            out = models[variant[0]].generate(prompt, **kwargs, **cache_kwargs(variant[1]))
            times[variant].append(time.perf_counter() - t0)
            assert torch.equal(out, tokens[variant]), f"{variant}: greedy generation is not deterministic"

    bandwidth = statistics.median(bandwidths)
    new_tokens = batch_size * args.new_tokens
    print(f"\n{str(dtype).removeprefix('torch.')}, batch {batch_size}: {args.prompt_len}-token prompt + "
          f"{args.new_tokens} new tokens, {args.reps} interleaved reps; tokens "
          + ("all equal" if not differ else f"DIFFER (bf16 rounding: {differ} vs {variants[0]})"))
    weights, kv_cache = bytes_per_forward(models[OURS], batch_size, args.prompt_len, args.new_tokens)
    bound = batch_size * bandwidth / (weights + kv_cache)
    print(f"read bandwidth {bandwidth / 1e9:.1f} GB/s (median of {len(bandwidths)}, max {max(bandwidths) / 1e9:.1f}); "
          f"bound {bound:.1f} tokens/s = batch x bandwidth / ({weights / 1e6:.0f} MB weights + {kv_cache / 1e6:.0f} MB "
          f"KV cache per forward: {(weights + kv_cache) / batch_size / 1e6:.0f} MB per token)")
    matmuls = batch_size / matmuls_alone_s(models[OURS], batch_size)
    print(f"torch's matmuls over these weights alone, no model around them: {matmuls:.1f} tokens/s "
          f"({matmuls / bound:.0%} of the bound)")
    tokens_per_s = {}
    for (name, cache), ts in times.items():
        median = statistics.median(ts)
        rate = tokens_per_s[name, cache] = new_tokens / median
        print(f"  {name:29s} {cache:16s} {rate:7.1f} tokens/s ({rate / bound:4.0%} of the bound)  "
              f"median {median:6.2f} s/call (min {min(ts):.2f}, max {max(ts):.2f}; first call "
              f"{warm_up_s[name, cache]:.1f} s)")
    # The load of this shared machine drifts within a run (whole calls vary 2x): the ratio of each rep's neighbouring
    # calls cancels the drift that the ratio of the medians still carries.
    for cache in args.caches:
        paired = statistics.median(theirs / ours for ours, theirs in zip(times[OURS, cache], times[THEIRS, cache],
                                                                        strict=True))
        print(f"  {cache}: gpt2repro / transformers {tokens_per_s[OURS, cache] / tokens_per_s[THEIRS, cache]:.2f}x "
              f"(median of the reps' paired ratios: {paired:.2f}x)"
              + (f"; gpt2repro {cache} / dynamic {tokens_per_s[OURS, cache] / tokens_per_s[OURS, 'dynamic']:.2f}x"
                 if cache != "dynamic" and "dynamic" in args.caches else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", nargs="+", choices=["float32", "auto", "bfloat16"], default=["float32", "auto"],
                        help="auto: bfloat16 where this CPU has native bf16 instructions, else float32")
    parser.add_argument("--batch_sizes", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--prompt_len", type=int, default=16)
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3,
                        help="timed generate calls per model and batch size (after one warm-up)")
    # One thread by default: decoding at batch 1 streams weights through matvecs, and one core reads about as fast as
    # two here (sum of 256 MiB: 15.7 GB/s on 1 thread, 10.7-13.5 on 2; the lm_head matvec 14.0 vs 13.7 GB/s), while
    # two threads on a shared 2-core machine stall at every parallel region whenever another process holds a core
    # (measured: 32 tokens took 3.3 s on 1 thread, 15.5 s on 2, within a minute of each other).
    parser.add_argument("--threads", type=int, default=1,
                        help=f"torch threads (default 1; torch's own default here is {torch.get_num_threads()})")
    parser.add_argument("--caches", nargs="+", choices=CACHES, default=list(CACHES),
                        help="KV caches to measure: dynamic (generate's default), static (StaticCache), "
                             "static_compiled (StaticCache with the decoding step compiled whole)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # glibc would hand large freed blocks (the KV cache grows by reallocation) back to the OS and page-fault them in
    # again, a different cost for each model: both run under the pinned allocator, as in the other benchmarks.
    pin_cpu_allocator()
    torch.manual_seed(args.seed)

    device = torch.device("cpu")
    dtypes: list[torch.dtype] = []
    for requested in args.dtypes:
        name, line = resolve_dtype(requested, device)
        dtype = getattr(torch, name)
        print(line + (" - the same dtype as above, measured once" if dtype in dtypes else ""))
        if dtype not in dtypes:
            dtypes.append(dtype)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"CPU {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads, pinned allocator, "
          f"SDPA attention")

    bandwidth_buffer = torch.ones(BANDWIDTH_BUFFER_BYTES // 4, dtype=torch.float32)
    for dtype in dtypes:
        models = make_models(dtype, args.seed)
        for batch_size in args.batch_sizes:
            bench_batch(models, dtype, batch_size, args, bandwidth_buffer)
        del models  # before the next dtype's pair is built: one pair in memory at a time


if __name__ == "__main__":
    main()
