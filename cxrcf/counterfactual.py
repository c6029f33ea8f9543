"""Counterfactual images by abduction, action and prediction (SCIENCE.md section 3).

z ~ q(z | x, pa); (mu, s) = decoder(z, pa); (mu*, s*) = decoder(z, pa*); u = (x - mu) / s;
x* = clamp(mu* + t_u * s* * u, -1, 1). The abduction pass already runs the decoder on (z, pa), so
(mu, s) come with it and only the pass on pa* is extra. Differentiable when grad is enabled.

With `arch.gated_edit_threshold` > 0, on images whose finding the intervention flips the edit x* - x is
soft-thresholded: x* = x + sign(e) max(|e| - tau, 0). Under grad the threshold passes the gradient of
the unthresholded edit (straight-through), so CFT can grow an edit from zero, the adapters' start.
"""

from __future__ import annotations

import torch

from cxrcf.config import check_t_u
from cxrcf.errors import CxrcfError


def _noise(x, loc, logscale):
    """Abducted pixel noise u = (x - mu) / s."""
    return (x - loc) * torch.exp(-logscale)


def _predict(loc_star, logscale_star, u, t_u: float):
    """The prediction step: x* = clamp(mu* + t_u * s* * u, -1, 1)."""
    return (loc_star + t_u * torch.exp(logscale_star) * u).clamp(-1.0, 1.0)


def sparse_finding_edit(hvae, x: torch.Tensor, x_star: torch.Tensor, ctx: torch.Tensor,
                        ctx_star: torch.Tensor) -> torch.Tensor:
    """x* with its edit soft-thresholded where the finding flips (see the module doc); x* itself otherwise."""
    tau = hvae.arch.gated_edit_threshold
    if tau <= 0:
        return x_star
    col = hvae.decoder.gate_col
    flips = (ctx[:, col] != ctx_star[:, col]).view(-1, 1, 1, 1)
    edit = x_star - x
    sparse = torch.sign(edit) * torch.relu(edit.abs() - tau)
    if edit.requires_grad:
        sparse = edit + (sparse - edit).detach()
    return torch.where(flips, x + sparse, x_star)


def counterfactual(hvae, x: torch.Tensor, ctx: torch.Tensor, ctx_star: torch.Tensor, t_u: float = 1.0,
                   particles: int = 1, generator: torch.Generator | None = None) -> torch.Tensor:
    """x* for each image of `x` (N,C,R,R) from factual context `ctx` (N,D) to `ctx_star` (N,D).

    With several particles the latents are abducted that many times and the x* averaged.
    """
    if particles < 1:
        raise CxrcfError(f"particles: must be at least 1, got {particles}")
    check_t_u(t_u)
    if ctx_star.shape != ctx.shape:
        raise CxrcfError(f"ctx_star: shape {tuple(ctx_star.shape)} differs from ctx {tuple(ctx.shape)}")
    n = x.shape[0]
    if particles > 1:
        # all particles in one batch: one large pass is cheaper than several small ones
        x, ctx, ctx_star = x.repeat(particles, 1, 1, 1), ctx.repeat(particles, 1), ctx_star.repeat(particles, 1)
    latents, pixels = hvae.abduct_with_pixels(x, ctx, generator=generator)
    x_star = counterfactual_from_abduction(hvae, x, latents, pixels, ctx, ctx_star, t_u)
    if particles > 1:
        x_star = x_star.unflatten(0, (particles, n)).mean(0)
    return x_star.contiguous()


def counterfactual_from_abduction(hvae, x: torch.Tensor, latents: list[torch.Tensor],
                                  pixels: tuple[torch.Tensor, torch.Tensor], ctx: torch.Tensor,
                                  ctx_star: torch.Tensor, t_u: float = 1.0) -> torch.Tensor:
    """Action and prediction given an abduction of x under `ctx` already made: `latents` and the factual
    (loc, logscale) from `hvae.abduct_with_pixels` or `hvae.elbo_with_abduction`."""
    loc, logscale = pixels
    loc_star, logscale_star = hvae.decode(latents, ctx_star)
    x_star = _predict(loc_star, logscale_star, _noise(x, loc, logscale), t_u)
    return sparse_finding_edit(hvae, x, x_star, ctx, ctx_star)


def counterfactuals_shared(hvae, x: torch.Tensor, ctx: torch.Tensor, ctx_stars: list[torch.Tensor],
                           t_us: tuple[float, ...] = (1.0,), generator: torch.Generator | None = None
                           ) -> list[list[torch.Tensor]]:
    """x* for several interventions and t_u values from ONE abduction of x (one particle).

    `result[i][j]` is the counterfactual to `ctx_stars[i]` at `t_us[j]`; each equals `counterfactual`
    given the same abducted latents. Sharing the abduction makes evaluation several times cheaper and
    compares interventions and t_u values on the same exogenous noise of each image.
    """
    for t in t_us:
        check_t_u(t)
    latents, (loc, logscale) = hvae.abduct_with_pixels(x, ctx, generator=generator)
    u = _noise(x, loc, logscale)
    out = []
    for ctx_star in ctx_stars:
        if ctx_star.shape != ctx.shape:
            raise CxrcfError(f"ctx_star: shape {tuple(ctx_star.shape)} differs from ctx {tuple(ctx.shape)}")
        loc_star, logscale_star = hvae.decode(latents, ctx_star)
        out.append([sparse_finding_edit(hvae, x, _predict(loc_star, logscale_star, u, t), ctx, ctx_star).contiguous()
                    for t in t_us])
    return out
