"""One counterfactual path: serving, the MLflow pyfunc, batch augmentation and the bundle all call
`cxrcf.batch.counterfactual_batch`, so the same inputs and seed give the same bytes in every room;
evaluation's shared abduction agrees with them for one intervention."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import tiny_bundle

from cxrcf.attributes import ATTRIBUTES, context
from cxrcf.bundle import parents_from_labels
from cxrcf.counterfactual import counterfactuals_shared
from cxrcf.data import from_model_images, to_model_images
from cxrcf.png import decode_png, encode_png

PARENTS = [
    {"sex": "male", "race": "white", "age": 61.0, "finding": "no_finding"},
    {"sex": "female", "race": "asian", "age": 35.0, "finding": "pleural_effusion"},
    {"sex": "male", "race": "black", "age": 80.0, "finding": "pleural_effusion"},
]
T_U, SEED = 0.7, 11


@pytest.fixture(scope="module")
def bundle():
    return tiny_bundle(seed=2)


@pytest.fixture(scope="module")
def pixels(bundle):
    r = bundle.resolution
    return np.random.default_rng(4).integers(0, 256, (len(PARENTS), r, r), dtype=np.uint8)


def served(bundle, pixels, interventions_per_image):
    from serving.engine import Item, run_batch

    items = [Item(p, dict(row), list(dos), T_U, SEED)
             for p, row, dos in zip(pixels, PARENTS, interventions_per_image, strict=False)]
    results = run_batch(bundle, items)
    return ([[cf["pixels"] for cf in r.counterfactuals] for r in results],
            [[cf["probabilities"] for cf in r.counterfactuals] for r in results])


def pyfunc(bundle, pixels, interventions):
    from pipelines.pyfunc_model import CxrcfPyfunc

    model = CxrcfPyfunc()
    model.bundle, model.predictor = bundle, None
    frame = pd.DataFrame([{**row, "image": encode_png(p), "interventions": json.dumps(interventions),
                           "t_u": T_U, "seed": SEED} for p, row in zip(pixels, PARENTS, strict=False)])
    out = model.predict(None, frame)
    return ([[decode_png(png) for png in json.loads(cell)] for cell in out["counterfactuals"]],
            [json.loads(cell) for cell in out["probabilities"]])


def augmented(bundle, pixels, intervention):
    from pipelines.augment import Counterfactualizer, _probs_row

    actor = Counterfactualizer.__new__(Counterfactualizer)  # the actor without loading a model by reference
    actor.bundle, actor.device, actor.t_u = bundle, "cpu", T_U
    items = [{"id": f"i{i}", "parents": row, "intervention": intervention} for i, row in enumerate(PARENTS)]
    rows, cf = actor._one(items, pixels, [], SEED)
    return cf, rows, _probs_row


def test_one_image_many_interventions_is_the_same_bytes_in_every_room(bundle, pixels):
    interventions = [{"sex": "female"}, {"age": 90.0}, {"race": "black", "finding": "no_finding"}]
    one = pixels[:1]
    serve_px, serve_p = served(bundle, one, [interventions])
    func_px, func_p = pyfunc(bundle, one, interventions)
    x = to_model_images(one, bundle.resolution)
    direct = bundle.counterfactuals(x, parents_from_labels(PARENTS[:1]), interventions, t_u=T_U, seed=SEED)
    for k in range(len(interventions)):
        want = from_model_images(direct[k])[0]
        assert serve_px[0][k].tobytes() == want.tobytes() == func_px[0][k].tobytes()
    assert serve_p[0] == func_p[0]  # probability rows, float for float
    assert len({a.tobytes() for a in serve_px[0]}) == len(interventions)  # the interventions differ


def test_many_images_one_intervention_is_the_same_bytes_in_every_room(bundle, pixels):
    do = {"sex": "female"}
    serve_px, serve_p = served(bundle, pixels, [[do]] * len(PARENTS))
    func_px, func_p = pyfunc(bundle, pixels, [do])
    aug_px, aug_rows, flat = augmented(bundle, pixels, do)
    x = to_model_images(pixels, bundle.resolution)
    parents = parents_from_labels(PARENTS)
    direct = from_model_images(bundle.counterfactuals(x, parents, [do], t_u=T_U, seed=SEED)[0])
    for i in range(len(PARENTS)):
        assert (serve_px[i][0].tobytes() == func_px[i][0].tobytes() == aug_px[i].tobytes()
                == direct[i].tobytes())
        assert serve_p[i][0] == func_p[i][0]
        assert aug_rows[i]["after"] == flat(serve_p[i][0])

    # evaluation abducts once and decodes every intervention from it; for one intervention (no SCM draw
    # under do(sex)) that is the same generator stream, so the same images
    star = bundle.scm.counterfactual(parents, {"sex": torch.tensor(1.0)})
    shared = counterfactuals_shared(bundle.hvae, x, context(parents), [context(star)], (T_U,),
                                    generator=torch.Generator().manual_seed(SEED))
    assert from_model_images(shared[0][0]).tobytes() == direct.tobytes()


def test_a_colour_image_is_refused_the_same_way_by_every_decoder(bundle, pixels):
    import base64
    import io

    from PIL import Image

    from cxrcf.errors import CxrcfError

    rgb = np.stack([pixels[0], pixels[0] // 2, pixels[0]], -1)
    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, format="PNG")
    text = base64.b64encode(buf.getvalue()).decode()
    with pytest.raises(CxrcfError, match="3 distinct colour channels"):
        decode_png(text)
    frame = pd.DataFrame([{**PARENTS[0], "image": text, "interventions": "[]", "t_u": 1.0, "seed": 0}])
    from pipelines.pyfunc_model import CxrcfPyfunc

    model = CxrcfPyfunc()
    model.bundle, model.predictor = bundle, None
    with pytest.raises(CxrcfError, match="row 0: image: .*3 distinct colour channels"):
        model.predict(None, frame)
    assert set(ATTRIBUTES) == set(PARENTS[0])
