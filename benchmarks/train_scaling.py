"""Training throughput of the generator phase (cpu preset): Ray Train with 1 and 2 workers against
the same step run in plain PyTorch in one process, i.e. the overhead of Ray Train.

Images/s exclude start-up: the loop times only its training steps after the first 3 (no validation
or checkpoint falls inside the measured steps). Writes JSON to --out and prints it.

    python benchmarks/train_scaling.py --steps 200 [--data data] [--out artifacts/bench/train_scaling.json]

`--multinode`: 2 workers on one node against 2 workers on 2 nodes (a `ray.cluster_utils.Cluster` on
this machine, tests/multinode_cluster.py), each with checkpoints on local disk and on S3 (moto's
server on loopback), i.e. the overhead of the second node and of S3 checkpointing. One machine, so
no speed-up is possible: the second node only adds its processes and the loopback hops between them.
Reported per case: the loop's images/s (steps only), seconds per checkpoint (written and stored:
`report()` returns once the checkpoint is in storage), the fit's wall time, where the workers ran,
the load average and a same-run 2-thread fp32 matmul rate to read them against.

    python benchmarks/train_scaling.py --multinode --steps 40 --checkpoint-every 10 \
        [--out benchmarks/results/train_multinode_<date>.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# this checkout's packages, not whichever one the environment's editable install points at
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cxrcf.cli import quiet_env

quiet_env()  # as every cxrcf command: Ray token auth on, telemetry off

WARMUP_STEPS = 3  # the same exclusion training.loop applies to its own figure


def plain_pytorch(task, steps: int, threads: int) -> float:
    """The loop's step (forward, backward, clip/skip, AdamW, EMA) in one process without Ray."""
    import torch

    from training.loop import EMA, Batcher, optimizer_step, step_rng, warmup_lr

    torch.set_num_threads(threads)
    torch.manual_seed(task.optim.seed)
    objective = task.build()
    model = objective.model
    ema = EMA(model, task.optim.ema_rate)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=task.optim.lr, betas=task.optim.betas, weight_decay=task.optim.weight_decay)
    x_train, p_train = task.data("train")
    batcher = Batcher(len(x_train), task.optim.batch_size, task.optim.seed)
    objective.train()
    timed, images = 0.0, 0
    for step in range(steps):
        t0 = time.perf_counter()
        idx = batcher.next()
        x, parents = x_train[idx], {k: v[idx] for k, v in p_train.items()}
        for group in opt.param_groups:
            group["lr"] = warmup_lr(task.optim, step)
        out = objective(x, parents, step_rng(task.optim.seed, step, 0, torch.device("cpu")))
        _, applied = optimizer_step(out["loss"], opt, params, task.optim)
        if applied:
            ema.update(model)
        [float(v.detach()) for v in out.values()]
        if step >= WARMUP_STEPS:
            timed += time.perf_counter() - t0
            images += task.optim.batch_size
    return images / timed


def plain_in_subprocess(data: str, steps: int) -> float:
    """The plain loop in a fresh process with OMP_NUM_THREADS=1, the environment Ray gives a 1-CPU
    worker; in this process, thread pools already started (e.g. by data generation) would compete."""
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, __file__, "--plain-only", "--data", data, "--steps", str(steps)],
                         env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def ray_train(task, steps: int, workers: int, storage: Path) -> tuple[float, float]:
    """(images/s from the loop's own timing, wall seconds of the whole fit including start-up)."""
    from cxrcf.config import RayConfig
    from training.loop import LoopConfig, fit

    t0 = time.perf_counter()
    result = fit(LoopConfig(tasks=[task], progress_every=max(1, steps // 4)),
                 RayConfig(num_workers=workers, cpus_per_worker=1.0, storage_path=str(storage), max_failures=0),
                 f"bench-{workers}w")
    return result.metrics[task.name]["images_per_s"], time.perf_counter() - t0


def multinode(task, data: str, steps: int, checkpoint_every: int, tmp: Path, repeats: int) -> dict:
    """{cases, overheads} for 2 workers on 1 and on 2 nodes, with local and S3 checkpoint storage."""
    sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1] / "tests")]
    import multinode_cluster
    import ray
    from helpers import S3_ENV, moto_s3
    from import_throughput import matmul_gflops
    from multinode_cluster import UNIT_CPUS, Watch, s3_objects, start_cluster
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(multinode_cluster)  # its step hook runs on workers that cannot import it

    from cxrcf.config import RayConfig
    from training.loop import LoopConfig, fit

    bucket = "cxrcf-bench"
    cases = []
    with moto_s3(tmp / "s3", bucket) as endpoint:
        os.environ.update({**S3_ENV, "AWS_ENDPOINT_URL": endpoint})
        for rep in range(repeats):
            for nodes in (1, 2):
                # 1 node holds both 2-CPU workers; 2 nodes of 3 CPUs hold one each
                cluster, _ = start_cluster(worker_nodes=nodes - 1, cpus=2 * int(UNIT_CPUS) if nodes == 1 else 3)
                try:
                    for storage in ("local", "s3"):
                        folder = tmp / f"events-{rep}-{nodes}-{storage}"
                        folder.mkdir()
                        path = str(tmp / "ray") if storage == "local" else f"s3://{bucket}/ray"
                        gflops = matmul_gflops()
                        load = os.getloadavg()[0]
                        print(f"2 workers on {nodes} node(s), checkpoints on {storage} (matmul {gflops:.0f} "
                              f"GFLOP/s, load {load:.1f}) ...", flush=True)
                        t0 = time.perf_counter()
                        result = fit(LoopConfig(tasks=[task], step_hooks=(Watch(str(folder), -1, ""),)),
                                     RayConfig(num_workers=2, cpus_per_worker=UNIT_CPUS, storage_path=path,
                                               max_failures=0), f"bench-{nodes}n-{storage}")
                        wall = time.perf_counter() - t0
                        gflops = (gflops + matmul_gflops()) / 2  # before and after: the load moves during a fit
                        m = result.metrics[task.name]
                        placed = {}
                        for line_file in folder.glob("worker-*.jsonl"):
                            first = json.loads(line_file.read_text().splitlines()[0])
                            placed[str(first["rank"])] = first["node"]
                        case = {"nodes": nodes, "storage": storage, "repeat": rep,
                                "images_per_s": m["images_per_s"],
                                "images_per_s_per_matmul_gflops": m["images_per_s"] / gflops,
                                "checkpoints": m["checkpoints"],
                                "s_per_checkpoint": m["checkpoint_s"] / m["checkpoints"] if m["checkpoints"] else None,
                                "fit_wall_s": wall, "worker_nodes": placed,
                                "distinct_worker_nodes": len(set(placed.values())),
                                "matmul_2thread_fp32_gflops": gflops, "load_average_1m": load,
                                "storage_uri": result.storage_path}
                        if storage == "s3":  # the checkpoints are in the bucket, not in a local folder
                            case["s3_objects"] = len(s3_objects(endpoint, bucket, f"ray/{result.run_name}/"))
                            assert case["s3_objects"] > 0 and not Path("s3:").exists(), case
                        cases.append(case)
                        print(f"  {case['images_per_s']:.1f} images/s, {case['s_per_checkpoint']:.2f} s per checkpoint, "
                              f"fit {wall:.1f} s, workers on {case['distinct_worker_nodes']} node(s)", flush=True)
                finally:
                    ray.shutdown()
                    cluster.shutdown()

    def mean(nodes: int, storage: str, key: str) -> float:
        values = [c[key] for c in cases if c["nodes"] == nodes and c["storage"] == storage]
        return sum(values) / len(values)

    # step throughput per GFLOP/s of the matmul measured around the same fit: the machine is shared, and
    # its speed moves by 2x within minutes, more than the effects measured here
    rate = "images_per_s_per_matmul_gflops"
    base_rate, base_ckpt = mean(1, "local", rate), mean(1, "local", "s_per_checkpoint")
    overheads = {
        # fraction of (matmul-normalised) step throughput lost: positive is slower
        "second_node_step_overhead": 1 - mean(2, "local", rate) / base_rate,
        "s3_step_overhead_1_node": 1 - mean(1, "s3", rate) / base_rate,
        "second_node_and_s3_step_overhead": 1 - mean(2, "s3", rate) / base_rate,
        # extra seconds per checkpoint (rank 0 writes it, report() returns once it is stored)
        "second_node_extra_s_per_checkpoint": mean(2, "local", "s_per_checkpoint") - base_ckpt,
        "s3_extra_s_per_checkpoint_1_node": mean(1, "s3", "s_per_checkpoint") - base_ckpt,
        "s3_extra_s_per_checkpoint_2_nodes": mean(2, "s3", "s_per_checkpoint") - mean(2, "local", "s_per_checkpoint"),
        "s_per_checkpoint": {f"{n}_node{'s' if n > 1 else ''}_{st}": mean(n, st, "s_per_checkpoint")
                             for n in (1, 2) for st in ("local", "s3")},
        "fit_wall_s": {f"{n}_node{'s' if n > 1 else ''}_{st}": mean(n, st, "fit_wall_s")
                       for n in (1, 2) for st in ("local", "s3")},
    }
    return {"cases": cases, "overheads": overheads}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--data", default=None, help="dataset root (default: generate 2,000 cpu-preset images)")
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    parser.add_argument("--out", default="artifacts/bench/train_scaling.json")
    parser.add_argument("--plain-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--multinode", action="store_true",
                        help="2 workers on 1 vs 2 nodes, checkpoints on local disk vs S3 (see above)")
    parser.add_argument("--checkpoint-every", type=int, default=10, help="with --multinode")
    parser.add_argument("--repeats", type=int, default=1, help="with --multinode: passes over the 4 cases")
    args = parser.parse_args(argv)
    if args.multinode and "RAY_TMPDIR" not in os.environ:
        # Cluster writes <temp>/ray/ray_current_cluster, which a plain ray.init() elsewhere would join
        os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="cxbench-", dir="/tmp")
        import atexit
        import shutil

        atexit.register(shutil.rmtree, os.environ["RAY_TMPDIR"], ignore_errors=True)

    import ray

    from cxrcf.config import preset_params
    from cxrcf.fileio import write_json
    from training.generator import make_task

    steps = args.steps
    # No validation or checkpoint inside the measured steps (--multinode: checkpoints, which the loop does not time).
    every = args.checkpoint_every if args.multinode else steps
    params = preset_params("cpu", generator={"optim": {"steps": steps, "val_every": steps, "checkpoint_every": every}})
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if data is None:
            from cxrcf.synth import generate_dataset

            data = str(Path(tmp) / "data")
            synth = params.data.synth.model_copy(update={"n_images": 2000})
            print(f"generating {synth.n_images} SynthCXR images at {synth.resolution}px ...", flush=True)
            generate_dataset(data, synth)
        task = make_task(params, data)
        if args.plain_only:
            print(plain_pytorch(task, steps, threads=1))
            return 0
        if args.multinode:
            os.environ.setdefault("OMP_NUM_THREADS", "1")  # one torch thread per worker, as in the other cases
            grid = multinode(task, data, steps, every, Path(tmp), args.repeats)
            report = {
                "benchmark": "train_scaling_multinode", "preset": "cpu", "phase": "generator", "steps": steps,
                "checkpoint_every": every, "global_batch_size": params.generator.optim.batch_size,
                "resolution": params.generator.arch.resolution, "workers": 2, **grid,
                "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0]},
                "note": "one machine: the second node is a second raylet and its processes, not more CPUs; S3 is "
                        "moto's server on loopback (no network latency); images/s exclude checkpoints, which "
                        "s_per_checkpoint measures on rank 0 (written + stored); 1 torch thread per worker",
                "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            write_json(args.out, report)
            print(json.dumps(report, indent=2))
            return 0
        print("plain PyTorch, 1 process, 1 thread ...", flush=True)
        plain_before = plain_in_subprocess(data, steps)
        print(f"  {plain_before:.1f} images/s", flush=True)
        ray.init(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False)
        try:
            results = {}
            for workers in [int(w) for w in args.workers.split(",")]:
                print(f"Ray Train, {workers} worker(s) ...", flush=True)
                ips, wall = ray_train(task, steps, workers, Path(tmp) / "ray")
                results[str(workers)] = {"images_per_s": ips, "fit_wall_s": wall}
                print(f"  {ips:.1f} images/s (fit incl. start-up {wall:.1f}s)", flush=True)
        finally:
            ray.shutdown()
        # Once more after Ray, so that a change in background load shows up as a spread, not as overhead.
        print("plain PyTorch again ...", flush=True)
        plain_after = plain_in_subprocess(data, steps)
        print(f"  {plain_after:.1f} images/s", flush=True)
    one = results.get("1", {}).get("images_per_s")
    plain = (plain_before + plain_after) / 2
    report = {
        "benchmark": "train_scaling", "preset": "cpu", "phase": "generator", "steps": steps,
        "global_batch_size": params.generator.optim.batch_size, "resolution": params.generator.arch.resolution,
        "plain_pytorch_images_per_s": plain,
        "plain_pytorch_runs_images_per_s": [plain_before, plain_after], "ray_train": results,
        "ray_overhead_1_worker": (1 - one / plain) if one else None,
        "speedup_2_workers": (results["2"]["images_per_s"] / one) if (one and "2" in results) else None,
        "overhead_target": 0.10,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0],
                    "load_average": os.getloadavg()},
        "note": "images/s exclude start-up (first 3 steps, worker launch); each worker and the plain loop use "
                "1 CPU thread; numbers are noisy when other processes share the CPUs",
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_json(args.out, report)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
