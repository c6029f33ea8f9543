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
import logging
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cxrcf.errors import CxrcfError
from cxrcf.fileio import read_json
from pipelines.registry_ledger import RegistryState, server_lock
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


# ------------------------------------------------------------------------------------------ gates
@dataclass(frozen=True)
class Gate:
    name: str
    metric: str
    op: str  # ">=" or "<=": what the value must satisfy against the limit
    limit: float
    value: float | None
    verdict: bool | None = None  # MLflow's own verdict, for the gates its validation API can judge

    @property
    def passed(self) -> bool:
        if self.value is None or not math.isfinite(self.value):
            return False
        if self.verdict is not None:
            return self.verdict
        return self.value >= self.limit if self.op == ">=" else self.value <= self.limit

    def describe(self) -> str:
        shown = "missing" if self.value is None else f"{self.value:.4g}"
        return f"{'pass' if self.passed else 'FAIL'}: {self.metric} = {shown}, must be {self.op} {self.limit:.4g}"

    def to_json(self) -> dict:
        return {"name": self.name, "metric": self.metric, "op": self.op, "limit": self.limit,
                "value": self.value, "passed": self.passed, "judge": "mlflow" if self.verdict is not None else "cxrcf"}


AUC_ATTRIBUTES = ("sex", "race", "finding")


def _mlflow_threshold(metric: str, op: str, limit: float, value: float | None) -> bool:
    """MLflow's `validate_evaluation_results` verdict for one absolute threshold.

    Regression against the champion stays with cxrcf: `MetricThreshold.min_absolute_change` must be
    positive (the candidate must *beat* the baseline by it), whereas the gate allows a candidate to be
    worse by at most `regression_tolerance`.
    """
    import mlflow
    from mlflow.models import MetricThreshold
    from mlflow.models.evaluation import EvaluationResult
    from mlflow.models.evaluation.validation import ModelValidationFailedException

    # It logs every verdict at INFO through MLflow's own handler; the gate table already reports them.
    logging.getLogger("mlflow.models.evaluation.validation").setLevel(logging.WARNING)
    candidate = EvaluationResult(metrics={} if value is None else {metric: value}, artifacts={})
    try:
        mlflow.validate_evaluation_results(
            {metric: MetricThreshold(threshold=limit, greater_is_better=op == ">=")}, candidate)
    except ModelValidationFailedException:
        return False
    return True


def check_gates(metrics: Mapping[str, float], gates, champion: Mapping[str, float] | None = None) -> list[Gate]:
    """The promotion gates of `params.registry.gates` for a candidate's metrics.

    Absolute floors and ceilings are judged by MLflow's `validate_evaluation_results`; regression
    gates compare against the current champion's metrics within `regression_tolerance` (cxrcf's own
    layer); a metric the champion never recorded cannot regress and is skipped.
    """
    plain = [(f"min_auc.{a}", f"effectiveness.{a}.auc", ">=", floor) for a, floor in sorted(gates.min_auc.items())]
    plain.append(("max_age_mae", "effectiveness.age.mae", "<=", gates.max_age_mae))
    plain.append(("max_amplification", "amplification.worst", "<=", gates.max_amplification))
    out = [Gate(name, metric, op, limit, metrics.get(metric),
                _mlflow_threshold(metric, op, limit, metrics.get(metric)))
           for name, metric, op, limit in plain]
    if gates.generator_check:
        out += generator_check_gates(metrics)
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


def generator_check_gates(metrics: Mapping[str, float]) -> list[Gate]:
    """One gate per check of the evaluation's generator check (pipelines/generator_check.py), each named
    for its check; an evaluation without the check is one failed gate, since nothing says the model is
    a counterfactual model at all."""
    prefix = "generator_check.passed_checks."
    flags = {k: v for k, v in metrics.items() if k.startswith(prefix)}
    if not flags:
        return [Gate("generator_check", prefix + "*", ">=", 1.0, None)]
    return [Gate(f"generator_check.{k[len(prefix):]}", k, ">=", 1.0, v) for k, v in sorted(flags.items())]


def gates_reason(results: list[Gate], champion_version: str | None) -> str:
    failed = [g for g in results if not g.passed]
    against = f" (vs champion version {champion_version})" if champion_version else ""
    if not failed:
        return f"all {len(results)} gates pass{against}"
    return "; ".join(f"{g.name} {g.describe()[6:]}" for g in failed) + against


def run_metrics(client, version) -> tuple[dict[str, float], list[str]]:
    """(the evaluation metrics logged to the version's run, disagreements with its `eval.*` tags).

    The run's metrics are what `register` logged from the evaluation JSON; tags can be edited by
    anyone with write access, so a tag that differs from the run, or names a metric the run never
    logged, is a disagreement that refuses promotion.
    """
    from mlflow.exceptions import MlflowException

    if not version.run_id:
        return {}, [f"version {version.version} has no source run: its evaluation metrics cannot be checked"]
    try:
        logged = dict(client.get_run(version.run_id).data.metrics)
    except MlflowException as err:
        return {}, [(f"run {version.run_id} of version {version.version} cannot be read "
                    f"({str(err).splitlines()[0][:200]})")]
    if not logged:
        return {}, [f"run {version.run_id} of version {version.version} logged no evaluation metrics"]
    problems = []
    for key, tagged in sorted(version_metrics(version).items()):
        have = logged.get(key)
        if have is None:
            problems.append(f"tag {EVAL_PREFIX}{key} = {tagged:.6g} but run {version.run_id} logged no {key}")
        elif not math.isclose(have, tagged, rel_tol=1e-9, abs_tol=1e-12):
            problems.append(f"tag {EVAL_PREFIX}{key} = {tagged:.6g} disagrees with run {version.run_id}'s "
                            f"logged {key} = {have:.6g}")
    return logged, problems


# ------------------------------------------------------------------------------------------ locks
def _sqlite_path(uri: str) -> Path | None:
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):]).resolve()
    return None


def _waiting(name: str, where: str) -> None:
    print(f"registry: waiting for the promotion lock on {name!r} ({where})", file=sys.stderr, flush=True)


def _seconds_env(key: str, default: float) -> float:
    raw = os.environ.get(key, "")
    try:
        value = float(raw) if raw else default
    except ValueError:
        raise CxrcfError(f"{key}={raw!r}: expected seconds (a number)") from None
    if not value > 0:
        raise CxrcfError(f"{key}={raw!r}: must be positive")
    return value


def lock_stale_s() -> float:
    return _seconds_env("CXRCF_REGISTRY_LOCK_STALE_S", SERVER_LOCK_STALE_S)


def lock_wait_s() -> float:
    return _seconds_env("CXRCF_REGISTRY_LOCK_WAIT_S", LOCK_WAIT_S)


@contextlib.contextmanager
def promotion_lock(name: str, client=None, timeout_s: float | None = None,
                   stale_s: float | None = None) -> Iterator[dict]:
    """Serialise every alias move of one registered model (register, promote, rollback, repair).

    A SQLite store is a local file, so an OS file lock beside it serialises every process on the
    machine and is released by the kernel even when its holder dies. Any other store is shared by
    machines, so the lock lives in the store (`registry_ledger.server_lock`: owner tokens, epochs
    taken and ended by compare-and-set, heartbeats stamped by the server, bounded retries).
    Yields {waited_s, epoch, token, check}: `check()` raises when the lock was lost (a fence before writes).
    """
    client = client or connect()
    timeout_s = lock_wait_s() if timeout_s is None else timeout_s
    db = _sqlite_path(client.tracking_uri)
    if db is not None:
        with _file_lock(db.with_name(f".{db.name}.promotion.lock"), name, timeout_s) as held:
            yield held
    else:
        with server_lock(client, name, timeout_s, lock_stale_s() if stale_s is None else stale_s,
                         on_wait=lambda where: _waiting(name, where)) as held:
            yield held


@contextlib.contextmanager
def _file_lock(path: Path, name: str, timeout_s: float) -> Iterator[dict]:
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with open(path, "a+") as handle:
        deadline = started + timeout_s
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
            # The kernel never takes a flock from a live holder: nothing to fence.
            yield {"waited_s": time.monotonic() - started, "epoch": None, "token": f"flock:{os.getpid()}",
                   "check": lambda: None}
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


# ------------------------------------------------------------------------- ledger and transactions
def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def ledger(name: str, client=None) -> RegistryState:
    return RegistryState(client or connect(), name)


def _set_aliases(client, name: str, moves: Mapping[str, str | None]) -> None:
    from mlflow.exceptions import MlflowException

    for alias, version in moves.items():
        if version:
            client.set_registered_model_alias(name, alias, str(version))
        else:
            try:
                client.delete_registered_model_alias(name, alias)
            except MlflowException as err:
                if not _missing_error(err):
                    raise


def _missing_error(err) -> bool:
    return "RESOURCE_DOES_NOT_EXIST" in _error_code(err) or "not found" in str(err).lower()


def _finish(client, name: str, intent: dict, check) -> None:
    """Apply an intent's alias moves and version tags (idempotent: a repair runs it again)."""
    check()
    _set_aliases(client, name, intent["moves"])
    after = _aliases(client, name)
    wrong = {a: after.get(a) for a, v in intent["moves"].items() if after.get(a) != (str(v) if v else None)}
    if wrong:
        raise CxrcfError(f"model {name!r}: aliases {wrong} differ from what intent #{intent['seq']} just set; "
                         f"another writer bypassed the promotion lock")
    check()
    for version, tags in intent.get("tags", {}).items():
        for key, value in tags.items():
            client.set_model_version_tag(name, version, key, value)


def _transact(client, state: RegistryState, entry: dict, check) -> dict:
    """Intent -> alias moves -> version tags -> completion; a crash leaves an intent for `repair`."""
    check()
    intent = state.append({"type": "intent", **entry})
    _finish(client, state.name, intent, check)
    check()
    state.append({"type": "complete", "op": intent["seq"], "action": intent["action"]})
    return intent


def pending(entries: list[dict]) -> list[dict]:
    done = {e["op"] for e in entries if e["type"] in ("complete", "abort")}
    return [e for e in entries if e["type"] == "intent" and e["seq"] not in done]


def repair(client, state: RegistryState, check) -> list[dict]:
    """Complete every intent that a crashed command left without a completion (call under the lock).

    Rolling forward is always right here: an intent is written only after its gates passed and
    records the exact aliases and tags it sets, so finishing it is what the crashed command would
    have done.
    """
    done = []
    for intent in pending(state.entries()):
        print(f"registry: completing the interrupted {intent['action']} of {state.name!r} "
              f"(ledger #{intent['seq']} by {intent['by']} at {intent['at']})", file=sys.stderr, flush=True)
        _finish(client, state.name, intent, check)
        check()
        state.append({"type": "complete", "op": intent["seq"], "action": intent["action"], "repaired": True})
        done.append(intent)
    return done


def repair_model(name: str, client=None) -> list[dict]:
    """`repair` under the promotion lock, for the `cxrcf registry repair` command."""
    client = client or connect()
    _registered_model(client, name)
    with promotion_lock(name, client) as held:
        return repair(client, ledger(name, client), held["check"])


def champion_stack(entries: list[dict]) -> list[str]:
    """The champions that rollback walks back through, oldest first, as the ledger says.

    A promotion pushes its version; a rollback to version V pops back to V's most recent place, so
    repeated rollbacks walk back one promotion each and a rollback is never rolled back into.
    """
    done = {e["op"] for e in entries if e["type"] == "complete"}
    stack: list[str] = []
    for e in entries:
        if e["type"] != "intent" or e["seq"] not in done:
            continue
        if e["action"] == "promote":
            stack.append(e["version"])
        elif e["action"] == "rollback":
            target = e["version"]
            if target in stack:
                del stack[len(stack) - stack[::-1].index(target):]
            else:
                stack = [target]
    return stack


def _gate_cell(gate: dict) -> str:
    value = "missing" if gate["value"] is None else f"{gate['value']:.4g}"
    return f"{gate['name']}={value}{'' if gate['passed'] else ' FAIL'}"


def history(name: str, client=None) -> list[dict]:
    """One row per alias move or refusal, oldest first, from the ledger (status: done/PENDING/aborted)."""
    client = client or connect()
    _registered_model(client, name)
    entries = ledger(name, client).entries()
    closing = {e["op"]: e for e in entries if e["type"] in ("complete", "abort")}
    rows = []
    for e in entries:
        if e["type"] not in ("intent", "refused"):
            continue
        end = closing.get(e["seq"])
        status = "refused" if e["type"] == "refused" else (
            "PENDING" if end is None else "aborted" if end["type"] == "abort"
            else "repaired" if end.get("repaired") else "done")
        moves = ", ".join(f"{a}: {e.get('from', {}).get(a) or '-'} -> {v or '-'}" for a, v in e.get("moves", {}).items())
        gates = "; ".join(_gate_cell(g) for g in e.get("gates", []))
        rows.append({"seq": e["seq"], "at": e["at"], "by": e["by"], "action": e["action"],
                     "version": e.get("version"), "moves": moves or "-", "decision": e.get("decision", ""),
                     "status": status, "gates": gates, "reason": e.get("reason", "")})
    return rows


# -------------------------------------------------------------------------------------- promotion
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
    ledger_seq: int | None = None
    repaired: list[int] | None = None  # intents of crashed commands this one completed first

    @property
    def ok(self) -> bool:
        return self.decision != "refused"

    def to_json(self) -> dict:
        return asdict(self)


def read_registered(path) -> dict:
    """{name, version, run_id} from the register stage's `--out` file, checked field by field."""
    data = read_json(Path(path))
    if not isinstance(data, dict):
        raise CxrcfError(f"{path}: expected the JSON object written by `cxrcf registry register --out`")
    for key in ("name", "version", "run_id"):
        if not isinstance(data.get(key), str) or not data[key]:
            raise CxrcfError(f"{path}: field {key!r} is missing or not a string (written by `cxrcf registry register`?)")
    if not data["version"].isdigit():
        raise CxrcfError(f"{path}: field 'version' = {data['version']!r} is not a version number")
    return data


def promote(params, name: str | None = None, version: str | None = None, client=None,
            expect_run_id: str | None = None) -> Decision:
    """Move `champion` to `version` (default: the `candidate`) if the gates pass; record either way.

    `expect_run_id` pins the promotion to one registration (the register stage's output): a version
    number that now belongs to another run is refused rather than promoted.
    """
    client = client or connect()
    name = name or params.registry.generator_name
    _registered_model(client, name)
    state = ledger(name, client)
    with promotion_lock(name, client) as held:
        waited = held["waited_s"]
        repaired = [i["seq"] for i in repair(client, state, held["check"])]
        aliases = _aliases(client, name)
        if version is None:
            version = resolve_alias(name, CANDIDATE, client)
        target = _model_version(client, name, str(version))
        version = str(target.version)
        if expect_run_id is not None and target.run_id != expect_run_id:
            raise CxrcfError(f"model {name!r} version {version} comes from run {target.run_id}, not from the "
                             f"registration run {expect_run_id} named by the register stage's output")
        champion = aliases.get(CHAMPION)
        previous = aliases.get(PREVIOUS)
        checked_at = _now()
        if champion == version:
            return Decision(name, version, "unchanged", f"version {version} is already champion", champion,
                            previous, checked_at, waited, [], None, repaired)
        metrics, problems = run_metrics(client, target)
        champion_metrics = run_metrics(client, _model_version(client, name, champion))[0] if champion else None
        results = check_gates(metrics, params.registry.gates, champion_metrics)
        passed = all(g.passed for g in results) and not problems
        reason = "; ".join(problems) if problems else gates_reason(results, champion)
        if problems and champion:
            reason += f" (vs champion version {champion})"
        tags = {
            "promotion.decision": "promoted" if passed else "refused",
            "promotion.reason": reason[:7900],
            "promotion.checked_at": checked_at,
            "promotion.champion_at_check": champion or "",
            "promotion.waited_s": f"{waited:.3f}",
        }
        tags.update({f"promotion.gate.{g.name}": g.describe() for g in results})
        gate_rows = [g.to_json() for g in results]
        entry = {"action": "promote", "version": version, "decision": tags["promotion.decision"],
                 "reason": reason[:1500], "gates": gate_rows, "run_id": target.run_id}
        if passed:
            # The version remembers whom it replaced, so a registry read without the ledger still explains it.
            tags["promotion.previous_champion"] = champion or ""
            moves = {PREVIOUS: champion, CHAMPION: version} if champion else {CHAMPION: version}
            intent = _transact(client, state, {**entry, "moves": moves,
                                               "from": {PREVIOUS: previous, CHAMPION: champion},
                                               "tags": {version: tags}}, held["check"])
            previous = champion or previous
        else:
            held["check"]()
            intent = state.append({"type": "refused", **entry, "from": {CHAMPION: champion}})
            for key, value in tags.items():
                client.set_model_version_tag(name, version, key, value)
        after = _aliases(client, name)
        return Decision(name, version, tags["promotion.decision"], reason, after.get(CHAMPION),
                        after.get(PREVIOUS) if passed else previous, checked_at, waited,
                        gate_rows, intent["seq"], repaired)


def rollback(params, name: str | None = None, client=None, to: str | None = None) -> dict:
    """champion <- the champion before it (or `to`, an earlier champion), as the ledger records them.

    previous-champion then points at the champion before the restored one, so repeated rollbacks
    walk back one promotion each.
    """
    client = client or connect()
    name = name or params.registry.generator_name
    _registered_model(client, name)
    state = ledger(name, client)
    with promotion_lock(name, client) as held:
        repaired = [i["seq"] for i in repair(client, state, held["check"])]
        aliases = _aliases(client, name)
        demoted = aliases.get(CHAMPION)
        stack = champion_stack(state.entries())
        if not stack or stack[-1] != demoted:
            # Aliases moved outside cxrcf (or before the ledger existed): only the aliases are known.
            stack = [v for v in (aliases.get(PREVIOUS), demoted) if v]
        if to is None:
            if len(stack) < 2:
                raise CxrcfError(f"model {name!r}: no {PREVIOUS!r} alias to roll back to")
            restored = stack[-2]
            stack = stack[:-1]
        else:
            restored = str(to)
            _model_version(client, name, restored)
            if restored == demoted:
                raise CxrcfError(f"model {name!r}: version {restored} is already champion")
            if restored not in stack[:-1]:
                earlier = ", ".join(stack[:-1]) or "none"
                raise CxrcfError(f"model {name!r}: version {restored} is not an earlier champion on the "
                                 f"rollback chain (earlier champions: {earlier})")
            stack = stack[:len(stack) - stack[::-1].index(restored)]
        before = stack[-2] if len(stack) >= 2 else None
        at = _now()
        tags = {restored: {"promotion.previous_champion": before or "", "rollback.restored_at": at,
                           "rollback.replaced_version": demoted or ""}}
        if demoted:
            tags[demoted] = {"rollback.demoted_at": at, "rollback.replaced_by": restored}
        intent = _transact(client, state, {
            "action": "rollback", "version": restored, "decision": "rolled back",
            "reason": f"rollback to version {restored}" + (" (explicit --to)" if to else ""),
            "moves": {CHAMPION: restored, PREVIOUS: before},
            "from": {CHAMPION: demoted, PREVIOUS: aliases.get(PREVIOUS)}, "tags": tags}, held["check"])
        return {"name": name, "champion_version": restored, "demoted_version": demoted,
                "previous_champion": before, "rolled_back_at": at, "ledger_seq": intent["seq"],
                "repaired": repaired}


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


def _generator_mode(generator_dir: Path, asked: str | None) -> str:
    """The CFT mode from the generator's own meta; `--mode` must agree with it when both exist."""
    from cxrcf.export import read_config

    recorded = (read_config(generator_dir).get("meta") or {}).get("mode")
    if recorded is not None and recorded not in MODES:
        raise CxrcfError(f"{generator_dir}: meta mode {recorded!r} is not one of {', '.join(MODES)}")
    if asked is not None and recorded is not None and asked != recorded:
        raise CxrcfError(f"--mode {asked!r}: {generator_dir} was trained with mode {recorded!r} (its meta says so)")
    if asked is None and recorded is None:
        raise CxrcfError(f"{generator_dir}: its meta records no CFT mode; pass --mode none|hard|soft")
    return asked or recorded


def register(params, generator_dir, scm_dir, predictor_dir, guidance_dir, mode: str, eval_json,
             figures_dir=None, name: str | None = None, client=None) -> dict:
    """Package, log and register a generator (and both predictors); alias the generator `candidate`.

    Returns {name, version, run_id, model_uri, predictors: {role: {name, version}}}.
    """
    if mode is not None and mode not in MODES:
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
    from cxrcf.export import load_model, read_config
    from pipelines.lineage import registration_lineage
    from pipelines.model_card import render_model_card
    from training.tracking import ensure_experiment

    mode = _generator_mode(dirs["generator"], mode)
    client = client or connect()
    name = name or params.registry.generator_name
    lineage = {f"lineage.{role}_run_id": rid for role, d in dirs.items() if (rid := read_run_id(d))}
    tags = {"cxrcf.kind": "generator", "cft_mode": mode, "preset": params.preset,
            **registration_lineage(client, lineage.get("lineage.generator_run_id")), **lineage}
    headline = {k: v for k, v in metrics.items() if HEADLINE.match(k)}
    meta = {"name": name, "mode": mode, "preset": params.preset, "metrics": headline, "lineage": tags}

    print(f"registry: packaging {dirs['generator']} ({mode} CFT) as {name!r}", file=sys.stderr, flush=True)
    bundle = GeneratorBundle(load_model(dirs["generator"]), load_model(dirs["scm"]),
                             load_model(dirs["evaluation_predictor"]), meta)
    exp_id = ensure_experiment(params.mlflow.experiment)
    gate_rows = [g.to_json() for g in check_gates(headline, params.registry.gates)]
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
    state = ledger(name, client)
    with promotion_lock(name, client) as held:
        repair(client, state, held["check"])
        before = _aliases(client, name).get(CANDIDATE)
        _transact(client, state, {"action": "register", "version": version, "decision": "registered",
                                  "reason": f"{mode} CFT generator registered from run {run_id}", "run_id": run_id,
                                  "moves": {CANDIDATE: version}, "from": {CANDIDATE: before},
                                  "gates": gate_rows}, held["check"])
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


