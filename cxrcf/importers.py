"""Real-data importers: MIMIC-CXR-JPG and CheXpert into the `data/` layout of SynthCXR.

Filtering follows SCIENCE.md section 7: frontal views; "Pleural Effusion" = 1 -> finding 1,
otherwise "No Finding" = 1 -> finding 0, other findings dropped; race White/Asian/Black only;
images resized to 224 then to the target resolution; split by subject with a deterministic hash.

Two kinds of rows leave the dataset, and both are counted:
- *filtered* rows are valid data outside the study (lateral views, other findings, other races);
- *bad* rows are broken data (missing age, unknown race string, unreadable image, ...). Each is
  written to `import_errors.csv` with its file, line (the header is line 1) and reason.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cxrcf.errors import CxrcfError

REFERENCE_SIZE = 224
FRONTAL_VIEWS = ("PA", "AP")
_KEEP_RACE = (("WHITE", "white"), ("CAUCASIAN", "white"), ("ASIAN", "asian"), ("BLACK", "black"),
              ("AFRICAN AMERICAN", "black"))
_OTHER_RACE = ("HISPANIC", "LATINO", "AMERICAN INDIAN", "ALASKA NATIVE", "NATIVE AMERICAN", "NATIVE HAWAIIAN",
               "PACIFIC ISLANDER", "MULTIPLE", "MULTI", "OTHER", "PORTUGUESE", "SOUTH AMERICAN",
               "MIDDLE EASTERN", "CARIBBEAN ISLAND")
_UNKNOWN_RACE = ("UNKNOWN", "UNABLE TO OBTAIN", "PATIENT DECLINED", "DECLINED", "PATIENT REFUSED",
                 "RACE AND ETHNICITY UNKNOWN", "NOT SPECIFIED")


def map_race(value: str) -> str | None:
    """A race string of MIMIC or CheXpert -> white/asian/black, 'other', 'unknown', or None if unrecognised."""
    text = re.sub(r"\s+", " ", str(value).strip().upper())
    for prefix, label in _KEEP_RACE:
        if text.startswith(prefix):
            return label
    if any(text.startswith(p) for p in _UNKNOWN_RACE):
        return "unknown"
    if any(text.startswith(p) for p in _OTHER_RACE):
        return "other"
    return None


def subject_split(subject: str, fractions=(0.8, 0.1, 0.1)) -> str:
    """Deterministic split of a subject: every image of one patient lands in the same split."""
    u = int(hashlib.sha256(str(subject).encode()).hexdigest()[:12], 16) / float(1 << 48)
    if u < fractions[0]:
        return "train"
    return "val" if u < fractions[0] + fractions[1] else "test"


def load_image(path: Path, resolution: int) -> np.ndarray:
    """Any image file -> uint8 (R, R) grayscale, via the reference size 224 (antialiased resizes)."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("L").resize((REFERENCE_SIZE, REFERENCE_SIZE), Image.Resampling.BILINEAR)
    if resolution != REFERENCE_SIZE:
        im = im.resize((resolution, resolution), Image.Resampling.BILINEAR)
    return np.asarray(im, dtype=np.uint8)


def _label(value: str) -> float | None:
    try:
        return float(value) if str(value).strip() != "" else None
    except ValueError:
        return None


def finding_of(no_finding: str, effusion: str) -> int | None:
    """1 for effusion, 0 for no finding, None for anything else (other findings, uncertain labels)."""
    if _label(effusion) == 1.0:
        return 1
    if _label(no_finding) == 1.0:
        return 0
    return None


def _age(value: str) -> float | None:
    try:
        age = float(value)
    except (TypeError, ValueError):
        return None
    return age if np.isfinite(age) and 0 < age <= 120 else None


def _read(path: Path, required: tuple[str, ...]):
    import pandas as pd

    if not path.is_file():
        raise CxrcfError(f"{path}: file not found")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as err:
        raise CxrcfError(f"{path}: not a readable CSV: {err}") from None
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise CxrcfError(f"{path}: missing column(s) {', '.join(missing)}")
    return frame


@dataclass
class _Writer:
    """Streams kept images into a temporary dataset folder and collects bad and filtered rows."""

    tmp: Path
    resolution: int
    source: str
    rows: list[dict] = field(default_factory=list)
    bad: list[dict] = field(default_factory=list)
    filtered: Counter = field(default_factory=Counter)
    seen: set = field(default_factory=set)
    t0: float = field(default_factory=time.perf_counter)

    def bad_row(self, file: Path, line: int, reason: str) -> None:
        self.bad.append({"file": str(file), "row": line, "reason": reason})

    def keep(self, image_path: Path, file: Path, line: int, **row) -> None:
        from cxrcf.synth import write_png

        if row["id"] in self.seen:
            self.bad_row(file, line, f"duplicate image id {row['id']!r}")
            return
        try:
            img = load_image(image_path, self.resolution)
        except FileNotFoundError:
            self.bad_row(file, line, f"image file missing: {image_path}")
            return
        except Exception as err:  # noqa: BLE001 - any decoder failure is a bad row, never a crash
            self.bad_row(file, line, f"unreadable image {image_path}: {type(err).__name__}: {err}")
            return
        self.seen.add(row["id"])
        rel = f"images/{row['id']}.png"
        write_png(img, self.tmp / rel)
        self.rows.append({"id": row["id"], "path": rel, "subject_id": row["subject_id"], "sex": row["sex"],
                          "race": row["race"], "age": row["age"], "finding": row["finding"],
                          "split": subject_split(row["subject_id"])})

    def progress(self, done: int, total: int) -> None:
        if done and done % 1000 == 0:
            print(f"import {self.source}: {done}/{total} rows, kept {len(self.rows)}, bad {len(self.bad)} "
                  f"({time.perf_counter() - self.t0:.1f}s)", flush=True)

    def finish(self, extra: dict) -> dict:
        import pandas as pd

        from cxrcf.data import subgroup_counts
        from cxrcf.synth import AGE_DECIMALS, format_csv

        columns = ["id", "path", "subject_id", "sex", "race", "age", "finding", "split"]
        meta = pd.DataFrame(self.rows, columns=columns)
        (self.tmp / "metadata.csv").write_text(format_csv(meta, {"age": AGE_DECIMALS}))
        errors = pd.DataFrame(self.bad, columns=["file", "row", "reason"])
        errors.to_csv(self.tmp / "import_errors.csv", index=False, lineterminator="\n")
        counts = subgroup_counts(meta) if len(meta) else {"total": 0}
        info = {"name": self.source, "resolution": self.resolution, "counts": counts,
                "filtered": dict(sorted(self.filtered.items())), "bad_rows": len(self.bad), **extra}
        (self.tmp / "dataset.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        card = [f"# {self.source} (imported)", "",
                f"- images kept: {len(meta)} at {self.resolution}x{self.resolution}",
                f"- bad rows (see import_errors.csv): {len(self.bad)}",
                *[f"- filtered, {k}: {v}" for k, v in sorted(self.filtered.items())],
                *[f"- {k}: {v}" for k, v in sorted(counts.items()) if k != "sex_race_finding"], ""]
        (self.tmp / "dataset_card.md").write_text("\n".join(card))
        return info


def _run(out: str | Path, resolution: int, source: str, body, extra: dict) -> dict:
    from cxrcf.data import check_replaceable
    from cxrcf.fileio import atomic_path

    if not 8 <= resolution <= REFERENCE_SIZE:
        raise CxrcfError(f"resolution: {resolution} is outside 8-{REFERENCE_SIZE}")
    out = check_replaceable(out)
    with atomic_path(out) as tmp:
        (tmp / "images").mkdir(parents=True)
        writer = _Writer(tmp, resolution, source)
        body(writer)
        if not writer.rows:
            common = Counter(b["reason"] for b in writer.bad).most_common(1)
            hint = f"; most common problem: {common[0][0]} ({common[0][1]} rows)" if common else ""
            raise CxrcfError(f"{source}: no image passed the filters ({len(writer.bad)} bad rows, "
                             f"filtered {dict(writer.filtered)}){hint}; nothing written to {out}")
        info = writer.finish(extra)
    print(f"import {source}: kept {len(writer.rows)} images, {len(writer.bad)} bad rows "
          f"(listed in {out / 'import_errors.csv'}), filtered {dict(sorted(writer.filtered.items()))}", flush=True)
    return info


# ------------------------------------------------------------------------------------ MIMIC-CXR
def import_mimic(root: str | Path, out: str | Path, resolution: int = 64) -> dict:
    """MIMIC-CXR-JPG (+ MIMIC-IV patients/admissions) under `root` -> dataset at `out`."""
    root = Path(root)
    meta_path = _find(root, "mimic-cxr-2.0.0-metadata.csv")
    labels_path = _find(root, "mimic-cxr-2.0.0-chexpert.csv")
    patients_path = _find(root, "patients.csv")
    admissions_path = _find(root, "admissions.csv")
    meta = _read(meta_path, ("dicom_id", "subject_id", "study_id", "ViewPosition"))
    labels = _read(labels_path, ("subject_id", "study_id", "No Finding", "Pleural Effusion"))
    patients = _read(patients_path, ("subject_id", "gender", "anchor_age", "anchor_year"))
    admissions = _read(admissions_path, ("subject_id",))
    race_col = "race" if "race" in admissions.columns else "ethnicity"
    if race_col not in admissions.columns:
        raise CxrcfError(f"{admissions_path}: missing column race (or ethnicity)")

    label_rows = {(r["subject_id"].strip(), r["study_id"].strip()): r for r in labels.to_dict("records")}
    patient_rows = {r["subject_id"].strip(): (i + 2, r) for i, r in enumerate(patients.to_dict("records"))}
    races: dict[str, list[tuple[int, str]]] = {}
    for i, (sid, race) in enumerate(zip(admissions["subject_id"], admissions[race_col])):
        races.setdefault(sid, []).append((i + 2, race))

    def body(w: _Writer) -> None:
        total = len(meta)
        for i, r in enumerate(meta.to_dict("records")):
            line = i + 2
            w.progress(i, total)
            sid, study, dicom = r["subject_id"].strip(), r["study_id"].strip(), r["dicom_id"].strip()
            if not sid or not study or not dicom:
                w.bad_row(meta_path, line, "empty dicom_id, subject_id or study_id")
                continue
            if r["ViewPosition"].strip().upper() not in FRONTAL_VIEWS:
                w.filtered["not a frontal view"] += 1
                continue
            if (sid, study) not in label_rows:
                w.bad_row(meta_path, line, f"study s{study} of subject {sid} has no row in {labels_path.name}")
                continue
            lab = label_rows[(sid, study)]
            finding = finding_of(lab["No Finding"], lab["Pleural Effusion"])
            if finding is None:
                w.filtered["other finding or uncertain label"] += 1
                continue
            if sid not in patient_rows:
                w.bad_row(meta_path, line, f"subject {sid} has no row in {patients_path.name}")
                continue
            p_line, pat = patient_rows[sid]
            sex = {"M": "male", "F": "female"}.get(pat["gender"].strip().upper())
            if sex is None:
                w.bad_row(patients_path, p_line, f"gender {pat['gender']!r} is not M or F (subject {sid})")
                continue
            age = _age(pat["anchor_age"])
            if age is None:
                w.bad_row(patients_path, p_line, f"anchor_age {pat['anchor_age']!r} is missing or not an age "
                                                 f"(subject {sid})")
                continue
            age = _age_at_study(age, pat["anchor_year"], r.get("StudyDate", ""))
            race = _mimic_race(w, races.get(sid, []), admissions_path, meta_path, line, sid)
            if race is None:
                continue
            image = root / "files" / f"p{sid[:2]}" / f"p{sid}" / f"s{study}" / f"{dicom}.jpg"
            w.keep(image, meta_path, line, id=dicom, subject_id=sid, sex=sex, race=race, age=age,
                   finding=("no_finding", "pleural_effusion")[finding])

    return _run(out, resolution, "MIMIC-CXR-JPG", body, {"source_root": str(root)})


def _find(root: Path, name: str) -> Path:
    """A MIMIC table at the root or anywhere below it (PhysioNet nests them), else the root path."""
    direct = root / name
    if direct.is_file():
        return direct
    found = sorted(root.rglob(name))
    return found[0] if found else direct


def _age_at_study(anchor_age: float, anchor_year: str, study_date: str) -> float:
    """MIMIC ages are given at the (shifted) anchor year; studies carry shifted dates on the same scale."""
    try:
        return anchor_age + (int(str(study_date)[:4]) - int(anchor_year))
    except (TypeError, ValueError):
        return anchor_age


def _mimic_race(w: _Writer, entries, admissions_path: Path, meta_path: Path, line: int, sid: str) -> str | None:
    if not entries:
        w.bad_row(meta_path, line, f"subject {sid} has no row in {admissions_path.name} (no race)")
        return None
    groups = set()
    for a_line, value in entries:
        if not str(value).strip():
            continue
        group = map_race(value)
        if group is None:
            w.bad_row(admissions_path, a_line, f"unknown race string {value!r} (subject {sid})")
            return None
        groups.add(group)
    groups.discard("unknown")
    if not groups:
        w.filtered["race unknown"] += 1
        return None
    if len(groups) > 1:
        w.filtered["conflicting race across admissions"] += 1
        return None
    race = groups.pop()
    if race == "other":
        w.filtered["race not white, asian or black"] += 1
        return None
    return race


# ------------------------------------------------------------------------------------- CheXpert
def import_chexpert(root: str | Path, out: str | Path, resolution: int = 64,
                    demographics: str | Path | None = None) -> dict:
    """CheXpert train.csv / valid.csv under `root` (+ optional CHEXPERT DEMO race table) -> `out`."""
    root = Path(root)
    tables = [root / n for n in ("train.csv", "valid.csv") if (root / n).is_file()]
    if not tables:
        raise CxrcfError(f"{root}: neither train.csv nor valid.csv found")
    required = ("Path", "Sex", "Age", "Frontal/Lateral", "No Finding", "Pleural Effusion")
    frames = [(t, _read(t, required)) for t in tables]
    race_of: dict[str, tuple[int, str]] = {}
    demo_path = Path(demographics) if demographics else None
    if demo_path is not None:
        demo = _read(demo_path, ("PATIENT", "PRIMARY_RACE"))
        race_of = {p.strip(): (i + 2, r) for i, (p, r) in enumerate(zip(demo["PATIENT"], demo["PRIMARY_RACE"]))}

    def body(w: _Writer) -> None:
        total = sum(len(f) for _, f in frames)
        done = 0
        for table, frame in frames:
            for i, r in enumerate(frame.to_dict("records")):
                w.progress(done, total)
                done += 1
                line = i + 2
                rel = r["Path"].strip()
                m = re.search(r"(patient\d+)/(study\d+)/([^/]+?)\.\w+$", rel)
                if not m:
                    w.bad_row(table, line, f"Path {rel!r} is not patientNNNNN/studyN/viewN_*.jpg")
                    continue
                patient = m.group(1)
                if r["Frontal/Lateral"].strip().lower() != "frontal":
                    w.filtered["not a frontal view"] += 1
                    continue
                finding = finding_of(r["No Finding"], r["Pleural Effusion"])
                if finding is None:
                    w.filtered["other finding or uncertain label"] += 1
                    continue
                sex = {"MALE": "male", "FEMALE": "female"}.get(r["Sex"].strip().upper())
                if sex is None:
                    w.bad_row(table, line, f"Sex {r['Sex']!r} is not Male or Female")
                    continue
                age = _age(r["Age"])
                if age is None:
                    w.bad_row(table, line, f"Age {r['Age']!r} is missing or not an age")
                    continue
                race = _chexpert_race(w, race_of, demo_path, table, line, patient)
                if race is None:
                    continue
                w.keep(_resolve(root, rel), table, line, id="_".join(m.groups()), subject_id=patient, sex=sex,
                       race=race, age=age, finding=("no_finding", "pleural_effusion")[finding])

    extra = {"source_root": str(root), "demographics": str(demo_path) if demo_path else None}
    return _run(out, resolution, "CheXpert", body, extra)


def _chexpert_race(w: _Writer, race_of, demo_path, table: Path, line: int, patient: str) -> str | None:
    if demo_path is None:
        w.bad_row(table, line, "no race: CheXpert has no race column; pass --demographics "
                               "(the CHEXPERT DEMO table with PATIENT and PRIMARY_RACE)")
        return None
    if patient not in race_of:
        w.bad_row(table, line, f"patient {patient} has no row in {demo_path.name} (no race)")
        return None
    d_line, value = race_of[patient]
    if not str(value).strip():
        w.bad_row(demo_path, d_line, f"PRIMARY_RACE is empty (patient {patient})")
        return None
    group = map_race(value)
    if group is None:
        w.bad_row(demo_path, d_line, f"unknown race string {value!r} (patient {patient})")
        return None
    if group in ("other", "unknown"):
        w.filtered["race unknown" if group == "unknown" else "race not white, asian or black"] += 1
        return None
    return group


def _resolve(root: Path, rel: str) -> Path:
    """CheXpert paths start with the release folder name (CheXpert-v1.0-small/...); accept either layout."""
    candidates = [root / rel, root.parent / rel]
    parts = Path(rel).parts
    if len(parts) > 1:
        candidates.append(root / Path(*parts[1:]))
    for c in candidates:
        if c.is_file():
            return c
    return candidates[0]
