"""eval_hellaswag.py and its evaluate metric, on small HellaSwag-format files written here, with a tiny random GPT-2
and the real GPT-2 tokenizer. References: tiktoken's GPT-2 encoding and transformers' GPT-2 run one row at a time."""
import json
import os
import random
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import eval_hellaswag
from eval_hellaswag import (
    HellaSwagFormatError,
    HellaSwagUnavailable,
    evaluate_hellaswag,
    harness_preprocess,
    load_hellaswag,
    render_example,
)
from tokenization_gpt2repro import get_tiktoken_encoding, get_tokenizer

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
    return [eval_hellaswag.normalize_example(r, "test") for r in make_records(8)]


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


# ---- data ---------------------------------------------------------------------------------------------------------

def test_both_schemas_load_to_the_same_examples(tmp_path):
    records = make_records(6)
    from_jsonl = load_hellaswag(str(write_jsonl(tmp_path / "val.jsonl", records)))
    from_parquet = load_hellaswag(str(write_hub_parquet(tmp_path / "val.parquet", records)))
    from_string_labels = load_hellaswag(str(write_jsonl(tmp_path / "hub.jsonl", [{**r, "label": str(r["label"])}
                                                                                  for r in records])))
    assert from_jsonl == from_parquet == from_string_labels
    assert [e["label"] for e in from_parquet] == [r["label"] for r in records]
    assert all(len(e["endings"]) == 4 and e["ctx"] == r["ctx"] for e, r in zip(from_jsonl, records))


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

    code = ("import json, eval_hellaswag; "
            f"print(json.dumps(eval_hellaswag.load_hellaswag(cache_dir={str(tmp_path / 'empty')!r})))")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "datasets_cache"),
           "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.splitlines()[-1]) == [eval_hellaswag.normalize_example(r, "") for r in records]


def test_original_jsonl_is_downloaded_once_then_read_from_cache(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # the Hub step fails at once
    source = write_jsonl(tmp_path / "hellaswag_val.jsonl", make_records(3))
    monkeypatch.setattr(eval_hellaswag, "ORIGINAL_URL", f"file://{tmp_path}/hellaswag_{{split}}.jsonl")
    cache_dir = tmp_path / "cache"
    first = load_hellaswag(cache_dir=str(cache_dir))
    assert (cache_dir / "hellaswag_val.jsonl").read_bytes() == source.read_bytes()
    source.unlink()  # the source is gone: the second load must come from the cache
    assert load_hellaswag(cache_dir=str(cache_dir)) == first
    with pytest.raises(HellaSwagUnavailable, match="pass --data_file"):
        load_hellaswag(cache_dir=str(tmp_path / "other_cache"))


def test_cli_offline_without_data_says_what_it_needs(tmp_path, model_dir):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "empty"),
           "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    out = subprocess.run([sys.executable, str(SCRIPT), "--model", str(model_dir)], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2
    error_lines = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "pass --data_file" in error_lines[0] and "Traceback" not in out.stderr


def test_cli_malformed_file_is_one_error_line(tmp_path, model_dir):
    records = make_records(3)
    records[1]["endings"] = ["only one"]
    path = write_jsonl(tmp_path / "bad.jsonl", records)
    out = subprocess.run([sys.executable, str(SCRIPT), "--model", str(model_dir), "--data_file", str(path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"error: {path}:2: 'endings' must be a list of 4" in out.stderr


# ---- scoring ------------------------------------------------------------------------------------------------------

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
    for example, prediction in zip(examples, predictions):
        context, continuations, char_lengths = render_example(example, style)
        nll = reference_nll(model, context, continuations)
        per_token = char_lengths or [len(enc.encode_ordinary(c)) for c in continuations]
        nll_norm = [n / d for n, d in zip(nll, per_token)]
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
    for a, b in zip(one.pop("predictions"), many.pop("predictions")):
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
    from modeling_gpt2repro import GPT2ReproForCausalLM

    ours = GPT2ReproForCausalLM.from_gpt2(model)
    expected = evaluate_hellaswag(model, tokenizer, examples, show_progress=False, return_predictions=True)
    got = evaluate_hellaswag(ours, tokenizer, examples, show_progress=False, return_predictions=True)
    for a, b in zip(expected.pop("predictions"), got.pop("predictions")):
        assert (a["pred"], a["pred_norm"]) == (b["pred"], b["pred_norm"])
        torch.testing.assert_close(a["ending_nll"], b["ending_nll"], atol=2e-4, rtol=1e-5)
    assert got == expected


def test_metric_loads_offline_from_an_installed_module(tmp_path):
    """From a folder outside the checkout, with no Hub and an empty evaluate module cache: the module is found as
    installed (setup.cfg's py_modules) next to eval_hellaswag, which loads it from there."""
    code = ("import importlib.util as u, evaluate, numpy as np, pathlib; "
            "path = pathlib.Path(u.find_spec('hellaswag_accuracy').origin); "
            "assert path.parent == pathlib.Path(u.find_spec('eval_hellaswag').origin).parent, path; "
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_give_the_same_totals_as_one(tmp_path, model, model_dir, tokenizer):
    """9 examples over 2 processes: shares of 5 and 4, each scored once, gathered once."""
    data_file = write_hub_parquet(tmp_path / "val.parquet", make_records(9))
    output = tmp_path / "out" / "result.json"
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    accelerate = Path(sys.executable).with_name("accelerate")
    out = subprocess.run(
        [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
         str(SCRIPT), "--model", str(model_dir), "--data_file", str(data_file), "--batch_size", "2",
         "--output_json", str(output)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("HellaSwag completion (9 examples") == 1  # printed by the main process only
    two = json.loads(output.read_text())
    one = evaluate_hellaswag(model, tokenizer, load_hellaswag(str(data_file)), show_progress=False,
                             return_predictions=True)
    for key in ("acc", "acc_norm", "correct", "correct_norm", "count"):
        assert two[key] == one[key], key
    assert [(p["index"], p["pred"], p["pred_norm"]) for p in two["predictions"]] == \
        [(p["index"], p["pred"], p["pred_norm"]) for p in one["predictions"]]
