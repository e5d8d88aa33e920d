"""What a standalone HellaSwag run (eval_hellaswag.py) needs around the scoring: the model and its tokenizer, loaded
from a checkpoint folder or a Hub id, and the JSON report, its path checked before the scoring (whose result would
otherwise be lost) and the file written whole after it. A problem the user can fix is a CommandError."""
from __future__ import annotations

from pathlib import Path

import torch

from gpt2repro.atomic_files import ctrl_c_held, write_json_atomic
from gpt2repro.cli import CommandError, CommandStopped, check_writable_folder, first_line


def check_report_path(output: Path, data_file: str | None) -> None:
    """A CommandError unless the report can be written to `output` (--output_json): a file that is not the
    --data_file, in a folder that can be written (made now when missing)."""
    if output.is_dir():
        raise CommandError(f"--output_json {output} is a folder: name a file, e.g. {output / 'hellaswag.json'}")
    if output.exists() and not output.is_file():
        raise CommandError(f"--output_json {output} is not a regular file")
    if data_file is not None and output.is_file() and Path(data_file).is_file() and output.samefile(data_file):
        raise CommandError(f"--output_json {output} is the --data_file: the result would overwrite the data")
    check_writable_folder(output.absolute().parent, f"--output_json {output}:")


def write_report(output: Path, report: dict) -> None:
    """`report` as JSON at `output` (--output_json), written whole or not at all. A failed write is a CommandError
    and leaves the previous file, if any, intact; Ctrl-C during the write lets it complete, then stops the command."""
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        with ctrl_c_held() as ctrl_c:
            write_json_atomic(output, report)
    except OSError as err:  # e.g. the disk filled up
        raise CommandError(f"could not write --output_json {output}: {err.strerror or first_line(err)}") from None
    if ctrl_c:
        raise CommandStopped(f"error: interrupted while writing --output_json {output}, which was written whole")


def load_model(model_name: str, dtype: str) -> torch.nn.Module:
    """The causal LM `model_name` (a checkpoint folder or a Hub id) with its weights in `dtype` ("float32",
    "bfloat16"), on the CPU."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    model_path = Path(model_name).expanduser()
    if model_name.startswith(("/", ".", "~")) and not model_path.is_dir():
        raise CommandError(f"the model folder {model_name} "
                           f"{'is a file, not a folder' if model_path.exists() else 'does not exist'}")
    try:
        return AutoModelForCausalLM.from_pretrained(model_name, dtype=getattr(torch, dtype), trust_remote_code=True)
    # ValueError: a folder that holds no model config; SafetensorError: truncated or corrupt weights.
    except (OSError, ValueError, SafetensorError) as err:
        raise CommandError(f"could not load the model '{model_name}' (a checkpoint folder, e.g. a training "
                           f"checkpoint's hf/ folder, or a Hub id that needs the network or the local Hub "
                           f"cache): {first_line(err)}") from None


def load_model_tokenizer(model_name: str):
    """The model's own tokenizer, or None when it has none: a checkpoint folder saved without one loads as an EMPTY
    tokenizer in transformers 5 rather than failing, hence the probe."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_name, trust_remote_code=True)
        if tokenizer("Hello world", add_special_tokens=False)["input_ids"]:
            return tokenizer
    except (OSError, ValueError):
        pass
    return None
