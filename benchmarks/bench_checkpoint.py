"""A multi-process run's checkpoint before and after sharding, on 2 CPU processes over gloo: the whole state written
by rank 0 (Accelerate's save_state: ZeRO's state consolidated on rank 0, then safetensors and optimizer.bin) against
each process writing its own share (gpt2repro.sharded_checkpoint, torch.distributed.checkpoint).

    python benchmarks/bench_checkpoint.py                       # gpt2-124m, --shard_optimizer, 3 rounds
    python benchmarks/bench_checkpoint.py --model gpt2-350m     # the largest size whose two processes fit in 24 GB

Each round writes and then resumes from one checkpoint of each kind, interleaved (the machine is shared and noisy).
Printed per kind: the median seconds to write and to resume (every process done), the bytes each process wrote, and
each process's peak host memory above its resident set during the resume (Linux's VmHWM, reset before the load): the
whole state read by every process against its own share. The optimiser state is AdamW's after one step at LR 0 (its
values do not matter here, its size does). The write bandwidth of a shared cluster filesystem differs; the bytes do
not."""
from __future__ import annotations

import argparse
import ctypes
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def peak_rise_kb(measure) -> int:
    """Host memory (kB) this process took above its resident set at its peak while `measure()` ran (Linux, glibc).
    Memory freed before is first handed back to the system: reused, it would hide what `measure` needs."""
    def status(field: str) -> int:
        return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))

    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = status("VmRSS")
    measure()
    return status("VmHWM") - before


def worker(model_name: str, rounds: int, folder: Path) -> None:
    import torch
    import torch.distributed as dist
    from accelerate import Accelerator

    import train_accelerate
    from gpt2repro import checkpointing, sharded_checkpoint, training

    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True)
    rank, world_size = accelerator.process_index, accelerator.num_processes
    settings = train_accelerate.parse_args(["--preset", model_name, "--shard_optimizer", "--mixed_precision", "no"])
    model, optimizers = training.build_model(settings, accelerator.device, world_size)
    model, *optimizers = accelerator.prepare(model, *optimizers)
    raw_model = accelerator.unwrap_model(model)
    for optimizer in map(sharded_checkpoint.state_holder, optimizers):
        sharded_checkpoint.initialise_state(optimizer)

    def whole_save(path: Path) -> None:
        with checkpointing.tied_head_saved_quietly():
            accelerator.save_state(str(path))

    def whole_load(path: Path) -> None:
        accelerator.load_state(str(path), map_location="cpu")

    def sharded_save(path: Path) -> None:
        sharded_checkpoint.save(path, raw_model, optimizers, with_optimizers=True)

    def sharded_load(path: Path) -> None:
        sharded_checkpoint.load(path, raw_model, optimizers, with_optimizers=True)

    kinds = {"whole": (whole_save, whole_load), "sharded": (sharded_save, sharded_load)}
    labels = {"whole": "whole state, rank 0 writes (before)", "sharded": "each process its share (after)"}
    results = {kind: {"write": [], "resume": [], "bytes": [], "peak": []} for kind in kinds}
    for round_ in range(rounds):
        for kind, (save, load) in kinds.items():
            path = folder / f"{kind}_{round_}"
            dist.barrier()
            start = time.perf_counter()
            save(path)
            dist.barrier()
            results[kind]["write"].append(time.perf_counter() - start)
            mine = [p for p in path.rglob("*") if p.is_file() and (kind == "whole" and rank == 0
                                                                   or p.name.startswith(f"__{rank}_"))]
            results[kind]["bytes"].append(sum(p.stat().st_size for p in mine))
            dist.barrier()
            start = time.perf_counter()
            peak = peak_rise_kb(lambda: load(path))  # noqa: B023 (called at once)
            dist.barrier()
            results[kind]["resume"].append(time.perf_counter() - start)
            results[kind]["peak"].append(peak * 1024)
            dist.barrier()
            if rank == 0:
                shutil.rmtree(path)
    gathered = [None] * world_size
    dist.all_gather_object(gathered, results)
    if rank == 0:
        parameters = sum(p.numel() for p in raw_model.parameters())
        print(f"{model_name}: {parameters / 1e6:.0f}M parameters, {world_size} processes, --shard_optimizer, "
              f"{rounds} rounds (medians)")
        print(f"{'checkpoint':38} {'write s':>8} {'resume s':>9} " + " ".join(
            f"{f'rank {r} GB written':>17} {f'rank {r} resume peak GB':>22}" for r in range(world_size)))
        for kind in kinds:
            row = f"{labels[kind]:38} {statistics.median(gathered[0][kind]['write']):8.2f} " \
                  f"{statistics.median(gathered[0][kind]['resume']):9.2f} "
            row += " ".join(f"{statistics.median(g[kind]['bytes']) / 1e9:17.3f} "
                            f"{statistics.median(g[kind]['peak']) / 1e9:22.3f}" for g in gathered)
            print(row)
    accelerator.end_training()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gpt2-124m", help="a preset of train_accelerate.py (its model size)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.model, args.rounds, Path(args.folder))
        return
    with tempfile.TemporaryDirectory() as folder:
        env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
        subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", __file__,
                        "--worker", "--model", args.model, "--rounds", str(args.rounds), "--folder", folder],
                       env=env, check=True)


if __name__ == "__main__":
    main()
