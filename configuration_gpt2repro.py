"""Configuration of gpt2repro's GPT-2: the single source of truth for the model's shape."""
from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig


@strict
class GPT2ReproConfig(PreTrainedConfig):
    r"""
    GPT-2 as in "Language Models are Unsupervised Multitask Learners" (2019); the defaults are the 124M model.

    Args:
        vocab_size: number of real tokens (the tokenizer's size): 50257 = 256 bytes + 50000 merges + <|endoftext|>.
        n_positions: context length (block size).
        n_embd: width of the residual stream (C).
        n_layer: number of transformer blocks.
        n_head: attention heads per block; must divide `n_embd`.
        vocab_pad_multiple: the embedding matrix gets `padded_vocab_size` rows, `vocab_size` rounded up to this
            multiple (50257 -> 50304 = 393 * 128), which gives the lm_head matmul a kernel-friendly shape. The
            padded rows are never a target and never reach a caller.
        layer_norm_epsilon: LayerNorm epsilon (GPT-2 used 1e-5).
        initializer_range: std of the normal init of Linear and Embedding weights; the two residual
            projections of each block use initializer_range / sqrt(2 * n_layer).

    The options below default to GPT-2; the GPT-2 speedrun (modded-nanogpt) recipe changes them all:
        position_embedding: "learned" (a `wpe` table) or "rope" (rotary embeddings on q and k, no `wpe`).
        rope_theta: the rotary base: channel pair i turns by position * rope_theta ** (-2i / head size).
        qk_norm: RMS-normalise q and k per head before attention.
        mlp_activation: "gelu_tanh" or "relu2" (ReLU squared).
        norm: "layernorm" (gain and bias) or "rmsnorm" (no parameters).
        tie_word_embeddings: the head shares wte's matrix; untied, the head starts at zero.
        padded_lm_head: an untied head has `padded_vocab_size` rows (training's kernel-friendly matmul) or, False,
            `vocab_size` rows: how `save_pretrained` stores it, because serving engines (vLLM) build their own head
            with that many rows and load ours into it. The outputs are the same: the padded logits are masked.
        logit_softcap: None, or c for logits c * tanh(logits / c), in the loss and in generation alike.
        zero_init_residual: each block's two residual projections start at zero (the block starts as the identity).
        bias: the four matmuls of each block have biases (GPT-2) or not (the speedrun's).
    """

    model_type = "gpt2repro"
    keys_to_ignore_at_inference = ["past_key_values"]
    attribute_map = {
        "hidden_size": "n_embd",
        "num_hidden_layers": "n_layer",
        "num_attention_heads": "n_head",
        "max_position_embeddings": "n_positions",
        # Gemma 2's name, which serving engines read to cap the logits they compute with their own LM head
        "final_logit_softcapping": "logit_softcap",
    }
    # The options beside the shape, each a training flag: what the speedrun recipe changes, what a resumed run must
    # keep, and (all but zero_init_residual, which only sets the initial weights) what to_gpt2() cannot export.
    architecture_options = ("position_embedding", "qk_norm", "mlp_activation", "norm", "tie_word_embeddings",
                            "logit_softcap", "zero_init_residual", "bias")

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    vocab_pad_multiple: int = 128
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    use_cache: bool = True
    bos_token_id: int | None = 50256
    eos_token_id: int | list[int] | None = 50256
    pad_token_id: int | None = None
    tie_word_embeddings: bool = True
    padded_lm_head: bool = True
    position_embedding: str = "learned"
    rope_theta: float | int = 10000.0
    qk_norm: bool = False
    mlp_activation: str = "gelu_tanh"
    norm: str = "layernorm"
    logit_softcap: float | int | None = None
    zero_init_residual: bool = False
    bias: bool = True

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // self.vocab_pad_multiple) * self.vocab_pad_multiple

    @property
    def lm_head_rows(self) -> int:
        """The head's rows: wte's padded ones when tied (it is wte), else as `padded_lm_head` says."""
        return self.padded_vocab_size if self.tie_word_embeddings or self.padded_lm_head else self.vocab_size

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs) -> "GPT2ReproConfig":
        # transformers only warns when a checkpoint of another architecture is loaded into this class, then fails
        # later on mismatched shapes; say what is wrong at once.
        model_type = config_dict.get("model_type", cls.model_type)
        if model_type != cls.model_type:
            hint = (" Import OpenAI GPT-2 weights with GPT2ReproForCausalLM.from_gpt2(path)." if model_type == "gpt2"
                    else "")
            raise ValueError(f"The checkpoint holds a '{model_type}' model, not a '{cls.model_type}' one.{hint}")
        return super().from_dict(config_dict, **kwargs)

    def __post_init__(self, **kwargs):
        # Checked before transformers' own validation, which would wrap the ValueError in a non-ValueError.
        self.check_shape()
        super().__post_init__(**kwargs)

    def check_shape(self) -> None:
        """Raise a ValueError naming the setting that cannot make a GPT."""
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "vocab_pad_multiple"):
            if getattr(self, name) < 1:
                raise ValueError(f"GPT2ReproConfig.{name} must be a positive integer, got {getattr(self, name)}.")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"GPT2ReproConfig: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}) "
                f"so every head gets n_embd // n_head channels."
            )
        for name, allowed in (("position_embedding", ("learned", "rope")), ("mlp_activation", ("gelu_tanh", "relu2")),
                              ("norm", ("layernorm", "rmsnorm"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"GPT2ReproConfig.{name} must be one of {', '.join(map(repr, allowed))}, got "
                                 f"{getattr(self, name)!r}.")
        if self.logit_softcap is not None and not self.logit_softcap > 0:
            raise ValueError(f"GPT2ReproConfig.logit_softcap must be positive (or None), got {self.logit_softcap}.")
        if self.position_embedding == "rope" and (self.n_embd // self.n_head) % 2:
            raise ValueError(f"GPT2ReproConfig: rotary embeddings turn channel pairs, so the head size n_embd // "
                             f"n_head ({self.n_embd // self.n_head}) must be even.")


__all__ = ["GPT2ReproConfig"]
