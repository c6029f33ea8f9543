"""Protection settings of the online API: budgets, backpressure, deadlines, registry-fault policy.

They travel to every replica in the deployment's user_config next to params.serve's settings, so a
`serve deploy` config file can change them at run time. Defaults are sized for the CPU service
(a 64 px model) and a handful of concurrent clients per replica; every refusal names its setting.

Registry-fault policy (README, "Serving counterfactuals"):
- registry unreachable: keep serving the loaded version; /v1/model and /readyz say `stale` once the
  last successful alias check is older than `stale_after_s`; /readyz stays 200 (the model is fine).
- a new version that fails to load: keep serving the old one, retry after `reload_backoff_s`,
  doubling up to `reload_backoff_max_s`; the failure is reported in /v1/model and /readyz.
- the followed alias deleted (or the registered model deleted): the model is *withdrawn*; an
  operator deletes `champion` to stop it being used, so counterfactual requests answer 503 and
  /readyz answers 503 until the alias points to a version again (rollback moves it rather than
  deleting it). Liveness (/healthz) stays 200: restarting the replica would not help.
- replica start with the registry down: start from the last-known-good copy (`lkg_dir`) of the
  version this alias last served, verified by SHA-256, and report source `last-known-good`.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


def default_lkg_dir() -> str:
    return os.environ.get("CXRCF_SERVE_CACHE") or str(Path.home() / ".cache" / "cxrcf" / "serving")


class ServePolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # budgets: checked from the PNG header and the request before any decoding or inference
    max_pixels: int = Field(1024 * 1024, ge=64, description="width x height of an input image")
    max_reply_bytes: int = Field(16_000_000, ge=100_000,
                                 description="worst-case size of the reply: every counterfactual PNG at the input's size")
    # backpressure and deadlines
    # Serve's proxy counts a burst's requests as queued until it has assigned them to replicas, so
    # this is also the largest burst one proxy takes at once
    max_queued_requests: int = Field(64, ge=1, description="requests Serve queues beyond max_ongoing_requests, "
                                     "per proxy and per replica's direct port; more are answered 503")
    retry_after_s: int = Field(1, ge=1, description="Retry-After of a 503 for overload")
    request_timeout_s: float = Field(30.0, gt=0, description="a request's deadline inside the replica (504)")
    batch_timeout_s: float = Field(20.0, gt=0, description="one batched forward pass's deadline (504 for its batch)")
    unhealthy_after_batch_timeouts: int = Field(3, ge=1,
                                                description="consecutive batch timeouts that fail check_health")
    health_check_period_s: float = Field(5.0, gt=0)
    # registry faults
    stale_after_s: float = Field(60.0, gt=0, description="alias check age after which the alias is reported stale")
    reload_backoff_s: float = Field(5.0, gt=0, description="first retry delay of a version that failed to load")
    reload_backoff_max_s: float = Field(600.0, gt=0)
    registry_timeout_s: float = Field(5.0, gt=0, description="MLflow HTTP timeout in replicas (no minute-long retries)")
    lkg_dir: str = Field(default_factory=default_lkg_dir, description="last-known-good copies of served versions")


def reply_bytes(interventions: int, height: int, width: int) -> int:
    """Worst case of a reply: each counterfactual an incompressible 8-bit PNG of the input's size, in base64."""
    png = height * (width + 1) + 1024  # one filter byte per row, chunk headers and zlib's stored blocks
    return interventions * (png * 4 // 3 + 2048)  # base64 plus the JSON around each image
