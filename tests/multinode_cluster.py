"""A multi-node Ray cluster on one machine, and the scenarios tests/test_multinode.py checks on it.

The pytest process holds the session's single-node cluster, and a driver joins one cluster only, so
the multi-node cluster lives in this script's process: `ray.cluster_utils.Cluster` starts a head node
with no CPUs (it holds the drivers' controllers and the Serve proxy) and worker nodes of 3 logical
CPUs, each with its own custom resource (`node_a`, `node_b`, ...). Every scenario asks for 2 CPUs per
worker, replica or actor, so two of them can never share a node: placement on two nodes is forced by
resources, and checked against what the workers and the GCS report.

    python tests/multinode_cluster.py --data DATA --work DIR --s3 http://127.0.0.1:PORT --bucket B \
        [--scenarios train,augment,serve] --out result.json

Scenarios (in this order, on one cluster):
- train: the generator phase (smoke preset, 12 steps, a checkpoint every 4) with 2 Ray Train workers,
  checkpointing to `s3://B/...` on the S3 server; a step hook records each worker's node id and steps
  from inside the worker, and rank 1 asks for its own node to be killed before step 10; the driver
  removes that node (all its processes, no grace) and Ray Train's FailureConfig(max_failures=1)
  restarts the worker group on the nodes left, from the last checkpoint that reached S3.
- augment: a flip plan through pipelines/augment.py with 2 actors of 2 CPUs.
- serve: the serving app with 2 replicas of 2 CPUs behind the proxy on the head node, registry on
  SQLite; GET /v1/model through the proxy names the replica that answered.
Writes one JSON document of what happened; the test asserts on it. `helpers.moto_s3` is the S3 server both
the test and benchmarks/train_scaling.py start.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from cxrcf.cli import quiet_env

quiet_env()  # Ray token auth on, telemetry off, before anything imports ray
# Ray writes the address of the last cluster it started to <temp>/ray/ray_current_cluster, and a plain
# `ray.init()` anywhere on the machine then joins that cluster: this one gets a temp folder of its own.
# (short: Ray's Unix socket paths live under it)
OWN_TMP = None
if __name__ == "__main__" and "RAY_TMPDIR" not in os.environ:
    OWN_TMP = os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="cxmn-", dir="/tmp")

NODE_CPUS = 3  # per worker node: one 2-CPU worker, replica or actor fits, a second does not
UNIT_CPUS = 2.0
STEPS, CHECKPOINT_EVERY, KILL_BEFORE = 12, 4, 10
# The GCS declares a node dead after this many failed health checks (default 5 x 3 s); a killed raylet
# refuses connections at once, so a short period finds it within seconds. The timeout stays long, so a
# slow but living node on a loaded machine is not declared dead.
HEAD_SYSTEM_CONFIG = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3,
                      "health_check_timeout_ms": 5000, "health_check_initial_delay_ms": 1000}


# ------------------------------------------------------------------------------------- S3 server
def s3_objects(endpoint: str, bucket: str, prefix: str) -> list[str]:
    from helpers import s3_client

    client = s3_client(endpoint)
    keys: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return keys


# --------------------------------------------------------------------------------------- cluster
def start_cluster(worker_nodes: int = 2, cpus: int = NODE_CPUS):
    """(Cluster, {label: Node}) with the driver connected: the head node (`node_a`, which also holds the
    drivers' controllers and the Serve proxy) and `worker_nodes` more (`node_b`, ...), each of
    `cpus` logical CPUs and a custom resource named after it."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": cpus, "include_dashboard": False, "resources": {"node_a": 1},
        "_system_config": HEAD_SYSTEM_CONFIG})
    nodes = {"node_a": cluster.head_node}
    for i in range(worker_nodes):
        label = f"node_{chr(ord('b') + i)}"
        nodes[label] = cluster.add_node(num_cpus=cpus, resources={label: 1}, wait=False)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    return cluster, nodes


def alive_nodes() -> dict[str, dict]:
    import ray

    return {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}


def actor_nodes(class_part: str) -> list[dict]:
    """Actors whose class name contains `class_part`: name, state and node id, from the GCS actor table."""
    from ray._private import state

    return [{"class": a["ActorClassName"], "name": a["Name"], "state": a["State"], "node": a["Address"]["NodeID"],
             "pid": a.get("Pid")} for a in state.actors().values() if class_part in a["ActorClassName"]]


# ----------------------------------------------------------------------------------------- train
@dataclass
class Watch:
    """Ray Train step hook: each worker process appends its rank, node id and every step it starts to
    its own file. Before step `kill_before`, the first worker to get there that is not on the head node
    (`head`; the driver lives there) asks the driver, once per run, to kill its node, and waits there."""

    folder: str
    kill_before: int
    head: str

    def __call__(self, task: int, step: int, rank: int, world: int) -> None:
        import ray

        folder = Path(self.folder)
        node = ray.get_runtime_context().get_node_id()
        row = {"rank": rank, "world": world, "node": node, "pid": os.getpid(), "step": step, "t": time.time()}
        with open(folder / f"worker-{os.getpid()}.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        if step != self.kill_before or node == self.head:
            return
        try:
            os.close(os.open(folder / "kill.claim", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return  # the other worker asked, or this run was already killed once
        # let the checkpoint reported before this step reach the controller (it polls every 0.2 s)
        time.sleep(2.0)
        tmp = folder / "kill.json.tmp"
        tmp.write_text(json.dumps({"node": node, "rank": rank, "step": step, "t": time.time()}))
        tmp.rename(folder / "kill.json")
        time.sleep(300)  # until the node goes


def _killer(cluster, folder: Path, done: threading.Event, out: dict) -> None:
    """Driver thread: when a worker asks, remove its node (every process of it, no graceful stop)."""
    marker = folder / "kill.json"
    while not done.is_set():
        if marker.exists():
            ask = json.loads(marker.read_text())
            node = next(n for n in cluster.worker_nodes if n.node_id == ask["node"])
            t0 = time.time()
            cluster.remove_node(node, allow_graceful=False)
            out.update(ask, killed_at=time.time(), kill_s=time.time() - t0)
            return
        time.sleep(0.05)


def train_scenario(cluster, data: str, work: Path, storage: str, kill: bool = True, workers: int = 2,
                   steps: int = STEPS, checkpoint_every: int = CHECKPOINT_EVERY) -> dict:
    from cxrcf.config import preset_params
    from training.generator import make_task
    from training.loop import LoopConfig, fit

    folder = work / "train-events"
    folder.mkdir(parents=True, exist_ok=True)
    params = preset_params("smoke", generator={"optim": {"steps": steps, "checkpoint_every": checkpoint_every,
                                                         "val_every": steps}},
                           ray={"num_workers": workers, "cpus_per_worker": UNIT_CPUS, "storage_path": storage,
                                "max_failures": 1 if kill else 0})
    task = make_task(params, data)
    killed: dict = {}
    done = threading.Event()
    killer = threading.Thread(target=_killer, args=(cluster, folder, done, killed), daemon=True)
    if kill:
        killer.start()
    t0 = time.time()
    try:
        watch = Watch(str(folder), KILL_BEFORE if kill else -1, cluster.head_node.node_id)
        result = fit(LoopConfig(tasks=[task], step_hooks=(watch,)),
                     params.ray, "multinode")
    finally:
        done.set()
    wall = time.time() - t0
    rows = [json.loads(line) for p in sorted(folder.glob("worker-*.jsonl")) for line in p.read_text().splitlines()]
    processes: dict[int, dict] = {}
    for r in sorted(rows, key=lambda r: r["t"]):
        p = processes.setdefault(r["pid"], {"pid": r["pid"], "rank": r["rank"], "node": r["node"], "steps": [],
                                            "first_t": r["t"]})
        p["steps"].append(r["step"])
    cut = killed.get("killed_at", float("inf"))
    attempts = [[p for p in processes.values() if p["first_t"] < cut],
                [p for p in processes.values() if p["first_t"] >= cut]]
    metrics = result.metrics[task.name]
    second_start = min((p["first_t"] for p in attempts[1]), default=None)
    return {
        "storage": result.storage_path, "run_name": result.run_name, "wall_s": wall,
        "steps": steps, "checkpoint_every": checkpoint_every, "metrics": metrics,
        "killed": killed, "attempts": [a for a in attempts if a],
        "recovery_s": (second_start - killed["killed_at"]) if (killed and second_start) else None,
        "exported_keys": len(result.weights[task.name]),
    }


# --------------------------------------------------------------------------------------- augment
def augment_scenario(data: str, work: Path, bundle_dir: Path) -> dict:
    import yaml

    from cxrcf.config import preset_params
    from pipelines.augment import run_augment

    plan = work / "flip.yaml"
    plan.write_text(yaml.safe_dump({"kind": "flip", "attributes": ["sex", "race", "finding"], "max_sources": 6}))
    params = preset_params("smoke", augment={"batch_size": 3, "num_actors": 2, "num_cpus_per_actor": UNIT_CPUS})
    out = work / "augment-out"
    t0 = time.time()
    summary = run_augment(params, data, plan, out, str(bundle_dir))
    return {"summary": summary, "out": str(out), "plan": str(plan), "wall_s": time.time() - t0,
            "actors": actor_nodes("MapWorker")}


# ----------------------------------------------------------------------------------------- serve
GATE_PASSING_EVAL = {"effectiveness": {"sex": {"auc": 0.9}, "race": {"auc": 0.9}, "finding": {"auc": 0.9},
                                       "age": {"mae": 5.0}},
                     "amplification": {"worst": 0.1}}
MODEL = "multinode-generator"


def register_tiny(work: Path, bundle) -> str:
    """`bundle` registered as MODEL in the SQLite registry this process points at; champion; its version."""
    from cxrcf.config import preset_params
    from cxrcf.export import save_model
    from pipelines import registry

    params = preset_params("smoke", registry={"guidance_predictor_name": "multinode-guidance",
                                              "evaluation_predictor_name": "multinode-evaluation"})
    root = work / "register"
    (root / "eval.json").parent.mkdir(parents=True, exist_ok=True)
    (root / "eval.json").write_text(json.dumps(GATE_PASSING_EVAL))
    for part, model in (("generator", bundle.hvae), ("scm", bundle.scm), ("predictor", bundle.predictor)):
        save_model(model, root / part)
    out = registry.register(params, root / "generator", root / "scm", root / "predictor", root / "predictor",
                            "soft", root / "eval.json", name=MODEL)
    assert registry.promote(params, MODEL, out["version"]).ok, "the tiny model did not pass the promotion gates"
    return str(out["version"])


def _register(work: Path, bundle, out: dict) -> None:
    t = time.time()
    try:
        out["version"] = register_tiny(work, bundle)
    except Exception as err:  # noqa: BLE001 (a thread: the main thread reports it)
        out["error"] = f"{type(err).__name__}: {err}"
    out["register_s"] = time.time() - t


def serve_scenario(data: str, requests: int = 24) -> dict:
    import httpx
    from helpers import free_port
    from ray import serve

    from cxrcf.config import ServeConfig, preset_params
    from serving.app import APP_NAME, build_app, wait_ready

    port = free_port()
    # one proxy, on the head node: a proxy on every node of one machine would contend for one port
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    base = preset_params("smoke").serve.model_dump()
    base.update(num_replicas=2, num_cpus=UNIT_CPUS, direct_ingress=False, port=port, reload_poll_s=60.0)
    cfg = ServeConfig.model_validate(base)
    url = f"http://127.0.0.1:{port}"
    t0 = time.time()
    serve.run(build_app(cfg, MODEL, alias="champion", data_root=data), name=APP_NAME, route_prefix="/",
              blocking=False)
    wait_ready(url, timeout_s=240)
    ready_s = time.time() - t0
    # /healthz answers as soon as one replica does; RUNNING means both are up and routable
    deadline = time.monotonic() + 240
    while serve.status().applications[APP_NAME].status != "RUNNING":
        if time.monotonic() > deadline:
            raise RuntimeError(f"serve: {APP_NAME} not RUNNING after 240 s: {serve.status().applications[APP_NAME]}")
        time.sleep(0.25)
    running_s = time.time() - t0
    answered: list[str] = []
    statuses = []
    t0 = time.time()
    with httpx.Client(base_url=url, timeout=60.0) as http:
        deadline = time.monotonic() + 60
        while (len(answered) < requests or len(set(answered)) < 2) and time.monotonic() < deadline:
            r = http.get("/v1/model")
            statuses.append(r.status_code)
            if r.status_code == 200:
                answered.append(r.json()["replica"])
        body = {"image_id": _first_id(data), "interventions": [{"sex": "female"}]}
        get_s = time.time() - t0
        posts = [http.post("/v1/counterfactuals", json=body) for _ in range(4)]
    requests_s = time.time() - t0
    replicas = actor_nodes("ServeReplica")
    proxies = actor_nodes("ProxyActor")
    # no serve.shutdown(): the cluster goes next, with everything on it
    return {"url": url, "ready_s": ready_s, "running_s": running_s, "get_s": get_s, "requests_s": requests_s, "answered_by": answered, "statuses": statuses,
            "post_statuses": [p.status_code for p in posts],
            "post_images": [len(p.json().get("counterfactuals", [])) if p.status_code == 200 else p.text[:300]
                            for p in posts],
            "replicas": replicas, "proxies": proxies}


def _first_id(data: str) -> str:
    import pandas as pd

    return str(pd.read_csv(Path(data) / "metadata.csv")["id"].iloc[0])


# ------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--s3", required=True, help="S3 endpoint URL")
    ap.add_argument("--bucket", required=True)
    ap.add_argument("--scenarios", default="train,augment,serve")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    scenarios = args.scenarios.split(",")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    from helpers import S3_ENV

    os.environ.update(S3_ENV)
    os.environ["AWS_ENDPOINT_URL"] = args.s3
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    os.environ["CXRCF_MLFLOW_ARTIFACTS"] = str(work / "mlartifacts")
    os.environ["RAY_SERVE_ENABLE_DIRECT_INGRESS"] = "0"
    # Serve's proxy sends requests to replicas on its own node while they keep up (one at a time, they
    # always do); off, it spreads them over both nodes, which is what the serve scenario checks
    os.environ["RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING"] = "0"
    import ray

    timings: dict[str, float] = {}
    report: dict = {"scenarios": scenarios}
    registered: dict = {}
    threads = []
    if "augment" in scenarios or "serve" in scenarios:
        from helpers import tiny_bundle

        bundle = tiny_bundle(seed=0)
        bundle_dir = bundle.save(work / "bundle")
        if "serve" in scenarios:
            # MLflow's registration is mostly imports and SQLite: it overlaps the cluster's start and training
            threads.append(threading.Thread(target=_register, args=(work, bundle, registered), daemon=True))
            threads[-1].start()
    t = time.time()
    cluster, nodes = start_cluster()
    timings["cluster_start_s"] = time.time() - t
    report["nodes"] = {label: n.node_id for label, n in nodes.items()}
    report["head"] = cluster.head_node.node_id
    report["ray_tmpdir"] = os.environ.get("RAY_TMPDIR")
    try:
        if "train" in scenarios:
            t = time.time()
            report["train"] = train_scenario(cluster, args.data, work, f"s3://{args.bucket}/ray")
            report["train"]["s3_keys"] = s3_objects(args.s3, args.bucket, f"ray/{report['train']['run_name']}/")
            timings["train_s"] = time.time() - t
        report["nodes_alive_after_train"] = sorted(alive_nodes())
        if "augment" in scenarios:
            t = time.time()
            report["augment"] = augment_scenario(args.data, work, bundle_dir)
            timings["augment_s"] = time.time() - t
        if "serve" in scenarios:
            t = time.time()
            threads[-1].join()
            timings["register_wait_s"] = time.time() - t
            if "error" in registered:
                raise RuntimeError(f"registering the tiny model failed: {registered['error']}")
            report["serve_model_version"] = registered["version"]
            timings["register_s"] = registered["register_s"]
            t = time.time()
            report["serve"] = serve_scenario(args.data)
            timings["serve_s"] = time.time() - t
    finally:
        report["timings"] = timings
        Path(args.out).write_text(json.dumps(report, indent=1, default=str))
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(work / "mlartifacts", ignore_errors=True)
        if OWN_TMP and not os.environ.get("CXRCF_KEEP_RAY_TMP"):
            shutil.rmtree(OWN_TMP, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
