"""PNG figures of the evaluation (matplotlib, Agg backend, written atomically).

- `amplification_scatter`: the predictor's logit on x against x* for each non-intervened attribute j,
  coloured by j's factual subgroup, one file per intervention do(k) (the reference's figure).
- `amplification_bars`: mean AMP(j | do k) for none / hard / soft with standard-error bars.
- `counterfactual_grid`: rows are images; columns the factual, each intervention, the true counterfactual.
- `study_curve`: amplification against effectiveness for hard and soft across CFT strengths.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from cxrcf.fileio import atomic_path

MODE_COLORS = {"none": "#7f7f7f", "hard": "#d62728", "soft": "#1f77b4", "true": "#2ca02c"}
GROUP_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return path


def amplification_scatter(k: str, panels: list[dict], path: str | Path, title: str = "") -> Path:
    """One panel per attribute j: `{"j", "before", "after", "labels", "groups"}`.

    `before`/`after` are the predictor's log-odds on x and x* (binary j: the logit of class 1, so the
    subgroups separate; race: the factual class's one-vs-rest log-odds). Points off the diagonal
    moved; for binary j, amplification pushes class 1 up and class 0 down.
    """
    plt = _plt()
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(4.4 * max(1, len(panels)), 4.2), squeeze=False,
                             layout="constrained")
    for ax, panel in zip(axes[0], panels):
        before, after = np.asarray(panel["before"]), np.asarray(panel["after"])
        labels = np.asarray(panel["labels"]).astype(int)
        for c, name in enumerate(panel["groups"]):
            m = labels == c
            if m.any():
                ax.scatter(before[m], after[m], s=6, alpha=0.45, color=GROUP_COLORS[c % len(GROUP_COLORS)],
                           label=f"{name} (n={int(m.sum())})", edgecolors="none")
        finite = np.concatenate([before, after]) if before.size else np.array([-1.0, 1.0])
        lo, hi = float(np.min(finite)), float(np.max(finite))
        pad = 0.05 * (hi - lo + 1e-6)
        ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="black", lw=0.8, ls="--")
        what = "one-vs-rest log-odds of factual class" if panel["j"] == "race" else f"logit {panel['j']}"
        ax.set_xlabel(f"{what} on x")
        ax.set_ylabel(f"{what} on x*")
        ax.set_title(f"{panel['j']} | do({k})")
        ax.legend(fontsize=7, loc="upper left", markerscale=2)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def amplification_bars(pairs: list[str], modes: dict[str, tuple[list[float], list[float]]],
                       path: str | Path, title: str = "Amplification AMP(j | do k)") -> Path:
    """Grouped bars: for each pair "<j>|do(<k>)", one bar per mode with its (mean, stderr) lists."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(pairs) + 2), 4.0))
    n = max(1, len(modes))
    width = 0.8 / n
    x = np.arange(len(pairs))
    for i, (mode, (means, errs)) in enumerate(modes.items()):
        means = np.array([np.nan if m is None else m for m in means], dtype=float)
        errs = np.array([0.0 if e is None else e for e in errs], dtype=float)
        ax.bar(x + (i - (n - 1) / 2) * width, means, width, yerr=errs, capsize=2,
               color=MODE_COLORS.get(mode, GROUP_COLORS[i % len(GROUP_COLORS)]), label=mode)
    ax.axhline(0.0, color="black", lw=0.8)
    ax.set_xticks(x)
    ax.set_xticklabels(pairs, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("mean change of factual log-odds (0 is ideal)")
    ax.set_title(title)
    ax.legend()
    return _save(fig, path)


def counterfactual_grid(columns: list[tuple[str, np.ndarray]], path: str | Path, title: str = "") -> Path:
    """`columns`: (heading, images `(N, 1, R, R)` or `(N, R, R)` in [-1, 1]); rows are the N images.

    Drawn as one mosaic (a single imshow) rather than a subplot per image, which is many times faster.
    """
    plt = _plt()
    tiles = [np.asarray(img)[:, 0] if np.asarray(img).ndim == 4 else np.asarray(img) for _, img in columns]
    n_rows = min(len(t) for t in tiles)
    r = tiles[0].shape[-1]
    gap = max(1, r // 16)
    step = r + gap
    mosaic = np.full((n_rows * step - gap, len(tiles) * step - gap), np.nan, dtype=np.float32)
    for c, t in enumerate(tiles):
        for i in range(n_rows):
            mosaic[i * step:i * step + r, c * step:c * step + r] = t[i]
    fig, ax = plt.subplots(figsize=(1.25 * len(tiles), 1.25 * n_rows + 0.5))
    cmap = plt.get_cmap("gray").with_extremes(bad="white")
    ax.imshow(np.ma.masked_invalid(mosaic), cmap=cmap, vmin=-1.0, vmax=1.0, interpolation="nearest")
    ax.set_xticks([c * step + r / 2 for c in range(len(tiles))])
    ax.set_xticklabels([h for h, _ in columns], fontsize=7, rotation=30, ha="left")
    ax.xaxis.tick_top()
    ax.set_yticks([])
    for side in ax.spines.values():
        side.set_visible(False)
    if title:
        ax.set_title(title, fontsize=9, pad=28)
    return _save(fig, path)


def study_curve(points: list[dict], path: str | Path, none_point: dict | None = None,
                true_effectiveness: float | None = None) -> Path:
    """Amplification (y) against effectiveness (x) per mode across slacks.

    `points`: `{"mode", "slack", "effectiveness", "amplification", "stderr"}` (one per mode and slack,
    already averaged over seeds); the curve joins a mode's points in slack order.
    """
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.0, 4.5))
    for mode in ("hard", "soft"):
        pts = sorted((p for p in points if p["mode"] == mode), key=lambda p: p["slack"])
        if not pts:
            continue
        xs = [p["effectiveness"] for p in pts]
        ys = [p["amplification"] for p in pts]
        es = [p.get("stderr") or 0.0 for p in pts]
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, color=MODE_COLORS[mode], label=f"{mode} CFT")
        for p in pts:
            ax.annotate(f"{p['slack']:g}", (p["effectiveness"], p["amplification"]), fontsize=7,
                        textcoords="offset points", xytext=(4, 4), color=MODE_COLORS[mode])
    if none_point is not None:
        ax.errorbar([none_point["effectiveness"]], [none_point["amplification"]],
                    yerr=[none_point.get("stderr") or 0.0], marker="s", color=MODE_COLORS["none"],
                    capsize=3, label="no CFT")
    if true_effectiveness is not None and not math.isnan(true_effectiveness):
        ax.axvline(true_effectiveness, color=MODE_COLORS["true"], ls="--", lw=1.0,
                   label="true counterfactual")
    ax.axhline(0.0, color="black", lw=0.6)
    ax.set_xlabel("effectiveness: mean AUC of the intervened attribute (sex, race, finding)")
    ax.set_ylabel("mean amplification (log-odds)")
    ax.set_title("CFT strength sweep (labels: slack, nats/pixel)")
    ax.legend(fontsize=8)
    return _save(fig, path)


def endpoint_curve(curve: list[dict], none_point: dict, true_auc: float, path: str | Path, title: str = "") -> Path:
    """The primary endpoint A (against the true counterfactuals) over do(k) effectiveness.

    `curve`: per (mode, slack) `{"mode", "slack", "auc", "A_minus_none", "stderr"}`; hard and soft
    points sit at A_none + their paired difference. The truth is A = 0 at its own AUC by definition.
    """
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.0, 4.5))
    a_none = none_point["A"]
    for mode in ("hard", "soft"):
        pts = sorted((p for p in curve if p["mode"] == mode and p["auc"] is not None
                      and p["A_minus_none"] is not None), key=lambda p: p["slack"])
        if not pts:
            continue
        ax.errorbar([p["auc"] for p in pts], [a_none + p["A_minus_none"] for p in pts],
                    yerr=[p.get("stderr") or 0.0 for p in pts], marker="o", capsize=3,
                    color=MODE_COLORS[mode], label=f"{mode} CFT")
        for p in pts:
            ax.annotate(f"{p['slack']:g}", (p["auc"], a_none + p["A_minus_none"]), fontsize=7,
                        textcoords="offset points", xytext=(4, 4), color=MODE_COLORS[mode])
    if none_point.get("auc") is not None and a_none is not None:
        ax.plot([none_point["auc"]], [a_none], marker="s", color=MODE_COLORS["none"], ls="none", label="no CFT")
    if true_auc is not None and math.isfinite(true_auc):
        ax.plot([true_auc], [0.0], marker="*", ms=10, color=MODE_COLORS["true"], ls="none",
                label="true counterfactual")
        ax.axvline(true_auc, color=MODE_COLORS["true"], ls="--", lw=0.8)
    ax.axhline(0.0, color="black", lw=0.6)
    ax.set_xlabel("effectiveness: AUC of the intervened attribute on x*")
    ax.set_ylabel("A: mean over directions of lo(x*) - lo(x*_true)")
    ax.set_title(title or "primary endpoint against effectiveness (labels: slack)")
    ax.legend(fontsize=8)
    return _save(fig, path)
