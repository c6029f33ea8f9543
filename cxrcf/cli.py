"""The `cxrcf` command: one front door, one subcommand group per workload.

Each group lives in its own module exposing `main(argv: list[str]) -> int`; the module is imported
only when its group runs, so `cxrcf --help` never imports torch, Ray or MLflow.
"""

from __future__ import annotations

import importlib
import os
import sys

GROUPS: dict[str, tuple[str, str]] = {
    "data": ("cxrcf.data_cli", "generate SynthCXR, import MIMIC-CXR / CheXpert, validate, summarise"),
    "train": ("training.cli", "train predictors, the attribute SCM, the HVAE, and hard/soft CFT on Ray Train"),
    "evaluate": ("pipelines.evaluate", "effectiveness, amplification, composition, ground truth of a generator"),
    "study": ("pipelines.study", "the CFT strength sweep: hard vs soft across slacks and seeds"),
    "occlusion": ("pipelines.occlusion", "where sex evidence goes under do(finding): the study's spatial test"),
    "report": ("pipelines.report", "markdown/HTML report comparing none / hard / soft CFT"),
    "registry": ("pipelines.registry_cli", "register, promote, rollback, list and show model versions"),
    "serve": ("serving.cli", "serve counterfactuals over HTTP with Ray Serve"),
    "augment": ("pipelines.augment", "batch counterfactual augmentation with Ray Data"),
    "pipeline": ("pipelines.main", "the main job: data -> champion with DVC, and its summary"),
}

QUIET_ENV = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
}


def _usage() -> str:
    width = max(len(g) for g in GROUPS)
    lines = ["usage: cxrcf <command> [options]   (cxrcf <command> --help for more)", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in GROUPS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    for key, value in QUIET_ENV.items():
        # `cxrcf serve` decides Ray's auth itself: on whenever the API is reachable off loopback
        if key == "RAY_AUTH_MODE" and argv[:1] == ["serve"]:
            continue
        os.environ.setdefault(key, value)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] == "--version":
        from cxrcf import __version__

        print(__version__)
        return 0
    group = argv[0]
    if group not in GROUPS:
        print(f"cxrcf: unknown command {group!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    from cxrcf.errors import CxrcfError

    try:
        module = importlib.import_module(GROUPS[group][0])
        return int(module.main(argv[1:]) or 0)
    except CxrcfError as err:
        print(f"cxrcf {group}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"cxrcf {group}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
