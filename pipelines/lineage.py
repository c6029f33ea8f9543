"""Lineage a registered generator carries: the data it was trained on, the code, its parent runs.

Training stages record it on their MLflow runs (store/lineage.py, on the data they actually read);
`registration_lineage` reads it back, so a model version names the data hash its weights saw rather
than whatever `data.dvc` says at registration.
"""

from __future__ import annotations

from pathlib import Path

from cxrcf.errors import CxrcfError
from store.lineage import COMMIT_TAG, DIRTY_TAG, HASH_TAG, PARENT_PREFIX, git_state


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
