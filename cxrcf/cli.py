"""The `cxrcf` command: one front door, one subcommand group per workload.

Each group lives in its own module exposing `main(argv: list[str]) -> int`. The dispatch table
below names every group's entry point as a function that imports its module when the group runs
(the only lazy imports of the code base, so `cxrcf --help` never imports torch, Ray or MLflow, and
each arrow from the front door into an outer room is an import statement the architecture test
sees). Every group's parser is built by a `build_parser()` and takes `--params` through `add_params`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

PARAMS_FILE = "params.yaml"


def add_params(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `--params` option, declared once for every command."""
    parser.add_argument("--params", default=PARAMS_FILE, help=f"parameters file (default {PARAMS_FILE})")
    return parser


def _data(argv):
    from cxrcf.data_cli import main

    return main(argv)


def _train(argv):
    from training.cli import main

    return main(argv)


def _evaluate(argv):
    from pipelines.evaluate import main

    return main(argv)


def _study(argv):
    from pipelines.study import main

    return main(argv)


def _occlusion(argv):
    from pipelines.occlusion import main

    return main(argv)


def _report(argv):
    from pipelines.report import main

    return main(argv)


def _registry(argv):
    from pipelines.registry_cli import main

    return main(argv)


def _serve(argv):
    from serving.cli import main

    return main(argv)


def _augment(argv):
    from pipelines.augment import main

    return main(argv)


def _pipeline(argv):
    from pipelines.main import main

    return main(argv)


GROUPS: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "data": (_data, "generate SynthCXR, import MIMIC-CXR / CheXpert, validate, summarise"),
    "train": (_train, "train predictors, the attribute SCM, the HVAE, and hard/soft CFT on Ray Train"),
    "evaluate": (_evaluate, "effectiveness, amplification, composition, ground truth of a generator"),
    "study": (_study, "the CFT strength sweep: hard vs soft across slacks and seeds"),
    "occlusion": (_occlusion, "where sex evidence goes under do(finding): the study's spatial test"),
    "report": (_report, "markdown/HTML report comparing none / hard / soft CFT"),
    "registry": (_registry, "register, promote, rollback, list and show model versions"),
    "serve": (_serve, "serve counterfactuals over HTTP with Ray Serve"),
    "augment": (_augment, "batch counterfactual augmentation with Ray Data"),
    "pipeline": (_pipeline, "the main job: data -> champion with DVC, and its summary"),
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
        return int(GROUPS[group][0](argv[1:]) or 0)
    except CxrcfError as err:
        print(f"cxrcf {group}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"cxrcf {group}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
