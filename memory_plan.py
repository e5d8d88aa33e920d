"""Will a training launch fit? `train_accelerate.py --dry_run`: the memory each process needs, from the flags alone.

The model is built on the meta device (no memory, no data, no process group), so a plan for GPT-2 1.5B takes seconds
on any machine. Per process, at the peak of a step (the end of the last micro-step's backward):
- weights, gradients and the optimiser state in fp32 (AdamW: two moments and a step count per tensor; Muon: one
  momentum), plus DDP's gradient buckets (a second copy of the gradients) with more than one process;
- under bf16 autocast, the bf16 copies of the blocks' matmul weights that the forward casts and backward keeps;
- activations: what autograd saves for backward, per token and block (below), times the micro-batch's tokens;
- the loss: train_step's chunked loss keeps d(loss)/d(hidden) and d(loss)/d(lm_head), and holds one chunk of
  (rows, padded vocab) logits and their gradient while it runs.
The activation and state figures are checked in tests/test_memory_plan.py against what torch holds on a CPU
(saved-tensor hooks; the optimiser's state after a step). What no CPU can show is left to a margin: the CUDA context,
the allocator's fragmentation and the collectives' buffers take the last 10% of the device.
"""
from __future__ import annotations

import argparse
import os
import re

import torch

from configuration_gpt2repro import GPT2ReproConfig
from io_helpers import CommandError, is_rank0
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


def parse_bytes(text: str) -> int:
    """'80GB' -> 80e9, '24GiB' -> 24 * 2**30, '512MB', or a plain number of bytes."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(i?)B?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"not a memory size: {text!r} (e.g. 80GB, 24GiB)")
    number, prefix, binary = match.groups()
    power = "_KMGT".index(prefix.upper()) if prefix else 0
    return int(float(number) * (1024 if binary else 1000) ** power)


def model_on_meta(args: argparse.Namespace) -> GPT2ReproForCausalLM:
    try:
        config = GPT2ReproConfig(n_positions=args.seq_len, n_layer=args.n_layer, n_head=args.n_head,
                                 n_embd=args.n_embd,
                                 **{name: getattr(args, name) for name in GPT2ReproConfig.architecture_options})
    except ValueError as error:  # e.g. --n_embd not divisible by --n_head
        raise CommandError(str(error)) from None
    with torch.device("meta"):
        return GPT2ReproForCausalLM(config)


def optimizer_state_bytes(model: torch.nn.Module, args: argparse.Namespace, shards: int = 1) -> int:
    """The optimisers' state after their first step, in bytes: AdamW's exp_avg and exp_avg_sq (fp32, each the size
    of its parameter) and a 4-byte step per tensor, split over `shards` processes by --shard_optimizer (ZeRO-1: about
    1/shards each); Muon's momentum buffer per matrix (configure_muon's split), on every process."""
    params = [p for p in model.parameters() if p.requires_grad]
    muon = set()
    if args.optimizer == "muon":
        muon = {id(p) for p in model.transformer.h.parameters() if p.dim() == 2}
    adamw = sum(8 * p.numel() + 4 for p in params if id(p) not in muon)
    return sum(4 * p.numel() for p in params if id(p) in muon) + adamw // shards


def activation_bytes(model: GPT2ReproForCausalLM, args: argparse.Namespace, micro_batch_size: int,
                     checkpointing: bool) -> int:
    """What autograd keeps for backward over one micro-batch: the blocks' saved tensors (with activation checkpointing
    only each block's fp32 input, and one block's full set while it is recomputed), the final norm's input and the
    loss's gradient with respect to the hidden states (fp32, 4C each)."""
    config, tokens = model.config, micro_batch_size * args.seq_len
    block = BLOCK_BYTES_PER_TOKEN[(args.recipe, args.mixed_precision)] * config.n_embd * tokens
    blocks = (4 * config.n_embd * tokens * config.n_layer + block) if checkpointing else block * config.n_layer
    return blocks + 2 * 4 * config.n_embd * tokens


def loss_bytes(model: GPT2ReproForCausalLM, args: argparse.Namespace, micro_batch_size: int) -> int:
    """The chunked loss: d(loss)/d(lm_head) (fp32, kept for backward), one chunk of fp32 logits and its gradient in
    the matmul dtype, and under bf16 the head's bf16 copy."""
    vocab, width = model.config.padded_vocab_size, model.config.n_embd
    matmul_bytes = 2 if args.mixed_precision == "bf16" else 4
    rows = min(micro_batch_size * args.seq_len, LOSS_CHUNK_ROWS)
    head_copy = vocab * width * 2 if args.mixed_precision == "bf16" else 0
    return 4 * vocab * width + rows * vocab * (4 + matmul_bytes) + head_copy


def plan(args: argparse.Namespace, world_size: int, micro_batch_size: int | None = None,
         checkpointing: bool | None = None, shard: bool | None = None) -> dict[str, int]:
    """Bytes per process, by part, at the flags' micro-batch, activation checkpointing and optimiser sharding unless
    others are given."""
    micro_batch_size = args.micro_batch_size if micro_batch_size is None else micro_batch_size
    checkpointing = args.gradient_checkpointing if checkpointing is None else checkpointing
    shard = args.shard_optimizer if shard is None else shard
    model = model_on_meta(args)
    parameters = sum(p.numel() for p in model.parameters())
    block_matrices = sum(p.numel() for p in model.transformer.h.parameters() if p.dim() == 2)
    parts = {
        "weights (fp32)": 4 * parameters,
        "gradients (fp32)": 4 * parameters,
        "DDP gradient buckets": 4 * parameters if world_size > 1 else 0,
        "optimiser state": optimizer_state_bytes(model, args, world_size if shard else 1),
        "bf16 weight copies (autocast)": 2 * block_matrices if args.mixed_precision == "bf16" else 0,
        "activations": activation_bytes(model, args, micro_batch_size, checkpointing),
        "loss (chunked)": loss_bytes(model, args, micro_batch_size),
    }
    return parts


def detected_device_memory() -> int | None:
    return torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None


def describe(args: argparse.Namespace) -> str:
    """The plan as printed by --dry_run: the run, each part's bytes per process, and the verdict with a remedy."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))  # accelerate launch and torchrun set it
    model = model_on_meta(args)
    parameters = sum(p.numel() for p in model.parameters())
    tokens_per_micro_step = args.micro_batch_size * args.seq_len * world_size
    accumulation = args.total_batch_size / tokens_per_micro_step
    lines = [f"memory plan: {args.preset or 'flags'}, recipe {args.recipe}, {parameters:,} parameters "
             f"({args.n_layer} layers, width {args.n_embd}, {args.n_head} heads, context {args.seq_len})",
             f"{args.max_steps:,} steps x {args.total_batch_size:,} tokens = "
             f"{args.max_steps * args.total_batch_size:,} tokens; {world_size} process(es), micro-batch "
             f"{args.micro_batch_size} x {args.seq_len}, "
             f"{accumulation:g} micro-steps per step; mixed precision {args.mixed_precision}, activation "
             f"checkpointing {'on' if args.gradient_checkpointing else 'off'}",
             "per process:"]
    parts = plan(args, world_size)
    lines += [f"  {name:32} {size / GB:8.2f} GB" for name, size in parts.items()]
    total = sum(parts.values())
    lines.append(f"  {'total':32} {total / GB:8.2f} GB")
    device_memory = args.device_memory or detected_device_memory()
    if device_memory is None:
        lines.append("fit: unknown: no GPU here; pass --device_memory (e.g. 80GB) for a verdict")
        return "\n".join(lines)
    usable = USABLE_FRACTION * device_memory
    if total <= usable:
        lines.append(f"fit: yes: {total / GB:.1f} GB of the {usable / GB:.1f} GB usable of {device_memory / GB:.1f} GB")
        return "\n".join(lines)
    lines.append(f"fit: no: {total / GB:.1f} GB, more than the {usable / GB:.1f} GB usable of {device_memory / GB:.1f} "
                 f"GB; what would fit:")
    lines += remedies(args, world_size, usable)
    return "\n".join(lines)


def remedies(args: argparse.Namespace, world_size: int, usable: float) -> list[str]:
    """The flags that make the run fit `usable` bytes, one line per way: the largest smaller micro-batch that still
    divides the step's tokens; --shard_optimizer (with more than one process); activation checkpointing; each with
    the ways before it where it needs them."""
    rows_per_step = args.total_batch_size // (args.seq_len * world_size)  # micro-batch x accumulation, per process
    batches = [b for b in range(args.micro_batch_size, 0, -1) if rows_per_step % b == 0]
    ways = [(False, False), (True, False), (True, True)] if world_size > 1 else [(False, False), (False, True)]
    found = []
    for shard, checkpointing in ways:
        shard, checkpointing = shard or args.shard_optimizer, checkpointing or args.gradient_checkpointing
        new_flags = (["--shard_optimizer"] if shard and not args.shard_optimizer else []) + \
                    (["--gradient_checkpointing"] if checkpointing and not args.gradient_checkpointing else [])
        for b in batches if new_flags else batches[1:]:
            total = sum(plan(args, world_size, b, checkpointing, shard).values())
            if total <= usable:
                flags = ([f"--micro_batch_size {b}"] if b != args.micro_batch_size else []) + new_flags
                found.append(f"  {' '.join(flags)}: {total / GB:.1f} GB ({rows_per_step // b} micro-steps per step)")
                break
    return list(dict.fromkeys(found)) or ["  neither a smaller micro-batch, --shard_optimizer nor activation "
                                          "checkpointing: more processes, or FSDP (parameter and gradient sharding)"]


def print_plan(args: argparse.Namespace) -> None:
    """--dry_run: the plan, printed once per launch. `auto` precision is planned as bf16, what the GPUs the presets are
    for (A100, H100, H200) run; --mixed_precision no plans fp32."""
    if args.mixed_precision == "auto":
        args.mixed_precision = "bf16"
    if is_rank0():
        print(describe(args))
