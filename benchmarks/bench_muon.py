"""Muon's step time on GPT-2 124M's block matrices (12 x: q|k|v 2304 x 768, 768 x 768, 3072 x 768, 768 x 3072),
on 1 process and shared out among 2 (gloo, one CPU thread each), against torch.optim.Muon doing all of them.

    python benchmarks/bench_muon.py              # --processes 1 2
    python benchmarks/bench_muon.py --n_layer 4 --steps 5

With N processes each runs, interleaved step by step, (a) torch.optim.Muon on every matrix, as every process does
without sharding, and (b) muon.Muon, which orthogonalises 1/N of them and broadcasts the results. Medians per
process; the ratio is the time a process saves.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpt2repro.muon import Muon  # noqa: E402


def block_matrices(n_layer: int, width: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(the fused q|k|v matrices, the other matrices) of `n_layer` blocks, as nn.Linear weights (out, in)."""
    generator = torch.Generator().manual_seed(0)

    def matrix(rows: int, cols: int) -> torch.Tensor:
        return torch.nn.Parameter(torch.randn(rows, cols, generator=generator) * 0.02)

    qkv = [matrix(3 * width, width) for _ in range(n_layer)]
    others = [m for _ in range(n_layer) for m in (matrix(width, width), matrix(4 * width, width),
                                                  matrix(width, 4 * width))]
    return qkv, others


def worker(rank: int, world_size: int, port: int, args: argparse.Namespace, queue) -> None:
    torch.set_num_threads(1)
    if world_size > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
    qkv, others = block_matrices(args.n_layer, args.n_embd)
    reference = torch.optim.Muon(qkv + others, lr=0.02, weight_decay=0.0)
    sharded = Muon([{"params": qkv, "parts": 3}, {"params": others}], lr=0.02, weight_decay=0.0)
    times = {"torch.optim.Muon (every matrix)": [], "muon.Muon (shared out)": []}
    for step in range(args.warmup + args.steps):
        for p in qkv + others:
            p.grad = torch.randn_like(p) * 1e-3
        for (label, optimizer) in zip(times, (reference, sharded), strict=True):
            if world_size > 1:
                dist.barrier()  # the processes start each measurement together
            start = time.perf_counter()
            optimizer.step()
            if step >= args.warmup:
                times[label].append(time.perf_counter() - start)
    if rank == 0:
        queue.put({label: statistics.median(t) for label, t in times.items()})
    if world_size > 1:
        dist.barrier()  # no process leaves while another still receives Muon's broadcasts: gloo would abort it
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--n_layer", type=int, default=12)
    parser.add_argument("--n_embd", type=int, default=768)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=3, help="timed steps (a 124M step takes ~9 s on one CPU thread)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps")
    args = parser.parse_args(argv)
    print(f"Muon step on {args.n_layer} blocks of width {args.n_embd}, CPU "
          f"({torch.backends.cpu.get_cpu_capability()}), one thread per process, median of {args.steps} steps")
    context = mp.get_context("spawn")
    for world_size in args.processes:
        queue = context.SimpleQueue()
        workers = mp.start_processes(worker, args=(world_size, free_port(), args, queue), nprocs=world_size,
                                     join=False, start_method="spawn")
        result = queue.get()
        while not workers.join():
            pass
        for label, seconds in result.items():
            print(f"  {world_size} process(es)  {label:<34} {seconds * 1000:8.1f} ms per step per process")
        ratio = result["torch.optim.Muon (every matrix)"] / result["muon.Muon (shared out)"]
        print(f"  {world_size} process(es)  every matrix / shared out: {ratio:.2f}x")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    main()
