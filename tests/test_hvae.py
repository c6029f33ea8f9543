"""Conditional HVAE: shapes, spec parsing, likelihood, ELBO descent, exogenous prior, stability."""

from __future__ import annotations

import math

import pytest
import torch

from cxrcf.config import REFERENCE64_ARCH, HVAEArch, preset_params
from cxrcf.errors import CxrcfError
from cxrcf.hvae import HVAE, count_parameters, discretized_gaussian_nll


def _arch(preset: str) -> HVAEArch:
    return preset_params(preset).generator.arch


def _ctx(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    race = torch.nn.functional.one_hot(torch.randint(0, 3, (n,), generator=g), 3).float()
    age = torch.rand(n, 1, generator=g) * 2 - 1
    binary = torch.randint(0, 2, (n, 2), generator=g).float()
    return torch.cat([age, race, binary], dim=1)


def _images(n: int, res: int, seed: int = 0) -> torch.Tensor:
    """8-bit-quantised smooth blobs: structure a small HVAE can learn quickly."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.linspace(-1, 1, res)
    yy, xx = torch.meshgrid(grid, grid, indexing="ij")
    cx, cy = torch.rand(2, n, 1, 1, generator=g) - 0.5
    radius = 0.3 + 0.3 * torch.rand(n, 1, 1, generator=g)
    img = torch.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / radius**2) * 1.6 - 0.8
    return (torch.round((img.unsqueeze(1) + 1) * 127.5).clamp(0, 255) / 127.5 - 1).float()


@pytest.mark.parametrize("preset", ["smoke", "cpu"])
def test_shapes_and_dtypes(preset):
    arch = _arch(preset)
    torch.manual_seed(0)
    model = HVAE(arch)
    n, r = 3, arch.resolution
    x, ctx = _images(n, r), _ctx(n)
    out = model(x, ctx, beta=2.0)
    assert set(out) == {"loss", "nll", "kl", "nelbo"}
    for v in out.values():
        assert v.shape == () and v.dtype == torch.float32 and torch.isfinite(v)
    assert torch.allclose(out["loss"], out["nll"] + 2.0 * out["kl"])
    assert torch.allclose(out["nelbo"], out["nll"] + out["kl"])
    zs = model.abduct(x, ctx)
    stochastic = [b for b in model.decoder.blocks if b.stochastic]
    assert len(zs) == len(stochastic) > 0
    for z, b in zip(zs, stochastic):
        assert z.shape == (n, arch.z_dim, b.res, b.res) and z.dtype == torch.float32
        assert b.res <= arch.z_max_res
    loc, logscale = model.decode(zs, ctx)
    assert loc.shape == logscale.shape == (n, arch.input_channels, r, r)
    assert loc.dtype == logscale.dtype == torch.float32
    s = model.sample(ctx, t=0.5, generator=torch.Generator().manual_seed(1))
    assert s.shape == (n, 1, r, r) and s.min() >= -1 and s.max() <= 1


def test_reference_and_paper_sizes():
    ref = HVAE(HVAEArch(**REFERENCE64_ARCH))
    # the published configuration has 1.40 M parameters (ours omits one unused 1,568-weight projection)
    assert 1.38e6 < count_parameters(ref) < 1.41e6
    paper = HVAE(_arch("paper"))
    assert sum(b.stochastic for b in paper.decoder.blocks) == 38  # SCIENCE.md section 3
    assert 5e6 < count_parameters(paper) < 20e6


@pytest.mark.parametrize("field,value,needle", [
    ("enc_arch", "32b1x2,16b1", "enc_arch"),
    ("enc_arch", "32b1d2,8b1", "resolution 16"),
    ("enc_arch", "32b1d3,8b1", "divide"),
    ("dec_arch", "1b1,8b1,16b1,24b1", "24"),
    ("dec_arch", "1b1,8b1,16b1", "image resolution"),
    ("widths", (8, 16, 16), "widths"),
])
def test_bad_specs_name_the_field(field, value, needle):
    arch = _arch("smoke").model_copy(update={field: value})
    with pytest.raises(CxrcfError, match=needle):
        HVAE(arch)


def test_discretized_gaussian_is_a_distribution_over_256_levels():
    levels = (torch.arange(256).float() / 127.5 - 1).view(256, 1, 1, 1)
    for loc, logscale in [(0.3, -3.0), (-0.99, -6.0), (1.5, 0.5), (0.0, -9.0)]:
        nll = discretized_gaussian_nll(levels, torch.full_like(levels, loc), torch.full_like(levels, logscale))
        assert torch.isfinite(nll).all()
        mass = torch.exp(-nll).sum()  # one pixel per image: per-image NLL is that pixel's -log p
        assert abs(mass.item() - 1.0) < 1e-3, (loc, logscale, mass)


def test_discretized_gaussian_keeps_a_gradient_far_from_the_mean():
    # 20 scales out the bin mass is ~1e-90: a floored log-mass would be flat there and the mean never pulled back
    x = torch.tensor([0.2]).view(1, 1, 1, 1)
    loc = torch.tensor([-0.8]).view(1, 1, 1, 1).requires_grad_()
    logscale = torch.full_like(x, math.log(0.05))
    nll = discretized_gaussian_nll(x, loc, logscale)
    nll.sum().backward()
    z = 1.0 / 0.05
    assert torch.isfinite(nll).all() and nll.item() > 0.5 * z * z * 0.9  # ~ z^2 / 2 nats, not a floor
    assert loc.grad.item() < -0.9 * z / 0.05  # d/dloc of (x - loc)^2 / (2 s^2) = -(x - loc) / s^2


def test_elbo_decreases_on_a_fixed_batch():
    torch.manual_seed(0)
    model = HVAE(_arch("smoke"))
    x, ctx = _images(16, 32), _ctx(16)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        opt.zero_grad()
        out = model(x, ctx, beta=1.0)
        out["loss"].backward()
        opt.step()
        losses.append(out["nelbo"].item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.5, (first, last)


def _plain_elbo(model: HVAE, x: torch.Tensor, ctx: torch.Tensor, beta: float, noise: torch.Generator):
    """The training loss from the model's parameters by the plain recipe (every 1x1 convolution over the
    concatenation it stands for, parents broadcast over space, prior outputs sliced, pooling after the
    block), against which the model's rearranged arithmetic is checked."""
    F = torch.nn.functional
    arch = model.arch

    def block(b, h):
        a = F.gelu(b.c3(F.gelu(b.c2(F.gelu(b.c1(F.gelu(h)))))))
        out = b.c4(a)
        if b.residual:
            out = out + (b.proj(h) if b.proj is not None else h)
        return F.avg_pool2d(out, b.down) if b.down else out

    def std(raw):
        return F.softplus(raw + math.log(math.e - 1)) + 1e-4

    h = model.encoder.stem(x)
    acts = {h.shape[-1]: h}
    for b in model.encoder.blocks:
        h = block(b, h)
        acts[h.shape[-1]] = h
    dec = model.decoder
    n, seen = x.shape[0], {}
    h = z_state = dec.bias[str(dec.resolutions[0])].expand(n, -1, -1, -1)
    kl = 0.0
    for blk in dec.blocks:
        r, zd = blk.res, blk.z_dim
        if h.shape[-1] < r:
            h = dec.bias[str(r)] + F.interpolate(h, scale_factor=r // h.shape[-1])
            z_state = dec.bias[str(r)] + F.interpolate(z_state, scale_factor=r // z_state.shape[-1])
        pa = ctx[:, :, None, None].expand(-1, -1, r, r)
        prior = block(blk.prior, z_state)
        p_loc, p_raw, p_feat = prior[:, :zd], prior[:, zd:2 * zd], prior[:, 2 * zd:]
        if blk.stochastic:
            i = seen[r] = seen.get(r, -1) + 1
            mid = blk.q_h.out_channels
            w_x = dec.x_proj[str(r)].weight[i * mid:(i + 1) * mid]
            w_in = torch.cat([blk.q_h.weight, blk.q_pa.weight[:, :, None, None], w_x], dim=1)
            q = blk.posterior
            a = F.conv2d(F.gelu(torch.cat([h, pa, acts[r]], dim=1)), w_in, blk.q_h.bias)
            q_loc, q_raw = q.c4(F.gelu(q.c3(F.gelu(q.c2(F.gelu(a)))))).chunk(2, dim=1)
            q_std, p_std = std(q_raw), std(p_raw)
            kl = kl + (torch.log(p_std / q_std) + 0.5 * (q_std**2 + (q_loc - p_loc) ** 2) / p_std**2 - 0.5).sum()
            z = q_loc + q_std * torch.empty(q_loc.shape, dtype=q_loc.dtype).normal_(generator=noise)
        else:
            z = p_loc
        w_z = torch.cat([blk.z_proj.weight, blk.z_proj_pa.weight[:, :, None, None]], dim=1)
        h = block(blk.conv, h + p_feat + F.conv2d(torch.cat([z, pa], dim=1), w_z, blk.z_proj.bias))
        if blk.adapter is not None:
            a0, a1 = (o(F.gelu(i(h))) for i, o in zip(blk.adapter.inner, blk.adapter.outer))
            f = ctx[:, 5, None, None, None]
            h = h + (1 - f) * a0 + f * a1
        if blk.z_feat_proj is not None:
            z_state = blk.z_feat_proj(torch.cat([z, p_feat], dim=1))
    out = model.likelihood(h)
    logscale = out[:, 1:].clamp(-9.0, min(2.0, math.log(arch.pixel_scale_max)))
    nll = discretized_gaussian_nll(x, out[:, :1], logscale).mean()
    return nll + beta * kl / n / x[0].numel()


@pytest.mark.parametrize("z_max_res", [1, 16])
def test_the_rearranged_arithmetic_computes_the_plain_recipes_loss_and_gradients(z_max_res):
    """Split 1x1 maps, folded deterministic blocks, matmuls at 1x1 resolution: the same function."""
    arch = _arch("smoke").model_copy(update={"z_max_res": z_max_res})
    torch.manual_seed(0)
    model = HVAE(arch).double()
    with torch.no_grad():  # zero-initialised prior heads would hide the folded prior-output maps
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x, ctx = _images(4, 32).double(), _ctx(4).double()
    got = model.elbo_with_abduction(x, ctx, 3.0, generator=torch.Generator().manual_seed(5))[0]["loss"]
    want = _plain_elbo(model, x, ctx, 3.0, torch.Generator().manual_seed(5))
    grads = [torch.autograd.grad(v, list(model.parameters())) for v in (got, want)]
    assert abs(got.item() - want.item()) < 1e-10 * abs(want.item())
    for g, w in zip(*grads):
        assert torch.allclose(g, w, rtol=1e-9, atol=1e-12)


def test_the_hand_written_backward_passes_match_autograd_and_keep_channels_last():
    """The KL and spatial-bias autograd Functions: float64 gradcheck, and channels-last gradients out."""
    from cxrcf.hvae import _AddSpatialBias, _GaussianKLOverSpace

    g = torch.Generator().manual_seed(0)
    cl = torch.channels_last

    def t(*shape, positive=False):
        v = torch.randn(*shape, generator=g, dtype=torch.float64)
        v = v.exp() if positive else v
        return v.contiguous(memory_format=cl).requires_grad_()

    kl_in = (t(2, 3, 4, 5), t(2, 3, 4, 5, positive=True), t(2, 3, 4, 5), t(2, 3, 4, 5, positive=True))
    assert torch.autograd.gradcheck(_GaussianKLOverSpace.apply, kl_in)
    q_loc, q_std, p_loc, p_std = kl_in
    plain = (torch.log(p_std / q_std) + 0.5 * (q_std**2 + (q_loc - p_loc) ** 2) / p_std**2 - 0.5).sum((2, 3))
    assert torch.allclose(_GaussianKLOverSpace.apply(*kl_in), plain, rtol=1e-12)
    bias_in = (t(2, 3, 4, 5), t(1, 3, 4, 5))
    assert torch.autograd.gradcheck(_AddSpatialBias.apply, bias_in)
    grads = torch.autograd.grad(_GaussianKLOverSpace.apply(*kl_in).sum(), kl_in)
    grads += torch.autograd.grad(_AddSpatialBias.apply(*bias_in).square().sum(), bias_in)
    assert all(gr.is_contiguous(memory_format=cl) for gr in grads)


def test_prior_ignores_parents_but_decoder_uses_them():
    torch.manual_seed(0)
    model = HVAE(_arch("smoke"))
    with torch.no_grad():  # make every prior head non-trivial (it is zero-initialised)
        for b in model.decoder.blocks:
            b.prior.c4.weight.normal_(0, 0.1)
    x = _images(4, 32)
    ctx_a, ctx_b = _ctx(4, seed=1), _ctx(4, seed=2)
    zs = model.abduct(x, ctx_a, generator=torch.Generator().manual_seed(0))
    pa = model.prior_params(zs, ctx_a)
    pb = model.prior_params(zs, ctx_b)
    assert len(pa) == len(zs)
    for (la, sa), (lb, sb) in zip(pa, pb):
        assert torch.equal(la, lb) and torch.equal(sa, sb)
    assert pa[-1][0].abs().sum() > 0  # later priors really depend on earlier latents
    loc_a, _ = model.decode(zs, ctx_a)
    loc_b, _ = model.decode(zs, ctx_b)
    assert (loc_a - loc_b).abs().max() > 1e-4
    # the posterior does see the parents
    g = torch.Generator
    za = model.abduct(x, ctx_a, generator=g().manual_seed(0))
    zb = model.abduct(x, ctx_b, generator=g().manual_seed(0))
    assert max((a - b).abs().max().item() for a, b in zip(za, zb)) > 1e-5


def test_no_nan_at_high_lr_with_clipping_and_skipping():
    """What the training loop does (clip 100, skip > 1000) must keep a stable model finite."""
    torch.manual_seed(0)
    model = HVAE(_arch("smoke"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.9), weight_decay=0.05)
    g = torch.Generator().manual_seed(0)
    skipped = 0
    for step in range(200):
        x = torch.randint(0, 256, (4, 1, 32, 32), generator=g).float() / 127.5 - 1
        opt.zero_grad(set_to_none=True)
        out = model(x, _ctx(4, seed=step), beta=4.0)
        assert torch.isfinite(out["loss"]), step
        out["loss"].backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 100.0)
        if not torch.isfinite(norm) or norm > 1000:
            skipped += 1
            continue
        opt.step()
    assert skipped < 20
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_free_bits_charge_each_latent_channel_a_floor_and_kl_stays_the_true_value():
    torch.manual_seed(0)
    model = HVAE(_arch("smoke"))
    x = torch.rand(4, 1, 32, 32) * 2 - 1
    ctx = torch.randn(4, 6)
    plain = model(x, ctx, beta=2.0)
    channels = model.decoder.n_stochastic * model.arch.z_dim
    floor = 1e4  # far above any channel's KL at initialisation: every channel is charged the floor
    torch.manual_seed(1)
    fb = model(x, ctx, beta=2.0, free_bits=floor)
    torch.manual_seed(1)
    again = model(x, ctx, beta=2.0)
    torch.testing.assert_close(fb["kl"], again["kl"])  # reported KL is the true one
    torch.testing.assert_close(fb["loss"] - fb["nll"], torch.tensor(2.0 * floor * channels / x[0].numel()))
    assert float(plain["loss"] - plain["nll"]) == pytest.approx(2.0 * float(plain["kl"]), rel=1e-5)


def test_the_kl_weight_warms_up_from_beta_start_to_beta():
    g = preset_params("smoke").generator
    up = g.model_copy(update={"beta": 4.0, "beta_start": 0.0, "beta_warmup_steps": 100})
    assert [up.beta_at(s) for s in (0, 49, 99, 500)] == pytest.approx([0.04, 2.0, 4.0, 4.0])
    down = g.model_copy(update={"beta": 4.0, "beta_start": 40.0, "beta_warmup_steps": 10})
    assert down.beta_at(0) == pytest.approx(36.4) and down.beta_at(9) == 4.0
    assert g.model_copy(update={"beta": 4.0, "beta_warmup_steps": 0}).beta_at(0) == 4.0


def test_the_pixel_scale_ceiling_bounds_the_decoders_scale():
    torch.manual_seed(0)
    capped = HVAE(_arch("smoke").model_copy(update={"pixel_scale_max": 0.05}))
    with torch.no_grad():
        capped.likelihood.bias[1] = 3.0  # a raw log-scale far above the ceiling
        _, logscale = capped.decode(capped.abduct(torch.zeros(2, 1, 32, 32), torch.zeros(2, 6)), torch.zeros(2, 6))
    assert float(logscale.max()) == pytest.approx(float(torch.log(torch.tensor(0.05))), abs=1e-6)


def test_the_parent_template_adds_a_linear_map_of_the_parents_to_the_pixel_mean():
    torch.manual_seed(0)
    plain = HVAE(_arch("smoke"))
    with_t = HVAE(_arch("smoke").model_copy(update={"parent_template": ("age", "race", "sex", "finding")}))
    with_t.load_state_dict(plain.state_dict(), strict=False)  # the same network, a zero template
    x, ctx = _images(3, 32), _ctx(3)
    latents = plain.abduct(x, ctx, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(with_t.decode(latents, ctx)[0], plain.decode(latents, ctx)[0])
    with torch.no_grad():
        with_t.template[4].fill_(0.25)  # the sex column: +0.25 everywhere for sex = 1
    star = ctx.clone()
    star[:, 4] = 1 - star[:, 4]
    delta = with_t.decode(latents, star)[0] - with_t.decode(latents, ctx)[0]
    plain_delta = plain.decode(latents, star)[0] - plain.decode(latents, ctx)[0]
    sign = (star[:, 4] - ctx[:, 4]).view(-1, 1, 1, 1)
    torch.testing.assert_close(delta - plain_delta, (0.25 * sign).expand_as(delta), atol=1e-5, rtol=0)


def test_the_fitted_template_recovers_an_additive_parent_effect():
    from cxrcf.hvae import fit_parent_template

    g = torch.Generator().manual_seed(0)
    ctx = _ctx(400, seed=3)
    shadow = torch.zeros(1, 32, 32)
    shadow[:, 20:26, 4:12] = 0.3  # a blob present only when sex (column 4) = 1
    x = 0.1 * torch.randn(400, 1, 32, 32, generator=g) + ctx[:, 4].view(-1, 1, 1, 1) * shadow - 0.2
    t = fit_parent_template(x, ctx, ("sex",))
    assert t.shape == (6, 1, 32, 32)
    torch.testing.assert_close(t[4], shadow, atol=0.05, rtol=0)
    assert t[[0, 1, 2, 3, 5]].abs().max() == 0  # parents outside the template stay zero
    model = HVAE(_arch("smoke").model_copy(update={"parent_template": ("sex",), "zero_parent_init": True}))
    assert all(float(b.z_proj_pa.weight.abs().max()) == 0 for b in model.decoder.blocks)


def test_parent_maps_start_at_zero_and_give_the_parent_a_located_edit():
    base = _arch("smoke")
    plain = HVAE(base)
    mapped = HVAE(base.model_copy(update={"parent_maps": ("finding",)}))
    assert mapped.load_state_dict(plain.state_dict(), strict=False).missing_keys == [
        f"decoder.blocks.{i}.pa_map" for i in range(len(mapped.decoder.blocks))]
    x, ctx = _images(4, 32), _ctx(4)
    flipped = ctx.clone()
    flipped[:, 5] = 1 - flipped[:, 5]
    zs = plain.abduct(x, ctx, generator=torch.Generator().manual_seed(0))
    for c in (ctx, flipped):  # zero maps: the same decoder as without them
        torch.testing.assert_close(mapped.decode(zs, c), plain.decode(zs, c), rtol=0, atol=1e-6)
    # a map at the lower right of the last block moves the mean there, and only for finding = 1
    last = mapped.decoder.blocks[-1]
    with torch.no_grad():
        last.pa_map[0, :, -6:, -6:] = 1.0
    moved = (mapped.decode(zs, ctx)[0] - plain.decode(zs, ctx)[0]).abs()
    assert moved[ctx[:, 5] == 0].max() == 0
    corner, rest = moved[ctx[:, 5] == 1][..., -8:, -8:], moved[ctx[:, 5] == 1][..., :16, :16]
    assert corner.mean() > 10 * rest.mean()
    params = mapped.parent_path_parameters()
    assert len(params) == 2 * len(mapped.decoder.blocks) and any(p is last.pa_map for p in params)
    with pytest.raises(CxrcfError, match="parent_maps"):
        HVAE(base.model_copy(update={"template_only": ("finding",), "parent_template": ("finding",),
                                     "parent_maps": ("finding",)}))


def test_gated_adapters_start_as_the_identity_act_by_the_finding_and_stay_frozen_in_pretraining():
    from training.generator import GeneratorObjective

    base = _arch("smoke").model_copy(update={"gated_adapters": ()})
    plain = HVAE(base)
    gated = HVAE(base.model_copy(update={"gated_adapters": (16, 32)}))
    missing = gated.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing and all(".adapter." in k for k in missing)
    assert len(gated.adapter_parameters()) == 2 * 2 * 2 * 2  # blocks x (inner, outer) x (A0, A1) x (weight, bias)
    x, ctx = _images(6, 32), _ctx(6)
    zs = plain.abduct(x, ctx, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(gated.decode(zs, ctx), plain.decode(zs, ctx), rtol=0, atol=1e-6)
    # a non-zero A1 changes the images whose finding is 1 and no other
    with torch.no_grad():
        gated.decoder.blocks[-1].adapter.outer[1].bias.fill_(0.5)
    moved = (gated.decode(zs, ctx)[0] - plain.decode(zs, ctx)[0]).flatten(1).abs().amax(1)
    f = ctx[:, 5] == 1
    assert f.any() and (~f).any()
    assert (moved[~f] == 0).all() and (moved[f] > 1e-3).all()
    with pytest.raises(CxrcfError, match="gated_adapters: \\[24\\]"):
        HVAE(base.model_copy(update={"gated_adapters": (24,)}))
    objective = GeneratorObjective(preset_params("smoke").generator)
    adapters = {id(p) for p in objective.model.adapter_parameters()}
    assert adapters and all(not p.requires_grad for p in objective.model.adapter_parameters())
    assert all(p.requires_grad for p in objective.model.parameters() if id(p) not in adapters)
