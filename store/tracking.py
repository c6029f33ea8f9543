"""MLflow helpers: where runs live, and the one way every phase creates and fills its run.

The driver creates the run (params, tags) and hands its id to rank 0, which logs per-step metrics;
the driver logs the exported model and image grids when the phase ends. Everyone resolves the
tracking store through `tracking_uri()`.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from cxrcf.errors import CxrcfError

PARAM_BATCH = 100  # MLflow refuses more params than this in one log_batch call
METRIC_BATCH = 1000


def tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{Path.cwd().resolve() / 'mlruns.db'}"


def artifact_location() -> str:
    return os.environ.get("CXRCF_MLFLOW_ARTIFACTS") or str(Path.cwd().resolve() / "mlartifacts")


def git_commit(cwd: str | Path | None = None) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10,
                             check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and commit else None


def check_reachable(uri: str | None = None, timeout_s: float = 5.0) -> str:
    """Fail fast with one line instead of MLflow's minutes of HTTP retries."""
    uri = uri or tracking_uri()
    if uri.startswith(("http://", "https://")):
        import httpx

        try:
            httpx.get(uri.rstrip("/") + "/health", timeout=timeout_s)
        except httpx.HTTPError as err:
            raise CxrcfError(f"MLFLOW_TRACKING_URI {uri}: tracking server unreachable ({err})") from None
    elif uri.startswith("sqlite:///"):
        parent = Path(uri[len("sqlite:///"):]).parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise CxrcfError(f"MLFLOW_TRACKING_URI {uri}: cannot create {parent} ({err})") from None
    return uri


def client():
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=check_reachable())


def ensure_experiment(name: str) -> str:
    """Experiment id, creating the experiment with the configured artifact folder on first use."""
    mlc = client()
    exp = mlc.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = artifact_location()
    if mlc.tracking_uri.startswith(("http://", "https://")) and not os.environ.get("CXRCF_MLFLOW_ARTIFACTS"):
        location = None  # a tracking server chooses (and proxies) its artifact store; a local path would bypass it
    elif "://" not in location:
        Path(location).mkdir(parents=True, exist_ok=True)
        location = Path(location).resolve().as_uri()
    try:
        return mlc.create_experiment(name, artifact_location=location)
    except Exception:
        # Another process may have created it between our lookup and create.
        exp = mlc.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def flatten(obj: Any, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            out.update(flatten(value, f"{prefix}{key}."))
    else:
        out[prefix.rstrip(".")] = str(obj)
    return out


def start_run(params, phase: str, run_name: str | None = None, extra_params: Mapping[str, Any] | None = None,
              extra_tags: Mapping[str, str] | None = None) -> str:
    """Create the phase's run with flattened params and lineage tags; returns the run id."""
    check_reachable()  # before importing MLflow, which alone takes seconds
    from mlflow.entities import Param

    from cxrcf.data import dvc_data_hash

    mlc = client()
    exp_id = ensure_experiment(params.mlflow.experiment)
    tags = {"phase": phase, "preset": params.preset}
    data_hash = dvc_data_hash()
    if data_hash:
        tags["data_hash"] = data_hash
    commit = git_commit()
    if commit:
        tags["git_commit"] = commit
    tags.update(extra_tags or {})
    run = mlc.create_run(exp_id, run_name=run_name, tags=tags)
    flat = flatten(params.model_dump(mode="json"))
    flat.update(flatten(dict(extra_params or {})))
    items = [Param(k, v[:6000]) for k, v in sorted(flat.items())]
    for i in range(0, len(items), PARAM_BATCH):
        mlc.log_batch(run.info.run_id, params=items[i:i + PARAM_BATCH])
    return run.info.run_id


def log_metrics(run_id: str, rows: Iterable[tuple[str, float, int]], uri: str | None = None) -> None:
    """Log (key, value, step) rows in as few calls as MLflow allows."""
    import time

    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    mlc = MlflowClient(tracking_uri=uri or tracking_uri())
    now = int(time.time() * 1000)
    metrics = [Metric(k, float(v), now, int(s)) for k, v, s in rows]
    for i in range(0, len(metrics), METRIC_BATCH):
        mlc.log_batch(run_id, metrics=metrics[i:i + METRIC_BATCH])


def log_artifacts(run_id: str, local_path: str | Path, artifact_path: str | None = None) -> None:
    mlc = client()
    local_path = Path(local_path)
    if local_path.is_dir():
        mlc.log_artifacts(run_id, str(local_path), artifact_path)
    else:
        mlc.log_artifact(run_id, str(local_path), artifact_path)


def end_run(run_id: str, ok: bool = True, killed: bool = False) -> None:
    """FINISHED or FAILED; KILLED for a run stopped by a signal or abandoned by a driver that died."""
    client().set_terminated(run_id, status="KILLED" if killed else "FINISHED" if ok else "FAILED")


def run_status(run_id: str) -> str | None:
    """The run's status (RUNNING, FINISHED, FAILED, KILLED), or None if this store has no such live run."""
    from mlflow.exceptions import MlflowException

    try:
        run = client().get_run(run_id)
    except MlflowException:
        return None
    return run.info.status if run.info.lifecycle_stage == "active" else None


def reopen_run(run_id: str) -> None:
    """Mark an ended run RUNNING again: a resumed phase keeps logging into the run it started."""
    client().update_run(run_id, status="RUNNING")
