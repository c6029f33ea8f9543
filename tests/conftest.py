"""Session-wide fixtures shared by every test module.

- `ray_cluster`: ONE local Ray cluster for the whole session (started on first use).
- `mlflow_uri`: a temporary SQLite MLflow tracking store + artifact folder, set as the process default.
- `tiny_data`: a small SynthCXR dataset (smoke size, 32x32) generated once per session.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from cxrcf.cli import quiet_env

# The multi-node cluster, the pipeline's repro and the PostgreSQL + S3 server: started with the session, run
# beside the other tests (background). The registry's stores (SQLite, PostgreSQL + S3 server): session-wide,
# so the server starts once. (background first: registry_fixtures imports it, after pytest rewrote it)
pytest_plugins = ["background", "registry_fixtures"]

for _k, _v in {
    # Test models are tiny: a second intra-op thread only spins against the other processes on a 2-core
    # box (a smoke evaluation: 0.6 s on 1 thread, 10.6 s on 2 beside one busy core). Inherited by every
    # CLI and DVC stage a test starts, and by the Ray cluster's workers.
    "OMP_NUM_THREADS": "1",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    "RAY_DEDUP_LOGS": "0",
    # Ray Train's preemption watcher (one more actor process per worker-group start, polling the GCS for
    # node drains) has nothing to watch on a one-node test cluster; an A/B of the smoke predictors stage
    # beside a busy job: 81-91 s with it, 57-62 s without. No test exercises preemption.
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
}.items():
    os.environ.setdefault(_k, _v)
quiet_env()  # as every cxrcf command: Ray's token auth on, telemetry off (before anything imports ray)


@pytest.fixture(scope="session")
def metrics_port() -> int:
    """The session cluster's Prometheus endpoint, opened as `cxrcf serve --metrics-port` opens one."""
    from helpers import free_port

    return free_port()


@pytest.fixture(scope="session")
def ray_cluster(metrics_port):
    import ray

    from cxrcf.config import ServeConfig
    from serving import ingress
    from serving.cli import metrics_export

    if not ray.is_initialized():
        os.environ.update(ingress.ray_env(ServeConfig()))  # replicas get direct ports, as `cxrcf serve` gives them
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, **metrics_export(metrics_port, None))
    yield ray
    from ray import serve

    serve.shutdown()  # a no-op when no test started Serve
    ray.shutdown()


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory):
    """A SQLite tracking store for the session; tests isolate themselves by experiment/model names."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    old = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "CXRCF_MLFLOW_ARTIFACTS")}
    os.environ["MLFLOW_TRACKING_URI"] = uri
    os.environ["CXRCF_MLFLOW_ARTIFACTS"] = str(root / "artifacts")
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(uri)
    MlflowClient(uri).search_experiments()  # creates the store now (every migration) ...
    shutil.copy(root / "mlflow.db", root / "empty.db")  # ... and keeps it as new, for `empty_mlflow_db`
    yield uri
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def empty_mlflow_db(mlflow_uri) -> Path:
    """The session store's SQLite file as MLflow created it, before any test wrote to it. Creating a store
    applies every MLflow migration (38 s beside a busy job, most of the e2e's first training stage);
    copying this file gives a test a new, empty store instead."""
    return Path(mlflow_uri.removeprefix("sqlite:///")).with_name("empty.db")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """400 SynthCXR images at 32x32 (smoke preset) under a temporary `data/`."""
    from cxrcf.config import preset_params
    from cxrcf.synth import generate_dataset

    root = tmp_path_factory.mktemp("tiny") / "data"
    generate_dataset(root, preset_params("smoke").data.synth)
    return root


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """The test models are tiny: a second thread only adds OpenMP barrier stalls (badly so on a
    busy machine). Ray workers and subprocesses set their own thread counts."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
