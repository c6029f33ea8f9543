"""Runs that survive their driver.

Each phase's run is recorded beside the Ray Train checkpoints when they are on a local or NFS folder, in
`<ray.storage_path>/cxrcf-runs/<phase>-<hash of the output folder>.json`, and beside the output folder,
in `<parent of the output>/cxrcf-runs/`, when they are on S3 (`s3://...`): the record is the driver's
(its host, pid and start time can only be checked on the driver's machine, and the output folder it
exports to is the driver's too), it must be replaced atomically (S3 has no rename), and what other nodes
need of the run, its checkpoints and its MLflow run, is already shared. It holds the Ray Train run name, the
MLflow run id, a fingerprint of what the run was asked to do, and the driver's host, pid and process
start time. With it:
- `--resume` continues an interrupted run (RUNNING with a dead driver, FAILED or KILLED) under the same
  Ray Train name, so Ray Train hands the workers its latest checkpoint, and in the same MLflow run;
  a finished run, or one asked to do something else (params, data, lineage changed), starts afresh;
- any later invocation for the same output marks a run whose driver died (still RUNNING) KILLED;
- a run whose driver is alive is never taken over: a second driver gets one line naming it.
The record is keyed by output folder, not by phase alone, so the study's many CFT runs never share one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
from pathlib import Path

from cxrcf.errors import CxrcfError
from cxrcf.fileio import read_json, write_json

RECORD_DIR = "cxrcf-runs"
RESUMABLE = ("RUNNING", "FAILED", "KILLED")


def storage_root(ray_cfg) -> Path:
    """Ray Train's storage folder, absolute (Ray Train requires it); local or NFS storage only."""
    if "://" in ray_cfg.storage_path:
        raise CxrcfError(f"ray.storage_path: {ray_cfg.storage_path!r} is not a local folder")
    return Path(ray_cfg.storage_path).expanduser().resolve()


def record_root(ray_cfg, out: str | Path) -> Path:
    """The folder whose `cxrcf-runs/` holds the run records: the storage folder when it is local or NFS,
    otherwise (s3://) the output folder's parent (see the module docstring for why)."""
    if "://" in ray_cfg.storage_path:
        return Path(out).expanduser().resolve().parent
    return storage_root(ray_cfg)


def record_path(storage: Path, phase: str, out: str | Path) -> Path:
    key = hashlib.sha256(str(Path(out).expanduser().resolve()).encode()).hexdigest()[:12]
    return storage / RECORD_DIR / f"{phase}-{key}.json"


def code_hash() -> str:
    """The training code (the `cxrcf` and `training` packages): a fix to it starts a new run, rather
    than continuing, or re-reporting the fault of, a checkpoint the old code wrote."""
    import cxrcf
    import training

    digest = hashlib.sha256()
    for package in (cxrcf, training):
        root = Path(package.__file__).parent
        for path in sorted(root.glob("*.py")):
            digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def fingerprint(params, phase: str, extra_params: dict | None, data_hash: str | None = None) -> str:
    """What the run was asked to do: a checkpoint only continues the same request on the same data
    with the same code. `data_hash`: the content hash of the data the run reads (its lineage); without
    one, the pin of data.dvc in the working directory stands in for it."""
    from cxrcf.data import dvc_data_hash

    request = {"phase": phase, "params": params.model_dump(mode="json"), "extra": extra_params or {},
               "data": data_hash or dvc_data_hash(), "code": code_hash()}
    return hashlib.sha256(json.dumps(request, sort_keys=True, default=str).encode()).hexdigest()


def _process_start(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def driver_alive(record: dict) -> bool:
    """True while the process that wrote `record` runs. A driver on another host cannot be checked
    from here; the record's run is then treated as abandoned, as its status alone cannot tell."""
    pid = record.get("pid")
    if record.get("host") != socket.gethostname() or not isinstance(pid, int) or pid == os.getpid():
        return False
    started = _process_start(pid)
    # the start time tells the recorded driver from a later process that reuses its pid
    return started is not None and abs(started - float(record.get("started", 0.0))) < 1.0


def open_run(params, phase: str, out: str | Path, resume: bool, extra_params: dict | None = None,
             data_root: str | Path | None = None, parents: dict[str, str | None] | None = None) -> tuple[str, str]:
    """(Ray Train run name, MLflow run id) for this invocation: the interrupted run when `resume` finds
    one it may continue, otherwise a new run, tagged with the lineage of `data_root` and the `parents`
    runs (role -> run id); the record then names this driver."""
    from store import tracking
    from store.lineage import HASH_TAG, tracking_dvc_file, training_lineage
    from training.loop import resolve_storage, say, unique_name

    # before any run exists: data that disagrees with data.dvc is refused with nothing written
    lineage = training_lineage(data_root, tracking_dvc_file(data_root), parents) if data_root is not None else {}

    resolve_storage(params.ray)  # a bad or unreachable ray.storage_path stops here, before any run exists
    path = record_path(record_root(params.ray, out), phase, out)
    wanted = fingerprint(params, phase, extra_params, lineage.get(HASH_TAG))
    prior = read_json(path) if path.is_file() else None
    if prior is not None and not (isinstance(prior, dict) and {"name", "run_id", "fingerprint"} <= prior.keys()):
        raise CxrcfError(f"{path}: not a cxrcf run record (expected name, run_id, fingerprint); delete it to start anew")
    name = run_id = None
    if prior:
        status = tracking.run_status(prior["run_id"])
        if status == "RUNNING" and driver_alive(prior):
            raise CxrcfError(f"train {phase}: {out} is being trained by run {prior['name']} (driver pid "
                             f"{prior['pid']} on {prior['host']}); stop it first, then rerun with --resume")
        why_not = ("its MLflow run is not in this tracking store" if status is None
                   else "it finished" if status not in RESUMABLE
                   else "its params, data, inputs or code changed" if prior["fingerprint"] != wanted
                   else None)
        if resume and why_not is None:
            name, run_id = prior["name"], prior["run_id"]
            tracking.reopen_run(run_id)
            say(f"[{phase}] resuming Ray Train run {name} (MLflow run {run_id}, was {status})")
        else:
            if status == "RUNNING":
                tracking.end_run(prior["run_id"], killed=True)
                say(f"[{phase}] run {prior['name']} lost its driver: marked KILLED in MLflow")
            if resume:
                say(f"[{phase}] not resuming run {prior['name']}: {why_not}; starting a new run")
    elif resume:
        say(f"[{phase}] nothing to resume for {out}; starting a new run")
    if run_id is None:
        name = unique_name(phase)
        run_id = tracking.start_run(params, phase, run_name=name, extra_params=extra_params,
                                    extra_tags={"ray_run": name, **lineage})
    write_json(path, {"phase": phase, "out": str(Path(out).expanduser().resolve()), "name": name, "run_id": run_id,
                      "fingerprint": wanted, "host": socket.gethostname(), "pid": os.getpid(),
                      "started": _process_start(os.getpid())})
    return name, run_id


@contextlib.contextmanager
def ending(run_id: str):
    """Ends the MLflow run if the block does not: KILLED when a signal stopped it, FAILED on an error.
    Ray Train's Ctrl-C handler leaves by `sys.exit(0)` and Ray's SIGTERM handler by `sys.exit(15)`,
    so a SystemExit here is an interruption too; it goes on as KeyboardInterrupt, never as success."""
    from store import tracking

    try:
        yield
    except (KeyboardInterrupt, SystemExit):
        tracking.end_run(run_id, killed=True)
        raise KeyboardInterrupt from None
    except BaseException:
        tracking.end_run(run_id, ok=False)
        raise
