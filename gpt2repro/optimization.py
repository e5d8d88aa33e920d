"""The optimisers of both recipes: which parameters each takes, --shard_optimizer (ZeRO stage 1: each process keeps
the optimiser state of its share of the parameters only), and the learning-rate schedules."""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import torch
from torch.distributed.optim import ZeroRedundancyOptimizer

from gpt2repro.muon import Muon
from gpt2repro.settings import OptimizerSettings, ScheduleSettings


def configure_optimizer(model: torch.nn.Module, weight_decay: float, betas: tuple[float, float], eps: float,
                        device_type: str, shard: bool = False) -> torch.optim.Optimizer:
    """GPT-2's AdamW: weight decay on matmul and embedding weights (dim >= 2) only, never on biases or LayerNorms.
    `shard`: its state split among the processes (ShardedAdamW)."""
    params = [p for p in model.parameters() if p.requires_grad]  # the tied wte/lm_head matrix appears once
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return adamw(groups, betas, eps, device_type, shard)


def adamw(groups: list[dict], betas: tuple[float, float], eps: float, device_type: str,
          shard: bool) -> torch.optim.Optimizer:
    """AdamW over `groups` at LR 0 (the LR is set before every step), fused where torch has the kernel (CPU, CUDA)."""
    fused = device_type in ("cuda", "cpu")
    if shard:
        return ShardedAdamW(groups, lr=0.0, betas=betas, eps=eps, fused=fused)
    return torch.optim.AdamW(groups, lr=0.0, betas=betas, eps=eps, fused=fused)


class ShardedAdamW(ZeroRedundancyOptimizer):
    """AdamW with its state split among the processes of the default process group (ZeRO stage 1, as llm.c runs its
    larger models): each process keeps the two moments of its share of the parameters, updates that share and
    broadcasts it. The update is AdamW's, elementwise, so the weights are those of plain AdamW.

    A run's checkpoint holds each process's share (gpt2repro.sharded_checkpoint writes the inner AdamW's state by
    parameter name), so a run resumes on any number of processes, with or without sharding. `state_dict()` is the
    whole state all the same, as plain AdamW's (a collective gathering it on rank 0: every process calls it, as
    Accelerate's prepare() does), and `load_state_dict()` keeps this process's share of a whole state (one process's
    checkpoints, and those of several written by earlier versions)."""

    def __init__(self, groups: list[dict], **adamw_options: Any):
        # Not parameters_as_bucket_view (one broadcast per process instead of one per parameter): it makes every
        # parameter a view of one flat buffer, and Accelerate's safetensors save keeps one tensor per storage, dropping
        # the rest as "shared" (checked; the 2-process test's saved weights then differed from plain AdamW's).
        super().__init__(groups, optimizer_class=torch.optim.AdamW, **adamw_options)

    def state_dict(self) -> dict[str, Any]:
        self.consolidate_state_dict(to=0)
        if self.rank == 0:
            device = self.optim.param_groups[0]["params"][0].device
            if device.type == "cuda":  # consolidation copies the shards to the host with non_blocking=True
                torch.cuda.synchronize(device)
            whole = super().state_dict()
            self._all_state_dicts = []  # the gathered copies: host memory the size of the whole state until next time
            return whole
        # Only rank 0's is written. The others give the groups without a state: what Accelerate's prepare() hands
        # back to load_state_dict() (to place the state on the device) must be a state dict, and not a stale one.
        return {"state": {}, "param_groups": torch.optim.Optimizer.state_dict(self)["param_groups"]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        # The wrapper's own copy of this process's share (torch's Optimizer.load_state_dict made it; the inner AdamW
        # holds the one in use): a second copy of the shard on the device otherwise.
        self.state = defaultdict(dict)
        if self.optim.defaults.get("fused"):  # the fused kernel wants each step count beside its parameter, where
            for param, state in self.optim.state.items():  # ZeroRedundancyOptimizer moved them to the CPU
                if "step" in state:
                    state["step"] = state["step"].to(param.device)


def configure_muon(model: torch.nn.Module, momentum: float, weight_decay: float, betas: tuple[float, float],
                   eps: float, device_type: str, shard: bool = False) -> list[torch.optim.Optimizer]:
    """The speedrun's optimisers for a GPT2ReproForCausalLM: Muon on every 2-D weight matrix inside the blocks, the
    fused q|k|v projection as three C x C matrices; AdamW on the rest: the embeddings and an untied head (with weight
    decay, as matrices), biases and norm gains (without). Every group is named for train_accelerate.peak_lr and
    starts at LR 0 (set before every step). `shard`: the state split among the processes, AdamW's (ShardedAdamW) and
    Muon's (each momentum buffer on the process that orthogonalises its matrix; that work is shared out either way)."""
    blocks = model.transformer.h
    qkv = [block.attn.c_attn.weight for block in blocks]
    matrices = [p for p in blocks.parameters() if p.dim() == 2 and all(p is not q for q in qkv)]
    embeddings = [m.weight for m in (model.transformer.wte, model.transformer.wpe) if m is not None]
    head = [] if model.config.tie_word_embeddings else [model.lm_head.weight]
    named = {id(p) for p in qkv + matrices + embeddings + head}
    groups = [{"params": embeddings, "name": "embeddings", "weight_decay": weight_decay},
              {"params": head, "name": "head", "weight_decay": weight_decay},
              {"params": [p for p in model.parameters() if id(p) not in named], "name": "adamw", "weight_decay": 0.0}]
    muon = Muon([{"params": qkv, "name": "muon", "parts": 3}, {"params": matrices, "name": "muon"}], lr=0.0,
                momentum=momentum, weight_decay=weight_decay, shard_state=shard)
    return [muon, adamw([g for g in groups if g["params"]], betas, eps, device_type, shard)]


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


def peak_lr(group_name: str | None, optim: OptimizerSettings, schedule: ScheduleSettings) -> tuple[float, float]:
    """(max, min) LR of an optimiser group: --max_lr/--min_lr for GPT-2's AdamW (no name), else the group's own flag,
    decaying to the same fraction min_lr / max_lr of it. Read from the settings at every step, so a resumed run
    follows them."""
    peak = {"muon": optim.muon_lr, "embeddings": optim.embed_lr, "head": optim.head_lr, "adamw": optim.adamw_lr}
    if group_name not in peak:
        return schedule.max_lr, schedule.min_lr
    fraction = schedule.min_lr / schedule.max_lr if schedule.max_lr else 0.0
    return peak[group_name], peak[group_name] * fraction


def set_learning_rates(optimizers: list[torch.optim.Optimizer], step: int, optim: OptimizerSettings,
                       schedule: ScheduleSettings) -> float:
    """Every group's LR for optimiser step `step`, set by hand (a prepared LR scheduler would step once per process);
    returns the first group's (GPT-2's AdamW, or Muon's), the one logged."""
    for group in (group for optimizer in optimizers for group in optimizer.param_groups):
        group["lr"] = get_lr(step, *peak_lr(group.get("name"), optim, schedule), schedule.warmup_steps,
                             schedule.max_steps, schedule.lr_schedule, schedule.cooldown_frac)
    return optimizers[0].param_groups[0]["lr"]
