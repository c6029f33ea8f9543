"""run.json: the MLflow run a model directory came from, written beside every exported model."""

from __future__ import annotations

from pathlib import Path

from cxrcf.errors import CxrcfError
from cxrcf.fileio import read_json, write_json

RUN_FILE = "run.json"


def write_run_json(directory: str | Path, run_id: str, metrics: dict[str, float]) -> Path:
    """`directory`/run.json = {run_id, metrics}; metrics must already be JSON-safe numbers."""
    path = Path(directory) / RUN_FILE
    write_json(path, {"run_id": run_id, "metrics": metrics})
    return path


def read_run_id(directory: str | Path) -> str | None:
    """The MLflow run id in a model directory's run.json (None when the directory has none)."""
    path = Path(directory) / RUN_FILE
    if not path.is_file():
        return None
    run = read_json(path)
    if not isinstance(run, dict):
        raise CxrcfError(f"{path}: not a JSON object with run_id")
    return run.get("run_id")
