"""Trial scoring and verification metrics, in one module so that the trainer, the viewer and the
benchmark share them: scores of trials between rows of an embedding table, the back-ends that
rescore them (mean normalisation, AS-Norm, LDA + PLDA), EER and minDCF, bootstrap confidence
intervals over speakers, calibration to log-likelihood ratios, and the results table."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import torch
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression
from torch import nn

from m_DataLoader import embedding_type_of, l2_normalize
from m_utils import UserError, unknown_name

SCORE_CHUNK = 1024
MB = 2 ** 20

def score_trials(embeddings: np.ndarray | torch.Tensor, left: np.ndarray, right: np.ndarray,
                 embedding_type: str) -> np.ndarray:
    """Score trials (left[i], right[i]) between rows of `embeddings` -> float32 scores.

    By the scoring of `embedding_type` (m_DataLoader.EMBEDDING_TYPES): B -||a - b|| (L2 distance),
    C -(1 - cos(a, b)) (cosine distance).
    """
    return pair_scores(embeddings, left, right,
                       "cosine" if embedding_type_of(embedding_type).cosine else "l2")


PAIR_KINDS = ("cosine", "l2", "dot")


def pair_scores(embeddings: np.ndarray | torch.Tensor, left: np.ndarray, right: np.ndarray,
                kind: str) -> np.ndarray:
    """float32 value of each pair of rows (left[i], right[i]): `cosine` -(1 - cos(a, b)),
    `l2` -||a - b||, `dot` a.b.

    A table on a GPU is scored there. On a CPU the time goes into fetching rows from memory: the
    pairs are visited in order of their left row (each left row is then read from memory once,
    not once per pair), in cache-sized chunks spread over torch's intra-op threads.
    """
    if kind not in PAIR_KINDS:
        raise ValueError(f"pair kind must be one of {PAIR_KINDS}, found {kind!r}")
    left, right = np.asarray(left, np.int64), np.asarray(right, np.int64)
    if isinstance(embeddings, torch.Tensor) and embeddings.device.type != "cpu":
        return _score_on_device(embeddings.detach().float(), left, right, kind)
    if isinstance(embeddings, torch.Tensor):
        embeddings = embeddings.detach().float().numpy()
    table = np.ascontiguousarray(embeddings, np.float32)
    if kind == "cosine":
        table = l2_normalize(table).astype(np.float32)
    check_rows(left, right, len(table))
    # Each row as one opaque item: take() then copies whole rows, faster than float-wise indexing.
    rows = table.view(np.dtype((np.void, table.shape[1] * table.itemsize))).reshape(-1)
    order, left = _sorted_with_order(left)
    right = right[order]
    out = np.empty(len(left), np.float32)
    starts = range(0, len(left), SCORE_CHUNK)
    threads = max(1, min(torch.get_num_threads(), len(starts)))
    # Each thread gathers into its own two buffers, allocated once: fresh memory for every chunk
    # would cost a page fault per 4 KB, more than the arithmetic.
    buffers = np.empty((threads, 2, SCORE_CHUNK), rows.dtype)

    def score_part(part: int) -> None:
        for start in starts[part::threads]:
            stop = min(start + SCORE_CHUNK, len(left))
            # mode="clip" (rows were checked above) lets take() write straight into the buffer
            a = rows.take(left[start:stop], out=buffers[part, 0, :stop - start], mode="clip")
            b = rows.take(right[start:stop], out=buffers[part, 1, :stop - start], mode="clip")
            a, b = (x.view(np.float32).reshape(stop - start, -1) for x in (a, b))
            if kind == "l2":
                a -= b
                out[start:stop] = -np.sqrt(np.einsum("ij,ij->i", a, a))
            else:
                dots = np.einsum("ij,ij->i", a, b)
                out[start:stop] = dots - 1 if kind == "cosine" else dots

    if threads > 1:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(score_part, range(threads)))
    else:
        score_part(0)
    scores = np.empty_like(out)
    scores[order] = out
    return scores


def check_rows(left: np.ndarray, right: np.ndarray, rows: int) -> None:
    """A UserError unless every trial row lies in the table of `rows` rows."""
    if len(left) and (min(left.min(), right.min()) < 0 or max(left.max(), right.max()) >= rows):
        raise UserError(f"trial rows must lie in 0..{rows - 1}")


def _sorted_with_order(indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(order, indices[order]) with `indices` (non-negative int64) sorted, stably. Index and
    position are packed into one int64 key: a plain sort of it is several times faster than argsort."""
    position_bits = max(1, (len(indices) - 1).bit_length())
    if len(indices) == 0 or int(indices.max()).bit_length() + position_bits > 62:
        order = np.argsort(indices, kind="stable")
        return order, indices[order]
    keys = np.sort((indices << position_bits) | np.arange(len(indices)))
    return keys & ((1 << position_bits) - 1), keys >> position_bits


def _score_on_device(table: torch.Tensor, left: np.ndarray, right: np.ndarray, kind: str) -> np.ndarray:
    """pair_scores on the table's GPU, in chunks of about 4 MB of gathered rows each."""
    if kind == "cosine":
        table = nn.functional.normalize(table, dim=1)
    left_rows = torch.from_numpy(left).to(table.device)
    right_rows = torch.from_numpy(right).to(table.device)
    chunk = max(SCORE_CHUNK, 2 ** 20 // max(1, table.shape[1]))
    out = torch.empty(len(left), dtype=table.dtype, device=table.device)
    for start in range(0, len(left), chunk):
        a = table[left_rows[start:start + chunk]]
        b = table[right_rows[start:start + chunk]]
        if kind == "l2":
            out[start:start + len(a)] = -(a - b).norm(dim=1)
        else:
            dots = (a * b).sum(dim=1)
            out[start:start + len(a)] = dots - 1 if kind == "cosine" else dots
    return out.cpu().numpy()


def score_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every distinct score as a threshold (accept score >= threshold), highest first, with the
    number of target and non-target trials accepted there. One sort serves EER and minDCF."""
    ordered, ordered_labels = _sorted_descending(np.asarray(scores), np.asarray(labels).astype(bool))
    last_of_each = np.append(np.flatnonzero(ordered[1:] != ordered[:-1]), len(ordered) - 1)
    targets = np.cumsum(ordered_labels)[last_of_each]
    return ordered[last_of_each], targets, last_of_each + 1 - targets


def _sorted_descending(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scores sorted highest first, with their labels (in any order among equal scores).

    float32 scores (what score_trials gives) go through one plain sort of int64 keys: the score's
    bits mapped to an order-preserving integer, with the label as the lowest bit. That is several
    times faster than an argsort followed by two gathers."""
    if scores.dtype != np.float32 or not np.isfinite(scores).all():
        order = np.argsort(scores)[::-1]
        return scores[order], labels[order]
    bits = scores.view(np.int32).astype(np.int64)  # -0.0 lands next to +0.0; equal as floats below
    bits ^= (bits >> 31) & 0x7FFFFFFF  # negative floats: larger magnitude -> smaller integer
    keys = np.sort((bits << 1) | labels)[::-1]
    bits = keys >> 1
    bits ^= (bits >> 31) & 0x7FFFFFFF
    return bits.astype(np.int32).view(np.float32), (keys & 1).astype(bool)


def _eer_of_curve(thresholds: np.ndarray, targets: np.ndarray,
                  nontargets: np.ndarray) -> tuple[float, float]:
    """voxceleb_trainer's EER: on sklearn's ROC curve (whose interior points on straight runs are
    dropped, and which starts at threshold +inf), the point where |FNR - FPR| is smallest,
    EER = max(FPR, FNR)."""
    if len(thresholds) > 2:
        bends = np.logical_or(np.diff(nontargets, 2), np.diff(targets, 2))
        kept = np.flatnonzero(np.concatenate([[True], bends, [True]]))
        thresholds, targets, nontargets = thresholds[kept], targets[kept], nontargets[kept]
    with np.errstate(divide="ignore", invalid="ignore"):
        tpr = np.concatenate([[0], targets]) / targets[-1]
        fpr = np.concatenate([[0], nontargets]) / nontargets[-1]
    fnr = 1 - tpr
    best = int(np.nanargmin(np.abs(fnr - fpr)))
    threshold = np.inf if best == 0 else float(thresholds[best - 1])
    return float(max(fpr[best], fnr[best]) * 100), threshold


def _rates_of_curve(targets: np.ndarray, nontargets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Miss and false-alarm rates, threshold ascending; the first point accepts everything."""
    miss = np.concatenate([[0.0], 1 - targets[::-1][1:] / targets[-1], [1.0]])
    false_alarm = np.concatenate([[1.0], nontargets[::-1][1:] / nontargets[-1], [0.0]])
    return miss, false_alarm


def compute_eer(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """EER in % and its threshold, exactly as voxceleb_trainer computes it with sklearn's roc_curve."""
    return _eer_of_curve(*score_curve(scores, labels))


def error_rates(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Miss and false-alarm rates at every distinct threshold (ascending); the first point accepts
    everything (miss 0, false alarm 1), the last nothing."""
    thresholds, targets, nontargets = score_curve(scores, labels)
    miss, false_alarm = _rates_of_curve(targets, nontargets)
    return miss, false_alarm, np.concatenate([[-np.inf], thresholds[::-1][1:], [np.inf]])


def min_dcf_of_rates(miss: np.ndarray, false_alarm: np.ndarray, p_target: float,
                     c_miss: float = 1.0, c_fa: float = 1.0) -> float:
    cost = c_miss * miss * p_target + c_fa * false_alarm * (1 - p_target)
    return float(cost.min() / min(c_miss * p_target, c_fa * (1 - p_target)))


def compute_min_dcf(scores: np.ndarray, labels: np.ndarray, p_target: float = 0.05,
                    c_miss: float = 1.0, c_fa: float = 1.0) -> float:
    """Normalised minimum detection cost (NIST SRE)."""
    miss, false_alarm, _ = error_rates(scores, labels)
    return min_dcf_of_rates(miss, false_alarm, p_target, c_miss, c_fa)


def evaluate_scores(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """EER, its threshold, and minDCF at P_target 0.05 and 0.01 (from one sort of the scores)."""
    curve = score_curve(scores, labels)
    eer, threshold = _eer_of_curve(*curve)
    miss, false_alarm = _rates_of_curve(*curve[1:])
    return {"eer": eer, "threshold": threshold,
            "mindcf": min_dcf_of_rates(miss, false_alarm, 0.05),
            "mindcf01": min_dcf_of_rates(miss, false_alarm, 0.01)}


# ----------------------------------------------------------------------------------------------
# Back-ends: fitted on training embeddings (rows with speaker labels) passed through the same
# system, then applied to any table of that system. Tables stay where they are (a GPU's work
# stays there) and are processed in chunks of rows, so that a VoxCeleb1-E-sized table
# (145,000 x 512) with a 6,000-speaker cohort needs little memory beyond the table itself.

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


def _on(array: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """A fitted parameter as a tensor of `like`'s dtype and device."""
    return torch.as_tensor(array, dtype=like.dtype, device=like.device)


@dataclass
class SpeakerMoments:
    """First and second moments of training embeddings (float64): per speaker and overall."""

    counts: np.ndarray    # (S,) utterances of each speaker
    sums: np.ndarray      # (S, D) sum of each speaker's embeddings
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


def speaker_moments(table: torch.Tensor, labels: np.ndarray, speakers: int,
                    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                    second: bool = True) -> SpeakerMoments:
    """The SpeakerMoments of the rows of `table` (labels: speaker index of each row), each row
    first passed through `transform` (in float64) when given; `second`: with the second moments.
    Chunked, on the table's device."""
    first = table[:1].double()
    width = (transform(first) if transform is not None else first).shape[1]
    sums = torch.zeros((speakers, width), dtype=torch.float64, device=table.device)
    products = torch.zeros((width, width), dtype=torch.float64, device=table.device) if second else None
    index = torch.from_numpy(labels).to(table.device)
    for rows in _row_chunks(len(table), max(width, table.shape[1]), itemsize=8):
        x = table[rows].double()
        if transform is not None:
            x = transform(x)
        sums.index_add_(0, index[rows], x)
        if second:
            products += x.T @ x
    return SpeakerMoments(np.bincount(labels, minlength=speakers).astype(np.float64), sums.cpu().numpy(),
                          products.cpu().numpy() if second else None)


def _speaker_index(speakers: np.ndarray | Sequence, rows: int, needed: int,
                   backend: str) -> tuple[np.ndarray, int]:
    """Each training row's speaker as an index 0..S-1, and S; a UserError for too few speakers."""
    speakers = np.asarray(speakers)
    if speakers.shape != (rows,):
        raise UserError(f"the {backend} back-end got {rows} training embeddings but "
                        f"{speakers.size} speaker labels")
    names, index = np.unique(speakers, return_inverse=True)
    if len(names) < needed:
        raise UserError(f"the {backend} back-end needs training embeddings of at least {needed} "
                        f"speakers, found {len(names)}")
    return index.astype(np.int64), len(names)


class Backend:
    """No back-end (`none`): the raw scores of the embedding type, as score_trials gives them.

    The base of the others: `fit` on training embeddings (M, D) with their speaker labels (M,),
    then `score` trials (left[i], right[i]) between rows of any table of that system (float32 per
    trial). Tables may be numpy arrays or tensors; a table on a GPU is processed there."""

    name = "none"
    min_speakers = 0  # training speakers a fit needs; 0: no fit needed

    def __init__(self, embedding_type: str):
        embedding_type_of(embedding_type)
        self.embedding_type = embedding_type
        self.dim: int | None = None

    def fit(self, embeddings: np.ndarray | torch.Tensor, speakers: np.ndarray | Sequence) -> Backend:
        table = _as_tensor(embeddings)
        labels, count = _speaker_index(speakers, len(table), self.min_speakers, self.name)
        self.dim = int(table.shape[1])
        self._fit(table, labels, count)
        return self

    def score(self, embeddings: np.ndarray | torch.Tensor, left: np.ndarray, right: np.ndarray) -> np.ndarray:
        table = _as_tensor(embeddings)
        left, right = np.asarray(left, np.int64), np.asarray(right, np.int64)
        check_rows(left, right, len(table))
        if self.min_speakers and self.dim is None:
            raise RuntimeError(f"the {self.name} back-end must be fitted before it scores")
        if self.dim is not None and table.shape[1] != self.dim:
            raise UserError(f"the {self.name} back-end was fitted on {self.dim}-dimensional embeddings, "
                            f"these have {table.shape[1]}")
        return self._score(table, left, right)

    def _fit(self, table: torch.Tensor, labels: np.ndarray, speakers: int) -> None:
        pass

    def _score(self, table: torch.Tensor, left: np.ndarray, right: np.ndarray) -> np.ndarray:
        return score_trials(table, left, right, self.embedding_type)


class MeanBackend(Backend):
    """Mean normalisation: subtract the training mean, L2-normalise, cosine score -(1 - cos),
    whatever the embedding type."""

    name = "mean"
    min_speakers = 1

    def _fit(self, table: torch.Tensor, labels: np.ndarray, speakers: int) -> None:
        self.mean = speaker_moments(table, labels, speakers, second=False).mean

    def _score(self, table: torch.Tensor, left: np.ndarray, right: np.ndarray) -> np.ndarray:
        mean = _on(self.mean, table)
        centred = torch.empty_like(table)
        for rows in _row_chunks(len(table), table.shape[1]):
            centred[rows] = nn.functional.normalize(table[rows] - mean, dim=1)
        return pair_scores(centred, left, right, "dot") - 1


class AsNormBackend(Backend):
    """Adaptive symmetric score normalisation (AS-Norm).

    Cohort: one embedding per training speaker, the mean of its training utterances (for type C
    L2-normalised, as cosine scoring normalises every row). For a trial (e, t) with raw score s
    of the embedding type: m_e, d_e the mean and standard deviation (population, ddof 0) of the
    `topk` highest scores of e against the cohort, likewise m_t, d_t;
    score = ((s - m_e) / d_e + (s - m_t) / d_t) / 2. The statistics are computed once per row.
    """

    name = "asnorm"
    min_speakers = 2

    def __init__(self, embedding_type: str, topk: int = 300):
        super().__init__(embedding_type)
        if topk < 2:
            raise UserError(f"asnorm_topk must be at least 2 (a standard deviation), found {topk}")
        self.topk = topk

    def _fit(self, table: torch.Tensor, labels: np.ndarray, speakers: int) -> None:
        cohort = speaker_moments(table, labels, speakers, second=False).speaker_means
        if embedding_type_of(self.embedding_type).cosine:
            cohort = l2_normalize(cohort)
        self.cohort = cohort.astype(np.float32)

    def cohort_statistics(self, embeddings: np.ndarray | torch.Tensor,
                          rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mean and standard deviation (float64) of the top-k cohort scores of each of `rows`.

        Each chunk's rows, cohort scores and top-k land in buffers allocated once: fresh memory for
        every chunk costs a page fault per 4 KB, which took as long as the arithmetic."""
        table = _as_tensor(embeddings)
        cohort = _on(self.cohort, table)
        topk = min(self.topk, len(cohort))
        cosine = embedding_type_of(self.embedding_type).cosine
        cohort_norms = None if cosine else (cohort * cohort).sum(dim=1)
        index = torch.from_numpy(np.asarray(rows, np.int64)).to(table.device)
        means = torch.empty(len(index), dtype=torch.float64, device=table.device)
        stds = torch.empty_like(means)
        chunks = _row_chunks(len(index), len(cohort))
        size = chunks[0].stop if chunks else 0
        rows_buffer = table.new_empty((size, table.shape[1]))
        scores_buffer = table.new_empty((size, len(cohort)))
        top_buffer = (table.new_empty((size, topk)),
                      torch.empty((size, topk), dtype=torch.int64, device=table.device))
        for part in chunks:
            count = part.stop - part.start
            x = torch.index_select(table, 0, index[part], out=rows_buffer[:count])
            if cosine:
                x.div_(torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_(min=1e-12))
            scores = torch.matmul(x, cohort.T, out=scores_buffer[:count])
            if not cosine:
                # The highest scores -||x - c|| are those of the highest 2 x.c - |c|^2.
                scores.mul_(2).sub_(cohort_norms)
            top, _ = torch.topk(scores, topk, dim=1, sorted=False,
                                out=(top_buffer[0][:count], top_buffer[1][:count]))
            if cosine:
                top.sub_(1)
            else:
                squares = torch.linalg.vector_norm(x, dim=1, keepdim=True).square_()
                top.neg_().add_(squares).clamp_(min=0).sqrt_().neg_()
            stds[part], means[part] = torch.std_mean(top, dim=1, correction=0)
        return means.cpu().numpy(), stds.cpu().numpy()

    def _score(self, table: torch.Tensor, left: np.ndarray, right: np.ndarray) -> np.ndarray:
        raw = score_trials(table, left, right, self.embedding_type).astype(np.float64)
        used = np.zeros(len(table), bool)
        used[left] = used[right] = True
        rows = np.flatnonzero(used)
        means, stds = np.full(len(table), np.nan), np.full(len(table), np.nan)
        means[rows], stds[rows] = self.cohort_statistics(table, rows)
        stds = np.maximum(stds, 1e-12)  # a cohort of identical scores; does not occur in practice
        return (0.5 * ((raw - means[left]) / stds[left] + (raw - means[right]) / stds[right])).astype(
            np.float32)


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
            raise UserError("PLDA needs a training speaker with at least two utterances (a "
                            "within-speaker covariance)")
        within = moments.within_scatter() / (total - speakers)
        means = moments.speaker_means
        between = np.cov(means, rowvar=False, ddof=1).reshape(within.shape) \
            - within * np.mean(1 / moments.counts)
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
            raise UserError("PLDA: the within-speaker covariance is singular (too few training "
                            "utterances for the dimension)") from None
        psi = np.maximum(psi, 0)
        product = psi / (1 + 2 * psi)
        square = -psi ** 2 / ((1 + psi) * (1 + 2 * psi))
        constant = float(np.sum(np.log1p(psi) - 0.5 * np.log1p(2 * psi)))
        return transform, product, square, constant


def fit_two_covariance(embeddings: np.ndarray | torch.Tensor,
                       speakers: np.ndarray | Sequence) -> TwoCovariance:
    """TwoCovariance.from_moments of training embeddings (M, D) with their speaker labels (M,)."""
    table = _as_tensor(embeddings)
    labels, count = _speaker_index(speakers, len(table), 2, "plda")
    return TwoCovariance.from_moments(speaker_moments(table, labels, count))


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
    min_speakers = 2

    def __init__(self, embedding_type: str, lda_dim: int = 200):
        super().__init__(embedding_type)
        if lda_dim < 1:
            raise UserError(f"lda_dim must be at least 1, found {lda_dim}")
        self.lda_dim = lda_dim

    def _fit(self, table: torch.Tensor, labels: np.ndarray, speakers: int) -> None:
        if table.shape[1] < 2:
            raise UserError("the plda back-end needs embeddings of at least 2 dimensions")
        moments = speaker_moments(table, labels, speakers)
        self.mean = moments.mean
        self.lda = lda_projection(moments, min(self.lda_dim, table.shape[1] - 1, speakers - 1))
        self.plda = TwoCovariance.from_moments(speaker_moments(table, labels, speakers, self.project))
        self._scoring = self.plda.scoring()

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Rows centred, LDA-projected and length-normalised: the space the PLDA model lives in."""
        return nn.functional.normalize((x - _on(self.mean, x)) @ _on(self.lda, x), dim=1)

    def _score(self, table: torch.Tensor, left: np.ndarray, right: np.ndarray) -> np.ndarray:
        transform, product, square, constant = self._scoring
        mean, transform = _on(self.plda.mean, table), _on(transform, table)
        root_product, square = _on(np.sqrt(product), table), _on(square, table).double()
        # Per row: w = sqrt(P) u, so that sum(P u_a u_b) is the dot product w_a.w_b, and its own
        # term Q.u^2 / 2, computed once per row.
        scaled = torch.empty((len(table), len(product)), dtype=torch.float32, device=table.device)
        own = torch.empty(len(table), dtype=torch.float64, device=table.device)
        for rows in _row_chunks(len(table), table.shape[1]):
            u = (self.project(table[rows]) - mean) @ transform
            scaled[rows] = u * root_product
            own[rows] = 0.5 * (u.double() ** 2 @ square)
        own = own.cpu().numpy()
        cross = pair_scores(scaled, left, right, "dot")
        return (cross + own[left] + own[right] + constant).astype(np.float32)


BACKENDS: dict[str, type[Backend]] = {cls.name: cls for cls in (Backend, MeanBackend, AsNormBackend,
                                                                  PldaBackend)}


def make_backend(name: str, embedding_type: str, asnorm_topk: int = 300, lda_dim: int = 200) -> Backend:
    """The back-end called `name` (BACKENDS) for embeddings of `embedding_type` (B or C)."""
    if name not in BACKENDS:
        raise unknown_name("back-end", name, BACKENDS)
    if name == AsNormBackend.name:
        return AsNormBackend(embedding_type, asnorm_topk)
    if name == PldaBackend.name:
        return PldaBackend(embedding_type, lda_dim)
    return BACKENDS[name](embedding_type)


# ----------------------------------------------------------------------------------------------
# Bootstrap confidence intervals over test speakers

BOOTSTRAP_CHUNK = 2 ** 20  # trials x resamples in one chunk: each of its arrays takes 4 to 8 MB


def speaker_resamples(speakers: int, resamples: int, seed: int) -> np.ndarray:
    """(resamples, speakers) int64: how often each speaker is drawn when `speakers` speakers are
    drawn with replacement, once per resample."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(speakers, size=(resamples, speakers)) + speakers * np.arange(resamples)[:, None]
    return np.bincount(draws.reshape(-1), minlength=resamples * speakers).reshape(resamples, speakers)


class _RankedTrials:
    """One system's trials sorted by score (highest first), for weighted EERs of many resamples."""

    def __init__(self, scores: np.ndarray, labels: np.ndarray, speaker: np.ndarray):
        order = np.argsort(-scores, kind="stable")
        ordered = scores[order]
        self.target = labels[order]
        self.speaker = speaker[order]
        # Trials of one score form one threshold: the curve's points are the ends of the groups.
        ends = np.append(np.flatnonzero(ordered[1:] != ordered[:-1]), len(ordered) - 1)
        self.ends = None if len(ends) == len(ordered) else ends

    def eers(self, draws: np.ndarray) -> np.ndarray:
        """EER (%) of each resample (a row of `draws`: the weight of each speaker's trials), by
        compute_eer's rule applied to the weighted list: as compute_eer of the list in which each
        trial is repeated as often as its weight (NaN where a resample lacks a class).

        compute_eer takes sklearn's ROC points, which drop a point when the next point's step
        (targets, non-targets accepted) equals its own. A threshold whose trials all weigh 0 adds
        no point there, so a point is compared with the next point that moved."""
        weight = draws[:, self.speaker]
        target_weight = weight * self.target
        targets = np.cumsum(target_weight, axis=1, dtype=weight.dtype)
        if self.ends is None:
            # One trial a point: its step is (w, 0) or (0, w), held as one number, +w or -w.
            nontargets = np.cumsum(weight, axis=1, dtype=weight.dtype)
            nontargets -= targets
            moved = weight > 0
            step = target_weight
            step -= weight - target_weight
        else:
            accepted = np.cumsum(weight, axis=1, dtype=weight.dtype)[:, self.ends]
            targets = targets[:, self.ends]
            nontargets = accepted - targets
            target_step = np.diff(targets, axis=1, prepend=0).astype(np.int64)
            nontarget_step = np.diff(nontargets, axis=1, prepend=0)
            moved = (target_step + nontarget_step) > 0
            step = target_step * (int(accepted[:, -1].max()) + 1) + nontarget_step
        del weight, target_weight
        kept = moved & _differs_from_next_moved(moved, step)
        rows = np.arange(len(kept))
        first = np.argmax(moved, axis=1)
        kept[rows, first] = moved[rows, first]
        del step, moved
        with np.errstate(divide="ignore", invalid="ignore"):
            fnr = 1 - targets / targets[:, -1:]
            fpr = nontargets / nontargets[:, -1:]
        gap = np.abs(fnr - fpr)
        gap[~kept] = np.inf
        best = np.argmin(gap, axis=1)
        eer = np.maximum(fpr[rows, best], fnr[rows, best]) * 100
        # The curve's first point (nothing accepted: FNR 1, FPR 0, gap 1) wins ties, as in compute_eer.
        eer[gap[rows, best] >= 1] = 100.0
        eer[(targets[:, -1] == 0) | (nontargets[:, -1] == 0)] = np.nan
        return eer


def _differs_from_next_moved(moved: np.ndarray, step: np.ndarray) -> np.ndarray:
    """Per point: whether the next point that moved (along each row) takes another step, or there
    is none. Steps are non-negative integers."""
    width = moved.shape[1]
    moved_at = np.where(moved, np.arange(width, dtype=np.int32), width)
    next_moved = np.minimum.accumulate(moved_at[:, ::-1], axis=1)[:, ::-1]
    # the next moved point after each point: its own index's successor; `width`: none
    following = np.empty_like(next_moved)
    following[:, :-1] = next_moved[:, 1:]
    following[:, -1] = width
    padded = np.empty((len(step), width + 1), step.dtype)
    padded[:, :width] = step
    padded[:, width] = np.iinfo(step.dtype).min  # "no next point" differs from every step
    following += (np.arange(len(step), dtype=following.dtype) * (width + 1))[:, None]
    return padded.reshape(-1)[following] != step


def bootstrap_eer(scores: Sequence[np.ndarray] | np.ndarray, labels: np.ndarray, trial_speakers: np.ndarray,
                  resamples: int = 1000, seed: int = 0) -> np.ndarray:
    """(systems, resamples) EERs (%) of a bootstrap over test speakers.

    `scores`: one system's scores, or a sequence of systems' scores of the same trials;
    `trial_speakers`: each trial's speaker (that of its left, enrolment, file). Each resample draws
    the speakers with replacement and keeps all their trials, a speaker drawn k times weighing its
    trials k; every system sees the same resamples, so differences between systems are paired.
    The EER of a resample follows compute_eer's rule exactly (all weights 1 give compute_eer).
    """
    systems = [np.asarray(scores)] if isinstance(scores, np.ndarray) and scores.ndim == 1 else \
        [np.asarray(s) for s in scores]
    labels = np.asarray(labels).astype(bool)
    trial_speakers = np.asarray(trial_speakers)
    if any(s.shape != labels.shape for s in systems) or trial_speakers.shape != labels.shape:
        raise UserError("bootstrap: scores, labels and trial speakers must have one value per trial")
    if not all(np.isfinite(s).all() for s in systems):
        raise UserError("bootstrap: scores must be finite")
    if resamples < 1 or len(labels) == 0:
        raise UserError("bootstrap: needs trials and at least one resample")
    speakers, speaker = np.unique(trial_speakers, return_inverse=True)
    draws = speaker_resamples(len(speakers), resamples, seed)
    # Weighted counts as int32 where no sum can overflow it (halves the memory traffic).
    if len(speakers) * np.bincount(speaker.reshape(-1)).max() < 2 ** 31:
        draws = draws.astype(np.int32)
    ranked = [_RankedTrials(s, labels, speaker.reshape(-1)) for s in systems]
    eers = np.empty((len(systems), resamples))
    step = max(1, BOOTSTRAP_CHUNK // len(labels))
    for start in range(0, resamples, step):
        for system, trials in enumerate(ranked):
            eers[system, start:start + step] = trials.eers(draws[start:start + step])
    return eers


def interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The central `level` percentile interval of bootstrap values (NaNs left out)."""
    finite = np.asarray(values, np.float64)
    finite = finite[~np.isnan(finite)]
    if len(finite) == 0:
        return float("nan"), float("nan")
    lo, hi = np.percentile(finite, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


# ----------------------------------------------------------------------------------------------
# Calibration: scores -> log-likelihood ratios, Cllr, decision thresholds


def _two_classes(scores: np.ndarray, labels: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels).astype(bool)
    if scores.shape != labels.shape or labels.all() or not labels.any():
        raise UserError(f"{what} needs target (1) and non-target (0) trials, one score each")
    return scores, labels


def cllr(llr: np.ndarray, labels: np.ndarray) -> float:
    """Log-likelihood-ratio cost in bits: the mean of log2(1 + e^-llr) over target trials and of
    log2(1 + e^llr) over non-target trials, averaged over the two classes."""
    llr, labels = _two_classes(llr, labels, "Cllr")
    return float((np.logaddexp(0, -llr[labels]).mean() + np.logaddexp(0, llr[~labels]).mean())
                 / (2 * np.log(2)))


def min_cllr(scores: np.ndarray, labels: np.ndarray) -> float:
    """Cllr after the best monotone calibration of these very scores: pool-adjacent-violators
    (isotonic regression) gives the posterior of a target at each score under the list's own
    prior; less that prior's log-odds it is the optimal LLR."""
    scores, labels = _two_classes(scores, labels, "min Cllr")
    posterior = IsotonicRegression(y_min=0, y_max=1).fit_transform(scores, labels.astype(np.float64))
    with np.errstate(divide="ignore"):
        llr = np.log(posterior) - np.log1p(-posterior) - np.log(labels.sum() / (~labels).sum())
    return cllr(llr, labels)


def decision_thresholds(scores: np.ndarray, labels: np.ndarray, far: float = 0.01) -> dict[str, float]:
    """Thresholds (accept score >= threshold) chosen on these trials: `eer` compute_eer's, `far`
    the lowest one whose false-accept rate is at most `far`."""
    scores, labels = _two_classes(scores, labels, "decision thresholds")
    thresholds, _, nontargets = score_curve(scores, labels)
    allowed = np.floor(far * nontargets[-1] + 1e-9)
    within = np.flatnonzero(nontargets <= allowed)
    # None within: the highest score is a non-target's; a threshold above it accepts nothing.
    lowest = thresholds[within[-1]] if len(within) else np.nextafter(thresholds[0], np.inf)
    return {"eer": compute_eer(scores, labels)[1], "far": float(lowest)}


class Calibration:
    """Affine calibration of a system's scores to log-likelihood ratios, llr = slope x score + offset,
    fitted by logistic regression on a calibration trial list (held-out embeddings).

    The regression weighs both classes equally (class_weight="balanced"): its log-odds are then
    those of a target prior of 0.5, i.e. the LLR itself, whatever share of target trials the
    calibration list holds; that fit minimises Cllr on the calibration list. `thresholds` are chosen
    on the calibration list: "raw" on the scores, "llr" on the calibrated ones (decision_thresholds).
    """

    def __init__(self, slope: float, offset: float, thresholds: dict[str, dict[str, float]] | None = None):
        self.slope, self.offset = float(slope), float(offset)
        self.thresholds = thresholds or {}

    @classmethod
    def fit(cls, scores: np.ndarray, labels: np.ndarray, far: float = 0.01) -> Calibration:
        scores, labels = _two_classes(scores, labels, "calibration")
        # Fitted on standardised scores, then mapped back: the solver converges alike at any scale.
        centre, scale = scores.mean(), scores.std() or 1.0
        model = LogisticRegression(C=np.inf, class_weight="balanced")
        model.fit(((scores - centre) / scale)[:, None], labels)
        slope = model.coef_[0, 0] / scale
        calibration = cls(slope, model.intercept_[0] - slope * centre)
        calibration.thresholds = {"raw": decision_thresholds(scores, labels, far),
                                  "llr": decision_thresholds(calibration.llr(scores), labels, far)}
        return calibration

    def llr(self, scores: np.ndarray) -> np.ndarray:
        return self.slope * np.asarray(scores, np.float64) + self.offset

    def as_dict(self) -> dict:
        return {"slope": self.slope, "offset": self.offset, "thresholds": self.thresholds}


THRESHOLD_NAMES = {"eer": "equal error", "far": "false accepts 1 %"}


def decision_records(trials: str, scores: Mapping[tuple[str, str], np.ndarray], labels: np.ndarray,
                     calibrations: Mapping[tuple[str, str], Calibration]) -> list[dict]:
    """How the thresholds chosen on the calibration list decide on this trial list: per calibrated
    (system, back-end) and per threshold (`eer`, `far`), the raw and calibrated (LLR) thresholds
    with the false-accept and miss rates they give here."""
    records = []
    for (system, backend), calibration in calibrations.items():
        if (system, backend) not in scores:
            continue
        targets = np.asarray(labels).astype(bool)
        accepted = np.asarray(scores[(system, backend)]) >= np.array(
            [[calibration.thresholds["raw"][kind]] for kind in ("eer", "far")])
        for row, kind in enumerate(("eer", "far")):
            records.append({"trials": trials, "system": system, "backend": backend, "threshold": kind,
                            "raw_threshold": calibration.thresholds["raw"][kind],
                            "llr_threshold": calibration.thresholds["llr"][kind],
                            "far": float(accepted[row][~targets].mean()),
                            "miss": float(1 - accepted[row][targets].mean())})
    return records


# ----------------------------------------------------------------------------------------------
# Results: records of one trial list (check.json) and their table

SYSTEMS = ("original", "enhanced")
# Names in a trials_<list>.npz of each system's none back-end scores: all that files of earlier
# versions hold, still written beside `<system>/<back-end>` for readers of those files.
NONE_ALIASES = {"original": "original", "processed": "enhanced"}


def trial_list_records(trials: str, scores: Mapping[tuple[str, str], np.ndarray], labels: np.ndarray,
                       trial_speakers: np.ndarray,
                       calibrations: Mapping[tuple[str, str], Calibration] | None = None,
                       resamples: int = 1000, seed: int = 0) -> list[dict]:
    """The records of one trial list: per (system, back-end) of `scores` its EER with a 95 %
    bootstrap interval over speakers, minDCF at P_target 0.05 and 0.01, and with a Calibration
    of that pair Cllr and min Cllr; then per back-end scored by both SYSTEMS the paired difference
    enhanced - original of the EER with its interval (the same resamples for both)."""
    records, differences = [], []
    for backend in dict.fromkeys(backend for _, backend in scores):
        systems = [system for system, name in scores if name == backend]
        eers = bootstrap_eer([scores[(system, backend)] for system in systems], labels, trial_speakers,
                             resamples, seed)
        point = {}
        for system, sample in zip(systems, eers, strict=True):
            system_scores = scores[(system, backend)]
            metrics = evaluate_scores(system_scores, labels)
            point[system] = metrics["eer"]
            record = {"trials": trials, "system": system, "backend": backend, "eer": metrics["eer"],
                      "eer_ci95": list(interval(sample)), "mindcf_p05": metrics["mindcf"],
                      "mindcf_p01": metrics["mindcf01"]}
            if calibrations and (system, backend) in calibrations:
                record["cllr"] = cllr(calibrations[(system, backend)].llr(system_scores), labels)
                record["min_cllr"] = min_cllr(system_scores, labels)
            records.append(record)
        if all(system in systems for system in SYSTEMS):
            original, enhanced = (systems.index(system) for system in SYSTEMS)
            differences.append({"trials": trials, "backend": backend,
                                "eer_diff": point[SYSTEMS[1]] - point[SYSTEMS[0]],
                                "eer_diff_ci95": list(interval(eers[enhanced] - eers[original]))})
    return records + differences


def _columns(rows: list[list[str]]) -> list[str]:
    """Rows of cells as lines of left-aligned columns, with a rule under the first (the header)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
             for row in rows]
    return [lines[0], "-" * max(len(line) for line in lines), *lines[1:]]


def _ci(values: Sequence[float]) -> str:
    return f"[{values[0]:.2f}, {values[1]:.2f}]"


def results_table(records: list[dict]) -> str:
    """Plain-text table of trial_list_records' records: one row per (trial list, system, back-end)
    with EER % [95 % CI], minDCF 0.05 and 0.01 (and Cllr, min Cllr where present); then per trial
    list and back-end the paired EER difference enhanced - original, its interval, and whether
    that excludes 0."""
    systems = [r for r in records if "eer" in r]
    differences = [r for r in records if "eer_diff" in r]
    decisions = [r for r in records if "threshold" in r]
    lines = []
    if systems:
        calibrated = any("cllr" in r for r in systems)
        rows = [["trials", "system", "back-end", "EER %", "[95 % CI]", "minDCF 0.05", "minDCF 0.01"]
                + (["Cllr", "min Cllr"] if calibrated else [])]
        for r in systems:
            rows.append([r["trials"], r["system"], r["backend"], f"{r['eer']:.2f}", _ci(r["eer_ci95"]),
                         f"{r['mindcf_p05']:.4f}", f"{r['mindcf_p01']:.4f}"]
                        + ([f"{r['cllr']:.4f}" if "cllr" in r else "-",
                            f"{r['min_cllr']:.4f}" if "min_cllr" in r else "-"] if calibrated else []))
        lines += _columns(rows)
    if differences:
        rows = [["trials", "back-end", "EER enhanced - original", "[95 % CI]", "excludes 0"]]
        for r in differences:
            lo, hi = r["eer_diff_ci95"]
            rows.append([r["trials"], r["backend"], f"{r['eer_diff']:+.2f}", _ci(r["eer_diff_ci95"]),
                         "yes" if lo > 0 or hi < 0 else "no"])
        lines += ([""] if lines else []) + _columns(rows)
    if decisions:
        rows = [["trials", "system", "back-end", "threshold (chosen on calib_list)", "raw score", "LLR",
                 "false accepts %", "misses %"]]
        for r in decisions:
            rows.append([r["trials"], r["system"], r["backend"], THRESHOLD_NAMES[r["threshold"]],
                         f"{r['raw_threshold']:.4f}", f"{r['llr_threshold']:.3f}", f"{100 * r['far']:.2f}",
                         f"{100 * r['miss']:.2f}"])
        lines += ([""] if lines else []) + _columns(rows)
    return "\n".join(lines)
