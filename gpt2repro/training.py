"""The pieces of a training run that the training script wires together: what a run starts from, the model and its
optimisers, compiling for training, and one optimiser step."""
from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from gpt2repro.checkpointing import RunCheckpoints, choose_resume_checkpoint, prune_checkpoints
from gpt2repro.cli import check_writable_folder
from gpt2repro.data_loader import BatchPrefetcher, ShardedTokenLoader, validation_batches
from gpt2repro.evaluation import ValidationData, resolve_val_tokens
from gpt2repro.hellaswag_data import load_hellaswag_for_training
from gpt2repro.hub import HubPusher, fetch_checkpoint, hub_reference, start_hub_pusher
from gpt2repro.launch import compile_kwargs
from gpt2repro.metrics_log import MetricsLog
from gpt2repro.optimization import configure_muon, configure_optimizer, peak_lr
from gpt2repro.recipes import EMBEDDED_CORPUS_PRESETS
from gpt2repro.run_control import (
    StopSignals,
    TrainingError,
    checked_on_every_rank,
    decided_on_rank0,
    torchrun_forwarded,
    unforwarded_signals,
)
from gpt2repro.settings import Resolved, TrainSettings
from gpt2repro.shard_writing import prepare_embedded_corpus
from modeling_gpt2repro import GPT2ReproForCausalLM


@dataclass
class RunStart:
    """What a run starts from, each part agreed by every rank before any compute."""
    resume_from: Path | None  # the checkpoint to resume from; None: a fresh start
    train_loader: ShardedTokenLoader
    validation: ValidationData  # its val_tokens: --val_tokens, or the recipe's, or the whole val split if smaller
    pusher: HubPusher | None  # rank 0's; None without --push_to_hub
    hellaswag_examples: list | None  # None: not scored


def open_run(accelerator: Accelerator, settings: TrainSettings) -> RunStart:
    """The checkpoint to resume from, the training data (both splits checked now, not at the first evaluation), the
    Hub pusher and HellaSwag's examples; a preset's own corpus prepared the first time (by rank 0, the others wait)."""
    data, output_dir, is_main = settings.data, Path(settings.data.output_dir), accelerator.is_main_process
    checked_on_every_rank(accelerator, lambda: check_writable_folder(output_dir, "--output_dir"))
    resume_value = settings.checkpoint.resume_from_checkpoint
    # rank 0's reading: a relative path that exists on one node only must not send the ranks different ways
    on_hub = decided_on_rank0(accelerator, lambda: hub_reference(resume_value))
    if on_hub:  # a checkpoint pushed to the Hub: each node's copy of it, checked below as a local one is
        resume_value = str(fetch_checkpoint(accelerator, *on_hub))
    resume_from = decided_on_rank0(accelerator, lambda: choose_resume_checkpoint(
        resume_value, output_dir, settings.model, settings.schedule.max_steps))
    if on_hub:
        resume_from = Path(resume_value)  # rank 0 decided on its node's copy; this process reads its own
    if settings.preset in EMBEDDED_CORPUS_PRESETS:  # every rank joins; rank 0 alone looks and prepares
        decided_on_rank0(accelerator, lambda: None if any(Path(data.data_dir).glob("*train*"))
                         else prepare_embedded_corpus(Path(data.data_dir)))

    def open_data() -> tuple[ShardedTokenLoader, int]:  # on every rank: a node without the shards stops them all
        try:
            val_tokens = resolve_val_tokens(settings.eval.val_tokens, data.data_dir, notify=is_main)
            next(validation_batches(data.data_dir, settings.eval.eval_batch_size, settings.model.seq_len, val_tokens,
                                    verify_checksums=data.verify_data))
            loader = ShardedTokenLoader(data.data_dir, "train", settings.schedule.micro_batch_size,
                                        settings.model.seq_len, accelerator.process_index, accelerator.num_processes,
                                        shuffle=data.shuffle, seed=data.seed, verify_checksums=data.verify_data)
            return loader, val_tokens
        except ValueError as error:  # ShardFormatError included: missing or corrupt shards, too few val tokens
            raise TrainingError(str(error)) from None

    train_loader, val_tokens = checked_on_every_rank(accelerator, open_data)
    pusher = start_hub_pusher(accelerator, settings.checkpoint)
    # Every rank scores its share of what rank 0 found: ranks deciding alone could disagree (a node without the file
    # and the network) and leave the others waiting in the scoring's collectives.
    hellaswag = decided_on_rank0(accelerator, lambda: load_hellaswag_for_training(settings.eval.hellaswag_file)
                                 if settings.eval.hellaswag else None)
    validation = ValidationData(data.data_dir, settings.model.seq_len, val_tokens, data.seed)
    return RunStart(resume_from, train_loader, validation, pusher, hellaswag)


def build_model(settings: TrainSettings, device: torch.device, world_size: int) -> tuple[GPT2ReproForCausalLM, list]:
    """The model, initialised from --seed (the same weights on every process), on `device`, and its optimisers (built
    there: a sharded optimiser's collectives run on the device of its parameters)."""
    set_seed(settings.data.seed)
    model = GPT2ReproForCausalLM(settings.model.config()).to(device)
    if settings.compute.gradient_checkpointing:
        enable_activation_checkpointing(model)
    optim = settings.optim
    betas, shard = (optim.beta1, optim.beta2), optim.shard_optimizer and world_size > 1  # one process: no split
    if optim.optimizer == "muon":
        return model, configure_muon(model, optim.muon_momentum, optim.weight_decay, betas, optim.adam_eps,
                                     device.type, shard)
    return model, [configure_optimizer(model, optim.weight_decay, betas, optim.adam_eps, device.type, shard)]


def enable_activation_checkpointing(model: PreTrainedModel) -> None:
    """Recompute each block's activations in backward instead of keeping them (memory for ~1/3 more compute).
    transformers 5.24 renamed gradient_checkpointing_enable (now deprecated) to activation_checkpointing_enable."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


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


def resolve_launch(accelerator: Accelerator, settings: TrainSettings, mixed_precision: str, compile: str) -> Resolved:
    """What this launch resolved (its precision and compile as build_accelerator chose them), the validation tokens
    not yet known (they come from the data)."""
    schedule = settings.schedule
    grad_accum = gradient_accumulation_steps(schedule.total_batch_size, schedule.micro_batch_size,
                                             settings.model.seq_len, accelerator.num_processes,
                                             accelerator.gradient_accumulation_steps)
    fsdp = accelerator.distributed_type == DistributedType.FSDP
    if compile == "on" and not fsdp and accelerator.num_processes > 1 and compile_kwargs()["mode"] == "reduce-overhead":
        raise TrainingError("accelerate launch --dynamo_mode reduce-overhead (CUDA graphs) is not supported with "
                            "compiled DDP: launch with --dynamo_mode default or max-autotune-no-cudagraphs")
    return Resolved(mixed_precision, compile, fsdp, accelerator.num_processes, grad_accum)


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
        x, y = batches.next_batch()  # (B, T) each, pinned on CUDA: the copy does not wait for the host (it is queued
        # on the compute stream, in order with the kernels, so it does not run beside them)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        # DDP all-reduces gradients on the last micro-step only; the choice is made before the forward.
        last_micro_step = micro_step == grad_accum - 1
        with contextlib.nullcontext() if last_micro_step else accelerator.no_sync(model):
            with accelerator.autocast():  # Accelerate wraps DDP's forward in it, not FSDP2's (its policy casts there)
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


def prepare_model(accelerator: Accelerator, settings: TrainSettings,
                  resolved: Resolved) -> tuple[torch.nn.Module, list[torch.optim.Optimizer], GPT2ReproForCausalLM]:
    """The model and optimisers as Accelerate prepared them (DDP or FSDP), compiled as `resolved` says, and the plain
    module beside them that evaluation, sampling and saving use."""
    model, optimizers = build_model(settings, accelerator.device, accelerator.num_processes)
    compiling = compile_kwargs() if resolved.compile == "on" else None
    if compiling and not resolved.fsdp:  # before DDP wraps it: see compile_for_training
        compile_for_training(model, compiling)
    model, *optimizers = accelerator.prepare(model, *optimizers)
    raw_model = accelerator.unwrap_model(model)
    if compiling and resolved.fsdp:  # inside the FSDP modules prepare made
        for block in raw_model.transformer.h:
            compile_for_training(block, compiling)
    return model, optimizers, raw_model


def describe_start(settings: TrainSettings, resolved: Resolved, precision_line: str, model: GPT2ReproForCausalLM,
                   optimizers: list[torch.optim.Optimizer], resume_from: Path | None, start_step: int) -> str:
    """The lines a run starts with: the precision and why, the model and batch, where it resumes, every peak LR."""
    schedule = settings.schedule
    peak_lrs = {group.get("name", "adamw"): peak_lr(group.get("name"), settings.optim, schedule)[0]
                for optimizer in optimizers for group in optimizer.param_groups}
    return (f"{precision_line}\n{sum(p.numel() for p in model.parameters()):,} parameters | {resolved.world_size} "
            f"process(es) on {model.device.type} | {resolved.gradient_accumulation_steps} micro-steps of "
            f"{schedule.micro_batch_size} x {settings.model.seq_len} per step = {schedule.total_batch_size:,} tokens | "
            f"mixed precision {resolved.mixed_precision} | compile {resolved.compile}"
            + (f" | resuming at step {start_step} from {resume_from}" if resume_from else "")
            + "\npeak LR: " + ", ".join(f"{name} {lr:g}" for name, lr in peak_lrs.items())
            + "".join(f"\nwarning: {s.name} (--save_on_signals) never reaches this process: the torchrun launcher "
                      f"that started it forwards only {torchrun_forwarded()} and dies of "
                      f"{s.name}; launch with PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,{s.name}"
                      for s in unforwarded_signals(settings.checkpoint.signals())))


def stop_run(signals: StopSignals, checkpoints: RunCheckpoints, pusher: HubPusher | None, summed_flags: list[float],
             step: int, evaluated: bool) -> None:
    """End the run with a checkpoint at `step` when any process got a signal (`summed_flags`)."""
    if any(summed_flags):
        if pusher is not None:
            pusher.cancel_queued()  # the process waits for queued uploads before it exits
        signals.stop(summed_flags, step, checkpoints.at(step, evaluated))


def finish_run(accelerator: Accelerator, pusher: HubPusher | None, output_dir: Path, keep_checkpoints: int) -> None:
    """After the last step: every process past its last collective before any tears the process group down (gloo
    aborts a process whose peer left mid-transfer; a run resumed at its last step ends on Muon's broadcasts, which
    return on the sender before the receiver has them), then rank 0 waits for its uploads and removes the checkpoints
    kept for them."""
    accelerator.wait_for_everyone()
    if pusher is not None:
        pusher.finish()
        prune_checkpoints(output_dir, keep_checkpoints, None)
    accelerator.end_training()


def close_run(batches: BatchPrefetcher, progress: tqdm, signals: StopSignals, metrics: MetricsLog | None) -> None:
    """Whatever ended the run: the reading thread stopped, the bar's line ended (an error message gets a line of its
    own), the signals' handlers restored, and the metrics' last records written."""
    batches.close()
    progress.close()
    signals.close()
    if metrics is not None:
        metrics.close()
