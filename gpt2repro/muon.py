"""Muon as the speedrun records run it: torch.optim.Muon's update, with fused matrices orthogonalised per part and the
orthogonalisation shared out among the processes.

torch.optim.Muon orthogonalises every parameter whole, on every process. Two things differ in the records
(modded-nanogpt) and here:
- A fused (3C, C) attention projection holds q, k and v: each C x C part is orthogonalised on its own, with its own
  LR scale sqrt(max(1, rows / cols)) = 1, where torch's Muon mixes the three and scales by sqrt(3).
- With N processes each matrix has an owner (round-robin, largest first); the owner alone runs Newton-Schulz and
  updates the weight, which is then broadcast to the others, so the Newton-Schulz work per process is ~1/N. The
  gradients are the same on every process after DDP's all-reduce, so by default the momentum buffers (cheap,
  elementwise) are kept on all of them and stay equal. With `shard_state` (--shard_optimizer) only the owner keeps a
  matrix's buffer, ~1/N of the state per process, as ZeRO-1 does for AdamW; the weights are the same bits either way.
  A run's checkpoint holds the buffers by matrix name, each written by a process that keeps it
  (gpt2repro.sharded_checkpoint), so a run resumes on any number of processes, with or without sharding;
  `state_dict()` is the whole state all the same (gathered on rank 0). (Its parameter groups differ from torch's
  Muon's, so a speedrun checkpoint written with torch.optim.Muon, before 2026-12-03, does not resume; its hf/ model
  folder loads as ever.)
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.optim._muon import _adjust_lr, _zeropower_via_newtonschulz


def owners(sizes: list[int], world_size: int) -> list[int]:
    """The process that owns each of the matrices of `sizes` (their numbers of elements, in the optimiser's order):
    round-robin over them sorted by size, largest first, so that each process gets about the same work."""
    owner = [0] * len(sizes)
    for n, i in enumerate(sorted(range(len(sizes)), key=lambda i: (-sizes[i], i))):
        owner[i] = n % world_size
    return owner


class Muon(torch.optim.Muon):
    """torch.optim.Muon with more options: per parameter group `parts` (the number of equal row blocks a matrix is
    orthogonalised in; 1 = whole, as torch's); for the whole optimiser `shard` (share the Newton-Schulz work among
    the processes of torch.distributed's default group, when there is one) and `shard_state` (with `shard`: keep
    each momentum buffer on its owner only)."""

    def __init__(self, params, *args, shard: bool = True, shard_state: bool = False, **kwargs):
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
        self.shard_state = shard_state and self.world_size > 1
        if self.shard_state and len(self.owners()) < self.world_size:
            raise ValueError(f"{len(self.owners())} matrices cannot be shared among {self.world_size} processes")

    def owners(self) -> list[int]:
        """The process that orthogonalises each matrix, in the order of the groups' params; the same on every
        process."""
        return owners([p.numel() for group in self.param_groups for p in group["params"]], self.world_size)

    def owned(self) -> list[tuple[torch.Tensor, int]]:
        """(matrix, owner) for every matrix, in the order of the groups' params."""
        return list(zip((p for group in self.param_groups for p in group["params"]), self.owners(), strict=True))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        owner_of = iter(self.owners())
        broadcasts = []  # (matrix, its owner), in the same order on every process
        for group in self.param_groups:
            lr, weight_decay, momentum, parts = group["lr"], group["weight_decay"], group["momentum"], group["parts"]
            for p in group["params"]:
                owner = next(owner_of)
                if p.grad is None:
                    continue
                if self.world_size > 1:
                    broadcasts.append((p, owner))
                if self.shard_state and owner != self.rank:  # its buffer lives on its owner only
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                buffer = state["momentum_buffer"]
                buffer.lerp_(p.grad, 1 - momentum)  # on every process that keeps it: the buffers stay equal
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

    def state_dict(self) -> dict[str, Any]:
        """The whole state, as an unsharded Muon's. With `shard_state` a collective (every process calls it, as
        Accelerate's prepare() does): rank 0 receives each buffer from its owner and returns the whole state; the
        others return the groups without a state (only rank 0's is written)."""
        if not self.shard_state:
            return super().state_dict()
        gathered = []  # buffers received for this call only: host or device memory the size of the whole state
        stepped = bool(self.state)  # the same on every process: each owns a matrix, and all step together
        for p, owner in self.owned():
            if owner == 0 or not stepped:
                continue
            if self.rank == owner:
                dist.send(self.state[p]["momentum_buffer"], dst=0)
            elif self.rank == 0:
                buffer = torch.empty_like(p)
                dist.recv(buffer, src=owner)
                self.state[p]["momentum_buffer"] = buffer
                gathered.append(p)
        if self.rank != 0:
            return {"state": {}, "param_groups": super().state_dict()["param_groups"]}
        whole = super().state_dict()
        for p in gathered:
            del self.state[p]
        return whole

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a whole state (any world size, sharded or not); with `shard_state` keep this process's share."""
        super().load_state_dict(state_dict)
        if self.shard_state:
            for p, owner in self.owned():
                if owner != self.rank:
                    self.state.pop(p, None)
