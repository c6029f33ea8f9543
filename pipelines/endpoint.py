"""The study's slim evaluator: per-image log-odds for the primary endpoint (pipelines/verdict.py).

`reference(...)` measures what does not depend on the generator, once per study: the seeded test
subset, the interventions' values (the same draws as `cxrcf evaluate`: flips for sex and finding, a
seeded other race, a seeded permutation of ages), each image's flip direction, the ambiguity strata
from the simulator's noise, and the evaluation predictor on x and on the TRUE counterfactuals.
`measure(...)` runs one generator on those images and interventions and keeps, per pair j|do(k),
lo_j(x*) per image and the do(k) effectiveness (AUC of k on x*). Both are saved as .npz so that a
resumed study only measures what is missing; `table(...)` turns them into the endpoint's table
(pair x direction x stratum) for one generator.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from cxrcf.errors import CxrcfError

INTERVENTIONS = ("sex", "race", "finding", "age")
SCORED = ("sex", "race", "finding")
STRATA = ("ambiguous", "clear", "all")


def pairs() -> list[tuple[str, str]]:
    """(j, k) for every do(k) and every non-intervened, non-descendant categorical attribute j."""
    from cxrcf.attributes import descendants

    return [(j, k) for k in INTERVENTIONS for j in SCORED if j != k and j not in descendants(k)]


def pair_key(j: str, k: str) -> str:
    return f"{j}|do({k})"


def directions(k: str, before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """Each image's flip direction under do(k), named by where it goes ("sex=1", "age=older")."""
    if k == "age":
        return np.where(after >= before, "age=older", "age=younger")
    return np.array([f"{k}={int(v)}" for v in after])


def _lo(probs: dict, j: str, y: np.ndarray) -> np.ndarray:
    from pipelines import metrics as M

    return M.log_odds_factual(probs[j], y)


def _auc(probs: dict, k: str, target: np.ndarray) -> float:
    from pipelines import metrics as M

    if k == "age":
        return -M.mae(probs["age"], target)  # higher is better, as for the AUCs
    return M.macro_auc_ovr(probs[k], target) if k == "race" else M.roc_auc(probs[k], target)


def _predict(predictor, x, batch: int) -> dict:
    """The predictor's probabilities on model images, resized to its resolution as serving does."""
    import torch
    import torch.nn.functional as F

    r = predictor.arch.resolution
    chunks = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            xb = x[i:i + batch].float()
            if xb.shape[-1] != r:
                mode = "area" if r < xb.shape[-1] else "bilinear"
                xb = F.interpolate(xb, size=(r, r), mode=mode, **({} if mode == "area" else {"align_corners": False}))
            out = predictor.predict(xb)
            chunks.append({k: v.float().cpu().numpy() for k, v in out.items()})
    return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}


def save(path: Path, arrays: dict) -> None:
    from cxrcf.fileio import atomic_path

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def load(path: str | Path) -> dict:
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError) as err:
        raise CxrcfError(f"{path}: unreadable per-image measurements ({err})") from None


EVIDENCE_OF_J = {"finding": "eff_max", "sex": "breast_amp", "race": "texture_amp"}  # j's evidence, in sim units


def _evidence(regressor, x, batch: int) -> dict:
    import torch

    chunks = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            chunks.append({t: v.numpy() for t, v in regressor.predict(x[i:i + batch].float()).items()})
    return {t: np.concatenate([c[t] for c in chunks]) for t in chunks[0]}


def _regressor(regressor_dir):
    if regressor_dir is None:
        return None, None
    from cxrcf.evidence_model import EvidenceRegressor
    from cxrcf.fileio import read_json

    model = EvidenceRegressor.load(regressor_dir)
    val = Path(regressor_dir) / "validation.json"
    passed = read_json(val)["true_counterfactuals"]["passed"] if val.is_file() else None
    return model, passed


def _reuse(path: Path, regressor_dir, key: str) -> dict:
    """A saved measurement, refused when it lacks the regressor's readings that this run asks for."""
    arrays = load(path)
    if regressor_dir is not None and key not in arrays:
        raise CxrcfError(f"{path}: measured without an evidence regressor; delete it to measure again with "
                         f"{regressor_dir}")
    return arrays


def reference(params, data_root, scm_dir, predictor_dir, generator_dir, out: str | Path,
              regressor_dir=None) -> dict:
    """Measure (or reuse) the generator-independent half of the endpoint, at the resolution of the
    generator in `generator_dir`; returns its arrays. With an evidence regressor it also keeps its
    readings of x and of the true counterfactuals (simulator units)."""
    import torch

    from cxrcf.data import load_split, to_model_images
    from cxrcf.export import load_model, read_config
    from cxrcf.synth import ambiguity_strata, counterfactual_attributes, render_counterfactuals

    out = Path(out)
    if out.is_file():
        return _reuse(out, regressor_dir, "ev_x/eff_max")
    resolution = int(read_config(Path(generator_dir))["config"]["resolution"])
    data_root = Path(data_root)
    if not (data_root / "exogenous.csv").is_file():
        raise CxrcfError(f"{data_root}: no exogenous.csv; the endpoint needs true counterfactuals (SynthCXR)")
    t0 = time.perf_counter()
    cfg = params.evaluate
    split = load_split(data_root, "test", resolution)
    rng = np.random.default_rng(cfg.seed)
    n_all = len(split.ids)
    idx = np.sort(rng.choice(n_all, cfg.max_images, replace=False)) if n_all > cfg.max_images else np.arange(n_all)
    frame = split.frame.iloc[idx].reset_index(drop=True)
    parents = {a: v[torch.as_tensor(idx)] for a, v in split.parents.items()}
    n = len(idx)
    # The same draws, in the same order, as `cxrcf evaluate`.
    do = {"sex": 1.0 - parents["sex"], "finding": 1.0 - parents["finding"],
          "race": (parents["race"] + torch.as_tensor(rng.integers(1, 3, n))) % 3,
          "age": parents["age"][torch.as_tensor(rng.permutation(n))]}
    scm = load_model(scm_dir).eval()
    gen = torch.Generator().manual_seed(cfg.seed)
    stars = {k: scm.counterfactual(parents, {k: v}, generator=gen) for k, v in do.items()}
    predictor = load_model(predictor_dir).eval()
    x = split.x[torch.as_tensor(idx)]
    arrays = {"ids": np.asarray(frame["id"], dtype=str), "resolution": np.asarray(resolution)}
    pa = {a: v.cpu().numpy() for a, v in parents.items()}
    for a, v in pa.items():
        arrays[f"parent/{a}"] = v
    probs_x = _predict(predictor, x, cfg.batch_size)
    regressor, reg_passed = _regressor(regressor_dir)
    if regressor is not None:
        arrays["regressor_passed"] = np.asarray(-1 if reg_passed is None else int(reg_passed))
        for t, v in _evidence(regressor, x, cfg.batch_size).items():
            arrays[f"ev_x/{t}"] = v
    cols = {k: frame[k].to_numpy() for k in frame.columns}
    strata = ambiguity_strata(counterfactual_attributes(cols, {}), cols)
    for j in SCORED:
        arrays[f"stratum/{j}"] = strata[j]["stratum"].astype(str)
        arrays[f"p_sim/{j}"] = strata[j]["p"]
    for k in INTERVENTIONS:
        values = do[k].cpu().numpy()
        arrays[f"direction/{k}"] = directions(k, pa[k], values)
        arrays[f"do/{k}"] = values
        for a, v in stars[k].items():
            arrays[f"star/{k}/{a}"] = v.cpu().numpy()
        arrays[f"target/{k}"] = arrays[f"star/{k}/{k}"]
        truth = to_model_images(render_counterfactuals(frame, {k: values}), resolution)
        probs_t = _predict(predictor, truth, cfg.batch_size)
        if regressor is not None:
            for t, v in _evidence(regressor, truth, cfg.batch_size).items():
                arrays[f"ev_true/{k}/{t}"] = v
        arrays[f"true_auc/{k}"] = np.asarray(_auc(probs_t, k, arrays[f"target/{k}"]))
        for j, kk in pairs():
            if kk == k:
                arrays[f"lo_true/{pair_key(j, k)}"] = _lo(probs_t, j, pa[j])
                arrays[f"lo_x/{pair_key(j, k)}"] = _lo(probs_x, j, pa[j])
    save(out, arrays)
    print(f"[endpoint] reference: {n} test images, true counterfactuals of {len(INTERVENTIONS)} interventions "
          f"in {time.perf_counter() - t0:.1f} s -> {out}", flush=True)
    return arrays


def measure(params, ref: dict, data_root, generator_dir, predictor_dir, out: str | Path,
            regressor_dir=None) -> dict:
    """Per-image lo_j(x*) of one generator on the reference's images and interventions (or reuse),
    and with an evidence regressor its readings of x* (simulator units)."""
    import torch

    from cxrcf.attributes import context
    from cxrcf.counterfactual import counterfactuals_shared
    from cxrcf.data import load_split
    from cxrcf.export import load_model

    out = Path(out)
    if out.is_file():
        return _reuse(out, regressor_dir, "ev_star/sex/eff_max")
    t0 = time.perf_counter()
    hvae = load_model(generator_dir).eval()
    res = int(ref["resolution"])
    if hvae.arch.resolution != res:
        raise CxrcfError(f"{generator_dir}: generator resolution {hvae.arch.resolution} differs from the "
                         f"study's reference ({res})")
    split = load_split(data_root, "test", res)
    pos = {i: n for n, i in enumerate(split.ids)}
    missing = [i for i in ref["ids"] if i not in pos]
    if missing:
        raise CxrcfError(f"{data_root}: test image {missing[0]} of the study's reference is missing")
    idx = torch.as_tensor([pos[i] for i in ref["ids"]])
    x = split.x[idx]
    parents = {a: torch.as_tensor(ref[f"parent/{a}"]) for a in ("sex", "race", "age", "finding")}
    predictor = load_model(predictor_dir).eval()
    # The reference holds the SCM's counterfactual parents (finding follows age through the SCM).
    stars = {k: {a: torch.as_tensor(ref[f"star/{k}/{a}"]) for a in parents} for k in INTERVENTIONS}
    gen = torch.Generator().manual_seed(params.evaluate.seed)
    bs = params.evaluate.batch_size
    chunks = {k: [] for k in INTERVENTIONS}
    regressor, _ = _regressor(regressor_dir)
    ev_chunks = {k: [] for k in INTERVENTIONS}
    with torch.no_grad():
        for i in range(0, len(x), bs):
            s = slice(i, i + bs)
            ctx = context({a: v[s] for a, v in parents.items()})
            ctx_stars = [context({a: v[s] for a, v in stars[k].items()}) for k in INTERVENTIONS]
            outs = counterfactuals_shared(hvae, x[s], ctx, ctx_stars, (params.evaluate.t_u,), generator=gen)
            for k, per_t in zip(INTERVENTIONS, outs):
                chunks[k].append(_predict(predictor, per_t[0], len(per_t[0])))
                if regressor is not None:
                    ev_chunks[k].append(_evidence(regressor, per_t[0], len(per_t[0])))
    arrays = {"ids": ref["ids"]}
    for k in INTERVENTIONS:
        probs = {a: np.concatenate([c[a] for c in chunks[k]]) for a in chunks[k][0]}
        arrays[f"auc/{k}"] = np.asarray(_auc(probs, k, ref[f"target/{k}"]))
        for t in (ev_chunks[k][0] if ev_chunks[k] else {}):
            arrays[f"ev_star/{k}/{t}"] = np.concatenate([c[t] for c in ev_chunks[k]])
        for j, kk in pairs():
            if kk == k:
                arrays[f"lo_star/{pair_key(j, k)}"] = _lo(probs, j, ref[f"parent/{j}"])
    save(out, arrays)
    print(f"[endpoint] {generator_dir}: {len(x)} images x {len(INTERVENTIONS)} interventions "
          f"in {time.perf_counter() - t0:.1f} s -> {out}", flush=True)
    return arrays


def table(ref: dict, meas: dict) -> dict:
    """{pair: {stratum: endpoint}} of one generator against the truth, plus the pooled AMP against x."""
    from pipelines import verdict as V

    out = {}
    for j, k in pairs():
        key = pair_key(j, k)
        d = ref[f"direction/{k}"]
        stratum = ref[f"stratum/{j}"]
        row = {}
        for s in STRATA:
            mask = None if s == "all" else stratum == s
            row[s] = V.endpoint(meas[f"lo_star/{key}"], ref[f"lo_true/{key}"], d, mask)
        row["pooled_amp_vs_x"] = V.pooled_amp(meas[f"lo_star/{key}"], ref[f"lo_x/{key}"])
        row["truth_shift_vs_x"] = V.pooled_amp(ref[f"lo_true/{key}"], ref[f"lo_x/{key}"])
        out[key] = row
    return out
