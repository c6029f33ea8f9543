"""Phase `cft`: counterfactual fine-tuning of the pretrained HVAE, exactly SCIENCE.md section 5.

Hard and soft CFT share everything but `cft_targets`. Per batch one parent k is drawn uniformly
(the same k on every worker), its new values are the batch's own values permuted, the SCM gives the
counterfactual parents (do(age) recomputes finding), and the frozen guidance predictor scores the
counterfactual image. The ELBO constraint F <= eps is enforced with a damped Lagrangian whose
multiplier rises by gradient ascent while the constraint is violated.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cxrcf.attributes import ATTRIBUTES, N_RACE, age_to_model, context, descendants
from cxrcf.errors import CxrcfError

CFT_PARENTS = ("race", "sex", "finding", "age")
MODES = ("hard", "soft")


# --------------------------------------------------------------------------------- pure pieces
def cft_targets(mode: str, k: str, parents: dict, parents_star: dict, guidance_probs: dict | None) -> dict:
    """Targets for the guidance predictor on x* (SCIENCE.md section 5 table).

    Returns sex and finding as probabilities (N,), race as class probabilities (N, 3) and age in
    years (N,). The intervened k, its descendants (finding when k = age) and age are the
    counterfactual values; every other attribute is the factual label (hard) or the guidance
    predictor's probability on the factual image (soft).
    """
    if mode not in MODES:
        raise CxrcfError(f"mode: {mode!r}: expected hard or soft")
    if k not in ATTRIBUTES:
        raise CxrcfError(f"k: {k!r}: expected one of {', '.join(ATTRIBUTES)}")
    if mode == "soft" and guidance_probs is None:
        raise CxrcfError("guidance_probs: soft CFT needs the guidance predictor's probabilities on x")

    def labels(p):
        return {"sex": p["sex"].float(), "race": F.one_hot(p["race"].long(), N_RACE).float(),
                "finding": p["finding"].float()}

    factual, star = labels(parents), labels(parents_star)
    follows = {k} | descendants(k)
    targets = {"age": parents_star["age"].float()}
    for attr in ("sex", "race", "finding"):
        if attr in follows:
            targets[attr] = star[attr]
        elif mode == "hard":
            targets[attr] = factual[attr]
        else:
            targets[attr] = guidance_probs[attr].detach().float()
    return targets


def aux_loss(outputs: dict, targets: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """MSE(age, model space) + BCE(sex) + BCE(finding) + CE(race, target probabilities), weight 1 each."""
    parts = {
        "age": F.mse_loss(outputs["age_loc"].float(), age_to_model(targets["age"])),
        "sex": F.binary_cross_entropy_with_logits(outputs["sex"].float(), targets["sex"]),
        "finding": F.binary_cross_entropy_with_logits(outputs["finding"].float(), targets["finding"]),
        "race": F.cross_entropy(outputs["race"].float(), targets["race"]),
    }
    return sum(parts.values()), parts


def lagrangian(aux: torch.Tensor, f: torch.Tensor, eps: float, lam: float, damping: float) -> torch.Tensor:
    """L = aux - (lam - d * stopgrad(eps - F)) * (eps - F)."""
    gap = eps - f
    return aux - (lam - damping * gap.detach()) * gap


def update_lambda(lam: float, f: float, eps: float, lr: float) -> float:
    """One gradient-ascent step on lam (dL/dlam = F - eps), clamped at 0."""
    return max(0.0, lam + lr * (f - eps))


# ------------------------------------------------------------------------------------ objective
class CFTObjective(nn.Module):
    def __init__(self, mode, hvae_arch, hvae_state, pred_arch, pred_state, scm_cfg, scm_state, beta, eps,
                 cft_cfg):
        super().__init__()
        from cxrcf.hvae import HVAE
        from cxrcf.predictor import Predictor
        from cxrcf.scm import AttributeSCM

        self.mode, self.beta, self.eps = mode, beta, eps
        self.damping, self.lambda_lr, self.t_u = cft_cfg.damping, cft_cfg.lambda_lr, cft_cfg.t_u
        self.lam = cft_cfg.lambda_init
        self.model = HVAE(hvae_arch)
        self.model.load_state_dict(hvae_state)
        self.predictor = Predictor(pred_arch)
        self.predictor.load_state_dict(pred_state)
        self.scm = AttributeSCM(scm_cfg)
        self.scm.load_state_dict(scm_state)
        for frozen in (self.predictor, self.scm):
            frozen.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        # The frozen parts stay in eval mode (no dropout) whatever the loop asks of the objective.
        self.predictor.eval()
        self.scm.eval()
        return self

    def forward(self, x, parents, rng):
        from cxrcf.counterfactual import counterfactual_from_abduction

        k = CFT_PARENTS[int(torch.randint(len(CFT_PARENTS), (1,), generator=rng.shared))]
        perm = torch.randperm(len(x), generator=rng.local).to(x.device)
        star = self.scm.counterfactual(parents, {k: parents[k][perm]}, generator=rng.device)
        # F and the abduction come from the same posterior sample: one encoder+decoder pass, not two.
        elbo, latents, pixels = self.model.elbo_with_abduction(x, context(parents), self.beta, generator=rng.device)
        x_star = counterfactual_from_abduction(self.model, x, latents, pixels, context(star), t_u=self.t_u)
        probs = None
        if self.mode == "soft":
            with torch.no_grad():
                probs = self.predictor.predict(x)
        targets = cft_targets(self.mode, k, parents, star, probs)
        aux, parts = aux_loss(self.predictor(x_star), targets)
        f = elbo["loss"]
        loss = lagrangian(aux, f, self.eps, self.lam, self.damping)
        out = {"loss": loss, "aux": aux.detach(), "F": f.detach()}
        out.update({f"aux_{a}": v.detach() for a, v in parts.items()})
        out.update({f"k_{a}": torch.tensor(float(a == k), device=x.device) for a in CFT_PARENTS})
        return out

    def after_step(self, metrics: dict[str, float]) -> None:
        # metrics["F"] is already averaged over workers, so every rank holds the same lam.
        self.lam = update_lambda(self.lam, metrics["F"], self.eps, self.lambda_lr)

    def extra_state(self) -> dict[str, float]:
        return {"lam": self.lam}

    def load_extra_state(self, state: dict) -> None:
        self.lam = float(state.get("lam", self.lam))


def build_objective(*args) -> CFTObjective:
    return CFTObjective(*args)


# ---------------------------------------------------------------------------------------- phase
def read_eps(generator_dir: str | Path) -> float:
    from cxrcf.fileio import read_json

    path = Path(generator_dir) / "run.json"
    if not path.is_file():
        raise CxrcfError(f"{path}: missing; train the generator first (cxrcf train generator)")
    try:
        eps = read_json(path)["metrics"]["eps"]
    except (KeyError, TypeError):
        raise CxrcfError(f"{path}: expected JSON with metrics.eps") from None
    return float(eps)


def train_cft(params, data_root, generator_dir, guidance_dir, scm_dir, out_dir, mode, slack=None, seed=None,
              metrics_file=None) -> dict:
    import tempfile

    from cxrcf.export import load_model
    from training.common import finish, load_arrays, loader, run_fit, write_model
    from training.generator import sample_grid, validate_hvae
    from training.loop import Task, cpu_state

    if mode not in MODES:
        raise CxrcfError(f"--mode: {mode!r}: expected hard or soft")
    cft = params.cft
    if seed is not None:
        cft = cft.model_copy(update={"optim": cft.optim.model_copy(update={"seed": int(seed)})})
    slack = cft.slack if slack is None else float(slack)
    if slack < 0:
        raise CxrcfError(f"--slack: {slack}: must be >= 0")
    hvae = load_model(generator_dir)
    guidance = load_model(guidance_dir)
    scm = load_model(scm_dir)
    for directory, model, kind in ((generator_dir, hvae, "HVAE"), (guidance_dir, guidance, "Predictor"),
                                   (scm_dir, scm, "AttributeSCM")):
        if type(model).__name__ != kind:
            raise CxrcfError(f"{directory}: holds a {type(model).__name__}, expected {kind}")
    if guidance.arch.resolution != hvae.arch.resolution:
        raise CxrcfError(f"{guidance_dir}: guidance predictor resolution {guidance.arch.resolution} differs from "
                         f"the generator's {hvae.arch.resolution}")
    eps_pretrained = read_eps(generator_dir)
    eps = eps_pretrained + slack
    beta = params.generator.beta
    build = functools.partial(build_objective, mode, hvae.arch, cpu_state(hvae), guidance.arch, cpu_state(guidance),
                              scm.cfg, cpu_state(scm), beta, eps, cft)
    phase = f"cft_{mode}"
    task = Task(name=phase, optim=cft.optim, build=build, data=loader(data_root, hvae.arch.resolution),
                validate=functools.partial(validate_hvae, beta=beta))
    extra = {"cft.mode": mode, "cft.eps": eps, "cft.eps_pretrained": eps_pretrained, "cft.slack_used": slack,
             "cft.seed_used": cft.optim.seed, "lineage.generator": str(generator_dir),
             "lineage.guidance": str(guidance_dir), "lineage.scm": str(scm_dir)}
    result, run_id = run_fit(params, phase, [task], extra_params=extra)
    metrics = dict(result.metrics[phase])
    metrics.update({"eps": eps, "eps_pretrained": eps_pretrained, "slack": slack})
    hvae.load_state_dict(result.weights[phase])
    meta = {"preset": params.preset, "mode": mode, "slack": slack, "seed": cft.optim.seed, "eps": eps}
    out_dir = write_model(hvae, out_dir, run_id, metrics, meta=meta)
    with tempfile.TemporaryDirectory() as tmp:
        x, parents = load_arrays(str(Path(data_root).resolve()), hvae.arch.resolution, "val")
        grid = sample_grid(hvae, x, parents, Path(tmp) / "samples.png", scm=scm, t_u=cft.t_u)
        finish(run_id, metrics, metrics_file, {"model": out_dir, "samples": grid})
    return {"run_id": run_id, "metrics": metrics, "out_dir": str(out_dir)}
