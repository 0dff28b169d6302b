"""The enrolment table (issue 26, items 3 and 5): its numbers against the check.json records it
reads, and the share of the gap the enhancer closes, with its joint-bootstrap interval, against a
direct computation."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import make_embedding_tree

import m_viewer
from m_gen_list import make_lists
from scoring.bootstrap import speaker_resamples
from scoring.enrolment_table import FULL, EnrolmentCheck, gap_share, read_enrolment_check, share_of
from scoring.metrics import compute_eer
from scoring.report import Sources, list_records, result_name, save_trial_scores, write_records

BACKENDS = ("none", "asnorm")


def toy_scores(rng: np.random.Generator, labels: np.ndarray, separation: float) -> np.ndarray:
    return rng.standard_normal(len(labels)) + separation * labels


def toy_check(k: int, labels: np.ndarray, speakers: np.ndarray, scores: dict) -> EnrolmentCheck:
    eers = {key: (compute_eer(values, labels)[0], np.nan, np.nan) for key, values in scores.items()}
    return EnrolmentCheck(Path(f"check_enroll{k}.json"), k, FULL, eers, scores, labels, speakers)


def test_share_and_interval_against_a_direct_computation():
    rng = np.random.default_rng(3)
    speakers = np.repeat([f"spk{s}" for s in (4, 0, 2, 1, 3, 5, 6)], 6)  # not in sorted order
    labels = np.tile([1, 1, 1, 0, 0, 0], 7)
    single = toy_check(
        1,
        labels,
        speakers,
        {
            ("original", "none"): toy_scores(rng, labels, 0.8),
            ("enhanced", "none"): toy_scores(rng, labels, 1.6),
        },
    )
    several = toy_check(3, labels, speakers, {("original", "none"): toy_scores(rng, labels, 2.5)})
    (point, lo, hi), difference = gap_share(single, several, "none", resamples=200, seed=7)

    eer = {
        name: check.eers[key][0]
        for name, check, key in (
            ("o1", single, ("original", "none")),
            ("e1", single, ("enhanced", "none")),
            ("oK", several, ("original", "none")),
        )
    }
    assert point == pytest.approx((eer["o1"] - eer["e1"]) / (eer["o1"] - eer["oK"]))
    assert point == share_of(eer["o1"], eer["e1"], eer["oK"])
    # By hand: each resample repeats every trial as often as its speaker is drawn (speakers in
    # sorted order, as the bootstrap numbers them), the same draws for both lists.
    index = np.unique(speakers, return_inverse=True)[1]
    shares, differences = [], []
    for draw in speaker_resamples(7, 200, 7):
        weight = draw[index]
        o1, e1, ok = (
            compute_eer(np.repeat(scores, weight), np.repeat(labels, weight))[0]
            for scores in (
                single.scores[("original", "none")],
                single.scores[("enhanced", "none")],
                several.scores[("original", "none")],
            )
        )
        shares.append((o1 - e1) / (o1 - ok) if abs(o1 - ok) > 1e-9 else np.nan)
        differences.append(e1 - ok)
    shares = np.array(shares)
    expected = np.nanpercentile(shares, [2.5, 97.5])
    np.testing.assert_allclose([lo, hi], expected, rtol=1e-9)
    assert lo < point < hi
    assert difference[0] == pytest.approx(eer["e1"] - eer["oK"])
    np.testing.assert_allclose(difference[1:], np.percentile(differences, [2.5, 97.5]), rtol=1e-9)


def test_no_gap_gives_no_share():
    assert np.isnan(share_of(10.0, 8.0, 10.0)) and np.isnan(share_of(10.0, 8.0, 10.0 + 1e-13))
    assert share_of(10.0, 8.0, 6.0) == 0.5


def fake_check(run: Path, tree: Path, lists: dict[str, Path], k: int, seed: int, rng) -> dict:
    """A check.json and trials npz as m_trainer.py --check writes them over the enrolment list
    of K utterances (result tag enroll<K>), with made-up scores; returns the options."""
    labels = np.array([int(line.split()[0]) for line in lists[f"enroll{k}_test"].read_text().splitlines()])
    tag = f"enroll{k}"
    scores = {
        (system, backend): toy_scores(rng, labels, 1.0 + k / 2 + (system == "enhanced"))
        for system in ("original", "enhanced")
        for backend in BACKENDS
    }
    firsts = {line.split()[0]: line.split()[1] for line in lists[f"enroll{k}"].read_text().splitlines()}
    trials = [line.split() for line in lists[f"enroll{k}_test"].read_text().splitlines()]
    speakers = np.array([firsts[model].split("/")[0] for _, model, _ in trials])
    options = {
        "test_list": str(lists[f"enroll{k}_test"]),
        "enroll_list": str(lists[f"enroll{k}"]),
        "test_path": str(tree),
        "enroll_path": None,
        "result_tag": tag,
        "seed": seed,
    }
    records = list_records("test", scores, labels, speakers, resamples=100, seed=seed)
    sources = Sources(model={"seed": seed, "options": options})
    result = run / "result"
    result.mkdir(parents=True, exist_ok=True)
    write_records(result / result_name("check.json", tag), [*records, sources])
    save_trial_scores(result / result_name("trials_test.npz", tag), labels, "C", scores)
    return options


def table_line(text: str, backend: str, row: str) -> str:
    """The full-length line of the table for this back-end and row."""
    return next(
        line
        for line in text.splitlines()
        if line.startswith(FULL) and line[len(FULL) :].split()[:1] == [backend] and row in line
    )


def test_table_numbers_are_those_of_the_check_files(tmp_path, capsys):
    tree = make_embedding_tree(tmp_path / "emb", speakers=6, sessions=3, utterances=2, dim=8)
    lists = make_lists(tree, "toy", tmp_path / "lists", seed=1, kinds=("enroll",), enroll_utts=(1, 3))
    run = tmp_path / "exp" / "toy_run"
    rng = np.random.default_rng(0)
    for k in (1, 3):
        fake_check(run, tree, lists, k, seed=1, rng=rng)
    (run / "result" / "check.json").write_text("[]\n")  # the test list's own check: not in the table
    args = argparse.Namespace(out_dir=str(tmp_path / "plots"))
    written = m_viewer.enrolment_outputs(args, [run], ["toy_run"])
    assert sorted(p.name for p in written) == ["enrolment.md", "enrolment.png", "enrolment.txt"]
    text = (tmp_path / "plots" / "enrolment.txt").read_text()
    assert text in capsys.readouterr().out
    header = text.split("\n\n", 1)[1].splitlines()[0]
    assert "K = 1" in header and "K = 3" in header
    records = {k: json.loads((run / "result" / f"check_enroll{k}.json").read_text()) for k in (1, 3)}
    eer = {(k, r["system"], r["backend"]): r for k, found in records.items() for r in found if "eer" in r}
    for backend in BACKENDS:
        for system in ("original", "enhanced"):
            cells = table_line(text, backend, f"EER {system}").split(f"EER {system}")[1]
            for k in (1, 3):
                r = eer[(k, system, backend)]
                assert f"{r['eer']:.2f} [{r['eer_ci95'][0]:.2f}, {r['eer_ci95'][1]:.2f}]" in cells
        share = table_line(text, backend, "gap closed").split("gap closed")[1].split()
        expected = share_of(
            *(
                eer[key]["eer"]
                for key in ((1, "original", backend), (1, "enhanced", backend), (3, "original", backend))
            )
        )
        assert share[0] == "-" and share[1] == f"{expected:.2f}"
        against = table_line(text, backend, "enh. 1 - orig. K").split("orig. K")[1].split()
        expected = eer[(1, "enhanced", backend)]["eer"] - eer[(3, "original", backend)]["eer"]
        assert against[0] == "-" and against[1] == f"{expected:.2f}"
    check = read_enrolment_check(run / "result" / "check_enroll3.json")
    assert check is not None and check.k == 3 and check.condition == FULL
    assert read_enrolment_check(run / "result" / "check.json") is None
