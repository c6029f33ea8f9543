"""The spatial breakdown of AMP(sex | do(finding)) on hand-made images and a hand-made predictor."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import occlusion_evaluator

from pipelines.occlusion import analyse, composite, sex_shift


def test_composite_takes_rows_from_each_source():
    upper, lower = torch.zeros(2, 1, 8, 8), torch.ones(2, 1, 8, 8)
    out = composite(upper, lower, 5)
    assert out[..., :5, :].eq(0).all() and out[..., 5:, :].eq(1).all()
    assert upper.eq(0).all()  # the source is not written


def test_sex_shift_is_signed_by_the_factual_class():
    before = np.array([0.5, 0.5])
    after = np.array([0.8, 0.8])  # P(female) up: more evidence for the female, less for the male
    shift = sex_shift(before, after, np.array([1, 0]))
    assert shift[0] == pytest.approx(np.log(4.0)) and shift[1] == pytest.approx(-np.log(4.0))


def test_an_opacity_over_the_cue_shows_as_a_lower_half_effect():
    ev = occlusion_evaluator()
    gains = ev.parents_np["finding"] == 0
    # The "counterfactual" flattens the lower half towards 0 (hides the cue) where an effusion is
    # added and marks row 0 (so do(finding) is effective); where one is removed it changes nothing.
    x_star = ev.x.clone()
    x_star[gains, :, 4:, :] *= 0.2
    x_star[gains, :, 0, :] = 1.0
    x_star[~gains, :, 0, :] = -1.0
    out = analyse(ev, x_star, "hand-made")
    assert out["finding_auc"] == pytest.approx(1.0)
    assert out["whole"]["gain"]["mean"] < -1.0  # the cue's evidence is lost where fluid was added
    assert out["whole"]["loss"]["mean"] == pytest.approx(0.0, abs=1e-6)
    assert out["lower_edit"]["all"]["mean"] == pytest.approx(out["whole"]["all"]["mean"], abs=1e-6)
    assert out["upper_edit"]["all"]["mean"] == pytest.approx(0.0, abs=1e-6)
    # the lower half is flattened (x 0.2), not brightened: -0.4 for women, +0.4 for men
    want = np.where(ev.parents_np["sex"][gains] == 1, -0.4, 0.4).mean()
    assert out["lower_edit_size"]["gain"]["mean"] == pytest.approx(want, abs=1e-6)


def test_copying_x_changes_nothing():
    ev = occlusion_evaluator()
    out = analyse(ev, ev.x.clone(), "identity")
    for part in ("whole", "lower_edit", "upper_edit"):
        assert out[part]["all"]["mean"] == pytest.approx(0.0, abs=1e-9)
