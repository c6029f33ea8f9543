"""The registered models' MLflow pyfunc, defined from code (MLflow "models from code").

MLflow stores this file itself as the model's definition and runs it at load time, so nothing is
pickled: the weights are the safetensors/JSON artifacts handed to `log_model`.

- Generator (artifact `bundle`, a saved `cxrcf.bundle.GeneratorBundle`): one input row per image,
  columns `image` (base64 8-bit grayscale PNG), factual parents `sex`, `race`, `finding` (labels of
  cxrcf.attributes.VOCAB) and `age` (years), `interventions` (JSON list of {attribute: value}),
  `t_u` and `seed`. Output per row: `counterfactuals` (JSON list of base64 PNGs, one per
  intervention) and `probabilities` (JSON list, per counterfactual, of the evaluation predictor's
  P(female), P(race) per class, P(pleural effusion) and age in years). Rows with the same
  interventions, t_u and seed go through the generator as one batch, exactly as
  `GeneratorBundle.counterfactuals` would on that batch.
- Predictor (artifact `predictor`, an exported `cxrcf.predictor.Predictor`): column `image`;
  output `probabilities` (JSON object as above).

Only this file and the `cxrcf` package (shipped as the model's code path) are needed to load it.
"""

from __future__ import annotations

import base64
import io
import json

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

COLUMNS = ("image", "sex", "race", "age", "finding", "interventions", "t_u", "seed")


def decode_png(text: str, where: str = "image"):
    """base64 PNG -> uint8 (H, W) grayscale."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    from cxrcf.errors import CxrcfError

    try:
        with Image.open(io.BytesIO(base64.b64decode(text, validate=True))) as img:
            return np.asarray(img.convert("L"), dtype=np.uint8)
    except (ValueError, TypeError, UnidentifiedImageError, OSError) as err:
        raise CxrcfError(f"{where}: not a base64-encoded PNG ({type(err).__name__})") from None


def encode_png(image) -> str:
    """uint8 (H, W) -> base64 PNG."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image, mode="L").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def to_uint8(x):
    """Model images (N, 1, R, R) in [-1, 1] -> uint8 numpy (N, R, R) (the contract's inverse scale)."""
    import torch

    return ((x[:, 0].detach().cpu().float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()


def probability_rows(probs) -> list[dict]:
    from cxrcf.attributes import VOCAB

    n = probs["sex"].shape[0]
    return [{"sex": float(probs["sex"][i]),
             "race": {label: float(probs["race"][i, j]) for j, label in enumerate(VOCAB["race"])},
             "finding": float(probs["finding"][i]),
             "age": float(probs["age"][i])} for i in range(n)]


def _images(frame, resolution: int):
    import torch

    from cxrcf.data import to_model_images

    return torch.cat([to_model_images(decode_png(text, f"row {i}: image")[None], resolution)
                      for i, text in enumerate(frame["image"])])


def _interventions(text, row: int) -> list[dict]:
    from cxrcf.errors import CxrcfError

    try:
        value = json.loads(text)
    except (TypeError, json.JSONDecodeError):
        raise CxrcfError(f"row {row}: interventions: not a JSON list of objects") from None
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise CxrcfError(f"row {row}: interventions: not a JSON list of objects")
    return value


class CxrcfPyfunc(PythonModel):
    def load_context(self, context):
        if "bundle" in context.artifacts:
            from cxrcf.bundle import GeneratorBundle

            self.bundle = GeneratorBundle.load(context.artifacts["bundle"])
            self.predictor = None
        else:
            from cxrcf.export import load_model

            self.bundle = None
            self.predictor = load_model(context.artifacts["predictor"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        import torch

        frame = model_input.reset_index(drop=True)
        with torch.no_grad():
            if self.bundle is None:
                x = _images(frame, self.predictor.arch.resolution)
                rows = probability_rows(self.predictor.predict(x))
                return pd.DataFrame({"probabilities": [json.dumps(r) for r in rows]})
            return self._counterfactuals(frame)

    def _counterfactuals(self, frame: pd.DataFrame) -> pd.DataFrame:
        from cxrcf.bundle import parents_from_labels

        missing = [c for c in COLUMNS if c not in frame.columns]
        if missing:
            from cxrcf.errors import CxrcfError

            raise CxrcfError(f"input: missing column(s) {', '.join(missing)}")
        out_cf: list[str | None] = [None] * len(frame)
        out_p: list[str | None] = [None] * len(frame)
        groups: dict[tuple, list[int]] = {}
        for i, row in frame.iterrows():
            groups.setdefault((row["interventions"], float(row["t_u"]), int(row["seed"])), []).append(i)
        for (text, t_u, seed), idx in groups.items():
            part = frame.loc[idx]
            interventions = _interventions(text, idx[0])
            x = _images(part, self.bundle.resolution)
            parents = parents_from_labels(part[["sex", "race", "age", "finding"]].to_dict("records"))
            images = self.bundle.counterfactuals(x, parents, interventions, t_u=t_u, seed=seed)
            pngs = [[encode_png(img) for img in to_uint8(batch)] for batch in images]
            probs = [probability_rows(self.bundle.probabilities(batch)) for batch in images]
            for j, i in enumerate(idx):
                out_cf[i] = json.dumps([pngs[k][j] for k in range(len(images))])
                out_p[i] = json.dumps([probs[k][j] for k in range(len(images))])
        return pd.DataFrame({"counterfactuals": out_cf, "probabilities": out_p})


def example_frame(resolution: int, generator: bool = True):
    """A one-row input example: a mid-grey image, a 60-year-old white male without finding, do(sex)."""
    import numpy as np

    image = encode_png(np.full((resolution, resolution), 128, dtype=np.uint8))
    if not generator:
        return pd.DataFrame({"image": [image]})
    return pd.DataFrame({"image": [image], "sex": ["male"], "race": ["white"], "age": [60.0],
                         "finding": ["no_finding"], "interventions": [json.dumps([{"sex": "female"}])],
                         "t_u": [1.0], "seed": [0]})


def signature(generator: bool = True):
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    if not generator:
        return ModelSignature(inputs=Schema([ColSpec("string", "image")]),
                              outputs=Schema([ColSpec("string", "probabilities")]))
    inputs = Schema([ColSpec("string", "image"), ColSpec("string", "sex"), ColSpec("string", "race"),
                     ColSpec("double", "age"), ColSpec("string", "finding"), ColSpec("string", "interventions"),
                     ColSpec("double", "t_u"), ColSpec("long", "seed")])
    return ModelSignature(inputs=inputs, outputs=Schema([ColSpec("string", "counterfactuals"),
                                                          ColSpec("string", "probabilities")]))


mlflow.models.set_model(CxrcfPyfunc())
