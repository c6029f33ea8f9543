"""Load benchmark of the counterfactual API: throughput and latency with dynamic batching on and off.

    python benchmarks/serve_load.py [--preset cpu] [--concurrency 1 8 32 64] [--out artifacts/bench/serve_load.json]

Self-contained and localhost only: registers an untrained generator bundle of the preset's
architecture (timing does not depend on the weights) in a temporary MLflow store, serves it with
`serving.app` on a local Ray cluster, and drives POST /v1/counterfactuals from `concurrency`
closed-loop clients for a bounded number of requests per level. "Batching off" is the same
deployment reconfigured to max_batch_size 1: same CPUs, same threads rule (a batch of one runs on
one torch thread, which is what unbatched serving is fastest with). Requests go to the replica's
direct-ingress port (`--via direct`, the default with serve.direct_ingress) or through the Serve
proxy (`--via proxy`). Writes JSON with throughput, p50/p95/p99 latency and
the mean batch size the server formed (from each reply's model.batch_size).

Then the cost of the protections that can be switched (`--protections-concurrency`, default 32, batching on;
0 skips it): the same deployment with API keys on, with the canary answering 10% of requests from the
`candidate` alias (a second registered version), and with 25% of the champion's requests shadowed to it,
each against the mean of the defaults measured just before and just after it in the same run. Budgets, deadlines, the body
limit, metrics and the access log are always on and inside every number.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
from import_throughput import matmul_gflops  # the benchmarks' shared machine-speed probe

from cxrcf.cli import quiet_env

quiet_env()  # as every cxrcf command: Ray token auth on, telemetry off

INTERVENTIONS = [{"sex": "female"}, {"age": 75.0}, {"finding": "pleural_effusion"}, {"race": "black"}]
PARENTS = {"sex": "male", "race": "white", "age": 52.0, "finding": "no_finding"}
PASSING_EVAL = {"effectiveness": {"sex": {"auc": 0.9}, "race": {"auc": 0.9}, "finding": {"auc": 0.9},
                                  "age": {"mae": 5.0}}, "amplification": {"worst": 0.0}}


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="cpu", choices=("smoke", "cpu", "paper"), help="architecture to serve")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    p.add_argument("--requests", type=int, default=0,
                   help="requests per level (default max(200, 10 x concurrency), at most 640)")
    p.add_argument("--max-batch-size", type=int, default=32, help="the batching-on setting")
    p.add_argument("--batch-wait-timeout-s", type=float, default=None, help="default params.serve's")
    p.add_argument("--image-size", type=int, default=64, help="side of the PNG each request sends")
    p.add_argument("--num-cpus", type=float, default=None, help="CPUs per model replica (default params.serve's)")
    p.add_argument("--parallel-min-batch", type=int, default=None, help="default params.serve's")
    p.add_argument("--via", choices=("direct", "proxy"), default="direct",
                   help="send requests to the replica's direct-ingress port or through the Serve proxy")
    p.add_argument("--max-ongoing-requests", type=int, default=None,
                   help="per replica (default: the larger of params.serve's, 2 x max batch and the top concurrency)")
    p.add_argument("--max-queued-requests", type=int, default=None, help="default params.serve's")
    p.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per model replica (bf16 autocast)")
    p.add_argument("--protections-concurrency", type=int, default=32,
                   help="clients for the protection-cost phase (0: skip it)")
    p.add_argument("--out", default="artifacts/bench/serve_load.json")
    return p.parse_args(argv)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _register(params, root: Path) -> str:
    """An untrained bundle of the preset's architecture, registered and promoted, then registered again
    as the `candidate` (for the canary); returns its name."""
    import torch

    from cxrcf.export import save_model
    from cxrcf.hvae import HVAE
    from cxrcf.predictor import Predictor
    from cxrcf.scm import AttributeSCM
    from pipelines import registry

    torch.manual_seed(0)
    parts = {"generator": HVAE(params.generator.arch), "scm": AttributeSCM(params.scm),
             "predictor": Predictor(params.predictors.evaluation.arch)}
    for part, model in parts.items():
        save_model(model, root / part)
    (root / "eval.json").write_text(json.dumps(PASSING_EVAL))
    name = "bench-generator"
    out = registry.register(params, root / "generator", root / "scm", root / "predictor", root / "predictor",
                            "soft", root / "eval.json", name=name)
    registry.promote(params, name, out["version"])
    registry.register(params, root / "generator", root / "scm", root / "predictor", root / "predictor",
                      "soft", root / "eval.json", name=name)
    return name


def _body(size: int, i: int) -> dict:
    from PIL import Image

    pixels = np.random.default_rng(i).integers(0, 256, (size, size), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return {"image": base64.b64encode(buf.getvalue()).decode(), "parents": PARENTS,
            "interventions": [INTERVENTIONS[i % len(INTERVENTIONS)]], "t_u": 1.0, "seed": 0}


async def _level(url: str, bodies: list[bytes], concurrency: int, total: int, key: str | None = None) -> dict:
    # aiohttp with pre-serialised bodies: on 2 cores the load generator shares the CPUs with the server,
    # and httpx plus per-request JSON encoding cost it several times more CPU per request.
    import aiohttp

    latencies, sizes, errors, statuses = [], [], [], {}
    counter = iter(range(total))
    headers = {"Content-Type": "application/json"} | ({"X-API-Key": key} if key else {})

    async def worker(http):
        for i in counter:
            start = time.perf_counter()
            async with http.post(url + "/v1/counterfactuals", data=bodies[i % len(bodies)], headers=headers) as r:
                raw = await r.read()
            latencies.append(time.perf_counter() - start)
            statuses[str(r.status)] = statuses.get(str(r.status), 0) + 1
            if r.status == 200:
                sizes.append(json.loads(raw)["model"]["batch_size"])
            else:
                errors.append(f"{r.status}: {raw[:200].decode(errors='replace')}")

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=300)) as http:
        start = time.perf_counter()
        await asyncio.gather(*(worker(http) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    lat = np.array(latencies) * 1000
    return {"concurrency": concurrency, "requests": total, "errors": len(errors), "first_errors": errors[:3],
            "statuses": statuses,
            "wall_s": round(wall, 3), "throughput_rps": round(total / wall, 2),
            "goodput_rps": round(statuses.get("200", 0) / wall, 2),
            "latency_ms": {q: round(float(np.percentile(lat, p)), 1) for q, p in
                           (("p50", 50), ("p95", 95), ("p99", 99))} | {"mean": round(float(lat.mean()), 1)},
            "mean_batch_size": round(float(np.mean(sizes)), 2) if sizes else 0.0,
            "loadavg_1m": round(os.getloadavg()[0], 2)}


def _deploy(cfg, name: str, proxy_url: str, via: str, previous: str | None, keys: list[str]) -> dict:
    """Deploy `cfg` and wait for its replica: a redeploy rolls the replica (onto a new direct port, and the
    old one answers while it drains), so this waits until one replica is left and it is not `previous`.
    Returns {url, replica, info}."""
    import httpx
    from ray import serve

    from serving import ingress
    from serving.app import APP_NAME, build_app, wait_ready

    # every protection at its default (serving/policy.py); only the local copy goes to the temp dir
    serve.run(build_app(cfg, name, alias="champion", api_keys=keys), name=APP_NAME, route_prefix="/", blocking=False)
    wait_ready(proxy_url)
    headers = {"X-API-Key": keys[0]} if keys else {}
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        found = ingress.wait_urls(cfg, APP_NAME) if via == "direct" else [proxy_url]
        if len(found) == 1:
            info = httpx.get(found[0] + "/v1/model", headers=headers).json()
            if info["replica"] != previous:
                return {"url": found[0], "replica": info["replica"], "info": info}
        time.sleep(0.5)
    raise RuntimeError(f"no single new replica after 120s (previous {previous})")


def _row(url, bodies, c, total, key=None) -> dict:
    row = asyncio.run(_level(url, bodies, c, total, key))
    print(f"  concurrency {c:>3}: {row['throughput_rps']:>7.1f} req/s  goodput {row['goodput_rps']:>7.1f}  p50 "
          f"{row['latency_ms']['p50']:>7.1f} ms  p99 {row['latency_ms']['p99']:>7.1f}  mean batch "
          f"{row['mean_batch_size']:.2f}  statuses {row['statuses']}  load {row['loadavg_1m']}", flush=True)
    return row


# the switchable protections, each measured between two runs of the defaults (serve_load's deployment as it is)
PROTECTIONS = {
    "api_keys": ({}, True),
    "canary_split_10pct": ({"canary": {"weight": 0.1}}, False),
    "canary_shadow_25pct": ({"canary": {"shadow": 0.25}}, False),
}


def _protections(base: dict, name: str, proxy_url: str, via: str, bodies, c: int, previous: str) -> dict:
    """Throughput and latency with each switchable protection on, each against the mean of the defaults
    measured just before and just after it (the machine's load drifts; neighbours drift least)."""
    import httpx

    from cxrcf.config import ServeConfig

    total = min(640, max(200, 10 * c))
    plan = [("defaults", {}, False)]
    for label, (extra, keyed) in PROTECTIONS.items():
        plan += [(label, extra, keyed), ("defaults", {}, False)]
    runs = []
    for label, extra, keyed in plan:
        cfg = ServeConfig.model_validate({**base, **extra})
        key = "bench-key" if keyed else None
        deployed = _deploy(cfg, name, proxy_url, via, previous, [key] if key else [])
        previous = deployed["replica"]
        print(f"serve_load: protection {label} ({extra or ('api keys' if keyed else 'defaults')})", flush=True)
        asyncio.run(_level(deployed["url"], bodies, c, 2 * c, key))  # warm-up
        row = {"variant": label} | _row(deployed["url"], bodies, c, total, key)
        if cfg.canary.on:  # what the replica counted per arm: the split and the shadows did happen
            info = httpx.get(deployed["url"] + "/v1/model").json()["canary"]
            row["canary"] = {k: info.get(k) for k in ("candidate_version", "arms", "shadow_skipped")}
        runs.append(row)
    cost = {}
    for i in range(1, len(runs), 2):
        before, on, after = runs[i - 1], runs[i], runs[i + 1]
        rps = (before["throughput_rps"] + after["throughput_rps"]) / 2
        p99 = (before["latency_ms"]["p99"] + after["latency_ms"]["p99"]) / 2
        cost[on["variant"]] = {"throughput_rps": on["throughput_rps"], "defaults_throughput_rps": round(rps, 2),
                               "throughput_ratio": round(on["throughput_rps"] / rps, 3),
                               "p99_ms": on["latency_ms"]["p99"], "defaults_p99_ms": round(p99, 1),
                               "p99_ratio": round(on["latency_ms"]["p99"] / p99, 3)}
    return {"concurrency": c, "requests_per_variant": total, "runs": runs, "vs_neighbouring_defaults": cost,
            "replica": previous}


def main(argv=None) -> int:
    args = _args(argv)
    from cxrcf.config import ServeConfig, preset_params
    from cxrcf.fileio import write_json

    # The served bundle is untrained on purpose (this measures serving, not the model): the generator-check
    # gate would rightly refuse to promote it, so the benchmark's registry runs without that one gate.
    params = preset_params(args.preset, registry={"gates": {"generator_check": False}})
    tmp = Path(tempfile.mkdtemp(prefix="cxrcf-serve-bench-"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
    os.environ["CXRCF_MLFLOW_ARTIFACTS"] = str(tmp / "artifacts")
    print(f"serve_load: registering an untrained {args.preset}-preset bundle in {tmp}", flush=True)
    name = _register(params, tmp / "model")

    import ray
    from ray import serve

    from serving import ingress

    base = params.serve.model_dump()
    base.update({k: v for k, v in {"num_cpus": args.num_cpus, "parallel_min_batch": args.parallel_min_batch}.items()
                 if v is not None})
    base.update(num_gpus=args.num_gpus, max_batch_size=args.max_batch_size, direct_ingress=args.via == "direct",
                max_ongoing_requests=max(base["max_ongoing_requests"], 2 * args.max_batch_size, max(args.concurrency)),
                reload_poll_s=3600.0, lkg_dir=str(tmp / "lkg"))
    for key in ("max_ongoing_requests", "max_queued_requests"):
        if getattr(args, key) is not None:
            base[key] = getattr(args, key)
    if args.batch_wait_timeout_s is not None:
        base["batch_wait_timeout_s"] = args.batch_wait_timeout_s
    port = _free_port()
    proxy_url = f"http://127.0.0.1:{port}"
    bodies = [json.dumps(_body(args.image_size, i)).encode() for i in range(16)]
    conditions = {"matmul_gflops_2_threads_before": round(matmul_gflops(), 1), "loadavg_before": os.getloadavg()}
    results = []
    protections = None
    previous = None
    os.environ.update(ingress.ray_env(ServeConfig.model_validate(base)))
    ray.init(include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for batching in (True, False):
            cfg = ServeConfig.model_validate({**base, **({} if batching else {"max_batch_size": 1})})
            deployed = _deploy(cfg, name, proxy_url, args.via, previous, [])
            url, info, previous = deployed["url"], deployed["info"], deployed["replica"]
            print(f"serve_load: batching {'on' if batching else 'off'} (max_batch_size {cfg.max_batch_size}, "
                  f"wait {cfg.batch_wait_timeout_s}s) model {info['name']} v{info['version']} on {info['device']}"
                  f" via {url} ({args.via})", flush=True)
            # warm-up: the first pass of each batch shape allocates and picks kernels
            top = max(args.concurrency)
            asyncio.run(_level(url, bodies, top, 4 * top))
            for c in args.concurrency:
                total = args.requests or min(640, max(200, 10 * c))
                row = _row(url, bodies, c, total)
                row |= {"batching": batching, "max_batch_size": cfg.max_batch_size,
                        "batch_wait_timeout_s": cfg.batch_wait_timeout_s}
                results.append(row)
            if batching and args.protections_concurrency:
                protections = _protections(base, name, proxy_url, args.via, bodies, args.protections_concurrency,
                                           previous)
                previous = protections.pop("replica")
        device = info["device"]
    finally:
        serve.shutdown()
        ray.shutdown()
    conditions |= {"matmul_gflops_2_threads_after": round(matmul_gflops(), 1), "loadavg_after": os.getloadavg()}

    def pick(batching: bool, c: int):
        return next((r for r in results if r["batching"] == batching and r["concurrency"] == c), None)

    summary = {}
    for c in args.concurrency:
        on, off = pick(True, c), pick(False, c)
        summary[str(c)] = {"throughput_speedup": round(on["throughput_rps"] / off["throughput_rps"], 2),
                           "p99_ratio": round(on["latency_ms"]["p99"] / off["latency_ms"]["p99"], 2)}
    target = summary.get("32")
    out = {
        "benchmark": "serve_load",
        "preset": args.preset,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0],
                    "device": device, "num_gpus_per_replica": args.num_gpus},
        "request": {"image_size": args.image_size, "interventions_per_request": 1},
        "serving": {"via": args.via, "num_cpus_per_replica": base["num_cpus"],
                    "parallel_min_batch": base["parallel_min_batch"],
                    "max_ongoing_requests": base["max_ongoing_requests"],
                    "max_queued_requests": base["max_queued_requests"]},
        "results": results,
        "summary": summary,
        "protections": protections,
        "conditions": conditions,
        "target": {"concurrency": 32, "min_throughput_speedup": 3.0, "max_p99_ratio": 1.0,
                   "met": bool(target and target["throughput_speedup"] >= 3.0 and target["p99_ratio"] <= 1.0)},
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_json(args.out, out)
    print(f"serve_load: wrote {args.out}; summary {json.dumps(summary)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
