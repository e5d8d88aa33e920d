"""Turning a corpus into GPT-2 token shards (build-nanogpt's fineweb.py, resumable): prepare_data.py's library.

The corpus (gpt2repro/corpus.py) is tokenised on `num_proc` worker processes (gpt2repro/tokenizing_workers.py) and
its token stream cut into shards, the val shard first, each written under a temporary name and renamed (the format:
gpt2repro/shards.py). `manifest.json` records the source, tokenizer, settings, and each shard's token count, sha256
and where in the corpus the next shard starts, and is updated after each shard, so that a preparation started again
after an interruption verifies the finished shards, skips them, and writes the rest: the result is identical to an
uninterrupted run. Training reads every shard of a folder, so a folder holding shards that this preparation's
manifest does not describe (another corpus's, or any without a manifest) is refused rather than mixed in.

    prepare_shards(PrepareSettings(output_dir=Path("data/mine"), dataset=None, data_files=("corpus/a.jsonl",),
                                   prefix="corpus", shard_size=10**8, val_tokens=10**8))
    prepare_embedded_corpus(Path("data/kjv"))   # what `python prepare_data.py` prepares
"""
from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm  # not tqdm.auto: a command-line tool, and tqdm.auto's asyncio import adds ~0.1 s to start-up

from gpt2repro.atomic_files import write_json_atomic
from gpt2repro.cli import CommandError, check_writable_folder
from gpt2repro.corpus import Task, data_files_corpus, embedded_corpus, fineweb_edu_corpus, given_texts, skip_documents
from gpt2repro.shards import (
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    file_sha256,
    prepared_shard_name,
    read_manifest,
    shard_files,
    write_shard,
)
from gpt2repro.tokenizer import get_tiktoken_encoding
from gpt2repro.tokenizing_workers import StopBetweenTasks, available_cores, tokenize

TOKENIZER_DESCRIPTION = "GPT-2 BPE (tiktoken encode_ordinary, <|endoftext|>=50256 before each document)"
SOURCE_DEFAULTS = {
    # source: (prefix, shard_size, val_tokens; None = one shard)
    "fineweb-edu": ("edufineweb", 10**8, None),  # build-nanogpt: 1e8-token shards (200 MB), shard 0 is val
    "embedded": ("kjv", 2**18, 2**16),  # ~1M tokens -> 1 val shard of 65,536 + 4 train shards of <= 262,144
    "data_files": ("corpus", 10**8, None),
}
MAX_SHARDS = 10**6  # the index has 6 digits, and the loader orders shards by name: a 7th digit would sort wrongly


@dataclass(frozen=True, kw_only=True)
class PrepareSettings:
    """One preparation, field by field the flags of prepare_data.py, whose defaults these are (the source's own
    prefix, shard size and val tokens are in SOURCE_DEFAULTS). Messages name the fields as flags (--shard_size)."""

    output_dir: Path
    dataset: str | None  # "embedded" or "fineweb-edu"; None: the corpus is `data_files`
    prefix: str  # shards are PREFIX_val_000000.npy, PREFIX_train_000001.npy, ...
    shard_size: int  # tokens per train shard
    val_tokens: int  # tokens in the val shard, the first shard
    data_files: tuple[str, ...] = ()  # .txt, .json/.jsonl or .parquet files; globs allowed
    fineweb_config: str = "sample-10BT"
    text_column: str = "text"  # of json, parquet and fineweb-edu
    max_tokens: int | None = None  # None: the whole corpus
    format: str = "npy"  # or "bin", llm.c's token files
    num_proc: int = field(default_factory=available_cores)  # tokeniser processes

    def manifest_settings(self) -> dict:
        """What the manifest records of these settings: a re-run resumes only with the same."""
        return {"prefix": self.prefix, "shard_size": self.shard_size, "val_tokens": self.val_tokens,
                "max_tokens": self.max_tokens, "format": self.format}


@dataclass(frozen=True)
class TokenisingRun:
    """What one `write_shards` read and wrote: documents and UTF-8 bytes read, tokens put into shards, seconds."""

    documents: int
    num_bytes: int
    tokens: int
    seconds: float


# ---- shards and manifest ---------------------------------------------------------------------------------------------


class ShardWriter:
    """Cuts the token stream into shards (val first), writes each atomically and records it in the manifest."""

    def __init__(self, output_dir: Path, manifest: dict):
        self.output_dir, self.manifest = output_dir, manifest
        settings = manifest["settings"]
        self.shard_size, self.val_tokens = settings["shard_size"], settings["val_tokens"]
        self.max_tokens = settings["max_tokens"]
        self.tokens_written = sum(s["tokens"] for s in manifest["shards"])
        self.buffer = self._new_buffer(len(manifest["shards"]))
        self.filled = 0

    def _new_buffer(self, index: int) -> np.ndarray:
        """The buffer of shard `index`, as large as the shard."""
        size = self.val_tokens if index == 0 else self.shard_size
        try:
            return np.empty(size, dtype=np.uint16)
        except MemoryError:
            raise CommandError(f"a shard of {size:,} tokens needs {size * 2 / 2**30:,.1f} GiB of memory, more than "
                               f"there is: lower --shard_size or --val_tokens") from None

    @property
    def tokens_taken(self) -> int:
        """Tokens in finished shards and in the buffer."""
        return self.tokens_written + self.filled

    @property
    def done(self) -> bool:
        return self.max_tokens is not None and self.tokens_taken >= self.max_tokens

    def add(self, tokens: np.ndarray, lengths: np.ndarray, first_document: int, first_offset: int) -> int:
        """Append the tokens of documents first_document, ..., except the first `first_offset`, already in a shard.

        Returns how many of the documents went (wholly or partly) into shards: all, unless --max_tokens was reached.
        """
        doc_ends = np.cumsum(lengths)  # token positions counted from the start of document first_document
        position = first_offset
        while position < doc_ends[-1] and not self.done:
            take = min(len(self.buffer) - self.filled, int(doc_ends[-1]) - position)
            if self.max_tokens is not None:
                take = min(take, self.max_tokens - self.tokens_taken)
            self.buffer[self.filled : self.filled + take] = tokens[position : position + take]
            self.filled += take
            position += take
            if self.filled == len(self.buffer):
                document = int(np.searchsorted(doc_ends, position, side="right"))
                offset = position - (int(doc_ends[document - 1]) if document else 0)
                self.flush(first_document + document, offset)
        return int(np.searchsorted(doc_ends - lengths, position, side="left"))  # documents starting before `position`

    def flush(self, next_document: int, next_offset: int) -> None:
        """Write the buffer as the next shard; (next_document, next_offset) is where the following shard starts."""
        if self.filled == 0:
            return
        index = len(self.manifest["shards"])
        if index == MAX_SHARDS:
            raise CommandError(f"the corpus needs more than {MAX_SHARDS:,} shards, whose names would not sort in "
                               f"order: start again in an empty --output_dir with a larger --shard_size")
        name = prepared_shard_name(self.manifest["settings"], index)
        if index == 0:  # a manifest first, so that a run stopped just after writing the shard resumes (re-runs refuse
            write_manifest(self.output_dir, self.manifest)  # shards that no manifest describes: they may be anyone's)
        try:
            checksum = write_shard(self.output_dir / name, self.buffer[: self.filled])
        except OSError as error:
            raise write_error(self.output_dir / name, error) from None
        self.manifest["shards"].append(
            {"name": name, "tokens": self.filled, "sha256": checksum, "next_document": next_document,
             "next_offset": next_offset}
        )
        write_manifest(self.output_dir, self.manifest)
        self.tokens_written += self.filled
        self.buffer = self._new_buffer(index + 1)
        self.filled = 0


def write_error(path: Path, error: OSError) -> CommandError:
    return CommandError(f"could not write {path}: {error.strerror or error}: make room (or fix the folder) and "
                        f"re-run the same command, which resumes after the last finished shard")


def write_manifest(output_dir: Path, manifest: dict) -> None:
    try:
        write_json_atomic(output_dir / MANIFEST_NAME, manifest)
    except OSError as error:
        raise write_error(output_dir / MANIFEST_NAME, error) from None


def verified_shards(output_dir: Path, manifest: dict) -> list[dict]:
    """The manifest's shards up to the first one that is missing or whose checksum does not match."""
    good = []
    for shard in tqdm(manifest["shards"], desc="verifying finished shards", unit="shard", leave=False):
        path = output_dir / shard["name"]
        if not path.is_file() or file_sha256(path) != shard["sha256"]:
            break
        good.append(shard)
    return good


def start_manifest(output_dir: Path, source: dict, settings: dict) -> dict:
    """A fresh manifest, or the one of an earlier run with the same settings, trimmed to its verified shards.

    Refused when the folder holds shards that training would read with these but that are not this preparation's."""
    path = output_dir / MANIFEST_NAME
    manifest = read_manifest(path) if path.exists() else None
    if manifest is not None and (manifest.get("source") != source or manifest["settings"] != settings):
        raise CommandError(f"{output_dir} holds shards made with other settings ({manifest.get('source')}, "
                           f"{manifest.get('settings')}): re-run with those, or choose another --output_dir")
    own = set() if manifest is None else {shard["name"] for shard in manifest["shards"]}
    if manifest is not None and not manifest["complete"]:  # a stop may have come between a shard and its record
        own.add(prepared_shard_name(settings, len(own)))
    stray = [p.name for p in shard_files(output_dir) if p.name not in own]
    if stray:
        more = f" and {len(stray) - 1} more" if len(stray) > 1 else ""
        why = (f"and no {MANIFEST_NAME}: they would be read with the new shards in training" if manifest is None else
               f"that its {MANIFEST_NAME} does not describe (of another preparation): training would mix them in")
        raise CommandError(f"{output_dir} already holds shards ({stray[0]}{more}) {why}; move them out or choose "
                           f"another --output_dir")
    if manifest is None:
        return {"format": MANIFEST_FORMAT, "source": source, "tokenizer": TOKENIZER_DESCRIPTION, "settings": settings,
                "shards": [], "complete": False}
    shards = verified_shards(output_dir, manifest)
    if len(shards) < len(manifest["shards"]):
        manifest["complete"] = False
    manifest["shards"] = shards
    return manifest


# ---- a preparation ---------------------------------------------------------------------------------------------------


def open_source(settings: PrepareSettings) -> tuple[dict, Iterator[Task]]:
    """(the source's description for the manifest, its tasks)."""
    if settings.dataset == "embedded":
        return embedded_corpus()
    if settings.dataset == "fineweb-edu":
        return fineweb_edu_corpus(settings.fineweb_config, settings.text_column)
    return data_files_corpus(list(settings.data_files), settings.text_column)


class ShardPreparation:
    """A preparation begun: its corpus opened, its folder checked (before any tokenising) and its manifest made, or
    read back with the finished shards verified. `manifest["complete"]` says whether shards remain to be written."""

    def __init__(self, settings: PrepareSettings):
        self.settings = settings
        source, self.tasks = open_source(settings)
        check_writable_folder(settings.output_dir, "--output_dir")
        self.manifest = start_manifest(settings.output_dir, source, settings.manifest_settings())
        finished = self.manifest["shards"]
        # where the corpus continues: the document (and the tokens into it) after the last finished shard
        self.next_document = finished[-1]["next_document"] if finished else 0
        self.next_offset = finished[-1]["next_offset"] if finished else 0

    def write_shards(self) -> TokenisingRun:
        """Tokenise the corpus from `next_document` on, write the shards still missing and complete the manifest."""
        settings, manifest = self.settings, self.manifest
        tasks = skip_documents(self.tasks, self.next_document)
        first = next(tasks, None)  # read here, so that unreadable input fails before the progress bar starts
        tasks = itertools.chain([Task(given_texts, first.read(first.items))] if first else [], tasks)
        writer = ShardWriter(settings.output_dir, manifest)
        get_tiktoken_encoding()  # built (~1 s) before the clock starts: the rates below are tokenising throughput
        documents, next_offset = self.next_document, self.next_offset
        num_bytes, num_tokens, start_time = 0, 0, time.time()
        # `with`: the bar is closed (its line ended) also when an error or Ctrl-C stops the run, so the message after
        # it is a line of its own
        # `closing`: the pool ends here, not whenever the suspended generator is collected
        with tqdm(desc=f"tokenising ({settings.num_proc} proc)", unit="tok", unit_scale=True,
                  total=settings.max_tokens, initial=writer.tokens_written) as progress, \
                StopBetweenTasks() as ctrl_c, contextlib.closing(tokenize(tasks, settings.num_proc)) as encoded_tasks:
            for tokens, lengths, task_bytes in encoded_tasks:
                ctrl_c.check()
                tokens_before = writer.tokens_taken
                documents += writer.add(tokens, lengths, documents, next_offset)
                progress.update(writer.tokens_taken - tokens_before)
                num_tokens += writer.tokens_taken - tokens_before
                num_bytes += task_bytes
                next_offset = 0
                elapsed = max(time.time() - start_time, 1e-9)
                progress.set_postfix_str(f"{(documents - self.next_document) / elapsed:,.0f} docs/s, "
                                         f"{num_bytes / elapsed / 1e6:.1f} MB/s", refresh=False)
                if writer.done:
                    break
        if writer.tokens_taken <= settings.val_tokens:
            raise CommandError(f"the corpus gave {writer.tokens_taken:,} tokens, not more than --val_tokens "
                               f"{settings.val_tokens:,}: lower --val_tokens so that some tokens are left for training")
        writer.flush(documents, 0)
        elapsed = time.time() - start_time
        manifest.update(complete=True, total_tokens=writer.tokens_written, documents=documents)
        write_manifest(settings.output_dir, manifest)
        return TokenisingRun(documents=documents - self.next_document, num_bytes=num_bytes, tokens=num_tokens,
                             seconds=elapsed)


def prepare_shards(settings: PrepareSettings) -> dict:
    """Prepare the shards of `settings` (resuming an interrupted preparation, verifying a complete one) and return
    their manifest."""
    preparation = ShardPreparation(settings)
    if not preparation.manifest["complete"]:
        preparation.write_shards()
    return preparation.manifest


def prepare_embedded_corpus(output_dir: Path) -> dict:
    """The embedded corpus (the King James Bible) in `output_dir` as `prepare_data.py --dataset embedded
    --output_dir OUTPUT_DIR` prepares it, and its manifest: 1,189 documents, ~1M tokens, 1 val + 4 train shards."""
    prefix, shard_size, val_tokens = SOURCE_DEFAULTS["embedded"]
    return prepare_shards(PrepareSettings(output_dir=output_dir, dataset="embedded", prefix=prefix,
                                          shard_size=shard_size, val_tokens=val_tokens))
