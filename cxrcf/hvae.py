"""Conditional hierarchical VAE with an exogenous prior (SCIENCE.md section 3).

Top-down VDVAE-style HVAE after De Sousa Ribeiro et al. (2023). The parents (context, N x 6) enter
every decoder block: the posterior q(z_i | z_<i, pa, x) sees them and each block adds a projection of
(z_i, pa) to its residual stream, while the prior p(z_i | z_<i) runs on a separate chain that only
ever sees earlier latents, so the abducted latents are exogenous noise.

Speed notes (the maths is the reference's; only the arithmetic is rearranged):
- the parents are constant over space, so every 1x1 convolution over a concatenation with them is
  split into a convolution over the image-like part plus a per-image vector added by broadcasting;
- the posterior's first 1x1 convolution over its encoder activations is done once per resolution
  for all blocks there (one wide matmul instead of many thin ones), as is the GELU of those activations;
- abduction returns the factual decoder output it computed on the way, so a counterfactual needs
  one more decoder pass, not two;
- tensors are channels-last, which the CPU convolution kernels prefer;
- at 1x1 resolution a convolution is a matrix product (only the centre tap meets the image), so it
  runs as one: a oneDNN convolution call costs ~10x a matmul on such tiny tensors;
- in a deterministic decoder block (above z_max_res) z is the prior mean, so everything between the
  prior's last activations and the next residual/prior inputs is linear: the 1x1 maps are multiplied
  together (on weights, not images) and applied once, and the prior's unused scale channels are never
  computed;
- the next prior input, z_feat_proj([z, prior features]), is taken as a map of z plus a map of the
  prior's last activations (the composition of z_feat_proj with the prior's output 1x1), so the
  widest concatenation of the pass is never built;
- the per-resolution decoder bias is added by `_AddSpatialBias`, whose backward sums the channels-last
  gradient over the batch as a (N, H*W*C) matrix: autograd's broadcast reduction of the same tensor
  takes a strided path ~40x slower (14.5 ms against 0.3 ms for a (32, 32, 64, 64) gradient, 2 threads);
- the KL of each stochastic block comes from `_GaussianKLOverSpace`, with its derivatives written out:
  autograd's backward of the spatial sum starts from a stride-0 expansion, so the KL's gradients came
  out contiguous (NCHW), met channels-last tensors in every later op (mixed layouts take a slow path)
  and reached the prior's output convolution in the wrong layout.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cxrcf.config import HVAEArch
from cxrcf.errors import CxrcfError

PIXEL_LOGSCALE_MIN = -9.0  # the reference's floor; 1/255 bins need scales well below 1e-2
PIXEL_LOGSCALE_MAX = 2.0  # images live in [-1, 1]; wider scales only waste likelihood
LATENT_STD_MIN = 1e-4
_SOFTPLUS_OF_ONE = math.log(math.e - 1.0)  # softplus(raw + this) == 1 at raw == 0
_BIN_HALF_WIDTH = 1.0 / 255.0
_CL = torch.channels_last


# ----------------------------------------------------------------------------- architecture specs
@dataclass(frozen=True)
class EncStage:
    res: int
    blocks: int
    down: int | None


@dataclass(frozen=True)
class DecStage:
    res: int
    blocks: int


def parse_encoder(spec: str, resolution: int) -> list[EncStage]:
    """'64b1d2,32b3d2,...' -> stages; resolutions must chain through the down factors."""
    stages = []
    parts = spec.split(",")
    for i, part in enumerate(parts):
        m = re.fullmatch(r"(\d+)b(\d+)(?:d(\d+))?", part.strip())
        if not m:
            raise CxrcfError(f"generator.arch.enc_arch: {part!r} is not '<res>b<blocks>[d<factor>]'")
        res, blocks, down = int(m[1]), int(m[2]), int(m[3]) if m[3] else None
        expected = resolution if not stages else stages[-1].res // stages[-1].down
        if res != expected:
            raise CxrcfError(f"generator.arch.enc_arch: stage {part!r} should be at resolution {expected}")
        if down is not None and (down < 2 or res % down):
            raise CxrcfError(f"generator.arch.enc_arch: stage {part!r}: down factor must divide {res}")
        if down is None and i < len(parts) - 1:
            raise CxrcfError(f"generator.arch.enc_arch: stage {part!r} needs a down factor 'd<F>'")
        stages.append(EncStage(res, blocks, down))
    if stages[-1].down is not None:
        raise CxrcfError("generator.arch.enc_arch: the last stage cannot downsample")
    return stages


def parse_decoder(spec: str, enc_res: list[int]) -> list[DecStage]:
    stages = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)b(\d+)", part.strip())
        if not m:
            raise CxrcfError(f"generator.arch.dec_arch: {part!r} is not '<res>b<blocks>'")
        res, blocks = int(m[1]), int(m[2])
        if res not in enc_res:
            raise CxrcfError(f"generator.arch.dec_arch: resolution {res} is not an encoder resolution {enc_res}")
        if stages and (res <= stages[-1].res or res % stages[-1].res):
            raise CxrcfError(f"generator.arch.dec_arch: {part!r} must be an integer multiple above {stages[-1].res}")
        if blocks < 1:
            raise CxrcfError(f"generator.arch.dec_arch: {part!r} needs at least one block")
        stages.append(DecStage(res, blocks))
    if stages[-1].res != enc_res[0]:
        raise CxrcfError(f"generator.arch.dec_arch: must end at the image resolution {enc_res[0]}")
    return stages


# ------------------------------------------------------------------------------------ building blocks
def _conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: int = 0) -> torch.Tensor:
    if x.shape[-1] == 1 and x.shape[-2] == 1:
        # with 'same' padding only the centre tap sees the single pixel
        k = weight.shape[-1]
        return F.linear(x.flatten(1), weight[:, :, k // 2, k // 2], bias)[:, :, None, None]
    return F.conv2d(x, weight, bias, padding=padding)


def _apply(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    return _conv(x, conv.weight, conv.bias, conv.padding[0])


def _matrix(conv: nn.Conv2d) -> torch.Tensor:
    """A 1x1 convolution's weight as a matrix (out, in)."""
    return conv.weight.flatten(1)


class Block(nn.Module):
    """GELU bottleneck block: 1x1 -> kxk -> kxk -> 1x1, optional residual and average-pool downsampling."""

    def __init__(self, in_w: int, mid: int, out_w: int, k: int = 3, residual: bool = True, down: int | None = None,
                 first: bool = True):
        super().__init__()
        pad = k // 2
        # `first=False` leaves the input 1x1 to the caller, who computes it in pieces.
        self.c1 = nn.Conv2d(in_w, mid, 1) if first else None
        self.c2 = nn.Conv2d(mid, mid, k, padding=pad)
        self.c3 = nn.Conv2d(mid, mid, k, padding=pad)
        self.c4 = nn.Conv2d(mid, out_w, 1)
        self.residual = residual
        self.down = down
        self.proj = nn.Conv2d(in_w, out_w, 1) if residual and in_w != out_w else None

    def tail(self, a: torch.Tensor) -> torch.Tensor:
        """The block after its first 1x1 convolution (`a` is that convolution's output)."""
        return _apply(self.c4, self._mid(a))

    def _mid(self, a: torch.Tensor) -> torch.Tensor:
        return F.gelu(_apply(self.c3, F.gelu(_apply(self.c2, F.gelu(a)))))

    def body(self, x: torch.Tensor) -> torch.Tensor:
        """The activations that the last 1x1 convolution `c4` maps to the output (no pooling)."""
        return self._mid(_apply(self.c1, F.gelu(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.body(x)
        if self.down:
            # Pooling commutes with the 1x1 convolutions and the residual sum, so pool first:
            # the widest tensors of the block then exist only at the lower resolution.
            a = F.avg_pool2d(a, self.down)
            x = F.avg_pool2d(x, self.down) if self.residual else x
        out = _apply(self.c4, a)
        if self.residual:
            out = out + (_apply(self.proj, x) if self.proj is not None else x)
        return out


class Encoder(nn.Module):
    def __init__(self, arch: HVAEArch, stages: list[EncStage]):
        super().__init__()
        w = list(arch.widths)
        self.stem = nn.Conv2d(arch.input_channels, w[0], 7, padding=3)
        blocks = []
        for i, st in enumerate(stages):
            blocks += [Block(w[i], w[i] // arch.bottleneck, w[i]) for _ in range(st.blocks)]
            if st.down:
                blocks.append(Block(w[i], w[i] // arch.bottleneck, w[i + 1], down=st.down))
        with torch.no_grad():
            for b in blocks:
                b.c4.weight.mul_(math.sqrt(1.0 / len(blocks)))
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        h = _apply(self.stem, x)
        acts = {h.shape[-1]: h}
        for b in self.blocks:
            h = b(h)
            acts[h.shape[-1]] = h
        return acts


class DecoderBlock(nn.Module):
    def __init__(self, arch: HVAEArch, in_w: int, out_w: int, res: int, last: bool):
        super().__init__()
        mid = in_w // arch.bottleneck
        k = 3 if res > 2 else 1
        zd, cd = arch.z_dim, arch.context_dim
        self.res, self.z_dim, self.in_w = res, zd, in_w
        self.stochastic = res <= arch.z_max_res
        self.prior = Block(in_w, mid, 2 * zd + in_w, k, residual=False)
        if self.stochastic:
            # posterior input = [h, pa, encoder activation]; its 1x1 is split by part (see module doc);
            # the encoder part lives in the decoder's per-resolution `x_proj`.
            self.posterior = Block(2 * in_w + cd, mid, 2 * zd, k, residual=False, first=False)
            self.q_h = nn.Conv2d(in_w, mid, 1)
            self.q_pa = nn.Linear(cd, mid, bias=False)
        self.z_proj = nn.Conv2d(zd, in_w, 1)
        self.z_proj_pa = nn.Linear(cd, in_w, bias=False)
        # one (in_w, res, res) feature map per column of the mapped parents, scaled by the column's value
        n_map = len(template_columns(arch.parent_maps))
        self.pa_map = nn.Parameter(torch.zeros(n_map, in_w, res, res)) if n_map else None
        # the prior chain's next input; the last block has no successor
        self.z_feat_proj = None if last else nn.Conv2d(zd + in_w, out_w, 1)
        self.conv = Block(in_w, mid, out_w, k)
        self.adapter = GatedAdapter(out_w) if res in arch.gated_adapters else None

    def convolve(self, h: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        h = self.conv(h)
        return h if self.adapter is None else self.adapter(h, gate)


class GatedAdapter(nn.Module):
    """h + (1 - f) A0(h) + f A1(h) for a binary parent f (N,): per value a 3x3 convolution, GELU and a 1x1
    convolution that starts at zero, so the adapter is the identity until CFT trains it. On factual images the
    ELBO constraint keeps the adapter of the image's own value harmless; under do(f) the other adapter meets
    features of the other value and its edit depends on them (issue 14)."""

    def __init__(self, width: int):
        super().__init__()
        self.inner = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1) for _ in range(2))
        self.outer = nn.ModuleList(nn.Conv2d(width, width, 1) for _ in range(2))
        with torch.no_grad():
            for c in self.outer:
                c.weight.zero_()
                c.bias.zero_()

    def forward(self, h: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        a0, a1 = (_apply(o, F.gelu(_apply(i, h))) for i, o in zip(self.inner, self.outer))
        f = f.view(-1, 1, 1, 1).to(h.dtype)
        return h + a0 + f * (a1 - a0)


class _AddSpatialBias(torch.autograd.Function):
    """x (N, C, H, W) + b (1, C, H, W). Autograd's own backward sums a channels-last gradient over the batch
    with a strided reduction ~40x slower than the same sum over a (N, H*W*C) view, which this one uses."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return b + x  # b first: the sum takes its (channels-last) layout where x has none (1x1 upsampled)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        if g.is_contiguous(memory_format=_CL):
            n, c, hh, ww = g.shape
            gb = g.permute(0, 2, 3, 1).reshape(n, -1).sum(0).view(1, hh, ww, c).permute(0, 3, 1, 2)
        else:
            gb = g.sum(0, keepdim=True)
        return g, gb


def _std(raw: torch.Tensor) -> torch.Tensor:
    return F.softplus(raw + _SOFTPLUS_OF_ONE) + LATENT_STD_MIN


def _noise(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    # drawn into a contiguous buffer: normal_ on a channels-last tensor takes a serial path ~3x slower
    return torch.empty(like.shape, dtype=like.dtype, device=like.device).normal_(generator=generator)


class _GaussianKLOverSpace(torch.autograd.Function):
    """KL(N(q_loc, q_std) || N(p_loc, p_std)) summed over space -> (N, C), with its derivatives written out:
    log(p_std / q_std) + (q_std^2 + (q_loc - p_loc)^2) / (2 p_std^2) - 1/2. Autograd's backward starts from
    the sum's stride-0 expansion, so its first ops make contiguous (NCHW) gradients that then meet
    channels-last tensors in every later op of the chain (mixed layouts take a slow path) and reach the
    prior's output convolution in the wrong layout; here every gradient is computed from the saved
    channels-last tensors, in their layout."""

    @staticmethod
    def forward(ctx, q_loc, q_std, p_loc, p_std):
        d = q_loc - p_loc
        p_var = p_std.square()
        ratio = (q_std.square() + d.square()) / p_var  # (q_std^2 + d^2) / p_std^2
        ctx.save_for_backward(d, q_std, p_std, p_var, ratio)
        return (torch.log(p_std / q_std) + 0.5 * ratio - 0.5).sum(dim=(2, 3))

    @staticmethod
    def backward(ctx, g):
        d, q_std, p_std, p_var, ratio = ctx.saved_tensors
        g = g[:, :, None, None]
        g_loc = g * d / p_var
        g_q_std = g * (q_std / p_var - q_std.reciprocal())
        g_p_std = g * (1.0 - ratio) / p_std
        return g_loc, g_q_std, -g_loc, g_p_std


class Decoder(nn.Module):
    def __init__(self, arch: HVAEArch, stages: list[DecStage], width_at: dict[int, int]):
        super().__init__()
        plan = [(st.res, width_at[st.res]) for st in stages for _ in range(st.blocks)]
        blocks = []
        for i, (res, w) in enumerate(plan):
            nxt = plan[min(i + 1, len(plan) - 1)][1]
            blocks.append(DecoderBlock(arch, w, nxt, res, last=i == len(plan) - 1))
        scale = math.sqrt(1.0 / len(blocks))
        with torch.no_grad():
            for b in blocks:
                b.z_proj.weight.mul_(scale)
                b.z_proj_pa.weight.mul_(scale)
                b.conv.c4.weight.mul_(scale)
                # zero prior output: every block starts at N(0, 1) with no prior features
                b.prior.c4.weight.zero_()
        self.blocks = nn.ModuleList(blocks)
        self.resolutions = [st.res for st in stages]
        self.bias = nn.ParameterDict(
            {str(st.res): nn.Parameter(torch.zeros(1, width_at[st.res], st.res, st.res)) for st in stages})
        # per resolution: the encoder-activation part of every stochastic block's posterior 1x1
        self.stoch_at: dict[int, list[int]] = {}
        for i, b in enumerate(blocks):
            if b.stochastic:
                self.stoch_at.setdefault(b.res, []).append(i)
        self.x_proj = nn.ModuleDict({
            str(r): nn.Conv2d(width_at[r], len(ix) * blocks[ix[0]].q_h.out_channels, 1, bias=False)
            for r, ix in self.stoch_at.items()})
        self.n_stochastic = sum(len(ix) for ix in self.stoch_at.values())
        self.map_cols = template_columns(arch.parent_maps)
        mask = None
        if arch.template_only:
            mask = torch.ones(arch.context_dim)
            mask[template_columns(arch.template_only)] = 0.0
        self.register_buffer("deep_mask", mask, persistent=False)
        self.gate_col = template_columns(("finding",))[0]

    def forward(self, ctx: torch.Tensor, acts: dict[int, torch.Tensor] | None = None,
                latents: list[torch.Tensor] | None = None, t: float | None = None,
                generator: torch.Generator | None = None, keep_priors: bool = False):
        """One top-down pass. With `acts`: posterior sampling (returns latents and KL); with `latents`:
        those latents; otherwise prior sampling at temperature `t`. Returns (h, latents, kl, priors) where
        kl holds one (N, z_dim) tensor per stochastic block: each latent channel's KL summed over space."""
        n = ctx.shape[0]
        pa = F.gelu(ctx)  # the posterior's 1x1 sees GELU(pa) (its block starts with GELU)
        # the generative path sees every parent except those that act through the template alone
        ctx_gen = ctx if self.deep_mask is None else ctx * self.deep_mask
        gate = ctx[:, self.gate_col]
        first = self.bias[str(self.resolutions[0])]
        h = z_state = first.expand(n, -1, -1, -1).contiguous(memory_format=_CL)
        xq: dict[int, list[torch.Tensor]] = {}
        if acts is not None:
            for r, ix in self.stoch_at.items():
                xp = _apply(self.x_proj[str(r)], F.gelu(acts[r]))
                xq[r] = list(xp.chunk(len(ix), dim=1))
        zs: list[torch.Tensor] = []
        priors: list[tuple[torch.Tensor, torch.Tensor]] = []
        kl: list[torch.Tensor] = []
        j = 0
        for blk in self.blocks:
            res = blk.res
            if h.shape[-1] < res:
                b = self.bias[str(res)]
                h = _AddSpatialBias.apply(F.interpolate(h, scale_factor=res // h.shape[-1]), b)
                z_state = _AddSpatialBias.apply(
                    F.interpolate(z_state, scale_factor=res // z_state.shape[-1]), b)
            zd, w = blk.z_dim, blk.in_w
            pa_feat = blk.z_proj_pa(ctx_gen)[:, :, None, None]
            if blk.pa_map is not None:
                pa_feat = pa_feat + torch.einsum("nd,dchw->nchw", ctx_gen[:, self.map_cols],
                                                 blk.pa_map).contiguous(memory_format=_CL)
            a_prior = blk.prior.body(z_state)
            w_out, b_out = _matrix(blk.prior.c4), blk.prior.c4.bias
            w_feat, b_feat = w_out[2 * zd:], b_out[2 * zd:]
            nxt = blk.z_feat_proj
            if nxt is not None:
                w_nxt = _matrix(nxt)
                w_nxt_z, w_nxt_feat = w_nxt[:, :zd], w_nxt[:, zd:]
            if not blk.stochastic:
                # z is the prior mean: fold z_proj and z_feat_proj into the prior's output map
                w_loc, b_loc = w_out[:zd], b_out[:zd]
                w_z = _matrix(blk.z_proj)
                h = h + _conv(a_prior, (w_feat + w_z @ w_loc)[:, :, None, None],
                              b_feat + w_z @ b_loc + blk.z_proj.bias) + pa_feat
                h = blk.convolve(h, gate)
                if nxt is not None:
                    z_state = _conv(a_prior, (w_nxt_z @ w_loc + w_nxt_feat @ w_feat)[:, :, None, None],
                                    w_nxt_z @ b_loc + w_nxt_feat @ b_feat + nxt.bias)
                continue
            # split (not slicing) so the backward pass concatenates gradients instead of zero-filling
            p_loc, p_raw, p_feat = _apply(blk.prior.c4, a_prior).split([zd, zd, w], dim=1)
            p_std = _std(p_raw)
            if keep_priors:
                priors.append((p_loc, p_std))
            if acts is not None:
                a = _apply(blk.q_h, F.gelu(h)) + xq[res].pop(0) + blk.q_pa(pa)[:, :, None, None]
                q_loc, q_raw = blk.posterior.tail(a).chunk(2, dim=1)
                q_std = _std(q_raw)
                kl.append(_GaussianKLOverSpace.apply(q_loc, q_std, p_loc, p_std))
                if t is not None:
                    q_std = q_std * t
                z = q_loc + q_std * _noise(q_loc, generator)
            elif latents is not None:
                z = latents[j]
            else:
                z = p_loc + p_std * (1.0 if t is None else t) * _noise(p_loc, generator)
            zs.append(z)
            j += 1
            h = h + p_feat + _apply(blk.z_proj, z) + pa_feat
            h = blk.convolve(h, gate)
            if nxt is not None:
                # z_feat_proj([z, p_feat]) without the concatenation: p_feat is linear in a_prior
                z_state = (_conv(z, w_nxt_z[:, :, None, None], w_nxt_feat @ b_feat + nxt.bias)
                           + _conv(a_prior, (w_nxt_feat @ w_feat)[:, :, None, None], None))
        return h, zs, kl, priors


class HVAE(nn.Module):
    def __init__(self, arch: HVAEArch):
        super().__init__()
        self.arch = arch
        if arch.context_dim < 1:
            raise CxrcfError("generator.arch.context_dim: must be positive")
        enc = parse_encoder(arch.enc_arch, arch.resolution)
        if len(arch.widths) != len(enc):
            raise CxrcfError(f"generator.arch.widths: {len(arch.widths)} widths for {len(enc)} encoder stages")
        if any(w // arch.bottleneck < 1 for w in arch.widths):
            raise CxrcfError(f"generator.arch.bottleneck: {arch.bottleneck} leaves no channels in a width of {arch.widths}")
        width_at = {st.res: w for st, w in zip(enc, arch.widths)}
        dec = parse_decoder(arch.dec_arch, [st.res for st in enc])
        self.encoder = Encoder(arch, enc)
        self.decoder = Decoder(arch, dec, width_at)
        # loc and log-scale per pixel from one 1x1 convolution
        self.likelihood = nn.Conv2d(arch.widths[0], 2 * arch.input_channels, 1)
        self._logscale_max = min(PIXEL_LOGSCALE_MAX, math.log(arch.pixel_scale_max))
        # Optional linear map from the parents to the pixel mean, added to the decoder's: what the parents
        # change additively (soft-tissue shadows, density) is a per-pixel template, fitted by least squares
        # before training (`fit_parent_template`), where the deep path alone had not learned it after
        # thousands of steps (SCIENCE.md section 9). Columns of parents not in the template stay zero.
        # The template is a fixed buffer, not a parameter: Adam moves every pixel by ~lr per step whatever
        # its gradient, so a trainable template drifted from its least-squares fit while the deep path
        # was still poor (do(sex) L1 to the truth 1.46x the unedited image's at step 300, against 0.44x
        # for the fit alone). It is saved with the weights.
        if not set(arch.template_only) <= set(arch.parent_template):
            raise CxrcfError(f"generator.arch.template_only: {list(arch.template_only)} must be among "
                             f"parent_template {list(arch.parent_template)}")
        if set(arch.parent_maps) & set(arch.template_only):
            raise CxrcfError(f"generator.arch.parent_maps: {sorted(set(arch.parent_maps) & set(arch.template_only))} "
                             "act through the template alone (template_only), so a map of them would stay unused")
        dec_res = {st.res for st in dec}
        if not set(arch.gated_adapters) <= dec_res:
            raise CxrcfError(f"generator.arch.gated_adapters: {sorted(set(arch.gated_adapters) - dec_res)} "
                             f"not among the decoder resolutions {sorted(dec_res)}")
        template = None
        if arch.parent_template:
            template = torch.zeros(arch.context_dim, arch.input_channels, arch.resolution, arch.resolution)
        self.register_buffer("template", template)
        if arch.zero_parent_init:
            with torch.no_grad():
                for b in self.decoder.blocks:
                    b.z_proj_pa.weight.zero_()
        self.to(memory_format=_CL)

    # -------------------------------------------------------------------------------------- helpers
    def _check(self, x: torch.Tensor | None, ctx: torch.Tensor):
        a = self.arch
        if ctx.dim() != 2 or ctx.shape[1] != a.context_dim:
            raise CxrcfError(f"ctx: expected shape (N, {a.context_dim}), got {tuple(ctx.shape)}")
        if x is not None:
            want = (x.shape[0], a.input_channels, a.resolution, a.resolution)
            if tuple(x.shape) != want or x.shape[0] != ctx.shape[0]:
                raise CxrcfError(f"x: expected shape {want} matching ctx, got {tuple(x.shape)}")

    def _pixel_params(self, h: torch.Tensor, ctx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = _apply(self.likelihood, h)
        c = self.arch.input_channels
        loc = out[:, :c]
        if self.template is not None:
            loc = loc + torch.einsum("nd,dchw->nchw", ctx, self.template)
        return loc, out[:, c:].clamp(PIXEL_LOGSCALE_MIN, self._logscale_max)

    def _posterior_pass(self, x, ctx, t=None, generator=None):
        x = x.contiguous(memory_format=_CL)
        return self.decoder(ctx, acts=self.encoder(x), t=t, generator=generator)

    # ----------------------------------------------------------------------------------- public API
    def forward(self, x: torch.Tensor, ctx: torch.Tensor, beta: float = 1.0,
                free_bits: float = 0.0) -> dict[str, torch.Tensor]:
        """Per-pixel nats, batch means: loss = nll + beta * kl (the training objective), nelbo = nll + kl."""
        return self.elbo_with_abduction(x, ctx, beta, free_bits=free_bits)[0]

    def elbo_with_abduction(self, x: torch.Tensor, ctx: torch.Tensor, beta: float = 1.0,
                            generator: torch.Generator | None = None, free_bits: float = 0.0):
        """The training objective of `forward` plus what abduction would compute from the same
        posterior pass: (losses, latents, (loc, logscale)). CFT needs both; one pass serves both.

        With `free_bits` > 0 the loss charges each latent channel of each block at least that many nats
        (its KL summed over space, averaged over the batch), as the reference HVAE does: a channel
        below the floor costs nothing more to use, so latents are not switched off early in training.
        `kl` and `nelbo` are always the true values."""
        self._check(x, ctx)
        h, zs, kl_blocks, _ = self._posterior_pass(x, ctx, generator=generator)
        loc, logscale = self._pixel_params(h, ctx)
        nll = discretized_gaussian_nll(x, loc, logscale).mean()
        pixels = x[0].numel()
        kl = sum(b.sum(1) for b in kl_blocks).mean() / pixels
        charged = kl
        if free_bits > 0:
            charged = sum(b.mean(0).clamp_min(free_bits).sum() for b in kl_blocks) / pixels
        out = {"loss": nll + beta * charged, "nll": nll, "kl": kl, "nelbo": nll + kl}
        return out, zs, (loc, logscale)

    def parent_path_parameters(self) -> list[nn.Parameter]:
        """The decoder's generative parent paths: each block's parent projection and parent maps."""
        out = []
        for b in self.decoder.blocks:
            out += [b.z_proj_pa.weight] + ([b.pa_map] if b.pa_map is not None else [])
        return out

    def adapter_parameters(self) -> list[nn.Parameter]:
        """The finding-gated adapters' weights (empty without `gated_adapters`)."""
        return [p for b in self.decoder.blocks if b.adapter is not None for p in b.adapter.parameters()]

    @torch.no_grad()
    def kl_per_block(self, x: torch.Tensor, ctx: torch.Tensor) -> list[dict]:
        """Per stochastic block: resolution and mean KL in nats per image (a diagnostic of latent use)."""
        self._check(x, ctx)
        _, _, kl_blocks, _ = self._posterior_pass(x, ctx)
        res = [b.res for b in self.decoder.blocks if b.stochastic]
        return [{"block": i, "res": r, "kl_nats": float(k.sum(1).mean())} for i, (r, k) in enumerate(zip(res, kl_blocks))]

    def abduct(self, x: torch.Tensor, ctx: torch.Tensor, t: float | None = None,
               generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """Posterior latent samples, one per stochastic decoder block (t scales the posterior std)."""
        return self.abduct_with_pixels(x, ctx, t, generator)[0]

    def abduct_with_pixels(self, x, ctx, t=None, generator=None):
        """Latents plus the factual (loc, logscale) decoded from them, which abduction computes anyway."""
        self._check(x, ctx)
        h, zs, _, _ = self._posterior_pass(x, ctx, t, generator)
        return zs, self._pixel_params(h, ctx)

    def decode(self, latents: list[torch.Tensor], ctx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._check(None, ctx)
        if len(latents) != self.decoder.n_stochastic:
            raise CxrcfError(f"latents: expected {self.decoder.n_stochastic} tensors, got {len(latents)}")
        h, _, _, _ = self.decoder(ctx, latents=latents)
        return self._pixel_params(h, ctx)

    def prior_params(self, latents: list[torch.Tensor], ctx: torch.Tensor):
        """(loc, std) of every stochastic block's prior given the earlier latents; ctx must not matter."""
        return self.decoder(ctx, latents=latents, keep_priors=True)[3]

    @torch.no_grad()
    def sample(self, ctx: torch.Tensor, t: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
        """Latents from the prior at temperature t; returns the decoded per-pixel mean in [-1, 1]."""
        self._check(None, ctx)
        h, _, _, _ = self.decoder(ctx, t=t, generator=generator)
        return self._pixel_params(h, ctx)[0].clamp(-1, 1).contiguous()


def template_columns(parents) -> list[int]:
    from cxrcf.attributes import CONTEXT_COLUMNS

    return sorted(c for p in parents for c in CONTEXT_COLUMNS[p])


@torch.no_grad()
def fit_parent_template(x: torch.Tensor, ctx: torch.Tensor, parents, ridge: float = 1e-3) -> torch.Tensor:
    """Least-squares per-pixel template (D, C, R, R) of images `x` (N, C, R, R) on the context columns of
    `parents` plus an intercept (dropped: the decoder has its own bias); other columns are zero."""
    cols = template_columns(parents)
    design = torch.cat([ctx[:, cols].double(), torch.ones(len(ctx), 1, dtype=torch.float64)], 1)
    gram = design.T @ design + ridge * len(ctx) * torch.eye(design.shape[1], dtype=torch.float64)
    coef = torch.linalg.solve(gram, design.T @ x.flatten(1).double())
    out = torch.zeros(ctx.shape[1], *x.shape[1:], dtype=torch.float32)
    out[cols] = coef[:-1].float().view(len(cols), *x.shape[1:])
    return out


def discretized_gaussian_nll(x: torch.Tensor, loc: torch.Tensor, logscale: torch.Tensor) -> torch.Tensor:
    """Per-image mean NLL (nats/pixel) of 8-bit data in [-1, 1] under a Gaussian binned at 256 levels.

    Edge bins take the tails. An interior bin's mass is Phi(a) - Phi(b) with a > b taken on the side of
    the mean where the two do not cancel, and its log is log Phi(a) + log(1 - Phi(b)/Phi(a)), both parts
    from log_ndtr: exact however far the pixel lies from the mean. A floor on the mass (as this function
    once had, 1e-12) makes every pixel beyond ~7 scales a constant with no gradient: with the pixel scale
    capped at 0.05 that was a residual of ~0.35, and the mean never learned the high-contrast structures.
    """
    inv = torch.exp(-logscale)
    c = x - loc
    hi = (c + _BIN_HALF_WIDTH) * inv
    lo = (c - _BIN_HALF_WIDTH) * inv
    right = c > 0
    a = torch.where(right, -lo, hi)
    b = torch.where(right, -hi, lo)
    log_a = torch.special.log_ndtr(a)
    gap = torch.special.log_ndtr(b) - log_a  # < 0
    interior = log_a + torch.log(-torch.expm1(gap.clamp_max(-1e-30)))
    logp = torch.where(x < -0.999, torch.special.log_ndtr(hi),
                       torch.where(x > 0.999, torch.special.log_ndtr(-lo), interior))
    return -logp.flatten(1).mean(1)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
