"""Hand-made per-image measurements in the layout of pipelines/endpoint.py (reference + measure)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipelines import endpoint as E


def hand_made_measurements(n=600, seeds=3, seed=0, soft_evidence=0.0):
    """A reference and measurements where hard amplifies finding|do(sex) on ambiguous images by
    +0.8 (to female) / +0.2 (to male), soft by a tenth of that; slack 0.05 overshoots the truth.
    An evidence regressor (validated) reads eff_max: hard adds 0.03 of lung height on ambiguous
    images, soft `soft_evidence`."""
    rng = np.random.default_rng(seed)
    ref = {"ids": np.array([f"i{i}" for i in range(n)]), "resolution": np.asarray(32),
           "regressor_passed": np.asarray(1)}
    for k in E.INTERVENTIONS:
        ref[f"direction/{k}"] = rng.choice([f"{k}=0", f"{k}=1"], n, p=[0.3, 0.7])
        ref[f"true_auc/{k}"] = np.asarray(0.85)
    for j in E.SCORED:
        ref[f"stratum/{j}"] = rng.choice(["ambiguous", "clear"], n)
    lo_none = {}
    for j, k in E.pairs():
        key = E.pair_key(j, k)
        ref[f"lo_x/{key}"] = rng.normal(1, 1, n)
        ref[f"lo_true/{key}"] = ref[f"lo_x/{key}"] - 0.1  # the truth moves the predictor too
        lo_none[key] = ref[f"lo_true/{key}"] + rng.normal(0, 0.2, n)
    ref["ev_true/sex/eff_max"] = rng.uniform(0, 0.1, n)
    ev_none = ref["ev_true/sex/eff_max"] + rng.normal(0, 0.005, n)
    none = {"ids": ref["ids"], **{f"lo_star/{k}": v for k, v in lo_none.items()},
            **{f"auc/{k}": np.asarray(0.6) for k in E.INTERVENTIONS}, "ev_star/sex/eff_max": ev_none}
    amb = ref["stratum/finding"] == "ambiguous"
    up = np.where(ref["direction/sex"] == "sex=1", 0.8, 0.2) * amb

    def cell(scale, auc, ev_shift):
        out = []
        for _ in range(seeds):
            m = {"ids": ref["ids"], **{f"auc/{k}": np.asarray(auc + rng.normal(0, 0.002)) for k in E.INTERVENTIONS},
                 "ev_star/sex/eff_max": ev_none + ev_shift * amb + rng.normal(0, 0.002, n)}
            for key, lo in lo_none.items():
                shift = scale * up if key == "finding|do(sex)" else 0.0
                m[f"lo_star/{key}"] = lo + shift + rng.normal(0, 0.1, n)
            out.append(m)
        return out

    cells = {("hard", 0.02): cell(1.0, 0.80, 0.03), ("soft", 0.02): cell(0.1, 0.79, soft_evidence),
             ("hard", 0.05): cell(1.5, 0.90, 0.05), ("soft", 0.05): cell(0.2, 0.89, soft_evidence)}
    return ref, none, cells


def write_study_measurements(out: Path, slacks, seeds) -> None:
    """reference.npz, none/endpoint.npz and runs/<name>/endpoint.npz of a study folder, so that a
    resumed `run_study` needs neither data nor models for the endpoint."""
    from pipelines.study import run_name

    ref, none, cells = hand_made_measurements(seeds=len(seeds))
    E.save(out / "reference.npz", ref)
    E.save(out / "none" / "endpoint.npz", none)
    base = {"hard": cells[("hard", 0.02)], "soft": cells[("soft", 0.02)]}
    for mode, runs in base.items():
        for slack in slacks:
            for seed, m in zip(seeds, runs):
                E.save(out / "runs" / run_name(mode, slack, seed) / "endpoint.npz", m)
