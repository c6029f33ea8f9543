"""Phase `predictors`: the guidance predictor (frozen inside CFT) and the independent evaluation
predictor, trained one after the other inside ONE TorchTrainer fit so the workers start once.

The evaluator is independent of the guide (issue 15): another seed, another resolution in the
presets, and the other half of the training split (`PredictorArch.train_half`; a seeded split of
the train ids, so the halves are disjoint and the same on every run). Both validate on all of val."""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch import nn

TASKS = ("guidance", "evaluation")


def _loss(model, x: torch.Tensor, parents: dict):
    from cxrcf.predictor import predictor_loss

    # The age head is trained on the true finding label, as the contract prescribes.
    return predictor_loss(model(x, finding=parents["finding"].float()), parents)


def l2_adversarial(model, x: torch.Tensor, parents: dict, eps: float, steps: int) -> torch.Tensor:
    """The worst case of the predictor loss within an L2 ball of radius `eps` around each image, by projected
    gradient ascent (normalised steps of 2.5 eps / steps); images stay in [-1, 1]. No parameter gradients."""

    def per_image(t):
        return t.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)

    delta = torch.zeros_like(x)
    for _ in range(steps):
        delta.requires_grad_(True)
        loss, _ = _loss(model, x + delta, parents)
        (grad,) = torch.autograd.grad(loss, delta)
        delta = delta.detach() + (2.5 * eps / steps) * grad / per_image(grad)
        delta = (x + delta * (eps / per_image(delta)).clamp(max=1.0)).clamp(-1.0, 1.0) - x
    return (x + delta).detach()


class PredictorObjective(nn.Module):
    def __init__(self, arch, adversarial=None):
        super().__init__()
        from cxrcf.predictor import Predictor

        self.model = Predictor(arch)
        self.adversarial = adversarial

    def forward(self, x, parents, rng):
        adv = self.adversarial
        if adv is not None and adv.eps > 0:
            # each batch twice: clean, and at its worst case in the eps-ball
            x = torch.cat([x, l2_adversarial(self.model, x, parents, adv.eps, adv.steps)])
            parents = {k: torch.cat([v, v]) for k, v in parents.items()}
        loss, parts = _loss(self.model, x, parents)
        return {"loss": loss, **parts}


def build_objective(arch, adversarial=None) -> PredictorObjective:
    return PredictorObjective(arch, adversarial)


def roc_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Mann-Whitney AUC with average ranks for ties; NaN when only one class is present."""
    scores, labels = scores.double().flatten(), labels.flatten().bool()
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = torch.argsort(scores)
    sorted_scores = scores[order]
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=torch.float64)
    _, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    avg = ends - (counts.double() - 1) / 2  # mean rank of each tie group
    ranks[order] = avg[inverse]
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def predictor_metrics(probs: dict[str, torch.Tensor], parents: dict[str, torch.Tensor]) -> dict[str, float]:
    """Validation metrics from `Predictor.predict` outputs against the true parents."""
    out = {}
    for attr in ("sex", "finding"):
        y = parents[attr].float().cpu()
        p = probs[attr].float().cpu()
        out[f"{attr}_auc"] = roc_auc(p, y)
        out[f"{attr}_acc"] = float(((p > 0.5).float() == y).float().mean())
    out["race_acc"] = float((probs["race"].argmax(-1).cpu() == parents["race"].long().cpu()).float().mean())
    out["age_mae"] = float((probs["age"].float().cpu() - parents["age"].float().cpu()).abs().mean())
    return out


def validate_predictor(model, x, parents, device) -> dict[str, float]:
    from training.common import batched

    chunks = batched(lambda xc, pc: {k: v.cpu() for k, v in model.predict(xc).items()}, x, parents, device)
    probs = {k: torch.cat([c[k] for c in chunks]) for k in chunks[0]}
    return predictor_metrics(probs, parents)


HALF_SEED = 15  # fixes which train ids form each half


def half_ids(ids, half: str) -> list[str]:
    """The train ids of one half ("first" / "second") of a seeded permutation, or all of them."""
    import numpy as np

    ids = sorted(ids)
    if half == "all":
        return ids
    order = np.random.default_rng(HALF_SEED).permutation(len(ids))
    cut = len(ids) // 2
    chosen = order[:cut] if half == "first" else order[cut:]
    return [ids[i] for i in np.sort(chosen)]


def load_half(data_root: str, resolution: int, half: str, split: str):
    """(x, parents) of a split; the train split restricted to one half. Runs on the workers."""
    from cxrcf.data import load_split

    arrays = load_split(data_root, split, resolution)
    if split != "train" or half == "all":
        return arrays.x, arrays.parents
    keep = set(half_ids(arrays.ids, half))
    idx = torch.as_tensor([i for i, k in enumerate(arrays.ids) if k in keep])
    return arrays.x[idx], {k: v[idx] for k, v in arrays.parents.items()}


def make_tasks(params, data_root):
    from training.common import loader
    from training.loop import Task

    loader(data_root, 0)  # checks that data_root is a dataset
    root = str(Path(data_root).resolve())
    tasks = []
    for name in TASKS:
        cfg = getattr(params.predictors, name)
        tasks.append(Task(name=name, optim=cfg.optim, build=functools.partial(build_objective, cfg.arch, cfg.adversarial),
                          data=functools.partial(load_half, root, cfg.arch.resolution, cfg.arch.train_half),
                          validate=validate_predictor))
    return tasks


def train_predictors(params, data_root, out_guidance, out_evaluation, metrics_file=None, resume=False) -> dict:
    from cxrcf.predictor import Predictor
    from training.common import finish, tracked_fit, write_model

    outs = {"guidance": Path(out_guidance), "evaluation": Path(out_evaluation)}
    with tracked_fit(params, "predictors", make_tasks(params, data_root), out_guidance, resume,
                     data_root=data_root) as (result, run_id):
        metrics = {}
        for name, out_dir in outs.items():
            model = Predictor(getattr(params.predictors, name).arch)
            model.load_state_dict(result.weights[name])
            write_model(model, out_dir, run_id, result.metrics[name], meta={"role": name, "preset": params.preset})
            metrics.update({f"{name}_{k}": v for k, v in result.metrics[name].items()})
        finish(run_id, metrics, metrics_file, {f"model/{name}": d for name, d in outs.items()})
    return {"run_id": run_id, "metrics": metrics, "out_dir": {k: str(v) for k, v in outs.items()}}
