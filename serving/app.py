"""The Ray Serve application: one deployment, a FastAPI ingress with a batching model inside.

    client --HTTP--> Serve proxy --> CounterfactualService replica
                                     route: auth, parse, validate, decode PNG  (every request alone)
                                     @serve.batch `batched`: engine.run_batch  (one forward pass per batch)

- Routes parse and validate every request (pydantic schemas, image codec, limits) so that nothing a
  client sends can fail a batch; only then do they await the `@serve.batch` method, which runs one
  batched forward pass in a worker thread so the event loop keeps accepting and queueing requests.
- One deployment rather than an ingress plus a model deployment: on a small CPU machine the extra
  actor hop per request cost more than the batching saved. For the same reason clients may skip
  Serve's proxy altogether: with `serve.direct_ingress` each replica answers on its own port too
  (serving/ingress.py).
- A batch of at least `parallel_min_batch` requests runs on as many torch threads as the replica
  has CPUs; smaller ones on one, which batch-1 serving is fastest with. Replicas (fixed or autoscaled) and
  `num_gpus` per replica scale the whole service; on GPU the pass runs under bf16 autocast.
- Run-time settings live in the deployment's user_config and are applied by `reconfigure`:
  max_batch_size, batch_wait_timeout_s, reload_poll_s, body and intervention limits, and the
  SHA-256 digests of the API keys. Serve applies a user_config change in place for config-file
  deployments (`serve deploy`); a `serve.run` redeploy (what `cxrcf serve` and the tests do)
  counts as new code in Ray 2.60 and rolls the replicas, which then reconfigure as they start.
- Hot reload: a replica thread polls the alias every `reload_poll_s`; when it moves, the new version
  is loaded beside the old one and swapped in with one assignment. A batch holds the state it
  started with, so in-flight requests finish on the old version and none is dropped.
"""

# No `from __future__ import annotations`: Serve rebuilds the route methods of the ingress class
# in its own module, where FastAPI could not resolve string annotations of the request body.
import asyncio
import logging
import os
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import APIKeyHeader, HTTPBearer
from pydantic import BaseModel, ConfigDict
from ray import serve

from cxrcf.config import ServeConfig
from cxrcf.errors import CxrcfError
from serving import auth
from serving.engine import Item, ItemResult, run_batch
from serving.images import ImageError, decode_png, encode_png, resize_gray
from serving.schemas import (
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
    drift,
    error_body,
    field_errors,
    parents_from_codes,
    probabilities,
)

log = logging.getLogger("ray.serve")

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


def _load(source: ModelSource, version: str) -> Loaded:
    import torch

    from pipelines.registry import load_bundle

    uri = source.uri(version)
    bundle, info = load_bundle(uri)
    if torch.cuda.is_available():
        bundle.to("cuda")
    return Loaded(bundle, info.get("name") or source.name, str(info.get("version") or version), source.alias,
                  info.get("mode"), dict(info.get("metrics") or {}), uri,
                  datetime.now(UTC).isoformat(timespec="seconds"))


class ModelSlot:
    """The generator a replica serves now, kept current with its alias by a polling thread."""

    def __init__(self, source: ModelSource):
        from pipelines.registry import resolve_alias

        self.source = source
        self._resolve = resolve_alias
        self.state = _load(source, self._current_version())
        self.reloads = 0
        self.poll_s = ServeConfig().reload_poll_s
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        log.info("cxrcf: serving %s (version %s)", source.uri(), self.state.version)

    def _current_version(self) -> str:
        return self.source.version or self._resolve(self.source.name, self.source.alias)

    def follow(self, poll_s: float) -> None:
        """Start (once) following the alias; a pinned version never changes."""
        self.poll_s = poll_s
        if self.source.version is None and self._watcher is None:
            self._watcher = threading.Thread(target=self._watch, name="cxrcf-alias-watch", daemon=True)
            self._watcher.start()

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                version = self._current_version()
                if version != self.state.version:
                    log.info("cxrcf: %s moved to version %s; loading", self.source.uri(), version)
                    fresh = _load(self.source, version)
                    self.state = fresh  # one assignment: batches already running keep the old state
                    self.reloads += 1
                    log.info("cxrcf: now serving version %s", version)
            except Exception as err:  # noqa: BLE001 -- whatever failed, keep serving the loaded version and retry
                log.warning("cxrcf: alias check failed (%s); still serving version %s", err, self.state.version)


# ---------------------------------------------------------------------------------- HTTP side
api = FastAPI(
    title="cxrcf counterfactual API",
    version="1",
    description="Causal counterfactual chest X-rays from the registered champion generator. "
                "POST an image (base64 PNG) or a dataset image id, its parents (or let the evaluation "
                "predictor infer them) and interventions; get back counterfactual images with what the "
                "evaluation predictor believes about each.",
)
# Per-replica settings (each replica is its own process), replaced by CounterfactualService.reconfigure.
# Only module-level functions touch them: Serve ships the ingress class by value, and a method that
# named this dict (or `api`) directly would get its own copy instead of the one the middleware reads.
_RUNTIME: dict[str, Any] = {"max_body_bytes": ServeConfig().max_body_bytes,
                            "max_interventions": ServeConfig().max_interventions, "key_digests": []}


def runtime() -> dict[str, Any]:
    return _RUNTIME


def configure_runtime(config: dict) -> None:
    _RUNTIME.update(max_body_bytes=int(config["max_body_bytes"]), max_interventions=int(config["max_interventions"]),
                    key_digests=list(config.get("api_key_digests") or []))

BIG_IMAGE_CHARS = 300_000  # base64 characters (or pixels x 2) above which PNG coding leaves the event loop

ERRORS = {code: {"model": ErrorBody, "description": what} for code, what in {
    401: "missing or wrong API key", 413: "body larger than serve.max_body_bytes",
    422: "invalid request; `errors` names each field", 503: "model not available"}.items()}


class ApiError(Exception):
    def __init__(self, status: int, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.status, self.field, self.message = status, field, message


@api.exception_handler(ApiError)
async def _api_error(_: Request, err: ApiError):
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return JSONResponse(error_body([FieldError(field=err.field, message=err.message)]), err.status, headers)


@api.exception_handler(RequestValidationError)
async def _invalid(_: Request, err: RequestValidationError):
    return JSONResponse(error_body(field_errors(list(err.errors()))), 422)


class BodyLimit:
    """Refuse a body over serve.max_body_bytes with a 413 before the app reads it.

    Plain ASGI rather than `@app.middleware("http")`: Starlette's BaseHTTPMiddleware wraps every
    request in a task group and a re-streamed body, which cost a measurable share of the replica's
    event loop per request under load.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = runtime()["max_body_bytes"]
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if declared is not None:
            if not declared.isdigit():
                return await _refuse(400, "content-length", "not a number", scope, receive, send)
            if int(declared) > limit:
                return await _refuse(413, "body", f"{int(declared)} bytes is over the limit of {limit} "
                                     "(serve.max_body_bytes)", scope, receive, send)
            return await self.app(scope, receive, send)
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
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
                return await _refuse(413, "body", f"over {limit} bytes, the limit (serve.max_body_bytes)",
                                     scope, receive, send)
        replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replayed():
            return replay.pop() if replay else await receive()

        return await self.app(scope, replayed, send)


async def _refuse(status: int, field: str, message: str, scope, receive, send) -> None:
    response = JSONResponse(error_body([FieldError(field=field, message=message)]), status)
    await response(scope, receive, send)


api.add_middleware(BodyLimit)


_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="one of CXRCF_API_KEYS")
_bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <one of CXRCF_API_KEYS>")


async def require_key(request: Request, _k: Annotated[Any, Depends(_key_header)],
                      _b: Annotated[Any, Depends(_bearer)]) -> None:
    # the two security dependencies only document the schemes in OpenAPI; the check reads the headers
    if not auth.authorized(request.headers, runtime()["key_digests"]):
        raise ApiError(401, "X-API-Key", "missing or unknown API key (send X-API-Key or Authorization: Bearer)")


def _read_dataset_image(root: str, image_id: str) -> tuple[Any, dict]:
    import numpy as np
    from PIL import Image

    from cxrcf.data import load_metadata

    frame = _metadata(root, load_metadata)
    if image_id not in frame.index:
        raise ApiError(422, "image_id", f"unknown id {image_id!r} in {root}/metadata.csv")
    row = frame.loc[image_id]
    with Image.open(os.path.join(root, row["path"])) as img:
        pixels = np.asarray(img.convert("L"), dtype=np.uint8).copy()
    parents = {"sex": row["sex"], "race": row["race"], "age": float(row["age"]), "finding": row["finding"]}
    return pixels, parents


_METADATA: dict[str, Any] = {}


def _metadata(root: str, load_metadata):
    if root not in _METADATA:
        _METADATA[root] = load_metadata(root).set_index("id", drop=False)
    return _METADATA[root]


def _reply(req: CounterfactualRequest, result: ItemResult, ref: dict, height: int, width: int) -> bytes:
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
        counterfactuals=out, model=ModelRef(batch_size=result.batch_size, **ref), t_u=req.t_u, seed=req.seed,
    ).model_dump_json().encode()


def _inline_or_thread(fn, *args, big: bool):
    # a thread hop costs more than coding a small image; a large one would stall the event loop
    return asyncio.to_thread(fn, *args) if big else _done(fn(*args))


async def _done(value):
    return value


@serve.ingress(api)
class CounterfactualService:
    def __init__(self, source: dict, data_root: str | None = None):
        import ray
        import torch

        source = ModelSource.model_validate(source)
        os.environ.update(source.env)
        # Torch threads: one for small batches, the CPUs Ray reserved for this replica for large ones
        # (parallel_min_batch); more than reserved would only fight the other replicas.
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
        self._cpus = max(1, int(cpus))
        torch.set_num_threads(1)
        self._slot = ModelSlot(source)
        self._data_root = data_root
        self._batching = (8, 0.02)  # what @serve.batch below starts with, until reconfigure
        self._parallel_min_batch = ServeConfig().parallel_min_batch
        self._batches = 0
        self._requests = 0

    def reconfigure(self, config: dict) -> None:
        configure_runtime(config)
        self._batching = (int(config["max_batch_size"]), float(config["batch_wait_timeout_s"]))
        self._parallel_min_batch = int(config["parallel_min_batch"])
        self.batched.set_max_batch_size(self._batching[0])
        self.batched.set_batch_wait_timeout_s(self._batching[1])
        self._slot.follow(float(config["reload_poll_s"]))

    def __del__(self):
        slot = getattr(self, "_slot", None)
        if slot is not None:
            slot.stop()

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def batched(self, items: list[Item]) -> list[tuple[ItemResult, dict]]:
        state = self._slot.state
        threads = self._cpus if len(items) >= self._parallel_min_batch else 1
        results = await asyncio.to_thread(run_batch, state.bundle, items, threads)
        self._batches += 1
        self._requests += len(items)
        ref = {"name": state.name, "version": state.version, "alias": state.alias, "mode": state.mode}
        return [(r, ref) for r in results]

    def _info(self) -> dict:
        s = self._slot.state
        return ModelInfo(
            name=s.name, version=s.version, alias=s.alias, mode=s.mode, uri=s.uri, resolution=s.bundle.resolution,
            metrics=s.metrics, device=str(s.bundle.device), loaded_at=s.loaded_at, reloads=self._slot.reloads,
            stats=BatchStats(batches=self._batches, requests=self._requests,
                             mean_batch_size=self._requests / self._batches if self._batches else 0.0,
                             max_batch_size=self._batching[0], batch_wait_timeout_s=self._batching[1]),
        ).model_dump()

    @api.get("/healthz", response_model=Health)
    async def healthz(self) -> dict:
        s = self._slot.state
        return Health(status="ok", model=s.name, version=s.version).model_dump()

    @api.get("/v1/model", response_model=ModelInfo, dependencies=[Depends(require_key)],
             responses={401: ERRORS[401]})
    async def model(self) -> dict:
        return self._info()

    @api.post("/v1/counterfactuals", response_model=CounterfactualResponse, dependencies=[Depends(require_key)],
              responses=ERRORS)
    async def counterfactuals(self, req: CounterfactualRequest) -> Response:
        limit = runtime()["max_interventions"]
        if len(req.interventions) > limit:
            raise ApiError(422, "interventions",
                           f"{len(req.interventions)} given; at most {limit} per request (serve.max_interventions)")
        if req.image is not None:
            try:
                pixels = await _inline_or_thread(decode_png, req.image, big=len(req.image) > BIG_IMAGE_CHARS)
            except ImageError as err:
                raise ApiError(422, "image", str(err)) from None
            parents = None
        else:
            if not self._data_root:
                raise ApiError(422, "image_id", "this server has no dataset (start it with --data DIR)")
            try:
                pixels, parents = await asyncio.to_thread(_read_dataset_image, self._data_root, req.image_id)
            except (OSError, CxrcfError) as err:
                raise ApiError(422, "image_id", f"cannot read the dataset image ({err})") from None
        if req.parents is not None:
            parents = req.parents.model_dump()
        height, width = pixels.shape
        item = Item(pixels=pixels, parents=parents, interventions=[i.values() for i in req.interventions],
                    t_u=req.t_u, seed=req.seed)
        try:
            result, ref = await self.batched(item)
        except Exception as err:
            log.exception("cxrcf: batch failed")
            raise ApiError(503, "model", f"inference failed ({type(err).__name__}); try again") from None
        body = await _inline_or_thread(_reply, req, result, ref, height, width,
                                       big=height * width > BIG_IMAGE_CHARS // 2)
        # already a validated CounterfactualResponse: sending its JSON spares FastAPI a second validation
        return Response(body, media_type="application/json")


# ------------------------------------------------------------------------------------- building
def user_config(cfg: ServeConfig, api_keys: list[str]) -> dict:
    return {"max_batch_size": cfg.max_batch_size, "batch_wait_timeout_s": cfg.batch_wait_timeout_s,
            "reload_poll_s": cfg.reload_poll_s, "max_body_bytes": cfg.max_body_bytes,
            "parallel_min_batch": cfg.parallel_min_batch,
            "max_interventions": cfg.max_interventions, "api_key_digests": auth.digests(api_keys)}


def _scaling(cfg: ServeConfig) -> dict:
    if cfg.num_replicas == "auto":
        return {"num_replicas": None, "autoscaling_config": {
            "min_replicas": 1, "max_replicas": cfg.max_replicas,
            "target_ongoing_requests": max(1, cfg.max_batch_size)}}
    return {"num_replicas": cfg.num_replicas}


def build_app(cfg: ServeConfig, name: str, alias: str | None = None, version: str | None = None,
              data_root: str | None = None, api_keys: list[str] | None = None):
    """The bound Serve application (pass it to `serve.run`)."""
    if (alias is None) == (version is None):
        raise CxrcfError("model: give exactly one of an alias or a version")
    env = {k: os.environ[k] for k in ENV_PASSED if os.environ.get(k)}
    source = ModelSource(name=name, alias=alias, version=version, env=env)
    actor = {"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus}
    return serve.deployment(CounterfactualService).options(
        name="CounterfactualService",
        ray_actor_options=actor,
        max_ongoing_requests=cfg.max_ongoing_requests,
        user_config=user_config(cfg, api_keys or []),
        **_scaling(cfg),
    ).bind(source.model_dump(), str(data_root) if data_root else None)


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
