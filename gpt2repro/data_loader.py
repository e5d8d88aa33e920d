"""The training and validation loaders: a split's token shards (gpt2repro/shards.py) read as one stream, cut into
(x, y) windows, batched for each rank, and read ahead in a background thread.

How the loader cuts a split into training windows (so that nothing is lost):
- The split's shards, in name order, are read as ONE continuous token stream of N tokens, so a window may
  cross a shard boundary and the token after a shard's last token is still a target.
- Window w is stream[w*T : w*T + T + 1] (inputs x = the first T, targets y = the last T); consecutive
  windows overlap by one token, so every token from the second on is a target exactly once. When T does
  not divide N - 1, one last window is aligned to the end of the stream (it overlaps its predecessor)
  so the tail is not dropped: W = ceil((N - 1) / T) windows per epoch.
- The loader walks an endless sequence of windows: epoch after epoch, each epoch all W windows in order,
  or with `shuffle=True` the shards in a random order and the windows of each shard (grouped by the
  shard their nominal start w*T falls in) in a random order, seeded by (seed, epoch) so every epoch
  differs but every run agrees. A step takes the next B * world_size windows of that sequence, rank r
  the r-th block of B, so ranks read disjoint windows and no window is ever skipped, not even at an
  epoch's end (a step may take the last windows of one epoch and the first of the next).
- The whole position is one integer, the index of the next window in that sequence, which is what
  `state_dict()` saves: a resumed run reads exactly the windows an uninterrupted one would.
"""
from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from gpt2repro.shards import ShardFormatError, check_against_manifest, list_shards, open_shard
from gpt2repro.tokenizer import EOT_TOKEN_ID, GPT2_VOCAB_SIZE, IGNORE_INDEX


class TokenStream:
    """The shards of one split read as one continuous memory-mapped stream of tokens.

    Shards are checked against the folder's manifest.json when there is one (see gpt2repro/shards.py), and every
    read is checked to hold ids below `vocab_size`."""

    def __init__(self, data_dir: str | Path, split: str, vocab_size: int = GPT2_VOCAB_SIZE,
                 verify_checksums: bool = False):
        self.paths = list_shards(data_dir, split)
        self.shards = [open_shard(p) for p in self.paths]
        self.vocab_size = vocab_size
        lengths = [len(s) for s in self.shards]
        check_against_manifest(Path(data_dir), self.paths, lengths, verify_checksums)
        self.starts = np.cumsum([0, *lengths], dtype=np.int64)  # shard i holds stream[starts[i]:starts[i+1]]
        self.num_tokens = int(self.starts[-1])

    def read(self, start: int, stop: int) -> np.ndarray:
        """stream[start:stop] (uint16), gathered from as many shards as the range spans."""
        pieces = []
        shard = int(np.searchsorted(self.starts, start, side="right")) - 1
        position = start
        while position < stop:
            end = min(stop, int(self.starts[shard + 1]))
            offset = int(self.starts[shard])
            pieces.append(self.shards[shard][position - offset : end - offset])
            position, shard = end, shard + 1
        tokens = np.concatenate(pieces)
        if tokens.size and int(tokens.max()) >= self.vocab_size:  # one reduction over B x T ids: free next to a step
            self._raise_bad_token(start + int(np.argmax(tokens >= self.vocab_size)))
        return tokens

    def _raise_bad_token(self, position: int) -> None:
        shard = int(np.searchsorted(self.starts, position, side="right")) - 1
        offset = position - int(self.starts[shard])
        raise ShardFormatError(
            f"shard {self.paths[shard]} holds token id {int(self.shards[shard][offset])} at offset {offset}, "
            f"beyond the vocabulary of {self.vocab_size} tokens: the shard is corrupt or was made with another "
            f"tokenizer; re-run prepare_data.py"
        )


def _windows_to_batch(rows: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    windows = np.stack(rows)  # (B, T+1) uint16
    # numpy's astype makes the contiguous int64 copies: torch's .contiguous() of the same strided slices
    # took 5-15 ms per 64x1024 batch on this 2-core CPU, numpy well under 1 ms
    return torch.from_numpy(windows[:, :-1].astype(np.int64)), torch.from_numpy(windows[:, 1:].astype(np.int64))


class ShardedTokenLoader:
    """Endless (x, y) training batches of shape (B, T) from a split's shards, disjoint across ranks.

    See the module docstring for how windows are cut and ordered. `state_dict()` is one JSON-able
    position (plus the settings it depends on, checked on load); resuming with another world size
    or batch size is allowed and continues from the same place in the window sequence.
    """

    def __init__(self, data_dir: str | Path, split: str, batch_size: int, seq_len: int, rank: int = 0,
                 world_size: int = 1, shuffle: bool = False, seed: int = 0, vocab_size: int = GPT2_VOCAB_SIZE,
                 verify_checksums: bool = False):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        self.batch_size, self.seq_len = batch_size, seq_len
        self.rank, self.world_size = rank, world_size
        self.shuffle, self.seed = shuffle, seed
        self.stream = TokenStream(data_dir, split, vocab_size, verify_checksums)
        n, t = self.stream.num_tokens, seq_len
        if n < t + 1:
            raise ShardFormatError(
                f"the '{split}' split of {data_dir} has {n} tokens, fewer than one window of seq_len + 1 = {t + 1}: "
                f"use a shorter sequence length or more data"
            )
        self.windows_per_epoch = -(-(n - 1) // t)  # ceil((N - 1) / T): the last window is end-aligned
        # Windows grouped by the shard their nominal start w*T falls in, for shuffling shard by shard:
        # shard i owns windows first_window[i] .. first_window[i+1]-1.
        self.first_window = np.minimum(-(-self.stream.starts // t), self.windows_per_epoch)
        self.next_window = 0  # index into the endless window sequence of the next window this run takes
        self._epoch_order: tuple[int, np.ndarray] | None = None  # (epoch, window ids in that epoch's order)

    def _window_start(self, window: int) -> int:
        return min(window * self.seq_len, self.stream.num_tokens - self.seq_len - 1)

    def _window_at(self, position: int) -> int:
        """The window id at a position of the endless sequence."""
        epoch, index = divmod(position, self.windows_per_epoch)
        if not self.shuffle:
            return index
        if self._epoch_order is None or self._epoch_order[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            order = [
                rng.permutation(np.arange(self.first_window[s], self.first_window[s + 1]))
                for s in rng.permutation(len(self.stream.shards))
            ]
            self._epoch_order = (epoch, np.concatenate(order))
        return int(self._epoch_order[1][index])

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's next (x, y), both int64 of shape (B, T), y[:, i] being the token after x[:, i]."""
        first = self.next_window + self.rank * self.batch_size
        rows = []
        for position in range(first, first + self.batch_size):
            start = self._window_start(self._window_at(position))
            rows.append(self.stream.read(start, start + self.seq_len + 1))
        self.next_window += self.world_size * self.batch_size  # every rank advances past the whole step
        return _windows_to_batch(rows)

    def state_dict(self) -> dict:
        return {"next_window": self.next_window, "seq_len": self.seq_len, "num_tokens": self.stream.num_tokens,
                "shuffle": self.shuffle, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        changed = [k for k in ("seq_len", "num_tokens", "shuffle", "seed") if state.get(k) != mine[k]]
        if changed:
            saved = {k: state.get(k) for k in changed}
            now = {k: mine[k] for k in changed}
            raise ValueError(
                f"the saved data position was taken with {saved} but this loader has {now}: resume with the same "
                f"data folder, sequence length, shuffle and seed"
            )
        self.next_window = int(state["next_window"])


class BatchPrefetcher:
    """A loader's batches, each read (and pinned, for a GPU) in a background thread while the one before computes.

    Its state is the position after the batches handed out, not after those read ahead, so a checkpoint of it
    resumes exactly where the training left off. A read's error (a corrupt shard) is raised when its batch is taken.
    """

    def __init__(self, loader: ShardedTokenLoader, pin_memory: bool = False):
        self.loader, self.pin_memory = loader, pin_memory
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batch-prefetch")
        self.position = loader.state_dict()
        self.ahead: Future = self.executor.submit(self._read)

    def _read(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.loader.next_batch()
        return (x.pin_memory(), y.pin_memory()) if self.pin_memory else (x, y)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.ahead.result()
        self.position = self.loader.state_dict()  # the reader is idle until the next submit
        self.ahead = self.executor.submit(self._read)
        return batch

    def state_dict(self) -> dict:
        return dict(self.position)

    def load_state_dict(self, state: dict) -> None:
        self.ahead.exception()  # wait for the read ahead, whose batch is dropped
        self.loader.load_state_dict(state)
        self.position = self.loader.state_dict()
        self.ahead = self.executor.submit(self._read)

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)


def validation_batches(data_dir: str | Path, batch_size: int, seq_len: int, num_tokens: int, rank: int = 0,
                       world_size: int = 1, vocab_size: int = GPT2_VOCAB_SIZE,
                       verify_checksums: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches covering exactly the first `num_tokens` tokens of the val split, whatever the world size.

    The prefix is cut into windows of stride T (num_tokens - 1 targets in all; the last window is padded
    with ignored targets). Each step deals B windows to every rank; once the windows run out, ranks get
    filler rows (y = -100 everywhere) so every rank yields the same number of batches, and the union of
    the real windows over all ranks is the same set on 1 or N processes. Callers sum loss * (y != -100)
    counts and all-reduce.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
    stream = TokenStream(data_dir, "val", vocab_size, verify_checksums)
    if not 2 <= num_tokens <= stream.num_tokens:
        raise ValueError(
            f"validation wants {num_tokens} tokens but the val split of {data_dir} has {stream.num_tokens}: "
            f"use a --val_tokens between 2 and {stream.num_tokens}"
        )
    num_windows = -(-(num_tokens - 1) // seq_len)  # ceil: the last window may be partial
    windows_per_step = batch_size * world_size
    for step_start in range(0, num_windows, windows_per_step):
        # filler inputs: their targets are ignored
        x = torch.full((batch_size, seq_len), EOT_TOKEN_ID, dtype=torch.long)
        y = torch.full((batch_size, seq_len), IGNORE_INDEX, dtype=torch.long)
        for row in range(batch_size):
            window = step_start + rank * batch_size + row
            if window >= num_windows:
                break
            start = window * seq_len
            tokens = torch.from_numpy(stream.read(start, min(start + seq_len + 1, num_tokens)).astype(np.int64))
            x[row, : len(tokens) - 1] = tokens[:-1]
            y[row, : len(tokens) - 1] = tokens[1:]
        yield x, y
