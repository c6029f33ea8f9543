"""The generator check: probes on hand-made latents, the rules on hand-made evaluation results, and the
CFT checkpoint-selection score."""

import numpy as np
import pytest

from cxrcf.config import GeneratorCheckConfig
from pipelines.generator_check import latent_probes, r_squared, ridge_probe, run_check
from pipelines.metrics import roc_auc
from training.cft import selection_score


def test_a_linear_probe_recovers_what_the_latents_carry_and_not_what_they_lack():
    rng = np.random.default_rng(0)
    n, d = 600, 200
    sex = rng.integers(0, 2, n)
    amplitude = rng.normal(size=n)
    latents = rng.normal(size=(n, d))
    latents[:, 3] += 1.5 * (2 * sex - 1)  # one direction carries sex
    latents[:, 7] += 2.0 * amplitude  # another the evidence, in its own units
    # 300 fitting images for 200 dimensions: the probe is noisy but finds both directions
    assert ridge_probe(latents, sex.astype(float), roc_auc) > 0.8
    assert ridge_probe(latents, amplitude, r_squared) > 0.35
    noise_only = rng.normal(size=(n, d))
    assert abs(ridge_probe(noise_only, sex.astype(float), roc_auc) - 0.5) < 0.1
    assert ridge_probe(noise_only, amplitude, r_squared) < 0.1


def test_latent_probes_report_attributes_and_evidence():
    rng = np.random.default_rng(1)
    n = 200
    attrs = {"sex": rng.integers(0, 2, n), "finding": rng.integers(0, 2, n)}
    ev = {"breast_amp": rng.normal(size=n), "eff_max": rng.normal(size=n)}
    z = np.column_stack([attrs["sex"], attrs["finding"], ev["breast_amp"], ev["eff_max"], rng.normal(size=(n, 20))])
    out = latent_probes(z.astype(float), attrs, ev)
    assert set(out["auc"]) == {"sex", "finding"} and set(out["r2"]) == {"breast_amp", "eff_max"}
    assert min(out["auc"].values()) > 0.9 and min(out["r2"].values()) > 0.8
    assert "r2" not in latent_probes(z.astype(float), attrs, None)


def _result(sex_auc=0.9, finding_auc=0.7, probe=0.7, r2=0.3, ratios=(0.8, 0.9, 0.95)):
    return {
        "effectiveness": {"sex": {"auc": sex_auc}, "finding": {"auc": finding_auc}},
        "latents": {"auc": {"sex": probe, "finding": probe}, "r2": {"breast_amp": r2, "eff_max": r2}},
        "ground_truth": {"l1_ratio_per_intervention": dict(zip(("sex", "race", "finding"), ratios))},
    }


def test_a_model_that_follows_its_parents_and_beats_doing_nothing_passes():
    out = run_check(_result(), GeneratorCheckConfig())
    assert out["passed"] and out["failed"] == [] and out["summary"] == "all checks passed"


@pytest.mark.parametrize("kwargs, failed", [
    ({"sex_auc": 0.05}, "follows_parents.sex_auc"),  # returns its input: the factual sex survives
    ({"finding_auc": 0.55}, "follows_parents.finding_auc"),
    ({"r2": -0.1}, "latents.probe_r2_breast_amp"),
    ({"ratios": (0.8, 1.0, 0.9)}, "beats_doing_nothing.race_l1_ratio"),  # no better than x itself
    ({"ratios": (0.8, 0.9, 5.0)}, "beats_doing_nothing.finding_l1_ratio"),  # painted far past the truth
])
def test_each_failed_check_is_named_in_one_line(kwargs, failed):
    out = run_check(_result(**kwargs), GeneratorCheckConfig())
    assert not out["passed"] and failed in out["failed"]
    assert failed in out["summary"] and "\n" not in out["summary"]


def test_the_l1_check_reads_the_identifiable_ratio_when_there_is_one():
    # the ideal model: pooled ~1.0 because adding an unseen effusion is a guess, 0 where x shows it
    ideal = _result(ratios=(0.5, 0.5, 1.01))
    ideal["ground_truth"]["l1_ratio_identifiable"] = {"sex": 0.5, "race": 0.5, "finding": 0.0}
    assert run_check(ideal, GeneratorCheckConfig())["passed"]
    keeps_the_effusion = _result(ratios=(0.5, 0.5, 0.9))
    keeps_the_effusion["ground_truth"]["l1_ratio_identifiable"] = {"sex": 0.5, "race": 0.5, "finding": 1.3}
    out = run_check(keeps_the_effusion, GeneratorCheckConfig())
    assert out["failed"] == ["beats_doing_nothing.finding_l1_ratio"] and "1.300" in out["summary"]


def test_the_attribute_probe_is_gated_only_when_a_floor_is_set():
    leaky_free = _result(probe=0.5)  # exogenous latents: no parent information, as they should be
    assert run_check(leaky_free, GeneratorCheckConfig())["passed"]
    strict = run_check(leaky_free, GeneratorCheckConfig(min_probe_auc=0.65))
    assert "latents.probe_auc_sex" in strict["failed"]


def test_missing_measurements_fail_unless_the_data_cannot_have_them():
    result = _result()
    result["effectiveness"]["sex"] = {}  # no AUC at all is not a pass
    assert "follows_parents.sex_auc" in run_check(result, GeneratorCheckConfig())["failed"]
    real = _result()
    del real["ground_truth"], real["latents"]["r2"]  # real data: no truth, no simulator evidence
    out = run_check(real, GeneratorCheckConfig())
    assert out["passed"] and len(out["not_measured"]) == 2


def test_checkpoint_selection_prefers_the_truths_effectiveness_and_never_an_overshoot():
    target = {"sex": 0.95, "finding": 0.75}
    at_truth = selection_score({"sex": 0.95, "finding": 0.75}, target)
    under = selection_score({"sex": 0.90, "finding": 0.60}, target)
    over = selection_score({"sex": 0.95, "finding": 0.80}, target)  # finding overshoots by only 0.05
    assert at_truth == pytest.approx(0.0)
    assert at_truth < under < over
    assert selection_score({"sex": 0.5, "finding": 0.5}, target) < over  # even a weak model beats an overshoot


def test_a_failed_check_refuses_promotion_with_a_gate_named_for_it():
    from cxrcf.config import GatesConfig
    from pipelines import registry
    from pipelines.gates import generator_check_gates

    result = _result(finding_auc=0.4)
    result["generator_check"] = run_check(result, GeneratorCheckConfig())
    gates = GatesConfig(min_auc={"sex": 0.5}, generator_check=True)
    out = registry.check_gates(registry.flat_metrics(result), gates)
    failed = sorted(g.name for g in out if not g.passed)
    # the hand-made result has no age MAE and no amplification, so those gates fail as missing too
    assert failed == ["generator_check.follows_parents.finding_auc", "max_age_mae", "max_amplification"]
    reason = registry.gates_reason([g for g in out if g.name.startswith("generator_check")], None)
    assert "follows_parents.finding_auc" in reason and "\n" not in reason
    # an evaluation without the check cannot pass; the smoke preset reports it without gating
    assert not generator_check_gates({})[0].passed
    off = registry.check_gates(registry.flat_metrics(result), gates.model_copy(update={"generator_check": False}))
    assert not any(g.name.startswith("generator_check") for g in off)
