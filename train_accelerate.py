"""Train GPT-2 from scratch with a plain Hugging Face Accelerate loop: build-nanogpt's 124M recipe, plus
exact resume, atomic checkpoints that load with `AutoModelForCausalLM`, and background pushes to the Hub.

    python train_accelerate.py --preset cpu-demo                          # ~5 minutes on 2 CPU cores
    accelerate launch --config_file accelerate_configs/8gpu_ddp_bf16.yaml train_accelerate.py --preset gpt2-124m

One optimiser step sees `--total_batch_size` tokens: every process runs `gradient_accumulation_steps`
micro-batches of (micro_batch_size, seq_len) and DDP averages the gradients once, on the last micro-step.
The learning rate is set by hand before each optimiser step, so it follows the schedule on any number of
processes. Every `--eval_every` steps: validation loss over a fixed number of tokens, HellaSwag when its data
is there, and samples from `generate`. Every `--checkpoint_every` steps and at the end: the full training
state (for `--resume_from_checkpoint`) and a Hugging Face model folder, written to a temporary folder and
renamed into place, so a killed run never leaves a half-written checkpoint behind. That plumbing (checkpoints, Hub
pushes, metrics and plots, preemption) is in training_infra.py: this file is the recipe and its loop.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import gc
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import (
    InitProcessGroupKwargs,
    TorchDynamoPlugin,
    is_tensorboard_available,
    is_wandb_available,
    set_seed,
)
from tqdm.auto import tqdm

import training_infra as infra  # the plumbing: checkpoints, Hub pushes, metrics and plots, preemption
from configuration_gpt2repro import GPT2ReproConfig
from eval_hellaswag import HellaSwagScoringError, evaluate_hellaswag
from hardware import accelerate_device, peak_flops_per_device, pin_cpu_allocator, resolve_mixed_precision
from modeling_gpt2repro import GPT2ReproForCausalLM
from muon import Muon
from token_shards import BatchPrefetcher, ShardedTokenLoader, ShardFormatError, TokenStream, validation_batches
from tokenization_gpt2repro import EOT_TOKEN_ID, IGNORE_INDEX, get_tokenizer
from training_infra import TrainingError

SAMPLE_PROMPT = "Hello, I'm a language model,"
RECIPE_VAL_TOKENS = 20 * 64 * 1024 * 8  # 10,485,760: build-nanogpt's 20 val batches of 64 x 1024 on 8 GPUs

# Every preset only changes defaults; any flag given on the command line wins.
PRESETS = {
    # build-nanogpt's GPT-2 124M run on FineWeb-Edu sample-10BT (the parser's defaults are this run).
    "gpt2-124m": dict(data_dir="data/edu_fineweb10B", output_dir="runs/gpt2-124m"),
    # A small GPT on the embedded corpus that shows a falling validation loss in ~5 minutes on 2 CPU cores.
    "cpu-demo": dict(
        data_dir="data/kjv", output_dir="runs/cpu-demo",
        n_layer=4, n_head=4, n_embd=64, seq_len=128,  # the 50304 x 64 lm_head is most of the FLOPs
        micro_batch_size=8, total_batch_size=8 * 128,  # one micro-batch per step: 1024 tokens
        max_lr=3e-3, min_lr=3e-4,  # a small model takes a larger LR; min stays 10% of max as in the recipe
        warmup_steps=20, max_steps=800,  # 819,200 tokens, most of one epoch of the ~0.94M train tokens
        eval_every=100, val_tokens=8 * 128 * 16, checkpoint_every=400,  # val: 16 batches of 8 x 128
        hellaswag=False,  # 10,042 examples would take longer than the run, and a model this small scores chance
    ),
    # The speedrun recipe at GPT-2 124M on FineWeb-Edu: modded-nanogpt's Nov 2024 records reached FineWeb val loss
    # 3.28 in 2.40B tokens; 4578 steps x 2**19 = 2.40B. Unverified on GPU here.
    "speedrun-124m": dict(data_dir="data/edu_fineweb10B", output_dir="runs/speedrun-124m", recipe="speedrun",
                          max_steps=4578),
}
# What --recipe sets (as defaults: a flag given on the command line wins). "gpt2" is the parser's defaults.
RECIPES = {
    "gpt2": {},
    # modded-nanogpt's GPT-2 speedrun (Nov 2024 records): rotary, QK-norm, ReLU², parameter-free RMSNorm, no biases,
    # untied zero-initialised head, zero-initialised projections, logits soft-capped at 30; Muon (lr 0.04) on the
    # blocks' matrices, Adam (betas 0.8, 0.95, no decay) on the rest: embeddings 0.6, head 0.008 (biases and gains,
    # if turned back on, 0.04); no warm-up, constant LR, then a linear decay to zero over the last ~30% of the steps
    # (914 of 3000).
    "speedrun": dict(position_embedding="rope", qk_norm=True, mlp_activation="relu2", norm="rmsnorm",
                     tie_word_embeddings=False, logit_softcap=30.0, zero_init_residual=True, bias=False,
                     optimizer="muon", muon_lr=0.04, embed_lr=0.6, head_lr=0.008, adamw_lr=0.04, beta1=0.8,
                     weight_decay=0.0, lr_schedule="trapezoid", warmup_steps=0, min_lr=0.0, cooldown_frac=0.3),
}
# A preset's own values for a recipe, over both (the cpu-demo model takes other LRs than a 124M one).
PRESET_RECIPES = {
    # Tuned on the 64-wide demo model (600-step runs, val loss at the end): Muon momentum 0.95 -> 0.8 and embeddings'
    # LR 0.1 -> 0.3 took 4.436 to 4.314; Muon LR 0.025 and 0.06 did no better than 0.04, nor head LR 0.02. No
    # soft-cap: with it, 4.438 instead of 4.436, for a tanh over all (1024, 50304) logits that costs ~0.18 s a step
    # on 2 CPU cores. 550 steps take the wall-clock of the GPT-2 recipe's 800 here (285 s against 299 s):
    # a speedrun step costs ~1.4x, about half of it Muon's step, whose Newton-Schulz torch runs in bf16 (emulated on
    # AVX2).
    ("cpu-demo", "speedrun"): dict(logit_softcap=None, muon_momentum=0.8, muon_lr=0.04, embed_lr=0.3, head_lr=0.01,
                                   adamw_lr=0.01, warmup_steps=20, max_steps=550, cooldown_frac=0.6),
}


# ---- arguments -------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train GPT-2 from scratch with Hugging Face Accelerate (defaults: build-nanogpt's 124M run).",
        formatter_class=infra.HelpFormatter,
        epilog="presets: " + "; ".join(f"{name} = {infra.preset_as_flags(preset)}" for name, preset in PRESETS.items())
               + ". recipes: " + "; ".join(f"{name} = {infra.preset_as_flags(r) or 'the defaults'}"
                                           for name, r in RECIPES.items())
               + ". preset + recipe: " + "; ".join(f"{' + '.join(key)} = {infra.preset_as_flags(values)}"
                                                   for key, values in PRESET_RECIPES.items()),
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), help="a named set of defaults; explicit flags still win")
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="gpt2",
                        help="gpt2: build-nanogpt's GPT-2 recipe; speedrun: modded-nanogpt's architecture and Muon "
                             "(its values are defaults, listed below; explicit flags still win)")
    data = parser.add_argument_group("data and output")
    data.add_argument("--data_dir", default="data/edu_fineweb10B", help="folder of token shards (prepare_data.py)")
    data.add_argument("--output_dir", default="runs/gpt2-124m", help="where checkpoints, metrics.jsonl and loss.png go")
    data.add_argument("--shuffle", action=argparse.BooleanOptionalAction, default=True,
                      help="shuffle shards and windows every epoch (build-nanogpt reads in order, which shows as a "
                           "periodic loss pattern)")
    data.add_argument("--seed", type=int, default=1337, help="seed of the initialisation, data order and samples")
    data.add_argument("--verify_data", action="store_true",
                      help="check every shard's sha256 against prepare_data.py's manifest.json before training "
                           "(token counts are always checked)")
    model = parser.add_argument_group("model")
    model.add_argument("--n_layer", type=int, default=12, help="transformer blocks")
    model.add_argument("--n_head", type=int, default=12, help="attention heads per block")
    model.add_argument("--n_embd", type=int, default=768, help="width of the residual stream (C)")
    model.add_argument("--seq_len", type=int, default=1024, help="tokens per training row (T), also the context size")
    model.add_argument("--position_embedding", choices=["learned", "rope"], default="learned",
                       help="a learned table (GPT-2) or rotary embeddings")
    model.add_argument("--qk_norm", action=argparse.BooleanOptionalAction, default=False,
                       help="RMS-normalise q and k per head")
    model.add_argument("--mlp_activation", choices=["gelu_tanh", "relu2"], default="gelu_tanh", help="MLP activation")
    model.add_argument("--norm", choices=["layernorm", "rmsnorm"], default="layernorm",
                       help="LayerNorm, or RMSNorm without parameters")
    model.add_argument("--tie_word_embeddings", action=argparse.BooleanOptionalAction, default=True,
                       help="the head shares the token embedding (untied: it starts at zero)")
    model.add_argument("--logit_softcap", type=infra.float_or_none,
                       help="logits c * tanh(logits / c); unset or 'none': no cap (GPT-2)")
    model.add_argument("--zero_init_residual", action=argparse.BooleanOptionalAction, default=False,
                       help="each block's two residual projections start at zero")
    model.add_argument("--bias", action=argparse.BooleanOptionalAction, default=True, help="biases in the matmuls")
    batch = parser.add_argument_group("batch and schedule")
    batch.add_argument("--total_batch_size", type=int, default=2**19, help="tokens per optimiser step, all processes")
    batch.add_argument("--micro_batch_size", type=int, default=64, help="rows per forward pass per process (B)")
    batch.add_argument("--max_steps", type=int, default=19073, help="optimiser steps (19073 x 2**19 = 10B tokens)")
    batch.add_argument("--warmup_steps", type=int, default=715, help="linear warmup steps (715 x 2**19 = 375M tokens)")
    batch.add_argument("--max_lr", type=float, default=6e-4, help="LR at the end of the warmup")
    batch.add_argument("--min_lr", type=float, default=6e-5, help="the schedule ends here at max_steps")
    batch.add_argument("--lr_schedule", choices=["cosine", "trapezoid"], default="cosine",
                       help="after the warm-up: a cosine decay, or constant then a linear decay (--cooldown_frac)")
    batch.add_argument("--cooldown_frac", type=float, default=0.3,
                       help="trapezoid: the share of max_steps that the final decay takes")
    optim = parser.add_argument_group("optimiser")
    optim.add_argument("--optimizer", choices=["adamw", "muon"], default="adamw",
                       help="adamw: AdamW on all at --max_lr; muon: Muon on the blocks' matrices, AdamW on the rest "
                            "(--embed_lr, --head_lr, --adamw_lr), all following --lr_schedule")
    optim.add_argument("--muon_lr", type=float, default=0.04, help="muon: LR of the blocks' 2-D weight matrices")
    optim.add_argument("--muon_momentum", type=float, default=0.95, help="muon: Nesterov momentum")
    optim.add_argument("--embed_lr", type=float, default=0.6, help="muon: AdamW LR of the token/position embeddings")
    optim.add_argument("--head_lr", type=float, default=0.008, help="muon: AdamW LR of an untied head")
    optim.add_argument("--adamw_lr", type=float, default=0.04, help="muon: AdamW LR of biases and norm gains")
    optim.add_argument("--weight_decay", type=float, default=0.1, help="applied to parameters with dim >= 2 only")
    optim.add_argument("--beta1", type=float, default=0.9, help="AdamW beta1")
    optim.add_argument("--beta2", type=float, default=0.95, help="AdamW beta2")
    optim.add_argument("--adam_eps", type=float, default=1e-8, help="AdamW epsilon")
    optim.add_argument("--grad_clip", type=float, default=1.0, help="max global grad norm")
    optim.add_argument("--mixed_precision", choices=["auto", "no", "bf16"], default="auto",
                       help="bf16 autocast through Accelerate, fp32 master weights either way; 'auto': bf16 on GPUs "
                            "that support it and CPUs with native bf16 (AVX512-BF16/AMX), else fp32")
    optim.add_argument("--compile", nargs="?", const="on", choices=["auto", "on", "off"], default="auto",
                       help="torch.compile the training forward and loss as one graph (a graph break is an error); "
                            "auto: on CUDA, where it pays, else off (on a CPU it did not: see the README); "
                            "evaluation and sampling use the eager module")
    optim.add_argument("--gradient_checkpointing", action="store_true",
                       help="recompute each block's activations in backward: far less memory for ~1/3 more compute "
                            "(large micro-batches on one GPU)")
    evaluation = parser.add_argument_group("evaluation")
    evaluation.add_argument("--eval_every", type=int, default=250, help="steps between evaluations")
    evaluation.add_argument("--val_tokens", type=int,
                            help=f"validation tokens, the same on any number of processes; unset: {RECIPE_VAL_TOKENS} "
                                 f"(build-nanogpt's 20 batches of 64 x 1024 on 8 GPUs) or the val split if smaller")
    evaluation.add_argument("--eval_batch_size", type=int, help="rows per validation forward; unset: micro_batch_size")
    evaluation.add_argument("--hellaswag", action=argparse.BooleanOptionalAction, default=True,
                            help="score HellaSwag at each evaluation when its data can be found")
    evaluation.add_argument("--hellaswag_file", help="HellaSwag val jsonl or parquet; unset: cache, Hub, GitHub")
    evaluation.add_argument("--hellaswag_limit", type=int, help="score only the first N HellaSwag examples")
    evaluation.add_argument("--num_samples", type=int, default=4, help="samples generated at each evaluation")
    evaluation.add_argument("--sample_tokens", type=int, default=32, help="new tokens per sample")
    evaluation.add_argument("--top_k", type=int, default=50, help="top-k of the sampling")
    logging = parser.add_argument_group("logging")
    logging.add_argument("--report_to", choices=["none", "tensorboard", "wandb", "all"], default="none",
                         help="Accelerate trackers, besides metrics.jsonl and loss.png in --output_dir")
    logging.add_argument("--peak_flops", type=float,
                         help="peak FLOP/s of one device for MFU; unset: the datasheet peak of A100/H100/H200 at "
                              "--mixed_precision (TF32 for 'no'), "
                              "on CPU threads x clock x FMA FLOPs per cycle")
    ckpt = parser.add_argument_group("checkpoints and the Hub")
    ckpt.add_argument("--checkpoint_every", type=int, default=1000, help="steps between checkpoints (+ one at the end)")
    ckpt.add_argument("--keep_checkpoints", type=int, default=2, help="keep only the newest N checkpoints")
    ckpt.add_argument("--resume_from_checkpoint", metavar="latest|PATH",
                      help="continue a run exactly: 'latest' in --output_dir (a fresh start when there is none) "
                           "or a checkpoint folder")
    ckpt.add_argument("--save_on_signals", default="SIGTERM,SIGUSR1",
                      help="signals on which every process finishes its step, a checkpoint is written and the run "
                           f"exits with status {infra.EXIT_PREEMPTED} (clusters send SIGTERM to preempt; SLURM's "
                           "--signal sends SIGUSR1 ahead of the time limit); 'none' leaves the signals' default action")
    ckpt.add_argument("--ddp_timeout", type=int, default=1800,
                      help="seconds a process waits in a collective (e.g. for rank 0 writing a checkpoint) before the "
                           "job fails")
    ckpt.add_argument("--push_to_hub", action="store_true", help="upload each checkpoint's hf/ in the background")
    ckpt.add_argument("--hub_model_id", help="Hub repository for --push_to_hub, e.g. user/gpt2-124m-repro")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    preset = parser.parse_known_args(argv)[0].preset
    if preset:
        parser.set_defaults(**PRESETS[preset])
    recipe = parser.parse_known_args(argv)[0].recipe  # given, or the preset's
    # the recipe's values, then the preset's over them, then the preset's own for this recipe; explicit flags win
    parser.set_defaults(**{**RECIPES[recipe], **PRESETS.get(preset, {}), **PRESET_RECIPES.get((preset, recipe), {})})
    args = parser.parse_args(argv)
    if args.eval_batch_size is None:
        args.eval_batch_size = args.micro_batch_size
    positive = ["n_layer", "n_head", "n_embd", "seq_len", "total_batch_size", "micro_batch_size", "max_steps",
                "eval_every", "checkpoint_every", "keep_checkpoints", "eval_batch_size", "val_tokens", "ddp_timeout"]
    for name in positive:
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    for name in ("warmup_steps", "weight_decay", "grad_clip", "max_lr", "min_lr", "muon_lr", "embed_lr", "head_lr",
                 "adamw_lr", "logit_softcap"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            parser.error(f"--{name} must not be negative, got {getattr(args, name)}")
    try:
        args.save_on_signals = infra.parse_signals(args.save_on_signals)
    except ValueError as error:
        parser.error(f"--save_on_signals: {error}")
    if not 0 <= args.cooldown_frac <= 1:
        parser.error(f"--cooldown_frac must be between 0 and 1, got {args.cooldown_frac}")
    if args.push_to_hub and not args.hub_model_id:
        parser.error("--push_to_hub needs --hub_model_id (e.g. your-name/gpt2-124m-repro)")
    return args


def gradient_accumulation_steps(total_batch_size: int, micro_batch_size: int, seq_len: int, world_size: int) -> int:
    """Micro-steps per optimiser step: total / (B * T * world), which must divide exactly."""
    tokens_per_micro_step = micro_batch_size * seq_len * world_size
    if total_batch_size % tokens_per_micro_step:
        raise TrainingError(
            f"--total_batch_size {total_batch_size} is not a multiple of micro_batch_size x seq_len x processes = "
            f"{micro_batch_size} x {seq_len} x {world_size} = {tokens_per_micro_step}: change one of them so that it "
            f"divides"
        )
    return total_batch_size // tokens_per_micro_step


def choose_val_tokens(args: argparse.Namespace, notify: bool) -> None:
    """Unset --val_tokens: the recipe's number, or the whole val split of a smaller corpus (with a notice). An explicit
    value larger than the split stays an error (validation_batches says so)."""
    if args.val_tokens is not None:
        return
    split_tokens = TokenStream(args.data_dir, "val").num_tokens
    args.val_tokens = min(RECIPE_VAL_TOKENS, split_tokens)
    if args.val_tokens < RECIPE_VAL_TOKENS and notify:
        tqdm.write(f"notice: validation uses the whole val split of {args.data_dir} ({split_tokens:,} tokens), fewer "
                   f"than the recipe's {RECIPE_VAL_TOKENS:,}")


# ---- recipe: learning rate, optimiser, one step, evaluation ----------------------------------------------------------


def get_lr(step: int, max_lr: float, min_lr: float, warmup_steps: int, max_steps: int, schedule: str = "cosine",
           cooldown_frac: float = 0.0) -> float:
    """LR of optimiser step `step` (0-based): linear warmup, then a cosine decay to min_lr at max_steps (GPT-2), or
    `trapezoid`: max_lr until the last `cooldown_frac` of the steps, which decay linearly to min_lr (the speedrun's);
    min_lr from max_steps on."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps  # step 0 already trains, at max_lr / warmup_steps
    if step >= max_steps:
        return min_lr
    if schedule == "trapezoid":
        cooldown_steps = max(1, round(cooldown_frac * max_steps))
        return min_lr + (max_lr - min_lr) * min(1.0, (max_steps - step) / cooldown_steps)
    decay_ratio = (step - warmup_steps) / (max_steps - warmup_steps)  # 0 -> 1
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * decay_ratio)) * (max_lr - min_lr)


def configure_optimizer(model: torch.nn.Module, weight_decay: float, betas: tuple[float, float], eps: float,
                        device_type: str) -> torch.optim.AdamW:
    """AdamW with weight decay on matmul and embedding weights (dim >= 2) only, never on biases or LayerNorms."""
    params = [p for p in model.parameters() if p.requires_grad]  # the tied wte/lm_head matrix appears once
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = device_type in ("cuda", "cpu")  # torch's fused AdamW kernel exists for these devices
    return torch.optim.AdamW(groups, lr=0.0, betas=betas, eps=eps, fused=fused)  # lr is set before every step


def configure_muon(model: GPT2ReproForCausalLM, args: argparse.Namespace,
                   device_type: str) -> list[torch.optim.Optimizer]:
    """Muon on every 2-D weight matrix inside the blocks, the fused q|k|v projection as three C x C matrices (as the
    speedrun records orthogonalise them), the work shared out among the processes; AdamW on the rest: the embeddings
    and an untied head (with weight decay, as matrices), biases and norm gains (without). Each group is named for
    `peak_lr`."""
    qkv = [block.attn.c_attn.weight for block in model.transformer.h]
    matrices = [p for p in model.transformer.h.parameters() if p.dim() == 2 and all(p is not q for q in qkv)]
    embeddings = [m.weight for m in (model.transformer.wte, model.transformer.wpe) if m is not None]
    head = [] if model.config.tie_word_embeddings else [model.lm_head.weight]
    named = {id(p) for p in qkv + matrices + embeddings + head}
    groups = [{"params": embeddings, "name": "embeddings", "weight_decay": args.weight_decay},
              {"params": head, "name": "head", "weight_decay": args.weight_decay},
              {"params": [p for p in model.parameters() if id(p) not in named], "name": "adamw", "weight_decay": 0.0}]
    muon = Muon([{"params": qkv, "name": "muon", "parts": 3}, {"params": matrices, "name": "muon"}], lr=0.0,
                momentum=args.muon_momentum, weight_decay=args.weight_decay)
    adamw = torch.optim.AdamW([g for g in groups if g["params"]], lr=0.0, betas=(args.beta1, args.beta2),
                              eps=args.adam_eps, fused=device_type in ("cuda", "cpu"))
    return [muon, adamw]


def peak_lr(group: dict, args: argparse.Namespace) -> tuple[float, float]:
    """(max, min) LR of an optimiser group: --max_lr/--min_lr for GPT-2's AdamW, else the group's own flag, decaying
    to the same fraction min_lr / max_lr of it. Read from the flags at every step, so a resumed run follows them."""
    peak = {"muon": args.muon_lr, "embeddings": args.embed_lr, "head": args.head_lr, "adamw": args.adamw_lr}
    if group.get("name") not in peak:
        return args.max_lr, args.min_lr
    return peak[group["name"]], peak[group["name"]] * (args.min_lr / args.max_lr if args.max_lr else 0.0)


def train_step(model: torch.nn.Module, optimizers: list[torch.optim.Optimizer], accelerator: Accelerator,
               batches: BatchPrefetcher | ShardedTokenLoader, grad_accum: int, grad_clip: float,
               flags: Callable[[], list[float]] = list) -> tuple[float, float, list[float]]:
    """One optimiser step: `grad_accum` micro-batches of forward and backward, gradients clipped to `grad_clip`, then
    the update at the LRs already set in `optimizers`. Returns the loss (averaged over micro-batches and processes),
    the gradient norm before clipping, and `flags()` summed over processes, read once the step's compute is queued
    (a signal that came during this step stops the run after it). When the loss or the norm is not finite the
    weights are left as they were.

    The device is read once per step, never per micro-step: the loss, the norm and the flags travel in one collective
    and one device-to-host copy (on a GPU each read is a stall of the whole queue)."""
    device = accelerator.device
    step_loss = torch.zeros((), device=device)
    for micro_step in range(grad_accum):
        x, y = batches.next_batch()  # (B, T) each, pinned on CUDA, so the copy really runs beside the compute
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        # DDP all-reduces gradients on the last micro-step only; the choice is made before the forward.
        last_micro_step = micro_step == grad_accum - 1
        with contextlib.nullcontext() if last_micro_step else accelerator.no_sync(model):
            loss = model(input_ids=x, shift_labels=y, return_logits=False).loss
            loss = loss / grad_accum  # the step's loss is the mean over its micro-batches, not their sum
            step_loss += loss.detach()
            accelerator.backward(loss)
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), grad_clip)  # the same on every process after DDP
    flags = torch.tensor(flags(), dtype=step_loss.dtype)
    if device.type == "cuda":  # page-locked: a copy from pageable memory would wait for the whole step, a second stall
        flags = flags.pin_memory()
    stats = torch.cat([step_loss.reshape(1), flags.to(device, non_blocking=True)])
    stats = accelerator.reduce(stats, reduction="sum")  # the step's one collective
    stats[0] /= accelerator.num_processes  # the loss averaged over processes
    step_loss, grad_norm, *flags = torch.cat([stats[:1], grad_norm.reshape(1).to(stats.dtype), stats[1:]]).tolist()
    for optimizer in optimizers:
        if math.isfinite(step_loss) and math.isfinite(grad_norm):
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step_loss, grad_norm, flags


@torch.no_grad()
def evaluate(accelerator: Accelerator, model: GPT2ReproForCausalLM, tokenizer, args: argparse.Namespace,
             hellaswag_examples: list[dict] | None) -> dict:
    """Val loss over the first --val_tokens val tokens (identical on any world size), HellaSwag, and samples.

    `model` is the plain module (no DDP, no compile): evaluation never goes through the compiled graph.
    """
    model.eval()
    device = accelerator.device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    target_count = torch.zeros((), dtype=torch.float64, device=device)
    batches = validation_batches(args.data_dir, args.eval_batch_size, args.seq_len, args.val_tokens,
                                 accelerator.process_index, accelerator.num_processes)
    with accelerator.autocast():
        for x, y in batches:
            count = int((y != IGNORE_INDEX).sum())
            if count == 0:  # a filler batch: ranks yield equally many batches, some have nothing left to score
                continue
            loss = model(input_ids=x.to(device), shift_labels=y.to(device), return_logits=False).loss
            loss_sum += loss.double() * count  # the mean over this batch's targets, back to a sum
            target_count += count
    totals = accelerator.reduce(torch.stack([loss_sum, target_count]), reduction="sum")
    result = {"val_loss": (totals[0] / totals[1]).item()}

    if hellaswag_examples:
        try:
            with accelerator.autocast():
                scores = evaluate_hellaswag(model, tokenizer, hellaswag_examples, style="completion",
                                            batch_size=args.eval_batch_size, accelerator=accelerator,
                                            limit=args.hellaswag_limit, show_progress=False)
        except HellaSwagScoringError as error:  # raised on every process alike
            raise TrainingError(f"{error} (--no-hellaswag trains without it)") from None
        result.update(hellaswag_acc=scores["acc"], hellaswag_acc_norm=scores["acc_norm"],
                      hellaswag_count=scores["count"])

    if accelerator.is_main_process and args.num_samples > 0:
        prompt = tokenizer(SAMPLE_PROMPT, return_tensors="pt").input_ids.to(device)  # (1, 8)
        # The samples draw from their own seeded RNG, so training's random state is the same with or without them.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), accelerator.autocast():
            torch.manual_seed(args.seed)
            max_new_tokens = min(args.sample_tokens, args.seq_len - prompt.shape[1])  # stay inside the context
            output = model.generate(prompt, do_sample=True, top_k=args.top_k, max_new_tokens=max_new_tokens,
                                    num_return_sequences=args.num_samples, pad_token_id=EOT_TOKEN_ID)
        result["samples"] = tokenizer.batch_decode(output)
    model.train()
    return result


# ---- training --------------------------------------------------------------------------------------------------------


def build_accelerator(args: argparse.Namespace) -> tuple[Accelerator, str]:
    """The Accelerator of this run, with `auto` precision resolved for its device; and the line saying which."""
    if args.report_to in ("tensorboard", "all") and not is_tensorboard_available():
        raise TrainingError("--report_to tensorboard needs the tensorboard package: pip install tensorboard")
    if args.report_to == "wandb" and not is_wandb_available():
        raise TrainingError("--report_to wandb needs the wandb package: pip install wandb")
    process_group = InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=args.ddp_timeout))
    device = accelerate_device(timeout=process_group.timeout)  # to_kwargs() would drop a timeout equal to its default
    args.mixed_precision, precision_line = resolve_mixed_precision(args.mixed_precision, device)
    launch_backend = os.environ.get("ACCELERATE_DYNAMO_BACKEND", "no").lower()  # accelerate launch --dynamo_backend
    if args.compile == "auto":
        args.compile = "on" if device.type == "cuda" or launch_backend != "no" else "off"
    backend = "no" if args.compile == "off" else launch_backend if launch_backend != "no" else "inductor"
    dynamo = TorchDynamoPlugin(backend=backend, fullgraph=True)  # a graph break would silently cost compile's speed
    accelerator = Accelerator(mixed_precision=args.mixed_precision, project_dir=args.output_dir,
                              log_with=None if args.report_to == "none" else args.report_to, dynamo_plugin=dynamo,
                              kwargs_handlers=[process_group])
    if accelerator.gradient_accumulation_steps != 1:  # accelerator.backward would divide the loss a second time
        grad_accum = gradient_accumulation_steps(args.total_batch_size, args.micro_batch_size, args.seq_len,
                                                 accelerator.num_processes)
        raise TrainingError(f"this script derives gradient accumulation from --total_batch_size ({grad_accum} "
                            f"micro-steps per step here): drop accelerate launch's --gradient_accumulation_steps "
                            f"{accelerator.gradient_accumulation_steps}")
    if accelerator.device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # fp32 matmuls outside autocast run as TF32 (~3x on A100)
    elif accelerator.device.type == "cpu":
        pin_cpu_allocator()
    return accelerator, precision_line


def train(args: argparse.Namespace) -> Path:
    """Run the whole training; returns the final checkpoint folder."""
    accelerator, precision_line = build_accelerator(args)
    device, rank, world_size = accelerator.device, accelerator.process_index, accelerator.num_processes
    is_main = accelerator.is_main_process
    grad_accum = gradient_accumulation_steps(args.total_batch_size, args.micro_batch_size, args.seq_len, world_size)
    try:
        config = GPT2ReproConfig(n_positions=args.seq_len, n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
                                 **{name: getattr(args, name) for name in infra.ARCHITECTURE_FLAGS})
    except ValueError as error:  # e.g. --n_embd not divisible by --n_head
        raise TrainingError(str(error)) from None

    output_dir = Path(args.output_dir)
    infra.checked_on_every_rank(accelerator, lambda: infra.check_output_dir(output_dir))
    resume_from = infra.decided_on_rank0(accelerator, lambda: infra.choose_resume_checkpoint(args, output_dir))
    if args.preset == "cpu-demo":
        infra.prepare_demo_data(accelerator, args)
    def open_data() -> ShardedTokenLoader:  # both splits are checked now, not at the first evaluation
        try:
            choose_val_tokens(args, notify=is_main)
            next(validation_batches(args.data_dir, args.eval_batch_size, args.seq_len, args.val_tokens,
                                    verify_checksums=args.verify_data))
            return ShardedTokenLoader(args.data_dir, "train", args.micro_batch_size, args.seq_len, rank, world_size,
                                      shuffle=args.shuffle, seed=args.seed, verify_checksums=args.verify_data)
        except ValueError as error:  # ShardFormatError included: missing or corrupt shards, too few val tokens
            raise TrainingError(str(error)) from None

    train_loader = infra.checked_on_every_rank(accelerator, open_data)  # a node without the shards stops them all
    pusher = infra.start_hub_pusher(accelerator, args.hub_model_id if args.push_to_hub else None)
    # Every rank scores its share of what rank 0 found: ranks deciding alone could disagree (a node without the file
    # and the network) and leave the others waiting in the scoring's collectives.
    hellaswag_examples = infra.decided_on_rank0(accelerator, lambda: infra.load_hellaswag_examples(args, notify=True))
    tokenizer = get_tokenizer()

    set_seed(args.seed)  # the same initial weights on every process
    model = GPT2ReproForCausalLM(config)
    if args.gradient_checkpointing:
        infra.enable_activation_checkpointing(model)
    flops_per_token = model.flops_per_token(args.seq_len)
    if args.optimizer == "muon":
        optimizers = configure_muon(model, args, device.type)
    else:
        optimizers = [configure_optimizer(model, args.weight_decay, (args.beta1, args.beta2), args.adam_eps,
                                          device.type)]
    model, *optimizers = accelerator.prepare(model, *optimizers)
    raw_model = accelerator.unwrap_model(model, keep_torch_compile=False)  # for evaluation, sampling and saving
    start_step, start_evaluated = 0, False
    if resume_from is not None:
        start_step, start_evaluated = infra.load_checkpoint(accelerator, resume_from, train_loader, args.max_steps)
    metrics = infra.MetricsLog(output_dir / "metrics.jsonl", start_step if resume_from else None) if is_main else None
    if args.report_to != "none":
        accelerator.init_trackers("gpt2repro", config={k: v for k, v in vars(args).items() if v is not None})
    peak_flops = args.peak_flops or peak_flops_per_device(device, args.mixed_precision)
    if is_main:
        tqdm.write(precision_line)
        tqdm.write(f"{sum(p.numel() for p in raw_model.parameters()):,} parameters | {world_size} process(es) on "
                   f"{device.type} | {grad_accum} micro-steps of {args.micro_batch_size} x {args.seq_len} per step "
                   f"= {args.total_batch_size:,} tokens | mixed precision {args.mixed_precision} "
                   f"| compile {args.compile}"
                   + (f" | resuming at step {start_step} from {resume_from}" if resume_from else ""))
    # The next micro-batch is read (and pinned) in a thread while this one computes; checkpoints save the position of
    # the batches used, not of those read ahead.
    train_batches = BatchPrefetcher(train_loader, pin_memory=device.type == "cuda")
    save = functools.partial(infra.save_checkpoint, accelerator, model, tokenizer, train_batches, args=args,
                             metrics=metrics)

    progress = tqdm(total=args.max_steps, initial=start_step, disable=not is_main, desc="training", dynamic_ncols=True)
    final_checkpoint = resume_from if resume_from is not None and infra.in_run(resume_from, output_dir) else None
    final_evaluated = start_evaluated  # whether final_checkpoint's step had its evaluation when it was written
    signals = infra.StopSignals(args.save_on_signals)  # from here on Ctrl-C too is acted on at a step boundary

    def stop_on_signal(summed_flags, step: int, evaluated: bool) -> None:
        """End the run with a checkpoint at `step` (written unless there is one) when any process got a signal."""
        nonlocal final_checkpoint, final_evaluated
        if not any(summed_flags):
            return
        if pusher is not None:
            pusher.cancel_queued()  # the process waits for queued uploads before it exits
        current = final_checkpoint is not None and final_checkpoint.name == f"{infra.CHECKPOINT_PREFIX}{step:06d}"
        if not current or (evaluated and not final_evaluated):  # else a resume would evaluate (and log) it again
            final_checkpoint, final_evaluated = save(step, pusher=None, evaluated=evaluated), evaluated
        signals.stop(summed_flags, step, final_checkpoint, output_dir)

    step = start_step
    try:
        stop_flags = signals.requested(accelerator)
        for step in range(start_step, args.max_steps + 1):
            # First a signal seen in the last step's collective: a grace period may not cover this step's evaluation.
            # After the last step the run finishes instead (its final evaluation, checkpoint and push).
            if step < args.max_steps:
                stop_on_signal(stop_flags, step, evaluated=False)
            # Evaluation at step s sees the weights after s optimiser steps; a resumed run has had its eval at s,
            # unless its checkpoint was written on a signal, before that eval.
            busy = False
            if (step % args.eval_every == 0 or step == args.max_steps) and not (step == start_step and start_evaluated):
                result = evaluate(accelerator, raw_model, tokenizer, args, hellaswag_examples)
                infra.log_evaluation(accelerator, metrics, step, result, output_dir / "loss.png")
                busy = True
            if step > start_step and (step % args.checkpoint_every == 0 or step == args.max_steps):
                final_checkpoint, final_evaluated = save(step, pusher=pusher), True
                busy = True
            if step == args.max_steps:  # the run is complete and saved: a signal now changes nothing
                break
            if busy:  # a signal that came during them stops the run now, not after one more step
                stop_on_signal(signals.requested(accelerator), step, evaluated=True)

            start = time.perf_counter()
            for group in (group for optimizer in optimizers for group in optimizer.param_groups):
                group["lr"] = get_lr(step, *peak_lr(group, args), args.warmup_steps, args.max_steps, args.lr_schedule,
                                     args.cooldown_frac)
            lr = optimizers[0].param_groups[0]["lr"]  # GPT-2's AdamW, or Muon's
            loss, grad_norm, stop_flags = train_step(model, optimizers, accelerator, train_batches, grad_accum,
                                                     args.grad_clip, signals.flags)
            infra.check_finite(step, loss, grad_norm, output_dir)
            step_time = time.perf_counter() - start  # train_step's one read of the device waited for it
            tokens_per_sec = args.total_batch_size / step_time
            record = {"type": "train", "step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                      "step_time": step_time, "tokens_per_sec": tokens_per_sec}
            if peak_flops:
                record["mfu"] = flops_per_token * tokens_per_sec / (peak_flops * world_size)
            if is_main:
                metrics.append(record)
                progress.update(1)
                progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", norm=f"{grad_norm:.3f}",
                                     tok_s=f"{tokens_per_sec:,.0f}", mfu=f"{record.get('mfu', float('nan')):.1%}")
            accelerator.log({f"train/{k}": v for k, v in record.items() if k not in ("type", "step")}, step=step)
        signals.close()  # the run is complete: from here a Ctrl-C stops at once (e.g. the wait for uploads)
        if pusher is not None:  # rank 0 alone, after the last collective
            tqdm.write(f"waiting for the uploads to {args.hub_model_id} to finish ...")
            for failure in pusher.wait():
                tqdm.write(f"warning: {failure}")
            infra.prune_checkpoints(output_dir, args.keep_checkpoints, None)  # those kept while they uploaded
        accelerator.end_training()
    except KeyboardInterrupt:  # a second Ctrl-C, or one after the loop: one line in main() naming where to continue
        raise infra.TrainingInterrupted(step, output_dir) from None
    finally:
        train_batches.close()
        progress.close()  # ends the bar's line, so that an error message gets a line of its own
        signals.close()
    if is_main and final_checkpoint is not None:
        tqdm.write(f"done: model folder {final_checkpoint / 'hf'}")
    return final_checkpoint


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        train(args)
    except (TrainingError, ShardFormatError) as error:  # a shard may turn out corrupt mid-run
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    except (infra.TrainingPreempted, infra.TrainingInterrupted, KeyboardInterrupt) as stop:
        if isinstance(stop, KeyboardInterrupt):  # Ctrl-C before the training loop
            stop = infra.TrainingInterrupted(None, Path(args.output_dir))
        if os.environ.get("RANK", "0") == "0":  # one line for the whole job, not one per process
            print(stop, file=sys.stderr)
        sys.exit(stop.exit_code)


if __name__ == "__main__":
    try:
        main()
    finally:  # the interpreter's last garbage collection skips what is frozen: ~1 s less to exit (measured), which
        gc.freeze()  # a Ctrl-C or a preemption's grace period waits for
