"""`cxrcf report`: one markdown + HTML report comparing none / hard / soft CFT.

Reads `<eval-dir>/{none,hard,soft}.json` (any present; at least one), the figures under
`<eval-dir>/figures/<mode>/`, and the strength sweep's `study.json` when `--study` points at one.
Writes `<out>/report.md` (figures as relative links), `<out>/report.html` (self-contained, figures
embedded as base64), `<out>/amplification_bars.png` and `<out>/figures/...`, replacing `<out>` as a
whole, then logs the folder and the headline numbers to a "report" run in the MLflow experiment.
"""

from __future__ import annotations

import argparse
import base64
import html
import math
import shutil
import time
from pathlib import Path

from cxrcf.cli import add_params
from cxrcf.config import MODEL_MODES as MODES
from cxrcf.errors import CxrcfError
from cxrcf.fileio import read_json

ATTRS = ("sex", "race", "finding", "age")


# ------------------------------------------------------------------------------------ helpers
def _get(d, dotted: str):
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def _f(v, digits: int = 3, signed: bool = False) -> str:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        return "-"
    return f"{v:+.{digits}f}" if signed else f"{v:.{digits}f}"


def _pm(block: dict | None) -> str:
    if not block:
        return "-"
    return f"{_f(block.get('mean'), signed=True)} ± {_f(block.get('stderr'))}"


def _pairs(evals: dict) -> list[str]:
    """Pair keys in the evaluation's order (by intervention), any others after them."""
    from pipelines.evaluate import amplification_pairs, pair_key

    present = list(next(iter(evals.values()))["amplification"]["pairs"])
    ordered = [pair_key(j, k) for j, k in amplification_pairs() if pair_key(j, k) in present]
    return ordered + [p for p in present if p not in ordered]


def load_evals(eval_dir: Path) -> dict[str, dict]:
    evals = {}
    for mode in MODES:
        path = eval_dir / f"{mode}.json"
        if path.is_file():
            evals[mode] = read_json(path)
            if "amplification" not in evals[mode] or "effectiveness" not in evals[mode]:
                raise CxrcfError(f"{path}: not an evaluation result (no amplification/effectiveness keys)")
    if not evals:
        raise CxrcfError(f"{eval_dir}: no none.json, hard.json or soft.json; run `cxrcf evaluate` first")
    return evals


# ------------------------------------------------------------------------------ the content
def _effectiveness_table(evals: dict) -> tuple[list[str], list[list[str]]]:
    first = next(iter(evals.values()))
    has_truth = any("ground_truth" in e for e in evals.values())
    header = ["metric", "real images"] + [f"{m} (Δ real)" for m in evals] + (["true cf"] if has_truth else [])
    rows = []
    for k, metric, label in (("sex", "auc", "sex AUC"), ("sex", "acc", "sex accuracy"),
                             ("race", "auc", "race macro AUC"), ("race", "acc", "race accuracy"),
                             ("finding", "auc", "finding AUC"), ("finding", "acc", "finding accuracy"),
                             ("age", "mae", "age MAE (years)")):
        row = [f"do({k}): {label}", _f(_get(first, f"effectiveness.{k}.real.{metric}"))]
        for e in evals.values():
            row.append(f"{_f(_get(e, f'effectiveness.{k}.{metric}'))} "
                       f"({_f(_get(e, f'effectiveness.{k}.delta_real.{metric}'), signed=True)})")
        if has_truth:
            truth = next(e for e in evals.values() if "ground_truth" in e)
            row.append(_f(_get(truth, f"ground_truth.effectiveness.{k}.{metric}")))
        rows.append(row)
    return header, rows


def _amplification_table(evals: dict) -> tuple[list[str], list[list[str]]]:
    pairs = _pairs(evals)
    ratio = "hard" in evals and "soft" in evals
    header = ["AMP(j | do k)"] + [f"{m}" for m in evals] + (["soft / hard"] if ratio else [])

    def ratio_of(h, s):
        return _f(s / h, 2) if isinstance(h, (int, float)) and isinstance(s, (int, float)) and h > 0 else "-"

    rows = []
    for key in pairs:
        row = [key] + [_pm(_get(e, "amplification.pairs")[key]) for e in evals.values()]
        if ratio:
            row.append(ratio_of(evals["hard"]["amplification"]["pairs"][key]["mean"],
                                evals["soft"]["amplification"]["pairs"][key]["mean"]))
        rows.append(row)
    row = ["**mean over pairs**"] + [_pm(e["amplification"]) for e in evals.values()]
    if ratio:
        row.append(ratio_of(evals["hard"]["amplification"]["mean"], evals["soft"]["amplification"]["mean"]))
    rows.append(row)
    rows.append(["worst pair"] + [f"{_f(e['amplification']['worst'], signed=True)} ({e['amplification'].get('worst_pair')})"
                                  for e in evals.values()] + ([""] if ratio else []))
    rows.append(["drift (mean abs. change of p_y)"] + [_f(_get(e, "drift.mean")) for e in evals.values()]
                + ([ratio_of(_get(evals["hard"], "drift.mean"), _get(evals["soft"], "drift.mean"))] if ratio else []))
    return header, rows


def _subgroup_table(evals: dict) -> tuple[list[str], list[list[str]]]:
    first = next(iter(evals.values()))
    header = ["pair", "subgroup of j", "n"] + list(evals)
    rows = []
    for key in _pairs(evals):
        block = first["amplification"]["pairs"][key]
        for group, g in block["subgroups"].items():
            rows.append([key, group, str(g.get("n", "-"))]
                        + [_pm(_get(e, "amplification.pairs")[key]["subgroups"].get(group)) for e in evals.values()])
    return header, rows


def _faithfulness_table(evals: dict) -> tuple[list[str], list[list[str]]]:
    header = ["", *evals]
    items = [("composition L1 (null intervention)", "composition_l1", False),
             ("reversibility L1", "reversibility_l1", False),
             ("ground truth: L1(x*, true x*)", "ground_truth.cf_l1", False),
             ("L1 ratio to doing nothing, do(sex)", "ground_truth.l1_ratio_per_intervention.sex", False),
             ("L1 ratio, do(race)", "ground_truth.l1_ratio_per_intervention.race", False),
             ("L1 ratio, do(finding) removing an effusion (gated)", "ground_truth.l1_ratio_by_direction.finding.1to0",
              False),
             ("L1 ratio, do(finding) adding one", "ground_truth.l1_ratio_by_direction.finding.0to1", False),
             ("same, the ideal model (draws the unseen effusion)", "ground_truth.ideal_l1_ratio.finding.0to1", False),
             ("ground truth: AMP against the true cf", "ground_truth.amplification.mean", True),
             ("ground truth: AMP of the true cf itself (x -> true x*)", "ground_truth.true_amplification.mean", True),
             ("mean AUC of the intervened attribute", "effectiveness_mean_auc", False),
             ("same, true counterfactuals", "ground_truth.effectiveness_mean_auc", False)]
    return header, [[label] + [_f(_get(e, key), signed=s) for e in evals.values()] for label, key, s in items]


def _extra_tu_table(evals: dict) -> tuple[list[str], list[list[str]]] | None:
    values = sorted({t for e in evals.values() for t in (e.get("extra_t_u") or {})}, key=float)
    if not values:
        return None
    header = ["t_u", "mode", "AMP mean", "drift", "composition L1", "mean AUC", "GT L1"]
    rows = []
    for mode, e in evals.items():
        rows.append([f"{e.get('t_u'):g}" if isinstance(e.get("t_u"), (int, float)) else "-", mode, _pm(e["amplification"]), _f(_get(e, "drift.mean")),
                     _f(e.get("composition_l1")), _f(e.get("effectiveness_mean_auc")), _f(_get(e, "ground_truth.cf_l1"))])
        for t in values:
            x = (e.get("extra_t_u") or {}).get(t)
            if x:
                rows.append([t, mode, _pm(x["amplification"]), _f(_get(x, "drift.mean")), _f(x.get("composition_l1")),
                             _f(x.get("effectiveness_mean_auc")), _f(_get(x, "ground_truth.cf_l1"))])
    return header, rows


def _auc_of(e: dict) -> dict:
    return {k: _get(e, f"effectiveness.{k}.auc") for k in ("sex", "race", "finding")}


def _claim_text(claim: dict, where: str) -> str:
    gap = _f(claim["max_auc_gap_points"], 1)
    head = (f"{where}: hard − none = {_f(claim['hard_minus_none'], signed=True)} log-odds "
            f"(2 × stderr = {_f(2 * claim['hard_minus_none_stderr'])}); ")
    if not claim["hard_amplifies"]:
        return head + "hard CFT does **not** amplify measurably here, so the soft-vs-hard claim has no verdict."
    verdict = "**holds**" if claim["claim_holds"] else "**does not hold**"
    return head + (f"soft / hard = {_f(claim['soft_over_hard'], 2)}, largest AUC gap {gap} points: "
                   f"the claim (soft ≤ 0.5 × hard, AUC within 5 points) {verdict}.")


def build(params, evals: dict, eval_dir: Path, study: dict | None, study_dir: Path | None) -> tuple[list, dict]:
    """(elements, headline metrics). Elements: ("h1"|"h2"|"p", text), ("table", header, rows),
    ("img", source path, relative target, caption)."""
    from pipelines import metrics as M

    first = next(iter(evals.values()))
    el: list = [("h1", "cxrcf: counterfactual fine-tuning without attribute amplification")]
    el.append(("p", (f"Preset `{params.preset}`, {first.get('n_images')} test images, t_u = {first.get('t_u')}, "
                     f"CFT slack {params.cft.slack:g} nats/pixel, evaluation seed {first.get('seed')}. "
                     f"Generators compared: {', '.join(evals)}; the same data and the same independent "
                     "evaluation predictor score all of them. AMP(j | do k) is the mean change of the "
                     "predictor's log-odds of j's factual class between x and x* (0 is ideal, > 0 amplified).")))
    headline: dict = {}
    for mode, e in evals.items():
        headline[f"{mode}_amplification_mean"] = _get(e, "amplification.mean")
        headline[f"{mode}_effectiveness_mean_auc"] = e.get("effectiveness_mean_auc")
    el.append(("h2", "Verdict at the pipeline's strength"))
    if all(m in evals for m in MODES):
        amp = {m: (evals[m]["amplification"]["mean"], evals[m]["amplification"]["stderr"]) for m in MODES}
        if all(isinstance(v[0], (int, float)) for v in amp.values()):
            claim = M.soft_vs_hard(amp["none"], amp["hard"], amp["soft"], _auc_of(evals["hard"]),
                                   _auc_of(evals["soft"]))
            headline["soft_over_hard"] = claim["soft_over_hard"]
            el.append(("p", _claim_text(claim, f"slack {params.cft.slack:g}")))
        else:
            el.append(("p", "Amplification is undefined for some generator (empty subgroups); no verdict."))
    else:
        el.append(("p", f"Only {', '.join(evals)} evaluated; the verdict needs none, hard and soft."))

    el.append(("h2", "Effectiveness"))
    el.append(("p", ("The evaluation predictor on x* against the intended value of the intervened attribute; "
                     "in brackets the difference to the same predictor on real test images; the last column "
                     "scores the simulator's TRUE counterfactuals (CFT beyond it overshoots).")))
    el.append(("table", *_effectiveness_table(evals)))
    el.append(("h2", "Amplification"))
    el.append(("p", "Mean ± standard error over test images, per (non-intervened j, intervention k)."))
    el.append(("table", *_amplification_table(evals)))
    el.append(("h2", "Amplification per subgroup of j"))
    el.append(("table", *_subgroup_table(evals)))
    el.append(("h2", "Composition, reversibility and ground truth"))
    el.append(("p", "L1 is the mean absolute pixel difference in the model's [-1, 1] scale."))
    el.append(("table", *_faithfulness_table(evals)))
    extra = _extra_tu_table(evals)
    if extra:
        el.append(("h2", "Other values of t_u"))
        el.append(("table", *extra))

    el.append(("h2", "Figures"))
    el.append(("img", None, "amplification_bars.png", "Mean AMP(j | do k) per generator, ± stderr."))
    for mode in evals:
        for png in sorted((eval_dir / "figures" / mode).glob("*.png")):
            el.append(("img", png, f"figures/{mode}/{png.name}", f"{mode}: {png.stem.replace('_', ' ')}"))

    if study:
        el.append(("h2", "Strength sweep (hard vs soft across slack and seeds)"))
        el.append(("p", (f"No CFT: AMP {_f(_get(study, 'none.amplification'), signed=True)} ± "
                         f"{_f(_get(study, 'none.stderr'))}, mean AUC {_f(_get(study, 'none.effectiveness'))}; "
                         f"true counterfactuals' mean AUC {_f(study.get('true_effectiveness'))}.")))
        header = ["mode", "slack", "seeds", "AMP mean ± stderr", "mean AUC", "age MAE", "GT L1", "GT AMP"]
        rows = [[c["mode"], _f(c["slack"], 3), str(len(c.get("seeds", []))),
                 f"{_f(c['amplification'], signed=True)} ± {_f(c['stderr'])}", _f(c["effectiveness"]),
                 _f(c.get("age_mae"), 1), _f(c.get("gt_cf_l1")), _f(c.get("gt_amplification"), signed=True)]
                for c in study.get("curve", [])]
        el.append(("table", header, rows))
        for slack, claim in (study.get("claims") or {}).items():
            el.append(("p", _claim_text(claim, f"slack {slack}")))
        if study_dir and (study_dir / "study_curve.png").is_file():
            el.append(("img", study_dir / "study_curve.png", "figures/study_curve.png",
                       "Amplification against effectiveness across CFT strengths."))
    if study and study.get("endpoint"):
        el.extend(_endpoint_section(study["endpoint"], study_dir))
        from pipelines.study import flat_metrics

        headline.update({f"study_{k}": v for k, v in flat_metrics(study).items()})
    occlusion = study_dir / "occlusion.json" if study_dir else None
    if occlusion and occlusion.is_file():
        from cxrcf.fileio import read_json
        from pipelines.occlusion import table_rows

        found = read_json(occlusion)
        el.append(("h2", "Where sex evidence goes under do(finding) (pipelines/occlusion.py)"))
        el.append(("p", ("AMP(sex | do(finding)) of x*, and of composites that keep only the lower or only the "
                         f"upper part of the edit (split at row {found['rows'][0]['split_row']} of "
                         f"{found['rows'][0]['resolution']}); then separately for images that gain an effusion "
                         "and images that lose one, the mean brightness change of the lower half "
                         "(fluid is opaque: positive when one is added), and the per-image correlation of "
                         "that change with the sex shift. Occlusion of the sex cue by the painted effusion "
                         "would show as a lower-half effect, negative for gains and positive for losses; a "
                         "correlation near 0 says the loss does not grow with how much brighter that half gets.")))
        el.append(("table", *table_rows(found["rows"])))
    return el, headline


# ------------------------------------------------------------------------------- rendering
def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|")


def to_markdown(elements: list) -> str:
    out = []
    for e in elements:
        if e[0] == "h1":
            out.append(f"# {e[1]}\n")
        elif e[0] == "h2":
            out.append(f"## {e[1]}\n")
        elif e[0] == "p":
            out.append(f"{e[1]}\n")
        elif e[0] == "table":
            header, rows = e[1], e[2]
            out.append("| " + " | ".join(_md_cell(h) for h in header) + " |")
            out.append("|" + "---|" * len(header))
            out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
            out.append("")
        elif e[0] == "img":
            out.append(f"![{e[3]}]({e[2]})\n")
    return "\n".join(out)


def _inline_md(text: str) -> str:
    """HTML-escaped text with **bold** and `code` spans (the only markup the report uses)."""
    import re

    t = html.escape(str(text))
    t = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", t)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", t)


def to_html(elements: list, root: Path) -> str:
    body = []
    for e in elements:
        if e[0] in ("h1", "h2"):
            body.append(f"<{e[0]}>{_inline_md(e[1])}</{e[0]}>")
        elif e[0] == "p":
            body.append(f"<p>{_inline_md(e[1])}</p>")
        elif e[0] == "table":
            head = "".join(f"<th>{_inline_md(h)}</th>" for h in e[1])
            rows = "".join("<tr>" + "".join(f"<td>{_inline_md(c)}</td>" for c in row) + "</tr>" for row in e[2])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif e[0] == "img":
            data = base64.b64encode((root / e[2]).read_bytes()).decode("ascii")
            body.append(f'<figure><img alt="{html.escape(e[3])}" src="data:image/png;base64,{data}">'
                        f"<figcaption>{html.escape(e[3])}</figcaption></figure>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.4}"
             "table{border-collapse:collapse;margin:1em 0;font-size:90%}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:first-child{text-align:left}"
             "img{max-width:100%}figure{margin:1em 0}figcaption{color:#555;font-size:90%}")
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>cxrcf report</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def _endpoint_section(an: dict, study_dir: Path | None) -> list:
    """The pre-registered verdict, the primary and secondary numbers and the full endpoint table."""
    v, sec = an["verdict"], an["secondary"]
    el: list = [("h2", "Primary endpoint and pre-registered verdict")]
    first_look = (v.get("seeds") or 0) < 3
    if first_look:
        el.append(("p", (f"**First look, not the verdict**: {v.get('seeds') or 0} CFT seed(s) per mode; the verdict "
                         "needs the full `cxrcf study` (>= 3 seeds, hard and soft, the effectiveness curve).")))
    ci = v.get("ratio_ci95") or [None, None]
    el.append(("p", (f"Verdict: **{v['verdict']}** ({v.get('reason', '')}). Endpoint: {v['pair']} on "
                     f"{v['stratum']} images (ambiguity from the simulator's noise), A = mean over flip directions "
                     "of mean[lo(x*) - lo(x*_true)]; differences to no CFT are paired per image. "
                     f"Hard − none {_f(v.get('hard_minus_none'), signed=True)} ± {_f(v.get('hard_minus_none_stderr'))}, "
                     f"soft − none {_f(v.get('soft_minus_none'), signed=True)} ± {_f(v.get('soft_minus_none_stderr'))}, "
                     f"ratio {_f(v.get('ratio'), 2)} (95% interval {_f(ci[0], 2)} to {_f(ci[1], 2)}); "
                     f"true counterfactuals' do(sex) AUC {_f(an.get('true_auc'))}.")))
    ev = an.get("evidence")
    if ev:
        h, so = ev.get("hard_minus_none") or {}, ev.get("soft_minus_none") or {}
        el.append(("p", (f"In the simulator's units ({ev['evidence']}: {ev['units']}; evidence regressor "
                         f"{'validated' if ev['validated_on_true_counterfactuals'] else '**not validated**'} on "
                         f"true counterfactuals): hard − none {_f(h.get('mean'), 4, signed=True)} ± "
                         f"{_f(h.get('stderr'), 4)}, soft − none {_f(so.get('mean'), 4, signed=True)} ± "
                         f"{_f(so.get('stderr'), 4)}; against the truth "
                         + ", ".join(f"{g} {_f(a, 4, signed=True)}" for g, a in ev["vs_truth"].items())
                         + f". The regressors {'agree' if ev['agree'] else 'do **not** agree'} that soft keeps the "
                         "evidence.")))
    else:
        el.append(("p", ("No evidence regressor was given (`--evidence-regressor`), so the verdict cannot be "
                        "'reproduced'.")))
    header = ["precondition", "passed", "detail"]
    rows = [[name, "yes" if pc["passed"] else "**no**", str(pc["detail"])]
            for name, pc in v["preconditions"].items()]
    el.append(("table", header, rows))
    sci = sec.get("ratio_ci95") or [None, None]
    el.append(("p", (f"Secondary, {sec['pair']} ({sec['stratum']}): hard − none "
                     f"{_f(_get(sec, 'hard_minus_none.mean'), signed=True)} ± {_f(_get(sec, 'hard_minus_none.stderr'))}, "
                     f"soft − none {_f(_get(sec, 'soft_minus_none.mean'), signed=True)} ± "
                     f"{_f(_get(sec, 'soft_minus_none.stderr'))}, ratio {_f(sec.get('ratio'), 2)} "
                     f"({_f(sci[0], 2)} to {_f(sci[1], 2)}).")))
    el.append(("h2", "Every pair, direction and stratum"))
    el.append(("p", ("Against the true counterfactual, seed-averaged: A and its per-direction means "
                     "(direction = the intervened attribute's new value), with the pooled AMP against x (the "
                     "old endpoint, kept as a secondary figure) and the truth's own shift against x.")))
    header = ["generator", "pair", "stratum", "n", "A ± stderr", "per direction", "pooled AMP vs x",
              "truth vs x"]
    rows = [[r["generator"], r["pair"], r["stratum"], str(r["n"]), f"{_f(r['A'], signed=True)} ± {_f(r['stderr'])}",
             ", ".join(f"{d}: {_f(m, signed=True)}" for d, m in r["directions"].items()),
             _f(r["pooled_amp_vs_x"], signed=True), _f(r["truth_shift_vs_x"], signed=True)]
            for r in an["table"]]
    el.append(("table", header, rows))
    if study_dir and (study_dir / "endpoint_curve.png").is_file():
        el.append(("img", study_dir / "endpoint_curve.png", "figures/endpoint_curve.png",
                   "Primary endpoint against do(sex) effectiveness: none, hard and soft per slack, and the truth."))
    return el


def _bars(evals: dict, path: Path) -> None:
    from pipelines.figures import amplification_bars

    pairs = _pairs(evals)
    modes = {m: ([e["amplification"]["pairs"][p]["mean"] for p in pairs],
                 [e["amplification"]["pairs"][p]["stderr"] for p in pairs]) for m, e in evals.items()}
    amplification_bars(pairs, modes, path)


def write_report(params, eval_dir, out, study_path=None, log_mlflow: bool = True, metrics_path=None) -> dict:
    """Write the report folder (and, with `metrics_path`, the flat headline numbers for
    `dvc metrics show`); returns {"markdown", "html", "headline", "run_id"}."""
    from cxrcf.fileio import atomic_path

    eval_dir, out = Path(eval_dir), Path(out)
    evals = load_evals(eval_dir)
    study, study_dir = None, None
    if study_path:
        sp = Path(study_path)
        sp = sp / "study.json" if sp.is_dir() else sp
        if sp.is_file():
            study = read_json(sp)
            study_dir = sp.parent
    elements, headline = build(params, evals, eval_dir, study, study_dir)
    with atomic_path(out) as tmp:
        tmp.mkdir()
        _bars(evals, tmp / "amplification_bars.png")
        for e in elements:
            if e[0] == "img" and e[1] is not None:
                (tmp / e[2]).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(e[1], tmp / e[2])
        (tmp / "report.md").write_text(to_markdown(elements))
        (tmp / "report.html").write_text(to_html(elements, tmp))
    print(f"[report] wrote {out / 'report.md'} and {out / 'report.html'} ({', '.join(evals)})", flush=True)
    if metrics_path:
        from cxrcf.fileio import write_json

        write_json(Path(metrics_path), {k: (v if isinstance(v, (int, float)) and not isinstance(v, bool)
                                            and math.isfinite(v) else None) for k, v in headline.items()})
    run_id = _log(params, out, headline) if log_mlflow else None
    return {"markdown": out / "report.md", "html": out / "report.html", "headline": headline, "run_id": run_id}


def _log(params, out: Path, headline: dict) -> str:
    from store import tracking

    run_id = tracking.start_run(params, phase="report", run_name="report")
    ok = False
    try:
        rows = [(f"report/{k}", v, 0) for k, v in headline.items()
                if isinstance(v, (int, float)) and math.isfinite(v)]
        tracking.log_metrics(run_id, rows)
        tracking.log_artifacts(run_id, out, "report")
        ok = True
    finally:
        tracking.end_run(run_id, ok)
    print(f"[report] logged to MLflow run {run_id} ({tracking.tracking_uri()})", flush=True)
    return run_id


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="cxrcf report", description=__doc__.split("\n\n")[0])
    add_params(parser)
    parser.add_argument("--eval-dir", default="artifacts/eval")
    parser.add_argument("--out", default="artifacts/report")
    parser.add_argument("--study", default="artifacts/study",
                        help="study.json or its folder; included when present")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log the report to MLflow")
    parser.add_argument("--metrics", default=None,
                        help="also write the headline numbers here as flat JSON (for `dvc metrics show`)")
    args = parser.parse_args(argv)
    from cxrcf.config import load_params

    t0 = time.perf_counter()
    params = load_params(args.params)
    write_report(params, args.eval_dir, args.out, args.study, log_mlflow=not args.no_mlflow,
                 metrics_path=args.metrics)
    print(f"[report] done in {time.perf_counter() - t0:.1f} s", flush=True)
    return 0
