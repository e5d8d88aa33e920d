"""Train GPT-2 from scratch with a plain Hugging Face Accelerate loop: build-nanogpt's 124M recipe, plus
exact resume, atomic checkpoints that load with `AutoModelForCausalLM`, and background pushes to the Hub.

    python train_accelerate.py --preset cpu-demo                          # ~5 minutes on 2 CPU cores
    accelerate launch --config_file accelerate_configs/8gpu_ddp_bf16.yaml train_accelerate.py --preset gpt2-124m

One optimiser step sees `--total_batch_size` tokens: every process runs `gradient_accumulation_steps`
micro-batches of (micro_batch_size, seq_len) and DDP averages the gradients once, on the last micro-step.
The learning rate is set by hand before each optimiser step, so it follows the schedule on any number of
processes. Every `--eval_every` steps: validation loss over a fixed number of tokens, HellaSwag when its data
is there, and samples from `generate`. Every `--checkpoint_every` steps and at the end: the full training
state (for `--resume_from_checkpoint`; each process writes its share) and a Hugging Face model folder, written to a
temporary folder and renamed into place, so a killed run never leaves a half-written checkpoint behind. This file
parses the flags into settings (gpt2repro/settings.py) and holds the loop; the package holds the pieces:
gpt2repro/training.py (the run's start, the model, one step), optimization.py (optimisers, LR schedule), launch.py
(the Accelerator, precision, compile), checkpointing.py and sharded_checkpoint.py, hub.py, evaluation.py,
metrics_log.py, run_control.py (errors, Ctrl-C, preemption).
"""
from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import time
from dataclasses import asdict, replace
from pathlib import Path

from tqdm.auto import tqdm

from gpt2repro import checkpointing, memory_plan
from gpt2repro.cli import CommandError, run_command
from gpt2repro.data_loader import BatchPrefetcher
from gpt2repro.evaluation import RECIPE_VAL_TOKENS, run_evaluation
from gpt2repro.hub import HUB_STRATEGIES
from gpt2repro.launch import (
    build_accelerator,
    check_fsdp_launch,
    fsdp_launch,
    peak_flops_per_device,
    resolve_compile,
)
from gpt2repro.metrics_log import MetricsLog, log_evaluation, log_train_step, tracker_config
from gpt2repro.optimization import set_learning_rates
from gpt2repro.recipes import PRESETS, RECIPES, as_flags
from gpt2repro.run_control import EXIT_PREEMPTED, StopSignals, TrainingInterrupted, parse_signals, where_to_continue
from gpt2repro.settings import Resolved, TrainSettings
from gpt2repro.shards import ShardFormatError
from gpt2repro.tokenizer import get_tokenizer
from gpt2repro.training import (
    close_run,
    describe_start,
    finish_run,
    gradient_accumulation_steps,
    open_run,
    prepare_model,
    resolve_launch,
    stop_run,
    train_step,
)

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
    ckpt.add_argument("--resume_from_checkpoint", metavar="latest|PATH|OWNER/NAME[@REVISION]",
                      help="continue a run exactly: 'latest' in --output_dir (a fresh start when there is none), "
                           "a checkpoint folder, or a Hub repository's last-checkpoint/ (pushed with --hub_strategy "
                           "checkpoint or all_checkpoints) at a revision: a branch, a step's tag (step_001000) or a "
                           "commit; the other processes wait for the download within --ddp_timeout")
    ckpt.add_argument("--save_on_signals", default="SIGTERM,SIGUSR1",
                      help="signals on which every process finishes its step, a checkpoint is written and the run "
                           f"exits with status {EXIT_PREEMPTED} (clusters send SIGTERM to preempt; SLURM's "
                           "--signal sends SIGUSR1 ahead of the time limit); 'none' leaves the signals' default action")
    ckpt.add_argument("--ddp_timeout", type=int, default=1800,
                      help="seconds a process waits in a collective (e.g. for rank 0 writing a checkpoint) before the "
                           "job fails")
    ckpt.add_argument("--push_to_hub", action="store_true",
                      help="upload checkpoints in the background, each tagged step_NNNNNN (see --hub_strategy)")
    ckpt.add_argument("--hub_model_id", help="Hub repository for --push_to_hub, e.g. user/gpt2-124m-repro")
    ckpt.add_argument("--hub_strategy", choices=HUB_STRATEGIES,
                      help="what --push_to_hub uploads, modelled on transformers' Trainer: 'end' the final model; "
                           "'every_save' (default) the model at every checkpoint; 'checkpoint' also the training "
                           "state, to last-checkpoint/, which --resume_from_checkpoint OWNER/NAME resumes from; "
                           "'all_checkpoints' also every step's state, to checkpoints/step_NNNNNN/")
    ckpt.add_argument("--hub_private_repo", action="store_true",
                      help="create the --hub_model_id repository private (an existing one keeps its visibility)")
    ckpt.add_argument("--export_hf", metavar="CHECKPOINT",
                      help="write the hf/ model folder of a checkpoint (a preemption checkpoint has none) from its "
                           "training state, with the settings it was trained with, in one process, and exit")
    memory_plan.add_arguments(parser)
    return parser


def parse_args(argv: list[str] | None = None) -> TrainSettings:
    """The command line as settings: a preset's and a recipe's values are defaults that explicit flags override."""
    parser = build_parser()
    known = parser.parse_known_args(argv)[0]
    preset = PRESETS.get(known.preset, {})
    recipe = preset.get("recipe", known.recipe or "gpt2")
    if known.preset and known.recipe not in (None, recipe):
        others = [name for name, values in PRESETS.items() if values["recipe"] == known.recipe]
        parser.error(f"--preset {known.preset} is the {recipe} recipe, not --recipe {known.recipe}"
                     + (f": use --preset {' or '.join(others)}" if others else ""))
    parser.set_defaults(**{"recipe": recipe, **RECIPES[recipe], **preset})  # explicit flags still win
    flags = vars(parser.parse_args(argv))
    if flags["eval_batch_size"] is None:
        flags["eval_batch_size"] = flags["micro_batch_size"]
    positive = ["n_layer", "n_head", "n_embd", "seq_len", "total_batch_size", "micro_batch_size", "max_steps",
                "eval_every", "checkpoint_every", "keep_checkpoints", "eval_batch_size", "val_tokens", "ddp_timeout"]
    for name in positive:
        if flags[name] is not None and flags[name] < 1:
            parser.error(f"--{name} must be at least 1, got {flags[name]}")
    for name in ("warmup_steps", "weight_decay", "grad_clip", "max_lr", "min_lr", "muon_lr", "embed_lr", "head_lr",
                 "adamw_lr", "logit_softcap"):
        if flags[name] is not None and flags[name] < 0:
            parser.error(f"--{name} must not be negative, got {flags[name]}")
    try:
        flags["save_on_signals"] = parse_signals(flags["save_on_signals"])
    except ValueError as error:
        parser.error(f"--save_on_signals: {error}")
    if not 0 <= flags["cooldown_frac"] <= 1:
        parser.error(f"--cooldown_frac must be between 0 and 1, got {flags['cooldown_frac']}")
    if flags["push_to_hub"] and not flags["hub_model_id"]:
        parser.error("--push_to_hub needs --hub_model_id (e.g. your-name/gpt2-124m-repro)")
    for name in ("hub_strategy", "hub_private_repo"):
        if flags[name] and not flags["push_to_hub"]:
            parser.error(f"--{name} is for --push_to_hub, which is not set")
    flags["hub_strategy"] = flags["hub_strategy"] or "every_save"
    return TrainSettings.from_flags(flags)


def train(settings: TrainSettings) -> Path | None:
    """Run the whole training; returns the final checkpoint folder."""
    compute, schedule, output_dir = settings.compute, settings.schedule, Path(settings.data.output_dir)
    accelerator, mixed_precision, compile, precision_line = build_accelerator(
        compute.mixed_precision, compute.compile, settings.logging.report_to, compute.ddp_timeout, str(output_dir))
    world_size, is_main = accelerator.num_processes, accelerator.is_main_process
    check_fsdp_launch(accelerator, settings.optim)
    resolved = resolve_launch(accelerator, settings, mixed_precision, compile)  # before any work: a bad batch stops it
    run = open_run(accelerator, settings)
    resolved = replace(resolved, val_tokens=run.validation.val_tokens)
    tokenizer, grad_accum = get_tokenizer(), resolved.gradient_accumulation_steps
    model, optimizers, raw_model = prepare_model(accelerator, settings, resolved)
    start_step, start_evaluated = checkpointing.load_checkpoint(accelerator, run.resume_from, run.train_loader,
                                                                schedule.max_steps, raw_model, optimizers,
                                                                settings.optim.shard_optimizer)
    metrics = MetricsLog(output_dir / "metrics.jsonl", start_step if run.resume_from else None) if is_main else None
    if settings.logging.report_to != "none":
        accelerator.init_trackers("gpt2repro", config=tracker_config(settings.flags(), asdict(resolved)))
    if is_main:
        tqdm.write(describe_start(settings, resolved, precision_line, raw_model, optimizers, run.resume_from,
                                  start_step))
    # The next micro-batch is read (and pinned) in a thread while this one computes; checkpoints save the position of
    # the batches used, not of those read ahead.
    train_batches = BatchPrefetcher(run.train_loader, pin_memory=accelerator.device.type == "cuda")
    checkpoints = checkpointing.RunCheckpoints(
        functools.partial(checkpointing.save_checkpoint, accelerator, model, optimizers, tokenizer, train_batches,
                          settings=settings, resolved=resolved, metrics=metrics),
        latest=run.resume_from if run.resume_from and checkpointing.in_run(run.resume_from, output_dir) else None,
        evaluated=start_evaluated)
    progress = tqdm(total=schedule.max_steps, initial=start_step, disable=not is_main, desc="training",
                    dynamic_ncols=True)
    signals = StopSignals(settings.checkpoint.signals())  # from here on Ctrl-C too is acted on at a step boundary
    stop_on_signal = functools.partial(stop_run, signals, checkpoints, run.pusher)
    flops_per_step = raw_model.flops_per_token(settings.model.seq_len) * schedule.total_batch_size
    peak_flops = settings.logging.peak_flops or peak_flops_per_device(accelerator.device, mixed_precision)
    step = start_step
    try:
        stop_flags = signals.requested(accelerator)
        for step in range(start_step, schedule.max_steps + 1):
            # First a signal seen in the last step's collective: a grace period may not cover this step's evaluation.
            # After the last step the run finishes instead (its final evaluation, checkpoint and push).
            last = step == schedule.max_steps
            if not last:
                stop_on_signal(stop_flags, step, evaluated=False)
            # Evaluation at step s sees the weights after s optimiser steps; a resumed run has had its eval at s,
            # unless its checkpoint was written on a signal, before that eval.
            busy = False
            if (step % settings.eval.eval_every == 0 or last) and not (step == start_step and start_evaluated):
                result = run_evaluation(accelerator, raw_model, tokenizer, settings.eval, run.validation,
                                        run.hellaswag_examples, None if last else signals)  # the last: signals moot
                if result is None:  # a signal came during it: stop now, with this step's evaluation not done
                    stop_on_signal(signals.requested(accelerator), step, evaluated=False)
                log_evaluation(accelerator, metrics, step, result, output_dir / "loss.png")
                busy = True
            if step > start_step and (step % settings.checkpoint.checkpoint_every == 0 or last):
                checkpoints.save(step, pusher=run.pusher)
                busy = True
            if last:  # the run is complete and saved: a signal now changes nothing
                break
            if busy:  # a signal that came during them stops the run now, not after one more step
                stop_on_signal(signals.requested(accelerator), step, evaluated=True)

            start = time.perf_counter()
            lr = set_learning_rates(optimizers, step, settings.optim, schedule)
            loss, grad_norm, stop_flags = train_step(model, optimizers, accelerator, train_batches, grad_accum,
                                                     settings.optim.grad_clip, signals.flags)
            step_time = time.perf_counter() - start  # to train_step's device read; the update's GPU work ends next step
            log_train_step(accelerator, metrics, progress, step, loss=loss, lr=lr, grad_norm=grad_norm,
                           step_time=step_time, tokens_per_sec=schedule.total_batch_size / step_time,
                           mfu=flops_per_step / step_time / (peak_flops * world_size) if peak_flops else None)
        signals.close()  # the run is complete: from here a Ctrl-C stops at once (e.g. the wait for uploads)
        finish_run(accelerator, run.pusher, output_dir, settings.checkpoint.keep_checkpoints)
    except KeyboardInterrupt:  # a second Ctrl-C, or one after the loop: one line naming where to continue
        raise TrainingInterrupted(step, checkpointing.latest_checkpoint(output_dir)) from None
    finally:
        close_run(train_batches, progress, signals, metrics)
    if is_main and checkpoints.latest is not None:
        tqdm.write(checkpointing.model_folder_line(checkpoints.latest))
    return checkpoints.latest


def plan(settings: TrainSettings) -> None:
    """--dry_run: the memory plan for this launch's processes (WORLD_SIZE), whose batch must divide as train's;
    `auto` planned as on the GPUs the presets are for (A100, H100, H200): bf16 autocast, compiled."""
    world_size, schedule = int(os.environ.get("WORLD_SIZE", "1")), settings.schedule
    grad_accum = gradient_accumulation_steps(schedule.total_batch_size, schedule.micro_batch_size,
                                             settings.model.seq_len, world_size)
    compute = settings.compute
    resolved = Resolved("bf16" if compute.mixed_precision == "auto" else compute.mixed_precision,
                        resolve_compile(compute.compile, cuda=True), fsdp_launch() and world_size > 1, world_size,
                        grad_accum)
    memory_plan.print_plan(settings, resolved)


def export_hf(checkpoint: Path) -> None:
    """--export_hf: the checkpoint's hf/ folder, with the settings of its run (flags added since take their
    defaults)."""
    problem = checkpointing.checkpoint_problem(checkpoint)
    if problem is not None:
        raise CommandError(f"cannot export {checkpoint}: {problem}")
    trained = json.loads((checkpoint / "trainer_state.json").read_text()).get("settings")
    if trained is None:
        raise CommandError(f"{checkpoint} was written by an earlier version, which gave every checkpoint its hf/ "
                           f"folder: use {checkpoint / 'hf'}")
    settings = TrainSettings.from_flags({**parse_args([]).flags(), **trained})
    folder = checkpointing.export_model_folder(checkpoint, settings, get_tokenizer())
    print(f"model folder {folder} written")


def run(settings: TrainSettings) -> None:
    if settings.plan.dry_run:
        plan(settings)
    elif settings.checkpoint.export_hf:
        export_hf(Path(settings.checkpoint.export_hf))
    else:
        train(settings)


def main(argv: list[str] | None = None) -> None:
    settings = parse_args(argv)
    # Each rank prints its own error: a shard can turn out corrupt mid-run on one rank only.
    run_command(lambda: run(settings), errors=(ShardFormatError,),
                errors_on_every_rank=True,
                on_ctrl_c=lambda: where_to_continue(checkpointing.latest_checkpoint(Path(settings.data.output_dir))))


if __name__ == "__main__":
    try:
        main()
    finally:  # the interpreter's last garbage collection skips what is frozen: ~1 s less to exit (measured), which
        gc.freeze()  # a Ctrl-C or a preemption's grace period waits for
