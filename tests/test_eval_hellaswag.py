"""eval_hellaswag.py, the package modules it runs (gpt2repro.hellaswag_data, .hellaswag, .hellaswag_run) and its
evaluate metric, on small HellaSwag-format files written here, with a tiny random GPT-2
and the real GPT-2 tokenizer. References: tiktoken's GPT-2 encoding and transformers' GPT-2 run one row at a time."""
import errno
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors import SafetensorError, safe_open
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import eval_hellaswag
from gpt2repro import hellaswag, hellaswag_data
from gpt2repro.hellaswag import evaluate_hellaswag, fit_to_context
from gpt2repro.hellaswag_data import (
    HellaSwagFormatError,
    HellaSwagUnavailable,
    harness_preprocess,
    load_hellaswag,
    normalize_example,
    render_example,
)
from gpt2repro.hellaswag_run import check_report_path
from gpt2repro.tokenizer import get_tiktoken_encoding, get_tokenizer
from modeling_gpt2repro import GPT2ReproForCausalLM
from train_helpers import free_port, run_launch, run_main, training_command

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "eval_hellaswag.py"
WORDS = ("the man woman dog ball water car snow window kitchen knife tomato garden rope bike ladder paint wall "
         "slowly quickly then again carefully picks up puts down throws jumps walks runs smiles wipes cuts holds "
         "into onto over under with a an his her their small large red blue").split()


def sentence(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high))).capitalize()


def make_records(n: int, seed: int = 0) -> list[dict]:
    """Records in the original rowanz jsonl schema (label int), half ActivityNet-like, half WikiHow-like with
    the [header]/[title]/[step] markup the harness style cleans up."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        if i % 2:
            activity, ctx_a, ctx_b = "Home and Garden", f"[header] How to {sentence(rng, 3, 6)} [title] " \
                f"{sentence(rng, 4, 10)}.", f"[step] {sentence(rng, 3, 8).lower()}"
            endings = [f"{sentence(rng, 3, 12)}. [substeps] {sentence(rng, 2, 5)}." for _ in range(4)]
        else:
            activity, ctx_a, ctx_b = sentence(rng, 2, 4), sentence(rng, 5, 14) + ".", rng.choice(["", "the man"])
            endings = [sentence(rng, 2, 10).lower() + "." for _ in range(4)]
        records.append({
            "ind": i, "activity_label": activity, "ctx_a": ctx_a, "ctx_b": ctx_b,
            "ctx": f"{ctx_a} {ctx_b}".strip(), "endings": endings, "source_id": f"src~{i}",
            "split": "val", "split_type": "indomain", "label": rng.randrange(4),
        })
    return records


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_hub_parquet(path: Path, records: list[dict]) -> Path:
    """The Hub copy's schema: label as a string."""
    pq.write_table(pa.Table.from_pylist([{**r, "label": str(r["label"])} for r in records]), path)
    return path


@pytest.fixture(scope="module")
def tokenizer():
    return get_tokenizer()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=256, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def model_dir(model, tmp_path_factory):
    """The tiny model saved without a tokenizer, as a training checkpoint folder may be."""
    path = tmp_path_factory.mktemp("tiny_gpt2")
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def examples():
    return [normalize_example(r, "test") for r in make_records(8)]


SHORT_CONTEXT = 32  # n_positions of the models that HellaSwag rows overflow
LONG_CONTEXT = " ".join(["The man walks into the kitchen and picks up a knife."] * 4)  # 48 tokens
ENDINGS = ["cuts a red tomato slowly.", "smiles.", "throws the knife over the wall.", "walks away."]


def example_record(ctx: str, endings: list[str], label: int) -> dict:
    return {"activity_label": "Cooking", "ctx_a": ctx, "ctx_b": "", "ctx": ctx, "endings": endings, "label": label}


def overflowing_records() -> list[dict]:
    """For a context of SHORT_CONTEXT tokens: a long context to cut, a short example that fits, and an example with
    an ending of 40 tokens, which no context fits."""
    return [example_record(LONG_CONTEXT, ENDINGS, 2), example_record("A man walks.", ENDINGS, 0),
            example_record("A man walks.", ["ball " * 40, *ENDINGS[1:]], 1)]


@pytest.fixture(scope="module")
def short_models(model) -> dict:
    """Models of a SHORT_CONTEXT context: transformers' GPT-2 and ours (the context in n_positions), and a Llama
    (in max_position_embeddings)."""
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(**{**model.config.to_dict(), "n_positions": SHORT_CONTEXT})).eval()
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=gpt2.config.vocab_size, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         max_position_embeddings=SHORT_CONTEXT)).eval()
    return {"gpt2": gpt2, "ours": GPT2ReproForCausalLM.from_gpt2(gpt2).eval(), "llama": llama}


def file_contents(folder: Path) -> dict[str, bytes | None]:
    """Every path under `folder` with its bytes (None for a folder): what a run must leave as it was."""
    return {str(path): None if path.is_dir() else path.read_bytes() for path in sorted(folder.rglob("*"))}


def reference_nll(model, context: str, continuations: list[str]) -> list[float]:
    """Summed negative log-likelihood of each continuation after `context`: one full row per forward, tokens from
    tiktoken, the loss read off a plain log_softmax."""
    enc = get_tiktoken_encoding()
    context_ids = enc.encode_ordinary(context)
    nlls = []
    for continuation in continuations:
        ending_ids = enc.encode_ordinary(continuation)
        with torch.no_grad():
            logits = model(torch.tensor([context_ids + ending_ids])).logits[0]  # (T, V)
        logprobs = torch.log_softmax(logits, dim=-1)
        first = len(context_ids) - 1  # the last context token predicts the first ending token
        nlls.append(-sum(logprobs[first + k, token].item() for k, token in enumerate(ending_ids)))
    return nlls


def argmin(values: list[float]) -> int:
    return min(range(len(values)), key=values.__getitem__)


# ---- data ------------------------------------------------------------------------------------------------------------

def test_both_schemas_load_to_the_same_examples(tmp_path):
    records = make_records(6)
    from_jsonl = load_hellaswag(str(write_jsonl(tmp_path / "val.jsonl", records)))
    from_parquet = load_hellaswag(str(write_hub_parquet(tmp_path / "val.parquet", records)))
    from_string_labels = load_hellaswag(str(write_jsonl(tmp_path / "hub.jsonl", [{**r, "label": str(r["label"])}
                                                                                  for r in records])))
    assert from_jsonl == from_parquet == from_string_labels
    assert [e["label"] for e in from_parquet] == [r["label"] for r in records]
    assert all(len(e["endings"]) == 4 and e["ctx"] == r["ctx"] for e, r in zip(from_jsonl, records, strict=True))


@pytest.mark.parametrize("breakage, message", [
    (lambda r: r.pop("endings"), "'endings' must be a list of 4"),
    (lambda r: r.update(endings=r["endings"][:3]), "'endings' must be a list of 4"),
    (lambda r: r.update(label=4), "'label' must be an ending index 0-3, got 4"),
    (lambda r: r.update(label="x"), "'label' must be an ending index 0-3, got 'x'"),
    (lambda r: r.update(label=""), "'label' must be an ending index"),  # the Hub's unlabelled test split
])
def test_malformed_record_names_file_and_line(tmp_path, breakage, message):
    records = make_records(4)
    breakage(records[2])
    path = write_jsonl(tmp_path / "bad.jsonl", records)
    with pytest.raises(HellaSwagFormatError) as err:
        load_hellaswag(str(path))
    assert f"{path}:3: " in str(err.value) and message in str(err.value)


def test_bad_json_and_bad_parquet_row_are_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(make_records(1)[0]) + "\n{not json\n")
    with pytest.raises(HellaSwagFormatError, match=f"{path}:2: not valid JSON"):
        load_hellaswag(str(path))
    records = make_records(3)
    records[1]["label"] = 7
    with pytest.raises(HellaSwagFormatError, match="row 2: 'label'"):
        load_hellaswag(str(write_hub_parquet(tmp_path / "bad.parquet", records)))


# Files that hold no HellaSwag record or are not what their name says: (name, bytes, the error; None: a parquet table
# with no rows).
A_RECORD = json.dumps(make_records(1)[0]).encode() + b"\n"
UNREADABLE_FILES = {
    "empty file": ("val.jsonl", b"", "{path}: no HellaSwag records (the file is empty)"),
    "blank lines": ("val.jsonl", b"\n  \n\t\n", "{path}: no HellaSwag records (only blank lines)"),
    "not UTF-8": ("val.jsonl", A_RECORD + b"\xff\xfe{}\n", "{path}:2: not UTF-8 text (is this a jsonl file?)"),
    "not parquet": ("val.parquet", A_RECORD, "{path}: not a parquet file, or a damaged one"),
    "parquet without rows": ("val.parquet", None, "{path}: no HellaSwag records (the parquet table has no rows)"),
}


def write_unreadable_file(folder: Path, case: str) -> tuple[Path, str]:
    """UNREADABLE_FILES[case] written into `folder`: its path and the error that names it."""
    name, content, error = UNREADABLE_FILES[case]
    path = folder / name
    if content is None:
        write_hub_parquet(path, [])
    else:
        path.write_bytes(content)
    return path, error.format(path=path)


@pytest.mark.parametrize("case", UNREADABLE_FILES)
def test_file_without_records_or_of_another_format_is_named(tmp_path, case):
    path, error = write_unreadable_file(tmp_path, case)
    with pytest.raises(HellaSwagFormatError) as err:
        load_hellaswag(str(path))
    assert str(err.value) == error


def test_data_file_that_is_a_folder_is_named(tmp_path):
    with pytest.raises(HellaSwagUnavailable) as err:
        load_hellaswag(str(tmp_path))
    assert str(err.value) == f"HellaSwag data file {tmp_path} is not a file (a jsonl or parquet file is needed)."


def test_hub_dataset_is_read_from_the_datasets_cache_offline(tmp_path):
    """The Hub path through `datasets`, offline: a `Rowan/hellaswag` cache as `datasets` leaves it after a
    download (built here by datasets' own parquet builder), read in a process with HF_HUB_OFFLINE=1."""
    import datasets

    records = make_records(5)
    builder = datasets.load_dataset_builder(
        "parquet", data_files={"validation": str(write_hub_parquet(tmp_path / "v.parquet", records))},
        cache_dir=str(tmp_path / "build"),
    )
    builder.download_and_prepare()
    cached = tmp_path / "datasets_cache" / "Rowan___hellaswag" / "default" / "0.0.0" / "0123abcd"
    cached.mkdir(parents=True)
    for arrow_file in Path(builder.cache_dir).glob("*.arrow"):
        shutil.copy(arrow_file, cached / arrow_file.name.replace("parquet-", "hellaswag-"))
    info = json.loads((Path(builder.cache_dir) / "dataset_info.json").read_text())
    (cached / "dataset_info.json").write_text(json.dumps({**info, "dataset_name": "hellaswag"}))

    code = ("import json; from gpt2repro.hellaswag_data import load_hellaswag; "
            f"print(json.dumps(load_hellaswag(cache_dir={str(tmp_path / 'empty')!r})))")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "datasets_cache"),
           "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.splitlines()[-1]) == [normalize_example(r, "") for r in records]


def test_original_jsonl_is_downloaded_once_then_read_from_cache(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # the Hub step fails at once
    source = write_jsonl(tmp_path / "hellaswag_val.jsonl", make_records(3))
    monkeypatch.setattr(hellaswag_data, "ORIGINAL_URL", f"file://{tmp_path}/hellaswag_{{split}}.jsonl")
    cache_dir = tmp_path / "cache"
    first = load_hellaswag(cache_dir=str(cache_dir))
    assert (cache_dir / "hellaswag_val.jsonl").read_bytes() == source.read_bytes()
    source.unlink()  # the source is gone: the second load must come from the cache
    assert load_hellaswag(cache_dir=str(cache_dir)) == first
    with pytest.raises(HellaSwagUnavailable, match="pass --data_file"):
        load_hellaswag(cache_dir=str(tmp_path / "other_cache"))


def test_download_that_cannot_be_cached_says_so(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    write_jsonl(tmp_path / "hellaswag_val.jsonl", make_records(3))
    monkeypatch.setattr(hellaswag_data, "ORIGINAL_URL", f"file://{tmp_path}/hellaswag_{{split}}.jsonl")
    not_a_folder = tmp_path / "cache"
    not_a_folder.write_text("a file")
    with pytest.raises(HellaSwagUnavailable) as err:
        load_hellaswag(cache_dir=str(not_a_folder))
    assert str(err.value) == (f"HellaSwag validation data was downloaded but cannot be cached in {not_a_folder} "
                              f"(File exists): pass --cache_dir with a writable folder.")
    assert not_a_folder.read_text() == "a file"


def test_cli_offline_without_data_says_what_it_needs(tmp_path, model_dir):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "empty"),
           "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    out = subprocess.run([sys.executable, str(SCRIPT), "--model", str(model_dir)], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 1 and len(out.stderr.splitlines()) == 1
    assert out.stderr.startswith("error: HellaSwag validation data is not available offline: pass --data_file")


def test_cli_malformed_file_is_one_error_line(tmp_path, model_dir):
    records = make_records(3)
    records[1]["endings"] = ["only one"]
    path = write_jsonl(tmp_path / "bad.jsonl", records)
    out = subprocess.run([sys.executable, str(SCRIPT), "--model", str(model_dir), "--data_file", str(path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert out.stderr == f"error: {path}:2: 'endings' must be a list of 4 non-empty strings\n"


def good_cli_run(tmp_path: Path, model_dir: Path) -> dict[str, str]:
    """The arguments of a run that would succeed: it reads tmp_path/val.jsonl (3 examples) and writes
    tmp_path/result.json, which a previous run left."""
    write_jsonl(tmp_path / "val.jsonl", make_records(3))
    (tmp_path / "result.json").write_text('{"acc": 0.25}\n')
    return {"--model": str(model_dir), "--data_file": str(tmp_path / "val.jsonl"),
            "--output_json": str(tmp_path / "result.json")}


def command_line(arguments: dict[str, str]) -> list[str]:
    return [item for pair in arguments.items() for item in pair]


def run_bad_cli(arguments: dict[str, str], folder: Path, capsys) -> tuple[int, str, str]:
    """main with `arguments`; it must leave every file under `folder` as it was."""
    before = file_contents(folder)
    outcome = run_main(eval_hellaswag.main, command_line(arguments), capsys)
    assert file_contents(folder) == before
    return outcome


@pytest.mark.parametrize("case", UNREADABLE_FILES)
def test_cli_unreadable_data_file_is_one_error_line(tmp_path, model_dir, capsys, fresh_accelerate, case):
    arguments = good_cli_run(tmp_path, model_dir)
    (tmp_path / "data").mkdir()  # beside the good run's val.jsonl
    path, error = write_unreadable_file(tmp_path / "data", case)
    arguments["--data_file"] = str(path)
    assert run_bad_cli(arguments, tmp_path, capsys) == (1, "", f"error: {error}\n")


# Per case: the arguments that replace a good run's and the one error line, "{tmp}" standing for the run's folder.
BAD_CLI_ARGUMENTS = {
    "data file is a folder": (
        {"--data_file": "{tmp}"}, "HellaSwag data file {tmp} is not a file (a jsonl or parquet file is needed)."),
    "limit beyond the data": ({"--limit": "4"}, "--limit 4 is more than the 3 examples of {tmp}/val.jsonl"),
    "output is a folder": (
        {"--output_json": "{tmp}"}, "--output_json {tmp} is a folder: name a file, e.g. {tmp}/hellaswag.json"),
    "output under a file": (
        {"--output_json": "{tmp}/result.json/out/r.json"},
        "--output_json {tmp}/result.json/out/r.json: {tmp}/result.json/out is not writable (Not a directory)"),
    "output is the data file": (
        {"--output_json": "{tmp}/val.jsonl"},
        "--output_json {tmp}/val.jsonl is the --data_file: the result would overwrite the data"),
    "output is a device": ({"--output_json": os.devnull}, f"--output_json {os.devnull} is not a regular file"),
    # sysfs takes no new file, from root either: a folder no one can write in.
    "output folder not writable": (
        {"--output_json": "/sys/hellaswag.json"},
        "--output_json /sys/hellaswag.json: /sys is not writable (Permission denied)"),
    "model is a file": ({"--model": "{tmp}/val.jsonl"}, "the model folder {tmp}/val.jsonl is a file, not a folder"),
}


@pytest.mark.parametrize("case", BAD_CLI_ARGUMENTS)
def test_cli_bad_argument_is_one_error_line_before_scoring(tmp_path, model_dir, capsys, fresh_accelerate, case):
    if case == "output folder not writable" and not os.path.isdir("/sys"):
        pytest.skip("no sysfs here")
    arguments = good_cli_run(tmp_path, model_dir)
    replacements, error = BAD_CLI_ARGUMENTS[case]
    arguments.update({key: value.format(tmp=tmp_path) for key, value in replacements.items()})
    assert run_bad_cli(arguments, tmp_path, capsys) == (1, "", f"error: {error.format(tmp=tmp_path)}\n")


def test_report_path_check_makes_the_missing_folders(tmp_path):
    """--output_json's folders are made by the check, before the scoring, as gpt2repro.cli.check_writable_folder
    makes every command's output folder."""
    output = tmp_path / "new" / "sub" / "result.json"
    check_report_path(output, None)
    assert output.parent.is_dir() and not output.exists()


def test_cli_corrupt_model_weights_are_one_error_line(tmp_path, model_dir, capsys, fresh_accelerate):
    arguments = good_cli_run(tmp_path, model_dir)
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(model_dir, checkpoint)
    (checkpoint / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    with pytest.raises(SafetensorError) as reason:
        safe_open(str(checkpoint / "model.safetensors"), framework="pt")
    arguments["--model"] = str(checkpoint)
    assert run_bad_cli(arguments, tmp_path, capsys) == (1, "", (
        f"error: could not load the model '{checkpoint}' (a checkpoint folder, e.g. a training checkpoint's hf/ "
        f"folder, or a Hub id that needs the network or the local Hub cache): {reason.value}\n"))


def test_cli_seed_without_limit_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_:
        eval_hellaswag.parse_args(["--model", "m", "--seed", "3"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(
        "error: --seed needs --limit: it draws the random sample of --limit examples")


def test_cli_result_is_written_whole_or_not_at_all(tmp_path, model_dir, capsys, fresh_accelerate, monkeypatch):
    """A write that fails (here: the disk fills up at the flush) leaves the previous result as it was, no partial
    file, and one error line; a write that succeeds replaces the previous result."""
    arguments = good_cli_run(tmp_path, model_dir)

    def disk_full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", disk_full)
        status, _, err = run_bad_cli(arguments, tmp_path, capsys)
    assert status == 1
    assert [line for line in err.splitlines() if "error" in line] == \
        [f"error: could not write --output_json {tmp_path / 'result.json'}: No space left on device"]
    status, _, err = run_main(eval_hellaswag.main, command_line(arguments), capsys)
    assert status == 0, err
    assert json.loads((tmp_path / "result.json").read_text())["count"] == 3
    assert sorted(os.listdir(tmp_path)) == ["result.json", "val.jsonl"]  # no partial file left


def test_cli_ctrl_c_during_the_write_leaves_the_result_whole(tmp_path, model_dir, capsys, fresh_accelerate,
                                                             monkeypatch):
    """Ctrl-C between the temporary file's fsync and its rename: the write completes, and the one line says so."""
    arguments = good_cli_run(tmp_path, model_dir)
    real_fsync = os.fsync

    def fsync_then_ctrl_c(fd: int) -> None:
        real_fsync(fd)
        os.kill(os.getpid(), signal.SIGINT)

    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", fsync_then_ctrl_c)
        status, _, err = run_main(eval_hellaswag.main, command_line(arguments), capsys)
    assert status == 130 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == \
        f"error: interrupted while writing --output_json {tmp_path / 'result.json'}, which was written whole"
    assert json.loads((tmp_path / "result.json").read_text())["count"] == 3
    assert sorted(os.listdir(tmp_path)) == ["result.json", "val.jsonl"]


def test_cli_ctrl_c_during_scoring_is_one_line_and_writes_nothing(tmp_path, model_dir, capsys, fresh_accelerate,
                                                                 monkeypatch):
    arguments = good_cli_run(tmp_path, model_dir)

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(hellaswag, "score_batch", ctrl_c)
    status, _, err = run_bad_cli(arguments, tmp_path, capsys)
    assert status == 130 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == "error: interrupted; nothing was written: run the same command again"


# ---- scoring ---------------------------------------------------------------------------------------------------------

def test_harness_preprocessing():
    # Stripped first, then cleaned: as in lm-evaluation-harness, markup at the very start leaves a space.
    assert harness_preprocess("Home: [header] How to paint a wall [title] Buy paint.") == \
        "Home: How to paint a wall. Buy paint."
    assert harness_preprocess("[header] Paint") == " Paint"
    assert harness_preprocess(" A man [step] walks in.  ") == "A man walks in."
    example = {"activity_label": "Painting", "ctx_a": "A man holds a brush.", "ctx_b": "he", "ctx": "",
               "endings": ["paints [substeps] the wall.", "b", "c", "d"], "label": 0}
    context, continuations, char_lengths = render_example(example, "harness")
    assert context == "Painting: A man holds a brush. He"
    assert continuations[0] == " paints the wall." and char_lengths[0] == len("paints the wall.")


@pytest.mark.parametrize("style", ["completion", "harness"])
def test_scores_equal_one_row_at_a_time_reference(model, tokenizer, examples, style):
    result = evaluate_hellaswag(model, tokenizer, examples, style=style, batch_size=4, show_progress=False,
                                return_predictions=True)
    predictions = result["predictions"]
    assert [p["index"] for p in predictions] == list(range(len(examples))) and result["count"] == len(examples)
    enc = get_tiktoken_encoding()
    for example, prediction in zip(examples, predictions, strict=True):
        context, continuations, char_lengths = render_example(example, style)
        nll = reference_nll(model, context, continuations)
        per_token = char_lengths or [len(enc.encode_ordinary(c)) for c in continuations]
        nll_norm = [n / d for n, d in zip(nll, per_token, strict=True)]
        torch.testing.assert_close(prediction["ending_nll"], nll, atol=2e-4, rtol=1e-5)
        torch.testing.assert_close(prediction["ending_nll_norm"], nll_norm, atol=2e-4, rtol=1e-5)
        assert (prediction["pred"], prediction["pred_norm"], prediction["label"]) == \
            (argmin(nll), argmin(nll_norm), example["label"])
    assert result["correct"] == sum(p["pred"] == p["label"] for p in predictions)
    assert result["acc"] == result["correct"] / len(examples)
    assert result["acc_norm"] == sum(p["pred_norm"] == p["label"] for p in predictions) / len(examples)


def test_batched_equals_unbatched_and_training_mode_is_restored(model, tokenizer, examples):
    model.train()
    one = evaluate_hellaswag(model, tokenizer, examples, batch_size=1, show_progress=False, return_predictions=True)
    assert model.training
    model.eval()
    many = evaluate_hellaswag(model, tokenizer, examples, batch_size=6, show_progress=False, return_predictions=True)
    assert not model.training
    for a, b in zip(one.pop("predictions"), many.pop("predictions"), strict=True):
        assert (a["pred"], a["pred_norm"]) == (b["pred"], b["pred_norm"])
        torch.testing.assert_close(a["ending_nll"], b["ending_nll"], atol=2e-4, rtol=1e-5)
    assert one == many
    assert evaluate_hellaswag(model, tokenizer, examples, limit=3, show_progress=False)["count"] == 3


def test_eager_attention_bf16_weights_and_autocast_score_alike(model, tokenizer, examples):
    """The packed rows' custom mask must mean the same to eager attention as to SDPA; lower precision set by the
    caller (bf16 weights, or fp32 weights under autocast) must only round."""
    def nll(m) -> torch.Tensor:
        result = evaluate_hellaswag(m, tokenizer, examples, show_progress=False, return_predictions=True)
        return torch.tensor([p["ending_nll"] for p in result["predictions"]])

    eager_config = GPT2Config(**model.config.to_dict())
    eager_config._attn_implementation = "eager"
    eager = GPT2LMHeadModel(eager_config).eval()
    eager.load_state_dict(model.state_dict())
    assert eager.config._attn_implementation == "eager"
    expected = nll(model)
    torch.testing.assert_close(nll(eager), expected, atol=2e-4, rtol=1e-5)
    bf16 = GPT2LMHeadModel(model.config).to(torch.bfloat16).eval()
    bf16.load_state_dict(model.state_dict())
    torch.testing.assert_close(nll(bf16), expected, rtol=2e-3, atol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(nll(model), expected, rtol=2e-3, atol=0)


def test_our_model_scores_like_transformers_gpt2(model, tokenizer, examples):
    ours = GPT2ReproForCausalLM.from_gpt2(model)
    expected = evaluate_hellaswag(model, tokenizer, examples, show_progress=False, return_predictions=True)
    got = evaluate_hellaswag(ours, tokenizer, examples, show_progress=False, return_predictions=True)
    for a, b in zip(expected.pop("predictions"), got.pop("predictions"), strict=True):
        assert (a["pred"], a["pred_norm"]) == (b["pred"], b["pred_norm"])
        torch.testing.assert_close(a["ending_nll"], b["ending_nll"], atol=2e-4, rtol=1e-5)
    assert got == expected


class WithoutLogitsToKeep(torch.nn.Module):
    """`model` behind a forward that cannot limit its logits: the plain path, logits at every position."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model, self.config = model, model.config

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None):
        return self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=use_cache)


def test_logits_only_where_scored_give_the_full_logit_scores(model, tokenizer, examples):
    """The fast path (logits_to_keep: the lm_head sees the ending positions only) scores as the plain path does."""
    lm_head_positions = []
    hook = model.lm_head.register_forward_hook(lambda module, args, output: lm_head_positions.append(args[0].shape[1]))
    try:
        fast = evaluate_hellaswag(model, tokenizer, examples, batch_size=3, show_progress=False,
                                  return_predictions=True)
        plain = evaluate_hellaswag(WithoutLogitsToKeep(model), tokenizer, examples, batch_size=3,
                                   show_progress=False, return_predictions=True)
    finally:
        hook.remove()
    batches = len(lm_head_positions) // 2
    fast_positions, plain_positions = lm_head_positions[:batches], lm_head_positions[batches:]
    assert all(kept < total for kept, total in zip(fast_positions, plain_positions, strict=True))
    for a, b in zip(fast.pop("predictions"), plain.pop("predictions"), strict=True):
        assert (a["pred"], a["pred_norm"]) == (b["pred"], b["pred_norm"])
        torch.testing.assert_close(a["ending_nll"], b["ending_nll"])
    assert fast == plain


@pytest.mark.parametrize("rows_per_slice", [1, 3, 1000])
def test_cross_entropy_in_slices_is_exact(monkeypatch, rows_per_slice):
    """token_losses, whatever its slices (1 row, a few, all at once; some without a target, rows with several),
    gives exactly the cross-entropy of each target over its row."""
    torch.manual_seed(0)
    logits = torch.randn(10, 50, dtype=torch.bfloat16) * 4
    rows = torch.tensor([4, 0, 4, 4, 9, 1, 4, 8])  # row 4 predicts several targets; rows 2, 3, 5-7 none
    targets = torch.randint(0, 50, (len(rows),))
    expected = torch.nn.functional.cross_entropy(logits[rows].float(), targets, reduction="none")
    monkeypatch.setattr(hellaswag, "CROSS_ENTROPY_SLICE_BYTES", 4 * 50 * rows_per_slice)  # fp32 bytes
    assert torch.equal(hellaswag.token_losses(logits, rows, targets), expected)


def test_fit_to_context_keeps_the_endings_and_the_last_context_tokens():
    example = {"context": list(range(10)), "endings": [[1] * 5, [2] * 3, [3], [4] * 2], "norm_divisors": [5, 3, 1, 2]}
    assert fit_to_context(example, None) == {**example, "context_tokens_dropped": 0}
    assert fit_to_context(example, 14) == {**example, "context_tokens_dropped": 0}  # 10 + 5 = 14 + 1: fits
    assert fit_to_context(example, 12) == {**example, "context": list(range(2, 10)), "context_tokens_dropped": 2}
    assert fit_to_context(example, 5) == {**example, "context": [9], "context_tokens_dropped": 9}
    assert fit_to_context(example, 4) is None  # the 5-token ending leaves no room for a context token


def harness_nll(model, context_ids: list[int], ending_ids: list[int]) -> float:
    """lm-evaluation-harness' loglikelihood of one ending (negated): its input is the last max_length + 1 tokens of
    context + ending less the last one, and the ending is read off the last len(ending) predictions."""
    tokens = (context_ids + ending_ids)[-(SHORT_CONTEXT + 1):]
    with torch.no_grad():
        logits = model(torch.tensor([tokens[:-1]])).logits[0, -len(ending_ids):]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return -sum(logprobs[k, token].item() for k, token in enumerate(ending_ids))


@pytest.mark.parametrize("kind", ["gpt2", "ours", "llama"])
def test_context_longer_than_the_model_is_cut_from_the_left(short_models, tokenizer, kind):
    """Scored as the same example with its context cut by hand, to the tokens lm-evaluation-harness keeps for the
    longest ending; an ending longer than the whole context is skipped; both counted."""
    model = short_models[kind]
    enc = get_tiktoken_encoding()
    context_ids = enc.encode_ordinary(LONG_CONTEXT)
    ending_ids = [enc.encode_ordinary(" " + ending) for ending in ENDINGS]
    longest = max(range(4), key=lambda j: len(ending_ids[j]))
    kept = context_ids[-(SHORT_CONTEXT + 1 - len(ending_ids[longest])):]
    assert (len(context_ids), len(kept)) == (48, 26)
    cut_by_hand = example_record(enc.decode(kept), ENDINGS, 2)
    assert enc.encode_ordinary(cut_by_hand["ctx"]) == kept

    records = overflowing_records()
    examples = [normalize_example(r, "test") for r in records]
    result = evaluate_hellaswag(model, tokenizer, examples, batch_size=2, show_progress=False, return_predictions=True)
    by_hand = evaluate_hellaswag(model, tokenizer, [normalize_example(r, "test")
                                                    for r in [cut_by_hand, *records[1:]]],
                                 batch_size=2, show_progress=False, return_predictions=True)
    predictions, expected = result.pop("predictions"), by_hand.pop("predictions")
    assert by_hand["truncated"] == 0 and result == {**by_hand, "truncated": 1}
    assert result["count"] == 2 and result["skipped"] == 1
    assert predictions[0] == {**expected[0], "context_tokens_dropped": 48 - 26}
    assert predictions[1:] == expected[1:]
    assert predictions[2] == {"index": 2, "ind": None, "label": 1, "skipped": True, "context_tokens_dropped": None,
                              "pred": None, "pred_norm": None, "ending_nll": None, "ending_nll_norm": None}
    torch.testing.assert_close(predictions[0]["ending_nll"][longest],
                               harness_nll(model, context_ids, ending_ids[longest]), atol=2e-4, rtol=1e-5)


def test_when_no_example_fits_the_result_says_so(short_models, tokenizer):
    overlong = [normalize_example(overflowing_records()[2], "test")]
    result = evaluate_hellaswag(short_models["ours"], tokenizer, overlong, show_progress=False)
    assert math.isnan(result.pop("acc")) and math.isnan(result.pop("acc_norm"))
    assert result == {"correct": 0, "correct_norm": 0, "count": 0, "truncated": 0, "skipped": 1}


def test_cli_counts_cut_and_skipped_examples(tmp_path, short_models, tokenizer, capsys, fresh_accelerate):
    checkpoint = tmp_path / "short"
    short_models["gpt2"].save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    data_file = write_jsonl(tmp_path / "val.jsonl", overflowing_records())
    output = tmp_path / "result.json"
    status, out, err = run_main(eval_hellaswag.main, ["--model", str(checkpoint), "--data_file", str(data_file),
                                                      "--dtype", "float32", "--batch_size", "2", "--output_json",
                                                      str(output)], capsys)
    assert status == 0, err
    expected = evaluate_hellaswag(short_models["gpt2"], tokenizer, load_hellaswag(str(data_file)), batch_size=2,
                                  show_progress=False, return_predictions=True)
    assert out.splitlines()[-1] == (
        f"HellaSwag completion (2 examples, float32): acc {expected['acc']:.4f}  acc_norm {expected['acc_norm']:.4f}; "
        f"longer than the model's context of 32 tokens: 1 cut from the left, 1 skipped (an ending alone fills it)")
    report = json.loads(output.read_text())
    assert {key: report[key] for key in expected} == expected

    write_jsonl(data_file, overflowing_records()[2:])
    status, out, err = run_main(eval_hellaswag.main, ["--model", str(checkpoint), "--data_file", str(data_file),
                                                      "--output_json", str(output)], capsys)
    assert status == 1
    assert [line for line in err.splitlines() if "error" in line] == \
        ["error: none of the 1 examples fits the model's context of 32 tokens: in each, an ending alone fills it"]
    assert json.loads(output.read_text()) == report  # the previous result stays


def test_metric_loads_offline_from_an_installed_module(tmp_path):
    """From a folder outside the checkout, with no Hub and an empty evaluate module cache: the module is found as
    installed (setup.cfg's packages) in the gpt2repro package, where gpt2repro.hellaswag loads it from."""
    code = ("import importlib.util as u, evaluate, numpy as np, pathlib; "
            "path = pathlib.Path(u.find_spec('gpt2repro.hellaswag_accuracy').origin); "
            "assert path.parent == pathlib.Path(u.find_spec('gpt2repro').origin).parent, path; "
            "m = evaluate.load(str(path), keep_in_memory=True); "
            "p, pn, r = [0, 1, 2, 3, 1], [0, 0, 2, 2, 1], [0, 1, 0, 3, 3]; "
            "out = m.compute(predictions=p, predictions_norm=pn, references=r); "
            "assert out['acc'] == np.mean(np.equal(p, r)) and out['acc_norm'] == np.mean(np.equal(pn, r)), out; "
            "assert out['count'] == 5 and out['correct'] == np.sum(np.equal(p, r)), out; print('ok')")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_cli_random_sample_harness_bf16_with_the_checkpoint_tokenizer(tmp_path, model, model_dir, tokenizer):
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(model_dir, checkpoint)
    tokenizer.save_pretrained(checkpoint)
    data_file = write_jsonl(tmp_path / "val.jsonl", make_records(10))
    output = tmp_path / "result.json"
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--model", str(checkpoint), "--data_file", str(data_file), "--style", "harness",
         "--dtype", "bfloat16", "--limit", "4", "--seed", "3", "--output_json", str(output)],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "no usable tokenizer" not in out.stderr
    report = json.loads(output.read_text())
    sampled = [p["ind"] for p in report["predictions"]]
    assert report["count"] == 4 and len(set(sampled)) == 4 and sampled == sorted(sampled)
    # The same 4 examples, scored here with the bf16 model, give the same result.
    examples = [e for e in load_hellaswag(str(data_file)) if e["ind"] in sampled]
    bf16 = GPT2LMHeadModel(model.config).to(torch.bfloat16).eval()
    bf16.load_state_dict(model.state_dict())
    expected = evaluate_hellaswag(bf16, tokenizer, examples, style="harness", show_progress=False,
                                  return_predictions=True)
    assert [(p["pred"], p["pred_norm"]) for p in report["predictions"]] == \
        [(p["pred"], p["pred_norm"]) for p in expected["predictions"]]
    assert (report["acc"], report["acc_norm"], report["style"]) == (expected["acc"], expected["acc_norm"], "harness")


def test_two_processes_give_the_same_totals_as_one(tmp_path, model, model_dir, tokenizer):
    """9 examples over 2 processes: shares of 5 and 4, each scored once, gathered once."""
    data_file = write_hub_parquet(tmp_path / "val.parquet", make_records(9))
    output = tmp_path / "out" / "result.json"
    command, env = training_command(["--model", str(model_dir), "--data_file", str(data_file), "--batch_size", "2",
                                     "--output_json", str(output)], processes=2, script=str(SCRIPT), forked=True)
    out = run_launch(command, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("HellaSwag completion (9 examples") == 1  # printed by the main process only
    two = json.loads(output.read_text())
    one = evaluate_hellaswag(model, tokenizer, load_hellaswag(str(data_file)), show_progress=False,
                             return_predictions=True)
    for key in ("acc", "acc_norm", "correct", "correct_norm", "count"):
        assert two[key] == one[key], key
    assert [(p["index"], p["pred"], p["pred_norm"]) for p in two["predictions"]] == \
        [(p["index"], p["pred"], p["pred_norm"]) for p in one["predictions"]]


# eval_hellaswag.main with tokenisation failing on the process that owns the last example (process 1 of 2).
FAIL_ON_ONE_PROCESS = """
import sys
import eval_hellaswag
from gpt2repro import hellaswag

tokenize = hellaswag.tokenize_examples
def tokenize_or_fail(examples, tokenizer, style):
    if any(ex["ctx"].startswith("POISON") for ex in examples):
        raise ValueError("cannot tokenise the poisoned example")
    return tokenize(examples, tokenizer, style)
hellaswag.tokenize_examples = tokenize_or_fail
eval_hellaswag.main(sys.argv[1:])
"""


def test_a_failure_on_one_process_stops_every_process_alike(tmp_path, model_dir):
    """Without agreement, the other process would wait in the gather until the process-group timeout."""
    records = make_records(6)
    records[-1] = {**records[-1], "ctx": "POISON " + records[-1]["ctx"], "ctx_a": "POISON " + records[-1]["ctx_a"]}
    data_file = write_hub_parquet(tmp_path / "val.parquet", records)
    wrapper = tmp_path / "fail_on_one.py"
    wrapper.write_text(FAIL_ON_ONE_PROCESS)
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
         str(free_port()), str(wrapper), "--model", str(model_dir), "--data_file", str(data_file)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode != 0
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert errors == ["error: HellaSwag scoring failed on process 1: ValueError: cannot tokenise the poisoned example"]
