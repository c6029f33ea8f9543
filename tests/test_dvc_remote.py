"""README's "A DVC remote" recipe, run as written against a local-directory remote.

A repo shaped like the project (`data/` pinned by `data.dvc` from `dvc add data`, a model folder as
a stage output in `dvc.lock`) pushes to `dvc remote add -d storage DIR`; a plain `git clone` of it
then gets both back with `dvc pull` alone, and a clone whose remote folder is gone fails loudly.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from helpers import DVC, git_dvc_repo, run_ok

MODEL = "artifacts/models/x"
# A stand-in for a training stage: its output derives from the data, so it is only reproducible
# with the data, and it is binary (the PNG bytes) like a real model.safetensors.
TRAIN = {"stages": {"train": {
    "cmd": f"mkdir -p {MODEL} && cat data/images/*.png > {MODEL}/model.safetensors"
           f" && cp data/dataset.json {MODEL}/run.json",
    "deps": ["data"],
    "outs": [MODEL],
}}}


def _digests(folder: Path) -> dict[str, str]:
    """Relative path -> MD5 of every file under `folder`: DVC 3 ("hash: md5") names each object in
    the cache and the remote by the plain MD5 of its bytes, so this is also where the remote keeps it."""
    return {str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _remote_object(remote: Path, md5: str) -> Path:
    return remote / "files" / "md5" / md5[:2] / md5[2:]  # DVC 3's layout of a local remote


@pytest.fixture(scope="module")
def pushed(tmp_path_factory, tiny_data):
    """The origin repo after the recipe's `dvc remote add -d` (committed, so clones inherit it) and
    `dvc push`; returns (origin, remote folder)."""
    work = tmp_path_factory.mktemp("dvc_remote")
    origin = git_dvc_repo(work / "origin")
    shutil.copytree(tiny_data, origin / "data")
    run_ok([DVC, "add", "-q", "data"], origin)  # how the project's data.dvc is made
    (origin / "dvc.yaml").write_text(yaml.safe_dump(TRAIN, sort_keys=False))
    run_ok([DVC, "repro", "-q"], origin)
    remote = work / "shared" / "dvc"  # an absolute path, as on a shared mount
    run_ok([DVC, "remote", "add", "-d", "storage", str(remote)], origin)
    run_ok(["git", "add", "-A"], origin)
    run_ok(["git", "commit", "-qm", "data, model and the default remote"], origin)
    run_ok([DVC, "push"], origin)
    return origin, remote


def _pinned(origin: Path) -> dict[str, str]:
    """The .dir manifests' MD5s git records: data from data.dvc, the model from dvc.lock."""
    data = yaml.safe_load((origin / "data.dvc").read_text())["outs"][0]["md5"]
    outs = yaml.safe_load((origin / "dvc.lock").read_text())["stages"]["train"]["outs"]
    return {"data": data, MODEL: next(o["md5"] for o in outs if o["path"] == MODEL)}


def test_push_then_pull_in_a_fresh_clone_gives_identical_data_and_model(pushed, tmp_path):
    origin, remote = pushed
    # Content-addressed: every file (data and model) and both .dir manifests are in the remote
    # under their MD5, so a pull needs nothing but the hashes git already carries.
    for folder in ("data", MODEL):
        for rel, md5 in _digests(origin / folder).items():
            assert _remote_object(remote, md5).is_file(), f"{folder}/{rel} not pushed"
    for target, manifest in _pinned(origin).items():
        assert manifest.endswith(".dir")
        assert _remote_object(remote, manifest).is_file(), f"{target}'s manifest not pushed"

    clone = tmp_path / "clone"
    run_ok(["git", "clone", "-q", str(origin), str(clone)], tmp_path)
    assert not (clone / "data").exists()  # git carries the pins, not the files
    run_ok([DVC, "pull"], clone)  # nothing configured in the clone: the remote came with git
    for folder in ("data", MODEL):
        assert _digests(clone / folder) == _digests(origin / folder), folder
    assert len(_digests(clone / "data")) == 405  # the smoke set: 400 images + 5 tables/cards


def test_pull_with_the_remote_folder_gone_fails_naming_what_is_missing(pushed, tmp_path):
    origin, remote = pushed
    clone = tmp_path / "clone"
    run_ok(["git", "clone", "-q", str(origin), str(clone)], tmp_path)
    moved = remote.with_name("moved")
    remote.rename(moved)  # an unmounted share: DVC sees an empty remote, not an error
    try:
        proc = subprocess.run([DVC, "pull"], cwd=clone, capture_output=True, text=True, timeout=300,
                              check=False)
    finally:
        moved.rename(remote)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out  # DVC's exit code for a failed command (README says so)
    # DVC does not name the remote or its path; it names the missing objects by the hashes in
    # data.dvc / dvc.lock and the targets it could not check out, which is what README tells users.
    assert "Missing cache files" in out, out
    for manifest in _pinned(origin).values():
        assert manifest in out, out
    checkout = out.split("Checkout failed for following targets:", 1)
    assert len(checkout) == 2, out
    assert {"data", MODEL} <= set(checkout[1].split()), out
    # A failed pull leaves nothing half-written that a later pull or a training run could mistake for data.
    assert not (clone / "data").exists() and not (clone / MODEL).exists()
