"""The model registry: register generators with lineage and metrics, promote by gates, roll back.

Aliases carry the lifecycle (MLflow 3 has no stages): `candidate` is the latest registration,
`champion` is what serving and augmentation load, `previous-champion` is what rollback restores.
Every decision is written on the version as `promotion.*` tags, so the registry itself explains why
its champion is the champion. Every alias move runs under the promotion lock (registry_lock.py) as a
transaction over the alias ledger (registry_ledger.py), so one that a crash interrupted is finished
by the next command.

Top-level imports stay light (the CLI imports this module); torch and MLflow load inside functions.
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cxrcf.config import MODEL_MODES
from cxrcf.errors import CxrcfError
from cxrcf.export import require_model_dir
from cxrcf.fileio import read_json
from pipelines.gates import check_gates, gates_reason, run_metrics
from pipelines.registry_ledger import champion_stack, ledger, now, repair, transact
from pipelines.registry_lock import promotion_lock
from store.models import (
    CANDIDATE,
    CHAMPION,
    EVAL_PREFIX,
    HEADLINE,
    PREVIOUS,
    alias_map,
    connect,
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
        checked_at = now()
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
            intent = transact(client, state, {**entry, "moves": moves,
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
        at = now()
        tags = {restored: {"promotion.previous_champion": before or "", "rollback.restored_at": at,
                           "rollback.replaced_version": demoted or ""}}
        if demoted:
            tags[demoted] = {"rollback.demoted_at": at, "rollback.replaced_by": restored}
        intent = transact(client, state, {
            "action": "rollback", "version": restored, "decision": "rolled back",
            "reason": f"rollback to version {restored}" + (" (explicit --to)" if to else ""),
            "moves": {CHAMPION: restored, PREVIOUS: before},
            "from": {CHAMPION: demoted, PREVIOUS: aliases.get(PREVIOUS)}, "tags": tags}, held["check"])
        return {"name": name, "champion_version": restored, "demoted_version": demoted,
                "previous_champion": before, "rolled_back_at": at, "ledger_seq": intent["seq"],
                "repaired": repaired}


def repair_model(name: str, client=None) -> list[dict]:
    """`repair` under the promotion lock, for the `cxrcf registry repair` command."""
    client = client or connect()
    registered_model(client, name)
    with promotion_lock(name, client) as held:
        return repair(client, ledger(name, client), held["check"])


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
        transact(client, state, {"action": "register", "version": version, "decision": "registered",
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


