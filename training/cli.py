"""`cxrcf train <phase>`: predictors, scm, generator, cft (see docs/CONTRACTS.md "Training").

Top-level imports stay light; each phase imports torch/Ray/MLflow when it runs.
"""

from __future__ import annotations

import argparse
import json
import signal
import threading

from cxrcf.cli import add_params
from cxrcf.config import MODES

DEFAULTS = {
    "guidance": "artifacts/models/guidance_predictor",
    "evaluation": "artifacts/models/evaluation_predictor",
    "scm": "artifacts/models/scm",
    "generator": "artifacts/models/generator",
    "cft": "artifacts/models/cft_{mode}",
}


RESUME_HELP = ("continue this output's interrupted run from its last checkpoint, in the same Ray Train run and "
               "MLflow run; start a new run if there is none, it finished, or its params, data or code changed")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cxrcf train", description="Train one phase on Ray Train, tracked in MLflow.")
    sub = parser.add_subparsers(dest="phase", required=True, metavar="PHASE")

    def common(p, phase):
        add_params(p)
        p.add_argument("--data", default="data", help="dataset root (default data)")
        p.add_argument("--metrics", default=f"artifacts/metrics/{phase}.json", help="metrics JSON for DVC")
        return p

    p = common(sub.add_parser("predictors", help="guidance and evaluation predictors"), "predictors")
    p.add_argument("--out-guidance", default=DEFAULTS["guidance"])
    p.add_argument("--out-evaluation", default=DEFAULTS["evaluation"])
    p.add_argument("--resume", action="store_true", help=RESUME_HELP)
    p = common(sub.add_parser("scm", help="attribute SCM (in-process)"), "scm")
    p.add_argument("--out", default=DEFAULTS["scm"])
    p = common(sub.add_parser("generator", help="HVAE pretraining"), "generator")
    p.add_argument("--out", default=DEFAULTS["generator"])
    p.add_argument("--resume", action="store_true", help=RESUME_HELP)
    p = sub.add_parser("cft", help="hard or soft counterfactual fine-tuning")
    p.add_argument("--mode", required=True, choices=MODES)
    add_params(p)
    p.add_argument("--data", default="data")
    p.add_argument("--generator", default=DEFAULTS["generator"])
    p.add_argument("--guidance", default=DEFAULTS["guidance"])
    p.add_argument("--scm", default=DEFAULTS["scm"])
    p.add_argument("--out", default=None, help="default artifacts/models/cft_<mode>")
    p.add_argument("--slack", type=float, default=None, help="nats/pixel above eps (default params.cft.slack)")
    p.add_argument("--seed", type=int, default=None, help="CFT seed (default params.cft.optim.seed)")
    p.add_argument("--metrics", default=None, help="default artifacts/metrics/cft_<mode>.json")
    p.add_argument("--resume", action="store_true", help=RESUME_HELP)
    return parser


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from cxrcf.config import load_params

    # SIGTERM (a scheduler, `kill`) ends the phase's MLflow run as KILLED, like Ctrl-C; once Ray starts it
    # installs its own handler, which exits through SystemExit and is treated the same way.
    if threading.current_thread() is threading.main_thread():  # Python allows handlers there only
        signal.signal(signal.SIGTERM, _interrupt)
    params = load_params(args.params)
    if args.phase == "predictors":
        from training.predictors import train_predictors

        out = train_predictors(params, args.data, args.out_guidance, args.out_evaluation, metrics_file=args.metrics,
                               resume=args.resume)
    elif args.phase == "scm":
        from training.scm import train_scm

        out = train_scm(params, args.data, args.out, metrics_file=args.metrics)
    elif args.phase == "generator":
        from training.generator import train_generator

        out = train_generator(params, args.data, args.out, metrics_file=args.metrics, resume=args.resume)
    else:
        from training.cft import train_cft

        out_dir = args.out or DEFAULTS["cft"].format(mode=args.mode)
        metrics = args.metrics or f"artifacts/metrics/cft_{args.mode}.json"
        out = train_cft(params, args.data, args.generator, args.guidance, args.scm, out_dir, args.mode,
                        slack=args.slack, seed=args.seed, metrics_file=metrics, resume=args.resume)
    print(json.dumps({"phase": args.phase, "run_id": out["run_id"], "out_dir": out["out_dir"]}))
    return 0
