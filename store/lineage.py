"""Lineage a training run records on its MLflow run: the hash of the data it actually read (DVC's own
directory hash, refused when data.dvc pins another), the code state (commit and dirty flag) and the runs
it started from. Registration reads these tags back (pipelines/lineage.py), so a model version names the
data its weights saw rather than whatever data.dvc says at registration.
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


def tracking_dvc_file(data_root: str | Path, dvc_file: str | Path = "data.dvc") -> Path | None:
    """`dvc_file` when it pins `data_root` (its first output, relative to the file, is that folder), else None:
    tests and ad-hoc runs train on other folders, about which data.dvc says nothing."""
    import yaml

    path = Path(dvc_file)
    if not path.is_file():
        return None
    try:
        tracked = (yaml.safe_load(path.read_text()) or {})["outs"][0]["path"]
    except (yaml.YAMLError, KeyError, IndexError, TypeError):
        return None  # not ours to judge here; registration reads it strictly
    return path if (path.parent / tracked).resolve() == Path(data_root).resolve() else None

