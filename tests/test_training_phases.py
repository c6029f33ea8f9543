"""Every training phase on the smoke preset with 2 CPU workers (gloo), run once in sequence
(predictors, scm through the CLI, generator, hard and soft CFT) and then inspected: exported model
directories, run.json, metrics JSON and the MLflow runs with params, per-step metrics and artifacts."""

import json

import pytest
import torch

from cxrcf.config import preset_params
from cxrcf.errors import CxrcfError
from cxrcf.export import load_model
from store.lineage import dataset_hash

EXPERIMENT = "test-training-phases"


@pytest.fixture(scope="module")
def trained(ray_cluster, mlflow_uri, tiny_data, tmp_path_factory):
    from training.cft import train_cft
    from training.cli import main as train_cli
    from training.generator import train_generator
    from training.predictors import train_predictors

    root = tmp_path_factory.mktemp("phases")
    params = preset_params("smoke", ray={"num_workers": 2, "storage_path": str(root / "ray")},
                           mlflow={"experiment": EXPERIMENT})
    params_file = root / "params.yaml"
    params_file.write_text(f"preset: smoke\nmlflow:\n  experiment: {EXPERIMENT}\n")
    models, metrics = root / "models", root / "metrics"
    out = {"predictors": train_predictors(params, tiny_data, models / "guidance", models / "evaluation",
                                          metrics_file=metrics / "predictors.json")}
    assert train_cli(["scm", "--params", str(params_file), "--data", str(tiny_data), "--out", str(models / "scm"),
                      "--metrics", str(metrics / "scm.json")]) == 0
    out["scm"] = {"run_id": json.loads((models / "scm" / "run.json").read_text())["run_id"]}
    out["generator"] = train_generator(params, tiny_data, models / "generator", metrics_file=metrics / "generator.json")
    for mode, slack, seed in (("hard", None, None), ("soft", 0.05, 3)):
        out[f"cft_{mode}"] = train_cft(params, tiny_data, models / "generator", models / "guidance", models / "scm",
                                       models / f"cft_{mode}", mode, slack=slack, seed=seed,
                                       metrics_file=metrics / f"cft_{mode}.json")
    return params, models, metrics, out


def _client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def _artifacts(client, run_id, path=None):
    return {a.path for a in client.list_artifacts(run_id, path)}


def test_predictors(trained, mlflow_uri):
    params, models, metrics, out = trained
    guidance, evaluation = load_model(models / "guidance"), load_model(models / "evaluation")
    assert guidance.arch == params.predictors.guidance.arch and evaluation.arch == params.predictors.evaluation.arch
    run = json.loads((models / "guidance" / "run.json").read_text())
    assert run["run_id"] == out["predictors"]["run_id"]
    for key in ("sex_auc", "finding_auc", "sex_acc", "finding_acc", "race_acc", "age_mae"):
        assert f"val_{key}" in run["metrics"]
    assert run["metrics"]["steps"] == 30
    summary = json.loads((metrics / "predictors.json").read_text())
    assert summary["run_id"] == run["run_id"]
    assert 0 <= summary["guidance_val_sex_acc"] <= 1 and summary["evaluation_val_age_mae"] >= 0
    client = _client(mlflow_uri)
    r = client.get_run(run["run_id"])
    assert r.data.tags["phase"] == "predictors" and r.info.status == "FINISHED"
    assert r.data.params["predictors.evaluation.optim.seed"] == "2"
    assert len(client.get_metric_history(run["run_id"], "guidance/loss")) == 30
    assert len(client.get_metric_history(run["run_id"], "evaluation/loss")) == 30
    assert "guidance/val_sex_auc" in r.data.metrics
    assert {"model/guidance", "model/evaluation"} <= _artifacts(client, run["run_id"], "model")


def test_scm_via_cli(trained, mlflow_uri):
    params, models, metrics, out = trained
    scm = load_model(models / "scm")
    assert type(scm).__name__ == "AttributeSCM"
    m = json.loads((metrics / "scm.json").read_text())
    assert m["run_id"] == out["scm"]["run_id"] and m["val_nll"] > 0
    client = _client(mlflow_uri)
    assert len(client.get_metric_history(m["run_id"], "nll")) == params.scm.steps
    assert client.get_run(m["run_id"]).data.metrics["val_nll"] == m["val_nll"]
    assert client.get_run(m["run_id"]).data.tags["phase"] == "scm"


def test_generator_records_eps_and_sample_grid(trained, mlflow_uri, tiny_data):
    _, models, metrics, _ = trained
    run = json.loads((models / "generator" / "run.json").read_text())
    eps = run["metrics"]["eps"]
    assert eps == run["metrics"]["train_loss"] and 0 < eps < 20
    assert json.loads((metrics / "generator.json").read_text())["eps"] == eps
    hvae = load_model(models / "generator")
    assert type(hvae).__name__ == "HVAE"
    # eps as the reference defines it: the exported model's training-set loss (nll + beta * kl per pixel)
    from training.generator import training_set_elbo

    params = trained[0]
    again = training_set_elbo(hvae, tiny_data, hvae.arch.resolution, params.generator.beta)
    assert again["train_loss"] == pytest.approx(eps, rel=1e-4)
    client = _client(mlflow_uri)
    rid = run["run_id"]
    history = client.get_metric_history(rid, "loss")
    assert [m.step for m in history] == list(range(1, 31))
    for key in ("nll", "kl", "lr", "val_loss", "images_per_s"):
        assert client.get_metric_history(rid, key), key
    assert "samples/samples.png" in _artifacts(client, rid, "samples")
    assert "model/model.safetensors" in _artifacts(client, rid, "model")
    grid = client.download_artifacts(rid, "samples/samples.png")
    from PIL import Image

    assert Image.open(grid).size[0] > 6 * 32  # six columns: factual, recon, four interventions


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_cft(trained, mlflow_uri, tiny_data, mode):
    params, models, _, _ = trained
    run = json.loads((models / f"cft_{mode}" / "run.json").read_text())
    gen_eps = json.loads((models / "generator" / "run.json").read_text())["metrics"]["eps"]
    slack = 0.05 if mode == "soft" else params.cft.slack
    assert run["metrics"]["eps"] == pytest.approx(gen_eps + slack)
    tuned, pretrained = load_model(models / f"cft_{mode}"), load_model(models / "generator")
    moved = [not torch.equal(a, b) for a, b in zip(tuned.state_dict().values(), pretrained.state_dict().values())]
    assert any(moved)  # fine-tuning changed the HVAE
    client = _client(mlflow_uri)
    rid = run["run_id"]
    r = client.get_run(rid)
    assert r.data.tags["phase"] == f"cft_{mode}" and r.data.params["cft.mode"] == mode
    # lineage: the runs it started from, and the hash of the data it read (tiny_data: no data.dvc pins it)
    for role, folder in (("pretraining", "generator"), ("guidance_predictor", "guidance"), ("scm", "scm")):
        want = json.loads((models / folder / "run.json").read_text())["run_id"]
        assert r.data.tags[f"lineage.parent.{role}_run_id"] == want, role
    assert r.data.tags["data_hash"] == dataset_hash(tiny_data) and r.data.tags["data_hash_pinned"] == ""
    assert r.data.tags["git_dirty"] in ("true", "false", "")
    steps = params.cft.optim.steps
    for key in ("loss", "aux", "aux_sex", "aux_race", "aux_finding", "aux_age", "F", "lam"):
        assert len(client.get_metric_history(rid, key)) == steps, key
    lam = [m.value for m in client.get_metric_history(rid, "lam")]
    assert all(v >= 0 for v in lam)
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


def test_soft_and_hard_runs_differ_and_seed_is_recorded(trained, mlflow_uri):
    params, _, _, out = trained
    client = _client(mlflow_uri)
    soft = client.get_run(out["cft_soft"]["run_id"]).data.params
    hard = client.get_run(out["cft_hard"]["run_id"]).data.params
    assert soft["cft.seed_used"] == "3" and hard["cft.seed_used"] == str(params.cft.optim.seed)


def test_cft_input_errors_name_the_problem(trained, tmp_path):
    from training.cft import train_cft

    params, models, _, _ = trained
    with pytest.raises(CxrcfError, match="--mode"):
        train_cft(params, "data", models / "generator", models / "guidance", models / "scm", tmp_path, "medium")
    with pytest.raises(CxrcfError, match="expected HVAE"):
        train_cft(params, "data", models / "scm", models / "guidance", models / "scm", tmp_path, "hard")
