"""The baseline of the bench's stages (tests/bench.py): the original repository's way of working
(one file per sample, a per-trial loop, Python-list error rates), re-created for measurement."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from bench_data import EMBEDDING_TYPE, Tree
from torch.utils.data import DataLoader, Dataset

from m_DataLoader import Batch, load_speaker_embeddings, read_list
from scoring.metrics import compute_eer


def reduce_file(path: Path) -> np.ndarray:
    """Open one embedding file, average its crops, L2-normalise: the original repository's work per sample."""
    mean = np.load(path).mean(axis=0)
    return mean / np.linalg.norm(mean)


class PerFileDataset(Dataset):
    """One file per sample, as the original repository: every item opens its utterance's file anew.
    Speaker targets are held in memory (which favours the baseline)."""

    def __init__(self, tree: Tree, records: list[tuple], targets: torch.Tensor, speakers: list[str]):
        index = {spk: i for i, spk in enumerate(speakers)}
        self.files = [tree.embed_dir / rel for _, rel in records]
        self.speaker = [index[spk] for spk, _ in records]
        self.targets = targets

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        return torch.from_numpy(reduce_file(self.files[i])), self.targets[self.speaker[i]], self.speaker[i]


def collate_batch(samples: list[tuple[torch.Tensor, torch.Tensor, int]]) -> Batch:
    inputs, targets, labels = zip(*samples, strict=True)
    return Batch(inputs=torch.stack(inputs), targets=torch.stack(targets), labels=torch.tensor(labels))


class SpeakerPairsDataset(Dataset):
    """The original repository's DA data path: item k is speaker k's step; its pair files are reopened."""

    def __init__(self, tree: Tree, records: list[tuple], targets: torch.Tensor, speakers: list[str]):
        self.root = tree.embed_dir
        self.speakers = speakers
        self.pairs: dict[str, list[tuple]] = {spk: [] for spk in speakers}
        for spk, a, b, flag in records:
            self.pairs[spk].append((a, b, flag))
        self.targets = targets

    def __len__(self) -> int:
        return len(self.speakers)

    def __getitem__(self, k: int) -> Batch:
        pairs = self.pairs[self.speakers[k]]
        rows = [reduce_file(self.root / rel) for a, b, _ in pairs for rel in (a, b)]
        return Batch(
            inputs=torch.from_numpy(np.stack(rows)),
            targets=self.targets[k].expand(len(rows), -1).clone(),
            labels=torch.full((len(rows),), k),
            pair_same=torch.tensor([f == 1 for *_, f in pairs]),
            pair_speaker=torch.full((len(pairs),), k),
        )


def per_file_loader(args: argparse.Namespace, tree: Tree, kind: str) -> DataLoader:
    """A one-file-per-sample DataLoader over the same list, with nDataLoaderThread workers."""
    records = read_list(tree.list_path(kind), kind)
    speakers = sorted({r[0] for r in records})
    targets = torch.from_numpy(
        load_speaker_embeddings(tree.embed_dir, speakers, EMBEDDING_TYPE[kind], args.dim)
    )
    if kind == "distribution":
        return DataLoader(
            SpeakerPairsDataset(tree, records, targets, speakers),
            batch_size=None,
            shuffle=True,
            num_workers=args.workers,
        )
    return DataLoader(
        PerFileDataset(tree, records, targets, speakers),
        batch_size=args.batch_size,
        shuffle=True,
        num_workers=args.workers,
        collate_fn=collate_batch,
    )


def per_trial_scores(
    matrix: np.ndarray, left: np.ndarray, right: np.ndarray, device: torch.device
) -> list[float]:
    """One Python iteration and one device transfer per trial, as the original repository scored."""
    scores = []
    for i, j in zip(left.tolist(), right.tolist(), strict=True):
        a = torch.from_numpy(matrix[i]).to(device)
        b = torch.from_numpy(matrix[j]).to(device)
        scores.append(-float(F.pairwise_distance(a[None], b[None]).detach().cpu().numpy().mean()))
    return scores


def original_trial_parse(path: Path) -> dict[str, int]:
    """The original repository's reading of a trial list: every line read and split, the distinct
    files collected and sorted, a dictionary from file to its embedding (here its row)."""
    with open(path) as file:
        lines = file.readlines()
    files = []
    for line in lines:
        data = line.split()
        files += [data[1], data[2]]
    return {name: row for row, name in enumerate(sorted(set(files)))}


def python_error_rates(scores: list[float], labels: list[int]) -> tuple[list[float], list[float]]:
    """Miss and false-alarm rates at every score, built one element at a time in Python lists."""
    ordered = [labels[k] for k in sorted(range(len(scores)), key=scores.__getitem__)]
    targets = sum(ordered)
    nontargets = len(ordered) - targets
    misses, accepted, fnrs, fprs = 0, 0, [], []
    for label in ordered:
        misses += label
        accepted += 1 - label
        fnrs.append(misses / targets)
        fprs.append(1 - accepted / nontargets)
    return fnrs, fprs


def python_min_dcf(fnrs: list[float], fprs: list[float], p_target: float) -> float:
    best = min(fnr * p_target + fpr * (1 - p_target) for fnr, fpr in zip(fnrs, fprs, strict=True))
    return best / min(p_target, 1 - p_target)


def per_trial_metrics(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float, float]:
    """EER on sklearn's ROC curve and minDCF(0.05, 0.01) from Python-list error rates."""
    fnrs, fprs = python_error_rates(scores.tolist(), labels.tolist())
    return compute_eer(scores, labels)[0], python_min_dcf(fnrs, fprs, 0.05), python_min_dcf(fnrs, fprs, 0.01)
