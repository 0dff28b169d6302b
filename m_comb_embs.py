"""Average each speaker's utterance embeddings into multi-utterance (speaker) embeddings, and pack
the store so that later runs start in seconds.

For every speaker folder of EMBED_DIR it writes, next to the folder:
  <spk>.npy        type B, avg-norm-avg: crop means L2-normalised, then averaged over utterances
  <spk>_type2.npy  type C, avg-avg-norm: crop means averaged over utterances, then L2-normalised
and the packed store of the tree, <embed_dir>/embeddings.store/ (one memory-mapped matrix of the
single-utterance embeddings, their index, norms, the B and C speaker embeddings, utt2dur and
manifest.json when the tree has them). Given a Kaldi .scp (WeSpeaker's xvector.scp), it writes
<dir>/<scp stem>.store/ beside it, holding the speaker embeddings too. Every later run given the
tree or the .scp reads the packed store instead of the files, while the store is fresh (no file
changed, added or removed since, each file checked by its size, mtime and ctime and, where only
a time changed, by a hash of its content; else the run says so and reads the files). A run that
reads a tree's files combines its speakers' B and C from them in memory, the same values as
these files hold while they are new; the `<spk>.npy` files are for other tools and for reading.

    python ./m_comb_embs.py --embed_dir data/embeddings/voxceleb2
    python ./m_comb_embs.py --embed_dir exp/wespeaker/embeddings/xvector.scp
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from contextlib import nullcontext
from pathlib import Path

from m_utils import (
    Option,
    Options,
    add_options,
    check_options,
    clear_leftovers,
    run_lock,
    run_main,
    setup_logging,
)
from stores.kinds import kind_of, not_packed, store_path_of
from stores.packed import STORE_DTYPES

EMBED_DIR = "data/embeddings/voxceleb2"
THREADS = 4  # reader threads: more help a cold or network disk, fewer a warm page cache
STORE_DTYPE = "float32"

OPTIONS: Options = {
    "embed_dir": Option(EMBED_DIR, str, "single-utterance embeddings: a tree of .npy files or a Kaldi .scp"),
    "threads": Option(THREADS, int, "threads reading embedding files"),
    "pack": Option(True, bool, "also write the packed store (always for a .scp)"),
    "store_dtype": Option(STORE_DTYPE, str, "dtype of the packed store's matrix", choices=STORE_DTYPES),
}

log = logging.getLogger("m_comb_embs")


def combine(embed_dir: Path, threads: int = THREADS, pack: bool = False, dtype: str = STORE_DTYPE) -> int:
    """Write the B and C files of every speaker folder (and, with `pack`, the packed store of the
    tree); a .scp is packed with its speaker embeddings: as its kind packs (stores.kinds). Returns
    the number of speakers."""
    embed_dir = Path(embed_dir)
    kind = kind_of(embed_dir)
    if kind.pack is None:
        raise not_packed(embed_dir, kind)
    return kind.pack(embed_dir, dtype, threads, pack)


def written_names(embed_dir: Path) -> str:
    """The pattern of the names combine writes beside a tree's speaker folders (B and C files, the
    store) or beside a .scp (its store): their temporaries are a killed run's leftovers."""
    store = re.escape(store_path_of(embed_dir).name)
    return "|".join(filter(None, [store, kind_of(embed_dir).pack_names]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_options(parser, OPTIONS)
    args = parser.parse_args(argv)
    check_options(args, OPTIONS)
    setup_logging()
    embed_dir = Path(args.embed_dir)
    # Not beside an m_gen_embs.py (or another m_comb_embs.py) writing the same tree; a missing
    # folder has nothing to guard, and combine reports it.
    folder = store_path_of(embed_dir).parent
    with run_lock(folder, "embed_dir") if folder.is_dir() else nullcontext():
        clear_leftovers([folder], written_names(embed_dir), folder)
        if args.pack and up_to_date(embed_dir, args.store_dtype):
            log.info("%s: up to date (no file changed since it was packed): nothing written", embed_dir)
            return
        count = combine(embed_dir, max(1, args.threads), args.pack, args.store_dtype)
    log.info("wrote type B and C embeddings of %d speakers for %s", count, args.embed_dir)


def up_to_date(embed_dir: Path, dtype: str) -> bool:
    """A tree whose packed store (of `dtype`) is fresh, every file it was packed from unchanged,
    and whose speakers all have their B and C files: a run would write what is there."""
    from stores.arrays import EMBEDDING_TYPES
    from stores.open import open_embeddings
    from stores.packed import PackedStore

    if embed_dir.suffix == ".scp" or not embed_dir.is_dir():
        return False
    found = open_embeddings(embed_dir)
    if not isinstance(found, PackedStore) or found.header.get("dtype") != dtype:
        return False
    files = (
        EMBEDDING_TYPES[name].speaker_file.format(spk) for spk in found.speakers for name in EMBEDDING_TYPES
    )
    return all((embed_dir / name).is_file() for name in files)


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
