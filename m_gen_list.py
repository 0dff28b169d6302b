"""Write the list files of an embedding tree: normal, test, triplet and distribution.

    python ./m_gen_list.py --embed_dir data/embeddings/voxceleb1 --filename vox1

writes <list_dir>/<NAME>_{normal,test,triplet,distribution}_list.txt, paths relative to the
embedding root (`<spk>/<category>/<file>.npy`). The same seed gives the same files, byte for byte.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from m_utils import UserError, run_main, setup_logging, write_text_atomic

EMBED_DIR = "data/embeddings/voxceleb1"
FILENAME = "vox1"
LIST_DIR = "lists"
SEED = 10
TRIALS_PER_UTTERANCE = 4  # same-speaker and different-speaker trials, each

LIST_KINDS = ("normal", "test", "triplet", "distribution")
log = logging.getLogger("m_gen_list")


@dataclass
class Corpus:
    """Utterances of an embedding tree: rel path, speaker and category (middle folder)."""

    paths: list[str]
    speaker: np.ndarray   # (N,) speaker index into `speakers`
    category: list[str]
    speakers: list[str]

    def span(self, index: int) -> tuple[int, int]:
        """Files are sorted by speaker, so each speaker's utterances are one range [lo, hi)."""
        return (int(np.searchsorted(self.speaker, index, "left")),
                int(np.searchsorted(self.speaker, index, "right")))

    def of_speaker(self, index: int) -> np.ndarray:
        lo, hi = self.span(index)
        return np.arange(lo, hi)


def scan(embed_dir: Path) -> Corpus:
    """Every `<spk>/<category>/.../<file>.npy` below embed_dir, sorted (speaker files ignored)."""
    if not embed_dir.is_dir():
        raise UserError(f"{embed_dir}: embedding folder not found (m_gen_embs.py writes it)")
    files = sorted(p.relative_to(embed_dir) for p in embed_dir.glob("*/*/**/*.npy")
                   if not any(part.startswith(".") for part in p.relative_to(embed_dir).parts))
    if not files:
        raise UserError(f"{embed_dir}: no <speaker>/<category>/<file>.npy embeddings found")
    speakers = sorted({f.parts[0] for f in files})
    index = {spk: i for i, spk in enumerate(speakers)}
    return Corpus(paths=[f.as_posix() for f in files],
                  speaker=np.array([index[f.parts[0]] for f in files], np.int64),
                  category=[f.parts[1] for f in files], speakers=speakers)


def normal_lines(corpus: Corpus) -> list[str]:
    return [f"{corpus.speakers[s]} {path}" for s, path in zip(corpus.speaker, corpus.paths,
                                                             strict=True)]


def test_lines(corpus: Corpus, rng: np.random.Generator, missing: Counter) -> list[str]:
    """Per utterance, up to 4 same-speaker and 4 other-speaker trials, written 1, 0, 1, 0, ..."""
    lines = []
    n = len(corpus.paths)
    for i, path in enumerate(corpus.paths):
        lo, hi = corpus.span(corpus.speaker[i])
        same = lo + rng.choice(hi - lo - 1, size=min(TRIALS_PER_UTTERANCE, hi - lo - 1),
                               replace=False)
        same = np.where(same < i, same, same + 1)
        others = n - (hi - lo)
        picks = rng.choice(others, size=min(TRIALS_PER_UTTERANCE, others), replace=False)
        different = np.where(picks < lo, picks, picks + (hi - lo))
        missing["same-speaker trials"] += TRIALS_PER_UTTERANCE - len(same)
        missing["different-speaker trials"] += TRIALS_PER_UTTERANCE - len(different)
        for k in range(TRIALS_PER_UTTERANCE):
            if k < len(same):
                lines.append(f"1 {path} {corpus.paths[same[k]]}")
            if k < len(different):
                lines.append(f"0 {path} {corpus.paths[different[k]]}")
    return lines


def triplet_lines(corpus: Corpus, rng: np.random.Generator, missing: Counter) -> list[str]:
    """`spk path other_spk`, other_spk a random different speaker."""
    count = len(corpus.speakers)
    if count < 2:
        missing["triplets (a single speaker)"] += len(corpus.paths)
        return []
    shift = rng.integers(1, count, size=len(corpus.paths))
    other = (corpus.speaker + shift) % count
    return [f"{corpus.speakers[s]} {path} {corpus.speakers[o]}"
            for s, path, o in zip(corpus.speaker, corpus.paths, other, strict=True)]


def speaker_pairs(paths_by_category: dict[str, list[str]]) -> tuple[list, list]:
    """Same-category pairs (consecutive files of each category) and as many different-category
    pairs, each taking one remaining file of the category with the fewest remaining files and
    one of the category with the most, while two categories have files left."""
    same = [(files[k], files[k + 1]) for files in paths_by_category.values()
            for k in range(0, len(files) - 1, 2)]
    remaining = {cat: list(files) for cat, files in paths_by_category.items()}
    different = []
    while len(different) < len(same):
        left = [cat for cat in remaining if remaining[cat]]
        if len(left) < 2:
            break
        fewest = min(left, key=lambda cat: len(remaining[cat]))
        most = max((cat for cat in left if cat != fewest), key=lambda cat: len(remaining[cat]))
        different.append((remaining[fewest].pop(0), remaining[most].pop(0)))
    return same, different


def distribution_lines(corpus: Corpus, missing: Counter) -> list[str]:
    lines = []
    for s, spk in enumerate(corpus.speakers):
        by_category: dict[str, list[str]] = {}
        for i in corpus.of_speaker(s):
            by_category.setdefault(corpus.category[i], []).append(corpus.paths[i])
        same, different = speaker_pairs(by_category)
        missing["different-category pairs"] += len(same) - len(different)
        lines += [f"{spk} {a} {b} 1" for a, b in same]
        lines += [f"{spk} {a} {b} 0" for a, b in different]
    return lines


def make_lists(embed_dir: Path, name: str, list_dir: Path, seed: int,
               kinds: tuple[str, ...] = LIST_KINDS) -> dict[str, Path]:
    """Write the chosen lists; returns their paths. Each list draws from its own seeded stream."""
    corpus = scan(embed_dir)
    log.info("%s: %d utterances of %d speakers", embed_dir, len(corpus.paths), len(corpus.speakers))
    written = {}
    for kind in kinds:
        missing: Counter = Counter()
        rng = np.random.default_rng([seed, LIST_KINDS.index(kind)])
        if kind == "normal":
            lines = normal_lines(corpus)
        elif kind == "test":
            lines = test_lines(corpus, rng, missing)
        elif kind == "triplet":
            lines = triplet_lines(corpus, rng, missing)
        else:
            lines = distribution_lines(corpus, missing)
        path = list_dir / f"{name}_{kind}_list.txt"
        write_text_atomic(path, "".join(line + "\n" for line in lines))
        written[kind] = path
        shortfall = ", ".join(f"{count} {what}" for what, count in missing.items() if count)
        log.info("%s: %d lines%s", path, len(lines),
                 f" (could not make {shortfall}: too few utterances or categories)"
                 if shortfall else "")
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--embed_dir", default=EMBED_DIR, help="embedding root")
    parser.add_argument("--filename", default=FILENAME, help="NAME of the list files")
    parser.add_argument("--list_dir", default=LIST_DIR, help="folder of the list files")
    parser.add_argument("--seed", type=int, default=SEED, help="seed of the random choices")
    parser.add_argument("--lists", nargs="+", choices=LIST_KINDS, default=list(LIST_KINDS),
                        help="which lists to write")
    args = parser.parse_args(argv)
    setup_logging()
    make_lists(Path(args.embed_dir), args.filename, Path(args.list_dir), args.seed,
               tuple(args.lists))


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
