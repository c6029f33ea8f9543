"""The registered models' MLflow pyfunc, defined from code (MLflow "models from code").

MLflow stores this file itself as the model's definition and runs it at load time, so nothing is
pickled: the weights are the safetensors/JSON artifacts handed to `log_model`.

- Generator (artifact `bundle`, a saved `cxrcf.bundle.GeneratorBundle`): one input row per image,
  columns `image` (base64 grayscale PNG, read by `cxrcf.png` under the API's rules: 16-bit scaled,
  colour refused), factual parents `sex`, `race`, `finding` (labels of
  cxrcf.attributes.VOCAB) and `age` (years), `interventions` (JSON list of {attribute: value}),
  `t_u` and `seed`. Output per row: `counterfactuals` (JSON list of base64 PNGs, one per
  intervention) and `probabilities` (JSON list, per counterfactual, of the evaluation predictor's
  P(female), P(race) per class, P(pleural effusion) and age in years). Rows with the same
  interventions, t_u and seed go through the generator as one batch of the core's one path,
  `cxrcf.batch.counterfactual_batch`, exactly as `GeneratorBundle.counterfactuals` would.
- Predictor (artifact `predictor`, an exported `cxrcf.predictor.Predictor`): column `image`;
  output `probabilities` (JSON object as above).

Only this file and the `cxrcf` package (shipped as the model's code path) are needed to load it.
"""

from __future__ import annotations

import json

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

COLUMNS = ("image", "sex", "race", "age", "finding", "interventions", "t_u", "seed")


def _images(frame, resolution: int):
    import torch

    from cxrcf.data import to_model_images
    from cxrcf.errors import CxrcfError
    from cxrcf.png import decode_png

    images = []
    for i, text in enumerate(frame["image"]):
        try:
            images.append(to_model_images(decode_png(text)[None], resolution))
        except CxrcfError as err:
            raise CxrcfError(f"row {i}: image: {err}") from None
    return torch.cat(images)


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

        from cxrcf.batch import probability_rows

        frame = model_input.reset_index(drop=True)
        with torch.no_grad():
            if self.bundle is None:
                x = _images(frame, self.predictor.arch.resolution)
                rows = probability_rows(self.predictor.predict(x))
                return pd.DataFrame({"probabilities": [json.dumps(r) for r in rows]})
            return self._counterfactuals(frame)

    def _counterfactuals(self, frame: pd.DataFrame) -> pd.DataFrame:
        from cxrcf.batch import Edit, counterfactual_batch
        from cxrcf.bundle import parents_from_labels
        from cxrcf.data import from_model_images
        from cxrcf.png import encode_png

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
            n = len(idx)
            out = counterfactual_batch(self.bundle, x.to(self.bundle.device), parents,
                                       [Edit(range(n), do, t_u) for do in interventions], seed=seed,
                                       probabilities=True)
            pngs = [encode_png(img) for img in from_model_images(out.images)]
            for j, i in enumerate(idx):
                mine = range(j, len(pngs), n)  # row j of each intervention's block
                out_cf[i] = json.dumps([pngs[r] for r in mine])
                out_p[i] = json.dumps([out.probabilities[r] for r in mine])
        return pd.DataFrame({"counterfactuals": out_cf, "probabilities": out_p})


def example_frame(resolution: int, generator: bool = True):
    """A one-row input example: a mid-grey image, a 60-year-old white male without finding, do(sex)."""
    import numpy as np

    from cxrcf.png import encode_png

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
