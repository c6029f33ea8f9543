"""GeneratorBundle: save/load, parent inference, batched deterministic counterfactuals, validation."""

from __future__ import annotations

import pytest
import torch
from helpers import synthetic_parents, tiny_bundle

from cxrcf.bundle import GeneratorBundle, parents_from_labels
from cxrcf.config import PredictorArch
from cxrcf.errors import CxrcfError
from cxrcf.predictor import Predictor


@pytest.fixture(scope="module")
def bundle():
    return tiny_bundle(seed=0)


@pytest.fixture(scope="module")
def batch(bundle):
    r = bundle.resolution
    g = torch.Generator().manual_seed(0)
    # Images on the 8-bit grid, as real inputs are.
    x = torch.round((torch.rand(4, 1, r, r, generator=g) * 2 - 1 + 1) * 127.5) / 127.5 - 1
    return x, synthetic_parents(4, seed=3)


def test_tiny_bundle_is_seeded():
    # its cost is not asserted here: speed belongs to benchmarks/, and a wall-clock limit fails on a loaded box
    a = tiny_bundle(seed=1)
    rng_before = torch.get_rng_state()
    b = tiny_bundle(seed=1)
    assert torch.equal(rng_before, torch.get_rng_state())  # leaves the global RNG alone
    for part in ("hvae", "scm", "predictor"):
        sa, sb = getattr(a, part).state_dict(), getattr(b, part).state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), part
    assert a.meta["name"] == "tiny" and a.meta["mode"] == "none" and a.resolution == 32


def test_null_intervention_returns_the_input(bundle, batch):
    x, parents = batch
    (same,) = bundle.counterfactuals(x, parents, [{}], t_u=1.0, seed=0)
    assert same.shape == x.shape and same.dtype == torch.float32
    assert torch.allclose(same, x, atol=1e-4)


def test_counterfactuals_are_deterministic_under_seed(bundle, batch):
    x, parents = batch
    interventions = [{"sex": "female"}, {"race": 2}, {"age": 90}, {"finding": "pleural_effusion"}, {}]
    a = bundle.counterfactuals(x, parents, interventions, seed=11)
    b = bundle.counterfactuals(x, parents, interventions, seed=11)
    c = bundle.counterfactuals(x, parents, interventions, seed=12)
    assert len(a) == len(interventions)
    for xa, xb in zip(a, b):
        assert xa.shape == x.shape and torch.equal(xa, xb)
        assert xa.min() >= -1 and xa.max() <= 1
    assert not torch.equal(a[0], c[0])  # the posterior latents are sampled, so the seed matters
    assert not torch.allclose(a[0], x, atol=1e-3)  # do(sex) changes the image
    assert torch.allclose(a[-1], x, atol=1e-4)  # ... and the null intervention in the same batch does not
    chunked = bundle.counterfactuals(x, parents, interventions, seed=11, batch_size=3)
    assert [t.shape for t in chunked] == [t.shape for t in a]
    assert torch.allclose(chunked[-1], x, atol=1e-4)


def test_age_intervention_goes_through_the_scm(bundle, batch):
    x, parents = batch
    images, cf = bundle.counterfactuals(x, parents, [{"age": 95.0}, {"sex": 1}], seed=4, return_parents=True)
    expected = bundle.scm.counterfactual(parents, {"age": torch.tensor(95.0)}, torch.Generator().manual_seed(4))
    assert torch.equal(cf[0]["finding"], expected["finding"])
    assert torch.equal(cf[0]["age"], torch.full((4,), 95.0))
    assert torch.equal(cf[1]["finding"], parents["finding"]) and torch.equal(cf[1]["sex"], torch.ones(4))
    assert len(images) == 2


def test_save_load_round_trip(tmp_path, bundle, batch):
    x, parents = batch
    out = bundle.save(tmp_path / "b")
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == ["bundle.json"] + [f"{part}/{f}" for part in ("hvae", "predictor", "scm")
                                       for f in ("config.json", "model.safetensors")]
    loaded = GeneratorBundle.load(out)
    assert loaded.meta == bundle.meta and loaded.resolution == bundle.resolution
    assert loaded.device == torch.device("cpu")
    do = [{"sex": 1, "finding": 0}, {"age": 30}]
    for a, b in zip(bundle.counterfactuals(x, parents, do, seed=3), loaded.counterfactuals(x, parents, do, seed=3)):
        assert torch.equal(a, b)
    pa, pb = bundle.probabilities(x), loaded.probabilities(x)
    assert all(torch.equal(pa[k], pb[k]) for k in pa)

    (out / "scm" / "config.json").write_text((out / "hvae" / "config.json").read_text())
    with pytest.raises(CxrcfError, match="expected scm"):
        GeneratorBundle.load(out)
    with pytest.raises(CxrcfError, match="bundle.json"):
        GeneratorBundle.load(tmp_path)


def test_infer_parents_and_probabilities(bundle, batch):
    x, _ = batch
    p = bundle.probabilities(x)
    assert p["sex"].shape == (4,) and p["race"].shape == (4, 3) and p["age"].shape == (4,)
    parents = bundle.infer_parents(x)
    assert parents["sex"].dtype == torch.float32 and parents["race"].dtype == torch.long
    assert torch.equal(parents["sex"], (p["sex"] > 0.5).float())
    assert torch.equal(parents["race"], p["race"].argmax(-1))
    assert ((parents["age"] >= 0) & (parents["age"] <= 120)).all()
    # parents=None infers them
    a = bundle.counterfactuals(x, None, [{"sex": 0}], seed=1)
    b = bundle.counterfactuals(x, parents, [{"sex": 0}], seed=1)
    assert torch.equal(a[0], b[0])
    assert bundle.to("cpu") is bundle


def test_predictor_at_another_resolution_is_fed_resized_images(bundle, batch):
    x, _ = batch
    other = GeneratorBundle(bundle.hvae, bundle.scm, Predictor(PredictorArch(kind="cnn", resolution=64, width=4)))
    assert other.probabilities(x)["race"].shape == (4, 3)


def test_parents_from_labels():
    p = parents_from_labels([
        {"sex": "female", "race": "black", "age": 61.5, "finding": "no_finding"},
        {"sex": 0, "race": 1, "age": "30", "finding": 1},
    ])
    assert torch.equal(p["sex"], torch.tensor([1.0, 0.0])) and torch.equal(p["race"], torch.tensor([2, 1]))
    assert torch.equal(p["age"], torch.tensor([61.5, 30.0])) and torch.equal(p["finding"], torch.tensor([0.0, 1.0]))
    with pytest.raises(CxrcfError, match=r"parents\[1\]: race"):
        parents_from_labels([{"sex": 0, "race": 0, "age": 3, "finding": 0}, {"sex": 0, "race": "green", "age": 3,
                                                                             "finding": 0}])


def test_bad_requests_raise_user_errors_naming_the_field(bundle, batch):
    x, parents = batch
    cases = [([{"sex": "robot"}], "sex"), ([{"age": 200}], "age"), ([{"height": 1}], "height"),
             ([{"race": 5}], "race"), (["sex"], "intervention")]
    for interventions, field in cases:
        with pytest.raises(CxrcfError, match=field):
            bundle.counterfactuals(x, parents, interventions)
    with pytest.raises(CxrcfError, match="x:"):
        bundle.counterfactuals(x[:, :, :16], parents, [{}])
    with pytest.raises(CxrcfError, match="parents"):
        bundle.counterfactuals(x, {k: v[:2] for k, v in parents.items()}, [{}])
    with pytest.raises(CxrcfError, match="t_u"):
        bundle.counterfactuals(x, parents, [{}], t_u=0.0)
    assert bundle.counterfactuals(x, parents, []) == []
