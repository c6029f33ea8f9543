"""Runs that survive their driver: the run record's rules (which run a new invocation resumes, which it
marks KILLED), the MLflow status an interrupted phase leaves, and the real CLI's driver SIGKILLed
mid-run and rerun with --resume."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from cxrcf.config import preset_params
from cxrcf.errors import CxrcfError
from training.resume import ending, open_run, record_path

ROOT = Path(__file__).resolve().parents[1]


def _client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def _runs(uri, experiment):
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id]) if exp else []


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_run_record_resumes_or_replaces_and_marks_abandoned_runs_killed(mlflow_uri, tmp_path):
    params = preset_params("smoke", ray={"storage_path": str(tmp_path / "ray")}, mlflow={"experiment": "test-record"})
    out = tmp_path / "generator"
    client = _client(mlflow_uri)

    name, run_id = open_run(params, "generator", out, resume=True)  # nothing to resume: a new run
    path = record_path(tmp_path / "ray", "generator", out)
    record = json.loads(path.read_text())
    assert (record["name"], record["run_id"], record["pid"]) == (name, run_id, os.getpid())
    assert client.get_run(run_id).info.status == "RUNNING"

    # the driver died (SIGKILL): the run stays RUNNING; --resume continues it under the same names
    path.write_text(json.dumps({**record, "pid": _dead_pid()}))
    assert open_run(params, "generator", out, resume=True) == (name, run_id)

    # ... and an invocation without --resume marks it KILLED and starts its own
    path.write_text(json.dumps({**record, "pid": _dead_pid()}))
    name2, run2 = open_run(params, "generator", out, resume=False)
    assert run2 != run_id and name2 != name
    assert client.get_run(run_id).info.status == "KILLED" and client.get_run(run2).info.status == "RUNNING"

    # a live driver is never taken over
    me = json.loads(path.read_text())
    path.write_text(json.dumps({**me, "pid": os.getppid(), "started": psutil.Process(os.getppid()).create_time(),
                                "host": socket.gethostname()}))
    with pytest.raises(CxrcfError, match=rf"train generator: {out} is being trained by run {name2} \(driver pid"):
        open_run(params, "generator", out, resume=True)

    # other params: a KILLED run is not continued with them
    path.write_text(json.dumps(me))
    client.set_terminated(run2, status="KILLED")
    changed = preset_params("smoke", ray={"storage_path": str(tmp_path / "ray")}, mlflow={"experiment": "test-record"},
                            generator={"beta": 2.0})
    assert open_run(changed, "generator", out, resume=True)[1] not in (run_id, run2)
    # the record is per output folder: another output of the same phase has none
    assert not record_path(tmp_path / "ray", "generator", tmp_path / "other").exists()


def test_interrupted_phase_ends_its_run_killed_and_an_error_failed(mlflow_uri, tmp_path):
    params = preset_params("smoke", ray={"storage_path": str(tmp_path / "ray")}, mlflow={"experiment": "test-ending"})
    client = _client(mlflow_uri)
    # Ctrl-C; Ray Train's own Ctrl-C handler (sys.exit(0)); Ray's SIGTERM handler (sys.exit(15))
    for signal_like in (KeyboardInterrupt(), SystemExit(0), SystemExit(15)):
        _, run_id = open_run(params, "generator", tmp_path / "a", resume=False)
        with pytest.raises(KeyboardInterrupt), ending(run_id):
            raise signal_like
        assert client.get_run(run_id).info.status == "KILLED", signal_like
    _, run_id = open_run(params, "generator", tmp_path / "a", resume=False)
    with pytest.raises(ValueError), ending(run_id):
        raise ValueError("export failed")
    assert client.get_run(run_id).info.status == "FAILED"


def test_the_fingerprint_names_the_data_read_not_the_working_directory(tmp_path, monkeypatch):
    from training.resume import fingerprint

    params = preset_params("smoke")
    monkeypatch.chdir(tmp_path)  # no data.dvc here
    same = fingerprint(params, "generator", None, "a" * 32 + ".dir")
    assert same == fingerprint(params, "generator", None, "a" * 32 + ".dir")
    assert same != fingerprint(params, "generator", None, "b" * 32 + ".dir")  # other data: no resume
    assert same != fingerprint(params, "cft_hard", None, "a" * 32 + ".dir")


STEPS, CHECKPOINT_EVERY = 24, 3


def _wait_for_checkpoint(storage: Path, proc: subprocess.Popen, timeout_s: float = 240.0) -> None:
    """Until Ray Train's run snapshot lists a checkpoint (the checkpoint a resumed run is handed)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the driver ended (exit {proc.returncode}) before it could be killed"
        for snapshot in storage.glob("generator-*/checkpoint_manager_snapshot.json"):
            if "checkpoint_" in snapshot.read_text():
                return
        time.sleep(0.1)
    pytest.fail(f"no checkpoint within {timeout_s:.0f} s")


def test_killed_driver_resumes_in_the_same_mlflow_run(ray_cluster, mlflow_uri, tiny_data, tmp_path, monkeypatch,
                                                      capsys):
    from cxrcf.cli import main as cxrcf_main

    experiment = "test-training-resume"
    storage = tmp_path / "ray"
    params_file = tmp_path / "params.yaml"
    params_file.write_text(
        f"preset: smoke\nmlflow:\n  experiment: {experiment}\nray:\n  num_workers: 1\n  storage_path: {storage}\n"
        f"generator:\n  optim:\n    steps: {STEPS}\n    checkpoint_every: {CHECKPOINT_EVERY}\n    val_every: {STEPS}\n")
    out, metrics = tmp_path / "generator", tmp_path / "generator.json"
    args = ["train", "generator", "--params", str(params_file), "--data", str(tiny_data), "--out", str(out),
            "--metrics", str(metrics)]
    # the driver joins the session's cluster, so killing it leaves Ray itself running, as on a real cluster
    env = dict(os.environ, PYTHONPATH=str(ROOT), RAY_ADDRESS=ray_cluster.get_runtime_context().gcs_address)

    t0 = time.monotonic()
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen([sys.executable, "-m", "cxrcf.cli", *args], cwd=tmp_path, env=env, stdout=log,
                                 stderr=subprocess.STDOUT)
        try:
            _wait_for_checkpoint(storage, first)
        finally:
            first.send_signal(signal.SIGKILL)
            first.wait()
    killed_at = time.monotonic() - t0
    [run] = _runs(mlflow_uri, experiment)
    assert run.info.status == "RUNNING"  # what a SIGKILLed driver leaves behind

    # The rerun goes through the same front door in this process (its imports are paid for already),
    # from the same folder.
    monkeypatch.chdir(tmp_path)
    t0 = time.monotonic()
    assert cxrcf_main(args + ["--resume"]) == 0, capsys.readouterr().err[-3000:]
    resumed_in = time.monotonic() - t0
    assert f"resuming Ray Train run {run.info.run_name}" in capsys.readouterr().out

    [after] = _runs(mlflow_uri, experiment)  # one MLflow run for the whole phase
    assert after.info.run_id == run.info.run_id and after.info.status == "FINISHED"
    result = json.loads((out / "run.json").read_text())
    assert result["run_id"] == run.info.run_id and "eps" in result["metrics"]
    m = result["metrics"]
    assert m["steps"] == STEPS and CHECKPOINT_EVERY <= m["resumed_step"] < STEPS, m
    # every step of an uninterrupted run was trained and logged; none beyond it
    logged = {h.step for h in _client(mlflow_uri).get_metric_history(run.info.run_id, "loss")}
    assert logged == set(range(1, STEPS + 1))
    with capsys.disabled():
        print(f"\nkilled after {killed_at:.1f} s at a checkpoint; resumed at step {m['resumed_step']:.0f} "
              f"and finished in {resumed_in:.1f} s")
