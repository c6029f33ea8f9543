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
import secrets
import sys
from collections.abc import Callable
from pathlib import Path

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

# Ray's ports listen on every interface even for a local cluster (Ray 2.60 has no loopback-only bind),
# so its token auth stays on: only processes holding the token attach as drivers (README, "Fail closed").
QUIET_ENV = {
    "RAY_AUTH_MODE": "token",
    "RAY_USAGE_STATS_ENABLED": "0",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
}


def quiet_env(environ=os.environ) -> None:
    """QUIET_ENV wherever the caller has not chosen, and Ray's token kept private to this user."""
    for key, value in QUIET_ENV.items():
        environ.setdefault(key, value)
    private_ray_token(environ)


def private_ray_token(environ=os.environ, home: Path | None = None) -> Path | None:
    """The token file a token-auth local cluster uses, created (or narrowed) to mode 0600.

    `ray.init` would create ~/.ray/auth_token itself, but world-readable (0644 in Ray 2.60), which hands
    the cluster to every local user. Nothing to do when auth is off or the token comes from elsewhere."""
    if (environ.get("RAY_AUTH_MODE") or "").strip().lower() != "token":
        return None
    if environ.get("RAY_AUTH_TOKEN") or environ.get("RAY_AUTH_TOKEN_PATH"):
        return None
    path = (home or Path.home()) / ".ray" / "auth_token"
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        if path.stat().st_mode & 0o077:
            path.chmod(0o600)
        return path
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))  # Ray's own generator: 256 bits as hex
    return path


def _usage() -> str:
    width = max(len(g) for g in GROUPS)
    lines = ["usage: cxrcf <command> [options]   (cxrcf <command> --help for more)", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in GROUPS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    quiet_env()
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
