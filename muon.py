"""Muon as the speedrun records run it: torch.optim.Muon's update, with fused matrices orthogonalised per part and the
orthogonalisation shared out among the processes.

torch.optim.Muon orthogonalises every parameter whole, on every process. Two things differ in the records
(modded-nanogpt) and here:
- A fused (3C, C) attention projection holds q, k and v: each C x C part is orthogonalised on its own, with its own
  LR scale sqrt(max(1, rows / cols)) = 1, where torch's Muon mixes the three and scales by sqrt(3).
- With N processes each matrix has an owner (round-robin, largest first); the owner alone runs Newton-Schulz and
  updates the weight, which is then broadcast to the others, so the Newton-Schulz work per process is ~1/N. The
  gradients are the same on every process after DDP's all-reduce, so the momentum buffers (cheap, elementwise) are
  kept on all of them and stay equal: checkpoints and resume need nothing new. (Its parameter groups differ from
  torch's Muon's, so a speedrun checkpoint written with torch.optim.Muon, before 2026-12-03, does not resume; its hf/
  model folder loads as ever.)
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.optim._muon import _adjust_lr, _zeropower_via_newtonschulz


class Muon(torch.optim.Muon):
    """torch.optim.Muon with two more options per parameter group: `parts` (the number of equal row blocks a matrix is
    orthogonalised in; 1 = whole, as torch's) and, for the whole optimiser, `shard` (share the Newton-Schulz work among
    the processes of torch.distributed's default group, when there is one)."""

    def __init__(self, params, *args, shard: bool = True, **kwargs):
        super().__init__(params, *args, **kwargs)
        self.defaults["parts"] = 1
        for group in self.param_groups:
            group.setdefault("parts", 1)
            for p in group["params"]:
                if p.shape[0] % group["parts"]:
                    raise ValueError(f"a ({p.shape[0]}, {p.shape[1]}) matrix cannot be cut into {group['parts']} "
                                     f"equal row blocks")
        distributed = shard and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.world_size, self.rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)

    def owners(self) -> list[int]:
        """The process that orthogonalises each matrix (in the order of the groups' params): round-robin over them
        sorted by size, largest first, so that each process gets about the same work; the same on every process."""
        params = [p for group in self.param_groups for p in group["params"]]
        owners = [0] * len(params)
        for n, i in enumerate(sorted(range(len(params)), key=lambda i: (-params[i].numel(), i))):
            owners[i] = n % self.world_size
        return owners

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        owners = iter(self.owners())
        broadcasts = []  # (matrix, its owner), in the same order on every process
        for group in self.param_groups:
            lr, weight_decay, momentum, parts = group["lr"], group["weight_decay"], group["momentum"], group["parts"]
            for p in group["params"]:
                owner = next(owners)
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                buffer = state["momentum_buffer"]
                buffer.lerp_(p.grad, 1 - momentum)  # on every process: the buffers stay equal
                if self.world_size > 1:
                    broadcasts.append((p, owner))
                if owner != self.rank:
                    continue
                update = p.grad.lerp(buffer, momentum) if group["nesterov"] else buffer
                p.mul_(1 - lr * weight_decay)
                for block, block_update in zip(p.chunk(parts), update.chunk(parts), strict=True):  # views of p
                    ortho = _zeropower_via_newtonschulz(block_update, group["ns_coefficients"], group["ns_steps"],
                                                        group["eps"])
                    block.add_(ortho, alpha=-_adjust_lr(lr, group["adjust_lr_fn"], block.shape))
        # The owner of each matrix sends it, the others receive it; all are in flight at once.
        for work in [dist.broadcast(p, src=owner, async_op=True) for p, owner in broadcasts]:
            work.wait()
        return loss
