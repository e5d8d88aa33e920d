"""The model under FSDP2 (torch's `fully_shard`), as a GPU user shards it to train the larger GPT-2s: 2 CPU processes
over gloo, each block and then the whole model sharded, the tied embedding included. Accelerate turns FSDP into DDP
on a CPU, so this is the part of that path that a CPU can show: the loss and the gradients equal the unsharded model's
on the whole batch, the project's AdamW steps the sharded (DTensor) parameters as it steps plain ones, and a sharded
checkpoint (gpt2repro.sharded_checkpoint) restores weights and optimiser state exactly, shard by shard into a fresh
sharded model and optimiser, and whole into a plain one in one process; each process holds the share of the weights
that --dry_run plans."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_speedrun import OPTIONS, model_with
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from gpt2repro import memory_plan, sharded_checkpoint
from gpt2repro.optimization import configure_optimizer
from modeling_gpt2repro import GPT2ReproForCausalLM
from train_helpers import free_port, gloo_worker

BATCH, ROWS_PER_PROCESS = 4, 2  # (B, T) = (4, 16): 2 rows on each of the 2 processes
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, 50257, (BATCH, 17), generator=torch.Generator().manual_seed(1))
    return tokens[:, :-1], tokens[:, 1:]


def adamw(model: torch.nn.Module) -> torch.optim.Optimizer:
    optimizer = configure_optimizer(model, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, device_type="cpu")
    for group in optimizer.param_groups:
        group["lr"] = 1e-3
    return optimizer


def sharded(options: dict, mesh, scramble: bool = False) -> tuple[GPT2ReproForCausalLM, torch.optim.Optimizer]:
    """The tiny model with `options`, each block then the whole model sharded over `mesh`, and its AdamW.
    `scramble`: other weights, for a model that a checkpoint is to restore."""
    model = model_with(options).train()
    if scramble:
        with torch.no_grad():
            for param in model.parameters():
                param.uniform_(-1, 1)
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, adamw(model)


def fsdp_worker(rank: int, port: int, options: dict, folder: Path) -> None:
    with gloo_worker(rank, port):
        mesh = init_device_mesh("cpu", (2,))
        model, optimizer = sharded(options, mesh)
        assert all(isinstance(p, torch.distributed.tensor.DTensor) for p in model.parameters())
        x, y = batch()
        rows = slice(rank * ROWS_PER_PROCESS, (rank + 1) * ROWS_PER_PROCESS)
        loss = model(input_ids=x[rows], shift_labels=y[rows], return_logits=False).loss  # this process's rows
        loss.backward()  # FSDP reduce-scatters the gradients, averaged over the processes
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        grads = {name: p.grad.full_tensor() for name, p in model.named_parameters()}
        optimizer.step()
        sharded_checkpoint.save(folder / "checkpoint", model, [optimizer], with_optimizers=True)
        restored, restored_optimizer = sharded(options, mesh, scramble=True)  # no optimiser state yet
        sharded_checkpoint.load(folder / "checkpoint", restored, [restored_optimizer], with_optimizers=True)
        result = {"loss": mean_loss / 2, "grads": grads, "weights": get_model_state_dict(model, options=FULL),
                  "restored": get_model_state_dict(restored, options=FULL),
                  "optimizer": get_optimizer_state_dict(model, optimizer, options=FULL),
                  "restored_optimizer": get_optimizer_state_dict(restored, restored_optimizer, options=FULL),
                  "local_elements": sum(p.to_local().numel() for p in model.parameters())}
        if rank == 0:
            torch.save(result, folder / "result.pt")


@pytest.mark.parametrize("recipe", ["gpt2", "speedrun"])
def test_sharded_model_trains_and_checkpoints_as_the_whole_one(tmp_path, recipe):
    options = OPTIONS.get(recipe, {})
    mp.start_processes(fsdp_worker, args=(free_port(), options, tmp_path), nprocs=2, start_method="spawn")
    result = torch.load(tmp_path / "result.pt", weights_only=False)

    model = model_with(options).train()
    x, y = batch()
    loss = model(input_ids=x, shift_labels=y, return_logits=False).loss  # the whole batch in one process
    loss.backward()
    torch.testing.assert_close(result["loss"], loss.detach(), rtol=1e-6, atol=0)
    named = dict(model.named_parameters())
    assert result["grads"].keys() == named.keys()  # the tied wte/lm_head once, as in the unsharded model
    for name, param in named.items():
        # summed in another order: each entry within 1e-6 of the gradient's largest (measured up to 6.4e-7, the
        # speedrun's wte on an AVX-512 CPU)
        scale = param.grad.abs().max().item()
        torch.testing.assert_close(result["grads"][name], param.grad, rtol=1e-5, atol=1e-6 * scale, msg=name)
        param.grad = result["grads"][name].clone()  # AdamW's first step divides by |grad|: the same gradients
    adamw(model).step()
    weights = result["weights"]
    if model.config.tie_word_embeddings:  # the full state dict names the tied matrix twice, like the model's own
        assert torch.equal(weights["lm_head.weight"], weights["transformer.wte.weight"])
    for name, value in model.state_dict().items():
        torch.testing.assert_close(weights[name], value, rtol=0, atol=1e-7, msg=name)
    for name, value in weights.items():  # the sharded checkpoint restores every weight exactly
        assert torch.equal(result["restored"][name], value), name
    saved, restored = result["optimizer"]["state"], result["restored_optimizer"]["state"]
    assert saved.keys() == restored.keys() == named.keys()
    for name, moments in saved.items():  # ... and the optimiser state
        assert all(torch.equal(value, restored[name][key]) for key, value in moments.items()), name
    # one process (no process group) reads the 2 processes' shards whole into a plain model and AdamW
    plain = model_with(options)
    plain_optimizer = adamw(plain)
    sharded_checkpoint.load(tmp_path / "checkpoint", plain, [plain_optimizer], with_optimizers=True)
    assert all(torch.equal(value, weights[name]) for name, value in plain.state_dict().items())
    for param_name, param in plain.named_parameters():
        assert all(torch.equal(value, saved[param_name][key]) for key, value in plain_optimizer.state[param].items())
    # rank 0 holds the larger chunk of each parameter's rows: what --dry_run plans under FSDP
    assert result["local_elements"] == sum(memory_plan.fsdp_share(p, 2) for p in model.parameters())
    reloaded = GPT2ReproForCausalLM(model.config)
    reloaded.load_state_dict(weights)  # the full state dict is a plain one: what a hf/ folder is written from
