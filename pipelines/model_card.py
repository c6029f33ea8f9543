"""The model card of a registered generator: markdown, attached to the registration run and used
as the model version's description. Pure rendering from numbers the registry already holds."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from cxrcf.attributes import ATTRIBUTES

MODE_TEXT = {
    "none": "no counterfactual fine-tuning (the pretrained conditional HVAE)",
    "hard": "hard counterfactual fine-tuning (0/1 targets for every attribute)",
    "soft": ("soft counterfactual fine-tuning (the guidance predictor's own probabilities on the factual "
             "image as targets for the attributes not intervened on)"),
}


def _num(value, digits: int = 3) -> str:
    return "-" if not isinstance(value, (int, float)) else f"{value:.{digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
            *("| " + " | ".join(r) + " |" for r in rows)]


def render_model_card(*, name: str, mode: str, preset: str, metrics: Mapping[str, float],
                      tags: Mapping[str, str], gates: Sequence[Mapping], figures: Sequence[str] = (),
                      run_id: str | None = None) -> str:
    """Markdown: what the model is, lineage, effectiveness, amplification, fidelity, gates, figures.

    `metrics` are the flat evaluation metrics (`effectiveness.sex.auc`, ...); `gates` the rows of
    `pipelines.registry.check_gates` (without a champion: regression is judged at promotion).
    """
    m = metrics
    lines = [f"# {name}: counterfactual chest X-ray generator ({mode} CFT)", "",
             (f"A conditional HVAE with an attribute SCM and an evaluation predictor, trained with "
              f"{MODE_TEXT.get(mode, mode)}; preset `{preset}`. It answers \"what would this image look like "
              f"had the patient's sex, race, age or finding been different\". For research, augmentation and "
              f"audits; not for diagnosis."), ""]

    lines += ["## Lineage", ""]
    lineage = [(k, f"`{v}`") for k, v in sorted(tags.items()) if v]
    if run_id:
        lineage.append(("registration run", f"`{run_id}`"))
    lines += _table(["item", "value"], lineage) + [""]

    lines += ["## Effectiveness (evaluation predictor on the counterfactuals)", ""]
    rows = []
    for a in ATTRIBUTES:
        rows.append([a, _num(m.get(f"effectiveness.{a}.acc")), _num(m.get(f"effectiveness.{a}.auc")),
                     _num(m.get(f"effectiveness.{a}.mae"), 2),
                     _num(m.get(f"effectiveness.{a}.delta_real.auc", m.get(f"effectiveness.{a}.delta_real.mae")))])
    lines += _table(["do(attribute)", "accuracy", "AUC", "MAE (years)", "vs real images"], rows) + [""]

    lines += ["## Amplification (log-odds towards the factual label; 0 is ideal)", ""]
    lines += _table(["summary", "value"], [
        ["mean AMP", _num(m.get("amplification.mean"))], ["worst AMP", _num(m.get("amplification.worst"))],
        ["mean drift", _num(m.get("drift.mean"))], ["composition L1", _num(m.get("composition_l1"), 4)],
        ["reversibility L1", _num(m.get("reversibility_l1"), 4)],
        ["ground truth: L1 to the true counterfactual", _num(m.get("ground_truth.cf_l1"), 4)],
        ["ground truth: mean AMP against the true counterfactual", _num(m.get("ground_truth.amplification.mean"))],
    ]) + [""]
    pairs = sorted({k.split(".")[2] for k in m if k.startswith("amplification.pairs.") and k.endswith(".mean")})
    if pairs:
        lines += _table(["pair (j_do_k)", "AMP", "drift"],
                        [[p, _num(m.get(f"amplification.pairs.{p}.mean")), _num(m.get(f"amplification.pairs.{p}.drift"))]
                         for p in pairs]) + [""]

    lines += ["## Promotion gates (params.registry.gates; regression is checked against the champion at promotion)", ""]
    lines += _table(["gate", "metric", "value", "must be", "result"],
                    [[g["name"], g["metric"], _num(g["value"], 4), f"{g['op']} {g['limit']:.4g}",
                      "pass" if g["passed"] else "FAIL"] for g in gates]) + [""]

    if figures:
        lines += ["## Figures", ""]
        lines += [f"![{f.rsplit('/', 1)[-1]}]({f})" for f in figures] + [""]
    lines += ["## Limits", "",
              ("- Metrics come from one evaluation predictor on the test split; amplification is measured, "
               "not absent, and ground truth exists only on synthetic data."),
              "- Counterfactuals are as good as the SCM's causal graph (age -> finding) and the HVAE's fidelity.",
              ""]
    return "\n".join(lines)
