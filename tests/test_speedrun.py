"""The speedrun recipe: each architecture option of GPT2ReproConfig against the model's own contract (the chunked loss
equals the full-logits loss, cached generation equals uncached, save -> fresh-process load), rotary positions, the
Muon grouping and schedule of train_accelerate.py, and an exactly resumable speedrun training run."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
from test_model import BLOCK_OUR_MODULES

import train_accelerate
from configuration_gpt2repro import GPT2ReproConfig
from gpt2repro.optimization import configure_muon, get_lr, peak_lr
from gpt2repro.recipes import PRESETS, as_flags
from modeling_gpt2repro import GPT2ReproForCausalLM, apply_rotary, rotary_cos_sin
from train_helpers import (
    GRAPH_BREAK_LOG,
    TINY_RUN,
    final_weights,
    graph_breaks,
    records,
    run_main,
    run_training,
    train_here,
)

TINY = dict(n_layer=2, n_head=4, n_embd=64, n_positions=64)
OPTIONS = {  # one option at a time, then all of them as the speedrun recipe sets them
    "rope": dict(position_embedding="rope"),
    "qk_norm": dict(qk_norm=True),
    "relu2": dict(mlp_activation="relu2"),
    "rmsnorm": dict(norm="rmsnorm"),
    "untied": dict(tie_word_embeddings=False),
    "softcap": dict(logit_softcap=2.0),  # small enough that the cap really bends these logits
    "zero_init": dict(zero_init_residual=True),
    "no_bias": dict(bias=False),
    "speedrun": dict(position_embedding="rope", qk_norm=True, mlp_activation="relu2", norm="rmsnorm",
                     tie_word_embeddings=False, logit_softcap=2.0, zero_init_residual=True, bias=False),
}


def model_with(options: dict) -> GPT2ReproForCausalLM:
    """A tiny model with `options`; zero-initialised weights get random values, so every path carries signal."""
    torch.manual_seed(0)
    model = GPT2ReproForCausalLM(GPT2ReproConfig(**TINY, **options))
    with torch.no_grad():
        for param in model.parameters():
            if not param.any():
                param.normal_(0.0, 0.3)
    return model


@pytest.mark.parametrize("name", OPTIONS)
def test_chunked_loss_and_gradients_equal_the_full_logits_ones(name):
    model = model_with(OPTIONS[name]).train()
    x, y = torch.randint(0, 50257, (2, 2, 24)).unbind(0)
    chunked = model(input_ids=x, shift_labels=y, return_logits=False).loss
    chunked.backward()
    chunked_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    full = model(input_ids=x, shift_labels=y).loss
    full.backward()
    assert torch.isfinite(full) and chunked.item() == pytest.approx(full.item(), rel=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(chunked_grads[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)
        assert p.grad.abs().sum() > 0, f"{n} gets no gradient"


@pytest.mark.parametrize("name", OPTIONS)
def test_cached_generation_equals_uncached_also_batched_and_left_padded(name):
    model = model_with(OPTIONS[name]).eval()
    prompt = torch.randint(0, 50257, (2, 10))
    greedy = model.generate(prompt, max_new_tokens=24, do_sample=False, pad_token_id=50256)  # past 2x the prompt
    ids = prompt
    with torch.no_grad():
        for _ in range(24):
            ids = torch.cat([ids, model(input_ids=ids, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(greedy, ids)
    # row 0 left-padded by 4: it must generate what it generates alone
    mask = torch.ones_like(prompt)
    mask[0, :4] = 0
    batched = model.generate(prompt, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=50256)
    alone = model.generate(prompt[:1, 4:], max_new_tokens=12, do_sample=False, pad_token_id=50256)
    assert torch.equal(batched[0, 4:], alone[0])
    # transformers' StaticCache (preallocated, its empty slots masked) and the eager attention: the same tokens
    static = model.generate(prompt, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=50256,
                            cache_implementation="static")
    assert torch.equal(static, batched)
    model.set_attn_implementation("eager")
    assert torch.equal(model.generate(prompt, attention_mask=mask, max_new_tokens=12, do_sample=False,
                                      pad_token_id=50256), batched)


@pytest.mark.parametrize("recipe", ["gpt2", "speedrun"])
def test_attention_kernels_agree(recipe):
    """Every kernel of transformers' attention interface that runs on a CPU gives sdpa's logits, padded or not, and on
    top of a cache. Not flex with a padding mask (generate() of transformers 5.4 passes one even unpadded): torch
    2.13's CPU flex template fails to compile it (a C++ error, `cur_kvSplitSize0` not declared), for transformers'
    own Llama alike."""
    model = model_with(OPTIONS.get(recipe, {})).eval()
    x = torch.randint(0, 50257, (3, 20), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(x)
    mask[0, :5] = 0  # left padding
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)

    def logits(padded: bool) -> list[torch.Tensor]:
        with torch.no_grad():
            first = model(x[:, :12], use_cache=True)
            cache = first.cache if hasattr(first, "cache") else first.past_key_values
            results = [model(x).logits, model(x[:, 12:], cache=cache).logits]  # a multi-token chunk on a cache
            if padded:
                results.append(model(x, attention_mask=mask, position_ids=position_ids).logits[mask.bool()])
            return results

    sdpa = logits(padded=True)
    for name in ("eager", "flex_attention"):
        model.set_attn_implementation(name)
        for ours, ref in zip(logits(padded=name != "flex_attention"), sdpa, strict=False):
            torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0, msg=name)


@pytest.mark.parametrize("recipe", ["gpt2", "speedrun"])
def test_compiled_static_cache_decoding_equals_dynamic(recipe):
    """generate() with a StaticCache and its decoding step compiled whole (fullgraph: a graph break raises), as it runs
    by default on a GPU; here the compile is asked for (`_compile_all_devices`, transformers' switch for other
    devices). Left-padded rows included: the tokens of the dynamic cache."""
    from transformers import CompileConfig

    model = model_with(OPTIONS.get(recipe, {})).eval()
    prompt = torch.randint(0, 50257, (2, 10), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(prompt)
    mask[0, :4] = 0
    kw = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=50256)
    compile_config = CompileConfig(fullgraph=True)
    compile_config._compile_all_devices = True
    torch._dynamo.reset()
    compiled = model.generate(prompt, cache_implementation="static", compile_config=compile_config, **kw)
    assert torch.equal(compiled, model.generate(prompt, **kw))


def test_save_and_fresh_process_load_give_equal_logits(tmp_path):
    """Every option's model, saved and loaded with AutoModelForCausalLM in a process that cannot import our modules."""
    x = torch.randint(0, 50257, (1, 12))
    expected = {}
    for name, options in OPTIONS.items():
        model = model_with(options).eval()
        model.save_pretrained(tmp_path / name)
        with torch.no_grad():
            expected[name] = model(input_ids=x).logits
    script = BLOCK_OUR_MODULES + (
        "import json, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        "x = torch.tensor(json.loads(sys.argv[2]))\n"
        "for name in sys.argv[3:]:\n"
        "    model = AutoModelForCausalLM.from_pretrained(f'{sys.argv[1]}/{name}', trust_remote_code=True).eval()\n"
        "    with torch.no_grad():\n"
        "        torch.save(model(input_ids=x).logits, f'{sys.argv[1]}/{name}.pt')\n")
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path), json.dumps(x.tolist()), *OPTIONS],
                            cwd=tmp_path, capture_output=True, text=True, timeout=240,
                            env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=""))
    assert result.returncode == 0, result.stderr[-3000:]
    for name in OPTIONS:
        torch.testing.assert_close(torch.load(tmp_path / f"{name}.pt"), expected[name], msg=name)


def test_rotary_scores_depend_on_the_distance_only():
    """q at position m and k at position n score q_m . k_n as a function of m - n: shifting both changes nothing."""
    q, k = torch.randn(2, 1, 1, 1, 16).unbind(0)  # (B, nh, T=1, hs)
    scores = []
    for m, n in ((5, 2), (42, 39), (3, 0)):
        q_m = apply_rotary(q, *rotary_cos_sin(torch.tensor([[m]]), 16, 10000.0))
        k_n = apply_rotary(k, *rotary_cos_sin(torch.tensor([[n]]), 16, 10000.0))
        scores.append((q_m * k_n).sum())
    torch.testing.assert_close(scores[0], scores[1])
    torch.testing.assert_close(scores[0], scores[2])
    q_5 = apply_rotary(q, *rotary_cos_sin(torch.tensor([[5]]), 16, 10000.0))
    k_40 = apply_rotary(k, *rotary_cos_sin(torch.tensor([[40]]), 16, 10000.0))
    assert not torch.allclose(scores[0], (q_5 * k_40).sum())  # another distance, another score


def test_rope_model_has_no_position_table_and_packed_positions_restart():
    """A row of two packed sequences with position ids restarting at the second gives that sequence's logits alone
    (HellaSwag packs its endings so), given a mask that keeps the two apart."""
    model = model_with(OPTIONS["rope"]).eval()
    assert model.transformer.wpe is None and not any("wpe" in n for n, _ in model.named_parameters())
    a, b = torch.randint(0, 50257, (1, 6)), torch.randint(0, 50257, (1, 5))
    packed = torch.cat([a, b], dim=1)
    positions = torch.cat([torch.arange(6), torch.arange(5)])[None]
    causal = torch.ones(11, 11, dtype=torch.bool).tril()
    causal[6:, :6] = False  # b does not see a
    with torch.no_grad():
        together = model(input_ids=packed, position_ids=positions, attention_mask=causal[None, None]).logits
        alone = model(input_ids=b).logits
    torch.testing.assert_close(together[:, 6:], alone, rtol=1e-4, atol=1e-5)


def test_to_gpt2_refuses_a_speedrun_model_in_one_line():
    with pytest.raises(ValueError) as error:
        model_with(OPTIONS["speedrun"]).to_gpt2()
    message = str(error.value)
    assert "\n" not in message and "position_embedding='rope'" in message and "logit_softcap=2.0" in message
    model_with(OPTIONS["zero_init"]).to_gpt2()  # an initialisation, not an architecture: exports


def test_config_refuses_unknown_options():
    with pytest.raises(ValueError, match="norm must be one of 'layernorm', 'rmsnorm'"):
        GPT2ReproConfig(norm="batchnorm")
    with pytest.raises(ValueError, match="logit_softcap must be positive"):
        GPT2ReproConfig(logit_softcap=0.0)


@pytest.mark.parametrize("recipe", ["gpt2", "speedrun"])
def test_compiled_training_forward_and_loss_are_one_graph_equal_to_eager(recipe):
    """torch.compile(fullgraph=True) of the training forward + loss: one graph (a break would raise), and the loss
    and gradients of eager's chunked loss. The graphs are counted by a backend of our own that runs them as traced."""
    model = model_with(OPTIONS.get(recipe, {}))
    x = torch.randint(0, 50257, (2, 32), generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 50257, (2, 32), generator=torch.Generator().manual_seed(2))
    y[0, :5] = -100  # ignored targets

    def loss_and_gradients(forward) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        loss = forward(input_ids=x, shift_labels=y, return_logits=False).loss
        loss.backward()
        return loss.detach(), [p.grad for p in model.parameters()]

    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    torch._dynamo.reset()
    eager_loss, eager_grads = loss_and_gradients(model)
    compiled_loss, compiled_grads = loss_and_gradients(torch.compile(model, backend=counting_backend,
                                                                     fullgraph=True))
    assert len(graphs) == 1
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-6, atol=0)
    for compiled, eager in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-6)


def test_muon_gets_every_block_matrix_and_nothing_else():
    settings = train_accelerate.parse_args(["--recipe", "speedrun"])
    architecture = settings.model.architecture()
    model = GPT2ReproForCausalLM(GPT2ReproConfig(**TINY, **{k: architecture[k] for k in OPTIONS["speedrun"]}))
    optim = settings.optim
    muon, adamw = configure_muon(model, optim.muon_momentum, optim.weight_decay, (optim.beta1, optim.beta2),
                                 optim.adam_eps, "cpu")
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    in_muon = {id(p) for group in muon.param_groups for p in group["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    expected = {id(p) for n, p in model.named_parameters() if n.startswith("transformer.h.") and p.dim() == 2}
    assert in_muon == expected and len(expected) == 4 * TINY["n_layer"]  # c_attn, attn c_proj, c_fc, mlp c_proj
    parts = {names[id(p)]: group["parts"] for group in muon.param_groups for p in group["params"]}
    assert {name for name, n in parts.items() if n == 3} == {f"transformer.h.{i}.attn.c_attn.weight"
                                                             for i in range(TINY["n_layer"])}  # q, k, v apart
    assert set(parts.values()) == {1, 3}
    in_adamw = [names[id(p)] for group in adamw.param_groups for p in group["params"]]
    assert sorted(in_adamw) == sorted(n for p_id, n in names.items() if p_id not in expected)
    groups = [group for optimizer in (muon, adamw) for group in optimizer.param_groups]
    lrs = {group["name"]: peak_lr(group["name"], optim, settings.schedule)[0] for group in groups}
    assert lrs == {"muon": 0.04, "embeddings": 0.6, "head": 0.008}  # no biases or gains: no "adamw" group


def test_recipe_values_are_defaults_that_flags_and_presets_override():
    settings = train_accelerate.parse_args(["--recipe", "speedrun", "--muon_lr", "0.02", "--no-qk_norm",
                                            "--logit_softcap", "none"])
    assert (settings.optim.optimizer, settings.schedule.lr_schedule, settings.model.position_embedding) == \
        ("muon", "trapezoid", "rope")
    assert settings.optim.muon_lr == 0.02 and settings.model.qk_norm is False and settings.model.logit_softcap is None
    demo = train_accelerate.parse_args(["--preset", "cpu-demo-speedrun"])
    assert demo.model.n_embd == 64 and demo.optim.optimizer == "muon" and demo.recipe == "speedrun"
    assert demo.optim.embed_lr == PRESETS["cpu-demo-speedrun"]["embed_lr"] == 0.3  # the preset's, not the recipe's
    assert demo.model.logit_softcap is None  # the preset unsets the recipe's cap; a flag sets it back
    capped = train_accelerate.parse_args(["--preset", "cpu-demo-speedrun", "--logit_softcap", "30"])
    assert capped.model.logit_softcap == 30.0
    # what --help prints for the preset, given as flags, is the same run
    shown = as_flags(PRESETS["cpu-demo-speedrun"])
    assert "--logit_softcap none" in shown and shown in " ".join(train_accelerate.build_parser().format_help().split())
    assert dataclasses.replace(train_accelerate.parse_args(shown.split()), preset="cpu-demo-speedrun") == demo
    with pytest.raises(SystemExit):  # a preset names its recipe: cpu-demo-speedrun is the way to the speedrun's
        train_accelerate.parse_args(["--preset", "cpu-demo", "--recipe", "speedrun"])
    assert train_accelerate.parse_args(["--preset", "speedrun-124m"]).recipe == "speedrun"
    gpt2 = train_accelerate.parse_args([])
    assert (gpt2.optim.optimizer, gpt2.schedule.lr_schedule, gpt2.model.tie_word_embeddings,
            gpt2.model.logit_softcap) == ("adamw", "cosine", True, None)


def test_trapezoid_schedule():
    lr = [get_lr(s, 1.0, 0.0, 2, 10, "trapezoid", 0.3) for s in range(11)]
    assert lr == pytest.approx([0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 2 / 3, 1 / 3, 0.0])


@pytest.fixture(scope="module")
def speedrun_workspace(tiny_data):
    data_dir, _ = tiny_data
    root = data_dir.parent
    args = TINY_RUN + ["--data_dir", str(data_dir), "--recipe", "speedrun", "--micro_batch_size", "4", "--max_steps",
                       "8", "--no-hellaswag", "--num_samples", "0", "--logit_softcap", "15", "--muon_lr", "0.02",
                       "--embed_lr", "0.05", "--head_lr", "0.01", "--adamw_lr", "0.01"]
    return root, args


def test_speedrun_run_trains_and_resumes_exactly(speedrun_workspace, capsys):
    """8 steps straight, and a run resumed from the straight run's step-4 checkpoint: the same weights bit for bit
    (Muon's momentum and both optimisers' states are in the checkpoint); the zero-initialised head and projections
    train; the LR follows the schedule."""
    root, args = speedrun_workspace
    status, out, err = run_main(train_accelerate.main, args + ["--output_dir", str(root / "straight")], capsys)
    assert status == 0, err
    assert "peak LR: muon 0.02, embeddings 0.05, head 0.01\n" in out  # every group's, said at start
    checkpoint = root / "straight" / "checkpoints" / "step_000004"
    status, _, err = run_main(train_accelerate.main, args + ["--output_dir", str(root / "resumed"),
                                                             "--resume_from_checkpoint", str(checkpoint)], capsys)
    assert status == 0, err
    straight, resumed = final_weights(root / "straight", 8), final_weights(root / "resumed", 8)
    assert straight.keys() == resumed.keys() and "lm_head.weight" in straight  # untied: saved on its own
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    assert straight["lm_head.weight"].abs().max() > 0 and straight["transformer.h.0.mlp.c_proj.weight"].abs().max() > 0
    train = records(root / "straight", "train")
    assert [r["lr"] for r in train] == [get_lr(s, 0.02, 0.0, 2, 8, "trapezoid", 0.3) for s in range(8)]


def test_speedrun_on_two_processes_equals_one_with_twice_the_accumulation(speedrun_workspace):
    """DDP (gloo, 2 CPU processes) with Muon: the same losses, grad norms and val losses as one process with twice
    the accumulation. The weights agree less tightly than AdamW's in test_train_runs, as they do between accumulation
    and one big batch on a single process: Newton-Schulz lifts a gradient's float-noise directions (singular values
    ~1e-7 of the largest) ~500x, and Adam turns noise-level gradients into LR-sized steps. Measured here: 1e-4 to
    2e-2 largest differences, at LRs of 2e-3 and 5e-3. Compiled (--compile on, as `auto` resolves it on GPUs: the
    forward compiled whole inside DDP), the 2 processes train as eager ones do (1e-4), with no graph break."""
    root, args = speedrun_workspace
    args = args + ["--micro_batch_size", "2", "--muon_lr", "0.002", "--embed_lr", "0.005", "--head_lr", "0.001",
                   "--adamw_lr", "0.001"]  # the last value given wins: 4 micro-steps on 1 process, 2 on 2
    train_here(args + ["--output_dir", str(root / "one")])
    run_training(args + ["--output_dir", str(root / "two")], processes=2)
    compiled = run_training(args + ["--output_dir", str(root / "compiled"), "--compile", "on"], processes=2,
                            env=GRAPH_BREAK_LOG)
    assert "compile on" in compiled.stdout and graph_breaks(compiled.stderr) == []
    for record_type, keys in (("train", ("loss", "grad_norm")), ("eval", ("val_loss",))):
        one, two = records(root / "one", record_type), records(root / "two", record_type)
        for key in keys:
            assert [r[key] for r in two] == pytest.approx([r[key] for r in one], rel=1e-5), key
            assert [r[key] for r in records(root / "compiled", record_type)] == pytest.approx([r[key] for r in two],
                                                                                             rel=1e-4), key
    weights, reference = final_weights(root / "two", 8), final_weights(root / "one", 8)
    for name in reference:
        torch.testing.assert_close(weights[name], reference[name], rtol=0, atol=0.05, msg=name)  # 10 embedding steps
