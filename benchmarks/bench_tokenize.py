"""Tokenisation throughput: prepare_data's pipeline against build-nanogpt's `Pool.imap` method, same corpus.

- ours: `prepare_data.tokenize` (64-document tasks, bounded read-ahead, uint16 arrays back from the workers);
- baseline: `multiprocessing.Pool(num_proc).imap(tokenize_one, documents, chunksize=16)`, where
  `tokenize_one` is build-nanogpt's `[EOT] + encode_ordinary(text)` as a uint16 array per document;
- tiktoken alone: `encode_ordinary` in this process, no pool: the per-core ceiling.
The two pipelines run interleaved, `--repetitions` times each, so machine load hits both alike; each timing
includes starting its pool. Corpus: the embedded King James Bible repeated `--copies` times.

    python benchmarks/bench_tokenize.py
"""
import argparse
import multiprocessing
import statistics
import time

import numpy as np

from prepare_data import available_cores, embedded_corpus, tokenize
from tokenization_gpt2repro import EOT_TOKEN_ID, get_tiktoken_encoding


def tokenize_one(text: str) -> np.ndarray:
    """build-nanogpt's per-document worker function."""
    return np.array([EOT_TOKEN_ID] + get_tiktoken_encoding().encode_ordinary(text)).astype(np.uint16)


def run_ours(documents: list[str], num_proc: int) -> int:
    batch = 64  # prepare_data.DOCS_PER_TASK: the batches every source yields
    batches = (documents[i : i + batch] for i in range(0, len(documents), batch))
    return sum(len(tokens) for tokens, _, _ in tokenize(batches, num_proc))


def run_baseline(documents: list[str], num_proc: int) -> int:
    with multiprocessing.Pool(num_proc) as pool:
        return sum(len(tokens) for tokens in pool.imap(tokenize_one, documents, chunksize=16))


def run_single(documents: list[str], num_proc: int) -> int:
    encoding = get_tiktoken_encoding()
    return sum(len(encoding.encode_ordinary(text)) + 1 for text in documents)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_proc", type=int, default=available_cores(), help="worker processes (default: all cores)")
    parser.add_argument("--copies", type=int, default=4, help="times the ~4.1 MB corpus is repeated (default: 4)")
    parser.add_argument("--repetitions", type=int, default=5, help="timed runs of each method (default: 5)")
    args = parser.parse_args()

    _, batches = embedded_corpus()
    documents = [text for batch in batches for text in batch] * args.copies
    megabytes = sum(len(text.encode("utf-8")) for text in documents) / 1e6
    get_tiktoken_encoding()  # built once before any timing; forked workers inherit it
    methods = {"ours": run_ours, "baseline": run_baseline, "tiktoken 1 proc": run_single}
    print(f"corpus: {len(documents):,} documents, {megabytes:.1f} MB; {args.num_proc} processes; "
          f"{args.repetitions} interleaved repetitions")
    token_counts = {name: run(documents[:200], args.num_proc) for name, run in methods.items()}  # warm-up
    assert len(set(token_counts.values())) == 1, token_counts
    rates = {name: [] for name in methods}
    for _ in range(args.repetitions):
        for name, run in methods.items():
            start = time.perf_counter()
            run(documents, args.num_proc)
            rates[name].append(megabytes / (time.perf_counter() - start))
    medians = {name: statistics.median(r) for name, r in rates.items()}
    for name, median in medians.items():
        print(f"{name:>16}: {median:6.1f} MB/s (median; runs {', '.join(f'{r:.1f}' for r in rates[name])})")
    print(f"ours / baseline: {medians['ours'] / medians['baseline']:.2f}x; "
          f"ours / (tiktoken 1 proc x {args.num_proc}): {medians['ours'] / (medians['tiktoken 1 proc'] * args.num_proc):.2f}")


if __name__ == "__main__":
    main()
