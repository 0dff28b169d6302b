"""The results of trial lists in one call (`evaluate`): the back-ends fitted per system on the
training embeddings (or, like qmf, on calib_list's trials), calibrated on calib_list, every trial
list scored by every (system, back-end), with bootstrap intervals and the records of it all.

Everything arrives as plain values (TrialList, TrainingSet): the data loader stays outside."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]

from scoring.backends import Backend, Quality, TrainingRows, make_backend, needs_training_embeddings
from scoring.calibration import Calibration
from scoring.report import (
    CalibrationResult,
    Key,
    ListSource,
    Record,
    Sources,
    decision_records,
    list_records,
)
from stores.arrays import combine_speaker

log = logging.getLogger("scoring")

# A system: how it maps a table of embeddings (original: as they are; enhanced: through the model).
# Under DDP every rank calls it (enhancing is shared out); the main rank alone scores.
System = Callable[[np.ndarray], np.ndarray]


@dataclass
class Models:
    """Enrolment models as plain values: model m is the embedding of `embedding_type` (B or C)
    over the rows of `embeddings` (single-utterance embeddings) whose `model_of` is m."""

    embeddings: np.ndarray
    model_of: np.ndarray
    embedding_type: str

    def pool(self, table: np.ndarray) -> np.ndarray:
        """(models, D) float32: each model's embedding over its rows of `table` (`embeddings`
        through a system)."""
        order = np.argsort(self.model_of, kind="stable")
        ends = np.cumsum(np.bincount(self.model_of))[:-1]
        return np.stack(
            [combine_speaker(rows, self.embedding_type) for rows in np.split(np.asarray(table)[order], ends)]
        )


@dataclass
class TrialList:
    """One trial list as plain values: `left`/`right` index rows of its table (one per name of
    `files`), `speakers` is each trial's speaker (for the bootstrap). The table is `embeddings`
    (one row per file); with `models`, the models' rows follow (their names end `files`)."""

    name: str
    path: str
    labels: np.ndarray
    left: np.ndarray
    right: np.ndarray
    files: list[str]
    embeddings: np.ndarray
    speakers: np.ndarray
    quality: Quality = field(default_factory=Quality)
    embedding_root: str = ""
    manifest: dict | None = None
    models: Models | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def table(self, system: System) -> np.ndarray:
        return trial_table(system, self.embeddings, self.models)

    def source(self) -> ListSource:
        return ListSource(self.path, len(self), self.embedding_root, self.manifest)


def trial_table(system: System, embeddings: np.ndarray, models: Models | None) -> np.ndarray:
    """The rows a trial list's `left` and `right` index, through `system`: the files' embeddings,
    then each model's embedding over its utterances' embeddings through the system."""
    table = system(embeddings)
    if models is None:
        return table
    return np.concatenate([table, models.pool(system(models.embeddings))])


@dataclass
class TrainingSet:
    """Training embeddings (one row per utterance) with each row's speaker, for the back-ends."""

    embeddings: np.ndarray
    speakers: np.ndarray
    path: str = ""
    embedding_root: str = ""
    manifest: dict | None = None

    def source(self) -> ListSource:
        return ListSource(self.path, len(self.speakers), self.embedding_root, self.manifest)


@dataclass
class Settings:
    """How to score: the back-ends (`none` is always scored), the options their constructors take
    by name, the scoring of the embedding type, and the bootstrap."""

    backends: Sequence[str]
    options: Mapping[str, Any] = field(default_factory=dict)
    cosine: bool = False
    resamples: int = 1000
    seed: int = 0

    def names(self) -> list[str]:
        return ["none", *(name for name in dict.fromkeys(self.backends) if name != "none")]


@dataclass
class ListResult:
    trials: TrialList
    scores: dict[Key, np.ndarray]


@dataclass
class Results:
    """Per trial list its scores by (system, back-end), and the records of everything."""

    lists: dict[str, ListResult]
    records: list[Record]


def needs_training(backends: Sequence[str]) -> bool:
    """Whether any of these back-ends (or a step of a chain) is fitted on training embeddings."""
    return needs_training_embeddings(backends)


def evaluate(
    lists: Sequence[TrialList],
    systems: Mapping[str, System],
    settings: Settings,
    train: TrainingSet | None = None,
    calib: TrialList | None = None,
    model: dict | None = None,
    is_main: bool = True,
) -> Results | None:
    """The results of `lists` for every system and back-end; None off the main rank. Without
    `train` the back-ends fitted on training embeddings are skipped, without `calib` (or its
    durations) qmf, each with a notice; `model` describes the model in the records' Sources."""
    tables = {
        (system, name): table(apply)
        for system, apply in systems.items()
        for name, table in _named(train, calib, lists)
    }
    if not is_main:
        return None
    # numpy's BLAS (OpenBLAS) on one thread: here it does PLDA's products and small ones (D x D,
    # the bootstrap's blocks) between torch's operations, whose OpenMP threads spin on the cores
    # for a while after each; two BLAS threads competing with them made a 256 x 256 eigh take 10x
    # its CPU time, and the large products took more CPU time on two threads than on one.
    with threadpool_limits(1, user_api="blas"):
        return _results(lists, systems, settings, tables, train, calib, model)


def _results(
    lists: Sequence[TrialList],
    systems: Mapping[str, System],
    settings: Settings,
    tables: Mapping[Key, np.ndarray],
    train: TrainingSet | None,
    calib: TrialList | None,
    model: dict | None,
) -> Results:
    """evaluate's results from the tables of every system."""
    backends = _Fitter(settings, tables, train, calib).fit(systems)
    calibrations = (
        {}
        if calib is None
        else {
            key: Calibration.fit(scores, calib.labels)
            for key, scores in _scores(backends, tables, calib, set()).items()
        }
    )
    results: dict[str, ListResult] = {}
    records: list[Record] = []
    said: set[tuple[str, str]] = set()
    for trials in lists:
        scores = _scores(backends, tables, trials, said)
        results[trials.name] = ListResult(trials, scores)
        records += list_records(
            trials.name,
            scores,
            trials.labels,
            trials.speakers,
            calibrations,
            settings.resamples,
            settings.seed,
            settings.options.get("eer", "roc"),
        )
        records += decision_records(trials.name, scores, trials.labels, calibrations)
    records += [
        CalibrationResult(system, backend, calibration)
        for (system, backend), calibration in calibrations.items()
    ]
    sources = {trials.name: trials.source() for trials in lists}
    sources |= {
        name: data.source() for name, data in (("calib", calib), ("train", train)) if data is not None
    }
    return Results(results, records + [Sources(sources, model)])


def _named(
    train: TrainingSet | None, calib: TrialList | None, lists: Sequence[TrialList]
) -> list[tuple[str, Callable[[System], np.ndarray]]]:
    """The tables a run passes through each system, named, each as the function that makes it
    through a system: train, calib, then each trial list."""
    named = [("train", lambda system: system(train.embeddings))] if train is not None else []
    named += [("calib", calib.table)] if calib is not None else []
    return named + [(trials.name, trials.table) for trials in lists]


def _scores(
    backends: Mapping[Key, Backend],
    tables: Mapping[Key, np.ndarray],
    trials: TrialList,
    said: set[tuple[str, str]],
) -> dict[Key, np.ndarray]:
    """Scores of every (system, back-end) that can score this list; for one that lacks what it
    needs (qmf without the list's durations) a notice, once (`said`)."""
    scores: dict[Key, np.ndarray] = {}
    for (system, name), backend in backends.items():
        lacking = backend.missing(trials.quality)
        if lacking:
            if (name, trials.name) not in said:
                said.add((name, trials.name))
                log.info("back-end %s skipped on the %s trials: they lack %s", name, trials.name, lacking)
            continue
        base = backend.base_name
        if base is not None and (system, base) in scores:  # over another's scores (qmf): as they are
            scores[(system, name)] = backend.rescore(
                scores[(system, base)], trials.left, trials.right, trials.quality
            )
        else:
            scores[(system, name)] = backend.score(
                tables[(system, trials.name)], trials.left, trials.right, trials.quality
            )
    return scores


class _Fitter:
    """Makes and fits every (system, back-end) that its data allows, saying which are skipped."""

    def __init__(
        self,
        settings: Settings,
        tables: Mapping[Key, np.ndarray],
        train: TrainingSet | None,
        calib: TrialList | None,
    ):
        self.settings, self.tables, self.train, self.calib = settings, tables, train, calib
        self.options = {**settings.options, "backends": settings.names()}
        made = {name: make_backend(name, settings.cosine, **self.options) for name in settings.names()}
        # Those fitted on training embeddings (or nothing) first: qmf's base is one of them.
        self.usable: list[str] = []
        for name in sorted(made, key=lambda name: made[name].fits_on_trials):
            reason = self._lacking(made[name])
            if reason:
                log.info("back-end %s skipped: %s", name, reason)
            else:
                self.usable.append(name)

    def _lacking(self, backend: Backend) -> str | None:
        """Why `backend` cannot be fitted with this data; None when it can."""
        if backend.min_speakers and self.train is None:
            return "it is fitted on the training embeddings, and train_list is not set"
        if backend.base_name in self.settings.names() and backend.base_name not in self.usable:
            return f"its base back-end {backend.base_name} is skipped"
        if backend.fits_on_trials:
            if self.calib is None:
                return "it is fitted on calib_list's trials, and calib_list is not set"
            if what := backend.missing(self.calib.quality):
                return f"it is fitted on calib_list's trials, and they lack {what}"
        return None

    def fit(self, systems: Iterable[str]) -> dict[Key, Backend]:
        """Every usable (system, back-end), fitted: on the training embeddings first, then those
        fitted on calib_list's trials (over their base back-end of the same system: the one
        scored too where it is, fitted once)."""
        fitted: dict[Key, Backend] = {}
        for system in systems:
            for name in self.usable:
                fitted[(system, name)] = backend = make_backend(name, self.settings.cosine, **self.options)
                if (system, backend.base_name) in fitted:
                    backend.base = fitted[(system, str(backend.base_name))]
            made = [fitted[(system, name)] for name in self.usable]
            if self.train is not None and any(backend.needs_fit() for backend in made):
                self._fit_on_training(system, made, self.train)
            for name in self.usable:
                backend = fitted[(system, name)]
                if backend.fits_on_trials and self.calib is not None:
                    backend.fit_trials(
                        self.tables[(system, "calib")],
                        self.calib.left,
                        self.calib.right,
                        self.calib.labels,
                        self.calib.quality,
                    )
        return fitted

    def _fit_on_training(self, system: str, backends: Sequence[Backend], train: TrainingSet) -> None:
        """Fit those of `backends` that need it (in order: a rescorer's base, fitted, is shared) on
        the system's training rows, all on one TrainingRows (their speaker moments computed once,
        by the first to use them)."""
        rows = TrainingRows.of(
            self.tables[(system, "train")],
            train.speakers,
            next(backend.name for backend in backends if backend.needs_fit()),
            products=any(backend.uses_products() for backend in backends),
        )
        for backend in filter(Backend.needs_fit, backends):
            began = time.perf_counter()
            backend.fit_rows(rows)
            log.info(
                "%s back-end of the %s embeddings fitted on %d training utterances of %d speakers in %.1f s",
                backend.name,
                system,
                len(rows.labels),
                rows.speakers,
                time.perf_counter() - began,
            )
