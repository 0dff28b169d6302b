"""--generate writes gen_path's utt2dur and manifest.json beside what it writes (a tree, a Kaldi
.scp keyed as the trial lists name the files), so that QMF scores the generated embeddings."""

from __future__ import annotations

import json

import kaldiio
from conftest import config, train

import m_trainer
from stores.keys import store_key
from stores.open import open_embeddings


def test_generated_embeddings_carry_durations_and_manifest(data, tmp_path):
    source = data / "test"
    rels = sorted(path.relative_to(source).as_posix() for path in source.glob("*/*/*.npy"))
    seconds = {store_key(rel): round(1.0 + k / 8, 3) for k, rel in enumerate(rels)}
    (source / "utt2dur").write_text("".join(f"{key} {value:.3f}\n" for key, value in seconds.items()))
    (source / "manifest.json").write_text(json.dumps({"extractor": "GE2E", "max_seconds": None}))
    lists = data / "lists"
    cfg = config(
        data, tmp_path, trainfunc="CS", gen_list=str(lists / "test_normal_list.txt"), gen_path=str(source)
    )
    save = tmp_path / "exp"
    train(cfg, save, "--max_epoch", "1")
    for kind in ("tree", "kaldi"):
        args = ["--generate", "--gen_format", kind, "--gen_target_dir", f"enhanced_{kind}"]
        m_trainer.main(["--config", str(cfg), "--save_path", str(save), *args])

    tree, scp = save / "enhanced_tree", save / "enhanced_kaldi" / "xvector.scp"
    assert (tree / "utt2dur").read_text() == (source / "utt2dur").read_text()
    keys = list(dict(kaldiio.load_scp(str(scp))))
    assert sorted(keys) == sorted(rel.removesuffix(".npy") + ".wav" for rel in rels)
    lines = (scp.parent / "utt2dur").read_text().splitlines()
    assert sorted(lines) == sorted(f"{key} {seconds[store_key(key)]:.3f}" for key in keys)
    for folder in (tree, scp.parent):
        manifest = json.loads((folder / "manifest.json").read_text())
        assert manifest["extractor"] == "GE2E" and manifest["enhanced_from"] == str(source)
        assert manifest["enhanced_by"].endswith(".model")
    assert list(open_embeddings(scp).durations(keys)) == [seconds[store_key(key)] for key in keys]

    # scored as a test set, keyed as an official list names its files: QMF is not skipped
    trials = [
        line.replace(".npy", ".wav") for line in (lists / "test_test_list.txt").read_text().splitlines()
    ]
    official = tmp_path / "veri_test2.txt"
    official.write_text("\n".join(trials) + "\n")
    m_trainer.main(
        [
            *("--config", str(cfg), "--save_path", str(save), "--check", "--bootstrap", "20"),
            *("--test_list", str(official), "--test_path", str(scp), "--test_list_libri", ""),
            *("--calib_list", str(official), "--calib_path", str(scp), "--backends", "none", "qmf"),
        ]
    )
    records = json.loads((save / "result" / "check.json").read_text())
    assert {(r["trials"], r["backend"]) for r in records if "eer" in r} == {("test", "none"), ("test", "qmf")}
