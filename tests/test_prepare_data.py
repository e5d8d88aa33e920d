"""prepare_data.py: the shard token stream against transformers' GPT-2 tokenizer, shard layout, resume, errors.

The reference encoding is transformers' GPT2TokenizerFast (a BPE implementation independent of tiktoken,
which prepare_data uses) built from the same OpenAI files; documents never contain "<|endoftext|>", on
which the two tokenizers differ by design. Only the tests of prepare_data's own faster paths (token arrays
without Python ints, book-sized tasks) compare with tiktoken's `encode_ordinary` itself, which they must equal.
"""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import prepare_data
from prepare_data import main
from tokenization_gpt2repro import get_tiktoken_encoding, get_tokenizer

REPO = Path(__file__).resolve().parents[1]
EOT = 50256
DOCUMENTS = [
    "Hello, I'm a language model, and this is the first document.",
    "Naïve café — “quotes”, emoji 🙂 and digits 12345.\n\nA second paragraph\twith a tab.",
    "",  # an empty document still gets its <|endoftext|>
    "   leading spaces and trailing newline\n",
    "The quick brown fox jumps over the lazy dog. " * 12,
    "short",
    "Deutsch: Übermäßig große Straßen; 日本語のテキスト; русский текст.",
]
SMALL_SHARDS = ["--shard_size", "40", "--val_tokens", "23"]  # small enough that documents span shard boundaries


@pytest.fixture(scope="module")
def reference_tokens():
    tokenizer = get_tokenizer()
    return lambda documents: [t for doc in documents for t in [EOT] + tokenizer.encode(doc)]


def read_stream(output_dir):
    """(shard names in order, all their tokens) read with plain np.load."""
    names = sorted(p.name for p in Path(output_dir).glob("*.npy"))
    names.sort(key=lambda n: int(n.rsplit("_", 1)[1].split(".")[0]))
    return names, [int(t) for n in names for t in np.load(Path(output_dir) / n)]


def write_inputs(tmp_path, kind):
    if kind == "txt":
        for i, doc in enumerate(DOCUMENTS):
            (tmp_path / f"doc_{i:02d}.txt").write_text(doc or "\n", encoding="utf-8")  # an empty file is refused
        return [str(tmp_path / "doc_*.txt")], [doc or "\n" for doc in DOCUMENTS]
    if kind == "jsonl":
        half = len(DOCUMENTS) // 2
        for name, docs in (("a.jsonl", DOCUMENTS[:half]), ("b.jsonl", DOCUMENTS[half:])):
            (tmp_path / name).write_text("".join(json.dumps({"id": i, "body": d}) + "\n" for i, d in enumerate(docs)))
        return [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")], DOCUMENTS
    pq.write_table(pa.table({"body": DOCUMENTS, "score": list(range(len(DOCUMENTS)))}), tmp_path / "docs.parquet", row_group_size=3)
    return [str(tmp_path / "docs.parquet")], DOCUMENTS


@pytest.mark.parametrize("kind, num_proc", [("txt", 1), ("jsonl", 2), ("parquet", 2)])
def test_shards_hold_gpt2_tokens_of_every_document_across_shard_boundaries(tmp_path, reference_tokens, kind, num_proc):
    paths, documents = write_inputs(tmp_path, kind)
    out = tmp_path / "out"
    main(["--data_files", *paths, "--text_column", "body", "--output_dir", str(out), "--num_proc", str(num_proc), *SMALL_SHARDS])
    names, tokens = read_stream(out)
    expected = reference_tokens(documents)
    assert tokens == expected
    assert names[0] == "corpus_val_000000.npy" and names[1:] == [f"corpus_train_{i:06d}.npy" for i in range(1, len(names))]
    sizes = [len(np.load(out / n)) for n in names]
    assert sizes[0] == 23 and all(s == 40 for s in sizes[1:-1]) and 0 < sizes[-1] <= 40

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["total_tokens"] == len(expected) and manifest["documents"] == len(documents)
    assert [s["name"] for s in manifest["shards"]] == names
    for shard in manifest["shards"]:
        assert shard["sha256"] == hashlib.sha256((out / shard["name"]).read_bytes()).hexdigest()
        assert shard["tokens"] == len(np.load(out / shard["name"]))


def test_book_sized_documents_are_encode_ordinary_on_1_and_2_processes(tmp_path):
    """Documents of ~200 KB (several to a worker task, tasks on 2 processes): exactly `[EOT] + encode_ordinary`,
    and the same bytes (shards and manifest) on 1 and 2 processes."""
    _, tasks = prepare_data.embedded_corpus()
    chapters = [text for task in tasks for text in task.read(task.items)]
    books, book = [], []
    for chapter in chapters[::2]:  # every other chapter: ~2 MB in 10 books
        book.append(chapter)
        if sum(map(len, book)) >= 200_000:
            books.append("\n\n".join(book))
            book = []
    books[1] = books[1].replace("\n", "\r\n")  # Windows line ends: read as "\n", as `datasets` reads them
    books[2] = "<|endoftext|> in a document is text, not the special token. " + books[2]
    books[3] = "\ufeffNaïve café — “quotes” 🙂 日本語. " + books[3]
    for i, book in enumerate(books):
        (tmp_path / f"book_{i}.txt").write_bytes(book.encode("utf-8"))
    assert len(books) * 200_000 > 2 * prepare_data.TASK_CHARS  # several tasks, each of several books
    encoding = get_tiktoken_encoding()
    expected = [t for i in range(len(books))
                for t in [EOT] + encoding.encode_ordinary((tmp_path / f"book_{i}.txt").read_text(encoding="utf-8"))]
    args = ["--data_files", str(tmp_path / "book_*.txt"), "--shard_size", "100000"]
    for num_proc in (1, 2):
        main([*args, "--output_dir", str(tmp_path / f"out{num_proc}"), "--num_proc", str(num_proc)])
        assert read_stream(tmp_path / f"out{num_proc}")[1] == expected
    files = sorted(p.name for p in (tmp_path / "out1").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "out2").iterdir())
    for name in files:
        assert (tmp_path / "out1" / name).read_bytes() == (tmp_path / "out2" / name).read_bytes()


@pytest.mark.parametrize("text", ["", "<|endoftext|> is text here", "lone \ud800 surrogate", "Naïve 🙂 日本語\r\n"])
def test_token_arrays_are_encode_ordinary(text):
    assert prepare_data.ordinary_tokens(text).tolist() == get_tiktoken_encoding().encode_ordinary(text)


TRICKY_INPUTS = {  # file name -> bytes: what our own readers must read exactly as `datasets` does
    "txt": {
        "a_crlf.txt": b"line one\r\nline two\r\n",
        "b_cr.txt": b"old mac\rline ends",
        "c_bom.txt": b"\xef\xbb\xbfcaf\xc3\xa9 with a byte order mark\n",
        "d_plain.txt": b"no newline at the end",
    },
    "jsonl": {
        "a.jsonl": b'\xef\xbb\xbf\n{"text": "after a BOM alone on its line", "n": 1, "meta": {"k": [1, 2]}}\n\n   \n'
                   b'{"n": 2, "text": "caf\\u00e9 \\ud83d\\ude42 \\"q\\" \\n\\t"}\r\n',
        "b.jsonl": b'\xef\xbb\xbf{"text": "", "n": 3}\n{"text": "no newline at the end", "n": 4}',
    },
    "json": {"a.json": b'[{"text": "an array of objects"}, {"text": "is read by datasets"}]'},
}


def write_tricky_inputs(tmp_path, kind):
    if kind == "parquet":
        texts = ["first", "caf\u00e9 \U0001f642", "", "row group 2", "last"]
        pq.write_table(pa.table({"text": texts[:4], "n": [1, 2, 3, 4]}), tmp_path / "a.parquet", row_group_size=2)
        pq.write_table(pa.table({"text": pa.array(texts[4:], type=pa.large_string()), "n": [5]}), tmp_path / "b.parquet")
        return [str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")]
    for name, content in TRICKY_INPUTS[kind].items():
        (tmp_path / name).write_bytes(content)
    return [str(tmp_path / name) for name in TRICKY_INPUTS[kind]]


@pytest.mark.parametrize("kind", ["txt", "jsonl", "json", "parquet"])
def test_local_files_give_the_documents_datasets_reads(tmp_path, reference_tokens, kind):
    """.txt, .jsonl and .parquet are read without `datasets` (its import alone takes seconds), .json with it."""
    from datasets import load_dataset

    paths = write_tricky_inputs(tmp_path, kind)
    builder = {"txt": "text", "jsonl": "json", "json": "json", "parquet": "parquet"}[kind]
    options = {"sample_by": "document", "keep_linebreaks": True} if builder == "text" else {}
    texts = [row["text"] for row in load_dataset(builder, data_files=paths, split="train", streaming=True, **options)]
    main(["--data_files", *paths, "--output_dir", str(tmp_path / "out"), "--num_proc", "2", "--val_tokens", "5"])
    assert read_stream(tmp_path / "out")[1] == reference_tokens(texts)
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["documents"] == len(texts)


def test_bin_format_is_llmc_layout(tmp_path, reference_tokens):
    paths, documents = write_inputs(tmp_path, "parquet")
    out = tmp_path / "out"
    main(["--data_files", *paths, "--text_column", "body", "--output_dir", str(out), "--format", "bin", "--num_proc", "1", *SMALL_SHARDS])
    tokens = []
    for path in sorted(out.glob("*.bin"), key=lambda p: p.name.rsplit("_", 1)[1]):
        header = np.frombuffer(path.read_bytes()[:1024], dtype="<i4")
        assert header[0] == 20240520 and header[1] == 1 and not header[3:].any()
        body = np.frombuffer(path.read_bytes()[1024:], dtype="<u2")
        assert len(body) == header[2]
        tokens += body.tolist()
    assert tokens == reference_tokens(documents)


def test_interrupted_run_resumes_to_identical_shards(tmp_path, monkeypatch):
    paths, _ = write_inputs(tmp_path, "jsonl")
    args = ["--data_files", *paths, "--text_column", "body", "--num_proc", "1", *SMALL_SHARDS]
    main([*args, "--output_dir", str(tmp_path / "whole")])

    real_write_shard, calls = prepare_data.write_shard, []

    def killed_on_third_shard(path, tokens):
        calls.append(path)
        if len(calls) == 3:  # a kill mid-write: a partial temporary file, no shard
            Path(str(path) + ".tmp").write_bytes(b"\x93NUMPY partial")
            raise KeyboardInterrupt
        return real_write_shard(path, tokens)

    monkeypatch.setattr(prepare_data, "write_shard", killed_on_third_shard)
    with pytest.raises(KeyboardInterrupt):
        main([*args, "--output_dir", str(tmp_path / "resumed")])
    assert len(list((tmp_path / "resumed").glob("*.npy"))) == 2
    monkeypatch.setattr(prepare_data, "write_shard", real_write_shard)

    (tmp_path / "resumed" / "corpus_train_000001.npy").write_bytes(b"corrupted after the run")  # re-verified, rewritten
    main([*args, "--output_dir", str(tmp_path / "resumed")])
    whole, resumed = sorted((tmp_path / "whole").iterdir()), sorted((tmp_path / "resumed").glob("*.npy"))
    assert [p.name for p in whole if p.suffix == ".npy"] == [p.name for p in resumed]
    for path in resumed:
        assert path.read_bytes() == (tmp_path / "whole" / path.name).read_bytes()
    assert (tmp_path / "whole" / "manifest.json").read_text() == (tmp_path / "resumed" / "manifest.json").read_text()


def test_killed_run_leaves_only_whole_shards_and_resumes_identically(tmp_path):
    """SIGKILL (no cleanup) a real run of 2 processes mid-way; every shard on disk must already be final."""
    args = ["--dataset", "embedded", "--shard_size", "8192", "--num_proc", "2"]  # ~120 shards: time to kill mid-run
    main([*args, "--output_dir", str(tmp_path / "whole")])
    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, str(REPO / "prepare_data.py"), *args, "--output_dir", str(killed)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 60
    while process.poll() is None and len(list(killed.glob("*.npy"))) < 20 and time.time() < deadline:
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)  # the run and its worker processes
    process.wait()
    on_disk = sorted(killed.glob("*.npy"))
    assert 0 < len(on_disk) < len(list((tmp_path / "whole").glob("*.npy")))  # it really stopped half-way
    for path in on_disk:
        assert path.read_bytes() == (tmp_path / "whole" / path.name).read_bytes()
    main([*args, "--output_dir", str(killed)])
    assert sorted(p.name for p in killed.glob("*.npy")) == sorted(p.name for p in (tmp_path / "whole").glob("*.npy"))
    for path in killed.glob("*.npy"):
        assert path.read_bytes() == (tmp_path / "whole" / path.name).read_bytes()


def test_embedded_corpus_makes_val_and_train_shards(tmp_path, reference_tokens):
    out = tmp_path / "kjv"
    main(["--dataset", "embedded", "--output_dir", str(out)])
    names, tokens = read_stream(out)
    assert names[0] == "kjv_val_000000.npy" and len(np.load(out / names[0])) == 2**16
    assert len(names) >= 3 and all(len(np.load(out / n)) == 2**18 for n in names[1:-1])
    first_chapter = reference_tokens(["Genesis 1\n\nIn the beginning God created the heaven and the earth."])
    assert tokens[: len(first_chapter)] == first_chapter
    assert tokens.count(EOT) == 1189  # one document per chapter of the King James Bible
    assert 900_000 < len(tokens) < 1_100_000


class HubStandIn:
    """Replaces datasets.load_dataset for the Hub call: checks the arguments, streams a local parquet file."""

    def __init__(self, parquet_path):
        import datasets

        self.parquet_path, self.real_load_dataset, self.calls = parquet_path, datasets.load_dataset, []

    def __call__(self, path, name=None, split=None, streaming=False, columns=None):
        self.calls.append((path, name, split, streaming, columns))
        return self.real_load_dataset("parquet", data_files=[self.parquet_path], split=split, streaming=streaming, columns=columns)


def test_fineweb_edu_streams_and_stops_at_max_tokens(tmp_path, monkeypatch, reference_tokens):
    import datasets

    pq.write_table(pa.table({"text": DOCUMENTS, "url": ["u"] * len(DOCUMENTS)}), tmp_path / "000_00000.parquet")
    stand_in = HubStandIn(str(tmp_path / "000_00000.parquet"))
    monkeypatch.setattr(datasets, "load_dataset", stand_in)
    monkeypatch.setattr(prepare_data, "hub_reachable", lambda: True)
    max_tokens = 100
    main(["--dataset", "fineweb-edu", "--output_dir", str(tmp_path / "fw"), "--max_tokens", str(max_tokens), *SMALL_SHARDS])
    assert stand_in.calls == [("HuggingFaceFW/fineweb-edu", "sample-10BT", "train", True, ["text"])]
    names, tokens = read_stream(tmp_path / "fw")
    assert names[0] == "edufineweb_val_000000.npy"
    assert tokens == reference_tokens(DOCUMENTS)[:max_tokens]
    documents_used = [len(reference_tokens(DOCUMENTS[:i])) < max_tokens for i in range(len(DOCUMENTS))].count(True)
    assert json.loads((tmp_path / "fw" / "manifest.json").read_text())["documents"] == documents_used


def run_cli(*args, **env):
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", **env}
    return subprocess.run([sys.executable, str(REPO / "prepare_data.py"), *args], capture_output=True, text=True, env=environment, timeout=120)


def test_fineweb_edu_offline_fails_with_one_sentence(tmp_path):
    result = run_cli("--dataset", "fineweb-edu", "--output_dir", str(tmp_path / "fw"))
    assert result.returncode != 0
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "Hugging Face Hub" in result.stderr and "offline" in result.stderr


def test_help_lists_the_flags():
    result = run_cli("--help")
    assert result.returncode == 0
    for flag in ("--dataset", "--data_files", "--fineweb_config", "--text_column", "--output_dir", "--prefix",
                 "--shard_size", "--val_tokens", "--max_tokens", "--num_proc", "--format"):
        assert flag in result.stdout


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("missing.txt", None, "does not exist"),
        ("nothing_*.jsonl", None, "no file matches"),
        ("empty.txt", b"", "is empty"),
        ("a.csv", b"text\nx\n", r"is not .txt, .json, .jsonl or .parquet"),
        ("latin1.txt", b"caf\xe9 au lait", "could not read .*utf-8"),
        ("bad.parquet", b"not a parquet file at all", "could not read .*[Pp]arquet"),
        ("a.jsonl", b'{"body": "x"}\n', "has no column 'text' .*pass --text_column"),
        ("a.jsonl", b'{"text": null}\n', "not a string"),
        ("a.jsonl", b'{"text": "tiny"}\n', "lower --val_tokens"),
        ("a.jsonl", b'{"text": "fine"}\n{"text": "cut\n', r"could not read .*a.jsonl: line 2: "),
        ("a.jsonl", b'["an array"]\n', "line 1 is not a JSON object .*name a file of another JSON layout .json"),
    ],
)
def test_bad_input_gives_one_clear_error(tmp_path, name, content, message):
    if content is not None:
        (tmp_path / name).write_bytes(content)
    with pytest.raises(SystemExit, match=message):
        main(["--data_files", str(tmp_path / name), "--output_dir", str(tmp_path / "out"), "--num_proc", "1"])


def test_mixed_kinds_and_changed_settings_are_refused(tmp_path):
    paths, _ = write_inputs(tmp_path, "jsonl")
    (tmp_path / "c.txt").write_text("text")
    with pytest.raises(SystemExit, match="mixes json and text files"):
        main(["--data_files", *paths, str(tmp_path / "c.txt"), "--output_dir", str(tmp_path / "out")])
    args = ["--data_files", *paths, "--text_column", "body", "--output_dir", str(tmp_path / "out"), "--num_proc", "1"]
    main([*args, *SMALL_SHARDS])
    with pytest.raises(SystemExit, match="made with other settings"):
        main([*args, "--shard_size", "41", "--val_tokens", "23"])


def test_cli_error_is_one_line_and_nonzero_exit(tmp_path):
    result = run_cli("--data_files", str(tmp_path / "missing.jsonl"), "--output_dir", str(tmp_path / "out"))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"prepare_data.py: error: input file {tmp_path / 'missing.jsonl'} does not exist"]


@pytest.mark.parametrize("flag", ["--shard_size", "--val_tokens", "--num_proc"])
def test_non_positive_sizes_are_refused(tmp_path, flag, capsys):
    with pytest.raises(SystemExit):
        main(["--output_dir", str(tmp_path / "out"), flag, "0"])
    assert f"{flag} must be a positive integer, got 0" in capsys.readouterr().err
