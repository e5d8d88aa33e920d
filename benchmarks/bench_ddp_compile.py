"""DDP with torch.compile, four ways: does each gradient bucket's all-reduce start while the backward still computes
the gradients of the layers before it, and what does a training step cost? Two CPU processes (gloo), the project's
model (GPT2ReproForCausalLM, small), a small DDP bucket cap so that the model has many buckets.

    python benchmarks/bench_ddp_compile.py                        # 4 layers x 256, B x T = 4 x 128, 1 MB buckets
    python benchmarks/bench_ddp_compile.py --n_layer 8 --steps 20 --bucket_cap_mb 2

The variants:
    eager                             plain DDP, no compile.
    compiled inside DDP (ours)        gpt2repro.training.compile_for_training: the model's forward compiled (fullgraph)
                                      before DDP wraps it, DDP's forward eager; dynamo compiles while DDP's forward
                                      runs, so its DDPOptimizer splits the graph at DDP's bucket boundaries.
    compiled whole (no DDPOptimizer)  the same with torch._dynamo.config.optimize_ddp = False: one graph, whose one
                                      backward hands DDP every gradient at its end.
    compiled around DDP               torch.compile(DDP(model), fullgraph=False), as Accelerate compiles with
                                      fullgraph off; dynamo breaks the graph in DDP's wrapper.

The columns, each a median over the timed steps of rank 0 (the steps of the four variants interleaved, since the
machine's load drifts; compilation happens in the untimed warm-up steps):
    pieces     compiled backward nodes in the step's autograd graph (0 eager, 1 one graph, more: DDPOptimizer's split).
    buckets    gradient buckets DDP all-reduced (calls of its comm hook, a timing wrapper of allreduce_hook).
    early      of those, the all-reduces launched before the last parameter gradient was computed (the last post-hook
               of an autograd node that feeds a parameter's AccumulateGrad): they overlap the backward's compute.
    overlap    the share of the backward's compute (from loss.backward() to that last gradient) during which some
               all-reduce was already in flight, i.e. (last gradient - first launch) / (last gradient - start).
               DDP waits for the all-reduces in the backward's final callback, so loss.backward() returning is not
               the end of the compute.
    fwd, bwd, step  milliseconds of the forward (with the loss), of loss.backward() (all-reduces waited for
               included) and of the whole step (forward, backward, zero_grad); x eager: step time / eager's.
On 2 CPU cores gloo's communication threads compete with the compute for the same cores, so the step times say
little about a GPU cluster; the early / overlap columns are what carries over: they show whether the communication
can start before the backward ends.

Reading the numbers: the tied wte / lm_head matrix (50304 x n_embd, most of the parameters) gets its gradient last
(the embedding's backward ends the backward), so its bucket is launched after the compute in every variant. Eager,
the loss (LMHeadCrossEntropy) computes the lm_head gradient in the forward, so the eager backward is mostly the
blocks; compiled, the plain loss leaves it to the backward, where it runs first, before any bucket is ready: hence
the compiled variants' larger bwd and smaller overlap. Compare step times, not the fwd / bwd split, across them.
"""
# No `from __future__ import annotations`: DDP's register_comm_hook checks the hook's annotations as objects.
import argparse
import os
import socket
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from configuration_gpt2repro import GPT2ReproConfig  # noqa: E402
from gpt2repro.launch import compile_kwargs  # noqa: E402
from gpt2repro.training import compile_for_training  # noqa: E402
from modeling_gpt2repro import GPT2ReproForCausalLM  # noqa: E402

VARIANTS = ("eager", "compiled inside DDP (ours)", "compiled whole (no DDPOptimizer)", "compiled around DDP")


@dataclass
class BackwardLog:
    """Times (time.perf_counter) recorded during one step's backward."""
    launches: list[float] = field(default_factory=list)  # each bucket's all-reduce launch (the comm hook's call)
    gradients: list[float] = field(default_factory=list)  # each parameter-gradient node's end (its post-hook)
    pieces: int = 0  # compiled backward nodes in the step's autograd graph

    def clear(self) -> None:
        self.launches.clear()
        self.gradients.clear()
        self.pieces = 0


def timed_allreduce_hook(log: BackwardLog, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP's default all-reduce (on the default process group), its launch time recorded."""
    log.launches.append(time.perf_counter())
    return default_hooks.allreduce_hook(None, bucket)


def watch_gradient_nodes(loss: torch.Tensor, log: BackwardLog) -> None:
    """Post-hooks on the autograd nodes of `loss`'s graph that compute a parameter's gradient (those that feed an
    AccumulateGrad): the last one to run marks the end of the backward's compute, before DDP's final wait."""
    def record(grad_inputs, grad_outputs) -> None:
        log.gradients.append(time.perf_counter())

    seen, stack = set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        children = [child for child, _ in node.next_functions if child is not None]
        if any(child.name().endswith("AccumulateGrad") for child in children):
            node.register_hook(record)
            log.pieces += "CompiledFunction" in node.name()
        stack.extend(child for child in children if not child.name().endswith("AccumulateGrad"))


@dataclass
class Variant:
    name: str
    step_model: Callable  # what the step calls: the DDP module, or the compiled wrapper around it
    ddp: DDP
    log: BackwardLog
    no_ddp_optimizer: bool = False  # compile (and any recompile) with optimize_ddp off
    times: dict[str, list[float]] = field(default_factory=lambda: {"fwd": [], "bwd": [], "step": []})
    counts: dict[str, list[float]] = field(default_factory=lambda: {"pieces": [], "buckets": [], "early": [],
                                                                    "overlap": []})
    graphs: int = 0  # dynamo graphs compiled in the warm-up
    graph_breaks: int = 0
    recompiled: int = 0  # dynamo graphs compiled in the timed steps (should be 0)


def build_variant(name: str, config: GPT2ReproConfig, bucket_cap_mb: float) -> Variant:
    """A fresh model (the same weights on every process: DDP broadcasts rank 0's) wrapped as the variant `name`."""
    torch.manual_seed(0)
    # Each variant its own subclass: dynamo's guards accept any model of the same class and shapes, so the variants
    # after the first would otherwise run the first one's compiled graphs instead of compiling their own.
    model_class = type(f"GPT2ReproForCausalLM{VARIANTS.index(name)}", (GPT2ReproForCausalLM,), {})
    model = model_class(config)
    if name != "eager" and name != "compiled around DDP":
        compile_for_training(model, compile_kwargs())  # replaces model.forward before DDP wraps it, as training does
    ddp = DDP(model, bucket_cap_mb=bucket_cap_mb)
    log = BackwardLog()
    ddp.register_comm_hook(log, timed_allreduce_hook)
    step_model = ddp
    if name == "compiled around DDP":
        step_model = torch.compile(ddp, **{**compile_kwargs(), "fullgraph": False})
    return Variant(name, step_model, ddp, log, no_ddp_optimizer=name == "compiled whole (no DDPOptimizer)")


def train_step(variant: Variant, x: torch.Tensor, y: torch.Tensor, record: bool) -> None:
    """Forward, loss, backward, zero_grad (no optimizer: the all-reduces are what is measured); `record` keeps the
    step's times and counts."""
    log = variant.log
    log.clear()
    dist.barrier()  # every process starts the step together: the all-reduces wait for the slowest
    with torch._dynamo.config.patch(optimize_ddp=not variant.no_ddp_optimizer):
        start = time.perf_counter()
        loss = variant.step_model(input_ids=x, shift_labels=y, return_logits=False).loss
        forward_end = time.perf_counter()
        watch_gradient_nodes(loss, log)  # untimed: a walk of the autograd graph
        backward_start = time.perf_counter()
        loss.backward()
        backward_end = time.perf_counter()
        variant.ddp.zero_grad(set_to_none=True)
        step_end = time.perf_counter()
    if not record:
        return
    variant.times["fwd"].append(forward_end - start)
    variant.times["bwd"].append(backward_end - backward_start)
    variant.times["step"].append((forward_end - start) + (step_end - backward_start))
    last_gradient = max(log.gradients)
    variant.counts["pieces"].append(log.pieces)
    variant.counts["buckets"].append(len(log.launches))
    variant.counts["early"].append(sum(launch < last_gradient for launch in log.launches))
    in_flight = max(0.0, last_gradient - min(log.launches))
    variant.counts["overlap"].append(in_flight / (last_gradient - backward_start))


def dynamo_counts() -> tuple[int, int]:
    """(graphs compiled, graph breaks) so far in this process."""
    counters = torch._dynamo.utils.counters
    return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


def run(rank: int, world_size: int, args: argparse.Namespace) -> None:
    """One process of the benchmark; rank 0 prints."""
    torch.set_num_threads(1)  # 2 processes on 2 cores
    torch._inductor.config.compile_threads = 1  # no compile worker pool beside each process
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    say = print if rank == 0 else (lambda *a, **k: None)
    config = GPT2ReproConfig(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, n_positions=args.seq_len)
    generator = torch.Generator().manual_seed(rank)  # each process its own batch, as in data-parallel training
    x = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len), generator=generator)
    y = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len), generator=generator)

    # All models built before any compiles: each model class registers itself in a transformers registry whose size
    # dynamo guards, so a model built later would make the graphs compiled before it recompile.
    variants = [build_variant(name, config, args.bucket_cap_mb) for name in VARIANTS]
    for variant in variants:
        graphs, breaks = dynamo_counts()
        start = time.perf_counter()
        for _ in range(args.warmup):  # the first step compiles; DDP rebuilds its buckets after the first
            train_step(variant, x, y, record=False)
        graphs_now, breaks_now = dynamo_counts()
        variant.graphs, variant.graph_breaks = graphs_now - graphs, breaks_now - breaks
        say(f"warm-up of {variant.name}: {time.perf_counter() - start:.1f} s, {variant.graphs} dynamo graph(s), "
            f"{variant.graph_breaks} graph break(s)", file=sys.stderr, flush=True)

    for _ in range(args.steps):  # interleaved: the machine's load drifts alike for every variant
        for variant in variants:
            graphs, _ = dynamo_counts()
            train_step(variant, x, y, record=True)
            variant.recompiled += dynamo_counts()[0] - graphs

    if rank == 0:
        print_table(variants, config, args, world_size)
    dist.barrier()  # no process leaves while another still talks to it
    dist.destroy_process_group()


def print_table(variants: list[Variant], config: GPT2ReproConfig, args: argparse.Namespace, world_size: int) -> None:
    parameters = sum(p.numel() for p in variants[0].ddp.module.parameters())
    print(f"GPT2Repro {args.n_layer} layers x {args.n_embd} ({parameters / 1e6:.1f}M parameters, tied embeddings: "
          f"{config.tie_word_embeddings}), B x T = {args.batch_size} x {args.seq_len} per process\n"
          f"{world_size} CPU processes (gloo, 1 thread each), bucket_cap_mb {args.bucket_cap_mb:g}, torch "
          f"{torch.__version__}; medians of {args.steps} interleaved steps after {args.warmup} warm-up, rank 0")
    header = (f"{'variant':<34} {'graphs':>6} {'breaks':>6} {'pieces':>6} {'buckets':>7} {'early':>5} {'overlap':>7} "
              f"{'fwd ms':>8} {'bwd ms':>8} {'step ms':>8} {'x eager':>7}")
    print(header)
    print("-" * len(header))
    eager_step = statistics.median(variants[0].times["step"])
    for variant in variants:
        count = {key: statistics.median(values) for key, values in variant.counts.items()}
        ms = {key: 1000 * statistics.median(values) for key, values in variant.times.items()}
        print(f"{variant.name:<34} {variant.graphs:>6} {variant.graph_breaks:>6} {count['pieces']:>6g} "
              f"{count['buckets']:>7g} {count['early']:>5g} {count['overlap']:>7.0%} {ms['fwd']:>8.1f} "
              f"{ms['bwd']:>8.1f} {ms['step']:>8.1f} {ms['step'] / 1000 / eager_step:>7.2f}")
    recompiled = [f"{variant.name}: {variant.recompiled}" for variant in variants if variant.recompiled]
    if recompiled:
        print("graphs recompiled during the timed steps (their times include compilation): " + ", ".join(recompiled))
    reasons = torch._dynamo.utils.counters["graph_break"]
    if reasons:
        print("graph break reasons (all variants):")
        for reason, count in reasons.most_common(5):
            print(f"  {count} x {reason.splitlines()[0][:150]}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--n_layer", type=int, default=4)
    parser.add_argument("--n_head", type=int, default=4)
    parser.add_argument("--n_embd", type=int, default=256)
    parser.add_argument("--seq_len", type=int, default=128, help="tokens per sequence (also n_positions)")
    parser.add_argument("--batch_size", type=int, default=4, help="sequences per process")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3,
                        help="untimed steps per variant: compilation, and DDP's bucket rebuild after the first step")
    parser.add_argument("--bucket_cap_mb", type=float, default=1.0,
                        help="DDP's bucket cap; at least 1 (DDP's first bucket), which DDPOptimizer requires")
    args = parser.parse_args(argv)
    if args.bucket_cap_mb < 1:
        parser.error("--bucket_cap_mb must be at least 1: DDPOptimizer asserts the first bucket (1 MB) is no larger")
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(free_port())
    world_size = 2
    mp.spawn(run, args=(world_size, args), nprocs=world_size, join=True)


if __name__ == "__main__":
    main()
