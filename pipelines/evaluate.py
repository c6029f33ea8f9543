"""`cxrcf evaluate`: how good and how faithful a counterfactual generator is (SCIENCE.md section 6).

Over the test split (at most `evaluate.max_images`, a seeded subset) and for the interventions
- do(sex): flip; do(finding): flip; do(race): one of the two other races, drawn with the seed;
- do(age): the test ages in a seeded random permutation (an empirical-marginal draw, as in CFT);
  the SCM recomputes finding from its abducted noise, so finding is a descendant and not scored;
- null: no intervention,
it measures, with the independent evaluation predictor:
- effectiveness of the intervened attribute on x* (and its difference to real test images);
- AMP(j | do k) = mean(lo_y(x*) - lo_y(x)) and drift for each non-intervened, non-descendant
  categorical j (age has no factual class, so it is never a j), per subgroup of j;
- composition (L1 of x and x* under null) and reversibility (L1 of x and the counterfactual of x*
  back to the factual parents); L1 is the mean absolute pixel difference in the model's [-1, 1] scale;
- on synthetic data (exogenous.csv present), ground truth: the simulator renders the true
  counterfactual of each image under the same do (age through its own mechanism), and the report
  holds L1(x*, x*_true), AMP against the truth mean(lo_y(x*) - lo_y(x*_true)) and the truth's own
  effectiveness (which shows when CFT overshoots).
All of it at `evaluate.t_u`, and again at each `evaluate.extra_t_u` under `extra_t_u.<value>`
(reversibility at the main t_u only, on the first `evaluate.reversibility_images` images).

Each batch is abducted once (`counterfactual.counterfactuals_shared`) and decoded for every
intervention and t_u, so all of them are compared on the same exogenous noise of each image.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from cxrcf.cli import add_params
from cxrcf.errors import CxrcfError
from pipelines.generator_check import run_check
from store.runs import read_run_id

INTERVENTIONS = ("sex", "race", "finding", "age")
SCORED = ("sex", "race", "finding")  # attributes with a factual class, hence a log-odds
GRID_ROWS = 6


def amplification_pairs() -> list[tuple[str, str]]:
    """(j, k) for every do(k) and every non-intervened, non-descendant categorical attribute j."""
    from cxrcf.attributes import descendants

    return [(j, k) for k in INTERVENTIONS for j in SCORED if j != k and j not in descendants(k)]


def pair_key(j: str, k: str) -> str:
    return f"{j}|do({k})"


# ----------------------------------------------------------------------------------- loading
def _load_dir(directory, kind: str, flag: str):
    from cxrcf.export import load_model, read_config

    if directory is None:
        raise CxrcfError(f"{flag}: required unless --generator is an MLflow model URI")
    directory = Path(directory)
    found = read_config(directory)["kind"]
    if found != kind:
        raise CxrcfError(f"{flag} {directory}: holds a {found} model, expected a {kind}")
    return load_model(directory)


def load_components(generator: str | Path, scm_dir, predictor_dir) -> tuple:
    """(hvae, scm, predictor, generator run_id or None, description of the generator).

    `generator` is an HVAE export directory or an MLflow model URI (`models:/name@alias`,
    `models:/name/version`), whose bundle also supplies the SCM and predictor when their
    directories are not given.
    """
    generator = str(generator)
    if generator.startswith(("models:/", "runs:/")):
        from store.models import load_bundle

        bundle, info = load_bundle(generator)
        scm = _load_dir(scm_dir, "scm", "--scm") if scm_dir else bundle.scm
        predictor = _load_dir(predictor_dir, "predictor", "--predictor") if predictor_dir else bundle.predictor
        run_id = info.get("run_id") if isinstance(info, dict) else None
        return bundle.hvae.eval(), scm.eval(), predictor.eval(), run_id, generator
    gdir = Path(generator)
    hvae = _load_dir(gdir, "hvae", "--generator")
    scm = _load_dir(scm_dir, "scm", "--scm")
    predictor = _load_dir(predictor_dir, "predictor", "--predictor")
    return hvae, scm, predictor, read_run_id(gdir), str(gdir)


# ------------------------------------------------------------------------------ computation
def _clean(obj):
    """NaN/inf -> None so the JSON is standard; numpy scalars -> Python numbers."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _effectiveness(probs: dict, target: dict, k: str) -> dict:
    from pipelines import metrics as M

    if k == "age":
        return {"mae": M.mae(probs["age"], target["age"])}
    y = target[k]
    auc = M.macro_auc_ovr(probs[k], y) if k == "race" else M.roc_auc(probs[k], y)
    return {"acc": M.accuracy(probs[k], y), "auc": auc}


def _with_delta(eff: dict, real: dict) -> dict:
    out = dict(eff)
    out["real"] = real
    out["delta_real"] = {m: eff[m] - real[m] for m in eff}
    return out


def _amp_block(pairs_probs: dict, parents_np: dict, groups: dict) -> dict:
    """Pair-level AMP and drift plus their summaries; `pairs_probs[(j, k)] = (p_before, p_after)`."""
    import numpy as np

    from pipelines import metrics as M

    pairs, per_image = {}, []
    for (j, k), (before, after) in pairs_probs.items():
        y = parents_np[j]
        pairs[pair_key(j, k)] = M.amplification(before, after, y, group_names=groups[j])
        per_image.append(M.log_odds_factual(after, y) - M.log_odds_factual(before, y))
    means = {key: v["mean"] for key, v in pairs.items()}
    drifts = [v["drift"] for v in pairs.values()]
    # Pairs share images, so the stderr of the overall mean comes from each image's average over pairs.
    mean, stderr = M.mean_stderr(np.mean(per_image, axis=0)) if per_image else (float("nan"), float("nan"))
    worst_key = max(means, key=lambda key: means[key]) if means else None
    amp = {"mean": mean, "stderr": stderr, "worst": means.get(worst_key, float("nan")), "worst_pair": worst_key,
           "pairs": pairs}
    drift = {"mean": float(np.mean(drifts)) if drifts else float("nan"),
             "worst": float(np.max(drifts)) if drifts else float("nan")}
    return {"amplification": amp, "drift": drift}


class _Evaluator:
    """Holds the models, the test images and the interventions; `measure(t_u)` returns one block."""

    def __init__(self, params, data_root, hvae, scm, predictor, device):
        import numpy as np
        import torch

        from cxrcf.attributes import VOCAB
        from cxrcf.bundle import GeneratorBundle
        from cxrcf.data import load_split

        self.params, self.cfg = params, params.evaluate
        self.device = device
        # The bundle supplies the predictor's view of an image (resizing to its resolution), as in serving.
        self.bundle = GeneratorBundle(hvae.cpu(), scm.cpu(), predictor.cpu())
        self.hvae, self.scm = hvae, scm
        self.resolution = hvae.arch.resolution
        self.groups = {a: VOCAB[a] for a in SCORED}
        data_root = self.data_root = Path(data_root)
        split = load_split(data_root, "test", self.resolution)
        n_all = len(split.ids)
        if n_all == 0:
            raise CxrcfError(f"{data_root}/metadata.csv: the test split is empty")
        rng = np.random.default_rng(self.cfg.seed)
        if n_all > self.cfg.max_images:
            idx = np.sort(rng.choice(n_all, self.cfg.max_images, replace=False))
        else:
            idx = np.arange(n_all)
        idx_t = torch.as_tensor(idx)
        self.x = split.x[idx_t]
        self.parents = {a: v[idx_t] for a, v in split.parents.items()}
        self.frame = split.frame.iloc[idx].reset_index(drop=True)
        self.ids = [split.ids[i] for i in idx]
        self.n = len(idx)
        self.has_truth = (data_root / "exogenous.csv").is_file()

        # The interventions' values: drawn once so every t_u sees the same ones.
        do = {
            "sex": 1.0 - self.parents["sex"],
            "finding": 1.0 - self.parents["finding"],
            "race": (self.parents["race"] + torch.as_tensor(rng.integers(1, 3, self.n))) % 3,
            "age": self.parents["age"][torch.as_tensor(rng.permutation(self.n))],
        }
        self.do = {k: {k: v} for k, v in do.items()}
        self.do["null"] = {}
        gen = torch.Generator().manual_seed(self.cfg.seed)
        self.parents_star = {k: self.scm.counterfactual(self.parents, d, generator=gen) for k, d in self.do.items()}
        self.bundle.to(device)  # after the SCM counterfactuals, whose generator lives on the CPU
        self.parents_np = {a: v.cpu().numpy() for a, v in self.parents.items()}
        self.real_probs = self._predict(self.x)
        self.truth = self._render_truth() if self.has_truth else None

    # ---------------------------------------------------------------------------- helpers
    def _batches(self):
        bs = self.cfg.batch_size
        for i in range(0, self.n, bs):
            yield slice(i, min(i + bs, self.n))

    def _predict(self, x) -> dict:
        import numpy as np
        import torch

        chunks = []
        with torch.no_grad():
            for s in self._batches():
                out = self.bundle.probabilities(x[s])
                chunks.append({k: v.float().cpu().numpy() for k, v in out.items()})
        return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}

    def _render_truth(self) -> dict:
        """True counterfactual images per intervention, at the model's resolution."""
        import torch

        from cxrcf.data import to_model_images
        from cxrcf.synth import render_counterfactuals

        truth = {}
        t0 = time.perf_counter()
        for k, d in self.do.items():
            values = {a: v.cpu().numpy() for a, v in d.items()}
            chunks = []
            for s in self._batches():
                frame = self.frame.iloc[s]
                # Rendered at the stored size (the frame's resolution), then resized like the test images.
                arr = render_counterfactuals(frame, {a: v[s] for a, v in values.items()})
                chunks.append(to_model_images(arr, self.resolution))
            truth[k] = torch.cat(chunks)
        print(f"[evaluate] rendered {self.n} true counterfactuals x {len(self.do)} interventions "
              f"in {time.perf_counter() - t0:.1f} s", flush=True)
        self.truth_probs = {k: self._predict(v) for k, v in truth.items()}
        # what doing nothing scores: the unedited image against each true counterfactual, per image
        self.x_l1_img = {k: _l1_per_image(self.x, v) for k, v in truth.items()}
        self.ideal_l1_img = self._ideal_l1(truth)
        return truth

    def _ideal_l1(self, truth: dict) -> dict:
        """Per-image L1 to the truth of the ideal model, for each do(k) whose truth x does not determine:
        the simulator's own counterfactual with the noise hidden by k = 0 drawn afresh (synth.HIDDEN_WHEN_ABSENT)."""
        from cxrcf.data import to_model_images
        from cxrcf.synth import HIDDEN_WHEN_ABSENT, redraw_hidden_noise, render_counterfactuals

        out = {}
        for k in HIDDEN_WHEN_ABSENT:
            if k not in self.do:
                continue
            frame = redraw_hidden_noise(self.frame, k, self.cfg.seed + 2)
            values = {a: v.cpu().numpy() for a, v in self.do[k].items()}
            ideal = to_model_images(render_counterfactuals(frame, values), self.resolution)
            out[k] = _l1_per_image(ideal, truth[k])
        return out

    def _l1_ratios(self, l1_img: dict) -> dict:
        """L1(x*, truth) / L1(x, truth): pooled, by flip direction of sex and finding, and over the images
        whose true counterfactual x determines (what the generator check gates)."""
        import numpy as np

        from cxrcf.synth import HIDDEN_WHEN_ABSENT

        def ratio(model, nothing, mask=None):
            model, nothing = np.asarray(model, dtype=np.float64), np.asarray(nothing, dtype=np.float64)
            if mask is not None:
                model, nothing = model[mask], nothing[mask]
            return float(model.mean() / max(nothing.mean(), 1e-12)) if len(model) else float("nan")

        factual = {a: self.parents_np[a] for a in ("sex", "finding")}
        by_direction = {k: {"0to1": ratio(l1_img[k], self.x_l1_img[k], factual[k] == 0),
                            "1to0": ratio(l1_img[k], self.x_l1_img[k], factual[k] == 1)} for k in factual}
        # adding an attribute whose noise the image hides has no determined truth: those images are left out
        identifiable = {k: ratio(l1_img[k], self.x_l1_img[k], factual[k] == 1 if k in HIDDEN_WHEN_ABSENT else None)
                        for k in INTERVENTIONS}
        ideal = {k: {"all": ratio(v, self.x_l1_img[k]), "0to1": ratio(v, self.x_l1_img[k], factual[k] == 0)}
                 for k, v in self.ideal_l1_img.items()}
        return {"l1_ratio_per_intervention": {k: ratio(l1_img[k], self.x_l1_img[k]) for k in INTERVENTIONS},
                "l1_ratio_by_direction": by_direction, "l1_ratio_identifiable": identifiable,
                "ideal_l1_ratio": ideal}

    def probe_latents(self) -> dict:
        """KL per block and linear probes on the abducted latents of the first `check.probe_images` images.

        The probes read the posterior means (t = 0): a posterior sample adds unit noise on every channel the
        model leaves at its prior, thousands of them, and that noise hid what the used channels carry from a
        linear read-out of ~500 images (effusion size R^2 0.12 on samples, 0.79 on means; issue 14 note)."""
        import numpy as np
        import torch

        from cxrcf.attributes import context
        from cxrcf.synth import evidence
        from pipelines.generator_check import latent_probes

        n = min(self.n, self.cfg.check.probe_images)
        gen = torch.Generator(device=self.device).manual_seed(self.cfg.seed + 1)
        feats = []
        with torch.no_grad():
            for i in range(0, n, self.cfg.batch_size):
                s = slice(i, min(i + self.cfg.batch_size, n))
                x = self.x[s].to(self.device)
                ctx = context({a: v[s] for a, v in self.parents.items()}).to(self.device)
                zs = self.hvae.abduct(x, ctx, t=0.0, generator=gen)
                feats.append(torch.cat([z.flatten(1) for z in zs], 1).float().cpu())
            m = min(n, 256)
            kl = self.hvae.kl_per_block(self.x[:m].to(self.device),
                                        context({a: v[:m] for a, v in self.parents.items()}).to(self.device))
        attrs = {a: v[:n] for a, v in self.parents_np.items()}
        ev = evidence(attrs, self.frame.iloc[:n]) if self.has_truth else None
        probes = latent_probes(torch.cat(feats).numpy().astype(np.float64), attrs, ev)
        pixels = float(self.x[0].numel())
        probes["kl_per_block"] = kl
        probes["kl_nats_per_pixel"] = sum(b["kl_nats"] for b in kl) / pixels
        return probes

    # ---------------------------------------------------------------------------- measurement
    def measure(self, t_values: list[float], keep_rows: int = 0) -> tuple[dict, dict, dict]:
        """Every intervention at every t_u from one abduction per batch.

        Returns ({t: metrics block}, predictor outputs on x* per intervention at t_values[0], the
        first `keep_rows` x* images at t_values[0]). Reversibility (a second abduction, of x*) is
        measured at t_values[0] on the first `evaluate.reversibility_images` images.
        """
        import numpy as np
        import torch

        from cxrcf.attributes import context
        from cxrcf.counterfactual import counterfactual, counterfactuals_shared

        keys = list(self.parents_star)
        t_main = t_values[0]
        n_back = min(self.n, self.cfg.reversibility_images)
        chunks = {t: {k: [] for k in keys} for t in t_values}
        diff_x = {t: dict.fromkeys(keys, 0.0) for t in t_values}
        diff_truth = {t: {k: [] for k in keys} for t in t_values}  # per-image L1, for ratios by direction
        diff_back = dict.fromkeys(keys, 0.0)
        kept = {k: [] for k in keys}
        gen = torch.Generator(device=self.device).manual_seed(self.cfg.seed)
        t0 = time.perf_counter()
        with torch.no_grad():
            for s in self._batches():
                x = self.x[s].to(self.device)
                ctx = context({a: v[s] for a, v in self.parents.items()}).to(self.device)
                ctx_stars = [context({a: v[s] for a, v in self.parents_star[k].items()}).to(self.device)
                             for k in keys]
                outs = counterfactuals_shared(self.hvae, x, ctx, ctx_stars, tuple(t_values), generator=gen)
                for k, ctx_star, per_t in zip(keys, ctx_stars, outs):
                    for t, xs in zip(t_values, per_t):
                        out = self.bundle.probabilities(xs)
                        chunks[t][k].append({a: v.float().cpu().numpy() for a, v in out.items()})
                        diff_x[t][k] += float((xs - x).abs().sum())
                        if self.truth is not None:
                            diff_truth[t][k].append(_l1_per_image(xs, self.truth[k][s].to(self.device)).cpu())
                    xs = per_t[0]
                    if k != "null" and s.start < n_back:
                        m = min(s.stop, n_back) - s.start
                        back = counterfactual(self.hvae, xs[:m], ctx_star[:m], ctx[:m], t_u=t_main, generator=gen)
                        diff_back[k] += float((back - x[:m]).abs().sum())
                    if s.start < keep_rows:
                        kept[k].append(xs[: keep_rows - s.start].cpu())
                print(f"[evaluate] {s.stop}/{self.n} images x {len(keys)} interventions x {len(t_values)} t_u "
                      f"in {time.perf_counter() - t0:.1f} s", flush=True)
        pixels = float(self.x[0].numel())
        blocks = {}
        for t in t_values:
            probs = {k: {a: np.concatenate([c[a] for c in chunks[t][k]]) for a in chunks[t][k][0]} for k in keys}
            back = {k: diff_back[k] / (pixels * n_back) for k in INTERVENTIONS} if t == t_main else None
            l1_truth = {k: torch.cat(v) for k, v in diff_truth[t].items()} if self.truth is not None else None
            blocks[t] = self._block(probs, {k: v / (pixels * self.n) for k, v in diff_x[t].items()}, l1_truth, back)
            if t == t_main:
                probs_main = probs
        return blocks, probs_main, {k: torch.cat(v).numpy() for k, v in kept.items() if v}

    def _block(self, probs_star: dict, l1_x: dict, l1_truth: dict, l1_back: dict | None) -> dict:
        import numpy as np

        from pipelines import metrics as M

        targets = {k: {a: v.cpu().numpy() for a, v in p.items()} for k, p in self.parents_star.items()}
        real_eff = {k: _effectiveness(self.real_probs, self.parents_np, k) for k in INTERVENTIONS}
        block = {"effectiveness": {k: _with_delta(_effectiveness(probs_star[k], targets[k], k), real_eff[k])
                                   for k in INTERVENTIONS}}
        pairs = amplification_pairs()
        block.update(_amp_block({(j, k): (self.real_probs[j], probs_star[k][j]) for j, k in pairs},
                                self.parents_np, self.groups))
        # Under the null intervention every attribute is non-intervened: its AMP is pure generator drift.
        block["amplification"]["null"] = {
            j: M.amplification(self.real_probs[j], probs_star["null"][j], self.parents_np[j], self.groups[j])
            for j in SCORED}
        block["composition_l1"] = l1_x["null"]
        block["effectiveness_mean_auc"] = _headline_auc(block["effectiveness"])
        if l1_back is not None:
            block["reversibility_l1"] = float(np.mean(list(l1_back.values())))
            block["reversibility"] = l1_back
        if self.truth is not None:
            gt = _amp_block({(j, k): (self.truth_probs[k][j], probs_star[k][j]) for j, k in pairs},
                            self.parents_np, self.groups)
            true_shift = _amp_block({(j, k): (self.real_probs[j], self.truth_probs[k][j]) for j, k in pairs},
                                    self.parents_np, self.groups)
            truth_eff = {k: _effectiveness(self.truth_probs[k], targets[k], k) for k in INTERVENTIONS}
            block["ground_truth"] = {
                "cf_l1": float(np.mean([float(l1_truth[k].mean()) for k in INTERVENTIONS])),
                "cf_l1_per_intervention": {k: float(v.mean()) for k, v in l1_truth.items()},
                "x_l1_per_intervention": {k: float(self.x_l1_img[k].mean()) for k in INTERVENTIONS},
                # below 1: the model lands closer to the true counterfactual than doing nothing
                **self._l1_ratios(l1_truth),
                "amplification": gt["amplification"],
                "drift": gt["drift"],
                # What the predictor's beliefs do between x and the TRUE counterfactual (the floor a
                # perfect generator would reach on this predictor).
                "true_amplification": true_shift["amplification"],
                "effectiveness": truth_eff,
                "effectiveness_mean_auc": _headline_auc(truth_eff),
            }
        return block


def _l1_per_image(a, b):
    """Mean absolute pixel difference of each image pair, (N,), in the model's [-1, 1] scale."""
    return (a - b).abs().flatten(1).mean(1)


def _headline_auc(effectiveness: dict) -> float:
    """Mean AUC of the intervened attribute over sex, race (macro) and finding: the curve's x axis."""
    vals = [effectiveness[k].get("auc") for k in SCORED if effectiveness.get(k)]
    vals = [v for v in vals if isinstance(v, (int, float)) and math.isfinite(v)]
    return float(sum(vals) / len(vals)) if vals else float("nan")


def _figures(ev: _Evaluator, probs_star: dict, kept: dict, figures_dir: Path, name: str) -> list[Path]:
    from pipelines import figures as FIG
    from pipelines import metrics as M

    figures_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for k in INTERVENTIONS:
        panels = []
        for j, kk in amplification_pairs():
            if kk != k:
                continue
            y = ev.parents_np[j]
            if j == "race":
                before = M.log_odds_factual(ev.real_probs[j], y)
                after = M.log_odds_factual(probs_star[k][j], y)
            else:
                before, after = M.logit(ev.real_probs[j]), M.logit(probs_star[k][j])
            panels.append({"j": j, "before": before, "after": after, "labels": y, "groups": ev.groups[j]})
        written.append(FIG.amplification_scatter(k, panels, figures_dir / f"scatter_do_{k}.png",
                                                 title=f"{name}: predictor on x vs x*"))
    columns = [("factual", ev.x[:GRID_ROWS].numpy())]
    for k in INTERVENTIONS + ("null",):
        columns.append((f"do({k})", kept[k]))
        if ev.truth is not None and k != "null":
            columns.append((f"true do({k})", ev.truth[k][:GRID_ROWS].numpy()))
    written.append(FIG.counterfactual_grid(columns, figures_dir / "grid.png", title=f"{name} counterfactuals"))
    return written


def _mlflow_rows(result: dict) -> list[tuple[str, float, int]]:
    """Numeric leaves as metric rows `eval/<path>` (MLflow keys allow no '|' or parentheses)."""
    rows = []

    def walk(obj, prefix):
        if isinstance(obj, dict):
            for key, value in obj.items():
                safe = str(key).replace("|do(", "_do_").replace(")", "").replace("(", "_")
                walk(value, f"{prefix}/{safe}")
        elif isinstance(obj, (int, float)) and not isinstance(obj, bool) and math.isfinite(obj):
            rows.append((prefix, float(obj), 0))

    for key in ("effectiveness", "amplification", "drift", "composition_l1", "reversibility_l1", "ground_truth",
                "extra_t_u", "latents"):
        if key in result:
            walk(result[key], f"eval/{key}")
    if "generator_check" in result:
        rows.append(("eval/generator_check/passed", float(result["generator_check"]["passed"]), 0))
    return rows


def _log_to_mlflow(run_id: str, result: dict, out_json: Path, figures: list[Path]) -> None:
    from mlflow.exceptions import MlflowException

    from store import tracking

    try:
        tracking.log_metrics(run_id, _mlflow_rows(result))
        tracking.log_artifacts(run_id, out_json, "eval")
        for path in figures:
            tracking.log_artifacts(run_id, path, "eval/figures")
    except MlflowException as err:  # the run may live in another tracking store; the JSON is still valid
        print(f"[evaluate] warning: could not log to MLflow run {run_id} at {tracking.tracking_uri()}: "
              f"{type(err).__name__}: {str(err).splitlines()[0][:200]}", flush=True)
        return
    print(f"[evaluate] logged {len(_mlflow_rows(result))} metrics to MLflow run {run_id}", flush=True)


def evaluate_generator(params, data_root, generator_dir, scm_dir, predictor_dir, name, out_json,
                       figures_dir=None) -> dict:
    """Evaluate one generator; writes `out_json` (and figures) and returns the result dict."""
    import torch

    from cxrcf.fileio import write_json

    t0 = time.perf_counter()
    hvae, scm, predictor, run_id, source = load_components(generator_dir, scm_dir, predictor_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ev = _Evaluator(params, data_root, hvae, scm, predictor, device)
    print(f"[evaluate] {name}: {ev.n} test images, {len(ev.do)} interventions, t_u={params.evaluate.t_u:g}"
          f"{' + ' + ','.join(f'{t:g}' for t in params.evaluate.extra_t_u) if params.evaluate.extra_t_u else ''}"
          f", ground truth {'yes' if ev.has_truth else 'no'}, device {device}", flush=True)
    t_values = [params.evaluate.t_u] + [t for t in dict.fromkeys(params.evaluate.extra_t_u)
                                        if t != params.evaluate.t_u]
    blocks, probs_star, kept = ev.measure(t_values, keep_rows=GRID_ROWS)
    result = {"name": name, "generator": source, "n_images": ev.n, "t_u": params.evaluate.t_u,
              "seed": params.evaluate.seed, "reversibility_images": min(ev.n, params.evaluate.reversibility_images),
              "interventions": {
                  "sex": "flip", "finding": "flip", "race": "a different race, seeded",
                  "age": "seeded permutation of the test ages (finding follows through the SCM)"},
              **blocks[params.evaluate.t_u]}
    # The same abducted noise serves every t_u, so the extra values differ from the main one by t_u alone.
    result["extra_t_u"] = {f"{t:g}": blocks[t] for t in t_values[1:]}
    result["latents"] = ev.probe_latents()
    result["generator_check"] = run_check(result, params.evaluate.check)
    result["seconds"] = time.perf_counter() - t0
    result = _clean(result)
    out_json = Path(out_json)
    write_json(out_json, result)
    figures = _figures(ev, probs_star, kept, Path(figures_dir), name) if figures_dir else []
    if run_id:
        _log_to_mlflow(run_id, result, out_json, figures)
    check = result["generator_check"]
    print(f"[evaluate] {name}: generator check {'passed' if check['passed'] else 'FAILED'}: {check['summary']}",
          flush=True)
    print(f"[evaluate] {name}: AMP mean {_fmt(result['amplification']['mean'])} "
          f"(worst {_fmt(result['amplification']['worst'])} {result['amplification']['worst_pair']}), "
          f"mean AUC {_fmt(result['effectiveness_mean_auc'])}, composition L1 {_fmt(result['composition_l1'])}"
          f" -> {out_json} in {result['seconds']:.1f} s", flush=True)
    return result


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="cxrcf evaluate", description=__doc__.split("\n\n")[0])
    add_params(parser)
    parser.add_argument("--data", default=None, help="data root (default: params data.root)")
    parser.add_argument("--generator", required=True, help="HVAE export directory or models:/NAME@ALIAS URI")
    parser.add_argument("--scm", default=None, help="SCM export directory (optional with a models:/ URI)")
    parser.add_argument("--predictor", default=None, help="evaluation predictor export directory "
                                                          "(optional with a models:/ URI)")
    parser.add_argument("--name", required=True, help="label of this generator, e.g. none, hard, soft")
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--figures", default=None, help="folder for the PNG figures")
    args = parser.parse_args(argv)
    from cxrcf.config import load_params

    params = load_params(args.params)
    evaluate_generator(params, args.data or params.data.root, args.generator, args.scm, args.predictor,
                       args.name, args.out, args.figures)
    return 0
