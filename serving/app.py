"""The Ray Serve application: a FastAPI ingress in front of a batching model deployment.

    client --HTTP--> CounterfactualAPI (validate, decode PNG, auth) --handle--> CounterfactualModel
                                                                              @serve.batch -> engine.run_batch

- The ingress parses and validates every request (pydantic schemas, image codec, limits) so that
  nothing a client sends reaches the batch; its user_config holds the API-key digests and limits.
- The model deployment loads `models:/<name>@<alias>` (or a pinned version), batches requests with
  `@serve.batch` (max_batch_size / batch_wait_timeout_s from its user_config, changeable at run time
  through `reconfigure`), and runs one batched forward pass per batch in a worker thread so the
  event loop keeps queueing the next batch meanwhile.
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
from datetime import datetime, timezone
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader, HTTPBearer
from pydantic import BaseModel, ConfigDict
from ray import serve

from cxrcf.config import ServeConfig
from cxrcf.errors import CxrcfError
from serving import auth
from serving.engine import Item, ItemResult, run_batch
from serving.images import ImageError, decode_png, encode_png, resize_gray
from serving.schemas import (
    BatchStats, Counterfactual, CounterfactualRequest, CounterfactualResponse, ErrorBody, Factual,
    FieldError, Health, ModelInfo, ModelRef, drift, error_body, field_errors, parents_from_codes,
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
                  datetime.now(timezone.utc).isoformat(timespec="seconds"))


class CounterfactualModel:
    def __init__(self, source: dict):
        import ray
        import torch

        self._source = ModelSource.model_validate(source)
        os.environ.update(self._source.env)
        # intra-op threads beyond the CPUs Ray reserved for this replica only fight the other replicas
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
        torch.set_num_threads(max(1, int(cpus)))
        from pipelines.registry import resolve_alias

        self._resolve = resolve_alias
        self._state = _load(self._source, self._current_version())
        self._reloads = 0
        self._batches = 0
        self._requests = 0
        self._poll_s = ServeConfig().reload_poll_s
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self._batching = (8, 0.02)  # what @serve.batch below starts with, until reconfigure
        log.info("cxrcf: serving %s (version %s)", self._source.uri(), self._state.version)

    def _current_version(self) -> str:
        return self._source.version or self._resolve(self._source.name, self._source.alias)

    def _watch(self) -> None:
        while not self._stop.wait(self._poll_s):
            try:
                version = self._current_version()
                if version != self._state.version:
                    log.info("cxrcf: %s moved to version %s; loading", self._source.uri(), version)
                    fresh = _load(self._source, version)
                    self._state = fresh  # one assignment: batches already running keep the old state
                    self._reloads += 1
                    log.info("cxrcf: now serving version %s", version)
            except Exception as err:  # the registry may be briefly unreachable: keep serving, retry
                log.warning("cxrcf: alias check failed (%s); still serving version %s", err, self._state.version)

    def reconfigure(self, config: dict) -> None:
        self._poll_s = float(config["reload_poll_s"])
        self._batching = (int(config["max_batch_size"]), float(config["batch_wait_timeout_s"]))
        self.batched.set_max_batch_size(self._batching[0])
        self.batched.set_batch_wait_timeout_s(self._batching[1])
        # started here, not in __init__, so that the first wait already uses the configured period
        if self._source.version is None and self._watcher is None:
            self._watcher = threading.Thread(target=self._watch, name="cxrcf-alias-watch", daemon=True)
            self._watcher.start()

    def __del__(self):
        self._stop.set()

    async def counterfactual(self, item: Item) -> tuple[ItemResult, dict]:
        return await self.batched(item)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def batched(self, items: list[Item]) -> list[tuple[ItemResult, dict]]:
        state = self._state
        results = await asyncio.to_thread(run_batch, state.bundle, items)
        self._batches += 1
        self._requests += len(items)
        ref = {"name": state.name, "version": state.version, "alias": state.alias, "mode": state.mode}
        return [(r, ref) for r in results]

    def info(self) -> dict:
        s = self._state
        return ModelInfo(
            name=s.name, version=s.version, alias=s.alias, mode=s.mode, uri=s.uri, resolution=s.bundle.resolution,
            metrics=s.metrics, device=str(s.bundle.device), loaded_at=s.loaded_at, reloads=self._reloads,
            stats=BatchStats(batches=self._batches, requests=self._requests,
                             mean_batch_size=self._requests / self._batches if self._batches else 0.0,
                             max_batch_size=self._batching[0], batch_wait_timeout_s=self._batching[1]),
        ).model_dump()


# ---------------------------------------------------------------------------------- HTTP side
api = FastAPI(
    title="cxrcf counterfactual API",
    version="1",
    description="Causal counterfactual chest X-rays from the registered champion generator. "
                "POST an image (base64 PNG) or a dataset image id, its parents (or let the evaluation "
                "predictor infer them) and interventions; get back counterfactual images with what the "
                "evaluation predictor believes about each.",
)
# Per-replica settings (each replica is its own process), replaced by CounterfactualAPI.reconfigure.
# Only module-level functions touch them: Serve ships the ingress class by value, and a method that
# named this dict (or `api`) directly would get its own copy instead of the one the middleware reads.
_RUNTIME: dict[str, Any] = {"max_body_bytes": ServeConfig().max_body_bytes,
                            "max_interventions": ServeConfig().max_interventions, "key_digests": []}


def runtime() -> dict[str, Any]:
    return _RUNTIME


def configure_runtime(config: dict) -> None:
    _RUNTIME.update(max_body_bytes=int(config["max_body_bytes"]), max_interventions=int(config["max_interventions"]),
                    key_digests=list(config.get("api_key_digests") or []))

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


@api.middleware("http")
async def _limit_body(request: Request, call_next):
    limit = runtime()["max_body_bytes"]
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            return JSONResponse(error_body([FieldError(field="content-length", message="not a number")]), 400)
        size = int(declared)
    elif request.method in ("POST", "PUT", "PATCH"):
        size = len(await request.body())
    else:
        size = 0
    if size > limit:
        return JSONResponse(error_body([FieldError(
            field="body", message=f"{size} bytes is over the limit of {limit} (serve.max_body_bytes)")]), 413)
    return await call_next(request)


_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="one of CXRCF_API_KEYS")
_bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <one of CXRCF_API_KEYS>")


async def require_key(request: Request, _k=Depends(_key_header), _b=Depends(_bearer)) -> None:
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


def _reply(req: CounterfactualRequest, result: ItemResult, ref: dict, height: int, width: int) -> dict:
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
    ).model_dump()


@serve.ingress(api)
class CounterfactualAPI:
    def __init__(self, model, data_root: str | None = None):
        self._model = model
        self._data_root = data_root

    def reconfigure(self, config: dict) -> None:
        configure_runtime(config)

    async def _call_model(self, method: str, *args):
        try:
            return await getattr(self._model, method).remote(*args)
        except Exception as err:
            log.exception("cxrcf: model call %s failed", method)
            raise ApiError(503, "model", f"the model deployment failed: {type(err).__name__}") from None

    @api.get("/healthz", response_model=Health, responses={503: ERRORS[503]})
    async def healthz(self) -> dict:
        info = await self._call_model("info")
        return Health(status="ok", model=info["name"], version=info["version"]).model_dump()

    @api.get("/v1/model", response_model=ModelInfo, dependencies=[Depends(require_key)],
             responses={401: ERRORS[401], 503: ERRORS[503]})
    async def model(self) -> dict:
        return await self._call_model("info")

    @api.post("/v1/counterfactuals", response_model=CounterfactualResponse, dependencies=[Depends(require_key)],
              responses=ERRORS)
    async def counterfactuals(self, req: CounterfactualRequest) -> dict:
        limit = runtime()["max_interventions"]
        if len(req.interventions) > limit:
            raise ApiError(422, "interventions",
                           f"{len(req.interventions)} given; at most {limit} per request (serve.max_interventions)")
        if req.image is not None:
            try:
                pixels = await asyncio.to_thread(decode_png, req.image)
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
        result, ref = await self._call_model("counterfactual", item)
        return await asyncio.to_thread(_reply, req, result, ref, height, width)


# ------------------------------------------------------------------------------------- building
def model_user_config(cfg: ServeConfig) -> dict:
    return {"max_batch_size": cfg.max_batch_size, "batch_wait_timeout_s": cfg.batch_wait_timeout_s,
            "reload_poll_s": cfg.reload_poll_s}


def api_user_config(cfg: ServeConfig, api_keys: list[str]) -> dict:
    return {"max_body_bytes": cfg.max_body_bytes, "max_interventions": cfg.max_interventions,
            "api_key_digests": auth.digests(api_keys)}


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
    replicas = cfg.max_replicas if cfg.num_replicas == "auto" else cfg.num_replicas
    model = serve.deployment(CounterfactualModel).options(
        name="CounterfactualModel",
        ray_actor_options={"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus},
        max_ongoing_requests=cfg.max_ongoing_requests,
        user_config=model_user_config(cfg),
        **_scaling(cfg),
    ).bind(source.model_dump())
    # The ingress only codes JSON and PNG; reserving no CPU leaves the model its full share on a small
    # machine. It must admit every request the model replicas can hold, or batches never fill.
    return serve.deployment(CounterfactualAPI).options(
        name="CounterfactualAPI",
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=cfg.max_ongoing_requests * replicas,
        user_config=api_user_config(cfg, api_keys or []),
        **_scaling(cfg),
    ).bind(model, str(data_root) if data_root else None)


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
