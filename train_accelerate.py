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
renamed into place, so a killed run never leaves a half-written checkpoint behind. This file is the recipe and its
loop; recipes.py holds the presets, checkpointing.py the checkpoints and Hub pushes, metrics_log.py the metrics and
plot, run_control.py how the processes stop together (errors, Ctrl-C, preemption).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import accelerate
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from packaging.version import Version
from tqdm.auto import tqdm

import prepare_data
from eval_hellaswag import load_hellaswag_for_training
from gpt2repro import checkpointing, memory_plan
from gpt2repro.cli import check_writable_folder, run_command
from gpt2repro.evaluation import RECIPE_VAL_TOKENS, choose_val_tokens, evaluate
from gpt2repro.launch import build_accelerator, compile_kwargs, fsdp_launch, peak_flops_per_device
from gpt2repro.metrics_log import MetricsLog, log_evaluation, log_train_step
from gpt2repro.optimization import configure_muon, configure_optimizer
from gpt2repro.recipes import PRESETS, RECIPES, as_flags, model_config
from gpt2repro.run_control import (
    EXIT_PREEMPTED,
    StopSignals,
    TrainingError,
    TrainingInterrupted,
    checked_on_every_rank,
    decided_on_rank0,
    parse_signals,
    where_to_continue,
)
from gpt2repro.shards import BatchPrefetcher, ShardedTokenLoader, ShardFormatError, validation_batches
from gpt2repro.tokenizer import get_tokenizer
from modeling_gpt2repro import GPT2ReproForCausalLM, enable_activation_checkpointing

# ---- arguments -------------------------------------------------------------------------------------------------------


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except the unset ones (their help says what happens then)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def float_or_none(text: str) -> float | None:
    """A flag's number, or None for 'none' (to unset a value a recipe or preset gave); argparse names this function
    in its error for anything else."""
    return None if text.strip().lower() == "none" else float(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train GPT-2 from scratch with Hugging Face Accelerate (defaults: build-nanogpt's 124M run).",
        formatter_class=HelpFormatter,
        epilog="presets (each sets its recipe's values, then these): "
               + "; ".join(f"{name} = {as_flags(preset)}" for name, preset in PRESETS.items())
               + ". recipes: " + "; ".join(f"{name} = {as_flags(r) or 'the defaults'}" for name, r in RECIPES.items()),
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), help="a named set of defaults; explicit flags still win")
    parser.add_argument("--recipe", choices=sorted(RECIPES),
                        help="gpt2 (the default): build-nanogpt's GPT-2 recipe; speedrun: modded-nanogpt's "
                             "architecture and Muon (its values are defaults, listed below; explicit flags still win)")
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
    model.add_argument("--logit_softcap", type=float_or_none,
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
    optim.add_argument("--shard_optimizer", action="store_true",
                       help="split the optimiser state among the processes (ZeRO-1: each keeps ~1/N of AdamW's and "
                            "Muon's state; the same weights)")
    optim.add_argument("--mixed_precision", choices=["auto", "no", "bf16"], default="auto",
                       help="bf16 autocast through Accelerate, fp32 master weights either way; 'auto': bf16 on GPUs "
                            "that support it and CPUs with native bf16 (AVX512-BF16/AMX), else fp32")
    optim.add_argument("--compile", nargs="?", const="on", choices=["auto", "on", "off"], default="auto",
                       help="torch.compile the training forward and loss as one graph (a graph break is an error; "
                            "under FSDP each Block's forward, the loss staying the chunked one); auto: on CUDA, where "
                            "it pays, except under FSDP (not yet measured on a GPU), else off (on a CPU it did not: "
                            "see the README); evaluation and sampling run eager")
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
                           f"exits with status {EXIT_PREEMPTED} (clusters send SIGTERM to preempt; SLURM's "
                           "--signal sends SIGUSR1 ahead of the time limit); 'none' leaves the signals' default action")
    ckpt.add_argument("--ddp_timeout", type=int, default=1800,
                      help="seconds a process waits in a collective (e.g. for rank 0 writing a checkpoint) before the "
                           "job fails")
    ckpt.add_argument("--push_to_hub", action="store_true", help="upload each checkpoint's hf/ in the background")
    ckpt.add_argument("--hub_model_id", help="Hub repository for --push_to_hub, e.g. user/gpt2-124m-repro")
    memory_plan.add_arguments(parser)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    known = parser.parse_known_args(argv)[0]
    preset = PRESETS.get(known.preset, {})
    recipe = preset.get("recipe", known.recipe or "gpt2")
    if known.preset and known.recipe not in (None, recipe):
        others = [name for name, values in PRESETS.items() if values["recipe"] == known.recipe]
        parser.error(f"--preset {known.preset} is the {recipe} recipe, not --recipe {known.recipe}"
                     + (f": use --preset {' or '.join(others)}" if others else ""))
    parser.set_defaults(**{"recipe": recipe, **RECIPES[recipe], **preset})  # explicit flags still win
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
        args.save_on_signals = parse_signals(args.save_on_signals)
    except ValueError as error:
        parser.error(f"--save_on_signals: {error}")
    if not 0 <= args.cooldown_frac <= 1:
        parser.error(f"--cooldown_frac must be between 0 and 1, got {args.cooldown_frac}")
    if args.push_to_hub and not args.hub_model_id:
        parser.error("--push_to_hub needs --hub_model_id (e.g. your-name/gpt2-124m-repro)")
    return args


def gradient_accumulation_steps(total_batch_size: int, micro_batch_size: int, seq_len: int, world_size: int,
                                launch_setting: int = 1) -> int:
    """Micro-steps per optimiser step: total / (B * T * world), which must divide exactly. `launch_setting`: accelerate
    launch's --gradient_accumulation_steps, refused (accelerator.backward would divide the loss a second time)."""
    tokens_per_micro_step = micro_batch_size * seq_len * world_size
    if total_batch_size % tokens_per_micro_step:
        raise TrainingError(
            f"--total_batch_size {total_batch_size} is not a multiple of micro_batch_size x seq_len x processes = "
            f"{micro_batch_size} x {seq_len} x {world_size} = {tokens_per_micro_step}: change one of them so that it "
            f"divides"
        )
    if launch_setting != 1:
        raise TrainingError(f"this script derives gradient accumulation from --total_batch_size "
                            f"({total_batch_size // tokens_per_micro_step} micro-steps per step here): drop accelerate "
                            f"launch's --gradient_accumulation_steps {launch_setting}")
    return total_batch_size // tokens_per_micro_step


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
    (a signal that came during this step stops the run after it). A loss or norm that is not finite stops the run
    with the weights left as they were.

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
    if not (math.isfinite(step_loss) and math.isfinite(grad_norm)):  # the run's NaN policy, on every process alike
        raise TrainingError(f"loss {step_loss} / grad norm {grad_norm} is not finite; weights not updated: continue "
                            f"from the newest checkpoint with --resume_from_checkpoint latest and a lower --max_lr")
    for optimizer in optimizers:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step_loss, grad_norm, flags


# ---- training --------------------------------------------------------------------------------------------------------


def open_run(accelerator: Accelerator, args: argparse.Namespace) -> tuple[Path | None, ShardedTokenLoader,
                                                                         checkpointing.HubPusher | None, list | None]:
    """What the run starts from, each outcome agreed by every rank before any compute: the checkpoint to resume from
    (None: a fresh start), the training data (both splits checked now, not at the first evaluation), the Hub pusher
    (rank 0's; None without --push_to_hub) and HellaSwag's examples (None: not scored)."""
    output_dir, is_main = Path(args.output_dir), accelerator.is_main_process
    checked_on_every_rank(accelerator, lambda: check_writable_folder(output_dir, "--output_dir"))
    resume_from = decided_on_rank0(accelerator, lambda: checkpointing.choose_resume_checkpoint(args, output_dir))
    if args.preset in ("cpu-demo", "cpu-demo-speedrun"):  # its data is built from the embedded corpus the first time
        decided_on_rank0(accelerator, lambda: prepare_demo_data(args.data_dir))  # by rank 0; the others wait for it

    def open_data() -> ShardedTokenLoader:  # on every rank: a node without the shards stops them all
        try:
            choose_val_tokens(args, notify=is_main)
            next(validation_batches(args.data_dir, args.eval_batch_size, args.seq_len, args.val_tokens,
                                    verify_checksums=args.verify_data))
            return ShardedTokenLoader(args.data_dir, "train", args.micro_batch_size, args.seq_len,
                                      accelerator.process_index, accelerator.num_processes, shuffle=args.shuffle,
                                      seed=args.seed, verify_checksums=args.verify_data)
        except ValueError as error:  # ShardFormatError included: missing or corrupt shards, too few val tokens
            raise TrainingError(str(error)) from None

    train_loader = checked_on_every_rank(accelerator, open_data)
    pusher = checkpointing.start_hub_pusher(accelerator, args.hub_model_id if args.push_to_hub else None)
    # Every rank scores its share of what rank 0 found: ranks deciding alone could disagree (a node without the file
    # and the network) and leave the others waiting in the scoring's collectives.
    hellaswag = decided_on_rank0(accelerator, lambda: load_hellaswag_for_training(args.hellaswag_file)
                                 if args.hellaswag else None)
    return resume_from, train_loader, pusher, hellaswag


def prepare_demo_data(data_dir: str) -> None:
    if not any(Path(data_dir).glob("*train*")):
        prepare_data.prepare(prepare_data.parse_args(["--dataset", "embedded", "--output_dir", data_dir]))


FSDP_ACCELERATE = Version("1.16")  # its FSDP2 path is what tests/test_train_cluster.py runs


def check_fsdp_launch(accelerator: Accelerator, args: argparse.Namespace) -> None:
    """Under an FSDP launch (accelerate_configs/fsdp2_8gpu.yaml), what cannot work with it, refused before any work."""
    if accelerator.distributed_type != DistributedType.FSDP:
        return
    if Version(accelerate.__version__) < FSDP_ACCELERATE:
        raise TrainingError(f"FSDP needs accelerate >= {FSDP_ACCELERATE} (the release its FSDP2 path is tested with "
                            f"here); this is {accelerate.__version__}: pip install -U accelerate")
    if accelerator.state.fsdp_plugin.fsdp_version != 2:
        raise TrainingError("this script trains with FSDP2: set fsdp_version: 2 in the Accelerate config (as "
                            "accelerate_configs/fsdp2_8gpu.yaml does)")
    if args.optimizer == "muon":
        raise TrainingError("Muon orthogonalises whole matrices and FSDP splits each one among the processes: train "
                            "with Muon under DDP (accelerate_configs/8gpu_ddp_bf16.yaml), with --shard_optimizer to "
                            "split its state")
    if args.shard_optimizer:
        raise TrainingError("FSDP already splits the optimiser state with the parameters: drop --shard_optimizer")


def compile_for_training(module: torch.nn.Module, compile_kwargs: dict) -> None:
    """--compile: `module`'s forward compiled whole (fullgraph: a graph break is an error), for training only: under
    no_grad (evaluation, sampling with its KV cache) it runs its eager forward, which build-nanogpt's compile broke.

    The compiled forward runs inside the wrapper that distributes it, never around it. DDP's own forward stays eager,
    and dynamo, compiling while it runs (DistributedDataParallel._inside_ddp_forward), splits our graph at DDP's
    gradient buckets (torch._dynamo's DDPOptimizer): each bucket's all-reduce starts as soon as the backward of its
    layers ends, beside the backward of the layers before them (benchmarks/bench_ddp_compile.py counts it). A
    model compiled whole before DDP wraps it hands DDP every gradient at the end of one compiled backward. Under FSDP
    `module` is each Block, inside the FSDP module whose hooks gather and free its weights; identical Blocks share one
    compiled graph (their parameters are its inputs)."""
    eager = module.forward
    compiled = torch.compile(eager, **compile_kwargs)

    @functools.wraps(eager)  # generate() reads the forward's signature
    def forward(*args, **kwargs):
        return (compiled if torch.is_grad_enabled() else eager)(*args, **kwargs)

    module.forward = forward


def build_model(args: argparse.Namespace, device: torch.device, world_size: int) -> tuple[GPT2ReproForCausalLM, list]:
    """The model, initialised from --seed (the same weights on every process), on `device`, and its optimisers (built
    there: a sharded optimiser's collectives run on the device of its parameters)."""
    set_seed(args.seed)
    model = GPT2ReproForCausalLM(model_config(args)).to(device)
    if args.gradient_checkpointing:
        enable_activation_checkpointing(model)
    betas, shard = (args.beta1, args.beta2), args.shard_optimizer and world_size > 1  # one process: nothing to split
    if args.optimizer == "muon":
        return model, configure_muon(model, args.muon_momentum, args.weight_decay, betas, args.adam_eps, device.type,
                                     shard)
    return model, [configure_optimizer(model, args.weight_decay, betas, args.adam_eps, device.type, shard)]


def train(args: argparse.Namespace) -> Path | None:
    """Run the whole training; returns the final checkpoint folder."""
    accelerator, args.mixed_precision, args.compile, precision_line = build_accelerator(
        args.mixed_precision, args.compile, args.report_to, args.ddp_timeout, args.output_dir)
    device, world_size, is_main = accelerator.device, accelerator.num_processes, accelerator.is_main_process
    grad_accum = gradient_accumulation_steps(args.total_batch_size, args.micro_batch_size, args.seq_len, world_size,
                                             accelerator.gradient_accumulation_steps)
    output_dir = Path(args.output_dir)
    check_fsdp_launch(accelerator, args)
    resume_from, train_loader, pusher, hellaswag_examples = open_run(accelerator, args)
    tokenizer = get_tokenizer()
    model, optimizers = build_model(args, device, world_size)
    flops_per_token, parameters = model.flops_per_token(args.seq_len), sum(p.numel() for p in model.parameters())
    if args.compile == "on" and not fsdp_launch():  # before DDP wraps it (build_accelerator left compiling to this)
        compile_for_training(model, compile_kwargs())
    model, *optimizers = accelerator.prepare(model, *optimizers)
    raw_model = accelerator.unwrap_model(model)  # for evaluation, sampling and saving
    if args.compile == "on" and fsdp_launch():  # inside the FSDP modules prepare made
        for block in raw_model.transformer.h:
            compile_for_training(block, compile_kwargs())
    start_step, start_evaluated = checkpointing.load_checkpoint(accelerator, resume_from, train_loader, args.max_steps)
    metrics = MetricsLog(output_dir / "metrics.jsonl", start_step if resume_from else None) if is_main else None
    if args.report_to != "none":
        accelerator.init_trackers("gpt2repro", config={k: v for k, v in vars(args).items() if v is not None})
    peak_flops = args.peak_flops or peak_flops_per_device(device, args.mixed_precision)
    if is_main:
        peak_lrs = {group.get("name", "adamw"): peak_lr(group, args)[0] for o in optimizers for group in o.param_groups}
        tqdm.write(f"{precision_line}\n{parameters:,} parameters | {world_size} process(es) on {device.type} | "
                   f"{grad_accum} micro-steps of {args.micro_batch_size} x {args.seq_len} per step = "
                   f"{args.total_batch_size:,} tokens | mixed precision {args.mixed_precision} | compile {args.compile}"
                   + (f" | resuming at step {start_step} from {resume_from}" if resume_from else "")
                   + "\npeak LR: " + ", ".join(f"{name} {lr:g}" for name, lr in peak_lrs.items()))
    # The next micro-batch is read (and pinned) in a thread while this one computes; checkpoints save the position of
    # the batches used, not of those read ahead.
    train_batches = BatchPrefetcher(train_loader, pin_memory=device.type == "cuda")
    checkpoints = checkpointing.RunCheckpoints(
        functools.partial(checkpointing.save_checkpoint, accelerator, model, tokenizer, train_batches, args=args,
                          metrics=metrics),
        latest=resume_from if resume_from is not None and checkpointing.in_run(resume_from, output_dir) else None,
        evaluated=start_evaluated)
    progress = tqdm(total=args.max_steps, initial=start_step, disable=not is_main, desc="training", dynamic_ncols=True)
    signals = StopSignals(args.save_on_signals)  # from here on Ctrl-C too is acted on at a step boundary

    def stop_on_signal(summed_flags, step: int, evaluated: bool) -> None:
        """End the run with a checkpoint at `step` when any process got a signal (`summed_flags`)."""
        if any(summed_flags):
            if pusher is not None:
                pusher.cancel_queued()  # the process waits for queued uploads before it exits
            signals.stop(summed_flags, step, checkpoints.at(step, evaluated))

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
                result = evaluate(accelerator, raw_model, tokenizer, args, hellaswag_examples,
                                  signals if step < args.max_steps else None)  # the last: a signal changes nothing
                if result is None:  # a signal came during it: stop now, with this step's evaluation not done
                    stop_on_signal(signals.requested(accelerator), step, evaluated=False)
                log_evaluation(accelerator, metrics, step, result, output_dir / "loss.png")
                busy = True
            if step > start_step and (step % args.checkpoint_every == 0 or step == args.max_steps):
                checkpoints.save(step, pusher=pusher)
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
            step_time = time.perf_counter() - start  # train_step's one read of the device waited for it
            tokens_per_sec = args.total_batch_size / step_time
            mfu = flops_per_token * tokens_per_sec / (peak_flops * world_size) if peak_flops else None
            log_train_step(accelerator, metrics, progress, step, loss=loss, lr=lr, grad_norm=grad_norm,
                           step_time=step_time, tokens_per_sec=tokens_per_sec, mfu=mfu)
        signals.close()  # the run is complete: from here a Ctrl-C stops at once (e.g. the wait for uploads)
        # Every process past its last collective before any tears the process group down: gloo aborts a process
        # whose peer left mid-transfer. The final checkpoint's save ends on a barrier, but a run resumed at its last
        # step ends on Muon's broadcasts, which return on the sender before the receiver has them.
        accelerator.wait_for_everyone()
        if pusher is not None:  # rank 0 alone, after the last collective
            pusher.finish(output_dir, args.keep_checkpoints)
        accelerator.end_training()
    except KeyboardInterrupt:  # a second Ctrl-C, or one after the loop: one line naming where to continue
        raise TrainingInterrupted(step, checkpointing.latest_checkpoint(output_dir)) from None
    finally:
        train_batches.close()
        progress.close()  # ends the bar's line, so that an error message gets a line of its own
        signals.close()
    if is_main and checkpoints.latest is not None:
        tqdm.write(f"done: model folder {checkpoints.latest / 'hf'}")
    return checkpoints.latest


def plan(args: argparse.Namespace) -> None:
    """--dry_run: the memory plan for this launch's processes (WORLD_SIZE), whose batch must divide as train's."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    gradient_accumulation_steps(args.total_batch_size, args.micro_batch_size, args.seq_len, world_size)
    memory_plan.print_plan(args, world_size)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # Each rank prints its own error: a shard can turn out corrupt mid-run on one rank only.
    run_command(lambda: plan(args) if args.dry_run else train(args), errors=(ShardFormatError,),
                errors_on_every_rank=True,
                on_ctrl_c=lambda: where_to_continue(checkpointing.latest_checkpoint(Path(args.output_dir))))


if __name__ == "__main__":
    try:
        main()
    finally:  # the interpreter's last garbage collection skips what is frozen: ~1 s less to exit (measured), which
        gc.freeze()  # a Ctrl-C or a preemption's grace period waits for
