"""The primary endpoint and the pre-registered verdict on hand-made numbers: each trap named in
issue 15 (one-direction amplification, prevalence, a truth that moves the predictor, a soft model
that erases evidence, too few seeds, overshooting checkpoints) must give the right answer."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipelines import verdict as V

MATCHED = {"hard": "hard-slack0.02", "soft": "soft-slack0.02", "hard_auc": 0.80, "soft_auc": 0.79,
           "true_auc": 0.85}


def _directions(n_add: int, n_remove: int) -> np.ndarray:
    return np.array(["finding=1"] * n_add + ["finding=0"] * n_remove)


def test_one_direction_amplification_is_halved_whatever_the_prevalence():
    rng = np.random.default_rng(0)
    for n_add, n_remove in ((1328, 672), (672, 1328)):
        d = _directions(n_add, n_remove)
        lo_true = rng.normal(0, 1, d.size)
        # Hard amplifies by +1 log-odds when an effusion is added and not at all when one is removed.
        lo_star = lo_true + np.where(d == "finding=1", 1.0, 0.0)
        e = V.endpoint(lo_star, lo_true, d)
        assert e["A"] == pytest.approx(0.5)
        assert e["directions"]["finding=1"]["mean"] == pytest.approx(1.0)
        assert e["directions"]["finding=0"]["n"] == n_remove
        # The pooled mean is what prevalence makes of it: 0.66 one way, 0.34 the other.
        assert V.pooled_amp(lo_star, lo_true) == pytest.approx(n_add / d.size)


def test_opposite_signs_per_direction_cancel_in_A_not_in_the_pooled_mean():
    # The sex|do(finding) numbers: -0.67 when an effusion is added, +0.71 when one is removed.
    d = _directions(1328, 672)
    lo_true = np.zeros(d.size)
    lo_star = np.where(d == "finding=1", -0.67, 0.71)
    assert V.endpoint(lo_star, lo_true, d)["A"] == pytest.approx(0.02)
    assert V.pooled_amp(lo_star, lo_true) == pytest.approx((1328 * -0.67 + 672 * 0.71) / 2000)


def test_a_truth_that_moves_the_predictor_is_not_amplification():
    rng = np.random.default_rng(1)
    d = _directions(500, 500)
    lo_x = rng.normal(1.0, 1.0, d.size)
    # The TRUE counterfactual itself moves the predictor's belief by -0.08 (fluid masks the evidence).
    lo_true = lo_x - 0.08 + rng.normal(0, 0.05, d.size)
    perfect = lo_true.copy()
    assert V.pooled_amp(perfect, lo_x) == pytest.approx(-0.08, abs=0.01)  # AMP against x blames the model
    assert V.endpoint(perfect, lo_true, d)["A"] == 0.0
    # A model that adds +0.3 beyond the truth is measured at +0.3, not at +0.22.
    assert V.endpoint(perfect + 0.3, lo_true, d)["A"] == pytest.approx(0.3)


def test_strata_select_images():
    d = _directions(4, 4)
    values = np.array([1, 1, 3, 3, 0, 0, 2, 2], float)
    amb = np.array([1, 1, 0, 0, 1, 1, 0, 0], bool)
    e = V.endpoint(values, np.zeros(8), d, mask=amb)
    assert e["A"] == pytest.approx(0.5) and e["n"] == 4
    assert V.endpoint(values, np.zeros(8), d, mask=~amb)["A"] == pytest.approx(2.5)
    with pytest.raises(ValueError, match="differ in length"):
        V.endpoint(values, np.zeros(7), d)


def _study(hard_shift, soft_shift, seeds=3, n=2000, noise=0.3, seed_spread=0.02):
    """Per-image log-odds of none, hard seeds and soft seeds on the same images; shifts per direction."""
    rng = np.random.default_rng(42)
    d = _directions(n * 2 // 3, n - n * 2 // 3)
    add = d == "finding=1"
    lo_none = rng.normal(0.5, 1.0, n)

    def runs(shift):
        out = []
        for _ in range(seeds):
            s = np.where(add, shift[0], shift[1]) + rng.normal(0, seed_spread)
            out.append(lo_none + s + rng.normal(0, noise, n))
        return out

    hard, soft = runs(hard_shift), runs(soft_shift)
    h = V.paired_difference(hard, lo_none, d)
    s = V.paired_difference(soft, lo_none, d, lo_c_seeds=hard)
    return h, s


def test_reproduced_needs_a_small_ratio_and_the_regressors():
    h, s = _study((0.8, 0.4), (0.1, 0.05))  # soft keeps an eighth of hard's amplification
    assert h["mean"] == pytest.approx(0.6, abs=0.05) and h["seeds"] == 3
    out = V.decide(True, h, s, MATCHED, regressors_agree=True)
    assert out["verdict"] == "reproduced", out
    assert out["ratio"] == pytest.approx(0.125, abs=0.05) and out["ratio_ci95"][1] < 0.8
    assert V.decide(True, h, s, MATCHED, regressors_agree=None)["verdict"] == "inconclusive"
    assert V.decide(True, h, s, MATCHED, regressors_agree=False)["verdict"] == "inconclusive"


def test_a_soft_model_that_erases_evidence_is_not_a_reproduction():
    h, s = _study((0.8, 0.4), (-0.5, -0.5))  # ratio < 0 < 0.5, but soft is well below no-CFT
    out = V.decide(True, h, s, MATCHED, regressors_agree=True)
    assert out["ratio"] < 0 and out["soft_erases_evidence"]
    assert out["verdict"] == "inconclusive" and "erases evidence" in out["reason"]


def test_refuted_when_soft_amplifies_like_hard():
    h, s = _study((0.8, 0.4), (0.8, 0.38))
    out = V.decide(True, h, s, MATCHED, regressors_agree=True)
    assert out["verdict"] == "refuted" and out["ratio_ci95"][0] > 0.5


def test_failed_preconditions_give_no_verdict_never_refuted():
    h, s = _study((0.8, 0.4), (0.8, 0.4), seeds=2)  # would be refuted, but only two CFT seeds
    out = V.decide(True, h, s, MATCHED, regressors_agree=True)
    assert out["verdict"] == "no verdict" and "hard_amplifies" in out["reason"]
    h, s = _study((0.8, 0.4), (0.8, 0.4))
    assert V.decide(None, h, s, MATCHED, True)["verdict"] == "no verdict"  # generator check not run
    assert V.decide(True, h, s, None, True)["verdict"] == "no verdict"  # no matched checkpoints
    # Hard that does not amplify beyond no-CFT (the cpu preset's finding so far): no verdict.
    h, s = _study((0.01, -0.01), (0.0, 0.0))
    out = V.decide(True, h, s, MATCHED, True)
    assert out["verdict"] == "no verdict" and not out["preconditions"]["hard_amplifies"]["passed"]


def test_seed_to_seed_spread_counts_in_the_standard_error():
    calm, _ = _study((0.3, 0.3), (0.0, 0.0), seed_spread=0.0)
    noisy, _ = _study((0.3, 0.3), (0.0, 0.0), seed_spread=0.3)
    assert noisy["stderr"] > 3 * calm["stderr"]


def test_fieller_interval():
    lo, hi = V.fieller_interval(1.0, 2.0, 0.01, 0.01)
    assert lo < 0.5 < hi and hi - lo < 0.3
    # A denominator that is not clearly above zero leaves the ratio unbounded.
    assert V.fieller_interval(1.0, 0.05, 0.01, 0.01) == (-math.inf, math.inf)
    # Positive covariance between numerator and denominator narrows the interval.
    lo_c, hi_c = V.fieller_interval(1.0, 2.0, 0.01, 0.01, cov=0.008)
    assert hi_c - lo_c < hi - lo


def test_matched_points_exclude_overshooting_and_mismatched_pairs():
    hard = [{"label": "h0", "auc": 0.70}, {"label": "h1", "auc": 0.80}, {"label": "h2", "auc": 0.90}]
    soft = [{"label": "s0", "auc": 0.715}, {"label": "s1", "auc": 0.83}, {"label": "s2", "auc": 0.905}]
    m = V.match_points(hard, soft, true_auc=0.85)
    assert (m["hard"], m["soft"]) == ("h0", "s0")  # h2/s2 overshoot the truth; h1/s1 differ by 0.03
    assert V.match_points(hard, soft, true_auc=0.95)["hard"] == "h2"
    assert V.match_points(hard[1:], soft[1:], true_auc=0.85) is None
