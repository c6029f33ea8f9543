"""MLflow helpers against a real SQLite store (and a real closed port for the unreachable case)."""

import socket
from pathlib import Path

import pytest

from cxrcf.config import preset_params
from cxrcf.errors import CxrcfError
from store import tracking


def test_tracking_uri_defaults_to_sqlite_in_cwd(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("CXRCF_MLFLOW_ARTIFACTS", raising=False)
    monkeypatch.chdir(tmp_path)
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path.resolve()}/mlruns.db"
    assert tracking.artifact_location() == str(tmp_path.resolve() / "mlartifacts")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://example.invalid:5000")
    assert tracking.tracking_uri() == "http://example.invalid:5000"


def test_git_commit(tmp_path):
    assert tracking.git_commit(tmp_path) is None  # not a repository
    commit = tracking.git_commit(Path(__file__).parent)
    assert commit is None or len(commit) == 40


def test_unreachable_server_is_one_clear_error(monkeypatch):
    with socket.socket() as s:  # a port nobody listens on once this socket closes
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    with pytest.raises(CxrcfError, match="tracking server unreachable"):
        tracking.start_run(preset_params("smoke"), "generator")


def test_start_run_logs_params_tags_and_metrics(mlflow_uri, monkeypatch, tmp_path):
    from mlflow.tracking import MlflowClient

    (tmp_path / "data.dvc").write_text("outs:\n- md5: abc123.dir\n  path: data\n")
    monkeypatch.chdir(tmp_path)
    params = preset_params("smoke", mlflow={"experiment": "test-tracking"})
    run_id = tracking.start_run(params, "generator", run_name="r1", extra_params={"cft.mode": "hard"})
    tracking.log_metrics(run_id, [("loss", 2.0, 1), ("loss", 1.5, 2)])
    (tmp_path / "grid.png").write_bytes(b"\x89PNG fake")
    tracking.log_artifacts(run_id, tmp_path / "grid.png", "samples")
    tracking.end_run(run_id)
    client = MlflowClient(mlflow_uri)
    run = client.get_run(run_id)
    assert run.data.params["generator.beta"] == "4.0" and run.data.params["cft.mode"] == "hard"
    assert run.data.params["generator.optim.steps"] == "30"
    assert run.data.tags["phase"] == "generator" and run.data.tags["preset"] == "smoke"
    assert run.data.tags["data_hash"] == "abc123.dir"
    assert [m.value for m in client.get_metric_history(run_id, "loss")] == [2.0, 1.5]
    assert [a.path for a in client.list_artifacts(run_id, "samples")] == ["samples/grid.png"]
    assert run.info.status == "FINISHED"
    exp = client.get_experiment_by_name("test-tracking")
    assert exp.artifact_location.startswith("file://")
