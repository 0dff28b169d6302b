"""Scores of trials between rows of an embedding table, and the verification metrics: EER and
minDCF at the operating points P_TARGETS."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import nn

from m_utils import UserError

SCORE_CHUNK = 1024
# The minDCF operating points (P_target) of every table and record, and their names there.
P_TARGETS = (0.05, 0.01)


def mindcf_key(p_target: float) -> str:
    """The name of minDCF at `p_target` in records and metrics: 0.05 -> mindcf_p05."""
    return f"mindcf_p{round(p_target * 100):02d}"


def l2_normalize(array: np.ndarray) -> np.ndarray:
    """Rows (the last axis) scaled to unit length; all-zero rows stay zero."""
    norm = np.linalg.norm(array, axis=-1, keepdims=True)
    return array / np.maximum(norm, 1e-12)


def score_trials(
    embeddings: np.ndarray | torch.Tensor, left: np.ndarray, right: np.ndarray, cosine: bool
) -> np.ndarray:
    """Score trials (left[i], right[i]) between rows of `embeddings` -> float32 scores: with
    `cosine` -(1 - cos(a, b)) (cosine distance, embedding type C), else -||a - b|| (L2 distance,
    type B)."""
    if not isinstance(cosine, bool):
        raise TypeError(f"cosine must be a bool, found {cosine!r}")
    return pair_scores(embeddings, left, right, "cosine" if cosine else "l2")


PAIR_KINDS = ("cosine", "l2", "dot")


def pair_scores(
    embeddings: np.ndarray | torch.Tensor, left: np.ndarray, right: np.ndarray, kind: str
) -> np.ndarray:
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
    order = np.argsort(left)
    left, right = left[order], right[order]
    out = np.empty(len(left), np.float32)
    starts = range(0, len(left), SCORE_CHUNK)
    threads = max(1, min(torch.get_num_threads(), len(starts)))
    # Each thread gathers into its own two buffers, allocated once: fresh memory for every chunk
    # would cost a page fault per 4 KB, more than the arithmetic.
    buffers = np.empty((threads, 2, SCORE_CHUNK, table.shape[1]), np.float32)

    def score_part(part: int) -> None:
        for start in starts[part::threads]:
            stop = min(start + SCORE_CHUNK, len(left))
            # mode="clip" (rows were checked above) lets take() write straight into the buffer
            a = table.take(left[start:stop], axis=0, out=buffers[part, 0, : stop - start], mode="clip")
            b = table.take(right[start:stop], axis=0, out=buffers[part, 1, : stop - start], mode="clip")
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


def _score_on_device(table: torch.Tensor, left: np.ndarray, right: np.ndarray, kind: str) -> np.ndarray:
    """pair_scores on the table's GPU, in chunks of about 4 MB of gathered rows each."""
    if kind == "cosine":
        table = nn.functional.normalize(table, dim=1)
    left_rows = torch.from_numpy(left).to(table.device)
    right_rows = torch.from_numpy(right).to(table.device)
    chunk = max(SCORE_CHUNK, 2**20 // max(1, table.shape[1]))
    out = torch.empty(len(left), dtype=table.dtype, device=table.device)
    for start in range(0, len(left), chunk):
        a = table[left_rows[start : start + chunk]]
        b = table[right_rows[start : start + chunk]]
        if kind == "l2":
            out[start : start + len(a)] = -(a - b).norm(dim=1)
        else:
            dots = (a * b).sum(dim=1)
            out[start : start + len(a)] = dots - 1 if kind == "cosine" else dots
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


def _eer_of_curve(thresholds: np.ndarray, targets: np.ndarray, nontargets: np.ndarray) -> tuple[float, float]:
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


def interpolated_eer_of_rates(miss: np.ndarray, false_alarm: np.ndarray) -> float:
    """EER in % as WeSpeaker and most papers define it: where the miss and false-alarm rates cross,
    on the straight line between the last operating point where false alarms exceed misses and the
    next one (compute_eer keeps voxceleb_trainer's definition, the tables' default)."""
    gap = false_alarm - miss  # 1 when everything is accepted, falling to -1 when nothing is
    after = int(np.flatnonzero(gap <= 0)[0])
    before = after - 1
    share = gap[before] / (gap[before] - gap[after])
    return float((miss[before] + share * (miss[after] - miss[before])) * 100)


def interpolated_eer(scores: np.ndarray, labels: np.ndarray) -> float:
    """interpolated_eer_of_rates of a list's scores."""
    miss, false_alarm, _ = error_rates(scores, labels)
    return interpolated_eer_of_rates(miss, false_alarm)


def min_dcf_of_rates(
    miss: np.ndarray, false_alarm: np.ndarray, p_target: float, c_miss: float = 1.0, c_fa: float = 1.0
) -> float:
    cost = c_miss * miss * p_target + c_fa * false_alarm * (1 - p_target)
    return float(cost.min() / min(c_miss * p_target, c_fa * (1 - p_target)))


def compute_min_dcf(
    scores: np.ndarray, labels: np.ndarray, p_target: float = 0.05, c_miss: float = 1.0, c_fa: float = 1.0
) -> float:
    """Normalised minimum detection cost (NIST SRE)."""
    miss, false_alarm, _ = error_rates(scores, labels)
    return min_dcf_of_rates(miss, false_alarm, p_target, c_miss, c_fa)


def evaluate_scores(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """EER (compute_eer's), its threshold, the interpolated EER (`eer_interpolated`) and minDCF
    at each of P_TARGETS (keys by mindcf_key), from one sort."""
    curve = score_curve(scores, labels)
    eer, threshold = _eer_of_curve(*curve)
    miss, false_alarm = _rates_of_curve(*curve[1:])
    return {
        "eer": eer,
        "threshold": threshold,
        "eer_interpolated": interpolated_eer_of_rates(miss, false_alarm),
        **{mindcf_key(p): min_dcf_of_rates(miss, false_alarm, p) for p in P_TARGETS},
    }
