"""A MIMIC-CXR-JPG + MIMIC-IV archive laid out as PhysioNet ships it, with synthetic content.

    physionet.org/files/mimic-cxr-jpg/2.0.0/mimic-cxr-2.0.0-{metadata,chexpert,split}.csv.gz
    physionet.org/files/mimic-cxr-jpg/2.0.0/files/p10/p10000000/s50000000/<dicom_id>.jpg
    physionet.org/files/mimiciv/2.2/hosp/{patients,admissions}.csv.gz

Used by the importer tests (`from mimic_archive import write_archive`) and by
benchmarks/import_throughput.py. Every row passes the study's filters, so every image is converted.
"""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import numpy as np

LABELS = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
          "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
          "Pneumothorax", "Support Devices"]
RACES = ("WHITE", "ASIAN - CHINESE", "BLACK/AFRICAN AMERICAN", "WHITE - OTHER EUROPEAN")


def _gz_csv(path: Path, header: list[str], rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = io.StringIO()
    text.write(",".join(header) + "\n")
    for r in rows:
        text.write(",".join(str(v) for v in r) + "\n")
    # mtime=0: the same archive gives the same bytes.
    with gzip.GzipFile(path, "wb", mtime=0) as f:
        f.write(text.getvalue().encode())


def jpeg_bytes(i: int, size: int) -> bytes:
    """A smooth, chest-film-like grayscale JPEG (a gradient, two soft lobes, light noise)."""
    from PIL import Image

    rng = np.random.default_rng(i)
    y, x = np.mgrid[0:size, 0:size] / size
    img = 80 + 60 * y
    for cx in (0.3, 0.7):
        img += 70 * np.exp(-(((x - cx) / 0.15) ** 2 + ((y - 0.5) / 0.3) ** 2))
    img += rng.normal(0, 6, (size, size))
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "L").save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def image_path(root: Path, subject: str, study: str, dicom: str) -> Path:
    return root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}" / f"{dicom}.jpg"


def write_archive(base: Path, n_images: int, size: int = 64, split: bool = True,
                  distinct_images: int | None = None) -> Path:
    """Write the archive under `base` (its physionet.org/ folder); return the MIMIC-CXR-JPG root.

    Two images per subject. `distinct_images` encodes only that many different JPEGs and reuses
    their bytes (saves time when only the count of files matters).
    """
    files = base / "physionet.org" / "files"
    root = files / "mimic-cxr-jpg" / "2.0.0"
    hosp = files / "mimiciv" / "2.2" / "hosp"
    meta, labels, splits, subjects = [], [], [], []
    blobs: dict[int, bytes] = {}
    for i in range(n_images):
        subject, study, dicom = f"{10000000 + i // 2}", f"{50000000 + i}", f"{i:08x}-synthetic"
        meta.append([dicom, subject, study, "CHEST (PA AND LAT)", "PA", size, size, "21520101", "120000"])
        row = {k: "" for k in LABELS}
        row["Pleural Effusion" if i % 3 == 0 else "No Finding"] = "1.0"
        labels.append([subject, study, *[row[k] for k in LABELS]])
        splits.append([dicom, study, subject, ("train", "train", "train", "validate", "test")[(i // 2) % 5]])
        if i % 2 == 0:
            subjects.append(subject)
        key = i if distinct_images is None else i % distinct_images
        if key not in blobs:
            blobs[key] = jpeg_bytes(key, size)
        path = image_path(root, subject, study, dicom)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(blobs[key])
    _gz_csv(root / "mimic-cxr-2.0.0-metadata.csv.gz",
            ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows",
             "Columns", "StudyDate", "StudyTime"], meta)
    _gz_csv(root / "mimic-cxr-2.0.0-chexpert.csv.gz", ["subject_id", "study_id", *LABELS], labels)
    if split:
        _gz_csv(root / "mimic-cxr-2.0.0-split.csv.gz", ["dicom_id", "study_id", "subject_id", "split"], splits)
    _gz_csv(hosp / "patients.csv.gz", ["subject_id", "gender", "anchor_age", "anchor_year", "anchor_year_group", "dod"],
            [[s, "MF"[k % 2], 30 + k % 50, 2150, "2008 - 2010", ""] for k, s in enumerate(subjects)])
    _gz_csv(hosp / "admissions.csv.gz", ["subject_id", "hadm_id", "admittime", "race"],
            [[s, 20000000 + k, "2150-01-01 10:00:00", RACES[k % len(RACES)]] for k, s in enumerate(subjects)])
    return root
