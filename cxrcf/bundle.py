"""GeneratorBundle: HVAE + attribute SCM + evaluation predictor, the unit that is registered,
served and used for augmentation.

On disk (`save`/`load`): `hvae/`, `scm/`, `predictor/` in the export format of cxrcf.export and
`bundle.json` with the metadata (name, mode none/hard/soft, preset, metrics, lineage).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from cxrcf.attributes import AGE_MAX, AGE_MIN, encode_parents
from cxrcf.batch import Edit, counterfactual_batch
from cxrcf.config import check_t_u
from cxrcf.errors import CxrcfError
from cxrcf.fileio import atomic_path, read_json

BUNDLE_FILE = "bundle.json"
BUNDLE_FORMAT_VERSION = 1
_PARTS = ("hvae", "scm", "predictor")


def parents_from_labels(rows: Sequence[Mapping[str, object]], device="cpu") -> dict[str, torch.Tensor]:
    """Rows of labels (strings of VOCAB or codes; age in years) -> parents tensors (N,)."""
    coded = []
    for i, row in enumerate(rows):
        try:
            coded.append(encode_parents(row))
        except CxrcfError as err:
            raise CxrcfError(f"parents[{i}]: {err}") from None
    return {
        "sex": torch.tensor([r["sex"] for r in coded], dtype=torch.float32, device=device),
        "race": torch.tensor([r["race"] for r in coded], dtype=torch.long, device=device),
        "age": torch.tensor([r["age"] for r in coded], dtype=torch.float32, device=device),
        "finding": torch.tensor([r["finding"] for r in coded], dtype=torch.float32, device=device),
    }


class GeneratorBundle:
    def __init__(self, hvae, scm, predictor, meta: dict | None = None):
        self.hvae = hvae
        self.scm = scm
        self.predictor = predictor
        self.meta = dict(meta or {})
        self.eval()

    # ----------------------------------------------------------------------------- housekeeping
    @property
    def resolution(self) -> int:
        return self.hvae.arch.resolution

    @property
    def device(self) -> torch.device:
        return next(self.hvae.parameters()).device

    def to(self, device) -> GeneratorBundle:
        for part in _PARTS:
            getattr(self, part).to(device)
        return self

    def eval(self) -> GeneratorBundle:
        for part in _PARTS:
            getattr(self, part).eval()
        return self

    def save(self, directory: str | Path) -> Path:
        from cxrcf.export import save_model

        directory = Path(directory)
        meta_text = json.dumps({"format_version": BUNDLE_FORMAT_VERSION, "meta": self.meta},
                               indent=2, sort_keys=True)
        with atomic_path(directory) as tmp:
            tmp.mkdir()
            for part in _PARTS:
                save_model(getattr(self, part), tmp / part)
            (tmp / BUNDLE_FILE).write_text(meta_text + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | Path, device="cpu") -> GeneratorBundle:
        from cxrcf.export import load_model, read_config

        directory = Path(directory)
        path = directory / BUNDLE_FILE
        if not path.is_file():
            raise CxrcfError(f"{directory}: missing {BUNDLE_FILE}; not a saved GeneratorBundle")
        info = read_json(path)
        if not isinstance(info, dict) or info.get("format_version") != BUNDLE_FORMAT_VERSION:
            raise CxrcfError(f"{path}: expected format_version {BUNDLE_FORMAT_VERSION}")
        parts = {}
        for part in _PARTS:
            kind = read_config(directory / part)["kind"]
            if kind != part:
                raise CxrcfError(f"{directory / part}: holds a {kind} model, expected {part}")
            parts[part] = load_model(directory / part, device=device)
        return cls(parts["hvae"], parts["scm"], parts["predictor"], info.get("meta") or {})

    # ------------------------------------------------------------------------------- inference
    def _check_images(self, x) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != 1 \
                or x.shape[2] != self.resolution or x.shape[3] != self.resolution:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise CxrcfError(f"x: expected a float tensor (N, 1, {self.resolution}, {self.resolution}), got {shape}")
        return x.to(self.device, torch.float32)

    def _for_predictor(self, x: torch.Tensor) -> torch.Tensor:
        r = self.predictor.arch.resolution
        if x.shape[-1] == r:
            return x
        # The HVAE and predictor may be trained at different sizes; area for shrinking, bilinear to enlarge.
        mode = "area" if r < x.shape[-1] else "bilinear"
        return F.interpolate(x, size=(r, r), mode=mode, **({} if mode == "area" else {"align_corners": False}))

    @torch.no_grad()
    def probabilities(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The evaluation predictor's probabilities (sex, race (N,3), finding) and age in years."""
        return self.predictor.predict(self._for_predictor(self._check_images(x)))

    @torch.no_grad()
    def infer_parents(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Most likely parents: thresholded sex/finding at 0.5, argmax race, mean age (clipped to 0-120)."""
        p = self.probabilities(x)
        return {
            "sex": (p["sex"] > 0.5).float(),
            "race": p["race"].argmax(-1),
            "age": p["age"].clamp(AGE_MIN, AGE_MAX),
            "finding": (p["finding"] > 0.5).float(),
        }

    def counterfactuals(self, x: torch.Tensor, parents: Mapping[str, torch.Tensor] | None,
                        interventions: Sequence[Mapping[str, object]], t_u: float = 1.0, seed: int = 0,
                        particles: int = 1, return_parents: bool = False, batch_size: int | None = None):
        """One counterfactual batch (N, 1, R, R) per intervention (`cxrcf.batch.counterfactual_batch`).

        Each intervention maps attributes to values (label, code, or age in years); the SCM turns it
        into counterfactual parents (an age intervention updates finding), then all interventions go
        through the HVAE together, `batch_size` images per pass (default: all at once). Deterministic
        for a given seed. `parents=None` uses `infer_parents(x)`. With `return_parents`, returns
        (images, list of counterfactual parents dicts).
        """
        x = self._check_images(x)
        n = x.shape[0]
        check_t_u(t_u)
        edits = [Edit(range(n), do, t_u) for do in interventions]
        out = counterfactual_batch(self, x, parents, edits, seed=seed, particles=particles, batch_size=batch_size)
        images = out.split([n] * len(edits))
        cf_parents = [{a: v[k * n:(k + 1) * n] for a, v in out.parents.items()} for k in range(len(edits))]
        return (images, cf_parents) if return_parents else images
