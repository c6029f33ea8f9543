"""The counterfactual API end to end: real local Ray Serve, real SQLite MLflow registry, real HTTP.

One Serve application for the whole module (Serve's HTTP options are per cluster). Two versions of
`tiny_bundle` (different seeds) are registered; version 1 is champion when serving starts and the
last test promotes version 2 and watches the replicas switch without failing a request.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from helpers import free_port
from PIL import Image

MODEL = "serve-test-generator"
PARENTS = {"sex": "male", "race": "asian", "age": 47.0, "finding": "no_finding"}
GATE_PASSING_EVAL = {"effectiveness": {"sex": {"auc": 0.9}, "race": {"auc": 0.9}, "finding": {"auc": 0.9},
                                       "age": {"mae": 5.0}},
                     "amplification": {"worst": 0.1}}


def serve_url(ray_cluster) -> str:
    """Start Serve on a free localhost port, or reuse the one this cluster already has."""
    from ray import serve
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
        client = _get_global_client()
    return f"http://127.0.0.1:{client.http_config.port}"


def _png(array: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _unpng(data: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))))


def _image(h: int = 32, w: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8)


def _serve_config(**overrides):
    from cxrcf.config import ServeConfig, preset_params

    base = preset_params("smoke").serve.model_dump()
    base.update(max_batch_size=8, batch_wait_timeout_s=0.05, max_ongoing_requests=32, max_interventions=4,
                max_body_bytes=200_000, reload_poll_s=0.5, num_cpus=1.0)
    return ServeConfig.model_validate({**base, **overrides})


@pytest.fixture(scope="module")
def registered(mlflow_uri, tmp_path_factory):
    """Versions 1 and 2 of MODEL (tiny_bundle seeds 0 and 1); version 1 promoted to champion."""
    from helpers import tiny_bundle

    from cxrcf.config import preset_params
    from cxrcf.export import save_model
    from pipelines import registry

    # own names for the predictors registered alongside, so that registry tests sharing the session's
    # MLflow store never see versions of theirs that this module created
    params = preset_params("smoke", registry={"guidance_predictor_name": "serve-test-guidance",
                                              "evaluation_predictor_name": "serve-test-evaluation"})
    root = tmp_path_factory.mktemp("serve-models")
    (root / "eval.json").write_text(json.dumps(GATE_PASSING_EVAL))
    versions = []
    for seed in (0, 1):
        b = tiny_bundle(seed=seed)
        d = root / f"seed{seed}"
        for part, model in (("generator", b.hvae), ("scm", b.scm), ("predictor", b.predictor)):
            save_model(model, d / part)
        out = registry.register(params, d / "generator", d / "scm", d / "predictor", d / "predictor", "soft",
                                root / "eval.json", name=MODEL)
        versions.append(out["version"])
    assert registry.promote(params, MODEL, versions[0]).ok
    return {"params": params, "versions": versions}


@pytest.fixture(scope="module")
def server(ray_cluster, registered, tiny_data, tmp_path_factory):
    from ray import serve

    from serving.app import APP_NAME, build_app, wait_ready

    url = serve_url(ray_cluster)
    lkg = tmp_path_factory.mktemp("lkg")

    def deploy(keys=(), runner=None, **overrides):
        # a replica holds max_ongoing_requests (32) + max_queued_requests (32): the overload test fills them
        settings = {"lkg_dir": str(lkg), "stale_after_s": 30.0, "max_queued_requests": 32,
                    "max_reply_bytes": 1_000_000, "request_timeout_s": 8.0, **overrides}
        app = build_app(_serve_config(**settings), MODEL, alias="champion", data_root=str(tiny_data),
                        api_keys=list(keys), runner=runner)
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)

    deploy(runner=_slow_runner(HOLD_SEED, HOLD_S))  # production's run_batch, but HOLD_SEED holds its batch
    wait_ready(url)
    with httpx.Client(base_url=url, timeout=60.0) as http:
        state = {"url": url, "http": http, "deploy": deploy, "data": tiny_data, "lkg": lkg}
        yield state
    serve.delete(APP_NAME)
    if "reconfigured" in state:
        from pipelines.registry import connect

        connect().set_registered_model_alias(MODEL, "candidate", state["reconfigured"]["candidate_before"])


def _post(server, body, **kw) -> httpx.Response:
    return server["http"].post("/v1/counterfactuals", json=body, **kw)


def _bundle(version: str):
    from store.models import load_bundle

    return load_bundle(f"models:/{MODEL}/{version}")[0]


# ------------------------------------------------------------------------------------- endpoints
def test_health_model_and_docs(server, registered):
    http = server["http"]
    health = http.get("/healthz")
    assert health.status_code == 200
    assert health.json() == {"status": "ok", "model": MODEL, "version": registered["versions"][0]}
    ready = http.get("/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True, ready.text
    assert ready.json()["alias_state"]["state"] == "current" and ready.json()["alias_state"]["registry_reachable"]
    reply = http.get("/v1/model")
    assert reply.headers["x-model-version"] == "1" and reply.headers["x-model-alias"] == "champion"
    info = reply.json()
    assert info["alias_state"]["source"] == "registry" and info["alias_state"]["failures"] == 0
    # the replica keeps a verified local copy of what it serves
    assert (server["lkg"] / MODEL / "v1" / "manifest.json").is_file()
    assert (info["name"], info["version"], info["alias"], info["mode"]) == (MODEL, "1", "champion", "soft")
    assert info["metrics"]["effectiveness.sex.auc"] == pytest.approx(0.9)
    assert info["resolution"] == 32 and info["device"] == "cpu"
    assert info["stats"]["max_batch_size"] == 8 and info["stats"]["batch_wait_timeout_s"] == pytest.approx(0.05)
    assert "swagger" in http.get("/docs").text.lower()
    spec = http.get("/openapi.json")
    assert spec.status_code == 200, spec.text[:3000]
    spec = spec.json()
    assert {"/v1/counterfactuals", "/v1/model", "/healthz"} <= set(spec["paths"])
    assert "CounterfactualRequest" in spec["components"]["schemas"]


def test_counterfactuals_match_the_bundle(server):
    """Served alone, a request reproduces GeneratorBundle.counterfactuals bit for bit."""
    import torch

    from cxrcf.bundle import parents_from_labels
    from cxrcf.data import from_model_images, to_model_images

    pixels = _image(seed=5)
    interventions = [{"sex": "female"}, {"age": 90.0}]
    r = _post(server, {"image": _png(pixels), "parents": PARENTS, "interventions": interventions,
                       "t_u": 0.8, "seed": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    bundle = _bundle("1")
    x = to_model_images(pixels[None], 32)
    images, cf_parents = bundle.counterfactuals(x, parents_from_labels([PARENTS]), interventions, t_u=0.8, seed=3,
                                                return_parents=True)
    assert body["factual"]["parents"] == PARENTS and body["factual"]["parents_inferred"] is False
    assert (body["factual"]["height"], body["factual"]["width"]) == (32, 32)
    assert body["model"]["name"] == MODEL and body["model"]["version"] == "1" and body["model"]["batch_size"] == 1
    probs = bundle.probabilities(x)
    assert body["factual"]["probabilities"]["sex"]["female"] == pytest.approx(float(probs["sex"][0]), abs=1e-6)
    assert body["factual"]["probabilities"]["age"] == pytest.approx(float(probs["age"][0]), abs=1e-4)
    assert [c["intervention"] for c in body["counterfactuals"]] == interventions
    for cf, img, star in zip(body["counterfactuals"], images, cf_parents):
        assert np.array_equal(_unpng(cf["image"]), from_model_images(img)[0])
        assert cf["parents"]["age"] == pytest.approx(float(star["age"][0]))
        assert cf["parents"]["finding"] == ("pleural_effusion" if star["finding"][0] else "no_finding")
        cf_probs = bundle.probabilities(to_model_images(from_model_images(img), 32))
        assert cf["probabilities"]["finding"]["pleural_effusion"] == pytest.approx(float(cf_probs["finding"][0]),
                                                                                   abs=2e-2)
        for attr in ("sex", "race", "finding"):
            for cls, p in cf["probabilities"][attr].items():
                want = p - body["factual"]["probabilities"][attr][cls]
                assert cf["drift"][attr][cls] == pytest.approx(want, abs=1e-9)
    assert body["counterfactuals"][0]["parents"] == {**PARENTS, "sex": "female"}
    assert body["counterfactuals"][1]["parents"]["age"] == 90.0
    assert torch.is_tensor(images[0])


def test_any_size_and_inferred_parents(server):
    import torch

    from cxrcf.data import to_model_images
    from serving.engine import square

    pixels = _image(40, 56, seed=7)
    r = _post(server, {"image": _png(pixels), "interventions": [{"finding": "pleural_effusion"}]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["factual"]["parents_inferred"] is True
    assert _unpng(body["counterfactuals"][0]["image"]).shape == (40, 56)
    inferred = _bundle("1").infer_parents(to_model_images(square(pixels)[None], 32))
    assert body["factual"]["parents"]["sex"] == ("female" if inferred["sex"][0] else "male")
    assert body["factual"]["parents"]["age"] == pytest.approx(float(inferred["age"][0]), abs=1e-4)
    assert body["counterfactuals"][0]["parents"]["finding"] == "pleural_effusion"
    assert torch.is_tensor(inferred["race"])


def test_dataset_image_id(server):
    import pandas as pd

    row = pd.read_csv(server["data"] / "metadata.csv").iloc[3]
    r = _post(server, {"image_id": row["id"], "interventions": [{"race": "black"}]})
    assert r.status_code == 200, r.text
    factual = r.json()["factual"]
    assert factual["image_id"] == row["id"] and factual["parents_inferred"] is False
    assert factual["parents"] == {"sex": row["sex"], "race": row["race"], "age": pytest.approx(row["age"]),
                                  "finding": row["finding"]}
    stored = np.asarray(Image.open(server["data"] / row["path"]))
    assert (factual["height"], factual["width"]) == stored.shape


def _rgb(distinct: bool) -> str:
    g = _image(seed=9)
    return _png(np.stack([g, 255 - g if distinct else g, g], -1))


BAD = [
    ("malformed base64", {"image": "@@@not-base64@@@"}, 422, "image", "base64"),
    ("not an image", {"image": base64.b64encode(b"plain text, not a picture").decode()}, 422, "image", "image"),
    ("RGB with distinct channels", {"image": _rgb(True)}, 422, "image", "channels"),
    ("image and image_id", {"image": _png(_image()), "image_id": "x"}, 422, "image", "exactly one"),
    ("unknown image_id", {"image_id": "no-such-id"}, 422, "image_id", "unknown id"),
    ("unknown attribute", {"interventions": [{"height": 180}]}, 422, "interventions.0.height", "unknown attribute"),
    ("unknown value", {"interventions": [{"sex": "unknown"}]}, 422, "interventions.0.sex", "male, female"),
    ("age out of range", {"parents": {**PARENTS, "age": 150}}, 422, "parents.age", "120"),
    ("intervened age out of range", {"interventions": [{"age": -3}]}, 422, "interventions.0.age", "0"),
    ("too many interventions", {"interventions": [{"sex": "female"}] * 5}, 422, "interventions", "at most 4"),
    ("bad t_u", {"t_u": 2}, 422, "t_u", "1"),
    ("65 interventions", {"interventions": [{"sex": "female"}] * 65}, 422, "interventions", "at most 64"),
    ("long unicode image_id", {"image_id": "\u00e9\U0001f600" * 5000}, 422, "image_id", "at most 128"),
    ("large image, many counterfactuals", {"image": _png(np.zeros((600, 600), np.uint8)),
                                           "interventions": [{"sex": "female"}] * 4},
     413, "interventions", "serve.max_reply_bytes"),
]


@pytest.mark.parametrize("name, change, status, field, words", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_a_4xx_naming_the_field(server, name, change, status, field, words):
    body = {"image": _png(_image()), "interventions": [{"sex": "female"}]}
    body.update(change)
    if "image_id" in change and "image" not in change:
        body.pop("image")
    r = _post(server, body)
    assert r.status_code == status, r.text
    errors = r.json()["errors"]
    assert any(e["field"] == field and words in e["message"] for e in errors), errors
    assert field in r.json()["detail"]


def _flat_png(side: int, mode: str) -> str:
    buf = io.BytesIO()
    Image.new(mode, (side, side)).save(buf, format="PNG")  # zeros: a few kilobytes for 16 M pixels
    return base64.b64encode(buf.getvalue()).decode()


@pytest.mark.parametrize("mode", ["L", "I;16"])
def test_decompression_bombs_are_refused_from_the_header(server, mode):
    """A flat 4096^2 PNG (8 or 16 bit) is a few KB on the wire; it is refused before it is inflated."""
    image = _flat_png(4096, mode)
    assert len(image) < 100_000
    r = _post(server, {"image": image, "parents": PARENTS, "interventions": [{"sex": "female"}] * 4})
    assert r.status_code == 413, r.text
    assert r.json()["errors"][0]["field"] == "image" and "serve.max_pixels" in r.json()["detail"]
    assert "4096x4096" in r.json()["detail"]
    assert _post(server, {"image": _png(_image()), "parents": PARENTS, "interventions": [{"age": 30.0}]}).status_code == 200


def test_malformed_json_and_oversized_body(server):
    http = server["http"]
    r = http.post("/v1/counterfactuals", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "body"
    not_utf8 = b'{"image": "\xff\xfe", "interventions": [{"sex": "female"}]}'
    r = http.post("/v1/counterfactuals", content=not_utf8, headers={"content-type": "application/json"})
    assert r.status_code in (400, 422) and r.json()["errors"][0]["field"] == "body", r.text
    big = {"image": "A" * 250_000, "interventions": [{"sex": "female"}]}
    r = http.post("/v1/counterfactuals", json=big)
    assert r.status_code == 413 and "serve.max_body_bytes" in r.json()["detail"]


def test_chunked_body_is_limited_and_replayed(server):
    """Without a content-length the limit still holds, and a body under it reaches the route intact."""
    http = server["http"]
    body = json.dumps({"image": _png(_image(seed=2)), "parents": PARENTS,
                       "interventions": [{"sex": "female"}]}).encode()

    def chunks(data: bytes):
        for i in range(0, len(data), 1000):
            yield data[i:i + 1000]

    ok = http.post("/v1/counterfactuals", content=chunks(body), headers={"content-type": "application/json"})
    assert "content-length" not in ok.request.headers and ok.status_code == 200, ok.text
    big = json.dumps({"image": "A" * 250_000, "interventions": [{"sex": "female"}]}).encode()
    refused = http.post("/v1/counterfactuals", content=chunks(big), headers={"content-type": "application/json"})
    assert refused.status_code == 413 and refused.json()["errors"][0]["field"] == "body"
    assert "serve.max_body_bytes" in refused.json()["detail"]


def test_direct_ingress_serves_the_same_api(server):
    """The replica's own port (serve.direct_ingress) answers like the proxy, limits and all."""
    from serving import ingress
    from serving.app import APP_NAME

    urls = ingress.wait_urls(_serve_config(), APP_NAME)
    assert len(urls) == 1 and urls[0] != server["url"]
    assert int(urls[0].rsplit(":", 1)[1]) in _serve_config().direct_ports
    body = {"image": _png(_image(seed=4)), "parents": PARENTS, "interventions": [{"age": 80.0}], "seed": 9}
    with httpx.Client(base_url=urls[0], timeout=60.0) as direct:
        assert direct.get("/healthz").json()["model"] == MODEL
        via_direct = direct.post("/v1/counterfactuals", json=body)
        oversized = direct.post("/v1/counterfactuals", json={"image": "A" * 250_000, "interventions": [{"sex": "male"}]})
        bad_age = direct.post("/v1/counterfactuals", json={**body, "parents": {**PARENTS, "age": 130}})
    via_proxy = _post(server, body)
    assert via_direct.status_code == via_proxy.status_code == 200, via_direct.text
    assert via_direct.json()["counterfactuals"][0]["image"] == via_proxy.json()["counterfactuals"][0]["image"]
    assert oversized.status_code == 413
    assert bad_age.status_code == 422 and bad_age.json()["errors"][0]["field"] == "parents.age"


def test_gray_rgb_png_is_accepted(server):
    r = _post(server, {"image": _rgb(False), "parents": PARENTS, "interventions": [{"sex": "female"}]})
    assert r.status_code == 200, r.text


def _access_lines(request_id: str) -> list[dict]:
    import glob

    import ray

    logs = ray._private.worker._global_node.get_session_dir_path() + "/logs/serve/replica_*.log"
    found = []
    for path in glob.glob(logs):
        with open(path, errors="replace") as f:
            for line in f:
                start = line.find('{"access"')
                if start >= 0 and request_id in line:
                    found.append(json.loads(line[start:].strip()))
    return found


def test_request_id_model_headers_and_access_log(server):
    http = server["http"]
    body = {"image": _png(_image()), "parents": PARENTS, "interventions": [{"sex": "female"}]}
    mine = _post(server, body, headers={"X-Request-ID": "trace-42"})
    assert mine.status_code == 200 and mine.headers["x-request-id"] == "trace-42"
    assert mine.headers["x-model-version"] == "1" and mine.headers["x-model-alias"] == "champion"
    assert http.get("/healthz").headers["x-request-id"] != http.get("/healthz").headers["x-request-id"]
    _wait_for(lambda: _access_lines("trace-42"), "no access-log line for the request")
    line = _access_lines("trace-42")[0]
    assert (line["status"], line["path"], line["version"]) == (200, "/v1/counterfactuals", "1")
    assert line["bytes"] == len(mine.content) and line["ms"] > 0


def _stall(url: str, n: int) -> list[socket.socket]:
    """n requests that announce a body and never send it: each holds a place in the replica."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    held = []
    for _ in range(n):
        s = socket.create_connection((host, int(port)), timeout=30)
        s.sendall(b"POST /v1/counterfactuals HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000\r\n\r\n{")
        held.append(s)
    return held


def _status_of(sock: socket.socket) -> int:
    data = b""
    while b"\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return int(data.split(b" ", 2)[1]) if data else 0


def test_overload_answers_503_then_the_deadline_504_and_recovers(server):
    """A full replica refuses more work at once (503 + Retry-After) instead of queueing it without
    bound; requests that never complete are cut at serve.request_timeout_s (504); then all is normal."""
    from serving import ingress
    from serving.app import APP_NAME

    direct = ingress.wait_urls(_serve_config(), APP_NAME)[0]
    body = {"image": _png(_image()), "parents": PARENTS, "interventions": [{"sex": "female"}]}
    running = _stall(direct, 32)  # max_ongoing_requests
    queued = _stall(direct, 32)  # max_queued_requests
    try:
        def refused():
            r = httpx.post(direct + "/v1/counterfactuals", json=body, timeout=5)
            return r if r.status_code == 503 else None

        _wait_for(refused, "a full replica never answered 503", timeout_s=20)
        assert refused().headers["retry-after"] == "1"
        for s in queued:  # clients that give up leave the queue
            s.close()
        # the 32 that never send their body are cut at serve.request_timeout_s (8 s here)
        assert [_status_of(s) for s in running] == [504] * 32
    finally:
        for s in running + queued:
            s.close()
    ok = httpx.post(direct + "/v1/counterfactuals", json=body, timeout=30)
    assert ok.status_code == 200, ok.text


def test_withdrawn_alias_stops_serving_until_it_returns(server, registered):
    """Policy: deleting the followed alias withdraws the model (503, /readyz 503); it serves again once
    the alias points to a version."""
    from pipelines.registry import connect

    http = server["http"]
    body = {"image": _png(_image()), "parents": PARENTS, "interventions": [{"sex": "female"}]}
    client = connect()
    client.delete_registered_model_alias(MODEL, "champion")
    try:
        _wait_for(lambda: http.get("/readyz").status_code == 503, "readiness never noticed the withdrawal")
        assert "removed" in http.get("/readyz").json()["reasons"][0]
        refused = _post(server, body)
        assert refused.status_code == 503 and "withdrawn" in refused.json()["detail"]
        info = http.get("/v1/model")
        assert info.json()["alias_state"]["state"] == "withdrawn" and info.headers["x-model-alias-state"] == "withdrawn"
        assert http.get("/healthz").status_code == 200  # alive: a restart would not bring the alias back
    finally:
        client.set_registered_model_alias(MODEL, "champion", registered["versions"][0])
    _wait_for(lambda: http.get("/readyz").status_code == 200, "readiness never recovered")
    assert _post(server, body).status_code == 200


# -------------------------------------------------------------------------------------- batching
def _burst(server, n: int) -> list[httpx.Response]:
    body = {"image": _png(_image(seed=11)), "parents": PARENTS, "interventions": [{"sex": "female"}]}
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda _: httpx.post(server["url"] + "/v1/counterfactuals", json=body, timeout=60),
                             range(n)))


def test_concurrent_requests_form_batches(server):
    replies = _burst(server, 24)
    assert all(r.status_code == 200 for r in replies), [r.text for r in replies if r.status_code != 200]
    sizes = [r.json()["model"]["batch_size"] for r in replies]
    assert max(sizes) > 1 and max(sizes) <= 8
    stats = server["http"].get("/v1/model").json()["stats"]
    assert stats["mean_batch_size"] > 1.0 and stats["requests"] >= 24


HOLD_SEED, HOLD_S = 171717, 2.0  # a request with this seed holds its batch (the first deployment's runner)


def test_requests_arriving_during_a_batch_enter_the_next_one_together(server):
    """Requests that arrive while a batch runs wait for it to end and then form one batch. Serve's
    batcher alone forms the next batch while one runs, of whatever arrives within batch_wait_timeout_s
    (0.05 s here), so these 6, 0.15 s apart, would each have gone alone (issue 17: past saturation
    batches shrank and throughput fell)."""
    body = {"image": _png(_image()), "parents": PARENTS, "interventions": [{"sex": "female"}]}
    with ThreadPoolExecutor(7) as pool:
        held = pool.submit(_post, server, {**body, "seed": HOLD_SEED})
        time.sleep(0.5)  # the held batch is running (HOLD_S) while the others arrive
        later = []
        for _ in range(6):
            later.append(pool.submit(_post, server, body))
            time.sleep(0.15)
        replies = [held.result(), *(f.result() for f in later)]
    assert [r.status_code for r in replies] == [200] * 7, [r.text for r in replies]
    sizes = [r.json()["model"]["batch_size"] for r in replies[1:]]
    assert sizes.count(max(sizes)) >= 4 and max(sizes) >= 4, sizes  # at least 4 of the 6 in one batch


# ------------------------------------------------------------------ run-time reconfiguration, auth
def _wait_for(check, what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def test_cli_refuses_public_host_without_keys_and_unknown_alias(mlflow_uri, monkeypatch, capsys, tmp_path):
    from cxrcf.cli import main

    monkeypatch.delenv("CXRCF_API_KEYS", raising=False)
    params = tmp_path / "params.yaml"
    params.write_text("preset: smoke\n")
    assert main(["serve", "--params", str(params), "--host", "0.0.0.0"]) == 1
    assert "serve.host: 0.0.0.0" in capsys.readouterr().err
    assert main(["serve", "--params", str(params), "--model-name", MODEL, "--alias", "nope"]) == 1
    assert "no version has alias 'nope'" in capsys.readouterr().err
    assert main(["serve", "--params", str(params), "--max-batch-size", "0"]) == 1
    assert "max_batch_size" in capsys.readouterr().err


def _metric(text: str, name: str, **labels: str) -> float:
    """The sum of the `name` samples on a Prometheus page whose labels include `labels` (0 if none)."""
    from prometheus_client.parser import text_string_to_metric_families

    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def test_metrics_port_exports_cxrcf_metrics_to_prometheus(server, metrics_port):
    """The session cluster opens its Prometheus endpoint as `cxrcf serve --metrics-port` does
    (serving.cli.metrics_export): scraped over HTTP, it carries cxrcf's request, latency, batch-size and
    served-version series, and they move by exactly the requests sent (a 200 per good request, one 422;
    only the 200s are batched)."""
    from store.models import resolve_alias

    scrape = f"http://127.0.0.1:{metrics_port}/metrics"
    route = {"route": "/v1/counterfactuals"}
    # the earlier tests' requests are exported up to a report interval (Ray's default, 10 s) after them: the
    # page is settled when two scrapes more than an interval apart agree
    before, deadline = "", time.monotonic() + 60
    while time.monotonic() < deadline:
        settled = httpx.get(scrape, timeout=10).text
        if before and _metric(settled, "ray_cxrcf_request_latency_ms_count", **route) == \
                _metric(before, "ray_cxrcf_request_latency_ms_count", **route):
            break
        before = settled
        time.sleep(11)
    before = settled
    good = {"image": _png(_image()), "parents": PARENTS, "interventions": [{"sex": "female"}]}
    with ThreadPoolExecutor(6) as pool:  # concurrent, so that some of them share a batch
        codes = list(pool.map(lambda _: _post(server, good).status_code, range(6)))
    codes.append(_post(server, {**good, "t_u": 7}).status_code)
    assert codes == [200] * 6 + [422]

    def moved(name, **labels):
        return _metric(text, name, **labels) - _metric(before, name, **labels)

    deadline = time.monotonic() + 60
    while True:  # the served version was set when the replica loaded, long before: check_health keeps it alive
        text = httpx.get(scrape, timeout=10).text
        if moved("ray_cxrcf_request_latency_ms_count", **route) >= 7 or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert moved("ray_cxrcf_requests_total", **route, status="200") == 6, text[-3000:]
    assert moved("ray_cxrcf_requests_total", **route, status="422") == 1
    assert moved("ray_cxrcf_request_latency_ms_count", **route) == 7
    assert moved("ray_cxrcf_request_latency_ms_sum", **route) > 0
    # the 6 good requests rode in 1 to 6 batches, the refused one in none (Ray exports a histogram's sum from
    # its bucket midpoints, so only the count is exact)
    assert 1 <= moved("ray_cxrcf_batch_size_count") <= 6 and moved("ray_cxrcf_batch_size_sum") > 0
    assert _metric(text, "ray_cxrcf_served_version", model=MODEL) == float(resolve_alias(MODEL, "champion"))
    assert _metric(text, "ray_serve_deployment_request_counter_total") > 0  # Serve's own series beside them


# ----------------------------------------------------------------------------------------- canary
def _canary_ids(canary, n: int = 12) -> dict[str, str]:
    """n request ids and the arm each is routed to under `canary` (serving.canary.route, a pure function)."""
    from serving.canary import route

    return {rid: route(rid, canary)[0] for rid in (f"canary-{i}" for i in range(n))}


def test_canary_off_answers_everything_from_the_champion(server, registered):
    """serve.canary.weight 0 (the default): a candidate alias may exist, the champion answers all."""
    from cxrcf.config import CanaryConfig
    from pipelines.registry import connect
    from store.models import resolve_alias

    champion = resolve_alias(MODEL, "champion")
    other = next(v for v in registered["versions"] if v != champion)
    connect().set_registered_model_alias(MODEL, "candidate", other)
    ids = _canary_ids(CanaryConfig(weight=0.5))
    assert "candidate" in ids.values()  # ids that a 50% canary would send to the candidate ...
    body = {"image": _png(_image()), "parents": PARENTS, "interventions": [{"sex": "female"}]}
    for rid in ids:
        r = _post(server, body, headers={"X-Request-ID": rid})
        assert r.status_code == 200, r.text
        # ... all answered by the champion at weight 0
        assert (r.headers["x-model-alias"], r.headers["x-model-version"]) == ("champion", champion)
        assert r.json()["model"]["arm"] == "champion"
    assert server["http"].get("/v1/model").json()["canary"] is None


# ------------------------------------------------------------------------------------ hot reload
def test_hot_reload_after_promotion_drops_nothing(server, registered):
    from pipelines import registry

    body = {"image": _png(_image(seed=13)), "parents": PARENTS, "interventions": [{"age": 70.0}], "seed": 1}
    before = _post(server, body).json()
    seen, stop = [], threading.Event()

    def traffic():
        with httpx.Client(base_url=server["url"], timeout=60) as http:
            while not stop.is_set():
                r = http.post("/v1/counterfactuals", json=body)
                seen.append((r.status_code, r.json()["model"]["version"] if r.status_code == 200 else r.text))

    threads = [threading.Thread(target=traffic) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        assert registry.promote(registered["params"], MODEL, registered["versions"][1]).ok
        deadline = time.monotonic() + 60
        while server["http"].get("/v1/model").json()["version"] != "2":
            assert time.monotonic() < deadline, "the replica never loaded version 2"
            time.sleep(0.2)
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert seen and all(code == 200 for code, _ in seen), [s for s in seen if s[0] != 200][:3]
    versions = [v for _, v in seen]
    assert "1" in versions and versions[-1] == "2"
    info = server["http"].get("/v1/model").json()
    assert info["reloads"] >= 1 and info["alias"] == "champion"
    after = _post(server, body).json()
    assert after["model"]["version"] == "2"
    assert after["counterfactuals"][0]["image"] != before["counterfactuals"][0]["image"]


# ---------------------------------------------- run-time settings: limits, t_u, canary, deadlines
# One redeploy (it rolls the replica, 10-15 s here) carries every changed setting the tests below
# need, and stays in place: they come after every test that needs the module's defaults. The keys
# test's way back from its keyed deployment is that redeploy (a roll saved).
CANARY = {"weight": 0.5, "shadow": 1.0, "max_shadow_pending": 64}
SLOW_SEED, SLOW_S, BATCH_DEADLINE_S = 424242, 3.0, 2.0


def _slow_runner(slow_seed: int, delay_s: float):
    """engine.run_batch, but a pass holding a request with `slow_seed` first sleeps `delay_s`: how the
    batch-deadline test stalls a forward pass without a sleep in production code. A nested function,
    so that Serve ships it to the replica by value (the replica cannot import this test module)."""

    def run(bundle, items, threads):
        from serving.engine import run_batch

        if any(item.seed == slow_seed for item in items):
            time.sleep(delay_s)
        return run_batch(bundle, items, threads)

    return run


def _reconfigure(server, registered) -> dict:
    """The app redeployed once with lower limits, serve.t_u 0.5, a canary whose candidate alias points
    to the version that is not champion (half the requests answered by it, the rest mirrored), a 2 s
    batch deadline that 2 misses in a row turn into a failed health check, and the slow runner. Done once
    per module: by the keys test on its way back, or else by the `reconfigured` fixture."""
    from pipelines.registry import connect
    from store.models import resolve_alias

    if "reconfigured" in server:
        return server["reconfigured"]
    champion = resolve_alias(MODEL, "champion")
    candidate = next(v for v in registered["versions"] if v != champion)
    # the `server` fixture puts the candidate alias back when the module ends
    server["reconfigured"] = {"champion": champion, "candidate": candidate,
                              "candidate_before": resolve_alias(MODEL, "candidate")}
    connect().set_registered_model_alias(MODEL, "candidate", candidate)
    server["deploy"](max_interventions=2, max_image_id_chars=16, t_u=0.5, canary=CANARY,
                     runner=_slow_runner(SLOW_SEED, SLOW_S), batch_timeout_s=BATCH_DEADLINE_S,
                     unhealthy_after_batch_timeouts=2, health_check_period_s=0.5, request_timeout_s=20.0)
    # the roll is over when the new replica (the only one with a canary) answers with its candidate
    _wait_for(lambda: (_model_info(server).get("canary") or {}).get("candidate_version") == candidate,
              "the canary deployment never answered with its candidate loaded", timeout_s=90)
    return server["reconfigured"]


@pytest.fixture(scope="module")
def reconfigured(server, registered):
    """The run-time settings of `_reconfigure` in force (deployed by the keys test if it ran first)."""
    state = _reconfigure(server, registered)
    return {"champion": state["champion"], "candidate": state["candidate"]}


def _model_info(server) -> dict:
    try:
        r = server["http"].get("/v1/model", timeout=5.0)
    except httpx.HTTPError:
        return {}
    return r.json() if r.status_code == 200 else {}


def test_keys_and_batch_size_reconfigure(server, registered):
    """A new user_config switches auth on and batching off, and back: "back" is the redeploy of the
    run-time settings section below (no keys, batching at 8), so this roll serves both."""
    http = server["http"]
    body = {"image": _png(_image()), "parents": PARENTS, "interventions": [{"sex": "female"}]}
    server["deploy"](keys=["s3cret", "other"], max_batch_size=1)
    try:
        _wait_for(lambda: http.get("/v1/model").status_code == 401, "auth never switched on")
        refused = _post(server, body)
        assert refused.status_code == 401 and refused.json()["errors"][0]["field"] == "X-API-Key"
        assert _post(server, body, headers={"X-API-Key": "wrong"}).status_code == 401
        assert _post(server, body, headers={"X-API-Key": "s3cret"}).status_code == 200
        assert _post(server, body, headers={"Authorization": "Bearer other"}).status_code == 200
        # strangers are refused before their body is looked at, malformed or not
        assert _post(server, {"nonsense": 1}).status_code == 401
        junk = http.post("/v1/counterfactuals", content=b"{not json", headers={"content-type": "application/json"})
        assert junk.status_code == 401 and junk.json()["errors"][0]["field"] == "X-API-Key"
        assert http.get("/readyz").status_code == 200
        assert http.get("/healthz").status_code == 200
        keyed = {"X-API-Key": "s3cret"}
        _wait_for(lambda: http.get("/v1/model", headers=keyed).json()["stats"]["max_batch_size"] == 1,
                  "max_batch_size never reconfigured")
        with ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(lambda _: _post(server, body, headers=keyed), range(8)))
        assert [r.json()["model"]["batch_size"] for r in replies] == [1] * 8
    finally:
        _reconfigure(server, registered)
    _wait_for(lambda: http.get("/v1/model").status_code == 200, "auth never switched off")
    _wait_for(lambda: http.get("/v1/model").json()["stats"]["max_batch_size"] == 8, "batching never restored")


def test_changed_limits_and_t_u_take_effect(server, reconfigured):
    """serve.max_interventions, serve.max_image_id_chars and serve.t_u come from the deployed config."""
    body = {"image": _png(_image()), "parents": PARENTS, "interventions": [{"sex": "female"}] * 3}
    r = _post(server, body)
    assert r.status_code == 422, r.text
    assert r.json()["errors"] == [{"field": "interventions",
                                   "message": "3 given; at most 2 per request (serve.max_interventions)"}]
    r = _post(server, {"image_id": "x" * 17, "interventions": [{"sex": "female"}]})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "image_id", r.text
    assert "at most 16 (serve.max_image_id_chars)" in r.json()["detail"]
    ok = _post(server, {**body, "interventions": [{"sex": "female"}] * 2})
    assert ok.status_code == 200 and ok.json()["t_u"] == 0.5, ok.text  # no t_u given: serve.t_u
    assert _post(server, {**body, "interventions": [{"age": 50.0}], "t_u": 1.0}).json()["t_u"] == 1.0


def test_canary_splits_by_request_id_and_shadows_the_rest(server, reconfigured):
    """Each request's X-Request-ID picks its arm; headers say who answered; every champion answer is
    mirrored to the candidate and scored (shadow), never returned."""
    from cxrcf.config import CanaryConfig

    ids = _canary_ids(CanaryConfig(**CANARY))
    assert set(ids.values()) == {"champion", "candidate"}
    want = {"champion": ("champion", reconfigured["champion"]), "candidate": ("candidate", reconfigured["candidate"])}
    # shadows of earlier requests settle first, so that the counts below are this test's alone
    _wait_for(lambda: (_model_info(server).get("canary") or {}).get("shadow_pending") == 0, "shadows never settled")
    before = _model_info(server)["canary"]["arms"]
    body = {"image": _png(_image(seed=3)), "parents": PARENTS, "interventions": [{"sex": "female"}, {"age": 75.0}]}
    for rid, arm in ids.items():
        r = _post(server, body, headers={"X-Request-ID": rid})
        assert r.status_code == 200, r.text
        assert (r.headers["x-model-alias"], r.headers["x-model-version"]) == want[arm], rid
        assert r.json()["model"]["arm"] == arm and r.json()["model"]["version"] == want[arm][1]
    n = {arm: sum(a == arm for a in ids.values()) for arm in ("champion", "candidate")}

    def mirrored():
        canary = _model_info(server).get("canary") or {}
        shadow = canary.get("arms", {}).get("shadow", {})
        return canary if shadow.get("requests", 0) - before["shadow"]["requests"] >= n["champion"] else None

    _wait_for(mirrored, "the champion's requests were not all mirrored to the candidate", timeout_s=30)
    canary = mirrored()
    arms = canary["arms"]
    assert canary["candidate_version"] == reconfigured["candidate"] and canary["shadow_skipped"] == 0
    assert canary["shadow_failed"] == 0
    for arm in ("champion", "candidate"):
        assert arms[arm]["requests"] - before[arm]["requests"] == n[arm] and arms[arm]["version"] == want[arm][1]
    assert arms["shadow"]["requests"] - before["shadow"]["requests"] == n["champion"]
    assert arms["shadow"]["version"] == reconfigured["candidate"]
    # online effectiveness: P(intervened value) from the evaluation predictor, age as an error in years
    for arm in ("champion", "candidate", "shadow"):
        eff = arms[arm]["effectiveness"]
        assert set(eff) == {"sex", "age_error_years"} and 0.0 <= eff["sex"] <= 1.0 and eff["age_error_years"] >= 0


def test_late_batch_fails_alone_with_504_and_repeated_misses_fail_check_health(server, reconfigured):
    """A forward pass past serve.batch_timeout_s fails its own requests with 504 and the replica goes
    on; serve.unhealthy_after_batch_timeouts misses in a row fail check_health and Serve replaces the
    replica. The stall is the fixture's runner (only for requests with SLOW_SEED); every wait is bounded.
    Last in the module: it ends on a new replica."""
    first = _model_info(server)["replica"]
    body = {"image": _png(_image()), "parents": PARENTS, "interventions": [{"sex": "female"}]}
    slow = {**body, "seed": SLOW_SEED}

    started = time.monotonic()
    late = _post(server, slow, timeout=15.0)
    took = time.monotonic() - started
    assert late.status_code == 504, late.text
    assert late.json()["errors"][0]["field"] == "model" and "serve.batch_timeout_s" in late.json()["detail"]
    assert BATCH_DEADLINE_S <= took < SLOW_S + 5.0  # cut by the batch deadline, not the request's 20 s
    time.sleep(SLOW_S - BATCH_DEADLINE_S + 0.5)  # the stalled pass ends; nothing else was waiting behind it
    ok = _post(server, body, timeout=15.0)
    assert ok.status_code == 200, ok.text  # one late batch fails alone: the next batch is served
    assert server["http"].get("/readyz", timeout=5.0).json()["batch_timeouts"] == 0
    assert _model_info(server)["replica"] == first

    # two late batches in a row: check_health fails (Serve checks every 0.5 s) and the replica is replaced
    assert [_post(server, slow, timeout=15.0).status_code for _ in range(2)] == [504, 504]
    _wait_for(lambda: _model_info(server).get("replica") not in (None, first),
              "Serve never replaced the replica whose batches kept missing their deadline", timeout_s=90)
    assert _post(server, body, timeout=15.0).status_code == 200
