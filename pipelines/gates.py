"""Promotion gates: what a candidate must measure, alone and against the champion, to be promoted.

`check_gates` compares evaluation metrics (the `eval.*` tags, see `store.models.flat_metrics`) with
`params.registry.gates`; `run_metrics` cross-checks those tags against the metrics logged to the
version's run, so an edited tag cannot promote a model.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass

from store.models import EVAL_PREFIX, version_metrics


@dataclass(frozen=True)
class Gate:
    name: str
    metric: str
    op: str  # ">=" or "<=": what the value must satisfy against the limit
    limit: float
    value: float | None
    verdict: bool | None = None  # MLflow's own verdict, for the gates its validation API can judge

    @property
    def passed(self) -> bool:
        if self.value is None or not math.isfinite(self.value):
            return False
        if self.verdict is not None:
            return self.verdict
        return self.value >= self.limit if self.op == ">=" else self.value <= self.limit

    def describe(self) -> str:
        shown = "missing" if self.value is None else f"{self.value:.4g}"
        return f"{'pass' if self.passed else 'FAIL'}: {self.metric} = {shown}, must be {self.op} {self.limit:.4g}"

    def to_json(self) -> dict:
        return {"name": self.name, "metric": self.metric, "op": self.op, "limit": self.limit,
                "value": self.value, "passed": self.passed, "judge": "mlflow" if self.verdict is not None else "cxrcf"}


AUC_ATTRIBUTES = ("sex", "race", "finding")


def _mlflow_threshold(metric: str, op: str, limit: float, value: float | None) -> bool:
    """MLflow's `validate_evaluation_results` verdict for one absolute threshold.

    Regression against the champion stays with cxrcf: `MetricThreshold.min_absolute_change` must be
    positive (the candidate must *beat* the baseline by it), whereas the gate allows a candidate to be
    worse by at most `regression_tolerance`.
    """
    import mlflow
    from mlflow.models import MetricThreshold
    from mlflow.models.evaluation import EvaluationResult
    from mlflow.models.evaluation.validation import ModelValidationFailedException

    # It logs every verdict at INFO through MLflow's own handler; the gate table already reports them.
    logging.getLogger("mlflow.models.evaluation.validation").setLevel(logging.WARNING)
    candidate = EvaluationResult(metrics={} if value is None else {metric: value}, artifacts={})
    try:
        mlflow.validate_evaluation_results(
            {metric: MetricThreshold(threshold=limit, greater_is_better=op == ">=")}, candidate)
    except ModelValidationFailedException:
        return False
    return True


def check_gates(metrics: Mapping[str, float], gates, champion: Mapping[str, float] | None = None) -> list[Gate]:
    """The promotion gates of `params.registry.gates` for a candidate's metrics.

    Absolute floors and ceilings are judged by MLflow's `validate_evaluation_results`; regression
    gates compare against the current champion's metrics within `regression_tolerance` (cxrcf's own
    layer); a metric the champion never recorded cannot regress and is skipped.
    """
    plain = [(f"min_auc.{a}", f"effectiveness.{a}.auc", ">=", floor) for a, floor in sorted(gates.min_auc.items())]
    plain.append(("max_age_mae", "effectiveness.age.mae", "<=", gates.max_age_mae))
    plain.append(("max_amplification", "amplification.worst", "<=", gates.max_amplification))
    out = [Gate(name, metric, op, limit, metrics.get(metric),
                _mlflow_threshold(metric, op, limit, metrics.get(metric)))
           for name, metric, op, limit in plain]
    if gates.generator_check:
        out += generator_check_gates(metrics)
    if champion is not None:
        tol = gates.regression_tolerance
        for a in AUC_ATTRIBUTES:
            key = f"effectiveness.{a}.auc"
            if key in champion:
                out.append(Gate(f"regression.{a}.auc", key, ">=", champion[key] - tol, metrics.get(key)))
        key = "amplification.worst"
        if key in champion:
            out.append(Gate("regression.amplification.worst", key, "<=", champion[key] + tol, metrics.get(key)))
    return out


def generator_check_gates(metrics: Mapping[str, float]) -> list[Gate]:
    """One gate per check of the evaluation's generator check (pipelines/generator_check.py), each named
    for its check; an evaluation without the check is one failed gate, since nothing says the model is
    a counterfactual model at all."""
    prefix = "generator_check.passed_checks."
    flags = {k: v for k, v in metrics.items() if k.startswith(prefix)}
    if not flags:
        return [Gate("generator_check", prefix + "*", ">=", 1.0, None)]
    return [Gate(f"generator_check.{k[len(prefix):]}", k, ">=", 1.0, v) for k, v in sorted(flags.items())]


def gates_reason(results: list[Gate], champion_version: str | None) -> str:
    failed = [g for g in results if not g.passed]
    against = f" (vs champion version {champion_version})" if champion_version else ""
    if not failed:
        return f"all {len(results)} gates pass{against}"
    return "; ".join(f"{g.name} {g.describe()[6:]}" for g in failed) + against


def run_metrics(client, version) -> tuple[dict[str, float], list[str]]:
    """(the evaluation metrics logged to the version's run, disagreements with its `eval.*` tags).

    The run's metrics are what `register` logged from the evaluation JSON; tags can be edited by
    anyone with write access, so a tag that differs from the run, or names a metric the run never
    logged, is a disagreement that refuses promotion.
    """
    from mlflow.exceptions import MlflowException

    if not version.run_id:
        return {}, [f"version {version.version} has no source run: its evaluation metrics cannot be checked"]
    try:
        logged = dict(client.get_run(version.run_id).data.metrics)
    except MlflowException as err:
        return {}, [(f"run {version.run_id} of version {version.version} cannot be read "
                    f"({str(err).splitlines()[0][:200]})")]
    if not logged:
        return {}, [f"run {version.run_id} of version {version.version} logged no evaluation metrics"]
    problems = []
    for key, tagged in sorted(version_metrics(version).items()):
        have = logged.get(key)
        if have is None:
            problems.append(f"tag {EVAL_PREFIX}{key} = {tagged:.6g} but run {version.run_id} logged no {key}")
        elif not math.isclose(have, tagged, rel_tol=1e-9, abs_tol=1e-12):
            problems.append(f"tag {EVAL_PREFIX}{key} = {tagged:.6g} disagrees with run {version.run_id}'s "
                            f"logged {key} = {have:.6g}")
    return logged, problems
