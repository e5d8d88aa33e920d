"""Token shards: the on-disk format shared by prepare_data.py (writer) and training (reader).

A data folder holds one or more shards per split. A shard is a flat array of GPT-2 token ids, every
document written as `[50256] + encode_ordinary(text)`, documents running on across shard boundaries:
- `.npy`: numpy's format, uint16, 1-D (build-nanogpt's `{prefix}_val_000000.npy`, `{prefix}_train_000001.npy`, ...);
- `.bin`: llm.c's format, a header of 256 int32 (magic 20240520, version 1, token count, zeros) then uint16 tokens.
A shard belongs to a split when its file name ends in the split's name, optionally followed by `_` and a shard
index (`{prefix}_{split}_{index}`; build-nanogpt's rule, made strict so that neither a prefix like "interval" nor
one like "train_data" names a split), so an existing `edu_fineweb10B` folder or llm.c's `.bin` files
(`fineweb_val_000000.bin`, `tiny_shakespeare_val.bin`) load unchanged.
prepare_data.py numbers its shards from 0 (shard 0 is val) and records them in `manifest.json` (MANIFEST_FORMAT):
source, settings, and each shard's name, token count, sha256 and where in the corpus the next one starts. When a
folder holds one, every shard of a split must be one it describes, with the token count it recorded (always checked:
it is free) and, on request, its sha256; and every token read is checked to be a real token id, so a corrupt or
foreign shard is named with the offset of the bad token.

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

import hashlib
import json
import re
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from gpt2repro.atomic_files import atomic_write
from gpt2repro.tokenizer import EOT_TOKEN_ID, GPT2_VOCAB_SIZE, IGNORE_INDEX

if TYPE_CHECKING:
    import torch

LLMC_MAGIC = 20240520  # llm.c's token-file magic number
LLMC_VERSION = 1  # llm.c's version for uint16 GPT-2 tokens
LLMC_HEADER_INTS = 256  # llm.c's header: 256 int32 = 1024 bytes
LLMC_HEADER_BYTES = LLMC_HEADER_INTS * 4
TOKEN_DTYPE = np.uint16  # GPT-2's 50257 ids fit in 16 bits, halving disk and memory against int32
SHARD_SUFFIXES = (".npy", ".bin")
SPLITS = ("val", "train")  # in prepare_data.py's order: shard 0 is val, the others train
MANIFEST_NAME = "manifest.json"  # written by prepare_data.py beside the shards it made
MANIFEST_FORMAT = "gpt2repro-token-shards/1"
SHARD_RECORD = {"name": str, "tokens": int, "sha256": str}  # what the loader checks a shard against
PREPARED_SHARD_RECORD = {**SHARD_RECORD, "next_document": int, "next_offset": int}  # + where the next shard starts


class ShardFormatError(ValueError):
    """A token shard is missing, corrupt or not in a format the loader reads; the message says how to fix it."""


def shard_name(prefix: str, split: str, index: int, suffix: str = ".npy") -> str:
    """build-nanogpt's naming: shard 0 is `{prefix}_val_000000.npy`, then `{prefix}_train_000001.npy`, ..."""
    return f"{prefix}_{split}_{index:06d}{suffix}"


def split_of(index: int) -> str:
    """The split of prepare_data.py's shard `index`."""
    return SPLITS[0] if index == 0 else SPLITS[1]


def prepared_shard_name(settings: dict, index: int) -> str:
    """The name prepare_data.py gives shard `index` of a preparation with these settings (prefix, format)."""
    return shard_name(settings["prefix"], split_of(index), index, f".{settings['format']}")


def split_name_end(splits: tuple[str, ...] = SPLITS) -> re.Pattern:
    """How a shard's name (less its suffix) puts it in one of `splits`: it ends in the split, at the start of the name
    or after _ - or ., then optionally `_` and the shard's index."""
    return re.compile(rf"(?:^|[_.-])(?:{'|'.join(map(re.escape, splits))})(?:_\d+)?$")


def shard_files(data_dir: Path, splits: tuple[str, ...] = SPLITS) -> list[Path]:
    """The `.npy`/`.bin` files of `data_dir` named as shards of `splits` (by default: every file training would read
    as a shard), in name order (= shard order)."""
    name_end = split_name_end(splits)
    return sorted(p for p in data_dir.iterdir()
                  if p.suffix in SHARD_SUFFIXES and name_end.search(p.stem) and p.is_file())


def list_shards(data_dir: str | Path, split: str) -> list[Path]:
    """The shards of `split` in `data_dir`, in shard order; an error when there are none."""
    data_dir = Path(data_dir)
    command = f"`python prepare_data.py --output_dir {data_dir}`"
    if not data_dir.is_dir():
        raise ShardFormatError(f"data folder {data_dir} does not exist: make it with {command}")
    shards = shard_files(data_dir, (split,))
    if not shards:
        raise ShardFormatError(f"no '{split}' shards (*.npy or *.bin files named like prefix_{split}_000001) in "
                               f"{data_dir}: make them with {command}")
    return shards


def open_shard(path: str | Path) -> np.ndarray:
    """A shard's tokens as a read-only memory-mapped 1-D uint16 array, after checking its format."""
    path = Path(path)
    rewrite_hint = "delete it and re-run prepare_data.py with the same arguments to rewrite it"
    if not path.exists():
        raise ShardFormatError(f"shard {path} does not exist")
    if path.suffix == ".bin":
        return _open_llmc_bin(path, rewrite_hint)
    try:
        tokens = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise ShardFormatError(f"shard {path} is truncated or not a .npy file ({error}): {rewrite_hint}") from None
    if tokens.dtype != TOKEN_DTYPE or tokens.ndim != 1:
        raise ShardFormatError(
            f"shard {path} holds a {tokens.ndim}-D {tokens.dtype} array, expected 1-D uint16 token ids: {rewrite_hint}"
        )
    return tokens


def _open_llmc_bin(path: Path, rewrite_hint: str) -> np.ndarray:
    size = path.stat().st_size
    header = np.fromfile(path, dtype="<i4", count=LLMC_HEADER_INTS)
    if header.size < LLMC_HEADER_INTS:
        raise ShardFormatError(f"shard {path} is {size} bytes, shorter than llm.c's 1024-byte header: {rewrite_hint}")
    magic, version, num_tokens = (int(v) for v in header[:3])
    if magic != LLMC_MAGIC:
        raise ShardFormatError(
            f"shard {path} has magic number {magic}, not llm.c's token-file magic {LLMC_MAGIC} "
            f"(is it a checkpoint or another file?): {rewrite_hint}"
        )
    if version != LLMC_VERSION:
        raise ShardFormatError(
            f"shard {path} is llm.c token-file version {version}; only version {LLMC_VERSION} (uint16 GPT-2 tokens) "
            f"is supported: re-tokenise the data with prepare_data.py"
        )
    expected_size = LLMC_HEADER_BYTES + num_tokens * TOKEN_DTYPE().itemsize
    if size != expected_size:
        raise ShardFormatError(
            f"shard {path} is {size} bytes but its header promises {num_tokens} tokens ({expected_size} bytes): "
            f"{rewrite_hint}"
        )
    return np.memmap(path, dtype="<u2", mode="r", offset=LLMC_HEADER_BYTES, shape=(num_tokens,))


def to_token_array(token_ids) -> np.ndarray:
    """Token ids as uint16, refusing any id that does not fit (a silent wrap-around would corrupt the data)."""
    token_ids = np.asarray(token_ids)
    if token_ids.size and (token_ids.min() < 0 or token_ids.max() >= 2**16):
        bad = int(token_ids.max()) if token_ids.max() >= 2**16 else int(token_ids.min())
        raise ShardFormatError(
            f"token id {bad} does not fit in a uint16 shard (0..65535): shards hold GPT-2 ids (< 50257), "
            f"so the tokens come from another tokenizer"
        )
    return token_ids.astype(TOKEN_DTYPE, copy=False)


def write_shard(path: str | Path, token_ids) -> str:
    """Write a shard atomically (atomic_files.atomic_write) and return its sha256.

    The format follows the suffix (`.npy` or llm.c's `.bin`). An interrupted write leaves no shard that looks whole
    but is not: at most a temporary `.tmp` file, which no loader lists.
    """
    path = Path(path)
    tokens = to_token_array(token_ids)
    if path.suffix not in SHARD_SUFFIXES:
        raise ShardFormatError(f"shard name {path.name} must end in .npy or .bin")
    with atomic_write(path, "wb") as f:
        if path.suffix == ".bin":
            header = np.zeros(LLMC_HEADER_INTS, dtype="<i4")
            header[:3] = (LLMC_MAGIC, LLMC_VERSION, tokens.size)
            f.write(header.tobytes())
            f.write(tokens.astype("<u2", copy=False).tobytes())
        else:
            np.save(f, tokens)
    return file_sha256(path)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):  # 16 MB reads
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(path: Path, strict: bool = True) -> dict:
    """prepare_data.py's manifest at `path`, or a ShardFormatError saying what is wrong with it. `strict` (a resume
    after the recorded shards): its format, every record as prepare_data.py writes them; else (training) a record of
    each shard's name, token count and sha256 is enough, so a hand-made manifest does."""
    fix = ("delete it and the shards to start over" if strict
           else "re-run prepare_data.py, or remove it to train on the shards unchecked")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ShardFormatError(f"{path} is unreadable ({error}): {fix}") from None
    if strict and (not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT):
        raise ShardFormatError(f"{path} is not a manifest of prepare_data.py (format {MANIFEST_FORMAT}): "
                               f"choose another --output_dir")
    if not lists_shards_as_written(manifest, strict):
        raise ShardFormatError(f"{path} is damaged (its shards are not listed as prepare_data.py lists them): {fix}")
    return manifest


def lists_shards_as_written(manifest, strict: bool) -> bool:
    """Whether `manifest` records its shards with the keys and types the loader needs, or (`strict`) exactly as
    prepare_data.py writes them: every key, the names its settings give, a finished run's total."""
    shards = manifest.get("shards") if isinstance(manifest, dict) else None
    record = PREPARED_SHARD_RECORD if strict else SHARD_RECORD
    if not isinstance(shards, list) or not all(has_types(shard, record) for shard in shards):
        return False
    if not strict:
        return True
    total = {"total_tokens": int} if manifest.get("complete") else {}  # written with complete=True
    settings = manifest.get("settings")
    if not (has_types(manifest, {"complete": bool, **total}) and has_types(settings, {"prefix": str, "format": str})):
        return False
    return all(shard["name"] == prepared_shard_name(settings, i) for i, shard in enumerate(shards))


def has_types(record, types: dict[str, type]) -> bool:
    return isinstance(record, dict) and all(isinstance(record.get(key), kind) for key, kind in types.items())


class TokenStream:
    """The shards of one split read as one continuous memory-mapped stream of tokens.

    Shards are checked against the folder's manifest.json when there is one (see the module docstring), and every
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


def check_against_manifest(data_dir: Path, paths: list[Path], lengths: list[int], verify_checksums: bool) -> None:
    """Refuse shards that prepare_data.py's manifest does not describe, or whose token count (or, when asked, sha256)
    differs from what it recorded. Folders without a manifest (build-nanogpt's, llm.c's) are read as they are."""
    manifest_path = data_dir / MANIFEST_NAME
    if not manifest_path.is_file():
        return
    recorded = {shard["name"]: shard for shard in read_manifest(manifest_path, strict=False)["shards"]}
    for path, length in zip(paths, lengths, strict=True):
        shard = recorded.get(path.name)
        if shard is None:
            raise ShardFormatError(f"shard {path} is not in {manifest_path}: the folder mixes shards of another "
                                   f"preparation; move it out or re-run prepare_data.py into an empty folder")
        if length != shard["tokens"]:
            raise ShardFormatError(f"shard {path} holds {length} tokens but {manifest_path} recorded "
                                   f"{shard['tokens']}: it changed after preparation; re-run prepare_data.py with the "
                                   f"same arguments")
        if verify_checksums and file_sha256(path) != shard["sha256"]:
            raise ShardFormatError(f"shard {path} does not match the sha256 in {manifest_path}: it changed after "
                                   f"preparation; re-run prepare_data.py with the same arguments")


def _windows_to_batch(rows: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    import torch  # here, not at the top: prepare_data.py writes shards without torch, and importing it costs 2-4 s

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
    import torch  # see _windows_to_batch

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
