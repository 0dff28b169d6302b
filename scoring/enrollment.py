"""Enrolment models: a trial list whose left side names models instead of files, each model's
utterances given by a Kaldi spk2utt-style file (`<model> <utt> [<utt> ...]`, the utterances named
as in any list, by the same key rule). Read here into the values a TrialSet holds, plus the
models (scoring.evaluation.Models): the table's rows are the test files, then the models.

A model's embedding is the embedding type's (B or C) combination of its utterances' embeddings,
made per system when scoring (of the enhanced outputs for the enhanced system)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

from m_DataLoader import TrialSet, read_trials
from m_utils import UserError, user_text_lines
from scoring.evaluation import Models, System, trial_table
from stores.keys import line_naming
from stores.open import open_embeddings

# Per trial list (m_trainer.LISTS' names): the option of its enrolment list and of the store of
# the enrolment utterances (default: the trial list's store).
ENROLL_OPTIONS = {
    "test": ("enroll_list", "enroll_path"),
    "libri": ("enroll_list_libri", "enroll_path_libri"),
    "calib": ("calib_enroll_list", "calib_enroll_path"),
}
SPK2UTT_FORM = "'<model> <utt> [<utt> ...]'"


def read_spk2utt(path: str | os.PathLike) -> dict[str, list[str]]:
    """{model: its utterances} of an spk2utt-style file, in the file's order; a model without an
    utterance, or named twice, is a UserError naming the file and line."""
    models: dict[str, list[str]] = {}
    for lineno, line in enumerate(user_text_lines(path, "enrolment list"), start=1):
        parts = line.split()
        if not parts:
            continue
        model, *utterances = parts
        if not utterances:
            raise UserError(f"{path}:{lineno}: model {model} has no utterance (expected {SPK2UTT_FORM})")
        if model in models:
            raise UserError(f"{path}:{lineno}: model {model} is named a second time")
        models[model] = utterances
    if not models:
        raise UserError(f"{path}: the enrolment list names no model (expected {SPK2UTT_FORM})")
    return models


class ModelTrials:
    """A trial list (either format) of `model test` trials: what m_trainer takes of a TrialSet
    (labels, left, right, files, embeddings, durations, norms, manifest, speaker_of_trials) with
    `models`. Rows 0..T-1 of the table are the test files (`embeddings`, from `root`), rows T..
    the models (`files` ends with their names; their utterances from `enroll_root`). A model's
    duration is the sum of its utterances', its norm their mean; its speaker its first
    utterance's."""

    def __init__(
        self,
        list_path: str | os.PathLike,
        root: str | os.PathLike,
        enroll_list: str | os.PathLike,
        enroll_root: str | os.PathLike,
        embedding_type: str,
        dim: int | None,
        threads: int = 8,
    ):
        self.list_path = Path(list_path)
        self.labels, left, right, names = read_trials(list_path)
        if len(np.unique(self.labels)) < 2:
            raise UserError(
                f"{self.list_path}: a trial list needs both target (1) and "
                "non-target (0) trials to compute an EER"
            )
        spk2utt = read_spk2utt(enroll_list)
        model_rows, test_rows = np.unique(left), np.unique(right)
        model_names = [names[row] for row in model_rows]
        for name in model_names:
            if name not in spk2utt:
                line = line_naming(list_path, name)
                raise UserError(
                    f"{list_path}:{line}: {name} is not a model of the enrolment list {enroll_list}"
                )
        test_files = [names[row] for row in test_rows]
        self.left = len(test_files) + np.searchsorted(model_rows, left)
        self.right = np.searchsorted(test_rows, right)
        self.files = test_files + model_names

        store = open_embeddings(root)
        tests = store.utterances(test_files, dim, threads, desc="loading trials", source=list_path)
        self.embeddings = np.asarray(tests.matrix())
        self.manifest, self.source = store.manifest, str(store.path)
        enroll_store = store if Path(enroll_root) == Path(root) else open_embeddings(enroll_root)
        utterances = [utt for name in model_names for utt in spk2utt[name]]
        counts = np.array([len(spk2utt[name]) for name in model_names])
        model_of = np.repeat(np.arange(len(model_names)), counts)
        enrolled = enroll_store.utterances(
            utterances, dim, threads, desc="loading enrolment", source=enroll_list
        )
        self.models = Models(np.asarray(enrolled.matrix()), model_of, embedding_type)
        self.model_speakers = enroll_store.speaker_of([spk2utt[name][0] for name in model_names])
        self.durations = _with_models(
            store.durations(test_files), enroll_store.durations(utterances), model_of, counts, total=True
        )
        self.norms = _with_models(tests.norms, enrolled.norms, model_of, counts, total=False)

    def __len__(self) -> int:
        return len(self.labels)

    def speaker_of_trials(self) -> np.ndarray:
        """(trials,) index of the speaker of each trial's model."""
        models = self.left - len(self.embeddings)
        return np.unique(np.array(self.model_speakers), return_inverse=True)[1][models]


def models_of(trials: TrialSet | ModelTrials) -> Models | None:
    """The models of a trial set: those of a ModelTrials, None for a TrialSet (files only)."""
    return trials.models if isinstance(trials, ModelTrials) else None


def trials_table(system: System, trials: TrialSet | ModelTrials) -> np.ndarray:
    """The rows a TrialSet's or ModelTrials' `left` and `right` index, through `system`."""
    return trial_table(system, trials.embeddings, models_of(trials))


def _with_models(
    tests: np.ndarray | None,
    utterances: np.ndarray | None,
    model_of: np.ndarray,
    counts: np.ndarray,
    total: bool,
) -> np.ndarray | None:
    """A per-row value of the table: the test files', then per model the sum (`total`) or mean of
    its utterances'; None when either side's is unknown."""
    if tests is None or utterances is None:
        return None
    sums = np.bincount(model_of, weights=np.asarray(utterances, np.float64), minlength=len(counts))
    per_model = sums if total else sums / counts
    return np.concatenate([np.asarray(tests, np.float64), per_model]).astype(np.asarray(tests).dtype)


def enrolled_trials(args: argparse.Namespace, name: str, list_path: str, root: str) -> ModelTrials | None:
    """The trial list `name` (with its `list_path` and store `root`) over the models of its
    enrolment list option; None where that option is not set."""
    if name not in ENROLL_OPTIONS:
        return None
    list_option, path_option = ENROLL_OPTIONS[name]
    if not getattr(args, list_option, None):
        return None
    enroll_root = getattr(args, path_option) or root
    return ModelTrials(
        list_path,
        root,
        getattr(args, list_option),
        enroll_root,
        args.multiple_embedding_flag,
        args.nOut,
        args.nDataLoaderThread,
    )
