"""The metric functions on hand-made predictor outputs whose answers are known."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines import metrics as M


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def test_accuracy_binary_and_multiclass():
    assert M.accuracy([0.9, 0.2, 0.6, 0.4], [1, 0, 0, 0]) == pytest.approx(0.75)
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.3, 0.4, 0.3]])
    assert M.accuracy(probs, [0, 2, 0]) == pytest.approx(2 / 3)


def test_auc_known_values_and_ties():
    assert M.roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert M.roc_auc([0.1, 0.2, 0.3, 0.4], [0, 0, 1, 1]) == pytest.approx(1.0)
    assert M.roc_auc([0.4, 0.3, 0.2, 0.1], [0, 0, 1, 1]) == pytest.approx(0.0)
    # All scores tied: every pair counts one half.
    assert M.roc_auc([0.5] * 6, [0, 1, 0, 1, 1, 0]) == pytest.approx(0.5)
    # One tie between a positive and a negative: 3 of 4 pairs won, one half -> 3.5/4.
    assert M.roc_auc([0.1, 0.5, 0.5, 0.9], [0, 0, 1, 1]) == pytest.approx(0.875)
    assert np.isnan(M.roc_auc([0.1, 0.2], [1, 1]))


def test_auc_matches_pairwise_definition_on_random_data():
    rng = np.random.default_rng(0)
    s = rng.integers(0, 5, 200).astype(float)  # many ties
    y = rng.integers(0, 2, 200)
    pos, neg = s[y == 1], s[y == 0]
    brute = ((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])).mean()
    assert M.roc_auc(s, y) == pytest.approx(brute)


def test_average_ranks():
    np.testing.assert_allclose(M.average_ranks([3.0, 1.0, 3.0, 2.0]), [3.5, 1.0, 3.5, 2.0])


def test_macro_auc_ovr():
    y = np.array([0, 1, 2, 0, 1, 2])
    perfect = np.eye(3)[y] * 0.8 + 0.1
    assert M.macro_auc_ovr(perfect, y) == pytest.approx(1.0)
    # Class 2's one-vs-rest scores reversed -> its AUC is 0; the macro mean is (1 + 1 + 0) / 3.
    p = perfect.copy()
    p[:, 2] = 1.0 - p[:, 2]
    assert M.macro_auc_ovr(p, y) == pytest.approx(2 / 3)


def test_mae():
    assert M.mae([10.0, 20.0, 30.0], [12.0, 20.0, 25.0]) == pytest.approx(7 / 3)


def test_log_odds_of_factual_class():
    p = np.array([0.8, 0.8])
    lo = M.log_odds_factual(p, [1, 0])
    assert lo[0] == pytest.approx(np.log(4.0))
    assert lo[1] == pytest.approx(-np.log(4.0))
    race = np.array([[0.5, 0.25, 0.25]])
    assert M.log_odds_factual(race, [1])[0] == pytest.approx(np.log(0.25 / 0.75))
    # Clipping keeps certain predictions finite.
    assert M.log_odds_factual(np.array([1.0, 0.0]), [1, 1]) == pytest.approx(
        [np.log((1 - 1e-6) / 1e-6), np.log(1e-6 / (1 - 1e-6))])


def test_copy_has_zero_amplification_and_drift():
    rng = np.random.default_rng(1)
    p = rng.uniform(0.01, 0.99, 100)
    y = rng.integers(0, 2, 100)
    out = M.amplification(p, p.copy(), y)
    assert out["mean"] == 0.0 and out["drift"] == 0.0
    assert all(g["mean"] == 0.0 and g["drift"] == 0.0 for g in out["subgroups"].values())


@pytest.mark.parametrize("d", [0.5, 2.0])
def test_push_towards_label_gives_plus_d_and_away_minus_d(d):
    rng = np.random.default_rng(2)
    z = rng.normal(0.0, 1.5, 400)
    y = rng.integers(0, 2, 400)
    sign = np.where(y == 1, 1.0, -1.0)
    towards = M.amplification(_sigmoid(z), _sigmoid(z + sign * d), y, group_names=("neg", "pos"))
    away = M.amplification(_sigmoid(z), _sigmoid(z - sign * d), y)
    assert towards["mean"] == pytest.approx(d, abs=1e-9)
    assert away["mean"] == pytest.approx(-d, abs=1e-9)
    assert towards["stderr"] == pytest.approx(0.0, abs=1e-9)
    for g in towards["subgroups"].values():
        assert g["mean"] == pytest.approx(d, abs=1e-9)
    assert towards["subgroups"]["neg"]["n"] + towards["subgroups"]["pos"]["n"] == 400
    assert 0 < towards["drift"] < 1


def test_per_subgroup_split_and_race_one_vs_rest():
    # Only class 0 (white) is pushed towards its label by log(9) - 0: p from 0.5 to 0.9.
    before = np.array([[0.5, 0.25, 0.25], [0.25, 0.5, 0.25], [0.25, 0.25, 0.5]])
    after = before.copy()
    after[0] = [0.9, 0.05, 0.05]
    out = M.amplification(before, after, [0, 1, 2], group_names=("white", "asian", "black"))
    assert out["subgroups"]["white"]["mean"] == pytest.approx(np.log(9.0))
    assert out["subgroups"]["white"]["drift"] == pytest.approx(0.4)
    assert out["subgroups"]["asian"]["mean"] == 0.0 and out["subgroups"]["black"]["mean"] == 0.0
    assert out["mean"] == pytest.approx(np.log(9.0) / 3)
    assert out["drift"] == pytest.approx(0.4 / 3)


def test_binary_subgroups_with_opposite_shifts_cancel_overall_but_not_per_group():
    y = np.array([0, 0, 1, 1])
    before = np.full(4, 0.5)
    after = np.array([0.2, 0.2, 0.2, 0.2])  # towards y=0, away from y=1
    out = M.amplification(before, after, y)
    lo = np.log(0.8 / 0.2)
    assert out["subgroups"]["0"]["mean"] == pytest.approx(lo)
    assert out["subgroups"]["1"]["mean"] == pytest.approx(-lo)
    assert out["mean"] == pytest.approx(0.0)
    assert out["drift"] == pytest.approx(0.3)


def test_mean_stderr_and_combine():
    m, se = M.mean_stderr([1.0, 2.0, 3.0, 4.0])
    assert m == pytest.approx(2.5)
    assert se == pytest.approx(np.std([1, 2, 3, 4], ddof=1) / 2)
    assert M.mean_stderr([5.0]) == (5.0, 0.0)
    mean, se = M.combine_stderr([1.0, 3.0], [0.0, 0.0])
    assert mean == pytest.approx(2.0) and se == pytest.approx(1.0)
    mean, se = M.combine_stderr([2.0], [0.3])
    assert se == pytest.approx(0.3)


def test_l1():
    assert M.l1(np.zeros((2, 1, 2, 2)), np.full((2, 1, 2, 2), 0.5)) == pytest.approx(0.5)


def test_soft_vs_hard_claim():
    auc = {"sex": 0.9, "race": 0.8, "finding": 0.85}
    ok = M.soft_vs_hard((0.1, 0.05), (1.0, 0.1), (0.3, 0.1), auc, {**auc, "sex": 0.87})
    assert ok["hard_amplifies"] and ok["claim_holds"]
    assert ok["soft_over_hard"] == pytest.approx(0.3)
    assert ok["max_auc_gap_points"] == pytest.approx(3.0)
    # Soft too close to hard, or soft losing effectiveness, or erasing evidence: the claim fails.
    assert M.soft_vs_hard((0.1, 0.05), (1.0, 0.1), (0.6, 0.1), auc, auc)["claim_holds"] is False
    assert M.soft_vs_hard((0.1, 0.05), (1.0, 0.1), (0.2, 0.1), auc, {**auc, "race": 0.7})["claim_holds"] is False
    assert M.soft_vs_hard((0.1, 0.05), (1.0, 0.1), (-0.8, 0.1), auc, auc)["claim_holds"] is False
    # Hard within twice the stderr of no-CFT: not measurable, so no verdict.
    weak = M.soft_vs_hard((0.1, 0.2), (0.5, 0.2), (0.1, 0.1), auc, auc)
    assert weak["hard_amplifies"] is False and weak["claim_holds"] is None
