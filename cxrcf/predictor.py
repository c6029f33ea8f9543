"""Anti-causal predictor g(x) -> sex, race, finding logits and an age Gaussian (SCIENCE.md section 4).

Two backbones share the heads:
- `resnet18`: ResNet-18 layout (2-2-2-2 basic blocks, widths w, 2w, 4w, 8w with w = arch.width, 64 in
  the reference) with a 1-channel 7x7 stem, GroupNorm instead of BatchNorm and dropout before the heads.
  The stem's downsampling depends on the input size so the last feature map stays >= 4x4:
  x4 (stride-2 conv + max-pool, as in the reference) from 128 pixels up, x2 (stride-2 conv) from 64,
  none below (32x32 inputs keep a 4x4 map after the three strided stages).
- `cnn`: four 3x3 conv stages (one at full size, three stride 2) of width w, 2w, 4w, 4w; fast on CPU.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from cxrcf.attributes import N_RACE, age_from_model, age_to_model
from cxrcf.config import PredictorArch


def _norm(channels: int) -> nn.GroupNorm:
    # ~4 channels per group for narrow nets, capped at 32 groups like the usual GroupNorm default.
    return nn.GroupNorm(math.gcd(32, max(channels // 4, 1)), channels)


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.norm1 = _norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.norm2 = _norm(cout)
        self.skip = None
        if stride != 1 or cin != cout:
            self.skip = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), _norm(cout))

    def forward(self, x):
        h = F.relu(self.norm1(self.conv1(x)))
        h = self.norm2(self.conv2(h))
        return F.relu(h + (x if self.skip is None else self.skip(x)))


def stem_downsampling(resolution: int) -> int:
    return 4 if resolution >= 128 else 2 if resolution >= 64 else 1


class _ResNet18(nn.Module):
    def __init__(self, width: int, resolution: int):
        super().__init__()
        down = stem_downsampling(resolution)
        stem = [nn.Conv2d(1, width, 7, 2 if down > 1 else 1, 3, bias=False), _norm(width), nn.ReLU()]
        if down == 4:
            stem.append(nn.MaxPool2d(3, 2, 1))
        self.stem = nn.Sequential(*stem)
        widths = [width, 2 * width, 4 * width, 8 * width]
        layers, cin = [], width
        for i, w in enumerate(widths):
            layers += [_BasicBlock(cin, w, 1 if i == 0 else 2), _BasicBlock(w, w, 1)]
            cin = w
        self.layers = nn.Sequential(*layers)
        self.out_dim = widths[-1]

    def forward(self, x):
        return self.layers(self.stem(x)).mean((2, 3))


class _SmallCNN(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        widths = [width, 2 * width, 4 * width, 4 * width]
        layers, cin = [], 1
        for i, w in enumerate(widths):
            layers += [nn.Conv2d(cin, w, 3, 1 if i == 0 else 2, 1), _norm(w), nn.GELU()]
            cin = w
        self.layers = nn.Sequential(*layers)
        self.out_dim = widths[-1]

    def forward(self, x):
        return self.layers(x).mean((2, 3))


class Predictor(nn.Module):
    def __init__(self, arch: PredictorArch):
        super().__init__()
        self.arch = arch
        if arch.kind == "resnet18":
            self.backbone = _ResNet18(arch.width, arch.resolution)
        else:
            self.backbone = _SmallCNN(arch.width)
        d = self.backbone.out_dim
        self.dropout = nn.Dropout(arch.dropout)
        self.sex_head = nn.Linear(d, 1)
        self.race_head = nn.Linear(d, N_RACE)
        self.finding_head = nn.Linear(d, 1)
        self.age_head = nn.Linear(d + 1, 2)  # +1: the finding (label or predicted probability)

    def forward(self, x: torch.Tensor, finding: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        h = self.dropout(self.backbone(x))
        finding_logit = self.finding_head(h).squeeze(1)
        f = torch.sigmoid(finding_logit) if finding is None else finding.to(h.dtype)
        age = self.age_head(torch.cat([h, f.unsqueeze(1)], 1))
        return {
            "sex": self.sex_head(h).squeeze(1),
            "race": self.race_head(h),
            "finding": finding_logit,
            "age_loc": age[:, 0],
            "age_logscale": age[:, 1],
        }

    def logits(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.forward(x)

    def predict(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Probabilities (sex, finding: P(class 1); race: softmax) and the age mean in years."""
        out = self.forward(x)
        return {
            "sex": torch.sigmoid(out["sex"]),
            "race": torch.softmax(out["race"], -1),
            "finding": torch.sigmoid(out["finding"]),
            "age": age_from_model(out["age_loc"]),
        }


def predictor_loss(outputs: dict[str, torch.Tensor], parents: dict[str, torch.Tensor]
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sum of BCE (sex, finding), CE (race) and the Gaussian NLL of model-space age; parts detached."""
    sex = F.binary_cross_entropy_with_logits(outputs["sex"], parents["sex"].float())
    race = F.cross_entropy(outputs["race"], parents["race"].long())
    finding = F.binary_cross_entropy_with_logits(outputs["finding"], parents["finding"].float())
    target = age_to_model(parents["age"].float())
    # A floor on the scale keeps the NLL finite if the age head becomes overconfident on a batch.
    logscale = outputs["age_logscale"].clamp(min=-7.0)
    z = (target - outputs["age_loc"]) * torch.exp(-logscale)
    age = (0.5 * z * z + logscale + 0.5 * math.log(2 * math.pi)).mean()
    loss = sex + race + finding + age
    parts = {"sex": sex, "race": race, "finding": finding, "age": age}
    return loss, {k: v.detach() for k, v in parts.items()}
