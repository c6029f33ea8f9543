"""Request/response schemas, the PNG codec and API-key auth of the serving API (no Ray, no HTTP)."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from cxrcf.errors import CxrcfError
from cxrcf.png import ImageError, decode_png, encode_png, resize_gray
from serving import auth
from serving.schemas import (
    CounterfactualRequest,
    Intervention,
    Parents,
    drift,
    error_body,
    field_errors,
    parents_from_codes,
    probabilities,
)

PARENTS = {"sex": "male", "race": "white", "age": 61.0, "finding": "no_finding"}


def _png(array: np.ndarray, **save) -> str:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=save.pop("format", "PNG"), **save)
    return base64.b64encode(buf.getvalue()).decode()


def _errors(body: dict) -> list[tuple[str, str]]:
    try:
        CounterfactualRequest.model_validate_json(json.dumps(body))
    except ValidationError as err:
        return [(e.field, e.message) for e in field_errors(err.errors())]
    raise AssertionError(f"accepted {body}")


# ----------------------------------------------------------------------------------------- schemas
def test_valid_request_keeps_values_and_defaults():
    req = CounterfactualRequest.model_validate_json(json.dumps(
        {"image": "AAAA", "parents": PARENTS, "interventions": [{"sex": "female"}, {"age": 80, "finding": "pleural_effusion"}]}))
    assert req.t_u is None and req.seed == 0  # None: the server's serve.t_u
    assert [i.values() for i in req.interventions] == [{"sex": "female"}, {"age": 80.0, "finding": "pleural_effusion"}]
    assert req.parents == Parents(**PARENTS)


@pytest.mark.parametrize("body, field, words", [
    ({"interventions": [{"sex": "female"}]}, "image", "exactly one"),
    ({"image": "A", "image_id": "x", "interventions": [{"sex": "female"}]}, "image", "exactly one"),
    ({"image": "A", "interventions": []}, "interventions", "at least 1"),
    ({"image": "A", "interventions": [{}]}, "interventions.0", "empty intervention"),
    ({"image": "A", "interventions": [{"height": 3}]}, "interventions.0.height", "unknown attribute"),
    ({"image": "A", "interventions": [{"sex": "other"}]}, "interventions.0.sex", "male, female"),
    ({"image": "A", "interventions": [{"race": "green"}]}, "interventions.0.race", "white, asian, black"),
    ({"image": "A", "interventions": [{"age": 121}]}, "interventions.0.age", "less than or equal to 120"),
    ({"image": "A", "interventions": [{"age": -1}]}, "interventions.0.age", "greater than or equal to 0"),
    ({"image": "A", "interventions": [{"age": "45"}]}, "interventions.0.age", "valid number"),
    ({"image": "A", "interventions": [{"sex": 1}]}, "interventions.0.sex", "male, female"),
    ({"image": "A", "parents": {**PARENTS, "age": 130}, "interventions": [{"sex": "female"}]}, "parents.age", "120"),
    ({"image": "A", "parents": {"sex": "male"}, "interventions": [{"sex": "female"}]}, "parents.race", "required"),
    ({"image": "A", "parents": {**PARENTS, "bmi": 3}, "interventions": [{"sex": "female"}]}, "parents.bmi",
     "unknown attribute"),
    ({"image": "A", "interventions": [{"sex": "female"}], "t_u": 0}, "t_u", "greater than 0"),
    ({"image": "A", "interventions": [{"sex": "female"}], "t_u": 1.5}, "t_u", "less than or equal to 1"),
    ({"image": "A", "interventions": [{"sex": "female"}], "seed": 1.5}, "seed", "integer"),
    ({"image": "A", "interventions": [{"sex": "female"}], "colour": 1}, "colour", "unknown field"),
])
def test_bad_requests_name_their_field(body, field, words):
    errors = _errors(body)
    assert any(f == field and words in m for f, m in errors), errors


def test_invalid_json_and_error_body():
    with pytest.raises(ValidationError) as info:
        CounterfactualRequest.model_validate_json("{not json")
    errs = field_errors(info.value.errors())
    assert errs[0].field == "body" and "not valid JSON" in errs[0].message
    body = error_body(errs)
    assert body["detail"].startswith("body: not valid JSON") and body["errors"][0]["field"] == "body"


def test_fastapi_locations_drop_body_prefix():
    errs = field_errors([{"type": "missing", "loc": ("body", "interventions"), "msg": "Field required"}])
    assert (errs[0].field, errs[0].message) == ("interventions", "required")


def test_intervention_values_drop_unset():
    assert Intervention(age=30.0).values() == {"age": 30.0}


def test_probabilities_and_drift():
    f = probabilities({"sex": 0.25, "race": [0.5, 0.3, 0.2], "finding": 0.9, "age": 60.0})
    c = probabilities({"sex": 0.75, "race": [0.2, 0.3, 0.5], "finding": 0.8, "age": 64.5})
    assert f.sex == {"male": 0.75, "female": 0.25} and f.race == {"white": 0.5, "asian": 0.3, "black": 0.2}
    d = drift(f, c)
    assert d.sex["female"] == pytest.approx(0.5) and d.sex["male"] == pytest.approx(-0.5)
    assert d.race["black"] == pytest.approx(0.3) and d.finding["pleural_effusion"] == pytest.approx(-0.1)
    assert d.age == pytest.approx(4.5)


def test_parents_from_codes():
    p = parents_from_codes({"sex": 1.0, "race": 2.0, "age": 33.5, "finding": 1.0})
    assert p == Parents(sex="female", race="black", age=33.5, finding="pleural_effusion")


# ------------------------------------------------------------------------------------------- codec
def test_png_round_trip_keeps_pixels_and_size():
    a = np.random.default_rng(0).integers(0, 256, (40, 56), dtype=np.uint8)
    assert np.array_equal(decode_png(encode_png(a)), a)
    assert np.array_equal(decode_png("data:image/png;base64," + encode_png(a)), a)


def test_sixteen_bit_and_gray_rgb_are_accepted():
    wide = (np.arange(16 * 16, dtype=np.uint16).reshape(16, 16) * 257)
    assert np.array_equal(decode_png(_png(wide)), (np.arange(256).reshape(16, 16)).astype(np.uint8))
    gray = np.random.default_rng(1).integers(0, 256, (20, 20), dtype=np.uint8)
    assert np.array_equal(decode_png(_png(np.stack([gray] * 3, -1))), gray)
    rgba = np.concatenate([np.stack([gray] * 3, -1), np.full((20, 20, 1), 128, np.uint8)], -1)
    assert np.array_equal(decode_png(_png(rgba)), gray)


@pytest.mark.parametrize("data, words", [
    ("!!!not base64!!!", "base64"),
    (base64.b64encode(b"hello, not a picture").decode(), "not a readable image"),
    ("", "empty"),
    (_png(np.zeros((16, 16), np.uint8), format="JPEG"), "expected a PNG"),
    (_png(np.zeros((4, 30), np.uint8)), "each side"),
    (_png(np.stack([np.zeros((16, 16), np.uint8), np.ones((16, 16), np.uint8), np.zeros((16, 16), np.uint8)], -1)),
     "3 distinct colour channels"),
])
def test_bad_images_are_refused(data, words):
    with pytest.raises(ImageError, match=words):
        decode_png(data)


def test_truncated_png_is_refused():
    raw = base64.b64decode(encode_png(np.random.default_rng(2).integers(0, 256, (64, 64), dtype=np.uint8)))
    with pytest.raises(ImageError, match="truncated|corrupt|readable"):
        decode_png(base64.b64encode(raw[: len(raw) // 2]).decode())


def test_resize_back_to_client_size():
    a = np.full((32, 32), 200, np.uint8)
    out = resize_gray(a, 50, 70)
    assert out.shape == (50, 70) and out.dtype == np.uint8 and int(out.mean()) == 200


# -------------------------------------------------------------------------------------------- auth
def test_keys_parsed_and_checked():
    keys = auth.parse_keys(" alpha, ,beta ")
    assert keys == ["alpha", "beta"]
    allowed = auth.digests(keys)
    assert "alpha" not in "".join(allowed)
    assert auth.authorized({"x-api-key": "alpha"}, allowed)
    assert auth.authorized({"authorization": "Bearer beta"}, allowed)
    assert not auth.authorized({"authorization": "Basic beta"}, allowed)
    assert not auth.authorized({"x-api-key": "gamma"}, allowed)
    assert not auth.authorized({}, allowed)
    assert auth.authorized({}, [])


def test_non_loopback_host_needs_keys():
    auth.check_host("127.0.0.1", [])
    auth.check_host("::1", [])
    auth.check_host("0.0.0.0", ["k"])
    with pytest.raises(CxrcfError, match="serve.host: 0.0.0.0.*CXRCF_API_KEYS"):
        auth.check_host("0.0.0.0", [])


def test_sixteen_bit_scaling_rounds_like_v_over_257():
    values = np.arange(0, 65536, 7, dtype=np.uint16)[:9216].reshape(96, 96)
    want = np.round(values.astype(np.float64) / 257.0).astype(np.uint8)
    assert np.array_equal(decode_png(_png(values)), want)


def test_size_comes_from_the_header_before_decoding():
    from cxrcf.png import ImageTooLarge, check_size, peek_size

    flat = _png(np.zeros((300, 200), np.uint8))
    assert peek_size(flat) == (200, 300) and peek_size("data:image/png;base64," + flat) == (200, 300)
    with pytest.raises(ImageTooLarge, match="60000 pixels is over the limit of 50000"):
        decode_png(flat, max_pixels=50_000)
    with pytest.raises(ImageError, match="each side must be"):
        check_size(5000, 8, 10**9)
    with pytest.raises(ImageError, match="not a PNG image"):
        peek_size(base64.b64encode(b"GIF89a" + bytes(40)).decode())


def test_interventions_and_image_id_have_hard_caps():
    errors = _errors({"image_id": "\u00e9" * 129, "interventions": [{"age": 1.0}] * 600_000})
    assert ("interventions", "600000 given; at most 64 per request (the API's hard cap)") in errors
    assert any(field == "image_id" and "at most 128" in message for field, message in errors)
