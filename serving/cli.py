"""`cxrcf serve`: run the counterfactual API on Ray Serve until interrupted.

    cxrcf serve [--params params.yaml] [--model-name N] [--alias A | --version V]
                [--host H] [--port P] [--data DIR] [--replicas N|auto] [--num-gpus G]
                [--max-batch-size B] [--batch-wait-timeout-s S]
                [--canary-weight W] [--shadow F] [--canary-alias A]

Defaults come from params.serve (127.0.0.1:8000, alias champion) and params.registry.generator_name.
API keys: CXRCF_API_KEYS (comma-separated); required when --host is not a loopback address, and so
is Ray's own token auth (RAY_AUTH_MODE=token, the token in ~/.ray/auth_token): Ray's ports listen on
every interface, and without it a network peer could attach as a driver and bypass the API keys.
On a loopback host Ray's token auth is on too unless RAY_AUTH_MODE says otherwise: the API is local,
but Ray's own ports are not (Ray 2.60 cannot bind them to loopback).
Uses the Ray cluster of RAY_ADDRESS when set, else starts a local one. With serve.direct_ingress
(default) each replica also answers on its own port from serve.direct_port (8100) up, skipping
Serve's proxy: the fast path for heavy clients (serving/ingress.py).

Canary (params.serve.canary): `--canary-weight 0.1` has the `candidate` alias answer 10% of requests
(chosen by a hash of X-Request-ID; headers X-Model-Alias / X-Model-Version say who answered);
`--shadow 0.25` mirrors a quarter of the champion's requests to the candidate and only scores its
answers (GET /v1/model `canary`, metrics cxrcf_online_effectiveness). The canary, like every limit
and deadline, reaches the replicas in the deployment's user_config (serving/app.py).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import time

from cxrcf.cli import add_params
from cxrcf.errors import CxrcfError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cxrcf serve", description="Serve counterfactuals over HTTP with Ray Serve.")
    add_params(p)
    p.add_argument("--model-name", help="registered generator (default params.registry.generator_name)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--alias", help="alias to serve and follow (default params.serve.model_alias)")
    which.add_argument("--version", help="pin one model version (no hot reload)")
    p.add_argument("--host", help="bind address (default params.serve.host)")
    p.add_argument("--port", type=int, help="port (default params.serve.port)")
    p.add_argument("--data", help="dataset root whose metadata.csv ids requests may name as image_id")
    p.add_argument("--replicas", help="model replicas: a number or 'auto' (default params.serve.num_replicas)")
    p.add_argument("--num-gpus", type=float, help="GPUs per model replica (default params.serve.num_gpus)")
    p.add_argument("--max-batch-size", type=int, help="default params.serve.max_batch_size")
    p.add_argument("--batch-wait-timeout-s", type=float, help="default params.serve.batch_wait_timeout_s")
    p.add_argument("--canary-weight", type=float,
                   help="share of requests the candidate alias answers, 0-1 (default params.serve.canary.weight)")
    p.add_argument("--shadow", type=float, help="share of the champion's requests mirrored to the candidate, "
                                                "0-1, scored and never returned (default params.serve.canary.shadow)")
    p.add_argument("--canary-alias", help="the candidate's alias (default params.serve.canary.alias)")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="Prometheus endpoint of the local Ray cluster's metrics (Serve's and cxrcf_*); "
                        "default: a port Ray picks")
    return p


def serve_config(params, args):
    """params.serve with the command-line overrides, validated as one ServeConfig."""
    from pydantic import ValidationError

    from cxrcf.config import ServeConfig, format_validation_error

    overrides = {k: v for k, v in {
        "host": args.host, "port": args.port, "num_gpus": args.num_gpus,
        "max_batch_size": args.max_batch_size, "batch_wait_timeout_s": args.batch_wait_timeout_s,
    }.items() if v is not None}
    if args.replicas is not None:
        overrides["num_replicas"] = args.replicas if args.replicas == "auto" else _int("--replicas", args.replicas)
    merged = {**params.serve.model_dump(), **overrides}
    canary = {k: v for k, v in {"weight": args.canary_weight, "shadow": args.shadow,
                                "alias": args.canary_alias}.items() if v is not None}
    merged["canary"] = {**merged["canary"], **canary}
    # More replicas than max_replicas would make max_replicas meaningless for a fixed count.
    if isinstance(merged["num_replicas"], int):
        merged["max_replicas"] = max(merged["max_replicas"], merged["num_replicas"])
    merged["max_ongoing_requests"] = max(merged["max_ongoing_requests"], merged["max_batch_size"])
    try:
        return ServeConfig.model_validate(merged)
    except ValidationError as err:
        raise CxrcfError(format_validation_error(err, "serve")) from None


def _int(flag: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise CxrcfError(f"{flag} {text!r}: expected a number or 'auto'") from None


def check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
        except OSError as err:
            raise CxrcfError(f"serve.port: cannot bind {host}:{port} ({err.strerror})") from None


def ray_auth_mode(host: str, address: str | None, environ) -> str | None:
    """The RAY_AUTH_MODE `cxrcf serve` sets (None: leave the environment's); CxrcfError when unsafe."""
    from serving.auth import is_loopback

    explicit = (environ.get("RAY_AUTH_MODE") or "").strip().lower()
    if not is_loopback(host):
        if explicit and explicit != "token":
            raise CxrcfError(f"RAY_AUTH_MODE={explicit} with serve.host {host}: Ray's ports would accept any "
                             "driver from the network, bypassing the API keys; unset it (cxrcf serve then "
                             "turns Ray's token auth on) or bind 127.0.0.1")
        return "token"
    if explicit or address:
        return None  # an explicit choice, or a cluster started elsewhere: its own settings decide
    # Ray's ports listen on every interface whatever host the API binds, so a local cluster keeps auth on
    return "token"


def metrics_export(port: int | None, address: str | None) -> dict:
    """ray.init's options for a Prometheus endpoint on `port`: only for the local cluster `cxrcf serve` starts
    (a running cluster's own `ray start --metrics-export-port` decides for it)."""
    return {"_metrics_export_port": port} if port and not address else {}


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from cxrcf.config import load_params
    from serving.auth import ENV_VAR, check_host, parse_keys

    params = load_params(args.params)
    cfg = serve_config(params, args)
    keys = parse_keys(os.environ.get(ENV_VAR))
    check_host(cfg.host, keys)
    mode = ray_auth_mode(cfg.host, os.environ.get("RAY_ADDRESS"), os.environ)
    if mode is not None:
        os.environ["RAY_AUTH_MODE"] = mode
    if args.data and not os.path.isfile(os.path.join(args.data, "metadata.csv")):
        raise CxrcfError(f"--data {args.data}: no metadata.csv there")
    name = args.model_name or params.registry.generator_name
    alias = None if args.version else (args.alias or cfg.model_alias)

    from store.models import resolve_alias, show_version

    # Fail here, in one line, rather than in a replica constructor that Serve retries for minutes.
    version = args.version or resolve_alias(name, alias)
    show_version(f"{name}/{version}")
    check_port_free(cfg.host, cfg.port)
    print(f"serve: models:/{name}{'@' + alias if alias else ''} is version {version}; starting Ray Serve",
          file=sys.stderr, flush=True)

    from serving import ingress

    address = os.environ.get("RAY_ADDRESS")
    if not address:
        os.environ.update(ingress.ray_env(cfg))  # read by the local cluster ray.init starts below

    import ray
    from ray import serve

    from serving.app import APP_NAME, build_app, wait_ready

    ray.init(address=address, include_dashboard=False, log_to_driver=False, **metrics_export(args.metrics_port, address))
    # service managers stop with SIGTERM (and a backgrounded shell job ignores SIGINT): stop cleanly
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        serve.start(http_options={"host": cfg.host, "port": cfg.port})
        serve.run(build_app(cfg, name, alias=alias, version=args.version, data_root=args.data, api_keys=keys),
                  name=APP_NAME, route_prefix="/", blocking=False)
        url = f"http://{cfg.client_host}:{cfg.port}"
        health = wait_ready(url)
        if cfg.canary.on:
            print(f"serve: canary: alias {cfg.canary.alias!r} answers {cfg.canary.weight:.0%} of requests and "
                  f"shadows {cfg.canary.shadow:.0%} of the rest", file=sys.stderr, flush=True)
        print(f"serve: ready at {url} (model {health['model']} version {health['version']}; docs at {url}/docs; "
              f"API keys {'on' if keys else 'off'}; Ray token auth {os.environ.get('RAY_AUTH_MODE') or 'default'}); "
              "Ctrl-C stops", file=sys.stderr, flush=True)
        if cfg.direct_ingress:
            try:
                direct = ingress.wait_urls(cfg, APP_NAME, timeout_s=30.0)
                print(f"serve: fast path without the Serve proxy (same API): {', '.join(direct)}",
                      file=sys.stderr, flush=True)
            except CxrcfError as err:
                print(f"serve: no direct replica ports, serving through {url} only ({err})",
                      file=sys.stderr, flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("serve: stopping", file=sys.stderr, flush=True)
        return 0
    finally:
        # a second Ctrl-C (or the terminal's SIGINT reaching us twice) must not cut the clean-up short
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        serve.shutdown()
        ray.shutdown()
