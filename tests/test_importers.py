"""MIMIC-CXR-JPG and CheXpert importers on fixture tables and images in the real formats, bad rows included."""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxrcf import data
from cxrcf.errors import CxrcfError
from cxrcf.importers import import_chexpert, import_mimic, map_race, subject_split

LABELS = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
          "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
          "Pneumothorax", "Support Devices"]


def _write_csv(path, header, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def _jpeg(path, seed, size=(300, 260), mode="L"):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size[1], size[0]), dtype=np.uint8)
    img = Image.fromarray(arr, "L")
    (img.convert("RGB") if mode == "RGB" else img).save(path, quality=90)


def _labels(no_finding="", effusion="", other=None):
    row = {k: "" for k in LABELS}
    row["No Finding"], row["Pleural Effusion"] = no_finding, effusion
    if other:
        row[other] = "1.0"
    return [row[k] for k in LABELS]


@pytest.fixture()
def mimic_root(tmp_path):
    root = tmp_path / "mimic"
    _write_csv(root / "patients.csv", ["subject_id", "gender", "anchor_age", "anchor_year", "anchor_year_group", "dod"], [
        ["10000001", "F", "52", "2150", "2008 - 2010", ""],
        ["10000002", "M", "67", "2160", "2011 - 2013", ""],
        ["10000003", "M", "", "2155", "2014 - 2016", ""],  # missing age -> bad
        ["10000004", "F", "45", "2140", "2008 - 2010", ""],
        ["10000005", "M", "70", "2150", "2008 - 2010", ""],
        ["10000006", "F", "33", "2150", "2008 - 2010", ""],
    ])
    _write_csv(root / "admissions.csv", ["subject_id", "hadm_id", "admittime", "race"], [
        ["10000001", "20000001", "2150-01-01 10:00:00", "WHITE"],
        ["10000002", "20000002", "2160-03-01 10:00:00", "ASIAN - CHINESE"],
        ["10000002", "20000003", "2161-03-01 10:00:00", "UNKNOWN"],
        ["10000003", "20000004", "2155-03-01 10:00:00", "WHITE - RUSSIAN"],
        ["10000004", "20000005", "2140-03-01 10:00:00", "BLACK/AFRICAN AMERICAN"],
        ["10000005", "20000006", "2150-03-01 10:00:00", "MARTIAN"],  # unknown race string -> bad
        ["10000006", "20000007", "2150-03-01 10:00:00", "HISPANIC/LATINO - PUERTO RICAN"],  # filtered
    ])
    meta = [  # dicom, subject, study, view, date
        ("d01", "10000001", "50000001", "PA", "21520101"),
        ("d02", "10000001", "50000001", "LATERAL", "21520101"),  # filtered: lateral
        ("d03", "10000002", "50000002", "AP", "21600505"),
        ("d04", "10000003", "50000003", "PA", "21550101"),  # bad: missing age
        ("d05", "10000004", "50000004", "PA", "21400101"),  # bad: corrupt image
        ("d06", "10000005", "50000005", "PA", "21500101"),  # bad: unknown race
        ("d07", "10000006", "50000006", "PA", "21500101"),  # filtered: race
        ("d08", "10000004", "50000007", "PA", "21410101"),  # filtered: other finding
        ("d09", "10000002", "50000008", "PA", "21610101"),  # bad: missing image
        ("d10", "10000004", "50000009", "PA", "21420101"),
        ("d11", "10000001", "50000010", "PA", "21530101"),  # bad: study without labels
    ]
    _write_csv(root / "mimic-cxr-2.0.0-metadata.csv",
               ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows",
                "Columns", "StudyDate", "StudyTime"],
               [[d, s, st, "CHEST (PA AND LAT)", v, "260", "300", date, "120000"] for d, s, st, v, date in meta])
    labels = {"50000001": _labels(no_finding="1.0"), "50000002": _labels(effusion="1.0", other="Edema"),
              "50000003": _labels(no_finding="1.0"), "50000004": _labels(no_finding="1.0"),
              "50000005": _labels(effusion="1.0"), "50000006": _labels(no_finding="1.0"),
              "50000007": _labels(other="Cardiomegaly"), "50000008": _labels(effusion="-1.0", no_finding="1.0"),
              "50000009": _labels(effusion="0.0", no_finding="1.0")}
    subject_of = {st: s for _, s, st, _, _ in meta}
    _write_csv(root / "mimic-cxr-2.0.0-chexpert.csv", ["subject_id", "study_id", *LABELS],
               [[subject_of[st], st, *row] for st, row in labels.items()])
    for i, (d, s, st, _, _) in enumerate(meta):
        path = root / "files" / f"p{s[:2]}" / f"p{s}" / f"s{st}" / f"{d}.jpg"
        if d == "d05":
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
        elif d != "d09":
            _jpeg(path, i, mode="RGB" if d == "d03" else "L")
    return root


def test_import_mimic_keeps_filters_and_reports(mimic_root, tmp_path, capsys):
    out = tmp_path / "data"
    info = import_mimic(mimic_root, out, resolution=32)
    meta = data.load_metadata(out).set_index("id")
    assert sorted(meta.index) == ["d01", "d03", "d10"]
    assert meta.loc["d01", ["sex", "race", "finding"]].tolist() == ["female", "white", "no_finding"]
    assert meta.loc["d01", "age"] == 54.0  # anchor_age 52 at 2150, study in 2152
    assert meta.loc["d03", ["sex", "race", "finding"]].tolist() == ["male", "asian", "pleural_effusion"]
    assert meta.loc["d10", ["race", "finding", "subject_id"]].tolist() == ["black", "no_finding", "10000004"]
    assert all(meta["split"] == [subject_split(s) for s in meta["subject_id"]])
    assert info["split"].startswith("subject hash 80/10/10 (no mimic-cxr-2.0.0-split.csv[.gz] under ")
    problems = data.validate_dataset(out)["problems"]
    assert all("has no rows" in p for p in problems), problems  # three images cannot fill three splits
    assert data.read_image(out / meta.loc["d03", "path"]).shape == (32, 32)

    errors = pd.read_csv(out / "import_errors.csv", dtype=str)
    assert len(errors) == info["bad_rows"] == 5
    by_reason = {r.reason: (r.file, int(r.row)) for r in errors.itertuples()}

    def find(fragment):
        hits = [(k, v) for k, v in by_reason.items() if fragment in k]
        assert len(hits) == 1, (fragment, by_reason)
        return hits[0][1]

    assert find("anchor_age ''") == (str(mimic_root / "patients.csv"), 4)
    assert find("unknown race string 'MARTIAN'") == (str(mimic_root / "admissions.csv"), 7)
    assert find("unreadable image")[1] == 6 and find("unreadable image")[0].endswith("metadata.csv")
    assert find("image file missing")[1] == 10
    assert find("has no row in mimic-cxr-2.0.0-chexpert.csv")[1] == 12
    assert info["filtered"] == {"not a frontal view": 1, "other finding or uncertain label": 1,
                                "race not white, asian or black": 1}
    assert "5 bad rows" in capsys.readouterr().out


def test_import_mimic_missing_table_and_column(mimic_root, tmp_path):
    (mimic_root / "admissions.csv").unlink()
    with pytest.raises(CxrcfError, match=r"^admissions.csv \(or admissions.csv.gz\): file not found under "):
        import_mimic(mimic_root, tmp_path / "out")
    _write_csv(mimic_root / "admissions.csv", ["subject_id", "hadm_id"], [["10000001", "1"]])
    with pytest.raises(CxrcfError, match="admissions.csv: missing column race"):
        import_mimic(mimic_root, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.fixture()
def chexpert_root(tmp_path):
    base = tmp_path / "chexpert"
    root = base / "CheXpert-v1.0-small"
    header = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *LABELS]

    def row(split, patient, view, sex, age, fl, **lab):
        return [f"CheXpert-v1.0-small/{split}/{patient}/study1/{view}.jpg", sex, age, fl,
                "AP" if fl == "Frontal" else "", *_labels(**lab)]

    train = [
        row("train", "patient00001", "view1_frontal", "Female", "60", "Frontal", no_finding="1.0"),
        row("train", "patient00001", "view2_lateral", "Female", "60", "Lateral", no_finding="1.0"),
        row("train", "patient00002", "view1_frontal", "Male", "", "Frontal", no_finding="1.0"),  # bad age
        row("train", "patient00003", "view1_frontal", "Unknown", "50", "Frontal", effusion="1.0"),  # bad sex
        row("train", "patient00004", "view1_frontal", "Male", "70", "Frontal", effusion="1.0"),
        row("train", "patient00005", "view1_frontal", "Female", "50", "Frontal", effusion="-1.0"),  # uncertain
        row("train", "patient00006", "view1_frontal", "Male", "40", "Frontal", no_finding="1.0"),  # race Other
        row("train", "patient00007", "view1_frontal", "Female", "30", "Frontal", no_finding="1.0"),  # bad race
        row("train", "patient00009", "view1_frontal", "Female", "30", "Frontal", no_finding="1.0"),  # not in demo
    ]
    valid = [row("valid", "patient00008", "view1_frontal", "Male", "80", "Frontal", effusion="1.0")]
    _write_csv(root / "train.csv", header, train)
    _write_csv(root / "valid.csv", header, valid)
    for i, r in enumerate(train + valid):
        _jpeg(base / r[0], i, size=(320, 390))
    _write_csv(base / "demo.csv", ["PATIENT", "GENDER", "AGE_AT_CXR", "PRIMARY_RACE", "ETHNICITY"], [
        ["patient00001", "Female", "60", "White", "Non-Hispanic/Non-Latino"],
        ["patient00002", "Male", "", "White, non-Hispanic", ""],
        ["patient00003", "", "50", "Asian", ""],
        ["patient00004", "Male", "70", "Black or African American", ""],
        ["patient00005", "Female", "50", "White", ""],
        ["patient00006", "Male", "40", "Other", ""],
        ["patient00007", "Female", "30", "Klingon", ""],
        ["patient00008", "Male", "80", "Asian, non-Hispanic", ""],
    ])
    return root


def test_import_chexpert_with_demographics(chexpert_root, tmp_path):
    out = tmp_path / "data"
    info = import_chexpert(chexpert_root, out, resolution=16, demographics=chexpert_root.parent / "demo.csv")
    meta = data.load_metadata(out).set_index("id")
    assert sorted(meta.index) == ["patient00001_study1_view1_frontal", "patient00004_study1_view1_frontal",
                                  "patient00008_study1_view1_frontal"]
    assert meta.loc["patient00004_study1_view1_frontal", ["sex", "race", "age", "finding"]].tolist() == [
        "male", "black", 70.0, "pleural_effusion"]
    assert meta.loc["patient00008_study1_view1_frontal", "race"] == "asian"
    assert all("has no rows" in p for p in data.validate_dataset(out)["problems"])
    errors = pd.read_csv(out / "import_errors.csv", dtype=str)
    rows = {(e.file.split("/")[-1], int(e.row)): e.reason for e in errors.itertuples()}
    assert set(rows) == {("train.csv", 4), ("train.csv", 5), ("demo.csv", 8), ("train.csv", 10)}
    assert "Age ''" in rows[("train.csv", 4)] and "Sex 'Unknown'" in rows[("train.csv", 5)]
    assert "unknown race string 'Klingon'" in rows[("demo.csv", 8)]
    assert "patient00009 has no row in demo.csv" in rows[("train.csv", 10)]
    assert info["filtered"] == {"not a frontal view": 1, "other finding or uncertain label": 1,
                                "race not white, asian or black": 1}


def test_import_chexpert_without_race_reports_every_row(chexpert_root, tmp_path):
    with pytest.raises(CxrcfError, match="no image passed the filters .*no race: CheXpert has no race column"):
        import_chexpert(chexpert_root, tmp_path / "data")
    assert not (tmp_path / "data").exists()


def test_cli_import_chexpert(chexpert_root, tmp_path, capsys):
    from cxrcf.cli import main

    out = tmp_path / "data"
    rc = main(["data", "import-chexpert", "--root", str(chexpert_root), "--out", str(out), "--resolution", "32",
               "--demographics", str(chexpert_root.parent / "demo.csv")])
    assert rc == 0 and len(data.load_metadata(out)) == 3
    assert "kept 3 images, 4 bad rows" in capsys.readouterr().out


def test_race_mapping_and_subject_split():
    assert [map_race(s) for s in ("WHITE", "White, non-Hispanic", "ASIAN - SOUTH EAST ASIAN",
                                  "BLACK/CAPE VERDEAN", "Black or African American")] == [
        "white", "white", "asian", "black", "black"]
    assert map_race("HISPANIC OR LATINO") == "other" and map_race("UNABLE TO OBTAIN") == "unknown"
    assert map_race("MARTIAN") is None
    splits = [subject_split(f"{10000000 + i}") for i in range(4000)]
    assert splits == [subject_split(f"{10000000 + i}") for i in range(4000)]
    frac = {s: splits.count(s) / 4000 for s in ("train", "val", "test")}
    assert abs(frac["train"] - 0.8) < 0.03 and abs(frac["val"] - 0.1) < 0.02


def _gzip_to(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(src, "rb") as f, gzip.open(dst, "wb") as g:
        g.write(f.read())
    src.unlink()


def test_import_mimic_as_physionet_ships_it(mimic_root, tmp_path, capsys):
    """Gzipped tables in PhysioNet's folders, MIMIC-IV beside MIMIC-CXR-JPG, the official split used."""
    from cxrcf.cli import main

    files = tmp_path / "physionet.org" / "files"
    root = files / "mimic-cxr-jpg" / "2.0.0"
    root.mkdir(parents=True)
    shutil.move(mimic_root / "files", root / "files")
    for name in ("mimic-cxr-2.0.0-metadata.csv", "mimic-cxr-2.0.0-chexpert.csv"):
        _gzip_to(mimic_root / name, root / f"{name}.gz")
    for name in ("patients.csv", "admissions.csv"):
        _gzip_to(mimic_root / name, files / "mimiciv" / "2.2" / "hosp" / f"{name}.gz")
    split = {"d01": "train", "d03": "validate", "d10": "test", "d11": "train"}
    with gzip.open(root / "mimic-cxr-2.0.0-split.csv.gz", "wt") as f:
        f.write("dicom_id,study_id,subject_id,split\n" + "".join(f"{d},0,0,{v}\n" for d, v in split.items()))

    out = tmp_path / "data"
    assert main(["data", "import-mimic", "--root", str(root), "--out", str(out), "--resolution", "32"]) == 0
    printed = capsys.readouterr().out
    meta = data.load_metadata(out).set_index("id")
    assert meta["split"].to_dict() == {"d01": "train", "d03": "val", "d10": "test"}
    assert meta.loc["d03", ["sex", "race", "finding"]].tolist() == ["male", "asian", "pleural_effusion"]
    info = json.loads((out / "dataset.json").read_text())
    assert info["split"] == "official (mimic-cxr-2.0.0-split.csv.gz: train/validate/test)"
    assert "split: official (mimic-cxr-2.0.0-split.csv.gz" in printed and "kept 3 images, 5 bad rows" in printed
    assert str(files / "mimiciv" / "2.2" / "hosp" / "patients.csv.gz") in info["tables"]
    errors = pd.read_csv(out / "import_errors.csv", dtype=str)
    assert (errors["file"] == str(files / "mimiciv" / "2.2" / "hosp" / "patients.csv.gz")).sum() == 1
    assert (errors["file"] == str(root / "mimic-cxr-2.0.0-metadata.csv.gz")).sum() == 3
    assert not list(tmp_path.glob(".data.*"))  # no staging left behind

    # A dicom missing from the split file is a bad row naming it; two MIMIC-IV versions are not guessed between.
    with gzip.open(root / "mimic-cxr-2.0.0-split.csv.gz", "wt") as f:
        f.write("dicom_id,study_id,subject_id,split\nd01,0,0,train\nd03,0,0,validate\n")
    import_mimic(root, out, resolution=32)
    errors = pd.read_csv(out / "import_errors.csv", dtype=str)
    assert errors["reason"].str.fullmatch("dicom_id d10 has no row in mimic-cxr-2.0.0-split.csv.gz").sum() == 1
    shutil.copytree(files / "mimiciv" / "2.2", files / "mimiciv" / "3.1")
    with pytest.raises(CxrcfError, match=r"^patients.csv: found in 2 places under .*mimiciv .*; pass --mimic-iv"):
        import_mimic(root, out, resolution=32)
    info = import_mimic(root, out, resolution=32, mimic_iv=files / "mimiciv" / "3.1")
    assert str(files / "mimiciv" / "3.1" / "hosp" / "admissions.csv.gz") in info["tables"]


def test_import_chexpert_as_shipped(chexpert_root, tmp_path):
    """--root may be the folder above CheXpert-v1.0-small; CHEXPERT DEMO.xlsx beside it is found and read."""
    demo = pd.read_csv(chexpert_root.parent / "demo.csv", dtype=str, keep_default_na=False)
    demo.to_excel(chexpert_root.parent / "CHEXPERT DEMO.xlsx", index=False)
    (chexpert_root.parent / "demo.csv").unlink()
    out = tmp_path / "data"
    info = import_chexpert(chexpert_root.parent, out, resolution=16)
    assert sorted(data.load_metadata(out)["id"]) == [
        "patient00001_study1_view1_frontal", "patient00004_study1_view1_frontal", "patient00008_study1_view1_frontal"]
    assert info["demographics"] == str(chexpert_root.parent / "CHEXPERT DEMO.xlsx")
    assert info["split"] == "subject hash 80/10/10 over train.csv + valid.csv"
    errors = pd.read_csv(out / "import_errors.csv", dtype=str)
    klingon = errors[errors["reason"].str.contains("Klingon")]
    assert klingon[["file", "row"]].values.tolist() == [[str(chexpert_root.parent / "CHEXPERT DEMO.xlsx"), "8"]]


REPO = Path(__file__).resolve().parents[1]


def _dataset_bytes(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_killed_import_resumes_to_the_uninterrupted_result(tmp_path, capsys):
    """A whole-archive import killed mid-run resumes from its verified chunks, in parallel, to the
    same bytes as one uninterrupted run. A FIFO stands in for an image on a stalled network share:
    the first run blocks there, deterministically, with the chunks before it done."""
    sys.path.insert(0, str(Path(__file__).parent))
    from mimic_archive import image_path, jpeg_bytes, write_archive

    root = write_archive(tmp_path / "archive", 40, size=64)
    reference = tmp_path / "reference"
    import_mimic(root, reference, resolution=32, workers=1)
    meta = pd.read_csv(reference / "metadata.csv", dtype=str)
    assert len(meta) == 40 and set(meta["split"]) == {"train", "val", "test"}

    stall = image_path(root, "10000011", "50000022", f"{22:08x}-synthetic")  # the first image of chunk 5
    stall.unlink()
    os.mkfifo(stall)
    out = tmp_path / "data"
    staging = tmp_path / ".data.import"
    cmd = [sys.executable, "-m", "cxrcf.cli", "data", "import-mimic", "--root", str(root), "--out", str(out),
           "--resolution", "32", "--workers", "1", "--chunk-size", "4"]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 120
    try:
        while len(list((staging / "parts").glob("chunk-*.json"))) < 5:
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the import converted nothing in time"
            time.sleep(0.02)
        time.sleep(0.2)  # it is blocked on the FIFO: nothing more can finish
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    assert sorted(p.name for p in (staging / "parts").glob("chunk-*.json")) == [
        f"chunk-{i:06d}.json" for i in range(5)]
    assert not out.exists()

    # Power loss left one converted image of chunk 1 empty: that chunk is converted again.
    torn = json.loads((staging / "parts" / "chunk-000001.json").read_text())["kept"][0]["id"]
    (staging / "images" / f"{torn}.png").write_bytes(b"")
    stall.unlink()
    stall.write_bytes(jpeg_bytes(22, 64))
    capsys.readouterr()
    info = import_mimic(root, out, resolution=32, workers=2, chunk_size=4)
    printed = capsys.readouterr().out
    assert "resuming: 4 of 10 chunks (16 images) already converted" in printed
    assert "import MIMIC-CXR-JPG: 40/40 images (100.0%) | " in printed
    assert info["throughput"]["converted"] == 24 and info["throughput"]["resumed"] == 16
    assert _dataset_bytes(out) == _dataset_bytes(reference)
    assert not staging.exists()
