"""SynthCXR generation speed: render + PNG write of N images (default 20,000 at 64x64).

    .venv/bin/python benchmarks/synth_speed.py [--n 20000] [--resolution 64] [--workers 2]
        [--out artifacts/bench/synth_speed.json]

Also times rendering alone (in-process, no files) and loading the written train split back as tensors.
Besides wall time it records CPU seconds (this process plus its workers), which stay meaningful when
other jobs share the cores: wall time on an idle machine is about cpu_seconds / workers.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=20000)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--out", default="artifacts/bench/synth_speed.json")
    args = p.parse_args(argv)

    from cxrcf import synth
    from cxrcf.config import preset_params
    from cxrcf.data import load_split
    from cxrcf.fileio import write_json

    cfg = preset_params("cpu").data.synth.model_copy(update={"n_images": args.n, "resolution": args.resolution})
    exo = synth.sample_exogenous(min(args.n, 4096), cfg.seed, cfg)
    attrs = synth.attributes_from_noise(exo, cfg)
    t0, c0 = time.perf_counter(), time.process_time()
    synth.render(attrs, exo, args.resolution)
    render_rate = len(attrs["age"]) / (time.perf_counter() - t0)
    render_cpu_us = (time.process_time() - c0) / len(attrs["age"]) * 1e6
    print(f"render only: {render_rate:.0f} images/s (1 process), {render_cpu_us:.0f} CPU us/image", flush=True)

    scratch = Path(tempfile.mkdtemp(prefix="synth_speed_"))
    try:
        t0, c0, k0 = time.perf_counter(), time.process_time(), _children_cpu()
        synth.generate_dataset(scratch / "data", cfg, workers=args.workers, progress=True)
        total = time.perf_counter() - t0
        cpu = time.process_time() - c0 + _children_cpu() - k0
        t0 = time.perf_counter()
        train = load_split(scratch / "data", "train", args.resolution)
        load_s = time.perf_counter() - t0
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    result = {
        "n_images": args.n,
        "resolution": args.resolution,
        "workers": args.workers or "auto",
        "generate_seconds": round(total, 2),
        "images_per_second": round(args.n / total, 1),
        "generate_cpu_seconds": round(cpu, 2),
        "render_only_images_per_second": round(render_rate, 1),
        "render_only_cpu_us_per_image": round(render_cpu_us, 1),
        "load_train_split_seconds": round(load_s, 2),
        "load_train_images": int(train.x.shape[0]),
        "cpu_count": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
    }
    write_json(args.out, result)
    print(f"generated {args.n} images at {args.resolution}x{args.resolution} in {total:.1f}s "
          f"({result['images_per_second']:.0f} images/s, {cpu:.1f} CPU s); loaded {result['load_train_images']} train images "
          f"in {load_s:.1f}s -> {args.out}")
    return 0


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


if __name__ == "__main__":
    raise SystemExit(main())
