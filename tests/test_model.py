import json
import logging
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, pipeline
from transformers.cache_utils import DynamicCache

import modeling_gpt2repro
from configuration_gpt2repro import GPT2ReproConfig
from gpt2repro.recipes import RECIPES
from gpt2repro.tokenizer import EOT_TOKEN_ID, IGNORE_INDEX, get_tokenizer
from gpt2repro.training import enable_activation_checkpointing
from modeling_gpt2repro import CACHE_FIELD, GPT2ReproForCausalLM, GPT2ReproModel

V = 50257


def ids(*shape, seed=0):
    return torch.randint(0, V, shape, generator=torch.Generator().manual_seed(seed))


def cache_of(output):
    """The output's KV cache under the installed transformers' field name (`cache` from 5.24, else
    `past_key_values`)."""
    return getattr(output, CACHE_FIELD)


# ---- config ----------------------------------------------------------------------------------------------------------

def test_config_defaults_are_gpt2_124m():
    c = GPT2ReproConfig()
    assert (c.n_positions, c.n_layer, c.n_head, c.n_embd, c.vocab_size) == (1024, 12, 12, 768, 50257)
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.max_position_embeddings) == (768, 12, 12, 1024)
    assert c.padded_vocab_size == 50304 and c.padded_vocab_size % 128 == 0
    assert GPT2ReproConfig(vocab_pad_multiple=1).padded_vocab_size == 50257
    assert GPT2ReproConfig(vocab_pad_multiple=256).padded_vocab_size == 50432


def test_default_model_has_124m_parameters():
    with torch.device("meta"):
        model = GPT2ReproForCausalLM(GPT2ReproConfig())
    assert model.transformer.wte.weight.shape == (50304, 768)
    n_params = sum(p.numel() for p in model.parameters())  # tied lm_head counted once
    assert n_params == 124_475_904  # GPT-2's 124,439,808 + 47 padded rows * 768


def test_n_embd_not_divisible_by_n_head_is_refused():
    with pytest.raises(ValueError, match="n_embd \\(100\\) must be divisible by n_head \\(12\\)"):
        GPT2ReproConfig(n_embd=100, n_head=12)
    with pytest.raises(ValueError, match="n_layer must be a positive integer, got 0"):
        GPT2ReproConfig(n_layer=0)


# ---- equality with transformers' GPT-2 -------------------------------------------------------------------------------

def test_import_from_gpt2_gives_equal_logits_and_loss(tiny_gpt2):
    model = GPT2ReproForCausalLM.from_gpt2(tiny_gpt2)
    x = ids(3, 40)
    with torch.no_grad():
        ref, ours = tiny_gpt2(x, labels=x), model(x, labels=x)
    assert ours.logits.shape == (3, 40, V)
    torch.testing.assert_close(ours.logits, ref.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.loss, ref.loss, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name, n_head, n_embd", [("gpt2-medium", 16, 1024), ("gpt2-large", 20, 1280),
                                                 ("gpt2-xl", 25, 1600)])
def test_every_openai_size_imports_by_name_from_the_hub_cache_and_exports_back_exactly(name, n_head, n_embd, tmp_path):
    """OpenAI's larger GPT-2s, each in its width and heads (2 of its layers, random weights: the real ones are not
    reachable offline), laid out in a Hub cache as a download leaves them: imported by name, the logits equal
    GPT2LMHeadModel's, and to_gpt2() gives back every weight exactly."""
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=n_head, n_embd=n_embd)).eval()
    repo = tmp_path / f"models--openai-community--{name}"
    gpt2.save_pretrained(repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    model = GPT2ReproForCausalLM.from_gpt2(name, cache_dir=tmp_path).eval()  # HF_HUB_OFFLINE=1 (conftest)
    assert (model.config.n_head, model.config.n_embd) == (n_head, n_embd)
    x = ids(2, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, gpt2(x).logits, atol=1e-4, rtol=0)
    exported = model.to_gpt2().state_dict()
    assert all(torch.equal(exported[key], value) for key, value in gpt2.state_dict().items()), name


def test_export_to_gpt2_gives_equal_logits(tiny_config):
    torch.manual_seed(1)
    model = GPT2ReproForCausalLM(tiny_config).eval()
    gpt2 = model.to_gpt2()
    assert type(gpt2) is GPT2LMHeadModel and gpt2.lm_head.weight is gpt2.transformer.wte.weight
    x = ids(2, 64)
    with torch.no_grad():
        torch.testing.assert_close(gpt2(x).logits, model(x).logits, atol=1e-5, rtol=0)
    assert torch.equal(GPT2ReproForCausalLM.from_gpt2(gpt2).transformer.h[1].mlp.c_fc.weight,
                       model.transformer.h[1].mlp.c_fc.weight)


def test_imported_gpt2_loss_ignores_padded_vocab_rows(tiny_gpt2):
    # Imported weights have zero padded rows, so the padded logits (0) exceed every real one here; they must
    # carry no probability in the loss.
    model = GPT2ReproForCausalLM.from_gpt2(tiny_gpt2)
    with torch.no_grad():
        u = torch.nn.functional.normalize(torch.randn(64), dim=0)
        model.transformer.ln_f.weight.fill_(0.01)  # final hidden states ~= u ...
        model.transformer.ln_f.bias.copy_(u)
        model.transformer.wte.weight[:V] -= 3 * u  # ... so every real logit is ~ -3, below the padded zeros
        x = ids(2, 16)
        out = model(x, labels=x)
        full = model.lm_head(model.transformer(x).last_hidden_state)  # (B, T, Vp)
    assert full[..., V:].max() > full[..., :V].max()
    expected = F.cross_entropy(full[:, :-1, :V].reshape(-1, V), x[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, expected)


def test_labels_and_shift_labels_conventions(tiny_config):
    torch.manual_seed(0)
    model = GPT2ReproForCausalLM(tiny_config)
    x = ids(2, 12)
    labels = x.clone()
    labels[0, 5] = -100
    out = model(x, labels=labels)
    logits = out.logits.detach()
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss.detach(), expected)
    y = F.pad(labels[:, 1:], (0, 1), value=-100)
    assert torch.equal(model(x, shift_labels=y).loss, out.loss)
    lean = model(x, shift_labels=y, return_logits=False)
    assert lean.logits is None and torch.equal(lean.loss, out.loss)
    with pytest.raises(ValueError, match="not both"):
        model(x, labels=labels, shift_labels=y)


@pytest.mark.parametrize("chunk_rows", [4096, 7])  # one chunk, and several with a ragged last one
def test_chunked_training_loss_equals_plain_cross_entropy(tiny_config, monkeypatch, chunk_rows):
    import modeling_gpt2repro

    monkeypatch.setattr(modeling_gpt2repro, "LOSS_CHUNK_ROWS", chunk_rows)
    torch.manual_seed(0)
    model = GPT2ReproForCausalLM(tiny_config)
    with torch.no_grad():
        model.transformer.wte.weight[V:] = 0.0  # padded logits 0, above many real ones: they must not count
    x, y = ids(3, 16), ids(3, 16, seed=1)
    y[1, 3:9] = -100

    def loss_and_grads(**kwargs):
        model.zero_grad()
        loss = model(x, shift_labels=y, **kwargs).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    plain_loss, plain_grads = loss_and_grads()
    fused_loss, fused_grads = loss_and_grads(return_logits=False)
    with torch.no_grad():
        logits = model(x).logits
    reference = F.cross_entropy(logits.reshape(-1, V), y.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(fused_loss, reference, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(plain_loss, reference, atol=1e-6, rtol=1e-6)
    for name, grad in plain_grads.items():
        assert (fused_grads[name] - grad).abs().max() <= 1e-5 * grad.abs().max(), name  # fp32 summation order
    with torch.no_grad():
        torch.testing.assert_close(model(x, shift_labels=y, return_logits=False).loss, reference, atol=1e-6, rtol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 matmuls in both paths: equal to bf16 rounding
        bf16_plain = model(x, shift_labels=y).loss
        bf16_fused = model(x, shift_labels=y, return_logits=False).loss
    torch.testing.assert_close(bf16_fused, bf16_plain, atol=2e-3, rtol=0)


def test_chunked_loss_with_fp32_hidden_under_autocast(monkeypatch):
    # On CUDA, LayerNorm under autocast returns fp32 (on CPU, bf16): the loss must take fp32 hidden states too and
    # give fp32 gradients equal to a bf16-matmul reference, to bf16 rounding.
    import modeling_gpt2repro

    monkeypatch.setattr(modeling_gpt2repro, "LOSS_CHUNK_ROWS", 5)
    torch.manual_seed(0)
    hidden = torch.randn(12, 32, requires_grad=True)
    weight = torch.nn.Parameter(0.1 * torch.randn(V + 47, 32))
    targets = ids(12)
    targets[3] = -100
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = modeling_gpt2repro.LMHeadCrossEntropy.apply(hidden, weight, targets, V, True)
    loss.backward()
    assert hidden.grad.dtype == weight.grad.dtype == torch.float32
    h_ref, w_ref = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    logits = (h_ref.bfloat16() @ w_ref.bfloat16().t()).float()[:, :V]
    reference = F.cross_entropy(logits, targets, ignore_index=-100)
    reference.backward()
    torch.testing.assert_close(loss, reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(hidden.grad, h_ref.grad, atol=2e-2 * h_ref.grad.abs().max().item(), rtol=0)
    torch.testing.assert_close(weight.grad, w_ref.grad, atol=2e-2 * w_ref.grad.abs().max().item(), rtol=0)
    assert weight.grad[V:].abs().max() == 0


def test_a_loss_forward_builds_no_cache(tiny_config):
    model = GPT2ReproForCausalLM(tiny_config).eval()
    x = ids(1, 8)
    with torch.no_grad():
        assert cache_of(model(x, labels=x)) is None
        assert cache_of(model(x, shift_labels=x, return_logits=False)) is None
        assert cache_of(model(x)) is not None  # eval without a loss: generation-style, cached


def test_logits_to_keep(tiny_config):
    model = GPT2ReproForCausalLM(tiny_config).eval()
    x = ids(2, 10)
    with torch.no_grad():
        full = model(x).logits
        torch.testing.assert_close(model(x, logits_to_keep=1).logits, full[:, -1:])
        torch.testing.assert_close(model(x, logits_to_keep=torch.tensor([2, 7])).logits, full[:, [2, 7]])


# ---- KV cache and generation -----------------------------------------------------------------------------------------

def test_chunked_prefill_on_cache_equals_full_forward(tiny_config):
    model = GPT2ReproForCausalLM(tiny_config).eval()
    x = ids(2, 30)
    with torch.no_grad():
        full = model(x).logits
        first = model(x[:, :11], use_cache=True)
        second = model(x[:, 11:25], cache=cache_of(first), use_cache=True)  # multi-token chunk
        third = model(x[:, 25:26], past_key_values=cache_of(second), use_cache=True)  # one token, the pre-5.24 name
    torch.testing.assert_close(torch.cat([first.logits, second.logits, third.logits], 1), full[:, :26], atol=1e-5,
                               rtol=0)


def test_greedy_generate_equals_gpt2(tiny_gpt2):
    model = GPT2ReproForCausalLM.from_gpt2(tiny_gpt2)
    prompt = ids(2, 6)
    kw = dict(max_new_tokens=20, do_sample=False, pad_token_id=50256)
    assert torch.equal(model.generate(prompt, **kw), tiny_gpt2.generate(prompt, **kw))


def test_batched_left_padded_generate_equals_gpt2(tiny_gpt2):
    model = GPT2ReproForCausalLM.from_gpt2(tiny_gpt2)
    prompt = ids(3, 9, seed=3)
    mask = torch.ones_like(prompt)
    mask[0, :4] = 0
    mask[2, :1] = 0
    prompt[mask == 0] = 50256
    kw = dict(attention_mask=mask, max_new_tokens=15, do_sample=False, pad_token_id=50256)
    ours, ref = model.generate(prompt, **kw), tiny_gpt2.generate(prompt, **kw)
    assert torch.equal(ours, ref)
    # and each padded row continues exactly as its prompt would alone
    alone = model.generate(prompt[:1, 4:], max_new_tokens=15, do_sample=False, pad_token_id=50256)
    assert torch.equal(ours[0, 9:], alone[0, 5:])


def test_sampling_never_returns_a_padded_id(tiny_config):
    torch.manual_seed(0)
    model = GPT2ReproForCausalLM(tiny_config).eval()
    with torch.no_grad():  # make the padded rows the most likely tokens by far
        u = torch.nn.functional.normalize(torch.randn(64), dim=0)
        model.transformer.ln_f.weight.fill_(0.01)  # final hidden states ~= u ...
        model.transformer.ln_f.bias.copy_(u)
        model.transformer.wte.weight[V:] = 50 * u  # ... so every padded logit is ~50, real ones ~0
    x = ids(4, 4)
    with torch.no_grad():
        full = model.lm_head(model.transformer(x).last_hidden_state)
    assert full[..., V:].max() > full[..., :V].max() + 10
    out = model.generate(x, max_new_tokens=40, do_sample=True, top_k=50, pad_token_id=50256)
    assert out.max().item() < V
    assert model(x).logits.shape[-1] == V


# ---- the forward contract: every argument works or raises ------------------------------------------------------------

@pytest.mark.parametrize("cls", [GPT2ReproModel, GPT2ReproForCausalLM])
def test_unknown_keyword_raises_type_error_naming_it(tiny_config, cls):
    model = cls(tiny_config).eval()
    with pytest.raises(TypeError, match="unexpected keyword argument 'past_key_value'"):
        model(ids(1, 4), past_key_value=None)  # a typo of the cache's name must not pass unnoticed
    with pytest.raises(TypeError, match="unexpected keyword argument 'token_type_ids'"):
        model(ids(1, 4), token_type_ids=ids(1, 4))
    with pytest.raises(TypeError, match="not both"):
        model(ids(1, 4), cache=DynamicCache(config=tiny_config), past_key_values=DynamicCache(config=tiny_config))


def test_cache_position_is_checked_not_ignored(tiny_config):
    model = GPT2ReproForCausalLM(tiny_config).eval()
    with torch.no_grad():
        cache = cache_of(model(ids(1, 5), cache_position=torch.arange(5)))
        model(ids(1, 2), cache=cache, cache_position=torch.tensor([5, 6]))
        with pytest.raises(ValueError, match="cache_position must follow the cache \\(7..7\\)"):
            model(ids(1, 1), cache=cache, cache_position=torch.tensor([3]))


def test_generate_logs_no_deprecation_warning(tiny_gpt2, caplog):
    model = GPT2ReproForCausalLM.from_gpt2(tiny_gpt2)
    logging.Logger.warning_once.cache_clear()  # transformers' once-per-process warnings: let them fire again here
    with caplog.at_level(logging.WARNING):
        out = model.generate(ids(2, 5), max_new_tokens=6, do_sample=False, pad_token_id=50256,
                             return_dict_in_generate=True)
        model(ids(1, 3), cache=cache_of(model(ids(1, 3))))
    assert out.sequences.shape == (2, 11)
    assert not [r.getMessage() for r in caplog.records if "deprecat" in r.getMessage().lower()]


def test_return_dict_false_gives_a_tuple(tiny_config):
    model = GPT2ReproForCausalLM(tiny_config).eval()
    x = ids(1, 6)
    with torch.no_grad():
        out = model(x, labels=x)
        loss, logits = model(x, labels=x, return_dict=False)
    assert torch.equal(loss, out.loss) and torch.equal(logits, out.logits)
    assert isinstance(model.transformer(x, return_dict=False), tuple)


def test_eager_attention_equals_sdpa(tiny_config):
    torch.manual_seed(0)
    model = GPT2ReproForCausalLM(tiny_config).eval()
    x = ids(3, 20)
    mask = torch.ones_like(x)
    mask[0, :5] = 0  # left padding: the explicit-mask path
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)

    def run():
        with torch.no_grad():
            plain = model(x).logits
            padded = model(x, attention_mask=mask, position_ids=position_ids).logits
            first = model(x[:, :12], use_cache=True)
            chunk = model(x[:, 12:], cache=cache_of(first)).logits  # a multi-token chunk on top of a cache
        return plain, padded[mask.bool()], chunk

    assert model.config._attn_implementation == "sdpa"
    sdpa = run()
    model.set_attn_implementation("eager")
    assert model.config._attn_implementation == "eager"
    for ours, ref in zip(run(), sdpa, strict=True):
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_hidden_states_and_attentions_equal_gpt2(tmp_path, tiny_gpt2):
    tiny_gpt2.save_pretrained(tmp_path)
    gpt2 = GPT2LMHeadModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
    GPT2ReproForCausalLM.from_gpt2(tiny_gpt2).save_pretrained(tmp_path / "ours")
    model = GPT2ReproForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager").eval()
    assert model.config._attn_implementation == "eager"
    x = ids(2, 12)
    with torch.no_grad():
        ref = gpt2(x, output_hidden_states=True, output_attentions=True)
        ours = model(x, output_hidden_states=True, output_attentions=True)
    assert len(ours.hidden_states) == len(ref.hidden_states) == 3 and len(ours.attentions) == 2
    for a, b in zip(ours.hidden_states + ours.attentions, ref.hidden_states + ref.attentions, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    out = model.generate(x[:, :4], max_new_tokens=3, do_sample=False, pad_token_id=50256, return_dict_in_generate=True,
                         output_hidden_states=True, output_attentions=True)
    assert len(out.hidden_states) == 3 and len(out.attentions[0]) == 2 and out.attentions[-1][0].shape == (2, 4, 1, 6)


def test_output_attentions_without_eager_and_unknown_attention_are_refused(tmp_path, tiny_config):
    model = GPT2ReproForCausalLM(tiny_config).eval()
    for name in ("sdpa", "flex_attention"):
        model.set_attn_implementation(name)
        with pytest.raises(ValueError, match=f"output_attentions=True needs the eager attention \\({name} never"):
            model(ids(1, 4), output_attentions=True)
    model.save_pretrained(tmp_path)
    # transformers' own checks: a kernel that is not installed, or a name that is no kernel at all
    with pytest.raises(ImportError, match="FlashAttention2 .* doesn't seem to be installed"):
        GPT2ReproForCausalLM.from_pretrained(tmp_path, attn_implementation="flash_attention_2")
    model.config._attn_implementation_internal = "no_such_kernel"  # what no loader check stops
    with pytest.raises(KeyError, match="`no_such_kernel` is not a valid attention implementation"):
        model(ids(1, 4))


def test_inputs_embeds_forward_and_generate_equal_gpt2(tiny_gpt2):
    model = GPT2ReproForCausalLM.from_gpt2(tiny_gpt2)
    x = ids(2, 7)
    embeds = model.get_input_embeddings()(x)
    with torch.no_grad():
        torch.testing.assert_close(model(inputs_embeds=embeds).logits, model(x).logits, atol=0, rtol=0)
        torch.testing.assert_close(model(inputs_embeds=embeds).logits, tiny_gpt2(inputs_embeds=embeds).logits,
                                   atol=1e-5, rtol=0)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=50256)
    assert torch.equal(model.generate(inputs_embeds=embeds, **kw), tiny_gpt2.generate(inputs_embeds=embeds, **kw))
    with pytest.raises(ValueError, match="exactly one of `input_ids` and `inputs_embeds`"):
        model(x, inputs_embeds=embeds)


@pytest.mark.parametrize("tied", [True, False])
def test_resize_token_embeddings_keeps_the_padding_and_round_trips(tmp_path, tied):
    torch.manual_seed(0)
    config = GPT2ReproConfig(vocab_size=99, vocab_pad_multiple=64, n_layer=1, n_head=2, n_embd=32, n_positions=16,
                             tie_word_embeddings=tied, eos_token_id=0, bos_token_id=0)
    model = GPT2ReproForCausalLM(config).eval()
    x = torch.randint(0, 99, (2, 10))
    with torch.no_grad():
        before = model(x).logits
    old_rows = model.transformer.wte.weight[:99].detach().clone()
    model.resize_token_embeddings(109)
    wte = model.transformer.wte.weight
    assert model.config.vocab_size == 109 and wte.shape == (128, 32) and model.lm_head.weight.shape == (128, 32)
    assert (model.lm_head.weight is wte) == tied
    assert torch.equal(wte[:99], old_rows) and wte[109:].abs().max() == 0
    # the added rows sit at the old rows' mean (transformers' mean resizing)
    torch.testing.assert_close(wte[99:109], old_rows.mean(0).expand(10, -1), atol=1e-3, rtol=0)
    with torch.no_grad():
        after = model(x).logits
    assert after.shape == (2, 10, 109)
    torch.testing.assert_close(after[..., :99], before, atol=1e-6, rtol=0)  # the old tokens' logits are unchanged
    model.save_pretrained(tmp_path)
    loaded = GPT2ReproForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.vocab_size == 109 and loaded.config.padded_vocab_size == 128
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, after)
    model.resize_token_embeddings(50)  # shrinking keeps the first rows
    assert model.transformer.wte.weight.shape == (64, 32) and \
        torch.equal(model.transformer.wte.weight[:50], old_rows[:50])


def test_an_untied_head_is_saved_at_vocab_size_rows_and_loads_back_to_the_same_model(tmp_path):
    """Serving engines build their head with config.vocab_size rows, and vLLM's loader asserts the stored one has as
    many (test_serve_vllm.py serves the speedrun's untied head); training keeps its padded head."""
    torch.manual_seed(0)
    config = GPT2ReproConfig(n_layer=2, n_head=2, n_embd=64, n_positions=32, tie_word_embeddings=False,
                             logit_softcap=15.0)
    model = GPT2ReproForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.3)  # an untied head starts at zero
    model.save_pretrained(tmp_path)
    stored = load_file(tmp_path / "model.safetensors")
    assert stored["lm_head.weight"].shape == (50257, 64) and stored["transformer.wte.weight"].shape == (50304, 64)
    assert torch.equal(stored["lm_head.weight"], model.lm_head.weight[:50257])
    assert model.lm_head.weight.shape == (50304, 64) and model.config.padded_lm_head  # the saved model unchanged
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True).eval()
    assert not loaded.config.padded_lm_head and loaded.lm_head.weight.shape == (50257, 64)
    x = torch.randint(0, 50257, (2, 16))
    with torch.no_grad():
        ours, back = model(x, labels=x), loaded(x, labels=x)
        torch.testing.assert_close(back.logits, ours.logits, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(back.loss, ours.loss, rtol=1e-6, atol=0)
        torch.testing.assert_close(loaded(x, labels=x, return_logits=False).loss,  # the chunked training loss
                                   model(x, labels=x, return_logits=False).loss, rtol=1e-6, atol=0)
        assert torch.equal(loaded.generate(x[:1, :4], max_new_tokens=8, do_sample=False),
                           model.generate(x[:1, :4], max_new_tokens=8, do_sample=False))
    loaded.save_pretrained(tmp_path / "again")
    assert load_file(tmp_path / "again" / "model.safetensors")["lm_head.weight"].shape == (50257, 64)
    model.save_pretrained(tmp_path / "given", state_dict=model.state_dict())  # as transformers' Trainer saves
    assert load_file(tmp_path / "given" / "model.safetensors")["lm_head.weight"].shape == (50257, 64)
    assert not AutoModelForCausalLM.from_pretrained(tmp_path / "given", trust_remote_code=True).config.padded_lm_head


def test_resize_matches_gpt2_on_the_kept_tokens(tiny_gpt2):
    model = GPT2ReproForCausalLM.from_gpt2(tiny_gpt2)
    model.resize_token_embeddings(50260, mean_resizing=False)
    tiny_gpt2.resize_token_embeddings(50260, mean_resizing=False)
    assert model.config.padded_vocab_size == 50304 and model.get_output_embeddings().weight.shape == (50304, 64)
    x = ids(1, 12)
    with torch.no_grad():
        ours, ref = model(x).logits, tiny_gpt2(x).logits
    assert ours.shape == ref.shape == (1, 12, 50260)
    torch.testing.assert_close(ours[..., :V], ref[..., :V], atol=1e-5, rtol=0)


def test_gradient_checkpointing_gives_equal_gradients(tiny_config):
    torch.manual_seed(0)
    model = GPT2ReproForCausalLM(tiny_config).train()
    x = ids(2, 16)

    def grads():
        model.zero_grad()
        model(x, labels=x, return_logits=False).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    calls = []
    model.transformer.h[0].ln_1.register_forward_hook(lambda *args: calls.append(1))  # the block's first module
    plain = grads()
    assert len(calls) == 1
    enable_activation_checkpointing(model)
    assert all(block.gradient_checkpointing for block in model.transformer.h)
    checkpointed = grads()
    assert len(calls) == 3  # forward, then the block recomputed in backward
    for name, grad in checkpointed.items():
        torch.testing.assert_close(grad, plain[name], atol=1e-6, rtol=1e-5, msg=name)
    with pytest.raises(ValueError, match="use_cache=False"):
        model(x, use_cache=True)


def test_torch_export_with_a_padding_mask(tiny_config):
    # The mask is built without reading tensor values on the host, so export can trace it (no data-dependent branch).
    model = GPT2ReproForCausalLM(tiny_config).eval()
    x = ids(2, 10)
    mask = torch.ones_like(x)
    mask[0, :3] = 0
    kwargs = dict(attention_mask=mask, use_cache=False)
    exported = torch.export.export(model, (x,), kwargs)
    other_mask = torch.ones_like(x)  # another mask through the same graph: no value was baked in
    with torch.no_grad():
        for m in (mask, other_mask):
            torch.testing.assert_close(exported.module()(x, attention_mask=m, use_cache=False).logits,
                                       model(x, attention_mask=m, use_cache=False).logits, atol=1e-5, rtol=0)


def test_generation_in_training_mode_with_checkpointing_under_no_grad(tiny_gpt2):
    # e.g. a sample callback inside a training loop: no backward will come, so the cache is fine
    model = GPT2ReproForCausalLM.from_gpt2(tiny_gpt2)
    enable_activation_checkpointing(model)
    model.train()
    with torch.no_grad():
        out = model.generate(ids(1, 4), max_new_tokens=5, do_sample=False, pad_token_id=50256)
    assert torch.equal(out, tiny_gpt2.generate(ids(1, 4), max_new_tokens=5, do_sample=False, pad_token_id=50256))


def test_a_refused_resize_changes_nothing(tiny_config):
    model = GPT2ReproForCausalLM(tiny_config)
    with pytest.raises(ValueError, match="new_num_tokens must be a positive integer"):
        model.resize_token_embeddings(0, pad_to_multiple_of=256)
    assert model.config.padded_vocab_size == 50304 == model.transformer.wte.weight.shape[0]


# ---- training numerics -----------------------------------------------------------------------------------------------

def test_bf16_autocast_forward_backward(tiny_config):
    model = GPT2ReproForCausalLM(tiny_config)
    x = ids(2, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x, labels=x, return_logits=False).loss
    loss.backward()
    assert math.isfinite(loss.item()) and abs(loss.item() - math.log(V)) < 1.0  # near-uniform at init
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert model.lm_head.weight.grad[V:].abs().max() == 0  # the padded rows get no gradient from the loss


def test_init_statistics():
    torch.manual_seed(0)
    config = GPT2ReproConfig(n_layer=8, n_head=4, n_embd=256, n_positions=64)
    model = GPT2ReproForCausalLM(config)
    residual_std = 0.02 / math.sqrt(2 * 8)
    for block in model.transformer.h:
        for proj in (block.attn.c_proj, block.mlp.c_proj):
            assert abs(proj.weight.std().item() - residual_std) / residual_std < 0.03
            assert proj.bias.abs().max() == 0
        assert abs(block.mlp.c_fc.weight.std().item() - 0.02) < 0.0005
        assert torch.equal(block.ln_1.weight, torch.ones(256)) and block.ln_1.bias.abs().max() == 0
    assert abs(model.transformer.wte.weight.std().item() - 0.02) < 0.0005
    assert model.lm_head.weight is model.transformer.wte.weight


def test_tied_matrix_is_initialised_once(monkeypatch):
    initialised = []
    real_normal = torch.nn.init.normal_
    monkeypatch.setattr(torch.nn.init, "normal_",
                        lambda t, *a, **k: initialised.append(t.data_ptr()) or real_normal(t, *a, **k))
    model = GPT2ReproForCausalLM(GPT2ReproConfig(n_layer=1, n_head=2, n_embd=32, n_positions=16))
    assert initialised.count(model.transformer.wte.weight.data_ptr()) == 1
    assert len(initialised) == len(set(initialised))  # no parameter is drawn twice


@pytest.mark.parametrize("recipe", ["gpt2", "speedrun"])
def test_flops_per_token_counts_the_matmuls(recipe):
    """flops_per_token (what MFU divides by) against the matmul FLOPs torch counts in one training forward + backward
    (eager attention: the CPU's SDPA kernel is not counted). They differ only by the biases and norm gains, which the
    formula counts at 6 FLOPs each as PaLM's does, though they only add."""
    options = {k: v for k, v in RECIPES[recipe].items() if k in GPT2ReproConfig.architecture_options}
    config = GPT2ReproConfig(n_layer=2, n_head=4, n_embd=64, n_positions=64, **options)
    model = GPT2ReproForCausalLM(config)
    model.set_attn_implementation("eager")
    x = ids(2, 64)
    with FlopCounterMode(display=False) as counter:
        model(input_ids=x, shift_labels=x, return_logits=False).loss.backward()
    adds_only = sum(p.numel() for p in model.parameters() if p.dim() == 1)
    assert model.flops_per_token(64) == counter.get_total_flops() / x.numel() + 6 * adds_only


# ---- errors ----------------------------------------------------------------------------------------------------------

def test_sequence_longer_than_context_is_refused(tiny_config):
    model = GPT2ReproForCausalLM(tiny_config)
    with pytest.raises(ValueError, match="longer than the model's context of n_positions=64"):
        model(ids(1, 65))
    with torch.no_grad():
        cache = cache_of(model(ids(1, 60), use_cache=True))
    with pytest.raises(ValueError, match="60 cached \\+ 5 new"):
        model(ids(1, 5), cache=cache)
    with pytest.raises(ValueError, match="Position id 64 is beyond the model's context"):
        model(ids(1, 3), position_ids=torch.tensor([[0, 1, 64]]))
    model(ids(1, 80), position_ids=torch.arange(80)[None] % 40)  # a packed row: long, but every position fits


def test_checkpoint_of_another_architecture_is_refused(tmp_path, tiny_gpt2):
    tiny_gpt2.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="holds a 'gpt2' model.*from_gpt2"):
        GPT2ReproForCausalLM.from_pretrained(tmp_path)


def test_from_gpt2_offline_unknown_hub_id_says_what_it_needs(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(OSError, match="needs a local folder holding a GPT-2 checkpoint, or the Hugging Face Hub"):
        GPT2ReproForCausalLM.from_gpt2("someone/not-cached-gpt2")


# ---- save / load -----------------------------------------------------------------------------------------------------

# Our modules must not be importable in a fresh process that loads a checkpoint: only its copied code may be used.
BLOCK_OUR_MODULES = textwrap.dedent("""
    import sys
    class BlockOurModules:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("modeling_gpt2repro", "configuration_gpt2repro", "gpt2repro"):
                raise ImportError(name)
    sys.meta_path.insert(0, BlockOurModules())
""")

FRESH_LOAD = BLOCK_OUR_MODULES + textwrap.dedent("""
    import json, torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
    x, mask = (torch.tensor(v) for v in json.loads(sys.argv[2]))
    with torch.no_grad():
        logits = model(x).logits
    greedy = model.generate(x, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=50256)
    torch.save((logits, greedy), sys.argv[3])
    print(type(model).__module__, model.lm_head.weight is model.transformer.wte.weight)
""")


def fresh_process_run(tmp_path, source, x, mask=None, env=None):
    """(logits of x, greedy generation from x with `mask`) by `AutoModelForCausalLM` in a fresh process."""
    out = tmp_path / "out.pt"
    mask = torch.ones_like(x) if mask is None else mask
    result = subprocess.run(
        [sys.executable, "-c", FRESH_LOAD, str(source), json.dumps([x.tolist(), mask.tolist()]), str(out)],
        cwd=tmp_path, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    module, tied = result.stdout.split()[-2:]
    assert module.startswith("transformers_modules.") and tied == "True"
    return torch.load(out)


def test_save_then_fresh_process_auto_load_gives_equal_logits_and_generation(tmp_path, tiny_gpt2):
    model = GPT2ReproForCausalLM.from_gpt2(tiny_gpt2)
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_gpt2repro.GPT2ReproForCausalLM"
    assert config["auto_map"]["AutoModel"] == "modeling_gpt2repro.GPT2ReproModel"  # features and serving backends
    assert (ckpt / "model.safetensors").exists() and (ckpt / "configuration_gpt2repro.py").exists()
    # AutoModel in a process of its own: in this one, remote code would replace the registered config class
    load_base = "import sys; from transformers import AutoModel; print(type(AutoModel.from_pretrained(sys.argv[1], " \
                "trust_remote_code=True)).__name__)"
    result = subprocess.run([sys.executable, "-c", load_base, str(ckpt)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.split()[-1] == "GPT2ReproModel", result.stderr[-3000:]
    x = ids(2, 9)
    mask = torch.ones_like(x)
    mask[1, :3] = 0  # a left-padded row
    x[mask == 0] = 50256
    with torch.no_grad():
        expected = model(x).logits
    logits, greedy = fresh_process_run(tmp_path, ckpt, x, mask)
    assert torch.equal(logits, expected)
    # transformers' own GPT-2 on the same weights: the copied code decodes with the cache under this transformers
    assert torch.equal(greedy, tiny_gpt2.generate(x, attention_mask=mask, max_new_tokens=12, do_sample=False,
                                                  pad_token_id=50256))


def test_hub_id_from_local_cache_loads_offline(tmp_path, tiny_config):
    # The layout huggingface_hub writes: models--{org}--{name}/refs/main -> snapshots/{revision}/files
    model = GPT2ReproForCausalLM(tiny_config).eval()
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--gpt2repro-tiny"
    model.save_pretrained(repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    x = ids(1, 10)
    with torch.no_grad():
        expected = model(x).logits
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    assert torch.equal(fresh_process_run(tmp_path, "someone/gpt2repro-tiny", x, env=env)[0], expected)


def test_from_gpt2_hub_id_from_local_cache(tmp_path, tiny_gpt2, monkeypatch):
    revision = "89abcdef0123456789abcdef0123456789abcdef"
    repo = tmp_path / "models--openai-community--gpt2"
    tiny_gpt2.save_pretrained(repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    model = GPT2ReproForCausalLM.from_gpt2("openai-community/gpt2", cache_dir=str(tmp_path))
    x = ids(1, 12)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, tiny_gpt2(x).logits, atol=1e-5, rtol=0)


def test_in_process_auto_classes_and_pipeline(tmp_path, tiny_config):
    assert type(AutoConfig.for_model("gpt2repro")) is GPT2ReproConfig
    model = GPT2ReproForCausalLM(tiny_config).eval()
    model.save_pretrained(tmp_path)
    get_tokenizer().save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded) is GPT2ReproForCausalLM
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()
    assert loaded.get_input_embeddings() is loaded.transformer.get_input_embeddings() is loaded.transformer.wte
    assert loaded.get_output_embeddings() is loaded.lm_head
    generator = pipeline("text-generation", model=str(tmp_path))
    text = generator("Hello, I'm a language model,", max_new_tokens=8, do_sample=False)[0]["generated_text"]
    assert text.startswith("Hello, I'm a language model,") and len(text) > len("Hello, I'm a language model,")


def test_the_model_files_spell_the_project_constants_alike():
    """The model files travel alone in hf/ folders, so they spell <|endoftext|> and the ignored label themselves."""
    config = GPT2ReproConfig()
    assert config.bos_token_id == config.eos_token_id == EOT_TOKEN_ID == get_tokenizer().eos_token_id
    assert modeling_gpt2repro.IGNORE_INDEX == IGNORE_INDEX == torch.nn.CrossEntropyLoss().ignore_index
