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
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cxrcf.config import MODEL_MODES
from cxrcf.errors import CxrcfError
from cxrcf.export import require_model_dir
from cxrcf.fileio import read_json
from pipelines.gates import check_gates, gates_reason, run_metrics
from pipelines.registry_ledger import RegistryState, server_lock
from store.models import (
    CANDIDATE,
    CHAMPION,
    EVAL_PREFIX,
    HEADLINE,
    PREVIOUS,
    alias_map,
    connect,
    error_code,
    flat_metrics,
    model_version,
    registered_model,
    resolve_alias,
)
from store.runs import read_run_id
from store.tracking import ensure_experiment

PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
GENERATOR_ARTIFACT = "generator"  # the logged model's name inside the registration run
DESCRIPTION_LIMIT = 5000  # MLflow's SQL stores declare the version description as VARCHAR(5000)
LOCK_WAIT_S = 120.0
SERVER_LOCK_STALE_S = 300.0  # a server-side lock older than this belongs to a dead process


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
    return "RESOURCE_DOES_NOT_EXIST" in error_code(err) or "not found" in str(err).lower()


def _finish(client, name: str, intent: dict, check) -> None:
    """Apply an intent's alias moves and version tags (idempotent: a repair runs it again)."""
    check()
    _set_aliases(client, name, intent["moves"])
    after = alias_map(client, name)
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
    registered_model(client, name)
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
    registered_model(client, name)
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
    registered_model(client, name)
    state = ledger(name, client)
    with promotion_lock(name, client) as held:
        waited = held["waited_s"]
        repaired = [i["seq"] for i in repair(client, state, held["check"])]
        aliases = alias_map(client, name)
        if version is None:
            version = resolve_alias(name, CANDIDATE, client)
        target = model_version(client, name, str(version))
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
        champion_metrics = run_metrics(client, model_version(client, name, champion))[0] if champion else None
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
        after = alias_map(client, name)
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
    registered_model(client, name)
    state = ledger(name, client)
    with promotion_lock(name, client) as held:
        repaired = [i["seq"] for i in repair(client, state, held["check"])]
        aliases = alias_map(client, name)
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
            model_version(client, name, restored)
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
    if recorded is not None and recorded not in MODEL_MODES:
        raise CxrcfError(f"{generator_dir}: meta mode {recorded!r} is not one of {', '.join(MODEL_MODES)}")
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
    if mode is not None and mode not in MODEL_MODES:
        raise CxrcfError(f"--mode {mode!r}: expected one of {', '.join(MODEL_MODES)}")
    dirs = {"generator": Path(generator_dir), "scm": Path(scm_dir), "evaluation_predictor": Path(predictor_dir),
            "guidance_predictor": Path(guidance_dir)}
    for role, d in dirs.items():
        require_model_dir(d, role=f"{role} model")
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
        before = alias_map(client, name).get(CANDIDATE)
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


