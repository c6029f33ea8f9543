"""One batched forward pass for many API requests (the Serve batch method calls it).

Each request is one image with its own parents and interventions; every (request, intervention)
is one `cxrcf.batch.Edit`, and the whole batch goes through the core's one counterfactual path,
`counterfactual_batch`: the attribute SCM per edit, one HVAE pass per distinct t_u over every row of
every request, and one evaluation-predictor pass over all factual and counterfactual images.

Randomness: one generator per batch, seeded with the first request's seed. A request served alone
reproduces `GeneratorBundle.counterfactuals(x, parents, interventions, t_u, seed)` exactly (the same
function, the same draw order); batched with others it draws from the shared stream, so its noise
depends on its batch.
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
    from cxrcf.png import resize_gray

    side = max(h, w)
    return resize_gray(pixels, side, side)


def _codes(parents: dict, i: int) -> dict[str, float]:
    return {a: float(parents[a][i]) for a in ATTRIBUTES}


def run_batch(bundle, items: list[Item], threads: int | None = None) -> list[ItemResult]:
    """`threads`: torch intra-op threads for this pass (process-wide; a replica runs one batch at a time)."""
    import torch

    from cxrcf.batch import Edit, counterfactual_batch
    from cxrcf.bundle import parents_from_labels
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

        edits = [Edit([i], do, it.t_u) for i, it in enumerate(items) for do in it.interventions]
        out = counterfactual_batch(bundle, x, parents, edits, seed=items[0].seed, probabilities=True)
        pixels = from_model_images(out.images)

    results = [ItemResult(_codes(parents, i), items[i].parents is None, out.factual[i], batch_size=len(items))
               for i in range(len(items))]
    for row, i in enumerate(out.rows.tolist()):
        results[i].counterfactuals.append(
            {"parents": _codes(out.parents, row), "pixels": pixels[row], "probabilities": out.probabilities[row]})
    return results
