"""The report (markdown + self-contained HTML + MLflow run) and the study's aggregation and resume."""

from __future__ import annotations

import json
import shutil

import pytest
from endpoint_fixtures import write_study_measurements
from helpers import occlusion_evaluator

from cxrcf.config import preset_params
from pipelines.occlusion import analyse
from pipelines.study import VERDICT_CODES


@pytest.fixture(scope="module")
def eval_dir(tiny_data, tmp_path_factory):
    """none / hard / soft evaluations of three differently seeded untrained generators."""
    from test_evaluate import build_models

    from pipelines.evaluate import evaluate_generator

    root = tmp_path_factory.mktemp("report")
    params = preset_params("smoke", evaluate={"max_images": 16})
    out = root / "eval"
    for seed, mode in enumerate(("none", "hard", "soft")):
        m = build_models(tiny_data, root / f"models_{mode}", seed=seed)
        evaluate_generator(params, tiny_data, m["generator"], m["scm"], m["predictor"], mode,
                           out / f"{mode}.json", out / "figures" / mode)
    return out


def _evals(eval_dir):
    return {m: json.loads((eval_dir / f"{m}.json").read_text()) for m in ("none", "hard", "soft")}


@pytest.fixture(scope="module")
def study_dir(eval_dir, tmp_path_factory):
    """A finished sweep on disk: the study's layout with evaluation JSONs in place of trained runs."""
    from pipelines.study import run_name

    params = preset_params("smoke")
    out = tmp_path_factory.mktemp("study")
    (out / "none").mkdir()
    shutil.copy(eval_dir / "none.json", out / "none" / "eval.json")
    for mode in ("hard", "soft"):
        for slack in params.study.slacks:
            for seed in params.study.seeds:
                run = out / "runs" / run_name(mode, slack, seed)
                run.mkdir(parents=True)
                shutil.copy(eval_dir / f"{mode}.json", run / "eval.json")
    write_study_measurements(out, params.study.slacks, params.study.seeds)
    return out


def test_study_resumes_from_existing_results_and_draws_the_curve(study_dir):
    from pipelines.study import run_study

    params = preset_params("smoke")
    # Every result exists, so nothing is trained: model paths that do not exist are never touched.
    study = run_study(params, "no-data", "no-generator", "no-guidance", "no-scm", "no-predictor", study_dir,
                      log_mlflow=False)
    assert (study_dir / "study_curve.png").read_bytes()[:4] == b"\x89PNG"
    on_disk = json.loads((study_dir / "study.json").read_text())
    assert on_disk == study
    assert len(study["runs"]) == 2 * len(params.study.slacks) * len(params.study.seeds)
    assert {(c["mode"], c["slack"]) for c in study["curve"]} == {
        (m, s) for m in ("hard", "soft") for s in params.study.slacks}
    hard_eval = json.loads((study_dir / "runs" / "hard-slack0-seed0" / "eval.json").read_text())
    none_eval = json.loads((study_dir / "none" / "eval.json").read_text())
    hard0 = next(c for c in study["curve"] if c["mode"] == "hard" and c["slack"] == 0.0)
    assert hard0["amplification"] == pytest.approx(hard_eval["amplification"]["mean"])
    assert hard0["effectiveness"] == pytest.approx(hard_eval["effectiveness_mean_auc"])
    assert set(study["claims"]) == {f"{s:g}" for s in params.study.slacks}
    assert study["true_effectiveness"] == pytest.approx(none_eval["ground_truth"]["effectiveness_mean_auc"])


def test_study_aggregates_seeds_with_their_spread(eval_dir):
    from pipelines.study import aggregate, summarise_eval

    evals = _evals(eval_dir)
    runs = [{"mode": "hard", "slack": 0.0, "seed": s, "summary": summarise_eval(evals[m])}
            for s, m in enumerate(("hard", "soft"))]
    cell = aggregate(evals["none"], runs)["curve"][0]
    a, b = evals["hard"]["amplification"]["mean"], evals["soft"]["amplification"]["mean"]
    assert cell["amplification"] == pytest.approx((a + b) / 2)
    # The stderr includes the seed-to-seed spread: at least |a - b| / 2.
    assert cell["stderr"] >= abs(a - b) / 2 - 1e-12


def test_report_markdown_html_and_mlflow_run(eval_dir, study_dir, tmp_path, mlflow_uri):
    from mlflow.tracking import MlflowClient

    from pipelines.report import write_report

    params = preset_params("smoke", mlflow={"experiment": "test-report"})
    ev = occlusion_evaluator()
    occlusion = {"rows": [analyse(ev, ev.x.clone(), "identity-generator")]}
    (study_dir / "occlusion.json").write_text(json.dumps(occlusion))
    out = tmp_path / "report"
    res = write_report(params, eval_dir, out, study_dir, metrics_path=tmp_path / "metrics.json")
    md = (out / "report.md").read_text()
    evals = _evals(eval_dir)
    for heading in ("## Effectiveness", "## Amplification", "## Composition, reversibility and ground truth",
                    "## Strength sweep", "## Verdict at the pipeline's strength", "## Other values of t_u",
                    "## Where sex evidence goes under do(finding)", "## Primary endpoint and pre-registered verdict",
                    "## Every pair, direction and stratum"):
        assert heading in md
    # The smoke sweep has one seed: the report says it is a first look, and gives the verdict word.
    verdict = json.loads((study_dir / "verdict.json").read_text())
    assert "**First look, not the verdict**" in md and f"Verdict: **{verdict['verdict']}**" in md
    assert "| hard-slack0.05 | finding\\|do(sex) | ambiguous |" in md
    assert "figures/endpoint_curve.png" in md
    assert "| AMP(j \\| do k) | none | hard | soft | soft / hard |" in md
    assert "finding\\|do(sex)" in md
    assert "| identity-generator | " in md and "split at row 4 of 8" in md
    # The soft/hard ratio of the mean row is the ratio of the two JSONs' means (or '-' if hard <= 0).
    h, s = evals["hard"]["amplification"]["mean"], evals["soft"]["amplification"]["mean"]
    mean_row = next(line for line in md.splitlines() if line.startswith("| **mean over pairs**"))
    assert mean_row.rstrip(" |").endswith(f"{s / h:.2f}" if h > 0 else "-")
    assert f"{evals['none']['effectiveness']['sex']['auc']:.3f}" in md
    for rel in ("amplification_bars.png", "figures/none/grid.png", "figures/soft/scatter_do_sex.png",
                "figures/study_curve.png"):
        assert f"]({rel})" in md and (out / rel).is_file()
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == md.count("![")
    assert 'src="figures' not in page and "<table>" in page
    run = MlflowClient(mlflow_uri).get_run(res["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "report"
    assert run.data.metrics["report/hard_amplification_mean"] == pytest.approx(h)
    # The flat metrics file: one level of numbers (what `dvc metrics show` lists as columns).
    flat = json.loads((tmp_path / "metrics.json").read_text())
    assert flat["hard_amplification_mean"] == pytest.approx(h) and "study_verdict_code" in flat
    assert all(v is None or isinstance(v, (int, float)) for v in flat.values()) and len(flat) < 40
    assert run.data.metrics["report/study_verdict_code"] == VERDICT_CODES[verdict["verdict"]]
    arts = {a.path for a in MlflowClient(mlflow_uri).list_artifacts(res["run_id"], "report")}
    assert {"report/report.md", "report/report.html"} <= arts


def test_report_needs_an_evaluation(tmp_path):
    from cxrcf.errors import CxrcfError
    from pipelines.report import main

    with pytest.raises(CxrcfError, match="no none.json"):
        main(["--eval-dir", str(tmp_path), "--out", str(tmp_path / "r"), "--no-mlflow"])
