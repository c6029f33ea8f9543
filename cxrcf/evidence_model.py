"""Evidence regressor: a small CNN that reads SynthCXR's per-image evidence off an image, in the
simulator's own units (`cxrcf.synth.EVIDENCE_UNITS`), so that amplification can be stated as
"do(sex) added 3% of lung height of effusion" rather than in a classifier's log-odds.

Saved like the other models (config.json + model.safetensors, nothing pickled), under its own kind.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from cxrcf.errors import CxrcfError
from cxrcf.predictor import _SmallCNN

KIND = "evidence_regressor"
TARGETS = ("eff_max", "breast_amp", "shoulder_amp", "texture_amp", "density", "bone")


class EvidenceRegressor(nn.Module):
    def __init__(self, resolution: int = 32, width: int = 16, targets: tuple[str, ...] = TARGETS):
        super().__init__()
        self.config = {"resolution": int(resolution), "width": int(width), "targets": list(targets)}
        self.backbone = _SmallCNN(width)
        self.head = nn.Linear(self.backbone.out_dim, len(targets))
        # Targets are learned standardised; these undo it (set from the training data).
        self.register_buffer("mean", torch.zeros(len(targets)))
        self.register_buffer("std", torch.ones(len(targets)))

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(self.config["targets"])

    @property
    def resolution(self) -> int:
        return self.config["resolution"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Standardised predictions (N, T) of model images (N, 1, R, R) in [-1, 1]."""
        return self.head(self.backbone(x))

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Evidence in simulator units, resizing to the regressor's resolution like the predictors."""
        import torch.nn.functional as F

        r = self.resolution
        if x.shape[-1] != r:
            mode = "area" if r < x.shape[-1] else "bilinear"
            x = F.interpolate(x, size=(r, r), mode=mode, **({} if mode == "area" else {"align_corners": False}))
        out = self.forward(x) * self.std + self.mean
        return {t: out[:, i] for i, t in enumerate(self.targets)}

    def save(self, directory: str | Path, meta: dict | None = None) -> Path:
        from safetensors.torch import save_file

        from cxrcf.fileio import atomic_path

        state = {k: v.detach().cpu().contiguous().clone() for k, v in self.state_dict().items()}
        text = json.dumps({"format_version": 1, "kind": KIND, "config": self.config, "meta": meta or {}},
                          indent=2, sort_keys=True)
        directory = Path(directory)
        with atomic_path(directory) as tmp:
            tmp.mkdir()
            (tmp / "config.json").write_text(text + "\n")
            save_file(state, str(tmp / "model.safetensors"), metadata={"kind": KIND})
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> EvidenceRegressor:
        from safetensors.torch import load_file

        from cxrcf.fileio import read_json

        directory = Path(directory)
        cfg_path = directory / "config.json"
        if not cfg_path.is_file():
            raise CxrcfError(f"{directory}: no config.json; not an exported evidence regressor")
        found = read_json(cfg_path)
        if not isinstance(found, dict) or found.get("kind") != KIND:
            kind = found.get("kind") if isinstance(found, dict) else None
            raise CxrcfError(f"{directory}: holds a {kind!r} model, expected an {KIND}")
        c = found["config"]
        model = cls(c["resolution"], c["width"], tuple(c["targets"]))
        model.load_state_dict(load_file(str(directory / "model.safetensors")), strict=True)
        return model.eval()
