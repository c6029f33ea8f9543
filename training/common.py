"""Driver-side glue every phase shares: data loaders for the workers, the MLflow run around one
fit, and the outputs (export directory, run.json, metrics JSON, artifacts)."""

from __future__ import annotations

import contextlib
import functools
import math
from pathlib import Path
from typing import Any

from cxrcf.errors import CxrcfError
from cxrcf.fileio import write_json
from store.runs import write_run_json


def load_arrays(data_root: str, resolution: int, split: str):
    """(x, parents) of one split; runs on the workers, so it takes plain arguments."""
    from cxrcf.data import load_split

    arrays = load_split(data_root, split, resolution)
    return arrays.x, arrays.parents


def loader(data_root: str | Path, resolution: int):
    root = Path(data_root)
    if not (root / "metadata.csv").is_file():
        raise CxrcfError(f"{root}: no metadata.csv; not a cxrcf dataset (run `cxrcf data synth`)")
    return functools.partial(load_arrays, str(root.resolve()), resolution)


def finite(metrics: dict[str, Any]) -> dict[str, float]:
    """JSON-safe numeric metrics (NaN/inf dropped so DVC and MLflow accept them)."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, (int, float)) and math.isfinite(float(value)):
            out[key] = float(value)
    return out


@contextlib.contextmanager
def tracked_fit(params, phase: str, tasks, out: str | Path, resume: bool = False, extra_params: dict | None = None,
                data_root: str | Path | None = None, parents: dict[str, str | None] | None = None, **loop_kwargs):
    """One TorchTrainer.fit over `tasks` inside the phase's MLflow run (a new run tagged with the lineage of
    `data_root` and `parents`, or with `resume` the interrupted run that was writing `out`; see
    training/resume.py and store/lineage.py). Yields (FitResult, run_id); the
    block exports and calls `finish`. Anything escaping the block (or the fit) ends the run FAILED, or
    KILLED for Ctrl-C and SIGTERM. `loop_kwargs` are LoopConfig fields (the tests' `step_hooks`)."""
    from store import tracking
    from training.loop import LoopConfig, fit
    from training.resume import ending, open_run

    name, run_id = open_run(params, phase, out, resume, extra_params, data_root=data_root, parents=parents)
    with ending(run_id):
        cfg = LoopConfig(tasks=tasks, run_id=run_id, tracking_uri=tracking.tracking_uri(),
                         metric_prefix=len(tasks) > 1, **loop_kwargs)
        yield fit(cfg, params.ray, phase, run_name=name), run_id


def write_model(model, out_dir: str | Path, run_id: str, metrics: dict, meta: dict | None = None) -> Path:
    """Export `model` and its run.json (run_id, metrics) into `out_dir`."""
    from cxrcf.export import save_model

    out_dir = Path(out_dir)
    save_model(model, out_dir, meta={"run_id": run_id, **(meta or {})})
    write_run_json(out_dir, run_id, finite(metrics))
    return out_dir


def finish(run_id: str, metrics: dict, metrics_file: str | Path | None, artifacts: dict[str, Path]) -> None:
    """Final metrics, artifacts (artifact path -> local file/dir) and the metrics JSON for DVC."""
    from store import tracking

    clean = finite(metrics)
    # Keys the workers already logged per step keep their history; only the summary-only ones are added.
    logged = set(tracking.client().get_run(run_id).data.metrics)
    tracking.log_metrics(run_id, [(k, v, 0) for k, v in clean.items() if k not in logged])
    for artifact_path, local in artifacts.items():
        tracking.log_artifacts(run_id, local, artifact_path)
    if metrics_file:
        write_json(metrics_file, {"run_id": run_id, **clean})
    tracking.end_run(run_id, ok=True)


def batched(fn, x, parents: dict, device, batch: int = 256):
    """Apply `fn(x_chunk, parents_chunk)` over chunks on `device`; returns the list of outputs."""
    outs = []
    for i in range(0, len(x), batch):
        xc = x[i:i + batch].to(device)
        pc = {k: v[i:i + batch].to(device) for k, v in parents.items()}
        outs.append(fn(xc, pc))
    return outs
