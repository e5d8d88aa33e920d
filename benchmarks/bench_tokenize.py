"""Tokenisation throughput as whole commands: `prepare_data.py` against build-nanogpt's `Pool.imap` method.

Two corpora are built from the embedded King James Bible (its chapters shuffled, repeated to size):
- books: .txt files of ~120 KB, one document each (`--book_mb` in all);
- web: one .jsonl file of FineWeb-sized documents (a chapter each, ~3.5 KB; `--web_mb` in all).
On each, as separate commands (wall time from launch to exit: imports, the encoder, reading, writing):
- ours: `prepare_data.py --data_files ... --num_proc N`, and with `--num_proc 1` for the scaling;
- baseline: this file's `baseline` command, build-nanogpt's fineweb.py on local files: the main process reads
  the documents, `multiprocessing.Pool(N).imap(tokenize, documents, chunksize=16)` with `tokenize` =
  `[EOT] + encode_ordinary(text)` as uint16, written into shards of the same size;
- ceiling: tiktoken's own `encode_ordinary_batch(texts, num_threads=N)` on the texts in memory: no start-up, no
  reading or writing (threads of one process: N processes may still beat it); and with 1 thread, which shows how
  much faster N threads can be on this machine under its current load.
Runs are interleaved, `--repetitions` times each, so machine load hits all alike; medians are printed. Start-up
is a command's wall time less the tokenising time its summary line reports (so it includes the exit too).

    python benchmarks/bench_tokenize.py
    python benchmarks/bench_tokenize.py baseline OUTPUT_DIR NUM_PROC SHARD_SIZE FILE...   # (run by the benchmark)
"""
import argparse
import json
import multiprocessing
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the repository's modules, also where gpt2repro is not installed (or lists fewer)
from gpt2repro.tokenizer import EOT_TOKEN_ID, get_tiktoken_encoding  # noqa: E402

BOOK_CHARS = 120_000  # a book-sized document (a short novel is ~300 KB; the corpus had ~120 KB files)
SHARDS = 5  # per corpus, a val shard and 4 train shards, so shards are written during the run as in a real one
SEED = 0


# ----------------------------------------------------------------------------- baseline (a command of its own)


def tokenize(text: str) -> np.ndarray:
    """build-nanogpt's per-document worker function."""
    tokens = np.array([EOT_TOKEN_ID] + get_tiktoken_encoding().encode_ordinary(text))
    assert (0 <= tokens).all() and (tokens < 2**16).all(), "token dictionary too large for uint16"
    return tokens.astype(np.uint16)


def read_documents(paths: list[str]):
    for path in paths:
        if path.endswith(".jsonl"):
            with open(path, encoding="utf-8") as file:
                yield from (json.loads(line)["text"] for line in file)
        else:
            yield Path(path).read_text(encoding="utf-8")


def baseline(output_dir: str, num_proc: int, shard_size: int, paths: list[str]) -> None:
    """build-nanogpt's fineweb.py main loop (val shard first, shards of `shard_size` tokens)."""
    get_tiktoken_encoding()  # built once, inherited by the forked workers (build-nanogpt builds it at import)
    buffer, filled, index = np.empty(shard_size, dtype=np.uint16), 0, 0
    with multiprocessing.Pool(num_proc) as pool:
        for tokens in pool.imap(tokenize, read_documents(paths), chunksize=16):
            while len(tokens):
                take = min(shard_size - filled, len(tokens))
                buffer[filled : filled + take], tokens, filled = tokens[:take], tokens[take:], filled + take
                if filled == shard_size:
                    np.save(Path(output_dir) / f"corpus_{'val' if index == 0 else 'train'}_{index:06d}.npy", buffer)
                    index, filled = index + 1, 0
    if filled:
        np.save(Path(output_dir) / f"corpus_{'val' if index == 0 else 'train'}_{index:06d}.npy", buffer[:filled])


# ----------------------------------------------------------------------------- the benchmark


def build_corpora(root: Path, book_mb: float, web_mb: float) -> dict[str, tuple[list[str], list[str]]]:
    """{regime: (input paths, documents)}: the chapters shuffled (seeded), repeated up to the sizes asked for."""
    from gpt2repro.corpus import embedded_corpus

    _, tasks = embedded_corpus()
    chapters = [text for task in tasks for text in task.read(task.items)]
    rng = random.Random(SEED)

    def shuffled_chapters(total_chars: int):
        produced = 0
        while produced < total_chars:
            for chapter in rng.sample(chapters, len(chapters)):
                yield chapter
                produced += len(chapter)
                if produced >= total_chars:
                    return

    books, book, book_paths = [], [], []
    for chapter in shuffled_chapters(int(book_mb * 1e6)):
        book.append(chapter)
        if sum(map(len, book)) >= BOOK_CHARS:
            books.append("\n\n".join(book))
            book = []
    (root / "books").mkdir()
    for i, text in enumerate(books):
        book_paths.append(str(root / "books" / f"book_{i:04d}.txt"))
        Path(book_paths[-1]).write_text(text, encoding="utf-8")
    web = list(shuffled_chapters(int(web_mb * 1e6)))
    web_path = root / "web.jsonl"
    web_path.write_text("".join(json.dumps({"text": text, "id": i}) + "\n" for i, text in enumerate(web)),
                        encoding="utf-8")
    return {"books": (book_paths, books), "web": ([str(web_path)], web)}


def run_command(command: list[str], output_dir: Path) -> tuple[float, float | None]:
    """(wall seconds, the tokenising seconds of prepare_data's summary line, None for the baseline)."""
    shutil.rmtree(output_dir, ignore_errors=True)
    output_dir.mkdir()
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command[:3])} ... failed:\n{result.stderr}")
    match = re.search(r" in ([0-9.]+) s \(", result.stdout)
    return wall, float(match.group(1)) if match else None


def shard_tokens(output_dir: Path) -> np.ndarray:
    names = sorted(output_dir.glob("*.npy"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    return np.concatenate([np.load(p) for p in names])


def main() -> None:
    if sys.argv[1:2] == ["baseline"]:
        output_dir, num_proc, shard_size, *paths = sys.argv[2:]
        return baseline(output_dir, int(num_proc), int(shard_size), paths)
    from gpt2repro.tokenizing_workers import available_cores

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_proc", type=int, default=available_cores(), help="worker processes (default: all cores)")
    parser.add_argument("--book_mb", type=float, default=40, help="size of the book corpus, MB (default: 40)")
    parser.add_argument("--web_mb", type=float, default=40, help="size of the web corpus, MB (default: 40)")
    parser.add_argument("--repetitions", type=int, default=3, help="timed runs of each command (default: 3)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_tokenize_") as tmp:
        root = Path(tmp)
        corpora = build_corpora(root, args.book_mb, args.web_mb)
        encoding = get_tiktoken_encoding()
        shard_size = {}  # also a warm-up: the files are in the page cache before any timing
        for regime, (_, documents) in corpora.items():
            num_tokens = sum(len(ids) + 1  # + the <|endoftext|> before each document
                             for ids in encoding.encode_ordinary_batch(documents, num_threads=args.num_proc))
            shard_size[regime] = -(-num_tokens // SHARDS)
        out = root / "out"
        runs = {}  # (regime, method) -> [(wall, tokenising seconds)]
        ceiling = {(regime, threads): [] for regime in corpora for threads in (args.num_proc, 1)}  # seconds
        for name, (paths, documents) in corpora.items():
            megabytes = sum(len(t.encode("utf-8")) for t in documents) / 1e6
            print(f"{name}: {len(documents):,} documents of ~{megabytes * 1e3 / len(documents):,.1f} KB, "
                  f"{megabytes:.1f} MB ({len(paths):,} {Path(paths[0]).suffix} files)")
        print(f"{args.num_proc} processes; {args.repetitions} interleaved repetitions; medians, with each run's figure")
        for repetition in range(args.repetitions):
            for regime, (paths, documents) in corpora.items():
                ours = [sys.executable, str(REPO / "prepare_data.py"), "--data_files", *paths, "--output_dir", str(out),
                        "--shard_size", str(shard_size[regime]), "--num_proc"]
                commands = {
                    "ours": ours + [str(args.num_proc)],
                    "baseline": [sys.executable, __file__, "baseline", str(out), str(args.num_proc),
                                 str(shard_size[regime]), *paths],
                    "ours 1 proc": ours + ["1"],
                }
                for method, command in commands.items():
                    runs.setdefault((regime, method), []).append(run_command(command, out))
                    if repetition == 0 and method == "ours":
                        expected = shard_tokens(out)
                    elif repetition == 0 and method == "baseline":
                        assert np.array_equal(shard_tokens(out), expected), \
                            f"{regime}: baseline and ours wrote different tokens"
                for threads in (args.num_proc, 1):
                    start = time.perf_counter()
                    encoding.encode_ordinary_batch(documents, num_threads=threads)
                    ceiling[regime, threads].append(time.perf_counter() - start)

    def median(values) -> float:
        return statistics.median(values)

    def listed(values, unit: str = "s") -> str:
        return f"(runs {', '.join(f'{v:.2f}' for v in values)} {unit})"

    for regime, (_, documents) in corpora.items():
        megabytes = sum(len(t.encode("utf-8")) for t in documents) / 1e6
        print(f"\n{regime} ({megabytes:.1f} MB)")
        for method in ("ours", "baseline", "ours 1 proc"):
            walls = [wall for wall, _ in runs[regime, method]]
            line = (f"  {method:>12}: {median(walls):6.2f} s whole command, {megabytes / median(walls):5.1f} MB/s "
                    f"{listed(walls)}")
            if method != "baseline":
                tokenising = [t for _, t in runs[regime, method]]
                startup = [wall - t for wall, t in runs[regime, method]]
                line += (f"\n{'':16}tokenising {median(tokenising):.2f} s ({megabytes / median(tokenising):.1f} MB/s), "
                         f"start-up + exit {median(startup):.2f} s {listed(startup)}")
            print(line)
        wall = {method: median([w for w, _ in runs[regime, method]]) for method in ("ours", "baseline", "ours 1 proc")}
        tokenising = {method: median([t for _, t in runs[regime, method]]) for method in ("ours", "ours 1 proc")}
        print(f"  ours / baseline (whole command): {wall['baseline'] / wall['ours']:.2f}x")
        print(f"  {args.num_proc} processes / 1: {tokenising['ours 1 proc'] / tokenising['ours']:.2f}x tokenising, "
              f"{wall['ours 1 proc'] / wall['ours']:.2f}x whole command")
        for threads in (args.num_proc, 1):
            rates = [megabytes / seconds for seconds in ceiling[regime, threads]]
            print(f"  tiktoken encode_ordinary_batch(num_threads={threads}): {median(rates):.1f} MB/s "
                  f"{listed(rates, 'MB/s')}")
        print(f"  ours tokenising / tiktoken's {args.num_proc}-thread rate: "
              f"{median(ceiling[regime, args.num_proc]) / tokenising['ours']:.2f}; "
              f"tiktoken {args.num_proc} threads / 1: "
              f"{median(ceiling[regime, 1]) / median(ceiling[regime, args.num_proc]):.2f}x")


if __name__ == "__main__":
    main()
