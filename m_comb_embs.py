"""Average each speaker's utterance embeddings into multi-utterance (speaker) embeddings.

For every speaker folder of EMBED_DIR it writes, next to the folder:
  <spk>.npy        type B, avg-norm-avg: crop means L2-normalised, then averaged over utterances
  <spk>_type2.npy  type C, avg-avg-norm: crop means averaged over utterances, then L2-normalised

    python ./m_comb_embs.py --embed_dir data/embeddings/voxceleb2
"""

from __future__ import annotations

import argparse
import logging
import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path

import numpy as np
from tqdm import tqdm

from m_DataLoader import EMBEDDING_TYPES, combine_speaker, crop_mean, read_embedding
from m_utils import UserError, run_lock, run_main, save_npy_atomic, setup_logging

EMBED_DIR = "data/embeddings/voxceleb2"

log = logging.getLogger("m_comb_embs")


def speaker_folders(embed_dir: Path) -> list[Path]:
    if not embed_dir.is_dir():
        raise UserError(f"{embed_dir}: embedding folder not found (m_gen_embs.py writes it)")
    folders = sorted(p for p in embed_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise UserError(f"{embed_dir}: holds no speaker folders")
    return folders


def utterance_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.npy") if not p.name.startswith("."))


def crop_means(files: list[Path], pool: ThreadPoolExecutor) -> np.ndarray:
    """(utterances, D) float64: each file's mean over its crops, read on `pool`'s threads."""
    rows = list(pool.map(lambda path: crop_mean(read_embedding(path)), files))
    dims = {row.shape[0] for row in rows}
    if len(dims) > 1:
        raise UserError(f"{files[0].parent.parent}: utterance embeddings of different "
                        f"dimensions {sorted(dims)}")
    return np.stack(rows)


def speaker_embeddings(means: np.ndarray) -> dict[str, np.ndarray]:
    """Every embedding type's (B, C) speaker embedding from a speaker's crop means."""
    return {name: combine_speaker(means, name) for name in EMBEDDING_TYPES}


def combine(embed_dir: Path, threads: int = 8) -> int:
    """Write the B and C files of every speaker folder; returns the number of speakers written."""
    written = 0
    with ThreadPoolExecutor(threads) as pool:
        for folder in tqdm(speaker_folders(embed_dir), desc="speakers", unit="spk"):
            files = utterance_files(folder)
            if not files:
                log.warning("%s: no utterance embeddings, skipped", folder)
                continue
            for name, embedding in speaker_embeddings(crop_means(files, pool)).items():
                save_npy_atomic(embed_dir / EMBEDDING_TYPES[name].speaker_file.format(folder.name),
                                embedding)
            written += 1
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--embed_dir", default=EMBED_DIR, help="single-utterance embedding root")
    parser.add_argument("--threads", type=int, default=8, help="threads reading embedding files")
    args = parser.parse_args(argv)
    setup_logging()
    embed_dir = Path(args.embed_dir)
    # Not beside an m_gen_embs.py (or another m_comb_embs.py) writing the same tree; a missing
    # folder has nothing to guard, and combine reports it.
    with run_lock(embed_dir, "embed_dir") if embed_dir.is_dir() else nullcontext():
        count = combine(embed_dir, max(1, args.threads))
    log.info("wrote type B and C embeddings of %d speakers in %s", count, args.embed_dir)


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
