"""train_accelerate.py in-process: the recipe's numbers, one training step against a hand-written reference
(torch's cross_entropy, clip_grad_norm_ and AdamW), user errors and non-finite stop
(the Hub's pushes: test_hub.py)."""
from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from accelerate.utils import DistributedType
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import train_accelerate
from configuration_gpt2repro import GPT2ReproConfig
from gpt2repro import hellaswag_data, launch, optimization, training
from gpt2repro.data_loader import BatchPrefetcher, ShardedTokenLoader
from gpt2repro.hellaswag_data import HellaSwagUnavailable
from gpt2repro.metrics_log import MetricsLog, tracker_config
from gpt2repro.run_control import TrainingError
from gpt2repro.shards import list_shards, open_shard
from modeling_gpt2repro import GPT2ReproForCausalLM
from train_helpers import SEED, TINY_MODEL, TINY_RUN, final_weights, records, run_main


def test_lr_schedule_is_build_nanogpt_formula():
    def lr(step):
        return optimization.get_lr(step, max_lr=6e-4, min_lr=6e-5, warmup_steps=715, max_steps=19073)

    def cosine(step):  # the recipe's formula, written out
        return 6e-5 + 0.5 * (1 + math.cos(math.pi * (step - 715) / (19073 - 715))) * (6e-4 - 6e-5)

    assert lr(0) == pytest.approx(6e-4 / 715)  # warmup starts at max_lr / warmup, not 0
    assert lr(357) == pytest.approx(6e-4 * 358 / 715)
    assert lr(714) == pytest.approx(6e-4)  # last warmup step
    assert lr(715) == pytest.approx(6e-4)  # the cosine starts at the top
    assert lr(9894) == pytest.approx((6e-4 + 6e-5) / 2)  # half way: cos(pi / 2) = 0
    for step in (1000, 5000, 12345, 19000):
        assert lr(step) == pytest.approx(cosine(step))
    assert lr(19072) == pytest.approx(6e-5, rel=1e-4)
    assert lr(19073) == lr(50000) == 6e-5


def test_gradient_accumulation_steps_is_total_over_micro_times_world():
    assert training.gradient_accumulation_steps(2**19, 64, 1024, 1) == 8  # build-nanogpt on one GPU
    assert training.gradient_accumulation_steps(2**19, 64, 1024, 8) == 1  # and on 8
    with pytest.raises(TrainingError, match="not a multiple"):
        training.gradient_accumulation_steps(2**19, 48, 1024, 1)


def test_weight_decay_only_on_matrices_and_embeddings(tiny_config):
    model = GPT2ReproForCausalLM(tiny_config)
    optimizer = optimization.configure_optimizer(model, 0.1, (0.9, 0.95), 1e-8, "cpu")
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0.1 for p in g["params"]}
    for name, p in model.named_parameters():  # named_parameters lists the tied wte/lm_head matrix once
        assert (id(p) in decayed) == (p.dim() >= 2), name
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))
    assert optimizer.defaults["betas"] == (0.9, 0.95) and optimizer.defaults["eps"] == 1e-8
    assert optimizer.defaults["fused"]


def test_one_step_equals_hand_computed_reference(tiny_data, tmp_path, capsys, fresh_accelerate):
    """Step 0 (4 micro-batches of 2 x 32): loss, grad norm, the updated weights and the val loss before and
    after, against torch's cross_entropy over 8 rows at once, clip_grad_norm_ and a plain AdamW step."""
    data_dir, _ = tiny_data
    max_lr, weight_decay = 1e-2, 0.5  # large, so a wrong LR or decay group shows far above float noise
    status, _, err = run_main(train_accelerate.main, TINY_MODEL + [
        "--data_dir", str(data_dir), "--output_dir", str(tmp_path), "--micro_batch_size", "2",
        "--total_batch_size", "256", "--max_steps", "1", "--warmup_steps", "1", "--max_lr", str(max_lr),
        "--weight_decay", str(weight_decay), "--eval_every", "1", "--val_tokens", "1000", "--mixed_precision", "no",
        "--seed", str(SEED), "--no-hellaswag", "--num_samples", "0"], capsys)
    assert status == 0, err
    [train_record] = records(tmp_path, "train")
    evals = records(tmp_path, "eval")

    torch.manual_seed(SEED)  # the run's initial weights are those its seed gives
    model = GPT2ReproForCausalLM(GPT2ReproConfig(n_positions=32, n_layer=2, n_head=2, n_embd=64))
    val = torch.from_numpy(open_shard(list_shards(data_dir, "val")[0])[:1000].astype("int64"))

    def val_loss() -> float:  # first 1000 val tokens: 999 targets in windows of 32 (the last one short)
        with torch.no_grad():
            losses = [F.cross_entropy(model(input_ids=val[s:s + 32][None]).logits[0, : len(val[s + 1:s + 33])],
                                      val[s + 1:s + 33], reduction="sum") for s in range(0, 999, 32)]
        return (sum(losses) / 999).item()

    assert evals[0]["val_loss"] == pytest.approx(val_loss(), rel=1e-5)
    x, y = ShardedTokenLoader(data_dir, "train", 8, 32, shuffle=True, seed=SEED).next_batch()  # the step's 8 rows
    logits = model(input_ids=x).logits  # (8, 32, 50257)
    loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
    loss.backward()
    assert train_record["loss"] == pytest.approx(loss.item(), rel=1e-6)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    assert train_record["grad_norm"] == pytest.approx(grad_norm.item(), rel=1e-5)
    assert train_record["lr"] == max_lr  # warmup 1: step 0 runs at max_lr
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    torch.optim.AdamW([{"params": matrices, "weight_decay": weight_decay}, {"params": vectors, "weight_decay": 0.0}],
                      lr=max_lr, betas=(0.9, 0.95), eps=1e-8, foreach=False, fused=False).step()
    trained = final_weights(tmp_path, 1)
    for name, p in model.named_parameters():
        # Adam's first step moves a weight by lr * g / (|g| + eps): for gradients far above float noise that is
        # the same in both; for noise-level gradients (e.g. the key biases, zero in exact arithmetic) any sign.
        reliable = p.grad.abs() > 1e-6
        torch.testing.assert_close(trained[name][reliable], p.detach()[reliable], rtol=0, atol=1e-6, msg=name)
        assert (trained[name] - p.detach()).abs().max() <= 2 * max_lr * 1.001, name
    assert evals[1]["step"] == 1 and evals[1]["val_loss"] == pytest.approx(val_loss(), rel=1e-5)


def test_train_step_accumulates_clips_and_updates_like_one_big_batch(tiny_data, tiny_config, fresh_accelerate):
    """train_step on its own: 4 micro-batches of 2 rows give the loss, grad norm and AdamW update of the 8 rows as one
    batch (torch's cross_entropy, clip_grad_norm_ and a plain AdamW); a non-finite loss stops with the weights as they
    were."""
    from accelerate import Accelerator

    data_dir, _ = tiny_data
    accelerator = Accelerator(cpu=True, mixed_precision="no")
    torch.manual_seed(SEED)
    model = GPT2ReproForCausalLM(GPT2ReproConfig(n_positions=32, n_layer=2, n_head=2, n_embd=64))
    reference = GPT2ReproForCausalLM(model.config)
    reference.load_state_dict(model.state_dict())
    optimizer = optimization.configure_optimizer(model, 0.1, (0.9, 0.95), 1e-8, "cpu")
    for group in optimizer.param_groups:
        group["lr"] = 1e-2
    model, optimizer = accelerator.prepare(model, optimizer)
    batches = BatchPrefetcher(ShardedTokenLoader(data_dir, "train", 2, 32, shuffle=True, seed=SEED))
    loss, grad_norm, flags = training.train_step(model, [optimizer], accelerator, batches, grad_accum=4,
                                                         grad_clip=0.5, flags=lambda: [1.0, 0.0])
    assert flags == [1.0, 0.0]  # summed over the one process

    x, y = ShardedTokenLoader(data_dir, "train", 8, 32, shuffle=True, seed=SEED).next_batch()  # the same 8 rows
    expected_loss = F.cross_entropy(reference(input_ids=x).logits.flatten(0, 1), y.flatten())
    expected_loss.backward()
    expected_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
    assert loss == pytest.approx(expected_loss.item(), rel=1e-6)
    assert grad_norm == pytest.approx(expected_norm.item(), rel=1e-5)
    decayed = [p for p in reference.parameters() if p.dim() >= 2]
    torch.optim.AdamW([{"params": decayed, "weight_decay": 0.1},
                       {"params": [p for p in reference.parameters() if p.dim() < 2], "weight_decay": 0.0}],
                      lr=1e-2, betas=(0.9, 0.95), eps=1e-8, foreach=False, fused=False).step()
    for (name, ours), theirs in zip(model.named_parameters(), reference.parameters(), strict=True):
        reliable = theirs.grad.abs() > 1e-6  # Adam's first step is lr * sign(g) for g far above float noise
        torch.testing.assert_close(ours.detach()[reliable], theirs.detach()[reliable], rtol=0, atol=1e-6, msg=name)
    assert all(p.grad is None for p in model.parameters())  # zeroed for the next step

    with torch.no_grad():
        model.transformer.wte.weight[0, 0] = float("nan")  # every loss is NaN from here on
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with pytest.raises(TrainingError, match="loss nan / grad norm nan is not finite"):
        training.train_step(model, [optimizer], accelerator, batches, grad_accum=4, grad_clip=0.5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), before[name], rtol=0, atol=0, equal_nan=True, msg=name)


class HostReads(TorchDispatchMode):
    """Counts the reads of a tensor's values by the host: `.item()`, `float()`, `bool()` and `if tensor` dispatch
    aten._local_scalar_dense; `.tolist()` and `.numpy()` do not dispatch, so they are counted as calls (the
    TorchFunctionMode below). On a GPU each is a stall until the device has caught up."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


class ListReads(TorchFunctionMode):
    def __init__(self, reads: HostReads):
        super().__init__()
        self.reads = reads

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.reads.count += func in (torch.Tensor.tolist, torch.Tensor.numpy)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("recipe", ["gpt2", "speedrun"])
def test_one_host_read_per_step_and_none_per_micro_step(recipe, tiny_data, tmp_path, capsys, monkeypatch,
                                                        fresh_accelerate):
    """The host reads the device once per optimiser step (loss, grad norm and signal flags together), however many
    micro-steps it has: counted from one train_step call to the next, over steps without evaluation or checkpoint."""
    data_dir, _ = tiny_data
    reads, at_step_start = HostReads(), []
    original = train_accelerate.train_step

    def counted_train_step(*args, **kwargs):
        at_step_start.append(reads.count)
        return original(*args, **kwargs)

    monkeypatch.setattr(train_accelerate, "train_step", counted_train_step)
    reads_per_step = {}
    for micro_batch_size in (8, 2):  # 1 and 4 micro-steps per step
        reads.count, at_step_start[:] = 0, []
        with reads, ListReads(reads):
            status, _, err = run_main(train_accelerate.main, TINY_RUN + [
                "--data_dir", str(data_dir), "--output_dir", str(tmp_path / str(micro_batch_size)), "--recipe", recipe,
                "--micro_batch_size", str(micro_batch_size), "--max_steps", "6", "--eval_every", "100",
                "--checkpoint_every", "100", "--no-hellaswag", "--num_samples", "0"], capsys)
        assert status == 0, err
        steps = at_step_start[1:]  # from the start of step 1 to that of step 5: steps 1..4, all without evaluation
        reads_per_step[micro_batch_size] = [b - a for a, b in zip(steps, steps[1:], strict=False)]
    assert reads_per_step[8] == reads_per_step[2] == [1] * 4, reads_per_step


def test_compiled_run_evaluates_samples_and_resumes_exactly(tiny_data, tmp_path, capsys, fresh_accelerate):
    """--compile on (inductor, one graph) on a CPU: evaluation, HellaSwag and sampling run on the eager module beside
    the compiled one (build-nanogpt's compile broke them), and a run resumed from a checkpoint ends with the weights of
    the run straight through."""
    data_dir, hellaswag_file = tiny_data
    run = TINY_RUN + ["--data_dir", str(data_dir), "--compile", "--micro_batch_size", "8", "--max_steps", "4",
                      "--eval_every", "2", "--checkpoint_every", "2", "--hellaswag_file", str(hellaswag_file),
                      "--num_samples", "2", "--sample_tokens", "4"]
    status, out, err = run_main(train_accelerate.main, run + ["--output_dir", str(tmp_path / "straight")], capsys)
    assert status == 0, err
    assert "compile on" in out
    evals = records(tmp_path / "straight", "eval")
    assert [r["step"] for r in evals] == [0, 2, 4]
    assert all(r["hellaswag_count"] == 3 and len(r["samples"]) == 2 for r in evals)
    checkpoint = tmp_path / "straight" / "checkpoints" / "step_000002"
    status, _, err = run_main(train_accelerate.main, run + ["--output_dir", str(tmp_path / "resumed"),
                                                            "--resume_from_checkpoint", str(checkpoint)], capsys)
    assert status == 0, err
    straight, resumed = final_weights(tmp_path / "straight", 4), final_weights(tmp_path / "resumed", 4)
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    assert records(tmp_path / "resumed", "eval")[-1] == evals[-1]


def test_fsdp_block_compile_is_one_graph_for_every_block_and_leaves_evaluation_eager():
    """--compile under FSDP compiles each Block's forward (compile_for_training on each): the three Blocks share one
    graph (fullgraph: a break would raise), loss and gradients are eager's, and under no_grad (evaluation, sampling
    with its KV cache) the Blocks run eager, adding no graph."""
    torch.manual_seed(0)
    model = GPT2ReproForCausalLM(GPT2ReproConfig(n_layer=3, n_head=2, n_embd=64))
    reference = copy.deepcopy(model)
    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    torch._dynamo.reset()
    for block in model.transformer.h:
        training.compile_for_training(block, {"backend": counting_backend, "fullgraph": True})
    x = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(2))
    for m in (model, reference):
        m(input_ids=x, shift_labels=y, return_logits=False).loss.backward()
    assert len(graphs) == 1
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)
    with torch.no_grad():
        assert torch.equal(model(x).logits, reference(x).logits)
    assert torch.equal(model.generate(x[:1, :4], max_new_tokens=4, do_sample=False),
                       reference.generate(x[:1, :4], max_new_tokens=4, do_sample=False))
    assert len(graphs) == 1


def test_defaults_fit_the_cpu_and_a_small_corpus(tiny_data, tmp_path, capsys, monkeypatch, fresh_accelerate):
    """No --mixed_precision and no --val_tokens: fp32 on a CPU without native bf16, and validation over the whole
    4,000-token val split (the recipe's 10,485,760 would not fit), each said in one line."""
    monkeypatch.setattr(launch, "cpu_bf16_flags", lambda: ())
    data_dir, _ = tiny_data
    argv = [a for a in TINY_RUN if a not in ("--val_tokens", "1000", "--mixed_precision", "no")]
    assert len(argv) == len(TINY_RUN) - 4
    train_accelerate.main(argv + ["--data_dir", str(data_dir), "--output_dir", str(tmp_path), "--micro_batch_size",
                                  "2", "--max_steps", "1", "--no-hellaswag", "--num_samples", "0"])
    out = capsys.readouterr().out
    assert "precision: fp32 (auto: this CPU" in out and "| mixed precision no" in out
    assert f"notice: validation uses the whole val split of {data_dir} (4,000 tokens)" in out
    card = (tmp_path / "checkpoints" / "step_000001" / "hf" / "README.md").read_text()
    assert "val loss (4,000 tokens" in card


def test_gradient_checkpointing_trains_the_same_weights(tiny_data, tmp_path, capsys, fresh_accelerate):
    data_dir, _ = tiny_data
    argv = TINY_RUN + ["--data_dir", str(data_dir), "--micro_batch_size", "2", "--max_steps", "2", "--no-hellaswag",
                       "--num_samples", "0"]
    for name, extra in (("plain", []), ("checkpointed", ["--gradient_checkpointing"])):
        status, _, err = run_main(train_accelerate.main, argv + ["--output_dir", str(tmp_path / name), *extra], capsys)
        assert status == 0, err
    assert [r["loss"] for r in records(tmp_path / "plain", "train")] == \
        [r["loss"] for r in records(tmp_path / "checkpointed", "train")]
    plain, checkpointed = final_weights(tmp_path / "plain", 2), final_weights(tmp_path / "checkpointed", 2)
    for name, tensor in plain.items():
        torch.testing.assert_close(checkpointed[name], tensor, atol=1e-7, rtol=0, msg=name)


@pytest.mark.parametrize("change, message", [
    (["--total_batch_size", "1000"], "not a multiple of micro_batch_size x seq_len x processes"),
    (["--data_dir", "no/such/folder"], "does not exist"),
    (["--val_tokens", "999999"], "use a --val_tokens between 2 and 4000"),  # the tiny val shard has 4000 tokens
    (["--n_embd", "100", "--n_head", "12"], "n_embd (100) must be divisible by n_head (12)"),
])
def test_user_errors_are_one_line_and_exit_1(change, message, tiny_data, tmp_path, capsys, fresh_accelerate):
    data_dir, _ = tiny_data
    argv = TINY_RUN + ["--data_dir", str(data_dir), "--output_dir", str(tmp_path / "out"), "--micro_batch_size", "2"]
    status, _, err = run_main(train_accelerate.main, argv + change, capsys)
    assert status == 1
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_accelerate_gradient_accumulation_is_refused(tiny_data, tmp_path, capsys, monkeypatch, fresh_accelerate):
    """`accelerate launch --gradient_accumulation_steps 4` sets this variable; the loss must not be divided twice."""
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "4")
    data_dir, _ = tiny_data
    argv = TINY_RUN + ["--data_dir", str(data_dir), "--output_dir", str(tmp_path / "out"), "--micro_batch_size", "2"]
    status, _, err = run_main(train_accelerate.main, argv, capsys)
    assert status == 1 and "Traceback" not in err
    assert err == ("error: this script derives gradient accumulation from --total_batch_size (4 micro-steps per step "
                   "here): drop accelerate launch's --gradient_accumulation_steps 4\n")
    assert not (tmp_path / "out").exists()


def test_missing_hellaswag_notice_names_the_training_flag(monkeypatch, capsys):
    def unavailable(data_file):
        raise HellaSwagUnavailable("HellaSwag validation data is not available offline: pass --data_file ...")

    monkeypatch.setattr(hellaswag_data, "load_hellaswag", unavailable)
    assert hellaswag_data.load_hellaswag_for_training(train_accelerate.parse_args([]).eval.hellaswag_file) is None
    out = capsys.readouterr().out
    assert out.startswith("notice: HellaSwag is skipped") and "--hellaswag_file" in out and "--data_file" not in out


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tiny_data, tmp_path, capsys, fresh_accelerate):
    data_dir, _ = tiny_data
    status, _, err = run_main(train_accelerate.main, TINY_RUN + [
        "--data_dir", str(data_dir), "--output_dir", str(tmp_path), "--micro_batch_size", "8",
        "--max_lr", "1e30", "--warmup_steps", "1", "--checkpoint_every", "1", "--eval_every", "100",
        "--no-hellaswag", "--num_samples", "0"], capsys)  # step 0 moves every weight by ~1e30
    assert status == 1 and "is not finite" in err and "Traceback" not in err
    trained_steps = len(records(tmp_path, "train"))
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert kept == [f"step_{trained_steps:06d}"]  # the checkpoint before the failing step, none after
    assert "weights not updated: continue from the newest checkpoint with --resume_from_checkpoint latest" in err


def test_metrics_reach_the_file_at_evaluations_and_checkpoints_not_every_step(tmp_path):
    metrics = MetricsLog(tmp_path / "metrics.jsonl", None)
    metrics.append({"type": "train", "step": 0, "loss": 10.0})
    assert (tmp_path / "metrics.jsonl").read_text() == ""  # no file write per step
    metrics.flush()  # what an evaluation and a checkpoint do
    assert records(tmp_path, "train") == [{"type": "train", "step": 0, "loss": 10.0}]


def test_reduce_overhead_under_compiled_ddp_is_refused_in_one_line(monkeypatch):
    monkeypatch.setenv("ACCELERATE_DYNAMO_MODE", "reduce-overhead")
    settings = train_accelerate.parse_args(["--total_batch_size", "1024", "--micro_batch_size", "1",
                                            "--seq_len", "512"])
    ddp = SimpleNamespace(distributed_type=DistributedType.MULTI_GPU, num_processes=2, gradient_accumulation_steps=1)
    with pytest.raises(TrainingError, match="--dynamo_mode reduce-overhead .* not supported with compiled DDP"):
        training.resolve_launch(ddp, settings, "bf16", "on")
    assert training.resolve_launch(ddp, settings, "bf16", "off").gradient_accumulation_steps == 1  # eager: allowed


def test_a_stop_on_an_error_keeps_the_records_that_led_to_it(tiny_data, tmp_path, capsys, fresh_accelerate):
    data_dir, _ = tiny_data
    status, _, err = run_main(train_accelerate.main, TINY_RUN + [
        "--data_dir", str(data_dir), "--output_dir", str(tmp_path), "--micro_batch_size", "8", "--max_lr", "1e30",
        "--warmup_steps", "1", "--checkpoint_every", "100", "--eval_every", "100", "--no-hellaswag",
        "--num_samples", "0"], capsys)  # step 0 trains, step 1 is not finite; no evaluation or checkpoint after 0
    assert status == 1 and "is not finite" in err
    assert [r["step"] for r in records(tmp_path, "train")] == [0]


def test_tracker_config_is_flat_scalars():
    settings = train_accelerate.parse_args(["--preset", "cpu-demo"])
    config = tracker_config(settings.flags(), {"mixed_precision": "bf16", "val_tokens": None})
    assert all(isinstance(value, int | float | str | bool) for value in config.values())
    assert config["save_on_signals"] == "SIGTERM,SIGUSR1" and config["resolved_mixed_precision"] == "bf16"
    assert "resolved_val_tokens" not in config and "hub_model_id" not in config
