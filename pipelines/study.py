"""`cxrcf study`: the CFT strength sweep (issue 5, SCIENCE.md section 8).

CFT's strength is set mostly by the slack above the ELBO level eps. For every slack in
`study.slacks` and seed in `study.seeds` it trains hard and soft CFT from the same pretrained
generator, evaluates each with the evaluation predictor, and writes under `--out`:
- `none/eval.json`: the pretrained generator (the no-CFT point);
- `runs/<mode>-slack<slack>-seed<seed>/model/` and `.../eval.json`: one per run;
- `study.json`: per run and per (mode, slack) averaged over seeds, the mean amplification with its
  standard error (image-level and seed-to-seed, `metrics.combine_stderr`), effectiveness, ground truth,
  and whether the claim "soft at most half of hard where hard amplifies" holds at each slack;
- `study_curve.png`: amplification against effectiveness for hard and soft, with the no-CFT point
  and the true counterfactuals' effectiveness.
Resumable: a run whose `eval.json` exists is not redone; a trained model without one is only evaluated.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from cxrcf.errors import CxrcfError

MODES = ("hard", "soft")
AUC_ATTRS = ("sex", "race", "finding")


def run_name(mode: str, slack: float, seed: int) -> str:
    return f"{mode}-slack{slack:g}-seed{seed}"


def _load_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CxrcfError(f"{path}: unreadable evaluation JSON ({err})") from None


def _num(v) -> float:
    return float(v) if isinstance(v, (int, float)) else float("nan")


def summarise_eval(ev: dict) -> dict:
    """The few numbers of one evaluation the study compares."""
    eff = ev.get("effectiveness", {})
    gt = ev.get("ground_truth") or {}
    return {
        "amplification": _num(ev["amplification"]["mean"]),
        "stderr": _num(ev["amplification"]["stderr"]),
        "amplification_worst": _num(ev["amplification"]["worst"]),
        "pairs": {k: _num(v["mean"]) for k, v in ev["amplification"]["pairs"].items()},
        "drift": _num(ev["drift"]["mean"]),
        "effectiveness": _num(ev.get("effectiveness_mean_auc")),
        "auc": {k: _num(eff.get(k, {}).get("auc")) for k in AUC_ATTRS},
        "age_mae": _num(eff.get("age", {}).get("mae")),
        "composition_l1": _num(ev.get("composition_l1")),
        "gt_cf_l1": _num(gt.get("cf_l1")),
        "gt_amplification": _num((gt.get("amplification") or {}).get("mean")),
        "true_effectiveness": _num(gt.get("effectiveness_mean_auc")),
    }


def aggregate(none_eval: dict, runs: list[dict]) -> dict:
    """study.json's content from the no-CFT evaluation and per-run records (mode, slack, seed, summary)."""
    import numpy as np

    from pipelines import metrics as M

    none = summarise_eval(none_eval)
    cells = {}
    for mode in MODES:
        for slack in sorted({r["slack"] for r in runs if r["mode"] == mode}):
            rs = [r["summary"] for r in runs if r["mode"] == mode and r["slack"] == slack]
            amp, se = M.combine_stderr([r["amplification"] for r in rs], [r["stderr"] for r in rs])
            eff, eff_se = M.mean_stderr([r["effectiveness"] for r in rs])
            cells[(mode, slack)] = {
                "mode": mode, "slack": slack, "seeds": [r["seed"] for r in runs
                                                        if r["mode"] == mode and r["slack"] == slack],
                "amplification": amp, "stderr": se, "effectiveness": eff, "effectiveness_stderr": eff_se,
                "auc": {k: float(np.nanmean([r["auc"][k] for r in rs])) for k in AUC_ATTRS},
                "age_mae": float(np.nanmean([r["age_mae"] for r in rs])),
                "drift": float(np.nanmean([r["drift"] for r in rs])),
                "gt_cf_l1": float(np.nanmean([r["gt_cf_l1"] for r in rs])),
                "gt_amplification": float(np.nanmean([r["gt_amplification"] for r in rs])),
            }
    claims = {}
    for slack in sorted({s for _, s in cells}):
        hard, soft = cells.get(("hard", slack)), cells.get(("soft", slack))
        if hard and soft:
            claims[f"{slack:g}"] = M.soft_vs_hard(
                (none["amplification"], none["stderr"]), (hard["amplification"], hard["stderr"]),
                (soft["amplification"], soft["stderr"]), hard["auc"], soft["auc"])
    return {
        "none": none,
        "true_effectiveness": none["true_effectiveness"],
        "runs": runs,
        "curve": list(cells.values()),
        "claims": claims,
    }


def _clean(obj):
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_outputs(out: Path, study: dict) -> dict:
    from cxrcf.fileio import write_json
    from pipelines import figures as FIG

    study = _clean(study)
    write_json(out / "study.json", study)
    none = study["none"]
    FIG.study_curve(
        [p for p in study["curve"] if p["effectiveness"] is not None and p["amplification"] is not None],
        out / "study_curve.png",
        none_point=none if none.get("effectiveness") is not None else None,
        true_effectiveness=study.get("true_effectiveness"))
    return study


def run_study(params, data_root, generator_dir, guidance_dir, scm_dir, predictor_dir, out) -> dict:
    """Train (or reuse) and evaluate every run of the sweep; write study.json and the curve."""
    from pipelines.evaluate import evaluate_generator

    out = Path(out)
    slacks, seeds = params.study.slacks, params.study.seeds
    todo = [(m, s, seed) for s in slacks for m in MODES for seed in seeds]
    print(f"[study] {len(todo)} CFT runs ({', '.join(MODES)} x slacks {list(slacks)} x seeds {list(seeds)}) "
          f"-> {out}", flush=True)
    t0 = time.perf_counter()
    none_json = out / "none" / "eval.json"
    if not none_json.is_file():
        evaluate_generator(params, data_root, generator_dir, scm_dir, predictor_dir, "none", none_json)
    runs = []
    for i, (mode, slack, seed) in enumerate(todo, 1):
        name = run_name(mode, slack, seed)
        run_dir = out / "runs" / name
        eval_json = run_dir / "eval.json"
        if eval_json.is_file():
            print(f"[study] {i}/{len(todo)} {name}: done before, reusing {eval_json}", flush=True)
        else:
            model_dir = run_dir / "model"
            if not (model_dir / "config.json").is_file():
                from training.cft import train_cft

                print(f"[study] {i}/{len(todo)} {name}: training CFT", flush=True)
                train_cft(params, data_root, generator_dir, guidance_dir, scm_dir, model_dir, mode,
                          slack=slack, seed=seed)
            evaluate_generator(params, data_root, model_dir, scm_dir, predictor_dir, name, eval_json)
            elapsed = time.perf_counter() - t0
            print(f"[study] {i}/{len(todo)} {name} finished; {elapsed / 60:.1f} min so far", flush=True)
        runs.append({"mode": mode, "slack": slack, "seed": seed, "name": name,
                     "summary": summarise_eval(_load_json(eval_json))})
    study = write_outputs(out, aggregate(_load_json(none_json), runs))
    for slack, claim in study["claims"].items():
        verdict = {True: "holds", False: "does NOT hold", None: "no verdict (hard does not amplify measurably)"}
        print(f"[study] slack {slack}: hard - none {_fmt(claim['hard_minus_none'], '+.3f')} (2 stderr "
              f"{_fmt(2 * claim['hard_minus_none_stderr'])}), soft/hard {_fmt(claim['soft_over_hard'], '.2f')}, "
              f"max AUC gap {_fmt(claim['max_auc_gap_points'], '.1f')} points: claim {verdict[claim['claim_holds']]}",
              flush=True)
    print(f"[study] wrote {out / 'study.json'} and {out / 'study_curve.png'} "
          f"in {(time.perf_counter() - t0) / 60:.1f} min", flush=True)
    return study


def _fmt(v, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="cxrcf study", description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", default=None, help="data root (default: params data.root)")
    parser.add_argument("--generator", required=True, help="pretrained HVAE export directory")
    parser.add_argument("--guidance", required=True, help="guidance predictor export directory")
    parser.add_argument("--scm", required=True, help="SCM export directory")
    parser.add_argument("--predictor", required=True, help="evaluation predictor export directory")
    parser.add_argument("--out", default="artifacts/study")
    args = parser.parse_args(argv)
    from cxrcf.config import load_params

    params = load_params(args.params)
    for flag, path in (("--generator", args.generator), ("--guidance", args.guidance), ("--scm", args.scm),
                       ("--predictor", args.predictor)):
        if not Path(path).is_dir():
            raise CxrcfError(f"{flag} {path}: model directory does not exist")
    run_study(params, args.data or params.data.root, args.generator, args.guidance, args.scm, args.predictor,
              args.out)
    return 0
