"""Configuration: presets resolve, bad parameters fail with one line naming key, value and reason."""

from __future__ import annotations

import pytest

from cxrcf.config import PRESETS, Params, load_params, preset_params
from cxrcf.errors import CxrcfError


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_resolves(preset):
    params = preset_params(preset)
    assert isinstance(params, Params) and params.preset == preset
    assert params.data.synth.resolution == PRESETS[preset]["data"]["synth"]["resolution"]


def test_yaml_overrides_the_preset_and_keeps_the_rest(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("preset: smoke\ndata:\n  synth:\n    n_images: 123\n    seed: 7\n")
    params = load_params(path)
    assert (params.data.synth.n_images, params.data.synth.seed) == (123, 7)
    assert params.data.synth.resolution == 32  # from the smoke preset
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="frozen"):
        params.data.synth.seed = 3


def test_missing_file_means_the_default_preset(tmp_path):
    assert load_params(tmp_path / "absent.yaml").preset == "cpu"


@pytest.mark.parametrize(
    "yaml_text, expected",
    [
        ("data:\n  synth:\n    n_pictures: 3\n", r"^.*params\.yaml: data\.synth\.n_pictures = 3: unknown key$"),
        ("data:\n  synth:\n    n_images: -1\n", r"data\.synth\.n_images = -1: .*greater than or equal to 10"),
        ("data:\n  synth:\n    resolution: big\n", r"data\.synth\.resolution = 'big': .*valid integer"),
        ("data:\n  synth:\n    race_probs: [0.5, 0.5, 0.5]\n", r"data\.synth\.race_probs = \[0\.5, 0\.5, 0\.5\]: .*summing to 1"),
        ("data:\n  synth:\n    split: {train: 0.5}\n", r"data\.synth\.split: .*must be 1, got 0\.7"),
        ("preset: huge\n", r"preset = 'huge': unknown preset; expected one of smoke, cpu, paper"),
        ("serve:\n  port: 70000\n", r"serve\.port = 70000: .*less than or equal to 65535"),
        ("serve:\n  port: 8150\n", r"serve: .*port 8150 lies in the replicas' direct ports 8100-8199"),
        ("cft:\n  modes: [hard, medium]\n", r"cft\.modes\.1 = 'medium': .*'hard' or 'soft'"),
        ("cft:\n  k_weights: {sex: -1, finding: 1}\n", r"cft\.k_weights: .*weights must be >= 0 with at least one > 0"),
        ("generator:\n  arch:\n    gated_adapters: []\n", r"cft\.train = 'adapters' needs generator\.arch\.gated_adapters"),
        ("predictors:\n  guidance:\n    adversarial: {eps: -0.1}\n",
         r"predictors\.guidance\.adversarial\.eps = -0\.1: .*greater than or equal to 0"),
    ],
)
def test_bad_parameters_name_key_value_and_reason(tmp_path, yaml_text, expected):
    path = tmp_path / "params.yaml"
    path.write_text(yaml_text)
    with pytest.raises(CxrcfError) as info:
        load_params(path)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message
    import re

    assert re.search(expected, message), message


def test_not_yaml_and_not_a_mapping(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(CxrcfError, match="not valid YAML"):
        load_params(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(CxrcfError, match="mapping"):
        load_params(listy)


def test_preset_params_rejects_unknown_sections():
    with pytest.raises(CxrcfError, match="nonsense = 1: unknown key"):
        preset_params("smoke", nonsense=1)
