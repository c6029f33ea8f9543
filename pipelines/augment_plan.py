"""Augmentation plans: what `cxrcf augment` should generate, as validated YAML, expanded into items.

A plan file holds one mapping with `kind` plus the fields of that kind:

- `flip`: every selected image, each listed attribute flipped, one item per (image, attribute).
  sex and finding swap to the other value; race goes to each of the two other classes (two items
  per image) unless `race_to` names one target class, in which case images already of that class
  are left out.
- `balance`: counterfactuals are added until every subgroup of the `by` attributes (e.g. sex x
  finding) holds `target` images (default: the size of the largest subgroup). A short subgroup takes
  its sources from the other subgroups, fewest changed attributes first (ties in a seeded random
  order), and intervenes on exactly the `by` attributes that differ. When it needs more sources
  than exist, it cycles through them again; the repeat number enters the item id and the sampling
  seed, so each repeat is a different draw.
- `grid`: every listed intervention (a mapping attribute -> value, labels or years) applied to
  every selected image.

Common fields: `splits` (default: all), `max_sources` (the first N selected images by id; for trial
runs), `t_u` and `seed` (default: `params.augment`).

Items are sorted so that items with the same intervention sit together, then cut into chunks of
`batch_size`. A chunk is the unit of work and of resumption: its images and sampling noise depend
only on the chunk, so a rerun reproduces every item exactly, whatever else ran before it.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from cxrcf.attributes import ATTRIBUTES, VOCAB, decode, encode
from cxrcf.config import TU
from cxrcf.errors import CxrcfError

Split = Literal["train", "val", "test"]
Discrete = Literal["sex", "race", "finding"]


class _Plan(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    splits: tuple[Split, ...] | None = None
    max_sources: int | None = Field(None, ge=1)
    t_u: TU | None = None
    seed: int | None = None


class FlipPlan(_Plan):
    kind: Literal["flip"]
    attributes: tuple[Discrete, ...] = Field(min_length=1)
    race_to: Literal["white", "asian", "black"] | None = None

    @field_validator("attributes")
    @classmethod
    def _unique(cls, v):
        if len(set(v)) != len(v):
            raise ValueError("attributes must not repeat")
        return v

    @model_validator(mode="after")
    def _race_to_needs_race(self):
        if self.race_to is not None and "race" not in self.attributes:
            raise ValueError("race_to is set but race is not among the attributes to flip")
        return self


class BalancePlan(_Plan):
    kind: Literal["balance"]
    by: tuple[Discrete, ...] = Field(min_length=1)
    target: int | None = Field(None, ge=1)

    @field_validator("by")
    @classmethod
    def _unique(cls, v):
        if len(set(v)) != len(v):
            raise ValueError("by must not repeat")
        return v


class GridPlan(_Plan):
    kind: Literal["grid"]
    interventions: tuple[dict[str, str | float | int], ...] = Field(min_length=1)

    @field_validator("interventions")
    @classmethod
    def _valid(cls, v):
        out, seen = [], set()
        for i, do in enumerate(v):
            try:
                labels = canonical_intervention(do)
            except CxrcfError as err:
                raise ValueError(f"interventions[{i}]: {err}") from None
            key = intervention_key(labels)
            if key in seen:
                raise ValueError(f"interventions[{i}]: {key} is listed twice")
            seen.add(key)
            out.append(labels)
        return tuple(out)


Plan = Annotated[FlipPlan | BalancePlan | GridPlan, Field(discriminator="kind")]
_PLAN_ADAPTER = TypeAdapter(Plan)


def parse_plan(raw: object, source: str = "plan") -> FlipPlan | BalancePlan | GridPlan:
    from cxrcf.config import format_validation_error

    if not isinstance(raw, dict):
        raise CxrcfError(f"{source}: expected a mapping with a 'kind' (flip, balance or grid)")
    try:
        return _PLAN_ADAPTER.validate_python(raw)
    except ValidationError as err:
        raise CxrcfError(format_validation_error(err, source)) from None


def load_plan(path: str | Path) -> FlipPlan | BalancePlan | GridPlan:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise CxrcfError(f"{path}: plan file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise CxrcfError(f"{path}: not valid YAML: {err}") from None
    return parse_plan(raw, str(path))


# ------------------------------------------------------------------------------- interventions
def canonical_intervention(do: dict) -> dict[str, str | float]:
    """Validated intervention with labels for discrete attributes and float years for age."""
    out = {}
    for attr, value in do.items():
        if attr not in ATTRIBUTES:
            raise CxrcfError(f"unknown attribute {attr!r}; expected one of {', '.join(ATTRIBUTES)}")
        out[attr] = decode(attr, encode(attr, value))
    return {a: out[a] for a in ATTRIBUTES if a in out}


def intervention_key(labels: dict) -> str:
    """The one text form of an intervention: sorted-key JSON (used in ids, grouping and the manifest)."""
    return json.dumps(labels, sort_keys=True, separators=(",", ":"))


def intervention_codes(labels: dict) -> dict[str, float | int]:
    return {a: encode(a, v) for a, v in labels.items()}


_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def item_id(source_id: str, labels: dict, rep: int = 0) -> str:
    """Deterministic from the source and the intervention, so reruns name the same files."""
    text = f"{source_id}\n{intervention_key(labels)}" + (f"\n{rep}" if rep else "")
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    prefix = source_id if _SAFE_ID.match(source_id) else "cf"
    return f"{prefix}-cf-{digest}"


# ----------------------------------------------------------------------------------- expansion
@dataclass(frozen=True)
class Item:
    item_id: str
    source_id: str
    path: str  # source image, absolute
    split: str
    subject_id: str
    parents: dict  # factual, labels / years
    intervention: dict  # labels / years
    rep: int = 0


@dataclass(frozen=True)
class Chunk:
    index: int
    items: tuple[Item, ...] = field(default_factory=tuple)

    @property
    def name(self) -> str:
        return f"chunk-{self.index:06d}"


def _select(plan, frame):
    sel = frame
    if plan.splits is not None:
        sel = sel[sel["split"].isin(plan.splits)]
    sel = sel.sort_values("id", kind="stable")
    if plan.max_sources is not None:
        sel = sel.head(plan.max_sources)
    if len(sel) == 0:
        raise CxrcfError(f"plan: no images selected (splits = {list(plan.splits or [])})")
    return sel


def _factual(row) -> dict:
    return {a: decode(a, encode(a, row[a])) for a in ATTRIBUTES}


def _item(row, data_root: Path, labels: dict, rep: int = 0) -> Item:
    source = str(row["id"])
    return Item(
        item_id=item_id(source, labels, rep),
        source_id=source,
        path=str((data_root / str(row["path"])).resolve()),
        split=str(row["split"]),
        subject_id=str(row.get("subject_id", "")),
        parents=_factual(row),
        intervention=labels,
        rep=rep,
    )


def _expand_flip(plan: FlipPlan, sel, data_root):
    items = []
    for _, row in sel.iterrows():
        parents = _factual(row)
        for attr in plan.attributes:
            now = parents[attr]
            if attr == "race":
                targets = [plan.race_to] if plan.race_to else [c for c in VOCAB["race"] if c != now]
                targets = [t for t in targets if t != now]
            else:
                targets = [c for c in VOCAB[attr] if c != now]
            items += [_item(row, data_root, {attr: t}) for t in targets]
    return items


def _expand_balance(plan: BalancePlan, sel, data_root, seed: int):
    import numpy as np

    rows = [row for _, row in sel.iterrows()]
    groups = [tuple(_factual(r)[a] for a in plan.by) for r in rows]
    cells = list(product(*(VOCAB[a] for a in plan.by)))
    counts = {c: sum(g == c for g in groups) for c in cells}
    target = plan.target if plan.target is not None else max(counts.values())
    rng = np.random.default_rng(seed)
    items = []
    for cell in cells:
        need = target - counts[cell]
        if need <= 0:
            continue
        pool = [i for i, g in enumerate(groups) if g != cell]
        if not pool:
            raise CxrcfError(f"plan: subgroup {dict(zip(plan.by, cell))} has no other images to start from")
        tie = rng.permutation(len(pool))
        changed = [sum(a != b for a, b in zip(groups[i], cell)) for i in pool]
        order = [pool[j] for j in sorted(range(len(pool)), key=lambda j: (changed[j], tie[j]))]
        for k in range(need):
            i = order[k % len(order)]
            labels = {a: v for a, v, g in zip(plan.by, cell, groups[i]) if v != g}
            items.append(_item(rows[i], data_root, canonical_intervention(labels), rep=k // len(order)))
    return items


def _expand_grid(plan: GridPlan, sel, data_root):
    return [_item(row, data_root, dict(do)) for _, row in sel.iterrows() for do in plan.interventions]


def expand_plan(plan, frame, data_root: str | Path, seed: int) -> list[Item]:
    """The plan's items, intervention-grouped, in manifest order."""
    data_root = Path(data_root)
    sel = _select(plan, frame)
    if isinstance(plan, FlipPlan):
        items = _expand_flip(plan, sel, data_root)
    elif isinstance(plan, BalancePlan):
        items = _expand_balance(plan, sel, data_root, seed)
    else:
        items = _expand_grid(plan, sel, data_root)
    order = {}
    for it in items:
        order.setdefault(intervention_key(it.intervention), len(order))
    items.sort(key=lambda it: order[intervention_key(it.intervention)])  # stable: keeps source order
    ids = [it.item_id for it in items]
    if len(set(ids)) != len(ids):
        raise CxrcfError("plan: two items got the same id (duplicate source ids in metadata.csv?)")
    return items


def chunk_items(items: list[Item], batch_size: int) -> list[Chunk]:
    """Cut at every change of intervention too, so that each chunk is one model call."""
    chunks, current = [], []
    for it in items:
        if current and (len(current) == batch_size or it.intervention != current[-1].intervention):
            chunks.append(Chunk(len(chunks), tuple(current)))
            current = []
        current.append(it)
    if current:
        chunks.append(Chunk(len(chunks), tuple(current)))
    return chunks


def plan_dump(plan) -> dict:
    return plan.model_dump(mode="json")
