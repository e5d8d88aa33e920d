"""GPT-2 as a transformers model, written to be read top to bottom.

Shapes in comments: B batch, T new tokens, S = past + T key positions, C = n_embd, nh heads, hs = C // nh,
V = vocab_size (50257), Vp = padded_vocab_size (50304).

Parameter names equal OpenAI GPT-2's as transformers names them (`transformer.h.0.attn.c_attn.weight`, ...), with
the four matmul weights in nn.Linear (out, in) layout, so nanoGPT/build-nanogpt state dicts map one to one;
`from_gpt2` / `to_gpt2` convert to and from transformers' GPT2LMHeadModel (Conv1D, (in, out) layout).
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple
from transformers.utils.output_capturing import capture_outputs

try:
    from .configuration_gpt2repro import GPT2ReproConfig
except ImportError:  # imported as a top-level module (a source checkout or `pip install`)
    from configuration_gpt2repro import GPT2ReproConfig

IGNORE_INDEX = -100  # a target the loss skips: transformers' label convention and cross_entropy's default

# The four matmuls that OpenAI GPT-2 (and transformers' Conv1D) stores as (in, out) and nn.Linear as (out, in).
_CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPT2ReproConfig, layer_idx: int):
        super().__init__()
        self.config = config  # read at each call: `set_attn_implementation` switches the kernel on a live model
        self.layer_idx = layer_idx  # this layer's slot in the KV cache
        self.n_head = config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.scaling = self.head_dim**-0.5  # softmax(q k^T / sqrt(hs))
        self.is_causal = True  # read by transformers' attention functions
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v of all heads at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.is_residual_projection = True

    def forward(
        self, x: torch.Tensor, attention_mask: torch.Tensor | None, rotary: tuple | None, cache: Cache | None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        if self.config.qk_norm:  # bounds the attention logits, which lets the speedrun's large LRs train stably
            q, k = F.rms_norm(q, (q.shape[-1],)), F.rms_norm(k, (k.shape[-1],))
        if rotary is not None:  # before the cache: cached keys keep the rotation of their own positions
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # (B, nh, S, hs)
        # sdpa, eager, flex_attention, flash_attention_2/3 or a Hub kernel: whatever config._attn_implementation names
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        y, att = attention(self, q, k, v, attention_mask, dropout=0.0, scaling=self.scaling, **kwargs)  # (B, T, nh, hs)
        return self.c_proj(y.reshape(B, T, C)), att  # the heads side by side again


def rotary_cos_sin(position_ids: torch.Tensor, head_size: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (B or 1, 1, T, hs / 2) of the rotary angles: channel pair i of a head at position p turns by
    p * theta ** (-2i / hs), fast-turning pairs see local order, slow ones the long range (RoFormer, 2021)."""
    inv_freq = theta ** (-torch.arange(0, head_size, 2, device=position_ids.device, dtype=torch.float32) / head_size)
    angles = position_ids[:, None, :, None].float() * inv_freq  # (B, 1, T, hs / 2)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Turn each channel pair (x[i], x[i + hs / 2]) of x (B, nh, T, hs) by its angle; in fp32, back to x's dtype."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).to(x.dtype)


def eager_attention_forward(
    module: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention_mask: torch.Tensor | None,
    scaling: float, dropout: float = 0.0, **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention written out, softmax(q k^T / sqrt(hs)) v: what SDPA computes, with the probabilities kept
    (`output_attentions`). `attention_mask` is transformers' mask for this call (B or 1, 1, T, S): additive float, or
    boolean where True attends; None means plain causal, aligned to the last query (a cache's new tokens)."""
    T, S = q.shape[-2], k.shape[-2]
    att = (q @ k.transpose(-2, -1)) * scaling  # (B, nh, T, S)
    if attention_mask is None:
        attention_mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
    if attention_mask.dtype == torch.bool:
        att = att.masked_fill(~attention_mask, float("-inf"))
    else:
        att = att + attention_mask
    att = F.dropout(att.softmax(dim=-1, dtype=torch.float32).to(q.dtype), p=dropout, training=module.training)
    return (att @ v).transpose(1, 2).contiguous(), att  # (B, T, nh, hs), (B, nh, T, S)


class MLP(nn.Module):
    def __init__(self, config: GPT2ReproConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.is_residual_projection = True
        self.relu2 = config.mlp_activation == "relu2"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)
        # GPT-2 used the tanh approximation of GELU; the speedrun's ReLU squared trains faster (Primer, 2021)
        return self.c_proj(F.relu(h).square() if self.relu2 else F.gelu(h, approximate="tanh"))


class RMSNorm(nn.Module):
    """x / rms(x) over the channels, with no gain or bias (the speedrun's norm)."""

    def __init__(self, eps: float):
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), eps=self.eps)


def make_norm(config: GPT2ReproConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.layer_norm_epsilon)
    return nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)


class Block(GradientCheckpointingLayer):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x)).

    With activation checkpointing on (`model.gradient_checkpointing_enable()`), the layer base class keeps only the
    block's input and recomputes its activations in backward."""

    def __init__(self, config: GPT2ReproConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, attention_mask: torch.Tensor | None, rotary: tuple | None, cache: Cache | None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), attention_mask, rotary, cache, **kwargs)[0]
        return x + self.mlp(self.ln_2(x))


# transformers 5.24 renamed the cache argument and output field `past_key_values` to `cache` (the old name still works
# there, with a deprecation warning). Our forwards take either name and build outputs with the installed name.
CACHE_FIELD = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"
# What a forward's `**kwargs` may hold: transformers' typed keywords, which travel on to the attention functions
# (output flags, flash attention's packed-sequence lengths), and `cache_position`, which generate() of transformers
# < 5.24 passes.
FORWARD_KWARGS = TransformersKwargs.__required_keys__ | TransformersKwargs.__optional_keys__ | {"cache_position"}


def resolve_cache_argument(cache: Cache | None, past_key_values: Cache | None) -> Cache | None:
    if past_key_values is None:
        return cache
    if cache is not None:
        raise TypeError("Pass the KV cache as `cache` or as `past_key_values` (its name before transformers 5.24), "
                        "not both.")
    return past_key_values


def check_forward_kwargs(model: PreTrainedModel, kwargs: dict) -> None:
    """The causal LM passes its `**kwargs` on unread, so this one check in the base model covers both: any other name
    is a caller's mistake that would otherwise be ignored without a word. The probabilities exist only in the eager
    attention; the other kernels never form them."""
    unexpected = [name for name in kwargs if name not in FORWARD_KWARGS]
    if unexpected:
        raise TypeError(f"{type(model).__name__}.forward() got an unexpected keyword argument '{unexpected[0]}'")
    output_attentions = kwargs.get("output_attentions")
    output_attentions = model.config.output_attentions if output_attentions is None else output_attentions
    if output_attentions and model.config._attn_implementation != "eager":
        raise ValueError(
            f"output_attentions=True needs the eager attention ({model.config._attn_implementation} never forms the "
            f"probabilities): load the model with attn_implementation='eager' or call "
            f"model.set_attn_implementation('eager')."
        )


def checked_position_ids(
    config: GPT2ReproConfig, position_ids: torch.Tensor | None, cache: Cache | None, q_len: int, device: torch.device,
    cache_position: torch.Tensor | None = None,
) -> torch.Tensor:
    """The new tokens' positions (B or 1, T): given, or following the cache; every one must have an embedding (or a
    trained rotation). Explicit positions (left padding, packed rows) may make a row longer than the context; only
    a position beyond it is refused. The checks read tensors on the host, so they are left out when tracing."""
    if position_ids is not None:
        if position_ids.numel() and not tracing() and int(position_ids.max()) >= config.n_positions:
            raise ValueError(f"Position id {int(position_ids.max())} is beyond the model's context of "
                             f"n_positions={config.n_positions} tokens; truncate or window the input.")
        return position_ids
    past_len = cache.get_seq_length() if cache is not None else 0
    check_cache_position(cache_position, past_len, q_len)
    if not tracing() and past_len + q_len > config.n_positions:
        raise ValueError(
            f"Sequence of {past_len + q_len} tokens ({past_len} cached + {q_len} new) is longer than the model's "
            f"context of n_positions={config.n_positions} tokens; truncate or window the input."
        )
    return torch.arange(q_len, device=device)[None] + past_len  # (1, T)


def check_cache_position(cache_position: torch.Tensor | None, past_len: int, q_len: int) -> None:
    """transformers < 5.24 passes `cache_position` (the new tokens' slots in the cache). Our caches only append, so
    it must be past_len, ..., past_len + T - 1; any other value asks for something this model does not do."""
    if cache_position is None or tracing():
        return
    expected = torch.arange(past_len, past_len + q_len, device=cache_position.device)
    if not torch.equal(cache_position.flatten(), expected):
        raise ValueError(
            f"cache_position must follow the cache ({past_len}..{past_len + q_len - 1}): this model's caches only "
            f"append; pass position_ids for other positions."
        )


def tracing() -> bool:
    """Under torch.compile or torch.export, where the value checks that read tensors on the host are left out: they
    would break the graph (or fail with fullgraph=True and in export)."""
    return torch.compiler.is_compiling() or torch.compiler.is_exporting()


# Rows of logits the training loss holds at once: (4096, 50304) fp32 is 0.8 GB, where a whole micro-batch of
# 64 x 1024 would be 13 GB (26 GB with its gradient).
LOSS_CHUNK_ROWS = 4096


class LMHeadCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of `hidden @ weight.T` over targets != -100, computed chunk by chunk.

    The loss is the end of the graph, so its gradients with respect to `hidden` and `weight` are computed here
    in forward, while each chunk's logits exist, and backward only scales them: no (N, Vp) logits or their
    gradient ever live at once and no matmul is repeated. The padded vocabulary columns get -inf, i.e. no
    probability and no gradient. Matmuls run in autocast's dtype (else `hidden`'s), softmax in fp32. With a
    `softcap` c the logits are c * tanh(logits / c), as in `soft_capped`.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, vocab_size: int, compute_grad: bool, softcap: float | None = None):
        # hidden (N, C), weight (Vp, C), targets (N,)
        device_type = hidden.device.type
        # The matmuls' dtype: autocast's where it is on (CUDA's LayerNorm hands us fp32 even then), cast once here
        # rather than by autocast at every chunk's matmul.
        compute_dtype = (torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type)
                         else hidden.dtype)
        weight_c = weight.to(compute_dtype)
        n_targets = (targets != IGNORE_INDEX).sum().clamp(min=1)
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        if compute_grad:
            grad_hidden = torch.empty_like(hidden)
            grad_weight = None  # (Vp, C) fp32, the sum over chunks
        for start in range(0, hidden.shape[0], LOSS_CHUNK_ROWS):
            h, t = hidden[start : start + LOSS_CHUNK_ROWS].to(compute_dtype), targets[start : start + LOSS_CHUNK_ROWS]
            logits = (h @ weight_c.t()).float()  # (n, Vp)
            if softcap is not None:  # in place where it can be: each (n, Vp) temporary is 0.8 GB at n = 4096
                tanh = logits.div_(softcap).tanh_()
                logits = tanh * softcap
            logits[:, vocab_size:] = float("-inf")
            lse = torch.logsumexp(logits, dim=1)
            ignored = t == IGNORE_INDEX
            t = t.masked_fill(ignored, 0)
            loss_sum += (lse - logits.gather(1, t[:, None]).squeeze(1)).masked_fill(ignored, 0.0).sum()
            if compute_grad:
                grad_logits = logits.sub_(lse[:, None]).exp_()  # softmax, in place
                grad_logits[torch.arange(len(t), device=t.device), t] -= 1.0  # d(-log p_t)/dlogits = p - onehot(t)
                grad_logits.masked_fill_(ignored[:, None], 0.0)
                if softcap is not None:  # d(c tanh(z / c))/dz = 1 - tanh(z / c)^2
                    grad_logits.mul_(tanh.square_().neg_().add_(1.0))
                grad_logits = grad_logits.to(compute_dtype)
                grad_hidden[start : start + LOSS_CHUNK_ROWS] = grad_logits @ weight_c
                chunk_grad_weight = grad_logits.t() @ h
                grad_weight = chunk_grad_weight.float() if grad_weight is None else grad_weight.add_(chunk_grad_weight)
        if compute_grad:
            ctx.save_for_backward(grad_hidden.div_(n_targets), grad_weight.div_(n_targets).to(weight.dtype))
        return loss_sum / n_targets

    @staticmethod
    def backward(ctx, grad_loss):
        if getattr(ctx, "backward_done", False):  # the saved gradients were scaled in place by the first backward
            raise RuntimeError("LMHeadCrossEntropy supports one backward pass per forward "
                               "(retain_graph is not supported)")
        ctx.backward_done = True
        grad_hidden, grad_weight = ctx.saved_tensors  # used once: scaled in place, no new 0.15 GB (Vp, C) buffer
        return grad_hidden.mul_(grad_loss.to(grad_hidden.dtype)), grad_weight.mul_(grad_loss), None, None, None, None


def soft_capped(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """c * tanh(logits / c): logits bounded to (-c, c), near-identity well inside (Gemma 2; the speedrun uses 30)."""
    return logits if softcap is None else softcap * torch.tanh(logits / softcap)


class GPT2ReproPreTrainedModel(PreTrainedModel):
    config_class = GPT2ReproConfig
    config: GPT2ReproConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["Block"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    # The attention runs through transformers' attention interface, so every kernel it offers works here
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True  # serving engines' transformers backends plug in their own kernels
    _can_compile_fullgraph = True  # static-cache generation compiles the decoding step whole
    supports_gradient_checkpointing = True  # per Block
    accepts_loss_kwargs = False  # Trainer: our loss is a mean over the call's targets; it takes no num_items_in_batch
    _input_embed_layer = "wte"  # transformers' get/set_input_embeddings find it here, or through `transformer`
    # output_hidden_states / output_attentions: transformers' output capture records these modules' outputs
    _can_record_outputs = {"hidden_states": Block, "attentions": CausalSelfAttention}

    def resize_token_embeddings(
        self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None, mean_resizing: bool = True
    ) -> nn.Embedding:
        """Resize the vocabulary to `new_num_tokens` real tokens (e.g. after adding tokens to the tokenizer).

        The matrix keeps its padding: `new_num_tokens` rounded up to `vocab_pad_multiple` rows (`pad_to_multiple_of`
        replaces that multiple), `config.vocab_size` becomes `new_num_tokens`, and the padded rows stay invisible.
        Kept rows are copied; added rows are drawn around the old rows' mean with 1e-9 x their covariance, as
        transformers does, so their logits start near the old average (`mean_resizing=False`: the normal init).
        """
        if new_num_tokens is None and pad_to_multiple_of is None:
            return self.get_input_embeddings()
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be a positive integer, got {pad_to_multiple_of}")
        if new_num_tokens is not None and new_num_tokens < 1:
            raise ValueError(f"new_num_tokens must be a positive integer, got {new_num_tokens}")
        if pad_to_multiple_of is not None:  # changed only once both are known to be valid
            self.config.vocab_pad_multiple = pad_to_multiple_of
        new_num_tokens = self.config.vocab_size if new_num_tokens is None else new_num_tokens
        old_num_tokens, self.config.vocab_size = self.config.vocab_size, new_num_tokens  # padded_vocab_size follows
        wte = self._resized_rows(self.get_input_embeddings(), old_num_tokens, mean_resizing)
        self.set_input_embeddings(wte)
        head = self.get_output_embeddings()
        if head is not None:
            if self.config.tie_word_embeddings:
                head = nn.Linear(wte.embedding_dim, wte.num_embeddings, bias=False, device="meta")
                head.weight = wte.weight
            else:
                head = self._resized_rows(head, old_num_tokens, mean_resizing)
            self.set_output_embeddings(head)
        return wte

    def _resized_rows(self, module: nn.Embedding | nn.Linear, old_num_tokens: int, mean_resizing: bool) -> nn.Module:
        """A copy of `module` (wte, or an untied lm_head) with its rows for the new size (wte `padded_vocab_size`, the
        head `config.lm_head_rows`): min(old, new) rows kept, added real rows initialised, padding rows zero."""
        old = module.weight.detach()
        new_num_tokens, width = self.config.vocab_size, old.shape[1]
        if isinstance(module, nn.Embedding):
            resized = nn.Embedding(self.config.padded_vocab_size, width, device=old.device, dtype=old.dtype)
        else:
            resized = nn.Linear(width, self.config.lm_head_rows, bias=False, device=old.device, dtype=old.dtype)
        weight = resized.weight.data.zero_()
        kept = min(old_num_tokens, new_num_tokens)
        weight[:kept] = old[:kept]
        added = new_num_tokens - kept
        if added > 0 and mean_resizing:
            real = old[:old_num_tokens].float()
            mean = real.mean(dim=0)
            covariance = (real - mean).T @ (real - mean) / old_num_tokens
            try:
                distribution = torch.distributions.MultivariateNormal(mean, covariance_matrix=1e-9 * covariance)
                rows = distribution.sample((added,))
            # Not positive definite (fewer tokens than channels, or degenerate rows, e.g. an untied head still at zero):
            # the mean. The argument check raises ValueError; with validation off (a process-wide switch that other
            # code may flip), the Cholesky factorisation raises LinAlgError.
            except (ValueError, torch.linalg.LinAlgError):
                rows = mean.expand(added, -1)
            weight[kept:new_num_tokens] = rows.to(old.dtype)
        elif added > 0:
            nn.init.normal_(weight[kept:new_num_tokens], mean=0.0, std=self.config.initializer_range)
        return resized

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            if getattr(module, "is_residual_projection", False):
                # Each block adds two projections to the residual stream; scaling them by 1/sqrt(2 * n_layer)
                # keeps the stream's variance from growing with depth (GPT-2 paper, section 2.3).
                std = 0.0 if self.config.zero_init_residual else std / math.sqrt(2 * self.config.n_layer)
            if module is getattr(self, "lm_head", None):
                if self.config.tie_word_embeddings:
                    return  # the tied matrix is wte's, initialised once as an embedding
                std = 0.0  # an untied head starts at zero, as the speedrun's: every first prediction is uniform
            if std == 0.0:
                nn.init.zeros_(module.weight)
            else:
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class GPT2ReproModel(GPT2ReproPreTrainedModel):
    """The transformer without its head: token + position embeddings, n_layer blocks, a final LayerNorm."""

    def __init__(self, config: GPT2ReproConfig):
        super().__init__(config)
        self.wte = nn.Embedding(config.padded_vocab_size, config.n_embd)  # rows >= vocab_size are padding
        self.wpe = nn.Embedding(config.n_positions, config.n_embd) if config.position_embedding == "learned" else None
        self.h = nn.ModuleList([Block(config, i) for i in range(config.n_layer)])
        self.ln_f = make_norm(config)
        self.post_init()

    # Output capture: output_hidden_states gives the residual stream after the embeddings and after each block, the last
    # one after ln_f (as transformers' GPT-2); output_attentions each layer's probabilities (B, nh, T, S), eager only.
    # It also turns the output into a tuple for return_dict=False.
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        inputs_embeds: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPast:
        r"""
        cache: the KV cache to extend (a `DynamicCache`, or a `StaticCache` for compiled decoding); `past_key_values`
            is its name before transformers 5.24, and either name works (not both).
        inputs_embeds: (B, T, C) token embeddings to use instead of `input_ids` (exactly one of the two).
        kwargs: transformers' typed keywords (`output_hidden_states`, `output_attentions`, flash attention's
            packed-sequence arguments) and `cache_position`, which must be the positions that follow the cache. Any
            other keyword raises a TypeError.
        """
        cache = resolve_cache_argument(cache, past_key_values)
        check_forward_kwargs(self, kwargs)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` and `inputs_embeds`.")
        if inputs_embeds is None:
            inputs_embeds = self.wte(input_ids)  # (B, T, C)
        if use_cache is None:  # a cache serves generation; a training forward would only fill it for nothing
            use_cache = self.config.use_cache and not self.training
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        checkpointing = any(block.gradient_checkpointing for block in self.h)
        if cache is not None and self.training and torch.is_grad_enabled() and checkpointing:
            raise ValueError("Activation checkpointing recomputes blocks in backward, which would write the KV cache "
                             "twice: train with use_cache=False (the default in training mode).")
        # transformers' mask for the configured kernel: None where `is_causal` alone is exact, else padding and the
        # cache's layout (a static cache's empty slots) folded into an SDPA/eager mask or a flex BlockMask. Given
        # positions that restart at 0 with no mask mark packed sequences, kept apart (transformers' convention); that
        # check reads the device, so the positions we make ourselves are not passed.
        mask = create_causal_mask(config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                  position_ids=position_ids, **{CACHE_FIELD: cache})
        position_ids = checked_position_ids(self.config, position_ids, cache, inputs_embeds.shape[1],
                                            inputs_embeds.device, kwargs.pop("cache_position", None))
        x, rotary = inputs_embeds, None
        if self.wpe is not None:
            x = x + self.wpe(position_ids)  # (B, T, C)
        else:
            rotary = rotary_cos_sin(position_ids, self.config.n_embd // self.config.n_head, self.config.rope_theta)
        for block in self.h:
            x = block(x, mask, rotary, cache, position_ids=position_ids, **kwargs)
        return BaseModelOutputWithPast(last_hidden_state=self.ln_f(x), **{CACHE_FIELD: cache if use_cache else None})


def training_flops_per_token(num_parameters_for_flops: int, n_layer: int, n_embd: int, seq_len: int) -> int:
    """Training FLOPs per token (forward + backward) of a GPT-2 (PaLM paper, appendix B): 6 per parameter that
    multiplies (2 per multiply-add, times 3: forward, and backward's gradients of input and weight), plus attention's
    12 * n_layer * C * T (its 2 matmuls, q @ k and att @ v, of C * T multiply-adds per token each, times 2 x 3).
    Module-level so that benchmarks count transformers' GPT2LMHeadModel by the same formula."""
    return 6 * num_parameters_for_flops + 12 * n_layer * n_embd * seq_len


OPENAI_GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")  # 124M, 350M, 774M, 1.5B


class GPT2ReproForCausalLM(GPT2ReproPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}

    def __init__(self, config: GPT2ReproConfig):
        super().__init__(config)
        # save_pretrained maps AutoModelForCausalLM to this class; the base model too, so that AutoModel (features,
        # serving engines' transformers backends) loads a checkpoint of this class with trust_remote_code.
        base_model = {"AutoModel": "modeling_gpt2repro.GPT2ReproModel"}
        config.auto_map = {**base_model, **(getattr(config, "auto_map", None) or {})}  # a loaded config's entries win
        self.transformer = GPT2ReproModel(config)
        self.lm_head = nn.Linear(config.n_embd, config.lm_head_rows, bias=False)
        self.post_init()

    def save_pretrained(self, save_directory, is_main_process: bool = True, state_dict: dict | None = None, **kwargs):
        """transformers' save_pretrained, an untied head stored at `vocab_size` rows (config.padded_lm_head False): a
        serving engine builds its head with that many rows and vLLM's loader asserts the stored one has as many.
        The padded rows never reach an output, so the folder loads back to a model with the same outputs. A head
        that is not a plain tensor (an FSDP2 shard), or a model with adapters or quantised, is saved as it is."""
        state_dict = self.state_dict() if state_dict is None else dict(state_dict)
        head = state_dict.get("lm_head.weight")
        plain = not getattr(self, "_hf_peft_config_loaded", False) and getattr(self, "hf_quantizer", None) is None
        cut = (plain and not self.config.tie_word_embeddings and type(head) is torch.Tensor
               and head.shape[0] > self.config.vocab_size)
        if not cut:
            return super().save_pretrained(save_directory, is_main_process, state_dict, **kwargs)
        state_dict["lm_head.weight"] = head[: self.config.vocab_size]  # a view: nothing copied
        self.config.padded_lm_head = False  # for the config.json written with it
        try:
            return super().save_pretrained(save_directory, is_main_process, state_dict, **kwargs)
        finally:
            self.config.padded_lm_head = True

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        # Read by generate() in this signature: it builds the padding mask and the positions only for a model that
        # names them.
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        shift_labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        return_logits: bool = True,
        **kwargs: Unpack[TransformersKwargs],
    ) -> CausalLMOutputWithPast:
        r"""
        labels: (B, T) targets in the transformers convention: shifted inside (position t predicts labels[t+1]),
            -100 ignored.
        shift_labels: (B, T) targets already aligned with `input_ids` (position t predicts shift_labels[t]), the
            (x, y) convention of nanoGPT's data loaders; -100 ignored.
        logits_to_keep: an int n keeps the logits of the last n positions (0: all); a 1-D tensor keeps those positions.
            Not with a loss, which needs every position.
        return_logits: False returns the loss alone (`logits` None), computed by `LMHeadCrossEntropy` chunk by
            chunk, so training never materialises the (B, T, Vp) logits.
        kwargs: the rest of `GPT2ReproModel.forward`'s arguments (`cache` or `past_key_values`, `inputs_embeds`,
            `output_attentions`, `output_hidden_states`, `cache_position`), passed through unread; it raises a
            TypeError for any other keyword.
        """
        if labels is not None and shift_labels is not None:
            raise ValueError("Pass either `labels` (shifted inside) or `shift_labels` (already shifted), not both.")
        if labels is not None:
            shift_labels = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # the last position has no next token
        if use_cache is None and shift_labels is not None:
            use_cache = False  # a loss (training, validation) needs no cache; an unused one holds every layer's K, V
        if shift_labels is None and not return_logits:
            raise ValueError("return_logits=False needs `labels` or `shift_labels`: there would be nothing to return.")
        if shift_labels is not None and not (isinstance(logits_to_keep, int) and logits_to_keep == 0):
            raise ValueError("`logits_to_keep` cannot be used with `labels`/`shift_labels`: "
                             "the loss needs every position.")
        # return_dict=True: the fields are read below, whatever config.return_dict says
        outputs = self.transformer(
            input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=use_cache, return_dict=True,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state  # (B, T, C)
        loss = logits = None
        if not return_logits and torch.compiler.is_compiling():
            # Compiled, the plain loss is faster: inductor fuses the fp32 upcast, soft-cap, mask and log-softmax of
            # the logits into the loss kernels, while the chunked Function's gradients computed in forward stay
            # separate kernels (measured in benchmarks/bench_train.py). The padded columns are masked to -inf, not
            # sliced off: rows stay 50304 = 128 * 393 wide and backward needs no pad back to Vp (H200, B16 x T1024:
            # 1.09x -> 1.12x transformers' compiled step).
            logits = soft_capped(self.lm_head(hidden_states).float(), self.config.logit_softcap)  # (B, T, Vp)
            padded = torch.arange(logits.shape[-1], device=logits.device) >= self.config.vocab_size  # (Vp,)
            logits = logits.masked_fill(padded, float("-inf"))
            loss = F.cross_entropy(logits.flatten(0, 1), shift_labels.flatten(), ignore_index=IGNORE_INDEX)
            logits = None
        elif not return_logits:
            weight = self.lm_head.weight
            compute_grad = torch.is_grad_enabled() and (hidden_states.requires_grad or weight.requires_grad)
            loss = LMHeadCrossEntropy.apply(hidden_states.flatten(0, 1), weight, shift_labels.flatten(),
                                            self.config.vocab_size, compute_grad, self.config.logit_softcap)
        else:
            if isinstance(logits_to_keep, int) and logits_to_keep > 0:
                hidden_states = hidden_states[:, -logits_to_keep:]
            elif isinstance(logits_to_keep, torch.Tensor):
                hidden_states = hidden_states[:, logits_to_keep]
            logits = soft_capped(self.lm_head(hidden_states), self.config.logit_softcap)  # (B, T, Vp)
            if shift_labels is not None:
                # The padded columns must carry no probability: an imported GPT-2 has zeros there, i.e. logits far
                # above the real ones. -inf gives exactly the loss over the first V columns, without a copy.
                logits[..., self.config.vocab_size:] = float("-inf")
                loss = F.cross_entropy(logits.flatten(0, 1), shift_labels.flatten(), ignore_index=IGNORE_INDEX)
            logits = logits[..., : self.config.vocab_size]  # (B, T, V): a view, the padded columns never leave
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions,
            **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)},
        )

    def num_parameters_for_flops(self) -> int:
        """Parameters that do a multiply-add per token: all but the embedding tables, which are looked up (a tied wte
        counts once, as the lm_head matmul; an untied one not at all). Biases and norm gains count as in PaLM's
        formula, though they only add."""
        tables = [self.transformer.wpe] + ([] if self.config.tie_word_embeddings else [self.transformer.wte])
        return sum(p.numel() for p in self.parameters()) - sum(t.weight.numel() for t in tables if t is not None)

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token (forward + backward): `training_flops_per_token` of this model."""
        return training_flops_per_token(self.num_parameters_for_flops(), self.config.n_layer, self.config.n_embd,
                                        seq_len)

    @classmethod
    def from_gpt2(cls, source: str | os.PathLike | PreTrainedModel, **from_pretrained_kwargs) -> "GPT2ReproForCausalLM":
        """Import OpenAI GPT-2 weights from one of its names ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl": 124M to
        1.5B, under openai-community/ on the Hub), another Hub id, a local folder, or a `transformers.GPT2LMHeadModel`.
        The padded embedding rows are zero; they never reach a caller."""
        from transformers import GPT2LMHeadModel

        if isinstance(source, str) and source in OPENAI_GPT2_NAMES and not os.path.isdir(source):  # a folder wins
            source = f"openai-community/{source}"
        if isinstance(source, PreTrainedModel):
            gpt2 = source
        else:
            try:
                gpt2 = GPT2LMHeadModel.from_pretrained(source, **from_pretrained_kwargs)
            except OSError as err:
                raise OSError(
                    f"Could not load GPT-2 weights from '{source}': it needs a local folder holding a GPT-2 "
                    f"checkpoint, or the Hugging Face Hub (or its local cache) for a Hub id ({err.__class__.__name__})."
                ) from None
        hf = gpt2.config
        if hf.model_type != "gpt2":
            raise ValueError(f"from_gpt2 imports OpenAI GPT-2 checkpoints; this one is a '{hf.model_type}' model.")
        if hf.activation_function not in ("gelu_new", "gelu_pytorch_tanh") or hf.n_inner not in (None, 4 * hf.n_embd) \
                or hf.scale_attn_by_inverse_layer_idx or hf.reorder_and_upcast_attn or hf.add_cross_attention \
                or not hf.scale_attn_weights:
            raise ValueError("from_gpt2 supports the stock GPT-2 architecture only "
                             "(tanh-GELU, 4x MLP, standard attention).")
        config = GPT2ReproConfig(
            vocab_size=hf.vocab_size, n_positions=hf.n_positions, n_embd=hf.n_embd, n_layer=hf.n_layer,
            n_head=hf.n_head, layer_norm_epsilon=hf.layer_norm_epsilon, initializer_range=hf.initializer_range,
            bos_token_id=hf.bos_token_id, eos_token_id=hf.eos_token_id,
        )
        with torch.device("meta"):
            model = cls(config)
        state = {}
        for name, tensor in gpt2.state_dict().items():
            if name.endswith(_CONV1D_WEIGHTS):
                tensor = tensor.t()
            elif name == "transformer.wte.weight":
                tensor = F.pad(tensor, (0, 0, 0, config.padded_vocab_size - config.vocab_size))  # (Vp, C)
            if name != "lm_head.weight":  # tied to wte
                state[name] = tensor.contiguous()
        model.load_state_dict(state, strict=False, assign=True)
        model.tie_weights()
        missing = [n for n, p in model.named_parameters() if p.is_meta]
        if missing:
            raise ValueError(f"GPT-2 checkpoint lacks weights for {missing[:3]}...; is it a complete GPT2LMHeadModel?")
        return model.to(gpt2.dtype).eval()

    def to_gpt2(self) -> PreTrainedModel:
        """Export to a stock `transformers.GPT2LMHeadModel` (padding rows dropped, matmuls in Conv1D layout), for
        tools that only know GPT-2 (lm-evaluation-harness, vLLM, llama.cpp's converter)."""
        from transformers import GPT2Config, GPT2LMHeadModel

        c = self.config
        gpt2 = GPT2ReproConfig()
        # zero_init_residual only changes the initial weights: a trained model of it is a plain GPT-2
        options = [name for name in c.architecture_options if name != "zero_init_residual"]
        different = [f"{name}={getattr(c, name)!r}" for name in options if getattr(c, name) != getattr(gpt2, name)]
        if different:
            raise ValueError(f"to_gpt2() exports the GPT-2 architecture only; this model has {', '.join(different)}: "
                             f"save it with save_pretrained and load it with trust_remote_code=True instead.")
        hf_config = GPT2Config(
            vocab_size=c.vocab_size, n_positions=c.n_positions, n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head,
            layer_norm_epsilon=c.layer_norm_epsilon, initializer_range=c.initializer_range,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,  # trained without dropout
            bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id,
        )
        with torch.device("meta"):
            gpt2 = GPT2LMHeadModel(hf_config)
        state = {}
        for name, tensor in self.state_dict().items():
            tensor = tensor.detach()
            if name.endswith(_CONV1D_WEIGHTS):
                tensor = tensor.t()
            elif name == "transformer.wte.weight":
                tensor = tensor[: c.vocab_size]
            if name != "lm_head.weight":
                state[name] = tensor.clone().contiguous()
        gpt2.load_state_dict(state, strict=False, assign=True)
        gpt2.tie_weights()
        return gpt2.eval()


# `save_pretrained` writes auto_map and copies this file and the configuration next to the weights, so
# `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` works where gpt2repro is not installed.
GPT2ReproConfig.register_for_auto_class()
GPT2ReproModel.register_for_auto_class("AutoModel")
GPT2ReproForCausalLM.register_for_auto_class("AutoModelForCausalLM")
# Where gpt2repro is importable, the Auto classes know it without remote code.
AutoConfig.register("gpt2repro", GPT2ReproConfig, exist_ok=True)
AutoModel.register(GPT2ReproConfig, GPT2ReproModel, exist_ok=True)
AutoModelForCausalLM.register(GPT2ReproConfig, GPT2ReproForCausalLM, exist_ok=True)


__all__ = ["GPT2ReproForCausalLM", "GPT2ReproModel", "GPT2ReproPreTrainedModel"]
