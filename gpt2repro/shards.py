"""Token shards: the on-disk format shared by prepare_data.py (writer: gpt2repro/shard_writing.py) and training
(reader: gpt2repro/data_loader.py), their names, and the checks of a folder's shards against its manifest.

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
it is free) and, on request, its sha256; and every token read (data_loader.TokenStream) is checked to be a real
token id, so a corrupt or foreign shard is named with the offset of the bad token.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np

from gpt2repro.atomic_files import atomic_write

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
