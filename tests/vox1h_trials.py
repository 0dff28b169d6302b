"""A synthetic trial list of VoxCeleb1-H's size (552,536 trials over 1,190 speakers), with
embeddings whose cosine scores look like a speaker model's, and a timing of the speaker
bootstrap and of the evaluation on it (`python tests/vox1h_trials.py`; figures in BENCHMARK.md).

The bench's `check_vox1h` stage can take the list from `vox1h_list` and the embeddings from
`vox1h_embeddings`."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scoring.bootstrap import bootstrap_eer  # noqa: E402
from scoring.evaluation import Settings, TrainingSet, TrialList, evaluate  # noqa: E402
from scoring.metrics import compute_eer, score_trials  # noqa: E402

VOX1H_TRIALS = 552_536
VOX1H_SPEAKERS = 1_190
PER_SPEAKER = 116  # utterances of each test speaker: 138,040 in all (the H list uses about 137,000)


def vox1h_list(
    seed: int = 0, trials: int = VOX1H_TRIALS, speakers: int = VOX1H_SPEAKERS, per_speaker: int = PER_SPEAKER
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(utterance_speaker, left, right, labels): `speakers` speakers with `per_speaker` utterances
    each (rows grouped by speaker); half the trials target (two different utterances of the left
    utterance's speaker), half non-target (an utterance of another speaker)."""
    rng = np.random.default_rng(seed)
    utterance_speaker = np.repeat(np.arange(speakers), per_speaker)
    left = rng.integers(len(utterance_speaker), size=trials)
    labels = rng.random(trials) < 0.5
    speaker, own = np.divmod(left, per_speaker)
    other = (speaker + rng.integers(1, speakers, trials)) % speakers
    same = speaker * per_speaker + (own + rng.integers(1, per_speaker, trials)) % per_speaker
    right = np.where(labels, same, other * per_speaker + rng.integers(per_speaker, size=trials))
    return utterance_speaker, left, right, labels


def vox1h_embeddings(utterance_speaker: np.ndarray, dim: int = 256, seed: int = 0) -> np.ndarray:
    """float32 (utterances, dim) embeddings: a centre per speaker plus noise whose level varies by
    utterance, so that cosine scoring gives an EER of a few per cent with a tail of hard targets."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((utterance_speaker.max() + 1, dim), dtype=np.float32)
    noise = rng.lognormal(0.3, 0.35, len(utterance_speaker)).astype(np.float32)[:, None]
    embeddings = rng.standard_normal((len(utterance_speaker), dim), dtype=np.float32)
    embeddings *= noise
    embeddings += centres[utterance_speaker]
    return embeddings


def best_seconds(run: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def enhanced(table: np.ndarray) -> np.ndarray:
    """A second system to pair with the embeddings as they are: a fixed change of every vector."""
    return table + 0.3 * np.sign(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timings of each case (the best is shown)")
    parser.add_argument(
        "--backends",
        nargs="+",
        default=["none"],
        help="back-ends of the evaluation timed (fitted on 5,994 speakers x 10 utterances)",
    )
    args = parser.parse_args()
    utterance_speaker, left, right, labels = vox1h_list()
    embeddings = vox1h_embeddings(utterance_speaker)
    scores = [score_trials(table, left, right, cosine=True) for table in (embeddings, enhanced(embeddings))]
    speakers = utterance_speaker[left]
    print(
        f"{len(labels):,} trials, {len(np.unique(speakers)):,} speakers; EER original "
        f"{compute_eer(scores[0], labels)[0]:.4f}, enhanced {compute_eer(scores[1], labels)[0]:.4f}"
    )
    for resamples in (1, 1000):
        one = best_seconds(partial(bootstrap_eer, scores[0], labels, speakers, resamples), args.repeats)
        paired = best_seconds(partial(bootstrap_eer, scores, labels, speakers, resamples), args.repeats)
        print(
            f"bootstrap_eer, {resamples} resamples: one system {one:.2f} s, "
            f"two systems (paired) {paired:.2f} s"
        )
    trials = TrialList("vox1h", "vox1h.txt", labels, left, right, [], embeddings, speakers)
    systems = {"original": np.asarray, "enhanced": enhanced}
    training_speakers = np.repeat(np.arange(5_994), 10)
    train = TrainingSet(vox1h_embeddings(training_speakers, seed=1), training_speakers)
    for resamples in (1, 1000):
        settings = Settings(args.backends, cosine=True, resamples=resamples)
        seconds = best_seconds(partial(evaluate, [trials], systems, settings, train), args.repeats)
        print(
            f"evaluate (two systems, back-ends {' '.join(settings.names())}), {resamples} resamples: "
            f"{seconds:.2f} s"
        )


if __name__ == "__main__":
    main()
