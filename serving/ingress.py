"""Direct ingress: clients call a model replica's own HTTP server instead of going through Serve's proxy.

Through the proxy every request costs an extra process hop: the proxy parses HTTP, hands the
request to the replica by actor call, the replica fetches the body back from the proxy by another
call, and the reply streams back the same way. On a 2-core machine that hop took as much CPU per
request as the batched model itself, so batched serving stalled near 100 req/s (benchmarks/serve_load.py).
With Ray Serve's direct ingress each replica also runs the FastAPI app on its own uvicorn server,
on a port from `serve.direct_port` upwards; the proxy on `serve.port` keeps serving everything too.

Ray reads these settings from the environment of the processes it starts, so they must be in
place before `ray.init` starts a local cluster; a cluster started elsewhere (RAY_ADDRESS) needs
them in its own environment, and `urls` then finds no replica ports.
"""

from __future__ import annotations

import time

import httpx

from cxrcf.config import ServeConfig
from cxrcf.errors import CxrcfError

# Ray holds a stopping replica open this long so that load balancers can deregister it (30 s by
# default); clients here connect to replicas directly, and in-flight requests are waited for anyway.
DRAIN_S = 2.0


# Two settings of Ray Serve's own throughput profile (RAY_SERVE_THROUGHPUT_OPTIMIZED sets them among
# others): the routes run on the replica's event loop instead of a second loop in another thread, which
# cost every request thread hops for each of its ASGI messages (issue 17: a replica with a near-free
# model answered 1.5-2.5x the requests per second without them), and Serve's log lines go only to
# the replica's log file under logs/serve/ rather than to the worker's stderr file as well.
THROUGHPUT = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0", "RAY_SERVE_LOG_TO_STDERR": "0"}


def ray_env(cfg: ServeConfig) -> dict[str, str]:
    """Environment for a local Ray cluster that serves with `cfg`."""
    if not cfg.direct_ingress:
        return {**THROUGHPUT, "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"}
    return {**THROUGHPUT, "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
            "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(cfg.direct_ports[0]),
            "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(cfg.direct_ports[-1]),
            "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": str(DRAIN_S)}


def urls(cfg: ServeConfig, app_name: str) -> list[str]:
    """Base URLs of the replicas of `app_name` that answer HTTP directly (none without direct ingress)."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    if not cfg.direct_ingress:
        return []
    controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    groups = ray.get(controller.get_target_groups.remote(app_name))
    ports = sorted({t.port for g in groups if g.protocol == "HTTP" for t in g.targets if t.port in cfg.direct_ports})
    # replicas bind the address Serve's HTTP options name; the controller reports the node's IP
    return [f"http://{cfg.client_host}:{p}" for p in ports]


def wait_urls(cfg: ServeConfig, app_name: str, replicas: int = 1, timeout_s: float = 60.0) -> list[str]:
    """Poll until `replicas` direct URLs answer GET /healthz; returns them. [] when direct ingress is off."""
    if not cfg.direct_ingress:
        return []
    deadline = time.monotonic() + timeout_s
    found: list[str] = []
    while time.monotonic() < deadline:
        found = [u for u in urls(cfg, app_name) if _healthy(u)]
        if len(found) >= replicas:
            return found
        time.sleep(0.25)
    raise CxrcfError(f"serve.direct_ingress: {len(found)} of {replicas} replica(s) answered on ports "
                     f"{cfg.direct_ports[0]}-{cfg.direct_ports[-1]} after {timeout_s:.0f}s (a Ray "
                     "cluster started without RAY_SERVE_ENABLE_DIRECT_INGRESS=1 has none)")


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False
