"""Classification metrics in pure numpy: accuracy, ROC-AUC (ties count one half), macro AUC, MAE.

The core's metrics, used by training (CFT model selection) and, through `pipelines.metrics`, by
evaluation. Binary probabilities are `(N,)`, race probabilities `(N, 3)`, labels integer codes
`(N,)`; an AUC with one class only is NaN, never an exception.
"""

from __future__ import annotations

import numpy as np


def as_1d(a, name: str) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array, got shape {a.shape}")
    return a


# ------------------------------------------------------------------------------ effectiveness
def accuracy(probs, labels) -> float:
    """Binary (probabilities `(N,)`, threshold 0.5) or multi-class (argmax of `(N, C)`) accuracy."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels).astype(np.int64).ravel()
    if y.size == 0:
        return float("nan")
    pred = (p >= 0.5).astype(np.int64) if p.ndim == 1 else p.argmax(axis=1)
    return float((pred == y).mean())


def average_ranks(scores) -> np.ndarray:
    """1-based ranks with ties given the mean of the ranks they span."""
    s = as_1d(scores, "scores")
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    # Boundaries of runs of equal values in the sorted order.
    starts = np.flatnonzero(np.r_[True, sorted_s[1:] != sorted_s[:-1]])
    ends = np.r_[starts[1:], s.size]
    run_rank = (starts + 1 + ends) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(s.size, dtype=np.float64)
    ranks[order] = np.repeat(run_rank, ends - starts)
    return ranks


def roc_auc(scores, labels) -> float:
    """ROC-AUC via the Mann-Whitney U statistic (ties count one half); NaN if a class is absent."""
    s = as_1d(scores, "scores")
    y = np.asarray(labels).astype(np.int64).ravel()
    if s.size != y.size:
        raise ValueError(f"scores and labels differ in length ({s.size} vs {y.size})")
    pos = y == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = average_ranks(s)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def macro_auc_ovr(probs, labels) -> float:
    """Mean one-vs-rest AUC over the classes whose AUC is defined (present and absent in the labels)."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels).astype(np.int64).ravel()
    aucs = [roc_auc(p[:, c], (y == c).astype(np.int64)) for c in range(p.shape[1])]
    aucs = [a for a in aucs if not np.isnan(a)]
    return float(np.mean(aucs)) if aucs else float("nan")


def mae(pred, target) -> float:
    p, t = as_1d(pred, "pred"), as_1d(target, "target")
    return float(np.abs(p - t).mean()) if p.size else float("nan")
