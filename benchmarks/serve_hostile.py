"""The online API under hostile input, schema fuzzing, overload and registry faults (issue 17).

    python benchmarks/serve_hostile.py [--preset cpu] [--fuzz-examples 300] [--overload-s 30]
                                       [--out artifacts/bench/serve_hostile.json]

Self-contained and localhost only, like serve_load.py: an untrained bundle of the preset's architecture
is registered on a real `mlflow server` (SQLite behind it) and served with API keys on a local Ray
cluster with every protection of serving/policy.py at its defaults. Phases, each through the Serve
proxy and the replica's direct port where it matters:

1. hostile inputs: one request each (decompression bombs, 600k interventions, long unicode image_id,
   unauthenticated bad JSON, ...): status, seconds, the error's field;
2. schemathesis fuzzing of the OpenAPI schema on both ports (count of requests and of responses >= 500);
3. overload: capacity at 32 closed-loop clients, then 10x as many for `--overload-s` seconds: statuses,
   goodput, p99 of the 200s, the replica's memory; then the 32-client level again (recovery);
4. registry faults under traffic: the MLflow server killed and restarted, a broken version promoted,
   the champion alias deleted and restored: statuses seen by clients and what /readyz said.
Writes one JSON file.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import itertools

from serve_load import _body, _free_port, _register

KEY = "bench-key"
AUTH = {"X-API-Key": KEY}


PHASES = ("hostile", "fuzz", "overload", "faults")


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="cpu", choices=("smoke", "cpu", "paper"))
    p.add_argument("--fuzz-examples", type=int, default=300, help="schemathesis max examples per operation and port")
    p.add_argument("--overload-s", type=float, default=30.0)
    p.add_argument("--phases", default=",".join(PHASES),
                   help="comma-separated subset of hostile,fuzz,overload,faults")
    p.add_argument("--out", default="artifacts/bench/serve_hostile.json")
    args = p.parse_args(argv)
    unknown = {x.strip() for x in args.phases.split(",")} - set(PHASES)
    if unknown:
        p.error(f"--phases: unknown {', '.join(sorted(unknown))} (choose from {', '.join(PHASES)})")
    return args


def _png_b64(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def hostile_cases() -> list[tuple[str, dict]]:
    """(name, request kwargs for httpx) for every hostile input of the issue, and a baseline."""
    from PIL import Image

    small = _body(64, 0)
    rng = np.random.default_rng(0)
    big_allowed = _png_b64(Image.fromarray(rng.integers(0, 256, (1024, 1024), dtype=np.uint8)))
    cases = [
        ("baseline: 64 px, 1 intervention", {"json": small, "headers": AUTH}),
        ("largest allowed: 1024^2 noise, 8 interventions",
         {"json": {**small, "image": big_allowed, "interventions": [{"age": 30.0 + i} for i in range(8)]},
          "headers": AUTH}),
        ("decompression bomb: flat 8-bit 4096^2 PNG, 8 interventions",
         {"json": {**small, "image": _png_b64(Image.new("L", (4096, 4096))),
                   "interventions": [{"sex": "female"}] * 8}, "headers": AUTH}),
        ("compressible 16-bit 4096^2 PNG", {"json": {**small, "image": _png_b64(Image.new("I;16", (4096, 4096)))},
                                            "headers": AUTH}),
        ("600k interventions (6.6 MB body)", {"content": json.dumps({**small, "interventions": [{"age": 1}] * 600_000}),
                                              "headers": {**AUTH, "content-type": "application/json"}}),
        ("long unicode image_id (10k chars)", {"json": {"image_id": "\u00e9\U0001f600" * 5000,
                                                        "interventions": [{"sex": "female"}]}, "headers": AUTH}),
        ("unauthenticated bad JSON", {"content": b"{not json", "headers": {"content-type": "application/json"}}),
        ("wrong key, valid request", {"json": small, "headers": {"X-API-Key": "guess"}}),
        ("non-UTF-8 body", {"content": b'{"image": "\xff\xfe", "interventions": [{"sex": "female"}]}',
                            "headers": {**AUTH, "content-type": "application/json"}}),
        ("9 MB body", {"content": b'{"image": "' + b"A" * 9_000_000 + b'"}',
                       "headers": {**AUTH, "content-type": "application/json"}}),
    ]
    return cases


def run_hostile(urls: dict[str, str]) -> list[dict]:
    import httpx

    rows = []
    for name, kwargs in hostile_cases():
        for via, url in urls.items():
            start = time.perf_counter()
            r = httpx.post(url + "/v1/counterfactuals", timeout=120, **kwargs)
            elapsed = time.perf_counter() - start
            try:
                errors = r.json().get("errors") or []
            except ValueError:
                errors = []
            rows.append({"input": name, "via": via, "status": r.status_code, "seconds": round(elapsed, 3),
                         "field": errors[0]["field"] if errors else None,
                         "detail": (r.json().get("detail", "")[:160] if errors else "")})
            print(f"  {name:<52} {via:<6} {r.status_code}  {elapsed:7.3f}s  {rows[-1]['detail'][:70]}", flush=True)
    return rows


def run_fuzz(urls: dict[str, str], examples: int, work: Path) -> dict:
    st = Path(sys.executable).with_name("st")
    out = {}
    for via, url in urls.items():
        har = work / f"fuzz-{via}.har"
        cmd = [str(st), "run", f"{url}/openapi.json", "-H", f"X-API-Key: {KEY}", "-n", str(examples),
               "--checks", "not_a_server_error", "--phases", "examples,coverage,fuzzing", "--no-shrink",
               "--request-timeout", "60", "-w", "2", "--seed", "17", "--report", "har",
               "--report-har-path", str(har)]
        start = time.perf_counter()
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
        wall = time.perf_counter() - start
        entries = json.loads(har.read_text())["log"]["entries"] if har.is_file() else []
        statuses = Counter(str(e["response"]["status"]) for e in entries)
        server_errors = {s: n for s, n in statuses.items() if s.isdigit() and int(s) >= 500}
        out[via] = {"requests": len(entries), "statuses": dict(sorted(statuses.items())),
                    "responses_5xx": server_errors, "exit_code": proc.returncode, "wall_s": round(wall, 1),
                    "summary": [ln for ln in proc.stdout.splitlines() if ln.strip()][-6:]}
        print(f"  fuzz {via}: {len(entries)} requests in {wall:.0f}s, statuses {dict(statuses)}, "
              f"exit {proc.returncode}", flush=True)
    return out


async def _drive(url: str, bodies: list[bytes], concurrency: int, seconds: float | None = None,
                 total: int | None = None, log: list | None = None, polite: bool = False) -> dict:
    """Closed-loop clients. `polite` ones wait the Retry-After of a 503 before their next request, as
    an HTTP client library with retries does; the others resend at once."""
    import aiohttp

    latencies, statuses = [], Counter()
    headers = {"Content-Type": "application/json", **AUTH}
    deadline = time.perf_counter() + seconds if seconds else None
    counter = iter(range(total)) if total else None

    async def worker(http, w):
        i = w
        while (deadline and time.perf_counter() < deadline) or (counter and next(counter, None) is not None):
            i += 1
            start = time.perf_counter()
            try:
                async with http.post(url + "/v1/counterfactuals", data=bodies[i % len(bodies)], headers=headers) as r:
                    await r.read()
                    code = r.status
                    wait = float(r.headers.get("Retry-After", 0) or 0) if polite and code == 503 else 0.0
            except (TimeoutError, aiohttp.ClientError) as err:
                code, wait = f"connection error {type(err).__name__}", 0.0
            statuses[str(code)] += 1
            if code == 200:
                latencies.append(time.perf_counter() - start)
            if log is not None:
                log.append((time.time(), code))
            if wait:
                await asyncio.sleep(wait)

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as http:
        start = time.perf_counter()
        await asyncio.gather(*(worker(http, w) for w in range(concurrency)))
        wall = time.perf_counter() - start
    lat = np.array(latencies or [0.0]) * 1000
    return {"concurrency": concurrency, "wall_s": round(wall, 2), "statuses": dict(statuses),
            "goodput_rps": round(len(latencies) / wall, 2),
            "latency_200_ms": {"p50": round(float(np.percentile(lat, 50)), 1),
                               "p99": round(float(np.percentile(lat, 99)), 1)}}


def _replica_rss_mb() -> float:
    total = 0.0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"ServeReplica:cxrcf" not in cmd:
                continue
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) / 1024
        except OSError:
            continue
    return round(total, 1)


def run_overload(url: str, bodies: list[bytes], seconds: float) -> dict:
    base = asyncio.run(_drive(url, bodies, 32, total=320))
    rss = {"before": _replica_rss_mb()}
    samples = []
    stop = threading.Event()

    def sample():
        while not stop.wait(1.0):
            samples.append(_replica_rss_mb())

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    flood = asyncio.run(_drive(url, bodies, 320, seconds=seconds))
    # the same 10x load from clients that honour Retry-After: what the server keeps when the clients'
    # own resends do not take the CPU it shares with them (one 2-core machine runs both here)
    polite = asyncio.run(_drive(url, bodies, 320, seconds=seconds, polite=True))
    stop.set()
    t.join()
    rss["max_during"] = max(samples or [0.0])
    after = asyncio.run(_drive(url, bodies, 32, total=320))
    rss["after"] = _replica_rss_mb()
    for name, run in (("320 clients", flood), ("320 clients honouring Retry-After", polite)):
        print(f"  capacity at 32: {base['goodput_rps']} req/s; {name}: {run['statuses']} goodput "
              f"{run['goodput_rps']} req/s p99(200) {run['latency_200_ms']['p99']} ms", flush=True)
    print(f"  after: {after['goodput_rps']} req/s {after['statuses']}; replica RSS {rss}", flush=True)
    return {"capacity_32": base, "overload_320": flood, "overload_320_retry_after": polite, "recovery_32": after,
            "replica_rss_mb": rss}


def _mlflow_server(root: Path, port: int) -> subprocess.Popen:
    cmd = [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", f"sqlite:///{root}/mlflow.db", "--artifacts-destination", str(root / "artifacts"),
           "--workers", "1"]
    log = open(root / f"mlflow-server-{port}.log", "ab")  # noqa: SIM115 -- the server outlives this call
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    import httpx

    deadline = time.monotonic() + 300  # a cold start with database migrations takes minutes on a busy machine
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    _stop(proc)
    raise RuntimeError(f"mlflow server did not start; see {root}/mlflow-server-{port}.log")


def _stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)  # a crash, not a clean shutdown
    proc.wait()


def run_faults(url: str, bodies: list[bytes], name: str, root: Path, port: int, server: dict) -> dict:
    """Traffic from 8 clients throughout; each fault's window of statuses and /readyz answers."""
    import httpx

    from pipelines.registry import connect

    log: list = []
    stop = threading.Event()
    ready: list = []

    def traffic():
        asyncio.run(_drive_until(url, bodies, 8, stop, log))

    def readiness():
        while not stop.wait(0.5):
            try:
                r = httpx.get(url + "/readyz", timeout=5)
                body = r.json()
                ready.append((time.time(), r.status_code, body["alias_state"]["state"],
                              body["alias_state"]["registry_reachable"], body["version"],
                              body["alias_state"]["failures"]))
            except (httpx.HTTPError, ValueError, KeyError) as err:
                ready.append((time.time(), 0, type(err).__name__, None, None, None))

    threads = [threading.Thread(target=traffic), threading.Thread(target=readiness)]
    for t in threads:
        t.start()
    marks = {}
    try:
        time.sleep(3)
        marks["mlflow_killed"] = time.time()
        _stop(server["proc"])
        time.sleep(15)
        marks["mlflow_restarted"] = time.time()
        server["proc"] = _mlflow_server(root, port)
        time.sleep(10)
        client = connect()
        # a version whose artifacts do not exist: every load fails. The server checks that a source lies
        # under its run's artifact root, so the broken source is a missing folder of the champion's run.
        good_mv = client.get_model_version_by_alias(name, "champion")
        good = good_mv.version
        root_uri = client.get_run(good_mv.run_id).info.artifact_uri
        broken = client.create_model_version(name, source=f"{root_uri}/no-such-model", run_id=good_mv.run_id).version
        marks["broken_promoted"] = time.time()
        client.set_registered_model_alias(name, "champion", broken)
        time.sleep(15)
        marks["good_restored"] = time.time()
        client.set_registered_model_alias(name, "champion", good)
        time.sleep(8)
        marks["alias_deleted"] = time.time()
        client.delete_registered_model_alias(name, "champion")
        time.sleep(8)
        marks["alias_restored"] = time.time()
        client.set_registered_model_alias(name, "champion", good)
        time.sleep(8)
        marks["end"] = time.time()
    finally:
        stop.set()
        for t in threads:
            t.join()
    windows = {}
    names = list(marks)
    for a, b in itertools.pairwise(names):
        codes = Counter(str(c) for ts, c in log if marks[a] <= ts < marks[b])
        seen = Counter(f"{s}/{st}/reachable={r}/v{v}/failures={f}" for ts, s, st, r, v, f in ready
                       if marks[a] <= ts < marks[b])
        windows[a] = {"seconds": round(marks[b] - marks[a], 1), "client_statuses": dict(codes),
                      "readyz": dict(seen)}
        print(f"  {a:<17} {dict(codes)}  readyz {dict(seen)}", flush=True)
    return windows


async def _drive_until(url, bodies, concurrency, stop, log):
    import aiohttp

    headers = {"Content-Type": "application/json", **AUTH}

    async def worker(http, w):
        i = w
        while not stop.is_set():
            i += 1
            try:
                async with http.post(url + "/v1/counterfactuals", data=bodies[i % len(bodies)], headers=headers) as r:
                    await r.read()
                    log.append((time.time(), r.status))
            except (TimeoutError, aiohttp.ClientError) as err:
                log.append((time.time(), f"connection error {type(err).__name__}"))

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency),
                                     timeout=aiohttp.ClientTimeout(total=120)) as http:
        await asyncio.gather(*(worker(http, w) for w in range(concurrency)))


def scrape(port: int) -> dict:
    """The cxrcf_* and a few ray_serve_* series on Ray's Prometheus endpoint (waits for the first export)."""
    import httpx

    deadline = time.monotonic() + 30
    text = ""
    while time.monotonic() < deadline:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        if "cxrcf_requests" in text:
            break
        time.sleep(2)
    names = sorted({ln.split("{")[0].split(" ")[0] for ln in text.splitlines()
                    if ln.startswith(("ray_cxrcf_", "cxrcf_", "ray_serve_"))})
    sample = [ln for ln in text.splitlines() if "cxrcf_requests" in ln and not ln.startswith("#")][:12]
    print(f"  metrics on :{port}: {len(names)} series names, e.g. {[n for n in names if 'cxrcf' in n]}", flush=True)
    return {"port": port, "names": names, "cxrcf_requests_sample": sample}


def main(argv=None) -> int:
    args = _args(argv)
    from cxrcf.config import ServeConfig, preset_params
    from cxrcf.fileio import write_json

    params = preset_params(args.preset, registry={"gates": {"generator_check": False}})  # see serve_load
    tmp = Path(tempfile.mkdtemp(prefix="cxrcf-serve-hostile-"))

    import httpx
    import ray
    from ray import serve

    from serving import ingress
    from serving.app import APP_NAME, build_app, wait_ready

    cfg = ServeConfig.model_validate({**params.serve.model_dump(), "reload_poll_s": 1.0, "lkg_dir": str(tmp / "lkg"),
                                      "reload_backoff_s": 2.0})
    port = _free_port()
    proxy = f"http://127.0.0.1:{port}"
    os.environ.update(ingress.ray_env(cfg))
    metrics_port = _free_port()
    # Ray first, before the MLflow server loads the machine: a raylet gets 30 s to register
    for attempt in range(3):
        try:
            ray.init(include_dashboard=False, log_to_driver=False, _metrics_export_port=metrics_port)
            break
        except Exception as err:  # ray.init raises a bare Exception on a slow start
            ray.shutdown()
            if attempt == 2:
                raise
            print(f"serve_hostile: ray.init failed ({err}); attempt {attempt + 2}", flush=True)
    mlflow_port = _free_port()
    server = {"proc": None}
    out = {"benchmark": "serve_hostile", "preset": args.preset,
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0]},
           "serve": {k: getattr(cfg, k) for k in ("max_batch_size", "batch_wait_timeout_s", "max_ongoing_requests",
                                                  "max_interventions", "max_body_bytes", "num_cpus")},
           "policy": cfg.model_dump(exclude={"lkg_dir", "canary", "host", "port", "model_alias", "direct_port"})}
    try:
        server["proc"] = _mlflow_server(tmp, mlflow_port)
        os.environ["MLFLOW_TRACKING_URI"] = f"http://127.0.0.1:{mlflow_port}"
        os.environ.pop("CXRCF_MLFLOW_ARTIFACTS", None)
        print(f"serve_hostile: mlflow server on {os.environ['MLFLOW_TRACKING_URI']}; registering in {tmp}", flush=True)
        name = _register(params, tmp / "model")
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(cfg, name, alias="champion", api_keys=[KEY]), name=APP_NAME,
                  route_prefix="/", blocking=False)
        wait_ready(proxy)
        direct = ingress.wait_urls(cfg, APP_NAME)[0]
        urls = {"proxy": proxy, "direct": direct}
        bodies = [json.dumps(_body(64, i)).encode() for i in range(16)]
        asyncio.run(_drive(direct, bodies, 32, total=128))  # warm-up
        phases = {p.strip() for p in args.phases.split(",")}
        if "hostile" in phases:
            print("serve_hostile: hostile inputs", flush=True)
            out["hostile"] = run_hostile(urls)
            out["healthy_after_hostile"] = httpx.get(direct + "/readyz").status_code
            write_json(args.out, out)  # each phase's results survive a later phase's failure
        if "fuzz" in phases:
            print("serve_hostile: schemathesis", flush=True)
            out["fuzz"] = run_fuzz(urls, args.fuzz_examples, tmp)
            write_json(args.out, out)
        if "overload" in phases:
            print("serve_hostile: overload (direct port)", flush=True)
            out["overload"] = run_overload(direct, bodies, args.overload_s)
            write_json(args.out, out)
        if "faults" in phases:
            print("serve_hostile: registry faults under traffic (direct port, 8 clients)", flush=True)
            out["faults"] = run_faults(direct, bodies, name, tmp, mlflow_port, server)
        out["metrics"] = scrape(metrics_port)
    finally:
        serve.shutdown()
        ray.shutdown()
        if server["proc"] is not None:
            _stop(server["proc"])
    out["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    write_json(args.out, out)
    print(f"serve_hostile: wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
