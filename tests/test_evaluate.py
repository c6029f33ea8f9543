"""evaluate_generator end to end on the tiny SynthCXR data with small untrained models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cxrcf.config import preset_params
from cxrcf.errors import CxrcfError

PAIRS = {"race|do(sex)", "finding|do(sex)", "sex|do(race)", "finding|do(race)", "sex|do(finding)",
         "race|do(finding)", "sex|do(age)", "race|do(age)"}


def build_models(data_root, out: Path, seed: int = 0) -> dict[str, Path]:
    """Smoke-preset HVAE and evaluation predictor (seeded, untrained) and an SCM fitted briefly on the
    training split, exported to `out/{generator,scm,predictor}`."""
    import torch

    from cxrcf.config import SCMConfig
    from cxrcf.data import load_split
    from cxrcf.export import save_model
    from cxrcf.hvae import HVAE
    from cxrcf.predictor import Predictor
    from cxrcf.scm import AttributeSCM

    params = preset_params("smoke")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        hvae = HVAE(params.generator.arch)
        predictor = Predictor(params.predictors.evaluation.arch)
    scm = AttributeSCM(SCMConfig(steps=60, lr=3e-2, seed=seed))
    scm.fit(load_split(data_root, "train", params.generator.arch.resolution).parents)
    dirs = {"generator": out / "generator", "scm": out / "scm", "predictor": out / "predictor"}
    save_model(hvae, dirs["generator"])
    save_model(scm, dirs["scm"])
    save_model(predictor, dirs["predictor"])
    return dirs


@pytest.fixture(scope="module")
def models(tiny_data, tmp_path_factory):
    return build_models(tiny_data, tmp_path_factory.mktemp("eval_models"))


@pytest.fixture(scope="module")
def evaluated(tiny_data, models, tmp_path_factory, mlflow_uri):
    from mlflow.tracking import MlflowClient

    from pipelines.evaluate import evaluate_generator

    # The generator's training run, as a training phase would leave it in run.json.
    client = MlflowClient(mlflow_uri)
    exp = client.create_experiment("test-evaluate")
    run_id = client.create_run(exp).info.run_id
    (models["generator"] / "run.json").write_text(json.dumps({"run_id": run_id, "metrics": {}}))
    out = tmp_path_factory.mktemp("eval_out")
    params = preset_params("smoke", evaluate={"max_images": 24})
    result = evaluate_generator(params, tiny_data, models["generator"], models["scm"], models["predictor"],
                                "none", out / "none.json", out / "figures")
    return {"result": result, "out": out, "run_id": run_id, "client": client}


def test_json_has_the_stable_keys(evaluated):
    res = evaluated["result"]
    on_disk = json.loads((evaluated["out"] / "none.json").read_text())
    assert on_disk == json.loads(json.dumps(res))
    for k in ("sex", "race", "finding"):
        eff = res["effectiveness"][k]
        assert set(eff) >= {"acc", "auc", "delta_real", "real"}
        assert 0.0 <= eff["acc"] <= 1.0
        assert eff["auc"] is None or 0.0 <= eff["auc"] <= 1.0
        assert eff["delta_real"]["acc"] == pytest.approx(eff["acc"] - eff["real"]["acc"])
    assert res["effectiveness"]["age"]["mae"] >= 0.0
    amp = res["amplification"]
    assert set(amp["pairs"]) == PAIRS
    assert amp["worst"] == max(p["mean"] for p in amp["pairs"].values())
    assert amp["pairs"][amp["worst_pair"]]["mean"] == amp["worst"]
    assert amp["mean"] == pytest.approx(sum(p["mean"] for p in amp["pairs"].values()) / len(PAIRS))
    assert amp["stderr"] >= 0.0
    assert set(amp["pairs"]["finding|do(sex)"]["subgroups"]) == {"no_finding", "pleural_effusion"}
    assert set(amp["pairs"]["race|do(age)"]["subgroups"]) == {"white", "asian", "black"}
    n_groups = sum(g["n"] for g in amp["pairs"]["race|do(sex)"]["subgroups"].values())
    assert n_groups == res["n_images"] == 24  # a seeded subset of the 40 test images
    assert 0.0 <= res["drift"]["mean"] <= 1.0
    assert res["t_u"] == 1.0
    assert set(res["extra_t_u"]) == {"0.1"}
    gt = res["ground_truth"]
    assert gt["cf_l1"] > 0.0 and gt["amplification"]["mean"] is not None
    assert set(gt["effectiveness"]) == {"sex", "race", "finding", "age"}


def test_l1_ratios_by_direction_and_over_the_images_whose_truth_x_determines(evaluated):
    gt = evaluated["result"]["ground_truth"]
    ratio, ident, by_dir = gt["l1_ratio_per_intervention"], gt["l1_ratio_identifiable"], gt["l1_ratio_by_direction"]
    assert set(by_dir) == {"sex", "finding"} and all(set(v) == {"0to1", "1to0"} for v in by_dir.values())
    # do(finding) is gated on removals only; every other intervention on all images
    assert ident["finding"] == pytest.approx(by_dir["finding"]["1to0"])
    assert all(ident[k] == pytest.approx(ratio[k]) for k in ("sex", "race", "age"))
    # pooled = both directions weighted by their share of x's own L1 to the truth
    assert min(by_dir["sex"].values()) - 1e-9 <= ratio["sex"] <= max(by_dir["sex"].values()) + 1e-9
    # the ideal model draws the effusion it cannot see: farther than x when adding one
    assert gt["ideal_l1_ratio"]["finding"]["0to1"] > 1.0


def test_null_intervention_is_identity_at_t_u_one(evaluated):
    res = evaluated["result"]
    assert res["composition_l1"] < 1e-4
    for j, block in res["amplification"]["null"].items():
        assert abs(block["mean"]) < 1e-3, j
        assert block["drift"] < 1e-3, j
    # The simulator's null counterfactual is the factual image, so it is also close to the truth.
    assert res["ground_truth"]["cf_l1_per_intervention"]["null"] < 1e-4
    # An untrained generator's real interventions do change the image (the metrics are not all zero).
    assert res["reversibility_l1"] > 0.0


def test_smaller_t_u_moves_even_the_null_counterfactual(evaluated):
    res = evaluated["result"]
    extra = res["extra_t_u"]["0.1"]
    assert extra["composition_l1"] > 100 * max(res["composition_l1"], 1e-6)
    assert set(extra["amplification"]["pairs"]) == PAIRS


def test_figures_are_png(evaluated):
    figs = evaluated["out"] / "figures"
    names = sorted(p.name for p in figs.glob("*.png"))
    assert names == ["grid.png", "scatter_do_age.png", "scatter_do_finding.png", "scatter_do_race.png",
                     "scatter_do_sex.png"]
    for p in figs.glob("*.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 2000


def test_metrics_and_artifacts_logged_to_the_generator_run(evaluated):
    run = evaluated["client"].get_run(evaluated["run_id"])
    metrics = run.data.metrics
    assert metrics["eval/amplification/mean"] == pytest.approx(evaluated["result"]["amplification"]["mean"])
    assert "eval/amplification/pairs/finding_do_sex/mean" in metrics
    assert "eval/ground_truth/cf_l1" in metrics
    arts = {a.path for a in evaluated["client"].list_artifacts(evaluated["run_id"], "eval")}
    assert "eval/none.json" in arts and "eval/figures" in arts


def test_subset_is_seeded_and_deterministic(tiny_data, models, tmp_path):
    from pipelines.evaluate import evaluate_generator

    params = preset_params("smoke", evaluate={"max_images": 8, "extra_t_u": [], "reversibility_images": 3})
    a = evaluate_generator(params, tiny_data, models["generator"], models["scm"], models["predictor"], "a",
                           tmp_path / "a.json")
    b = evaluate_generator(params, tiny_data, models["generator"], models["scm"], models["predictor"], "b",
                           tmp_path / "b.json")
    assert a["n_images"] == 8 and a["extra_t_u"] == {} and a["reversibility_images"] == 3
    assert a["amplification"] == b["amplification"]
    assert a["ground_truth"]["cf_l1"] == b["ground_truth"]["cf_l1"]


def test_cli_and_user_errors(tiny_data, models, tmp_path):
    from pipelines.evaluate import main

    params_file = tmp_path / "params.yaml"
    params_file.write_text("preset: smoke\nevaluate:\n  max_images: 8\n  extra_t_u: []\n")
    out = tmp_path / "cli.json"
    rc = main(["--params", str(params_file), "--data", str(tiny_data), "--generator", str(models["generator"]),
               "--scm", str(models["scm"]), "--predictor", str(models["predictor"]), "--name", "cli",
               "--out", str(out)])
    assert rc == 0 and json.loads(out.read_text())["n_images"] == 8
    with pytest.raises(CxrcfError, match="--generator .* holds a predictor model"):
        main(["--params", str(params_file), "--data", str(tiny_data), "--generator", str(models["predictor"]),
              "--scm", str(models["scm"]), "--predictor", str(models["predictor"]), "--name", "x",
              "--out", str(tmp_path / "x.json")])
    with pytest.raises(CxrcfError, match="--scm"):
        main(["--params", str(params_file), "--data", str(tiny_data), "--generator", str(models["generator"]),
              "--predictor", str(models["predictor"]), "--name", "x", "--out", str(tmp_path / "x.json")])
    assert not (tmp_path / "x.json").exists()


def test_shared_abduction_matches_counterfactual(models):
    import torch

    from cxrcf.counterfactual import counterfactual, counterfactuals_shared
    from cxrcf.export import load_model

    hvae = load_model(models["generator"])
    g = torch.Generator().manual_seed(3)
    x = torch.rand(5, 1, 32, 32, generator=g) * 2 - 1
    ctx, ctx_a, ctx_b = (torch.rand(5, 6, generator=g) for _ in range(3))
    with torch.no_grad():
        shared = counterfactuals_shared(hvae, x, ctx, [ctx_a, ctx_b], (1.0, 0.1),
                                        generator=torch.Generator().manual_seed(7))
        for i, c in enumerate((ctx_a, ctx_b)):
            for j, t in enumerate((1.0, 0.1)):
                one = counterfactual(hvae, x, ctx, c, t_u=t, generator=torch.Generator().manual_seed(7))
                torch.testing.assert_close(shared[i][j], one)
