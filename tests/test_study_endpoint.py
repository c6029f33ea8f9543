"""The study's endpoint machinery: per-image measurements on real (tiny, untrained) models and the
SynthCXR truth, the analysis and verdict files on hand-made measurements, and a resumed study run
that writes verdict.json, a flat metrics.json and logs the verdict to MLflow."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from endpoint_fixtures import hand_made_measurements

from cxrcf.config import preset_params
from cxrcf.errors import CxrcfError
from pipelines import endpoint as E
from pipelines import study as S


def _export_models(data_root, out: Path) -> dict[str, Path]:
    import torch

    from cxrcf.config import SCMConfig
    from cxrcf.data import load_split
    from cxrcf.export import save_model
    from cxrcf.hvae import HVAE
    from cxrcf.predictor import Predictor
    from cxrcf.scm import AttributeSCM

    params = preset_params("smoke")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        hvae = HVAE(params.generator.arch)
        predictor = Predictor(params.predictors.evaluation.arch)
    scm = AttributeSCM(SCMConfig(steps=40, lr=3e-2, seed=0))
    scm.fit(load_split(data_root, "train", params.generator.arch.resolution).parents)
    dirs = {"generator": out / "generator", "scm": out / "scm", "predictor": out / "predictor"}
    for key, model in (("generator", hvae), ("scm", scm), ("predictor", predictor)):
        save_model(model, dirs[key])
    return dirs


@pytest.fixture(scope="module")
def models(tiny_data, tmp_path_factory):
    return _export_models(tiny_data, tmp_path_factory.mktemp("endpoint_models"))


@pytest.fixture(scope="module")
def regressor(tiny_data, tmp_path_factory):
    from training.evidence import train_evidence

    out = tmp_path_factory.mktemp("evidence") / "regressor"
    train_evidence(tiny_data, out, resolution=16, width=4, steps=40, batch_size=32, validate_images=48)
    return out


def test_evidence_regressor_is_checked_on_true_counterfactuals(regressor, models, tiny_data):
    import torch

    from cxrcf.data import load_split
    from cxrcf.evidence_model import EvidenceRegressor
    from cxrcf.synth import EVIDENCE_OF, load_evidence

    model = EvidenceRegressor.load(regressor)
    report = json.loads((regressor / "validation.json").read_text())
    val = report["true_counterfactuals"]
    from cxrcf.data import split_frame

    assert val["n_images"] == min(48, len(split_frame(tiny_data, "val"))) and isinstance(val["passed"], bool)
    assert val["passed"] == all(r["passed"] for rows in val["interventions"].values() for r in rows.values())
    for k in ("sex", "finding", "race"):
        rows = val["interventions"][f"do({k})"]
        for t, row in rows.items():
            if t in EVIDENCE_OF[k]:
                assert row["role"] == "intervened"
            else:  # the simulator keeps it exactly; only the regressor's reading can move
                assert row["role"] == "kept" and row["true_change"] == 0.0
    assert val["interventions"]["do(sex)"]["breast_amp"]["true_change"] != 0.0
    # Predictions come back in simulator units: the standardisation is undone with the training stats.
    x = load_split(tiny_data, "train", 32).x[:8]
    pred = model.predict(x)
    assert set(pred) == set(model.targets) and pred["eff_max"].shape == (8,)
    ev = load_evidence(tiny_data)
    assert abs(float(model.mean[0]) - ev["eff_max"].mean()) < 0.02
    assert torch.isfinite(torch.stack(list(pred.values()))).all()
    with pytest.raises(CxrcfError, match="expected an evidence_regressor"):
        EvidenceRegressor.load(models["predictor"])


PARAMS = preset_params("smoke", evaluate={"max_images": 24, "batch_size": 12, "extra_t_u": (),
                                         "reversibility_images": 4},
                       study={"slacks": (0.02,), "seeds": (0,)})


def test_reference_and_measure_on_real_models(tiny_data, models, tmp_path):
    from cxrcf.data import split_frame
    from cxrcf.synth import ambiguity_strata, counterfactual_attributes

    ref = E.reference(PARAMS, tiny_data, models["scm"], models["predictor"], models["generator"],
                      tmp_path / "ref.npz")
    n = len(ref["ids"])
    assert n == 24
    # Directions name where each image goes: a flip of sex goes to the other sex.
    sex = ref["parent/sex"].astype(int)
    assert list(ref["direction/sex"]) == [f"sex={1 - s}" for s in sex]
    assert set(ref["direction/age"]) <= {"age=older", "age=younger"}
    # Strata come from the simulator's noise of exactly these images.
    frame = split_frame(tiny_data, "test").set_index("id").loc[list(ref["ids"])].reset_index()
    cols = {k: frame[k].to_numpy() for k in frame.columns}
    expected = ambiguity_strata(counterfactual_attributes(cols, {}), cols)
    for j in E.SCORED:
        assert list(ref[f"stratum/{j}"]) == list(expected[j]["stratum"])
    meas = E.measure(PARAMS, ref, tiny_data, models["generator"], models["predictor"], tmp_path / "m.npz")
    again = E.measure(PARAMS, ref, tiny_data, models["generator"], models["predictor"], tmp_path / "m2.npz")
    for key in meas:
        assert np.array_equal(meas[key], again[key]), key  # seeded abduction: the same numbers
    tab = E.table(ref, meas)
    assert set(tab) == {E.pair_key(j, k) for j, k in E.pairs()}
    row = tab["finding|do(sex)"]
    assert row["all"]["n"] == n == row["ambiguous"]["n"] + row["clear"]["n"]
    assert set(row["all"]["directions"]) == {"sex=0", "sex=1"}
    # A is the unweighted mean of the two directions, whatever their counts.
    assert row["all"]["A"] == pytest.approx(np.mean([v["mean"] for v in row["all"]["directions"].values()]))
    # Saved files are reused, not recomputed (a resumed study).
    stamp = (tmp_path / "m.npz").stat().st_mtime_ns
    E.measure(PARAMS, ref, tiny_data, models["generator"], models["predictor"], tmp_path / "m.npz")
    assert (tmp_path / "m.npz").stat().st_mtime_ns == stamp
    with pytest.raises(CxrcfError, match="measured without an evidence regressor"):
        E.measure(PARAMS, ref, tiny_data, models["generator"], models["predictor"], tmp_path / "m.npz",
                  regressor_dir=tmp_path / "any-regressor")
    bad = dict(ref, resolution=np.asarray(16))
    with pytest.raises(CxrcfError, match="resolution 32 differs"):
        E.measure(PARAMS, bad, tiny_data, models["generator"], models["predictor"], tmp_path / "m3.npz")


def test_analysis_picks_matched_points_and_writes_the_verdict_files(tmp_path):
    ref, none, cells = hand_made_measurements()
    an = S.endpoint_analysis(ref, none, cells, generator_check=True)
    v = an["verdict"]
    # In the simulator's units: hard added 3% of lung height of effusion on ambiguous images, soft none.
    ev = an["evidence"]
    assert ev["evidence"] == "eff_max" and ev["agree"] and v["regressors_agree"] is True
    assert ev["hard_minus_none"]["mean"] == pytest.approx(0.03, abs=0.002)
    assert ev["soft_minus_none"]["mean"] == pytest.approx(0.0, abs=0.002)
    assert (v["matched"]["hard"], v["matched"]["soft"]) == ("hard-slack0.02", "soft-slack0.02")
    assert v["hard_minus_none"] == pytest.approx(0.5, abs=0.05)  # (0.8 + 0.2) / 2 in the ambiguous stratum
    assert v["ratio"] == pytest.approx(0.1, abs=0.05) and v["verdict"] == "reproduced"
    # The table has every pair x stratum for every generator, with both directions.
    gens = {r["generator"] for r in an["table"]}
    assert gens == {"none", "hard-slack0.02", "soft-slack0.02", "hard-slack0.05", "soft-slack0.05"}
    assert len(an["table"]) == len(gens) * len(E.pairs()) * len(E.STRATA)
    row = next(r for r in an["table"] if r["generator"] == "hard-slack0.02" and r["pair"] == "finding|do(sex)"
               and r["stratum"] == "ambiguous")
    assert row["directions"]["sex=1"] - row["directions"]["sex=0"] == pytest.approx(0.6, abs=0.05)
    # A soft model that keeps the predictor's log-odds but erases the painted effusion (the regressor
    # sees 2% of lung height less than no-CFT): the regressors disagree, so no reproduction.
    ref_e, none_e, cells_e = hand_made_measurements(soft_evidence=-0.02)
    erased = S.endpoint_analysis(ref_e, none_e, cells_e, generator_check=True)
    assert not erased["evidence"]["agree"] and erased["verdict"]["verdict"] == "inconclusive"
    # An unvalidated regressor cannot vouch for soft either.
    unvalidated = S.endpoint_analysis(dict(ref, regressor_passed=np.asarray(0)), none, cells, generator_check=True)
    assert unvalidated["verdict"]["verdict"] == "inconclusive"
    # Without the generator check the same numbers give no verdict.
    assert S.endpoint_analysis(ref, none, cells, generator_check=None)["verdict"]["verdict"] == "no verdict"
    study = S.write_outputs(tmp_path, {"none": {"amplification": 0.1, "effectiveness": 0.6, "stderr": 0.01},
                                       "true_effectiveness": 0.85, "curve": [], "claims": {}, "endpoint": an})
    verdict = json.loads((tmp_path / "verdict.json").read_text())
    assert verdict["verdict"] == "reproduced" and set(verdict["preconditions"]) == {
        "generator_check", "hard_amplifies", "matched_checkpoints"}
    assert verdict["first_look"] is False and len(verdict["ratio_ci95"]) == 2
    flat = json.loads((tmp_path / "metrics.json").read_text())
    assert all(v is None or isinstance(v, (int, float)) for v in flat.values())  # one level, numbers
    assert flat["verdict_code"] == S.VERDICT_CODES["reproduced"] and flat == S.flat_metrics(study)
    assert (tmp_path / "endpoint_curve.png").stat().st_size > 1000


def test_resumed_study_writes_verdict_and_logs_it(tiny_data, models, regressor, tmp_path, mlflow_uri):
    """CFT runs already trained (here: copies of the pretrained model) are only evaluated; with one
    seed the verdict is "no verdict" (a first look), and it lands in MLflow."""
    from mlflow.tracking import MlflowClient

    out = tmp_path / "study"
    for mode in S.MODES:
        for seed in PARAMS.study.seeds:
            shutil.copytree(models["generator"], out / "runs" / S.run_name(mode, 0.02, seed) / "model")
    study = S.run_study(PARAMS, tiny_data, models["generator"], None, models["scm"], models["predictor"], out,
                        generator_check=True, regressor_dir=regressor)
    ev = study["endpoint"]["evidence"]
    assert ev["evidence"] == "eff_max" and set(ev["vs_truth"]) == {"none", "hard-slack0.02", "soft-slack0.02"}
    assert ev["hard_minus_none"]["mean"] == pytest.approx(0.0)  # hard is the pretrained model here
    verdict = json.loads((out / "verdict.json").read_text())
    assert verdict["verdict"] == "no verdict" and verdict["first_look"] is True
    assert not verdict["preconditions"]["hard_amplifies"]["passed"]
    # Hard and soft are the same model, so their paired differences to none are the same numbers.
    assert verdict["hard_minus_none"] == pytest.approx(verdict["soft_minus_none"])
    assert study["endpoint"]["verdict"]["verdict"] == "no verdict"
    assert (out / "reference.npz").is_file() and (out / "runs" / "soft-slack0.02-seed0" / "endpoint.npz").is_file()
    client = MlflowClient(mlflow_uri)
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])
            if r.data.tags.get("verdict")]
    assert runs and runs[0].data.tags["verdict"] == "no verdict"
    assert runs[0].data.metrics["study/verdict_code"] == 0
    flat = json.loads((out / "metrics.json").read_text())
    assert flat["seeds"] == 1 and not math.isnan(flat["primary_true_auc"])
