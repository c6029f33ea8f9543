"""`cxrcf registry`: register, promote, rollback, list and show generator versions.

    cxrcf registry register --params P --generator DIR --scm DIR --predictor DIR --guidance DIR
                            [--mode none|hard|soft] --eval FILE [--figures DIR] [--out FILE]
    cxrcf registry promote  --params P [--name N] [--version V | --from FILE] [--out FILE] [--no-fail]
    cxrcf registry rollback [--params P] [--name N] [--to VERSION]
    cxrcf registry history  [NAME] [--params P]
    cxrcf registry repair   [--params P] [--name N]
    cxrcf registry list     [--params P] [--name N]
    cxrcf registry show     NAME@ALIAS | NAME/VERSION | ALIAS | VERSION  [--params P]

The store is `MLFLOW_TRACKING_URI` (an MLflow server) or the local SQLite default.
"""

from __future__ import annotations

import argparse
import os
import sys

from cxrcf.cli import add_params
from cxrcf.config import MODEL_MODES
from cxrcf.errors import CxrcfError

# MLflow retries a dead server for minutes by default; a CLI should say so within seconds.
# Artifact progress bars only clutter pipeline logs.
QUIET_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
             "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cxrcf registry", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("register", help="package and register a generator; alias it 'candidate'")
    add_params(r)
    r.add_argument("--generator", required=True, help="HVAE export directory (pretrained or CFT)")
    r.add_argument("--scm", required=True, help="attribute SCM export directory")
    r.add_argument("--predictor", required=True, help="evaluation predictor export directory")
    r.add_argument("--guidance", required=True, help="guidance predictor export directory")
    r.add_argument("--mode", choices=MODEL_MODES,
                   help="CFT mode; default and check: the generator's own meta")
    r.add_argument("--eval", required=True, help="evaluation JSON of this generator (cxrcf evaluate)")
    r.add_argument("--figures", help="folder of PNG figures for the model card")
    r.add_argument("--name", help="registered model name (default params.registry.generator_name)")
    r.add_argument("--out", help="write {name, version, run_id, model_uri} here")

    pr = sub.add_parser("promote", help="move 'champion' to the candidate if the gates pass")
    add_params(pr)
    pr.add_argument("--name")
    which = pr.add_mutually_exclusive_group()
    which.add_argument("--version", help="version to promote (default: the 'candidate' alias)")
    which.add_argument("--from", dest="from_file", metavar="FILE",
                       help="promote exactly the version in this `register --out` file (pinned to its run)")
    pr.add_argument("--out", help="write the decision JSON here")
    pr.add_argument("--no-fail", action="store_true", help="exit 0 when refused (the decision is still recorded)")

    rb = sub.add_parser("rollback", help="champion <- previous-champion")
    add_params(rb)
    rb.add_argument("--name")
    rb.add_argument("--to", metavar="VERSION", help="an earlier champion to restore (default: the one before)")
    rb.add_argument("--out", help="write the rollback JSON here")

    hi = sub.add_parser("history", help="the alias ledger: every alias move and refused promotion")
    hi.add_argument("name", nargs="?", help="registered model (default params.registry.generator_name)")
    add_params(hi)
    hi.add_argument("--json", action="store_true", help="print the rows as JSON")

    rp = sub.add_parser("repair", help="complete alias moves that a crashed command left half done")
    add_params(rp)
    rp.add_argument("--name")

    ls = sub.add_parser("list", help="versions with aliases, mode and key metrics")
    add_params(ls)
    ls.add_argument("--name")

    sh = sub.add_parser("show", help="one version's tags and metrics")
    sh.add_argument("ref", help="NAME@ALIAS, NAME/VERSION, or ALIAS / VERSION of the default model")
    add_params(sh)
    return p


def format_table(rows: list[dict]) -> str:
    if not rows:
        return "(no versions)"
    cols = list(rows[0])

    def cell(v) -> str:
        if v is None:
            return "-"
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    cells = [[cell(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths)).rstrip()
    return "\n".join([line(cols), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def _write(path: str | None, obj) -> None:
    if path:
        from cxrcf.fileio import write_json

        write_json(path, obj)


def _run(args) -> int:
    from cxrcf.config import load_params
    from pipelines import registry, registry_ledger
    from store import models

    params = load_params(args.params)
    if args.command == "register":
        out = registry.register(params, args.generator, args.scm, args.predictor, args.guidance, args.mode,
                                args.eval, figures_dir=args.figures, name=args.name)
        _write(args.out, out)
        print(f"registered {out['name']} version {out['version']} as 'candidate' ({out['model_uri']})")
        return 0
    if args.command == "promote":
        name, version, run_id = args.name, args.version, None
        if args.from_file:
            pinned = registry.read_registered(args.from_file)
            if name and name != pinned["name"]:
                raise CxrcfError(f"--name {name!r} disagrees with {args.from_file}: it registered {pinned['name']!r}")
            name, version, run_id = pinned["name"], pinned["version"], pinned["run_id"]
        decision = registry.promote(params, name=name, version=version, expect_run_id=run_id)
        for seq in decision.repaired or []:
            print(f"completed the interrupted alias move recorded as ledger entry #{seq}")
        _write(args.out, decision.to_json())
        line = f"{decision.name} version {decision.version}: {decision.decision}: {decision.reason}"
        if decision.ok:
            print(line + (f" (previous champion: {decision.previous_champion})"
                          if decision.decision == "promoted" and decision.previous_champion else ""))
            return 0
        if args.no_fail:
            print(line)
            return 0
        raise CxrcfError(line)
    if args.command == "rollback":
        out = registry.rollback(params, name=args.name, to=args.to)
        _write(args.out, out)
        print(f"{out['name']}: champion is version {out['champion_version']} again "
              f"(was {out['demoted_version']}; previous-champion now {out['previous_champion'] or 'none'})")
        return 0
    name = getattr(args, "name", None) or params.registry.generator_name
    if args.command == "history":
        rows = registry_ledger.history(name)
        if args.json:
            import json

            print(json.dumps(rows, indent=1))
            return 0
        print(f"{name} ledger ({registry.connect().tracking_uri})")
        print(format_table([{k: r[k] for k in ("seq", "at", "by", "action", "version", "moves", "decision",
                                               "status")} | {"gates / reason": r["gates"] or r["reason"]}
                            for r in rows]))
        return 0
    if args.command == "repair":
        done = registry.repair_model(name)
        print(f"{name}: " + (f"completed {len(done)} interrupted alias move(s): ledger "
                             + ", ".join(f"#{i['seq']} ({i['action']} of version {i['version']})" for i in done)
                             if done else "nothing to repair"))
        return 0
    if args.command == "list":
        print(f"{name} ({registry.connect().tracking_uri})")
        print(format_table(models.list_versions(name)))
        return 0
    info = models.show_version(args.ref, default_name=params.registry.generator_name)
    print(f"{info['name']} version {info['version']}  aliases: {', '.join(info['aliases']) or '-'}  "
          f"run: {info['run_id']}  source: {info['source']}")
    rows = [{"key": k, "value": v} for k, v in info["tags"].items()]
    print(format_table(rows))
    return 0


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    from mlflow.exceptions import MlflowException

    try:
        return _run(args)
    except MlflowException as err:
        # Anything MLflow refuses that we did not anticipate still reaches the user as one line.
        raise CxrcfError(f"MLflow ({err.error_code}): {str(err.message).splitlines()[0][:300]}") from None


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
