"""Write the list files of an embedding store: normal, test, triplet and distribution.

    python ./m_gen_list.py --embed_dir data/embeddings/voxceleb1 --filename vox1
    python ./m_gen_list.py --embed_dir exp/wespeaker/xvector.scp --filename wespeaker

writes <list_dir>/<NAME>_{normal,test,triplet,distribution}_list.txt. From a tree of `.npy` files
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

from m_DataLoader import LIST_KINDS, Corpus, list_kind
from m_utils import Option, Options, UserError, add_options, run_main, setup_logging, write_text_atomic
from stores.kaldi import KaldiSource
from stores.keys import key_category, key_speaker, store_key
from stores.open import open_store
from stores.stamps import STORE_SUFFIX, folder_files, scp_entries, speaker_folders

EMBED_DIR = "data/embeddings/voxceleb1"
FILENAME = "vox1"
LIST_DIR = "lists"
SEED = 10

OPTIONS: Options = {
    "embed_dir": Option(
        EMBED_DIR, str, "embedding store: a tree of .npy files, a Kaldi .scp or a packed .store"),
    "filename": Option(FILENAME, str, "NAME of the list files"),
    "list_dir": Option(LIST_DIR, str, "folder of the list files"),
    "seed": Option(SEED, int, "seed of the random choices"),
    "lists": Option(tuple(LIST_KINDS), list, f"which lists to write ({', '.join(LIST_KINDS)})"),
}

log = logging.getLogger("m_gen_list")


def tree_paths(embed_dir: Path) -> list[str]:
    """Every `<spk>/<category>/.../<file>.npy` below embed_dir (speaker files, hidden names and
    packed stores ignored), relative to it."""
    paths = []
    for folder in speaker_folders(embed_dir):
        paths += [rel for rel in folder_files(folder) if rel.count("/") >= 2]
    if not paths:
        raise UserError(f"{embed_dir}: no <speaker>/<category>/<file>.npy embeddings found")
    return paths


def corpus_of(paths: list[str], speaker_names: list[str]) -> Corpus:
    """The Corpus of list paths and their speakers, sorted by speaker, then as a tree's paths."""
    order = sorted(range(len(paths)),
                   key=lambda i: (speaker_names[i], (store_key(paths[i]) + ".npy").split("/")))
    speakers = sorted(set(speaker_names))
    index = {spk: i for i, spk in enumerate(speakers)}
    return Corpus(paths=[paths[i] for i in order],
                  speaker=np.array([index[speaker_names[i]] for i in order], np.int64),
                  category=[key_category(store_key(paths[i])) for i in order], speakers=speakers)


def scan(embed_dir: Path) -> Corpus:
    """The utterances of a tree, a Kaldi .scp or a packed store."""
    if embed_dir.suffix == ".scp":
        source = KaldiSource(embed_dir, scp_entries(embed_dir))
        paths = [utt for utt, _ in source.entries]
        return corpus_of(paths, source.speaker_of(paths))
    if embed_dir.suffix == STORE_SUFFIX:
        store = open_store(embed_dir)
        of_rows = store.speaker_of_rows()
        return corpus_of(list(store.keys), [store.speakers[s] for s in of_rows])
    if not embed_dir.is_dir():
        raise UserError(f"{embed_dir}: embedding folder not found (m_gen_embs.py writes it)")
    paths = tree_paths(embed_dir)
    return corpus_of(paths, [key_speaker(path) for path in paths])


def make_lists(embed_dir: Path, name: str, list_dir: Path, seed: int,
               kinds: tuple[str, ...] = tuple(LIST_KINDS)) -> dict[str, Path]:
    """Write the chosen lists; returns their paths. Each list draws from its own seeded stream."""
    chosen = [list_kind(kind) for kind in kinds]
    corpus = scan(Path(embed_dir))
    log.info("%s: %d utterances of %d speakers", embed_dir, len(corpus.paths), len(corpus.speakers))
    written = {}
    for kind in chosen:
        missing: Counter = Counter()
        rng = np.random.default_rng([seed, list(LIST_KINDS).index(kind.name)])
        lines = kind.lines(corpus, rng, missing)
        path = list_dir / f"{name}_{kind.name}_list.txt"
        write_text_atomic(path, "".join(line + "\n" for line in lines))
        written[kind.name] = path
        shortfall = ", ".join(f"{count} {what}" for what, count in missing.items() if count)
        log.info("%s: %d lines%s", path, len(lines),
                 f" (could not make {shortfall}: too few utterances or categories)"
                 if shortfall else "")
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_options(parser, OPTIONS)
    args = parser.parse_args(argv)
    setup_logging()
    make_lists(Path(args.embed_dir), args.filename, Path(args.list_dir), args.seed,
               tuple(args.lists))


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
