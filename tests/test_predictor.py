"""Anti-causal predictor: shapes across backbones and presets, the age head's finding input, the loss."""

from __future__ import annotations

import pytest
import torch

from cxrcf.attributes import age_from_model
from cxrcf.config import PredictorArch, preset_params
from cxrcf.predictor import Predictor, predictor_loss, stem_downsampling


def _check_outputs(out, n):
    assert set(out) == {"sex", "race", "finding", "age_loc", "age_logscale"}
    assert out["sex"].shape == (n,) and out["finding"].shape == (n,)
    assert out["race"].shape == (n, 3)
    assert out["age_loc"].shape == (n,) and out["age_logscale"].shape == (n,)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in out.values())


@pytest.mark.parametrize("kind", ["cnn", "resnet18"])
@pytest.mark.parametrize("resolution", [32, 64])
def test_shapes_and_dtypes(kind, resolution):
    torch.manual_seed(0)
    model = Predictor(PredictorArch(kind=kind, resolution=resolution, width=8)).eval()
    x = torch.rand(3, 1, resolution, resolution) * 2 - 1
    with torch.no_grad():
        _check_outputs(model(x), 3)
        _check_outputs(model.logits(x), 3)
        p = model.predict(x)
    assert set(p) == {"sex", "race", "finding", "age"}
    assert ((p["sex"] >= 0) & (p["sex"] <= 1)).all() and ((p["finding"] >= 0) & (p["finding"] <= 1)).all()
    assert torch.allclose(p["race"].sum(-1), torch.ones(3))
    with torch.no_grad():
        assert torch.allclose(p["age"], age_from_model(model(x)["age_loc"]))


def test_paper_preset_runs_at_192():
    arch = preset_params("paper").predictors.guidance.arch
    assert arch.kind == "resnet18" and arch.resolution == 192
    model = Predictor(arch).eval()
    n_params = sum(p.numel() for p in model.parameters())
    assert 10e6 < n_params < 12.5e6  # a ResNet-18 at the reference width
    with torch.no_grad():
        _check_outputs(model(torch.zeros(1, 1, 192, 192)), 1)


@pytest.mark.parametrize("resolution,expected", [(32, 4), (64, 4), (192, 6)])
def test_resnet_feature_map_is_not_tiny(resolution, expected):
    model = Predictor(PredictorArch(kind="resnet18", resolution=resolution, width=4))
    with torch.no_grad():
        h = model.backbone.layers(model.backbone.stem(torch.zeros(1, 1, resolution, resolution)))
    assert h.shape[-1] == expected == resolution // (stem_downsampling(resolution) * 8)


def test_age_head_sees_the_finding():
    torch.manual_seed(0)
    model = Predictor(PredictorArch(kind="cnn", resolution=32, width=8)).eval()
    x = torch.rand(4, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        neg, pos, auto = model(x, finding=torch.zeros(4)), model(x, finding=torch.ones(4)), model(x)
        given = model(x, finding=torch.sigmoid(auto["finding"]))
    assert not torch.allclose(neg["age_loc"], pos["age_loc"])
    for k in ("sex", "race", "finding"):
        assert torch.equal(neg[k], pos[k])
    assert torch.allclose(auto["age_loc"], given["age_loc"]) and torch.allclose(auto["age_logscale"], given["age_logscale"])


def test_loss_trains_on_a_small_batch():
    """A few steps on a fixed batch whose labels are visible in the image must lower every part."""
    torch.manual_seed(0)
    n = 32
    parents = {"sex": (torch.arange(n) % 2).float(), "race": torch.arange(n) % 3,
               "age": torch.linspace(20, 90, n), "finding": ((torch.arange(n) // 2) % 2).float()}
    x = torch.full((n, 1, 16, 16), -1.0)
    x[:, :, :4] = parents["sex"].view(n, 1, 1, 1) * 2 - 1
    x[:, :, 4:8] = parents["race"].view(n, 1, 1, 1).float() - 1
    x[:, :, 8:12] = parents["age"].view(n, 1, 1, 1) / 50 - 1
    x[:, :, 12:] = parents["finding"].view(n, 1, 1, 1) * 2 - 1
    model = Predictor(PredictorArch(kind="cnn", resolution=32, width=8, dropout=0.0))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(40):
        loss, parts = predictor_loss(model(x, finding=parents["finding"]), parents)
        assert loss.requires_grad and all(not v.requires_grad for v in parts.values())
        first = first or {k: float(v) for k, v in parts.items()}
        opt.zero_grad()
        loss.backward()
        opt.step()
    last = {k: float(v) for k, v in parts.items()}
    assert all(last[k] < first[k] - 0.1 for k in first), (first, last)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("preset", ["smoke", "cpu", "paper"])
def test_evaluation_predictor_is_independent_of_the_guide(preset):
    p = preset_params(preset).predictors
    g, e = p.guidance.arch, p.evaluation.arch
    assert (g.kind, g.resolution) != (e.kind, e.resolution)
    assert {g.train_half, e.train_half} == {"first", "second"}
    assert p.guidance.optim.seed != p.evaluation.optim.seed


def test_training_halves_are_disjoint_and_fixed(tiny_data):
    from training.predictors import half_ids, load_half

    ids = [f"id{i}" for i in range(101)]
    first, second = half_ids(ids, "first"), half_ids(list(reversed(ids)), "second")
    assert not set(first) & set(second) and sorted(first + second) == sorted(ids)
    assert len(first) == 50 and half_ids(ids, "first") == first and half_ids(ids, "all") == sorted(ids)
    x1, p1 = load_half(str(tiny_data), 24, "first", "train")
    x2, p2 = load_half(str(tiny_data), 24, "second", "train")
    xa, _ = load_half(str(tiny_data), 24, "all", "train")
    assert x1.shape[1:] == (1, 24, 24) and len(x1) + len(x2) == len(xa) and abs(len(x1) - len(x2)) <= 1
    assert len(p1["sex"]) == len(x1) and len(p2["age"]) == len(x2)
    # No training image is in both halves; validation is whole for both.
    flat1 = {tuple(v.flatten().tolist()) for v in x1}
    assert not any(tuple(v.flatten().tolist()) in flat1 for v in x2)
    v1, _ = load_half(str(tiny_data), 24, "first", "val")
    v2, _ = load_half(str(tiny_data), 24, "second", "val")
    assert torch.equal(v1, v2)


def test_the_adversarial_batch_stays_in_its_l2_ball_and_in_range_and_raises_the_loss():
    from cxrcf.config import PredictorArch
    from cxrcf.predictor import Predictor, predictor_loss
    from training.predictors import l2_adversarial

    torch.manual_seed(0)
    model = Predictor(PredictorArch(kind="cnn", resolution=32, width=8, dropout=0.0)).eval()
    g = torch.Generator().manual_seed(1)
    x = (torch.rand(8, 1, 32, 32, generator=g) * 2 - 1).clamp(-0.98, 0.98)
    x[0] = 1.0  # a saturated image: the ball is cut at the range
    parents = {"sex": torch.randint(0, 2, (8,), generator=g).float(), "race": torch.randint(0, 3, (8,), generator=g),
               "age": torch.rand(8, generator=g) * 60 + 20, "finding": torch.randint(0, 2, (8,), generator=g).float()}
    adv = l2_adversarial(model, x, parents, eps=0.5, steps=3)
    assert not adv.requires_grad and all(p.grad is None for p in model.parameters())
    assert (adv.flatten(1) - x.flatten(1)).norm(dim=1).max() <= 0.5 + 1e-5
    assert adv.min() >= -1 and adv.max() <= 1
    with torch.no_grad():
        def loss(images):
            return predictor_loss(model(images, finding=parents["finding"]), parents)[0]
        assert loss(adv) > loss(x) + 1e-3
