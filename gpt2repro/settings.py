"""A training run's settings, parsed once from the command line into frozen dataclasses grouped by concern, and what
a launch resolved from them (`Resolved`). Nothing changes a setting after parsing: the values `auto` or an unset
flag stand for are resolved by one function each, for training and --dry_run alike (launch.resolve_mixed_precision,
launch.resolve_compile, evaluation.resolve_val_tokens, training.gradient_accumulation_steps), and travel beside the
settings.

The field names are the command-line flags' (`--n_layer` is `settings.model.n_layer`); `TrainSettings.from_flags`
files each flag into its group and refuses any it does not know, so a flag added to the parser must be added here.
"""
from __future__ import annotations

import dataclasses
import signal
from dataclasses import dataclass, fields
from typing import Any

from configuration_gpt2repro import GPT2ReproConfig
from gpt2repro.cli import CommandError


@dataclass(frozen=True)
class DataSettings:
    data_dir: str
    output_dir: str
    shuffle: bool
    seed: int
    verify_data: bool


@dataclass(frozen=True)
class ModelSettings:
    n_layer: int
    n_head: int
    n_embd: int
    seq_len: int  # tokens per training row (T), also the model's context
    position_embedding: str
    qk_norm: bool
    mlp_activation: str
    norm: str
    tie_word_embeddings: bool
    logit_softcap: float | None
    zero_init_residual: bool
    bias: bool

    def config(self) -> GPT2ReproConfig:
        """The model these settings describe, with --seq_len as its context."""
        try:
            return GPT2ReproConfig(n_positions=self.seq_len, n_layer=self.n_layer, n_head=self.n_head,
                                   n_embd=self.n_embd, **self.architecture())
        except ValueError as error:  # e.g. --n_embd not divisible by --n_head
            raise CommandError(str(error)) from None

    def architecture(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in GPT2ReproConfig.architecture_options}


@dataclass(frozen=True)
class ScheduleSettings:
    total_batch_size: int  # tokens per optimiser step, all processes together
    micro_batch_size: int  # rows per forward per process (B)
    max_steps: int
    warmup_steps: int
    max_lr: float
    min_lr: float
    lr_schedule: str
    cooldown_frac: float


@dataclass(frozen=True)
class OptimizerSettings:
    optimizer: str
    muon_lr: float
    muon_momentum: float
    embed_lr: float
    head_lr: float
    adamw_lr: float
    weight_decay: float
    beta1: float
    beta2: float
    adam_eps: float
    grad_clip: float
    shard_optimizer: bool


@dataclass(frozen=True)
class ComputeSettings:
    mixed_precision: str  # auto, no or bf16: resolved per device into Resolved.mixed_precision
    compile: str  # auto, on or off: resolved per launch into Resolved.compile
    gradient_checkpointing: bool
    ddp_timeout: int  # seconds


@dataclass(frozen=True)
class EvalSettings:
    eval_every: int
    val_tokens: int | None  # unset: resolved from the data into Resolved.val_tokens
    eval_batch_size: int
    hellaswag: bool
    hellaswag_file: str | None
    hellaswag_limit: int | None
    num_samples: int
    sample_tokens: int
    top_k: int


@dataclass(frozen=True)
class CheckpointSettings:
    checkpoint_every: int
    keep_checkpoints: int
    resume_from_checkpoint: str | None
    save_on_signals: tuple[str, ...]  # signal names, e.g. ("SIGTERM", "SIGUSR1")
    push_to_hub: bool
    hub_model_id: str | None
    hub_strategy: str  # one of gpt2repro.hub.HUB_STRATEGIES
    hub_private_repo: bool
    export_hf: str | None  # a checkpoint folder: write its hf/ and exit

    def signals(self) -> list[signal.Signals]:
        return [signal.Signals[name] for name in self.save_on_signals]


@dataclass(frozen=True)
class LoggingSettings:
    report_to: str
    peak_flops: float | None


@dataclass(frozen=True)
class PlanSettings:
    dry_run: bool
    device_memory: int | None  # bytes
    write_bandwidth: int  # bytes per second


GROUPS = {"data": DataSettings, "model": ModelSettings, "schedule": ScheduleSettings, "optim": OptimizerSettings,
          "compute": ComputeSettings, "eval": EvalSettings, "checkpoint": CheckpointSettings,
          "logging": LoggingSettings, "plan": PlanSettings}


@dataclass(frozen=True)
class TrainSettings:
    """Everything `train_accelerate.py` was asked, grouped by concern."""
    preset: str | None
    recipe: str
    data: DataSettings
    model: ModelSettings
    schedule: ScheduleSettings
    optim: OptimizerSettings
    compute: ComputeSettings
    eval: EvalSettings
    checkpoint: CheckpointSettings
    logging: LoggingSettings
    plan: PlanSettings

    @classmethod
    def from_flags(cls, flags: dict[str, Any]) -> TrainSettings:
        """The settings of parsed flags ({flag name: value}); save_on_signals as signals or their names."""
        flags = dict(flags, save_on_signals=tuple(signal.Signals(s).name if isinstance(s, int) else s
                                                  for s in flags["save_on_signals"]))
        groups = {group: kind(**{f.name: flags.pop(f.name) for f in fields(kind)}) for group, kind in GROUPS.items()}
        settings = cls(preset=flags.pop("preset"), recipe=flags.pop("recipe"), **groups)
        if flags:
            raise TypeError(f"flags without a setting: {sorted(flags)}")
        return settings

    def flags(self) -> dict[str, Any]:
        """The settings as {flag name: value}, JSON-ready: what trainer_state.json and the trackers record."""
        flat = {"preset": self.preset, "recipe": self.recipe}
        for group in GROUPS:
            flat.update(dataclasses.asdict(getattr(self, group)))
        flat["save_on_signals"] = list(flat["save_on_signals"])
        return flat


@dataclass(frozen=True)
class Resolved:
    """What one launch resolved from the settings: the same values for training and for --dry_run's plan."""
    mixed_precision: str  # "bf16" or "no"
    compile: str  # "on" or "off"
    fsdp: bool  # an FSDP launch of several processes
    world_size: int
    gradient_accumulation_steps: int  # micro-steps per optimiser step
    val_tokens: int | None = None  # None where no data is read (--dry_run)
