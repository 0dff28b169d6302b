"""Write the list files of an embedding store: normal, test, triplet and distribution, and on
request enrolment models with their trials.

    python ./m_gen_list.py --embed_dir data/embeddings/voxceleb1 --filename vox1
    python ./m_gen_list.py --embed_dir exp/wespeaker/xvector.scp --filename wespeaker
    python ./m_gen_list.py --embed_dir data/embeddings/voxceleb1 --filename vox1 --lists enroll \
        --enroll_utts 3 5

writes <list_dir>/<NAME>_{normal,test,triplet,distribution}_list.txt; the third,
<NAME>_enroll<K>.spk2utt and <NAME>_enroll<K>_test_list.txt for each K. From a tree of `.npy` files
the paths are relative to its root (`<spk>/<category>/<file>.npy`); from a Kaldi `.scp` or a
packed `.store` they are its utterance keys as written there (speakers from `utt2spk` beside a
.scp, else each key's first component). The same seed gives the same files, byte for byte. Each
list kind (m_DataLoader.LIST_KINDS) knows how its lines are made.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from m_DataLoader import LIST_KINDS, Corpus, list_kind, read_trials
from m_utils import Option, Options, UserError, add_options, run_main, setup_logging, write_text_atomic
from stores.keys import key_category, key_speaker, store_key
from stores.kinds import kind_of

EMBED_DIR = "data/embeddings/voxceleb1"
FILENAME = "vox1"
LIST_DIR = "lists"
SEED = 10

OPTIONS: Options = {
    "embed_dir": Option(
        EMBED_DIR, str, "embedding store: a tree of .npy files, a Kaldi .scp or a packed .store"
    ),
    "filename": Option(FILENAME, str, "NAME of the list files"),
    "list_dir": Option(LIST_DIR, str, "folder of the list files"),
    "seed": Option(SEED, int, "seed of the random choices"),
    "lists": Option(
        tuple(LIST_KINDS),
        list,
        f"which lists to write ({', '.join(LIST_KINDS)}, or enroll: "
        "enrolment models and their trials, see --enroll_utts)",
    ),
    "enroll_utts": Option(
        ("3",),
        list,
        "--lists enroll: utterances K of each model, a pair of files per K; "
        "give every K in one call (the largest sets the test utterances of all)",
    ),
    "exclude_speakers_of": Option(
        None,
        list,
        "trial lists (official VoxCeleb1 ones, say) whose speakers are left out: lists of the "
        "held-out speakers (empty files where none is left)",
    ),
}
ENROLL = "enroll"  # the kind of --lists that writes enrolment models (not a LIST_KINDS list)
ENROLL_STREAM = 100  # the seed stream of the enrolment lists (LIST_KINDS use their index)

log = logging.getLogger("m_gen_list")


def corpus_of(paths: list[str], speaker_names: list[str]) -> Corpus:
    """The Corpus of list paths and their speakers, sorted by speaker, then as a tree's paths."""
    order = sorted(
        range(len(paths)), key=lambda i: (speaker_names[i], (store_key(paths[i]) + ".npy").split("/"))
    )
    speakers = sorted(set(speaker_names))
    index = {spk: i for i, spk in enumerate(speakers)}
    return Corpus(
        paths=[paths[i] for i in order],
        speaker=np.array([index[speaker_names[i]] for i in order], np.int64),
        category=[key_category(store_key(paths[i])) for i in order],
        speakers=speakers,
    )


def scan(embed_dir: Path) -> Corpus:
    """The utterances of a store (a tree, a Kaldi .scp, a packed store...), as its kind lists them."""
    paths, speakers = kind_of(embed_dir).scan(embed_dir)
    return corpus_of(paths, speakers)


def without_speakers_of(corpus: Corpus, trial_lists: list[str]) -> Corpus:
    """The corpus without the speakers the trial lists name (of either side of a trial)."""
    named = {key_speaker(store_key(path)) for trials in trial_lists for path in read_trials(trials)[3]}
    kept = [row for row, index in enumerate(corpus.speaker) if corpus.speakers[index] not in named]
    log.info(
        "%d of %d speakers left out: those of %s",
        len(set(corpus.speakers) & named),
        len(corpus.speakers),
        ", ".join(trial_lists),
    )
    return corpus_of(
        [corpus.paths[row] for row in kept], [corpus.speakers[corpus.speaker[row]] for row in kept]
    )


def make_lists(
    embed_dir: Path,
    name: str,
    list_dir: Path,
    seed: int,
    kinds: tuple[str, ...] = tuple(LIST_KINDS),
    enroll_utts: tuple[int, ...] = (3,),
    exclude_speakers_of: list[str] | None = None,
) -> dict[str, Path]:
    """Write the chosen lists; returns their paths (enrolment lists as `enroll<K>` and
    `enroll<K>_test`). Each list draws from its own seeded stream. Without the speakers of
    `exclude_speakers_of` (trial lists); where none is left, the lists are written empty."""
    chosen = [list_kind(kind) for kind in kinds if kind != ENROLL]
    corpus = scan(Path(embed_dir))
    if exclude_speakers_of:
        corpus = without_speakers_of(corpus, exclude_speakers_of)
    log.info("%s: %d utterances of %d speakers", embed_dir, len(corpus.paths), len(corpus.speakers))
    written = {}
    if not corpus.paths:
        for kind in chosen:
            written[kind.name] = list_dir / f"{name}_{kind.name}_list.txt"
            write_text_atomic(written[kind.name], "")
            log.warning("%s: no speaker left, written empty", written[kind.name])
        return written
    for kind in chosen:
        missing: Counter = Counter()
        rng = np.random.default_rng([seed, list(LIST_KINDS).index(kind.name)])
        lines = kind.lines(corpus, rng, missing)
        path = list_dir / f"{name}_{kind.name}_list.txt"
        write_text_atomic(path, "".join(line + "\n" for line in lines))
        written[kind.name] = path
        shortfall = ", ".join(f"{count} {what}" for what, count in missing.items() if count)
        log.info(
            "%s: %d lines%s",
            path,
            len(lines),
            f" (could not make {shortfall}: too few utterances or categories)" if shortfall else "",
        )
    if ENROLL in kinds:
        written |= write_enrolment(corpus, name, list_dir, seed, enroll_utts)
    return written


def write_enrolment(
    corpus: Corpus, name: str, list_dir: Path, seed: int, sizes: tuple[int, ...]
) -> dict[str, Path]:
    """Per K of `sizes`, <name>_enroll<K>.spk2utt and <name>_enroll<K>_test_list.txt (models
    `<spk>-enroll<K>`); every K has the same test utterances and trials."""
    if not sizes or min(sizes) < 1:
        raise UserError(f"--enroll_utts: each K must be at least 1, found {' '.join(map(str, sizes))}")
    rng = np.random.default_rng([seed, ENROLL_STREAM])
    pools, tests = enrolment_pools(corpus, max(sizes), rng)
    if not pools:
        raise UserError(
            f"{name}: no speaker has {max(sizes)} utterances in some of its categories "
            "(videos) and another category left to test on (--enroll_utts)"
        )
    trials = enrolment_trials(tests, rng)
    written = {}
    for size in sizes:
        model = {spk: f"{spk}-enroll{size}" for spk in pools}
        spk2utt = [" ".join([model[spk], *pool[:size]]) for spk, pool in pools.items()]
        lines = [f"{label} {model[spk]} {test}" for label, spk, test in trials]
        for suffix, text in ((".spk2utt", spk2utt), ("_test_list.txt", lines)):
            path = list_dir / f"{name}_enroll{size}{suffix}"
            write_text_atomic(path, "".join(line + "\n" for line in text))
            written[f"enroll{size}" + ("_test" if suffix.endswith(".txt") else "")] = path
        log.info(
            "%s: %d models of %d utterances, %d trials",
            list_dir / f"{name}_enroll{size}.spk2utt",
            len(pools),
            size,
            len(lines),
        )
    return written


def enrolment_pools(
    corpus: Corpus, largest: int, rng: np.random.Generator
) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Per speaker that can have one: its enrolment pool, `largest` utterances from as few
    categories (videos) as possible, in the order models take them (a model of K utterances is
    the first K, so from the fewest categories too), and its test utterances, those of the
    categories the pool does not touch. A speaker whose pool would touch all its categories has
    neither (said in the log)."""
    pools, tests, left_out = {}, {}, 0
    for index, spk in enumerate(corpus.speakers):
        lo, hi = corpus.span(index)
        by_category: dict[str, list[str]] = {}
        for row in range(lo, hi):
            by_category.setdefault(corpus.category[row], []).append(corpus.paths[row])
        names = list(by_category)
        shuffled = [names[k] for k in rng.permutation(len(names))]
        categories = sorted(shuffled, key=lambda category: -len(by_category[category]))
        pool: list[str] = []
        while categories and len(pool) < largest:
            files = by_category[categories.pop(0)]
            pool += [files[k] for k in rng.permutation(len(files))]
        if len(pool) < largest or not categories:
            left_out += 1
            continue
        pools[spk] = pool[:largest]
        tests[spk] = [path for category in categories for path in by_category[category]]
    if left_out:
        log.info(
            "enrolment: %d of %d speakers left out (no %d of their utterances leave one of their "
            "categories for tests)",
            left_out,
            len(corpus.speakers),
            largest,
        )
    return pools, tests


def enrolment_trials(tests: dict[str, list[str]], rng: np.random.Generator) -> list[tuple[int, str, str]]:
    """(label, speaker, test utterance) of every model's trials: each of its speaker's test
    utterances (1), then as many other speakers' test utterances drawn at random (0)."""
    every = [path for paths in tests.values() for path in paths]
    trials, lo = [], 0
    for spk, own in tests.items():
        hi = lo + len(own)
        others = len(every) - len(own)
        picks = rng.choice(others, size=min(len(own), others), replace=False)
        different = np.where(picks < lo, picks, picks + len(own))
        trials += [(1, spk, path) for path in own] + [(0, spk, every[k]) for k in different]
        lo = hi
    return trials


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_options(parser, OPTIONS)
    args = parser.parse_args(argv)
    setup_logging()
    make_lists(
        Path(args.embed_dir),
        args.filename,
        Path(args.list_dir),
        args.seed,
        tuple(args.lists),
        enrollment_sizes(args.enroll_utts),
        args.exclude_speakers_of,
    )


def enrollment_sizes(values: list[str]) -> tuple[int, ...]:
    """The K of --enroll_utts as integers; one that is not a whole number is a UserError."""
    try:
        return tuple(int(value) for value in values)
    except ValueError:
        raise UserError(f"--enroll_utts: expected whole numbers, found {' '.join(values)}") from None


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
