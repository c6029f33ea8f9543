"""Lineage: the data hash of the data actually read (DVC's own hash, refused when data.dvc pins
another), the dirty-tree flag, parent runs, and the CFT mode taken from the model's own meta."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import tiny_bundle

from cxrcf.errors import CxrcfError
from pipelines import lineage, registry


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A small directory and the .dvc file `dvc add` writes for it (DVC itself, not our hash)."""
    root = tmp_path_factory.mktemp("lineage")
    data = root / "data"
    (data / "images").mkdir(parents=True)
    for i in range(3):
        (data / "images" / f"cxr{i}.png").write_bytes(bytes([i]) * (10 + i))
    (data / "metadata.csv").write_text("id,sex\n0,male\n1,female\n2,male\n")
    dvc = str(Path(sys.executable).with_name("dvc"))
    subprocess.run([dvc, "init", "--no-scm", "-q"], cwd=root, check=True)
    subprocess.run([dvc, "add", "-q", "data"], cwd=root, check=True)
    return root


def test_dataset_hash_is_the_hash_dvc_records(dataset):
    from cxrcf.data import dvc_data_hash

    assert lineage.dataset_hash(dataset / "data") == dvc_data_hash(dataset / "data.dvc")


def test_training_lineage_records_the_data_read_and_refuses_a_disagreeing_pin(dataset, tmp_path):
    tags = lineage.training_lineage(dataset / "data", dataset / "data.dvc",
                                    parents={"pretraining": "run-hvae", "guidance_predictor": "run-guide",
                                             "scm": None}, cwd=Path(__file__).parent)
    assert tags["data_hash"] == tags["data_hash_pinned"] and tags["data_hash"].endswith(".dir")
    assert len(tags["git_commit"]) == 40 and tags["git_dirty"] in ("true", "false")
    assert tags["lineage.parent.pretraining_run_id"] == "run-hvae"
    assert "lineage.parent.scm_run_id" not in tags

    changed = tmp_path / "data"
    subprocess.run(["cp", "-r", str(dataset / "data"), str(changed)], check=True)
    (changed / "metadata.csv").write_text("id,sex\n0,female\n")
    with pytest.raises(CxrcfError, match=r"hashes to \w+\.dir, but .*data\.dvc pins \w+\.dir"):
        lineage.training_lineage(changed, dataset / "data.dvc")


def test_registration_takes_lineage_from_the_training_run(dataset, mlflow_uri, tmp_path):
    client = registry.connect()
    exp = client.create_experiment(f"lineage-{tmp_path.name}")
    trained = lineage.training_lineage(dataset / "data", dataset / "data.dvc", parents={"pretraining": "run-hvae"})
    run = client.create_run(exp, tags=trained)
    got = lineage.registration_lineage(client, run.info.run_id, dataset / "data.dvc")
    assert got["data_hash"] == trained["data_hash"] and got["data_hash_source"] == f"run {run.info.run_id}"
    assert got["lineage.parent.pretraining_run_id"] == "run-hvae" and got["git_dirty"] == trained["git_dirty"]

    other = tmp_path / "other.dvc"
    other.write_text("outs:\n- md5: 0123456789abcdef0123456789abcdef.dir\n  path: data\n")
    with pytest.raises(CxrcfError, match=f"run {run.info.run_id} was trained on data .* but .*other.dvc pins"):
        lineage.registration_lineage(client, run.info.run_id, other)


def test_mode_comes_from_the_model_meta(tmp_path):
    from cxrcf.export import save_model

    with torch.random.fork_rng(devices=[]):
        hvae = tiny_bundle(0).hvae
    save_model(hvae, tmp_path / "soft", meta={"mode": "soft"})
    save_model(hvae, tmp_path / "plain")
    assert registry._generator_mode(tmp_path / "soft", None) == "soft"
    assert registry._generator_mode(tmp_path / "soft", "soft") == "soft"
    with pytest.raises(CxrcfError, match="--mode 'hard': .*soft.* was trained with mode 'soft'"):
        registry._generator_mode(tmp_path / "soft", "hard")
    assert registry._generator_mode(tmp_path / "plain", "hard") == "hard"
    with pytest.raises(CxrcfError, match="records no CFT mode; pass --mode"):
        registry._generator_mode(tmp_path / "plain", None)
