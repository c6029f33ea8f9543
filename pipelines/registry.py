"""The model registry: register generators with lineage and metrics, promote by gates, roll back.

Aliases carry the lifecycle (MLflow 3 has no stages): `candidate` is the latest registration,
`champion` is what serving and augmentation load, `previous-champion` is what rollback restores.
Every decision is written on the version as `promotion.*` tags, so the registry itself explains why
its champion is the champion. Promotion and rollback run under one lock per registry
(`promotion_lock`): they are read-check-write sequences, and two of them interleaving could leave
`champion` and `previous-champion` disagreeing with the recorded decisions.

Top-level imports stay light (the CLI imports this module); torch and MLflow load inside functions.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cxrcf.errors import CxrcfError
from cxrcf.fileio import read_json
from training.common import read_run_id

CANDIDATE, CHAMPION, PREVIOUS = "candidate", "champion", "previous-champion"
MODES = ("none", "hard", "soft")
EVAL_PREFIX = "eval."  # version tags holding evaluation metrics
PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
GENERATOR_ARTIFACT = "generator"  # the logged model's name inside the registration run
DESCRIPTION_LIMIT = 5000  # MLflow's SQL stores declare the version description as VARCHAR(5000)
LOCK_WAIT_S = 120.0
SERVER_LOCK_STALE_S = 300.0  # a server-side lock older than this belongs to a dead process


# ------------------------------------------------------------------------------------ connection
def connect():
    """An MlflowClient on `training.tracking.tracking_uri()`; fails fast when the server is down.

    The fluent API (log_model, register_model) is pointed at the same store, so a run and its
    registration can never land in two places.
    """
    import mlflow

    from training.tracking import check_reachable

    uri = check_reachable()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def _error_code(err) -> str:
    return getattr(err, "error_code", "") or ""


def _registered_model(client, name: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException as err:
        if "RESOURCE_DOES_NOT_EXIST" in _error_code(err) or "not found" in str(err).lower():
            raise CxrcfError(f"model {name!r}: not registered in {client.tracking_uri}") from None
        raise


def _model_version(client, name: str, version: str):
    from mlflow.exceptions import MlflowException

    _registered_model(client, name)
    try:
        return client.get_model_version(name, str(version))
    except MlflowException as err:
        if "RESOURCE_DOES_NOT_EXIST" in _error_code(err) or "INVALID_PARAMETER_VALUE" in _error_code(err):
            raise CxrcfError(f"model {name!r}: no version {version!r}") from None
        raise


def _aliases(client, name: str) -> dict[str, str]:
    return {alias: str(v) for alias, v in (_registered_model(client, name).aliases or {}).items()}


def resolve_alias(name: str, alias: str, client=None) -> str:
    """The version string that `name@alias` points to; CxrcfError naming what is missing."""
    client = client or connect()
    aliases = _aliases(client, name)
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
    return _model_version(client, name, version), alias


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
    r"|composition_l1|reversibility_l1|ground_truth\.(cf_l1|amplification\.(mean|worst)|effectiveness_mean_auc))$")


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


# ------------------------------------------------------------------------------------------ gates
@dataclass(frozen=True)
class Gate:
    name: str
    metric: str
    op: str  # ">=" or "<=": what the value must satisfy against the limit
    limit: float
    value: float | None

    @property
    def passed(self) -> bool:
        if self.value is None or not math.isfinite(self.value):
            return False
        return self.value >= self.limit if self.op == ">=" else self.value <= self.limit

    def describe(self) -> str:
        shown = "missing" if self.value is None else f"{self.value:.4g}"
        return f"{'pass' if self.passed else 'FAIL'}: {self.metric} = {shown}, must be {self.op} {self.limit:.4g}"


AUC_ATTRIBUTES = ("sex", "race", "finding")


def check_gates(metrics: Mapping[str, float], gates, champion: Mapping[str, float] | None = None) -> list[Gate]:
    """The promotion gates of `params.registry.gates` for a candidate's metrics (pure).

    Regression gates compare against the current champion's recorded metrics, within
    `regression_tolerance`; a metric the champion never recorded cannot regress and is skipped.
    """
    out = [Gate(f"min_auc.{a}", f"effectiveness.{a}.auc", ">=", floor, metrics.get(f"effectiveness.{a}.auc"))
           for a, floor in sorted(gates.min_auc.items())]
    out.append(Gate("max_age_mae", "effectiveness.age.mae", "<=", gates.max_age_mae,
                    metrics.get("effectiveness.age.mae")))
    out.append(Gate("max_amplification", "amplification.worst", "<=", gates.max_amplification,
                    metrics.get("amplification.worst")))
    if champion is not None:
        tol = gates.regression_tolerance
        for a in AUC_ATTRIBUTES:
            key = f"effectiveness.{a}.auc"
            if key in champion:
                out.append(Gate(f"regression.{a}.auc", key, ">=", champion[key] - tol, metrics.get(key)))
        key = "amplification.worst"
        if key in champion:
            out.append(Gate("regression.amplification.worst", key, "<=", champion[key] + tol, metrics.get(key)))
    return out


def gates_reason(results: list[Gate], champion_version: str | None) -> str:
    failed = [g for g in results if not g.passed]
    against = f" (vs champion version {champion_version})" if champion_version else ""
    if not failed:
        return f"all {len(results)} gates pass{against}"
    return "; ".join(f"{g.name} {g.describe()[6:]}" for g in failed) + against


# ------------------------------------------------------------------------------------------ locks
def _sqlite_path(uri: str) -> Path | None:
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):]).resolve()
    return None


def _waiting(name: str, where: str) -> None:
    print(f"registry: waiting for the promotion lock on {name!r} ({where})", file=sys.stderr, flush=True)


@contextlib.contextmanager
def promotion_lock(name: str, client=None, timeout_s: float = LOCK_WAIT_S,
                   stale_s: float = SERVER_LOCK_STALE_S) -> Iterator[None]:
    """Serialise promotions and rollbacks of one registry.

    A SQLite store is a local file, so an OS file lock beside it serialises every process on the
    machine and is released by the kernel even when its holder dies. A server store is shared by
    machines, so the lock is a registered model `<name>.promotion-lock`: creating a registered model
    is atomic on the server (unique name), so exactly one process holds it; a lock left by a dead
    process is broken once it is older than `stale_s`.
    """
    client = client or connect()
    db = _sqlite_path(client.tracking_uri)
    if db is not None:
        with _file_lock(db.with_name(f".{db.name}.promotion.lock"), name, timeout_s):
            yield
    else:
        with _server_lock(client, name, timeout_s, stale_s):
            yield


@contextlib.contextmanager
def _file_lock(path: Path, name: str, timeout_s: float) -> Iterator[None]:
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        deadline = time.monotonic() + timeout_s
        told = False
        while True:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not told:
                    _waiting(name, str(path))
                    told = True
                if time.monotonic() > deadline:
                    raise CxrcfError(f"{path}: promotion lock still held after {timeout_s:.0f} s") from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def _server_lock(client, name: str, timeout_s: float, stale_s: float) -> Iterator[None]:
    from mlflow.exceptions import MlflowException

    lock_name = f"{name}.promotion-lock"
    token = f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    deadline = time.monotonic() + timeout_s
    told = False
    while True:
        try:
            client.create_registered_model(lock_name, tags={"cxrcf.lock": token},
                                           description="held by a running cxrcf registry promote/rollback")
            break
        except MlflowException as err:
            if "RESOURCE_ALREADY_EXISTS" not in _error_code(err) and "already exists" not in str(err):
                raise
        try:
            held = client.get_registered_model(lock_name)
            age_s = time.time() - held.creation_timestamp / 1000.0
            if age_s > stale_s:
                print(f"registry: breaking a stale promotion lock on {name!r} ({age_s:.0f} s old, "
                      f"holder {held.tags.get('cxrcf.lock', '?')})", file=sys.stderr, flush=True)
                client.delete_registered_model(lock_name)
                continue
        except MlflowException:
            continue  # released between our create and our look: try again at once
        if not told:
            _waiting(name, f"{client.tracking_uri} model {lock_name}")
            told = True
        if time.monotonic() > deadline:
            raise CxrcfError(f"model {lock_name!r}: promotion lock still held after {timeout_s:.0f} s "
                             f"(delete it if its holder is dead)")
        time.sleep(0.2)
    try:
        yield
    finally:
        with contextlib.suppress(MlflowException):
            client.delete_registered_model(lock_name)


# -------------------------------------------------------------------------------------- promotion
def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


@dataclass
class Decision:
    name: str
    version: str
    decision: str  # promoted | refused | unchanged
    reason: str
    champion_version: str | None  # champion after the decision
    previous_champion: str | None  # previous-champion after the decision
    checked_at: str
    waited_s: float
    gates: list[dict]

    @property
    def ok(self) -> bool:
        return self.decision != "refused"

    def to_json(self) -> dict:
        return asdict(self)


def promote(params, name: str | None = None, version: str | None = None, client=None) -> Decision:
    """Move `champion` to `version` (default: the `candidate`) if the gates pass; record either way."""
    client = client or connect()
    name = name or params.registry.generator_name
    asked = time.monotonic()
    with promotion_lock(name, client):
        waited = time.monotonic() - asked
        aliases = _aliases(client, name)
        if version is None:
            version = resolve_alias(name, CANDIDATE, client)
        target = _model_version(client, name, str(version))
        version = str(target.version)
        champion = aliases.get(CHAMPION)
        checked_at = _now()
        if champion == version:
            return Decision(name, version, "unchanged", f"version {version} is already champion", champion,
                            aliases.get(PREVIOUS), checked_at, waited, [])
        champion_metrics = version_metrics(_model_version(client, name, champion)) if champion else None
        results = check_gates(version_metrics(target), params.registry.gates, champion_metrics)
        passed = all(g.passed for g in results)
        reason = gates_reason(results, champion)
        tags = {
            "promotion.decision": "promoted" if passed else "refused",
            "promotion.reason": reason[:7900],
            "promotion.checked_at": checked_at,
            "promotion.champion_at_check": champion or "",
            "promotion.waited_s": f"{waited:.3f}",
        }
        tags.update({f"promotion.gate.{g.name}": g.describe() for g in results})
        previous = aliases.get(PREVIOUS)
        if passed:
            # The version remembers whom it replaced: rollback walks this chain back.
            tags["promotion.previous_champion"] = champion or ""
            if champion:
                client.set_registered_model_alias(name, PREVIOUS, champion)
                previous = champion
            client.set_registered_model_alias(name, CHAMPION, version)
        for key, value in tags.items():
            client.set_model_version_tag(name, version, key, value)
        after = _aliases(client, name)
        if passed and after.get(CHAMPION) != version:
            raise CxrcfError(f"model {name!r}: champion changed to version {after.get(CHAMPION)} while "
                             f"promoting version {version}; another writer bypassed the promotion lock")
        return Decision(name, version, tags["promotion.decision"], reason, after.get(CHAMPION), previous,
                        checked_at, waited, [asdict(g) | {"passed": g.passed} for g in results])


def rollback(params, name: str | None = None, client=None) -> dict:
    """champion <- previous-champion; previous-champion <- the restored version's own predecessor."""
    client = client or connect()
    name = name or params.registry.generator_name
    with promotion_lock(name, client):
        aliases = _aliases(client, name)
        demoted = aliases.get(CHAMPION)
        restored = aliases.get(PREVIOUS)
        if not restored:
            raise CxrcfError(f"model {name!r}: no {PREVIOUS!r} alias to roll back to")
        restored_mv = _model_version(client, name, restored)
        before = (restored_mv.tags or {}).get("promotion.previous_champion", "")
        if before in ("", restored, demoted) or before not in _version_numbers(client, name):
            before = ""
        client.set_registered_model_alias(name, CHAMPION, restored)
        if before:
            client.set_registered_model_alias(name, PREVIOUS, before)
            client.set_model_version_tag(name, restored, "promotion.previous_champion", before)
        else:
            client.delete_registered_model_alias(name, PREVIOUS)
            client.set_model_version_tag(name, restored, "promotion.previous_champion", "")
        at = _now()
        client.set_model_version_tag(name, restored, "rollback.restored_at", at)
        client.set_model_version_tag(name, restored, "rollback.replaced_version", demoted or "")
        if demoted:
            client.set_model_version_tag(name, demoted, "rollback.demoted_at", at)
            client.set_model_version_tag(name, demoted, "rollback.replaced_by", restored)
        return {"name": name, "champion_version": restored, "demoted_version": demoted,
                "previous_champion": before or None, "rolled_back_at": at}


def _version_numbers(client, name: str) -> set[str]:
    return {str(mv.version) for mv in client.search_model_versions(f"name='{name}'")}


# ----------------------------------------------------------------------------------- list / show
KEY_METRICS = (("AUC sex", "effectiveness.sex.auc"), ("AUC race", "effectiveness.race.auc"),
               ("AUC finding", "effectiveness.finding.auc"), ("MAE age", "effectiveness.age.mae"),
               ("AMP mean", "amplification.mean"), ("AMP worst", "amplification.worst"))


def list_versions(name: str, client=None) -> list[dict]:
    """One row per version, newest first: version, aliases, mode, key metrics, decision, created."""
    client = client or connect()
    aliases = _aliases(client, name)
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
    aliases = sorted(a for a, v in _aliases(client, mv.name).items() if v == str(mv.version))
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


# ----------------------------------------------------------------------------------- registration
def _read_eval(path: Path) -> dict:
    if not path.is_file():
        raise CxrcfError(f"{path}: evaluation JSON does not exist (run cxrcf evaluate first)")
    data = read_json(path)
    if not isinstance(data, dict):
        raise CxrcfError(f"{path}: expected a JSON object of metrics")
    return data


def _pip_requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for pkg in ("mlflow", "torch", "safetensors", "numpy", "pandas", "pillow", "pydantic", "pyyaml"):
        try:
            out.append(f"{pkg}=={version(pkg)}")
        except PackageNotFoundError:
            out.append(pkg)
    return out


def _log_pyfunc(name: str, artifacts: dict[str, str], generator: bool, resolution: int) -> Any:
    """Log a models-from-code pyfunc; the cxrcf package travels with it so it loads anywhere."""
    import mlflow
    from mlflow.pyfunc.model import PythonModelContext

    import cxrcf
    from pipelines.pyfunc_model import CxrcfPyfunc, example_frame, signature

    # MLflow only warns when the input example fails; a registry must refuse a model that cannot predict.
    model = CxrcfPyfunc()
    try:
        model.load_context(PythonModelContext(artifacts, None))
        model.predict(None, example_frame(resolution, generator))
    except Exception as err:  # noqa: BLE001 - any failure here means the package is unusable
        raise CxrcfError(f"{next(iter(artifacts.values()))}: the packaged {name} fails on its input example "
                         f"({type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''})") from None
    return mlflow.pyfunc.log_model(
        name=name, python_model=str(PYFUNC_CODE), artifacts=artifacts,
        code_paths=[str(Path(cxrcf.__file__).parent)],
        signature=signature(generator), input_example=example_frame(resolution, generator),
        pip_requirements=_pip_requirements(),
    )


def _register(client, model_uri: str, name: str, tags: dict[str, str], description: str):
    import mlflow

    mv = mlflow.register_model(model_uri, name, tags=tags)
    if len(description) > DESCRIPTION_LIMIT:
        note = "\n\n(truncated: the full card is the registration run's model_card.md)"
        description = description[:DESCRIPTION_LIMIT - len(note)] + note
    client.update_model_version(name, mv.version, description=description)
    return str(mv.version)


def register(params, generator_dir, scm_dir, predictor_dir, guidance_dir, mode: str, eval_json,
             figures_dir=None, name: str | None = None, client=None) -> dict:
    """Package, log and register a generator (and both predictors); alias the generator `candidate`.

    Returns {name, version, run_id, model_uri, predictors: {role: {name, version}}}.
    """
    if mode not in MODES:
        raise CxrcfError(f"--mode {mode!r}: expected one of {', '.join(MODES)}")
    dirs = {"generator": Path(generator_dir), "scm": Path(scm_dir), "evaluation_predictor": Path(predictor_dir),
            "guidance_predictor": Path(guidance_dir)}
    for role, d in dirs.items():
        if not d.is_dir():
            raise CxrcfError(f"{d}: {role} model directory does not exist")
    evaluation = _read_eval(Path(eval_json))
    metrics = flat_metrics(evaluation)
    figures = sorted(Path(figures_dir).glob("*.png")) if figures_dir else []
    if figures_dir and not Path(figures_dir).is_dir():
        raise CxrcfError(f"{figures_dir}: figures directory does not exist")

    import mlflow

    from cxrcf.bundle import GeneratorBundle
    from cxrcf.data import dvc_data_hash
    from cxrcf.export import load_model, read_config
    from pipelines.model_card import render_model_card
    from training.tracking import ensure_experiment, git_commit

    client = client or connect()
    name = name or params.registry.generator_name
    lineage = {f"lineage.{role}_run_id": rid for role, d in dirs.items() if (rid := read_run_id(d))}
    tags = {"cxrcf.kind": "generator", "cft_mode": mode, "preset": params.preset,
            "data_hash": dvc_data_hash() or "", "git_commit": git_commit() or "", **lineage}
    headline = {k: v for k, v in metrics.items() if HEADLINE.match(k)}
    meta = {"name": name, "mode": mode, "preset": params.preset, "metrics": headline, "lineage": tags}

    print(f"registry: packaging {dirs['generator']} ({mode} CFT) as {name!r}", file=sys.stderr, flush=True)
    bundle = GeneratorBundle(load_model(dirs["generator"]), load_model(dirs["scm"]),
                             load_model(dirs["evaluation_predictor"]), meta)
    exp_id = ensure_experiment(params.mlflow.experiment)
    gate_rows = [asdict(g) | {"passed": g.passed} for g in check_gates(headline, params.registry.gates)]
    with tempfile.TemporaryDirectory(prefix="cxrcf-register-") as tmp:
        bundle_dir = Path(tmp) / "bundle"
        bundle.save(bundle_dir)
        with mlflow.start_run(experiment_id=exp_id, run_name=f"register-{mode}", tags={"phase": "register", **tags},
                              nested=mlflow.active_run() is not None) as run:
            run_id = run.info.run_id
            mlflow.log_metrics(metrics)
            mlflow.log_dict(evaluation, "evaluation.json")
            for fig in figures:
                mlflow.log_artifact(str(fig), "figures")
            print("registry: logging the generator pyfunc (models-from-code)", file=sys.stderr, flush=True)
            logged = _log_pyfunc(GENERATOR_ARTIFACT, {"bundle": str(bundle_dir)}, True, bundle.resolution)
            predictor_logged = {}
            for role in ("guidance_predictor", "evaluation_predictor"):
                print(f"registry: logging the {role.replace('_', ' ')}", file=sys.stderr, flush=True)
                resolution = read_config(dirs[role])["config"]["resolution"]
                predictor_logged[role] = _log_pyfunc(role, {"predictor": str(dirs[role])}, False, resolution)
            card = render_model_card(name=name, mode=mode, preset=params.preset, metrics=metrics,
                                     tags=tags, gates=gate_rows, figures=[f"figures/{f.name}" for f in figures],
                                     run_id=run_id)
            mlflow.log_text(card, "model_card.md")
    eval_tags = {f"{EVAL_PREFIX}{k}": repr(v) for k, v in headline.items()}
    version = _register(client, logged.model_uri, name,
                        {**tags, **eval_tags, "registration_run_id": run_id}, card)
    client.set_registered_model_alias(name, CANDIDATE, version)
    predictors = {}
    for role, info in predictor_logged.items():
        reg_name = getattr(params.registry, f"{role}_name")
        predictors[role] = {"name": reg_name, "version": _register(
            client, info.model_uri, reg_name,
            {"cxrcf.kind": role, "preset": params.preset, "data_hash": tags["data_hash"],
             "git_commit": tags["git_commit"], "registration_run_id": run_id,
             **({"lineage.training_run_id": lineage[f"lineage.{role}_run_id"]}
                if f"lineage.{role}_run_id" in lineage else {}),
             "used_by": f"{name}/{version}"},
            f"The {role.replace('_', ' ')} registered with {name} version {version}.")}
    print(f"registry: registered {name} version {version} (alias {CANDIDATE!r})", file=sys.stderr, flush=True)
    return {"name": name, "version": version, "run_id": run_id, "model_uri": f"models:/{name}/{version}",
            "predictors": predictors}


