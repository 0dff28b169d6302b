"""A Kaldi `.scp` with its `.ark` files (WeSpeaker, 3D-Speaker) as an embedding store: reading it
(through its packed store while that is fresh), where its packed store lies and what m_gen_list
lists."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from m_utils import UserError
from stores.arrays import check_embedding, combine_speaker, crop_means, reduce_means
from stores.fresh import fresh_store
from stores.keys import key_speaker, line_naming, read_utt2spk, store_key
from stores.source import EmbeddingSource, Utterances
from stores.stamps import STORE_SUFFIX, ark_of, content_hash, file_hash, scp_entries, scp_sources


class KaldiSource(EmbeddingSource):
    """A Kaldi `.scp` with its `.ark` files (read with kaldiio); speakers from `utt2spk` beside it
    or each key's first path component. Speaker embeddings are combined from the utterances, whose
    crop means are kept once read (N x D float64): a list's embeddings and then its speakers'
    read the arks once. At scale, pack the .scp (m_comb_embs.py) and read the store instead."""

    def __init__(self, scp: Path, entries: list[tuple[str, str]] | None = None):
        self.path = scp
        self.side_dir = scp.parent
        self.entries = entries if entries is not None else scp_entries(scp)
        self.utt2spk = read_utt2spk(scp.parent / "utt2spk")
        self.key_of = {store_key(utt): utt for utt, _ in self.entries}
        self.check_utt2spk()
        self.location = dict(self.entries)
        self.read_means: dict[str, np.ndarray] = {}

    def check_utt2spk(self) -> None:
        """A utt2spk beside the .scp gives the speaker of every utterance it lists, else a UserError
        naming both files, the first utterance without one and its line."""
        if self.utt2spk is None:
            return
        missing = [utt for key, utt in self.key_of.items() if key not in self.utt2spk]
        if missing:
            line = line_naming(self.path, missing[0])
            more = f" (and {len(missing) - 1} more of its utterances)" if len(missing) > 1 else ""
            raise UserError(
                f"{self.side_dir / 'utt2spk'}: no speaker for utterance {missing[0]} of "
                f"{self.path}{f':{line}' if line else ''}{more}"
            )

    def read(self, utt: str, dim: int | None = None) -> np.ndarray:
        import kaldiio

        try:
            array = np.asarray(kaldiio.load_mat(self.location[utt]))
        except Exception as err:  # kaldiio raises many kinds of errors on a bad ark
            raise UserError(f"{self.path}: cannot read {utt} from {self.location[utt]} ({err})") from None
        return check_embedding(array, f"{self.path} ({utt})", dim)

    def means(self, utts: Sequence[str], dim: int | None = None) -> np.ndarray:
        """(len(utts), D) float64 crop means, each utterance read from its ark once."""
        unread = [utt for utt in dict.fromkeys(utts) if utt not in self.read_means]
        if unread:
            self.read_means.update(
                zip(unread, crop_means([self.read(utt, dim) for utt in unread]), strict=True)
            )
        return np.stack([self.read_means[utt] for utt in utts])

    def utterances(
        self,
        rels: Sequence[str],
        dim: int | None = None,
        threads: int = 8,
        desc: str = "loading embeddings",
        show_progress: bool = True,
        source: str | os.PathLike = "the list",
    ) -> Utterances:
        utts = []
        for rel in rels:
            utt = self.key_of.get(store_key(rel))
            if utt is None:
                raise self.missing_key(rel, source)
            utts.append(utt)
        matrix, norms = reduce_means(self.means(utts, dim), [f"{self.path} ({u})" for u in utts])
        return Utterances(matrix, np.arange(len(utts)), norms)

    def speaker_of(self, rels: Sequence[str]) -> list[str]:
        return [key_speaker(store_key(rel), self.utt2spk) for rel in rels]

    def speaker_embeddings(
        self, speakers: Sequence[str], embedding_type: str, dim: int | None = None
    ) -> np.ndarray:
        by_speaker: dict[str, list[str]] = {}
        for key, utt in self.key_of.items():
            by_speaker.setdefault(key_speaker(key, self.utt2spk), []).append(utt)
        rows = []
        for spk in speakers:
            if spk not in by_speaker:
                raise UserError(f"{self.path}: no utterance of speaker {spk}")
            rows.append(combine_speaker(self.means(by_speaker[spk], dim), embedding_type))
        return np.stack(rows)


def scp_store_path(scp: Path) -> Path:
    """Where m_comb_embs.py writes the packed store of a .scp: `<stem>.store` beside it."""
    return scp.with_name(scp.stem + STORE_SUFFIX)


def scp_hash_of(scp: Path, entries: Sequence[tuple[str, str]]) -> Callable[[str], int]:
    """How packing hashed a .scp's source file: an ark by the float64 crop means of its
    utterances in the .scp's order, the .scp and its side files by their bytes."""
    utts_of: dict[str, list[str]] = {}
    for utt, location in entries:
        utts_of.setdefault(ark_of(location), []).append(utt)
    reader: list[KaldiSource] = []

    def hash_of(name: str) -> int:
        if name not in utts_of:
            return file_hash(scp if name == scp.name else scp.parent / name)
        if not reader:
            reader.append(KaldiSource(scp, list(entries)))
        return content_hash(reader[0].means(utts_of[name]))

    return hash_of


def open_scp(scp: Path) -> EmbeddingSource:
    """A Kaldi .scp: its packed store while that is fresh, else its arks."""
    entries = scp_entries(scp)
    packed, _ = fresh_store(scp_store_path(scp), lambda: scp_sources(scp, entries), scp_hash_of(scp, entries))
    return packed if packed is not None else KaldiSource(scp, entries)


def scp_names(scp: Path) -> tuple[list[str], list[str]]:
    """The utterance ids of a .scp as it writes them and their speakers (what m_gen_list lists)."""
    source = KaldiSource(scp)
    names = [utt for utt, _ in source.entries]
    return names, source.speaker_of(names)
