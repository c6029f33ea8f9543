"""Phase `scm`: fit the attribute mechanisms (`cxrcf.scm.AttributeSCM`) on the training parents.

A few hundred parameters, full-batch: it runs in the driver process, without Ray workers, whose
start-up would cost more than the fit. It is tracked in MLflow like every other phase.
"""

from __future__ import annotations

from pathlib import Path


def train_scm(params, data_root, out_dir, metrics_file=None) -> dict:
    import time

    import torch

    from cxrcf.data import load_metadata, parents_from_frame
    from cxrcf.scm import AttributeSCM
    from store import tracking
    from training.common import finish, write_model
    from training.resume import ending, open_run

    frame = load_metadata(data_root)
    parents = {}
    for split in ("train", "val"):
        rows = frame[frame["split"] == split]
        if rows.empty:
            from cxrcf.errors import CxrcfError

            raise CxrcfError(f"{Path(data_root) / 'metadata.csv'}: no rows with split = {split}")
        parents[split] = parents_from_frame(rows)
    # Seconds of work: nothing to resume, but a run whose driver died is still marked KILLED.
    _, run_id = open_run(params, "scm", out_dir, resume=False, data_root=data_root)
    with ending(run_id):
        torch.manual_seed(params.scm.seed)
        scm = AttributeSCM(params.scm)
        t0 = time.perf_counter()
        every = max(1, params.scm.steps // 10)
        history = scm.fit(parents["train"], log_every=every)
        wall = time.perf_counter() - t0
        tracking.log_metrics(run_id, [("nll", v, i + 1) for i, v in enumerate(history)])
        with torch.no_grad():
            val_nll = float(-scm.log_prob(parents["val"]).mean())
        metrics = {"train_nll": history[-1], "val_nll": val_nll, "steps": float(params.scm.steps), "wall_s": wall}
        out_dir = write_model(scm, out_dir, run_id, metrics, meta={"preset": params.preset})
        finish(run_id, metrics, metrics_file, {"model": out_dir})
    print(f"[scm] done: train_nll={metrics['train_nll']:.4f} val_nll={val_nll:.4f} ({wall:.1f}s)", flush=True)
    return {"run_id": run_id, "metrics": metrics, "out_dir": str(out_dir)}

