"""`cxrcf data ...`: generate SynthCXR, import MIMIC-CXR-JPG / CheXpert, validate and summarise a dataset."""

from __future__ import annotations

import argparse
from pathlib import Path

from cxrcf.cli import add_params
from cxrcf.errors import CxrcfError

AGE_BANDS = ((18, 40), (40, 60), (60, 75), (75, 121))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cxrcf data", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("synth", help="generate the SynthCXR dataset (defaults from params.yaml data.synth)")
    add_params(s)
    s.add_argument("--out", default=None, help="dataset folder (default: params data.root)")
    s.add_argument("--n", type=int, default=None, help="number of images")
    s.add_argument("--resolution", type=int, default=None)
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--workers", type=int, default=None, help="processes rendering and writing PNGs")

    m = sub.add_parser("import-mimic", help="import MIMIC-CXR-JPG (+ MIMIC-IV patients/admissions)")
    m.add_argument("--root", required=True,
                   help="the MIMIC-CXR-JPG folder (tables .csv or .csv.gz, files/p1x/...), as PhysioNet ships it")
    m.add_argument("--mimic-iv", default=None,
                   help="folder with MIMIC-IV patients/admissions (default: under --root, or the PhysioNet "
                        "sibling files/mimiciv/<version>)")
    m.add_argument("--out", required=True)
    m.add_argument("--resolution", type=int, default=64)

    c = sub.add_parser("import-chexpert", help="import CheXpert (train.csv / valid.csv)")
    c.add_argument("--root", required=True,
                   help="the CheXpert release folder holding train.csv / valid.csv, or the folder above it")
    c.add_argument("--out", required=True)
    c.add_argument("--resolution", type=int, default=64)
    c.add_argument("--demographics", default=None,
                   help="CHEXPERT DEMO.xlsx or a CSV with PATIENT, PRIMARY_RACE (default: found beside the tables)")
    for q in (m, c):
        q.add_argument("--workers", type=int, default=None, help="image-converting processes (default: all cores)")
        q.add_argument("--chunk-size", type=int, default=256,
                       help="images per resumable unit of work (a rerun must use the same value to resume)")

    v = sub.add_parser("validate", help="check every image and metadata row")
    v.add_argument("--data", default="data")
    v.add_argument("--out", default=None, help="also write the report as JSON (a DVC metric)")

    y = sub.add_parser("summary", help="counts per split and subgroup, age statistics, finding rate by age")
    y.add_argument("--data", default="data")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    return {"synth": _synth, "import-mimic": _mimic, "import-chexpert": _chexpert,
            "validate": _validate, "summary": _summary}[args.command](args)


def _synth(args) -> int:
    from cxrcf.config import load_params
    from cxrcf.synth import generate_dataset

    overrides = {k: v for k, v in (("n_images", args.n), ("resolution", args.resolution), ("seed", args.seed))
                 if v is not None}
    params = load_params(args.params, {"data": {"synth": overrides}} if overrides else None)
    cfg = params.data.synth
    out = Path(args.out or params.data.root)
    print(f"synth: {cfg.n_images} images at {cfg.resolution}x{cfg.resolution}, seed {cfg.seed} -> {out}", flush=True)
    generate_dataset(out, cfg, workers=args.workers, progress=True)
    return 0


def _mimic(args) -> int:
    from cxrcf.importers import import_mimic

    import_mimic(args.root, args.out, resolution=args.resolution, mimic_iv=args.mimic_iv, workers=args.workers,
                 chunk_size=_chunk_size(args.chunk_size))
    return 0


def _chunk_size(value: int) -> int:
    if value < 1:
        raise CxrcfError(f"--chunk-size: {value} must be at least 1")
    return value


def _chexpert(args) -> int:
    from cxrcf.importers import import_chexpert

    import_chexpert(args.root, args.out, resolution=args.resolution, demographics=args.demographics,
                    workers=args.workers, chunk_size=_chunk_size(args.chunk_size))
    return 0


def _validate(args) -> int:
    from cxrcf.data import validate_dataset

    report = validate_dataset(args.data)
    if args.out and report["ok"]:
        from cxrcf.fileio import write_json

        write_json(args.out, {"ok": True, "n_images": report["n_images"], "counts": report["counts"]})
    if report["ok"]:
        counts = ", ".join(f"{k} {v}" for k, v in report["counts"].items())
        print(f"{args.data}: ok, {report['n_images']} images ({counts})")
        return 0
    for problem in report["problems"]:
        print(problem)
    print(f"{args.data}: {len(report['problems'])} problem(s)")
    return 1


def summary_text(meta) -> str:
    """Plain-text tables: counts per split x subgroup, age statistics, finding rate by age band."""
    import pandas as pd

    lines = [f"{len(meta)} images", ""]
    rows = []
    for attr in ("sex", "race", "finding"):
        table = pd.crosstab(meta[attr], meta["split"]).reindex(columns=["train", "val", "test"], fill_value=0)
        for value, counts in table.iterrows():
            rows.append((f"{attr}={value}", *(int(c) for c in counts)))
    lines.append(f"{'subgroup':<28}{'train':>8}{'val':>8}{'test':>8}")
    lines += [f"{name:<28}{a:>8}{b:>8}{c:>8}" for name, a, b, c in rows]
    totals = meta["split"].value_counts()
    lines.append(f"{'total':<28}" + "".join(f"{int(totals.get(s, 0)):>8}" for s in ("train", "val", "test")))
    lines += ["", f"{'age':<28}{'mean':>8}{'sd':>8}{'min':>8}{'max':>8}"]
    for split in ("train", "val", "test"):
        a = meta.loc[meta["split"] == split, "age"]
        if len(a):
            lines.append(f"{split:<28}{a.mean():>8.1f}{a.std(ddof=0):>8.1f}{a.min():>8.1f}{a.max():>8.1f}")
    lines += ["", f"{'age band':<28}{'images':>8}{'effusion rate':>15}"]
    effusion = meta["finding"] == "pleural_effusion"
    for lo, hi in AGE_BANDS:
        sel = (meta["age"] >= lo) & (meta["age"] < hi)
        rate = f"{effusion[sel].mean():.3f}" if sel.any() else "-"
        label = f"{lo}-{hi - 1}" if hi < 121 else f"{lo}+"
        lines.append(f"{label:<28}{int(sel.sum()):>8}{rate:>15}")
    return "\n".join(lines)


def _summary(args) -> int:
    from cxrcf.data import load_metadata

    if not (Path(args.data) / "metadata.csv").is_file():
        raise CxrcfError(f"{args.data}: no metadata.csv (run `cxrcf data synth` or an importer first)")
    print(summary_text(load_metadata(args.data)))
    return 0
