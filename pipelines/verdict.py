"""The amplification study's primary endpoint and its pre-registered verdict (issue 15, SCIENCE.md 6b).

Pure numpy on per-image numbers, so every rule can be tested on hand-made values.

Endpoint of a generator for the pair j|do(k), in an ambiguity stratum of j (defined by the simulator's
noise, `cxrcf.synth.ambiguity_strata`, never by predictor outputs):
    Delta_d = mean over images flipped in direction d of [lo_j(x*) - lo_j(x*_true)]
    A = mean over directions d of Delta_d
lo_j is the evaluation predictor's log-odds of the factual class of j. Measuring against the TRUE
counterfactual removes the truth's own shift of the predictor; averaging directions with equal weight
removes the prevalence of each direction; a stratum keeps ambiguous and clear images apart.

Comparisons between generators (hard - none, soft - none) are paired per image: on the same images,
lo_j(x*_true) cancels and what is left is mean_d mean[lo_j(x*_a) - lo_j(x*_b)]. Their standard errors
combine the images' spread with the spread between CFT seeds (`metrics.combine_stderr`).

The verdict (`decide`), fixed before the study is run:
- preconditions, else "no verdict" (never "refuted"): the generator check passed; hard amplifies
  (A_hard - A_none > 2 SE, with >= MIN_SEEDS CFT seeds); a matched, non-overshooting pair of hard and
  soft checkpoints exists (do(k) AUC within MATCH_TOL of each other and at most the truth's);
- "reproduced": R = (A_soft - A_none) / (A_hard - A_none) <= 0.5 with the upper end of its 95%
  interval (Fieller) below 0.8, soft not below none by more than 2 SE (it did not get there by erasing
  evidence), and the evidence regressors agree;
- "refuted": R >= 0.8 with an interval that excludes 0.5;
- anything else "inconclusive".
"""

from __future__ import annotations

import math

import numpy as np

from pipelines.metrics import combine_stderr

PRIMARY_PAIR = ("finding", "sex")  # finding|do(sex): the largest hard/soft target gap
SECONDARY_PAIR = ("sex", "finding")
PRIMARY_STRATUM = "ambiguous"
MIN_SEEDS = 3
MATCH_TOL = 0.02
Z95 = 1.959963984540054
REPRODUCED_MAX_RATIO = 0.5
REPRODUCED_MAX_UPPER = 0.8
REFUTED_MIN_RATIO = 0.8
VERDICTS = ("reproduced", "refuted", "inconclusive", "no verdict")


# ------------------------------------------------------------------------------------ endpoint
def _check_lengths(**arrays) -> int:
    sizes = {k: np.asarray(v).shape[0] for k, v in arrays.items() if v is not None}
    if len(set(sizes.values())) > 1:
        raise ValueError("per-image arrays differ in length: " + ", ".join(f"{k} {n}" for k, n in sizes.items()))
    return next(iter(sizes.values()))


def direction_endpoint(values, direction, mask=None, other=None) -> dict:
    """Per-direction means of per-image `values` (and their equal-weight average A) within `mask`.

    `other`, when given, is a second per-image array of the same images: the result then also holds
    the covariance of A with the same statistic of `other` (for the ratio's interval).
    """
    n = _check_lengths(values=values, direction=direction, mask=mask, other=other)
    v = np.asarray(values, dtype=np.float64)
    d = np.asarray(direction).astype(str)
    m = np.ones(n, bool) if mask is None else np.asarray(mask, bool)
    dirs = {}
    cov = 0.0
    for label in sorted(set(d[m])):
        sel = m & (d == label)
        k = int(sel.sum())
        mean = float(v[sel].mean())
        se = float(v[sel].std(ddof=1) / math.sqrt(k)) if k > 1 else float("nan")
        dirs[label] = {"mean": mean, "stderr": se, "n": k}
        if other is not None:
            o = np.asarray(other, dtype=np.float64)[sel]
            cov += float(np.cov(v[sel], o, ddof=1)[0, 1] / k) if k > 1 else float("nan")
    if not dirs:
        return {"directions": {}, "A": float("nan"), "stderr": float("nan"), "n": 0}
    nd = len(dirs)
    a = float(np.mean([x["mean"] for x in dirs.values()]))
    se = float(math.sqrt(sum(x["stderr"] ** 2 for x in dirs.values())) / nd)
    out = {"directions": dirs, "A": a, "stderr": se, "n": int(m.sum())}
    if other is not None:
        out["cov_with_other"] = cov / nd**2
    return out


def endpoint(lo_star, lo_true, direction, mask=None) -> dict:
    """A of one generator against the true counterfactuals: values lo_j(x*) - lo_j(x*_true)."""
    _check_lengths(lo_star=lo_star, lo_true=lo_true, direction=direction, mask=mask)
    return direction_endpoint(np.asarray(lo_star, float) - np.asarray(lo_true, float), direction, mask)


def paired_difference(lo_a_seeds, lo_b, direction, mask=None, lo_c_seeds=None) -> dict:
    """A_a - A_b over CFT seeds of a (one per-image array per seed) against one baseline b.

    Per seed the difference is paired per image (the truth cancels); the seeds' differences are
    combined with `combine_stderr` (image-level and seed-to-seed error). With `lo_c_seeds` (another
    generator's seeds, e.g. hard when a is soft) it also returns the covariance of the two differences
    that comes from sharing b's images (what Fieller's interval needs).
    """
    lo_b = np.asarray(lo_b, float)
    per_seed, covs = [], []
    for i, lo_a in enumerate(lo_a_seeds):
        other = None
        if lo_c_seeds is not None:
            other = np.asarray(lo_c_seeds[i % len(lo_c_seeds)], float) - lo_b
        per_seed.append(direction_endpoint(np.asarray(lo_a, float) - lo_b, direction, mask, other))
        if other is not None:
            covs.append(per_seed[-1]["cov_with_other"])
    mean, se = combine_stderr([s["A"] for s in per_seed], [s["stderr"] for s in per_seed])
    out = {"mean": mean, "stderr": se, "seeds": len(per_seed), "per_seed": [s["A"] for s in per_seed],
           "directions": _mean_directions(per_seed)}
    if covs:
        out["cov_with_other"] = float(np.sum(covs) / len(covs) ** 2)
    return out


def _mean_directions(per_seed: list[dict]) -> dict:
    labels = sorted({d for s in per_seed for d in s["directions"]})
    return {d: float(np.mean([s["directions"][d]["mean"] for s in per_seed if d in s["directions"]]))
            for d in labels}


def pooled_amp(lo_star, lo_x) -> float:
    """The old pooled AMP against x (kept as a secondary figure): mean lo_j(x*) - lo_j(x)."""
    return float(np.mean(np.asarray(lo_star, float) - np.asarray(lo_x, float)))


# --------------------------------------------------------------------------------------- ratio
def fieller_interval(num: float, den: float, var_num: float, var_den: float, cov: float = 0.0,
                     z: float = Z95) -> tuple[float, float]:
    """Fieller's confidence interval for num/den; (-inf, inf) when den is not clearly non-zero."""
    a = den * den - z * z * var_den
    b = num * den - z * z * cov
    c = num * num - z * z * var_num
    disc = b * b - a * c
    if a <= 0 or disc < 0:
        return -math.inf, math.inf
    root = math.sqrt(disc)
    return (b - root) / a, (b + root) / a


# ---------------------------------------------------------------------------- matched points
def match_points(hard: list[dict], soft: list[dict], true_auc: float, tol: float = MATCH_TOL) -> dict | None:
    """The hard/soft pair (points with `auc` of do(k) and a `label`) whose AUCs agree within `tol`,
    neither above the true counterfactuals' AUC. Among such pairs: the most effective (largest lower
    AUC of the two), then the closest. None when no pair qualifies."""
    best = None
    for h in hard:
        for s in soft:
            ah, as_ = h.get("auc"), s.get("auc")
            if ah is None or as_ is None or not (math.isfinite(ah) and math.isfinite(as_)):
                continue
            if abs(ah - as_) > tol or ah > true_auc or as_ > true_auc:
                continue
            key = (min(ah, as_), -abs(ah - as_))
            if best is None or key > best[0]:
                best = (key, h, s)
    if best is None:
        return None
    return {"hard": best[1]["label"], "soft": best[2]["label"], "hard_auc": best[1]["auc"],
            "soft_auc": best[2]["auc"], "true_auc": true_auc}


# -------------------------------------------------------------------------------------- verdict
def decide(generator_check: bool | None, hard_minus_none: dict, soft_minus_none: dict, matched: dict | None,
           regressors_agree: bool | None) -> dict:
    """The pre-registered verdict from the primary endpoint's paired differences.

    `hard_minus_none` / `soft_minus_none`: `paired_difference` results (mean, stderr, seeds; the soft
    one with `cov_with_other`, its covariance with the hard one). `generator_check`: the generator
    issue's check (None: not run). `regressors_agree`: the evidence regressors find soft does not
    erase the non-intervened evidence (None: not measured).
    """
    d, se_d = hard_minus_none["mean"], hard_minus_none["stderr"]
    n, se_n = soft_minus_none["mean"], soft_minus_none["stderr"]
    seeds = min(hard_minus_none.get("seeds", 0), soft_minus_none.get("seeds", 0))
    pre = {
        "generator_check": {"passed": generator_check is True,
                            "detail": {True: "passed", False: "failed", None: "not run"}[generator_check]},
        "hard_amplifies": {"passed": bool(_finite(d, se_d) and d > 2 * se_d and seeds >= MIN_SEEDS),
                           "detail": f"A_hard - A_none = {_f(d)} (2 SE {_f(2 * se_d)}), {seeds} seeds "
                                     f"(>= {MIN_SEEDS} needed)"},
        "matched_checkpoints": {"passed": matched is not None,
                                "detail": matched if matched is not None else
                                f"no hard/soft pair within {MATCH_TOL} AUC at or below the truth's"},
    }
    cov = soft_minus_none.get("cov_with_other", 0.0)
    ratio = n / d if _finite(n, d) and d != 0 else float("nan")
    lo, hi = (fieller_interval(n, d, se_n**2, se_d**2, cov if math.isfinite(cov) else 0.0)
              if _finite(n, d, se_n, se_d) else (-math.inf, math.inf))
    erases = bool(_finite(n, se_n) and n < -2 * se_n)
    out = {"preconditions": pre, "ratio": ratio, "ratio_ci95": [lo, hi], "hard_minus_none": d,
           "hard_minus_none_stderr": se_d, "soft_minus_none": n, "soft_minus_none_stderr": se_n,
           "soft_erases_evidence": erases, "regressors_agree": regressors_agree, "seeds": seeds}
    failed = [k for k, v in pre.items() if not v["passed"]]
    if failed:
        out.update(verdict="no verdict", reason="precondition(s) not met: " + ", ".join(failed))
    elif (ratio <= REPRODUCED_MAX_RATIO and hi < REPRODUCED_MAX_UPPER and not erases
          and regressors_agree is True):
        out.update(verdict="reproduced", reason=f"ratio {_f(ratio)} <= {REPRODUCED_MAX_RATIO} with upper bound "
                                                f"{_f(hi)} < {REPRODUCED_MAX_UPPER}; soft keeps the evidence")
    elif ratio >= REFUTED_MIN_RATIO and lo > REPRODUCED_MAX_RATIO:
        out.update(verdict="refuted", reason=f"ratio {_f(ratio)} >= {REFUTED_MIN_RATIO} with interval "
                                             f"[{_f(lo)}, {_f(hi)}] excluding {REPRODUCED_MAX_RATIO}")
    else:
        why = []
        if erases:
            why.append(f"soft is below none by more than 2 SE ({_f(n)} vs 2 SE {_f(2 * se_n)}): it erases evidence")
        if regressors_agree is not True:
            why.append("the evidence regressors " + ("disagree" if regressors_agree is False else "were not run"))
        why.append(f"ratio {_f(ratio)}, 95% interval [{_f(lo)}, {_f(hi)}]")
        out.update(verdict="inconclusive", reason="; ".join(why))
    return out


def _finite(*xs) -> bool:
    return all(x is not None and math.isfinite(x) for x in xs)


def _f(x) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"
