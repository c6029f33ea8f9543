"""Images/s of `cxrcf augment` (Ray Data, actor pool) against a plain single-process loop.

Both sides do the same work per chunk with the same functions (decode -> counterfactual + the
evaluation predictor before/after -> PNG encode + atomic write + manifest part) over the same
cpu-preset-sized bundle (random weights: speed does not depend on training) and the same SynthCXR
images. The plain loop runs the stages one after another in this process, with 1 torch thread and
with one per core (the faster is the baseline: on a busy machine extra threads can be far slower);
the Ray job runs them as a pipeline on a local cluster of all cores, for each actor count.
CPUs per actor are (cores - 0.5) / actors, leaving half a core to the decode/write tasks.

    python benchmarks/augment_throughput.py [--images 3000] [--actors 1,2]
        [--out artifacts/bench/augment_throughput.json]

Throughput counts from the start of the job (actor start-up and model loading included) to the last
image written; `steady_images_per_s` excludes the time to the first finished chunk.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cxrcf.cli import quiet_env

quiet_env()  # as every cxrcf command: Ray token auth on, telemetry off


def build_inputs(work: Path, n_images: int, preset: str, seed: int = 0):
    """A SynthCXR dataset of n_images and a randomly initialised bundle of the preset's sizes."""
    import torch

    from cxrcf.bundle import GeneratorBundle
    from cxrcf.config import preset_params
    from cxrcf.data import load_metadata, parents_from_frame
    from cxrcf.hvae import HVAE
    from cxrcf.predictor import Predictor
    from cxrcf.scm import AttributeSCM
    from cxrcf.synth import generate_dataset

    params = preset_params(preset)
    synth = params.data.synth.model_copy(update={"n_images": n_images, "seed": seed})
    data = work / "data"
    generate_dataset(data, synth)
    torch.manual_seed(seed)
    scm = AttributeSCM(params.scm.model_copy(update={"steps": 200}))
    scm.fit(parents_from_frame(load_metadata(data)))
    bundle = GeneratorBundle(HVAE(params.generator.arch), scm, Predictor(params.predictors.evaluation.arch),
                             {"name": f"bench-{preset}", "mode": "none", "preset": preset})
    return params, data, bundle.save(work / "bundle")


def plain_loop(params, data: Path, plan_path: Path, bundle_dir: Path, out: Path, threads: int) -> dict:
    """The same stages as the Ray job, called in sequence in this process."""
    import numpy as np

    from cxrcf.data import load_metadata
    from pipelines.augment import (
        Counterfactualizer,
        RunFolder,
        _items_payload,
        _sha256_file,
        chunk_seed,
        decode_chunk,
        resolve_model,
        write_chunk,
    )
    from pipelines.augment_plan import chunk_items, expand_plan, load_plan

    t0 = time.perf_counter()
    plan = load_plan(plan_path)
    seed = plan.seed if plan.seed is not None else params.augment.seed
    t_u = plan.t_u if plan.t_u is not None else params.augment.t_u
    chunks = chunk_items(expand_plan(plan, load_metadata(data), data, seed), params.augment.batch_size)
    model_ref, model, resolution = resolve_model(str(bundle_dir))
    folder = RunFolder(out)
    folder.claim({"plain": _sha256_file(data / "metadata.csv")})
    actor = Counterfactualizer(model_ref, t_u, num_threads=threads, use_gpu=False, env={})
    first = None
    for c in chunks:
        row = {"chunk": c.index, "items": _items_payload(c), "seed": chunk_seed(seed, c)}
        row = decode_chunk(row, resolution)
        batch = {k: v[None] if isinstance(v, np.ndarray) else np.array([v], dtype=object)
                 for k, v in row.items()}
        res = actor(batch)
        write_chunk({k: v[0] for k, v in res.items()}, str(out), model, t_u, seed)
        first = first or time.perf_counter()
    end = time.perf_counter()
    n = sum(len(c.items) for c in chunks)
    first_chunk = len(chunks[0].items)
    return {"images": n, "threads": threads, "seconds": round(end - t0, 3),
            "images_per_s": round(n / (end - t0), 2),
            "steady_images_per_s": round((n - first_chunk) / (end - first), 2) if end > first else None}


class _Clock:
    """Progress sink that remembers when the first chunk finished (for the steady-state rate)."""

    def __init__(self):
        self.first = None
        self.first_images = 0

    def write(self, text: str) -> None:
        match = re.search(r"augment: (\d+)/\d+ images", text)
        if self.first is None and match:
            self.first, self.first_images = time.perf_counter(), int(match.group(1))

    def flush(self) -> None:
        pass


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def ray_job(params, data: Path, plan_path: Path, bundle_dir: Path, out: Path, actors: int) -> dict:
    from pipelines.augment import run_augment

    cores = _cores()
    cfg = params.augment.model_copy(update={"num_actors": actors,
                                            "num_cpus_per_actor": round((cores - 0.5) / actors, 3)})
    run_params = params.model_copy(update={"augment": cfg})
    clock = _Clock()
    t0 = time.perf_counter()
    summary = run_augment(run_params, data, plan_path, out, str(bundle_dir), progress_stream=clock)
    end = time.perf_counter()
    n = summary["written"]
    return {"actors": actors, "num_cpus_per_actor": cfg.num_cpus_per_actor, "images": n,
            "seconds": round(end - t0, 3), "images_per_s": round(n / (end - t0), 2),
            "steady_images_per_s": round((n - clock.first_images) / (end - clock.first), 2)
            if clock.first and end > clock.first
            else None, "failed": summary["failed"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--actors", default=None,
                    help="comma-separated actor counts (default: 1 up to the cores)")
    ap.add_argument("--batch-size", type=int, default=None, help="default: the preset's augment.batch_size")
    ap.add_argument("--plain-threads", default=None,
                    help="comma-separated torch thread counts for the plain loop; the fastest is "
                         "the baseline "
                         "(default: 1 and one per core)")
    ap.add_argument("--out", default="artifacts/bench/augment_throughput.json")
    ap.add_argument("--workdir", default=None, help="keep inputs/outputs here (default: a temporary folder)")
    args = ap.parse_args(argv)

    import ray
    import yaml

    from cxrcf.fileio import write_json

    cores = _cores()
    actors = [int(a) for a in args.actors.split(",")] if args.actors else list(range(1, cores + 1))
    work = Path(args.workdir or tempfile.mkdtemp(prefix="cxrcf-augbench-"))
    try:
        print(f"building {args.images} images and a {args.preset}-sized bundle in {work} ...", flush=True)
        params, data, bundle_dir = build_inputs(work, args.images, args.preset)
        if args.batch_size:
            params = params.model_copy(update={"augment": params.augment.model_copy(
                update={"batch_size": args.batch_size})})
        plan = work / "plan.yaml"
        plan.write_text(yaml.safe_dump({"kind": "flip", "attributes": ["sex"]}))

        threads = ([int(t) for t in args.plain_threads.split(",")] if args.plain_threads
                   else sorted({1, cores}))
        plains = []
        for t in threads:
            shutil.rmtree(work / "out-plain", ignore_errors=True)
            print(f"plain loop, {t} torch thread(s) ...", flush=True)
            plains.append(plain_loop(params, data, plan, bundle_dir, work / "out-plain", t))
            print(f"  {plains[-1]}", flush=True)
        plain = max(plains, key=lambda r: r["images_per_s"])
        ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
        runs = []
        for n in actors:
            shutil.rmtree(work / f"out-ray-{n}", ignore_errors=True)
            print(f"ray data job, {n} actor(s) ...", flush=True)
            runs.append(ray_job(params, data, plan, bundle_dir, work / f"out-ray-{n}", n))
            print(f"  {runs[-1]}", flush=True)
        ray.shutdown()
        best = max(runs, key=lambda r: r["images_per_s"])
        result = {
            "benchmark": "augment_throughput",
            "preset": args.preset,
            "images": args.images,
            "resolution": params.generator.arch.resolution,
            "batch_size": params.augment.batch_size,
            "cores": cores,
            "plain_loop": plain,
            "plain_loop_by_threads": plains,
            "ray_data": runs,
            "best_ray_actors": best["actors"],
            "ratio_best_to_plain": round(best["images_per_s"] / plain["images_per_s"], 3),
            "ratio_steady_best_to_plain": round(max(r["steady_images_per_s"] or 0 for r in runs)
                                                / plain["steady_images_per_s"], 3)
            if plain["steady_images_per_s"] else None,
            "target_ratio": 0.9,
            "scaling_vs_one_actor": {str(r["actors"]): round(r["images_per_s"] / runs[0]["images_per_s"], 3)
                                     for r in runs},
            "note": "measured on a shared machine; other processes may have competed for the cores",
        }
        result["meets_target"] = result["ratio_best_to_plain"] >= 0.9
        write_json(args.out, result)
        print(json.dumps(result, indent=2))
        print(f"wrote {args.out}")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
