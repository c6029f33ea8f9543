"""Where does sex evidence go under do(finding)? A spatial test of the study's erasure finding.

    cxrcf occlusion --generator [NAME=]DIR [--generator ...] --scm DIR --predictor DIR
                                  [--data data] [--params params.yaml] [--out artifacts/study/occlusion.json]

The study found that CFT models *lose* evidence of the patient's sex when they add or remove an
effusion (AMP(sex | do(finding)) < 0), more the further do(finding) overshoots the true
counterfactual. The explanation to test: the painted effusion is a basal opacity much larger
than the simulator's, and it covers the lower thorax where SynthCXR draws most of its sex cue
(the breast shadows, rows below the middle), so the evidence is occluded rather than edited.

For each generator (and for the simulator's true counterfactual), on the evaluation's test images:
- AMP(sex | do(finding)) of x* as a whole, and of two composites that take only one half of the
  edit: the lower half of x* over the upper half of x ("lower edit"), and the reverse ("upper edit").
  If the erasure is occlusion by the effusion, the lower edit carries it;
- the size of the edit in the lower half, mean(x* - x) (model scale [-1, 1], so brighter is
  positive: fluid is opaque), for images that gain an effusion and those that lose one;
- the per-image correlation between the lower-half edit size and the change in sex log-odds.
Writes one JSON (which `cxrcf report` shows when it lies in the study folder); prints a table.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from cxrcf.cli import add_params

SPLIT_ROW_FRACTION = 0.5  # image rows at and below this fraction of the height are the "lower" half


def composite(upper_from, lower_from, split_row: int):
    """Rows above `split_row` from `upper_from`, the rest from `lower_from` (N, C, H, W arrays or tensors)."""
    out = upper_from.clone() if hasattr(upper_from, "clone") else upper_from.copy()
    out[..., split_row:, :] = lower_from[..., split_row:, :]
    return out


def sex_shift(p_before: np.ndarray, p_after: np.ndarray, sex: np.ndarray) -> np.ndarray:
    """Per-image change of the log-odds of the factual sex (positive: more evidence, i.e. amplified)."""
    from pipelines.metrics import log_odds_factual

    return log_odds_factual(p_after, sex) - log_odds_factual(p_before, sex)


def _summary(values: np.ndarray) -> dict:
    from pipelines.metrics import mean_stderr

    mean, se = mean_stderr(values)
    return {"mean": mean, "stderr": se, "n": int(values.size)}


def analyse(ev, x_star, label: str) -> dict:
    """The spatial breakdown for one set of do(finding) counterfactuals `x_star` of the evaluator's images."""
    res = ev.resolution
    split = round(res * SPLIT_ROW_FRACTION)
    sex = ev.parents_np["sex"]
    gains = ev.parents_np["finding"] == 0  # do(finding) flips: these images gain an effusion
    before = ev.real_probs["sex"]
    variants = {"whole": x_star, "lower_edit": composite(ev.x, x_star, split),
                "upper_edit": composite(x_star, ev.x, split)}
    out = {"label": label, "split_row": split, "resolution": res}
    probs = {name: ev._predict(images) for name, images in variants.items()}
    shifts = {name: sex_shift(before, p["sex"], sex) for name, p in probs.items()}
    for name, shift in shifts.items():
        out[name] = {"all": _summary(shift), "gain": _summary(shift[gains]), "loss": _summary(shift[~gains])}
    edit = (x_star - ev.x)[..., split:, :].mean(dim=(1, 2, 3)).numpy()
    out["lower_edit_size"] = {"gain": _summary(edit[gains]), "loss": _summary(edit[~gains])}
    # Bigger effusions, more lost evidence? Signed so that "more fluid" is positive in both directions.
    fluid = np.where(gains, edit, -edit)
    out["corr_fluid_vs_sex_shift"] = float(np.corrcoef(fluid, shifts["whole"])[0, 1])
    from pipelines import metrics as M

    out["finding_auc"] = M.roc_auc(probs["whole"]["finding"], 1 - ev.parents_np["finding"])
    return out


def _model_counterfactuals(ev, hvae):
    """x* of every test image under do(finding) from `hvae`, at the evaluation's t_u and seed."""
    import torch

    from cxrcf.attributes import context
    from cxrcf.counterfactual import counterfactual

    star = ev.parents_star["finding"]
    gen = torch.Generator().manual_seed(ev.cfg.seed)
    chunks = []
    with torch.no_grad():
        for s in ev._batches():
            ctx = context({a: v[s] for a, v in ev.parents.items()})
            ctx_star = context({a: v[s] for a, v in star.items()})
            chunks.append(counterfactual(hvae, ev.x[s], ctx, ctx_star, t_u=ev.cfg.t_u, generator=gen).float())
    return torch.cat(chunks)


def table_rows(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the occlusion table, for the console and for `cxrcf report`."""
    header = ["counterfactual", "AUC finding", "AMP sex|do(finding)", "lower edit only", "upper edit only",
              "gaining / losing an effusion", "lower-half edit (gain / loss)", "corr(fluid, shift)"]
    out = []
    for r in rows:
        w, size = r["whole"], r["lower_edit_size"]
        out.append([r["label"], f"{r['finding_auc']:.2f}", f"{w['all']['mean']:+.3f} ± {w['all']['stderr']:.3f}",
                    f"{r['lower_edit']['all']['mean']:+.3f}", f"{r['upper_edit']['all']['mean']:+.3f}",
                    f"{w['gain']['mean']:+.3f} / {w['loss']['mean']:+.3f}",
                    f"{size['gain']['mean']:+.3f} / {size['loss']['mean']:+.3f}",
                    f"{r['corr_fluid_vs_sex_shift']:+.2f}"])
    return header, out


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="cxrcf occlusion", description=__doc__.splitlines()[0])
    p.add_argument("--generator", action="append", required=True,
                   help="HVAE export directory, optionally named: hard=artifacts/models/cft_hard (repeatable)")
    p.add_argument("--scm", required=True)
    p.add_argument("--predictor", required=True, help="evaluation predictor export directory")
    p.add_argument("--data", default=None)
    add_params(p)
    p.add_argument("--out", default="artifacts/study/occlusion.json")
    args = p.parse_args(argv)

    import torch

    from cxrcf.config import load_params
    from cxrcf.errors import CxrcfError
    from cxrcf.export import require_model_dir
    from cxrcf.fileio import write_json
    from pipelines.evaluate import _clean, _Evaluator, load_components

    params = load_params(args.params)
    data_root = Path(args.data or params.data.root)
    named = [g.split("=", 1) if "=" in g else [g, g] for g in args.generator]
    for flag, path in [("--generator", d) for _, d in named] + [("--scm", args.scm), ("--predictor", args.predictor)]:
        require_model_dir(path, flag)
    hvae, scm, predictor, _, _ = load_components(named[0][1], args.scm, args.predictor)
    ev = _Evaluator(params, data_root, hvae, scm, predictor, torch.device("cpu"))
    if ev.truth is None:
        raise CxrcfError(f"{data_root}: no exogenous.csv, so no true counterfactuals to compare with")
    rows = [analyse(ev, ev.truth["finding"], "true counterfactual")]
    for name, directory in named:
        model = load_components(directory, args.scm, args.predictor)[0]
        rows.append(analyse(ev, _model_counterfactuals(ev, model), name))
        print(f"[occlusion] {name} ({directory}): done", flush=True)
    write_json(args.out, _clean({"split_row_fraction": SPLIT_ROW_FRACTION, "images": ev.n, "rows": rows}))
    header, table = table_rows(rows)
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in table:
        print("| " + " | ".join(r) + " |")
    print(f"[occlusion] wrote {args.out}")
    return 0

