"""Lineage a registered generator carries: the data it was trained on, the code, its parent runs.

`training_lineage` is called by a training stage on the data it actually read, and its tags are
set on that stage's MLflow run; `registration_lineage` reads them back at registration, so a model
version names the data hash its weights saw rather than whatever `data.dvc` says at registration.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Mapping
from pathlib import Path

from cxrcf.errors import CxrcfError

HASH_TAG, PINNED_TAG, DIRTY_TAG, COMMIT_TAG = "data_hash", "data_hash_pinned", "git_dirty", "git_commit"
PARENT_PREFIX = "lineage.parent."


def _file_md5(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "md5").hexdigest()


def dataset_hash(root: str | Path) -> str:
    """The content hash `dvc add` records for a directory (`<md5>.dir`), computed from the files.

    DVC hashes a directory as the md5 of its sorted manifest `[{"md5", "relpath"}, ...]` serialised
    as sorted-key JSON; matching it lets the hash of the data read be compared with `data.dvc`.
    """
    root = Path(root)
    if not root.is_dir():
        raise CxrcfError(f"{root}: data directory does not exist")
    entries = [{"md5": _file_md5(p), "relpath": p.relative_to(root).as_posix()}
               for p in root.rglob("*") if p.is_file() and not p.name.startswith(".dvc")]
    if not entries:
        raise CxrcfError(f"{root}: data directory holds no files")
    manifest = json.dumps(sorted(entries, key=lambda e: e["relpath"]), sort_keys=True)
    return hashlib.md5(manifest.encode()).hexdigest() + ".dir"


def git_state(cwd: str | Path | None = None) -> tuple[str, bool | None]:
    """(HEAD commit or "", whether tracked files differ from it; None when git cannot tell)."""
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=20, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return None

    head = git("rev-parse", "HEAD")
    if head is None or head.returncode != 0:
        return "", None
    status = git("status", "--porcelain", "--untracked-files=no")
    dirty = None if status is None or status.returncode != 0 else bool(status.stdout.strip())
    return head.stdout.strip(), dirty


def training_lineage(data_root: str | Path, dvc_file: str | Path | None = "data.dvc",
                     parents: Mapping[str, str | None] | None = None, cwd: str | Path | None = None) -> dict[str, str]:
    """Tags for a training run: the hash of the data read, the code state, the parent runs.

    Refuses (CxrcfError) when `dvc_file` pins another hash than the data read: a model must not be
    recorded as trained on data it never saw. `parents` maps a role (e.g. `pretraining`,
    `guidance_predictor`) to the run the stage started from.
    """
    from cxrcf.data import dvc_data_hash

    found = dataset_hash(data_root)
    pinned = dvc_data_hash(dvc_file) if dvc_file else None
    if pinned and pinned != found:
        raise CxrcfError(f"{data_root}: the data read hashes to {found}, but {dvc_file} pins {pinned} "
                         f"(run `dvc checkout` or re-pin with `dvc add`)")
    commit, dirty = git_state(cwd)
    tags = {HASH_TAG: found, PINNED_TAG: pinned or "", COMMIT_TAG: commit,
            DIRTY_TAG: "" if dirty is None else str(dirty).lower()}
    tags.update({f"{PARENT_PREFIX}{role}_run_id": rid for role, rid in (parents or {}).items() if rid})
    return tags


def registration_lineage(client, generator_run_id: str | None, dvc_file: str | Path = "data.dvc",
                         cwd: str | Path | None = None) -> dict[str, str]:
    """The lineage tags for a model version, taken from its training run where that run recorded them.

    Refuses when the run's data hash disagrees with `dvc_file`. A run without lineage tags (or
    no run) falls back to `dvc_file` and the current checkout, and says so in `data_hash_source`.
    """
    from mlflow.exceptions import MlflowException

    from cxrcf.data import dvc_data_hash

    pinned = dvc_data_hash(dvc_file) or ""
    commit, dirty = git_state(cwd)
    run_tags: dict[str, str] = {}
    if generator_run_id:
        try:
            run_tags = dict(client.get_run(generator_run_id).data.tags)
        except MlflowException:
            run_tags = {}
    if run_tags.get(HASH_TAG):
        if pinned and run_tags[HASH_TAG] != pinned:
            raise CxrcfError(f"run {generator_run_id} was trained on data {run_tags[HASH_TAG]}, but {dvc_file} "
                             f"pins {pinned}: register from the checkout the model was trained on")
        out = {HASH_TAG: run_tags[HASH_TAG], "data_hash_source": f"run {generator_run_id}",
               COMMIT_TAG: run_tags.get(COMMIT_TAG, commit), DIRTY_TAG: run_tags.get(DIRTY_TAG, "")}
        out.update({k: v for k, v in run_tags.items() if k.startswith(PARENT_PREFIX)})
        return out
    return {HASH_TAG: pinned, "data_hash_source": str(dvc_file) if pinned else "none",
            COMMIT_TAG: commit, DIRTY_TAG: "" if dirty is None else str(dirty).lower()}
