"""muon.Muon against torch.optim.Muon: whole matrices give the same bits, a matrix cut in parts equals torch's Muon on
each part alone, and sharding the work over 2 gloo processes changes no bit."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from muon import Muon
from train_helpers import free_port

SHAPES = [(96, 32), (32, 32), (128, 32), (32, 128), (48, 16)]  # the first one fused q|k|v of width 32


def matrices(seed: int = 0) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in SHAPES]


def set_gradients(params: list[torch.Tensor], step: int) -> None:
    generator = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator)


def train(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], steps: int = 3) -> None:
    for step in range(steps):
        set_gradients(params, step)
        optimizer.step()


def test_whole_matrices_equal_torch_muon_bit_for_bit():
    ours, theirs = matrices(), matrices()
    train(Muon(ours, lr=0.05, weight_decay=0.1, momentum=0.9), ours)
    train(torch.optim.Muon(theirs, lr=0.05, weight_decay=0.1, momentum=0.9), theirs)
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b)


def test_a_fused_matrix_in_parts_equals_torch_muon_on_each_part():
    ours = matrices()
    train(Muon([{"params": ours[:1], "parts": 3}, {"params": ours[1:]}], lr=0.05, weight_decay=0.1), ours)
    whole = matrices()
    parts = [torch.nn.Parameter(part.detach().clone()) for part in whole[0].chunk(3)]  # q, k, v: (32, 32) each
    reference = parts + whole[1:]
    optimizer = torch.optim.Muon(reference, lr=0.05, weight_decay=0.1)
    for step in range(3):
        set_gradients(whole, step)  # the same random gradients, the fused one cut into q, k, v
        for part, grad in zip(parts, whole[0].grad.chunk(3), strict=True):
            part.grad = grad.clone()
        for p, q in zip(whole[1:], reference[3:], strict=True):
            q.grad = p.grad
        optimizer.step()
    assert torch.equal(ours[0], torch.cat([p.detach() for p in parts]))
    for a, b in zip(ours[1:], reference[3:], strict=True):
        assert torch.equal(a, b)
    # torch's Muon on the fused matrix scales its LR by sqrt(3) and mixes q, k and v: a different update
    fused = matrices()
    train(torch.optim.Muon(fused, lr=0.05, weight_decay=0.1), fused)
    assert not torch.allclose(fused[0], ours[0], atol=1e-3)


def test_parts_must_divide_the_rows():
    with pytest.raises(ValueError, match=r"a \(48, 16\) matrix cannot be cut into 5 equal row blocks"):
        Muon([{"params": matrices()[4:], "parts": 5}])


def sharded_worker(rank: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        params = matrices()
        optimizer = Muon([{"params": params[:1], "parts": 3}, {"params": params[1:]}], lr=0.05, weight_decay=0.1)
        owners = optimizer.owners()
        train(optimizer, params)
        queue.put((rank, owners, [p.detach().numpy().copy() for p in params]))  # plain arrays: the worker exits
    finally:
        dist.destroy_process_group()


def test_two_processes_share_the_work_and_end_with_the_same_bits():
    single = matrices()
    train(Muon([{"params": single[:1], "parts": 3}, {"params": single[1:]}], lr=0.05, weight_decay=0.1), single)
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    workers = mp.start_processes(sharded_worker, args=(free_port(), queue), nprocs=2, join=False,
                                 start_method="spawn")
    results = {rank: (owners, params) for rank, owners, params in (queue.get(), queue.get())}  # before the join:
    while not workers.join():  # a worker's put waits for the pipe to be read
        pass
    owners = results[0][0]
    assert owners == results[1][0] and sorted(owners) == [0, 0, 0, 1, 1]  # round-robin, largest first
    assert owners[2] == 0 and owners[3] == 1  # the two (128, 32)-sized matrices go one to each process
    for rank in (0, 1):
        for a, b in zip(results[rank][1], single, strict=True):
            assert torch.equal(torch.from_numpy(a), b)
