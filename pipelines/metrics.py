"""Pure numpy metrics of SCIENCE.md section 6: effectiveness, amplification, drift, standard errors.

The effectiveness metrics (accuracy, ROC-AUC, MAE) live in the core, `cxrcf.metrics`, and are
re-exported here so that evaluation reads every metric from one module.

Conventions: binary probabilities are shape `(N,)` (probability of class 1), race probabilities
`(N, 3)`; labels are integer class codes `(N,)`. Undefined values (an AUC with one class only, the
mean of nothing) are NaN, never an exception, so that a small test split still yields a report.
"""

from __future__ import annotations

import numpy as np

from cxrcf.metrics import accuracy, as_1d, average_ranks, macro_auc_ovr, mae, roc_auc  # noqa: F401

P_CLIP = 1e-6


def mean_stderr(values) -> tuple[float, float]:
    """Mean and its standard error (sample std with ddof=1 over sqrt(n)); stderr 0 for n == 1."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        return float("nan"), float("nan")
    if v.size == 1:
        return float(v[0]), 0.0
    return float(v.mean()), float(v.std(ddof=1) / np.sqrt(v.size))


# ------------------------------------------------------------------------------ amplification
def factual_prob(probs, labels) -> np.ndarray:
    """p_y: the probability the predictor gives the factual class y, clipped to [1e-6, 1 - 1e-6]."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels).astype(np.int64).ravel()
    if p.ndim == 1:
        py = np.where(y == 1, p, 1.0 - p)
    else:
        py = p[np.arange(y.size), y]
    return np.clip(py, P_CLIP, 1.0 - P_CLIP)


def log_odds_factual(probs, labels) -> np.ndarray:
    """lo_y = log(p_y / (1 - p_y)): +logit for y=1 and -logit for y=0 (binary); one-vs-rest (race)."""
    py = factual_prob(probs, labels)
    return np.log(py) - np.log1p(-py)


def _shift_summary(lo_before, lo_after, p_before, p_after) -> dict:
    amp, amp_se = mean_stderr(lo_after - lo_before)
    drift, drift_se = mean_stderr(np.abs(p_after - p_before))
    return {"mean": amp, "stderr": amp_se, "drift": drift, "drift_stderr": drift_se, "n": int(lo_before.size)}


def amplification(p_before, p_after, labels, group_names=None) -> dict:
    """AMP = mean(lo_y(after) - lo_y(before)) and drift = mean|p_y(after) - p_y(before)|.

    Returned overall (`mean`, `stderr`, `drift`, `drift_stderr`, `n`) and per factual class of the
    attribute under `subgroups` (keyed by `group_names[c]`, or the code as a string). `before` is the
    predictor on x (or, for ground truth, on the true counterfactual), `after` on the model's x*.
    """
    y = np.asarray(labels).astype(np.int64).ravel()
    lo_b, lo_a = log_odds_factual(p_before, y), log_odds_factual(p_after, y)
    pb, pa = factual_prob(p_before, y), factual_prob(p_after, y)
    out = _shift_summary(lo_b, lo_a, pb, pa)
    n_classes = np.asarray(p_before).shape[1] if np.asarray(p_before).ndim == 2 else 2
    groups = {}
    for c in range(n_classes):
        m = y == c
        name = group_names[c] if group_names is not None else str(c)
        groups[name] = _shift_summary(lo_b[m], lo_a[m], pb[m], pa[m])
    out["subgroups"] = groups
    return out


def logit(p) -> np.ndarray:
    """Clipped logit of probabilities (for the before/after scatter of binary attributes)."""
    q = np.clip(np.asarray(p, dtype=np.float64), P_CLIP, 1.0 - P_CLIP)
    return np.log(q) - np.log1p(-q)


def l1(a, b) -> float:
    """Mean absolute difference per pixel (images in the model's [-1, 1] scale)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).mean()) if a.size else float("nan")


def combine_stderr(means, stderrs) -> tuple[float, float]:
    """Mean of independent estimates (e.g. seeds) with a stderr that counts both their own
    sampling error and the spread between them (the seed-to-seed variation of training)."""
    m = np.asarray(means, dtype=np.float64)
    s = np.asarray(stderrs, dtype=np.float64)
    if m.size == 0:
        return float("nan"), float("nan")
    within = float(np.sqrt(np.sum(s**2)) / m.size)
    between = float(m.std(ddof=1) / np.sqrt(m.size)) if m.size > 1 else 0.0
    return float(m.mean()), float(np.sqrt(within**2 + between**2))


def soft_vs_hard(none: tuple[float, float], hard: tuple[float, float], soft: tuple[float, float],
                 hard_auc: dict[str, float], soft_auc: dict[str, float], max_ratio: float = 0.5,
                 max_auc_points: float = 5.0) -> dict:
    """The study's claim at one CFT strength (issue 5), from (mean, stderr) amplification pairs.

    Hard amplifies measurably when its mean exceeds no-CFT's by more than twice the standard error
    of the difference. Where it does, the claim holds when soft's mean is at most `max_ratio` of
    hard's in size (|soft|, so erasing evidence does not count as a win) and every intervened attribute's AUC (x100) is within `max_auc_points` of hard's.
    """
    diff = hard[0] - none[0]
    se = float(np.sqrt(hard[1] ** 2 + none[1] ** 2))
    measurable = bool(diff > 2.0 * se)
    ratio = soft[0] / hard[0] if hard[0] > 0 else float("nan")
    gaps = {k: 100.0 * abs(soft_auc[k] - hard_auc[k]) for k in hard_auc
            if k in soft_auc and hard_auc[k] is not None and soft_auc[k] is not None}
    max_gap = max(gaps.values()) if gaps else float("nan")
    holds = bool(measurable and abs(soft[0]) <= max_ratio * hard[0] and max_gap <= max_auc_points)
    return {"hard_minus_none": float(diff), "hard_minus_none_stderr": se, "hard_amplifies": measurable,
            "soft_over_hard": float(ratio), "auc_gap_points": gaps, "max_auc_gap_points": float(max_gap),
            "claim_holds": holds if measurable else None}
