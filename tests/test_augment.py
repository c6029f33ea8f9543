"""Batch augmentation (`cxrcf augment`): plans, the Ray Data job, resumption, bad inputs."""

from __future__ import annotations

import collections
import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from cxrcf.errors import CxrcfError
from pipelines.augment_plan import chunk_items, expand_plan, intervention_key, load_plan, parse_plan

REPO = Path(__file__).resolve().parents[1]
BATCH = 8


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    sys.path.insert(0, str(Path(__file__).parent))
    from helpers import tiny_bundle

    return tiny_bundle(seed=0).save(tmp_path_factory.mktemp("bundle") / "tiny")


@pytest.fixture(scope="module")
def params_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("params") / "params.yaml"
    path.write_text(yaml.safe_dump({"preset": "smoke", "augment": {
        "batch_size": BATCH, "num_actors": 1, "num_cpus_per_actor": 0.5}}))
    return path


def _params(path):
    from cxrcf.config import load_params

    return load_params(path)


def _plan(tmp_path, name, **raw) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _metadata(root):
    from cxrcf.data import load_metadata

    return load_metadata(root)


def _run(params_file, data, plan, out, model, stream=None):
    from pipelines.augment import run_augment

    stream = stream or sys.stderr
    return run_augment(_params(params_file), data, plan, out, str(model), progress_stream=stream)


def _check_outputs(out: Path, plan_path: Path, data: Path, resolution: int = 32):
    """Manifest + errors cover the plan exactly once; every row's image exists at model size."""
    from PIL import Image

    plan = load_plan(plan_path)
    items = expand_plan(plan, _metadata(data), data, plan.seed or 0)
    manifest = pd.read_csv(out / "manifest.csv", dtype={"id": str, "source_id": str})
    errors = pd.read_csv(out / "errors.csv", dtype=str)
    ids = list(manifest["id"]) + list(errors["item"])
    assert len(ids) == len(set(ids)), "an item appears twice"
    assert set(ids) == {it.item_id for it in items}
    by_id = {it.item_id: it for it in items}
    for row in manifest.itertuples():
        it = by_id[row.id]
        assert row.source_id == it.source_id
        assert json.loads(row.intervention) == it.intervention
        for attr, value in it.intervention.items():
            got = getattr(row, attr)
            assert (float(got) == float(value)) if attr == "age" else (got == value)
        for attr in ("sex", "race"):  # roots that were not intervened on keep their factual value
            if attr not in it.intervention:
                assert getattr(row, attr) == it.parents[attr]
        if "age" not in it.intervention and "finding" not in it.intervention:
            assert row.finding == it.parents["finding"]
        img = Image.open(out / row.path)
        assert img.mode == "L" and img.size == (resolution, resolution)
        blob = (out / row.path).read_bytes()
        assert len(blob) == row.bytes and hashlib.sha256(blob).hexdigest() == row.sha256
    probs = manifest[[c for c in manifest.columns if c.startswith("p_")]]
    assert probs.shape[1] == 10 and ((probs >= 0) & (probs <= 1)).all().all()
    assert manifest[["pred_age_before", "pred_age_after"]].notna().all().all()
    race = manifest[[f"p_after_race_{r}" for r in ("white", "asian", "black")]].sum(axis=1)
    assert (race - 1).abs().max() < 1e-4
    assert len(list((out / "images").glob("*.png"))) == len(manifest)
    return manifest, errors, items


def _png_bomb(path: Path, side: int = 14000) -> None:
    """A real decompression bomb: a valid grayscale PNG of side x side zeros in a few hundred KB.

    Written as cxrcf's own PNGs are (one IDAT, no filters), so cxrcf's fast decoder would inflate it.
    """
    import struct
    import zlib

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    comp = zlib.compressobj(9)
    row = bytes(side + 1)
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


# ------------------------------------------------------------------------------ plans, no Ray
def test_plan_validation_names_the_problem(tmp_path):
    with pytest.raises(CxrcfError, match=r"p.yaml: flip.colour = 'red': unknown key"):
        parse_plan({"kind": "flip", "attributes": ["sex"], "colour": "red"}, "p.yaml")
    with pytest.raises(CxrcfError, match=r"interventions\[1\]: race: unknown value 'green'"):
        parse_plan({"kind": "grid", "interventions": [{"age": 40}, {"race": "green"}]}, "p.yaml")
    with pytest.raises(CxrcfError, match="does not match any of the expected tags"):
        parse_plan({"kind": "rotate"}, "p.yaml")
    with pytest.raises(CxrcfError, match="p.yaml: balance.by.0 = 'age'"):
        parse_plan({"kind": "balance", "by": ["age"]}, "p.yaml")
    with pytest.raises(CxrcfError, match="listed twice"):
        parse_plan({"kind": "grid", "interventions": [{"sex": 1}, {"sex": "female"}]})
    with pytest.raises(CxrcfError, match="missing.yaml: plan file not found"):
        load_plan(tmp_path / "missing.yaml")
    for path in sorted((REPO / "examples" / "plans").glob("*.yaml")):
        load_plan(path)  # the shipped examples stay valid


def test_flip_and_grid_expansion(tiny_data):
    frame = _metadata(tiny_data)
    test = frame[frame["split"] == "test"]
    flip = expand_plan(parse_plan({"kind": "flip", "attributes": ["sex", "race"], "splits": ["test"]}),
                       frame, tiny_data, 0)
    assert len(flip) == len(test) * 3  # one sex flip + two race targets per image
    for it in flip:
        (attr, value), = it.intervention.items()
        assert value != it.parents[attr]
    to_black = expand_plan(parse_plan({"kind": "flip", "attributes": ["race"], "race_to": "black",
                                       "splits": ["test"]}), frame, tiny_data, 0)
    assert len(to_black) == int((test["race"] != "black").sum())
    assert {intervention_key(it.intervention) for it in to_black} == {'{"race":"black"}'}

    grid = parse_plan({"kind": "grid", "interventions": [{"age": 80}, {"sex": "female", "finding": 1}],
                       "max_sources": 10})
    items = expand_plan(grid, frame, tiny_data, 0)
    assert len(items) == 20 and len({it.item_id for it in items}) == 20
    assert items[0].intervention == {"age": 80.0}
    assert items[-1].intervention == {"sex": "female", "finding": "pleural_effusion"}
    # Ids depend only on source and intervention: the same plan names the same files.
    assert [it.item_id for it in expand_plan(grid, frame, tiny_data, 5)] == [it.item_id for it in items]
    chunks = chunk_items(items, 4)
    assert [len(c.items) for c in chunks] == [4, 4, 2, 4, 4, 2]
    assert all(len({intervention_key(it.intervention) for it in c.items}) == 1 for c in chunks)


def test_balance_expansion_equalises_subgroups(tiny_data):
    frame = _metadata(tiny_data)
    train = frame[frame["split"] == "train"]
    plan = parse_plan({"kind": "balance", "by": ["sex", "finding"], "splits": ["train"]})
    items = expand_plan(plan, frame, tiny_data, seed=0)
    counts = collections.Counter(zip(train["sex"], train["finding"]))
    for it in items:
        after = {**it.parents, **it.intervention}
        counts[(after["sex"], after["finding"])] += 1
        # Only the grouping attributes that differ are intervened on.
        assert it.intervention and all(it.parents[a] != v for a, v in it.intervention.items())
    assert len(set(counts.values())) == 1 and len(counts) == 4
    # Minimal change first: a short subgroup is filled by single-attribute interventions when it can be.
    assert all(len(it.intervention) == 1 for it in items)
    again = expand_plan(plan, frame, tiny_data, seed=0)
    other = expand_plan(plan, frame, tiny_data, seed=1)
    assert [it.item_id for it in again] == [it.item_id for it in items]
    assert [it.item_id for it in other] != [it.item_id for it in items]
    # A target above what the sources can fill cycles through them again with distinct ids.
    big = expand_plan(parse_plan({"kind": "balance", "by": ["race"], "splits": ["test"], "target": 60}),
                      frame, tiny_data, seed=0)
    assert len({it.item_id for it in big}) == len(big) and max(it.rep for it in big) >= 1


# --------------------------------------------------------------------------------- Ray job
FLIP = {"kind": "flip", "attributes": ["sex", "race", "finding"], "max_sources": 12}


@pytest.fixture(scope="module")
def flip_run(ray_cluster, tiny_data, bundle_dir, params_file, tmp_path_factory):
    """One finished flip job that several tests read (each Ray job costs seconds of actor start-up)."""
    work = tmp_path_factory.mktemp("flip")
    plan = _plan(work, "flip", **FLIP)
    summary = _run(params_file, tiny_data, plan, work / "out", bundle_dir)
    return plan, work / "out", summary


def _looks_generated(out: Path, manifest, items):
    import numpy as np
    from PIL import Image

    row = manifest.iloc[0]
    src = next(it for it in items if it.item_id == row["id"])
    source = np.asarray(Image.open(src.path)).astype(int)
    generated = np.asarray(Image.open(out / row["path"])).astype(int)
    assert np.abs(source - generated).mean() > 0  # a counterfactual, not a copy of the source


def test_flip_job(flip_run, tiny_data):
    plan, out, summary = flip_run
    manifest, errors, items = _check_outputs(out, plan, tiny_data)
    assert len(items) == 12 * 4 and len(errors) == 0
    assert summary["written"] == len(manifest) == len(items) and summary["skipped"] == summary["failed"] == 0
    assert json.loads((out / "summary.json").read_text())["written"] == len(items)
    assert manifest["model_name"].unique().tolist() == ["tiny"]
    assert manifest["model_version"].iloc[0].startswith("dir-sha256:")
    assert (manifest["t_u"] == 1.0).all() and (manifest["seed"] == 0).all()
    assert list(pd.read_csv(out / "planned.csv")["id"]) == [it.item_id for it in items]
    _looks_generated(out, manifest, items)


@pytest.fixture(scope="module")
def champion(mlflow_uri, bundle_dir):
    """`bundle_dir` registered under a model name of its own, its version holding the champion alias."""
    import uuid

    import mlflow

    from store.tracking import ensure_experiment

    name = f"augment-test-{uuid.uuid4().hex[:8]}"
    client = mlflow.MlflowClient(mlflow_uri)
    with mlflow.start_run(experiment_id=ensure_experiment(name)) as run:
        mlflow.log_artifacts(str(bundle_dir), artifact_path="bundle")
    client.create_registered_model(name)
    source = f"runs:/{run.info.run_id}/bundle"
    version = client.create_model_version(name, source, run_id=run.info.run_id).version
    client.set_registered_model_alias(name, "champion", version)
    return {"name": name, "version": str(version)}


def test_balance_and_grid_jobs(ray_cluster, tiny_data, bundle_dir, params_file, champion, tmp_path):
    """A balance job (--model a bundle folder) and a grid job without --model: the grid job runs
    models:/<generator_name>@champion, pinned to its version for the whole job (one Ray job checks both
    the grid plan and the default model)."""
    from cxrcf.config import load_params
    from pipelines.augment import run_augment

    balance = _plan(tmp_path, "balance", kind="balance", by=["sex", "finding"], splits=["val"], seed=3)
    grid = _plan(tmp_path, "grid", kind="grid", interventions=[{"age": 90}, {"sex": "female"}, {"race": "asian"}],
                 splits=["test"], max_sources=10, t_u=0.5)
    summaries = {}
    for plan, model in ((balance, str(bundle_dir)), (grid, None)):
        params = load_params(params_file, overrides={"registry": {"generator_name": champion["name"]}})
        out = tmp_path / f"out-{plan.stem}"
        log = io.StringIO()
        summary = summaries[plan.stem] = run_augment(params, tiny_data, plan, out, model, progress_stream=log)
        lines = log.getvalue().splitlines()
        assert re.fullmatch(rf"augment: {summary['planned']}/{summary['planned']} images \(100.0%\) \| "
                            r"[\d.]+ img/s \| ETA 0s \| 0 failed", lines[-2]), lines
        assert lines[-1].startswith(f"augment: done: {summary['written']} written, 0 skipped"), lines
        manifest, errors, items = _check_outputs(out, plan, tiny_data)
        assert len(errors) == 0 and len(manifest) == len(items) == summary["written"]
        _looks_generated(out, manifest, items)
    val = _metadata(tiny_data).query("split == 'val'")
    manifest = pd.read_csv(tmp_path / "out-balance" / "manifest.csv")
    groups = collections.Counter(zip(val["sex"], val["finding"]))
    groups.update(zip(manifest["sex"], manifest["finding"]))
    assert len(groups) == 4 and len(set(groups.values())) == 1
    assert (manifest["seed"] == 3).all()
    manifest = pd.read_csv(tmp_path / "out-grid" / "manifest.csv", dtype={"model_version": str})
    assert (manifest["t_u"] == 0.5).all()
    # do(age) goes through the SCM: age is set, finding follows from the abducted noise.
    old = manifest[manifest["intervention"] == '{"age":90.0}']
    assert (old["age"] == 90.0).all() and len(old) == 10
    # no --model: the registered champion, by name and version, in the summary and on every row
    assert summaries["grid"]["written"] == 30
    assert summaries["grid"]["model"] == {"name": champion["name"], "version": champion["version"]}
    assert set(manifest["model_name"]) == {champion["name"]} and set(manifest["model_version"]) == {champion["version"]}
    asian = manifest[manifest["intervention"] == '{"race":"asian"}']
    assert len(asian) == 10 and (asian["race"] == "asian").all()


def test_corrupt_image_is_reported_and_the_rest_completes(flip_run, tiny_data, bundle_dir, params_file,
                                                          tmp_path):
    plan, clean, _ = flip_run
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    frame = _metadata(data).sort_values("id")
    first = frame["id"].tolist()[:12]
    paths = frame.set_index("id")["path"]
    bad, missing, oblong, bomb = first[3], first[9], first[6], first[4]
    (data / paths[bad]).write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    (data / paths[missing]).unlink()
    _png_bomb(data / paths[bomb])
    from PIL import Image

    Image.new("L", (32, 20), 128).save(data / paths[oblong])
    out = tmp_path / "out"
    summary = _run(params_file, data, plan, out, bundle_dir)
    manifest, errors, _ = _check_outputs(out, plan, data)
    assert summary["failed"] == 16 and summary["written"] == 32 and len(manifest) == 32
    assert sorted(set(errors["source"])) == sorted([bad, missing, oblong, bomb]) and len(errors) == 16
    reasons = dict(zip(errors["source"], errors["reason"]))
    assert "not readable" in reasons[bad] and "missing" in reasons[missing]
    assert reasons[oblong] == "image is 32x20, expected a square"
    assert reasons[bomb].startswith("decompression bomb refused: Image size (196000000 pixels) exceeds limit")
    assert set(errors["file"]) == {str((data / paths[s]).resolve()) for s in (bad, missing, oblong, bomb)}

    # The neighbours of a bad image are what they would have been without it (same batch, same noise).
    ref = pd.read_csv(clean / "manifest.csv").set_index("id")
    got = manifest.set_index("id")
    cols = [c for c in got.columns if c.startswith("p_after") or c in ("sex", "race", "age", "finding")]
    pd.testing.assert_frame_equal(got[cols], ref.loc[got.index, cols])

    # A rerun retries only the chunks with errors (reproducing them); the rest is skipped.
    first_manifest = (out / "manifest.csv").read_text()
    again = _run(params_file, data, plan, out, bundle_dir)
    assert again["failed"] == 16 and 0 < again["skipped"] < 32
    assert (out / "manifest.csv").read_text() == first_manifest


def test_killed_job_resumes_to_the_uninterrupted_result(flip_run, ray_cluster, tiny_data, bundle_dir,
                                                        params_file, tmp_path):
    plan, reference, _ = flip_run
    items = expand_plan(load_plan(plan), _metadata(tiny_data), tiny_data, 0)
    n_chunks = len(chunk_items(items, BATCH))

    out = tmp_path / "killed"
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address,
           "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "cxrcf.cli", "augment", "--params", str(params_file), "--data",
           str(tiny_data), "--plan", str(plan), "--model", str(bundle_dir), "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    try:
        while len(list((out / "parts").glob("chunk-*.json"))) < 3:
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the job wrote no output in time"
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    parts = list((out / "parts").glob("chunk-*.json"))
    done_at_kill = sum(len(json.loads(p.read_text())["rows"]) for p in parts)
    assert len(parts) < n_chunks, "the job finished before it could be killed"
    assert not (out / "manifest.csv").exists()

    # Same arguments again (in-process, on more actors: not part of the run's identity).
    from cxrcf.config import load_params
    from pipelines.augment import run_augment

    params = load_params(params_file, overrides={"augment": {"num_actors": 2}})
    summary = run_augment(params, tiny_data, plan, out, str(bundle_dir))
    assert summary["skipped"] >= done_at_kill > 0 and summary["written"] > 0
    assert summary["skipped"] + summary["written"] == len(items)
    manifest, errors, _ = _check_outputs(out, plan, tiny_data)
    assert len(manifest) == len(items) and len(errors) == 0
    assert (out / "manifest.csv").read_text() == (reference / "manifest.csv").read_text()
    for name in manifest["path"]:
        assert (out / name).read_bytes() == (reference / name).read_bytes()
    assert not list(out.rglob(".*.tmp"))

    # Power loss between rename and write-back: an image left empty and one torn (same size, other
    # bytes) are not done; exactly their chunks are regenerated, to the uninterrupted bytes.
    empty, torn = manifest["path"].iloc[0], manifest["path"].iloc[-1]
    (out / empty).write_bytes(b"")
    blob = bytearray((out / torn).read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (out / torn).write_bytes(bytes(blob))
    damaged = manifest.loc[manifest["path"].isin([empty, torn]), "chunk"].unique()
    assert len(damaged) == 2
    # back on the file's one actor (an actor process fewer to start for two chunks; bytes must not care)
    redo = run_augment(_params(params_file), tiny_data, plan, out, str(bundle_dir))
    assert redo["written"] == int(manifest["chunk"].isin(damaged).sum())
    assert redo["skipped"] == len(items) - redo["written"]
    for name in (empty, torn):
        assert (out / name).read_bytes() == (reference / name).read_bytes()
    assert (out / "manifest.csv").read_text() == (reference / "manifest.csv").read_text()

    # A finished job rerun does nothing new.
    again = run_augment(params, tiny_data, plan, out, str(bundle_dir))
    assert again["written"] == 0 and again["skipped"] == len(items)


def test_a_second_job_on_a_locked_folder_is_refused(flip_run, tiny_data, bundle_dir, params_file, tmp_path):
    """Another process holds --out: one line naming it, and its temporaries are left alone."""
    from pipelines.augment import OutputLock

    plan, _, _ = flip_run
    out = tmp_path / "out"
    (out / "images").mkdir(parents=True)
    in_flight = out / "images" / ".abc.png.0123456789ab.tmp"  # the holder's write in progress
    in_flight.write_bytes(b"half an image")
    holder = subprocess.Popen(
        [sys.executable, "-c", ("import sys\nfrom pipelines.augment import OutputLock\n"
         "with OutputLock(sys.argv[1]):\n    print('locked', flush=True)\n    sys.stdin.read()\n"), str(out)],
        cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(CxrcfError) as err:
            _run(params_file, tiny_data, plan, out, bundle_dir)
        message = str(err.value)
        assert "\n" not in message
        assert re.fullmatch(rf"--out {re.escape(str(out))}: in use by another augment job \(pid {holder.pid} on "
                            r"\S+ since \d{4}-\d\d-\d\dT[\d:]+Z: .+\); wait for it to finish or use another "
                            r"--out folder", message), message
        assert in_flight.read_bytes() == b"half an image" and not (out / "run.json").exists()
    finally:
        holder.stdin.close()
        holder.wait(30)
    with OutputLock(out):  # released with its holder
        pass


def test_different_arguments_in_the_same_folder_are_refused(flip_run, tiny_data, bundle_dir, params_file,
                                                            tmp_path):
    _, out, _ = flip_run
    other = _plan(tmp_path, "flip", **{**FLIP, "t_u": 0.3})
    with pytest.raises(CxrcfError, match=r"--out .*out: holds a run with different plan, t_u; use a new"):
        _run(params_file, tiny_data, other, out, bundle_dir)
    before = (out / "manifest.csv").read_text()
    assert json.loads((out / "run.json").read_text())["inputs"]["t_u"] == 1.0
    assert (out / "manifest.csv").read_text() == before


def test_an_actor_pool_larger_than_the_cluster_is_refused(flip_run, ray_cluster, tiny_data, bundle_dir,
                                                          params_file, tmp_path):
    from cxrcf.config import load_params
    from pipelines.augment import run_augment

    plan, _, _ = flip_run
    params = load_params(params_file, overrides={"augment": {"num_actors": 3, "num_cpus_per_actor": 0.75}})
    with pytest.raises(CxrcfError, match=r"augment.num_actors x augment.num_cpus_per_actor = 3 x 0.75 CPUs, "
                                         r"plus 0.25 for reading/writing, exceeds the cluster's 2 CPUs"):
        run_augment(params, tiny_data, plan, tmp_path / "out", str(bundle_dir))
    assert not list((tmp_path / "out" / "parts").glob("*.json"))


def test_cli_errors_are_one_line(tmp_path, tiny_data, params_file):
    plan = _plan(tmp_path, "bad", kind="grid", interventions=[{"age": 300}])
    proc = subprocess.run([sys.executable, "-m", "cxrcf.cli", "augment", "--params", str(params_file),
                           "--data", str(tiny_data), "--plan", str(plan), "--out", str(tmp_path / "o")],
                          cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        (f"cxrcf augment: error: {plan}: grid.interventions = [{{'age': 300}}]: Value error, "
         "interventions[0]: age: 300.0 is outside 0-120 years")]
