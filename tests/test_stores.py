"""Embedding stores (issue 19): packed stores equal the files they were built from, stale ones are
not used, Kaldi .scp/.ark (as WeSpeaker writes them), trees of (D,) files and WeSpeaker trial lists
give the same lists, losses and EER as the project's own tree, and --generate's writers read back."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import kaldiio
import numpy as np
import pytest
import torch
import yaml
from conftest import make_embedding_tree, run_script

import m_comb_embs
import m_gen_list
import m_trainer
from m_comb_embs import combine
from m_DataLoader import (
    EmbeddingData,
    Sampling,
    TrialSet,
    load_embeddings,
    load_speaker_embeddings,
    read_list,
)
from m_gen_list import make_lists
from m_utils import UserError
from stores.arrays import combine_speaker
from stores.keys import store_key
from stores.open import forget_freshness, open_embeddings, open_store
from stores.tree import TreeSource
from stores.write import gen_format_of, gen_target, pack_arrays, write_embeddings

DIM = 16


def rels_of(tree: Path) -> list[str]:
    return sorted(p.relative_to(tree).as_posix() for p in tree.glob("*/*/*.npy"))


@pytest.fixture
def packed(tmp_path) -> Path:
    tree = make_embedding_tree(tmp_path / "emb", speakers=4, sessions=2, utterances=3, dim=DIM)
    np.save(tree / "id10001" / "sess0000001" / "00009.npy", np.arange(1, DIM + 1, dtype=np.float32))  # (D,)
    (tree / "utt2dur").write_text(
        "".join(f"{store_key(rel)} {k + 1.5:.3f}\n" for k, rel in enumerate(rels_of(tree)))
    )
    (tree / "manifest.json").write_text(json.dumps({"extractor": "GE2E", "eval_frames": 300}))
    combine(tree, pack=True)
    forget_freshness()
    return tree


def test_store_keys_map_list_paths_and_kaldi_ids_alike():
    for name in (
        "id10270/x6uYqmx31kE/00001.wav",
        "id10270/x6uYqmx31kE/00001.npy",
        "./id10270/x6uYqmx31kE/00001.flac",
        "id10270\\x6uYqmx31kE\\00001.M4A",
    ):
        assert store_key(name) == "id10270/x6uYqmx31kE/00001"
    assert store_key("a.b/c") == "a.b/c" and store_key("spk-utt") == "spk-utt"


def test_packed_store_equals_the_files_exactly(packed):
    store = open_store(packed / "embeddings.store")
    assert open_embeddings(packed).path == store.path  # the tree is read from its fresh store
    rels = rels_of(packed)
    from_files = TreeSource(packed).utterances(rels, threads=0)
    from_store = store.utterances(rels)
    np.testing.assert_array_equal(from_store.matrix(), from_files.matrix())
    np.testing.assert_array_equal(from_store.norms, from_files.norms)
    assert store.header["utterances"] == len(rels) == len(store.keys)
    assert store.header["dtype"] == "float32" and store.header["dim"] == DIM
    for kind in ("B", "C"):
        speakers = sorted(p.name for p in packed.iterdir() if p.is_dir() and not p.name.endswith(".store"))
        np.testing.assert_array_equal(
            store.speaker_embeddings(speakers, kind), TreeSource(packed).speaker_embeddings(speakers, kind)
        )
    assert (packed / "embeddings.store" / "utt2dur").read_text() == (packed / "utt2dur").read_text()
    trials = packed / "trials.txt"
    trials.write_text(f"1 {rels[0]} {rels[1]}\n0 {rels[0]} {rels[-1]}\n")
    trial_set = TrialSet(trials, packed, DIM)
    assert trial_set.source == str(packed / "embeddings.store")
    assert trial_set.manifest == {"extractor": "GE2E", "eval_frames": 300}
    assert trial_set.durations.tolist() == [1.5, 2.5, len(rels) + 0.5]
    np.testing.assert_array_equal(trial_set.norms, from_files.norms[[0, 1, len(rels) - 1]])


def test_training_data_is_the_memory_map_not_a_copy(packed, tmp_path):
    make_lists(packed, "p", tmp_path / "lists", seed=1, kinds=("normal",))
    lines = (tmp_path / "lists" / "p_normal_list.txt").read_text().splitlines()[::2]
    (tmp_path / "half.txt").write_text("\n".join(lines) + "\n")
    listed = tmp_path / "all.txt"  # every file, (D,) one included
    listed.write_text("".join(f"{rel.split('/')[0]} {rel}\n" for rel in rels_of(packed)))
    data = EmbeddingData(listed, packed, "normal", "B", DIM)
    store = open_store(packed / "embeddings.store")
    assert data.embeddings.data_ptr() == store.matrix.ctypes.data
    part = EmbeddingData(tmp_path / "half.txt", packed, "normal", "B", DIM)
    assert len(part.embeddings) == len(lines) < len(store.keys)  # a subset: just its rows
    batch = next(part.batches(1, Sampling(batch_size=5, seed=1)))
    files = TreeSource(packed).utterances([line.split()[1] for line in lines], threads=0).matrix()
    np.testing.assert_array_equal(batch.inputs.numpy(), files[batch.records])


def test_a_stale_store_is_not_used(packed, caplog):
    rel = rels_of(packed)[3]
    changed = np.full((2, DIM), 0.5, np.float32)
    np.save(packed / rel, changed)
    os.utime(packed / rel, ns=(2**62, 2**62))  # newer than anything, even on coarse clocks
    with caplog.at_level(logging.WARNING, logger="stores"):
        loaded = load_embeddings(packed, [rel])
    assert isinstance(open_embeddings(packed), TreeSource)
    np.testing.assert_allclose(loaded[0], np.full(DIM, 0.25), atol=1e-7)
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert str(packed / "embeddings.store") in caplog.records[0].getMessage()
    combine(packed, pack=True)  # rebuilt: fresh again, with the new values
    forget_freshness()
    assert open_embeddings(packed).path == packed / "embeddings.store"
    np.testing.assert_array_equal(load_embeddings(packed, [rel]), loaded)
    (packed / rels_of(packed)[0]).unlink()  # a removed file makes it stale too
    forget_freshness()
    assert isinstance(open_embeddings(packed), TreeSource)


def test_missing_key_names_the_list_its_line_and_the_store(packed, tmp_path):
    listed = tmp_path / "trials.txt"
    rels = rels_of(packed)
    listed.write_text(f"1 {rels[0]} {rels[1]}\n# comment\n0 {rels[0]} id99999/none/00001.wav\n")
    with pytest.raises(UserError) as caught:
        TrialSet(listed, packed / "embeddings.store", DIM)
    message = str(caught.value)
    assert f"{listed}:3" in message and "id99999/none/00001" in message
    assert str(packed / "embeddings.store") in message


def test_float16_store_converts_once(tmp_path):
    rng = np.random.default_rng(0)
    means = rng.standard_normal((30, DIM)).astype(np.float32)
    keys = [f"s{k % 3}/v{k % 2}/{k:05d}.wav" for k in range(30)]
    store = open_store(pack_arrays(tmp_path / "x.store", keys, means, dtype="float16"))
    assert store.matrix.dtype == np.float16 and store.header["dtype"] == "float16"
    expected = (means / np.linalg.norm(means.astype(np.float64), axis=1, keepdims=True)).astype(np.float16)
    listed = tmp_path / "normal.txt"
    listed.write_text("".join(f"{key.split('/')[0]} {key}\n" for key in keys))
    data = EmbeddingData(listed, tmp_path / "x.store", "normal", "C", DIM)
    np.testing.assert_array_equal(data.embeddings.numpy(), expected.astype(np.float32))
    again = EmbeddingData(listed, tmp_path / "x.store", "normal", "C", DIM)
    assert again.embeddings.data_ptr() == data.embeddings.data_ptr()  # converted once
    np.testing.assert_allclose(
        load_speaker_embeddings(tmp_path / "x.store", ["s1"], "C")[0],
        combine_speaker(means[1::3].astype(np.float64), "C"),
    )


def test_float16_store_epoch_gathers_rows_without_a_float32_copy(tmp_path):
    """Training from a float16 store on the CPU gathers each batch's rows from the memory map and
    converts only those (issue 19: no 10 GB float32 copy of a VoxBlink2-sized store); its epoch
    equals one from a float32 store of the same values, to float16's tolerance."""
    rng = np.random.default_rng(1)
    means = rng.standard_normal((40, DIM)).astype(np.float32)
    keys = [f"s{k % 4}/v{k % 2}/{k:05d}.wav" for k in range(40)]
    listed = tmp_path / "normal.txt"
    listed.write_text("".join(f"{key.split('/')[0]} {key}\n" for key in keys))
    half = pack_arrays(tmp_path / "half.store", keys, means, dtype="float16")
    full = pack_arrays(tmp_path / "full.store", keys, means, dtype="float32")
    data16 = EmbeddingData(listed, half, "normal", "B", DIM)
    data32 = EmbeddingData(listed, full, "normal", "B", DIM)
    assert data16.table.dtype == torch.float16
    assert data16.table.data_ptr() == open_store(half).matrix.ctypes.data  # the memory map itself
    assert data16._embeddings is None  # no float32 copy made by construction
    sampling = Sampling(batch_size=7, seed=3)
    epoch16, epoch32 = list(data16.batches(1, sampling)), list(data32.batches(1, sampling))
    assert len(epoch16) == len(epoch32) == 6
    for a, b in zip(epoch16, epoch32, strict=True):
        assert a.inputs.dtype == torch.float32
        torch.testing.assert_close(a.inputs, b.inputs, atol=2e-3, rtol=0)
        torch.testing.assert_close(a.targets, b.targets)
        assert torch.equal(a.labels, b.labels)
    assert data16._embeddings is None  # training never converted the whole matrix
    torch.testing.assert_close(data16.embeddings, data32.embeddings, atol=2e-3, rtol=0)


def write_scp(folder: Path, arrays: dict[str, np.ndarray]) -> Path:
    """An xvector.scp + xvector.ark as WeSpeaker writes them (kaldiio, absolute ark path)."""
    folder.mkdir(parents=True, exist_ok=True)
    kaldiio.save_ark(str(folder / "xvector.ark"), arrays, scp=str(folder / "xvector.scp"))
    return folder / "xvector.scp"


def test_an_unpacked_scp_reads_each_utterance_once(tmp_path, monkeypatch):
    """A list's embeddings and then its speakers' (B and C) come from one read of each utterance,
    with the values a fresh read gives."""
    rng = np.random.default_rng(2)
    arrays = {
        f"s{k % 3}/v{k % 2}/{k:05d}.wav": rng.standard_normal((2, DIM)).astype(np.float32) for k in range(12)
    }
    scp = write_scp(tmp_path / "kaldi", arrays)
    make_lists(scp, "k", tmp_path / "lists", seed=1, kinds=("normal",))
    reads = []
    load_mat = kaldiio.load_mat
    monkeypatch.setattr(kaldiio, "load_mat", lambda location: reads.append(location) or load_mat(location))
    data = EmbeddingData(tmp_path / "lists" / "k_normal_list.txt", scp, "normal", "C", DIM)
    assert len(reads) == len(set(reads)) == len(arrays)
    for k, spk in enumerate(data.speakers):
        own = [a.mean(axis=0, dtype=np.float64) for key, a in arrays.items() if key.startswith(spk + "/")]
        np.testing.assert_array_equal(data.speaker_embeddings[k].numpy(), combine_speaker(np.stack(own), "C"))


def test_kaldi_ids_with_utt2spk(tmp_path):
    rng = np.random.default_rng(1)
    arrays = {f"u{k:03d}": rng.standard_normal(DIM).astype(np.float32) for k in range(12)}
    scp = write_scp(tmp_path / "kaldi", arrays)
    speaker = {utt: f"spk{k % 3}" for k, utt in enumerate(arrays)}
    (scp.parent / "utt2spk").write_text("".join(f"{u} {s}\n" for u, s in speaker.items()))
    make_lists(scp, "k", tmp_path / "lists", seed=1, kinds=("normal",))
    listed = read_list(tmp_path / "lists" / "k_normal_list.txt", "normal")
    assert sorted(listed) == sorted((s, u) for u, s in speaker.items())
    from_scp = EmbeddingData(tmp_path / "lists" / "k_normal_list.txt", scp, "normal", "B", DIM)
    assert from_scp.speakers == ["spk0", "spk1", "spk2"]
    run_script("m_comb_embs.py", "--embed_dir", str(scp))
    store = open_store(tmp_path / "kaldi" / "xvector.store")
    assert store.speakers == ["spk0", "spk1", "spk2"] and store.header["source_kind"] == "kaldi"
    assert open_embeddings(scp).path == store.path
    from_store = EmbeddingData(tmp_path / "lists" / "k_normal_list.txt", scp, "normal", "B", DIM)
    np.testing.assert_array_equal(from_store.speaker_embeddings, from_scp.speaker_embeddings)
    for name in ("embeddings",):
        rows = [from_store.records.inputs, from_scp.records.inputs]
        np.testing.assert_array_equal(getattr(from_store, name)[rows[0]], getattr(from_scp, name)[rows[1]])


def test_wespeaker_trial_lists_read_as_the_original_format(packed, tmp_path):
    rels = rels_of(packed)
    original = tmp_path / "veri.txt"
    original.write_text(f"1 {rels[0]} {rels[1]}\n0 {rels[0]} {rels[-1]}\n")
    wespeaker = tmp_path / "vox1_O_cleaned.kaldi"
    wav = [rel.replace(".npy", ".wav") for rel in rels]
    wespeaker.write_text(f"{wav[0]} {wav[1]} target\n{wav[0]} {wav[-1]} nontarget\n")
    a, b = TrialSet(original, packed, DIM), TrialSet(wespeaker, packed, DIM)
    for name in ("labels", "left", "right", "embeddings"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    mixed = tmp_path / "mixed.kaldi"
    mixed.write_text(f"{wav[0]} {wav[1]} target\n0 {rels[0]} {rels[-1]}\n")
    with pytest.raises(UserError, match=re.escape(f"{mixed}:2")):
        TrialSet(mixed, packed, DIM)


@pytest.mark.parametrize("target", ["tree", "out.scp", "out.store"])
def test_generate_writers_read_back(tmp_path, target):
    rng = np.random.default_rng(2)
    keys = [f"s{k % 2}/v0/{k:05d}.wav" for k in range(6)]
    rows = rng.standard_normal((6, DIM)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    written = write_embeddings(tmp_path / target, keys, rows)
    if target == "out.scp":  # keys as given, as WeSpeaker's scripts read them
        assert dict(kaldiio.load_scp(str(written))).keys() == set(keys)
        np.testing.assert_array_equal(kaldiio.load_scp(str(written))[keys[3]], rows[3])
    if target == "tree":
        assert np.load(tmp_path / "tree" / "s1" / "v0" / "00001.npy").shape == (1, DIM)
    np.testing.assert_allclose(load_embeddings(written, keys), rows, atol=1e-7)
    kind = gen_format_of(written)
    assert (
        gen_target(tmp_path / "enhanced", kind).name
        == {"tree": "enhanced", "kaldi": "xvector.scp", "packed": "enhanced.store"}[kind]
    )


# ----------------------------------------------------------------------------------------------
# Interop: the same embeddings as a (1, D) tree, a (D,) tree and WeSpeaker's .scp/.ark


def utterance_arrays(speakers: int, seed: int) -> dict[str, np.ndarray]:
    """`spk/session/nnnnn` -> (D,) float32: speaker + session offset + noise."""
    rng = np.random.default_rng(seed)
    offsets = rng.standard_normal((3, DIM))
    arrays = {}
    for s in range(speakers):
        voice = rng.standard_normal(DIM)
        for k in range(2):
            for u in range(3):
                value = voice + offsets[(s + k) % 3] + 0.3 * rng.standard_normal(DIM)
                arrays[f"id{10000 + s}/sess{k}/{u + 1:05d}"] = value.astype(np.float32)
    return arrays


def write_layout(folder: Path, arrays: dict[str, np.ndarray], layout: str) -> Path:
    if layout == "kaldi":
        return write_scp(folder, {f"{key}.wav": value for key, value in arrays.items()})
    for key, value in arrays.items():
        (folder / key).parent.mkdir(parents=True, exist_ok=True)
        np.save(folder / f"{key}.npy", value[None, :] if layout == "tree" else value)
    return folder


def numbers(text: str) -> list[float]:
    return [float(x) for x in re.findall(r"-?\d+\.\d+(?:e-?\d+)?", text)]


def json_numbers(value) -> list[float]:
    if isinstance(value, dict):
        return [x for key in sorted(value) for x in json_numbers(value[key])]
    if isinstance(value, list):
        return [x for item in value for x in json_numbers(item)]
    return [float(value)] if isinstance(value, (int, float)) and not isinstance(value, bool) else []


def run_layout(root: Path, layout: str) -> dict[str, object]:
    stores = {}
    for name, speakers, seed in (("train", 8, 0), ("test", 5, 1)):
        stores[name] = write_layout(root / name, utterance_arrays(speakers, seed), layout)
        m_comb_embs.main(["--embed_dir", str(stores[name])])
        m_gen_list.main(
            [
                "--embed_dir",
                str(stores[name]),
                "--filename",
                name,
                "--list_dir",
                str(root / "lists"),
                "--seed",
                "3",
            ]
        )
    test_list = root / "lists" / "test_test_list.txt"
    if layout == "kaldi":  # WeSpeaker's trial format
        test_list = root / "lists" / "vox_test.kaldi"
        trials = read_list(root / "lists" / "test_test_list.txt", "test")
        test_list.write_text(
            "".join(f"{a} {b} {'target' if label else 'nontarget'}\n" for label, a, b in trials)
        )
    cfg = root / "exp.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "train_list": str(root / "lists" / "train_normal_list.txt"),
                "train_path": str(stores["train"]),
                "test_list": str(test_list),
                "test_path": str(stores["test"]),
                "nOut": DIM,
                "batch_size": 8,
                "max_epoch": 2,
                "test_interval": 1,
                "nClasses": 8,
                "device": "cpu",
                "bootstrap": 20,
                "backends": ["none", "asnorm", "mean"],
                "asnorm_topk": 5,
            }
        )
    )
    save = root / "exp"
    m_trainer.main(["--config", str(cfg), "--save_path", str(save)])
    m_trainer.main(["--config", str(cfg), "--save_path", str(save), "--check"])
    lists = {
        path.name.split("_", 1)[1]: sorted(
            " ".join(store_key(f) for f in line.split()) for line in path.read_text().splitlines()
        )
        for path in sorted((root / "lists").glob("*_list.txt"))
    }
    check = json.loads((save / "result" / "check.json").read_text())
    return {
        "lists": lists,
        "scores": numbers((save / "result" / "scores.txt").read_text()),
        "check": json_numbers(check),
        "trials": np.load(save / "result" / "trials_test.npz")["original"],
    }


def test_kaldi_and_vector_trees_give_the_same_lists_losses_and_eer(tmp_path):
    """Largest difference seen: 0 for the lists, the losses and the EERs (the single-utterance
    embeddings and the speaker embeddings are bit-identical in the three layouts)."""
    results = {layout: run_layout(tmp_path / layout, layout) for layout in ("tree", "vectors", "kaldi")}
    reference = results["tree"]
    assert len(reference["scores"]) > 4 and len(reference["check"]) > 4
    for layout in ("vectors", "kaldi"):
        got = results[layout]
        assert got["lists"] == reference["lists"], layout
        np.testing.assert_allclose(got["scores"], reference["scores"], rtol=0, atol=1e-6)
        np.testing.assert_allclose(got["check"], reference["check"], rtol=0, atol=1e-6)
        np.testing.assert_allclose(got["trials"], reference["trials"], rtol=0, atol=1e-6)


def test_trainer_reads_a_store_path_in_process(packed, tmp_path):
    """m_trainer's reading needs no change: a packed store path stands in for the tree."""
    make_lists(packed, "p", tmp_path / "lists", seed=1, kinds=("normal", "test"))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "train_list": str(tmp_path / "lists" / "p_normal_list.txt"),
                "train_path": str(packed / "embeddings.store"),
                "test_list": str(tmp_path / "lists" / "p_test_list.txt"),
                "test_path": str(packed),
                "nOut": DIM,
                "batch_size": 4,
                "max_epoch": 1,
                "nClasses": 4,
                "device": "cpu",
            }
        )
    )
    torch.manual_seed(0)
    m_trainer.main(["--config", str(cfg), "--save_path", str(tmp_path / "exp")])
    assert "Epoch 1" in (tmp_path / "exp" / "result" / "scores.txt").read_text()


def test_missing_file_of_a_tree_or_scp_names_the_list_line_too(tmp_path):
    tree = make_embedding_tree(tmp_path / "emb", speakers=2, sessions=1, utterances=2, dim=DIM)
    rels = rels_of(tree)
    scp = write_scp(tmp_path / "kaldi", {rel.replace(".npy", ".wav"): np.load(tree / rel)[0] for rel in rels})
    listed = tmp_path / "trials.txt"
    listed.write_text(f"1 {rels[0]} {rels[1]}\n\n0 {rels[0]} id10000/gone/00001.wav\n")
    for store in (tree, scp):
        with pytest.raises(UserError) as caught:
            TrialSet(listed, store, DIM)
        assert f"{listed}:3" in str(caught.value) and str(store) in str(caught.value)


def test_side_files_are_read_strictly_by_one_reader(tmp_path):
    tree = make_embedding_tree(tmp_path / "emb", speakers=2, sessions=1, utterances=2, dim=DIM)
    rels = rels_of(tree)
    (tree / "utt2dur").write_text(f"{store_key(rels[0])} 1.5\n{store_key(rels[1])} -2\n")
    with pytest.raises(UserError, match=re.escape(f"{tree / 'utt2dur'}:2: expected '<utt> <seconds>'")):
        open_embeddings(tree).durations(rels)
    (tree / "utt2dur").write_text(f"{store_key(rels[0])} nan\n")
    with pytest.raises(UserError, match=re.escape(f"{tree / 'utt2dur'}:1:")):
        open_embeddings(tree).durations(rels)
    (tree / "manifest.json").write_text('{"extractor":\n  oops}\n')
    with pytest.raises(UserError, match=re.escape(f"{tree / 'manifest.json'}:2: not valid JSON")):
        _ = open_embeddings(tree).manifest
    (tree / "manifest.json").write_text("[1, 2]\n")
    with pytest.raises(UserError, match="a manifest is a JSON object"):
        _ = open_embeddings(tree).manifest
