"""The DVC pipeline end to end on the `smoke` preset, in a temporary git repo.

One `dvc repro` from data to champion; then DVC's view of what is up to date: a second repro
reruns nothing, and changing one evaluation parameter reruns exactly the three evaluations and what
follows (not the training stages before them: they are what a re-evaluation must not pay for).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import yaml
from helpers import git_dvc_repo, run_ok

ROOT = Path(__file__).resolve().parents[1]
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
def repo(tmp_path_factory, ray_cluster):
    repo = tmp_path_factory.mktemp("pipeline") / "repo"
    repo.mkdir()
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    for pkg in ("cxrcf", "training", "pipelines", "serving"):
        shutil.copytree(ROOT / pkg, repo / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    (repo / "params.yaml").write_text(yaml.safe_dump(SMOKE_PARAMS, sort_keys=False))
    (repo / ".gitignore").write_text("/mlruns.db\n/mlartifacts/\n/artifacts/ray/\n__pycache__/\n")
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    env.pop("MLFLOW_TRACKING_URI", None)  # the embedded default: sqlite:///<repo>/mlruns.db
    env.pop("CXRCF_MLFLOW_ARTIFACTS", None)
    # Stages join the session's cluster instead of starting one each (and avoid two local clusters).
    env["RAY_ADDRESS"] = ray_cluster.get_runtime_context().gcs_address
    git_dvc_repo(repo, env)
    run_ok([str(BIN / "cxrcf"), "data", "synth", "--params", "params.yaml", "--out", "data"], repo, env)
    run_ok([str(BIN / "dvc"), "add", "-q", "data"], repo, env)
    run_ok(["git", "add", "-A"], repo, env)
    run_ok(["git", "commit", "-qm", "smoke pipeline"], repo, env)
    first = run_ok([str(BIN / "dvc"), "repro"], repo, env)
    return repo, env, first


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
