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
renamed into place, so a killed run never leaves a half-written checkpoint behind.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import json
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
from accelerate import Accelerator
from accelerate.utils import (InitProcessGroupKwargs, broadcast_object_list, is_tensorboard_available, is_wandb_available,
                             set_seed)
from tqdm.auto import tqdm
from transformers.utils import logging as transformers_logging

from configuration_gpt2repro import GPT2ReproConfig
from eval_hellaswag import (HellaSwagFormatError, HellaSwagScoringError, HellaSwagUnavailable, evaluate_hellaswag,
                            load_hellaswag)
from modeling_gpt2repro import GPT2ReproForCausalLM
from hardware import accelerate_device, resolve_mixed_precision
from token_shards import ShardedTokenLoader, ShardFormatError, TokenStream, file_sha256, validation_batches
from tokenization_gpt2repro import EOT_TOKEN_ID, get_tokenizer

# Reference lines of the loss/HellaSwag plot (FineWeb-Edu val loss and HellaSwag acc_norm, see the README).
GPT2_124M_VAL_LOSS = 3.2924
GPT2_124M_HELLASWAG = 0.2955
GPT3_124M_HELLASWAG = 0.337
SAMPLE_PROMPT = "Hello, I'm a language model,"
RECIPE_VAL_TOKENS = 20 * 64 * 1024 * 8  # 10,485,760: build-nanogpt's 20 val batches of 64 x 1024 on 8 GPUs
CHECKPOINT_PREFIX = "step_"
T = TypeVar("T")
EXIT_PREEMPTED = 75  # sysexits.h's EX_TEMPFAIL: a temporary failure; the same command with --resume_from_checkpoint continues
# Dense (no sparsity) peak FLOP/s of one GPU from NVIDIA's datasheets, for MFU, by --mixed_precision: "no" runs
# fp32 matmuls as TF32 (half the bf16 rate). Matched in order as a substring of torch's device name, so the
# PCIe and NVL cards come before "H100" (the SXM part, e.g. "NVIDIA H100 80GB HBM3"). "H200" also matches the
# GH200 superchip ("NVIDIA GH200 480GB"), whose GPU has the H100/H200 SXM peaks.
GPU_PEAK_FLOPS = {
    "H200 NVL": {"bf16": 835e12, "no": 418e12},  # the datasheet's 1,671 / 835 TFLOPS are with sparsity
    "H200": {"bf16": 989e12, "no": 495e12},  # SXM: 1,979 / 989 with sparsity
    "H100 PCIe": {"bf16": 756e12, "no": 378e12},
    "H100 NVL": {"bf16": 835e12, "no": 418e12},
    "H100": {"bf16": 989e12, "no": 495e12},
    "A100": {"bf16": 312e12, "no": 156e12},  # SXM and PCIe have the same peaks
}

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
}


class TrainingError(RuntimeError):
    """A problem the user can fix; main() prints the message as one line and exits with status 1."""


class TrainingPreempted(Exception):
    """A preemption signal reached the run; `checkpoint` holds the state at `step`."""

    def __init__(self, step: int, checkpoint: Path, signal_name: str | None):
        super().__init__(f"preempted at step {step}")
        self.step, self.checkpoint, self.signal_name = step, checkpoint, signal_name


class TrainingInterrupted(Exception):
    """Ctrl-C during the training loop, at optimiser step `step`."""

    def __init__(self, step: int):
        super().__init__(f"interrupted at step {step}")
        self.step = step


# ----------------------------------------------------------------------------------------------------------
# Arguments


def preset_as_flags(preset: dict) -> str:
    return " ".join(f"--{key} {value}" if not isinstance(value, bool) else f"--{'' if value else 'no-'}{key}"
                    for key, value in preset.items())


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except the unset ones (their help says what happens then)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train GPT-2 from scratch with Hugging Face Accelerate (defaults: build-nanogpt's 124M run).",
        formatter_class=HelpFormatter,
        epilog="presets: " + "; ".join(f"{name} = {preset_as_flags(preset)}" for name, preset in PRESETS.items()),
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), help="a named set of defaults; explicit flags still win")
    data = parser.add_argument_group("data and output")
    data.add_argument("--data_dir", default="data/edu_fineweb10B", help="folder of train/val token shards (prepare_data.py)")
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
    batch = parser.add_argument_group("batch and schedule")
    batch.add_argument("--total_batch_size", type=int, default=2**19, help="tokens per optimiser step over all processes")
    batch.add_argument("--micro_batch_size", type=int, default=64, help="rows per forward pass per process (B)")
    batch.add_argument("--max_steps", type=int, default=19073, help="optimiser steps (19073 x 2**19 = 10B tokens)")
    batch.add_argument("--warmup_steps", type=int, default=715, help="linear warmup steps (715 x 2**19 = 375M tokens)")
    batch.add_argument("--max_lr", type=float, default=6e-4, help="LR at the end of the warmup")
    batch.add_argument("--min_lr", type=float, default=6e-5, help="the cosine ends here at max_steps")
    optim = parser.add_argument_group("optimiser")
    optim.add_argument("--weight_decay", type=float, default=0.1, help="applied to parameters with dim >= 2 only")
    optim.add_argument("--beta1", type=float, default=0.9, help="AdamW beta1")
    optim.add_argument("--beta2", type=float, default=0.95, help="AdamW beta2")
    optim.add_argument("--adam_eps", type=float, default=1e-8, help="AdamW epsilon")
    optim.add_argument("--grad_clip", type=float, default=1.0, help="max global grad norm")
    optim.add_argument("--mixed_precision", choices=["auto", "no", "bf16"], default="auto",
                       help="bf16 autocast through Accelerate, fp32 master weights either way; 'auto': bf16 on GPUs "
                            "that support it and CPUs with native bf16 (AVX512-BF16/AMX), else fp32")
    optim.add_argument("--compile", action="store_true", help="torch.compile the training forward (eval uses eager)")
    optim.add_argument("--gradient_checkpointing", action="store_true",
                       help="recompute each block's activations in backward: far less memory for ~1/3 more compute "
                            "(large micro-batches on one GPU)")
    evaluation = parser.add_argument_group("evaluation")
    evaluation.add_argument("--eval_every", type=int, default=250, help="steps between evaluations")
    evaluation.add_argument("--val_tokens", type=int,
                            help=f"validation tokens, the same on any number of processes; unset: {RECIPE_VAL_TOKENS} "
                                 f"(build-nanogpt's 20 batches of 64 x 1024 on 8 GPUs) or the whole val split if smaller")
    evaluation.add_argument("--eval_batch_size", type=int, help="rows per validation forward; unset: --micro_batch_size")
    evaluation.add_argument("--hellaswag", action=argparse.BooleanOptionalAction, default=True,
                            help="score HellaSwag at each evaluation when its data can be found")
    evaluation.add_argument("--hellaswag_file", help="HellaSwag val jsonl or parquet; unset: the cache, then the Hub, then GitHub")
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
    ckpt.add_argument("--checkpoint_every", type=int, default=1000, help="steps between checkpoints (one is also written at the end)")
    ckpt.add_argument("--keep_checkpoints", type=int, default=2, help="keep only the newest N checkpoints")
    ckpt.add_argument("--resume_from_checkpoint", metavar="latest|PATH",
                      help="continue a run exactly: 'latest' in --output_dir (a fresh start when there is none) "
                           "or a checkpoint folder")
    ckpt.add_argument("--save_on_signals", default="SIGTERM,SIGUSR1",
                      help="signals on which every process finishes its step, a checkpoint is written and the run exits "
                           f"with status {EXIT_PREEMPTED} (clusters send SIGTERM to preempt; SLURM's --signal sends SIGUSR1 "
                           "ahead of the time limit); 'none' leaves the signals' default action")
    ckpt.add_argument("--ddp_timeout", type=int, default=1800,
                      help="seconds a process waits in a collective (e.g. for rank 0 writing a checkpoint) before the "
                           "job fails")
    ckpt.add_argument("--push_to_hub", action="store_true", help="upload the model folder of every checkpoint in the background")
    ckpt.add_argument("--hub_model_id", help="Hub repository for --push_to_hub, e.g. user/gpt2-124m-repro")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    preset = parser.parse_known_args(argv)[0].preset
    if preset:
        parser.set_defaults(**PRESETS[preset])
    args = parser.parse_args(argv)
    if args.eval_batch_size is None:
        args.eval_batch_size = args.micro_batch_size
    positive = ["n_layer", "n_head", "n_embd", "seq_len", "total_batch_size", "micro_batch_size", "max_steps",
                "eval_every", "checkpoint_every", "keep_checkpoints", "eval_batch_size", "val_tokens", "ddp_timeout"]
    for name in positive:
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    for name in ("warmup_steps", "weight_decay", "grad_clip", "max_lr", "min_lr"):
        if getattr(args, name) < 0:
            parser.error(f"--{name} must not be negative, got {getattr(args, name)}")
    try:
        args.save_on_signals = parse_signals(args.save_on_signals)
    except ValueError as error:
        parser.error(f"--save_on_signals: {error}")
    if args.push_to_hub and not args.hub_model_id:
        parser.error("--push_to_hub needs --hub_model_id (e.g. your-name/gpt2-124m-repro)")
    return args


def parse_signals(text: str) -> list[signal.Signals]:
    """'SIGTERM,SIGUSR1' (or 'TERM,USR1') -> the signals; 'none' -> []."""
    if text.strip().lower() == "none":
        return []
    found = []
    for name in (part.strip().upper() for part in text.split(",") if part.strip()):
        try:
            found.append(signal.Signals[name if name.startswith("SIG") else "SIG" + name])
        except KeyError:
            raise ValueError(f"unknown signal {name!r}; name signals like SIGTERM,SIGUSR1, or 'none'") from None
        if found[-1] in (signal.SIGKILL, signal.SIGSTOP):
            raise ValueError(f"{found[-1].name} cannot be caught, so nothing can be saved on it")
    return found


class PreemptionWatch:
    """Records a preemption signal in its handler; all ranks ask together, once per step, whether any got one, so
    they stop at the same step (one small all-reduce per step, none when no signal is watched)."""

    def __init__(self, signals: list[signal.Signals]):
        self.signals, self.received = signals, None
        self.previous = {sig: signal.signal(sig, self._record) for sig in signals}

    def close(self) -> None:
        """Give the signals back their handlers of before (train() may run inside a longer-lived process)."""
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _record(self, signum: int, frame) -> None:
        self.received = signal.Signals(signum).name

    def requested(self, accelerator: Accelerator) -> bool:
        if not self.signals:
            return False
        flag = torch.tensor(float(self.received is not None), device=accelerator.device)
        if accelerator.num_processes > 1:
            flag = accelerator.reduce(flag, reduction="sum")
        return flag.item() > 0


def gradient_accumulation_steps(total_batch_size: int, micro_batch_size: int, seq_len: int, world_size: int) -> int:
    """Micro-steps per optimiser step: total / (B * T * world), which must divide exactly."""
    tokens_per_micro_step = micro_batch_size * seq_len * world_size
    if total_batch_size % tokens_per_micro_step:
        raise TrainingError(
            f"--total_batch_size {total_batch_size} is not a multiple of micro_batch_size x seq_len x processes = "
            f"{micro_batch_size} x {seq_len} x {world_size} = {tokens_per_micro_step}: change one of them so that it divides"
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


# ----------------------------------------------------------------------------------------------------------
# Recipe: learning rate and optimiser


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each block's activations in backward instead of keeping them (memory for ~1/3 more compute).
    transformers 5.24 renamed gradient_checkpointing_enable (now deprecated) to activation_checkpointing_enable."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def get_lr(step: int, max_lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """LR of optimiser step `step` (0-based): linear warmup, cosine decay to min_lr at max_steps, then min_lr."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps  # step 0 already trains, at max_lr / warmup_steps
    if step >= max_steps:
        return min_lr
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


# ----------------------------------------------------------------------------------------------------------
# Device helpers (small and guarded)


def pin_cpu_allocator() -> None:
    """Keep freed large blocks in glibc's heap instead of returning them to the OS on every step.

    glibc serves blocks over 32 MB with mmap and unmaps them on free, so each training step page-faults its
    activations back in (measured here: 0.5-1.7 s of a 2-3 s GPT-2 step). This is what MALLOC_MMAP_MAX_=0 and
    a huge MALLOC_TRIM_THRESHOLD_ do, set at run time through mallopt(3).
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return  # not glibc (e.g. musl)
    m_trim_threshold, m_mmap_max = -1, -4  # mallopt parameter numbers from glibc's malloc.h
    libc.mallopt(m_mmap_max, 0)
    libc.mallopt(m_trim_threshold, 2**31 - 1)  # an int: the largest threshold mallopt accepts


def cpu_peak_flops() -> float | None:
    """Theoretical fp32 peak of the cores this process computes on: threads x clock x FLOPs per cycle of the
    vector FMA units torch uses (2 FMA units x 8 fp32 lanes x 2 FLOPs = 32 on AVX2, 16 lanes: 64 on AVX-512).
    CPUs without AVX512-BF16/AMX run bf16 no faster than this."""
    flops_per_cycle = {"AVX512": 64, "AVX2": 32}.get(torch.backends.cpu.get_cpu_capability(), 16)
    try:
        with open("/proc/cpuinfo") as f:
            mhz = max(float(line.split(":")[1]) for line in f if line.startswith("cpu MHz"))
    except (OSError, ValueError):  # not Linux, or no clock listed
        return None
    return torch.get_num_threads() * mhz * 1e6 * flops_per_cycle


def peak_flops_per_device(device: torch.device, mixed_precision: str) -> float | None:
    """A device's peak FLOP/s for MFU: the datasheet figure of known GPUs at `mixed_precision` ("no" or "bf16"),
    the FMA peak on CPU, else None."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((peaks[mixed_precision] for key, peaks in GPU_PEAK_FLOPS.items() if key in name), None)
    if device.type == "cpu":
        return cpu_peak_flops()
    return None


# ----------------------------------------------------------------------------------------------------------
# Metrics: metrics.jsonl and the loss/HellaSwag plot


def write_text_atomic(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def write_json_atomic(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


class MetricsLog:
    """metrics.jsonl: one JSON object per line, {"type": "train"|"eval", "step": ..., ...}; main process only.

    A train record's step is the 0-based optimiser step it took; an eval record's step is the number of
    optimiser steps done when it ran. On resume from step s the file keeps only what the checkpoint had
    seen: train records before s and evals up to s.
    """

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        records = []
        if resume_step is not None and path.exists():
            for line in path.read_text().splitlines():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:  # the last line of a killed run may be cut short
                    continue
            records = [r for r in records if r["step"] < resume_step or (r["type"] == "eval" and r["step"] == resume_step)]
        self.records = records
        write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in records))

    def append(self, record: dict) -> None:
        self.records.append(record)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def latest(self, record_type: str) -> dict | None:
        return next((r for r in reversed(self.records) if r["type"] == record_type), None)

    def plot(self, path: Path) -> None:
        """Train and val loss against GPT-2 124M's val loss; HellaSwag against GPT-2 and GPT-3 124M."""
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt

        train = [r for r in self.records if r["type"] == "train"]
        evals = [r for r in self.records if r["type"] == "eval"]
        hellaswag = [r for r in evals if "hellaswag_acc_norm" in r]
        fig, (ax_loss, ax_hs) = plt.subplots(1, 2, figsize=(14, 5), sharex=True)
        ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], lw=0.8, label="train loss")
        ax_loss.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="val loss")
        ax_loss.axhline(GPT2_124M_VAL_LOSS, color="r", ls="--", label=f"GPT-2 124M val loss ({GPT2_124M_VAL_LOSS})")
        ax_loss.set(xlabel="step", ylabel="loss", yscale="log", title="loss")
        ax_loss.legend()
        ax_hs.plot([r["step"] for r in hellaswag], [r["hellaswag_acc_norm"] for r in hellaswag], "o-", label="this run")
        if not hellaswag:
            ax_hs.text(0.5, 0.5, "not evaluated in this run", transform=ax_hs.transAxes, ha="center")
        ax_hs.axhline(GPT2_124M_HELLASWAG, color="r", ls="--", label=f"GPT-2 124M ({GPT2_124M_HELLASWAG})")
        ax_hs.axhline(GPT3_124M_HELLASWAG, color="g", ls="--", label=f"GPT-3 124M ({GPT3_124M_HELLASWAG})")
        ax_hs.set(xlabel="step", ylabel="acc_norm", title="HellaSwag")
        ax_hs.legend(loc="lower right")
        fig.tight_layout()
        temporary = path.with_name("tmp_" + path.name)  # keeps the .png suffix matplotlib reads the format from
        fig.savefig(temporary, dpi=100)
        plt.close(fig)
        os.replace(temporary, path)


# ----------------------------------------------------------------------------------------------------------
# The Hub


class HubPusher:
    """Uploads model folders to a Hub repository in a background thread, so training never waits for it.

    The constructor checks the token and that the Hub is reachable (whoami, create_repo), so a long run
    fails before step 0 rather than at its end. Upload failures are reported, not fatal.
    """

    def __init__(self, repo_id: str):
        from huggingface_hub import HfApi

        self.api = HfApi()
        self.repo_id = repo_id
        try:
            self.api.whoami()
        except Exception as error:
            raise TrainingError(
                f"--push_to_hub needs a Hugging Face token and a reachable Hub (run `hf auth login` or set HF_TOKEN): "
                f"{_first_line(error)}"
            ) from None
        try:
            self.api.create_repo(repo_id, repo_type="model", exist_ok=True)
        except Exception as error:
            raise TrainingError(f"cannot create or access the Hub repository {repo_id}: {_first_line(error)}") from None
        self.executor = ThreadPoolExecutor(max_workers=1)  # uploads run in order, one at a time
        self.uploads: dict[Path, Future] = {}

    def push(self, folder: Path, commit_message: str) -> None:
        self.uploads[folder] = self.executor.submit(
            self.api.upload_folder, repo_id=self.repo_id, folder_path=str(folder), commit_message=commit_message
        )

    def cancel_queued(self) -> None:
        """Drop the uploads not started yet (one already running cannot be stopped)."""
        self.executor.shutdown(wait=False, cancel_futures=True)

    def busy(self, folder: Path) -> bool:
        """Whether `folder` is still queued or uploading."""
        future = self.uploads.get(folder)
        return future is not None and not future.done()

    def wait(self, folder: Path | None = None) -> list[str]:
        """Wait for the upload of `folder` (all uploads when None); returns one message per failed upload."""
        failures = []
        for path in [folder] if folder is not None else list(self.uploads):
            future = self.uploads.pop(path, None)
            if future is not None and future.exception() is not None:
                failures.append(f"upload of {path} to {self.repo_id} failed: {_first_line(future.exception())}")
        return failures


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# ----------------------------------------------------------------------------------------------------------
# Checkpoints


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary folders of interrupted writes are skipped)."""
    root = output_dir / "checkpoints"
    if not root.is_dir():
        return []
    # Exactly step_NNNNNN: temporary folders and the user's own copies (step_000006_backup) are not checkpoints.
    found = [p for p in root.iterdir() if p.is_dir() and re.fullmatch(rf"{CHECKPOINT_PREFIX}\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def write_model_card(folder: Path, args: argparse.Namespace, step: int, tokens_seen: int, metrics: MetricsLog) -> None:
    last_train, last_eval = metrics.latest("train"), metrics.latest("eval")
    rows = [("optimiser steps", f"{step}"), ("tokens seen", f"{tokens_seen:,}")]
    if last_train:
        rows.append(("train loss (last step)", f"{last_train['loss']:.4f}"))
    if last_eval:
        rows.append((f"val loss ({args.val_tokens:,} tokens, step {last_eval['step']})", f"{last_eval['val_loss']:.4f}"))
        if "hellaswag_acc_norm" in last_eval:
            rows.append((f"HellaSwag acc_norm ({last_eval['hellaswag_count']} examples)", f"{last_eval['hellaswag_acc_norm']:.4f}"))
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    repo = args.hub_model_id or "path/to/this/folder"
    card = f"""---
library_name: transformers
license: mit
tags: [gpt2, gpt2repro, causal-lm, from-scratch]
---

# gpt2repro: GPT-2 trained from scratch

A GPT-2 ({args.n_layer} layers, {args.n_head} heads, width {args.n_embd}, context {args.seq_len}) trained with
`train_accelerate.py` of gpt2repro on the token shards of `{args.data_dir}`.

| | |
|---|---|
{table}

Reference: GPT-2 124M scores val loss {GPT2_124M_VAL_LOSS} on FineWeb-Edu and HellaSwag acc_norm {GPT2_124M_HELLASWAG};
GPT-3 124M scores HellaSwag {GPT3_124M_HELLASWAG}.

Recipe: {args.total_batch_size:,} tokens per step, micro-batch {args.micro_batch_size} x {args.seq_len}, AdamW
(betas {args.beta1}, {args.beta2}, eps {args.adam_eps}, weight decay {args.weight_decay} on matrices), LR
{args.max_lr} -> {args.min_lr} (warmup {args.warmup_steps}, cosine to step {args.max_steps}), grad clip
{args.grad_clip}, mixed precision {args.mixed_precision}, seed {args.seed}.

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{repo}", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("{repo}")
```
"""
    (folder / "README.md").write_text(card)


def save_hf_folder(model: GPT2ReproForCausalLM, tokenizer, folder: Path, args: argparse.Namespace, step: int,
                   tokens_seen: int, metrics: MetricsLog) -> None:
    """A folder `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` loads: weights, config with
    auto_map, the model code, tokenizer, generation config and a model card."""
    model.generation_config.update(do_sample=True, top_k=args.top_k, max_new_tokens=args.sample_tokens,
                                   pad_token_id=EOT_TOKEN_ID)
    bar_was_enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()  # its one-file "Writing model shards" bar would break the training bar
    try:
        model.save_pretrained(folder, safe_serialization=True)
    finally:
        if bar_was_enabled:
            transformers_logging.enable_progress_bar()
    tokenizer.save_pretrained(folder)
    write_model_card(folder, args, step, tokens_seen, metrics)


def save_checkpoint(accelerator: Accelerator, model, tokenizer, train_loader: ShardedTokenLoader, step: int,
                    args: argparse.Namespace, metrics: MetricsLog | None, pusher: HubPusher | None,
                    evaluated: bool = True) -> Path:
    """Write checkpoints/step_NNNNNN/ = training_state/ (Accelerate's state: weights, optimiser, RNG of every rank),
    loader_rank{r}.json, trainer_state.json and hf/ (the model folder). Everything goes to a temporary folder
    first and is renamed into place, then older checkpoints beyond --keep_checkpoints are removed.
    `evaluated`: whether step's evaluation (if one is due) is done; a run resumed from here does it otherwise."""
    root = Path(args.output_dir) / "checkpoints"
    final = root / f"{CHECKPOINT_PREFIX}{step:06d}"
    temporary = root / f"tmp_{final.name}"
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)  # left over by a killed run
        temporary.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary / "training_state"))
    write_json_atomic(temporary / f"loader_rank{accelerator.process_index}.json", train_loader.state_dict())
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        tokens_seen = step * args.total_batch_size
        write_json_atomic(temporary / "trainer_state.json",
                          {"step": step, "tokens_seen": tokens_seen, "world_size": accelerator.num_processes,
                           "evaluated": evaluated, "args": vars(args), "files": describe_checkpoint_files(temporary)})
        unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
        save_hf_folder(unwrapped, tokenizer, temporary / "hf", args, step, tokens_seen, metrics)
        if final.exists():  # written before by a run this one resumed from an earlier checkpoint of
            shutil.rmtree(final)
        os.replace(temporary, final)
        prune_checkpoints(Path(args.output_dir), args.keep_checkpoints, pusher)
        if pusher is not None:
            pusher.push(final / "hf", f"step {step}: {tokens_seen:,} tokens")
    accelerator.wait_for_everyone()
    return final


# Files up to this size (RNG states, loader positions) are checksummed in trainer_state.json; larger ones (weights,
# optimiser state) only have their size recorded, which catches truncation without hashing gigabytes at every save.
CHECKSUMMED_FILE_BYTES = 1 << 20


def describe_checkpoint_files(folder: Path) -> dict[str, dict]:
    """{relative path: {"bytes", "sha256" for small files}} of what a resume reads: training_state/ and the loaders."""
    described = {}
    for path in sorted([*folder.glob("training_state/**/*"), *folder.glob("loader_rank*.json")]):
        if path.is_file():
            size = path.stat().st_size
            described[str(path.relative_to(folder))] = (
                {"bytes": size, "sha256": file_sha256(path)} if size <= CHECKSUMMED_FILE_BYTES else {"bytes": size})
    return described


def checkpoint_problem(folder: Path) -> str | None:
    """Why `folder` cannot be resumed from, in words naming the file; None when it is whole."""
    state_file = folder / "trainer_state.json"
    try:
        state = json.loads(state_file.read_text())
        int(state["step"])
    except FileNotFoundError:
        return "it has no trainer_state.json (not a checkpoint folder)"
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"{state_file} is unreadable ({_first_line(error)})"
    for name, recorded in state.get("files", {}).items():  # checkpoints written before the file list: unchecked
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != recorded["bytes"]:
            return f"{path} is {path.stat().st_size} bytes but was {recorded['bytes']} when written (truncated?)"
        if "sha256" in recorded and file_sha256(path) != recorded["sha256"]:
            return f"{path} changed since it was written (its sha256 differs)"
    return None


def prune_checkpoints(output_dir: Path, keep: int, pusher: HubPusher | None) -> None:
    """Remove all but the newest `keep` checkpoints, except those still uploading: they go at a later checkpoint or
    at the end. Rank 0 must never wait for the network here, while the other ranks wait for it in a barrier (an
    upload slower than the process-group timeout would abort the job)."""
    for old in list_checkpoints(output_dir)[:-keep]:
        if pusher is not None:
            if pusher.busy(old / "hf"):
                continue
            for failure in pusher.wait(old / "hf"):  # done: only collects its outcome
                tqdm.write(f"warning: {failure}")
        shutil.rmtree(old)


def find_resume_checkpoint(args: argparse.Namespace, notify: bool) -> Path | None:
    """The checkpoint to resume from: the named one, or with `latest` the newest whole one in --output_dir (None:
    a fresh start). A damaged checkpoint is one error line naming its bad file; `latest` falls back past it."""
    if args.resume_from_checkpoint is None:
        return None
    if args.resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(Path(args.output_dir))
        for checkpoint in reversed(checkpoints):
            problem = checkpoint_problem(checkpoint)
            if problem is None:
                return checkpoint
            if notify:
                tqdm.write(f"notice: skipping checkpoint {checkpoint}: {problem}")
        if checkpoints:
            raise TrainingError(f"no checkpoint in {Path(args.output_dir) / 'checkpoints'} can be resumed from (see the "
                                f"notices above); move them away to start afresh")
        return None
    path = Path(args.resume_from_checkpoint)
    problem = checkpoint_problem(path)
    if problem is not None:
        raise TrainingError(f"cannot resume from --resume_from_checkpoint {path}: {problem}")
    return path


def choose_resume_checkpoint(args: argparse.Namespace, output_dir: Path) -> Path | None:
    """Rank 0's choice of where to start (see find_resume_checkpoint and check_resume). Checkpoints of this run newer
    than the one resumed from (damaged, or a line of training the user went back from) are renamed out of the way:
    rotation would otherwise keep them and delete the new ones, and a later `latest` would pick them."""
    resume_from = find_resume_checkpoint(args, notify=True)
    check_resume(args, resume_from, output_dir)
    if resume_from is not None and resume_from.resolve().parent == (output_dir / "checkpoints").resolve():
        for newer in list_checkpoints(output_dir):
            if int(newer.name[len(CHECKPOINT_PREFIX):]) > int(resume_from.name[len(CHECKPOINT_PREFIX):]):
                set_aside = newer.with_name(f"abandoned_{newer.name}_{time.strftime('%Y%m%d-%H%M%S')}")
                os.replace(newer, set_aside)
                tqdm.write(f"notice: {newer} is newer than {resume_from}; moved to {set_aside}")
    return resume_from


def check_resume(args: argparse.Namespace, resume_from: Path | None, output_dir: Path) -> None:
    """Refuse what would overwrite another run or silently do nothing."""
    checkpoints = list_checkpoints(output_dir)
    if resume_from is None:
        if checkpoints:
            raise TrainingError(f"{output_dir} already holds checkpoints: continue with --resume_from_checkpoint latest "
                                f"or choose another --output_dir")
        return
    own = resume_from.resolve().parent == (output_dir / "checkpoints").resolve()
    if not own and (checkpoints or (output_dir / "metrics.jsonl").exists()):
        raise TrainingError(f"--output_dir {output_dir} holds another run's checkpoints or metrics, which resuming "
                            f"{resume_from} there would overwrite: resume into an empty --output_dir")
    state = json.loads((resume_from / "trainer_state.json").read_text())
    saved = state.get("args", {})
    shape = ("n_layer", "n_head", "n_embd", "seq_len")
    changed = [f"--{k} {getattr(args, k)} (checkpoint: {saved[k]})" for k in shape if k in saved and saved[k] != getattr(args, k)]
    if changed:
        raise TrainingError(f"cannot resume from {resume_from}: the model shape differs: {', '.join(changed)}; "
                            f"pass the checkpoint's values")
    if state["step"] > args.max_steps:
        raise TrainingError(f"{resume_from} is at step {state['step']}, beyond --max_steps {args.max_steps}: raise "
                            f"--max_steps to train on")


# ----------------------------------------------------------------------------------------------------------
# Evaluation


def load_hellaswag_examples(args: argparse.Namespace, notify: bool) -> list[dict] | None:
    """HellaSwag's validation examples, or None (with one notice) when no data was named and none is found."""
    if not args.hellaswag:
        return None
    try:
        return load_hellaswag(args.hellaswag_file)
    except HellaSwagFormatError as error:
        raise TrainingError(f"--hellaswag_file: {error}") from None
    except HellaSwagUnavailable as error:
        if args.hellaswag_file:  # asked for by name: a typo must not cost a long run its HellaSwag curve
            raise TrainingError(str(error)) from None
        if notify:  # the loader's own hint names eval_hellaswag's flag, so training says it in its own words
            tqdm.write("notice: HellaSwag is skipped: its data is neither cached nor downloadable from here; pass "
                       "--hellaswag_file with a local HellaSwag val jsonl or parquet file (--no-hellaswag silences this)")
        return None


def decided_on_rank0(accelerator: Accelerator, decide: Callable[[], T]) -> T:
    """`decide()` run on rank 0 alone, its result (or TrainingError) given to every rank: a decision each rank made
    for itself could differ (files seen differently, a network on one node only), and ranks that went different
    ways would wait for each other in a collective until the process-group timeout."""
    outcome: list = [None]
    if accelerator.is_main_process:
        try:
            outcome[0] = ("value", decide())
        except TrainingError as error:
            outcome[0] = ("error", str(error))
        except BaseException as error:  # a bug: the other ranks stop with a pointer, rank 0 with the traceback
            outcome[0] = ("crash", f"rank 0 failed with {type(error).__name__}: {_first_line(error)}")
            if accelerator.num_processes > 1:
                broadcast_object_list(outcome, from_process=0)
            raise
    if accelerator.num_processes > 1:
        broadcast_object_list(outcome, from_process=0)
    kind, value = outcome[0]
    if kind != "value":
        raise TrainingError(value)
    return value


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
            count = int((y != -100).sum())
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
        result.update(hellaswag_acc=scores["acc"], hellaswag_acc_norm=scores["acc_norm"], hellaswag_count=scores["count"])

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


# ----------------------------------------------------------------------------------------------------------
# Training


def check_output_dir(output_dir: Path) -> None:
    """--output_dir must be a folder this process can write, checked before anything is computed."""
    if output_dir.exists() and not output_dir.is_dir():
        raise TrainingError(f"--output_dir {output_dir} is a file, not a folder")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=output_dir).close()
    except OSError as error:
        raise TrainingError(f"--output_dir {output_dir} is not writable: {error.strerror or error}") from None


def prepare_demo_data(accelerator: Accelerator, args: argparse.Namespace) -> None:
    """The demo's data folder is built from the embedded corpus the first time (main process; others wait)."""
    with accelerator.main_process_first():
        if accelerator.is_main_process and not any(Path(args.data_dir).glob("*train*")):
            import prepare_data

            tqdm.write(f"preparing the embedded corpus in {args.data_dir} ...")
            prepare_data.main(["--dataset", "embedded", "--output_dir", args.data_dir])


def train(args: argparse.Namespace) -> Path:
    """Run the whole training; returns the final checkpoint folder."""
    if args.report_to in ("tensorboard", "all") and not is_tensorboard_available():
        raise TrainingError("--report_to tensorboard needs the tensorboard package: pip install tensorboard")
    if args.report_to == "wandb" and not is_wandb_available():
        raise TrainingError("--report_to wandb needs the wandb package: pip install wandb")
    # The device decides what `auto` means.
    process_group = InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=args.ddp_timeout))
    args.mixed_precision, precision_line = resolve_mixed_precision(  # to_kwargs() would drop a timeout equal to
        args.mixed_precision, accelerate_device(timeout=process_group.timeout))  # its default, leaving torch's
    accelerator = Accelerator(mixed_precision=args.mixed_precision, project_dir=args.output_dir,
                              log_with=None if args.report_to == "none" else args.report_to,
                              dynamo_backend="inductor" if args.compile else None,  # None: the launch config decides
                              kwargs_handlers=[process_group])
    device, rank, world_size = accelerator.device, accelerator.process_index, accelerator.num_processes
    is_main = accelerator.is_main_process
    grad_accum = gradient_accumulation_steps(args.total_batch_size, args.micro_batch_size, args.seq_len, world_size)
    if accelerator.gradient_accumulation_steps != 1:  # accelerator.backward would divide the loss a second time
        raise TrainingError(f"this script derives gradient accumulation from --total_batch_size ({grad_accum} micro-steps "
                            f"per step here): drop accelerate launch's --gradient_accumulation_steps "
                            f"{accelerator.gradient_accumulation_steps}")
    try:
        config = GPT2ReproConfig(n_positions=args.seq_len, n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)
    except ValueError as error:  # e.g. --n_embd not divisible by --n_head
        raise TrainingError(str(error)) from None
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # fp32 matmuls outside autocast run as TF32 (~3x on A100)
    elif device.type == "cpu":
        pin_cpu_allocator()

    output_dir = Path(args.output_dir)
    check_output_dir(output_dir)
    resume_from = decided_on_rank0(accelerator, lambda: choose_resume_checkpoint(args, output_dir))
    if args.preset == "cpu-demo":
        prepare_demo_data(accelerator, args)
    try:  # both splits are checked now, not at the first evaluation
        choose_val_tokens(args, notify=is_main)
        next(validation_batches(args.data_dir, args.eval_batch_size, args.seq_len, args.val_tokens,
                                verify_checksums=args.verify_data))
        train_loader = ShardedTokenLoader(args.data_dir, "train", args.micro_batch_size, args.seq_len, rank,
                                          world_size, shuffle=args.shuffle, seed=args.seed,
                                          verify_checksums=args.verify_data)
    except ValueError as error:  # ShardFormatError included: missing or corrupt shards, too few val tokens
        raise TrainingError(str(error)) from None
    pushers = []  # rank 0's, checked now rather than at the end; its failure stops every rank alike
    decided_on_rank0(accelerator, lambda: pushers.append(HubPusher(args.hub_model_id)) if args.push_to_hub else None)
    pusher = pushers[0] if pushers else None
    # Every rank scores its share of what rank 0 found: ranks deciding alone could disagree (a node without the file
    # and the network) and leave the others waiting in the scoring's collectives.
    hellaswag_examples = decided_on_rank0(accelerator, lambda: load_hellaswag_examples(args, notify=True))
    tokenizer = get_tokenizer()

    set_seed(args.seed)  # the same initial weights on every process
    model = GPT2ReproForCausalLM(config)
    if args.gradient_checkpointing:
        enable_activation_checkpointing(model)
    flops_per_token = model.flops_per_token(args.seq_len)
    optimizer = configure_optimizer(model, args.weight_decay, (args.beta1, args.beta2), args.adam_eps, device.type)
    model, optimizer = accelerator.prepare(model, optimizer)
    raw_model = accelerator.unwrap_model(model, keep_torch_compile=False)  # for evaluation, sampling and saving

    start_step, start_evaluated = 0, False
    if resume_from is not None:
        trainer_state = json.loads((resume_from / "trainer_state.json").read_text())
        if trainer_state["world_size"] != world_size and is_main:
            tqdm.write(f"notice: {resume_from} was written by {trainer_state['world_size']} processes and this launch "
                       f"has {world_size}: the run continues from the same weights, optimiser state and data position, "
                       f"but is no longer bitwise the run it would have been")
        try:
            accelerator.load_state(str(resume_from / "training_state"))
        except Exception as error:  # whatever torch, safetensors or pickle raise on a damaged file
            raise TrainingError(f"cannot load {resume_from / 'training_state'}: {_first_line(error)}") from None
        loader_file = resume_from / f"loader_rank{rank}.json"
        if not loader_file.exists():  # a rank the checkpoint did not have: every rank saved the same window index
            loader_file = resume_from / "loader_rank0.json"
        try:
            train_loader.load_state_dict(json.loads(loader_file.read_text()))
        except ValueError as error:  # another data folder, sequence length, shuffle or seed
            raise TrainingError(f"cannot resume from {resume_from}: {error}") from None
        start_step = trainer_state["step"]
        start_evaluated = trainer_state.get("evaluated", True)
        if start_step == args.max_steps and is_main:
            tqdm.write(f"notice: {resume_from} is already at --max_steps {args.max_steps}: nothing to train (raise "
                       f"--max_steps to train on)")
    metrics = None
    if is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        metrics = MetricsLog(output_dir / "metrics.jsonl", start_step if resume_from is not None else None)
    if args.report_to != "none":
        accelerator.init_trackers("gpt2repro", config={k: v for k, v in vars(args).items() if v is not None})
    peak_flops = args.peak_flops or peak_flops_per_device(device, args.mixed_precision)
    if is_main:
        tqdm.write(precision_line)
        tqdm.write(f"{sum(p.numel() for p in raw_model.parameters()):,} parameters | {world_size} process(es) on "
                   f"{device.type} | {grad_accum} micro-steps of {args.micro_batch_size} x {args.seq_len} per step "
                   f"= {args.total_batch_size:,} tokens | mixed precision {args.mixed_precision}"
                   + (f" | resuming at step {start_step} from {resume_from}" if resume_from else ""))

    progress = tqdm(total=args.max_steps, initial=start_step, disable=not is_main, desc="training", dynamic_ncols=True)
    final_checkpoint = None
    preemption = PreemptionWatch(args.save_on_signals)
    step = start_step
    try:
        for step in range(start_step, args.max_steps + 1):
            if preemption.requested(accelerator):  # first: a grace period may not cover this step's evaluation
                if pusher is not None:
                    pusher.cancel_queued()  # the process waits for queued uploads before it exits
                if step == start_step and resume_from is not None and \
                        resume_from.resolve().parent == (output_dir / "checkpoints").resolve():
                    final_checkpoint = resume_from  # the state of this very step
                else:
                    final_checkpoint = save_checkpoint(accelerator, model, tokenizer, train_loader, step, args, metrics,
                                                       None, evaluated=False)
                raise TrainingPreempted(step, final_checkpoint, preemption.received)
            # Evaluation at step s sees the weights after s optimiser steps; a resumed run has had its eval at s,
            # unless its checkpoint was written on preemption, before that eval.
            if (step % args.eval_every == 0 or step == args.max_steps) and not (step == start_step and start_evaluated):
                result = evaluate(accelerator, raw_model, tokenizer, args, hellaswag_examples)
                if is_main:
                    metrics.append({"type": "eval", "step": step, **result})
                    metrics.plot(output_dir / "loss.png")
                    lines = [f"step {step}: val loss {result['val_loss']:.4f}"]
                    if "hellaswag_acc_norm" in result:
                        lines[0] += f", HellaSwag acc_norm {result['hellaswag_acc_norm']:.4f} ({result['hellaswag_count']} examples)"
                    lines += [f"  sample: {text!r}" for text in result.get("samples", [])]
                    tqdm.write("\n".join(lines))
                accelerator.log({f"eval/{k}": v for k, v in result.items() if k != "samples"}, step=step)
            if step > start_step and (step % args.checkpoint_every == 0 or step == args.max_steps):
                final_checkpoint = save_checkpoint(accelerator, model, tokenizer, train_loader, step, args, metrics, pusher)
            if step == args.max_steps:
                break

            start = time.perf_counter()
            lr = get_lr(step, args.max_lr, args.min_lr, args.warmup_steps, args.max_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            step_loss = torch.zeros((), device=device)
            for micro_step in range(grad_accum):
                x, y = train_loader.next_batch()  # (B, T) each
                if device.type == "cuda":  # page-locked, so the copy below really runs beside the compute
                    x, y = x.pin_memory(), y.pin_memory()
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                # DDP all-reduces gradients on the last micro-step only; the choice is made before the forward.
                last_micro_step = micro_step == grad_accum - 1
                with contextlib.nullcontext() if last_micro_step else accelerator.no_sync(model):
                    loss = model(input_ids=x, shift_labels=y, return_logits=False).loss
                    loss = loss / grad_accum  # the step's loss is the mean over its micro-batches, not their sum
                    step_loss += loss.detach()
                    accelerator.backward(loss)
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.grad_clip)
            step_loss = accelerator.reduce(step_loss, reduction="mean").item()  # averaged over processes, for the log
            grad_norm = grad_norm.item()
            if not (math.isfinite(step_loss) and math.isfinite(grad_norm)):
                last_good = list_checkpoints(output_dir)
                raise TrainingError(
                    f"step {step}: loss {step_loss} / grad norm {grad_norm} is not finite; stopped without updating the "
                    f"weights. Last good checkpoint: {last_good[-1] if last_good else 'none yet'} (try a lower --max_lr)"
                )
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step_time = time.perf_counter() - start  # .item() above waited for the device
            tokens_per_sec = args.total_batch_size / step_time
            record = {"type": "train", "step": step, "loss": step_loss, "lr": lr, "grad_norm": grad_norm,
                      "step_time": step_time, "tokens_per_sec": tokens_per_sec}
            if peak_flops:
                record["mfu"] = flops_per_token * tokens_per_sec / (peak_flops * world_size)
            if is_main:
                metrics.append(record)
                progress.update(1)
                progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", norm=f"{grad_norm:.3f}",
                                     tok_s=f"{tokens_per_sec:,.0f}", mfu=f"{record.get('mfu', float('nan')):.1%}")
            accelerator.log({f"train/{k}": v for k, v in record.items() if k not in ("type", "step")}, step=step)
    except KeyboardInterrupt:  # Ctrl-C: one line in main(), naming where the run can continue from
        raise TrainingInterrupted(step) from None
    finally:
        progress.close()  # ends the bar's line, so that an error message gets a line of its own
        preemption.close()
    if pusher is not None:  # rank 0 alone, after the last collective
        tqdm.write(f"waiting for the uploads to {args.hub_model_id} to finish ...")
        for failure in pusher.wait():
            tqdm.write(f"warning: {failure}")
        prune_checkpoints(output_dir, args.keep_checkpoints, None)  # those kept while they uploaded
    accelerator.end_training()
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
    except TrainingPreempted as preempted:
        if os.environ.get("RANK", "0") == "0":
            print(f"preempted{f' by {preempted.signal_name}' if preempted.signal_name else ''} at step {preempted.step}: "
                  f"checkpoint {preempted.checkpoint} written; continue with the same command and "
                  f"--resume_from_checkpoint latest", file=sys.stderr)
        sys.exit(EXIT_PREEMPTED)
    except (KeyboardInterrupt, TrainingInterrupted) as interruption:
        interrupted_at = interruption.step if isinstance(interruption, TrainingInterrupted) else None
        if os.environ.get("RANK", "0") == "0":  # one line for the whole job, not one per process
            checkpoints = list_checkpoints(Path(args.output_dir))
            print(f"interrupted{f' at step {interrupted_at}' if interrupted_at is not None else ' before training'}; "
                  f"continue with the same command and --resume_from_checkpoint latest "
                  f"(from {checkpoints[-1] if checkpoints else 'the start: no checkpoint yet'})", file=sys.stderr)
        sys.exit(130)  # 128 + SIGINT, the shell's convention


if __name__ == "__main__":
    main()
