"""The default dataset is reproducible: regenerating it with params.yaml's settings gives exactly
the content hash pinned in data.dvc (what `make run` relies on when `data/` is missing)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from cxrcf.config import load_params
from cxrcf.data import dvc_data_hash
from cxrcf.synth import generate_dataset

ROOT = Path(__file__).resolve().parents[1]


def test_regenerated_default_dataset_matches_data_dvc(tmp_path):
    pinned = dvc_data_hash(ROOT / "data.dvc")
    assert pinned and pinned.endswith(".dir")
    params = load_params(ROOT / "params.yaml")
    generate_dataset(tmp_path / "data", params.data.synth)
    dvc = str(Path(sys.executable).with_name("dvc"))
    subprocess.run([dvc, "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    subprocess.run([dvc, "add", "-q", "data"], cwd=tmp_path, check=True)
    regenerated = yaml.safe_load((tmp_path / "data.dvc").read_text())["outs"][0]
    assert regenerated["md5"] == pinned
    assert regenerated["nfiles"] == params.data.synth.n_images + 5  # images + metadata, noise, evidence, card, json
