"""Train an evidence regressor on SynthCXR and validate it on TRUE counterfactuals (issue 15).

`python -m training.evidence --data data --out artifacts/models/evidence_regressor` trains a small
CNN (cxrcf/evidence_model.py) on the train split to predict `evidence.csv` from the image, then
checks it where the answer is known: on the simulator's true counterfactuals of validation images,
the non-intervened evidence must not move (its true change is exactly 0) and the intervened evidence
must move as the simulator says. `validation.json` beside the model holds both, and `passed`.

A single-process loop: the model is a few thousand parameters and trains in about a minute on two
cores, so a Ray Train worker group would cost more to start than the training itself.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from cxrcf.errors import CxrcfError

# Validation floors: the non-intervened evidence's mean shift on true counterfactuals must stay below
# this fraction of the evidence's spread; the intervened evidence's predicted change must correlate
# with the true change at least this much.
MAX_FALSE_SHIFT = 0.1
MIN_CHANGE_CORR = 0.5
FLIPS = ("sex", "finding", "race")


def _frame_arrays(data_root, split: str, resolution: int):
    from cxrcf.data import load_split
    from cxrcf.synth import load_evidence

    arrays = load_split(data_root, split, resolution)
    ev = load_evidence(data_root).set_index("id").loc[arrays.ids]
    return arrays, ev


def _flip_values(frame, k: str) -> np.ndarray:
    from cxrcf.attributes import VOCAB

    codes = frame[k].map(VOCAB[k].index).to_numpy()
    return (codes + 1) % len(VOCAB[k])


def validate_on_true_counterfactuals(model, data_root, n_images: int = 512, seed: int = 0) -> dict:
    """Per intervention and target: the predicted change between x and its true counterfactual
    against the simulator's true change (non-intervened: exactly 0)."""
    from cxrcf.data import split_frame, to_model_images
    from cxrcf.synth import EVIDENCE_OF, counterfactual_evidence, render_counterfactuals

    frame = split_frame(data_root, "val")
    if len(frame) == 0:
        raise CxrcfError(f"{data_root}: the val split is empty")
    rng = np.random.default_rng(seed)
    frame = frame.iloc[np.sort(rng.choice(len(frame), min(n_images, len(frame)), replace=False))]
    frame = frame.reset_index(drop=True)
    base = counterfactual_evidence(frame, {})
    x = to_model_images(render_counterfactuals(frame, {}), model.resolution)
    pred_x = {t: v.numpy() for t, v in model.predict(x).items()}
    out, ok = {}, True
    for k in FLIPS:
        do = {k: _flip_values(frame, k)}
        truth = to_model_images(render_counterfactuals(frame, do), model.resolution)
        pred_t = {t: v.numpy() for t, v in model.predict(truth).items()}
        true_cf = counterfactual_evidence(frame, do)
        rows = {}
        for t in model.targets:
            change = pred_t[t] - pred_x[t]
            true_change = true_cf[t] - base[t]
            spread = float(np.std(base[t])) or 1.0
            if t in EVIDENCE_OF[k]:
                corr = float(np.corrcoef(change, true_change)[0, 1]) if np.std(true_change) > 0 else float("nan")
                passed = bool(corr >= MIN_CHANGE_CORR)
                rows[t] = {"role": "intervened", "pred_change": float(change.mean()),
                           "true_change": float(true_change.mean()), "corr": corr, "passed": passed}
            else:
                shift = float(change.mean())
                passed = bool(abs(shift) <= MAX_FALSE_SHIFT * spread)
                rows[t] = {"role": "kept", "pred_change": shift, "true_change": float(true_change.mean()),
                           "stderr": float(change.std(ddof=1) / math.sqrt(len(change))),
                           "limit": MAX_FALSE_SHIFT * spread, "passed": passed}
            ok &= passed
        out[f"do({k})"] = rows
    return {"n_images": len(frame), "passed": bool(ok), "interventions": out}


def train_evidence(data_root, out_dir, resolution: int = 32, width: int = 16, steps: int = 600,
                   batch_size: int = 64, lr: float = 2e-3, seed: int = 0, validate_images: int = 512) -> dict:
    from cxrcf.evidence_model import EvidenceRegressor
    from cxrcf.fileio import write_json

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    model = EvidenceRegressor(resolution, width)
    train, ev_train = _frame_arrays(data_root, "train", resolution)
    val, ev_val = _frame_arrays(data_root, "val", resolution)
    y = torch.as_tensor(ev_train[list(model.targets)].to_numpy(np.float32))
    model.mean.copy_(y.mean(0))
    model.std.copy_(y.std(0).clamp_min(1e-6))
    z = (y - model.mean) / model.std
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        idx = torch.randint(0, len(z), (batch_size,), generator=gen)
        loss = torch.nn.functional.mse_loss(model(train.x[idx]), z[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % max(1, steps // 5) == 0:
            print(f"[evidence] step {step + 1}/{steps} loss {loss.item():.4f}", flush=True)
    model.eval()
    with torch.no_grad():
        pred = {t: v.numpy() for t, v in model.predict(val.x).items()}
    r2 = {}
    for t in model.targets:
        truth = ev_val[t].to_numpy()
        r2[t] = float(1 - np.mean((pred[t] - truth) ** 2) / max(np.var(truth), 1e-12))
    validation = validate_on_true_counterfactuals(model, data_root, validate_images, seed)
    metrics = {"val_r2": r2, "true_counterfactuals": validation, "seconds": time.perf_counter() - t0,
               "steps": steps, "resolution": resolution}
    model.save(out_dir, meta={"val_r2": r2, "passed": validation["passed"]})
    write_json(Path(out_dir) / "validation.json", metrics)
    print(f"[evidence] val R2 {', '.join(f'{t} {v:.2f}' for t, v in r2.items())}; true-counterfactual check "
          f"{'passed' if validation['passed'] else 'FAILED'} -> {out_dir} in {metrics['seconds']:.0f} s", flush=True)
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.evidence", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="data")
    parser.add_argument("--out", default="artifacts/models/evidence_regressor")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not (Path(args.data) / "exogenous.csv").is_file():
        raise CxrcfError(f"--data {args.data}: not a SynthCXR dataset (no exogenous.csv); evidence exists only there")
    metrics = train_evidence(args.data, args.out, args.resolution, args.width, args.steps, seed=args.seed)
    print(json.dumps(metrics["val_r2"]))
    return 0


if __name__ == "__main__":
    import sys

    try:
        sys.exit(main())
    except CxrcfError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
