"""The main job (`make run`): data -> champion with DVC on the embedded defaults, then a summary.

`cxrcf pipeline run` (also `python -m pipelines.main`): generates the default SynthCXR dataset when
`data/` is missing and checks it against `data.dvc`, runs `dvc repro`, and prints what the study
found. `cxrcf pipeline summary` prints the summary of the last run only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from cxrcf.cli import add_params
from cxrcf.config import MODEL_MODES as MODES
from cxrcf.errors import CxrcfError


def _dvc() -> list[str]:
    exe = Path(sys.executable).with_name("dvc")
    return [str(exe)] if exe.exists() else [shutil.which("dvc") or "dvc"]


def ensure_data(params_path: str = "params.yaml", dvc_file: str = "data.dvc") -> None:
    """Generate the default dataset if it is missing; it must reproduce the hash pinned in data.dvc."""
    from cxrcf.config import load_params
    from cxrcf.data import dvc_data_hash

    params = load_params(params_path)
    root = Path(params.data.root)
    if (root / "metadata.csv").exists():
        return
    if not Path(dvc_file).exists():
        raise CxrcfError(f"{dvc_file}: missing; it pins the dataset (run `dvc add {root}` once)")
    from cxrcf.synth import generate_dataset

    print(f"[data] {root}/ is missing: generating SynthCXR ({params.data.synth.n_images} images at "
          f"{params.data.synth.resolution}px, seed {params.data.synth.seed})", flush=True)
    t0 = time.perf_counter()
    generate_dataset(root, params.data.synth)
    print(f"[data] generated in {time.perf_counter() - t0:.1f} s; checking it against {dvc_file}", flush=True)
    # `dvc commit` hashes the regenerated files into the cache and rewrites data.dvc with what it
    # found; a different hash means the generator or its parameters changed, so put the pin back.
    pinned, expected = Path(dvc_file).read_text(), dvc_data_hash(dvc_file)
    out = subprocess.run(_dvc() + ["commit", "--force", "--quiet", dvc_file], check=False,
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise CxrcfError(f"dvc commit {dvc_file} failed: {out.stderr.strip()}")
    found = dvc_data_hash(dvc_file)
    if found != expected:
        Path(dvc_file).write_text(pinned)
        raise CxrcfError(
            f"{root}/ regenerated with params.yaml data.synth has md5 {found}, not the {expected} pinned in "
            f"{dvc_file}; restore the default data settings or re-pin with `dvc add {root}`")


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _get(d: dict | None, dotted: str):
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def _fmt(v, digits: int = 3) -> str:
    return "-" if not isinstance(v, (int, float)) else f"{v:.{digits}f}"


def summary_text(artifacts: Path = Path("artifacts")) -> str:
    evals = {m: _load(artifacts / "eval" / f"{m}.json") for m in MODES}
    cols = [
        ("AUC sex", "effectiveness.sex.auc"), ("AUC race", "effectiveness.race.auc"),
        ("AUC finding", "effectiveness.finding.auc"), ("MAE age", "effectiveness.age.mae"),
        ("AMP mean", "amplification.mean"), ("AMP worst", "amplification.worst"),
        ("drift", "drift.mean"), ("GT L1", "ground_truth.cf_l1"), ("GT AMP", "ground_truth.amplification.mean"),
    ]
    head = f"{'CFT':<6}" + "".join(f"{name:>12}" for name, _ in cols)
    lines = ["Counterfactual generators on the test split (evaluation predictor; AMP in log-odds, 0 is ideal)",
             head, "-" * len(head)]
    for mode in MODES:
        row = f"{mode:<6}" + "".join(f"{_fmt(_get(evals[mode], key)):>12}" for _, key in cols)
        lines.append(row if evals[mode] else f"{mode:<6}  (no evaluation found)")
    hard, soft = _get(evals["hard"], "amplification.mean"), _get(evals["soft"], "amplification.mean")
    if isinstance(hard, (int, float)) and isinstance(soft, (int, float)) and hard > 0:
        lines.append(f"soft / hard mean amplification: {soft / hard:.2f}")
    promo = _load(artifacts / "registry" / "promotion.json")
    if promo:
        lines.append("")
        lines.append(f"registry: {promo.get('name', '?')} version {promo.get('version', '?')}: "
                     f"{promo.get('decision', '?')} ({promo.get('reason', '')})")
        if promo.get("champion_version") is not None:
            lines.append(f"champion: {promo.get('name', '?')} version {promo['champion_version']}")
    lines += [
        "",
        "next:",
        "  report        artifacts/report/report.html (markdown beside it)",
        "  MLflow UI     .venv/bin/mlflow ui --backend-store-uri sqlite:///mlruns.db",
        "  registry      .venv/bin/cxrcf registry list",
        "  serve         make serve   (then see README for the curl example)",
    ]
    return "\n".join(lines)


@contextlib.contextmanager
def shared_ray_cluster():
    """One local Ray cluster for every stage of this run; yields the address the stages join.

    Each of the ~10 stages would otherwise start (and pay for) a Ray cluster of its own. The dashboard
    runs (on loopback) because Ray Train's placement-group cleaner polls the State API through it:
    without it that actor logs one warning per poll, thousands per run. With RAY_ADDRESS already set,
    the stages join that cluster instead and nothing is started here.
    """
    if os.environ.get("RAY_ADDRESS"):
        yield os.environ["RAY_ADDRESS"]
        return
    import ray

    t0 = time.perf_counter()
    ctx = ray.init(include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False,
                   configure_logging=False)
    address = ctx.address_info["gcs_address"]
    print(f"[pipeline] local Ray cluster at {address} ({ray.cluster_resources().get('CPU', 0):g} CPUs) "
          f"started in {time.perf_counter() - t0:.1f} s; every stage joins it", flush=True)
    try:
        yield address
    finally:
        ray.shutdown()


def run(params_path: str = "params.yaml") -> int:
    t0 = time.perf_counter()
    ensure_data(params_path)
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    with shared_ray_cluster() as address:
        if not os.environ.get("RAY_ADDRESS"):
            # a one-node local cluster has no node to drain: Ray Train's preemption watcher (an actor per worker
            # group start, which logged an error line at each) has nothing to watch
            env.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        env["RAY_ADDRESS"] = address
        print("[pipeline] dvc repro", flush=True)
        proc = subprocess.run(_dvc() + ["repro"], check=False, env=env)
    if proc.returncode != 0:
        raise CxrcfError(f"dvc repro failed (exit {proc.returncode}); the failing stage's message is above")
    print()
    print(summary_text())
    print(f"\n[pipeline] done in {(time.perf_counter() - t0) / 60:.1f} min")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cxrcf pipeline", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd")
    p_run = sub.add_parser("run", help="generate data if missing, dvc repro, summary (the default)")
    add_params(p_run)
    sub.add_parser("summary", help="print the summary of the last run")
    args = parser.parse_args(argv)
    if args.cmd == "summary":
        print(summary_text())
        return 0
    return run(getattr(args, "params", "params.yaml"))


if __name__ == "__main__":
    from cxrcf.cli import quiet_env

    quiet_env()
    try:
        raise SystemExit(main(sys.argv[1:]))
    except CxrcfError as err:
        print(f"cxrcf pipeline: error: {err}", file=sys.stderr)
        raise SystemExit(1)
