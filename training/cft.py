"""Phase `cft`: counterfactual fine-tuning of the pretrained HVAE, exactly SCIENCE.md section 5.

Hard and soft CFT share everything but `cft_targets`. Per batch one parent k is drawn uniformly
(the same k on every worker), its new values are the batch's own values permuted, the SCM gives the
counterfactual parents (do(age) recomputes finding), and the frozen guidance predictor scores the
counterfactual image. The ELBO constraint F <= eps is enforced with a damped Lagrangian whose
multiplier rises by gradient ascent while the constraint is violated.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cxrcf.attributes import ATTRIBUTES, N_RACE, age_to_model, context, descendants
from cxrcf.config import MODES, CFTConfig, Mode
from cxrcf.errors import CxrcfError

CFT_PARENTS = ("race", "sex", "finding", "age")


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


class LagrangeMultiplier:
    """The multiplier lam >= 0, ascended by Adam as the reference does (AdamW(maximize=True), no weight decay).

    Adam normalises the step, so lam moves by about `lr` per step whatever the size of F - eps; a plain
    `lam += lr * (F - eps)` moves ~100x slower at |F - eps| ~ 0.01 nats/pixel and leaves CFT unconstrained.
    """

    def __init__(self, lr: float, betas: tuple[float, float] = (0.9, 0.9), init: float = 0.0, eps: float = 1e-8):
        self.lr, self.betas, self.adam_eps = lr, betas, eps
        self.value, self.m, self.v, self.t = float(init), 0.0, 0.0, 0

    def step(self, f: float, eps: float) -> float:
        """One ascent step on dL/dlam = F - eps, then the clamp at 0; returns the new lam."""
        b1, b2 = self.betas
        grad = f - eps
        self.t += 1
        self.m = b1 * self.m + (1 - b1) * grad
        self.v = b2 * self.v + (1 - b2) * grad * grad
        m_hat = self.m / (1 - b1 ** self.t)
        v_hat = self.v / (1 - b2 ** self.t)
        self.value = max(0.0, self.value + self.lr * m_hat / (math.sqrt(v_hat) + self.adam_eps))
        return self.value

    def state(self) -> dict[str, float]:
        return {"lam": self.value, "lam_adam_m": self.m, "lam_adam_v": self.v, "lam_adam_t": float(self.t)}

    def load(self, state: dict) -> None:
        self.value = float(state.get("lam", self.value))
        self.m = float(state.get("lam_adam_m", self.m))
        self.v = float(state.get("lam_adam_v", self.v))
        self.t = int(state.get("lam_adam_t", self.t))


# ------------------------------------------------------------------------------------ objective
class CFTObjective(nn.Module):
    def __init__(self, *, mode: Mode, hvae_arch, hvae_state: dict, pred_arch, pred_state: dict, scm_cfg,
                 scm_state: dict, beta: float, eps: float, cft_cfg: CFTConfig):
        super().__init__()
        from cxrcf.hvae import HVAE
        from cxrcf.predictor import Predictor
        from cxrcf.scm import AttributeSCM

        self.mode, self.beta, self.eps = mode, beta, eps
        self.parent_lr_mult = cft_cfg.parent_lr_mult
        self.damping, self.t_u = cft_cfg.damping, cft_cfg.t_u
        # the reference gives the multiplier's Adam the generator's betas
        self.lam = LagrangeMultiplier(cft_cfg.lambda_lr, cft_cfg.optim.betas, cft_cfg.lambda_init)
        self.model = HVAE(hvae_arch)
        self.model.load_state_dict(hvae_state)
        self.predictor = Predictor(pred_arch)
        self.predictor.load_state_dict(pred_state)
        self.scm = AttributeSCM(scm_cfg)
        self.scm.load_state_dict(scm_state)
        for frozen in (self.predictor, self.scm):
            frozen.requires_grad_(False)
        if cft_cfg.train == "adapters":
            self.model.requires_grad_(False)
            for p in self.model.adapter_parameters():
                p.requires_grad_(True)
        w = cft_cfg.k_weights
        self.k_probs = None if w is None else torch.tensor([float(w.get(k, 0.0)) for k in CFT_PARENTS])

    def train(self, mode: bool = True):
        super().train(mode)
        # The frozen parts stay in eval mode (no dropout) whatever the loop asks of the objective.
        self.predictor.eval()
        self.scm.eval()
        return self

    def forward(self, x, parents, rng):
        from cxrcf.counterfactual import counterfactual_from_abduction

        if self.k_probs is None:
            k = CFT_PARENTS[int(torch.randint(len(CFT_PARENTS), (1,), generator=rng.shared))]
        else:
            k = CFT_PARENTS[int(torch.multinomial(self.k_probs, 1, generator=rng.shared))]
        perm = torch.randperm(len(x), generator=rng.local).to(x.device)
        star = self.scm.counterfactual(parents, {k: parents[k][perm]}, generator=rng.device)
        # F and the abduction come from the same posterior sample: one encoder+decoder pass, not two.
        elbo, latents, pixels = self.model.elbo_with_abduction(x, context(parents), self.beta, generator=rng.device)
        x_star = counterfactual_from_abduction(self.model, x, latents, pixels, context(parents), context(star),
                                              t_u=self.t_u)
        probs = None
        if self.mode == "soft":
            with torch.no_grad():
                probs = self.predictor.predict(x)
        targets = cft_targets(self.mode, k, parents, star, probs)
        # The age head is fed the counterfactual finding label (reference `predict_unnorm(**cfs)`), not
        # the predictor's own finding on x*: that would add a path from the always-hard age target
        # into finding evidence.
        aux, parts = aux_loss(self.predictor(x_star, finding=star["finding"].float()), targets)
        f = elbo["loss"]
        loss = lagrangian(aux, f, self.eps, self.lam.value, self.damping)
        out = {"loss": loss, "aux": aux.detach(), "F": f.detach()}
        out.update({f"aux_{a}": v.detach() for a, v in parts.items()})
        out.update({f"k_{a}": torch.tensor(float(a == k), device=x.device) for a in CFT_PARENTS})
        return out

    def param_groups(self) -> list[dict]:
        """The generator's trainable parameters, its generative parent paths at cft.parent_lr_mult x the rate."""
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        if self.parent_lr_mult == 1.0:
            return [{"params": trainable}]
        ids = {id(p) for p in self.model.parent_path_parameters()}
        return [{"params": [p for p in trainable if id(p) not in ids]},
                {"params": [p for p in trainable if id(p) in ids], "lr_mult": self.parent_lr_mult}]

    def after_step(self, metrics: dict[str, float]) -> None:
        # metrics["F"] is already averaged over workers, so every rank holds the same lam.
        self.lam.step(metrics["F"], self.eps)

    def extra_state(self) -> dict[str, float]:
        return self.lam.state()

    def load_extra_state(self, state: dict) -> None:
        self.lam.load(state)


def build_objective(**parts) -> CFTObjective:
    """The loop's `Task.build`: runs on each worker, from plain (picklable) parts."""
    return CFTObjective(**parts)


# ----------------------------------------------------------------------- checkpoint selection
SELECT_ATTRS = ("sex", "finding")


def selection_score(auc: dict[str, float], target: dict[str, float]) -> float:
    """Lower is better: the distance of each do(k) AUC to its target (the TRUE counterfactuals'), where
    any overshoot costs 1 more than every undershoot, so a checkpoint that paints past the truth is
    chosen only if no checkpoint stays at or below it (overshoot is a defect, not a success)."""
    score = 0.0
    for k, want in target.items():
        got = auc[k]
        score += (want - got) if got <= want else 1.0 + (got - want)
    return score


def flip_aucs(hvae, predictor, x, parents, generator=None) -> dict[str, float]:
    """AUC of the predictor for the flipped value of sex and of finding on x* (t_u = 1, one abduction)."""
    from cxrcf.counterfactual import counterfactuals_shared
    from cxrcf.metrics import roc_auc

    stars = {k: {**parents, k: 1.0 - parents[k].float()} for k in SELECT_ATTRS}
    outs = counterfactuals_shared(hvae, x, context(parents), [context(stars[k]) for k in SELECT_ATTRS],
                                  (1.0,), generator=generator)
    return {k: roc_auc(predictor.predict(o[0])[k].float().cpu().numpy(), stars[k][k].cpu().numpy())
            for k, o in zip(SELECT_ATTRS, outs)}


def truth_targets(data_root, resolution: int, guidance, n: int) -> dict[str, float] | None:
    """The guidance predictor's flip AUC on the TRUE counterfactuals of the first n validation images
    (SynthCXR); None on data without recorded exogenous noise."""
    from cxrcf.data import load_split, to_model_images
    from cxrcf.metrics import roc_auc
    from cxrcf.synth import render_counterfactuals

    if not (Path(data_root) / "exogenous.csv").is_file():
        return None
    split = load_split(data_root, "val", resolution)
    frame = split.frame.iloc[:n]
    out = {}
    with torch.no_grad():
        for k in SELECT_ATTRS:
            flipped = 1 - split.parents[k][:n].cpu().numpy()
            truth = to_model_images(render_counterfactuals(frame, {k: flipped}), resolution)
            out[k] = roc_auc(guidance.predict(truth)[k].float().numpy(), flipped)
    return out


def validate_cft(model, x, parents, device, beta, pred_arch, pred_state, targets, n: int) -> dict[str, float]:
    """The ELBO validation plus the slim effectiveness evaluation that picks the exported checkpoint:
    flips of sex and finding on the first n validation images, scored by the guidance predictor (the
    evaluation predictor stays out of model selection) against the truth's AUC under the same predictor."""
    from cxrcf.predictor import Predictor
    from training.generator import validate_hvae

    out = validate_hvae(model, x, parents, device, beta)
    predictor = Predictor(pred_arch).to(device)
    predictor.load_state_dict(pred_state)
    predictor.eval()
    xs = x[:n].to(device)
    ps = {k: v[:n].to(device) for k, v in parents.items()}
    gen = torch.Generator(device=device).manual_seed(0)
    auc = flip_aucs(model, predictor, xs, ps, generator=gen)
    out.update({f"auc_{k}": v for k, v in auc.items()})
    out["selection"] = selection_score(auc, targets)
    return out


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


def with_overrides(cft, slack=None, seed=None):
    """(CFT config with the run's seed, slack): a study's `--slack` / `--seed` over params.cft's."""
    if seed is not None:
        cft = cft.model_copy(update={"optim": cft.optim.model_copy(update={"seed": int(seed)})})
    slack = cft.slack if slack is None else float(slack)
    if slack < 0:
        raise CxrcfError(f"--slack: {slack}: must be >= 0")
    return cft, slack


def train_cft(params, data_root, generator_dir, guidance_dir, scm_dir, out_dir, mode, slack=None, seed=None,
              metrics_file=None, resume=False) -> dict:
    import tempfile

    from cxrcf.export import load_model
    from store.runs import read_run_id
    from training.common import finish, load_arrays, loader, tracked_fit, write_model
    from training.generator import sample_grid, validate_hvae
    from training.loop import Task, cpu_state

    if mode not in MODES:
        raise CxrcfError(f"--mode: {mode!r}: expected hard or soft")
    cft, slack = with_overrides(params.cft, slack, seed)
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
    build = functools.partial(build_objective, mode=mode, hvae_arch=hvae.arch, hvae_state=cpu_state(hvae),
                              pred_arch=guidance.arch, pred_state=cpu_state(guidance), scm_cfg=scm.cfg,
                              scm_state=cpu_state(scm), beta=beta, eps=eps, cft_cfg=cft)
    phase = f"cft_{mode}"
    targets = dict(cft.target_auc) if cft.target_auc else truth_targets(data_root, hvae.arch.resolution, guidance,
                                                                         cft.select_images)
    if targets:
        print(f"[{phase}] exported checkpoint: do(k) AUC closest to and not above "
              + ", ".join(f"{k} {v:.3f}" for k, v in targets.items())
              + (" (cft.target_auc)" if cft.target_auc else " (true counterfactuals, guidance predictor)"), flush=True)
        validate = functools.partial(validate_cft, beta=beta, pred_arch=guidance.arch, pred_state=cpu_state(guidance),
                                     targets=targets, n=cft.select_images)
        task = Task(name=phase, optim=cft.optim, build=build, data=loader(data_root, hvae.arch.resolution),
                    validate=validate, select="selection")
    else:
        print(f"[{phase}] no true counterfactuals and no cft.target_auc: exporting the last EMA weights", flush=True)
        task = Task(name=phase, optim=cft.optim, build=build, data=loader(data_root, hvae.arch.resolution),
                    validate=functools.partial(validate_hvae, beta=beta))
    extra = {"cft.mode": mode, "cft.eps": eps, "cft.eps_pretrained": eps_pretrained, "cft.slack_used": slack,
             "cft.seed_used": cft.optim.seed, "lineage.generator": str(generator_dir),
             "lineage.guidance": str(guidance_dir), "lineage.scm": str(scm_dir)}
    parents = {"pretraining": read_run_id(generator_dir), "guidance_predictor": read_run_id(guidance_dir),
               "scm": read_run_id(scm_dir)}
    with tracked_fit(params, phase, [task], out_dir, resume, extra_params=extra, data_root=data_root,
                     parents=parents) as (result, run_id):
        metrics = dict(result.metrics[phase])
        metrics.update({"eps": eps, "eps_pretrained": eps_pretrained, "slack": slack})
        metrics.update({f"target_auc_{k}": v for k, v in (targets or {}).items()})
        hvae.load_state_dict(result.weights[phase])
        meta = {"preset": params.preset, "mode": mode, "slack": slack, "seed": cft.optim.seed, "eps": eps}
        out_dir = write_model(hvae, out_dir, run_id, metrics, meta=meta)
        with tempfile.TemporaryDirectory() as tmp:
            x, parents = load_arrays(str(Path(data_root).resolve()), hvae.arch.resolution, "val")
            grid = sample_grid(hvae, x, parents, Path(tmp) / "samples.png", scm=scm, t_u=cft.t_u)
            finish(run_id, metrics, metrics_file, {"model": out_dir, "samples": grid})
    return {"run_id": run_id, "metrics": metrics, "out_dir": str(out_dir)}
