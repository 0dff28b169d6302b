"""The template configs run, unchanged but for size options, on the layout the README's steps
write (their comments give those steps): VoxCeleb as a tree of .npy files, WeSpeaker as xvector.scp."""

import json
from pathlib import Path

import kaldiio
import numpy as np
from conftest import ROOT, make_embedding_tree

import m_comb_embs
import m_gen_list
import m_trainer

# The toy embeddings are 24-dimensional; one short epoch and few resamples keep the test fast.
SMALL = [
    "--nOut",
    "24",
    "--max_epoch",
    "1",
    "--test_interval",
    "1",
    "--batch_size",
    "32",
    "--bootstrap",
    "20",
    "--device",
    "cpu",
    "--nDataLoaderThread",
    "0",
]


def run_template(name: str, *mode: str) -> None:
    m_trainer.main(["--config", str(ROOT / "configs" / f"{name}.yaml"), *SMALL, *mode])


def list_sources(run: Path) -> dict:
    records = json.loads((run / "result" / "check.json").read_text())
    return next(record["sources"] for record in records if record["trials"] is None)


def test_voxceleb_template(tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)
    emb, lists = Path("exp_voxceleb/embeddings"), "exp_voxceleb/lists"
    make_embedding_tree(emb / "voxceleb2", speakers=10, sessions=2, utterances=3, seed=0, prefix="i0")
    make_embedding_tree(emb / "librispeech", speakers=4, sessions=2, utterances=3, seed=1, libri=True)
    # VoxCeleb1 in one tree: 4 speakers the trial list names, 4 held out
    make_embedding_tree(emb / "voxceleb1", speakers=8, sessions=2, utterances=3, seed=2, prefix="i2")
    for tree in ("voxceleb2", "voxceleb1", "librispeech"):
        m_comb_embs.main(["--embed_dir", str(emb / tree)])
    m_gen_list.main(["--embed_dir", str(emb / "voxceleb2"), "--filename", "vox2", "--list_dir", lists])
    m_gen_list.main(["--embed_dir", str(emb / "librispeech"), "--filename", "libri", "--list_dir", lists])
    m_gen_list.main(["--embed_dir", str(emb / "voxceleb1"), "--filename", "vox1", "--list_dir", lists])
    # The official VoxCeleb1-O list names audio files: trials of the first 4 speakers, .wav paths
    ours = Path(lists, "vox1_test_list.txt").read_text().splitlines()
    test_speakers = {f"i2{10000 + s:05d}" for s in range(4)}
    trials = [
        line.replace(".npy", ".wav")
        for line in ours
        if {path.split("/")[0] for path in line.split()[1:]} <= test_speakers
    ]
    Path("lists").mkdir()
    Path("lists/veri_test2.txt").write_text("\n".join(trials) + "\n")
    m_gen_list.main(
        [
            *("--embed_dir", str(emb / "voxceleb1"), "--filename", "vox1_heldout", "--list_dir", lists),
            *("--lists", "normal", "test", "--exclude_speakers_of", "lists/veri_test2.txt"),
        ]
    )
    held_out = {
        line.split()[0] for line in Path(lists, "vox1_heldout_normal_list.txt").read_text().splitlines()
    }
    assert len(held_out) == 4 and not held_out & test_speakers

    run_template("voxceleb")
    run_template("voxceleb", "--check")
    run = tmp_path / "exp_voxceleb" / "voxceleb"
    assert (run / "result" / "scores.txt").read_text().startswith("Epoch 1, TLOSS")
    sources = list_sources(run)
    assert sources["test"]["path"].endswith("lists/veri_test2.txt")
    assert sources["test"]["count"] == len(trials)
    assert sources["calib"]["path"].endswith("lists/vox1_heldout_test_list.txt")
    assert (run / "result" / "trials_libri.npz").is_file()


def write_xvectors(tree: Path, folder: Path) -> list[str]:
    """A WeSpeaker embedding folder (xvector.scp + .ark, utt2spk) of a tree's crop means; its keys."""
    arrays = {
        str(path.relative_to(tree).with_suffix(".wav")): np.load(path).mean(axis=0)
        for path in sorted(tree.rglob("*.npy"))
    }
    folder.mkdir(parents=True)
    kaldiio.save_ark(str((folder / "xvector.ark").resolve()), arrays, scp=str(folder / "xvector.scp"))
    (folder / "utt2spk").write_text("".join(f"{key} {key.split('/')[0]}\n" for key in arrays))
    return list(arrays)


def test_wespeaker_template(tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)
    embeddings = Path("exp/resnet34/embeddings")
    for seed, (name, speakers) in enumerate((("vox2_dev", 10), ("vox1", 4))):
        tree = make_embedding_tree(
            tmp_path / "trees" / name,
            speakers=speakers,
            sessions=2,
            utterances=3,
            seed=seed,
            prefix=f"i{seed}",
        )
        keys = write_xvectors(tree, embeddings / name)
        scp = str(embeddings / name / "xvector.scp")
        m_comb_embs.main(["--embed_dir", scp])
        m_gen_list.main(
            ["--embed_dir", scp, "--filename", f"wespeaker_{name.split('_')[0]}", "--lists", "normal"]
        )
    trials = [
        f"{a} {b} {'target' if a.split('/')[0] == b.split('/')[0] else 'nontarget'}"
        for i, a in enumerate(keys)
        for b in keys[i + 1 : i + 4]
    ]
    Path("data/vox1/trials").mkdir(parents=True)
    Path("data/vox1/trials/vox1_O_cleaned.kaldi").write_text("\n".join(trials) + "\n")

    run_template("wespeaker_xvector")
    run_template("wespeaker_xvector", "--check")
    run_template("wespeaker_xvector", "--generate")
    run = tmp_path / "exp_emb" / "wespeaker_xvector"
    sources = list_sources(run)
    assert sources["test"]["path"].endswith("data/vox1/trials/vox1_O_cleaned.kaldi")
    assert sources["test"]["count"] == len(trials)
    enhanced = dict(kaldiio.load_scp(str(run / "enhanced" / "xvector.scp")))
    assert sorted(enhanced) == sorted(keys)
    assert {value.shape for value in enhanced.values()} == {(24,)}
