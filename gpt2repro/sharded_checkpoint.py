"""The training state of a multi-process run through torch.distributed.checkpoint (DCP): every process writes its
own share in parallel and reads back only the share it holds, on any number of processes.

What each process holds, and so writes and reads:
- DDP: the whole weights and (without --shard_optimizer) the whole optimiser state, the same on every process; DCP
  writes each tensor once, spreading them over the processes (its save plans are deduplicated by size).
- --shard_optimizer: the optimiser state of this process's parameters only (ZeRO's AdamW) or matrices (Muon's).
- FSDP: this process's shard of every weight and of its optimiser state (DTensors; DCP reshards them on load).
Nothing is gathered on one process: each writes ~1/N of the whole state. On resume each reads what it holds (under
DDP without --shard_optimizer, the whole state; with it, the whole weights and its optimiser share). The tensors handed
to DCP are the live weights and optimiser state themselves: a load writes into them in place. Only the state tensors
are kept: the optimisers' hyperparameters (betas, eps, weight decay, momentum) come from the flags of the resumed
run, as its learning rates do.

No random-number state is kept: training draws none (no dropout; the data order comes from --seed and the epoch, and
evaluation's samples from a seed of their own)."""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from accelerate.optimizer import AcceleratedOptimizer
from torch.distributed.optim import ZeroRedundancyOptimizer

from modeling_gpt2repro import GPT2ReproForCausalLM

STATE_FOLDER = "distributed_state"  # in a checkpoint folder, beside trainer_state.json


def state_holder(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimiser whose `state` holds this process's tensors: inside Accelerate's wrapper, and ZeRO's inner AdamW
    (the wrapper's own `state` is only filled by load_state_dict)."""
    if isinstance(optimizer, AcceleratedOptimizer):
        optimizer = optimizer.optimizer
    return optimizer.optim if isinstance(optimizer, ZeroRedundancyOptimizer) else optimizer


def initialise_state(optimizer: torch.optim.Optimizer) -> None:
    """Give an optimiser that has not stepped its state (zeros, the step count 1) by one step on zero gradients at
    LR 0, which leaves the weights as they are; a checkpoint is then loaded into that state in place. A collective for
    Muon (its broadcasts): every process calls it."""
    if optimizer.state:
        return
    learning_rates = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
        for param in group["params"]:
            param.grad = torch.zeros_like(param)
    optimizer.step()
    for group, lr in zip(optimizer.param_groups, learning_rates, strict=True):
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)


def training_state(model: GPT2ReproForCausalLM, optimizers: list[torch.optim.Optimizer],
                   with_optimizers: bool) -> dict[str, dict]:
    """{"model": {weight name: tensor}, "optimizer": {parameter name: {"exp_avg": ..., ...}}}: this process's live
    tensors, the tied head once (it is the embedding matrix). `model` is the unwrapped module (under FSDP the sharded
    one); optimisers hold disjoint parameters, so the parameter's name keys its state."""
    weights = model.state_dict()
    if model.config.tie_word_embeddings:
        weights.pop("lm_head.weight")
    state = {"model": weights}
    if with_optimizers:
        names = {id(param): name for name, param in model.named_parameters()}
        state["optimizer"] = {names[id(param)]: values for optimizer in map(state_holder, optimizers)
                              for param, values in optimizer.state.items()}
    return state


def save(folder: Path, model: GPT2ReproForCausalLM, optimizers: list[torch.optim.Optimizer],
         with_optimizers: bool) -> None:
    """Write the run's state to `folder`: a collective, every process writes its share (files __{rank}_*.distcp, and
    .metadata from rank 0). `with_optimizers`: False before the first optimiser step (no state yet)."""
    dcp.save(training_state(model, optimizers, with_optimizers), checkpoint_id=folder)


def load(folder: Path, model: GPT2ReproForCausalLM, optimizers: list[torch.optim.Optimizer],
         with_optimizers: bool) -> None:
    """Read into the live weights and optimiser state the share of `folder` that this process holds, whatever the
    number of processes that wrote it. One process (no process group) reads the whole state."""
    if with_optimizers:
        for optimizer in map(state_holder, optimizers):
            initialise_state(optimizer)
    read(training_state(model, optimizers, with_optimizers), folder)


def read(state: dict, folder: Path, **options) -> None:
    """dcp.load of `state` from `folder`, in place, without its warning that one process (no process group) reads
    alone: here that is what is meant (one process resuming a run of several, or exporting its hf/)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is .*assuming the intent is to load in a single")
        dcp.load(state, checkpoint_id=folder, **options)


def whole_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The weights of `folder`, read whole in this process alone (no process group): what an hf/ folder is written
    from. Accelerate's sharded FSDP checkpoints (training_state/pytorch_model_fsdp_0) keep theirs under the same
    "model" key."""
    metadata = dcp.FileSystemReader(folder).read_metadata().state_dict_metadata
    weights = {name.removeprefix("model."): torch.empty(tensor.size, dtype=tensor.properties.dtype)
               for name, tensor in metadata.items() if name.startswith("model.")}
    read({"model": weights}, folder, no_dist=True)
    return weights
