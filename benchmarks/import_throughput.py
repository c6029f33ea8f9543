"""Images/s of `cxrcf data import-mimic` on a synthetic archive shaped as PhysioNet ships it.

The archive (tests/mimic_archive.py) has gzipped MIMIC-CXR-JPG tables with the official split,
MIMIC-IV patients/admissions in the sibling `mimiciv/2.2/hosp/`, and `--images` JPEGs of
`--size` x `--size` pixels under files/p1x/...; every row passes the filters, so every image is
decoded, resized (224, then `--resolution`) and written. To keep the set-up short only
`--distinct` different JPEGs are encoded and their bytes reused: decode cost does not depend on
which picture it is. Real MIMIC-CXR-JPG images are about 2500x3000 and cost several times more
to decode than the default 512x512 here.

For each worker count the whole import runs from scratch (tables + images + dataset files);
`images_per_s` counts the image pass only, `total_s` everything. The JSON also holds the
machine's 2-thread fp32 matmul rate and load average, to read the numbers against.

    python benchmarks/import_throughput.py [--images 20000] [--size 512] [--workers 1,2]
        [--out artifacts/bench/import_throughput.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))


def matmul_gflops(threads: int = 2, n: int = 1024, repeats: int = 10) -> float:
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b
        t0 = time.perf_counter()
        for _ in range(repeats):
            a @ b
        return 2 * n**3 * repeats / (time.perf_counter() - t0) / 1e9
    finally:
        torch.set_num_threads(old)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=20000)
    ap.add_argument("--size", type=int, default=512, help="JPEG side in pixels")
    ap.add_argument("--distinct", type=int, default=500, help="different JPEGs encoded (bytes reused)")
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    ap.add_argument("--chunk-size", type=int, default=256)
    ap.add_argument("--workdir", default=None, help="where to build the archive (default: a temp folder)")
    ap.add_argument("--out", default="artifacts/bench/import_throughput.json")
    args = ap.parse_args()

    from mimic_archive import write_archive

    from cxrcf.importers import import_mimic

    work = Path(args.workdir or tempfile.mkdtemp(prefix="import-bench-"))
    t0 = time.perf_counter()
    root = write_archive(work / "archive", args.images, size=args.size, distinct_images=args.distinct)
    build_s = time.perf_counter() - t0
    jpegs = list((root / "files").rglob("*.jpg"))
    archive_bytes = sum(p.stat().st_size for p in jpegs)
    print(f"archive: {len(jpegs)} JPEGs of {args.size}x{args.size}, {archive_bytes / 1e6:.0f} MB, "
          f"built in {build_s:.1f}s -> {root}", flush=True)

    runs = []
    for workers in (int(w) for w in args.workers.split(",")):
        out = work / f"data-{workers}"
        shutil.rmtree(out, ignore_errors=True)
        load_before = os.getloadavg()[0]
        t0 = time.perf_counter()
        info = import_mimic(root, out, resolution=args.resolution, workers=workers, chunk_size=args.chunk_size,
                            progress_s=10.0)
        total = time.perf_counter() - t0
        run = {"workers": workers, "images": info["counts"]["total"], "total_s": round(total, 2),
               "image_pass_s": info["throughput"]["seconds"], "images_per_s": info["throughput"]["images_per_s"],
               "total_images_per_s": round(info["counts"]["total"] / total, 2),
               "load_average_1m_before": round(load_before, 2), "load_average_1m_after": round(os.getloadavg()[0], 2)}
        print(json.dumps(run), flush=True)
        runs.append(run)
        shutil.rmtree(out, ignore_errors=True)

    result = {"benchmark": "import_throughput", "archive_images": len(jpegs), "jpeg_size": args.size,
              "distinct_jpegs": args.distinct, "archive_mb": round(archive_bytes / 1e6, 1),
              "resolution": args.resolution, "chunk_size": args.chunk_size, "runs": runs,
              "cpus": os.cpu_count(), "matmul_2thread_fp32_gflops": round(matmul_gflops(), 1),
              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
