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
- `reference.npz`, `none/endpoint.npz`, `runs/<name>/endpoint.npz`: per-image log-odds for the
  primary endpoint (pipelines/endpoint.py); `verdict.json`: the pre-registered verdict
  (pipelines/verdict.py) with its preconditions, the ratio and its 95% interval; `metrics.json`: flat
  headline numbers for `dvc metrics show`; `endpoint_curve.png`: the primary endpoint against do(sex)
  AUC for none, hard, soft and the truth.
Resumable: a run whose `eval.json` exists is not redone; a trained model without one is only evaluated;
per-image measurements already saved are reused.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from cxrcf.cli import add_params
from cxrcf.config import MODES
from cxrcf.errors import CxrcfError

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


# ------------------------------------------------------------------ primary endpoint and verdict
def _cell_label(mode: str, slack: float) -> str:
    return f"{mode}-slack{slack:g}"


def endpoint_analysis(ref: dict, none_meas: dict, cells: dict, generator_check: bool | None,
                      regressors_agree: bool | None = None) -> dict:
    """The primary endpoint across the sweep and the pre-registered verdict (pipelines/verdict.py).

    `ref`: `endpoint.reference` arrays; `none_meas`: `endpoint.measure` of the pretrained generator;
    `cells[(mode, slack)]`: one `endpoint.measure` per CFT seed. Returns the full table (pair x
    direction x stratum x generator, seed-averaged), the effectiveness curve (do(k) AUC against A
    for the primary pair), the matched hard/soft points, the verdict and the secondary pair's numbers.
    """
    import numpy as np

    from pipelines import endpoint as E
    from pipelines import verdict as V

    j, k = V.PRIMARY_PAIR
    primary = E.pair_key(j, k)
    stratum_name = V.PRIMARY_STRATUM
    rows = []
    gens = {"none": [none_meas], **{_cell_label(m, s): ms for (m, s), ms in cells.items()}}
    for label, ms in gens.items():
        tables = [E.table(ref, m) for m in ms]
        for pair in tables[0]:
            for st in E.STRATA:
                dirs = sorted(tables[0][pair][st]["directions"])
                row = {"generator": label, "pair": pair, "stratum": st, "seeds": len(ms),
                       "A": float(np.mean([t[pair][st]["A"] for t in tables])),
                       "stderr": float(np.mean([t[pair][st]["stderr"] for t in tables])),
                       "n": tables[0][pair][st]["n"],
                       "directions": {d: float(np.mean([t[pair][st]["directions"][d]["mean"] for t in tables]))
                                      for d in dirs},
                       "pooled_amp_vs_x": float(np.mean([t[pair]["pooled_amp_vs_x"] for t in tables])),
                       "truth_shift_vs_x": tables[0][pair]["truth_shift_vs_x"]}
                rows.append(row)

    def mask_of(jj):
        return ref[f"stratum/{jj}"] == stratum_name

    def diff(ms, jj, kk, other=None):
        key = E.pair_key(jj, kk)
        return V.paired_difference([m[f"lo_star/{key}"] for m in ms], none_meas[f"lo_star/{key}"],
                                   ref[f"direction/{kk}"], mask_of(jj),
                                   [m[f"lo_star/{key}"] for m in other] if other else None)

    true_auc = float(ref[f"true_auc/{k}"])
    curve = []
    for (mode, slack), ms in cells.items():
        d = diff(ms, j, k)
        curve.append({"mode": mode, "slack": slack, "label": _cell_label(mode, slack), "seeds": len(ms),
                      "auc": float(np.mean([float(m[f"auc/{k}"]) for m in ms])),
                      "A_minus_none": d["mean"], "stderr": d["stderr"]})
    none_point = {"auc": float(none_meas[f"auc/{k}"]), "A": E.table(ref, none_meas)[primary][stratum_name]["A"]}
    matched = V.match_points([c for c in curve if c["mode"] == "hard"], [c for c in curve if c["mode"] == "soft"],
                             true_auc)
    if matched is not None:
        by_label = {_cell_label(m, s): ms for (m, s), ms in cells.items()}
        hard_ms, soft_ms = by_label[matched["hard"]], by_label[matched["soft"]]
    else:  # no matched pair: the verdict is "no verdict"; report the strongest common slack anyway
        common = sorted({s for m, s in cells if m == "hard"} & {s for m, s in cells if m == "soft"})
        hard_ms = cells[("hard", common[-1])] if common else []
        soft_ms = cells[("soft", common[-1])] if common else []
    empty = {"mean": float("nan"), "stderr": float("nan"), "seeds": 0}
    h = diff(hard_ms, j, k) if hard_ms else empty
    so = diff(soft_ms, j, k, other=hard_ms) if soft_ms else empty
    evidence = _evidence_analysis(ref, none_meas, gens, hard_ms, soft_ms, j, k, mask_of(j))
    if regressors_agree is None and evidence is not None:
        regressors_agree = evidence["agree"]
    decision = V.decide(generator_check, h, so, matched, regressors_agree)
    j2, k2 = V.SECONDARY_PAIR
    h2 = diff(hard_ms, j2, k2) if hard_ms else empty
    s2 = diff(soft_ms, j2, k2, other=hard_ms) if soft_ms else empty
    ratio2 = s2["mean"] / h2["mean"] if h2["mean"] not in (0.0,) and np.isfinite(h2["mean"]) else float("nan")
    secondary = {"pair": E.pair_key(j2, k2), "stratum": stratum_name, "hard_minus_none": h2, "soft_minus_none": s2,
                 "ratio": ratio2, "ratio_ci95": list(V.fieller_interval(
                     s2["mean"], h2["mean"], s2["stderr"] ** 2, h2["stderr"] ** 2, s2.get("cov_with_other", 0.0)))
                 if np.isfinite(h2["mean"]) and np.isfinite(s2["mean"]) else [float("nan")] * 2}
    verdict = {"pair": primary, "stratum": stratum_name, "true_auc": true_auc, "matched": matched,
               **decision, "hard_minus_none_detail": h, "soft_minus_none_detail": so}
    return {"table": rows, "curve": curve, "none_point": none_point, "true_auc": true_auc,
            "verdict": verdict, "secondary": secondary, "evidence": evidence}


def _evidence_analysis(ref, none_meas, gens, hard_ms, soft_ms, j, k, mask) -> dict | None:
    """The primary pair in the simulator's units, from the evidence regressor's readings (None
    without one): each generator against the truth, and hard / soft against none, paired per image.
    The regressors agree when they were validated on true counterfactuals and soft is not below
    none by more than 2 SE (soft did not erase the evidence)."""
    import numpy as np

    from pipelines import endpoint as E
    from pipelines import verdict as V

    t = E.EVIDENCE_OF_J[j]
    key = f"ev_star/{k}/{t}"
    if f"ev_true/{k}/{t}" not in ref or key not in none_meas or not all(
            key in m for ms in gens.values() for m in ms):
        return None
    d = ref[f"direction/{k}"]
    vs_truth = {label: V.endpoint(np.mean([m[key] for m in ms], axis=0), ref[f"ev_true/{k}/{t}"], d, mask)["A"]
                for label, ms in gens.items()}
    hard = V.paired_difference([m[key] for m in hard_ms], none_meas[key], d, mask) if hard_ms else None
    soft = V.paired_difference([m[key] for m in soft_ms], none_meas[key], d, mask) if soft_ms else None
    validated = int(ref.get("regressor_passed", -1)) == 1
    agree = bool(validated and soft is not None and soft["mean"] >= -2 * soft["stderr"])
    return {"evidence": t, "units": _units(t), "vs_truth": vs_truth, "hard_minus_none": hard,
            "soft_minus_none": soft, "validated_on_true_counterfactuals": validated, "agree": agree}


def _units(t: str) -> str:
    from cxrcf.synth import EVIDENCE_UNITS

    return EVIDENCE_UNITS[t]


VERDICT_CODES = {"no verdict": 0, "inconclusive": 1, "refuted": 2, "reproduced": 3}


def flat_metrics(study: dict) -> dict:
    """Headline numbers, one level deep, for `dvc metrics show/diff`."""
    out = {"none_amplification_pooled": _get_num(study, "none", "amplification")}
    an = study.get("endpoint")
    if an:
        v = an["verdict"]
        out.update({
            "verdict_code": VERDICT_CODES.get(v["verdict"], 0),
            "primary_hard_minus_none": v["hard_minus_none"], "primary_hard_minus_none_se": v["hard_minus_none_stderr"],
            "primary_soft_minus_none": v["soft_minus_none"], "primary_soft_minus_none_se": v["soft_minus_none_stderr"],
            "primary_ratio": v["ratio"], "primary_ratio_lo": v["ratio_ci95"][0], "primary_ratio_hi": v["ratio_ci95"][1],
            "primary_true_auc": an["true_auc"], "primary_none_A": an["none_point"]["A"],
            "secondary_ratio": an["secondary"]["ratio"], "seeds": v["seeds"],
        })
    return {k: (val if isinstance(val, (int, float)) and math.isfinite(val) else None) for k, val in out.items()}


def _get_num(d: dict, *keys):
    for key in keys:
        d = d.get(key) if isinstance(d, dict) else None
    return d


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
    if study.get("endpoint"):
        an = study["endpoint"]
        write_json(out / "verdict.json", {**an["verdict"], "secondary": an["secondary"],
                                          "first_look": an["verdict"]["seeds"] < 3})
        write_json(out / "metrics.json", flat_metrics(study))
        FIG.endpoint_curve(an["curve"], an["none_point"], an["true_auc"], out / "endpoint_curve.png",
                           title=f"{an['verdict']['pair']}, {an['verdict']['stratum']} images")
    none = study["none"]
    FIG.study_curve(
        [p for p in study["curve"] if p["effectiveness"] is not None and p["amplification"] is not None],
        out / "study_curve.png",
        none_point=none if none.get("effectiveness") is not None else None,
        true_effectiveness=study.get("true_effectiveness"))
    return study


def run_study(params, data_root, generator_dir, guidance_dir, scm_dir, predictor_dir, out,
              generator_check: bool | None = None, log_mlflow: bool = True, regressor_dir=None) -> dict:
    """Train (or reuse) and evaluate every run of the sweep; write study.json, verdict.json,
    metrics.json and the curves. Every finished piece (a model, its eval.json, its endpoint.npz, the
    reference) is kept, so an interrupted study resumes where it stopped."""
    from pipelines import endpoint as E
    from pipelines.evaluate import evaluate_generator

    out = Path(out)
    slacks, seeds = params.study.slacks, params.study.seeds
    modes = params.cft.modes
    todo = [(m, s, seed) for s in slacks for m in modes for seed in seeds]
    print(f"[study] {len(todo)} CFT runs ({', '.join(modes)} x slacks {list(slacks)} x seeds {list(seeds)}) "
          f"-> {out}", flush=True)
    t0 = time.perf_counter()
    none_json = out / "none" / "eval.json"
    if not none_json.is_file():
        evaluate_generator(params, data_root, generator_dir, scm_dir, predictor_dir, "none", none_json)
    ref = E.reference(params, data_root, scm_dir, predictor_dir, generator_dir, out / "reference.npz",
                      regressor_dir)
    none_meas = E.measure(params, ref, data_root, generator_dir, predictor_dir, out / "none" / "endpoint.npz",
                          regressor_dir)
    runs, cells = [], {}
    for i, (mode, slack, seed) in enumerate(todo, 1):
        name = run_name(mode, slack, seed)
        run_dir = out / "runs" / name
        eval_json = run_dir / "eval.json"
        model_dir = run_dir / "model"
        if eval_json.is_file():
            print(f"[study] {i}/{len(todo)} {name}: done before, reusing {eval_json}", flush=True)
        else:
            if not (model_dir / "config.json").is_file():
                from training.cft import train_cft

                print(f"[study] {i}/{len(todo)} {name}: training CFT", flush=True)
                train_cft(params, data_root, generator_dir, guidance_dir, scm_dir, model_dir, mode,
                          slack=slack, seed=seed)
            evaluate_generator(params, data_root, model_dir, scm_dir, predictor_dir, name, eval_json)
            elapsed = time.perf_counter() - t0
            print(f"[study] {i}/{len(todo)} {name} finished; {elapsed / 60:.1f} min so far", flush=True)
        cells.setdefault((mode, slack), []).append(
            E.measure(params, ref, data_root, model_dir, predictor_dir, run_dir / "endpoint.npz", regressor_dir))
        runs.append({"mode": mode, "slack": slack, "seed": seed, "name": name,
                     "summary": summarise_eval(_load_json(eval_json))})
    none_eval = _load_json(none_json)
    if generator_check is None:  # the pretrained generator's own check, as `cxrcf evaluate` recorded it
        found = (none_eval.get("generator_check") or {}).get("passed")
        generator_check = found if isinstance(found, bool) else None
    study = aggregate(none_eval, runs)
    study["endpoint"] = endpoint_analysis(ref, none_meas, cells, generator_check)
    study = write_outputs(out, study)
    verdict = study["endpoint"]["verdict"]
    print(f"[study] primary {verdict['pair']} ({verdict['stratum']}): hard - none "
          f"{_fmt(verdict['hard_minus_none'], '+.3f')} (2 SE {_fmt(_twice(verdict['hard_minus_none_stderr']))}), "
          f"soft - none {_fmt(verdict['soft_minus_none'], '+.3f')}, ratio {_fmt(verdict['ratio'], '.2f')} "
          f"[{_fmt(verdict['ratio_ci95'][0], '.2f')}, {_fmt(verdict['ratio_ci95'][1], '.2f')}]: "
          f"{verdict['verdict'].upper()} ({verdict['reason']})", flush=True)
    if log_mlflow:
        _log(params, out, study)
    print(f"[study] wrote {out / 'study.json'}, {out / 'verdict.json'}, {out / 'metrics.json'} and the curves "
          f"in {(time.perf_counter() - t0) / 60:.1f} min", flush=True)
    return study


def _twice(v):
    return None if v is None else 2 * v


def _log(params, out: Path, study: dict) -> str:
    """A "study" run in MLflow: the flat metrics, the verdict word as a tag, the JSONs and figures."""
    from store import tracking

    run_id = tracking.start_run(params, phase="study", run_name="study")
    ok = False
    try:
        rows = [(f"study/{k}", float(v), 0) for k, v in flat_metrics(study).items() if v is not None]
        tracking.log_metrics(run_id, rows)
        tracking.client().set_tag(run_id, "verdict", study["endpoint"]["verdict"]["verdict"])
        for name in ("verdict.json", "metrics.json", "study.json", "endpoint_curve.png", "study_curve.png"):
            if (out / name).is_file():
                tracking.log_artifacts(run_id, out / name, "study")
        ok = True
    finally:
        tracking.end_run(run_id, ok)
    print(f"[study] logged to MLflow run {run_id} ({tracking.tracking_uri()})", flush=True)
    return run_id


def _fmt(v, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="cxrcf study", description=__doc__.split("\n\n")[0])
    add_params(parser)
    parser.add_argument("--data", default=None, help="data root (default: params data.root)")
    parser.add_argument("--generator", required=True, help="pretrained HVAE export directory")
    parser.add_argument("--guidance", required=True, help="guidance predictor export directory")
    parser.add_argument("--scm", required=True, help="SCM export directory")
    parser.add_argument("--predictor", required=True, help="evaluation predictor export directory")
    parser.add_argument("--out", default="artifacts/study")
    parser.add_argument("--generator-check", default=None,
                        help="JSON with \"passed\": true/false overriding the generator check that "
                             "`cxrcf evaluate` recorded in none/eval.json (neither: 'no verdict')")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log the study to MLflow")
    parser.add_argument("--evidence-regressor", default=None,
                        help="evidence regressor directory (python -m training.evidence); without it the "
                             "verdict cannot be 'reproduced'")
    args = parser.parse_args(argv)
    from cxrcf.config import load_params
    from cxrcf.export import require_model_dir

    params = load_params(args.params)
    for flag, path in (("--generator", args.generator), ("--guidance", args.guidance), ("--scm", args.scm),
                       ("--predictor", args.predictor), ("--evidence-regressor", args.evidence_regressor)):
        if path is None:
            continue
        require_model_dir(path, flag)
    check = None
    if args.generator_check:
        from cxrcf.fileio import read_json

        found = read_json(args.generator_check)
        if not isinstance(found, dict) or not isinstance(found.get("passed"), bool):
            raise CxrcfError(f"--generator-check {args.generator_check}: expected a JSON object with a boolean "
                             "\"passed\"")
        check = found["passed"]
    run_study(params, args.data or params.data.root, args.generator, args.guidance, args.scm, args.predictor,
              args.out, generator_check=check, log_mlflow=not args.no_mlflow, regressor_dir=args.evidence_regressor)
    return 0
