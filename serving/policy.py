"""Protection policy of the online API: budgets, backpressure, deadlines, registry faults, canary.

Their settings are `ServeConfig` fields (params.yaml `serve:`, cxrcf/config.py, defaults sized for
the CPU service, a 64 px model and a handful of concurrent clients per replica); the whole section
travels to every replica in the deployment's user_config, so a `serve deploy` config file can
change them at run time. Every refusal names its setting.

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
- the canary's candidate alias missing, withdrawn or failing to load: every request goes to the
  champion (nothing is mirrored) and the replica keeps trying every `reload_poll_s`; /v1/model says why.
"""

from __future__ import annotations

import os
from pathlib import Path

from cxrcf.config import ServeConfig


def one_line(err: Exception) -> str:
    """How a registry or load error is reported (logs, /v1/model, /readyz): its first line, bounded."""
    return (str(err).splitlines() or [type(err).__name__])[0][:300]


def lkg_dir(cfg: ServeConfig) -> Path:
    """Where a replica keeps its last-known-good copies (serve.lkg_dir, else $CXRCF_SERVE_CACHE, else ~/.cache)."""
    chosen = cfg.lkg_dir or os.environ.get("CXRCF_SERVE_CACHE") or str(Path.home() / ".cache" / "cxrcf" / "serving")
    return Path(chosen)


def reply_bytes(interventions: int, height: int, width: int) -> int:
    """Worst case of a reply: each counterfactual an incompressible 8-bit PNG of the input's size, in base64."""
    png = height * (width + 1) + 1024  # one filter byte per row, chunk headers and zlib's stored blocks
    return interventions * (png * 4 // 3 + 2048)  # base64 plus the JSON around each image
