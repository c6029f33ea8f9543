"""Phase `generator`: HVAE pretraining with loss = nll + beta*kl (beta on a warm-up schedule, optional
free bits). The exported weights are the EMA weights at the best validation loss; `eps`, the level CFT
must stay under, is their training-set loss (nats/pixel), as the reference defines it."""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch import nn

GRID_IMAGES = 8
EPS_IMAGES = 4000  # training images that measure eps: its standard error is ~0.001 nats/pixel


class GeneratorObjective(nn.Module):
    def __init__(self, cfg, template: torch.Tensor | None = None):
        super().__init__()
        from cxrcf.hvae import HVAE

        self.model = HVAE(cfg.arch)
        # the finding-gated adapters stay the identity through pretraining: CFT trains them
        for p in self.model.adapter_parameters():
            p.requires_grad_(False)
        if template is not None:
            with torch.no_grad():
                self.model.template.copy_(template)
        self.cfg = cfg
        self.beta = cfg.beta_at(0)

    def before_step(self, step: int) -> None:
        self.beta = self.cfg.beta_at(step)

    def forward(self, x, parents, rng):
        from cxrcf.attributes import context

        out = self.model(x, context(parents), self.beta, free_bits=self.cfg.free_bits)
        return {"loss": out["loss"], "nll": out["nll"], "kl": out["kl"], "beta": torch.tensor(self.beta)}


def build_objective(cfg, template: torch.Tensor | None = None) -> GeneratorObjective:
    return GeneratorObjective(cfg, template)


def initial_template(cfg, data_root) -> torch.Tensor | None:
    """The parent template fitted on the training images (None when the architecture has none)."""
    from cxrcf.attributes import context
    from cxrcf.hvae import fit_parent_template
    from training.common import load_arrays

    if not cfg.arch.parent_template:
        return None
    x, parents = load_arrays(str(Path(data_root).resolve()), cfg.arch.resolution, "train")
    return fit_parent_template(x, context(parents), cfg.arch.parent_template)


def validate_hvae(model, x, parents, device, beta: float) -> dict[str, float]:
    """Validation means (per pixel) of the training objective and its parts."""
    from cxrcf.attributes import context
    from training.common import batched

    outs = batched(lambda xc, pc: (len(xc), model(xc, context(pc), beta)), x, parents, device)
    n = sum(b for b, _ in outs)
    return {k: float(sum(b * o[k].float() for b, o in outs) / n) for k in ("loss", "nll", "kl", "nelbo")}


def _interventions(parents: dict) -> dict[str, torch.Tensor]:
    """A visible change per attribute for the sample grid: flip binaries, next race, age +/- 30 years."""
    age = parents["age"].float()
    return {
        "sex": 1.0 - parents["sex"].float(),
        "race": (parents["race"].long() + 1) % 3,
        "finding": 1.0 - parents["finding"].float(),
        "age": torch.where(age < 60, age + 30, age - 30).clamp(0, 120),
    }


@torch.no_grad()
def sample_grid(hvae, x, parents, path: str | Path, scm=None, t_u: float = 1.0, seed: int = 0) -> Path:
    """PNG grid, one row per image: factual | reconstruction | do(sex) | do(race) | do(finding) | do(age).

    With an SCM the counterfactual parents follow it (do(age) recomputes finding); without one the
    intervened parent alone changes.
    """
    from PIL import Image, ImageDraw

    from cxrcf.attributes import context
    from cxrcf.counterfactual import counterfactual
    from cxrcf.fileio import atomic_path

    hvae = hvae.eval()
    device = next(hvae.parameters()).device
    x = x[:GRID_IMAGES].to(device)
    parents = {k: v[:GRID_IMAGES].to(device) for k, v in parents.items()}
    ctx = context(parents)
    gen = torch.Generator(device=device).manual_seed(seed)
    recon = hvae.decode(hvae.abduct(x, ctx, generator=gen), ctx)[0].clamp(-1, 1)
    columns, titles = [x, recon], ["factual", "recon"]
    for attr, value in _interventions(parents).items():
        if scm is not None:
            star = scm.counterfactual(parents, {attr: value}, generator=gen)
        else:
            star = {**parents, attr: value}
        columns.append(counterfactual(hvae, x, ctx, context(star), t_u=t_u, generator=gen))
        titles.append(f"do({attr})")
    res, pad, head = x.shape[-1], 2, 14
    scale = max(1, 64 // res)
    cell = res * scale + pad
    canvas = Image.new("L", (cell * len(columns) + pad, head + cell * len(x) + pad), color=255)
    draw = ImageDraw.Draw(canvas)
    for c, (col, title) in enumerate(zip(columns, titles)):
        draw.text((pad + c * cell, 1), title, fill=0)
        pixels = ((col.float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        for r in range(len(x)):
            tile = Image.fromarray(pixels[r, 0].numpy(), mode="L").resize((res * scale, res * scale), Image.NEAREST)
            canvas.paste(tile, (pad + c * cell, head + pad + r * cell))
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
    return Path(path)


def training_set_elbo(model, data_root, resolution: int, beta: float, max_images: int = EPS_IMAGES) -> dict:
    """`train_loss` (the beta-weighted objective), `train_nelbo`, `train_nll`, `train_kl` of `model` on
    the first `max_images` training images, per pixel."""
    from training.common import load_arrays

    x, parents = load_arrays(str(Path(data_root).resolve()), resolution, "train")
    n = min(len(x), max_images)
    device = next(model.parameters()).device
    # The posterior draws are seeded (and the caller's RNG left as it was), so eps is a function of the
    # model and the data alone: recomputing it gives the same number, not another Monte Carlo estimate.
    with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)
        out = validate_hvae(model.eval(), x[:n], {k: v[:n] for k, v in parents.items()}, device, beta)
    return {f"train_{k}": v for k, v in out.items()}


def make_task(params, data_root):
    from training.common import loader
    from training.loop import Task

    g = params.generator
    build = functools.partial(build_objective, g, initial_template(g, data_root))
    return Task(name="generator", optim=g.optim, build=build,
                data=loader(data_root, g.arch.resolution),
                validate=functools.partial(validate_hvae, beta=g.beta), select="loss")


def train_generator(params, data_root, out_dir, metrics_file=None, resume=False, **loop_kwargs) -> dict:
    """`resume`: continue the interrupted run that was writing `out_dir`; `loop_kwargs`: LoopConfig fields."""
    import math
    import tempfile

    from cxrcf.errors import CxrcfError
    from cxrcf.hvae import HVAE
    from training.common import finish, load_arrays, tracked_fit, write_model

    HVAE(params.generator.arch)  # a bad architecture fails here in one line, not in a retried Ray worker
    with tracked_fit(params, "generator", [make_task(params, data_root)], out_dir, resume, data_root=data_root,
                     **loop_kwargs) as (
            result, run_id):
        metrics = dict(result.metrics["generator"])
        model = HVAE(params.generator.arch)
        model.load_state_dict(result.weights["generator"])
        metrics.update(training_set_elbo(model, data_root, params.generator.arch.resolution, params.generator.beta))
        # eps as the reference defines it: the exported model's training-set ELBO (nll + beta * kl per pixel)
        metrics["eps"] = metrics["train_loss"]
        if not math.isfinite(metrics["eps"]):
            # run.json would drop it, and CFT would later fail on a missing eps instead of here
            raise CxrcfError(f"train generator: eps (training-set loss of the exported weights) is {metrics['eps']}; "
                             "nothing exported")
        out_dir = write_model(model, out_dir, run_id, metrics,
                              meta={"preset": params.preset, "beta": params.generator.beta})
        with tempfile.TemporaryDirectory() as tmp:
            x, parents = load_arrays(str(Path(data_root).resolve()), params.generator.arch.resolution, "val")
            grid = sample_grid(model, x, parents, Path(tmp) / "samples.png", t_u=1.0)
            finish(run_id, metrics, metrics_file, {"model": out_dir, "samples": grid})
    return {"run_id": run_id, "metrics": metrics, "out_dir": str(out_dir)}
