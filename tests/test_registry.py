"""The model registry on a temporary SQLite store: packaging, lineage, gates, promotion, rollback,
racing promotions (two real processes) and the errors users meet."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import tiny_bundle

from cxrcf import cli
from cxrcf.config import preset_params
from cxrcf.errors import CxrcfError
from pipelines import registry

REPO = Path(__file__).resolve().parents[1]


def evaluation(sex_auc=0.9, race_auc=0.8, finding_auc=0.85, age_mae=9.0, worst=0.5) -> dict:
    """An evaluation JSON shaped like `cxrcf evaluate` output (issue 5 keys)."""
    return {
        "effectiveness": {
            "sex": {"acc": 0.8, "auc": sex_auc, "real": {"acc": 0.9, "auc": 0.95}, "delta_real": {"acc": -0.1, "auc": -0.05}},
            "race": {"acc": 0.7, "auc": race_auc},
            "finding": {"acc": 0.8, "auc": finding_auc},
            "age": {"mae": age_mae},
        },
        "effectiveness_mean_auc": (sex_auc + race_auc + finding_auc) / 3,
        "amplification": {"mean": 0.2, "stderr": 0.05, "worst": worst, "worst_pair": "finding|do(sex)",
                          "pairs": {"finding|do(sex)": {"mean": worst, "drift": 0.1, "subgroups": {"no_finding": {"mean": 0.4}}}}},
        "drift": {"mean": 0.05, "worst": 0.1},
        "composition_l1": 0.01,
        "reversibility_l1": 0.02,
        "ground_truth": {"cf_l1": 0.1, "amplification": {"mean": 0.1, "worst": 0.3}},
    }


def make_parts(root: Path) -> SimpleNamespace:
    """Exported generator/SCM/predictor directories, an evaluation JSON, a figure and params.yaml."""
    from PIL import Image

    from cxrcf.export import save_model
    from cxrcf.predictor import Predictor

    bundle = tiny_bundle(0)
    save_model(bundle.hvae, root / "generator")
    save_model(bundle.scm, root / "scm")
    save_model(bundle.predictor, root / "evaluation")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        save_model(Predictor(preset_params("smoke").predictors.guidance.arch), root / "guidance")
    (root / "generator" / "run.json").write_text(json.dumps({"run_id": "run-generator-1", "metrics": {}}))
    (root / "guidance" / "run.json").write_text(json.dumps({"run_id": "run-guidance-1", "metrics": {}}))
    (root / "eval.json").write_text(json.dumps(evaluation()))
    (root / "figures").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "figures" / "scatter_do_sex.png")
    (root / "params.yaml").write_text("preset: smoke\n")
    return SimpleNamespace(root=root, params_file=str(root / "params.yaml"), params=preset_params("smoke"))


def checkpoint_bundle(root: Path):
    """The generator as trained (the export directories), for comparison with what the registry serves."""
    from cxrcf.bundle import GeneratorBundle
    from cxrcf.export import load_model

    return GeneratorBundle(load_model(root / "generator"), load_model(root / "scm"), load_model(root / "evaluation"))


def sample_inputs():
    """Three factual images with parents (labels) and two interventions."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(3, 32, 32), dtype=np.uint8)
    x = torch.from_numpy(images).float().div(127.5).sub(1).unsqueeze(1)
    rows = [{"sex": "male", "race": "white", "age": 40.0, "finding": "no_finding"},
            {"sex": "female", "race": "black", "age": 70.0, "finding": "pleural_effusion"},
            {"sex": "male", "race": "asian", "age": 55.0, "finding": "no_finding"}]
    return images, x, rows, [{"sex": "female"}, {"age": 85.0}]


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    return make_parts(tmp_path_factory.mktemp("registry"))


@pytest.fixture(scope="module")
def registered(parts, mlflow_uri):
    """One generator registered through the CLI (the slow part: three models logged from code)."""
    name = f"gen-{uuid.uuid4().hex[:8]}"
    out = parts.root / "registered.json"
    r = parts.root
    rc = cli.main(["registry", "register", "--params", parts.params_file, "--name", name, "--mode", "soft",
                   "--generator", str(r / "generator"), "--scm", str(r / "scm"), "--predictor", str(r / "evaluation"),
                   "--guidance", str(r / "guidance"), "--eval", str(r / "eval.json"), "--figures", str(r / "figures"),
                   "--out", str(out)])
    assert rc == 0
    return json.loads(out.read_text())


def client():
    return registry.connect()


def new_model_from(registered, n_versions: list[dict]) -> str:
    """A fresh registered model whose versions share the registered artifacts but carry other
    metrics (what a retrained generator would record); cheap, since nothing is logged again."""
    mlc = client()
    base = mlc.get_model_version(registered["name"], registered["version"])
    name = f"gen-{uuid.uuid4().hex[:8]}"
    mlc.create_registered_model(name)
    for metrics in n_versions:
        tags = {k: v for k, v in base.tags.items() if not k.startswith(registry.EVAL_PREFIX)}
        tags.update({f"{registry.EVAL_PREFIX}{k}": repr(v) for k, v in registry.flat_metrics(metrics).items()
                     if registry.HEADLINE.match(k)})
        mlc.create_model_version(name, source=base.source, run_id=base.run_id, tags=tags,
                                 model_id=base.source.removeprefix("models:/"))
    return name


def promote_cli(parts, name, *extra) -> int:
    return cli.main(["registry", "promote", "--params", parts.params_file, "--name", name, *extra])


# ------------------------------------------------------------------------------------ pure logic
def test_gates_floors_ceilings_and_regression():
    gates = preset_params("smoke").registry.gates  # auc floors 0.7/0.6/0.7, mae 25, amp 1.0, tol 0.02
    m = registry.flat_metrics(evaluation(sex_auc=0.7, race_auc=0.6, finding_auc=0.7, age_mae=25.0, worst=1.0))
    results = registry.check_gates(m, gates)
    assert [g.name for g in results] == ["min_auc.finding", "min_auc.race", "min_auc.sex", "max_age_mae",
                                         "max_amplification"]
    assert all(g.passed for g in results), "values exactly at the limits pass"

    bad = registry.check_gates(registry.flat_metrics(evaluation(race_auc=0.59, worst=1.01)), gates)
    assert {g.name for g in bad if not g.passed} == {"min_auc.race", "max_amplification"}
    missing = dict(m)
    del missing["effectiveness.age.mae"]
    assert [g.name for g in registry.check_gates(missing, gates) if not g.passed] == ["max_age_mae"]

    champion = registry.flat_metrics(evaluation(sex_auc=0.95, worst=0.3))
    worse = registry.check_gates(registry.flat_metrics(evaluation(sex_auc=0.92, worst=0.33)), gates, champion)
    failed = {g.name: g for g in worse if not g.passed}
    assert set(failed) == {"regression.sex.auc", "regression.amplification.worst"}
    assert failed["regression.sex.auc"].limit == pytest.approx(0.93)
    within = registry.check_gates(registry.flat_metrics(evaluation(sex_auc=0.935, worst=0.315)), gates, champion)
    assert all(g.passed for g in within)
    reason = registry.gates_reason(worse, "4")
    assert "regression.sex.auc" in reason and "vs champion version 4" in reason and "\n" not in reason


def test_parse_ref_forms_and_errors():
    assert registry.parse_ref("models:/gen@champion") == ("gen", None, "champion")
    assert registry.parse_ref("gen/12") == ("gen", "12", None)
    assert registry.parse_ref("candidate", default_name="g") == ("g", None, "candidate")
    assert registry.parse_ref("3", default_name="g") == ("g", "3", None)
    for bad in ("gen/x", "gen@", "justaname"):
        with pytest.raises(CxrcfError, match="expected NAME@ALIAS|not a number"):
            registry.parse_ref(bad)


def test_headline_metric_keys_are_valid_tag_names():
    flat = registry.flat_metrics(evaluation())
    assert flat["amplification.pairs.finding_do_sex.mean"] == 0.5
    assert "amplification.worst_pair" not in flat  # strings are not metrics
    assert "amplification.pairs.finding_do_sex.subgroups.no_finding.mean" in flat
    assert not registry.HEADLINE.match("amplification.pairs.finding_do_sex.subgroups.no_finding.mean")


# ------------------------------------------------------------------------------- registration
def test_register_records_lineage_metrics_card_and_candidate(registered, parts):
    mlc = client()
    name, version = registered["name"], registered["version"]
    assert registered["model_uri"] == f"models:/{name}/{version}"
    mv = mlc.get_model_version(name, version)
    tags = mv.tags
    assert tags["cft_mode"] == "soft" and tags["preset"] == "smoke" and tags["cxrcf.kind"] == "generator"
    assert tags["lineage.generator_run_id"] == "run-generator-1"
    assert tags["lineage.guidance_predictor_run_id"] == "run-guidance-1"
    assert "lineage.scm_run_id" not in tags  # no run.json there: nothing invented
    assert len(tags["git_commit"]) == 40 and "data_hash" in tags
    assert tags["registration_run_id"] == registered["run_id"] == mv.run_id
    assert float(tags["eval.effectiveness.sex.auc"]) == 0.9
    assert float(tags["eval.amplification.worst"]) == 0.5
    assert float(tags["eval.ground_truth.cf_l1"]) == 0.1
    assert registry.resolve_alias(name, "candidate") == version
    assert "## Effectiveness" in mv.description and "| sex | 0.800 | 0.900 |" in mv.description

    arts = {a.path for a in mlc.list_artifacts(registered["run_id"])}
    assert {"model_card.md", "evaluation.json", "figures"} <= arts
    card = Path(mlc.download_artifacts(registered["run_id"], "model_card.md", str(parts.root / "dl"))).read_text()
    assert "![scatter_do_sex.png](figures/scatter_do_sex.png)" in card and "max_amplification" in card

    for role, reg in registered["predictors"].items():
        pv = mlc.get_model_version(reg["name"], reg["version"])
        assert pv.tags["cxrcf.kind"] == role and pv.tags["used_by"] == f"{name}/{version}"
    assert mlc.get_model_version(registered["predictors"]["guidance_predictor"]["name"],
                                 registered["predictors"]["guidance_predictor"]["version"]
                                 ).tags["lineage.training_run_id"] == "run-guidance-1"


def test_saved_model_directory_holds_no_pickle(registered, parts):
    import mlflow
    import yaml

    local = Path(mlflow.artifacts.download_artifacts(f"models:/{registered['name']}/{registered['version']}",
                                                     dst_path=str(parts.root / "nopickle")))
    files = [p for p in local.rglob("*") if p.is_file()]
    assert files
    names = [p.name.lower() for p in files]
    assert not [n for n in names if n.endswith((".pkl", ".pickle", ".joblib", ".pt", ".pth", ".pyc"))], names
    assert "python_model.pkl" not in names
    flavor = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]
    assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    assert flavor["model_code_path"].endswith("pyfunc_model.py") and "python_model" not in flavor
    weights = sorted(p.relative_to(local).as_posix() for p in (local / flavor["artifacts"]["bundle"]["path"]).rglob("*")
                     if p.is_file())
    assert weights == ["artifacts/bundle/bundle.json", "artifacts/bundle/hvae/config.json",
                       "artifacts/bundle/hvae/model.safetensors", "artifacts/bundle/predictor/config.json",
                       "artifacts/bundle/predictor/model.safetensors", "artifacts/bundle/scm/config.json",
                       "artifacts/bundle/scm/model.safetensors"]


def test_promoted_champion_loads_and_matches_the_checkpoint(registered, parts):
    import mlflow

    from pipelines.pyfunc_model import decode_png, encode_png, to_uint8

    out = parts.root / "promotion.json"
    assert promote_cli(parts, registered["name"], "--out", str(out)) == 0
    decision = json.loads(out.read_text())
    assert decision["decision"] == "promoted" and decision["champion_version"] == registered["version"]
    assert decision["previous_champion"] is None and len(decision["gates"]) == 5

    checkpoint = checkpoint_bundle(parts.root)
    bundle, info = registry.load_bundle(f"models:/{registered['name']}@champion")
    assert info["version"] == registered["version"] and info["alias"] == "champion" and info["mode"] == "soft"
    assert info["metrics"]["effectiveness.sex.auc"] == 0.9

    from cxrcf.bundle import parents_from_labels

    images, x, rows, interventions = sample_inputs()
    expected = checkpoint.counterfactuals(x, parents_from_labels(rows), interventions, t_u=1.0, seed=3)
    got = bundle.counterfactuals(x, parents_from_labels(rows), interventions, t_u=1.0, seed=3)
    for e, g in zip(expected, got):
        assert torch.equal(e, g)
    assert not torch.equal(expected[0], expected[1])

    import pandas as pd

    frame = pd.DataFrame([{**row, "image": encode_png(img), "interventions": json.dumps(interventions),
                           "t_u": 1.0, "seed": 3} for row, img in zip(rows, images)])
    pred = mlflow.pyfunc.load_model(f"models:/{registered['name']}@champion").predict(frame)
    assert list(pred.columns) == ["counterfactuals", "probabilities"] and len(pred) == 3
    for k in range(len(interventions)):
        want = to_uint8(expected[k])
        probs = checkpoint.probabilities(expected[k])
        for i in range(3):
            np.testing.assert_array_equal(decode_png(json.loads(pred["counterfactuals"][i])[k]), want[i])
            p = json.loads(pred["probabilities"][i])[k]
            assert p["sex"] == pytest.approx(float(probs["sex"][i]), abs=1e-6)
            assert p["race"]["black"] == pytest.approx(float(probs["race"][i, 2]), abs=1e-6)


def test_gate_breaking_version_is_refused_and_champion_untouched(registered, parts, capsys):
    mlc = client()
    name = new_model_from(registered, [evaluation(), evaluation(worst=3.0), evaluation(sex_auc=0.85)])
    assert promote_cli(parts, name, "--version", "1") == 0
    capsys.readouterr()

    assert promote_cli(parts, name, "--version", "2") == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "refused" in err and "max_amplification" in err
    tags = mlc.get_model_version(name, "2").tags
    assert tags["promotion.decision"] == "refused"
    assert tags["promotion.gate.max_amplification"].startswith("FAIL: amplification.worst = 3")
    assert tags["promotion.gate.min_auc.sex"].startswith("pass")
    assert tags["promotion.champion_at_check"] == "1" and tags["promotion.checked_at"]
    assert registry.resolve_alias(name, "champion") == "1"

    # Above every floor, but worse than the champion beyond the tolerance: also refused.
    out = parts.root / "refused.json"
    assert promote_cli(parts, name, "--version", "3", "--no-fail", "--out", str(out)) == 0
    decision = json.loads(out.read_text())
    assert decision["decision"] == "refused" and "regression.sex.auc" in decision["reason"]
    assert decision["champion_version"] == "1"
    assert registry.resolve_alias(name, "champion") == "1"
    with pytest.raises(CxrcfError, match="previous-champion"):
        registry.resolve_alias(name, "previous-champion")


def test_rollback_walks_back_the_promotion_chain(registered, parts):
    mlc = client()
    name = new_model_from(registered, [evaluation()] * 3)
    for v in ("1", "2", "3"):
        assert registry.promote(parts.params, name=name, version=v).decision == "promoted"
    assert registry.promote(parts.params, name=name, version="3").decision == "unchanged"
    assert (registry.resolve_alias(name, "champion"), registry.resolve_alias(name, "previous-champion")) == ("3", "2")

    assert cli.main(["registry", "rollback", "--params", parts.params_file, "--name", name]) == 0
    assert (registry.resolve_alias(name, "champion"), registry.resolve_alias(name, "previous-champion")) == ("2", "1")
    assert mlc.get_model_version(name, "3").tags["rollback.replaced_by"] == "2"
    assert mlc.get_model_version(name, "2").tags["rollback.replaced_version"] == "3"

    out = registry.rollback(parts.params, name=name)
    assert out["champion_version"] == "1" and out["previous_champion"] is None
    assert registry._aliases(mlc, name).get("previous-champion") is None
    with pytest.raises(CxrcfError, match="no 'previous-champion' alias"):
        registry.rollback(parts.params, name=name)
    assert registry.resolve_alias(name, "champion") == "1"


def test_two_racing_promotions_end_in_one_consistent_champion(registered, parts, mlflow_uri):
    """Two real processes promote different versions at once; the lock serialises them, so the
    second compares against the first, and the aliases agree with the recorded decisions."""
    mlc = client()
    name = new_model_from(registered, [evaluation()] * 3)
    assert registry.promote(parts.params, name=name, version="1").decision == "promoted"
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri, "PYTHONPATH": str(REPO)}
    logs = [parts.root / f"race-{v}.log" for v in ("2", "3")]
    procs = []
    # Hold the lock while both start, so that both are certainly contending when it is released.
    with registry.promotion_lock(name), contextlib.ExitStack() as files:
        for v, log in zip(("2", "3"), logs):
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "cxrcf.cli", "registry", "promote", "--params", parts.params_file,
                 "--name", name, "--version", v], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                stderr=files.enter_context(open(log, "w"))))
        deadline = time.monotonic() + 120
        while not all(log.exists() and "waiting for the promotion lock" in log.read_text() for log in logs):
            assert all(p.poll() is None for p in procs), [log.read_text() for log in logs]
            assert time.monotonic() < deadline, "the promotions never reached the lock"
            time.sleep(0.1)
    for p, log in zip(procs, logs):
        assert p.wait(timeout=120) == 0, log.read_text()

    tags = {v: mlc.get_model_version(name, v).tags for v in ("2", "3")}
    assert all(t["promotion.decision"] == "promoted" for t in tags.values())
    first, last = sorted(tags, key=lambda v: tags[v]["promotion.checked_at"])
    assert registry.resolve_alias(name, "champion") == last
    assert registry.resolve_alias(name, "previous-champion") == first
    assert tags[last]["promotion.previous_champion"] == first == tags[last]["promotion.champion_at_check"]
    assert tags[first]["promotion.previous_champion"] == "1"
    assert all(float(t["promotion.waited_s"]) >= 0.05 for t in tags.values())


# -------------------------------------------------------------------------------- list / show
def test_list_and_show(registered, parts, capsys):
    name = registered["name"]
    rows = registry.list_versions(name)
    assert rows[0]["version"] == registered["version"] and rows[0]["mode"] == "soft"
    assert rows[0]["AUC sex"] == 0.9 and "champion" in rows[0]["aliases"].split(",")
    assert cli.main(["registry", "list", "--params", parts.params_file, "--name", name]) == 0
    text = capsys.readouterr().out
    assert "AMP worst" in text and "candidate,champion" in text and "0.500" in text
    assert cli.main(["registry", "show", f"{name}@champion", "--params", parts.params_file]) == 0
    text = capsys.readouterr().out
    assert f"{name} version {registered['version']}" in text and "promotion.decision" in text
    assert "eval.effectiveness.sex.auc" in text


# -------------------------------------------------------------------------------------- errors
def test_clear_errors_for_missing_models_aliases_versions(registered):
    name = registered["name"]
    with pytest.raises(CxrcfError, match="'no-such-model': not registered"):
        registry.resolve_alias("no-such-model", "champion")
    with pytest.raises(CxrcfError, match="no version has alias 'staging'"):
        registry.resolve_alias(name, "staging")
    with pytest.raises(CxrcfError, match="no version '99'"):
        registry.load_bundle(f"models:/{name}/99")
    with pytest.raises(CxrcfError, match="no such bundle directory"):
        registry.load_bundle("/nonexistent/bundle")


def test_unreachable_tracking_server_fails_fast(parts, mlflow_uri, monkeypatch, capsys):
    import mlflow

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    start = time.monotonic()
    try:
        assert cli.main(["registry", "list", "--params", parts.params_file]) == 1
    finally:
        mlflow.set_tracking_uri(mlflow_uri)
        mlflow.set_registry_uri(mlflow_uri)
    assert time.monotonic() - start < 10
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and f"127.0.0.1:{port}" in err and "unreachable" in err
