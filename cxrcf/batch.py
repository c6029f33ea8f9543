"""One batch of counterfactuals: THE path every caller takes (bundle, serving, pyfunc, augmentation).

A batch is images `x` (N, 1, R, R) with their parents and a list of `Edit`s: each edit names some
images (`index`), one intervention and one t_u. The attribute SCM turns each edit into
counterfactual parents in one call; then the HVAE makes every edited row's counterfactual, one pass
per distinct t_u (t_u is one scalar per pass), `batch_size` rows at a time; finally, on request, the
evaluation predictor scores the factual images and every counterfactual row together in one pass.

Randomness: one generator seeded with `seed`, drawn in a fixed order (edits in order through the
SCM, then the HVAE passes in order of first appearance of each t_u), so the same inputs and seed give
the same bytes whichever room calls. Rows come back in edit order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from cxrcf.attributes import ATTRIBUTES, VOCAB, context, encode
from cxrcf.config import check_t_u
from cxrcf.errors import CxrcfError


@dataclass(frozen=True)
class Edit:
    """Images of the batch (`index` into x) that get intervention `do` at `t_u`."""

    index: Sequence[int]
    do: Mapping[str, object]  # attribute -> label, code, or age in years
    t_u: float = 1.0


@dataclass
class CounterfactualBatch:
    images: torch.Tensor  # (M, 1, R, R) in [-1, 1], one row per edited image, in edit order
    parents: dict[str, torch.Tensor]  # counterfactual parents of each row, (M,) each
    rows: torch.Tensor  # (M,) the image of x each row came from
    factual: list[dict] | None = None  # probability rows of x (N), when asked for
    probabilities: list[dict] | None = None  # probability rows of `images` (M), when asked for

    def split(self, sizes: Sequence[int]) -> list[torch.Tensor]:
        """The rows as consecutive blocks of `sizes` (e.g. one block per intervention)."""
        return list(self.images.split(list(sizes))) if sizes else []


def encode_intervention(intervention: Mapping[str, object]) -> dict[str, float | int]:
    """Validate one intervention {attribute: label, code or age in years} -> {attribute: code}."""
    if not isinstance(intervention, Mapping):
        raise CxrcfError(f"intervention: expected a mapping of attribute to value, got {type(intervention).__name__}")
    return {attr: encode(attr, value) for attr, value in intervention.items()}


def probability_rows(probs: Mapping[str, torch.Tensor]) -> list[dict]:
    """Predictor output -> one row per image: P(female), P(race) by label, P(finding), age in years."""
    sex = probs["sex"].float().cpu().tolist()
    race = probs["race"].float().cpu().tolist()
    finding = probs["finding"].float().cpu().tolist()
    age = probs["age"].float().cpu().tolist()
    return [{"sex": s, "race": dict(zip(VOCAB["race"], r, strict=True)), "finding": f, "age": a}
            for s, r, f, a in zip(sex, race, finding, age, strict=True)]


def _checked_parents(parents: Mapping[str, torch.Tensor], n: int, device) -> dict[str, torch.Tensor]:
    missing = [a for a in ATTRIBUTES if a not in parents]
    if missing:
        raise CxrcfError(f"parents: missing {', '.join(missing)}")
    out = {a: torch.as_tensor(parents[a], device=device) for a in ATTRIBUTES}
    if any(v.shape != (n,) for v in out.values()):
        raise CxrcfError(f"parents: every attribute must have shape ({n},) to match x")
    return out


@torch.no_grad()
def counterfactual_batch(bundle, x: torch.Tensor, parents: Mapping[str, torch.Tensor] | None,
                         edits: Sequence[Edit], seed: int = 0, particles: int = 1,
                         batch_size: int | None = None, probabilities: bool = False) -> CounterfactualBatch:
    """The counterfactual of every edited image of `x` (model images on the bundle's device).

    `parents=None` infers them with the evaluation predictor. With `probabilities`, the result also
    holds the predictor's probability rows of x and of every counterfactual (one predictor pass).
    """
    from cxrcf.counterfactual import counterfactual

    device = bundle.device
    n = x.shape[0]
    if particles < 1:
        raise CxrcfError(f"particles: {particles} must be >= 1")
    for e in edits:
        check_t_u(e.t_u)
    coded = [encode_intervention(e.do) for e in edits]
    parents = _checked_parents(bundle.infer_parents(x) if parents is None else parents, n, device)
    index = [torch.as_tensor(list(e.index), dtype=torch.long, device=device) for e in edits]
    if any(len(i) and (int(i.min()) < 0 or int(i.max()) >= n) for i in index):
        raise CxrcfError(f"edits: image index outside 0..{n - 1}")

    generator = torch.Generator(device=device).manual_seed(int(seed))
    cf_parents = [bundle.scm.counterfactual({a: parents[a][i] for a in ATTRIBUTES},
                                            {a: torch.tensor(v) for a, v in do.items()}, generator)
                  for i, do in zip(index, coded, strict=True)]
    if not edits:
        empty = torch.empty((0, 1, *x.shape[2:]), device=device)
        rows = torch.empty(0, dtype=torch.long, device=device)
        return CounterfactualBatch(empty, {a: parents[a][rows] for a in ATTRIBUTES}, rows)
    star = {a: torch.cat([p[a].to(device) for p in cf_parents]) for a in ATTRIBUTES}
    rows = torch.cat(index)
    ctx = context(parents).to(device)[rows]
    ctx_star = context(star).to(device)
    t_rows = torch.tensor([e.t_u for e, i in zip(edits, index, strict=True) for _ in range(len(i))],
                          dtype=torch.float64)
    images = torch.empty((len(rows), *x.shape[1:]), device=device)
    for t_u in dict.fromkeys(t_rows.tolist()):
        sel = torch.nonzero(t_rows == t_u).flatten().to(device)
        step = batch_size or len(sel)
        for s in range(0, len(sel), step):
            part = sel[s:s + step]
            images[part] = counterfactual(bundle.hvae, x[rows[part]], ctx[part], ctx_star[part], t_u=t_u,
                                          particles=particles, generator=generator).float()
    out = CounterfactualBatch(images, star, rows)
    if probabilities:
        probs = probability_rows(bundle.probabilities(torch.cat([x.float(), images])))
        out.factual, out.probabilities = probs[:n], probs[n:]
    return out
