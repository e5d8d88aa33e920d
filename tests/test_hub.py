"""Pushes to the Hub and resuming from it, against tests/hub_standin.py (HfApi replaced up to its HTTP calls; what was
pushed read back by huggingface_hub's and transformers' own download code, offline): every --hub_strategy, a tag
per pushed step that from_pretrained loads by revision, the card's model-index, a 2-process run resumed from its
pushed last-checkpoint/ ending as the uninterrupted run, and the one-line refusals."""
from __future__ import annotations

import json
import os
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import train_accelerate
from gpt2repro import hub as gpt2repro_hub
from hub_standin import HubStandIn
from train_helpers import (
    REPO,
    TINY_MODEL,
    TINY_RUN,
    final_weights,
    records,
    run_main,
    run_training,
    run_wrapper,
    the_error_line,
)

REPO_ID = "tester/tiny-gpt2repro"
MODEL_FILES = {"config.json", "model.safetensors", "modeling_gpt2repro.py", "configuration_gpt2repro.py",
               "tokenizer.json", "README.md", "generation_config.json"}


@pytest.fixture
def hub(tmp_path, monkeypatch) -> HubStandIn:
    """The stand-in as HfApi, and its folder as the Hub cache that downloads read (offline: conftest)."""
    standin = HubStandIn(tmp_path / "hub", hold_first_commit_until=tmp_path / "out" / "checkpoints" / "step_000002")
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda *args, **kwargs: standin)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(standin.root))
    return standin


def files(tree: Path) -> set[str]:
    return {str(p.relative_to(tree)) for p in tree.rglob("*") if p.is_file()}


@pytest.mark.parametrize("strategy", ["end", "every_save", "checkpoint", "all_checkpoints"])
def test_each_hub_strategy_pushes_in_the_background_and_tags_every_step(tiny_data, tmp_path, capsys, hub,
                                                                         fresh_accelerate, strategy):
    data_dir, _ = tiny_data
    output_dir = tmp_path / "out"
    status, _, err = run_main(train_accelerate.main, TINY_MODEL + [
        "--data_dir", str(data_dir), "--output_dir", str(output_dir), "--micro_batch_size", "8",
        "--total_batch_size", "256", "--max_steps", "2", "--checkpoint_every", "1", "--keep_checkpoints", "1",
        "--eval_every", "100", "--val_tokens", "100", "--mixed_precision", "no", "--no-hellaswag",
        "--num_samples", "0", "--push_to_hub", "--hub_model_id", REPO_ID, "--hub_private_repo",
        *(["--hub_strategy", strategy] if strategy != "every_save" else [])], capsys)  # every_save: the default
    assert status == 0, err
    assert hub.calls[:3] == [("whoami",), ("create_repo", REPO_ID, True), ("auth_check", REPO_ID, True)]
    pushed = [1, 2] if strategy != "end" else [2]
    commits = hub.commits(REPO_ID)
    assert [c["message"] for c in commits] == [f"step {s}: {256 * s} tokens" for s in pushed]
    # the first push lasted until step 2's checkpoint was written: training went on meanwhile
    assert commits[0]["held_until_ready"]
    assert hub.refs(REPO_ID) == {"main": commits[-1]["oid"],
                                 **{f"step_{s:06d}": c["oid"] for s, c in zip(pushed, commits, strict=True)}}
    for step in pushed:
        tree = hub.tree(REPO_ID, f"step_{step:06d}")
        state = {f"last-checkpoint/{name}" for name in files(output_dir / "checkpoints" / "step_000002")
                 if not name.startswith("hf/")}
        assert MODEL_FILES <= {name for name in files(tree) if "/" not in name}
        assert not {"trainer_state.json", "training_state", "hf"} & {p.name for p in tree.iterdir()}
        has_state = strategy in ("checkpoint", "all_checkpoints")
        assert (tree / "last-checkpoint").is_dir() == has_state
        if has_state:  # this step's training state, whole: what a resume checks
            assert {name for name in files(tree) if name.startswith("last-checkpoint/")} == state
            assert json.loads((tree / "last-checkpoint" / "trainer_state.json").read_text())["step"] == step
        kept = sorted(p.name for p in (tree / "checkpoints").iterdir()) if (tree / "checkpoints").exists() else []
        assert kept == ([f"step_{s:06d}" for s in range(1, step + 1)] if strategy == "all_checkpoints" else [])
        # the step loads by its tag, as a user loads it
        model = AutoModelForCausalLM.from_pretrained(REPO_ID, revision=f"step_{step:06d}", trust_remote_code=True)
        expected = load_file(tree / "model.safetensors")
        assert all(torch.equal(model.state_dict()[name], value) for name, value in expected.items())
    assert final_weights(output_dir, 2).keys() == load_file(hub.tree(REPO_ID) / "model.safetensors").keys()
    assert [p.name for p in (output_dir / "checkpoints").iterdir()] == ["step_000002"]  # pruned after its upload
    if strategy == "every_save":  # no training state pushed: nothing to resume from, in one line
        status, _, err = run_main(train_accelerate.main, TINY_RUN + [
            "--data_dir", str(data_dir), "--output_dir", str(tmp_path / "resumed"), "--micro_batch_size", "8",
            "--resume_from_checkpoint", REPO_ID], capsys)
        assert status == 1 and the_error_line(err) == (
            f"error: {REPO_ID} on the Hub has no last-checkpoint/ folder to resume from: a run pushes one with "
            f"--hub_strategy checkpoint or all_checkpoints")


def test_the_card_carries_model_index_with_the_steps_evaluation(tiny_data, tmp_path, capsys, fresh_accelerate):
    data_dir, hellaswag_file = tiny_data
    output_dir = tmp_path / "out"
    status, _, err = run_main(train_accelerate.main, TINY_MODEL + [
        "--data_dir", str(data_dir), "--output_dir", str(output_dir), "--micro_batch_size", "8",
        "--total_batch_size", "256", "--max_steps", "2", "--eval_every", "2", "--val_tokens", "100",
        "--mixed_precision", "no", "--hellaswag_file", str(hellaswag_file), "--hellaswag_limit", "3",
        "--num_samples", "0", "--hub_model_id", REPO_ID], capsys)
    assert status == 0, err
    card = ModelCard.load(output_dir / "checkpoints" / "step_000002" / "hf" / "README.md")
    evaluation = records(output_dir, "eval")[-1]
    assert evaluation["step"] == 2
    results = {result.metric_type: result for result in card.data.eval_results}
    assert results["loss"].metric_value == round(evaluation["val_loss"], 4)
    assert results["acc_norm"].metric_value == round(evaluation["hellaswag_acc_norm"], 4)
    assert results["acc_norm"].dataset_type == "Rowan/hellaswag" and results["loss"].dataset_split == "validation"
    assert card.data.model_name == "tiny-gpt2repro" and card.data.tokens_seen == 512
    assert card.data.library_name == "transformers" and "gpt2repro" in card.data.tags
    assert f"| val loss (100 tokens, step 2) | {evaluation['val_loss']:.4f} |" in card.text


def test_push_to_hub_without_token_fails_before_training(tiny_data, tmp_path, capsys, hub, fresh_accelerate):
    def no_token(*args, **kwargs):
        raise OSError("Invalid user token.\nmore detail")

    hub.whoami = no_token
    data_dir, _ = tiny_data
    status, _, err = run_main(train_accelerate.main, TINY_RUN + [
        "--data_dir", str(data_dir), "--output_dir", str(tmp_path), "--micro_batch_size", "8",
        "--push_to_hub", "--hub_model_id", REPO_ID], capsys)
    assert status == 1
    assert err.strip() == ("error: --push_to_hub needs a Hugging Face token and a reachable Hub (run `hf auth login` "
                           "or set HF_TOKEN): Invalid user token.")
    assert hub.commits(REPO_ID) == [] and not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.parametrize("reference", ["tester/unknown", "tester/unknown@step_000004"])
def test_resume_from_the_hub_offline_fails_in_one_line_before_any_compute(tiny_data, tmp_path, capsys, monkeypatch,
                                                                          fresh_accelerate, reference):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    data_dir, _ = tiny_data
    status, _, err = run_main(train_accelerate.main, TINY_RUN + [
        "--data_dir", str(data_dir), "--output_dir", str(tmp_path / "out"), "--micro_batch_size", "8",
        "--resume_from_checkpoint", reference], capsys)
    assert status == 1
    assert err.strip().startswith(f"error: cannot download the training state of {reference} from the Hub: Cannot "
                                  f"find an appropriate cached snapshot folder"), err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out" / "metrics.jsonl").exists()


@pytest.mark.parametrize("flag", [["--hub_strategy", "checkpoint"], ["--hub_private_repo"]])
def test_hub_flags_without_push_to_hub_are_refused(capsys, flag):
    with pytest.raises(SystemExit):
        train_accelerate.parse_args(flag)
    assert f"error: {flag[0]} is for --push_to_hub, which is not set" in capsys.readouterr().err


PUSHING_RUN = """
import os, sys
import huggingface_hub
sys.path.insert(0, os.environ["TESTS"])
from hub_standin import HubStandIn
huggingface_hub.HfApi = HubStandIn
import train_accelerate
train_accelerate.main(sys.argv[1:])
"""


def test_a_two_process_run_resumes_from_its_pushed_checkpoint_exactly(tiny_data, tmp_path):
    data_dir, hellaswag_file = tiny_data
    args = TINY_RUN + ["--data_dir", str(data_dir), "--micro_batch_size", "4", "--max_steps", "8",
                       "--eval_every", "4", "--hellaswag_file", str(hellaswag_file), "--num_samples", "0"]
    pushed, store = tmp_path / "pushed", tmp_path / "hub"
    run_wrapper(PUSHING_RUN, tmp_path / "pushing_run.py", args + [
        "--output_dir", str(pushed), "--push_to_hub", "--hub_model_id", REPO_ID, "--hub_strategy", "checkpoint"],
        STANDIN_HUB=str(store), TESTS=str(REPO / "tests"))
    hub = HubStandIn(store)
    step_4 = hub.tree(REPO_ID, "step_000004") / "last-checkpoint"
    assert {p.name for p in (step_4 / "distributed_state").iterdir()} >= {"__0_0.distcp", "__1_0.distcp"}
    assert {"loader_rank0.json", "loader_rank1.json"} <= {p.name for p in step_4.iterdir()}
    card = ModelCard.load(hub.tree(REPO_ID, "step_000004") / "README.md")
    evaluation = next(r for r in records(pushed, "eval") if r["step"] == 4)
    assert {r.metric_type: r.metric_value for r in card.data.eval_results} == {
        "loss": round(evaluation["val_loss"], 4), "acc_norm": round(evaluation["hellaswag_acc_norm"], 4)}

    # A fresh run, elsewhere, from the Hub's step 4 (read offline from the stand-in's folder as from the Hub cache)
    resumed = tmp_path / "resumed"
    run = run_training(args + ["--output_dir", str(resumed), "--resume_from_checkpoint", f"{REPO_ID}@step_000004"],
                       processes=2, env={"HF_HUB_CACHE": str(store)})
    assert f"resuming at step 4 from {step_4}" in run.stdout + run.stderr
    assert records(resumed, "eval")[-1] == records(pushed, "eval")[-1]
    weights, expected = final_weights(resumed, 8), final_weights(pushed, 8)
    assert all(torch.equal(weights[name], expected[name]) for name in expected)
    assert os.path.samefile(hub.tree(REPO_ID, "main"), hub.tree(REPO_ID, "step_000008"))


def test_the_card_names_the_hub_dataset_the_shards_were_made_from(tmp_path):
    assert gpt2repro_hub.training_dataset(str(tmp_path)) is None  # no manifest: local shards of unknown origin
    (tmp_path / "manifest.json").write_text(json.dumps(
        {"source": {"dataset": "HuggingFaceFW/fineweb-edu", "config": "sample-10BT"}, "shards": []}))
    assert gpt2repro_hub.training_dataset(str(tmp_path)) == "HuggingFaceFW/fineweb-edu"
    for source in ({"data_files": ["corpus.jsonl"]}, {"dataset": "embedded"}):
        (tmp_path / "manifest.json").write_text(json.dumps({"source": source, "shards": []}))
        assert gpt2repro_hub.training_dataset(str(tmp_path)) is None
