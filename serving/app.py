"""The Ray Serve application: one deployment, a FastAPI ingress with a batching model inside.

    client --HTTP--> Serve proxy --> CounterfactualService replica
                                     route: auth, parse, validate, decode PNG  (every request alone)
                                     @serve.batch `batched`: engine.run_batch  (one forward pass per batch)

- Routes parse and validate every request (pydantic schemas, image codec, limits) so that nothing a
  client sends can fail a batch; only then do they await the `@serve.batch` method, which runs one
  batched forward pass in a worker thread so the event loop keeps accepting and queueing requests.
  They enter its queue when no pass is running (`infer`), so past saturation each batch holds what
  arrived during the last one rather than what Serve's batcher caught in one batch_wait_timeout_s.
- One deployment rather than an ingress plus a model deployment: on a small CPU machine the extra
  actor hop per request cost more than the batching saved. For the same reason clients may skip
  Serve's proxy altogether: with `serve.direct_ingress` each replica answers on its own port too
  (serving/ingress.py).
- A batch of at least `parallel_min_batch` requests runs on as many torch threads as the replica
  has CPUs; smaller ones on one, which batch-1 serving is fastest with. Replicas (fixed or autoscaled) and
  `num_gpus` per replica scale the whole service; on GPU the pass runs under bf16 autocast.
- Run-time settings live in the deployment's user_config: the whole params `serve` section
  (ServeConfig: batching, budgets, deadlines, registry-fault settings, the canary; the policy is in
  serving/policy.py) and the SHA-256 digests of the API keys. The same dict goes to the
  constructor, so a replica never answers before its keys and limits are in force (fail closed),
  and `reconfigure` applies later
  changes. Serve applies a user_config change in place for config-file deployments (`serve
  deploy`); a `serve.run` redeploy (what `cxrcf serve` and the tests do) counts as new code in Ray
  2.60 and rolls the replicas.
- In front of the routes, `Guard` (plain ASGI) checks the key before the body is read, bounds the
  body, puts the request under its deadline, counts it in the metrics and writes its access-log
  line. Budgets on pixels and reply size are checked from the PNG header before any decoding.
- Hot reload: a replica thread polls the alias every `reload_poll_s`; when it moves, the new version
  is loaded beside the old one and swapped in with one assignment. A batch holds the state it
  started with, so in-flight requests finish on the old version and none is dropped. Registry
  faults (unreachable, a version that fails to load, a deleted alias) follow the policy in
  serving/policy.py; every served version is kept as a verified local copy to start from.
- Canary (serve.canary): the replica may hold a second slot following the `candidate` alias. A hash
  of X-Request-ID picks the arm that answers (weight) and whether the champion's request is also
  mirrored to the candidate in the background (shadow), where it is only scored. Requests of both
  arms share the batch queue; a batch runs one forward pass per arm. Both models in one replica
  rather than a second deployment: Serve has no traffic split to lean on, a second deployment
  would put an actor hop on every request again, and the tiny bundles cost little memory twice.
  The routing, the candidate's slot, the shadows and the tallies are serving/canary.py.
"""

# No `from __future__ import annotations`: Serve rebuilds the route methods of the ingress class
# in its own module, where FastAPI could not resolve string annotations of the request body.
import asyncio
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import APIKeyHeader, HTTPBearer
from pydantic import BaseModel, ConfigDict
from ray import serve
from ray.serve.config import BackpressureConfig
from starlette.exceptions import HTTPException as StarletteHTTPException

from cxrcf.config import ServeConfig
from cxrcf.errors import CxrcfError
from cxrcf.png import (
    ImageError,
    ImageTooLarge,
    check_size,
    decode_png,
    decode_png_bytes,
    encode_png,
    peek_size,
    resize_gray,
)
from serving import auth
from serving.canary import Canary, route
from serving.engine import Item, ItemResult, run_batch
from serving.policy import lkg_dir, one_line, reply_bytes
from serving.schemas import (
    AliasState,
    BatchStats,
    Counterfactual,
    CounterfactualRequest,
    CounterfactualResponse,
    ErrorBody,
    Factual,
    FieldError,
    Health,
    ModelInfo,
    ModelRef,
    Ready,
    drift,
    error_body,
    field_errors,
    parents_from_codes,
    probabilities,
)

log = logging.getLogger("ray.serve")
access = logging.getLogger("ray.serve.cxrcf.access")  # one JSON line per request

APP_NAME = "cxrcf"
ENV_PASSED = ("MLFLOW_TRACKING_URI", "CXRCF_MLFLOW_ARTIFACTS")  # replicas need the driver's registry


class ModelSource(BaseModel):
    """Which registered generator a model replica serves."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    alias: str | None = None
    version: str | None = None
    env: dict[str, str] = {}

    def uri(self, version: str | None = None) -> str:
        if version or self.version:
            return f"models:/{self.name}/{version or self.version}"
        return f"models:/{self.name}@{self.alias}"


# ------------------------------------------------------------------------------------ model side
@dataclass(frozen=True)
class Loaded:
    bundle: Any
    name: str
    version: str
    alias: str | None
    mode: str | None
    metrics: dict
    uri: str
    loaded_at: str
    source: str = "registry"  # or "last-known-good"


def _load(source: ModelSource, version: str) -> Loaded:
    import torch

    from store.models import load_bundle

    uri = source.uri(version)
    bundle, info = load_bundle(uri)
    if torch.cuda.is_available():
        bundle.to("cuda")
    return Loaded(bundle, info.get("name") or source.name, str(info.get("version") or version), source.alias,
                  info.get("mode"), dict(info.get("metrics") or {}), uri,
                  datetime.now(UTC).isoformat(timespec="seconds"))


def _gone(err: Exception) -> bool:
    """The registry answered that the alias (or the whole model) no longer exists."""
    text = str(err)
    return isinstance(err, CxrcfError) and ("no version has alias" in text or "not registered" in text)


# ---------------------------------------------------------------------------- last-known-good copy
def _lkg_root(cfg: ServeConfig, source: ModelSource) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in source.name)
    return lkg_dir(cfg) / safe


def _pointer(source: ModelSource) -> str:
    return f"alias-{source.alias}.json" if source.alias else f"version-{source.version}.json"


def _hashes(directory: Path) -> dict[str, str]:
    return {str(f.relative_to(directory)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(directory.rglob("*")) if f.is_file()}


def keep_lkg(cfg: ServeConfig, source: ModelSource, state: Loaded) -> Path:
    """Save the served version locally with SHA-256 digests, and point the alias at it."""
    root = _lkg_root(cfg, source)
    target = root / f"v{state.version}"
    if not (target / "manifest.json").is_file():
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".v{state.version}-", dir=root))
        try:
            state.bundle.save(tmp / "bundle")
            manifest = {"name": state.name, "version": state.version, "mode": state.mode, "metrics": state.metrics,
                        "uri": state.uri, "files": _hashes(tmp / "bundle")}
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
            try:
                os.replace(tmp, target)  # another replica on this machine may have won the race: fine
            except OSError:
                pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    pointer = root / _pointer(source)
    staged = pointer.with_suffix(f".{os.getpid()}.tmp")
    staged.write_text(json.dumps({"version": state.version}))
    os.replace(staged, pointer)
    # keep only what some pointer names: old versions would otherwise pile up on every promotion
    named = {json.loads(p.read_text()).get("version") for p in root.glob("*.json")}
    for old in root.glob("v*"):
        if old.is_dir() and old.name[1:] not in named:
            shutil.rmtree(old, ignore_errors=True)
    return target


def load_lkg(cfg: ServeConfig, source: ModelSource) -> Loaded:
    """The verified local copy of the version `source` last served; CxrcfError naming what is wrong."""
    from cxrcf.bundle import GeneratorBundle

    root = _lkg_root(cfg, source)
    pointer = root / _pointer(source)
    if not pointer.is_file():
        raise CxrcfError(f"no last-known-good copy of {source.uri()} in {root}")
    try:
        version = json.loads(pointer.read_text())["version"]
        target = root / f"v{version}"
        manifest = json.loads((target / "manifest.json").read_text())
    except (OSError, ValueError, KeyError) as err:
        raise CxrcfError(f"last-known-good copy of {source.uri()} in {root}: unreadable ({one_line(err)})") from None
    if _hashes(target / "bundle") != manifest["files"]:
        raise CxrcfError(f"last-known-good copy {target}: files differ from their SHA-256 manifest; not used")
    bundle = GeneratorBundle.load(target / "bundle")
    return Loaded(bundle, manifest["name"], str(manifest["version"]), source.alias, manifest.get("mode"),
                  dict(manifest.get("metrics") or {}), manifest.get("uri") or source.uri(version),
                  datetime.now(UTC).isoformat(timespec="seconds"), source="last-known-good")


@dataclass
class Failure:
    version: str
    count: int
    retry_at: float
    error: str


class ModelSlot:
    """The generator a replica serves now, kept current with its alias by a polling thread.

    Every registry fault leaves a served, verified model in place; the policy is in serving/policy.py.
    """

    def __init__(self, source: ModelSource, config: ServeConfig | None = None):
        from store.models import resolve_alias

        self.source = source
        self.config = config or ServeConfig()
        self._resolve = resolve_alias
        self.reloads = 0
        self.withdrawn = False
        self.reachable = True
        self.last_ok: float | None = None
        self.last_error: str | None = None
        self.failure: Failure | None = None
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        try:
            version = self._current_version()
            self.last_ok = time.monotonic()
            self.state = _load(source, version)
        except Exception as err:  # any registry fault: try the local copy before giving up
            if _gone(err):
                raise  # a withdrawn model is not started from a stale copy
            self.reachable = False
            self.last_error = one_line(err)
            try:
                self.state = load_lkg(self.config, source)
            except CxrcfError as lkg_err:
                raise CxrcfError(f"{source.uri()}: registry failed ({self.last_error}) and {lkg_err}") from None
            log.warning("cxrcf: registry failed (%s); serving the last-known-good copy of version %s",
                        self.last_error, self.state.version)
        else:
            self._keep()
        self.report()
        log.info("cxrcf: serving %s (version %s, from %s)", source.uri(), self.state.version, self.state.source)

    def _current_version(self) -> str:
        return self.source.version or self._resolve(self.source.name, self.source.alias)

    def _keep(self) -> None:
        try:
            keep_lkg(self.config, self.source, self.state)
        except (OSError, CxrcfError) as err:  # serving matters more than the spare copy
            log.warning("cxrcf: cannot keep a last-known-good copy in %s (%s)", lkg_dir(self.config), err)

    def report(self) -> None:
        """The served-version gauge. Ray exports a gauge only in the report intervals it was set in and its
        agent drops it after two silent intervals (20 s by default): called again by every health check."""
        record("served_version", float(self.state.version), {"model": self.state.name,
                                                             "alias": self.source.alias or ""})

    def follow(self, config: ServeConfig | None = None) -> None:
        """Start (once) following the alias every reload_poll_s; a pinned version never changes."""
        if config is not None:
            self.config = config
        if self.source.version is None and self._watcher is None:
            self._watcher = threading.Thread(target=self._watch, name="cxrcf-alias-watch", daemon=True)
            self._watcher.start()

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(self.config.reload_poll_s):
            self.check()

    def check(self) -> None:
        """One alias check: follow a move, back off a failing version, notice a withdrawal."""
        try:
            version = self._current_version()
        except Exception as err:  # noqa: BLE001 -- whatever failed, keep serving the loaded version
            if _gone(err):
                if not self.withdrawn:
                    log.warning("cxrcf: %s was removed from the registry; model withdrawn (%s)",
                                self.source.uri(), one_line(err))
                self.withdrawn, self.reachable, self.last_ok = True, True, time.monotonic()
                self.last_error = one_line(err)
            else:
                self.reachable, self.last_error = False, one_line(err)
                log.warning("cxrcf: alias check failed (%s); still serving version %s", err, self.state.version)
            return
        self.reachable, self.last_ok = True, time.monotonic()
        if self.withdrawn:
            log.info("cxrcf: %s is back (version %s)", self.source.uri(), version)
            self.withdrawn = False
        if version == self.state.version:
            self.failure, self.last_error = None, None
            return
        failed = self.failure if self.failure and self.failure.version == version else None
        if failed and time.monotonic() < failed.retry_at:
            return
        log.info("cxrcf: %s moved to version %s; loading", self.source.uri(), version)
        try:
            fresh = _load(self.source, version)
        except Exception as err:  # noqa: BLE001 -- a broken version must never replace a working one
            count = failed.count + 1 if failed else 1
            delay = min(self.config.reload_backoff_s * 2 ** (count - 1), self.config.reload_backoff_max_s)
            self.failure = Failure(version, count, time.monotonic() + delay, one_line(err))
            self.last_error = self.failure.error
            record("reload_failures", 1, {"version": version})
            log.warning("cxrcf: version %s failed to load (%s, failure %d); still serving version %s, "
                        "next try in %.0fs", version, self.failure.error, count, self.state.version, delay)
            return
        self.state = fresh  # one assignment: batches already running keep the old state
        self.failure = None
        self.last_error = None
        self.reloads += 1
        self._keep()
        self.report()
        log.info("cxrcf: now serving version %s", version)

    def alias_state(self) -> AliasState:
        now = time.monotonic()
        age = None if self.last_ok is None else round(now - self.last_ok, 3)
        if self.source.version is not None:
            state = "pinned"
        elif self.withdrawn:
            state = "withdrawn"
        elif age is None or age > self.config.stale_after_s:
            state = "stale"
        else:
            state = "current"
        f = self.failure
        return AliasState(state=state, last_check_age_s=age, registry_reachable=self.reachable,
                          source=self.state.source, failed_version=f.version if f else None,
                          failures=f.count if f else 0,
                          retry_in_s=round(max(0.0, f.retry_at - now), 3) if f else None,
                          last_error=self.last_error)


# ------------------------------------------------------------------------------------- metrics
# Custom metrics beside Serve's built-in ones (ray_serve_*), exported by Ray's metrics agent on
# every node (README: how to scrape). Made on first use, in the replica that records them.
_METRICS: dict[str, Any] = {}
_METRIC_KINDS = {
    "requests": ("counter", "cxrcf_requests", "requests answered, by route and HTTP status", ("route", "status")),
    "latency_ms": ("histogram", "cxrcf_request_latency_ms", "time in the replica per request, by route",
                   ("route",), [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000]),
    "batch_size": ("histogram", "cxrcf_batch_size", "requests per batched forward pass", (),
                   [1, 2, 4, 8, 16, 32, 64, 128]),
    "batch_timeouts": ("counter", "cxrcf_batch_timeouts", "batches that missed batch_timeout_s", ()),
    "reload_failures": ("counter", "cxrcf_reload_failures", "versions that failed to load", ("version",)),
    "served_version": ("gauge", "cxrcf_served_version", "the model version each replica serves",
                       ("model", "alias")),
    "arm_requests": ("counter", "cxrcf_arm_requests", "requests by canary arm", ("arm", "version")),
    # the evaluation predictor's probability of the intervened value on the counterfactual
    "online_effectiveness": ("histogram", "cxrcf_online_effectiveness", "P(intervened value | counterfactual)",
                             ("arm", "version", "attribute"), [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.99]),
    "online_age_error": ("histogram", "cxrcf_online_age_error", "|predicted age - do(age)|, years",
                         ("arm", "version"), [1, 2, 5, 10, 20, 40, 80]),
    "shadow_skipped": ("counter", "cxrcf_shadow_skipped", "mirrors skipped at max_shadow_pending", ()),
    "shadow_failures": ("counter", "cxrcf_shadow_failures", "mirrored requests that failed", ()),
}


def record(name: str, value: float, tags: dict[str, str] | None = None) -> None:
    """Record one metric; a process without Ray (unit tests, the driver) records nothing."""
    metric = _METRICS.get(name)
    if metric is None:
        if _METRICS.get("_off"):
            return
        try:
            from ray.serve import metrics

            kind, metric_name, description, tag_keys, *bounds = _METRIC_KINDS[name]
            cls = {"counter": metrics.Counter, "histogram": metrics.Histogram, "gauge": metrics.Gauge}[kind]
            extra = {"boundaries": bounds[0]} if bounds else {}
            metric = _METRICS[name] = cls(metric_name, description=description, tag_keys=tag_keys or None, **extra)
        except Exception:  # noqa: BLE001 -- metrics are never worth failing a request
            _METRICS["_off"] = True
            return
    try:
        if hasattr(metric, "observe"):
            metric.observe(value, tags=tags)
        elif hasattr(metric, "inc"):
            metric.inc(value, tags=tags)
        else:
            metric.set(value, tags=tags)
    except Exception:  # noqa: BLE001 -- a metric that cannot be recorded stops being recorded
        _METRICS.pop(name, None)
        _METRICS["_off"] = True


# ---------------------------------------------------------------------------------- HTTP side
api = FastAPI(
    title="cxrcf counterfactual API",
    version="1",
    description="Causal counterfactual chest X-rays from the registered champion generator. "
                "POST an image (base64 PNG) or a dataset image id, its parents (or let the evaluation "
                "predictor infer them) and interventions; get back counterfactual images with what the "
                "evaluation predictor believes about each.",
)
# Per-replica settings (each replica is its own process), set by CounterfactualService's constructor
# and reconfigure. Only module-level functions touch them: Serve ships the ingress class by value,
# and a method that named this dict (or `api`) directly would get its own copy instead of the one the
# middleware reads. key_digests None = not configured yet: every keyed route answers 503 (fail closed).
_RUNTIME: dict[str, Any] = {"config": ServeConfig(), "key_digests": None, "service": None}


def runtime() -> dict[str, Any]:
    return _RUNTIME


def configure_runtime(config: dict) -> ServeConfig:
    """Apply a user_config ({"serve": ServeConfig fields, "api_key_digests": [...]}); a bad one raises
    CxrcfError naming the field, and the replica keeps what it had (Serve reports the failed update)."""
    from pydantic import ValidationError

    from cxrcf.config import format_validation_error

    try:
        cfg = ServeConfig.model_validate(config["serve"])
    except KeyError:
        raise CxrcfError("user_config: no 'serve' section (build it with serving.app.user_config)") from None
    except ValidationError as err:
        raise CxrcfError(format_validation_error(err, "user_config serve")) from None
    _RUNTIME.update(config=cfg, key_digests=list(config.get("api_key_digests") or []))
    return cfg


def _attach(service) -> None:
    _RUNTIME["service"] = service


# A header-checked image at most this large (and its base64 at most INLINE_CHARS) is coded on the
# event loop: a thread hop costs more than coding it. Anything larger goes to the codec threads.
INLINE_PIXELS = 128 * 128
INLINE_CHARS = 64_000
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/docs", "/docs/oauth2-redirect", "/openapi.json", "/redoc"})
COUNTERFACTUALS = "/v1/counterfactuals"

ERRORS = {code: {"model": ErrorBody, "description": what} for code, what in {
    401: "missing or wrong API key (checked before the body is read)",
    413: "body, image pixels or reply over a limit (serve.max_body_bytes, serve.max_pixels, serve.max_reply_bytes)",
    422: "invalid request; `errors` names each field",
    503: "overloaded (Retry-After), model withdrawn or inference failed",
    504: "the request or its batch missed its deadline (serve.request_timeout_s, serve.batch_timeout_s)"}.items()}


class ApiError(Exception):
    def __init__(self, status: int, field: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(f"{field}: {message}")
        self.status, self.field, self.message, self.headers = status, field, message, headers


@api.exception_handler(ApiError)
async def _api_error(_: Request, err: ApiError):
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else (err.headers or None)
    return JSONResponse(error_body([FieldError(field=err.field, message=err.message)]), err.status, headers)


@api.exception_handler(RequestValidationError)
async def _invalid(_: Request, err: RequestValidationError):
    return JSONResponse(error_body(field_errors(list(err.errors()))), 422)


@api.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, err: StarletteHTTPException):
    # Starlette's own refusals (unknown path, wrong method, an undecodable body) in the API's error shape
    field = {404: "path", 405: "method"}.get(err.status_code, "body")
    message = str(err.detail) if err.status_code != 400 else f"cannot be parsed ({err.detail})"
    return JSONResponse(error_body([FieldError(field=field, message=message)]), err.status_code,
                        getattr(err, "headers", None))


def _request_id(scope) -> str:
    given = next((v for k, v in scope["headers"] if k == b"x-request-id"), b"")
    # honoured when it is a sane token; anything else (too long, control characters) is replaced
    if 0 < len(given) <= 128 and all(33 <= c < 127 for c in given):
        return given.decode("ascii")
    return uuid.uuid4().hex


class Guard:
    """Everything a request meets before the routes, in plain ASGI (cheap, and before the body is read).

    Order: auth (401, or 503 before the keys are configured) -> body limit (413) -> the route under
    its deadline (504). Every answer is counted in the metrics and written as one JSON access-log
    line with its X-Request-ID. Overload never gets this far: Serve's own queue bound
    (max_queued_requests, on the proxy and on the direct port) answers 503 with Retry-After. Plain ASGI rather than `@app.middleware("http")`:
    Starlette's BaseHTTPMiddleware wraps every request in a task group and a re-streamed body,
    which cost a measurable share of the replica's event loop per request under load.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        return await _guarded(self.app, scope, receive, send)


async def _guarded(app, scope, receive, send):
    rt = runtime()
    started = time.perf_counter()
    path = scope["path"]
    status = {"code": 0, "bytes": 0, "model": None}
    given = next((v for k, v in scope["headers"] if k == b"x-request-id"), None)
    # Serve's own middleware has put the client's X-Request-ID (or a fresh one) in the request and
    # echoes it; only without Serve in front (an in-process ASGI client) is it made and sent here
    rid = given.decode("latin-1")[:128] if given else uuid.uuid4().hex
    extra = [] if given else [(b"x-request-id", rid.encode())]

    async def tagged(message):
        if message["type"] == "http.response.start":
            status["code"] = message["status"]
            headers = list(message.get("headers", [])) + extra
            status["model"] = next((v.decode() for k, v in headers if k == b"x-model-version"), None)
            message = {**message, "headers": headers}
        elif message["type"] == "http.response.body":
            status["bytes"] += len(message.get("body", b""))
        await send(message)

    try:
        if path not in PUBLIC_PATHS:
            if rt["key_digests"] is None:
                return await _refuse(503, "service", "starting: not configured yet", scope, receive, tagged,
                                     retry=rt["config"].retry_after_s)
            if not auth.authorized(_headers(scope), rt["key_digests"]):
                return await _refuse(401, "X-API-Key", "missing or unknown API key (send X-API-Key or "
                                     "Authorization: Bearer)", scope, receive, tagged)
        receive = await _limit_body(scope, receive, tagged, rt["config"].max_body_bytes)
        if receive is None:
            return None
        if path != COUNTERFACTUALS:
            return await app(scope, receive, tagged)
        timeout = rt["config"].request_timeout_s
        try:
            return await asyncio.wait_for(app(scope, receive, tagged), timeout)
        except TimeoutError:
            if status["code"]:
                raise
            return await _refuse(504, "service", f"no answer within {timeout:g}s (serve.request_timeout_s)",
                                 scope, receive, tagged)
    finally:
        elapsed_ms = (time.perf_counter() - started) * 1000.0
        code = status["code"] or 499  # 499: the client went away before an answer
        route = path if path in PUBLIC_PATHS or path in ("/v1/model", COUNTERFACTUALS) else "other"
        record("requests", 1, {"route": route, "status": str(code)})
        record("latency_ms", elapsed_ms, {"route": route})
        access.info(json.dumps({"access": 1, "request_id": rid, "method": scope["method"], "path": path[:200],
                                "status": code, "ms": round(elapsed_ms, 2), "bytes": status["bytes"],
                                "version": status["model"], "client": (scope.get("client") or ["?"])[0]}))


def _headers(scope) -> dict[str, str]:
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]
            if k in (b"x-api-key", b"authorization")}


async def _limit_body(scope, receive, send, limit: int):
    """`receive` for the app, or None after refusing a body over serve.max_body_bytes with a 413."""
    declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
    if declared is not None:
        if not declared.isdigit():
            await _refuse(400, "content-length", "not a number", scope, receive, send)
            return None
        if int(declared) > limit:
            await _refuse(413, "body", f"{int(declared)} bytes is over the limit of {limit} "
                          "(serve.max_body_bytes)", scope, receive, send)
            return None
        return receive
    if scope["method"] not in ("POST", "PUT", "PATCH"):
        return receive
    # no declared length (chunked upload): read at most limit + 1 bytes, then replay what was read
    chunks, size, more = [], 0, True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        more = message.get("more_body", False)
        if size > limit:
            await _refuse(413, "body", f"over {limit} bytes, the limit (serve.max_body_bytes)", scope, receive, send)
            return None
    replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

    async def replayed():
        return replay.pop() if replay else await receive()

    return replayed


async def _refuse(status: int, field: str, message: str, scope, receive, send, retry: int | None = None) -> None:
    headers = {"Retry-After": str(retry)} if retry else None
    if status == 401:
        headers = {"WWW-Authenticate": "Bearer"}
    response = JSONResponse(error_body([FieldError(field=field, message=message)]), status, headers)
    await response(scope, receive, send)


api.add_middleware(Guard)


_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="one of CXRCF_API_KEYS")
_bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <one of CXRCF_API_KEYS>")


async def require_key(request: Request, _k: Annotated[Any, Depends(_key_header)],
                      _b: Annotated[Any, Depends(_bearer)]) -> None:
    # Guard has checked already, before the body was read; this documents the schemes in OpenAPI
    # and keeps the route closed should it ever be mounted without Guard
    digests = runtime()["key_digests"]
    if digests is None or not auth.authorized(request.headers, digests):
        raise ApiError(401, "X-API-Key", "missing or unknown API key (send X-API-Key or Authorization: Bearer)")


def _read_dataset_image(root: str, image_id: str, max_pixels: int) -> tuple[Any, dict]:
    from cxrcf.data import load_metadata

    frame = _metadata(root, load_metadata)
    if image_id not in frame.index:
        raise ApiError(422, "image_id", f"unknown id {image_id!r} in {root}/metadata.csv")
    row = frame.loc[image_id]
    try:
        with open(os.path.join(root, row["path"]), "rb") as f:
            raw = f.read(64 * 1024 * 1024 + 1)
        # the uploaded-image codec: same size budget, same 16-bit scaling, a 422 for a corrupt file
        pixels = decode_png_bytes(raw, max_pixels)
    except ImageTooLarge as err:
        raise ApiError(413, "image_id", f"the dataset image: {err}") from None
    except (OSError, ImageError) as err:
        raise ApiError(422, "image_id", f"cannot read the dataset image {row['path']} ({err})") from None
    parents = {"sex": row["sex"], "race": row["race"], "age": float(row["age"]), "finding": row["finding"]}
    return pixels, parents


_METADATA: dict[str, Any] = {}


def _metadata(root: str, load_metadata):
    if root not in _METADATA:
        _METADATA[root] = load_metadata(root).set_index("id", drop=False)
    return _METADATA[root]


def _reply(req: CounterfactualRequest, t_u: float, result: ItemResult, ref: dict, height: int, width: int) -> bytes:
    factual_p = probabilities(result.probabilities)
    out = []
    for intervention, cf in zip(req.interventions, result.counterfactuals):
        cf_p = probabilities(cf["probabilities"])
        out.append(Counterfactual(
            intervention=intervention.values(), parents=parents_from_codes(cf["parents"]),
            image=encode_png(resize_gray(cf["pixels"], height, width)), probabilities=cf_p,
            drift=drift(factual_p, cf_p)))
    return CounterfactualResponse(
        factual=Factual(image_id=req.image_id, height=height, width=width,
                        parents=parents_from_codes(result.parents), parents_inferred=result.inferred,
                        probabilities=factual_p),
        counterfactuals=out, model=ModelRef(batch_size=result.batch_size, **ref), t_u=t_u, seed=req.seed,
    ).model_dump_json().encode()


_POOLS: dict[str, ThreadPoolExecutor] = {}


def _pool(name: str) -> ThreadPoolExecutor:
    # "infer": one thread, so a hung batch holds back the next ones (which then time out too and
    # fail check_health) instead of a second forward pass running beside it; "codec": PNG work,
    # kept off both the event loop and the inference thread
    if name not in _POOLS:
        _POOLS[name] = ThreadPoolExecutor(1 if name == "infer" else 2, thread_name_prefix=f"cxrcf-{name}")
    return _POOLS[name]


def _off_loop(fn, *args, inline: bool):
    if inline:
        return _done(fn(*args))
    return asyncio.get_running_loop().run_in_executor(_pool("codec"), fn, *args)


async def _done(value):
    return value


def _check_reply(interventions: int, height: int, width: int, limit: int) -> None:
    need = reply_bytes(interventions, height, width)
    if need > limit:
        raise ApiError(413, "interventions", f"{interventions} counterfactuals of {width}x{height} pixels may need "
                       f"{need} bytes, over the limit of {limit} (serve.max_reply_bytes); send fewer "
                       "interventions or a smaller image")


class BatchTimeout(Exception):
    pass


@serve.ingress(api)
class CounterfactualService:
    def __init__(self, source: dict, data_root: str | None = None, config: dict | None = None, runner=None):
        """`runner` replaces engine.run_batch as the batched forward pass (tests inject a slow one to
        exercise the batch deadline); production passes None."""
        import ray
        import torch

        # the keys and limits are in force before this replica can answer anything (fail closed)
        cfg = configure_runtime(config) if config is not None else runtime()["config"]
        source = ModelSource.model_validate(source)
        os.environ.update(source.env)
        # MLflow's defaults retry an unreachable server for minutes; a replica must notice in seconds
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(cfg.registry_timeout_s)))
        # Torch threads: one for small batches, the CPUs Ray reserved for this replica for large ones
        # (parallel_min_batch); more than reserved would only fight the other replicas.
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
        self._cpus = max(1, int(cpus))
        torch.set_num_threads(1)
        self._runner = runner or run_batch
        self._slot = ModelSlot(source, cfg)
        self._data_root = data_root
        self._batching = (8, 0.02)  # what @serve.batch below starts with, until reconfigure
        self._batches = 0
        self._requests = 0
        self._batch_timeouts = 0
        self._batch_started: float | None = None
        # open while no batch is in the inference thread: see `infer`
        self._idle = asyncio.Event()
        self._idle.set()
        try:
            from ray.serve import get_replica_context

            self._replica = get_replica_context().replica_id.unique_id
        except Exception:  # noqa: BLE001 -- outside Serve (a unit test) there is no replica id
            self._replica = f"pid-{os.getpid()}"
        self._canary = Canary(source, ModelSlot, lambda: runtime()["config"], record)
        self._canary.start()
        _attach(self)

    def reconfigure(self, config: dict) -> None:
        cfg = configure_runtime(config)
        self._batching = (cfg.max_batch_size, cfg.batch_wait_timeout_s)
        self.batched.set_max_batch_size(cfg.max_batch_size)
        self.batched.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)
        self._slot.follow(cfg)
        self._canary.sync()

    # ----------------------------------------------------------------------------------- health
    def check_health(self) -> None:
        """Serve restarts a replica whose batches keep missing their deadline (a hung forward pass)."""
        for slot in (self._slot, self._canary.live()):
            if slot is not None:
                slot.report()
        cfg: ServeConfig = runtime()["config"]
        if self._batch_timeouts >= cfg.unhealthy_after_batch_timeouts:
            raise RuntimeError(f"{self._batch_timeouts} consecutive batches missed batch_timeout_s "
                               f"{cfg.batch_timeout_s:g}s")
        stuck = self._batch_started is not None and time.monotonic() - self._batch_started
        if stuck and stuck > cfg.batch_timeout_s * cfg.unhealthy_after_batch_timeouts:
            raise RuntimeError(f"a forward pass has run for {stuck:.0f}s")

    def __del__(self):
        for part in (getattr(self, "_slot", None), getattr(self, "_canary", None)):
            if part is not None:
                part.stop()

    # ---------------------------------------------------------------------------------- batches
    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def batched(self, requests: list[tuple[str, Item]]) -> list[tuple[ItemResult, dict]]:
        # each arm's state as this batch starts: a reload or a canary change mid-batch changes nothing here
        states = {"champion": self._slot.state}
        candidate = self._canary.live()
        if candidate is not None:
            states["candidate"] = candidate.state
        groups: dict[str, list[int]] = {}
        for i, (arm, _) in enumerate(requests):
            groups.setdefault(arm if arm in states else "champion", []).append(i)
        passes = [(states[arm], [requests[i][1] for i in rows]) for arm, rows in groups.items()]
        threads = self._cpus if len(requests) >= runtime()["config"].parallel_min_batch else 1
        timeout = runtime()["config"].batch_timeout_s
        work = asyncio.get_running_loop().run_in_executor(_pool("infer"), self._run, passes, threads)
        self._idle.clear()
        try:
            results = await asyncio.wait_for(asyncio.shield(work), timeout)
        except TimeoutError:
            self._batch_timeouts += 1
            record("batch_timeouts", 1)
            log.error("cxrcf: a batch of %d missed batch_timeout_s %gs (%d in a row)", len(requests), timeout,
                      self._batch_timeouts)
            raise BatchTimeout(f"the batch missed its deadline of {timeout:g}s (serve.batch_timeout_s)") from None
        finally:
            self._idle.set()
        self._batch_timeouts = 0
        self._batches += 1
        self._requests += len(requests)
        record("batch_size", len(requests))
        out: list[Any] = [None] * len(requests)
        for (arm, rows), part in zip(groups.items(), results):
            s = states[arm]
            ref = {"name": s.name, "version": s.version, "alias": s.alias, "mode": s.mode, "arm": arm}
            for i, r in zip(rows, part):
                out[i] = (r, ref)
        return out

    async def infer(self, request: tuple[str, Item]) -> tuple[ItemResult, dict]:
        """Into the batch queue once the inference thread is free, then the batch's answer.

        Serve's batcher forms the next batch while the current one runs, from whatever arrives
        within batch_wait_timeout_s of its first request, and queues it behind the running one;
        past saturation those batches shrank (64 clients: a mean batch of 10 and less throughput
        than 32 clients, issue 17). Held here while a batch runs, requests enter together when it
        ends, so the next batch holds everything that arrived meanwhile, up to max_batch_size.
        An idle replica lets a request straight through: no wait at low load.
        """
        if not self._idle.is_set():
            await self._idle.wait()
        return await self.batched(request)

    def _run(self, passes, threads):
        """One forward pass per arm in the batch, one after the other on the inference thread."""
        self._batch_started = time.monotonic()
        try:
            return [self._runner(state.bundle, items, threads) for state, items in passes]
        finally:
            self._batch_started = None

    # ----------------------------------------------------------------------------------- routes
    def _info(self) -> dict:
        s = self._slot.state
        return ModelInfo(
            name=s.name, version=s.version, alias=s.alias, mode=s.mode, uri=s.uri, resolution=s.bundle.resolution,
            metrics=s.metrics, device=str(s.bundle.device), loaded_at=s.loaded_at, reloads=self._slot.reloads,
            replica=self._replica,
            stats=BatchStats(batches=self._batches, requests=self._requests,
                             mean_batch_size=self._requests / self._batches if self._batches else 0.0,
                             max_batch_size=self._batching[0], batch_wait_timeout_s=self._batching[1]),
            alias_state=self._slot.alias_state(), canary=self._canary.info(),
        ).model_dump()

    def _model_headers(self) -> dict[str, str]:
        s = self._slot.state
        return {"X-Model-Version": s.version, "X-Model-Alias": s.alias or "",
                "X-Model-Alias-State": self._slot.alias_state().state}

    @api.get("/healthz", response_model=Health)
    async def healthz(self) -> dict:
        s = self._slot.state
        return Health(status="ok", model=s.name, version=s.version).model_dump()

    @api.get("/readyz", response_model=Ready, responses={503: {"model": Ready, "description": "not ready"}})
    async def readyz(self) -> Response:
        s = self._slot.state
        alias = self._slot.alias_state()
        reasons = []
        if alias.state == "withdrawn":
            reasons.append(f"alias {s.alias!r} was removed from the registry (model withdrawn)")
        if self._batch_timeouts:
            reasons.append(f"{self._batch_timeouts} consecutive batch timeouts")
        if runtime()["key_digests"] is None:
            reasons.append("not configured")
        body = Ready(ready=not reasons, reasons=reasons, model=s.name, version=s.version, alias=s.alias,
                     alias_state=alias, batch_timeouts=self._batch_timeouts)
        return Response(body.model_dump_json(), 503 if reasons else 200, media_type="application/json")

    @api.get("/v1/model", response_model=ModelInfo, dependencies=[Depends(require_key)],
             responses={401: ERRORS[401]})
    async def model(self) -> Response:
        return JSONResponse(self._info(), headers=self._model_headers())

    @api.post(COUNTERFACTUALS, response_model=CounterfactualResponse, dependencies=[Depends(require_key)],
              responses=ERRORS)
    async def counterfactuals(self, req: CounterfactualRequest, request: Request) -> Response:
        cfg: ServeConfig = runtime()["config"]
        if self._slot.withdrawn:
            raise ApiError(503, "model", f"{self._slot.source.uri()} was removed from the registry: the model is "
                           "withdrawn until the alias points to a version again", {"Retry-After": "60"})
        if len(req.interventions) > cfg.max_interventions:
            raise ApiError(422, "interventions", f"{len(req.interventions)} given; at most {cfg.max_interventions} "
                           "per request (serve.max_interventions)")
        if req.image_id is not None and len(req.image_id) > cfg.max_image_id_chars:
            raise ApiError(422, "image_id", f"{len(req.image_id)} characters; at most {cfg.max_image_id_chars} "
                           "(serve.max_image_id_chars)")
        if req.image is not None:
            try:
                width, height = peek_size(req.image)
                check_size(width, height, cfg.max_pixels)
            except ImageTooLarge as err:
                raise ApiError(413, "image", str(err)) from None
            except ImageError as err:
                raise ApiError(422, "image", str(err)) from None
            _check_reply(len(req.interventions), height, width, cfg.max_reply_bytes)
            inline = width * height <= INLINE_PIXELS and len(req.image) <= INLINE_CHARS
            try:
                pixels = await _off_loop(decode_png, req.image, cfg.max_pixels, inline=inline)
            except ImageTooLarge as err:
                raise ApiError(413, "image", str(err)) from None
            except ImageError as err:
                raise ApiError(422, "image", str(err)) from None
            parents = None
        else:
            if not self._data_root:
                raise ApiError(422, "image_id", "this server has no dataset (start it with --data DIR)")
            try:
                pixels, parents = await _off_loop(_read_dataset_image, self._data_root, req.image_id,
                                                  cfg.max_pixels, inline=False)
            except CxrcfError as err:
                raise ApiError(422, "image_id", f"cannot read the dataset ({err})") from None
            _check_reply(len(req.interventions), *pixels.shape, cfg.max_reply_bytes)
        if req.parents is not None:
            parents = req.parents.model_dump()
        height, width = pixels.shape
        t_u = cfg.t_u if req.t_u is None else req.t_u
        item = Item(pixels=pixels, parents=parents, interventions=[i.values() for i in req.interventions],
                    t_u=t_u, seed=req.seed)
        arm, mirror = "champion", False
        if cfg.canary.on and self._canary.live() is not None:
            # Serve's proxy and direct ingress put the client's X-Request-ID (or a fresh one) here
            arm, mirror = route(request.headers.get("x-request-id") or uuid.uuid4().hex, cfg.canary)
        try:
            result, ref = await self.infer((arm, item))
        except BatchTimeout as err:
            raise ApiError(504, "model", str(err)) from None
        except Exception as err:
            log.exception("cxrcf: batch failed")
            raise ApiError(503, "model", f"inference failed ({type(err).__name__}); try again",
                           {"Retry-After": str(cfg.retry_after_s)}) from None
        if cfg.canary.on:
            self._canary.tally.observe(ref["arm"], ref["version"], item.interventions, result)
            if mirror:
                self._canary.shadow(self.infer, item, cfg.canary.max_shadow_pending)
        body = await _off_loop(_reply, req, t_u, result, ref, height, width, inline=height * width <= INLINE_PIXELS)
        headers = {"X-Model-Version": ref["version"], "X-Model-Alias": ref["alias"] or ""}
        # already a validated CounterfactualResponse: sending its JSON spares FastAPI a second validation
        return Response(body, media_type="application/json", headers=headers)


# ------------------------------------------------------------------------------------- building
def user_config(cfg: ServeConfig, api_keys: list[str]) -> dict:
    """What every replica gets, at construction and on reconfigure: the serve section and the keys' digests."""
    return {"serve": cfg.model_dump(mode="json"), "api_key_digests": auth.digests(api_keys)}


def _scaling(cfg: ServeConfig) -> dict:
    if cfg.num_replicas == "auto":
        return {"num_replicas": None, "autoscaling_config": {
            "min_replicas": 1, "max_replicas": cfg.max_replicas,
            "target_ongoing_requests": max(1, cfg.max_batch_size)}}
    return {"num_replicas": cfg.num_replicas}


def build_app(cfg: ServeConfig, name: str, alias: str | None = None, version: str | None = None,
              data_root: str | None = None, api_keys: list[str] | None = None, runner=None):
    """The bound Serve application (pass it to `serve.run`). `runner`: see CounterfactualService."""
    if (alias is None) == (version is None):
        raise CxrcfError("model: give exactly one of an alias or a version")
    env = {k: os.environ[k] for k in ENV_PASSED if os.environ.get(k)}
    source = ModelSource(name=name, alias=alias, version=version, env=env)
    actor = {"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus}
    config = user_config(cfg, api_keys or [])
    # The same config goes to the constructor, so keys and limits hold from the replica's first
    # request: Serve calls reconfigure only after the direct-ingress server has started.
    return serve.deployment(CounterfactualService).options(
        name="CounterfactualService",
        ray_actor_options=actor,
        max_ongoing_requests=cfg.max_ongoing_requests,
        # the Serve proxy's queue (its 503s); the replica bounds its own queue for direct clients
        max_queued_requests=cfg.max_queued_requests,
        backpressure_config=BackpressureConfig(status_code=503, retry_after_s=cfg.retry_after_s),
        health_check_period_s=cfg.health_check_period_s,
        user_config=config,
        # Guard writes one structured access-log line per request; Serve's own would be a second one
        logging_config={"enable_access_log": False},
        **_scaling(cfg),
    ).bind(source.model_dump(), str(data_root) if data_root else None, config, runner)


def wait_ready(url: str, timeout_s: float = 120.0) -> dict:
    """Poll GET /healthz until the app answers; returns the health body."""
    import httpx

    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{url}/healthz", timeout=5.0)
            if r.status_code == 200:
                return r.json()
            last = f"HTTP {r.status_code}: {r.text[:200]}"
        except httpx.HTTPError as err:
            last = str(err)
        time.sleep(0.25)
    raise CxrcfError(f"{url}/healthz: not ready after {timeout_s:.0f}s ({last})")
