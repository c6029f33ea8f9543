"""Real-data importers: MIMIC-CXR-JPG and CheXpert, as shipped, into the `data/` layout of SynthCXR.

Filtering follows SCIENCE.md section 7: frontal views; "Pleural Effusion" = 1 -> finding 1,
otherwise "No Finding" = 1 -> finding 0, other findings dropped; race White/Asian/Black only;
images resized to 224 then to the target resolution.

Archives are read the way PhysioNet and Stanford ship them: every table may be gzipped
(`mimic-cxr-2.0.0-metadata.csv.gz`) or not; the MIMIC-CXR tables are found at the root or below it,
MIMIC-IV's `patients` and `admissions` under the root (`hosp/` in MIMIC-IV 2.x, `core/` in 1.0), in
the PhysioNet sibling `files/mimiciv/<version>/`, or in `--mimic-iv DIR`; CheXpert's root may be
the release folder (`CheXpert-v1.0-small/`) or the folder holding it, and its race table may be the
shipped `CHEXPERT DEMO.xlsx`. MIMIC's official split (`mimic-cxr-2.0.0-split.csv`, train/validate/test)
is used when present; otherwise subjects are split by a deterministic hash (80/10/10). Either way the
split used is printed and recorded in dataset.json.

Two passes. The tables are joined and filtered in this process (seconds even for MIMIC's 377k rows);
the images are then decoded, resized and written by worker processes in fixed chunks, into a staging
folder beside the output (`.<out>.import/`) where each finished chunk leaves a part file recording
its images' sizes and SHA-256. A killed import rerun with the same arguments resumes: it keeps the
verified chunks and converts the rest. A progress line shows images done, images/s and ETA. The
finished dataset replaces `out` in one rename.

Two kinds of rows leave the dataset, and both are counted:
- *filtered* rows are valid data outside the study (lateral views, other findings, other races);
- *bad* rows are broken data (missing age, unknown race string, unreadable image, ...). Each is
  written to `import_errors.csv` with its file, line (the header is line 1) and reason.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
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
    """Any image file -> uint8 (R, R) grayscale, via the reference size 224 (antialiased resizes).

    JPEGs are decoded at the smallest DCT scale that still leaves at least 224 pixels a side
    (`draft`): measured 2x faster on 512 and 2560 px films, and at most one grey level from the full decode.
    """
    from PIL import Image

    with Image.open(path) as im:
        im.draft("L", (REFERENCE_SIZE, REFERENCE_SIZE))
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
    """A table as strings: CSV, gzipped CSV (by the .gz suffix) or, for CheXpert's demographics, .xlsx."""
    import pandas as pd

    if not path.is_file():
        raise CxrcfError(f"{path}: file not found")
    try:
        if path.suffix.lower() == ".xlsx":
            frame = pd.read_excel(path, dtype=str, keep_default_na=False)
        else:
            frame = pd.read_csv(path, dtype=str, keep_default_na=False, compression="infer")
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError, EOFError, OSError,
            ValueError) as err:
        # gzip raises OSError/EOFError for a truncated or non-gzip .gz; openpyxl ValueError/zip errors.
        raise CxrcfError(f"{path}: not a readable table: {type(err).__name__}: {err}") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise CxrcfError(f"{path}: missing column(s) {', '.join(missing)}")
    return frame


# Folders of MIMIC's image tree (files/p10/p10000032/s50414267/): never holds a table, and walking
# its 377k files would take minutes.
_IMAGE_DIR = re.compile(r"^[ps]\d+$")


def _tables_under(directory: Path, name: str, max_depth: int = 6) -> list[Path]:
    """`name` or `name.gz` anywhere below `directory` (image folders skipped), plain before gzipped."""
    found = []
    base = len(directory.parts)
    for here, dirs, files in os.walk(directory):
        depth = len(Path(here).parts) - base
        dirs[:] = sorted(d for d in dirs if not _IMAGE_DIR.match(d) and not d.startswith(".")
                         and depth < max_depth)
        for candidate in (name, name + ".gz"):
            if candidate in files:
                found.append(Path(here) / candidate)
    return found


def find_table(name: str, places: list[Path], what: str) -> Path:
    """The one copy of table `name` (.csv or .csv.gz) in the first of `places` that has it.

    Two copies at different paths are refused rather than guessed between (two MIMIC-IV versions,
    say); the same table plain and gzipped side by side is one copy.
    """
    for place in places:
        if not place.is_dir():
            continue
        hits = _tables_under(place, name)
        folders = sorted({h.parent for h in hits})
        if len(folders) > 1:
            raise CxrcfError(f"{name}: found in {len(folders)} places under {place} "
                             f"({', '.join(str(f) for f in folders[:4])}); {what}")
        if hits:
            return hits[0]
    searched = ", ".join(str(p) for p in places)
    raise CxrcfError(f"{name} (or {name}.gz): file not found under {searched}")


@dataclass
class Candidate:
    """A table row that passed every check but the image: its image is converted in pass two."""

    id: str
    image: str
    file: str
    line: int
    subject_id: str
    sex: str
    race: str
    age: float
    finding: str
    split: str


@dataclass
class _Selection:
    """Pass one: rows that will be converted, and the bad and filtered ones."""

    source: str
    candidates: list[Candidate] = field(default_factory=list)
    bad: list[dict] = field(default_factory=list)
    filtered: Counter = field(default_factory=Counter)
    seen: set = field(default_factory=set)

    def bad_row(self, file: Path, line: int, reason: str) -> None:
        self.bad.append({"file": str(file), "row": line, "reason": reason})

    def keep(self, image_path: Path, file: Path, line: int, split: str, **row) -> None:
        if row["id"] in self.seen:
            self.bad_row(file, line, f"duplicate image id {row['id']!r}")
            return
        self.seen.add(row["id"])
        self.candidates.append(Candidate(id=row["id"], image=str(image_path), file=str(file), line=line,
                                         subject_id=row["subject_id"], sex=row["sex"], race=row["race"],
                                         age=float(row["age"]), finding=row["finding"], split=split))


# ------------------------------------------------------------------------------ pass two: images
def _convert_chunk(job: tuple) -> dict:
    """Decode, resize and write one chunk's images, then its part file (what resumption trusts).

    Runs in a worker process. The part is written last and atomically, so a chunk is either wholly
    recorded or not at all; each image's size and SHA-256 let a resumed run verify it.
    """
    from cxrcf.synth import png_bytes

    index, rows, staging, resolution = job
    staging = Path(staging)
    kept, bad = [], []
    for r in rows:
        image = Path(r["image"])
        try:
            img = load_image(image, resolution)
        except FileNotFoundError:
            bad.append({"file": r["file"], "row": r["line"], "reason": f"image file missing: {image}"})
            continue
        except Exception as err:  # noqa: BLE001 - any decoder failure (bombs included) is a bad row
            bad.append({"file": r["file"], "row": r["line"],
                        "reason": f"unreadable image {image}: {type(err).__name__}: {err}"})
            continue
        blob = png_bytes(img)
        (staging / "images" / f"{r['id']}.png").write_bytes(blob)
        kept.append({"id": r["id"], "bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()})
    part = {"chunk": index, "kept": kept, "bad": bad}
    _write_atomic(staging / "parts" / f"chunk-{index:06d}.json", json.dumps(part).encode())
    return {"chunk": index, "kept": len(kept), "bad": len(bad), "rows": len(rows)}


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_part(staging: Path, index: int) -> dict | None:
    path = staging / "parts" / f"chunk-{index:06d}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def _part_intact(staging: Path, part: dict) -> bool:
    """Every image the part lists is on disk with the recorded size and SHA-256."""
    for k in part.get("kept", []):
        path = staging / "images" / f"{k['id']}.png"
        try:
            blob = path.read_bytes()
        except OSError:
            return False
        if len(blob) != k.get("bytes") or hashlib.sha256(blob).hexdigest() != k.get("sha256"):
            return False
    return True


class _Progress:
    """One line per interval: images done, images/s, ETA, kept and unreadable so far."""

    def __init__(self, source: str, total: int, done: int, every_s: float, stream=None):
        self.source, self.total, self.done, self.start = source, total, done, done
        self.kept = self.bad = 0
        self.every_s, self.stream = every_s, stream or sys.stdout
        self.t0 = self.last = time.perf_counter()

    def update(self, result: dict) -> None:
        self.done += result["rows"]
        self.kept += result["kept"]
        self.bad += result["bad"]
        now = time.perf_counter()
        if now - self.last >= self.every_s or self.done >= self.total:
            self.last = now
            rate = (self.done - self.start) / (now - self.t0) if now > self.t0 else 0.0
            eta = f"{(self.total - self.done) / rate:.0f}s" if rate > 0 else "?"
            pct = 100.0 * self.done / self.total if self.total else 100.0
            print(f"import {self.source}: {self.done}/{self.total} images ({pct:.1f}%) | {rate:.1f} img/s | "
                  f"ETA {eta} | {self.bad} unreadable", file=self.stream, flush=True)


def _fingerprint(selection: _Selection, resolution: int, chunk_size: int) -> str:
    """What the staged chunks were made from: a different selection or size invalidates them."""
    h = hashlib.sha256(f"{selection.source}\n{resolution}\n{chunk_size}\n".encode())
    for c in selection.candidates:
        h.update(f"{c.id}\0{c.image}\n".encode())
    return h.hexdigest()


def _convert(selection: _Selection, staging: Path, resolution: int, workers: int, chunk_size: int,
             progress_s: float) -> dict:
    """Convert every candidate's image (skipping verified chunks of an earlier, interrupted run)."""
    rows = [c.__dict__ for c in selection.candidates]
    chunks = [(i, rows[s:s + chunk_size]) for i, s in enumerate(range(0, len(rows), chunk_size))]
    parts = {}
    for index, _ in chunks:
        part = _read_part(staging, index)
        if part is not None and _part_intact(staging, part):
            parts[index] = part
    pending = [(i, r, str(staging), resolution) for i, r in chunks if i not in parts]
    resumed = sum(len(r) for i, r in chunks if i in parts)
    if resumed:
        print(f"import {selection.source}: resuming: {len(parts)} of {len(chunks)} chunks "
              f"({resumed} images) already converted in {staging}", flush=True)
    bar = _Progress(selection.source, len(rows), resumed, progress_s)
    t0 = time.perf_counter()
    if workers <= 1 or len(pending) <= 1:
        for job in pending:
            bar.update(_convert_chunk(job))
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        # spawn: the parent holds pandas tables and maybe threads; forking those is not safe.
        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
            for future in as_completed([pool.submit(_convert_chunk, job) for job in pending]):
                bar.update(future.result())
    elapsed = time.perf_counter() - t0
    converted = sum(len(job[1]) for job in pending)
    for index, _ in chunks:
        if index not in parts:
            parts[index] = _read_part(staging, index)
            if parts[index] is None:
                raise CxrcfError(f"{staging}: chunk {index} left no part; rerun the same command to finish")
    return {"parts": [parts[i] for i, _ in chunks], "converted": converted, "resumed": resumed,
            "seconds": elapsed, "images_per_s": converted / elapsed if elapsed > 0 else None}


def _finish(selection: _Selection, staging: Path, parts: list[dict], resolution: int, extra: dict) -> dict:
    import pandas as pd

    from cxrcf.data import subgroup_counts
    from cxrcf.synth import AGE_DECIMALS, format_csv

    kept_ids = {k["id"] for part in parts for k in part["kept"]}
    rows = [{"id": c.id, "path": f"images/{c.id}.png", "subject_id": c.subject_id, "sex": c.sex,
             "race": c.race, "age": c.age, "finding": c.finding, "split": c.split}
            for c in selection.candidates if c.id in kept_ids]
    bad = selection.bad + [b for part in parts for b in part["bad"]]
    if not rows:
        common = Counter(b["reason"] for b in bad).most_common(1)
        hint = f"; most common problem: {common[0][0]} ({common[0][1]} rows)" if common else ""
        raise CxrcfError(f"{selection.source}: no image passed the filters ({len(bad)} bad rows, "
                         f"filtered {dict(selection.filtered)}){hint}")
    columns = ["id", "path", "subject_id", "sex", "race", "age", "finding", "split"]
    meta = pd.DataFrame(rows, columns=columns)
    (staging / "metadata.csv").write_text(format_csv(meta, {"age": AGE_DECIMALS}))
    errors = pd.DataFrame(bad, columns=["file", "row", "reason"])
    errors.to_csv(staging / "import_errors.csv", index=False, lineterminator="\n")
    counts = subgroup_counts(meta)
    info = {"name": selection.source, "resolution": resolution, "counts": counts,
            "filtered": dict(sorted(selection.filtered.items())), "bad_rows": len(bad), **extra}
    (staging / "dataset.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    card = [f"# {selection.source} (imported)", "",
            f"- images kept: {len(meta)} at {resolution}x{resolution}",
            f"- split: {extra['split']}",
            f"- bad rows (see import_errors.csv): {len(bad)}",
            *[f"- filtered, {k}: {v}" for k, v in sorted(selection.filtered.items())],
            *[f"- {k}: {v}" for k, v in sorted(counts.items()) if k != "sex_race_finding"], ""]
    (staging / "dataset_card.md").write_text("\n".join(card))
    return info


def _run(out: str | Path, resolution: int, selection: _Selection, extra: dict, workers: int | None,
         chunk_size: int, progress_s: float) -> dict:
    from cxrcf.data import check_replaceable

    out = check_replaceable(out)
    staging = out.parent / f".{out.name}.import"
    fingerprint = _fingerprint(selection, resolution, chunk_size)
    record = staging / "import.json"
    if staging.exists():
        try:
            same = json.loads(record.read_text()).get("fingerprint") == fingerprint
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            same = False
        if not same:
            print(f"import {selection.source}: discarding {staging}: an unfinished import of other inputs",
                  flush=True)
            shutil.rmtree(staging)
    if not staging.exists():
        (staging / "images").mkdir(parents=True)
        (staging / "parts").mkdir()
        _write_atomic(record, json.dumps({"fingerprint": fingerprint}).encode())
    for p in (staging / "parts").glob(".*.tmp"):
        p.unlink(missing_ok=True)
    workers = max(1, workers if workers is not None else (os.cpu_count() or 1))
    print(f"import {selection.source}: {len(selection.candidates)} images to convert "
          f"({len(selection.bad)} bad and {sum(selection.filtered.values())} filtered rows in the tables) "
          f"with {workers} worker(s); split: {extra['split']}", flush=True)
    run = _convert(selection, staging, resolution, workers, chunk_size, progress_s)
    try:
        info = _finish(selection, staging, run["parts"], resolution, extra)
    except CxrcfError as err:
        shutil.rmtree(staging)  # nothing in it is worth resuming
        raise CxrcfError(f"{err}; nothing written to {out}") from None
    shutil.rmtree(staging / "parts")
    record.unlink()
    # The finished dataset takes the place of `out` in one rename; a previous dataset there goes
    # only after the new one is in place.
    old = out.parent / f".{out.name}.old"
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
    os.replace(staging, out)
    shutil.rmtree(old, ignore_errors=True)
    info["throughput"] = {"converted": run["converted"], "resumed": run["resumed"],
                          "seconds": round(run["seconds"], 3),
                          "images_per_s": round(run["images_per_s"], 2) if run["images_per_s"] else None,
                          "workers": workers}
    print(f"import {selection.source}: kept {info['counts']['total']} images, {info['bad_rows']} bad rows "
          f"(listed in {out / 'import_errors.csv'}), filtered {dict(sorted(selection.filtered.items()))}; "
          f"split: {extra['split']}", flush=True)
    return info


def _check_resolution(resolution: int) -> None:
    if not 8 <= resolution <= REFERENCE_SIZE:
        raise CxrcfError(f"resolution: {resolution} is outside 8-{REFERENCE_SIZE}")


# ------------------------------------------------------------------------------------ MIMIC-CXR
CXR_TABLES = ("mimic-cxr-2.0.0-metadata.csv", "mimic-cxr-2.0.0-chexpert.csv")
SPLIT_TABLE = "mimic-cxr-2.0.0-split.csv"
_OFFICIAL_SPLIT = {"train": "train", "validate": "val", "val": "val", "test": "test"}
DEFAULT_CHUNK = 256


def mimic_iv_places(root: Path, mimic_iv: str | Path | None) -> list[Path]:
    """Where MIMIC-IV's patients/admissions may be: the folder given, else the root, else the
    PhysioNet sibling (`files/mimic-cxr-jpg/2.0.0` next to `files/mimiciv/<version>`)."""
    if mimic_iv is not None:
        return [Path(mimic_iv)]
    places = [root]
    if root.parent.name.startswith("mimic-cxr"):
        places.append(root.parent.parent / "mimiciv")
    return places


def import_mimic(root: str | Path, out: str | Path, resolution: int = 64, mimic_iv: str | Path | None = None,
                 workers: int | None = None, chunk_size: int = DEFAULT_CHUNK, progress_s: float = 5.0) -> dict:
    """MIMIC-CXR-JPG (+ MIMIC-IV patients/admissions) under `root` -> dataset at `out`."""
    _check_resolution(resolution)
    root = Path(root)
    if not root.is_dir():
        raise CxrcfError(f"--root {root}: not a folder")
    pick = "pass --root the MIMIC-CXR-JPG version folder that holds it"
    meta_path, labels_path = (find_table(n, [root], pick) for n in CXR_TABLES)
    iv = mimic_iv_places(root, mimic_iv)
    pick_iv = "pass --mimic-iv with the MIMIC-IV folder to use"
    patients_path = find_table("patients.csv", iv, pick_iv)
    admissions_path = find_table("admissions.csv", iv, pick_iv)
    meta = _read(meta_path, ("dicom_id", "subject_id", "study_id", "ViewPosition"))
    labels = _read(labels_path, ("subject_id", "study_id", "No Finding", "Pleural Effusion"))
    patients = _read(patients_path, ("subject_id", "gender", "anchor_age", "anchor_year"))
    admissions = _read(admissions_path, ("subject_id",))
    race_col = "race" if "race" in admissions.columns else "ethnicity"
    if race_col not in admissions.columns:
        raise CxrcfError(f"{admissions_path}: missing column race (or ethnicity)")
    try:
        split_path = find_table(SPLIT_TABLE, [root], pick)
    except CxrcfError as err:
        if "not found" not in str(err):
            raise
        split_path = None
    split_of: dict[str, tuple[int, str]] = {}
    if split_path is not None:
        splits = _read(split_path, ("dicom_id", "split"))
        split_of = {d.strip(): (i + 2, v) for i, (d, v) in enumerate(zip(splits["dicom_id"], splits["split"]))}
        split_name = f"official ({split_path.name}: train/validate/test)"
    else:
        split_name = f"subject hash 80/10/10 (no {SPLIT_TABLE}[.gz] under {root})"

    label_rows = {(r["subject_id"].strip(), r["study_id"].strip()): r for r in labels.to_dict("records")}
    patient_rows = {r["subject_id"].strip(): (i + 2, r) for i, r in enumerate(patients.to_dict("records"))}
    races: dict[str, list[tuple[int, str]]] = {}
    for i, (sid, race) in enumerate(zip(admissions["subject_id"], admissions[race_col])):
        races.setdefault(sid.strip(), []).append((i + 2, race))

    w = _Selection("MIMIC-CXR-JPG")
    for i, r in enumerate(meta.to_dict("records")):
        line = i + 2
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
        if split_path is None:
            split = subject_split(sid)
        elif dicom not in split_of:
            w.bad_row(meta_path, line, f"dicom_id {dicom} has no row in {split_path.name}")
            continue
        else:
            s_line, value = split_of[dicom]
            split = _OFFICIAL_SPLIT.get(value.strip().lower())
            if split is None:
                w.bad_row(split_path, s_line, f"split {value!r} is not train, validate or test")
                continue
        image = root / "files" / f"p{sid[:2]}" / f"p{sid}" / f"s{study}" / f"{dicom}.jpg"
        w.keep(image, meta_path, line, split, id=dicom, subject_id=sid, sex=sex, race=race, age=age,
               finding=("no_finding", "pleural_effusion")[finding])

    extra = {"source_root": str(root), "split": split_name,
             "tables": [str(p) for p in (meta_path, labels_path, patients_path, admissions_path, split_path) if p]}
    return _run(out, resolution, w, extra, workers, chunk_size, progress_s)


def _age_at_study(anchor_age: float, anchor_year: str, study_date: str) -> float:
    """MIMIC ages are given at the (shifted) anchor year; studies carry shifted dates on the same scale."""
    try:
        return anchor_age + (int(str(study_date)[:4]) - int(anchor_year))
    except (TypeError, ValueError):
        return anchor_age


def _mimic_race(w: _Selection, entries, admissions_path: Path, meta_path: Path, line: int,
                sid: str) -> str | None:
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
DEMO_NAMES = ("CHEXPERT DEMO.xlsx", "CHEXPERT_DEMO.xlsx", "CHEXPERT DEMO.csv", "CHEXPERT_DEMO.csv")


def chexpert_root(root: Path) -> Path:
    """The folder holding train.csv/valid.csv: `root` itself or its one release subfolder."""
    def has_tables(d: Path) -> bool:
        return any((d / f"{t}.csv{z}").is_file() for t in ("train", "valid") for z in ("", ".gz"))

    if has_tables(root):
        return root
    inner = [d for d in sorted(root.iterdir()) if d.is_dir() and has_tables(d)] if root.is_dir() else []
    if len(inner) == 1:
        return inner[0]
    if len(inner) > 1:
        raise CxrcfError(f"{root}: holds several CheXpert releases ({', '.join(d.name for d in inner)}); "
                         "pass --root one of them")
    raise CxrcfError(f"{root}: neither train.csv nor valid.csv (or .csv.gz) found here or in a subfolder")


def _table(root: Path, stem: str) -> Path | None:
    for name in (f"{stem}.csv", f"{stem}.csv.gz"):
        if (root / name).is_file():
            return root / name
    return None


def import_chexpert(root: str | Path, out: str | Path, resolution: int = 64,
                    demographics: str | Path | None = None, workers: int | None = None,
                    chunk_size: int = DEFAULT_CHUNK, progress_s: float = 5.0) -> dict:
    """CheXpert train/valid tables under `root` (+ the CHEXPERT DEMO race table, .xlsx or .csv) -> `out`."""
    _check_resolution(resolution)
    root = chexpert_root(Path(root))
    tables = [t for t in (_table(root, "train"), _table(root, "valid")) if t is not None]
    required = ("Path", "Sex", "Age", "Frontal/Lateral", "No Finding", "Pleural Effusion")
    frames = [(t, _read(t, required)) for t in tables]
    demo_path = Path(demographics) if demographics else next(
        (d / n for d in (root, root.parent) for n in DEMO_NAMES if (d / n).is_file()), None)
    race_of: dict[str, tuple[int, str]] = {}
    if demo_path is not None:
        demo = _read(demo_path, ("PATIENT", "PRIMARY_RACE"))
        race_of = {p.strip(): (i + 2, r) for i, (p, r) in enumerate(zip(demo["PATIENT"], demo["PRIMARY_RACE"]))}

    w = _Selection("CheXpert")
    for table, frame in frames:
        for i, r in enumerate(frame.to_dict("records")):
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
            w.keep(_resolve(root, rel), table, line, subject_split(patient), id="_".join(m.groups()),
                   subject_id=patient, sex=sex, race=race, age=age,
                   finding=("no_finding", "pleural_effusion")[finding])

    # CheXpert's valid set (200 patients) is too small to be a validation split here, and its test
    # labels ship without sex and age: every patient is split by the hash instead.
    split_name = f"subject hash 80/10/10 over {' + '.join(t.name for t in tables)}"
    extra = {"source_root": str(root), "demographics": str(demo_path) if demo_path else None,
             "split": split_name, "tables": [str(t) for t in tables]}
    return _run(out, resolution, w, extra, workers, chunk_size, progress_s)


def _chexpert_race(w: _Selection, race_of, demo_path, table: Path, line: int, patient: str) -> str | None:
    if demo_path is None:
        w.bad_row(table, line, "no race: CheXpert has no race column; pass --demographics "
                               "(CHEXPERT DEMO.xlsx, or a CSV with PATIENT and PRIMARY_RACE)")
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
