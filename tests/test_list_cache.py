"""A training list's resolution kept in its packed store (stores.listcache): the same rows, targets
and labels as a fresh parse, never served for a changed list, and no cache in a read-only store."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import m_DataLoader
import stores.listcache
from m_DataLoader import EmbeddingData
from stores.write import pack_arrays


@pytest.fixture
def packed(tmp_path) -> tuple[Path, Path]:
    """A packed store of 60 rows (6 speakers) and a normal list of a shuffled part of it."""
    rng = np.random.default_rng(3)
    keys = [f"id{k % 6:02d}/v{k % 4}/{k:05d}.wav" for k in range(60)]
    store = pack_arrays(tmp_path / "emb.store", keys, rng.standard_normal((60, 8)).astype(np.float32))
    chosen = rng.permutation(60)[:45]
    listed = tmp_path / "train_list.txt"
    listed.write_text("".join(f"{keys[k].split('/')[0]} {keys[k]}\n" for k in chosen))
    return store, listed


def loaded(listed: Path, store: Path, speakers: list[str] | None = None) -> EmbeddingData:
    return EmbeddingData(listed, store, "normal", "B", 8, speakers=speakers)


def count_parses(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = m_DataLoader.read_list

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(m_DataLoader, "read_list", counted)
    return calls


def assert_same(data: EmbeddingData, other: EmbeddingData) -> None:
    np.testing.assert_array_equal(data.records.inputs, other.records.inputs)
    np.testing.assert_array_equal(data.records.targets, other.records.targets)
    np.testing.assert_array_equal(data.records.labels, other.records.labels)
    assert data.speakers == other.speakers
    np.testing.assert_array_equal(data.table.numpy(), other.table.numpy())
    np.testing.assert_array_equal(data.speaker_embeddings.numpy(), other.speaker_embeddings.numpy())


def test_kept_resolution_equals_a_fresh_parse(packed, monkeypatch):
    store, listed = packed
    parses = count_parses(monkeypatch)
    first = loaded(listed, store)
    assert len(parses) == 1 and len(list(store.glob("list-*.npz"))) == 1
    kept = loaded(listed, store)
    assert len(parses) == 1  # served from the store
    assert_same(kept, first)
    spk = [line.split()[0] for line in listed.read_text().splitlines()]
    assert [kept.speakers[t] for t in kept.records.targets] == spk
    others = ["id03", "id99", "id00"]  # a validation list labelled by the training speakers
    labelled = loaded(listed, store, others)
    assert len(parses) == 1
    expected = [others.index(s) if s in others else -1 for s in spk]
    np.testing.assert_array_equal(labelled.records.labels, expected)


def test_a_changed_list_is_parsed_again(packed, monkeypatch):
    store, listed = packed
    before = loaded(listed, store).records.inputs
    stat = listed.stat()
    lines = listed.read_text().splitlines(keepends=True)
    listed.write_text("".join([lines[1], lines[0], *lines[2:]]))  # same size
    os.utime(listed, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and the same mtime
    assert listed.stat().st_size == stat.st_size and listed.stat().st_mtime_ns == stat.st_mtime_ns
    parses = count_parses(monkeypatch)
    data = loaded(listed, store)
    assert len(parses) == 1
    np.testing.assert_array_equal(data.records.inputs, [before[1], before[0], *before[2:]])


def test_a_store_that_cannot_be_written_is_used_without_a_cache(packed, monkeypatch):
    store, listed = packed

    def read_only(path, write, mode="wb"):
        raise OSError(30, "Read-only file system", str(path))

    monkeypatch.setattr(stores.listcache, "atomic_write", read_only)
    parses = count_parses(monkeypatch)
    first, second = loaded(listed, store), loaded(listed, store)
    assert len(parses) == 2 and not list(store.glob("list-*.npz"))
    assert_same(first, second)
