"""Data loading: splits as tensors, the one resize, the torch Dataset, validation, DVC hash, CLI."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from cxrcf import data
from cxrcf.attributes import context
from cxrcf.errors import CxrcfError


def test_load_split_shapes_ranges_and_parents(tiny_data):
    meta = data.load_metadata(tiny_data)
    assert list(meta.columns[:8]) == list(data.METADATA_COLUMNS)
    train = data.load_split(tiny_data, "train", 32)
    n = int((meta["split"] == "train").sum())
    assert train.x.shape == (n, 1, 32, 32) and train.x.dtype == torch.float32
    assert -1.0 <= train.x.min() < -0.8 and 0.5 < train.x.max() <= 1.0
    p = train.parents
    assert p["sex"].dtype == torch.float32 and p["race"].dtype == torch.long
    assert set(p["race"].unique().tolist()) <= {0, 1, 2} and set(p["finding"].unique().tolist()) <= {0.0, 1.0}
    assert 18 <= p["age"].min() and p["age"].max() <= 95
    assert context(p).shape == (n, 6)
    assert train.ids == train.frame["id"].tolist()
    # Parents agree with the metadata strings row by row.
    female = (train.frame["sex"] == "female").to_numpy()
    assert np.array_equal(p["sex"].numpy() == 1, female)
    assert "z_eff" in train.frame.columns  # exogenous noise joined for true counterfactuals
    # Splits partition the data by subject.
    subjects = [set(data.load_split(tiny_data, s, 32).frame["subject_id"]) for s in ("train", "val", "test")]
    assert not (subjects[0] & subjects[1]) and not (subjects[0] & subjects[2])


def test_downsampling_is_area_average(tiny_data):
    full = data.load_split(tiny_data, "val", 32).x
    half = data.load_split(tiny_data, "val", 16).x
    assert half.shape[-1] == 16
    expected = full.reshape(-1, 1, 16, 2, 16, 2).mean(dim=(3, 5))
    assert torch.allclose(half, expected, atol=1e-6)


def test_to_model_images_scale_and_resizes():
    imgs = np.array([[[0, 255], [128, 64]]], dtype=np.uint8)
    x = data.to_model_images(imgs, 2)
    assert torch.allclose(x[0, 0], torch.tensor([[-1.0, 1.0], [128 / 127.5 - 1, 64 / 127.5 - 1]]), atol=1e-6)
    assert np.array_equal(data.from_model_images(x), imgs)
    ramp = np.tile(np.arange(0, 240, 10, dtype=np.uint8), (2, 24, 1))  # 24x24, not a multiple of 10
    y = data.to_model_images(ramp, 10)
    assert y.shape == (2, 1, 10, 10)
    row = y[0, 0, 0]
    assert (row[1:] > row[:-1]).all()  # an antialiased resize keeps the ramp monotone
    up = data.to_model_images(ramp, 48)
    assert up.shape == (2, 1, 48, 48)
    with pytest.raises(CxrcfError, match="uint8"):
        data.to_model_images(ramp.astype(np.float32), 8)
    with pytest.raises(CxrcfError, match="square"):
        data.to_model_images(np.zeros((1, 4, 6), np.uint8), 2)


def test_dataset_items_and_augmentation(tiny_data):
    ds = data.CXRDataset(tiny_data, "train", 32)
    x, parents = ds[0]
    assert x.shape == (1, 32, 32) and set(parents) == {"sex", "race", "age", "finding"}
    assert torch.equal(ds[0][0], x)  # no augmentation by default: deterministic
    loader = torch.utils.data.DataLoader(ds, batch_size=16)
    xb, pb = next(iter(loader))
    assert xb.shape == (16, 1, 32, 32) and pb["race"].shape == (16,)
    aug = data.CXRDataset(tiny_data, "train", 32, augment=True, seed=1)
    views = torch.stack([aug[0][0] for _ in range(8)])
    assert not all(torch.equal(v, x) for v in views)
    assert (views - x).abs().mean() < 0.3 and views.min() >= -1 and views.max() <= 1


def test_bad_split_and_resolution_errors(tiny_data):
    with pytest.raises(CxrcfError, match="split"):
        data.load_split(tiny_data, "training", 32)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_validate_catches_corrupt_and_missing_images(tiny_data, tmp_path):
    assert data.validate_dataset(tiny_data)["ok"]
    root = _copy(tiny_data, tmp_path / "data")
    meta = data.load_metadata(root)
    corrupt, missing = meta["path"].iloc[3], meta["path"].iloc[7]
    (root / corrupt).write_bytes(b"\x89PNG\r\n\x1a\nthis is not an image")
    (root / missing).unlink()
    report = data.validate_dataset(root)
    assert not report["ok"] and len(report["problems"]) == 2
    assert "line 5" in report["problems"][0] and corrupt in report["problems"][0]
    assert "line 9" in report["problems"][1] and "missing" in report["problems"][1]
    with pytest.raises(CxrcfError, match="not readable"):
        data.load_split(root, "all", 32)


def test_validate_and_load_metadata_name_the_bad_row(tiny_data, tmp_path):
    root = _copy(tiny_data, tmp_path / "data")
    lines = (root / "metadata.csv").read_text().splitlines()
    fields = lines[4].split(",")
    fields[4] = "martian"  # race
    lines[4] = ",".join(fields)
    (root / "metadata.csv").write_text("\n".join(lines) + "\n")
    report = data.validate_dataset(root)
    assert any("line 5" in p and "race = 'martian'" in p for p in report["problems"])
    with pytest.raises(CxrcfError, match=r"metadata.csv line 5 .*race = 'martian'"):
        data.load_metadata(root)


def test_validate_catches_wrong_size_and_mode(tiny_data, tmp_path):
    from PIL import Image

    root = _copy(tiny_data, tmp_path / "data")
    meta = data.load_metadata(root)
    Image.new("L", (16, 16)).save(root / meta["path"].iloc[0])
    Image.new("RGB", (32, 32)).save(root / meta["path"].iloc[1])
    problems = data.validate_dataset(root)["problems"]
    assert any("16x16, expected 32x32" in p for p in problems)
    assert any("mode RGB" in p for p in problems)


def test_dvc_data_hash(tmp_path):
    assert data.dvc_data_hash(tmp_path / "absent.dvc") is None
    f = tmp_path / "data.dvc"
    f.write_text("outs:\n- md5: 0123456789abcdef.dir\n  size: 10\n  nfiles: 2\n  path: data\n")
    assert data.dvc_data_hash(f) == "0123456789abcdef.dir"
    f.write_text("outs: []\n")
    with pytest.raises(CxrcfError, match="outs"):
        data.dvc_data_hash(f)


def test_cli_validate_and_summary(tiny_data, tmp_path, capsys):
    from cxrcf.cli import main

    assert main(["data", "validate", "--data", str(tiny_data)]) == 0
    assert "ok, 400 images" in capsys.readouterr().out
    assert main(["data", "summary", "--data", str(tiny_data)]) == 0
    out = capsys.readouterr().out
    assert "race=black" in out and "effusion rate" in out and "train" in out
    root = _copy(tiny_data, tmp_path / "data")
    (root / data.load_metadata(root)["path"].iloc[0]).write_bytes(b"junk")
    assert main(["data", "validate", "--data", str(root)]) == 1
    assert "not readable" in capsys.readouterr().out
    assert main(["data", "summary", "--data", str(tmp_path / "nothing")]) == 1
    assert "no metadata.csv" in capsys.readouterr().err


def test_cli_synth_uses_params_and_flags(tmp_path, capsys):
    from cxrcf.cli import main

    params = tmp_path / "params.yaml"
    params.write_text("preset: smoke\ndata:\n  synth:\n    n_images: 30\n    seed: 4\n")
    out = tmp_path / "data"
    assert main(["data", "synth", "--params", str(params), "--out", str(out), "--resolution", "16"]) == 0
    meta = data.load_metadata(out)
    assert len(meta) == 30 and data.read_image(out / meta["path"].iloc[0]).shape == (16, 16)
    assert "30/30 images" in capsys.readouterr().out
    assert main(["data", "synth", "--params", str(params), "--out", str(out), "--n", "5"]) == 1
    assert "n_images = 5" in capsys.readouterr().err


def test_read_image_agrees_with_pil_for_any_png(tmp_path):
    from PIL import Image

    from cxrcf.synth import png_bytes

    img = np.random.default_rng(0).integers(0, 256, (24, 40), dtype=np.uint8)
    ours, pils = tmp_path / "ours.png", tmp_path / "pil.png"
    ours.write_bytes(png_bytes(img))
    Image.fromarray(img, "L").save(pils, optimize=True)  # PIL picks row filters: the general path
    assert np.array_equal(np.asarray(Image.open(ours)), img)
    assert np.array_equal(data.read_image(ours), img) and np.array_equal(data.read_image(pils), img)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(png_bytes(img)[:60])
    with pytest.raises(CxrcfError, match="truncated.png: image is not readable"):
        data.read_image(truncated)
