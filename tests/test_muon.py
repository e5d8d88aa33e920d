"""muon.Muon against torch.optim.Muon: whole matrices give the same bits, a matrix cut in parts equals torch's Muon on
each part alone, and sharding the work over 2 gloo processes changes no bit."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gpt2repro.muon import Muon
from train_helpers import free_port, gloo_worker

SHAPES = [(96, 32), (32, 32), (128, 32), (32, 128), (48, 16)]  # the first one fused q|k|v of width 32


def matrices(seed: int = 0) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in SHAPES]


def set_gradients(params: list[torch.Tensor], step: int) -> None:
    generator = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator)


def train(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], steps: int = 3, first: int = 0) -> None:
    for step in range(first, first + steps):
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


def muon(params: list[torch.nn.Parameter], shard_state: bool = False) -> Muon:
    return Muon([{"params": params[:1], "parts": 3}, {"params": params[1:]}], lr=0.05, weight_decay=0.1,
                shard_state=shard_state)


def sharded_worker(rank: int, port: int, queue, shard_state: bool) -> None:
    """3 steps, the whole state gathered (as a checkpoint is written), then 2 more steps of an optimiser that loads
    it (as every process of a resumed run does)."""
    with gloo_worker(rank, port):
        params = matrices()
        optimizer = muon(params, shard_state)
        train(optimizer, params)
        held = [i for i, p in enumerate(params) if p in optimizer.state]
        whole = optimizer.state_dict()  # a collective: every process calls it
        gathered = {i: s["momentum_buffer"].numpy().copy() for i, s in whole["state"].items()}  # plain arrays: the
        shared = [whole]  # worker exits; rank 0's is the file every process loads on resume
        dist.broadcast_object_list(shared, src=0)
        resumed = muon(params, shard_state)
        resumed.load_state_dict(shared[0])
        held_on_resume = [i for i, p in enumerate(params) if p in resumed.state]
        train(resumed, params, steps=2, first=3)
        queue.put((rank, optimizer.owners(), held, held_on_resume, gathered,
                   [p.detach().numpy().copy() for p in params]))


@pytest.mark.parametrize("shard_state", [False, True], ids=["momentum_everywhere", "momentum_sharded"])
def test_two_processes_share_the_work_and_end_with_the_same_bits(shard_state):
    """2 processes end with the weights of 1, bit for bit, and their checkpointed state is the whole state of 1; with
    `shard_state` each keeps the momentum of the matrices it owns only, after a step and after a resume."""
    single = matrices()
    optimizer = muon(single)
    train(optimizer, single)
    reference_state = {i: s["momentum_buffer"].clone() for i, s in optimizer.state_dict()["state"].items()}
    train(optimizer, single, steps=2, first=3)
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    workers = mp.start_processes(sharded_worker, args=(free_port(), queue, shard_state), nprocs=2, join=False,
                                 start_method="spawn")
    results = {result[0]: result[1:] for result in (queue.get(), queue.get())}  # before the join: a worker's put
    while not workers.join():  # waits for the pipe to be read
        pass
    owners = results[0][0]
    assert owners == results[1][0] and sorted(owners) == [0, 0, 0, 1, 1]  # round-robin, largest first
    assert owners[2] == 0 and owners[3] == 1  # the two (128, 32)-sized matrices go one to each process
    for rank in (0, 1):
        _, held, held_on_resume, _, params = results[rank]
        expected = [i for i, owner in enumerate(owners) if owner == rank] if shard_state else list(range(len(owners)))
        assert held == expected and held_on_resume == expected
        for a, b in zip(params, single, strict=True):
            assert torch.equal(torch.from_numpy(a), b)
    gathered = results[0][3]
    assert gathered.keys() == reference_state.keys()
    for i, buffer in reference_state.items():
        assert torch.equal(torch.from_numpy(gathered[i]), buffer), i
