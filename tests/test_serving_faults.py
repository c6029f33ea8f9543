"""Registry faults as a serving replica meets them, and the fail-closed defaults (no Ray Serve needed).

`ModelSlot` is what each replica uses to follow its alias; here it runs in the test process against a
real SQLite MLflow registry, and against a real unreachable tracking server (a closed local port).
"""

from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx
import pytest

MODEL = "fault-test-generator"
GATE_PASSING_EVAL = {"effectiveness": {"sex": {"auc": 0.9}, "race": {"auc": 0.9}, "finding": {"auc": 0.9},
                                       "age": {"mae": 5.0}},
                     "amplification": {"worst": 0.1}}


@pytest.fixture(scope="module")
def champion(mlflow_uri, tmp_path_factory):
    """MODEL version 1 (tiny_bundle) as champion, and a version 2 whose artifacts are not a model."""
    from helpers import tiny_bundle

    from cxrcf.config import preset_params
    from cxrcf.export import save_model
    from pipelines import registry

    params = preset_params("smoke", registry={"guidance_predictor_name": "fault-test-guidance",
                                              "evaluation_predictor_name": "fault-test-evaluation"})
    root = tmp_path_factory.mktemp("fault-models")
    (root / "eval.json").write_text(json.dumps(GATE_PASSING_EVAL))
    b = tiny_bundle(seed=0)
    for part, model in (("generator", b.hvae), ("scm", b.scm), ("predictor", b.predictor)):
        save_model(model, root / part)
    out = registry.register(params, root / "generator", root / "scm", root / "predictor", root / "predictor", "soft",
                            root / "eval.json", name=MODEL)
    assert registry.promote(params, MODEL, out["version"]).ok
    empty = root / "not-a-model"
    empty.mkdir()
    (empty / "README").write_text("no bundle here\n")
    broken = registry.connect().create_model_version(MODEL, source=str(empty)).version
    return {"good": out["version"], "broken": str(broken)}


def _closed_port_uri() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # nothing listens once the socket is closed


def _slot(tmp_path, **policy):
    from serving.app import ModelSlot, ModelSource
    from serving.policy import ServePolicy

    return ModelSlot(ModelSource(name=MODEL, alias="champion"),
                     ServePolicy(lkg_dir=str(tmp_path / "lkg"), **policy))


def test_registry_down_keeps_serving_and_restarts_from_last_known_good(champion, tmp_path, monkeypatch):
    from cxrcf.errors import CxrcfError

    slot = _slot(tmp_path, stale_after_s=0.01)
    assert slot.state.version == champion["good"] and slot.state.source == "registry"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", _closed_port_uri())
    slot.check()
    state = slot.alias_state()
    assert slot.state.version == champion["good"]  # still serving
    assert state.registry_reachable is False and state.state == "stale" and "unreachable" in state.last_error
    # a replica (re)starting while the registry is down starts from the verified local copy
    restarted = _slot(tmp_path)
    assert restarted.state.version == champion["good"] and restarted.state.source == "last-known-good"
    assert restarted.alias_state().source == "last-known-good" and restarted.alias_state().last_check_age_s is None
    # a tampered copy is refused, naming why, rather than served
    tensors = next(p for p in (tmp_path / "lkg" / MODEL).rglob("*") if p.is_file() and p.suffix == ".safetensors")
    tensors.write_bytes(tensors.read_bytes()[:-8] + b"tampered")
    with pytest.raises(CxrcfError, match="SHA-256"):
        _slot(tmp_path)
    monkeypatch.undo()
    restarted.check()
    assert restarted.alias_state().registry_reachable is True and restarted.alias_state().state == "current"


def test_broken_version_backs_off_exponentially(champion, tmp_path):
    from pipelines.registry import connect

    slot = _slot(tmp_path, reload_backoff_s=0.2, reload_backoff_max_s=0.4)
    client = connect()
    client.set_registered_model_alias(MODEL, "champion", champion["broken"])
    try:
        slot.check()
        first = slot.alias_state()
        assert (first.failed_version, first.failures) == (champion["broken"], 1) and first.retry_in_s > 0
        assert first.last_error and slot.state.version == champion["good"]
        slot.check()  # inside the backoff: not tried again
        assert slot.alias_state().failures == 1
        time.sleep(0.25)  # past the first backoff
        slot.check()
        assert slot.alias_state().failures == 2
        assert slot.alias_state().retry_in_s == pytest.approx(0.4, abs=0.1)  # 0.2 doubled, at the cap
        assert slot.state.version == champion["good"] and slot.reloads == 0
    finally:
        client.set_registered_model_alias(MODEL, "champion", champion["good"])
    slot.check()
    assert slot.alias_state().failed_version is None and slot.state.version == champion["good"]


def test_deleted_alias_withdraws_and_cannot_start(champion, tmp_path):
    from cxrcf.errors import CxrcfError
    from pipelines.registry import connect

    slot = _slot(tmp_path)
    client = connect()
    client.delete_registered_model_alias(MODEL, "champion")
    try:
        slot.check()
        assert slot.withdrawn and slot.alias_state().state == "withdrawn"
        with pytest.raises(CxrcfError, match="no version has alias"):
            _slot(tmp_path)  # a withdrawn model is not started from its local copy
    finally:
        client.set_registered_model_alias(MODEL, "champion", champion["good"])
    slot.check()
    assert not slot.withdrawn and slot.alias_state().state == "current"


def test_unconfigured_replica_fails_closed():
    """Before a replica has its keys, every keyed route answers 503, never an unauthenticated 200."""
    from serving import app

    async def calls():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app.api), base_url="http://replica") as c:
            return (await c.get("/v1/model"),
                    await c.post("/v1/counterfactuals", content=b"{", headers={"content-type": "application/json"}))

    saved = app.runtime()["key_digests"]
    app.runtime()["key_digests"] = None
    try:
        model, bad_json = asyncio.run(calls())
    finally:
        app.runtime()["key_digests"] = saved
    assert model.status_code == 503 and model.headers["retry-after"] == "1"
    assert bad_json.status_code == 503 and "not configured" in bad_json.json()["detail"]


@pytest.mark.parametrize("host, address, env, want", [
    ("127.0.0.1", None, {}, "disabled"),
    ("127.0.0.1", None, {"RAY_AUTH_MODE": "token"}, None),
    ("127.0.0.1", "ray://head:10001", {}, None),
    ("0.0.0.0", None, {}, "token"),
    ("10.1.2.3", "ray://head:10001", {"RAY_AUTH_MODE": "token"}, "token"),
])
def test_ray_token_auth_whenever_the_api_leaves_loopback(host, address, env, want):
    from serving.cli import ray_auth_mode

    assert ray_auth_mode(host, address, env) == want


def test_public_host_with_ray_auth_disabled_is_refused(monkeypatch, capsys, tmp_path):
    from cxrcf.cli import main

    monkeypatch.setenv("CXRCF_API_KEYS", "k1")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    params = tmp_path / "params.yaml"
    params.write_text("preset: smoke\n")
    assert main(["serve", "--params", str(params), "--host", "0.0.0.0"]) == 1
    err = capsys.readouterr().err
    assert "RAY_AUTH_MODE=disabled with serve.host 0.0.0.0" in err
