"""The streaming pack of a Kaldi .scp (stores.pack.pack_scp) writes the same store as packing the
whole (N, D) float64 matrix of crop means at once (stores.write.pack_means), with the ark hashes
of the plain definition (each ark's crop means in the .scp's order, hashed at once)."""

from __future__ import annotations

import json
from pathlib import Path

import kaldiio
import numpy as np
import pytest

import stores.write
from m_utils import UserError
from stores.keys import key_speaker, read_utt2spk, store_key
from stores.open import forget_freshness, open_embeddings
from stores.pack import pack_scp
from stores.packed import PackedStore
from stores.stamps import (
    KALDI_SIDE_FILES,
    ark_of,
    content_hash,
    file_hash,
    scp_entries,
    scp_sources,
    side_hashes,
)
from stores.write import pack_means


def write_scp(root: Path, count: int, dim: int, speakers: int, arks: int, reverse_last: bool) -> Path:
    """An .scp over `arks` arks (keys `<spk>/<video>/<n>.wav`, utt2spk beside it), every fifth
    utterance (3, dim) crops; the last ark's lines in reverse key order when `reverse_last`."""
    rng = np.random.default_rng(7)
    root.mkdir(parents=True)
    spk = rng.integers(0, speakers, count)
    keys = sorted(f"id{s:03d}/v{k % 3}/{k:05d}.wav" for k, s in enumerate(spk))
    lines = []
    for a in range(arks):
        part = keys[a::arks]
        if reverse_last and a == arks - 1:
            part = part[::-1]
        with kaldiio.WriteHelper(f"ark,scp:{root}/p{a}.ark,{root}/p{a}.scp") as writer:
            for k, key in enumerate(part):
                writer(key, rng.standard_normal((3, dim) if k % 5 == 0 else dim).astype(np.float32))
        lines.append((root / f"p{a}.scp").read_text())
        (root / f"p{a}.scp").unlink()
    (root / "utt2spk").write_text("".join(f"{key} {key.split('/')[0]}\n" for key in keys))
    scp = root / "xvector.scp"
    scp.write_text("".join(lines))
    return scp


def expected_store(scp: Path, target: Path, dtype: str) -> Path:
    """The store by the plain definition: every crop mean in memory, packed at once."""
    entries = scp_entries(scp)
    utt2spk = read_utt2spk(scp.parent / "utt2spk")
    mean = {
        utt: np.asarray(kaldiio.load_mat(loc)).reshape(-1, dim_of(scp)).astype(np.float64).mean(axis=0)
        for utt, loc in entries
    }
    names = {utt: key_speaker(store_key(utt), utt2spk) for utt, _ in entries}
    order = sorted(mean, key=lambda utt: (names[utt], store_key(utt).split("/")))
    speakers = sorted(set(names.values()))
    speaker_of = np.array([speakers.index(names[utt]) for utt in order], np.int32)
    arks = sorted({ark_of(loc) for _, loc in entries})
    ark_hashes = [
        content_hash(np.stack([mean[utt] for utt, loc in entries if ark_of(loc) == ark])) for ark in arks
    ]
    hashes = [file_hash(scp), *ark_hashes, *side_hashes(scp.parent, KALDI_SIDE_FILES)]
    return pack_means(
        target,
        [store_key(utt) for utt in order],
        np.stack([mean[utt] for utt in order]),
        speakers,
        speaker_of,
        dtype,
        {"source": str(scp), "source_kind": "kaldi"},
        side_dir=scp.parent,
        sources=(scp_sources(scp, entries), np.array(hashes, np.int64)),
    )


def dim_of(scp: Path) -> int:
    return int(np.asarray(kaldiio.load_mat(scp_entries(scp)[0][1])).shape[-1])


def assert_same_store(built: Path, expected: Path) -> None:
    assert sorted(p.name for p in built.iterdir()) == sorted(p.name for p in expected.iterdir())
    for path in sorted(built.iterdir()):
        other = expected / path.name
        if path.name == "header.json":
            header, wanted = json.loads(path.read_text()), json.loads(other.read_text())
            header.pop("created"), wanted.pop("created")
            assert header == wanted
        elif path.name == "sources.npz":
            with np.load(path) as got, np.load(other) as want:
                np.testing.assert_array_equal(got["hashes"], want["hashes"])
                np.testing.assert_array_equal(got["stats"], want["stats"])
        else:
            assert path.read_bytes() == other.read_bytes(), path.name


@pytest.mark.parametrize(
    ("dtype", "reverse_last"), [("float32", False), ("float32", True), ("float16", True)]
)
def test_streaming_pack_equals_packing_the_whole_matrix(tmp_path, monkeypatch, dtype, reverse_last):
    monkeypatch.setattr(stores.write, "RELEASE_BYTES", 1000)  # rows written out many times
    scp = write_scp(tmp_path / "emb", count=300, dim=12, speakers=9, arks=3, reverse_last=reverse_last)
    assert pack_scp(scp, dtype) == 9
    expected = expected_store(scp, tmp_path / "expected.store", dtype)
    assert_same_store(scp.with_name("xvector.store"), expected)
    forget_freshness()
    assert isinstance(open_embeddings(scp), PackedStore)  # its hashes agree with the check's


def test_a_vector_of_another_dimension_is_named(tmp_path):
    scp = write_scp(tmp_path / "emb", count=20, dim=6, speakers=2, arks=1, reverse_last=False)
    utt = scp.read_text().splitlines()[-1].split()[0]
    with kaldiio.WriteHelper(f"ark,scp:{tmp_path}/odd.ark,{tmp_path}/odd.scp") as writer:
        writer(utt, np.ones(5, np.float32))
    lines = scp.read_text().splitlines()[:-1] + (tmp_path / "odd.scp").read_text().splitlines()
    scp.write_text("".join(line + "\n" for line in lines))
    with pytest.raises(UserError, match=f"{utt} has dimension 5, others 6"):
        pack_scp(scp)
    assert not scp.with_name("xvector.store").exists()
