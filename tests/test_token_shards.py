"""The token-shard format (.npy and llm.c .bin) and the loaders built on it.

Streams are made of tokens whose value is their own position (position % 50000 never wraps here), so
every window tells where it was cut from and can be checked against a plain numpy slice.
"""
import json
import os
import struct

import numpy as np
import pytest
import torch

from gpt2repro.data_loader import BatchPrefetcher, ShardedTokenLoader, validation_batches
from gpt2repro.shards import ShardFormatError, list_shards, open_shard, to_token_array, write_shard

SHARD_LENGTHS = [137, 64, 1, 203]  # uneven, one of a single token: windows must cross boundaries


def write_llmc_reference(path, tokens):
    """llm.c's token file, written from its documented layout with struct (not with gpt2repro.shards)."""
    header = struct.pack("<256i", 20240520, 1, len(tokens), *([0] * 253))
    path.write_bytes(header + struct.pack(f"<{len(tokens)}H", *tokens))


def make_split(data_dir, split, lengths, first_token=0, suffix=".npy"):
    """Shards of consecutive token values; returns the whole stream as a numpy array."""
    stream = np.arange(first_token, first_token + sum(lengths)) % 50000
    start = 0
    for i, n in enumerate(lengths):
        write_shard(data_dir / f"test_{split}_{i:06d}{suffix}", stream[start : start + n])
        start += n
    return stream


def epoch_batches(loader, steps):
    return [loader.next_batch() for _ in range(steps)]


def test_npy_shard_opens_with_np_load_and_bin_shard_matches_llmc_layout(tmp_path):
    tokens = np.array([50256, 0, 1, 65535, 464, 2068], dtype=np.int64)
    write_shard(tmp_path / "a_val_000000.npy", tokens)
    loaded = np.load(tmp_path / "a_val_000000.npy")
    assert loaded.dtype == np.uint16 and loaded.tolist() == tokens.tolist()

    write_shard(tmp_path / "a_train_000001.bin", tokens)
    write_llmc_reference(tmp_path / "reference.bin", tokens.tolist())
    assert (tmp_path / "a_train_000001.bin").read_bytes() == (tmp_path / "reference.bin").read_bytes()
    assert open_shard(tmp_path / "reference.bin").tolist() == tokens.tolist()


def test_loader_reads_llmc_bin_files(tmp_path):
    tokens = list(range(300))
    write_llmc_reference(tmp_path / "fineweb_train_000000.bin", tokens[:100])
    write_llmc_reference(tmp_path / "fineweb_train_000001.bin", tokens[100:])
    loader = ShardedTokenLoader(tmp_path, "train", batch_size=3, seq_len=99)
    x, y = loader.next_batch()
    assert x.flatten().tolist() == tokens[:297]
    assert y[:, -1].tolist() == [99, 198, 297]


@pytest.mark.parametrize(
    "contents, message",
    [
        (lambda: b"\x93NUMPY garbage", "truncated or not a .npy"),
        (lambda: None, "holds a 1-D int32"),
        (lambda: struct.pack("<256i", 20240326, 3, 10, *([0] * 253)), "not llm.c's token-file magic"),
        (lambda: struct.pack("<256i", 20240520, 2, 0, *([0] * 253)), "version 2"),
        (lambda: struct.pack("<256i", 20240520, 1, 10, *([0] * 253)) + b"\0" * 8, "promises 10 tokens"),
        (lambda: b"\0" * 10, "shorter than llm.c's 1024-byte header"),
    ],
)
def test_corrupt_shards_give_clear_errors(tmp_path, contents, message):
    data = contents()
    suffix = ".bin" if data is None or not data.startswith(b"\x93NUMPY") else ".npy"
    path = tmp_path / f"x_train_000000{'.npy' if data is None else suffix}"
    if data is None:
        np.save(path, np.arange(5, dtype=np.int32))
    else:
        path.write_bytes(data)
    with pytest.raises(ShardFormatError, match=message):
        ShardedTokenLoader(tmp_path, "train", batch_size=1, seq_len=2)


def test_split_is_matched_as_a_word_in_shard_names(tmp_path):
    for name in ("edufineweb_val_000000.npy", "tiny_shakespeare_val.bin", "interval_train_000001.npy",
                 "valid_000002.npy", "edufineweb_train_000003.npy.tmp", "notes_val.txt"):
        (tmp_path / name).touch()
    assert [p.name for p in list_shards(tmp_path, "val")] == ["edufineweb_val_000000.npy", "tiny_shakespeare_val.bin"]
    assert [p.name for p in list_shards(tmp_path, "train")] == ["interval_train_000001.npy"]


def test_a_prefix_that_contains_a_split_name_does_not_move_shards_between_splits(tmp_path):
    # prepare_data.py --prefix train_data: the val shard's name holds "train" as a word, but not in the split's place
    for name in ("train_data_val_000000.npy", "train_data_train_000001.npy", "val_set_train_000002.npy"):
        (tmp_path / name).touch()
    assert [p.name for p in list_shards(tmp_path, "val")] == ["train_data_val_000000.npy"]
    assert [p.name for p in list_shards(tmp_path, "train")] == ["train_data_train_000001.npy",
                                                                "val_set_train_000002.npy"]


def write_manifest(data_dir, names):
    from gpt2repro.shards import file_sha256

    shards = [{"name": n, "tokens": len(open_shard(data_dir / n)), "sha256": file_sha256(data_dir / n)} for n in names]
    (data_dir / "manifest.json").write_text(json.dumps({"shards": shards}))


def test_shards_are_checked_against_the_manifest(tmp_path):
    make_split(tmp_path, "train", [50, 60])
    names = ["test_train_000000.npy", "test_train_000001.npy"]
    write_manifest(tmp_path, names)
    ShardedTokenLoader(tmp_path, "train", 1, 8, verify_checksums=True)  # as prepared: accepted
    # the same number of tokens, one changed in place: only the checksum sees it
    tokens = np.array(open_shard(tmp_path / names[1]))
    tokens[7] += 1
    write_shard(tmp_path / names[1], tokens)
    ShardedTokenLoader(tmp_path, "train", 1, 8)
    with pytest.raises(ShardFormatError, match="test_train_000001.npy does not match the sha256"):
        ShardedTokenLoader(tmp_path, "train", 1, 8, verify_checksums=True)
    write_shard(tmp_path / names[1], tokens[:-3])  # cut short: always seen
    with pytest.raises(ShardFormatError, match="test_train_000001.npy holds 57 tokens but .*manifest.json recorded 60"):
        ShardedTokenLoader(tmp_path, "train", 1, 8)
    write_manifest(tmp_path, names)
    write_shard(tmp_path / "other_train_000009.npy", tokens)  # another preparation's shard in the same folder
    with pytest.raises(ShardFormatError, match="other_train_000009.npy is not in .*manifest.json"):
        ShardedTokenLoader(tmp_path, "train", 1, 8)


def test_a_token_id_beyond_the_vocabulary_names_its_shard_and_offset(tmp_path):
    make_split(tmp_path, "train", [40, 40])
    tokens = np.array(open_shard(tmp_path / "test_train_000001.npy"))
    tokens[13] = 60000  # fits uint16, but is no GPT-2 token
    write_shard(tmp_path / "test_train_000001.npy", tokens)
    loader = ShardedTokenLoader(tmp_path, "train", 2, 8)
    loader.next_batch()  # windows 0 and 1: clean
    with pytest.raises(ShardFormatError, match="test_train_000001.npy holds token id 60000 at offset 13"):
        for _ in range(5):
            loader.next_batch()
    make_split(tmp_path, "val", [30])
    assert len(list(validation_batches(tmp_path, 2, 8, 30))) == 2


def test_missing_data_gives_clear_errors(tmp_path):
    with pytest.raises(ShardFormatError, match="does not exist: make it with `python prepare_data.py"):
        list_shards(tmp_path / "nowhere", "train")
    (tmp_path / "notes.txt").write_text("no shards here")
    with pytest.raises(ShardFormatError, match="no 'val' shards"):
        list(validation_batches(tmp_path, batch_size=1, seq_len=4, num_tokens=10))
    make_split(tmp_path, "train", [5])
    with pytest.raises(ShardFormatError, match="fewer than one window"):
        ShardedTokenLoader(tmp_path, "train", batch_size=1, seq_len=8)


def test_token_ids_that_do_not_fit_uint16_are_refused(tmp_path):
    with pytest.raises(ShardFormatError, match="token id 70000 does not fit"):
        to_token_array([1, 70000])
    with pytest.raises(ShardFormatError, match="token id -1 does not fit"):
        write_shard(tmp_path / "x_train_000000.npy", np.array([-1, 5]))
    assert not list(tmp_path.iterdir())


def test_interrupted_write_leaves_no_whole_looking_shard(tmp_path, monkeypatch):
    def crash(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        write_shard(tmp_path / "x_train_000000.npy", np.arange(10))
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []  # the temporary file is removed, no shard appeared
    with pytest.raises(ShardFormatError, match="no 'train' shards"):
        list_shards(tmp_path, "train")


@pytest.mark.parametrize("seq_len", [8, 10, 404])  # 404 = N - 1: a single window
def test_one_epoch_uses_every_token_across_shard_boundaries(tmp_path, seq_len):
    stream = make_split(tmp_path, "train", SHARD_LENGTHS)
    make_split(tmp_path, "val", [50], first_token=1000)  # another split in the same folder is not read
    loader = ShardedTokenLoader(tmp_path, "train", batch_size=1, seq_len=seq_len)
    num_windows = -(-(len(stream) - 1) // seq_len)
    targets = set()
    for x, y in epoch_batches(loader, num_windows):
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (1, seq_len)
        start = int(x[0, 0])
        assert x[0].tolist() == stream[start : start + seq_len].tolist()
        assert y[0].tolist() == stream[start + 1 : start + seq_len + 1].tolist()
        targets.update(y[0].tolist())
    assert targets == set(stream[1:].tolist())  # every token but the very first is predicted
    assert int(loader.next_batch()[0][0, 0]) == 0  # then a new epoch starts from the beginning


@pytest.mark.parametrize("shuffle", [False, True])
def test_two_ranks_read_disjoint_windows_whose_union_is_the_single_process_run(tmp_path, shuffle):
    make_split(tmp_path, "train", SHARD_LENGTHS)
    batch_size, seq_len, steps = 3, 8, 9  # 2 ranks * 3 rows * 9 steps = 54 windows: crosses the 51-window epoch end
    single = ShardedTokenLoader(tmp_path, "train", 2 * batch_size, seq_len, shuffle=shuffle, seed=1)
    ranks = [ShardedTokenLoader(tmp_path, "train", batch_size, seq_len, r, 2, shuffle=shuffle, seed=1) for r in (0, 1)]
    for _ in range(steps):
        x_all, y_all = single.next_batch()
        (x0, y0), (x1, y1) = (loader.next_batch() for loader in ranks)
        starts0, starts1 = set(x0[:, 0].tolist()), set(x1[:, 0].tolist())
        assert not starts0 & starts1
        assert torch.equal(torch.cat([x0, x1]), x_all) and torch.equal(torch.cat([y0, y1]), y_all)


def test_shuffled_epochs_are_seeded_permutations_of_all_windows(tmp_path):
    stream = make_split(tmp_path, "train", SHARD_LENGTHS)
    seq_len = 8
    num_windows = -(-(len(stream) - 1) // seq_len)
    plain = [int(x[0, 0]) for x, _ in epoch_batches(ShardedTokenLoader(tmp_path, "train", 1, seq_len), num_windows)]

    def epochs(seed):
        loader = ShardedTokenLoader(tmp_path, "train", 1, seq_len, shuffle=True, seed=seed)
        return [[int(x[0, 0]) for x, _ in epoch_batches(loader, num_windows)] for _ in range(2)]

    first, second = epochs(seed=7)
    assert sorted(first) == sorted(second) == sorted(plain)
    assert first != plain and second != first  # reshuffled each epoch
    assert epochs(seed=7) == [first, second] and epochs(seed=8)[0] != first


@pytest.mark.parametrize("prefetch", [False, True])
@pytest.mark.parametrize("shuffle", [False, True])
def test_state_dict_round_trip_resumes_exactly(tmp_path, shuffle, prefetch):
    """Also through BatchPrefetcher, whose state is that of the batches handed out, not of the one read ahead."""
    make_split(tmp_path, "train", SHARD_LENGTHS)

    def make_loader():
        loader = ShardedTokenLoader(tmp_path, "train", 4, 16, shuffle=shuffle, seed=3)
        return BatchPrefetcher(loader) if prefetch else loader

    uninterrupted = make_loader()
    expected = epoch_batches(uninterrupted, 12)  # 48 windows of 16: crosses the 26-window epoch end

    first_run = make_loader()
    epoch_batches(first_run, 5)
    state = json.loads(json.dumps(first_run.state_dict()))
    resumed = make_loader()
    resumed.load_state_dict(state)
    for (x, y), (x_ref, y_ref) in zip(epoch_batches(resumed, 7), expected[5:], strict=True):
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref)

    other = ShardedTokenLoader(tmp_path, "train", 4, 32, shuffle=shuffle, seed=3)
    with pytest.raises(ValueError, match="seq_len"):
        other.load_state_dict(state)


@pytest.mark.parametrize("num_tokens", [64, 131, 200])
def test_validation_windows_are_the_same_on_any_number_of_ranks(tmp_path, num_tokens):
    stream = make_split(tmp_path, "val", [90, 110], first_token=7)
    batch_size, seq_len = 2, 16
    for world_size in (1, 2, 3):
        per_rank = [list(validation_batches(tmp_path, batch_size, seq_len, num_tokens, r, world_size))
                    for r in range(world_size)]
        assert len({len(batches) for batches in per_rank}) == 1  # every rank runs the same number of batches
        rows = [(x[i], y[i]) for batches in per_rank for x, y in batches for i in range(batch_size)]
        real = sorted(((x, y) for x, y in rows if (y != -100).any()), key=lambda row: int(row[0][0]))
        inputs = torch.cat([x[y != -100] for x, y in real])
        targets = torch.cat([y[y != -100] for _, y in real])
        assert inputs.tolist() == stream[: num_tokens - 1].tolist()
        assert targets.tolist() == stream[1:num_tokens].tolist()
    with pytest.raises(ValueError, match="use a --val_tokens between 2 and 200"):
        list(validation_batches(tmp_path, batch_size, seq_len, 201))
