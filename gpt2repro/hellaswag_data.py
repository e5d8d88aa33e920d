"""HellaSwag's examples: found, downloaded once, read and checked, and rendered as text in either scoring style.

The data comes from a local file (jsonl or parquet, in the original rowanz schema or the Hub's), the original jsonl
cached from an earlier download, the Hub dataset `Rowan/hellaswag` through `datasets`, or the original jsonl
downloaded from GitHub; every record is checked and normalised to one schema (`normalize_example`).
"""
from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm.auto import tqdm

from gpt2repro.atomic_files import atomic_write
from gpt2repro.cli import CommandError, first_line

if TYPE_CHECKING:
    from accelerate import Accelerator

HUB_DATASET = "Rowan/hellaswag"
ORIGINAL_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_{split}.jsonl"
ORIGINAL_SPLIT_NAMES = {"train": "train", "validation": "val", "test": "test"}  # the Hub's names -> the files'
NUM_ENDINGS = 4
TEXT_FIELDS = ("ctx", "activity_label", "ctx_a", "ctx_b")
STYLES = ("completion", "harness")


class HellaSwagUnavailable(RuntimeError):
    """No HellaSwag data could be found locally or fetched."""


class HellaSwagFormatError(ValueError):
    """A HellaSwag record is malformed; the message names the file and line (or row)."""


def normalize_example(record: object, where: str) -> dict:
    """One HellaSwag record from either schema (label int or string) as {ctx, activity_label, ctx_a, ctx_b,
    endings (4 strings), label (int 0-3)}, plus the dataset's own id `ind` when it has one. `where` ("file:line")
    goes into every error message."""
    if not isinstance(record, dict):
        raise HellaSwagFormatError(f"{where}: expected a JSON object, got {type(record).__name__}")
    endings = record.get("endings")
    if not isinstance(endings, (list, tuple)) or len(endings) != NUM_ENDINGS \
            or not all(isinstance(e, str) and e for e in endings):
        raise HellaSwagFormatError(f"{where}: 'endings' must be a list of {NUM_ENDINGS} non-empty strings")
    for field in TEXT_FIELDS:
        if not isinstance(record.get(field), str):
            raise HellaSwagFormatError(f"{where}: '{field}' must be a string")
    if not record["ctx"].strip():
        raise HellaSwagFormatError(f"{where}: 'ctx' is empty, so there is nothing to continue")
    label = record.get("label")
    # The original jsonl has int labels; the Hub copy has strings ("" in the unlabelled test split).
    if isinstance(label, str) and label.strip().isdigit():
        label = int(label)
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < NUM_ENDINGS:
        raise HellaSwagFormatError(f"{where}: 'label' must be an ending index 0-{NUM_ENDINGS - 1}, got {label!r}")
    example = {**{field: record[field] for field in TEXT_FIELDS}, "endings": list(endings), "label": label}
    if "ind" in record:
        example["ind"] = record["ind"]
    return example


def read_hellaswag_file(path: str | os.PathLike) -> list[dict]:
    """A local HellaSwag file, .jsonl (one record a line) or .parquet, in either schema; at least one record."""
    path = Path(path)
    if not path.exists():
        raise HellaSwagUnavailable(f"HellaSwag data file {path} does not exist.")
    if not path.is_file():
        raise HellaSwagUnavailable(f"HellaSwag data file {path} is not a file (a jsonl or parquet file is needed).")
    if path.suffix.lower() == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except pa.ArrowInvalid:  # no parquet footer: another format, or cut short
            raise HellaSwagFormatError(f"{path}: not a parquet file, or a damaged one") from None
        except (pa.ArrowException, OSError) as err:
            raise HellaSwagFormatError(f"{path}: cannot be read as parquet ({first_line(err)})") from None
        if not rows:
            raise HellaSwagFormatError(f"{path}: no HellaSwag records (the parquet table has no rows)")
        return [normalize_example(row, f"{path}: row {i}") for i, row in enumerate(rows, start=1)]
    examples = []
    blank_lines = 0
    try:
        with open(path, "rb") as f:  # bytes: a line that is not UTF-8 is named like any other bad line
            for line_number, raw_line in enumerate(f, start=1):
                try:
                    line = raw_line.decode("utf-8")
                except UnicodeDecodeError:
                    raise HellaSwagFormatError(f"{path}:{line_number}: not UTF-8 text (is this a jsonl file?)") \
                        from None
                if not line.strip():
                    blank_lines += 1
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise HellaSwagFormatError(f"{path}:{line_number}: not valid JSON ({err.msg})") from None
                examples.append(normalize_example(record, f"{path}:{line_number}"))
    except OSError as err:  # e.g. no permission to read it
        raise HellaSwagUnavailable(f"HellaSwag data file {path} cannot be read: {err.strerror}") from None
    if not examples:
        raise HellaSwagFormatError(
            f"{path}: no HellaSwag records ({'only blank lines' if blank_lines else 'the file is empty'})"
        )
    return examples


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gpt2repro" / "hellaswag"


def load_hellaswag(data_file: str | None = None, split: str = "validation", cache_dir: str | None = None) -> list[dict]:
    """HellaSwag examples, normalised (see `normalize_example`).

    Sources, first found wins: `data_file` (jsonl or parquet); the original jsonl already downloaded into
    `cache_dir`; the Hub dataset `Rowan/hellaswag` through `datasets` (its own cache works offline with
    HF_HUB_OFFLINE=1); the original jsonl from GitHub, downloaded once into `cache_dir`.
    """
    if data_file is not None:
        return read_hellaswag_file(data_file)
    if split not in ORIGINAL_SPLIT_NAMES:
        raise ValueError(f"split must be one of {list(ORIGINAL_SPLIT_NAMES)}, got {split!r}")
    url = ORIGINAL_URL.format(split=ORIGINAL_SPLIT_NAMES[split])
    cached_file = Path(cache_dir or default_cache_dir()) / url.rsplit("/", 1)[-1]
    if cached_file.is_file():
        return read_hellaswag_file(cached_file)

    import datasets

    try:
        rows = datasets.load_dataset(HUB_DATASET, split=split)
    except (OSError, RuntimeError):
        pass  # unreachable, not cached, or a Hub layout this `datasets` cannot read: try the original file
    else:
        return [normalize_example(row, f"{HUB_DATASET} ({split}) row {i}") for i, row in enumerate(rows, start=1)]

    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            data = response.read()
    except OSError:  # URLError, timeouts, refused connections
        raise HellaSwagUnavailable(
            f"HellaSwag {split} data is not available offline: pass --data_file with a local HellaSwag jsonl or "
            f"parquet file, or go online so it can be fetched from the Hugging Face Hub ({HUB_DATASET}) or {url}."
        ) from None
    try:
        cached_file.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(cached_file, "wb") as f:  # concurrent processes never see half a file
            f.write(data)
    except OSError as err:
        raise HellaSwagUnavailable(
            f"HellaSwag {split} data was downloaded but cannot be cached in {cached_file.parent} ({err.strerror}): "
            f"pass --cache_dir with a writable folder."
        ) from None
    return read_hellaswag_file(cached_file)


def load_hellaswag_for_training(data_file: str | None) -> list[dict] | None:
    """The validation examples a training run scores at each evaluation (train_accelerate.py's --hellaswag_file), or
    None, with one notice, when no file was named and the data is neither cached nor downloadable. A named file that
    cannot be read is a CommandError: a typo must not cost a long run its HellaSwag curve."""
    try:
        return load_hellaswag(data_file)
    except HellaSwagFormatError as error:
        raise CommandError(f"--hellaswag_file: {error}") from None
    except HellaSwagUnavailable as error:
        if data_file:
            raise CommandError(str(error)) from None
        # load_hellaswag's own hint names this command's --data_file, so training says it in its own words
        tqdm.write("notice: HellaSwag is skipped: its data is neither cached nor downloadable from here; pass "
                   "--hellaswag_file with a local HellaSwag val jsonl or parquet file (--no-hellaswag silences this)")
        return None


def load_hellaswag_on_every_process(accelerator: Accelerator, data_file: str | None,
                                    cache_dir: str | None) -> list[dict]:
    """`load_hellaswag` for a command that every process of a launch runs: the main process loads first (one
    download), then the others read the cached file. Data that cannot be had is a CommandError on every process."""
    error = None
    with accelerator.main_process_first():
        try:  # caught inside, so that every process still reaches the barrier at the end of the block
            examples = load_hellaswag(data_file, cache_dir=cache_dir)
        except (HellaSwagUnavailable, HellaSwagFormatError) as err:
            error = err
    if error is not None:
        raise CommandError(str(error))
    return examples


def random_sample(examples: list[dict], count: int, seed: int) -> list[dict]:
    """`count` of `examples` drawn at random with `seed`, in dataset order (their `ind` names them)."""
    sample = random.Random(seed).sample(range(len(examples)), count)
    return [examples[i] for i in sorted(sample)]


def harness_preprocess(text: str) -> str:
    """lm-evaluation-harness' HellaSwag text clean-up: WikiHow's " [title]" becomes a sentence break, other
    [bracketed] markup goes, and the double spaces that leaves are halved."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def render_example(example: dict, style: str) -> tuple[str, list[str], list[int] | None]:
    """(context, the 4 continuations as appended to it, each ending's length in characters for harness
    acc_norm or None when acc_norm is per token)."""
    if style == "completion":
        return example["ctx"], [" " + ending for ending in example["endings"]], None
    if style == "harness":
        context = harness_preprocess(
            example["activity_label"] + ": " + example["ctx_a"] + " " + example["ctx_b"].capitalize()
        )
        endings = [harness_preprocess(ending) for ending in example["endings"]]
        # max(1, ...): an ending made only of markup would otherwise divide by zero.
        return context, [" " + ending for ending in endings], [max(1, len(ending)) for ending in endings]
    raise ValueError(f"style must be one of {STYLES}, got {style!r}")

