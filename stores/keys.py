"""Store keys: how a list's path or a Kaldi utterance id names an embedding in any store, the
speaker and category of a key, and the small Kaldi side files beside a store (utt2spk, utt2dur,
manifest.json), each read by one function here."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from m_utils import UserError, user_text_lines

# Audio files a list may name; the matching `.npy` is meant (m_gen_embs reads them all).
AUDIO_SUFFIXES = (".wav", ".flac", ".m4a", ".mp3", ".ogg", ".opus")


def store_key(path: str) -> str:
    """The key of a list's path or a Kaldi/WeSpeaker utterance id in any store: forward slashes,
    a trailing audio suffix or `.npy` removed (`id10270/x6uYqmx31kE/00001.wav` ->
    `id10270/x6uYqmx31kE/00001`)."""
    if "\\" in path:
        path = path.replace("\\", "/")
    while path.startswith("./"):
        path = path[2:]
    dot = path.rfind(".")
    if dot > path.rfind("/") and path[dot:].lower() in KEY_SUFFIXES:
        return path[:dot]
    return path


KEY_SUFFIXES = frozenset((*AUDIO_SUFFIXES, ".npy"))  # removed from a path to make its store key
_PLAIN_SUFFIXES = frozenset((".wav", ".npy"))


def store_keys(paths: Iterable[str]) -> list[str]:
    """store_key of many paths; the common `x/y/z.wav` or `.npy` without a call each."""
    return [
        path[:-4] if path[-4:] in _PLAIN_SUFFIXES and path[0] != "." and "\\" not in path else store_key(path)
        for path in paths
    ]


def line_naming(list_path: str | os.PathLike, rel: str) -> int | None:
    """The first line of a list file that names `rel` (for error messages), None if none does."""
    try:
        with open(list_path, errors="replace") as file:
            for lineno, line in enumerate(file, start=1):
                if rel in line.split():
                    return lineno
    except OSError:
        return None
    return None


def embedding_file(root: str | os.PathLike, rel: str) -> Path:
    """The `.npy` of a list entry; a `.wav`/`.flac` suffix in a list means the matching `.npy`."""
    path = Path(root) / rel
    if path.suffix.lower() in AUDIO_SUFFIXES:
        path = path.with_suffix(".npy")
    return path


def two_column_lines(path: Path, what: str, form: str) -> Iterator[tuple[int, str, str]]:
    """(line number, first, second) of each line of a Kaldi two-column file (utt2spk, utt2dur);
    blank lines skipped, any other width a UserError naming the file and line."""
    for lineno, line in enumerate(user_text_lines(path, what), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2:
            raise UserError(f"{path}:{lineno}: expected {form}, found {line.strip()!r}")
        yield lineno, parts[0], parts[1]


def read_utt2spk(path: Path) -> dict[str, str] | None:
    """utt2spk beside a .scp as {store key: speaker}; None when there is none."""
    if not path.is_file():
        return None
    lines = two_column_lines(path, "utt2spk file", "'<utt> <speaker>'")
    return {store_key(utt): spk for _, utt, spk in lines}


def read_utt2dur(path: Path) -> dict[str, float] | None:
    """Kaldi's utt2dur (`<utt> <seconds>` per line) as {utt: seconds}, the ids as written; None
    where there is none. A line without a finite number of seconds, 0 or more, is a UserError."""
    if not path.exists():
        return None
    form = "'<utt> <seconds>'"
    durations = {}
    for lineno, utt, text in two_column_lines(path, "utt2dur file", form):
        seconds = seconds_of(text)
        if seconds is None:
            raise UserError(f"{path}:{lineno}: expected {form}, found {utt + ' ' + text!r}")
        durations[utt] = seconds
    return durations


def seconds_of(text: str) -> float | None:
    """A duration field's value, None unless it is a finite number of seconds, 0 or more."""
    try:
        seconds = float(text)
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def read_manifest(path: Path) -> dict[str, Any] | None:
    """The manifest (a JSON object) at `path`, None where there is none; an unreadable one is a
    UserError naming the file (and the line of a JSON error)."""
    if not path.exists():
        return None
    try:
        manifest = json.loads("".join(user_text_lines(path, "manifest")))
    except json.JSONDecodeError as err:
        raise UserError(f"{path}:{err.lineno}: not valid JSON ({err})") from None
    if not isinstance(manifest, dict):
        raise UserError(f"{path}: a manifest is a JSON object")
    return manifest


def key_speaker(key: str, utt2spk: dict[str, str] | None = None) -> str:
    """The speaker of a store key: from utt2spk when given, else the key's first path component
    (a Kaldi id without folders, `spk-video-utt`, gives its part before the first `-`)."""
    if utt2spk is not None and key in utt2spk:
        return utt2spk[key]
    return key.split("/", 1)[0] if "/" in key else key.split("-", 1)[0]


def key_category(key: str) -> str:
    """The category (session, video) of a store key: its second path component; for a Kaldi id
    without folders, `spk-video-utt`, the part between the first and the last `-`."""
    parts = key.split("/")
    if len(parts) > 2:
        return parts[1]
    pieces = parts[-1].split("-")
    return "-".join(pieces[1:-1]) if len(pieces) > 2 else parts[-1]
