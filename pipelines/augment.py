"""`cxrcf augment`: counterfactual images at dataset scale, on Ray Data, resumable.

    cxrcf augment --params params.yaml --data data --plan plan.yaml --out artifacts/augment/run1
                  [--model models:/cxrcf-generator@champion | a saved GeneratorBundle directory]

Pipeline (one Ray Data row per chunk of `params.augment.batch_size` items of one intervention):
read the planned chunks -> decode the source PNGs (tasks) -> counterfactuals with an actor pool that
loads the model once per actor (`map_batches`, `ActorPoolStrategy`) -> encode PNG and write each
image atomically plus the chunk's manifest part (tasks). The driver only counts finished chunks for
the progress line.

Output folder:
    run.json        the run fingerprint (plan, data, model version, t_u, seed, batch size)
    planned.csv     every planned item (id, source, intervention)
    images/<id>.png generated images (8-bit grayscale at the model's resolution)
    parts/chunk-NNNNNN.json  per-chunk manifest rows and errors (what resumption trusts)
    manifest.csv    one row per generated image, in plan order (written at the end)
    errors.csv      item, source, file, reason for every input that could not be used
    summary.json    images written / skipped / failed, throughput
manifest.csv and errors.csv together hold exactly one row per planned item.

Manifest columns: id (deterministic from source id + intervention), path (relative to the output
folder), source_id, subject_id, split (the source's), intervention (JSON), sex/race/age/finding (the
parents after the intervention, through the bundle's SCM: do(age) recomputes finding), source_* (the
factual parents), model_name, model_version (registry version, or `dir-sha256:` of a bundle folder),
t_u, seed, chunk, p_before_*/p_after_* (the evaluation predictor's P(female), P(race), P(effusion)
on the source and on the counterfactual), pred_age_before/pred_age_after (its age, years).

Safe under concurrency and power loss: the driver holds an exclusive lock (`flock` on `<out>/.lock`,
which records the holder) for the whole job, so a second job on the same folder stops with one line
naming the holder instead of sweeping the first job's temporaries; the kernel drops the lock when
its holder dies, so a killed job never leaves a stale lock. Every file is written to a temporary
name, fsynced, renamed and its folder fsynced, images before the chunk's part, so a part on disk
means its images are on disk. The part records each image's size and SHA-256; a chunk counts as done
only when every image still has them (a zero-byte or torn PNG after power loss is regenerated).
An input that cannot be decoded (corrupt, truncated, a decompression bomb over Pillow's pixel limit,
any decoder exception) becomes a row of errors.csv, never a failed job.

A rerun with the same arguments skips chunks whose part and verified images exist (chunks with errors
are retried) and reproduces the others exactly: each chunk's sampling seed derives from the plan seed
and its first item, never from what else ran. Actor count and CPUs per actor are not part of the
fingerprint, so a rerun may use more or fewer actors. Different plan/data/model/t_u/seed/batch size
in the same folder is refused. On a multi-node cluster `--out` must be a shared filesystem.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Self

from cxrcf.attributes import ATTRIBUTES, VOCAB, decode
from cxrcf.cli import add_params
from cxrcf.errors import CxrcfError
from pipelines.augment_plan import (
    Chunk,
    chunk_items,
    expand_plan,
    intervention_codes,
    intervention_key,
    load_plan,
    plan_dump,
)

# Decode/encode tasks are light; claiming whole CPUs for them would starve the actor pool.
IO_TASK_CPUS = 0.25
# Env that actors need to resolve the same MLflow store as the driver.
_MLFLOW_ENV = ("MLFLOW_TRACKING_URI", "CXRCF_MLFLOW_ARTIFACTS")


# ------------------------------------------------------------------------------------- helpers
def _sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _sha256_dir(directory: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(q for q in directory.rglob("*") if q.is_file()):
        h.update(str(p.relative_to(directory)).encode() + b"\0" + _sha256_file(p).encode())
    return h.hexdigest()


def _fsync_dir(directory: Path) -> None:
    """Make renames inside `directory` durable (a rename lives in the folder's own data)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _durable_replace(path: Path, data: bytes, sync_dir: bool = True) -> None:
    """Write `data` under a temporary name, fsync it, rename it onto `path` (and fsync the folder).

    Batched writers pass sync_dir=False and fsync the folder once for the whole batch.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sync_dir:
        _fsync_dir(path.parent)


def _durable_json(path: Path, obj) -> None:
    _durable_replace(path, (json.dumps(obj, indent=2, sort_keys=True, default=float) + "\n").encode())


def _durable_csv(path: Path, frame) -> None:
    _durable_replace(path, frame.to_csv(index=False).encode())


class OutputLock:
    """Exclusive lock on an output folder for the life of one job (`flock`, so the kernel releases it
    when the holder dies, even by SIGKILL or power loss: no stale locks to clean up by hand).

    The lock file holds who took it, so that the job that is refused can say whom it waits for.
    """

    NAME = ".lock"

    def __init__(self, root: str | Path, job: str = "augment"):
        self.root = Path(root)
        self.path = self.root / self.NAME
        self.job = job
        self.fd: int | None = None

    def __enter__(self) -> Self:
        import fcntl

        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder(fd)
            os.close(fd)
            raise CxrcfError(f"--out {self.root}: in use by another {self.job} job ({holder}); wait for it to "
                             "finish or use another --out folder") from None
        except BaseException:
            os.close(fd)
            raise
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  "command": " ".join(sys.argv)[:300]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        os.fsync(fd)
        self.fd = fd
        return self

    @staticmethod
    def _holder(fd: int) -> str:
        try:
            record = json.loads(os.pread(fd, 4096, 0).decode())
            return f"pid {record['pid']} on {record['host']} since {record['since']}: {record['command']}"
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            # The holder is between taking the lock and writing its record.
            return "holder still starting"

    def __exit__(self, *exc) -> None:
        import fcntl

        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def check_pixels(path: str | Path) -> None:
    """Refuse a decompression bomb from its header, before anything inflates it.

    Pillow's own limit (Image.MAX_IMAGE_PIXELS) is the bound; past it Pillow only warns, up to twice
    it, so the warning is made an error here. cxrcf's fast PNG path never asks Pillow, hence this check.
    Files Pillow cannot open at all are left to `read_image`, which names the problem.
    """
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path):
                pass
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise CxrcfError(f"{path}: decompression bomb refused: {err}") from None
    except Exception:  # noqa: BLE001 - unreadable files get read_image's message instead
        return


def chunk_seed(seed: int, chunk: Chunk) -> int:
    """Seed of one chunk's draws: from the plan seed and the chunk's first item only."""
    digest = hashlib.sha256(f"{seed}\n{chunk.items[0].item_id}".encode()).hexdigest()
    return int(digest[:8], 16)


def _items_payload(chunk: Chunk) -> str:
    return json.dumps([{
        "id": it.item_id, "source_id": it.source_id, "path": it.path, "split": it.split,
        "subject_id": it.subject_id, "parents": it.parents, "intervention": it.intervention,
    } for it in chunk.items])


# ------------------------------------------------------------------------------ pipeline stages
def decode_chunk(row: dict, resolution: int) -> dict:
    """Read the chunk's source images (uint8, as stored); unreadable ones become errors + zero images.

    Any exception from a decoder is an error row: one bad input must not fail the chunk on every
    rerun. A zero image keeps the chunk's batch (and so every other item's sampling noise) the same whether
    or not a neighbour is corrupt. No torch here: these tasks stay cheap to start.
    """
    import numpy as np

    from cxrcf.data import read_image

    items = json.loads(row["items"])
    pixels, errors = [], []
    for it in items:
        try:
            check_pixels(it["path"])
            image = read_image(Path(it["path"]))
            if image.shape[0] != image.shape[1]:
                height, width = image.shape
                raise CxrcfError(f"{it['path']}: image is {width}x{height}, expected a square")
            pixels.append(image)
        except CxrcfError as err:
            reason = str(err).removeprefix(f"{it['path']}: ")
            errors.append({"item": it["id"], "source": it["source_id"], "file": it["path"], "reason": reason})
            pixels.append(None)
        except Exception as err:  # noqa: BLE001 - e.g. MemoryError or zlib.error from a hostile file
            errors.append({"item": it["id"], "source": it["source_id"], "file": it["path"],
                           "reason": f"image could not be decoded: {type(err).__name__}: {err}"})
            pixels.append(None)
    shape = next((p.shape for p in pixels if p is not None), (resolution, resolution))
    pixels = [np.zeros(shape, dtype=np.uint8) if p is None else p for p in pixels]
    return {"chunk": row["chunk"], "items": row["items"], "seed": row["seed"], "pixels": _stack(pixels),
            "errors": json.dumps(errors)}


def model_images(pixels, resolution: int):
    """Stored images (one uint8 stack, or a list of differently sized ones) -> (N, 1, R, R) model tensor."""
    import numpy as np
    import torch

    from cxrcf.data import to_model_images

    if not (isinstance(pixels, np.ndarray) and pixels.dtype == np.uint8 and pixels.ndim == 3):
        pixels = list(pixels)
        x = torch.empty(len(pixels), 1, resolution, resolution)
        by_shape = {}
        for i, p in enumerate(pixels):
            by_shape.setdefault(np.asarray(p).shape, []).append(i)
        for index in by_shape.values():
            x[index] = to_model_images(np.stack([np.asarray(pixels[i]) for i in index]), resolution)
        return x
    return to_model_images(pixels, resolution)


class Counterfactualizer:
    """Ray Data actor: loads the generator bundle once, then turns chunks into counterfactuals."""

    def __init__(self, model_ref: str, t_u: float, num_threads: int, use_gpu: bool, env: dict):
        import torch

        os.environ.update(env)
        torch.set_num_threads(num_threads)
        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.bundle = load_generator(model_ref).to(self.device)
        self.t_u = t_u

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        out = {"chunk": [], "items": [], "rows": [], "errors": [], "cf": []}
        for i in range(len(batch["chunk"])):
            rows, cf = self._one(json.loads(batch["items"][i]), batch["pixels"][i],
                                 json.loads(batch["errors"][i]), int(batch["seed"][i]))
            out["chunk"].append(int(batch["chunk"][i]))
            out["items"].append(batch["items"][i])
            out["rows"].append(json.dumps(rows))
            out["errors"].append(batch["errors"][i])
            out["cf"].append(cf)
        return {"chunk": np.array(out["chunk"]), "items": np.array(out["items"], dtype=object),
                "rows": np.array(out["rows"], dtype=object),
                "errors": np.array(out["errors"], dtype=object), "cf": _stack(out["cf"])}

    def _one(self, items: list, pixels, errors: list, seed: int):
        from cxrcf.batch import Edit, counterfactual_batch
        from cxrcf.bundle import parents_from_labels
        from cxrcf.data import from_model_images

        keys = {intervention_key(it["intervention"]) for it in items}
        if len(keys) != 1:
            raise RuntimeError(f"chunk holds {len(keys)} interventions; plans must chunk by intervention")
        failed = {e["item"] for e in errors}
        x = model_images(pixels, self.bundle.resolution).to(self.device)
        parents = parents_from_labels([it["parents"] for it in items], device=self.device)
        do = intervention_codes(items[0]["intervention"])
        out = counterfactual_batch(self.bundle, x, parents, [Edit(range(len(items)), do, self.t_u)], seed=seed,
                                   probabilities=True)
        rows = []
        for i, it in enumerate(items):
            if it["id"] in failed:
                continue
            rows.append({"index": i, "parents_after": _parents_row(out.parents, i),
                         "before": _probs_row(out.factual[i]), "after": _probs_row(out.probabilities[i])})
        return rows, from_model_images(out.images)


def _stack(arrays: list):
    import numpy as np

    if len({a.shape for a in arrays}) == 1:
        return np.stack(arrays)
    holder = np.empty(len(arrays), dtype=object)
    holder[:] = arrays
    return holder


def _parents_row(p: dict, i: int) -> dict:
    return {a: round(decode(a, p[a][i].item()), 4) if a == "age" else decode(a, p[a][i].item())
            for a in ATTRIBUTES}


def _probs_row(p: dict) -> dict:
    """A probability row of `cxrcf.batch.probability_rows` as the manifest's rounded, flat columns."""
    row = {"sex": round(p["sex"], 6), "finding": round(p["finding"], 6), "age": round(p["age"], 4)}
    for name in VOCAB["race"]:
        row[f"race_{name}"] = round(p["race"][name], 6)
    return row


def write_chunk(row: dict, out_dir: str, model: dict, t_u: float, seed: int) -> dict:
    """Encode and durably write each image, then the chunk's part (the proof the chunk is done).

    Order matters for power loss: images fsynced, their folder fsynced, only then the part; the part
    carries each image's size and SHA-256 so that a later check can tell a whole image from a torn one.
    """
    import numpy as np
    from PIL import Image

    out = Path(out_dir)
    chunk = int(row["chunk"])
    items = json.loads(row["items"])
    cf = np.asarray(row["cf"])
    rows = []
    for r in json.loads(row["rows"]):
        it = items[r["index"]]
        rel = f"images/{it['id']}.png"
        buf = io.BytesIO()
        Image.fromarray(cf[r["index"]]).save(buf, format="PNG")
        blob = buf.getvalue()
        _durable_replace(out / rel, blob, sync_dir=False)
        rows.append(manifest_row(it, rel, r, model, t_u, seed, chunk, len(blob), hashlib.sha256(blob).hexdigest()))
    if rows:
        _fsync_dir(out / "images")
    errors = json.loads(row["errors"])
    _durable_json(out / "parts" / f"chunk-{chunk:06d}.json", {"chunk": chunk, "rows": rows, "errors": errors})
    return {"chunk": chunk, "written": len(rows), "failed": len(errors)}


MANIFEST_COLUMNS = (
    ["id", "path", "bytes", "sha256", "source_id", "subject_id", "split", "intervention", "sex", "race", "age", "finding"]
    + [f"source_{a}" for a in ("sex", "race", "age", "finding")]
    + ["model_name", "model_version", "t_u", "seed", "chunk"]
    + [f"p_{when}_{k}" for when in ("before", "after")
       for k in ("sex", "race_white", "race_asian", "race_black", "finding")]
    + ["pred_age_before", "pred_age_after"]
)
ERROR_COLUMNS = ["item", "source", "file", "reason"]


def manifest_row(it: dict, rel: str, r: dict, model: dict, t_u: float, seed: int, chunk: int,
                 size: int, sha256: str) -> dict:
    row = {"id": it["id"], "path": rel, "bytes": size, "sha256": sha256, "source_id": it["source_id"], "subject_id": it["subject_id"],
           "split": it["split"], "intervention": intervention_key(it["intervention"]), **r["parents_after"]}
    row.update({f"source_{a}": v for a, v in it["parents"].items()})
    row.update({"model_name": model["name"], "model_version": model["version"], "t_u": t_u, "seed": seed,
                "chunk": chunk})
    for when in ("before", "after"):
        row.update({f"p_{when}_{k}" if k != "age" else f"pred_age_{when}": v for k, v in r[when].items()})
    return {c: row[c] for c in MANIFEST_COLUMNS}


# --------------------------------------------------------------------------------------- model
def load_generator(model_ref: str):
    from store.models import load_bundle

    return load_bundle(model_ref)[0]


def resolve_model(model_uri: str) -> tuple[str, dict, int]:
    """(reference every actor loads, {name, version}, resolution); a registry alias is pinned to its
    version now, so that an alias moved mid-job cannot mix two models in one output."""
    from store.models import load_bundle

    bundle, info = load_bundle(model_uri)
    if Path(model_uri).is_dir():
        # A folder has no registry version: its content hash stands in, so edits to it change the run.
        name = str(info.get("name") or Path(model_uri).resolve().name)
        version = f"dir-sha256:{_sha256_dir(Path(model_uri))[:16]}"
        return str(Path(model_uri).resolve()), {"name": name, "version": version}, bundle.resolution
    name, version = info.get("name"), info.get("version")
    if not name or version is None:
        raise CxrcfError(f"--model {model_uri}: registry returned no name/version for it")
    return f"models:/{name}/{version}", {"name": str(name), "version": str(version)}, bundle.resolution


# ------------------------------------------------------------------------------- run bookkeeping
class RunFolder:
    def __init__(self, out_dir: str | Path):
        self.root = Path(out_dir)
        self.images = self.root / "images"
        self.parts = self.root / "parts"

    def part_path(self, chunk: Chunk) -> Path:
        return self.parts / f"{chunk.name}.json"

    def claim(self, inputs: dict) -> str:
        """Store the fingerprint on first use; refuse a folder that holds a different run.

        Call it under the folder's OutputLock: it sweeps temporaries, which belong to nobody only
        when no other job holds the folder.
        """
        fingerprint = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()
        path = self.root / "run.json"
        if path.exists():
            try:
                old = json.loads(path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise CxrcfError(f"{path}: unreadable run record; use a new --out folder") from None
            if old.get("fingerprint") != fingerprint:
                old_inputs = old.get("inputs") or {}
                differ = sorted(k for k in set(inputs) | set(old_inputs)
                                if inputs.get(k) != old_inputs.get(k)) or ["inputs"]
                raise CxrcfError(f"--out {self.root}: holds a run with different {', '.join(differ)}; "
                                 "use a new --out folder (or delete this one) to start another run")
        else:
            _durable_json(path, {"fingerprint": fingerprint, "inputs": inputs})
        self.images.mkdir(parents=True, exist_ok=True)
        self.parts.mkdir(parents=True, exist_ok=True)
        self._sweep_temporaries()
        return fingerprint

    def _sweep_temporaries(self) -> None:
        """Temporaries of writes cut short by a killed run (all of them are named `.*.tmp`)."""
        import shutil

        for folder in (self.images, self.parts, self.root):
            for p in folder.glob(".*.tmp"):
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)

    def read_part(self, chunk: Chunk) -> dict | None:
        path = self.part_path(chunk)
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None

    def is_done(self, chunk: Chunk) -> bool:
        """The part lists every item and each image on disk has the recorded size and SHA-256.

        Existence alone is not enough: after power loss a renamed file can be empty or torn.
        """
        part = self.read_part(chunk)
        if part is None or part.get("errors"):
            return False
        rows = part.get("rows", [])
        if {r.get("id") for r in rows} != {it.item_id for it in chunk.items}:
            return False
        return all(self._intact(r) for r in rows)

    def _intact(self, row: dict) -> bool:
        path = self.root / str(row.get("path"))
        try:
            if path.stat().st_size != row.get("bytes"):
                return False
        except OSError:
            return False
        return _sha256_file(path) == row.get("sha256")


class Progress:
    """One line with images done, images/s and ETA; redrawn in place on a terminal, logged otherwise."""

    def __init__(self, total: int, done: int, stream=sys.stderr, every_s: float = 1.0):
        self.total, self.done, self.failed = total, done, 0
        self.start_done = done
        self.t0 = time.monotonic()
        self.last = 0.0
        self.stream, self.every_s = stream, every_s
        self.tty = hasattr(stream, "isatty") and stream.isatty()

    def update(self, written: int, failed: int) -> None:
        self.done += written + failed
        self.failed += failed
        now = time.monotonic()
        if now - self.last >= self.every_s or self.done >= self.total:
            self.last = now
            self._draw(now)

    def rate(self) -> float:
        elapsed = time.monotonic() - self.t0
        return (self.done - self.start_done) / elapsed if elapsed > 0 else 0.0

    def _draw(self, now: float) -> None:
        rate = self.rate()
        left = self.total - self.done
        eta = f"{_duration(left / rate)}" if rate > 0 else "?"
        pct = 100.0 * self.done / self.total if self.total else 100.0
        line = (f"augment: {self.done}/{self.total} images ({pct:.1f}%) | {rate:.1f} img/s | "
                f"ETA {eta} | {self.failed} failed")
        if self.tty:
            self.stream.write("\r" + line + ("\n" if self.done >= self.total else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def _duration(seconds: float) -> str:
    seconds = math.ceil(seconds)
    m, s = divmod(seconds, 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


# ------------------------------------------------------------------------------------------ run
def run_augment(params, data_root: str | Path, plan_path: str | Path, out_dir: str | Path,
                model_uri: str | None = None, progress_stream=sys.stderr) -> dict:
    """Plan, run the Ray Data job over the chunks not yet done, assemble manifest/errors/summary."""
    from cxrcf.data import load_metadata

    cfg = params.augment
    data_root = Path(data_root)
    plan = load_plan(plan_path)
    frame = load_metadata(data_root)
    t_u = plan.t_u if plan.t_u is not None else cfg.t_u
    seed = plan.seed if plan.seed is not None else cfg.seed
    items = expand_plan(plan, frame, data_root, seed)
    chunks = chunk_items(items, cfg.batch_size)
    model_uri = str(model_uri or f"models:/{params.registry.generator_name}@champion")
    model_ref, model, resolution = resolve_model(model_uri)

    inputs = {"plan": plan_dump(plan), "data": _sha256_file(data_root / "metadata.csv"),
              "model": model, "t_u": t_u, "seed": seed, "batch_size": cfg.batch_size, "items": len(items)}
    with OutputLock(out_dir):
        return _run_locked(RunFolder(out_dir), inputs, items, chunks, model_ref, model, resolution, t_u, seed,
                           cfg, progress_stream)


def _run_locked(folder, inputs, items, chunks, model_ref, model, resolution, t_u, seed, cfg,
                progress_stream) -> dict:
    folder.claim(inputs)
    _write_planned(folder, items)

    pending = [c for c in chunks if not folder.is_done(c)]
    skipped = sum(len(c.items) for c in chunks) - sum(len(c.items) for c in pending)
    print(f"augment: {len(items)} planned items in {len(chunks)} chunks; {skipped} already done, "
          f"{sum(len(c.items) for c in pending)} to generate with {model['name']} {model['version']} "
          f"on {cfg.num_actors} actor(s)", file=progress_stream, flush=True)
    bar = Progress(len(items), skipped, progress_stream)
    t0 = time.monotonic()
    if pending:
        _execute(pending, folder, model_ref, model, resolution, t_u, seed, cfg, bar)
    elapsed = time.monotonic() - t0
    return _finish(folder, chunks, items, skipped, elapsed, model, t_u, seed, cfg, progress_stream)


def _write_planned(folder: RunFolder, items) -> None:
    import pandas as pd

    frame = pd.DataFrame([{"id": it.item_id, "source_id": it.source_id, "intervention":
                           intervention_key(it.intervention)} for it in items])
    _durable_csv(folder.root / "planned.csv", frame)


def _execute(pending, folder, model_ref, model, resolution, t_u, seed, cfg, bar) -> None:
    import ray

    started_ray = not ray.is_initialized()
    if started_ray:
        # Joining an existing cluster (RAY_ADDRESS) refuses local-only settings such as the dashboard.
        local = {} if os.environ.get("RAY_ADDRESS") else {"include_dashboard": False}
        ray.init(log_to_driver=False, **local)
    try:
        import logging

        _check_resources(ray.cluster_resources(), cfg)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # our own line reports images, not blocks
        ctx.print_on_execution_start = False
        # Keep Ray Data's warnings (stalls, resources) but not its chatter about the bars we replaced.
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
        rows = [{"chunk": c.index, "items": _items_payload(c), "seed": chunk_seed(seed, c)} for c in pending]
        env = {k: os.environ[k] for k in _MLFLOW_ENV if k in os.environ}
        if model_ref.startswith("models:/") and "MLFLOW_TRACKING_URI" not in env:
            from store.tracking import tracking_uri

            env["MLFLOW_TRACKING_URI"] = tracking_uri()
        use_gpu = cfg.num_gpus_per_actor > 0
        ds = ray.data.from_items(rows, override_num_blocks=len(rows))
        # Each chunk's decode or write is small next to its model call: a few task workers keep the
        # actors fed, and every extra one is another Python process to start.
        io_pool = ray.data.TaskPoolStrategy(size=cfg.num_actors + 1)
        ds = ds.map(decode_chunk, fn_kwargs={"resolution": resolution}, num_cpus=IO_TASK_CPUS,
                    compute=io_pool)
        ds = ds.map_batches(
            Counterfactualizer,
            fn_constructor_kwargs={"model_ref": model_ref, "t_u": t_u, "use_gpu": use_gpu, "env": env,
                                   "num_threads": max(1, math.ceil(cfg.num_cpus_per_actor))},
            batch_size=1,  # one row = one chunk = one model batch of params.augment.batch_size images
            compute=ray.data.ActorPoolStrategy(size=cfg.num_actors),
            num_cpus=cfg.num_cpus_per_actor,
            num_gpus=cfg.num_gpus_per_actor,
        )
        ds = ds.map(write_chunk, fn_kwargs={"out_dir": str(folder.root), "model": model, "t_u": t_u,
                                            "seed": seed}, num_cpus=IO_TASK_CPUS, compute=io_pool)
        for done in ds.iter_rows():
            bar.update(int(done["written"]), int(done["failed"]))
    finally:
        if started_ray:
            ray.shutdown()


def _check_resources(available: dict, cfg) -> None:
    """Refuse an actor pool the cluster cannot hold: Ray Data would wait for it forever."""
    cpus = cfg.num_actors * cfg.num_cpus_per_actor + IO_TASK_CPUS
    if cpus > available.get("CPU", 0) + 1e-9:
        raise CxrcfError(f"augment.num_actors x augment.num_cpus_per_actor = {cfg.num_actors} x "
                         f"{cfg.num_cpus_per_actor:g} CPUs, plus {IO_TASK_CPUS:g} for reading/writing, "
                         f"exceeds the cluster's {available.get('CPU', 0):g} CPUs")
    gpus = cfg.num_actors * cfg.num_gpus_per_actor
    if gpus > available.get("GPU", 0) + 1e-9:
        raise CxrcfError(f"augment.num_actors x augment.num_gpus_per_actor = {gpus:g} GPUs, "
                         f"but the cluster has {available.get('GPU', 0):g}")


def _finish(folder, chunks, items, skipped, elapsed, model, t_u, seed, cfg, stream) -> dict:
    import pandas as pd

    rows, errors = [], []
    for c in chunks:
        part = folder.read_part(c)
        if part is None:
            raise CxrcfError(f"{folder.part_path(c)}: missing after the job; "
                             "rerun the same command to finish")
        rows += part["rows"]
        errors += part["errors"]
    seen = [r["id"] for r in rows] + [e["item"] for e in errors]
    planned = [it.item_id for it in items]
    if sorted(seen) != sorted(planned):
        raise CxrcfError(f"{folder.root}: manifest parts do not match the plan "
                         f"({len(seen)} rows+errors for {len(planned)} planned items)")
    _durable_csv(folder.root / "manifest.csv", pd.DataFrame(rows, columns=MANIFEST_COLUMNS))
    _durable_csv(folder.root / "errors.csv", pd.DataFrame(errors, columns=ERROR_COLUMNS))
    written = len(rows) - skipped
    summary = {
        "planned": len(items), "written": written, "skipped": skipped, "failed": len(errors),
        "elapsed_s": round(elapsed, 3), "images_per_s": round(written / elapsed, 3) if elapsed > 0 else None,
        "model": model, "t_u": t_u, "seed": seed, "num_actors": cfg.num_actors, "batch_size": cfg.batch_size,
        "manifest": str(folder.root / "manifest.csv"), "errors": str(folder.root / "errors.csv"),
    }
    _durable_json(folder.root / "summary.json", summary)
    print(f"augment: done: {written} written, {skipped} skipped (already done), {len(errors)} failed, "
          f"{summary['images_per_s'] or 0:.1f} img/s over {elapsed:.1f}s -> {folder.root}",
          file=stream, flush=True)
    return summary


# ------------------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cxrcf augment", description=__doc__.split("\n\n")[0])
    add_params(p)
    p.add_argument("--data", default=None, help="dataset root with metadata.csv (default: params data.root)")
    p.add_argument("--plan", required=True, help="augmentation plan YAML (kind: flip | balance | grid)")
    p.add_argument("--model", default=None,
                   help="MLflow model URI or a saved GeneratorBundle folder "
                        "(default: models:/<registry.generator_name>@champion)")
    p.add_argument("--out", required=True, help="output folder (rerun with the same arguments to resume)")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from cxrcf.config import load_params

    params = load_params(args.params)
    data = args.data or params.data.root
    summary = run_augment(params, data, args.plan, args.out, args.model)
    # Unusable inputs are reported in errors.csv and the summary, not treated as a failed job.
    del summary
    return 0
