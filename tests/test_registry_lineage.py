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
from store import lineage as training_side


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

    assert training_side.dataset_hash(dataset / "data") == dvc_data_hash(dataset / "data.dvc")


def test_training_lineage_records_the_data_read_and_refuses_a_disagreeing_pin(dataset, tmp_path):
    tags = training_side.training_lineage(dataset / "data", dataset / "data.dvc",
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
        training_side.training_lineage(changed, dataset / "data.dvc")


def test_a_training_run_on_data_its_pin_disagrees_with_is_refused_before_it_exists(dataset, mlflow_uri, tmp_path,
                                                                                   monkeypatch):
    from cxrcf.config import preset_params
    from training.resume import open_run, record_path, storage_root

    subprocess.run(["cp", "-r", str(dataset / "data"), str(dataset / "data.dvc"), str(tmp_path)], check=True)
    (tmp_path / "data" / "metadata.csv").write_text("id,sex\n0,female\n")  # edited after `dvc add`
    monkeypatch.chdir(tmp_path)
    assert training_side.tracking_dvc_file("data") == Path("data.dvc")
    assert training_side.tracking_dvc_file(dataset / "data") is None  # data.dvc here says nothing of that folder
    params = preset_params("smoke", ray={"storage_path": str(tmp_path / "ray")},
                           mlflow={"experiment": f"refused-{tmp_path.name}"})
    with pytest.raises(CxrcfError, match=r"data: the data read hashes to \w+\.dir, but data\.dvc pins"):
        open_run(params, "scm", tmp_path / "scm", resume=False, data_root="data")
    assert not record_path(storage_root(params.ray), "scm", tmp_path / "scm").exists()
    assert registry.connect().get_experiment_by_name(f"refused-{tmp_path.name}") is None  # no run, no experiment


def test_registration_takes_lineage_from_the_training_run(dataset, mlflow_uri, tmp_path):
    client = registry.connect()
    exp = client.create_experiment(f"lineage-{tmp_path.name}")
    trained = training_side.training_lineage(dataset / "data", dataset / "data.dvc", parents={"pretraining": "run-hvae"})
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
