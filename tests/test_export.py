"""Pickle-free export: config.json + model.safetensors round-trips for every kind; clear errors."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from helpers import synthetic_parents

from cxrcf.attributes import context
from cxrcf.config import PredictorArch, SCMConfig, preset_params
from cxrcf.errors import CxrcfError
from cxrcf.export import load_model, read_config, save_model
from cxrcf.predictor import Predictor
from cxrcf.scm import AttributeSCM


def _assert_pickle_free(directory):
    assert sorted(p.name for p in directory.iterdir()) == ["config.json", "model.safetensors"]
    raw = (directory / "model.safetensors").read_bytes()
    header_len = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + header_len])  # safetensors: a JSON header then raw tensor bytes
    assert header["__metadata__"]["kind"] == json.loads((directory / "config.json").read_text())["kind"]
    assert b"\x80\x02" not in raw[:2] and not raw.startswith(b"PK")  # neither a pickle nor a torch.save zip


@pytest.fixture()
def no_unpickling(monkeypatch):
    """Make every pickle entry point fail, so a load that unpickles cannot pass."""
    import pickle

    def refuse(*a, **k):
        raise AssertionError("unpickling attempted")

    class RefusingUnpickler(pickle.Unpickler):
        def load(self):
            refuse()

    for name in ("load", "loads"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(pickle, "Unpickler", RefusingUnpickler)
    monkeypatch.setattr(torch, "load", refuse)


def test_predictor_round_trip(tmp_path, no_unpickling):
    torch.manual_seed(0)
    model = Predictor(PredictorArch(kind="resnet18", resolution=32, width=8)).eval()
    save_model(model, tmp_path / "pred", meta={"seed": 2, "note": "evaluation"})
    _assert_pickle_free(tmp_path / "pred")
    cfg = read_config(tmp_path / "pred")
    assert cfg["kind"] == "predictor" and cfg["config"]["kind"] == "resnet18" and cfg["meta"]["seed"] == 2
    loaded = load_model(tmp_path / "pred")
    assert isinstance(loaded, Predictor) and not loaded.training and loaded.arch == model.arch
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        a, b = model(x), loaded(x)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_scm_round_trip(tmp_path, no_unpickling):
    scm = AttributeSCM(SCMConfig(steps=30, lr=3e-2, seed=3))
    data = synthetic_parents(256, seed=1)
    scm.fit(data)
    save_model(scm, tmp_path / "scm")
    _assert_pickle_free(tmp_path / "scm")
    loaded = load_model(tmp_path / "scm")
    assert isinstance(loaded, AttributeSCM) and loaded.cfg == scm.cfg
    with torch.no_grad():
        assert torch.equal(scm.log_prob(data), loaded.log_prob(data))
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a = scm.counterfactual(data, {"age": 90.0}, g1)
    b = loaded.counterfactual(data, {"age": 90.0}, g2)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_hvae_round_trip(tmp_path, no_unpickling):
    from cxrcf.hvae import HVAE

    torch.manual_seed(0)
    arch = preset_params("smoke").generator.arch
    model = HVAE(arch).eval()
    save_model(model, tmp_path / "hvae")
    _assert_pickle_free(tmp_path / "hvae")
    loaded = load_model(tmp_path / "hvae")
    assert loaded.arch == arch
    parents = synthetic_parents(2, seed=0)
    x = torch.rand(2, 1, arch.resolution, arch.resolution) * 2 - 1
    ctx = context(parents)
    with torch.no_grad():
        z = model.abduct(x, ctx, generator=torch.Generator().manual_seed(0))
        z2 = loaded.abduct(x, ctx, generator=torch.Generator().manual_seed(0))
        assert all(torch.equal(p, q) for p, q in zip(z, z2))
        a, b = model.decode(z, ctx), loaded.decode(z, ctx)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_save_replaces_an_existing_export_atomically(tmp_path):
    first = Predictor(PredictorArch(kind="cnn", width=4))
    second = Predictor(PredictorArch(kind="cnn", width=6))
    save_model(first, tmp_path / "m")
    save_model(second, tmp_path / "m")
    assert load_model(tmp_path / "m").arch.width == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary left behind


def test_load_errors_name_the_directory(tmp_path):
    with pytest.raises(CxrcfError, match="does not exist"):
        load_model(tmp_path / "absent")
    d = tmp_path / "m"
    save_model(Predictor(PredictorArch(kind="cnn", width=4)), d)

    (d / "model.safetensors").write_bytes(b"garbage, not a safetensors file")
    with pytest.raises(CxrcfError, match=str(d)):
        load_model(d)

    (d / "model.safetensors").unlink()
    with pytest.raises(CxrcfError, match="missing model.safetensors"):
        load_model(d)

    save_model(Predictor(PredictorArch(kind="cnn", width=4)), d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(dict(cfg, kind="gan")))
    with pytest.raises(CxrcfError, match="kind = 'gan'"):
        load_model(d)

    (d / "config.json").write_text(json.dumps(dict(cfg, config=dict(cfg["config"], width=5))))
    with pytest.raises(CxrcfError, match="do not match"):
        load_model(d)  # strict keys/shapes: weights of a width-4 model in a width-5 config

    (d / "config.json").write_text(json.dumps(dict(cfg, config=dict(cfg["config"], depth=3))))
    with pytest.raises(CxrcfError, match="depth"):
        load_model(d)

    (d / "config.json").write_text("{not json")
    with pytest.raises(CxrcfError, match="not valid JSON"):
        load_model(d)

    (d / "config.json").unlink()
    with pytest.raises(CxrcfError, match="missing config.json"):
        load_model(d)


def test_unknown_model_type_is_refused(tmp_path):
    with pytest.raises(CxrcfError, match="Linear"):
        save_model(torch.nn.Linear(2, 2), tmp_path / "x")
    assert not (tmp_path / "x").exists()
