"""One batched forward pass for many API requests (pure torch; the Serve batch method calls it).

Each request is one image with its own parents and interventions, so the batch is flattened into
rows (request, intervention): the attribute SCM gives each row its counterfactual parents, then one
HVAE counterfactual pass covers every row of every request, and the evaluation predictor scores all
factual images and all counterfactual rows together in one more. Requests whose `t_u` differ
cannot share the HVAE pass (t_u is one scalar per pass), so a batch makes one pass per distinct t_u.

Randomness: one generator per batch, seeded with the first request's seed. A request served alone
reproduces `GeneratorBundle.counterfactuals(x, parents, interventions, t_u, seed)` exactly (same draw
order); batched with others it draws from the shared stream, so its noise depends on its batch.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import numpy as np

from cxrcf.attributes import ATTRIBUTES


@dataclass
class Item:
    """A validated request, as the model deployment receives it."""

    pixels: np.ndarray  # uint8 (H, W), any size
    parents: dict[str, str | float] | None  # labels (age in years); None: infer
    interventions: list[dict[str, str | float]]
    t_u: float = 1.0
    seed: int = 0


@dataclass
class ItemResult:
    parents: dict[str, float]  # codes, age in years
    inferred: bool
    probabilities: dict[str, object]
    counterfactuals: list[dict] = field(default_factory=list)  # {parents, pixels (R, R) uint8, probabilities}
    batch_size: int = 0


def square(pixels: np.ndarray) -> np.ndarray:
    """Stretch a non-square image to a square of its longer side (the model only takes squares)."""
    h, w = pixels.shape
    if h == w:
        return pixels
    from serving.images import resize_gray

    side = max(h, w)
    return resize_gray(pixels, side, side)


def _probability_rows(probs: dict) -> list[dict[str, object]]:
    sex = probs["sex"].float().cpu().tolist()
    race = probs["race"].float().cpu().tolist()
    finding = probs["finding"].float().cpu().tolist()
    age = probs["age"].float().cpu().tolist()
    return [{"sex": s, "race": r, "finding": f, "age": a} for s, r, f, a in zip(sex, race, finding, age)]


def _codes(parents: dict, i: int) -> dict[str, float]:
    return {a: float(parents[a][i]) for a in ATTRIBUTES}


def run_batch(bundle, items: list[Item], threads: int | None = None) -> list[ItemResult]:
    """`threads`: torch intra-op threads for this pass (process-wide; a replica runs one batch at a time)."""
    import torch

    from cxrcf.attributes import context
    from cxrcf.bundle import encode_intervention, parents_from_labels
    from cxrcf.counterfactual import counterfactual
    from cxrcf.data import from_model_images, to_model_images

    if threads is not None and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    device = bundle.device
    res = bundle.resolution
    autocast = (torch.autocast(device_type="cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())
    with torch.inference_mode(), autocast:
        x = torch.cat([to_model_images(square(it.pixels)[None], res) for it in items]).to(device)

        unknown = [i for i, it in enumerate(items) if it.parents is None]
        given = [i for i, it in enumerate(items) if it.parents is not None]
        parents = {a: torch.zeros(len(items), device=device, dtype=torch.long if a == "race" else torch.float32)
                   for a in ATTRIBUTES}
        if given:
            labelled = parents_from_labels([items[i].parents for i in given], device=device)
            for a in ATTRIBUTES:
                parents[a][given] = labelled[a].to(parents[a].dtype)
        if unknown:
            inferred = bundle.infer_parents(x[unknown])
            for a in ATTRIBUTES:
                parents[a][unknown] = inferred[a].to(device, parents[a].dtype)

        generator = torch.Generator(device=device).manual_seed(int(items[0].seed))
        owner, cf_parents = [], []
        # Per request, per intervention, in order: the draw order of GeneratorBundle.counterfactuals.
        for i, it in enumerate(items):
            one = {a: parents[a][i:i + 1] for a in ATTRIBUTES}
            for do in it.interventions:
                coded = encode_intervention(do)
                cf_parents.append(bundle.scm.counterfactual(
                    one, {a: torch.tensor(v) for a, v in coded.items()}, generator))
                owner.append(i)
        star = {a: torch.cat([p[a].to(device) for p in cf_parents]) for a in ATTRIBUTES}
        rows = torch.tensor(owner, device=device)
        ctx = context(parents).to(device)[rows]
        ctx_star = context(star).to(device)
        x_star = torch.empty((len(owner), 1, res, res), device=device)
        t_rows = np.array([items[i].t_u for i in owner])
        for t_u in dict.fromkeys(t_rows.tolist()):
            sel = torch.from_numpy(np.flatnonzero(t_rows == t_u)).to(device)
            x_star[sel] = counterfactual(bundle.hvae, x[rows[sel]], ctx[sel], ctx_star[sel], t_u=t_u,
                                         generator=generator).float()
        # factual and counterfactual images through the evaluation predictor in one pass
        probs = _probability_rows(bundle.probabilities(torch.cat([x, x_star])))
        factual_probs, cf_probs = probs[:len(items)], probs[len(items):]
        pixels = from_model_images(x_star)

    results = [ItemResult(_codes(parents, i), items[i].parents is None, factual_probs[i], batch_size=len(items))
               for i in range(len(items))]
    for row, i in enumerate(owner):
        results[i].counterfactuals.append(
            {"parents": _codes(star, row), "pixels": pixels[row], "probabilities": cf_probs[row]})
    return results
