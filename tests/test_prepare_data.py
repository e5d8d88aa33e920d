"""prepare_data.py, its library (shard_writing.py, tokenizing_workers.py) and its corpus readers (corpus.py): the
shard token stream against transformers' GPT-2 tokenizer, shard layout, resume, errors; the command line's flags,
messages and exit statuses through `prepare_data.main`.

The reference encoding is transformers' GPT2TokenizerFast (a BPE implementation independent of tiktoken,
which prepare_data uses) built from the same OpenAI files; documents never contain "<|endoftext|>", on
which the two tokenizers differ by design. Only the tests of prepare_data's own faster paths (token arrays
without Python ints, book-sized tasks) compare with tiktoken's `encode_ordinary` itself, which they must equal.
"""
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gpt2repro import corpus, shard_writing, tokenizing_workers
from gpt2repro.shard_writing import PrepareSettings, prepare_embedded_corpus, prepare_shards
from gpt2repro.shards import list_shards, write_shard
from gpt2repro.tokenizer import get_tiktoken_encoding, get_tokenizer
from prepare_data import main
from train_helpers import the_error_line, tree_checksums

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
# 255 bytes a name may have, less "_train_000001.npy" and the temporary name's ".<pid>.tmp" (at most 7 pid digits)
LONGEST_PREFIX = 255 - len("_train_000001.npy") - len(".4194304.tmp")
SMALL_SIZES = {"shard_size": 40, "val_tokens": 23}  # small enough that documents span shard boundaries
SMALL_SHARDS = ["--shard_size", str(SMALL_SIZES["shard_size"]), "--val_tokens", str(SMALL_SIZES["val_tokens"])]


@pytest.fixture(scope="module")
def reference_tokens():
    tokenizer = get_tokenizer()
    return lambda documents: [t for doc in documents for t in [EOT] + tokenizer.encode(doc)]


def read_stream(output_dir):
    """(shard names in order, all their tokens) read with plain np.load."""
    names = sorted(p.name for p in Path(output_dir).glob("*.npy"))
    names.sort(key=lambda n: int(n.rsplit("_", 1)[1].split(".")[0]))
    return names, [int(t) for n in names for t in np.load(Path(output_dir) / n)]


def local_files(output_dir, data_files, **fields):
    """The settings of a preparation of local files into `output_dir`, prefix corpus (prepare_data.py's default)."""
    return PrepareSettings(output_dir=output_dir, dataset=None, data_files=tuple(data_files), prefix="corpus", **fields)


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
    pq.write_table(pa.table({"body": DOCUMENTS, "score": list(range(len(DOCUMENTS)))}), tmp_path / "docs.parquet",
                   row_group_size=3)
    return [str(tmp_path / "docs.parquet")], DOCUMENTS


@pytest.mark.parametrize("kind, num_proc", [("txt", 1), ("jsonl", 2), ("parquet", 2)])
def test_shards_hold_gpt2_tokens_of_every_document_across_shard_boundaries(tmp_path, reference_tokens, kind, num_proc):
    paths, documents = write_inputs(tmp_path, kind)
    out = tmp_path / "out"
    prepare_shards(local_files(out, paths, text_column="body", num_proc=num_proc, **SMALL_SIZES))
    names, tokens = read_stream(out)
    expected = reference_tokens(documents)
    assert tokens == expected
    assert names[0] == "corpus_val_000000.npy" and \
        names[1:] == [f"corpus_train_{i:06d}.npy" for i in range(1, len(names))]
    sizes = [len(np.load(out / n)) for n in names]
    assert sizes[0] == 23 and all(s == 40 for s in sizes[1:-1]) and 0 < sizes[-1] <= 40

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["total_tokens"] == len(expected) and \
        manifest["documents"] == len(documents)
    assert [s["name"] for s in manifest["shards"]] == names
    for shard in manifest["shards"]:
        assert shard["sha256"] == hashlib.sha256((out / shard["name"]).read_bytes()).hexdigest()
        assert shard["tokens"] == len(np.load(out / shard["name"]))


def test_book_sized_documents_are_encode_ordinary_on_1_and_2_processes(tmp_path):
    """Documents of ~200 KB (several to a worker task, tasks on 2 processes): exactly `[EOT] + encode_ordinary`,
    and the same bytes (shards and manifest) on 1 and 2 processes."""
    _, tasks = corpus.embedded_corpus()
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
    assert len(books) * 200_000 > 2 * corpus.TASK_CHARS  # several tasks, each of several books
    encoding = get_tiktoken_encoding()
    expected = [t for i in range(len(books))
                for t in [EOT] + encoding.encode_ordinary((tmp_path / f"book_{i}.txt").read_text(encoding="utf-8"))]
    for num_proc in (1, 2):
        prepare_shards(local_files(tmp_path / f"out{num_proc}", [str(tmp_path / "book_*.txt")], shard_size=100_000,
                                   val_tokens=100_000, num_proc=num_proc))
        assert read_stream(tmp_path / f"out{num_proc}")[1] == expected
    files = sorted(p.name for p in (tmp_path / "out1").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "out2").iterdir())
    for name in files:
        assert (tmp_path / "out1" / name).read_bytes() == (tmp_path / "out2" / name).read_bytes()


@pytest.mark.parametrize("text", ["", "<|endoftext|> is text here", "lone \ud800 surrogate", "Naïve 🙂 日本語\r\n"])
def test_token_arrays_are_encode_ordinary(text):
    assert tokenizing_workers.ordinary_tokens(text).tolist() == get_tiktoken_encoding().encode_ordinary(text)


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
        pq.write_table(pa.table({"text": pa.array(texts[4:], type=pa.large_string()), "n": [5]}),
                       tmp_path / "b.parquet")
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
    prepare_shards(local_files(tmp_path / "out", paths, num_proc=2, shard_size=10**8, val_tokens=5))
    assert read_stream(tmp_path / "out")[1] == reference_tokens(texts)
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["documents"] == len(texts)


def test_bin_format_is_llmc_layout(tmp_path, reference_tokens):
    paths, documents = write_inputs(tmp_path, "parquet")
    out = tmp_path / "out"
    prepare_shards(local_files(out, paths, text_column="body", format="bin", num_proc=1, **SMALL_SIZES))
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

    real_write_shard, calls = shard_writing.write_shard, []

    def killed_on_third_shard(path, tokens):
        calls.append(path)
        if len(calls) == 3:  # a kill mid-write: a partial temporary file, no shard
            Path(str(path) + ".tmp").write_bytes(b"\x93NUMPY partial")
            raise KeyboardInterrupt
        return real_write_shard(path, tokens)

    monkeypatch.setattr(shard_writing, "write_shard", killed_on_third_shard)
    with pytest.raises(SystemExit) as stop:
        main([*args, "--output_dir", str(tmp_path / "resumed")])
    assert stop.value.code == 130  # Ctrl-C's exit status, after one line (see test_ctrl_c_...)
    assert len(list((tmp_path / "resumed").glob("*.npy"))) == 2
    monkeypatch.setattr(shard_writing, "write_shard", real_write_shard)

    (tmp_path / "resumed" / "corpus_train_000001.npy").write_bytes(b"corrupted after the run")  # re-verified, rewritten
    main([*args, "--output_dir", str(tmp_path / "resumed")])
    whole, resumed = sorted((tmp_path / "whole").iterdir()), sorted((tmp_path / "resumed").glob("*.npy"))
    assert [p.name for p in whole if p.suffix == ".npy"] == [p.name for p in resumed]
    for path in resumed:
        assert path.read_bytes() == (tmp_path / "whole" / path.name).read_bytes()
    assert (tmp_path / "whole" / "manifest.json").read_text() == (tmp_path / "resumed" / "manifest.json").read_text()


@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_killed_run_leaves_only_whole_shards_and_resumes_identically(tmp_path, stop):
    """SIGKILL (no cleanup) or Ctrl-C (SIGINT to the process group, as a terminal sends it) a real run of 2 processes
    mid-way; every shard on disk must already be final. Ctrl-C ends with one line, not a traceback from each process."""
    args = ["--dataset", "embedded", "--shard_size", "8192", "--num_proc", "2"]  # ~120 shards: time to kill mid-run
    main([*args, "--output_dir", str(tmp_path / "whole")])
    killed = tmp_path / "killed"
    with open(tmp_path / "stderr", "w") as stderr:  # a file, not a pipe that nobody reads while the run fills it
        process = subprocess.Popen([sys.executable, str(REPO / "prepare_data.py"), *args, "--output_dir", str(killed)],
                                   stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)
        deadline = time.time() + 60
        while process.poll() is None and len(list(killed.glob("*.npy"))) < 20 and time.time() < deadline:
            time.sleep(0.01)
        os.killpg(process.pid, stop)  # the run and its worker processes
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            pytest.fail(f"prepare_data.py still ran 60 s after {stop.name}")
    if stop == signal.SIGINT:
        assert process.returncode == 130
        assert_one_error_line((tmp_path / "stderr").read_text(),
                              "interrupted; re-run the same command to resume after the last finished shard", 130)
    on_disk = sorted(killed.glob("*.npy"))
    assert 0 < len(on_disk) < len(list((tmp_path / "whole").glob("*.npy")))  # it really stopped half-way
    for path in on_disk:
        assert path.read_bytes() == (tmp_path / "whole" / path.name).read_bytes()
    main([*args, "--output_dir", str(killed)])
    assert sorted(p.name for p in killed.glob("*.npy")) == sorted(p.name for p in (tmp_path / "whole").glob("*.npy"))
    for path in killed.glob("*.npy"):
        assert path.read_bytes() == (tmp_path / "whole" / path.name).read_bytes()


def test_embedded_corpus_makes_val_and_train_shards(tmp_path, capsys, reference_tokens):
    """As `prepare_data.py --dataset embedded` makes them: the command finds the library's preparation complete."""
    out = tmp_path / "kjv"
    prepare_embedded_corpus(out)
    main(["--dataset", "embedded", "--output_dir", str(out)])
    assert capsys.readouterr().out.startswith(f"{out}: already complete (")
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
        return self.real_load_dataset("parquet", data_files=[self.parquet_path], split=split, streaming=streaming,
                                      columns=columns)


def test_fineweb_edu_streams_and_stops_at_max_tokens(tmp_path, monkeypatch, reference_tokens):
    import datasets

    pq.write_table(pa.table({"text": DOCUMENTS, "url": ["u"] * len(DOCUMENTS)}), tmp_path / "000_00000.parquet")
    stand_in = HubStandIn(str(tmp_path / "000_00000.parquet"))
    monkeypatch.setattr(datasets, "load_dataset", stand_in)
    monkeypatch.setattr(corpus, "hub_reachable", lambda: True)
    max_tokens = 100
    main(["--dataset", "fineweb-edu", "--output_dir", str(tmp_path / "fw"), "--max_tokens", str(max_tokens),
          *SMALL_SHARDS])
    assert stand_in.calls == [("HuggingFaceFW/fineweb-edu", "sample-10BT", "train", True, ["text"])]
    names, tokens = read_stream(tmp_path / "fw")
    assert names[0] == "edufineweb_val_000000.npy"
    assert tokens == reference_tokens(DOCUMENTS)[:max_tokens]
    documents_used = [len(reference_tokens(DOCUMENTS[:i])) < max_tokens for i in range(len(DOCUMENTS))].count(True)
    assert json.loads((tmp_path / "fw" / "manifest.json").read_text())["documents"] == documents_used


def run_cli(*args, **env):
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", **env}
    return subprocess.run([sys.executable, str(REPO / "prepare_data.py"), *args], capture_output=True, text=True,
                          env=environment, timeout=120)


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
        ("latin1.txt", b"caf\xe9 au lait", "could not read .*latin1.txt: it is not UTF-8 text .*offset 3,"),
        ("bad.parquet", b"not a parquet file at all", "could not read .*[Pp]arquet"),
        ("a.jsonl", b'{"body": "x"}\n', "has no column 'text' .*pass --text_column"),
        ("a.jsonl", b'{"text": null}\n', "not a string"),
        ("a.jsonl", b'{"text": "tiny"}\n', "lower --val_tokens"),
        ("a.jsonl", b'{"text": "fine"}\n{"text": "cut\n', r"could not read .*a.jsonl: line 2: "),
        ("a.jsonl", b'["an array"]\n', "line 1 is not a JSON object .*name a file of another JSON layout .json"),
    ],
)
def test_bad_input_gives_one_clear_error(tmp_path, capsys, name, content, message):
    if content is not None:
        (tmp_path / name).write_bytes(content)
    argv = ["--data_files", str(tmp_path / name), "--output_dir", str(tmp_path / "out"), "--num_proc", "1"]
    assert re.search(message, error_output(argv, capsys))


def test_mixed_kinds_and_changed_settings_are_refused(tmp_path, capsys):
    paths, _ = write_inputs(tmp_path, "jsonl")
    (tmp_path / "c.txt").write_text("text")
    argv = ["--data_files", *paths, str(tmp_path / "c.txt"), "--output_dir", str(tmp_path / "out")]
    assert "mixes json and text files" in error_output(argv, capsys)
    args = ["--data_files", *paths, "--text_column", "body", "--output_dir", str(tmp_path / "out"), "--num_proc", "1"]
    main([*args, *SMALL_SHARDS])
    assert "made with other settings" in error_output([*args, "--shard_size", "41", "--val_tokens", "23"], capsys)


def test_cli_error_is_one_line_and_nonzero_exit(tmp_path):
    result = run_cli("--data_files", str(tmp_path / "missing.jsonl"), "--output_dir", str(tmp_path / "out"))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"error: input file {tmp_path / 'missing.jsonl'} does not exist"]


@pytest.mark.parametrize("flag", ["--shard_size", "--val_tokens", "--num_proc"])
def test_non_positive_sizes_are_refused(tmp_path, flag, capsys):
    with pytest.raises(SystemExit):
        main(["--output_dir", str(tmp_path / "out"), flag, "0"])
    assert f"{flag} must be a positive integer, got 0" in capsys.readouterr().err


# ---- hostile input: one line, nothing changed ------------------------------------------------------------------------

def assert_one_error_line(stderr, message, status=1):
    """stderr holds no traceback and exactly one error line (progress bars aside): `error: MESSAGE`, or for a usage
    error (status 2) argparse's `prepare_data.py: error: MESSAGE`."""
    prefix = "prepare_data.py: error: " if status == 2 else "error: "
    assert the_error_line(stderr, prefix) == prefix + message


def error_output(argv, capsys, status=1):
    """The stderr of `prepare_data.py ARGV`, run in this process (a subprocess spends ~1 s importing), which must
    exit with `status`; any other exception fails the test here as it would print a traceback there."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == status
    return capsys.readouterr().err


def refused(argv, capsys, status, message):
    """`prepare_data.py ARGV` exits with `status` after one error line."""
    assert_one_error_line(error_output(argv, capsys, status), message, status)


def prepare_small(tmp_path):
    """The arguments of a small preparation of DOCUMENTS, already run into tmp_path/out: a folder a refused run must
    leave as it is."""
    paths, _ = write_inputs(tmp_path, "jsonl")
    args = ["--data_files", *paths, "--text_column", "body", "--output_dir", str(tmp_path / "out"), "--num_proc", "1",
            *SMALL_SHARDS]
    main(args)
    return args


def path_problem(prefix):
    return f"--prefix {prefix!r} is a path, not a name (shards stay in --output_dir): name the folder with --output_dir"


def split_problem(prefix, fix):
    return (f"--prefix {prefix!r} ends like a shard name (val or train, optionally + _NUMBER), so that its shards' "
            f"names would read as two splits ({prefix}_train_000001.npy): {fix}")


@pytest.mark.parametrize("prefix, message", [
    ("", "--prefix '' is empty: give a name, such as corpus"),
    ("x_val", split_problem("x_val", "drop that ending (--prefix x)")),
    ("web-train_3", split_problem("web-train_3", "drop that ending (--prefix web)")),
    ("data.val", split_problem("data.val", "drop that ending (--prefix data)")),
    ("train", split_problem("train", "choose another name")),
    ("val_000001", split_problem("val_000001", "choose another name")),
    ("../x", path_problem("../x")),
    ("sub/x", path_problem("sub/x")),
    ("a\\b", path_problem("a\\b")),
    (".", path_problem(".")),
    ("..", path_problem("..")),
    ("a" * (LONGEST_PREFIX + 1), f"--prefix {'a' * (LONGEST_PREFIX + 1)!r} is too long: shard names would pass the "
                                 "255 bytes a file name may have"),
])
def test_ambiguous_or_path_prefixes_are_refused(tmp_path, capsys, prefix, message):
    args = prepare_small(tmp_path)
    before = tree_checksums(tmp_path)
    refused([*args, "--prefix", prefix], capsys, 2, message)
    assert tree_checksums(tmp_path) == before


@pytest.mark.parametrize("prefix", ["train_data", "interval", "a" * LONGEST_PREFIX])
def test_plain_prefixes_are_read_as_the_right_splits(tmp_path, prefix):
    """Names that hold a split's name elsewhere than at the end, and the longest prefix: the loader reads them right."""
    paths, _ = write_inputs(tmp_path, "jsonl")
    out = tmp_path / "out"
    main(["--data_files", *paths, "--text_column", "body", "--output_dir", str(out), "--num_proc", "1", "--prefix",
          prefix, *SMALL_SHARDS])
    names = [shard["name"] for shard in json.loads((out / "manifest.json").read_text())["shards"]]
    assert len(names) > 2
    assert list_shards(out, "val") == [out / f"{prefix}_val_000000.npy"] == [out / names[0]]
    assert list_shards(out, "train") == [out / f"{prefix}_train_{i:06d}.npy" for i in range(1, len(names))]


@pytest.mark.parametrize("prepared, stray", [
    (False, "other_train_000001.npy"),  # another corpus, no manifest
    (False, "corpus_val_000000.npy"),  # this prefix, but no manifest: build-nanogpt's, or anyone's
    (False, "tiny_shakespeare_val.bin"),  # llm.c's naming
    (True, "other_val_000000.npy"),  # beside a finished preparation
    (True, "corpus_val_000000.bin"),  # the other format of this preparation
    (True, "corpus_train_000099.npy"),  # this prefix, beyond the shards the manifest lists
])
def test_folders_holding_other_shards_are_refused(tmp_path, capsys, prepared, stray):
    """Shards that training would read with the new ones (shards.list_shards) but that are not this
    preparation's would mix two corpora: refused, naming one."""
    out = tmp_path / "out"
    if prepared:
        args = prepare_small(tmp_path)
    else:
        paths, _ = write_inputs(tmp_path, "jsonl")
        args = ["--data_files", *paths, "--text_column", "body", "--output_dir", str(out), "--num_proc", "1",
                *SMALL_SHARDS]
        out.mkdir()
    write_shard(out / stray, [EOT, 1, 2])
    before = tree_checksums(tmp_path)
    why = ("that its manifest.json does not describe (of another preparation): training would mix them in" if prepared
           else "and no manifest.json: they would be read with the new shards in training")
    refused(args, capsys, 1,
            f"{out} already holds shards ({stray}) {why}; move them out or choose another --output_dir")
    assert tree_checksums(tmp_path) == before


@pytest.mark.parametrize("stopped_after", ["the manifest", "shard 2"])
def test_a_shard_written_before_its_record_is_rewritten_on_resume(tmp_path, stopped_after):
    """A stop between a shard's rename and the manifest's update (the manifest is written before the first shard, so
    such a shard always has one beside it) leaves a shard the manifest does not list yet: the re-run takes it for its
    own and writes it again. Files the loader does not read (not named like a split's shard) do not stop a run."""
    args = prepare_small(tmp_path)
    out = tmp_path / "out"
    whole = tree_checksums(out)
    manifest = json.loads((out / "manifest.json").read_text())
    names = [shard["name"] for shard in manifest["shards"]]
    recorded = 0 if stopped_after == "the manifest" else 2
    for name in names[recorded + 1:]:
        (out / name).unlink()
    (out / names[recorded]).write_bytes(b"not the shard this run writes")  # not listed, so not trusted
    del manifest["total_tokens"], manifest["documents"]
    manifest.update(complete=False, shards=manifest["shards"][:recorded])
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    np.save(out / "embeddings.npy", np.zeros(3))
    main(args)
    after = tree_checksums(out)
    assert after.pop("embeddings.npy") and after == whole


@pytest.mark.parametrize("content, message", [
    ("[1, 2]", "{manifest} is not a manifest of prepare_data.py (format gpt2repro-token-shards/1): choose another "
               "--output_dir"),
    ('{"format": "another-tool/2"}', "{manifest} is not a manifest of prepare_data.py (format "
                                     "gpt2repro-token-shards/1): choose another --output_dir"),
    ("no sha256", "{manifest} is damaged (its shards are not listed as prepare_data.py lists them): delete it and the "
                  "shards to start over"),
    ("renamed", "{manifest} is damaged (its shards are not listed as prepare_data.py lists them): delete it and the "
                "shards to start over"),
    ("no total", "{manifest} is damaged (its shards are not listed as prepare_data.py lists them): delete it and the "
                 "shards to start over"),
])
def test_foreign_or_damaged_manifests_are_refused(tmp_path, capsys, content, message):
    args = prepare_small(tmp_path)
    manifest_path = tmp_path / "out" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    if content == "no sha256":
        del manifest["shards"][1]["sha256"]
    elif content == "renamed":
        manifest["shards"][1]["name"] = "../elsewhere.npy"
    elif content == "no total":
        del manifest["total_tokens"]
    manifest_path.write_text(json.dumps(manifest) if content in ("no sha256", "renamed", "no total") else content)
    before = tree_checksums(tmp_path)
    refused(args, capsys, 1, message.format(manifest=manifest_path))
    assert tree_checksums(tmp_path) == before


def utf8_message(path, offset):
    return (f"could not read {path}: it is not UTF-8 text (the first invalid byte is at offset {offset:,}, from 0): "
            f"convert it to UTF-8, e.g. with iconv -f ITS_ENCODING -t UTF-8")


@pytest.mark.parametrize("kind, num_proc", [("txt", 2), ("jsonl", 2), ("json", 1)])
def test_invalid_utf8_names_its_file_and_the_offset_of_the_first_bad_byte(tmp_path, capsys, kind, num_proc):
    """The bad file is the second of a task (or of the files `datasets` reads), the bad byte far into it."""
    good_line, bad_line = b'{"text": "caf\xc3\xa9 ok"}\n', b'{"text": "caf\xe9 au lait"}\n'
    (tmp_path / f"a.{kind}").write_bytes(b"x" if kind == "txt" else good_line)
    bad = tmp_path / f"b.{kind}"
    bad.write_bytes(b"\xc3\xa9t\xc3\xa9 " * 1000 + b"caf\xe9" if kind == "txt" else good_line * 1000 + bad_line)
    offset = 6003 if kind == "txt" else len(good_line) * 1000 + len('{"text": "caf')
    before = tree_checksums(tmp_path)
    refused(["--data_files", str(tmp_path / f"a.{kind}"), str(bad), "--output_dir", str(tmp_path / "out"),
             "--num_proc", str(num_proc)], capsys, 1, utf8_message(bad, offset))
    assert tree_checksums(tmp_path) == before


def test_invalid_utf8_in_parquet_names_the_row(tmp_path, capsys):
    """Parquet strings are UTF-8 by definition, but a writer may not check: the row, not a byte offset in a compressed
    file."""
    texts = pa.array([b"fine"] * 70 + [b"caf\xe9"], type=pa.binary()).view(pa.string())  # row 70: the second read
    pq.write_table(pa.table({"text": texts}), tmp_path / "bad.parquet")
    refused(["--data_files", str(tmp_path / "bad.parquet"), "--output_dir", str(tmp_path / "out")], capsys, 1,
            f"could not read {tmp_path / 'bad.parquet'}: the 'text' of row 70 (counting from 0) is not UTF-8 text: "
            f"write the file again with valid strings")


@pytest.mark.parametrize("chunk", [1, 2, 3, 5])
def test_first_invalid_utf8_counts_from_the_start_of_the_file(tmp_path, monkeypatch, chunk):
    """Against bytes.decode's own position, with characters of 2-4 bytes cut by every chunk boundary."""
    monkeypatch.setattr(corpus, "UTF8_SCAN_BYTES", chunk)
    text = "aé€😀b".encode() * 2
    cases = [text] + [text[:i] + b"\xff" + text[i:] for i in range(len(text) + 1)] + [text + "€".encode()[:2]]
    for data in cases:
        (tmp_path / "f").write_bytes(data)
        try:
            data.decode("utf-8")
            expected = None
        except UnicodeDecodeError as error:
            expected = error.start
        assert corpus.first_invalid_utf8(str(tmp_path / "f")) == expected, data


@pytest.fixture
def unwritable_folder(tmp_path):
    """A folder this process cannot write in: read-only for a user; immutable (chattr +i) for root, whom modes do not
    stop."""
    folder = tmp_path / "locked"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder, os.strerror(13)  # EACCES
        folder.chmod(0o755)
        return
    if not shutil.which("chattr") or \
            subprocess.run(["chattr", "+i", str(folder)], capture_output=True, check=False).returncode:
        pytest.skip("root, on a file system without chattr +i: no folder is unwritable")
    yield folder, os.strerror(1)  # EPERM
    subprocess.run(["chattr", "-i", str(folder)], check=True)


@pytest.mark.parametrize("where", ["a file", "inside a file", "unwritable", "inside an unwritable folder"])
def test_unusable_output_dir_is_refused_before_tokenising(tmp_path, capsys, monkeypatch, request, where):
    paths, _ = write_inputs(tmp_path, "txt")
    (tmp_path / "a_file").write_text("not a folder")
    if where == "a file":
        output_dir, message = tmp_path / "a_file", f"--output_dir {tmp_path / 'a_file'} is a file, not a folder"
    elif where == "inside a file":
        output_dir = tmp_path / "a_file" / "sub"
        message = f"--output_dir {output_dir} is not writable (Not a directory)"
    else:
        locked, locked_error = request.getfixturevalue("unwritable_folder")
        output_dir = locked if where == "unwritable" else locked / "sub"
        message = f"--output_dir {output_dir} is not writable ({locked_error})"
    monkeypatch.setattr(shard_writing, "tokenize", lambda *args: pytest.fail("tokenising began"))
    before = tree_checksums(tmp_path)
    refused(["--data_files", *paths, "--output_dir", str(output_dir)], capsys, 1, message)
    assert tree_checksums(tmp_path) == before


GIVEN_TWICE = ("input file {{tmp}}/{name} is given twice (by overlapping --data_files): its documents would be in the "
               "corpus twice; pass every file once")


@pytest.mark.parametrize("files, message", [
    (["docs"], "input file {tmp}/docs is a folder: pass the files in it (e.g. {tmp}/docs/*.txt)"),
    (["pipe.jsonl"], "input file {tmp}/pipe.jsonl is not a regular file (a pipe or a device): save the data in a file"),
    (["a.txt", "a.txt"], GIVEN_TWICE.format(name="a.txt")),
    (["*.txt", "b.txt"], GIVEN_TWICE.format(name="b.txt")),
    (["blank.jsonl"], "input file {tmp}/blank.jsonl holds no documents (only blank lines): leave it out of "
                      "--data_files"),
    (["rows.jsonl", "blank.jsonl"], "input file {tmp}/blank.jsonl holds no documents (only blank lines): leave it out "
                                    "of --data_files"),
    (["empty.json"], "input file {tmp}/empty.json holds no documents (no rows): leave it out of --data_files"),
    (["empty.parquet"], "input file {tmp}/empty.parquet holds no documents (no rows): leave it out of --data_files"),
    (["some_rows.jsonl"], "{tmp}/some_rows.jsonl line 2 has no column 'text' (it has body): pass --text_column"),
    (["bom_inside.jsonl"], ("could not read {tmp}/bom_inside.jsonl: line 2: Unexpected UTF-8 BOM (decode using "
                            "utf-8-sig): line 1 column 1 (char 0)")),
])
def test_unusable_data_files_are_refused(tmp_path, capsys, files, message):
    """Inputs that gave a traceback, a misleading message, or were taken silently (a file's documents twice, a file
    that adds nothing, a line without the column read as null, a byte order mark inside a file that `datasets`
    refuses)."""
    (tmp_path / "docs").mkdir()
    os.mkfifo(tmp_path / "pipe.jsonl")
    (tmp_path / "a.txt").write_text("a document")
    (tmp_path / "b.txt").write_text("another document")
    (tmp_path / "blank.jsonl").write_bytes(b"\xef\xbb\xbf\n  \n\n")
    (tmp_path / "rows.jsonl").write_text('{"text": "a document"}\n')
    (tmp_path / "empty.json").write_text("[]")
    pq.write_table(pa.table({"text": pa.array([], type=pa.string())}), tmp_path / "empty.parquet")
    (tmp_path / "some_rows.jsonl").write_text('{"text": "a document"}\n{"body": "no text"}\n')
    (tmp_path / "bom_inside.jsonl").write_bytes(b'{"text": "a"}\n\xef\xbb\xbf{"text": "b"}\n')
    before = tree_checksums(tmp_path)
    refused(["--data_files", *(str(tmp_path / f) for f in files), "--output_dir", str(tmp_path / "out"), "--num_proc",
             "1", "--val_tokens", "1000"], capsys, 1, message.format(tmp=tmp_path))
    assert tree_checksums(tmp_path) == before


def test_a_file_name_with_glob_characters_is_that_file(tmp_path, reference_tokens):
    (tmp_path / "book[1].txt").write_text("the book in brackets")
    (tmp_path / "book1.txt").write_text("the other book, which the glob book[1].txt matches")
    main(["--data_files", str(tmp_path / "book[1].txt"), "--output_dir", str(tmp_path / "out"), "--val_tokens", "2"])
    assert read_stream(tmp_path / "out")[1] == reference_tokens(["the book in brackets"])


@pytest.mark.parametrize("flags, message", [
    (["--max_tokens", "0"], "--max_tokens must be a positive integer, got 0"),
    (["--max_tokens", "-5"], "--max_tokens must be a positive integer, got -5"),
    (["--shard_size", "-1"], "--shard_size must be a positive integer, got -1"),
    (["--val_tokens", "50", "--max_tokens", "50"], ("--max_tokens 50 leaves no tokens for training: the val shard "
                                                    "takes the first 50 (--val_tokens); raise --max_tokens or lower "
                                                    "--val_tokens")),
    (["--max_tokens", "1000"], ("--max_tokens 1,000 leaves no tokens for training: the val shard takes the first "
                                "100,000,000 (--val_tokens); raise --max_tokens or lower --val_tokens")),
    (["--format", "bin", "--shard_size", str(2**31)], ("a .bin shard holds at most 2,147,483,647 tokens (llm.c's "
                                                       "header counts them in an int32): lower --shard_size or "
                                                       "--val_tokens, or use --format npy")),
    (["--output_dir", ""], "--output_dir is empty: name a folder"),
])
def test_impossible_settings_are_refused_before_reading(tmp_path, capsys, flags, message):
    (tmp_path / "a.txt").write_text("a document")
    refused(["--data_files", str(tmp_path / "a.txt"), "--output_dir", str(tmp_path / "out"), *flags], capsys, 2,
            message)
    assert not (tmp_path / "out").exists()


def test_a_shard_too_large_for_memory_is_one_line(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("a document")
    refused(["--data_files", str(tmp_path / "a.txt"), "--output_dir", str(tmp_path / "out"), "--shard_size",
             str(10**17)],
            capsys, 1, "a shard of 100,000,000,000,000,000 tokens needs 186,264,514.9 GiB of memory, more than there "
                       "is: lower --shard_size or --val_tokens")


def test_a_full_disk_is_one_line_and_the_re_run_resumes(tmp_path, capsys, monkeypatch):
    args = prepare_small(tmp_path)
    whole = tree_checksums(tmp_path / "out")
    real_write_shard, calls = shard_writing.write_shard, []

    def full_on_third_shard(path, tokens):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(28, os.strerror(28))  # ENOSPC
        return real_write_shard(path, tokens)

    args[args.index(str(tmp_path / "out"))] = str(tmp_path / "full")
    monkeypatch.setattr(shard_writing, "write_shard", full_on_third_shard)
    refused(args, capsys, 1, f"could not write {tmp_path / 'full' / 'corpus_train_000002.npy'}: No space left on "
                             f"device: make room (or fix the folder) and re-run the same command, which resumes after "
                             f"the last finished shard")
    monkeypatch.setattr(shard_writing, "write_shard", real_write_shard)
    main(args)
    assert tree_checksums(tmp_path / "full") == whole


def test_more_shards_than_names_sort_is_refused(tmp_path, capsys, monkeypatch):
    """The 6-digit index sorts in order up to 999,999 shards (here made 3, not to write a million)."""
    monkeypatch.setattr(shard_writing, "MAX_SHARDS", 3)
    paths, _ = write_inputs(tmp_path, "jsonl")
    refused(["--data_files", *paths, "--text_column", "body", "--output_dir", str(tmp_path / "out"), "--num_proc", "1",
             *SMALL_SHARDS],
            capsys, 1, "the corpus needs more than 3 shards, whose names would not sort in order: start again in an "
                       "empty --output_dir with a larger --shard_size")


@pytest.mark.parametrize("args, status, message", [
    (["--prefix", "x_val"], 2, split_problem("x_val", "drop that ending (--prefix x)")),
    (["--output_dir", "{tmp}/a.txt"], 1, "--output_dir {tmp}/a.txt is a file, not a folder"),
    (["--data_files", "{tmp}/a.txt", "{tmp}/latin1.txt", "--num_proc", "2"], 1, utf8_message("{tmp}/latin1.txt", 3)),
])
def test_cli_refusals_are_one_line(tmp_path, args, status, message):
    """The real command line: the exit status and stderr of a user's mistake, argparse's and ours, also from a
    worker."""
    (tmp_path / "a.txt").write_text("a document")
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9")
    args = [arg.format(tmp=tmp_path) for arg in args]
    if "--data_files" not in args:
        args = ["--data_files", str(tmp_path / "a.txt"), *args]
    if "--output_dir" not in args:
        args += ["--output_dir", str(tmp_path / "out")]
    result = run_cli(*args)
    assert result.returncode == status
    assert_one_error_line(result.stderr, message.format(tmp=tmp_path), status)
