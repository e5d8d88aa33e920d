from transformers import AutoTokenizer

from gpt2repro.tokenizer import EOT_TOKEN_ID, get_tiktoken_encoding, get_tokenizer

HELLO = "Hello, I'm a language model,"
HELLO_IDS = [15496, 11, 314, 1101, 257, 3303, 2746, 11]  # OpenAI GPT-2's encoding
PROSE = (
    "In the beginning God created the heaven and the earth.\n\n  It's 3.14 -- isn't it? "
    "Ünïcödé, emoji 🙂, tabs\tand    spaces; URLs like https://example.com/a?b=c.  "
)


def test_hf_and_tiktoken_give_gpt2_ids():
    tok, enc = get_tokenizer(), get_tiktoken_encoding()
    assert tok(HELLO).input_ids == HELLO_IDS
    assert enc.encode_ordinary(HELLO) == HELLO_IDS
    assert len(tok) == enc.n_vocab == 50257
    assert tok.eos_token_id == EOT_TOKEN_ID == 50256
    assert enc.encode("<|endoftext|>", allowed_special="all") == [50256]
    assert tok(PROSE).input_ids == enc.encode_ordinary(PROSE)
    assert tok.decode(enc.encode_ordinary(PROSE)) == PROSE


def test_saved_tokenizer_loads_with_autotokenizer(tmp_path):
    get_tokenizer().save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded(HELLO).input_ids == HELLO_IDS
    assert loaded.eos_token_id == 50256
