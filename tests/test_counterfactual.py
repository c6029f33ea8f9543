"""Counterfactual engine: null intervention, gradients through abduction, determinism, particles."""

from __future__ import annotations

import pytest
import torch

from cxrcf.config import preset_params
from cxrcf.counterfactual import counterfactual
from cxrcf.errors import CxrcfError
from cxrcf.hvae import HVAE


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = HVAE(preset_params("smoke").generator.arch)
    with torch.no_grad():  # an untrained HVAE barely uses its parents; make them matter
        for b in m.decoder.blocks:
            b.z_proj_pa.weight.normal_(0, 0.5)
    return m


def _batch(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 1, 32, 32), generator=g).float() / 127.5 - 1
    race = torch.nn.functional.one_hot(torch.randint(0, 3, (n,), generator=g), 3).float()
    ctx = torch.cat([torch.rand(n, 1, generator=g) * 2 - 1, race, torch.randint(0, 2, (n, 2), generator=g)], 1)
    return x, ctx


def _flip_sex(ctx):
    out = ctx.clone()
    out[:, 4] = 1 - out[:, 4]
    return out


@pytest.mark.parametrize("particles", [1, 3])
def test_null_intervention_returns_the_input(model, particles):
    x, ctx = _batch()
    with torch.no_grad():
        xs = counterfactual(model, x, ctx, ctx.clone(), t_u=1.0, particles=particles,
                            generator=torch.Generator().manual_seed(0))
    assert xs.shape == x.shape and xs.dtype == torch.float32
    assert (xs - x).abs().max() < 1e-4


def test_intervention_changes_the_image_and_stays_in_range(model):
    x, ctx = _batch()
    with torch.no_grad():
        xs = counterfactual(model, x, ctx, _flip_sex(ctx), generator=torch.Generator().manual_seed(0))
        smooth = counterfactual(model, x, ctx, _flip_sex(ctx), t_u=0.1, generator=torch.Generator().manual_seed(0))
    assert (xs - x).abs().mean() > 1e-3
    assert xs.min() >= -1 and xs.max() <= 1
    # a lower pixel-noise temperature keeps less of the factual residual
    assert (smooth - x).abs().mean() > (xs - x).abs().mean() * 0.5


def test_deterministic_under_a_seeded_generator(model):
    x, ctx = _batch()
    run = lambda seed: counterfactual(model, x, ctx, _flip_sex(ctx), particles=2,
                                      generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        a, b, c = run(7), run(7), run(8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_gradients_reach_encoder_and_decoder_through_abduction(model):
    x, ctx = _batch(4)
    model.zero_grad(set_to_none=True)
    xs = counterfactual(model, x, ctx, _flip_sex(ctx), generator=torch.Generator().manual_seed(0))
    xs.square().mean().backward()
    enc = [p.grad for p in model.encoder.parameters()]
    dec = [p.grad for p in model.decoder.parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in enc)
    assert sum(g is not None and g.abs().sum() > 0 for g in enc) > len(enc) // 2
    assert sum(g is not None and g.abs().sum() > 0 for g in dec) > len(dec) // 2
    model.zero_grad(set_to_none=True)


def test_bad_arguments_raise(model):
    x, ctx = _batch(2)
    with pytest.raises(CxrcfError, match="particles"):
        counterfactual(model, x, ctx, ctx, particles=0)
    with pytest.raises(CxrcfError, match="ctx_star"):
        counterfactual(model, x, ctx, ctx[:1])


def test_one_pass_elbo_and_abduction_match_the_separate_calls(model):
    # CFT takes F and the abducted latents from one posterior pass; it must equal the two separate calls.
    from cxrcf.counterfactual import counterfactual_from_abduction

    x, ctx = _batch()
    ctx_star = _flip_sex(ctx)
    model.eval()
    with torch.no_grad():
        losses, latents, pixels = model.elbo_with_abduction(
            x, ctx, beta=4.0, generator=torch.Generator().manual_seed(3))
        x_star = counterfactual_from_abduction(model, x, latents, pixels, ctx, ctx_star, t_u=1.0)
        torch.manual_seed(5)
        separate = model(x, ctx, beta=4.0)
        torch.manual_seed(5)
        together = model.elbo_with_abduction(x, ctx, beta=4.0)[0]
        expected = counterfactual(model, x, ctx, ctx_star, t_u=1.0, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(x_star, expected, atol=1e-6)
    assert (x_star - x).abs().mean() > 1e-3  # the intervention did something, so the match is not trivial
    assert all(torch.equal(separate[k], together[k]) for k in ("loss", "nll", "kl", "nelbo"))
    assert torch.allclose(losses["nelbo"], losses["nll"] + losses["kl"])


def test_the_finding_edit_is_soft_thresholded_where_the_finding_flips_and_passes_its_gradient(model):
    from cxrcf.counterfactual import sparse_finding_edit

    tau = model.arch.gated_edit_threshold
    assert tau == 0.1
    x = torch.zeros(2, 1, 2, 2)
    ctx = torch.zeros(2, 6)
    ctx_star = ctx.clone()
    ctx_star[0, 5] = 1.0  # image 0 gains the finding; image 1 is not intervened on the finding
    raw = torch.tensor([[0.05, -0.3], [0.12, -0.08]]).expand(2, 1, 2, 2).clone().requires_grad_(True)
    out = sparse_finding_edit(model, x, raw, ctx, ctx_star)
    torch.testing.assert_close(out[0, 0], torch.tensor([[0.0, -0.2], [0.02, 0.0]]))
    torch.testing.assert_close(out[1], raw[1].detach())
    # straight-through: the thresholded edit passes the gradient of the raw one, so an edit can grow from zero
    (grad,) = torch.autograd.grad(out.sum(), raw)
    torch.testing.assert_close(grad, torch.ones_like(grad))


def test_only_do_finding_is_thresholded_and_exactly_by_the_soft_threshold(model):
    raw_model = HVAE(model.arch.model_copy(update={"gated_edit_threshold": 0.0}))
    raw_model.load_state_dict(model.state_dict())
    x, ctx = _batch()
    star = ctx.clone()
    star[:, 5] = 1 - star[:, 5]

    def cf(m, c):
        with torch.no_grad():
            return counterfactual(m, x, ctx, c, generator=torch.Generator().manual_seed(0))

    raw = cf(raw_model, star) - x
    want = x + torch.sign(raw) * torch.relu(raw.abs() - 0.1)
    torch.testing.assert_close(cf(model, star), want)
    assert ((want - x).abs() < (raw.abs() - 0.099).clamp_min(0) + 1e-6).all() and (want == x).any()
    torch.testing.assert_close(cf(model, _flip_sex(ctx)), cf(raw_model, _flip_sex(ctx)), rtol=0, atol=0)
