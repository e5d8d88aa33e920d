"""Will a training launch fit? `train_accelerate.py --dry_run`: the memory each process needs, from the flags alone.

The model is built on the meta device (no memory, no data, no process group), so a plan for GPT-2 1.5B takes seconds
on any machine. Per process, at the peak of a step (the end of the last micro-step's backward):
- weights, gradients and the optimiser state in fp32 (AdamW: two moments and a step count per tensor; Muon: one
  momentum), plus DDP's gradient buckets (a second copy of the gradients) with more than one process;
- under bf16 autocast, the bf16 copies of the blocks' matmul weights that the forward casts and backward keeps;
- activations: what autograd saves for backward, per token and block (below), times the micro-batch's tokens;
- the loss: eager, the chunked loss keeps d(loss)/d(hidden) and d(loss)/d(lm_head), and holds one chunk of
  (rows, padded vocab) logits and their gradient while it runs; compiled, the plain loss over the whole logits;
- the optimiser state split over the processes with --shard_optimizer (AdamW's by parameter, Muon's by matrix);
- under an FSDP launch (accelerate_configs/fsdp2_8gpu.yaml): weights, gradients and AdamW's state split too (each
  parameter's rows in N chunks), no DDP buckets, the chunked loss (compiled, only the blocks are), plus the weights
  FSDP gathers: the root's (embeddings, final norm, head: kept through backward) and two blocks' at a time (the one
  running, the next one prefetched), in the matmul dtype.
The activation and state figures are checked in tests/test_memory_plan.py against what torch holds on a CPU
(saved-tensor hooks; the optimiser's state after a step). What no CPU can show is left to a margin: the CUDA context,
the allocator's fragmentation and the collectives' buffers take the last 10% of the device.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
from dataclasses import dataclass

import torch

from configuration_gpt2repro import GPT2ReproConfig
from gpt2repro.cli import is_rank0
from gpt2repro.muon import owners
from gpt2repro.settings import Resolved, TrainSettings
from modeling_gpt2repro import LOSS_CHUNK_ROWS, GPT2ReproForCausalLM

GB = 1e9
USABLE_FRACTION = 0.9  # of a device's memory, the rest for the CUDA context, fragmentation and NCCL buffers

# Bytes autograd saves per token, per block, in units of the width C (tests/test_memory_plan.py measures them within
# 10% on CPU). GPT-2, fp32: the inputs of the 2 LayerNorms (4C each) and of the 4 matmuls (4C, 4C, 4C, 16C), the
# q, k, v and output of attention (16C), GELU's input (16C): 68C. Under bf16 autocast the matmuls' inputs and
# attention are bf16: 8 + 14 + 8 + 8 = 38C. The speedrun's block saves more: rotary's fp32 q and k, QK-norm's inputs,
# ReLU²'s input and output (measured: 78C fp32, 52C bf16).
BLOCK_BYTES_PER_TOKEN = {("gpt2", "no"): 68, ("gpt2", "bf16"): 38, ("speedrun", "no"): 78, ("speedrun", "bf16"): 52}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("memory plan")
    group.add_argument("--dry_run", action="store_true",
                       help="print the memory each process needs with these flags (and whether it fits "
                            "--device_memory, with the flags that would make it fit), then exit: no data is read; "
                            "for a launch's processes, run it under the launch or set WORLD_SIZE")
    group.add_argument("--device_memory", type=parse_bytes,
                       help="one device's memory for --dry_run, e.g. 80GB or 24GiB; unset: the GPU's, if any")
    group.add_argument("--write_bandwidth", type=parse_bytes, default="1GB",
                       help="bytes per second one process writes a checkpoint at, for --dry_run's preemption time")


def parse_bytes(text: str) -> int:
    """'80GB' -> 80e9, '24GiB' -> 24 * 2**30, '512MB', or a plain number of bytes."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(i?)B?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"not a memory size: {text!r} (e.g. 80GB, 24GiB)")
    number, prefix, binary = match.groups()
    power = "_KMGT".index(prefix.upper()) if prefix else 0
    return int(float(number) * (1024 if binary else 1000) ** power)


@dataclass(frozen=True)
class PlannedRun:
    """What a plan depends on: the model, the batch, the optimiser, and how the launch runs them (resolved)."""
    label: str  # the preset, or "flags"
    recipe: str
    config: GPT2ReproConfig
    total_batch_size: int
    micro_batch_size: int
    max_steps: int
    optimizer: str
    shard_optimizer: bool
    gradient_checkpointing: bool
    mixed_precision: str  # "bf16" or "no"
    compile: str  # "on" or "off"
    fsdp: bool

    @property
    def seq_len(self) -> int:
        return self.config.n_positions


def planned_run(settings: TrainSettings, resolved: Resolved) -> PlannedRun:
    return PlannedRun(label=settings.preset or "flags", recipe=settings.recipe, config=settings.model.config(),
                      total_batch_size=settings.schedule.total_batch_size,
                      micro_batch_size=settings.schedule.micro_batch_size, max_steps=settings.schedule.max_steps,
                      optimizer=settings.optim.optimizer, shard_optimizer=settings.optim.shard_optimizer,
                      gradient_checkpointing=settings.compute.gradient_checkpointing,
                      mixed_precision=resolved.mixed_precision, compile=resolved.compile, fsdp=resolved.fsdp)


def model_on_meta(run: PlannedRun) -> GPT2ReproForCausalLM:
    with torch.device("meta"):
        return GPT2ReproForCausalLM(run.config)


def optimizer_state_bytes(model: torch.nn.Module, run: PlannedRun, shards: int = 1) -> int:
    """The optimisers' state after their first step, in bytes: AdamW's exp_avg and exp_avg_sq (fp32, each the size
    of its parameter) and a 4-byte step per tensor, split over `shards` processes by --shard_optimizer (ZeRO-1: about
    1/shards each); Muon's momentum buffer per matrix (configure_muon's split), each kept by its matrix's owner only
    when sharded: the figure is the most any process keeps."""
    params = [p for p in model.parameters() if p.requires_grad]
    muon = set()
    if run.optimizer == "muon":
        muon = {id(p) for p in model.transformer.h.parameters() if p.dim() == 2}
    adamw = sum(8 * p.numel() + 4 for p in params if id(p) not in muon)
    sizes = [p.numel() for p in params if id(p) in muon]
    kept = [0] * shards  # Muon's bytes on each process
    for size, owner in zip(sizes, owners(sizes, shards), strict=True):
        kept[owner] += 4 * size
    return max(kept) + adamw // shards


def fsdp_share(param: torch.Tensor, processes: int) -> int:
    """Elements of `param` on the busiest process under FSDP2: rows cut in `processes` chunks of ceil(rows / N)."""
    rows = param.shape[0]
    return -(-rows // processes) * (param.numel() // rows)


def fsdp_gathered_bytes(model: GPT2ReproForCausalLM) -> int:
    """The weights FSDP2 holds whole at the peak of a step: the root's (not in a block) and two blocks', in fp32 (the
    recipe's policy gathers fp32 weights; autocast makes the bf16 copies, counted apart)."""
    in_blocks = {id(p) for p in model.transformer.h.parameters()}
    root = sum(p.numel() for p in model.parameters() if id(p) not in in_blocks)
    block = sum(p.numel() for p in model.transformer.h[0].parameters())
    return (root + 2 * block) * 4


def block_bytes_per_token(config: GPT2ReproConfig, mixed_precision: str) -> int:
    """BLOCK_BYTES_PER_TOKEN of this block: GPT-2's when every architecture option is GPT-2's, else the speedrun's
    (the larger: rotary, QK-norm and ReLU² each keep more)."""
    gpt2 = GPT2ReproConfig()
    block = "gpt2" if all(getattr(config, name) == getattr(gpt2, name) for name in config.architecture_options) \
        else "speedrun"
    return BLOCK_BYTES_PER_TOKEN[(block, mixed_precision)] * config.n_embd


def activation_bytes(model: GPT2ReproForCausalLM, run: PlannedRun, micro_batch_size: int,
                     checkpointing: bool) -> int:
    """What autograd keeps for backward over one micro-batch: the blocks' saved tensors (with activation checkpointing
    only each block's fp32 input, and one block's full set while it is recomputed), the final norm's input and the
    loss's gradient with respect to the hidden states (fp32, 4C each)."""
    config, tokens = model.config, micro_batch_size * run.seq_len
    block = block_bytes_per_token(config, run.mixed_precision) * tokens
    blocks = (4 * config.n_embd * tokens * config.n_layer + block) if checkpointing else block * config.n_layer
    return blocks + 2 * 4 * config.n_embd * tokens


def loss_bytes(model: GPT2ReproForCausalLM, run: PlannedRun, micro_batch_size: int) -> int:
    """The chunked loss: d(loss)/d(lm_head) (fp32, kept for backward), one chunk of fp32 logits and its gradient in
    the matmul dtype, and under bf16 the head's bf16 copy. Compiled, the plain loss instead: the micro-batch's whole
    (B, T, Vp) logits and their gradient, in the matmul dtype (an estimate: no GPU has measured inductor's buffers)."""
    vocab, width = model.config.padded_vocab_size, model.config.n_embd
    matmul_bytes = 2 if run.mixed_precision == "bf16" else 4
    if run.compile != "off" and not run.fsdp:  # FSDP compiles the blocks, not the loss
        return 2 * micro_batch_size * run.seq_len * vocab * matmul_bytes
    rows = min(micro_batch_size * run.seq_len, LOSS_CHUNK_ROWS)
    head_copy = vocab * width * 2 if run.mixed_precision == "bf16" else 0
    return 4 * vocab * width + rows * vocab * (4 + matmul_bytes) + head_copy


def fsdp_state_bytes(model: torch.nn.Module, world_size: int) -> tuple[int, int]:
    """(fp32 weights, AdamW state) of the busiest process under FSDP: its rows of every parameter, their two moments,
    and a 4-byte step per tensor."""
    share = sum(fsdp_share(p, world_size) for p in model.parameters())
    return 4 * share, 8 * share + 4 * len(list(model.parameters()))


def plan(run: PlannedRun, world_size: int, micro_batch_size: int | None = None) -> dict[str, int]:
    """Bytes per process, by part, with the settings in `run`, at their micro-batch unless another is given."""
    micro_batch_size = run.micro_batch_size if micro_batch_size is None else micro_batch_size
    model = model_on_meta(run)
    parameters = sum(p.numel() for p in model.parameters())
    block_matrices = sum(p.numel() for p in model.transformer.h.parameters() if p.dim() == 2)
    if run.fsdp:
        weights, optimizer_state = fsdp_state_bytes(model, world_size)
        accumulating = run.total_batch_size > micro_batch_size * run.seq_len * world_size
        return {
            "weights (fp32, FSDP share)": weights,
            "gradients (fp32, FSDP share)": weights,
            # with accumulation FSDP keeps every gradient whole (fp32) between micro-steps, reduce-scattered at the last
            "whole gradients, accumulating": 4 * parameters if accumulating else 0,
            "optimiser state (FSDP share)": optimizer_state,
            "weights gathered by FSDP": fsdp_gathered_bytes(model),
            "bf16 weight copies (autocast)": 2 * block_matrices if run.mixed_precision == "bf16" else 0,
            "activations": activation_bytes(model, run, micro_batch_size, run.gradient_checkpointing),
            "loss (chunked)": loss_bytes(model, run, micro_batch_size),
        }
    shards = world_size if run.shard_optimizer else 1
    return {
        "weights (fp32)": 4 * parameters,
        "gradients (fp32)": 4 * parameters,
        "DDP gradient buckets": 4 * parameters if world_size > 1 else 0,
        "optimiser state": optimizer_state_bytes(model, run, shards),
        "bf16 weight copies (autocast)": 2 * block_matrices if run.mixed_precision == "bf16" else 0,
        "activations": activation_bytes(model, run, micro_batch_size, run.gradient_checkpointing),
        "loss (whole logits, compiled)" if run.compile != "off" else "loss (chunked)":
            loss_bytes(model, run, micro_batch_size),
    }


def detected_device_memory() -> int | None:
    return torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None


def checkpoint_bytes(model: GPT2ReproForCausalLM, run: PlannedRun, world_size: int) -> int:
    """What the busiest process writes for a preemption checkpoint: the training state (fp32 weights and the optimiser
    state), no hf/ folder. One process writes all of it. Several write their shares in parallel
    (gpt2repro.sharded_checkpoint): under FSDP each its shard; under DDP, DCP writes each tensor that every process
    holds once, handing them out greedily by size, so the busiest writes at most the average share plus the largest
    tensor; with --shard_optimizer, to its share of the weights that way each adds the optimiser state it keeps alone
    (ZeRO's split is greedy too: at most the average plus the largest parameter's moments). The few-KB files are
    left out."""
    parameters = list(model.parameters())
    if run.fsdp:
        return sum(fsdp_state_bytes(model, world_size))
    weights, largest = 4 * sum(p.numel() for p in parameters), 4 * max(p.numel() for p in parameters)
    if world_size == 1:
        return weights + optimizer_state_bytes(model, run)
    if run.shard_optimizer:
        return weights // world_size + largest + optimizer_state_bytes(model, run, world_size) + 2 * largest
    return (weights + optimizer_state_bytes(model, run)) // world_size + largest


def preemption_lines(model: GPT2ReproForCausalLM, run: PlannedRun, world_size: int, write_bandwidth: int) -> list[str]:
    """The preemption checkpoint against the launcher's grace: torchrun (which accelerate launch runs) kills the
    workers its --shutdown_timeout after it forwards the signal (PET_SHUTDOWN_TIMEOUT, else
    TORCH_ELASTIC_SHUTDOWN_TIMEOUT, else 30 s: torch/distributed/run.py and launcher/api.py)."""
    written = checkpoint_bytes(model, run, world_size)
    grace = int(os.environ.get("PET_SHUTDOWN_TIMEOUT") or os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT") or 30)
    seconds = written / write_bandwidth
    lines = [f"preemption checkpoint: {written / GB:.2f} GB written by the busiest process, {seconds:.1f} s "
             f"at {write_bandwidth / GB:g} GB/s (--write_bandwidth); the launcher's grace is {grace} s "
             f"(PET_SHUTDOWN_TIMEOUT)"]
    if seconds > grace:
        lines.append(f"warning: a preemption checkpoint would not finish within the grace: the job is killed "
                     f"{grace} s after the signal, mid-write (the previous checkpoint survives, the steps since are "
                     f"lost); raise PET_SHUTDOWN_TIMEOUT, and the scheduler's own grace with it")
    return lines


def describe(run: PlannedRun, world_size: int, device_memory: int | None, write_bandwidth: int) -> str:
    """The plan as printed by --dry_run: the run, each part's bytes per process, and the verdict with a remedy."""
    model = model_on_meta(run)
    parameters = sum(p.numel() for p in model.parameters())
    tokens_per_micro_step = run.micro_batch_size * run.seq_len * world_size
    accumulation = run.total_batch_size // tokens_per_micro_step
    lines = [f"memory plan: {run.label}, recipe {run.recipe}, {parameters:,} parameters "
             f"({run.config.n_layer} layers, width {run.config.n_embd}, {run.config.n_head} heads, context "
             f"{run.seq_len})",
             f"{run.max_steps:,} steps x {run.total_batch_size:,} tokens = "
             f"{run.max_steps * run.total_batch_size:,} tokens; {world_size} process(es), micro-batch "
             f"{run.micro_batch_size} x {run.seq_len}, "
             f"{accumulation} micro-steps per step; mixed precision {run.mixed_precision}, compile {run.compile}, "
             f"activation checkpointing {'on' if run.gradient_checkpointing else 'off'}, "
             + ("FSDP" if run.fsdp else
                "optimiser state " + ("sharded" if run.shard_optimizer and world_size > 1 else "whole")),
             "per process:"]
    parts = plan(run, world_size)
    lines += [f"  {name:32} {size / GB:8.2f} GB" for name, size in parts.items()]
    total = sum(parts.values())
    lines.append(f"  {'total':32} {total / GB:8.2f} GB")
    lines += preemption_lines(model, run, world_size, write_bandwidth)
    device_memory = device_memory or detected_device_memory()
    if device_memory is None:
        lines.append("fit: unknown: no GPU here; pass --device_memory (e.g. 80GB) for a verdict")
        return "\n".join(lines)
    usable = USABLE_FRACTION * device_memory
    if total <= usable:
        lines.append(f"fit: yes: {total / GB:.1f} GB of the {usable / GB:.1f} GB usable of {device_memory / GB:.1f} GB")
        return "\n".join(lines)
    lines.append(f"fit: no: {total / GB:.1f} GB, more than the {usable / GB:.1f} GB usable of {device_memory / GB:.1f} "
                 f"GB; what would fit:")
    lines += remedies(run, world_size, usable)
    return "\n".join(lines)


def remedies(run: PlannedRun, world_size: int, usable: float) -> list[str]:
    """The flags that make the run fit `usable` bytes, one line per way that allows a larger micro-batch than the ways
    before it: a smaller micro-batch (one that still divides the step's tokens); the chunked loss (--compile off);
    --shard_optimizer (with more than one process); activation checkpointing; then, with more than one process and
    the GPT-2 recipe, FSDP, alone and with activation checkpointing."""
    rows_per_step = run.total_batch_size // (run.seq_len * world_size)  # micro-batch x accumulation, per process
    batches = [b for b in range(run.micro_batch_size, 0, -1) if rows_per_step % b == 0]
    if run.fsdp:
        ways = [{}, {"gradient_checkpointing": True}]
    else:
        shard = {"shard_optimizer": True} if world_size > 1 else {}
        ways = [{}, {"compile": "off"}] + ([shard] if shard else []) + [{"gradient_checkpointing": True, **shard}]
        if world_size > 1 and run.optimizer == "adamw":  # Muon is refused under FSDP
            ways += [{"fsdp": True}, {"fsdp": True, "gradient_checkpointing": True}]
    flags = {"compile": "--compile off", "shard_optimizer": "--shard_optimizer",
             "gradient_checkpointing": "--gradient_checkpointing", "fsdp": "FSDP (accelerate_configs/fsdp2_8gpu.yaml)"}
    found, largest = [], 0
    for way in ways:
        changed = {name: value for name, value in way.items() if getattr(run, name) != value}
        if way and not changed:
            continue
        variant = dataclasses.replace(run, **changed)
        for b in batches if changed else batches[1:]:
            total = sum(plan(variant, world_size, b).values())
            if total <= usable:
                if b > largest:
                    named = ([f"--micro_batch_size {b}"] if b != run.micro_batch_size else []) + \
                            [flags[name] for name in changed]
                    found.append(f"  {' '.join(named)}: {total / GB:.1f} GB ({rows_per_step // b} micro-steps per "
                                 f"step)")
                    largest = b
                break
    return found or ["  none of a smaller micro-batch, --compile off, --shard_optimizer, activation checkpointing and "
                     "FSDP: more processes"]


def print_plan(settings: TrainSettings, resolved: Resolved) -> None:
    """--dry_run: the plan, printed once per launch."""
    if is_rank0():
        print(describe(planned_run(settings, resolved), resolved.world_size, settings.plan.device_memory,
                       settings.plan.write_bandwidth))
