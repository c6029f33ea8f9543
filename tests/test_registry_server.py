"""The production-shaped store itself: `mlflow server` on PostgreSQL with an S3-compatible artifact
store (see registry_fixtures.py), its schema migration, and the server-side promotion lock (owner
tokens, owner-checked release, one breaker of a stale holder, bounded retries)."""

from __future__ import annotations

import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest
from registry_fixtures import BIN, _pointed_at

from cxrcf.errors import CxrcfError
from pipelines import registry
from pipelines.registry_ledger import FREE, HOLD, RegistryState, server_lock


@pytest.fixture(scope="module")
def server(pg_s3_server):
    with _pointed_at(pg_s3_server["url"], {"CXRCF_MLFLOW_ARTIFACTS": None}):
        yield pg_s3_server


def test_artifacts_land_in_s3_through_the_server_and_the_schema_is_at_head(server, tmp_path):
    import mlflow
    from helpers import s3_client

    mlc = registry.connect()
    exp = mlc.create_experiment(f"s3-{uuid.uuid4().hex[:8]}")
    run = mlc.create_run(exp)
    (tmp_path / "note.txt").write_text("stored in S3")
    mlc.log_artifact(run.info.run_id, str(tmp_path / "note.txt"))
    assert mlc.get_experiment(exp).artifact_location.startswith("mlflow-artifacts:")
    s3 = s3_client(server["s3_url"])
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=server["bucket"]).get("Contents", [])]
    assert any(k.startswith("mlartifacts/") and k.endswith(f"{run.info.run_id}/artifacts/note.txt") for k in keys), keys
    back = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="note.txt", dst_path=str(tmp_path / "dl"))
    assert Path(back).read_text() == "stored in S3"

    # The migration step README documents: the schema is at MLflow's newest revision, and running the
    # upgrade again on it succeeds and changes nothing.
    from alembic.script import ScriptDirectory
    from mlflow.store import db_migrations

    def revision() -> str:
        return server["pg"].psql("\\c mlflow\nSELECT version_num FROM alembic_version;")

    newest = ScriptDirectory(str(Path(db_migrations.__file__).parent)).get_current_head()
    before = revision()
    assert newest in before and "(1 row)" in before, before
    again = subprocess.run([str(BIN / "mlflow"), "db", "upgrade", server["db_uri"]], capture_output=True, text=True,
                           timeout=600, check=False)
    assert again.returncode == 0, again.stderr[-2000:]
    assert revision() == before


def _lock_params(name: str) -> dict[str, str]:
    state = RegistryState(registry.connect(), name)
    return {k: v for k, v in state.params().items() if k.startswith(("lock.",))}


def test_a_stalled_holder_is_broken_once_and_its_release_is_refused(server, capsys):
    """Holder A stops heartbeating (a 1000 s heartbeat period stands for a stalled process); waiters B
    and C both judge it stale, yet exactly one of them ends A's epoch, and they then hold the lock one
    after the other. A's late release does not free anyone's lock: it is refused and reported."""
    mlc = registry.connect()
    name = f"gen-lock-{uuid.uuid4().hex[:8]}"
    intervals: dict[str, tuple[float, float]] = {}
    errors: list[BaseException] = []

    def waiter(tag: str) -> None:
        try:
            with server_lock(mlc, name, timeout_s=120, stale_s=4.0) as held:
                start = time.monotonic()
                time.sleep(0.5)
                intervals[tag] = (start, time.monotonic(), held["epoch"])
        except BaseException as err:  # noqa: BLE001 - reported by the assertion below
            errors.append(err)

    holder = server_lock(mlc, name, timeout_s=10, stale_s=1000.0)
    held = holder.__enter__()
    assert held["epoch"] == 1
    threads = [threading.Thread(target=waiter, args=(t,)) for t in ("B", "C")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    holder.__exit__(None, None, None)

    params = _lock_params(name)
    assert params[f"{FREE}000001"].startswith("broken-by ")
    (b0, b1, be), (c0, c1, ce) = intervals["B"], intervals["C"]
    assert sorted([be, ce]) == [2, 3] and (b1 <= c0 or c1 <= b0), intervals
    assert params[f"{HOLD}000002"] != params[f"{HOLD}000003"]
    assert params[f"{FREE}000002"] == params[f"{HOLD}000002"]  # released by its owner
    err = capsys.readouterr().err
    assert err.count("broke the promotion lock") == 1
    assert "epoch 1" in err and "was ended by broken-by" in err


def test_persistent_store_errors_end_the_wait_after_bounded_backed_off_retries(server):
    mlc = registry.connect()
    name = f"gen-lock-{uuid.uuid4().hex[:8]}"
    state = RegistryState(mlc, name)
    mlc.delete_run(state.run_id)  # every lock write now fails: the run is no longer active
    start = time.monotonic()
    with pytest.raises(CxrcfError, match=r"promotion lock of .* failed 6 times in a row"), \
            server_lock(mlc, name, timeout_s=600, stale_s=1.0):
        pass
    # Five backoffs of 0.2 .. 3.2 s (halved at most by jitter): not a hot loop, and far below the wait.
    assert 3.0 <= time.monotonic() - start < 120
