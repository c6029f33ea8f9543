"""Model references and the bundles behind them: the store's read side.

`NAME@ALIAS`, `NAME/VERSION` and `models:/...` references resolve here to MLflow model versions;
`load_bundle` turns any of them (or `runs:/...`, or a bundle directory) into a GeneratorBundle with
its info; `list_versions` / `show_version` describe what the registry holds. Evaluation metrics
travel on versions as `eval.*` tags (`flat_metrics` makes them, `version_metrics` reads them).
Writes (registration, gates, locks, promotion) live in `pipelines/registry.py`.

Top-level imports stay light (serving and the CLI import this module); MLflow loads inside functions.
"""

from __future__ import annotations

import math
import re
import tempfile
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cxrcf.errors import CxrcfError
from store.tracking import check_reachable

CANDIDATE, CHAMPION, PREVIOUS = "candidate", "champion", "previous-champion"
EVAL_PREFIX = "eval."  # version tags holding evaluation metrics


# ------------------------------------------------------------------------------------ connection
def connect():
    """An MlflowClient on `store.tracking.tracking_uri()`; fails fast when the server is down.

    The fluent API (log_model, register_model) is pointed at the same store, so a run and its
    registration can never land in two places.
    """
    import mlflow

    uri = check_reachable()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def error_code(err) -> str:
    return getattr(err, "error_code", "") or ""


def registered_model(client, name: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException as err:
        if "RESOURCE_DOES_NOT_EXIST" in error_code(err) or "not found" in str(err).lower():
            raise CxrcfError(f"model {name!r}: not registered in {client.tracking_uri}") from None
        raise


def model_version(client, name: str, version: str):
    from mlflow.exceptions import MlflowException

    registered_model(client, name)
    try:
        return client.get_model_version(name, str(version))
    except MlflowException as err:
        if "RESOURCE_DOES_NOT_EXIST" in error_code(err) or "INVALID_PARAMETER_VALUE" in error_code(err):
            raise CxrcfError(f"model {name!r}: no version {version!r}") from None
        raise


def alias_map(client, name: str) -> dict[str, str]:
    return {alias: str(v) for alias, v in (registered_model(client, name).aliases or {}).items()}


def resolve_alias(name: str, alias: str, client=None) -> str:
    """The version string that `name@alias` points to; CxrcfError naming what is missing."""
    client = client or connect()
    aliases = alias_map(client, name)
    if alias not in aliases:
        known = ", ".join(f"{a}->{v}" for a, v in sorted(aliases.items())) or "none"
        raise CxrcfError(f"model {name!r}: no version has alias {alias!r} (aliases: {known})")
    return aliases[alias]


def parse_ref(ref: str, default_name: str | None = None) -> tuple[str, str | None, str | None]:
    """`[models:/]NAME@ALIAS` | `[models:/]NAME/VERSION` | `ALIAS` | `VERSION` -> (name, version, alias)."""
    text = ref.removeprefix("models:/")
    if "@" in text:
        name, alias = text.rsplit("@", 1)
        version = None
    elif "/" in text:
        name, version = text.rsplit("/", 1)
        alias = None
    elif default_name:
        name = default_name
        version, alias = (text, None) if text.isdigit() else (None, text)
    else:
        raise CxrcfError(f"model reference {ref!r}: expected NAME@ALIAS or NAME/VERSION")
    if not name or not (version or alias):
        raise CxrcfError(f"model reference {ref!r}: expected NAME@ALIAS or NAME/VERSION")
    if version is not None and not version.isdigit():
        raise CxrcfError(f"model reference {ref!r}: version {version!r} is not a number")
    return name, version, alias


def resolve_ref(ref: str, default_name: str | None = None, client=None):
    """(model version entity, alias or None) for a reference accepted by `parse_ref`."""
    client = client or connect()
    name, version, alias = parse_ref(ref, default_name)
    if alias is not None:
        version = resolve_alias(name, alias, client)
    return model_version(client, name, version), alias


# ------------------------------------------------------------------------------- metrics as tags
def _tag_key(key: str) -> str:
    # MLflow keys allow only [/\w.\- :]; pair names like "finding|do(sex)" become "finding_do_sex".
    return re.sub(r"_+", "_", re.sub(r"[^\w./\- ]", "_", key)).strip("_")


def flat_metrics(obj: Any, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a nested evaluation JSON as {"effectiveness.sex.auc": 0.93, ...}."""
    out: dict[str, float] = {}
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            out.update(flat_metrics(value, f"{prefix}{_tag_key(str(key))}."))
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool) and math.isfinite(obj):
        out[prefix.rstrip(".")] = float(obj)
    return out


# The evaluation numbers recorded on the version as tags (the full JSON stays in the run's
# evaluation.json artifact): what gates, list/show and model cards read.
HEADLINE = re.compile(
    r"^(effectiveness\.\w+\.(acc|auc|mae)|effectiveness\.\w+\.delta_real\.\w+|effectiveness_mean_auc"
    r"|amplification\.(mean|stderr|worst)|amplification\.pairs\.[^.]+\.(mean|drift)|drift\.(mean|worst)"
    r"|composition_l1|reversibility_l1|ground_truth\.(cf_l1|amplification\.(mean|worst)|effectiveness_mean_auc)"
    r"|generator_check\.passed_checks\..+)$")


def version_metrics(version) -> dict[str, float]:
    """The evaluation metrics recorded on a model version's `eval.*` tags."""
    out = {}
    for key, value in (version.tags or {}).items():
        if key.startswith(EVAL_PREFIX):
            try:
                out[key[len(EVAL_PREFIX):]] = float(value)
            except ValueError:
                continue
    return out



# ----------------------------------------------------------------------------------- list / show
KEY_METRICS = (("AUC sex", "effectiveness.sex.auc"), ("AUC race", "effectiveness.race.auc"),
               ("AUC finding", "effectiveness.finding.auc"), ("MAE age", "effectiveness.age.mae"),
               ("AMP mean", "amplification.mean"), ("AMP worst", "amplification.worst"))


def list_versions(name: str, client=None) -> list[dict]:
    """One row per version, newest first: version, aliases, mode, key metrics, decision, created."""
    client = client or connect()
    aliases = alias_map(client, name)
    by_version: dict[str, list[str]] = {}
    for alias, v in aliases.items():
        by_version.setdefault(v, []).append(alias)
    rows = []
    for mv in client.search_model_versions(f"name='{name}'"):
        tags = mv.tags or {}
        metrics = version_metrics(mv)
        rows.append({
            "version": str(mv.version),
            "aliases": ",".join(sorted(by_version.get(str(mv.version), []))),
            "mode": tags.get("cft_mode", ""),
            **{label: metrics.get(key) for label, key in KEY_METRICS},
            "decision": tags.get("promotion.decision", ""),
            "created": datetime.fromtimestamp(mv.creation_timestamp / 1000, UTC).strftime("%Y-%m-%d %H:%M"),
        })
    return sorted(rows, key=lambda r: -int(r["version"]))


def show_version(ref: str, default_name: str | None = None, client=None) -> dict:
    """A version's identity, aliases, tags and metrics for `NAME@ALIAS` / `NAME/VERSION`."""
    client = client or connect()
    mv, _ = resolve_ref(ref, default_name, client)
    aliases = sorted(a for a, v in alias_map(client, mv.name).items() if v == str(mv.version))
    tags = dict(sorted((mv.tags or {}).items()))
    return {"name": mv.name, "version": str(mv.version), "aliases": aliases, "run_id": mv.run_id,
            "source": mv.source, "status": mv.status, "tags": tags, "metrics": version_metrics(mv)}


# ---------------------------------------------------------------------------------------- loading
def _bundle_path(mlmodel: Path) -> str:
    """Where a cxrcf generator pyfunc keeps its GeneratorBundle, relative to the model directory."""
    import yaml

    flavors = (yaml.safe_load(mlmodel.read_text()) or {}).get("flavors", {})
    artifacts = (flavors.get("python_function") or {}).get("artifacts") or {}
    if "bundle" not in artifacts:
        raise CxrcfError(f"{mlmodel.parent}: this MLflow model has no generator bundle (not a cxrcf generator)")
    return artifacts["bundle"]["path"]


def _download_bundle(source: str, model_uri: str, tmp: str) -> Path:
    """Fetch only MLmodel and the bundle (the model's copy of the code is not needed here)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    base = source.rstrip("/")
    try:
        mlmodel = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{base}/MLmodel", dst_path=tmp))
    except (MlflowException, OSError):
        mlmodel = None
    try:
        if mlmodel is not None and mlmodel.is_file():
            return Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{base}/{_bundle_path(mlmodel)}",
                                                            dst_path=tmp))
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=base, dst_path=tmp))
    except (MlflowException, OSError) as err:
        raise CxrcfError(f"{model_uri}: cannot download the model ({str(err).splitlines()[0][:300]})") from None


def load_bundle(model_uri: str, client=None):
    """(GeneratorBundle, info) for `models:/NAME@ALIAS`, `models:/NAME/VERSION`, `runs:/...` or a bundle dir.

    Reads the bundle's safetensors/JSON straight from the registered artifacts (no pyfunc wrapper,
    nothing unpickled). info: name, version, alias, mode, metrics, model_uri, run_id.
    """
    from cxrcf.bundle import GeneratorBundle

    local = Path(model_uri)
    if not model_uri.startswith(("models:/", "runs:/")) and "://" not in model_uri:
        if not local.exists():
            raise CxrcfError(f"{model_uri}: no such bundle directory or model URI "
                             f"(use models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN/PATH)")
        mlmodel = local / "MLmodel"
        bundle = GeneratorBundle.load(local / _bundle_path(mlmodel) if mlmodel.is_file() else local)
        meta = bundle.meta or {}
        return bundle, {"name": meta.get("name"), "version": None, "alias": None, "mode": meta.get("mode"),
                        "metrics": dict(meta.get("metrics") or {}), "model_uri": str(local), "run_id": None}
    client = client or connect()
    info: dict[str, Any] = {"name": None, "version": None, "alias": None, "mode": None, "metrics": {},
                            "model_uri": model_uri, "run_id": None}
    if model_uri.startswith("models:/"):
        mv, alias = resolve_ref(model_uri, client=client)
        source = client.get_model_version_download_uri(mv.name, mv.version)
        info.update(name=mv.name, version=str(mv.version), alias=alias, run_id=mv.run_id,
                    mode=(mv.tags or {}).get("cft_mode"), metrics=version_metrics(mv))
    elif model_uri.startswith("runs:/"):
        source = model_uri
    else:
        raise CxrcfError(f"{model_uri}: unsupported model URI (use models:/, runs:/ or a local directory)")
    with tempfile.TemporaryDirectory(prefix="cxrcf-model-") as tmp:
        bundle = GeneratorBundle.load(_download_bundle(source, model_uri, tmp))
    if info["mode"] is None:
        info["mode"] = (bundle.meta or {}).get("mode")
        info["metrics"] = dict((bundle.meta or {}).get("metrics") or {})
    return bundle, info
