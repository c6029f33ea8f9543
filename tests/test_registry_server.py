"""The registry flow over HTTP against a real `mlflow server` on 127.0.0.1 (a free port):
register -> promote -> load the champion, with the server-side promotion lock and its errors."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest
import torch
from helpers import torch_threads
from test_registry import checkpoint_bundle, evaluation, make_parts, sample_inputs

from cxrcf.errors import CxrcfError
from pipelines import registry

MLFLOW = Path(sys.executable).with_name("mlflow")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real tracking server with proxied artifacts; stopped by its process group in the end."""
    import mlflow

    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(root / "server.log", "w") as log:
        proc = subprocess.Popen(
            [str(MLFLOW), "server", "--workers", "1", "--host", "127.0.0.1", "--port", str(port),
             "--backend-store-uri", f"sqlite:///{root}/server.db", "--artifacts-destination", str(root / "artifacts")],
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
    old_uri = mlflow.get_tracking_uri()
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (root / "server.log").read_text()[-2000:]
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "mlflow server did not become healthy"
            time.sleep(0.3)
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("MLFLOW_TRACKING_URI", url)
            # Unset, so that experiments use the server's proxied artifact store (not a local folder).
            mp.delenv("CXRCF_MLFLOW_ARTIFACTS", raising=False)
            with torch_threads(1):
                yield url, root
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        mlflow.set_tracking_uri(old_uri)
        mlflow.set_registry_uri(old_uri)


@pytest.fixture(scope="module")
def registered(server, tmp_path_factory):
    parts = make_parts(tmp_path_factory.mktemp("parts"))
    name = f"gen-http-{uuid.uuid4().hex[:8]}"
    out = registry.register(parts.params, parts.root / "generator", parts.root / "scm", parts.root / "evaluation",
                            parts.root / "guidance", "hard", parts.root / "eval.json",
                            figures_dir=parts.root / "figures", name=name)
    return parts, out


def test_register_promote_load_over_http(server, registered):
    import mlflow
    import pandas as pd

    from cxrcf.bundle import parents_from_labels
    from pipelines.pyfunc_model import decode_png, encode_png, to_uint8

    url, _ = server
    parts, out = registered
    name = out["name"]
    mlc = registry.connect()
    assert mlc.tracking_uri == url
    assert mlc.get_model_version_download_uri(name, out["version"]).startswith("mlflow-artifacts:")

    decision = registry.promote(parts.params, name=name)
    assert decision.decision == "promoted" and decision.champion_version == out["version"]

    bundle, info = registry.load_bundle(f"models:/{name}@champion")
    assert (info["name"], info["version"], info["mode"]) == (name, out["version"], "hard")
    images, x, rows, interventions = sample_inputs()
    expected = checkpoint_bundle(parts.root).counterfactuals(x, parents_from_labels(rows), interventions, seed=1)
    got = bundle.counterfactuals(x, parents_from_labels(rows), interventions, seed=1)
    assert all(torch.equal(e, g) for e, g in zip(expected, got))

    frame = pd.DataFrame([{**rows[0], "image": encode_png(images[0]), "interventions": '[{"sex": "female"}]',
                           "t_u": 1.0, "seed": 1}])
    pred = mlflow.pyfunc.load_model(f"models:/{name}/{out['version']}").predict(frame)
    solo = checkpoint_bundle(parts.root).counterfactuals(x[:1], parents_from_labels(rows[:1]), [{"sex": "female"}],
                                                         seed=1)[0]
    assert (decode_png(json.loads(pred["counterfactuals"][0])[0]) == to_uint8(solo)[0]).all()

    with pytest.raises(CxrcfError, match="no version has alias 'staging'"):
        registry.load_bundle(f"models:/{name}@staging")


def test_server_lock_serialises_promotions(server, registered):
    """While one holder has the server-side lock, a promotion waits; it then sees the new state."""
    parts, out = registered
    mlc = registry.connect()
    base = mlc.get_model_version(out["name"], out["version"])
    name = f"gen-lock-{uuid.uuid4().hex[:8]}"
    mlc.create_registered_model(name)
    tags = {f"{registry.EVAL_PREFIX}{k}": repr(v) for k, v in registry.flat_metrics(evaluation()).items()
            if registry.HEADLINE.match(k)}
    for _ in range(2):
        mlc.create_model_version(name, source=base.source, run_id=base.run_id, tags=tags,
                                 model_id=base.source.removeprefix("models:/"))
    assert registry.promote(parts.params, name=name, version="1").decision == "promoted"

    result = {}
    worker = threading.Thread(target=lambda: result.update(d=registry.promote(parts.params, name=name, version="2")))
    with registry.promotion_lock(name):
        assert mlc.get_registered_model(f"{name}.promotion-lock").tags["cxrcf.lock"]
        worker.start()
        time.sleep(1.5)
        assert worker.is_alive(), "promotion went ahead while another process held the lock"
    worker.join(timeout=60)
    decision = result["d"]
    assert decision.decision == "promoted" and decision.waited_s >= 1.0
    assert (decision.champion_version, decision.previous_champion) == ("2", "1")
    with pytest.raises(Exception, match="RESOURCE_DOES_NOT_EXIST|not found"):
        mlc.get_registered_model(f"{name}.promotion-lock")


def test_stale_server_lock_of_a_dead_holder_is_broken(server, capsys):
    mlc = registry.connect()
    name = f"gen-stale-{uuid.uuid4().hex[:8]}"
    lock = f"{name}.promotion-lock"
    mlc.create_registered_model(lock, tags={"cxrcf.lock": "host:4242:dead"})  # a holder that died
    time.sleep(0.6)
    with registry.promotion_lock(name, stale_s=0.5):
        assert mlc.get_registered_model(lock).tags["cxrcf.lock"] != "host:4242:dead"
    assert "breaking a stale promotion lock" in capsys.readouterr().err
    with pytest.raises(CxrcfError, match="promotion lock still held"):
        mlc.create_registered_model(lock)
        with registry.promotion_lock(name, timeout_s=0.5):
            pass
