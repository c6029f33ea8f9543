"""Beyond one machine (issue 19): training, serving and augmentation on a 3-node Ray cluster.

The session's Ray cluster is a single local node and a driver joins one cluster only, so the
multi-node cluster runs in a subprocess (tests/multinode_cluster.py: a head node and two worker
nodes of 3 logical CPUs each, every worker, replica and actor asking for 2, so no two share a node).
Its JSON report says where each piece ran, by node id, as the workers themselves (training) and the
GCS actor table (replicas, actors) saw it; these tests check it, the S3 bucket the checkpoints went
to, and the augmentation's output folder.

One cluster for the module: starting nodes and Ray Train worker groups is most of the cost. It runs
beside the rest of the suite, started with the session (tests/background.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import pandas as pd
import pytest
from background import MULTINODE_BUCKET as BUCKET


@pytest.fixture(scope="module")
def s3_endpoint(multinode_s3):
    """moto's S3 server (server mode, loopback) with BUCKET: the one the cluster checkpoints to."""
    return multinode_s3


@pytest.fixture(scope="module")
def cluster_run(multinode_job, s3_endpoint):
    """The helper's report (the S3 server it checkpointed to is still up). The helper started in the
    background when the session did (tests/background.py)."""
    code, tail, out, work, wall = multinode_job.result()
    assert code == 0, f"multinode_cluster.py failed ({code}):\n{tail}"
    report = json.loads(out.read_text())
    print(f"\n[multinode] {wall:.0f}s, load {os.getloadavg()[0]:.1f}: {report['timings']}", file=sys.stderr)
    return {**report, "endpoint": s3_endpoint, "work": work}


def _s3(endpoint: str):
    from helpers import s3_client

    return s3_client(endpoint)


def test_cluster_has_three_nodes(cluster_run):
    nodes = cluster_run["nodes"]
    assert set(nodes) == {"node_a", "node_b", "node_c"}
    assert len(set(nodes.values())) == 3
    assert nodes["node_a"] == cluster_run["head"]


def test_training_on_two_nodes_survives_losing_one(cluster_run):
    """2 workers on 2 nodes; one worker's node is killed before step 10; Ray Train's FailureConfig
    (max_failures=1) restarts the group on the two nodes left, from the step-8 checkpoint on S3, and the
    run ends at the same step 12 an uninterrupted run ends at."""
    from multinode_cluster import CHECKPOINT_EVERY, KILL_BEFORE, STEPS

    train, nodes = cluster_run["train"], cluster_run["nodes"]
    first, second = train["attempts"]  # before and after the node went
    killed = train["killed"]["node"]
    last_checkpoint = KILL_BEFORE // CHECKPOINT_EVERY * CHECKPOINT_EVERY

    for attempt in (first, second):
        assert sorted(w["rank"] for w in attempt) == [0, 1]
        placed = {w["node"] for w in attempt}
        assert len(placed) == 2, f"both workers on one node: {attempt}"
        assert placed <= set(nodes.values())
    assert killed != cluster_run["head"]
    assert killed in {w["node"] for w in first}
    assert killed not in {w["node"] for w in second}
    assert killed not in cluster_run["nodes_alive_after_train"]
    assert len(cluster_run["nodes_alive_after_train"]) == 2

    # each worker process saw these steps: the first group up to the step it was stopped at, the second
    # from the last checkpoint to the end
    for w in first:
        assert w["steps"] == list(range(KILL_BEFORE + 1)), w
    for w in second:
        assert w["steps"] == list(range(last_checkpoint, STEPS)), w
    metrics = train["metrics"]
    assert metrics["resumed_step"] == last_checkpoint
    assert metrics["steps"] == STEPS
    assert train["exported_keys"] > 0


def test_training_checkpoints_went_to_s3(cluster_run):
    train = cluster_run["train"]
    assert train["storage"] == f"s3://{BUCKET}/ray"
    s3 = _s3(cluster_run["endpoint"])
    prefix = f"ray/{train['run_name']}/"
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])]
    states = [json.loads(s3.get_object(Bucket=BUCKET, Key=k)["Body"].read()) for k in keys
              if k.endswith("/state.json")]
    # CheckpointConfig(num_to_keep=2): the step-8 checkpoint the second group started from, and the final one
    steps = sorted(s["step"] for s in states if s["task"] == 0)
    assert steps == [8], keys
    final = [s for s in states if s["task"] == 1]
    assert len(final) == 1 and "generator" in final[0]["finished"] and "fault" not in final[0]
    assert any(k.endswith("/model.safetensors") for k in keys)


def test_serve_replicas_on_two_nodes_behind_the_proxy(cluster_run):
    serve, head = cluster_run["serve"], cluster_run["head"]
    replicas = [r for r in serve["replicas"] if r["state"] == "ALIVE"]
    assert len(replicas) == 2
    assert len({r["node"] for r in replicas}) == 2, replicas
    assert {r["node"] for r in replicas} == set(cluster_run["nodes_alive_after_train"])
    proxies = [p for p in serve["proxies"] if p["state"] == "ALIVE"]
    assert [p["node"] for p in proxies] == [head]  # one proxy, on the head; every request went through it
    # the replica ids the answers name are those of the two placed replicas: both served through the proxy
    ids = {r["name"].rsplit("#", 1)[-1] for r in replicas}
    assert set(serve["answered_by"]) == ids
    assert set(serve["statuses"]) == {200}
    assert serve["post_statuses"] == [200] * len(serve["post_statuses"])
    assert serve["post_images"] == [1] * len(serve["post_images"])


def test_augment_actors_on_two_nodes_outputs_exactly_once(cluster_run):
    aug = cluster_run["augment"]
    actors = [a for a in aug["actors"] if "Counterfactualizer" in a["class"]]
    assert len(actors) == 2
    assert len({a["node"] for a in actors}) == 2, actors

    out = Path(aug["out"])
    planned = pd.read_csv(out / "planned.csv")
    manifest = pd.read_csv(out / "manifest.csv")
    errors = pd.read_csv(out / "errors.csv")
    summary = aug["summary"]
    assert len(planned) == summary["planned"] > 0
    assert summary["written"] == summary["planned"] and summary["failed"] == 0 and errors.empty
    # exactly once: one manifest row per planned item, one image per row, nothing else in images/
    assert manifest["id"].is_unique
    assert sorted(manifest["id"]) == sorted(planned["id"])
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(Path(p).name for p in manifest["path"])
    for row in manifest.itertuples():
        data = (out / row.path).read_bytes()
        assert len(data) == row.bytes and hashlib.sha256(data).hexdigest() == row.sha256, row.id
    # every chunk's part is there and no chunk was written twice
    parts = sorted((out / "parts").glob("chunk-*.json"))
    rows = [r["id"] for p in parts for r in json.loads(p.read_text())["rows"]]
    assert sorted(rows) == sorted(manifest["id"])
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]


# ------------------------------------------------------------------ ray.storage_path (no cluster needed)
def _ray(storage: str):
    from cxrcf.config import RayConfig

    return RayConfig(storage_path=storage)


@pytest.mark.parametrize(("storage", "says"), [
    ("gs://bucket/ray", "gs:// is not supported"),
    ("s3://", "is not an S3 bucket name"),
    ("s3://Bad_Bucket/ray", "'Bad_Bucket' is not an S3 bucket name"),
    ("  ", "empty"),
])
def test_storage_path_refused_with_the_field_named(storage, says):
    from cxrcf.errors import CxrcfError
    from training.loop import resolve_storage

    with pytest.raises(CxrcfError, match="ray.storage_path") as err:
        resolve_storage(_ray(storage))
    assert says in str(err.value)


def test_storage_path_on_s3_checked_before_the_run(s3_endpoint, monkeypatch):
    """A bucket that does not exist, and an endpoint where nothing listens, stop the run at the start
    with one line naming ray.storage_path; an endpoint variable that is not a URL names itself."""
    from helpers import S3_ENV, closed_port_uri

    from cxrcf.errors import CxrcfError
    from training.loop import resolve_storage

    for k, v in S3_ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    storage = resolve_storage(_ray(f"s3://{BUCKET}/runs/ray/"))
    assert (storage.uri, storage.path, storage.remote) == (f"s3://{BUCKET}/runs/ray", f"{BUCKET}/runs/ray", True)
    with pytest.raises(CxrcfError, match=r"ray.storage_path: s3://absent/ray at http://127.0.0.1:\d+: "
                                         r"bucket 'absent' does not exist"):
        resolve_storage(_ray("s3://absent/ray"))
    monkeypatch.setenv("AWS_ENDPOINT_URL", closed_port_uri())
    with pytest.raises(CxrcfError, match=f"ray.storage_path: s3://{BUCKET}/ray at .*: not reachable"):
        resolve_storage(_ray(f"s3://{BUCKET}/ray"))
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "127.0.0.1:9000")
    with pytest.raises(CxrcfError, match="AWS_ENDPOINT_URL_S3='127.0.0.1:9000': an S3 endpoint URL starts with http"):
        resolve_storage(_ray(f"s3://{BUCKET}/ray"))


def test_local_storage_path_made_absolute_and_run_records_placed(tmp_path, monkeypatch):
    """Local storage: as before (absolute, created; run records under it). S3 storage: the run records
    stay on the driver's disk, beside the output folder."""
    from training.loop import resolve_storage
    from training.resume import record_path, record_root

    monkeypatch.chdir(tmp_path)
    storage = resolve_storage(_ray("rel/ray"))
    assert storage.path == storage.uri == str(tmp_path / "rel" / "ray") and not storage.remote
    assert (tmp_path / "rel" / "ray").is_dir()
    out = tmp_path / "artifacts" / "generator"
    assert record_root(_ray("rel/ray"), out) == tmp_path / "rel" / "ray"
    assert record_root(_ray("s3://bucket/ray"), out) == tmp_path / "artifacts"
    assert record_path(record_root(_ray("s3://bucket/ray"), out), "generator", out).parent == \
        tmp_path / "artifacts" / "cxrcf-runs"
