"""The DVC pipeline end to end on the `smoke` preset, in a temporary git repo.

One `dvc repro` from data to champion, then:
- every training phase it ran, inspected (predictors, SCM, generator, hard and soft CFT): exported
  model folders, run.json, metrics JSON and the MLflow runs with params, per-step metrics, lineage and
  artifacts. The phases are checked on the pipeline's own runs: training them a second time for a
  separate test cost ~2 minutes of the suite's 15;
- DVC's view of what is up to date: a second repro reruns nothing, and a parameter read by one stage
  reruns exactly that stage.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import run_ok

from cxrcf.config import load_params, preset_params
from cxrcf.errors import CxrcfError
from cxrcf.export import load_model
from store.lineage import dataset_hash

BIN = Path(sys.executable).parent
SMOKE_PARAMS = {
    "preset": "smoke",
    "data": {"root": "data"},
    "ray": {"num_workers": 1, "use_gpu": False, "storage_path": "artifacts/ray"},
    "predictors": {},
    "scm": {"steps": 100},
    "generator": {"beta": 4.0},
    "cft": {"slack": 0.02, "damping": 10.0},
    "evaluate": {"t_u": 1.0},
    "registry": {
        "generator_name": "e2e-generator",
        "guidance_predictor_name": "e2e-guidance",
        "evaluation_predictor_name": "e2e-evaluation",
        "promote_mode": "soft",
        # Smoke models are barely trained: open gates so the run reaches a champion.
        "gates": {"min_auc": {"sex": 0.0, "race": 0.0, "finding": 0.0}, "max_age_mae": 120.0,
                  "max_amplification": 100.0},
    },
}
EXPECTED_STAGES = {
    "validate", "predictors", "scm", "generator", "cft@hard", "cft@soft", "evaluate@none",
    "evaluate@hard", "evaluate@soft", "report", "register", "promote",
}


def _stages_run(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")}


@pytest.fixture(scope="module")
def repo(pipeline_job):
    """(repo, env, output of the first `dvc repro`): the repository and repro of tests/background.py, started
    with the session on a Ray cluster of its own (as `make run` starts one) and run beside the other tests."""
    root, env, first = pipeline_job.result()
    # the session's smoke dataset is the one `cxrcf data synth --params params.yaml` writes for these params
    assert load_params(root / "params.yaml").data.synth == preset_params("smoke").data.synth
    return root, env, first


def test_first_repro_runs_every_stage_and_reaches_a_champion(repo):
    root, _, first = repo
    assert _stages_run(first) == EXPECTED_STAGES
    art = root / "artifacts"
    for model in ("guidance_predictor", "evaluation_predictor", "scm", "generator", "cft_hard", "cft_soft"):
        files = {p.name for p in (art / "models" / model).iterdir()}
        assert {"config.json", "model.safetensors", "run.json"} <= files, model
    eps = json.loads((art / "models" / "generator" / "run.json").read_text())["metrics"]["eps"]
    assert eps > 0
    for mode in ("none", "hard", "soft"):
        result = json.loads((art / "eval" / f"{mode}.json").read_text())
        for attr in ("sex", "race", "finding"):
            assert 0.0 <= result["effectiveness"][attr]["auc"] <= 1.0
        assert result["effectiveness"]["age"]["mae"] >= 0
        assert "finding|do(sex)" in result["amplification"]["pairs"]
        assert result["composition_l1"] < 0.05  # null intervention at t_u = 1 reproduces x
        assert result["ground_truth"]["cf_l1"] >= 0
        assert any((art / "eval" / "figures" / mode).glob("*.png"))
    assert "soft" in (art / "report" / "report.md").read_text()
    registered = json.loads((art / "registry" / "registered.json").read_text())
    promotion = json.loads((art / "registry" / "promotion.json").read_text())
    assert promotion["decision"] == "promoted"
    assert str(promotion["champion_version"]) == str(registered["version"])

    import mlflow

    store = f"sqlite:///{root}/mlruns.db"  # the embedded default the stages used
    client = mlflow.MlflowClient(tracking_uri=store, registry_uri=store)
    champion = client.get_model_version_by_alias("e2e-generator", "champion")
    assert str(champion.version) == str(registered["version"])
    assert champion.tags["cft_mode"] == "soft"
    assert client.get_registered_model("e2e-evaluation") is not None


def test_dvc_knows_what_is_up_to_date(repo):
    root, env, _ = repo
    dvc = str(BIN / "dvc")
    status = json.loads(run_ok([dvc, "status", "--json"], root, env))
    assert status == {}
    metrics = json.loads(run_ok([dvc, "metrics", "show", "--json"], root, env))
    assert metrics  # every declared metric file parses
    again = run_ok([dvc, "repro"], root, env)
    assert _stages_run(again) == set()

    params = yaml.safe_load((root / "params.yaml").read_text())
    # a gate is read by promote alone: DVC must rerun exactly that stage (the cheapest proof that params
    # are scoped per stage; a change read by evaluation reran six stages for ~70 s)
    params["registry"]["gates"]["max_age_mae"] = 119.0
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    rerun = run_ok([dvc, "repro"], root, env)
    assert _stages_run(rerun) == {"promote"}


# ---------------------------------------------------------------- the training phases the repro ran
@pytest.fixture(scope="module")
def phases(repo):
    """(params, models dir, metrics dir, MLflow client on the stages' store, data dir)."""
    from mlflow.tracking import MlflowClient

    root, _, _ = repo
    store = f"sqlite:///{root}/mlruns.db"
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    art = root / "artifacts"
    return load_params(root / "params.yaml"), art / "models", art / "metrics", client, root / "data"


def _run(models, folder: str) -> dict:
    return json.loads((models / folder / "run.json").read_text())


def _artifacts(client, run_id, path=None):
    return {a.path for a in client.list_artifacts(run_id, path)}


def test_predictors(phases):
    params, models, metrics, client, _ = phases
    guidance, evaluation = load_model(models / "guidance_predictor"), load_model(models / "evaluation_predictor")
    assert guidance.arch == params.predictors.guidance.arch and evaluation.arch == params.predictors.evaluation.arch
    run = _run(models, "guidance_predictor")
    assert _run(models, "evaluation_predictor")["run_id"] == run["run_id"]  # one run trains both
    for key in ("sex_auc", "finding_auc", "sex_acc", "finding_acc", "race_acc", "age_mae"):
        assert f"val_{key}" in run["metrics"]
    steps = params.predictors.guidance.optim.steps
    assert run["metrics"]["steps"] == steps
    summary = json.loads((metrics / "predictors.json").read_text())
    assert summary["run_id"] == run["run_id"]
    assert 0 <= summary["guidance_val_sex_acc"] <= 1 and summary["evaluation_val_age_mae"] >= 0
    r = client.get_run(run["run_id"])
    assert r.data.tags["phase"] == "predictors" and r.info.status == "FINISHED"
    assert r.data.params["predictors.evaluation.optim.seed"] == str(params.predictors.evaluation.optim.seed)
    assert len(client.get_metric_history(run["run_id"], "guidance/loss")) == steps
    assert len(client.get_metric_history(run["run_id"], "evaluation/loss")) == params.predictors.evaluation.optim.steps
    assert "guidance/val_sex_auc" in r.data.metrics
    assert {"model/guidance", "model/evaluation"} <= _artifacts(client, run["run_id"], "model")


def test_scm(phases):
    params, models, metrics, client, _ = phases
    assert type(load_model(models / "scm")).__name__ == "AttributeSCM"
    m = json.loads((metrics / "scm.json").read_text())
    assert m["run_id"] == _run(models, "scm")["run_id"] and m["val_nll"] > 0
    assert len(client.get_metric_history(m["run_id"], "nll")) == params.scm.steps
    assert client.get_run(m["run_id"]).data.metrics["val_nll"] == m["val_nll"]
    assert client.get_run(m["run_id"]).data.tags["phase"] == "scm"


def test_generator_records_eps_and_sample_grid(phases):
    params, models, metrics, client, data = phases
    run = _run(models, "generator")
    eps = run["metrics"]["eps"]
    assert eps == run["metrics"]["train_loss"] and 0 < eps < 20
    assert json.loads((metrics / "generator.json").read_text())["eps"] == eps
    hvae = load_model(models / "generator")
    assert type(hvae).__name__ == "HVAE"
    # eps as the reference defines it: the exported model's training-set loss (nll + beta * kl per pixel),
    # with seeded posterior draws: recomputed here, in another process, it is the same number
    from training.generator import training_set_elbo

    again = training_set_elbo(hvae, data, hvae.arch.resolution, params.generator.beta)
    assert again["train_loss"] == pytest.approx(eps, rel=1e-6)
    rid = run["run_id"]
    assert [m.step for m in client.get_metric_history(rid, "loss")] == list(range(1, params.generator.optim.steps + 1))
    for key in ("nll", "kl", "lr", "val_loss", "images_per_s"):
        assert client.get_metric_history(rid, key), key
    assert "samples/samples.png" in _artifacts(client, rid, "samples")
    assert "model/model.safetensors" in _artifacts(client, rid, "model")
    from PIL import Image

    grid = client.download_artifacts(rid, "samples/samples.png")
    assert Image.open(grid).size[0] > 6 * 32  # six columns: factual, recon, four interventions


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_cft(phases, mode):
    params, models, _, client, data = phases
    run = _run(models, f"cft_{mode}")
    gen_eps = _run(models, "generator")["metrics"]["eps"]
    assert run["metrics"]["eps"] == pytest.approx(gen_eps + params.cft.slack)
    tuned, pretrained = load_model(models / f"cft_{mode}"), load_model(models / "generator")
    moved = [not torch.equal(a, b) for a, b in zip(tuned.state_dict().values(), pretrained.state_dict().values())]
    assert any(moved)  # fine-tuning changed the HVAE
    rid = run["run_id"]
    r = client.get_run(rid)
    assert r.data.tags["phase"] == f"cft_{mode}" and r.data.params["cft.mode"] == mode
    assert r.data.params["cft.seed_used"] == str(params.cft.optim.seed)
    # lineage: the runs it started from, and the hash of the data it read, which data.dvc pins
    for role, folder in (("pretraining", "generator"), ("guidance_predictor", "guidance_predictor"),
                         ("scm", "scm")):
        assert r.data.tags[f"lineage.parent.{role}_run_id"] == _run(models, folder)["run_id"], role
    assert r.data.tags["data_hash"] == dataset_hash(data) == r.data.tags["data_hash_pinned"]
    assert r.data.tags["git_dirty"] in ("true", "false")
    steps = params.cft.optim.steps
    for key in ("loss", "aux", "aux_sex", "aux_race", "aux_finding", "aux_age", "F", "lam"):
        assert len(client.get_metric_history(rid, key)) == steps, key
    assert all(m.value >= 0 for m in client.get_metric_history(rid, "lam"))
    chosen = sum(sum(m.value for m in client.get_metric_history(rid, f"k_{k}"))
                 for k in ("race", "sex", "finding", "age"))
    assert chosen == steps  # exactly one parent intervened per step
    # the exported checkpoint was chosen by the slim evaluator against the truth's effectiveness
    m = run["metrics"]
    assert 0.0 <= m["target_auc_sex"] <= 1.0 and 0.0 <= m["target_auc_finding"] <= 1.0
    val_steps = [h.step for h in client.get_metric_history(rid, "val_selection")]
    assert val_steps and m["best_step"] in val_steps
    best = min(client.get_metric_history(rid, "val_selection"), key=lambda h: h.value)
    assert m["best_selection"] == pytest.approx(best.value)
    assert "samples/samples.png" in _artifacts(client, rid, "samples")


def test_cft_input_errors_name_the_problem(phases, tmp_path):
    from training.cft import train_cft

    params, models, _, _, _ = phases
    with pytest.raises(CxrcfError, match="--mode"):
        train_cft(params, "data", models / "generator", models / "guidance_predictor", models / "scm", tmp_path,
                  "medium")
    with pytest.raises(CxrcfError, match="expected HVAE"):
        train_cft(params, "data", models / "scm", models / "guidance_predictor", models / "scm", tmp_path, "hard")
    with pytest.raises(CxrcfError, match="--slack: -0.1: must be >= 0"):
        train_cft(params, "data", models / "generator", models / "guidance_predictor", models / "scm", tmp_path,
                  "soft", slack=-0.1)
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_a_study_point_overrides_slack_and_seed_only():
    from training.cft import with_overrides

    cft = preset_params("smoke").cft
    same, slack = with_overrides(cft)
    assert same == cft and slack == cft.slack
    moved, slack = with_overrides(cft, slack=0.05, seed=3)
    assert slack == 0.05 and moved.optim.seed == 3
    assert moved.model_copy(update={"optim": cft.optim}) == cft  # nothing else changed
