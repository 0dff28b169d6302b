"""Back-ends: fitted on training embeddings (rows with speaker labels) passed through the same
system, then applied to any table of that system. Tables stay where they are (a GPU's work
stays there) and are processed in chunks of rows, so that a VoxCeleb1-E-sized table
(145,000 x 512) with a 6,000-speaker cohort needs little memory beyond the table itself."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import numpy as np
import scipy.linalg
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn

from m_utils import Option, Options, UserError, options_taken, unknown_name
from scoring.metrics import check_rows, l2_normalize, pair_scores, score_trials

MB = 2**20

BACKEND_CHUNK_BYTES = 32 * MB  # float32 temporaries of one chunk of rows


def _as_tensor(embeddings: np.ndarray | torch.Tensor) -> torch.Tensor:
    """The table as a float32 tensor where it lives (a float32 numpy array shares its memory)."""
    if isinstance(embeddings, torch.Tensor):
        return embeddings.detach().float()
    return torch.from_numpy(np.ascontiguousarray(embeddings, np.float32))


def _row_chunks(rows: int, width: int, itemsize: int = 4) -> list[slice]:
    """Slices of `rows` rows whose (rows, width) temporaries take about BACKEND_CHUNK_BYTES."""
    step = max(1, BACKEND_CHUNK_BYTES // (itemsize * max(1, width)))
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


def _matmul(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """a @ b written to `out`. On a CPU by numpy's BLAS (OpenBLAS): torch's (MKL) ran these
    products at 55-65 % of its speed per core on the AMD EPYC cores of tests/BENCHMARK.md."""
    if a.device.type != "cpu":
        return torch.matmul(a, b, out=out)
    np.matmul(a.numpy(), b.numpy(), out=out.numpy())
    return out


def _add_gram(products: torch.Tensor, x: torch.Tensor) -> None:
    """products += x^T x. On a CPU by numpy, whose x.T @ x is BLAS's syrk (half the arithmetic of
    a product; with OpenBLAS a third of the CPU time of torch's addmm_ there)."""
    if x.device.type != "cpu":
        products.addmm_(x.T, x)
        return
    rows = x.numpy()
    products.numpy()[...] += rows.T @ rows


def _on(array: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """A fitted parameter as a tensor of `like`'s dtype and device."""
    return torch.as_tensor(array, dtype=like.dtype, device=like.device)


@dataclass
class SpeakerMoments:
    """First and second moments of training embeddings (float64): per speaker and overall."""

    counts: np.ndarray  # (S,) utterances of each speaker
    sums: np.ndarray  # (S, D) sum of each speaker's embeddings
    products: np.ndarray | None  # (D, D) sum of x x^T over all utterances, where asked for

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    @property
    def mean(self) -> np.ndarray:
        return self.sums.sum(axis=0) / self.total

    @property
    def speaker_means(self) -> np.ndarray:
        return self.sums / self.counts[:, None]

    def within_scatter(self) -> np.ndarray:
        """Sum over utterances of (x - speaker mean)(x - speaker mean)^T."""
        return self.products - self.sums.T @ self.speaker_means


def speaker_moments(
    table: torch.Tensor,
    labels: np.ndarray,
    speakers: int,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    second: bool = True,
) -> SpeakerMoments:
    """The SpeakerMoments of the rows of `table` (labels: speaker index of each row), each row
    first passed through `transform` (in float64) when given; `second`: with the second moments.
    Chunked, on the table's device: each chunk is copied into one float64 buffer, which
    `transform` may overwrite (fresh memory for every chunk costs a page fault per 4 KB)."""
    first = table[:1].double()
    width = (transform(first) if transform is not None else first).shape[1]
    sums = torch.zeros((speakers, width), dtype=torch.float64, device=table.device)
    products = torch.zeros((width, width) if second else (0, 0), dtype=torch.float64, device=table.device)
    chunks = _row_chunks(len(table), max(width, table.shape[1]), itemsize=8)
    buffer = torch.empty(
        (chunks[0].stop if chunks else 0, table.shape[1]), dtype=torch.float64, device=table.device
    )
    for rows in chunks:
        x = buffer[: rows.stop - rows.start].copy_(table[rows])
        if transform is not None:
            x = transform(x)
        add_speaker_sums(sums, x, labels[rows])
        if second:
            _add_gram(products, x)
    return SpeakerMoments(
        np.bincount(labels, minlength=speakers).astype(np.float64),
        sums.cpu().numpy(),
        products.cpu().numpy() if second else None,
    )


def add_speaker_sums(sums: torch.Tensor, x: torch.Tensor, labels: np.ndarray) -> None:
    """sums[s] += the sum of the rows of `x` whose label is s. On a CPU as one product of a sparse
    speaker-by-row indicator matrix with `x` (each speaker's rows added in order, as index_add_
    adds them, about 3x faster than it there)."""
    if x.device.type != "cpu":
        sums.index_add_(0, torch.from_numpy(labels).to(x.device), x)
        return
    order = np.argsort(labels, kind="stable")
    ends = np.concatenate([[0], np.cumsum(np.bincount(labels, minlength=len(sums)))])
    indicator = scipy.sparse.csr_array(
        (np.ones(len(labels), x.numpy().dtype), order, ends), shape=(len(sums), len(labels))
    )
    sums.numpy()[...] += indicator @ x.numpy()


class TrainingRows:
    """Training embeddings (a float32 tensor where they live) with each row's speaker as an index
    0..speakers-1: what a back-end is fitted on. Their SpeakerMoments are computed on first use
    and kept, so that the back-ends fitted on the same rows (the mean, AS-Norm and PLDA of one
    system) share one pass over them; with `products` that pass computes the second moments too,
    for a back-end among them that will want them (uses_products)."""

    def __init__(self, table: torch.Tensor, labels: np.ndarray, speakers: int, products: bool = False):
        self.table, self.labels, self.speakers, self.products = table, labels, speakers, products
        self._moments: SpeakerMoments | None = None

    @classmethod
    def of(
        cls,
        embeddings: np.ndarray | torch.Tensor,
        speakers: np.ndarray | Sequence,
        backend: str,
        products: bool = False,
    ) -> TrainingRows:
        """The rows of `embeddings` (M, D) with their speaker labels (M,); a UserError naming
        `backend` where the numbers differ."""
        table = _as_tensor(embeddings)
        speakers = np.asarray(speakers)
        if speakers.shape != (len(table),):
            raise UserError(
                f"the {backend} back-end got {len(table)} training embeddings but {speakers.size} "
                "speaker labels"
            )
        names, index = np.unique(speakers, return_inverse=True)
        return cls(table, index.astype(np.int64).reshape(-1), len(names), products)

    def check_speakers(self, needed: int, backend: str) -> None:
        """A UserError naming `backend` where these rows have fewer than `needed` speakers."""
        if self.speakers < needed:
            raise UserError(
                f"the {backend} back-end needs training embeddings of at least {needed} "
                f"speakers, found {self.speakers}"
            )

    def moments(self, second: bool = False) -> SpeakerMoments:
        """Their SpeakerMoments (`second`: with the second moments), computed once."""
        if self._moments is None or (second and self._moments.products is None):
            self._moments = speaker_moments(
                self.table, self.labels, self.speakers, second=second or self.products
            )
        return self._moments

    def through(self, transform: Callable[[torch.Tensor], torch.Tensor]) -> TrainingRows:
        """The same speakers' rows passed through `transform`."""
        return TrainingRows(transform(self.table), self.labels, self.speakers)


@dataclass
class Quality:
    """Per row of a table, what quality-aware back-ends (qmf) use beside the embeddings: the
    seconds of audio behind it and the norm of its embedding before normalisation (None where
    unknown)."""

    durations: np.ndarray | None = None
    norms: np.ndarray | None = None


# The back-ends' hyper-parameters: options of m_trainer (its OPTIONS table holds these rows).
BACKEND_OPTIONS: Options = {
    "asnorm_topk": Option(
        300, int, "AS-Norm: the top cohort scores averaged on each side of a trial", bounds=(2, None)
    ),  # a standard deviation needs two scores
    "lda_dim": Option(
        200, int, "PLDA: dimension of the LDA before it (at most nOut-1 and speakers-1)", bounds=(1, None)
    ),
    "qmf_base": Option(
        None,
        str,
        "QMF: the back-end whose score it rescores (default asnorm when among the back-ends, else none)",
    ),
    "qmf_norms": Option(False, bool, "QMF: the embedding norms before normalisation as quality measures too"),
}


class Backend:
    """No back-end (`none`): the raw scores of the embedding type, as score_trials gives them.

    The base of the others: `fit` on training embeddings (M, D) with their speaker labels (M,),
    then `score` trials (left[i], right[i]) between rows of any table of that system (float32 per
    trial). Tables may be numpy arrays or tensors; a table on a GPU is processed there.

    A back-end's hyper-parameters are the parameters of its constructor after `cosine`, named as
    the trainer's options (make_backend passes those it takes), declared in BACKEND_OPTIONS with
    their bounds, checked by check_limits for the constructor and the config check alike.

    As a step of a chain (`mean+asnorm+qmf`, see chain_steps) a back-end is of one `kind`:
    `embedding` (it transforms the embeddings the next step sees: `transform`), `score` (it
    scores the embeddings it is given) or `rescore` (a Rescorer: it rescores the scores of the
    steps before it, its `base`).
    """

    name = "none"
    kind = "score"  # embedding, score or rescore: its place in a chain (KIND_ORDER)
    first_only = False  # a step that may only begin a chain (plda: it centres and projects itself)
    min_speakers = 0  # training speakers a fit needs; 0: no fit on training embeddings
    base_name: str | None = None  # the back-end whose scores this one rescores (qmf)
    fits_on_trials = False  # fitted on a labelled trial list (calib_list) by fit_trials
    base: Backend | None = None  # the back-end of base_name (its own, or the fitted one shared)

    def __init__(self, cosine: bool):
        if not isinstance(cosine, bool):
            raise TypeError(f"cosine must be a bool, found {cosine!r}")
        self.cosine = cosine
        self.dim: int | None = None
        check_limits(type(self), {key: getattr(self, key) for key in BACKEND_OPTIONS if hasattr(self, key)})

    def fit(self, embeddings: np.ndarray | torch.Tensor, speakers: np.ndarray | Sequence) -> Backend:
        return self.fit_rows(TrainingRows.of(embeddings, speakers, self.name))

    def fit_rows(self, rows: TrainingRows) -> Backend:
        """fit on training rows that other back-ends may share (and with them their moments)."""
        rows.check_speakers(self.min_speakers, self.name)
        self.dim = int(rows.table.shape[1])
        self._fit(rows)
        return self

    def score(
        self,
        embeddings: np.ndarray | torch.Tensor,
        left: np.ndarray,
        right: np.ndarray,
        quality: Quality | None = None,
    ) -> np.ndarray:
        table = _as_tensor(embeddings)
        left, right = np.asarray(left, np.int64), np.asarray(right, np.int64)
        check_rows(left, right, len(table))
        if self.needs_fit():
            raise RuntimeError(f"the {self.name} back-end must be fitted before it scores")
        if self.dim is not None and table.shape[1] != self.dim:
            raise UserError(
                f"the {self.name} back-end was fitted on {self.dim}-dimensional embeddings, "
                f"these have {table.shape[1]}"
            )
        return self._score(table, left, right, quality)

    def needs_fit(self) -> bool:
        """Whether it must still be fitted on training embeddings before it scores."""
        return bool(self.min_speakers) and self.dim is None

    def uses_products(self) -> bool:
        """Whether its fit uses the second moments of the training rows it is given."""
        return False

    def missing(self, quality: Quality | None) -> str | None:
        """What this back-end lacks to score trials with `quality`; None when nothing."""
        return None

    def transform(self, table: torch.Tensor) -> torch.Tensor:
        """An embedding-level step: the embeddings the next step of a chain sees."""
        raise NotImplementedError(f"the {self.name} back-end does not transform embeddings")

    def rescore(
        self, base_scores: np.ndarray, left: np.ndarray, right: np.ndarray, quality: Quality | None
    ) -> np.ndarray:
        """A back-end with a `base_name`: its scores from those of its base back-end."""
        raise NotImplementedError(f"the {self.name} back-end does not rescore another's scores")

    def fit_trials(
        self,
        table: torch.Tensor | np.ndarray,
        left: np.ndarray,
        right: np.ndarray,
        labels: np.ndarray,
        quality: Quality | None,
    ) -> Backend:
        """A back-end that `fits_on_trials`: fitted on labelled trials instead of speakers."""
        raise NotImplementedError(f"the {self.name} back-end is not fitted on trials")

    def _fit(self, rows: TrainingRows) -> None:
        pass

    def _score(
        self, table: torch.Tensor, left: np.ndarray, right: np.ndarray, quality: Quality | None
    ) -> np.ndarray:
        return score_trials(table, left, right, self.cosine)


def check_limits(cls: type[Backend], values: dict[str, int]) -> None:
    """A UserError for a hyper-parameter of `cls` outside its option's bounds (BACKEND_OPTIONS)."""
    for key, value in options_taken(cls, values).items():
        if key in BACKEND_OPTIONS:
            BACKEND_OPTIONS[key].check(key, value)


class MeanBackend(Backend):
    """Mean normalisation: subtract the training mean, L2-normalise, cosine score -(1 - cos),
    whatever the embedding type. As a step of a chain it subtracts the mean (`transform`), and
    the steps after it score by cosine."""

    name = "mean"
    kind = "embedding"
    min_speakers = 1

    def _fit(self, rows: TrainingRows) -> None:
        self.mean = rows.moments().mean

    def _score(
        self, table: torch.Tensor, left: np.ndarray, right: np.ndarray, quality: Quality | None
    ) -> np.ndarray:
        mean = _on(self.mean, table)
        centred = torch.empty_like(table)
        for rows in _row_chunks(len(table), table.shape[1]):
            centred[rows] = nn.functional.normalize(table[rows] - mean, dim=1)
        return pair_scores(centred, left, right, "dot") - 1

    def transform(self, table: torch.Tensor) -> torch.Tensor:
        return table - _on(self.mean, table)


def top_scores(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The k highest values of each row of `scores`, in no order. On a CPU numpy's partition in
    place (`scores` is overwritten; the result is a view of its last k columns), several times
    faster than torch.topk there and with no memory of its own; elsewhere torch.topk."""
    if scores.device.type != "cpu":
        return torch.topk(scores, k, dim=1, sorted=False)[0]
    array = scores.numpy()
    array.partition(array.shape[1] - k, axis=1)
    return scores[:, array.shape[1] - k :]


class AsNormBackend(Backend):
    """Adaptive symmetric score normalisation (AS-Norm).

    Cohort: one embedding per training speaker, the mean of its training utterances (for type C
    L2-normalised, as cosine scoring normalises every row). For a trial (e, t) with raw score s
    of the embedding type: m_e, d_e the mean and standard deviation (population, ddof 0) of the
    `asnorm_topk` highest scores of e against the cohort, likewise m_t, d_t;
    score = ((s - m_e) / d_e + (s - m_t) / d_t) / 2. The statistics are computed once per row.
    """

    name = "asnorm"
    min_speakers = 2

    def __init__(self, cosine: bool, asnorm_topk: int = 300):
        self.asnorm_topk = asnorm_topk
        super().__init__(cosine)

    def _fit(self, rows: TrainingRows) -> None:
        cohort = rows.moments().speaker_means
        if self.cosine:
            cohort = l2_normalize(cohort)
        self.cohort = cohort.astype(np.float32)

    def cohort_statistics(
        self, embeddings: np.ndarray | torch.Tensor, rows: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Mean and standard deviation (float64) of the top-k cohort scores of each of `rows`.

        Each chunk's rows, cohort scores and top-k land in buffers allocated once: fresh memory for
        every chunk costs a page fault per 4 KB, which took as long as the arithmetic. The top-k
        are worked on as a contiguous copy (on a strided view of the scores, 4x slower)."""
        table = _as_tensor(embeddings)
        cohort = _on(self.cohort, table)
        topk = min(self.asnorm_topk, len(cohort))
        cosine = self.cosine
        cohort_norms = (cohort * cohort).sum(dim=1)  # L2 scoring only
        if not cosine:
            cohort = cohort * 2  # x.(2c) is 2 x.c exactly: one pass over the scores less
        index = torch.from_numpy(np.asarray(rows, np.int64)).to(table.device)
        means = torch.empty(len(index), dtype=torch.float64, device=table.device)
        stds = torch.empty_like(means)
        chunks = _row_chunks(len(index), len(cohort))
        size = chunks[0].stop if chunks else 0
        rows_buffer = table.new_empty((size, table.shape[1]))
        scores_buffer = table.new_empty((size, len(cohort)))
        top_buffer = table.new_empty((size, topk))
        for part in chunks:
            count = part.stop - part.start
            x = torch.index_select(table, 0, index[part], out=rows_buffer[:count])
            if cosine:
                x.div_(torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_(min=1e-12))
            # torch's product, not _matmul's: OpenBLAS rounds these float32 sums otherwise, which
            # moved an EER of the check by a trial.
            scores = torch.matmul(x, cohort.T, out=scores_buffer[:count])
            if not cosine:
                # The highest scores -||x - c|| are those of the highest 2 x.c - |c|^2.
                scores.sub_(cohort_norms)
            top = top_buffer[:count].copy_(top_scores(scores, topk))
            if cosine:
                top.sub_(1)
            else:
                squares = torch.linalg.vector_norm(x, dim=1, keepdim=True).square_()
                top.neg_().add_(squares).clamp_(min=0).sqrt_().neg_()
            stds[part], means[part] = torch.std_mean(top, dim=1, correction=0)
        return means.cpu().numpy(), stds.cpu().numpy()

    def _score(
        self, table: torch.Tensor, left: np.ndarray, right: np.ndarray, quality: Quality | None
    ) -> np.ndarray:
        raw = score_trials(table, left, right, self.cosine).astype(np.float64)
        used = np.zeros(len(table), bool)
        used[left] = used[right] = True
        rows = np.flatnonzero(used)
        means, stds = np.full(len(table), np.nan), np.full(len(table), np.nan)
        means[rows], stds[rows] = self.cohort_statistics(table, rows)
        stds = np.maximum(stds, 1e-12)  # a cohort of identical scores; does not occur in practice
        return (0.5 * ((raw - means[left]) / stds[left] + (raw - means[right]) / stds[right])).astype(
            np.float32
        )


@dataclass
class TwoCovariance:
    """The two-covariance PLDA model: x = mean + y + e, with the speaker's variable y ~ N(0, between)
    and each utterance's residual e ~ N(0, within)."""

    mean: np.ndarray
    between: np.ndarray
    within: np.ndarray

    @classmethod
    def from_moments(cls, moments: SpeakerMoments) -> TwoCovariance:
        """Closed-form moment estimates: `within` the pooled within-speaker covariance (unbiased);
        `between` the covariance of the speaker means less the residual it holds, E[cov of means] =
        between + within x mean(1 / utterances of a speaker), clipped to be positive semi-definite."""
        speakers, total = len(moments.counts), moments.total
        if total <= speakers:
            raise UserError(
                "PLDA needs a training speaker with at least two utterances (a within-speaker covariance)"
            )
        within = moments.within_scatter() / (total - speakers)
        means = moments.speaker_means
        between = np.cov(means, rowvar=False, ddof=1).reshape(within.shape) - within * np.mean(
            1 / moments.counts
        )
        values, vectors = np.linalg.eigh((between + between.T) / 2)
        between = (vectors * np.maximum(values, 0)) @ vectors.T
        return cls(means.mean(axis=0), between, (within + within.T) / 2)

    def scoring(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        """(A, P, Q, c) of the log-likelihood ratio of one utterance against one:
        with u = A^T (x - mean), llr(a, b) = sum(P u_a u_b) + Q.(u_a^2 + u_b^2) / 2 + c.

        A diagonalises both covariances (A^T within A = I, A^T between A = diag(psi)); per
        dimension the same-speaker pair has covariance [[1 + psi, psi], [psi, 1 + psi]], the
        different-speaker pair diag(1 + psi, 1 + psi)."""
        try:
            psi, transform = scipy.linalg.eigh(self.between, self.within)
        except np.linalg.LinAlgError:
            raise UserError(
                "PLDA: the within-speaker covariance is singular (too few training "
                "utterances for the dimension)"
            ) from None
        psi = np.maximum(psi, 0)
        product = psi / (1 + 2 * psi)
        square = -(psi**2) / ((1 + psi) * (1 + 2 * psi))
        constant = float(np.sum(np.log1p(psi) - 0.5 * np.log1p(2 * psi)))
        return transform, product, square, constant


def fit_two_covariance(
    embeddings: np.ndarray | torch.Tensor, speakers: np.ndarray | Sequence
) -> TwoCovariance:
    """TwoCovariance.from_moments of training embeddings (M, D) with their speaker labels (M,)."""
    rows = TrainingRows.of(embeddings, speakers, "plda")
    rows.check_speakers(2, "plda")
    return TwoCovariance.from_moments(rows.moments(second=True))


def lda_projection(moments: SpeakerMoments, dim: int) -> np.ndarray:
    """(D, <= dim) LDA: the leading generalised eigenvectors of the between-speaker scatter against
    the within-speaker one, scaled so that the within-speaker covariance becomes the identity.

    Only directions where the training utterances of a speaker vary at all are kept (within-speaker
    variance above 1e-6 of the largest): an enhancer's output can have dimensions that are constant
    (a ReLU that never fires), and there the ratio has no meaning."""
    within = moments.within_scatter() / moments.total
    centred = moments.speaker_means - moments.mean
    between = (centred.T * moments.counts) @ centred / moments.total
    values, vectors = np.linalg.eigh((within + within.T) / 2)
    kept = values > 1e-6 * max(values.max(), np.finfo(float).tiny)
    whiten = vectors[:, kept] / np.sqrt(values[kept])
    ratios, directions = np.linalg.eigh(whiten.T @ ((between + between.T) / 2) @ whiten)
    return np.ascontiguousarray((whiten @ directions[:, ::-1])[:, :dim])


class PldaBackend(Backend):
    """LDA + PLDA: centre with the training mean, LDA to `lda_dim` (at most D - 1 and speakers - 1),
    length-normalise, then score by the log-likelihood ratio of same vs different speaker under a
    two-covariance PLDA fitted on the training utterances (so whatever the embedding type)."""

    name = "plda"
    first_only = True
    min_speakers = 2

    def __init__(self, cosine: bool, lda_dim: int = 200):
        self.lda_dim = lda_dim
        super().__init__(cosine)

    def uses_products(self) -> bool:
        return True

    def _fit(self, rows: TrainingRows) -> None:
        dim = rows.table.shape[1]
        if dim < 2:
            raise UserError("the plda back-end needs embeddings of at least 2 dimensions")
        moments = rows.moments(second=True)
        self.mean = moments.mean
        self.lda = lda_projection(moments, min(self.lda_dim, dim - 1, rows.speakers - 1))
        self.plda = TwoCovariance.from_moments(
            speaker_moments(rows.table, rows.labels, rows.speakers, self._project_in_place())
        )
        self._scoring = self.plda.scoring()

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Rows centred, LDA-projected and length-normalised: the space the PLDA model lives in."""
        return nn.functional.normalize((x - _on(self.mean, x)) @ _on(self.lda, x), dim=1)

    def _project_in_place(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """`project` for speaker_moments' chunks: it centres a chunk where it lies and projects it
        into one buffer, kept from chunk to chunk; the same values as `project`."""
        kept: list[torch.Tensor] = []

        def project(x: torch.Tensor) -> torch.Tensor:
            mean, lda = _on(self.mean, x), _on(self.lda, x)
            if not kept or len(kept[0]) < len(x):
                kept[:] = [x.new_empty((len(x), lda.shape[1]))]
            out = _matmul(x.sub_(mean), lda, out=kept[0][: len(x)])
            return out.div_(torch.linalg.vector_norm(out, dim=1, keepdim=True).clamp_(min=1e-12))

        return project

    def _score(
        self, table: torch.Tensor, left: np.ndarray, right: np.ndarray, quality: Quality | None
    ) -> np.ndarray:
        transform_array, product, square_array, constant = self._scoring
        mean, transform = _on(self.plda.mean, table), _on(transform_array, table)
        root_product, square = _on(np.sqrt(product), table), _on(square_array, table).double()
        # Per row: w = sqrt(P) u, so that sum(P u_a u_b) is the dot product w_a.w_b, and its own
        # term Q.u^2 / 2, computed once per row.
        scaled = torch.empty((len(table), len(product)), dtype=torch.float32, device=table.device)
        own = torch.empty(len(table), dtype=torch.float64, device=table.device)
        for rows in _row_chunks(len(table), table.shape[1]):
            u = (self.project(table[rows]) - mean) @ transform
            scaled[rows] = u * root_product
            own[rows] = 0.5 * (u.double() ** 2 @ square)
        own_terms = own.cpu().numpy()
        cross = pair_scores(scaled, left, right, "dot")
        return (cross + own_terms[left] + own_terms[right] + constant).astype(np.float32)


def quality_features(
    scores: np.ndarray, left: np.ndarray, right: np.ndarray, quality: Quality, norms: bool
) -> np.ndarray:
    """(trials, 3 or 5) float64 features of QMF: the score, the smaller and the larger log duration
    of the two sides (so that a trial and its mirror image agree), and with `norms` the smaller
    and the larger log embedding norm."""
    columns = [np.asarray(scores, np.float64)]
    for values in (quality.durations, quality.norms if norms else None):
        if values is not None:
            logs = np.log(np.maximum(np.asarray(values, np.float64), 1e-12))
            columns += [np.minimum(logs[left], logs[right]), np.maximum(logs[left], logs[right])]
    return np.stack(columns, axis=1)


class Rescorer(Backend):
    """A rescoring step: it rescores the scores of its `base` back-end (`on`), which it fits when
    it is fitted on training embeddings; evaluate may instead give it a fitted base it scores too."""

    kind = "rescore"

    @classmethod
    def base_of(cls, options: dict) -> str:
        """Named alone: the back-end whose scores it rescores, from the options."""
        raise NotImplementedError

    def on(self, base: Backend, name: str) -> Rescorer:
        """This step rescoring the scores of `base`, the whole called `name`."""
        self.base, self.base_name, self.name = base, base.name, name
        self.min_speakers = base.min_speakers
        return self

    def needs_fit(self) -> bool:
        return self.base is not None and self.base.needs_fit()

    def uses_products(self) -> bool:
        return self.base is not None and self.base.uses_products()

    def _fit(self, rows: TrainingRows) -> None:
        if self.base is not None:
            self.base.fit_rows(rows)


class QmfBackend(Rescorer):
    """Quality measure functions (QMF): a logistic regression on the score of another back-end,
    its `base` (in a chain the steps before it; named alone, `qmf_base`: by default asnorm when
    it is among the back-ends, else none) and quality measures of the trial, the log durations
    of both sides and with `qmf_norms` the log norms of both embeddings before normalisation
    (features: quality_features). Fitted on a labelled trial list (calib_list) by fit_trials,
    both classes weighed equally, on features standardised there; the score is the regression's
    log-odds. Fitting it on training embeddings fits its base."""

    name = "qmf"
    fits_on_trials = True

    def __init__(self, cosine: bool, qmf_norms: bool = False):
        super().__init__(cosine)
        self.norms = qmf_norms
        self.model: Any = None

    @classmethod
    def base_of(cls, options: dict) -> str:
        backends = options.get("backends") or ()
        base = options.get("qmf_base") or ("asnorm" if "asnorm" in backends else "none")
        allowed = [name for name in ("none", *backends) if not rescores(name)]
        if base not in allowed:
            raise UserError(
                f"option 'qmf_base' must be one of the back-ends scored ({', '.join(allowed)}) "
                f"other than qmf, found {base!r}"
            )
        return base

    def missing(self, quality: Quality | None) -> str | None:
        if quality is None or quality.durations is None:
            return "durations (utt2dur beside the embeddings)"
        if self.norms and quality.norms is None:
            return "embedding norms (qmf_norms)"
        return None

    def fit_trials(
        self,
        table: torch.Tensor | np.ndarray,
        left: np.ndarray,
        right: np.ndarray,
        labels: np.ndarray,
        quality: Quality | None,
    ) -> QmfBackend:
        """Fit the regression on the trials (left[i], right[i]) of `table` with their labels."""
        labels = np.asarray(labels).astype(bool)
        if labels.all() or not labels.any():
            raise UserError("the qmf back-end needs target (1) and non-target (0) calibration trials")
        self.model = make_pipeline(StandardScaler(), LogisticRegression(class_weight="balanced"))
        self.model.fit(
            self._features(self._base_scores(table, left, right, quality), left, right, quality), labels
        )
        return self

    def rescore(
        self, base_scores: np.ndarray, left: np.ndarray, right: np.ndarray, quality: Quality | None
    ) -> np.ndarray:
        """The scores of trials whose base back-end's scores are at hand."""
        if self.model is None:
            raise RuntimeError("the qmf back-end must be fitted (fit_trials) before it scores")
        features = self._features(base_scores, left, right, quality)
        return self.model.decision_function(features).astype(np.float32)

    def _base_scores(
        self, table: torch.Tensor | np.ndarray, left: np.ndarray, right: np.ndarray, quality: Quality | None
    ) -> np.ndarray:
        if self.base is None:
            raise RuntimeError("the qmf back-end needs its base back-end (`base`) before it scores")
        return self.base.score(table, left, right, quality)

    def _features(
        self, base_scores: np.ndarray, left: np.ndarray, right: np.ndarray, quality: Quality | None
    ) -> np.ndarray:
        lacking = self.missing(quality)
        if lacking or quality is None:
            raise UserError(f"the qmf back-end needs {lacking}")
        return quality_features(base_scores, np.asarray(left), np.asarray(right), quality, self.norms)

    def _score(
        self, table: torch.Tensor, left: np.ndarray, right: np.ndarray, quality: Quality | None
    ) -> np.ndarray:
        return self.rescore(self._base_scores(table, left, right, quality), left, right, quality)


class Chain(Backend):
    """A chain that ends with a step scoring embeddings: embedding-level steps, each fitted on the
    embeddings the one before produced and transforming them, then `scorer`, fitted on and
    scoring their output (by cosine, as the `mean` back-end does)."""

    def __init__(self, name: str, transforms: Sequence[Backend], scorer: Backend):
        super().__init__(scorer.cosine)
        self.name, self.transforms, self.scorer = name, list(transforms), scorer
        self.min_speakers = max(step.min_speakers for step in (*self.transforms, scorer))

    def uses_products(self) -> bool:
        return self.transforms[0].uses_products()

    def transform(self, table: torch.Tensor) -> torch.Tensor:
        for step in self.transforms:
            table = step.transform(table)
        return table

    def missing(self, quality: Quality | None) -> str | None:
        return self.scorer.missing(quality)

    def _fit(self, rows: TrainingRows) -> None:
        for step in self.transforms:
            rows = rows.through(step.fit_rows(rows).transform)
        self.scorer.fit_rows(rows)

    def _score(
        self, table: torch.Tensor, left: np.ndarray, right: np.ndarray, quality: Quality | None
    ) -> np.ndarray:
        return self.scorer.score(self.transform(table), left, right, quality)


BACKENDS: dict[str, type[Backend]] = {
    cls.name: cls for cls in (Backend, MeanBackend, AsNormBackend, PldaBackend, QmfBackend)
}
SEPARATOR = "+"  # between the steps of a chain: mean+asnorm+qmf
KIND_ORDER = ("embedding", "score", "rescore")  # the order of the steps of a chain


def step_names(name: str) -> list[str]:
    """The names of the steps of the back-end `name`, unchecked (chain_steps checks them)."""
    return name.split(SEPARATOR)


def chain_rule() -> str:
    """How a chain is built, in words, from the kinds of the steps in BACKENDS."""

    def named(kind: str) -> str:
        return ", ".join(step for step, cls in BACKENDS.items() if cls.kind == kind and step != "none")

    first = ", ".join(step for step, cls in BACKENDS.items() if cls.first_only)
    return (
        f"a chain is steps that transform embeddings ({named('embedding')}), then at most one that "
        f"scores them ({named('score')}; {first} only first), then those that rescore scores "
        f"({named('rescore')}), each at most once, joined by '{SEPARATOR}'; none stands alone"
    )


def chain_steps(name: str, source: str | None = None) -> list[str]:
    """The steps of the back-end `name` (one, or a chain `mean+asnorm+qmf`), or a UserError
    saying where it was given (`source`), listing the known steps and the rule of a chain."""
    steps = step_names(name)
    if len(steps) == 1:
        if name not in BACKENDS:
            raise unknown_name("back-end", name, BACKENDS, source)
        return steps
    where = f"{source}: back-end '{name}'" if source else f"back-end '{name}'"
    for step in steps:
        if step not in BACKENDS:
            raise unknown_name("step", step, BACKENDS, where)
    problem = chain_problem(steps)
    if problem is None:
        return steps
    raise UserError(f"{where}: {problem}; {chain_rule()}; known steps: {', '.join(sorted(BACKENDS))}")


def chain_problem(steps: Sequence[str]) -> str | None:
    """Why known steps in this order cannot make a chain (chain_rule), in words; None when they can."""
    kinds = [BACKENDS[step].kind for step in steps]
    late = next(
        (
            (a, b)
            for a, b in pairwise(range(len(steps)))
            if KIND_ORDER.index(kinds[b]) < KIND_ORDER.index(kinds[a])
        ),
        None,
    )
    scorers = [step for step, kind in zip(steps, kinds, strict=True) if kind == "score"]
    if "none" in steps:
        return "none is the back-end of no step"
    if len(set(steps)) < len(steps):
        return f"{next(step for step in steps if steps.count(step) > 1)} twice"
    if late is not None:
        a, b = late
        return f"the {kinds[a]}-level step {steps[a]} before the {kinds[b]}-level step {steps[b]}"
    if len(scorers) > 1:
        return f"two steps that score embeddings ({', '.join(scorers)})"
    return next((f"{step} not first" for step in steps[1:] if BACKENDS[step].first_only), None)


def rescores(name: str) -> bool:
    """Whether the back-end `name` rescores another's scores (its last step is a Rescorer)."""
    return BACKENDS[chain_steps(name)[-1]].kind == "rescore"


def make_backend(name: str, cosine: bool, **options) -> Backend:
    """The back-end called `name` (one of BACKENDS, or a chain of them: chain_steps) for cosine
    (type C) or L2 (type B) scoring, given the entries of `options` that the constructors take
    by name (the trainer's options). Each step is fitted on what the step before produced."""
    *before, last = chain_steps(name)
    cls = BACKENDS[last]
    if issubclass(cls, Rescorer):
        base = SEPARATOR.join(before) if before else cls.base_of(options)
        return cls(cosine, **options_taken(cls, options)).on(make_backend(base, cosine, **options), name)
    if not before:
        return cls(cosine, **options_taken(cls, options))
    transforms = [BACKENDS[step](cosine, **options_taken(BACKENDS[step], options)) for step in before]
    return Chain(name, transforms, cls(True, **options_taken(cls, options)))


def needs_training_embeddings(names: Sequence[str]) -> bool:
    """Whether any of these back-ends (or a step of them) is fitted on training embeddings."""
    return any(
        BACKENDS[step].min_speakers > 0 for name in names for step in step_names(name) if step in BACKENDS
    )


def check_backend_names(names: Sequence[str], source: str | None = None) -> None:
    """Every back-end of `names` known, a chain's steps in an order that can be fitted
    (chain_steps); `source` says where they were given (`<config>:<line>: backends`)."""
    for name in names:
        chain_steps(name, source)


def check_backend_options(names: Sequence[str], options: dict) -> None:
    """The config check of the back-ends: every name known (check_backend_names), every
    back-end's hyper-parameters within its limits (check_limits), and those chosen constructible
    with these options."""
    check_backend_names(names)
    for cls in BACKENDS.values():
        check_limits(cls, options_taken(cls, options))
    for name in names:
        make_backend(name, True, **options)
