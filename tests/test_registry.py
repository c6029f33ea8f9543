"""The model registry on both stores (SQLite, and an `mlflow server` on PostgreSQL + S3): packaging,
lineage, gates, pinned and atomic promotion, the alias ledger, rollback, racing promotions (real
processes, one of them killed while holding the lock) and the errors users meet."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import closed_port_uri, tiny_bundle

from cxrcf import cli
from cxrcf.config import preset_params
from cxrcf.errors import CxrcfError
from pipelines import registry, registry_ledger
from store import models

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
def registered(parts, registry_backend):
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
    from mlflow.entities import Metric

    mlc = client()
    base = mlc.get_model_version(registered["name"], registered["version"])
    experiment = mlc.get_run(base.run_id).info.experiment_id
    name = f"gen-{uuid.uuid4().hex[:8]}"
    mlc.create_registered_model(name)
    for metrics in n_versions:
        flat = registry.flat_metrics(metrics)
        # Each version's own run logs its evaluation metrics, as `register` does: gates read them there.
        run = mlc.create_run(experiment, run_name=f"{name}-eval")
        mlc.log_batch(run.info.run_id, metrics=[Metric(k, v, 0, 0) for k, v in flat.items()])
        mlc.set_terminated(run.info.run_id)
        tags = {k: v for k, v in base.tags.items() if not k.startswith(registry.EVAL_PREFIX)}
        tags.update({f"{registry.EVAL_PREFIX}{k}": repr(v) for k, v in flat.items() if registry.HEADLINE.match(k)})
        mlc.create_model_version(name, source=base.source, run_id=run.info.run_id, tags=tags,
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
    assert models.parse_ref("models:/gen@champion") == ("gen", None, "champion")
    assert models.parse_ref("gen/12") == ("gen", "12", None)
    assert models.parse_ref("candidate", default_name="g") == ("g", None, "candidate")
    assert models.parse_ref("3", default_name="g") == ("g", "3", None)
    for bad in ("gen/x", "gen@", "justaname"):
        with pytest.raises(CxrcfError, match="expected NAME@ALIAS|not a number"):
            models.parse_ref(bad)


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
    assert len(tags["git_commit"]) == 40 and tags["git_dirty"] in ("true", "false")
    # run-generator-1 is not in this store, so the hash falls back to data.dvc, and says so.
    from cxrcf.data import dvc_data_hash

    assert tags["data_hash"] == dvc_data_hash(REPO / "data.dvc") and tags["data_hash_source"] == "data.dvc"
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

    from cxrcf.data import from_model_images as to_uint8
    from cxrcf.png import decode_png, encode_png

    out = parts.root / "promotion.json"
    assert promote_cli(parts, registered["name"], "--out", str(out)) == 0
    decision = json.loads(out.read_text())
    assert decision["decision"] == "promoted" and decision["champion_version"] == registered["version"]
    assert decision["previous_champion"] is None and len(decision["gates"]) == 5

    checkpoint = checkpoint_bundle(parts.root)
    bundle, info = models.load_bundle(f"models:/{registered['name']}@champion")
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
    assert registry.alias_map(mlc, name).get("previous-champion") is None
    with pytest.raises(CxrcfError, match="no 'previous-champion' alias"):
        registry.rollback(parts.params, name=name)
    assert registry.resolve_alias(name, "champion") == "1"


def test_rollback_to_an_earlier_champion_and_refusals(registered, parts, capsys):
    name = new_model_from(registered, [evaluation()] * 3)
    for v in ("1", "2", "3"):
        assert registry.promote(parts.params, name=name, version=v).decision == "promoted"
    assert cli.main(["registry", "rollback", "--params", parts.params_file, "--name", name, "--to", "1"]) == 0
    assert registry.resolve_alias(name, "champion") == "1"
    assert registry.alias_map(client(), name).get("previous-champion") is None
    capsys.readouterr()
    # 3 was rolled back past: it is no longer an earlier champion to return to.
    assert cli.main(["registry", "rollback", "--params", parts.params_file, "--name", name, "--to", "3"]) == 1
    assert "version 3 is not an earlier champion" in capsys.readouterr().err
    assert registry.promote(parts.params, name=name, version="2").decision == "promoted"
    assert registry.rollback(parts.params, name=name)["champion_version"] == "1"
    stack_moves = [(r["action"], r["version"], r["status"]) for r in registry_ledger.history(name)]
    assert stack_moves == [("promote", "1", "done"), ("promote", "2", "done"), ("promote", "3", "done"),
                           ("rollback", "1", "done"), ("promote", "2", "done"), ("rollback", "1", "done")]


# ------------------------------------------------------------------------ pinned and atomic promotion
def test_promote_from_the_register_output_is_pinned_to_that_registration(registered, parts, capsys):
    mlc = client()
    name = new_model_from(registered, [evaluation()] * 2)
    first = mlc.get_model_version(name, "1")
    mlc.set_registered_model_alias(name, "candidate", "2")  # another pipeline's candidate on a shared server
    pinned = parts.root / f"{name}-registered.json"
    pinned.write_text(json.dumps({"name": name, "version": "1", "run_id": first.run_id,
                                  "model_uri": f"models:/{name}/1"}))
    assert promote_cli(parts, name, "--from", str(pinned)) == 0
    assert registry.resolve_alias(name, "champion") == "1"

    capsys.readouterr()
    pinned.write_text(json.dumps({"name": name, "version": "2", "run_id": first.run_id}))
    assert promote_cli(parts, name, "--from", str(pinned)) == 1
    err = capsys.readouterr().err
    assert f"not from the registration run {first.run_id}" in err and len(err.strip().splitlines()) == 1
    pinned.write_text(json.dumps({"name": name, "run_id": first.run_id}))
    assert promote_cli(parts, name, "--from", str(pinned)) == 1
    assert "field 'version' is missing" in capsys.readouterr().err
    assert registry.resolve_alias(name, "champion") == "1"


def test_version_tags_that_disagree_with_the_run_refuse_promotion(registered, parts, capsys):
    mlc = client()
    name = new_model_from(registered, [evaluation(worst=3.0)])
    mlc.set_model_version_tag(name, "1", "eval.amplification.worst", "0.1")  # edited to pass the gate
    assert promote_cli(parts, name, "--version", "1") == 1
    err = capsys.readouterr().err
    assert "tag eval.amplification.worst = 0.1 disagrees with run" in err and "logged amplification.worst = 3" in err
    assert "champion" not in registry.alias_map(mlc, name)
    refused = registry_ledger.history(name)[-1]
    assert (refused["action"], refused["status"], refused["version"]) == ("promote", "refused", "1")
    assert "max_amplification=3 FAIL" in refused["gates"] and "disagrees" in refused["reason"]


# A promotion killed for real right after its first alias move (previous-champion set, champion not).
CRASH_AFTER_FIRST_ALIAS_MOVE = """
import os, signal, sys
from mlflow import MlflowClient
from cxrcf import cli
real = MlflowClient.set_registered_model_alias
def move_then_die(self, name, alias, version):
    real(self, name, alias, version)
    os.kill(os.getpid(), signal.SIGKILL)
MlflowClient.set_registered_model_alias = move_then_die
sys.exit(cli.main(sys.argv[1:]))
"""


def test_a_promotion_killed_between_alias_moves_is_completed_by_the_next_command(
        registered, parts, registry_backend, monkeypatch, capsys):
    # The dead holder's server lock ends soon; live holders heartbeat every 2 s even on a loaded machine.
    monkeypatch.setenv("CXRCF_REGISTRY_LOCK_STALE_S", "8")
    name = new_model_from(registered, [evaluation()] * 3)
    assert registry.promote(parts.params, name=name, version="1").decision == "promoted"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    crashed = subprocess.run([sys.executable, "-c", CRASH_AFTER_FIRST_ALIAS_MOVE, "registry", "promote", "--params",
                              parts.params_file, "--name", name, "--version", "2"], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=300, check=False)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]
    aliases = registry.alias_map(client(), name)
    assert aliases["champion"] == "1" and aliases["previous-champion"] == "1"  # the half-done state
    assert [r["status"] for r in registry_ledger.history(name)] == ["done", "PENDING"]

    assert cli.main(["registry", "promote", "--params", parts.params_file, "--name", name, "--version", "3"]) == 0
    out = capsys.readouterr().out
    assert "completed the interrupted alias move" in out
    aliases = registry.alias_map(client(), name)
    assert (aliases["champion"], aliases["previous-champion"]) == ("3", "2")
    rows = registry_ledger.history(name)
    assert [(r["version"], r["status"]) for r in rows] == [("1", "done"), ("2", "repaired"), ("3", "done")]
    assert client().get_model_version(name, "2").tags["promotion.decision"] == "promoted"
    assert "champion: 1 -> 2" in rows[1]["moves"] and "champion: 2 -> 3" in rows[2]["moves"]


# Takes the promotion lock, says so, and waits to be killed: a holder that dies without releasing.
STALE_HOLDER = """
import sys, time
from pipelines import registry_lock
with registry_lock.promotion_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


def test_three_racing_promoters_and_a_stale_holder_end_in_one_consistent_chain(
        registered, parts, registry_backend, capsys):
    """Three real processes promote versions 2, 3 and 4 while a fourth holds the lock and is killed.
    The lock serialises them: each promotion's intent is followed by its own completion, each saw the
    champion the previous one set, and on the server exactly one waiter broke the dead holder's epoch."""
    name = new_model_from(registered, [evaluation()] * 4)
    assert registry.promote(parts.params, name=name, version="1").decision == "promoted"
    env = {**os.environ, "PYTHONPATH": str(REPO), "CXRCF_REGISTRY_LOCK_STALE_S": "8",
           "CXRCF_REGISTRY_LOCK_WAIT_S": "900"}  # three promotions in a row on a loaded 2-core machine
    holder = subprocess.Popen([sys.executable, "-c", STALE_HOLDER, name], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        logs = [parts.root / f"race-{name}-{v}.log" for v in ("2", "3", "4")]
        with contextlib.ExitStack() as files:
            procs = [subprocess.Popen([sys.executable, "-m", "cxrcf.cli", "registry", "promote", "--params",
                                       parts.params_file, "--name", name, "--version", v], cwd=REPO, env=env,
                                      stdout=subprocess.DEVNULL, stderr=files.enter_context(open(log, "w")))
                     for v, log in zip(("2", "3", "4"), logs)]
            deadline = time.monotonic() + 900  # four Python start-ups at once on a loaded 2-core machine
            while not all("waiting for the promotion lock" in log.read_text() for log in logs):
                assert all(p.poll() is None for p in procs), [log.read_text() for log in logs]
                assert time.monotonic() < deadline, "the promotions never reached the lock"
                time.sleep(0.1)
            released = time.monotonic()
            holder.kill()
            for p, log in zip(procs, logs):
                assert p.wait(timeout=900) == 0, log.read_text()
            spread = time.monotonic() - released
    finally:
        holder.kill()
        holder.wait()

    entries = registry_ledger.ledger(name).entries()
    intents = [e for e in entries if e["type"] == "intent"]
    assert intents[0]["version"] == "1" and sorted(e["version"] for e in intents[1:]) == ["2", "3", "4"]
    by_seq = {e["seq"]: e for e in entries}
    for e in intents:
        follower = by_seq[e["seq"] + 1]
        assert (follower["type"], follower["op"]) == ("complete", e["seq"]), "promotions interleaved"
    for before, after in itertools.pairwise(intents):
        assert after["from"]["champion"] == before["version"]
    aliases = registry.alias_map(client(), name)
    assert (aliases["champion"], aliases["previous-champion"]) == (intents[-1]["version"], intents[-2]["version"])
    waited = sorted(float(client().get_model_version(name, v).tags["promotion.waited_s"]) for v in ("2", "3", "4"))
    if registry_backend["kind"] != "sqlite":
        locks = {k: v for k, v in registry_ledger.ledger(name).params().items() if k.startswith("lock.free.")}
        assert sum(v.startswith("broken-by") for v in locks.values()) == 1, locks
        assert sum("broke the promotion lock" in log.read_text() for log in logs) == 1
    with capsys.disabled():
        print(f"\n[race {registry_backend['kind']}] 3 promoters after a killed holder: done "
              f"{spread:.1f} s after the kill; waited_s {', '.join(f'{w:.1f}' for w in waited)}")


# -------------------------------------------------------------------------------- list / show
def test_a_replica_follows_a_promotion_and_restarts_from_its_local_copy_while_the_store_is_down(
        registered, parts, tmp_path, monkeypatch):
    """Serving's hot-reload path against this module's store: on PostgreSQL + S3 the replica resolves the
    alias through the server and downloads the new version's artifacts from S3 through it."""
    from cxrcf.config import ServeConfig
    from serving.app import ModelSlot, ModelSource

    name = new_model_from(registered, [evaluation()] * 2)
    assert registry.promote(parts.params, name=name, version="1").ok

    def replica():
        return ModelSlot(ModelSource(name=name, alias="champion"), ServeConfig(lkg_dir=str(tmp_path / "lkg")))

    live = replica()
    assert (live.state.version, live.state.source) == ("1", "registry")
    assert registry.promote(parts.params, name=name, version="2").ok
    live.check()  # one poll of the alias, as the replica's watcher does every reload_poll_s
    assert (live.state.version, live.reloads, live.alias_state().state) == ("2", 1, "current")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", closed_port_uri())
    restarted = replica()
    assert (restarted.state.version, restarted.state.source) == ("2", "last-known-good")


def test_list_and_show(registered, parts, capsys):
    name = registered["name"]
    rows = models.list_versions(name)
    assert rows[0]["version"] == registered["version"] and rows[0]["mode"] == "soft"
    assert rows[0]["AUC sex"] == 0.9 and "champion" in rows[0]["aliases"].split(",")
    assert cli.main(["registry", "list", "--params", parts.params_file, "--name", name]) == 0
    text = capsys.readouterr().out
    assert "AMP worst" in text and "candidate,champion" in text and "0.500" in text
    assert cli.main(["registry", "show", f"{name}@champion", "--params", parts.params_file]) == 0
    text = capsys.readouterr().out
    assert f"{name} version {registered['version']}" in text and "promotion.decision" in text
    assert "eval.effectiveness.sex.auc" in text

    # The ledger: the registration that set `candidate`, then the promotion with its gate values.
    assert cli.main(["registry", "history", name, "--params", parts.params_file]) == 0
    text = capsys.readouterr().out
    lines = [line for line in text.splitlines() if line[:1].isdigit()]
    assert "register" in lines[0] and f"candidate: - -> {registered['version']}" in lines[0]
    assert "promote" in lines[1] and f"champion: - -> {registered['version']}" in lines[1]
    assert "min_auc.sex=0.9" in lines[1] and "max_amplification=0.5" in lines[1] and "done" in lines[1]


# -------------------------------------------------------------------------------------- errors
def test_clear_errors_for_missing_models_aliases_versions(registered):
    name = registered["name"]
    with pytest.raises(CxrcfError, match="'no-such-model': not registered"):
        registry.resolve_alias("no-such-model", "champion")
    with pytest.raises(CxrcfError, match="no version has alias 'staging'"):
        registry.resolve_alias(name, "staging")
    with pytest.raises(CxrcfError, match="no version '99'"):
        models.load_bundle(f"models:/{name}/99")
    with pytest.raises(CxrcfError, match="no such bundle directory"):
        models.load_bundle("/nonexistent/bundle")


def test_unreachable_tracking_server_fails_fast(parts, registry_backend, monkeypatch, capsys):
    import mlflow

    down = closed_port_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", down)
    start = time.monotonic()
    try:
        assert cli.main(["registry", "list", "--params", parts.params_file]) == 1
    finally:
        mlflow.set_tracking_uri(registry_backend["uri"])
        mlflow.set_registry_uri(registry_backend["uri"])
    assert time.monotonic() - start < 10
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and down.removeprefix("http://") in err and "unreachable" in err
