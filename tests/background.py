"""The suite's longest set-ups, started in the background when the session starts.

The 3-node cluster of tests/test_multinode.py (tests/multinode_cluster.py, ~2 minutes) and the smoke
pipeline's `dvc repro` of tests/test_pipeline_e2e.py (12 stages, ~4 minutes) are self-contained
subprocesses, each on a Ray cluster of its own; the registry's PostgreSQL + S3 mlflow server
(registry_fixtures.pg_s3_job, ~30 s) is one more. Run one after the other inside their tests they were a
third of the suite's time, while most of that time goes to waiting on process start-ups rather than to
computing: a whole suite used ~600 s of CPU in ~1340 s on 2 cores. Here they run on background threads
beside the rest of the suite. The order of a session (`pytest_collection_modifyitems`):
1. the serving tests (QUIET), alone: they assert on latency;
2. the other tests, while the jobs run beside them: the PostgreSQL + S3 server first, then the repro and,
   once the repro's Ray cluster is up, the multi-node cluster;
3. the two modules of the long jobs (LAST), whose fixtures wait for the result (`Job.result`) and assert on
   it exactly as before.
Jobs start after the session's own Ray cluster is up and never two clusters in the same moment: started all
at once (five raylets, at load 33 with other work on the machine) the session cluster's raylet died in its
start-up ("Timed out waiting for file .../metrics_agent_port"). The repro and the multi-node cluster one
after the other took ~730 s of a 894 s suite on a quiet machine (the serving tests waited 245 s for them).

Each job starts only when a selected test needs it, so `pytest tests/test_config.py` starts none.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import pytest
from helpers import git_dvc_repo, moto_s3, run_ok, stop_group

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BIN = Path(sys.executable).parent
# Their modules run last, so the jobs have the rest of the suite to finish in.
LAST = ("test_multinode.py", "test_pipeline_e2e.py")
MULTINODE_BUCKET = "cxrcf-ray"
PIPELINE_JOB = "pipeline dvc repro"


# Serving tests assert on latency (deadlines, batching, replica replacement): they run first, before any job
# starts, with nothing beside them. A full run with the 3-node cluster still going during them (it took 721 s,
# at load up to 240 with a second suite on the machine) failed test_late_batch_fails_alone_with_504_... on its
# deadline.
QUIET = ("test_serving.py", "test_serving_faults.py")


def pytest_collection_modifyitems(session, config, items):
    # stable: the order within each group is kept
    items.sort(key=lambda item: 0 if item.path.name in QUIET else 2 if item.path.name in LAST else 1)


class Job:
    """A function run on a thread of its own once the job `after` has ended (by default the job created
    before it); `result()` waits for it and re-raises what it raised.
    `fn(job)` may run its subprocesses through `job.run`, so that `stop()` can end them."""

    every: ClassVar[list[Job]] = []  # in the order they were created

    def __init__(self, name: str, fn: Callable[[Job], object], after: Job | None | str = "last"):
        self.name, self.started = name, time.monotonic()
        self._after = (Job.every[-1] if Job.every else None) if after == "last" else after
        Job.every.append(self)
        self._value: object = None
        self._error: BaseException | None = None
        self._proc: subprocess.Popen | None = None
        self._stopped = False
        self.wall_s: float | None = None
        self._thread = threading.Thread(target=self._run, args=(fn,), name=f"background-{name}", daemon=True)
        self._thread.start()

    def run(self, cmd: list[str], cwd: Path | None, env: dict, log: Path, timeout_s: float = 900) -> tuple[int, str]:
        """(exit code, output tail) of `cmd`, its output written to `log`; a process group of its own, so
        that a timeout or `stop()` ends it with its children (a Ray cluster's processes)."""
        with open(log, "w") as out:
            if self._stopped:
                return -1, "stopped"
            self._proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                          start_new_session=True)
            try:
                code = self._proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                stop_group(self._proc)
                code = f"timed out after {timeout_s:.0f} s"
        return code, log.read_text()[-6000:]

    def stop(self) -> None:
        """Ends its subprocess if it is still running (a session that ends before the job's test ran)."""
        self._stopped = True
        if self._proc is not None and self._proc.poll() is None:
            stop_group(self._proc)

    def _run(self, fn) -> None:
        if self._after is not None:
            self._after._thread.join()
        self.started = time.monotonic()
        try:
            self._value = fn(self)
        except BaseException as err:  # noqa: BLE001 (handed to the test that waits for it)
            self._error = err
        self.wall_s = time.monotonic() - self.started

    def error(self, timeout_s: float = 1800) -> BaseException | None:
        """Waits for the job; what it raised, or None."""
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), f"background job {self.name} still running after {timeout_s:.0f} s"
        return self._error

    def result(self, timeout_s: float = 1800):
        waited = time.monotonic()
        error = self.error(timeout_s)
        print(f"\n[background] {self.name}: took {self.wall_s:.0f} s; waited {time.monotonic() - waited:.0f} s "
              f"for it here, load {os.getloadavg()[0]:.1f}", file=sys.stderr)
        if error is not None:
            raise error
        return self._value


_started = False


@pytest.fixture(autouse=True)
def _start_background_jobs(request):
    """Starts the jobs the selected tests need when the session's first test outside QUIET is set up (the
    serving tests run first, with no job beside them): the session's Ray cluster first (not while another
    starts), then the jobs in the order their tests need them."""
    global _started
    if _started or request.node.path.name in QUIET:
        return
    _started = True
    items = request.session.items
    needed = {name for item in items for name in item.fixturenames}
    # registry tests ask for the PostgreSQL + S3 server through their `registry_backend` parameter
    needed |= {"pg_s3_job" for item in items
               if getattr(item, "callspec", None) and item.callspec.params.get("registry_backend") == "postgres+s3"}
    needed |= {"pg_s3_job"} if "pg_s3_server" in needed else set()
    for fixture in ("ray_cluster", "pg_s3_job", "pipeline_job", "multinode_job"):
        if fixture in needed:
            request.getfixturevalue(fixture)


@pytest.fixture(autouse=True)
def _no_background_job_beside_serving(request):
    """A serving test selected after the jobs started (e.g. `pytest tests/test_a.py tests/test_serving.py`
    keeps that order only within each group, so this is a guard) waits for every job to end."""
    if request.node.path.name in QUIET:
        for job in Job.every:
            job.error()


# ----------------------------------------------------------------------------------- multi-node
@pytest.fixture(scope="session")
def multinode_s3(tmp_path_factory):
    """moto's S3 server (server mode, loopback) with MULTINODE_BUCKET, for the session."""
    with moto_s3(tmp_path_factory.mktemp("s3"), MULTINODE_BUCKET) as endpoint:
        yield endpoint


@pytest.fixture(scope="session")
def multinode_job(tiny_data, multinode_s3, tmp_path_factory):
    """tests/multinode_cluster.py in a subprocess; the Job's result is (exit code, output tail, report path,
    work folder, wall seconds)."""
    work = tmp_path_factory.mktemp("multinode")
    out = work / "report.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}
    for key in ("RAY_ADDRESS", "RAY_TMPDIR"):  # its own cluster, in its own temp folder
        env.pop(key, None)
    # beside the pipeline's repro rather than after it (both spend most of their time waiting on process
    # start-ups), once the repro's cluster is up: a cluster that starts while another starts beside a busy
    # suite times out in Ray's start-up ("The current node timed out during startup").
    pipeline = next((j for j in Job.every if j.name == PIPELINE_JOB), None)
    cmd = [sys.executable, str(HERE / "multinode_cluster.py"), "--data", str(tiny_data), "--work", str(work / "run"),
           "--s3", multinode_s3, "--bucket", MULTINODE_BUCKET, "--out", str(out)]

    def run(job: Job):
        t0 = time.monotonic()
        while pipeline is not None and not pipeline.cluster_up.exists() and pipeline._thread.is_alive() \
                and time.monotonic() - t0 < 600:
            time.sleep(1)
        code, tail = job.run(cmd, None, env, work / "helper.log")
        return code, tail, out, work / "run", time.monotonic() - t0

    job = Job("multinode cluster", run, after=pipeline._after if pipeline else "last")
    yield job
    job.stop()


# ------------------------------------------------------------------------------ pipeline e2e
def pipeline_env() -> dict:
    """The environment the pipeline's stages run with (taken in the main thread: tests change os.environ)."""
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    for key in ("MLFLOW_TRACKING_URI", "CXRCF_MLFLOW_ARTIFACTS"):  # the embedded default: sqlite:///<repo>/mlruns.db
        env.pop(key, None)
    env.pop("RAY_ADDRESS", None)  # the repro gets a cluster of its own (REPRO)
    return env


def pipeline_repo(repo: Path, env: dict, tiny_data: Path, empty_mlflow_db: Path, smoke_params: str) -> None:
    """A git + DVC repository holding the project's dvc.yaml and code, `smoke_params` as params.yaml and the
    session's smoke dataset."""
    repo.mkdir(parents=True)
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    for pkg in ("cxrcf", "training", "pipelines", "serving"):
        shutil.copytree(ROOT / pkg, repo / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    (repo / "params.yaml").write_text(smoke_params)
    (repo / ".gitignore").write_text("/mlruns.db\n/mlartifacts/\n/artifacts/ray/\n__pycache__/\n")
    git_dvc_repo(repo, env)
    # the session's smoke dataset: the bytes `cxrcf data synth --params params.yaml` writes for these params
    # (the command itself is tested in test_data), without another process generating them again
    shutil.copytree(tiny_data, repo / "data")
    run_ok([str(BIN / "dvc"), "add", "-q", "data"], repo, env)
    # the embedded default store the stages open, new and empty (a copy of the session's store as MLflow
    # created it, from nothing, as a first `make run` creates this one): the first training stage would
    # otherwise spend most of its time applying MLflow's migrations
    shutil.copy(empty_mlflow_db, repo / "mlruns.db")
    run_ok(["git", "add", "-A"], repo, env)
    run_ok(["git", "commit", "-qm", "smoke pipeline"], repo, env)


# `make run`'s way (pipelines/main.py): one local Ray cluster that every stage joins, then `dvc repro`. In a
# temp folder of its own (a plain `ray.init()` joins the cluster named in <temp>/ray rather than start one).
REPRO = """
import os, pathlib, subprocess, sys
from pipelines.main import shared_ray_cluster
with shared_ray_cluster() as address:
    pathlib.Path(sys.argv[2]).touch()  # the cluster is up: the multi-node job may start its own
    code = subprocess.run([sys.argv[1], "repro"], env=dict(os.environ, RAY_ADDRESS=address)).returncode
sys.exit(code)
"""


@pytest.fixture(scope="session")
def pipeline_job(tmp_path_factory, tiny_data, empty_mlflow_db):
    """The smoke pipeline's repository and its first `dvc repro` on a Ray cluster of its own, started for it
    and stopped after it; the Job's result is (repo, env, output)."""
    import yaml
    from test_pipeline_e2e import SMOKE_PARAMS

    repo = tmp_path_factory.mktemp("pipeline") / "repo"
    up = repo.parent / "cluster-up"  # written by REPRO once its cluster is up
    env = pipeline_env()
    smoke = yaml.safe_dump(SMOKE_PARAMS, sort_keys=False)

    def run(job: Job):
        pipeline_repo(repo, env, tiny_data, empty_mlflow_db, smoke)
        tmp = tempfile.mkdtemp(prefix="cxe2e-", dir="/tmp")  # short: Ray's Unix socket paths live under it
        try:
            code, out = job.run([sys.executable, "-c", REPRO, str(BIN / "dvc"), str(up)], repo,
                                dict(env, RAY_TMPDIR=tmp), repo.parent / "repro.log")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        assert code == 0, f"dvc repro failed ({code}):\n{out}"
        return repo, env, (repo.parent / "repro.log").read_text()

    job = Job(PIPELINE_JOB, run)
    job.cluster_up = up
    yield job
    job.stop()
