"""Training throughput of the generator phase (cpu preset): Ray Train with 1 and 2 workers against
the same step run in plain PyTorch in one process, i.e. the overhead of Ray Train.

Images/s exclude start-up: the loop times only its training steps after the first 3 (no validation
or checkpoint falls inside the measured steps). Writes JSON to --out and prints it.

    python benchmarks/train_scaling.py --steps 200 [--data data] [--out artifacts/bench/train_scaling.json]
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--data", default=None, help="dataset root (default: generate 2,000 cpu-preset images)")
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    parser.add_argument("--out", default="artifacts/bench/train_scaling.json")
    parser.add_argument("--plain-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    import ray

    from cxrcf.config import preset_params
    from cxrcf.fileio import write_json
    from training.generator import make_task

    steps = args.steps
    # No validation or checkpoint inside the measured steps.
    params = preset_params("cpu", generator={"optim": {"steps": steps, "val_every": steps, "checkpoint_every": steps}})
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
