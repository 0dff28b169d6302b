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
    trees = {
        "vox2": ("voxceleb2", 10),
        "vox1_dev": ("voxceleb1_dev", 4),
        "vox1_test": ("voxceleb1_test", 4),
        "libri": ("librispeech", 4),
    }
    for seed, (name, (tree, speakers)) in enumerate(trees.items()):
        embed_dir = f"data/embeddings/{tree}"
        make_embedding_tree(
            Path(embed_dir),
            speakers=speakers,
            sessions=2,
            utterances=3,
            seed=seed,
            prefix=f"i{seed}",
            libri=name == "libri",
        )
        m_comb_embs.main(["--embed_dir", embed_dir])
        m_gen_list.main(["--embed_dir", embed_dir, "--filename", name])
    # The official VoxCeleb1-O list names audio files: the same trials with .wav paths
    ours = Path("lists/vox1_test_test_list.txt").read_text()
    trials = [line.replace(".npy", ".wav") for line in ours.splitlines()]
    Path("lists/veri_test2.txt").write_text("\n".join(trials) + "\n")

    run_template("voxceleb")
    run_template("voxceleb", "--check")
    run = tmp_path / "exp_emb" / "voxceleb"
    assert (run / "result" / "scores.txt").read_text().startswith("Epoch 1, TLOSS")
    sources = list_sources(run)
    assert sources["test"]["path"].endswith("lists/veri_test2.txt")
    assert sources["test"]["count"] == len(trials)
    assert sources["calib"]["path"].endswith("lists/vox1_dev_test_list.txt")
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
