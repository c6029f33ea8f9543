"""Attribute SCM: likelihood fit, abduction/prediction identity, the finding rule, Gumbel posterior."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import finding_probability, synthetic_parents

from cxrcf.attributes import age_to_model
from cxrcf.config import SCMConfig
from cxrcf.errors import CxrcfError
from cxrcf.scm import AttributeSCM


@pytest.fixture(scope="module")
def data():
    return synthetic_parents(4000, seed=0)


@pytest.fixture(scope="module")
def fitted(data):
    scm = AttributeSCM(SCMConfig(steps=400, lr=2e-2, seed=0))
    history = scm.fit(data)
    return scm, history


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def test_fit_recovers_the_age_to_finding_dependence(fitted, data):
    scm, history = fitted
    assert history[-1] < history[0] - 0.3
    ages = torch.tensor([25.0, 40.0, 55.0, 70.0, 85.0])
    with torch.no_grad():
        p_model = torch.softmax(scm.finding_logits(ages), -1)[:, 1]
    p_true = finding_probability(ages)
    assert torch.allclose(p_model, p_true, atol=0.06), (p_model, p_true)
    assert p_model[-1] - p_model[0] > 0.6  # old patients have far more effusions than young ones
    assert abs(torch.sigmoid(scm.sex_logit).item() - data["sex"].mean().item()) < 0.01
    race_freq = torch.bincount(data["race"], minlength=3).float() / len(data["race"])
    assert torch.allclose(torch.softmax(scm.race_logits, -1), race_freq, atol=0.01)


def test_samples_follow_the_fitted_distribution(fitted, data):
    scm, _ = fitted
    s = scm.sample(20000, _gen(1))
    assert s["sex"].dtype == torch.float32 and s["race"].dtype == torch.long
    assert s["age"].dtype == torch.float32 and s["finding"].dtype == torch.float32
    assert all(v.shape == (20000,) for v in s.values())
    assert abs(s["age"].mean() - data["age"].mean()) < 1.0
    assert abs(s["age"].std() - data["age"].std()) < 1.0
    assert abs(s["finding"].mean() - data["finding"].mean()) < 0.02
    old, young = s["age"] > 70, s["age"] < 40
    assert s["finding"][old].mean() - s["finding"][young].mean() > 0.5
    again = scm.sample(20000, _gen(1))
    assert all(torch.equal(s[k], again[k]) for k in s)


def test_log_prob_is_finite_and_higher_on_data_than_on_shuffled_pairs(fitted, data):
    scm, _ = fitted
    with torch.no_grad():
        lp = scm.log_prob(data)
        assert lp.shape == (4000,) and torch.isfinite(lp).all()
        # Breaking the age -> finding link must cost likelihood.
        shuffled = dict(data, finding=data["finding"][torch.randperm(4000, generator=_gen(0))])
        assert scm.log_prob(shuffled).mean() < lp.mean() - 0.05


def test_age_flow_is_invertible(fitted, data):
    scm, _ = fitted
    a = age_to_model(data["age"])
    u, _ = scm.age_to_noise(a)
    assert torch.allclose(scm.noise_to_age(u), a, atol=1e-5)


def test_age_density_integrates_to_one(fitted):
    scm, _ = fitted
    a = torch.linspace(-8.0, 8.0, 40001, dtype=torch.float64)
    with torch.no_grad():
        u, log_det = scm.age_to_noise(a)
        density = torch.exp(-0.5 * u * u - 0.5 * math.log(2 * math.pi) + log_det)
    assert abs(torch.trapezoid(density, a).item() - 1.0) < 1e-3


def test_null_intervention_returns_the_factual_parents_exactly(fitted, data):
    scm, _ = fitted
    cf = scm.counterfactual(data, {}, _gen(0))
    for k in data:
        assert torch.equal(cf[k], data[k]), k


def test_abduct_then_predict_reproduces_the_observed_finding(fitted, data):
    scm, _ = fitted
    for seed in range(3):
        eps = scm.abduct(data, _gen(seed))["finding"]
        assert eps.shape == (4000, 2)
        with torch.no_grad():
            again = (scm.finding_logits(data["age"]).double() + eps).argmax(-1).float()
        assert torch.equal(again, data["finding"])
    # Intervening on age with its own value is a no-op too.
    cf = scm.counterfactual(data, {"age": data["age"]}, _gen(0))
    assert torch.equal(cf["finding"], data["finding"])


def test_finding_rule(fitted, data):
    scm, _ = fitted
    cf = scm.counterfactual(data, {"sex": torch.tensor(1.0)}, _gen(0))
    assert torch.equal(cf["sex"], torch.ones(4000))
    for k in ("race", "age", "finding"):
        assert torch.equal(cf[k], data[k])

    old = scm.counterfactual(data, {"age": torch.tensor(95.0)}, _gen(0))
    assert torch.equal(old["age"], torch.full((4000,), 95.0))
    assert old["finding"].mean() > data["finding"].mean() + 0.3  # do(age) changes finding ...
    assert (old["finding"] >= data["finding"]).all()  # ... and the logits rise with age here
    young = scm.counterfactual(data, {"age": torch.tensor(20.0)}, _gen(0))
    assert young["finding"].mean() < data["finding"].mean() - 0.2

    both = scm.counterfactual(data, {"age": 95.0, "finding": 0}, _gen(0))
    assert torch.equal(both["finding"], torch.zeros(4000))
    set_finding = scm.counterfactual(data, {"finding": torch.ones(4000)}, _gen(0))
    assert torch.equal(set_finding["finding"], torch.ones(4000)) and torch.equal(set_finding["age"], data["age"])


def test_gumbel_posterior_gives_the_exact_counterfactual_flip_rate(fitted):
    """For 2 classes, eps1 - eps0 is logistic; given finding 0 at logit gap d, the counterfactual at
    gap d' > d flips with probability (sigmoid(-d) - sigmoid(-d')) / sigmoid(-d)."""
    scm, _ = fitted
    n = 40000
    parents = {"sex": torch.zeros(n), "race": torch.zeros(n, dtype=torch.long),
               "age": torch.full((n,), 40.0), "finding": torch.zeros(n)}
    cf = scm.counterfactual(parents, {"age": torch.tensor(75.0)}, _gen(3))
    with torch.no_grad():
        logits = scm.finding_logits(torch.tensor([40.0, 75.0]))
    d, d_star = (logits[:, 1] - logits[:, 0]).double()
    expected = (torch.sigmoid(-d) - torch.sigmoid(-d_star)) / torch.sigmoid(-d)
    assert 0.2 < expected < 0.9
    assert abs(cf["finding"].mean().item() - expected.item()) < 0.015


def test_counterfactual_is_deterministic_under_a_generator(fitted, data):
    scm, _ = fitted
    a = scm.counterfactual(data, {"age": 80.0}, _gen(7))
    b = scm.counterfactual(data, {"age": 80.0}, _gen(7))
    assert torch.equal(a["finding"], b["finding"])


def test_bad_interventions_and_parents_raise_user_errors(fitted, data):
    scm, _ = fitted
    with pytest.raises(CxrcfError, match="height"):
        scm.counterfactual(data, {"height": 1.0}, _gen(0))
    with pytest.raises(CxrcfError, match="age"):
        scm.counterfactual(data, {"age": torch.zeros(3)}, _gen(0))
    with pytest.raises(CxrcfError, match="finding"):
        scm.log_prob({k: v for k, v in data.items() if k != "finding"})
