"""Registry faults as a serving replica meets them, and the fail-closed defaults (no Ray Serve needed).

`ModelSlot` is what each replica uses to follow its alias; here it runs in the test process against a
real SQLite MLflow registry, and against a real unreachable tracking server (a closed local port).
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from helpers import closed_port_uri

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


def _slot(tmp_path, **settings):
    from cxrcf.config import ServeConfig
    from serving.app import ModelSlot, ModelSource

    return ModelSlot(ModelSource(name=MODEL, alias="champion"), ServeConfig(lkg_dir=str(tmp_path / "lkg"), **settings))


def test_registry_down_keeps_serving_and_restarts_from_last_known_good(champion, tmp_path, monkeypatch):
    from cxrcf.errors import CxrcfError

    slot = _slot(tmp_path, stale_after_s=0.01)
    assert slot.state.version == champion["good"] and slot.state.source == "registry"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", closed_port_uri())
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
    ("127.0.0.1", None, {}, "token"),
    ("127.0.0.1", None, {"RAY_AUTH_MODE": "disabled"}, None),
    ("127.0.0.1", None, {"RAY_AUTH_MODE": "token"}, None),
    ("127.0.0.1", "ray://head:10001", {}, None),
    ("0.0.0.0", None, {}, "token"),
    ("10.1.2.3", "ray://head:10001", {"RAY_AUTH_MODE": "token"}, "token"),
])
def test_ray_token_auth_whenever_the_api_leaves_loopback(host, address, env, want):
    from serving.cli import ray_auth_mode

    assert ray_auth_mode(host, address, env) == want


def test_ray_token_file_is_private_to_its_user(tmp_path):
    from cxrcf.cli import private_ray_token

    token = tmp_path / ".ray" / "auth_token"
    assert private_ray_token({"RAY_AUTH_MODE": "disabled"}, home=tmp_path) is None and not token.exists()
    assert private_ray_token({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "t"}, home=tmp_path) is None
    assert private_ray_token({"RAY_AUTH_MODE": "token"}, home=tmp_path) == token
    first = token.read_text()
    assert len(first) == 64 and int(first, 16) >= 0 and token.stat().st_mode & 0o777 == 0o600
    token.chmod(0o644)  # as ray.init writes it
    assert private_ray_token({"RAY_AUTH_MODE": "TOKEN"}, home=tmp_path) == token
    assert token.stat().st_mode & 0o777 == 0o600 and token.read_text() == first  # narrowed, never replaced


def test_public_host_with_ray_auth_disabled_is_refused(monkeypatch, capsys, tmp_path):
    from cxrcf.cli import main

    monkeypatch.setenv("CXRCF_API_KEYS", "k1")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    params = tmp_path / "params.yaml"
    params.write_text("preset: smoke\n")
    assert main(["serve", "--params", str(params), "--host", "0.0.0.0"]) == 1
    err = capsys.readouterr().err
    assert "RAY_AUTH_MODE=disabled with serve.host 0.0.0.0" in err


# ------------------------------------------------------------------------- settings as config
@pytest.mark.parametrize("serve, words", [
    ({"max_interventions": 0}, "serve.max_interventions = 0: Input should be greater than or equal to 1"),
    ({"max_interventions": 65}, "serve.max_interventions = 65: Input should be less than or equal to 64"),
    ({"max_image_id_chars": 500}, "serve.max_image_id_chars = 500: Input should be less than or equal to 128"),
    ({"batch_timeout_s": "20"}, "serve.batch_timeout_s = '20': Input should be a valid number"),
    ({"max_pixels": 10}, "serve.max_pixels = 10: Input should be greater than or equal to 64"),
    ({"max_queued_requests": True}, "serve.max_queued_requests = True: Input should be a valid integer"),
    ({"t_u": 0}, "serve.t_u = 0: Input should be greater than 0"),
    ({"reload_backoff_max_s": 1.0}, "reload_backoff_max_s 1 is below reload_backoff_s 5"),
    ({"canary": {"weight": 1.5}}, "serve.canary.weight = 1.5: Input should be less than or equal to 1"),
    ({"canary": {"shadow": 0.1, "alias": "champion"}}, "canary.alias 'champion' is model_alias itself"),
    ({"request_deadline_s": 3}, "serve.request_deadline_s = 3: unknown key"),
])
def test_bad_serve_settings_are_refused_naming_the_key(tmp_path, serve, words):
    """Every limit is validated config: strict (no "20" for a number), ranged, unknown keys refused."""
    import yaml

    from cxrcf.config import load_params
    from cxrcf.errors import CxrcfError

    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"preset": "smoke", "serve": serve}))
    with pytest.raises(CxrcfError) as err:
        load_params(path)
    assert words in str(err.value)


def test_defaults_are_the_limits_serving_had():
    from cxrcf.config import ServeConfig, load_params

    cfg = ServeConfig()
    assert (cfg.max_pixels, cfg.max_reply_bytes, cfg.max_interventions, cfg.max_image_id_chars) == \
        (1024 * 1024, 16_000_000, 8, 128)
    assert (cfg.max_queued_requests, cfg.request_timeout_s, cfg.batch_timeout_s, cfg.t_u) == (64, 30.0, 20.0, 1.0)
    assert not cfg.canary.on and cfg.canary.alias == "candidate"
    assert load_params("params.yaml").serve.max_pixels == cfg.max_pixels


def test_a_replica_refuses_a_bad_user_config_naming_the_field():
    """A `serve deploy` config edited by hand reaches reconfigure as a plain dict: validated the same way,
    and the replica keeps the settings it had."""
    from cxrcf.config import ServeConfig
    from cxrcf.errors import CxrcfError
    from serving import app

    good = app.user_config(ServeConfig(max_interventions=3), [])
    before = app.runtime()["config"]
    try:
        assert app.configure_runtime(good).max_interventions == 3
        bad = {**good, "serve": {**good["serve"], "max_reply_bytes": -1}}
        with pytest.raises(CxrcfError, match=r"user_config serve: max_reply_bytes = -1: .*greater than or equal"):
            app.configure_runtime(bad)
        assert app.runtime()["config"].max_interventions == 3
    finally:
        app.runtime()["config"] = before


def test_cli_canary_flags_are_validated(monkeypatch, capsys, tmp_path):
    from cxrcf.cli import main

    monkeypatch.delenv("CXRCF_API_KEYS", raising=False)
    params = tmp_path / "params.yaml"
    params.write_text("preset: smoke\n")
    assert main(["serve", "--params", str(params), "--canary-weight", "2"]) == 1
    assert "serve: canary.weight = 2.0: Input should be less than or equal to 1" in capsys.readouterr().err
    assert main(["serve", "--params", str(params), "--shadow", "0.5", "--canary-alias", "champion"]) == 1
    assert "canary.alias 'champion' is model_alias itself" in capsys.readouterr().err


def test_split_is_a_pure_function_of_the_request_id():
    from cxrcf.config import CanaryConfig
    from serving.canary import route

    ids = [f"r{i}" for i in range(400)]
    assert {route(i, CanaryConfig(weight=0.0))[0] for i in ids} == {"champion"}
    assert {route(i, CanaryConfig(weight=1.0)) for i in ids} == {("candidate", False)}
    half = [route(i, CanaryConfig(weight=0.5, shadow=0.5)) for i in ids]
    assert half == [route(i, CanaryConfig(weight=0.5, shadow=0.5)) for i in ids]  # the same id, the same arm
    answered = sum(arm == "candidate" for arm, _ in half)
    shadowed = sum(mirror for _, mirror in half)
    assert 160 < answered < 240 and 60 < shadowed < 140  # ~200 and ~100 of 400
    # a request the candidate answers at 10% also goes to it at 50%: raising the weight only adds requests
    assert {i for i in ids if route(i, CanaryConfig(weight=0.1))[0] == "candidate"} <= \
        {i for i in ids if route(i, CanaryConfig(weight=0.5))[0] == "candidate"}


def test_every_recorded_metric_is_declared():
    """record() switches every metric off on the first unknown name, so each name used must be declared."""
    import re
    from pathlib import Path

    from serving import app, canary

    used = set(re.findall(r'record\("(\w+)"', "".join(Path(m.__file__).read_text() for m in (app, canary))))
    assert {"arm_requests", "online_effectiveness", "shadow_skipped", "batch_timeouts"} <= used
    assert used <= set(app._METRIC_KINDS), used - set(app._METRIC_KINDS)
